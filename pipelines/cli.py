"""The ``slidestream`` command. Subcommands live in their own modules and are imported only when
run, so ``slidestream --help`` is instant and one broken optional dependency breaks one command.

A subcommand module defines ``add_arguments(parser)`` and ``main(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("pipelines.info_cmd", "show levels, dimensions, mpp, vendor and backend of a slide"),
    "convert": ("pipelines.convert_cmd", "convert a slide to OME-Zarr (zarr v3, sharded)"),
    "tissue": ("pipelines.tissue_cmd", "tissue masks with QC overlays; `tissue train` trains the U-Net"),
    "pretrain": ("pipelines.pretrain", "self-supervised pretraining (DINO, SimCLR) on streamed tiles"),
    "embed": ("pipelines.embed", "embed slide archives: one feature .h5 per slide, resumable"),
    "mil": ("pipelines.mil", "slide-level MIL: train (cross-validated), predict, heatmap"),
    "segment": ("pipelines.segment", "segmentation: train on annotations, predict whole slides"),
    "eval": ("pipelines.evaluate", "evaluate encoders: linear probe, kNN, few-shot, MIL, segmentation"),
    "bench": ("pipelines.bench", "benchmarks: read, loader, tissue, train, embed, mil, segment"),
    "demo": ("pipelines.demo", "run the end-to-end demo on the shipped slide"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="slidestream",
        description="Whole-slide pipeline: stream tiles online, pretrain, embed, MIL, segment, evaluate.",
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    module = importlib.import_module(args._module)
    try:
        return int(module.main(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
