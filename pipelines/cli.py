"""The ``slidestream`` command (also ``python -m pipelines``). Each command lives in its own
package and is imported only when run, so ``slidestream --help`` is instant and one broken
optional dependency breaks one command. A command module defines ``add_arguments(parser)`` and
``main(args) -> int``.

Every job follows one convention (:mod:`pipelines.config`)::

    slidestream JOB [ACTION] [--config FILE] [--out DIR] [NAMED FLAGS] [KEY=VALUE ...]

Errors. A user-facing error — :class:`pipelines.errors.PipelineError` (config, inputs, resume),
:class:`wsi.errors.WsiError` (slides, annotations) or :class:`models.backbones.WeightsError`
(a weights file) — is caught here, once: one line on stderr naming the file and the fix, exit
status 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

from .config import OVERRIDE

#: name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("pipelines.tools.info", "show levels, dimensions, mpp, vendor and backend of a slide"),
    "convert": ("pipelines.tools.convert", "convert a slide to OME-Zarr (zarr v3, sharded)"),
    "tissue": (
        "pipelines.tissue.cli",
        "tissue masks with QC overlays (tissue qc); train the U-Net (tissue train)",
    ),
    "pretrain": ("pipelines.pretrain.cli", "self-supervised pretraining (DINO, SimCLR) on streamed tiles"),
    "embed": ("pipelines.embed.cli", "embed slide archives: one feature .h5 per slide, resumable"),
    "mil": ("pipelines.mil.cli", "slide-level MIL: train (cross-validated), predict, heatmap"),
    "segment": ("pipelines.segment.cli", "segmentation: train on annotations, predict whole slides"),
    "finetune": (
        "pipelines.finetune.cli",
        "supervised fine-tuning of an encoder + linear head (recipes: pipelines/configs/finetune/)",
    ),
    "eval": ("pipelines.evaluate.cli", "evaluate encoders: linear probe, kNN, few-shot, MIL, segmentation"),
    "bench": (
        "pipelines.bench",
        "benchmarks: read, loader, tissue, train, embed, mil, segment, stain, finetune",
    ),
    "demo": ("pipelines.demo", "run the end-to-end demo on the shipped slide"),
}

EPILOG = (
    "Every job: slidestream JOB [ACTION] [--config FILE] [--out DIR] [flags] [KEY=VALUE ...]\n"
    "(slidestream JOB --help lists its flags and config keys)."
)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="slidestream",
        description="Whole-slide pipeline: stream tiles online, pretrain, embed, MIL, segment, evaluate.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"slidestream {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
            p.set_defaults(_module=module)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception classes reported as one line (exit 2) rather than a traceback."""
    from models.backbones import WeightsError
    from wsi.errors import WsiError

    from .errors import PipelineError

    return (PipelineError, WsiError, WeightsError)


def one_line(e: BaseException) -> str:
    """An error message on one line (multi-line messages, e.g. annotation problems, joined)."""
    text = re.sub(r":[ \t]*\n\s*", ": ", str(e).strip())
    return "; ".join(s.strip() for s in text.splitlines() if s.strip())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    # KEY=VALUE overrides may come anywhere, also between flags: argparse leaves the groups after
    # the first one unparsed; they are overrides when they look like one, else an error
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if not OVERRIDE.match(a)] if hasattr(args, "overrides") else extra
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = [*(args.overrides or []), *extra]
    module = importlib.import_module(args._module)
    try:
        return int(module.main(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except user_errors() as e:
        print(f"slidestream {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
