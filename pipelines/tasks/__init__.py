"""Known-answer task builders: data whose right answer is known by construction, used by the
benchmarks, the demo, the notebooks, ``slidestream eval`` and the tests.

- :func:`digit_bags`, :func:`top_instance_precision` (:mod:`.digits`): MIL digit bags;
- :func:`signed_features`, :func:`mean_pool_baseline` (:mod:`.features`): synthetic MIL features
  whose targets leave the bag mean unchanged, and the mean-pooling shortcut;
- :func:`make_real_slides` (:mod:`.slides`): slide archives with an inserted region of another
  real tissue (slide labels and the region are known);
- :func:`make_exact_label_task`, :data:`TASK_CLASSES`, :func:`majority_dice`,
  :func:`pixel_colour_baseline`, :func:`exact_task_config` (:mod:`.segmentation`): composites
  with exact segmentation labels whose tissue classes share one colour distribution;
- :func:`build_magnification_task` (:mod:`.magnification`): tiles labelled by their µm/px;
- :func:`tissue_type_map`, :data:`TISSUE_TYPES`, :func:`build_tissue_type_task`,
  :func:`match_colours`, :func:`colour_reference`, :func:`colour_statistics`, :func:`overlay_tissue_types`
  (:mod:`.tissue_types`): the tissue types of a real slide (stroma / epithelium / dense-nuclear on
  the demo slide) and the colour matching that leaves only morphology to tell them apart;
- :func:`reference_tissue_mask`, :func:`downsample_mask` (:mod:`.tissue_reference`): a
  full-resolution reference tissue mask of a real slide, to score thumbnail masks against;
- :func:`write_tissue_type_task`, :func:`tissue_type_tiles`, :func:`epithelium_stroma_map`,
  :data:`TILE_TABLE_CLASSES`, :data:`DEMO_TILES`, :func:`read_task_rows` (:mod:`.tile_table`): tiles of
  real slides labelled epithelium / stroma in spatially separated blocks, as a tile table for
  ``slidestream finetune``.
"""

from wsi.data import DEMO_SLIDE  # the CC0 demo slide shipped as package data

from .digits import digit_bags, top_instance_precision  # noqa: E402
from .features import mean_pool_baseline, mean_pool_oof_auroc, mean_pool_scores, signed_features  # noqa: E402
from .magnification import build_magnification_task  # noqa: E402
from .segmentation import (  # noqa: E402
    TASK_CLASSES,
    exact_task_config,
    majority_dice,
    make_exact_label_task,
    pixel_colour_baseline,
)
from .slides import make_real_slides  # noqa: E402
from .tile_table import (  # noqa: E402
    DEMO_TILES,
    TILE_TABLE_CLASSES,
    epithelium_stroma_map,
    read_task_rows,
    tissue_type_tiles,
    write_tissue_type_task,
)
from .tissue_reference import downsample_mask, reference_tissue_mask  # noqa: E402
from .tissue_types import (  # noqa: E402
    TISSUE_TYPES,
    TissueTypeMap,
    build_tissue_type_task,
    colour_reference,
    colour_statistics,
    match_colours,
    overlay_tissue_types,
    tissue_type_map,
)

__all__ = [
    "DEMO_SLIDE",
    "DEMO_TILES",
    "TASK_CLASSES",
    "TISSUE_TYPES",
    "TILE_TABLE_CLASSES",
    "TissueTypeMap",
    "build_magnification_task",
    "build_tissue_type_task",
    "colour_reference",
    "colour_statistics",
    "digit_bags",
    "downsample_mask",
    "exact_task_config",
    "majority_dice",
    "make_exact_label_task",
    "make_real_slides",
    "epithelium_stroma_map",
    "match_colours",
    "mean_pool_baseline",
    "mean_pool_oof_auroc",
    "mean_pool_scores",
    "overlay_tissue_types",
    "pixel_colour_baseline",
    "reference_tissue_mask",
    "signed_features",
    "tissue_type_map",
    "read_task_rows",
    "tissue_type_tiles",
    "top_instance_precision",
    "write_tissue_type_task",
]
