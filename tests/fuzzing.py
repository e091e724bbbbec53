"""The hostile-file corpus of issue 12 and the harness that runs it with crashes contained.

Corpus: deterministic variants (seeded) of real slides — synthetic pyramids from :mod:`wsi.synth`,
the shipped demo slide, the real fixtures in ../shared/testdata when present, and Zarr stores
converted from them — with byte flips in directories and tile data, truncations and targeted
edits (huge/zero sizes and tile sizes, offsets past the end, huge byte counts, IFD and SubIFD
loops, damaged JPEGTables, SOF/SIZ larger or smaller than the tile, swapped compression,
photometric, bits and samples, wrong tag types, NaN/negative/infinite mpp; Zarr: gigantic chunks,
codec bombs, shard indexes that lie, paths outside the store, malformed JSON).

Harness: :func:`run_corpus` runs variants in worker subprocesses (this file run as a script) with an
address-space limit (``RLIMIT_AS``) and a per-variant time limit. A worker reports one JSON line per
variant; when a worker crashes, exceeds its memory or stops reporting, the variant it was on is run
again alone (its outcome is then ``crash``, ``memory`` or ``hang``) and the rest go on in a new
worker. Outcomes: ``ok``; ``clean`` (a ``SlideError`` subclass whose message names the file);
``other`` (any other exception, or a message not naming the file); ``memory``; ``hang``; ``crash``;
``wrong`` (a tile whose stream header disagrees with the tile geometry returned pixels).
"""

from __future__ import annotations

import json
import os
import queue
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from wsi.backends.tiff_ifd import TYPE_SIZES

OUTCOMES = ("ok", "clean", "other", "memory", "hang", "crash", "wrong")
MEMORY_LIMIT = 3 << 30  # address space of one worker (an idle worker with every library loaded: ~0.5 GiB)
TIME_LIMIT = 30.0  # seconds one variant may take


@dataclass
class Variant:
    id: str
    path: str  # the file or store the worker opens
    must_fail: list | None = None  # [level, x, y, w, h]: a region whose tile stream lies about its size
    probe: str | None = None  # harness self-test only: "abort", "hang", "alloc" or "exit" instead of reading


@dataclass
class Result:
    id: str
    outcome: str
    detail: str = ""


# ================================================================================================
# TIFF editing
# ================================================================================================


@dataclass
class Entry:
    pos: int  # byte position of the entry
    tag: int
    typ: int
    count: int
    value_pos: int  # where the values are (inline: inside the entry)


@dataclass
class Ifd:
    offset: int
    entries: dict[int, Entry] = field(default_factory=dict)
    next_pos: int = 0  # position of the next-IFD pointer


