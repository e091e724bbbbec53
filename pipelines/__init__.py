"""slidestream jobs: one package per job (``pretrain``, ``embed``, ``mil``, ``segment``, ``tissue``,
``evaluate``), the components their training loops share (``training``), known-answer task
builders (``tasks``), ``bench``, ``demo``, ``tools`` (info, convert), the ``slidestream`` command
(``cli``), typed configs and the one command-line convention (``config``) and the user-facing
errors (``errors``). See ARCHITECTURE.md for the map."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("slidestream")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"
