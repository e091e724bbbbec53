"""Hostile slides for the containment tests of issue 12 (tests/pipelines/runtime, the embed archive
test and the batch jobs): each is a few hundred bytes to a few KB that makes a real reader crash,
hang, exhaust its memory limit or refuse the file. Nothing here fakes a failure: every outcome
comes from the real TIFF backend, OpenSlide or the operating system.

- :func:`glib_abort_tiff`: a 518-byte CMYK TIFF (TIFF backend: unsupported photometric, so it goes
  to OpenSlide) whose one tile declares 16384x16384 pixels — exactly the 1 GiB decode limit, so
  it is allowed; OpenSlide's ``g_malloc`` of the tile fails under a worker memory limit below
  that and GLib aborts the process (SIGABRT);
- :func:`big_tile_tiff`: the same geometry in RGB, read by the TIFF backend, whose 768 MiB
  decode buffer exceeds such a limit (``MemoryError``);
- :func:`ifd_loop_tiff`, :func:`deflate_bomb_tiff`, :func:`jpeg_sof_bomb_tiff`: refused cleanly
  (``CorruptSlideError``, ``UnreadableTileError`` / ``DecodeLimitError``);
- :func:`stalled_slide`: a named pipe with a slide's name: opening it blocks for ever, as a file
  on a stalled network file system does;
- :func:`worker_data_bytes`: the data segment of a worker process with some modules imported (the
  base the memory limits of these tests are set from).
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

BIG = 16384  # 16384^2 * 4 bytes = the default 1 GiB decode limit exactly


def _one_tile_tiff(path: Path, photometric: str, spp: int) -> Path:
    import tifffile
    from fuzz_corpus import TiffEdit

    tifffile.imwrite(
        path,
        np.full((256, 256, spp), 30, np.uint8),
        tile=(256, 256),
        photometric=photometric,
        compression="zlib",
        metadata=None,
    )
    data = bytearray(path.read_bytes())
    ed = TiffEdit(data)
    for tag in (256, 257, 322, 323):  # ImageWidth, ImageLength, TileWidth, TileLength
        if not ed.set_value(ed.ifds[0], tag, BIG):
            raise RuntimeError(f"cannot set tag {tag} of {path}")
    path.write_bytes(bytes(data))
    return path


def glib_abort_tiff(path: Path) -> Path:
    return _one_tile_tiff(path, "separated", 4)


def big_tile_tiff(path: Path) -> Path:
    return _one_tile_tiff(path, "rgb", 3)


def _pyramid(path: Path, **kw) -> Path:
    from conftest import DEMO_SLIDE

    from wsi.synth import load_demo_pixels, mirror_tile, write_tiff_pyramid

    px = mirror_tile(load_demo_pixels(DEMO_SLIDE)[300:700, 400:900], (520, 390))
    write_tiff_pyramid(path, px, **{"tile": 128, "downsamples": (1, 4), "mpp": 0.5, **kw})
    return path


def ifd_loop_tiff(path: Path) -> Path:
    from fuzz_corpus import TiffEdit

    _pyramid(path, flavor="generic", compression="deflate")
    data = bytearray(path.read_bytes())
    ed = TiffEdit(data)
    ed.set_next(ed.ifds[-1], ed.ifds[0].offset)
    path.write_bytes(bytes(data))
    return path


def deflate_bomb_tiff(path: Path) -> Path:
    """Every level-0 tile is a deflate stream of 256 MiB of zeros (~260 KB)."""
    from fuzz_corpus import TiffEdit

    _pyramid(path, flavor="generic", compression="deflate")
    data = bytearray(path.read_bytes())
    ed = TiffEdit(data)
    bomb = zlib.compress(bytes(1 << 28), 9)
    at = len(data)
    data += bomb
    ifd = ed.ifds[0]
    for i in range(len(ed.values(ifd, 324))):
        ed.set_value(ifd, 324, at, i)
        ed.set_value(ifd, 325, len(bomb), i)
    path.write_bytes(bytes(data))
    return path


def jpeg_sof_bomb_tiff(path: Path, size: tuple[int, int] = (60000, 60000)) -> Path:
    """Every level-0 JPEG tile's frame header declares ``size`` (h, w) pixels."""
    from fuzz_corpus import TiffEdit, _sof_pos

    _pyramid(path)
    data = bytearray(path.read_bytes())
    ed = TiffEdit(data)
    for off, n in ed.tiles(ed.ifds[0]):
        pos = _sof_pos(data, off, off + n)
        if pos is not None:
            struct.pack_into(">HH", data, pos + 5, *size)
    path.write_bytes(bytes(data))
    return path


def stalled_slide(path: Path) -> Path:
    os.mkfifo(path)
    return path


def vm_data() -> int:
    """This process's data segment in bytes (what RLIMIT_DATA bounds)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmData in /proc/self/status")


def worker_data_bytes(preload: tuple[str, ...]) -> int:
    """The data segment of a fresh slide worker with ``preload`` imported."""
    from pipelines.runtime import SlideWorker

    with SlideWorker(64.0, preload=preload) as w:
        return int(w.call(vm_data))


# --- hostile weights ---------------------------------------------------------------------------------
class _Payload:
    """Unpickled, it creates ``marker`` (``Path.touch``): the file appears iff a pickle's code ran."""

    def __init__(self, marker: Path):
        self.marker = Path(marker)

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def evil_pickle(path: Path, marker: Path, state: dict | None = None) -> Path:
    """A torch checkpoint (``torch.save``) holding a real state dict and a payload that writes
    ``marker`` when the file is unpickled (``torch.load(weights_only=False)``, ``pickle.load``)."""
    import torch

    torch.save(
        {"state_dict": state if state is not None else {"w": torch.zeros(2)}, "extra": _Payload(marker)}, path
    )
    return path


def weights_with_metadata(path: Path, arch: str, metadata: dict, sidecar: dict | None = None) -> Path:
    """Real ``arch`` backbone weights (safetensors) whose metadata (and optional JSON sidecar)
    carry ``metadata``: e.g. ``timm_kwargs`` naming a checkpoint for timm to load."""
    import json

    import torch
    from safetensors.torch import save_file

    from models import backbones

    torch.manual_seed(0)
    model = backbones.create(arch)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {"timm_name": arch, **{k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}}
    save_file(sd, str(path), metadata=meta)
    if sidecar is not None:
        path.with_suffix(".json").write_text(json.dumps(sidecar))
    return path