class TiffEdit:
    """The directory of a TIFF in a bytearray (classic or BigTIFF, either byte order), for patching:
    main-chain IFDs in order, then SubIFDs."""

    def __init__(self, data: bytearray):
        self.data = data
        self.bo = "<" if data[:2] == b"II" else ">"
        self.big = struct.unpack(self.bo + "H", data[2:4])[0] == 43
        self.osz = 8 if self.big else 4
        self.ifds: list[Ifd] = []
        first = self._off(8 if self.big else 4)
        seen: set[int] = set()
        todo = [first]
        while todo:
            off = todo.pop(0)
            while off and off not in seen and off < len(data):
                seen.add(off)
                ifd = self._parse(off)
                self.ifds.append(ifd)
                sub = ifd.entries.get(330)
                if sub is not None:
                    todo.extend(self.values(ifd, 330))
                off = self._off(ifd.next_pos)

    def _off(self, pos: int) -> int:
        return struct.unpack_from(self.bo + ("Q" if self.big else "I"), self.data, pos)[0]

    def _parse(self, off: int) -> Ifd:
        nfmt, nsz, esz = ("Q", 8, 20) if self.big else ("H", 2, 12)
        n = struct.unpack_from(self.bo + nfmt, self.data, off)[0]
        ifd = Ifd(off)
        for k in range(n):
            p = off + nsz + k * esz
            if self.big:
                tag, typ, count = struct.unpack_from(self.bo + "HHQ", self.data, p)
                vp = p + 12
            else:
                tag, typ, count = struct.unpack_from(self.bo + "HHI", self.data, p)
                vp = p + 8
            if count * TYPE_SIZES.get(typ, 1) > self.osz:
                vp = self._off(vp)
            ifd.entries[tag] = Entry(p, tag, typ, count, vp)
        ifd.next_pos = off + nsz + n * esz
        return ifd

    def values(self, ifd: Ifd, tag: int) -> list[int]:
        e = ifd.entries[tag]
        fmt = {3: "H", 4: "I", 16: "Q", 13: "I", 18: "Q"}.get(e.typ)
        if fmt is None:
            return []
        return list(struct.unpack_from(self.bo + fmt * e.count, self.data, e.value_pos))

    def set_value(self, ifd: Ifd, tag: int, value: int, index: int = 0) -> bool:
        """Overwrite value ``index`` of an integer tag (in place, in its own type)."""
        e = ifd.entries.get(tag)
        if e is None:
            return False
        fmt = {3: "H", 4: "I", 16: "Q", 13: "I", 18: "Q", 8: "h", 9: "i"}.get(e.typ)
        if fmt is None or index >= e.count:
            return False
        size = struct.calcsize(fmt)
        value &= (1 << (8 * size)) - 1 if fmt.isupper() else -1
        struct.pack_into(self.bo + fmt, self.data, e.value_pos + index * size, value)
        return True

    def set_type(self, ifd: Ifd, tag: int, typ: int) -> bool:
        e = ifd.entries.get(tag)
        if e is None:
            return False
        struct.pack_into(self.bo + "H", self.data, e.pos + 2, typ)
        return True

    def set_count(self, ifd: Ifd, tag: int, count: int) -> bool:
        e = ifd.entries.get(tag)
        if e is None:
            return False
        struct.pack_into(self.bo + ("Q" if self.big else "I"), self.data, e.pos + 4, count)
        return True

    def set_next(self, ifd: Ifd, target: int) -> None:
        struct.pack_into(self.bo + ("Q" if self.big else "I"), self.data, ifd.next_pos, target)

    def tiles(self, ifd: Ifd) -> list[tuple[int, int]]:
        """(offset, byte count) of each tile or strip of ``ifd``."""
        offs = self.values(ifd, 324) or self.values(ifd, 273)
        cnts = self.values(ifd, 325) or self.values(ifd, 279)
        return list(zip(offs, cnts))


def _sof_pos(data: bytes | bytearray, start: int, end: int) -> int | None:
    """Position of the SOF marker of the JPEG stream in data[start:end]."""
    i = start + 2
    while i + 4 <= end:
        if data[i] != 0xFF:
            return None
        m = data[i + 1]
        if m in range(0xC0, 0xD0) and m not in (0xC4, 0xC8, 0xCC):
            return i
        if m == 0xDA:
            return None
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


# ================================================================================================
# TIFF mutations: (data, edit, rng) -> (label, must_fail) or None when not applicable
# ================================================================================================
def _level0(ed: TiffEdit) -> Ifd:
    return ed.ifds[0]


def m_flip_ifd(data, ed, rng):
    ifd = rng.choice(ed.ifds)
    lo, hi = ifd.offset, ifd.next_pos + ed.osz
    for _ in range(rng.randint(1, 6)):
        data[rng.randrange(lo, hi)] ^= rng.randint(1, 255)
    return f"flip-ifd@{ifd.offset}", None


def m_flip_tile(data, ed, rng):
    ifd = rng.choice(ed.ifds)
    tiles = [t for t in ed.tiles(ifd) if t[1] > 8 and t[0] + t[1] <= len(data)]
    if not tiles:
        return None
    off, n = rng.choice(tiles)
    head = rng.random() < 0.5
    for _ in range(rng.randint(1, 8)):
        p = off + (rng.randrange(0, min(n, 64)) if head else rng.randrange(0, n))
        data[p] ^= rng.randint(1, 255)
    return f"flip-tile@{off}", None


def m_truncate(data, ed, rng):
    cut = int(len(data) * rng.uniform(0.02, 0.999))
    del data[cut:]
    return f"truncate@{cut}", None


def _sizes(tag: int, values: Iterable[int]) -> Callable:
    values = list(values)

    def m(data, ed, rng):
        ifd = rng.choice(ed.ifds) if rng.random() < 0.4 else _level0(ed)
        v = rng.choice(values)
        if not ed.set_value(ifd, tag, v):
            return None
        return f"tag{tag}={v}@{ifd.offset}", None

    m.__name__ = f"m_tag{tag}"
    return m


