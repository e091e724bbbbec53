"""``slidestream demo`` (``make demo``): the whole chain on the shipped CC0 slide, ending in
``demo-output/index.html`` (:mod:`pipelines.demo.run`), with its report
(:mod:`pipelines.demo.report`), segmentation step (:mod:`pipelines.demo.segmentation`) and
encoder probe (:mod:`pipelines.demo.probe`).

Public API: :class:`Demo`, :func:`add_arguments`, :func:`main`, :func:`demo_segmentation`,
:func:`demo_probe`, :class:`Section`, :func:`write_index`, :data:`DEMO_SLIDE`.
"""

from .probe import demo_probe
from .report import Section, write_index
from .run import DEMO_SLIDE, Demo, add_arguments, main
from .segmentation import demo_segmentation

__all__ = [
    "DEMO_SLIDE",
    "Demo",
    "Section",
    "add_arguments",
    "demo_probe",
    "demo_segmentation",
    "main",
    "write_index",
]
