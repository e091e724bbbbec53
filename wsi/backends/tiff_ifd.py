"""A bounded walk of a TIFF file's directory chain, done before tifffile parses it.

tifffile follows IFD offsets wherever they point; a chain that loops back (IFD 2 → IFD 0) makes it
iterate forever, and a tag that declares billions of values makes it allocate them. This walk reads
only the IFD headers and entry tables (a few hundred bytes each, through the same file object the
parser then uses, so a remote file costs no extra requests) and refuses, with a
:class:`~wsi.errors.CorruptSlideError` naming the file:

- an IFD offset outside the file, or an IFD whose entry table runs past the end;
- a chain that revisits one of its own IFDs (a cycle), or a SubIFD that points back into the main
  chain (SubIFD chains may share directories: tifffile lists each SubIFD and also chains them);
- more than :data:`MAX_IFDS` directories or :data:`MAX_TAGS` entries in one;
- a tag whose values would take more than :data:`~wsi.limits.MAX_TAG_BYTES`, or a tag the reader
  needs (sizes, tile/strip offsets and byte counts, JPEG tables, SubIFDs) whose values lie past the
  end of the file.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

from ..errors import CorruptSlideError, UnsupportedSlideError
from ..limits import MAX_TAG_BYTES

MAX_IFDS = 16384  # directories in one file (a 40-level pyramid with labels has ~50)
MAX_TAGS = 4096  # entries in one directory (real files have 15-40)
#: bytes per value of each TIFF field type (BYTE, ASCII, SHORT, LONG, RATIONAL, ..., LONG8, IFD8)
TYPE_SIZES = {
    1: 1,
    2: 1,
    3: 2,
    4: 4,
    5: 8,
    6: 1,
    7: 1,
    8: 2,
    9: 4,
    10: 8,
    11: 4,
    12: 8,
    13: 4,
    16: 8,
    17: 8,
    18: 8,
}
# tags the byte-range reader depends on: their values must lie inside the file
_NEEDED = {256, 257, 258, 259, 262, 273, 277, 278, 279, 284, 317, 320, 322, 323, 324, 325, 330, 338, 339, 347}
_SUBIFDS = 330


def check_ifd_chain(fh: BinaryIO, url: str, size: int | None) -> int:
    """Walk every directory of the TIFF in ``fh`` (see the module docstring); returns how many there
    are. ``size`` is the file size (None when a server does not say: offsets are then checked as far
    as reading them allows)."""
    fh.seek(0)
    head = fh.read(16)
    if head[:2] not in (b"II", b"MM") or len(head) < 8:
        raise UnsupportedSlideError(f"{url}: not a TIFF file", url)
    bo = "<" if head[:2] == b"II" else ">"
    version = struct.unpack(bo + "H", head[2:4])[0]
    if version == 42:
        big, first = False, struct.unpack(bo + "I", head[4:8])[0]
    elif version == 43 and len(head) >= 16:
        big, first = True, struct.unpack(bo + "Q", head[8:16])[0]
    else:
        raise UnsupportedSlideError(f"{url}: not a TIFF file (version {version})", url)
    n_fmt, n_size = (bo + "Q", 8) if big else (bo + "H", 2)
    entry = 20 if big else 12
    off_fmt, off_size = (bo + "Q", 8) if big else (bo + "I", 4)
    main: set[int] = set()  # directories of the main chain
    seen: set[int] = set()  # every directory walked
    chains = [(first, "IFD chain")]

    def corrupt(msg: str) -> CorruptSlideError:
        return CorruptSlideError(f"{url}: {msg}; the TIFF directory is damaged", url)

    while chains:
        offset, where = chains.pop()
        mine: set[int] = set()
        while offset:
            if offset in mine or (where != "IFD chain" and offset in main):
                raise corrupt(f"the {where} loops back to the directory at byte {offset}")
            if offset in seen:  # a SubIFD chain joining one walked before
                break
            if len(seen) >= MAX_IFDS:
                raise corrupt(f"more than {MAX_IFDS} image directories")
            seen.add(offset)
            mine.add(offset)
            if where == "IFD chain":
                main.add(offset)
            if offset < 8 or (size is not None and offset + n_size > size):
                raise corrupt(f"the {where} points at byte {offset}, outside the file of {size} bytes")
            fh.seek(offset)
            raw = fh.read(n_size)
            if len(raw) < n_size:
                raise corrupt(f"the directory at byte {offset} is cut off by the end of the file")
            n = struct.unpack(n_fmt, raw)[0]
            if n == 0 or n > MAX_TAGS:
                raise corrupt(f"the directory at byte {offset} declares {n} entries")
            table = fh.read(n * entry + off_size)
            if len(table) < n * entry + off_size:
                raise corrupt(f"the directory at byte {offset} is cut off by the end of the file")
            for k in range(n):
                e = table[k * entry : (k + 1) * entry]
                if big:
                    tag, typ, count = struct.unpack(bo + "HHQ", e[:12])
                    value = e[12:20]
                else:
                    tag, typ, count = struct.unpack(bo + "HHI", e[:8])
                    value = e[8:12]
                nbytes = count * TYPE_SIZES.get(typ, 1)
                if nbytes > MAX_TAG_BYTES:
                    raise corrupt(
                        f"tag {tag} of the directory at byte {offset} declares {nbytes} bytes of values"
                    )
                if nbytes > off_size:
                    at = struct.unpack(off_fmt, value)[0]
                    if tag in _NEEDED and size is not None and at + nbytes > size:
                        raise corrupt(
                            f"tag {tag} of the directory at byte {offset} points at bytes {at}-{at + nbytes}, "
                            f"past the end of the file ({size} bytes)"
                        )
                if tag == _SUBIFDS and typ in (4, 13, 16, 18) and 0 < count <= MAX_TAGS:
                    width = 8 if typ in (16, 18) else 4
                    fmt = bo + ("Q" if width == 8 else "I") * count
                    if count * width <= off_size:
                        subs = struct.unpack(fmt, value[: count * width])
                    else:
                        here = fh.tell()
                        fh.seek(struct.unpack(off_fmt, value)[0])
                        buf = fh.read(count * width)
                        fh.seek(here)
                        if len(buf) < count * width:
                            raise corrupt(f"the SubIFD offsets of the directory at byte {offset} are cut off")
                        subs = struct.unpack(fmt, buf)
                    chains.extend((s, "SubIFD chain") for s in subs if s)
            offset = struct.unpack(off_fmt, table[n * entry :])[0]
    return len(seen)
