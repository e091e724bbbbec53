"""``slidestream demo`` (``make demo``): the whole chain on the shipped CC0 slide, ending in
``demo-output/index.html`` (:mod:`pipelines.demo.run`), with its report
(:mod:`pipelines.demo.report`) and segmentation step (:mod:`pipelines.demo.segmentation`).

Public API: :class:`Demo`, :func:`add_arguments`, :func:`main`, :func:`demo_segmentation`,
:class:`Section`, :func:`write_index`, :data:`DEMO_SLIDE`.
"""

from .report import Section, write_index
from .run import DEMO_SLIDE, Demo, add_arguments, main
from .segmentation import demo_segmentation

__all__ = ["DEMO_SLIDE", "Demo", "Section", "add_arguments", "demo_segmentation", "main", "write_index"]
