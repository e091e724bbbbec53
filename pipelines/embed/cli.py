"""``slidestream embed [--config FILE] [--out DIR] [flags] [KEY=VALUE ...]``: embed slide archives,
one feature ``.h5`` per slide, resumable (see :mod:`pipelines.embed.job`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..config import Flag, add_job_arguments, config_from_args, to_dict
from ..runtime import ISOLATION_FLAGS
from .config import EmbedConfig

FLAGS = (
    Flag(
        "slides",
        "slides: directories, globs, URL prefixes, slide files or CSV manifests (url[,slide_id,mpp,mask])",
        nargs="+",
    ),  # fmt: skip
    Flag(
        "encoder",
        "timm name, a .safetensors from `slidestream pretrain`, name=weights, or a preset (uni, hf-hub:ORG/NAME; see `slidestream models`)",
    ),
    Flag("mpp", "target µm/px of the tiles (default 0.5)", type=float),
    Flag("tile_size", "tile side in pixels (default 224)", type=int),
    Flag("batch_size", "tiles per forward pass (default 64)", type=int),
    Flag("read_threads", "decode threads per batch read (default 2)", type=int),
    Flag("decode", "where JPEG tiles are decoded: cpu | gpu (nvJPEG; default cpu)", choices=["cpu", "gpu"]),
    Flag("scaled_decode", "decode 2x/4x/8x reductions in the DCT domain (not exact)", action="store_true"),
    Flag(
        "tissue_method",
        "tissue mask method (default auto: the shipped U-Net, Otsu without its weights)",
        choices=["otsu", "unet", "auto"],
    ),
    Flag("min_tissue", "minimum tissue fraction of a tile (default 0.4)", type=float),
    Flag("mpp_override", "µm/px to assume for slides without mpp metadata", type=float),
    Flag("max_failed_tiles", "fraction of unreadable tiles that fails a slide (default 0.05)", type=float),
    Flag("device", "auto | cpu | cuda (default auto)"),
    Flag("stain_norm", "stain normalisation: macenko:TARGET or reinhard:TARGET (an RGB image file, or demo)"),
    Flag("overwrite", "redo every slide, even those with valid files", action="store_true"),
    Flag("retry_failed", "retry slides the manifest records as failed", action="store_true"),
    Flag("hash_slides", "record each slide file's sha256 (reads every byte)", action="store_true"),
    Flag("progress", "no progress bars", name="--no-progress", action="store_false"),
    *ISOLATION_FLAGS,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_job_arguments(
        parser,
        EmbedConfig,
        FLAGS,
        config_help="YAML config (keys of EmbedConfig, e.g. pipelines/configs/embed/default.yaml)",
        out_help="output directory (local or shared filesystem)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log why files are redone")


def embed_config(args: argparse.Namespace) -> EmbedConfig:
    """The config of a parsed `slidestream embed` command line."""
    return config_from_args(EmbedConfig, args, FLAGS, required=("slides", "encoder", "out"))


def main(args: argparse.Namespace) -> int:
    from .job import embed_slides

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    cfg = embed_config(args)
    summary = embed_slides(**to_dict(cfg))
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary.table(), file=sys.stderr)
    return 0 if summary.ok else 1