def m_offset_past_eof(data, ed, rng):
    ifd = _level0(ed)
    tag = 324 if 324 in ifd.entries else 273
    n = ifd.entries[tag].count
    k = rng.randrange(n)
    return (
        (f"offset-past-eof#{k}", None)
        if ed.set_value(ifd, tag, len(data) + rng.randint(1, 1 << 30), k)
        else None
    )


def m_huge_bytecount(data, ed, rng):
    ifd = _level0(ed)
    tag = 325 if 325 in ifd.entries else 279
    k = rng.randrange(ifd.entries[tag].count)
    return (
        (f"huge-count#{k}", None)
        if ed.set_value(ifd, tag, rng.choice([1 << 31, (1 << 32) - 1, len(data)]), k)
        else None
    )


def m_huge_tag_count(data, ed, rng):
    ifd = rng.choice(ed.ifds)
    tag = rng.choice([t for t in ifd.entries if t in (273, 279, 324, 325, 270, 347)] or [256])
    return (
        (f"tag{tag}-count-huge", None)
        if ed.set_count(ifd, tag, rng.choice([1 << 30, (1 << 32) - 1]))
        else None
    )


def m_ifd_loop(data, ed, rng):
    main = [i for i in ed.ifds if i.next_pos]
    a = rng.choice(main)
    b = rng.choice(ed.ifds[: ed.ifds.index(a) + 1])
    ed.set_next(a, b.offset)
    return f"ifd-loop {a.offset}->{b.offset}", None


def m_ifd_past_eof(data, ed, rng):
    ed.set_next(rng.choice(ed.ifds), rng.choice([len(data) + 16, len(data) - 3, 1, (1 << 32) - 2]))
    return "ifd-next-bad", None


def m_subifd_loop(data, ed, rng):
    with_sub = [i for i in ed.ifds if 330 in i.entries]
    if not with_sub:
        return None
    ifd = with_sub[0]
    ed.set_value(ifd, 330, ifd.offset, rng.randrange(ifd.entries[330].count))
    return "subifd-loop", None


