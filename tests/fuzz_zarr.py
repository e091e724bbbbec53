"""Zarr part of the hostile-file corpus (tests/fuzz_corpus.py has the TIFF part): damaged or hostile
copies of converted stores — dataset and associated-image paths outside the store, gigantic or
zero chunks and shards, wrong types, malformed JSON, shard indexes that lie, flipped and truncated
shards, JPEG chunks whose SOF disagrees with the chunk — and codec bombs written by zarr-python.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

from fuzz_corpus import _sof_pos
from fuzzing import Variant


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
