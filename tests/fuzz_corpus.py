"""The hostile-file corpus of issue 12 (run by tests/fuzzing.py): deterministic, seeded variants of
real slides — synthetic pyramids from :mod:`wsi.synth`, the shipped demo slide, the real fixtures in
../shared/testdata when present, and Zarr stores converted from them — with byte flips in
directories and tile data, truncations and targeted edits (huge/zero sizes and tile sizes, offsets
past the end, huge byte counts, IFD and SubIFD loops, damaged JPEGTables, SOF larger or smaller
than the tile, swapped compression, photometric, bits and samples, wrong tag types,
NaN/negative/infinite mpp; Zarr: gigantic chunks, codec bombs, shard indexes that lie, paths
outside the store, malformed JSON). :class:`TiffEdit` patches a TIFF directory in place.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fuzzing import Variant

from wsi.backends.tiff_ifd import TYPE_SIZES

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
