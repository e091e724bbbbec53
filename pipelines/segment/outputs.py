"""The outputs of ``slidestream segment predict``: a multiscale OME-NGFF label image written band
by band (:class:`LabelZarrWriter`), QuPath-importable polygons of a label map
(:func:`label_polygons`) and the class colours (:func:`class_color`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

COLORS = [
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
]


def class_color(c: int) -> tuple[int, int, int]:
    return (
        COLORS[c % len(COLORS)]
        if c < len(COLORS)
        else tuple(int(v) for v in np.random.default_rng(c).integers(0, 256, 3))
    )


def _mode2x(a: np.ndarray, n_classes: int) -> np.ndarray:
    """2× down-sampling by the most frequent label of each 2×2 block (ties: lowest label)."""
    h, w = a.shape
    a = np.pad(a, ((0, h % 2), (0, w % 2)), mode="edge")
    blocks = (
        a.reshape(a.shape[0] // 2, 2, a.shape[1] // 2, 2)
        .transpose(0, 2, 1, 3)
        .reshape(a.shape[0] // 2, a.shape[1] // 2, 4)
    )
    counts = np.stack([(blocks == c).sum(-1) for c in range(n_classes)], axis=-1)
    return counts.argmax(-1).astype(np.uint8)


class LabelZarrWriter:
    """Writes a uint8 label image row band by row band into ``root/0`` and builds the pyramid."""

    def __init__(self, path: Path, shape: tuple[int, int], mpp: float, classes: list[str], chunk: int = 512):
        import zarr
        from zarr.codecs import ZstdCodec

        self.zarr, self.codec = zarr, ZstdCodec(level=3)
        self.root = zarr.open_group(store=str(path), mode="w", zarr_format=3)
        self.shape, self.mpp, self.classes, self.chunk = shape, mpp, classes, chunk
        self.arr = self._create("0", shape)
        self.pending: list[np.ndarray] = []
        self.y = 0  # next row of level 0 to write

    def _create(self, name: str, shape: tuple[int, int]):
        c = min(self.chunk, max(shape))
        return self.root.create_array(
            name,
            shape=shape,
            chunks=(c, c),
            dtype="uint8",
            compressors=self.codec,
            fill_value=0,
            dimension_names=["y", "x"],
        )

    def write_rows(self, rows: np.ndarray) -> None:
        self.pending.append(rows)
        n = sum(len(p) for p in self.pending)
        if n >= self.chunk:
            self._flush(whole_chunks=True)

    def _flush(self, whole_chunks: bool) -> None:
        if not self.pending:
            return
        block = np.concatenate(self.pending, axis=0)
        n = (len(block) // self.chunk) * self.chunk if whole_chunks else len(block)
        if n:
            self.arr[self.y : self.y + n] = block[:n]
            self.y += n
        self.pending = [block[n:]] if n < len(block) else []

    def close(self, name: str, extra: dict[str, Any] | None = None) -> int:
        """Finish level 0, build the 2× pyramid (row bands, bounded memory), write NGFF metadata."""
        self._flush(whole_chunks=False)
        levels = [self.arr]
        n = len(self.classes)
        while max(levels[-1].shape) > 256 and min(levels[-1].shape) > 1:
            src = levels[-1]
            h, w = src.shape
            dst = self._create(str(len(levels)), ((h + 1) // 2, (w + 1) // 2))
            band = 2 * self.chunk
            for y in range(0, h, band):
                dst[y // 2 : (min(h, y + band) + 1) // 2] = _mode2x(np.asarray(src[y : y + band]), n)
            levels.append(dst)
        datasets = [
            {
                "path": str(i),
                "coordinateTransformations": [{"type": "scale", "scale": [self.mpp * 2**i, self.mpp * 2**i]}],
            }
            for i in range(len(levels))
        ]
        axes = [{"name": a, "type": "space", "unit": "micrometer"} for a in ("y", "x")]
        self.root.attrs["ome"] = {
            "version": "0.5",
            "multiscales": [{"name": name, "axes": axes, "datasets": datasets}],
            "image-label": {
                "version": "0.5",
                "colors": [
                    {"label-value": i, "rgba": [*class_color(i), 0 if i == 0 else 255]} for i in range(n)
                ],
                "properties": [{"label-value": i, "class": c} for i, c in enumerate(self.classes)],
            },
        }
        self.root.attrs["slidestream"] = {"classes": self.classes, "mpp": self.mpp, **(extra or {})}
        return len(levels)


def label_polygons(labels: np.ndarray, downsample: float, n_classes: int | None = None):
    """Yield ``(class, [exterior, *holes])`` polygons in level-0 (x, y) for each class > 0 of a
    label map whose pixels are ``downsample`` level-0 px (contours at pixel-centre resolution)."""
    from skimage.measure import approximate_polygon, find_contours, points_in_poly

    from wsi.annotations import polygon_area

    n = int(labels.max()) + 1 if n_classes is None else n_classes
    for c in range(1, n):
        m = np.pad(labels == c, 1).astype(np.float32)
        if not m.any():
            continue
        outers, holes = [], []
        for contour in find_contours(m, 0.5):
            ring = approximate_polygon(contour, tolerance=0.4)[:, ::-1] - 1.0  # (x, y) in label px
            if len(ring) < 4:
                continue
            xy = (ring + 0.5) * downsample
            # the mask is padded, so every contour is closed; outer rings have positive shoelace
            # area in (x, y), holes negative
            (outers if polygon_area(ring) > 0 else holes).append(xy)
        areas = [polygon_area(o) for o in outers]
        owned: list[list[np.ndarray]] = [[] for _ in outers]
        for h in holes:
            inside = [i for i, o in enumerate(outers) if points_in_poly(h[:1], o)[0]]
            if inside:  # the innermost outer ring that contains the hole
                owned[min(inside, key=lambda i: areas[i])].append(h)
        for outer, mine in zip(outers, owned):
            yield c, [outer, *mine]
