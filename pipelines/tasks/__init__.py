"""Known-answer task builders: data whose right answer is known by construction, used by the
benchmarks, the demo, the notebooks, ``slidestream eval`` and the tests.

- :func:`digit_bags`, :func:`top_instance_precision` (:mod:`.digits`): MIL digit bags;
- :func:`make_real_slides` (:mod:`.slides`): slide archives with an inserted region of another
  real tissue (slide labels and the region are known);
- :func:`make_exact_label_task`, :data:`TASK_CLASSES`, :func:`majority_dice`,
  :func:`exact_task_config` (:mod:`.segmentation`): composites with exact segmentation labels;
- :func:`build_magnification_task` (:mod:`.magnification`): tiles labelled by their µm/px;
- :func:`write_tissue_type_task`, :func:`tissue_type_tiles`, :func:`tissue_type_map`,
  :data:`TISSUE_TYPES`, :data:`DEMO_TILES` (:mod:`.tissue_types`): tiles of real slides labelled
  epithelium / stroma in spatially separated blocks, as a tile table for ``slidestream finetune``.
"""

from wsi.data import DEMO_SLIDE  # the CC0 demo slide shipped as package data

from .digits import digit_bags, top_instance_precision  # noqa: E402
from .magnification import build_magnification_task  # noqa: E402
from .segmentation import TASK_CLASSES, exact_task_config, majority_dice, make_exact_label_task  # noqa: E402
from .slides import make_real_slides  # noqa: E402
from .tissue_types import (  # noqa: E402
    DEMO_TILES,
    TISSUE_TYPES,
    read_task_rows,
    tissue_type_map,
    tissue_type_tiles,
    write_tissue_type_task,
)

__all__ = [
    "DEMO_SLIDE",
    "DEMO_TILES",
    "TASK_CLASSES",
    "TISSUE_TYPES",
    "build_magnification_task",
    "digit_bags",
    "exact_task_config",
    "majority_dice",
    "make_exact_label_task",
    "make_real_slides",
    "read_task_rows",
    "tissue_type_map",
    "tissue_type_tiles",
    "top_instance_precision",
    "write_tissue_type_task",
]