def m_jpegtables(data, ed, rng):
    ifds = [i for i in ed.ifds if 347 in i.entries]
    if not ifds:
        return None
    ifd = rng.choice(ifds)
    e = ifd.entries[347]
    how = rng.choice(["flip", "count", "zero"])
    if how == "flip":
        for _ in range(rng.randint(1, 6)):
            data[e.value_pos + rng.randrange(e.count)] ^= rng.randint(1, 255)
    elif how == "count":
        ed.set_count(ifd, 347, rng.choice([3, e.count // 2, 1 << 30]))
    else:
        data[e.value_pos : e.value_pos + e.count] = bytes(e.count)
    return f"jpegtables-{how}", None


def _sof(h: int | None, w: int | None):
    def m(data, ed, rng):
        ifd = _level0(ed)
        if ed.values(ifd, 259)[:1] != [7] or 322 not in ifd.entries:
            return None
        tw, th = ed.values(ifd, 322)[0], ed.values(ifd, 323)[0]
        tiles = [(k, t) for k, t in enumerate(ed.tiles(ifd)) if t[1] > 16]
        k, (off, n) = rng.choice(tiles)
        p = _sof_pos(data, off, off + n)
        if p is None:
            return None
        hh, ww = h if h is not None else th, w if w is not None else tw
        struct.pack_into(">HH", data, p + 5, hh, ww)
        nx = -(-ed.values(ifd, 256)[0] // tw)
        tx, ty = k % nx, k // nx
        return f"sof {ww}x{hh} tile {k}", [0, tx * tw, ty * th, tw, th]

    m.__name__ = f"m_sof_{h}x{w}"
    return m


def m_swap_compression(data, ed, rng):
    ifd = rng.choice(ed.ifds)
    v = rng.choice([1, 5, 7, 8, 32773, 33003, 34712, 50000, 50001, 6, 2, 52479])
    return (f"compression={v}", None) if ed.set_value(ifd, 259, v) else None


def m_swap_photometric(data, ed, rng):
    ifd = rng.choice(ed.ifds)
    v = rng.choice([0, 1, 2, 3, 4, 5, 6, 8, 32844])
    return (f"photometric={v}", None) if ed.set_value(ifd, 262, v) else None


def m_swap_bits(data, ed, rng):
    ifd = rng.choice(ed.ifds)
    v = rng.choice([0, 1, 4, 12, 16, 32, 64, 255])
    ok = False
    for k in range(ifd.entries[258].count if 258 in ifd.entries else 0):
        ok = ed.set_value(ifd, 258, v, k) or ok
    return (f"bits={v}", None) if ok else None


def m_swap_spp(data, ed, rng):
    ifd = rng.choice(ed.ifds)
    v = rng.choice([0, 1, 2, 4, 5, 255, 65535])
    return (f"spp={v}", None) if ed.set_value(ifd, 277, v) else None


def m_planar(data, ed, rng):
    ifd = rng.choice(ed.ifds)
    v = rng.choice([2, 0, 3])
    if 284 in ifd.entries:
        return (f"planar={v}", None) if ed.set_value(ifd, 284, v) else None
    return None


def m_wrong_type(data, ed, rng):
    ifd = rng.choice(ed.ifds)
    tag = rng.choice(
        [t for t in (256, 257, 258, 259, 262, 277, 322, 323, 324, 325, 273, 279, 278) if t in ifd.entries]
    )
    typ = rng.choice([2, 5, 7, 11, 12, 0, 99])
    return (f"tag{tag}-type={typ}", None) if ed.set_type(ifd, tag, typ) else None


def m_mpp(data, ed, rng):
    bad = rng.choice(["nan", "-0.5", "inf", "-inf", "1e308", "0", "x"])
    i = data.find(b"MPP = ")
    if i >= 0:
        j = data.find(b"|", i)
        j = j if j > 0 else i + 12
        old = bytes(data[i + 6 : j])
        new = bad.encode()[: len(old)].ljust(len(old))
        data[i + 6 : j] = new
        return f"aperio-mpp={bad}", None
    ifd = _level0(ed)
    if 282 in ifd.entries:  # XResolution rational: numerator / denominator
        e = ifd.entries[282]
        struct.pack_into(ed.bo + "II", data, e.value_pos, rng.choice([0, 1]), 0)
        return "resolution=x/0", None
    return None


TIFF_MUTATIONS: list[tuple[Callable, int]] = [  # (mutation, weight in the corpus)
    (m_flip_ifd, 10),
    (m_flip_tile, 8),
    (m_truncate, 6),
    (_sizes(256, [0, 1, 65535, (1 << 31) - 1, (1 << 32) - 1]), 3),
    (_sizes(257, [0, 1, 65535, (1 << 31) - 1, (1 << 32) - 1]), 3),
    (_sizes(322, [0, 1, 16, 65520, 1 << 31]), 3),
    (_sizes(323, [0, 1, 16, 65520, 1 << 31]), 3),
    (_sizes(278, [0, 1, 65535, (1 << 32) - 1]), 2),
    (m_offset_past_eof, 3),
    (m_huge_bytecount, 3),
    (m_huge_tag_count, 3),
    (m_ifd_loop, 3),
    (m_ifd_past_eof, 2),
    (m_subifd_loop, 2),
    (m_jpegtables, 3),
    (_sof(60000, 60000), 2),
    (_sof(20000, 20000), 2),
    (_sof(16, 16), 1),
    (_sof(None, 4096), 1),
    (m_swap_compression, 4),
    (m_swap_photometric, 3),
    (m_swap_bits, 3),
    (m_swap_spp, 3),
    (m_planar, 1),
    (m_wrong_type, 4),
    (m_mpp, 2),
]


def tiff_variants(base: Path, out: Path, n: int, seed: int) -> list[Variant]:
    """``n`` mutated copies of the TIFF ``base`` written under ``out``."""
    src = base.read_bytes()
    rng = random.Random(f"{seed}:{base.name}")
    muts, weights = zip(*TIFF_MUTATIONS)
    variants: list[Variant] = []
    tries = 0
    while len(variants) < n and tries < 20 * n:
        tries += 1
        data = bytearray(src)
        ed = TiffEdit(data)
        m = rng.choices(muts, weights)[0]
        try:
            got = m(data, ed, rng)
        except (IndexError, KeyError, struct.error, ValueError):
            got = None
        if got is None:
            continue
        label, must_fail = got
        p = out / f"{base.stem}-{len(variants):03d}{''.join(base.suffixes)}"
        p.write_bytes(bytes(data))
        variants.append(Variant(f"{base.name}:{m.__name__}:{label}", str(p), must_fail))
    return variants


# ================================================================================================
# Zarr mutations
# ================================================================================================
def _json(p: Path) -> dict:
    return json.loads(p.read_text())


def _save(p: Path, doc) -> None:
    p.write_text(json.dumps(doc))


def _shard_files(store: Path, level: str = "0") -> list[Path]:
    return sorted(p for p in (store / level / "c").rglob("*") if p.is_file())


def zarr_variants(base: Path, out: Path, n: int, seed: int) -> list[Variant]:
    """``n`` damaged or hostile copies of the converted (sharded, v3, 128-px chunks) store ``base``."""
    rng = random.Random(f"{seed}:{base.name}")
    edits: list[tuple[str, Callable[[Path], list | None]]] = []

    def attrs(store):
        return store / "zarr.json"

    def e_dataset_path(store):
        doc = _json(attrs(store))
        ds = doc["attributes"]["ome"]["multiscales"][0]["datasets"]
        ds[rng.randrange(len(ds))]["path"] = rng.choice(
            ["../../x", "/etc", "0/../../..", "..", "", "a\\..\\b", 3.5, None]
        )
        _save(attrs(store), doc)

    def e_assoc_name(store):
        doc = _json(attrs(store))
        doc["attributes"]["slidestream"]["associated_images"] = [
            rng.choice(["../../../etc", "/tmp", "..", "a/../../b"])
        ]
        _save(attrs(store), doc)

    def e_array_meta(store):
        p = store / "0" / "zarr.json"
        doc = _json(p)
        what = rng.choice(["chunk", "shard", "shape", "dtype", "codecs", "fill", "grid", "json", "type"])
        conf = doc["codecs"][0]["configuration"]
        if what == "chunk":
            conf["chunk_shape"] = rng.choice([[3, 1 << 20, 1 << 20], [3, 0, 128], [3, -1, 128], [3, 128]])
        elif what == "shard":
            doc["chunk_grid"]["configuration"]["chunk_shape"] = rng.choice(
                [[3, 1 << 40, 1 << 40], [3, 100, 128], [3, 0, 0]]
            )
        elif what == "shape":
            doc["shape"] = rng.choice([[3, 0, 0], [3, -5, 10], [3, 1 << 62, 1 << 62], [3, 10], "big"])
        elif what == "dtype":
            doc["data_type"] = rng.choice(["float64", "uint16", "bogus", None])
        elif what == "codecs":
            conf["codecs"] = rng.choice(
                [[{"name": "bytes"}, {"name": "lz4hc"}], [], [{"name": "sharding_indexed"}], "x"]
            )
        elif what == "fill":
            doc["fill_value"] = rng.choice(["NaN", 1e300, [1, 2], None])
        elif what == "grid":
            doc["chunk_grid"] = {"name": "rectilinear", "configuration": {}}
        elif what == "type":
            doc["codecs"] = {"name": "sharding_indexed"}
        else:
            p.write_text("{not json" if rng.random() < 0.5 else "[1, 2, 3]")
            return
        _save(p, doc)

    def e_root_json(store):
        p = attrs(store)
        txt = p.read_text()
        how = rng.choice(["truncate", "garbage", "deep", "array"])
        if how == "truncate":
            p.write_text(txt[: rng.randrange(1, len(txt))])
        elif how == "garbage":
            p.write_bytes(bytes(rng.randrange(256) for _ in range(200)))
        elif how == "deep":
            p.write_text("[" * 100000 + "]" * 100000)
        else:
            p.write_text("[]")

    def e_index(store):
        f = rng.choice(_shard_files(store))
        data = bytearray(f.read_bytes())
        n_index = (len(data) - 4) // 16
        how = rng.choice(["huge-length", "huge-offset", "flip", "overlap"])
        # the index (chunks x 16 bytes) and its crc32c end the shard: rewrite one entry, fix the crc
        import google_crc32c

        idx_len = 16 * max(1, min(n_index, 64))
        for cand in (4, 16, 64, 256):  # index entries of the shards convert writes
            if len(data) >= cand * 16 + 4:
                ib = bytes(data[-(cand * 16 + 4) : -4])
                if google_crc32c.value(ib) == int.from_bytes(data[-4:], "little"):
                    idx_len = cand * 16
                    break
        start = len(data) - 4 - idx_len
        k = rng.randrange(idx_len // 16)
        if how == "huge-length":
            struct.pack_into("<QQ", data, start + 16 * k, 0, (1 << 62))
        elif how == "huge-offset":
            struct.pack_into("<QQ", data, start + 16 * k, (1 << 50), 100)
        elif how == "overlap":
            struct.pack_into("<QQ", data, start + 16 * k, 0, len(data))
        else:
            data[start + rng.randrange(idx_len)] ^= rng.randint(1, 255)
        if how != "flip":
            data[-4:] = google_crc32c.value(bytes(data[start:-4])).to_bytes(4, "little")
        f.write_bytes(bytes(data))

    def e_chunk_flip(store):
        f = rng.choice(_shard_files(store))
        data = bytearray(f.read_bytes())
        for _ in range(rng.randint(1, 10)):
            data[rng.randrange(max(1, len(data) - 1000))] ^= rng.randint(1, 255)
        f.write_bytes(bytes(data))

    def e_truncate_shard(store):
        f = rng.choice(_shard_files(store))
        data = f.read_bytes()
        f.write_bytes(data[: rng.randrange(0, len(data))])

    def e_jpeg_sof(store):
        f = _shard_files(store)[0]
        data = bytearray(f.read_bytes())
        p = _sof_pos(data, 0, len(data))
        if p is None:
            return None
        hh, ww = rng.choice([(60000, 60000), (20000, 20000), (16, 16), (128, 4096)])
        struct.pack_into(">HH", data, p + 5, hh, ww)  # chunk (0, 0) starts the shard
        f.write_bytes(bytes(data))
        return [0, 0, 0, 128, 128]

    edits = [
        ("dataset-path", e_dataset_path),
        ("assoc-name", e_assoc_name),
        ("array-meta", e_array_meta),
        ("root-json", e_root_json),
        ("shard-index", e_index),
        ("chunk-flip", e_chunk_flip),
        ("truncate-shard", e_truncate_shard),
        ("jpeg-sof", e_jpeg_sof),
    ]
    variants = []
    for k in range(n):
        name, fn = edits[k % len(edits)] if k < len(edits) else rng.choice(edits)
        store = out / f"{base.stem}-{k:03d}.zarr"
        shutil.copytree(base, store)
        try:
            must_fail = fn(store)
        except (IndexError, KeyError, ValueError, TypeError):
            shutil.rmtree(store)
            continue
        variants.append(Variant(f"{base.name}:{name}:{k}", str(store), must_fail))
    return variants


def byte_variants(base: Path, out: Path, n: int, seed: int) -> list[Variant]:
    """``n`` copies of any file with random byte flips or a truncation (formats we do not parse
    ourselves: DICOM, ...)."""
    src = base.read_bytes()
    rng = random.Random(f"{seed}:{base.name}")
    variants = []
    for k in range(n):
        data = bytearray(src)
        if k % 3 == 2:
            del data[int(len(data) * rng.uniform(0.05, 0.99)) :]
            label = "truncate"
        else:
            for _ in range(rng.randint(1, 12)):
                data[rng.randrange(len(data))] ^= rng.randint(1, 255)
            label = "flip"
        p = out / f"{base.stem}-{k:03d}{base.suffix}"
        p.write_bytes(bytes(data))
        variants.append(Variant(f"{base.name}:{label}:{k}", str(p)))
    return variants


def zarr_bomb_stores(out: Path) -> list[Variant]:
    """Unsharded stores written by zarr-python whose first chunk (128x128x3 = 48 KiB) is a codec
    bomb: a few KiB that inflate to 64 MiB (zstd, gzip, blosc; v3 and v2; fast path and, with
    chunks split along the channel axis, the zarr-python fallback)."""
    import numcodecs
    import numpy as np
    import zarr

    out.mkdir(parents=True, exist_ok=True)
    big = np.zeros(1 << 26, np.uint8).tobytes()
    bombs = {
        "zstd": numcodecs.Zstd(level=19),
        "gzip": numcodecs.GZip(level=9),
        "blosc": numcodecs.Blosc(cname="zstd", clevel=9),
    }
    variants = []
    for name, codec in bombs.items():
        payload = bytes(codec.encode(big))
        for fmt in (3, 2):
            for split in (False, True):  # split: chunks along the channel axis (zarr-python fallback)
                store = out / f"bomb-{name}-v{fmt}{'-split' if split else ''}.zarr"
                comp = {
                    "zstd": zarr.codecs.ZstdCodec(),
                    "gzip": zarr.codecs.GzipCodec(),
                    "blosc": zarr.codecs.BloscCodec(),
                }
                a = zarr.create_array(
                    str(store),
                    shape=(256, 256, 3),
                    chunks=(128, 128, 1 if split else 3),
                    dtype="uint8",
                    zarr_format=fmt,
                    compressors=comp[name] if fmt == 3 else codec,
                    **({"dimension_names": ("y", "x", "c")} if fmt == 3 else {}),
                )
                a[:] = 7
                chunk = next(
                    p for p in store.rglob("*") if p.is_file() and not p.name.startswith((".", "zarr"))
                )
                chunk.write_bytes(payload)
                variants.append(
                    Variant(
                        f"zarr-bomb:{name}:v{fmt}{':split' if split else ''}", str(store), [0, 0, 0, 256, 256]
                    )
                )
    return variants


# ================================================================================================
# running
# ================================================================================================
def _worker_cmd() -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker"]


def _env() -> dict[str, str]:
    repo = Path(__file__).resolve().parents[1]
    path = os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH")) if p)
    # fewer malloc arenas: each thread's arena reserves 64 MiB of address space
    return {**os.environ, "PYTHONPATH": path, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"}


def _run_batch(variants: list[Variant], memory: int, time_limit: float) -> tuple[list[Result], str | None]:
    """Run ``variants`` in one worker. Returns the results it reported and, when it died or stalled
    before finishing, what happened ("crash: ...", "hang", "memory") — the next unreported variant
    is the culprit."""
    proc = subprocess.Popen(
        [*_worker_cmd(), str(memory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
        text=True,
    )
    lines: queue.Queue = queue.Queue()

    def reader():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    err_lines: list[str] = []
    et = threading.Thread(target=lambda: err_lines.extend(proc.stderr), daemon=True)
    et.start()
    proc.stdin.write("".join(json.dumps(asdict(v)) + "\n" for v in variants))
    proc.stdin.close()
    results: list[Result] = []
    failure = None
    ready = False  # the worker says so once its imports are done (slow on a loaded machine)
    while len(results) < len(variants):
        try:
            line = lines.get(timeout=time_limit if ready else 60.0)
        except queue.Empty:
            failure = "hang"
            proc.kill()
            break
        if line is None:
            break
        if line.startswith('{"ready"'):
            ready = True
        elif line.startswith("{"):
            results.append(Result(**json.loads(line)))
    rc = proc.wait()
    t.join(5)
    et.join(5)
    proc.stdout.close()
    proc.stderr.close()
    if failure is None and len(results) < len(variants):
        tail = "".join(err_lines[-5:]).strip().replace("\n", " | ")[-300:]
        if rc < 0:
            failure = f"crash: {signal.Signals(-rc).name} {tail}"
        elif "MemoryError" in tail:
            failure = f"memory: {tail}"
        else:
            failure = f"crash: exit {rc} {tail}"
    return results, failure


def run_corpus(
    variants: list[Variant],
    *,
    workers: int = 2,
    batch: int = 40,
    memory: int = MEMORY_LIMIT,
    time_limit: float = TIME_LIMIT,
) -> list[Result]:
    """Run every variant (see the module docstring); returns one Result per variant, in order."""
    done: dict[str, Result] = {}

    def run(chunk: list[Variant]) -> None:
        todo = list(chunk)
        while todo:
            got, failure = _run_batch(todo, memory, time_limit)
            for r in got:
                done[r.id] = r
            todo = todo[len(got) :]
            if failure is None or not todo:
                continue
            culprit, todo = todo[0], todo[1:]
            if len(chunk) > 1:  # confirm alone: the batch may have died of something else
                alone, failure2 = _run_batch([culprit], memory, time_limit)
                if alone:
                    done[culprit.id] = alone[0]
                    continue
                failure = failure2 or failure
            kind = failure.split(":")[0]
            done[culprit.id] = Result(culprit.id, kind if kind in OUTCOMES else "crash", failure)

    chunks = [variants[i : i + batch] for i in range(0, len(variants), batch)]
    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(run, chunks))
    return [done.get(v.id, Result(v.id, "crash", "no result")) for v in variants]


def table(results: list[Result]) -> str:
    c = Counter(r.outcome for r in results)
    head = ["tried", "ok", "clean error", "other", "memory", "hang", "crash", "wrong pixels"]
    row = [len(results), c["ok"], c["clean"], c["other"], c["memory"], c["hang"], c["crash"], c["wrong"]]
    return " | ".join(head) + "\n" + " | ".join(str(v) for v in row)


# ================================================================================================
# worker
# ================================================================================================
def exercise(path: str, must_fail: list | None) -> str:
    """Open ``path`` and read it every way a job does; returns "ok" or "wrong" (raises on error)."""
    import numpy as np

    import wsi

    with wsi.open_slide(path) as s:
        if must_fail is not None:
            level, x, y, w, h = must_fail
            if level < s.level_count:
                try:
                    s.read_region((x, y), level, (w, h))
                except wsi.SlideError:
                    pass
                else:
                    return "wrong"
        for level in range(min(s.level_count, 4)):
            lw, lh = s.level_dimensions[level]
            ds = s.level_downsamples[level]
            s.read_region((0, 0), level, (min(lw, 300), min(lh, 300)))
            s.read_region((int(lw // 2 * ds), int(lh // 2 * ds)), level, (min(lw, 200), min(lh, 150)))
            tw, th = (s.level_tile_sizes or [(128, 128)] * s.level_count)[level]
            tw, th = max(1, min(tw, lw, 512)), max(1, min(th, lh, 512))
            locs = [(int(x * ds), int(y * ds)) for x, y in ((0, 0), (tw, 0), (0, th), (tw, th))]
            s.read_regions(locs, level, (tw, th), threads=2)
        if s.mpp is not None:
            s.read_region_mpp((0, 0), (64, 64), s.mpp * 2)
        s.get_thumbnail((128, 128))
        sizes = s.associated_image_sizes
        for name in s.associated_images:
            img = s.associated_images[name]
            assert isinstance(img, np.ndarray)
            if name in sizes and sizes[name] != (img.shape[1], img.shape[0]):
                raise AssertionError(f"associated image {name}: metadata {sizes[name]} != {img.shape}")
    return "ok"


def _probe(kind: str | None) -> None:
    """What the harness must contain, done on purpose (tests of the harness itself)."""
    if kind == "abort":
        os.abort()
    elif kind == "hang":
        time.sleep(3600)
    elif kind == "alloc":
        bytearray(1 << 40)  # far beyond RLIMIT_AS: MemoryError
    elif kind == "exit":
        os._exit(3)


def _worker(memory: int) -> None:
    import logging
    import warnings

    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    warnings.simplefilter("ignore")  # tifffile and zarr warn about the damage we made on purpose
    logging.disable(logging.CRITICAL)
    import wsi  # noqa: F401 - imported before the first variant is timed

    print(json.dumps({"ready": True}), flush=True)

    for line in sys.stdin:
        v = Variant(**json.loads(line))
        _probe(v.probe)
        try:
            outcome, detail = exercise(v.path, v.must_fail), ""
        except MemoryError as e:  # caught here, a MemoryError is still a failure of the variant
            outcome, detail = "memory", repr(e)[:300]
        except Exception as e:  # noqa: BLE001 - classified: a SlideError naming the file is the contract
            from wsi.errors import SlideError

            named = v.path in str(e) or Path(v.path).name in str(e)
            outcome = "clean" if isinstance(e, SlideError) and named else "other"
            detail = f"{type(e).__name__}: {e}"[:300]
        print(json.dumps(asdict(Result(v.id, outcome, detail))), flush=True)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--worker":
        _worker(int(sys.argv[2]))
