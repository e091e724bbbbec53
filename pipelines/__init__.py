"""slidestream jobs: the command line, configs, training loops, distributed set-up, benchmarks."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("slidestream")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"
