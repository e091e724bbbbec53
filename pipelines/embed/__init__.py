"""``slidestream embed``: batch embedding of slide archives — one CLAM/TRIDENT-compatible feature
``.h5`` per slide, a manifest of done / skipped / failed slides with reasons, resumable, under
torchrun across ranks.

Public API: :class:`EmbedConfig`, :func:`embed_slides`, :class:`Summary`, :func:`assign_to_ranks`,
:func:`resolve`; per slide: :class:`Job`, :func:`embed_one`, :func:`tile_batches`,
:func:`slide_mask`, :func:`grid`, :func:`check_feature_file`, :func:`expected_attrs`,
:func:`open_with_mpp`; the reading side run in the slide worker: :func:`read_slide`
(:class:`SlidePlan`, then :class:`RawBatch` es), :func:`raw_batches`, :func:`to_encoder_input`;
the manifest: :class:`Row`, :func:`read_rows`, :func:`write_rows`.
"""

from .config import EmbedConfig
from .job import Summary, assign_to_ranks, embed_slides, resolve
from .manifest import Row, read_rows, write_rows
from .worker import (
    Job,
    RawBatch,
    SlideFailed,
    SlidePlan,
    TileBatch,
    check_feature_file,
    clean_temp_files,
    embed_one,
    expected_attrs,
    failure_reason,
    grid,
    open_with_mpp,
    raw_batches,
    read_slide,
    slide_mask,
    slide_stat,
    tile_batches,
    to_encoder_input,
)

__all__ = [
    "EmbedConfig",
    "Job",
    "RawBatch",
    "Row",
    "SlideFailed",
    "SlidePlan",
    "Summary",
    "TileBatch",
    "assign_to_ranks",
    "check_feature_file",
    "clean_temp_files",
    "embed_one",
    "embed_slides",
    "expected_attrs",
    "failure_reason",
    "grid",
    "open_with_mpp",
    "raw_batches",
    "read_rows",
    "read_slide",
    "resolve",
    "slide_mask",
    "slide_stat",
    "tile_batches",
    "to_encoder_input",
    "write_rows",
]
