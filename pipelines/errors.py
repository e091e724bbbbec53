"""User-facing errors of the jobs, in one small hierarchy.

Every job raises these (or :class:`wsi.errors.WsiError` from the slide layer, or
:class:`models.backbones.WeightsError` for a weights file) when the *user* asked for something
that cannot be done: a typo in a config, a missing labels file, a checkpoint written by another
world size. The message names the file (or key) and the fix. ``slidestream`` (:func:`pipelines.cli.main`)
catches them once, prints one line and exits with status 2; anything else is a bug and keeps its
traceback.

- :class:`PipelineError` — base class.
- :class:`ConfigError` — a config file, flag or ``key=value`` override is wrong (unknown key,
  wrong type, missing required value).
- :class:`InputError` — an input (labels CSV, feature files, patch task, annotation pairs, model
  directory) is malformed or inconsistent. :class:`MissingInputError` when it does not exist.
- :class:`ResumeError` — a checkpoint cannot continue this run (other world size, other job).
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base class of the jobs' user-facing errors; the message names the file and the fix."""


class ConfigError(PipelineError, ValueError):
    """A config file, flag or ``key=value`` override is wrong."""


class InputError(PipelineError, ValueError):
    """An input file or folder is malformed or inconsistent."""


class MissingInputError(PipelineError, FileNotFoundError):
    """An input file or folder does not exist."""


class ResumeError(PipelineError):
    """A checkpoint cannot continue this run."""


__all__ = ["ConfigError", "InputError", "MissingInputError", "PipelineError", "ResumeError"]
