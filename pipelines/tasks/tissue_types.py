"""Tissue types of a real H&E slide, and colour matching that leaves only morphology.

:func:`tissue_type_map` labels the dense tissue of a slide with three morphologies by its local
haematoxylin density: the slide is colour-deconvolved (Ruifrok-Johnston HED), the haematoxylin
density of tissue pixels is smoothed over ~25 µm, and where the smoothed tissue fraction exceeds
0.8 a one-dimensional k-means (k = 3; the thresholds are the midpoints of its sorted centres) splits
it into low, middle and high density. On the demo slide (CMU-1-Small-Region, H&E
skin) the clusters are, checked by eye on the overlay (:func:`overlay_tissue_types`): dermal
**stroma** (collagen, sparse nuclei), squamous **epithelium** (spinous layer) and **dense-nuclear**
epithelium (the basaloid / keratinising hair-follicle wall). Loose tissue, edges and holes are left
unlabelled.

Those morphologies also differ in colour (stroma is pink, the follicle wall deep purple), so a
colour statistic alone would tell them apart. :func:`match_colours` removes that cue exactly: each
image's pixels are ranked by luminance and given the colours of a shared reference at the same
ranks (histogram matching of the joint RGB distribution), so every matched image has *the same
multiset of colours* — identical colour histogram, mean and spread — and differs from another only
in where its dark and light pixels lie: morphology. The known-answer tasks built on it
(:func:`build_tissue_type_task` here, the segmentation composites and the MIL slides) cannot be
solved by colour or mean statistics.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import DEMO_SLIDE

#: the three morphologies of :func:`tissue_type_map`, by increasing haematoxylin density
TISSUE_TYPES = ["stroma", "epithelium", "dense-nuclear"]

_LUMA = np.array([0.299, 0.587, 0.114])


def _is_tissue(rgb: np.ndarray) -> np.ndarray:
    f = rgb.astype(np.float32)
    return ((f.max(axis=2) - f.min(axis=2)) > 25) & (f.mean(axis=2) < 225)


@dataclass
class TissueTypeMap:
    """Per-pixel tissue types of a slide at ``mpp`` µm/px: ``labels (h, w)`` int8, ``-1`` where
    unlabelled, else an index into ``classes``; ``downsample`` = level-0 pixels per map pixel."""

    labels: np.ndarray
    mpp: float
    downsample: float
    classes: list[str]
    slide: str

    def __post_init__(self) -> None:
        one_hot = np.stack([self.labels == c for c in range(len(self.classes))]).astype(np.float64)
        self._sat = np.pad(one_hot.cumsum(1).cumsum(2), ((0, 0), (1, 0), (1, 0)))

    def fractions(self, x: float, y: float, size0: float) -> np.ndarray:
        """Fraction of each class ``(C,)`` in the level-0 square ``(x, y, size0)``."""
        d = self.downsample
        h, w = self.labels.shape
        x0, y0 = int(np.clip(round(x / d), 0, w)), int(np.clip(round(y / d), 0, h))
        x1, y1 = int(np.clip(round((x + size0) / d), 0, w)), int(np.clip(round((y + size0) / d), 0, h))
        area = max((x1 - x0) * (y1 - y0), 1)
        s = self._sat
        return (s[:, y1, x1] - s[:, y0, x1] - s[:, y1, x0] + s[:, y0, x0]) / area


def tissue_type_map(
    slide: str | Path = DEMO_SLIDE, *, mpp: float = 1.0, sigma_um: float = 12.5
) -> TissueTypeMap:
    """Label the tissue of ``slide`` with :data:`TISSUE_TYPES` (see the module docstring).

    The slide is read whole at ``mpp`` µm/px (the demo slide: 1110 × 1483 px at 1 µm/px); the
    haematoxylin density is smoothed with a Gaussian of ``sigma_um`` µm. The result of a local file
    is kept for the process (keyed by path, size and modification time): the task builders call
    this several times."""
    p = Path(slide)
    stamp = (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
    return _tissue_type_map(str(slide), stamp, float(mpp), float(sigma_um))


@functools.lru_cache(maxsize=4)
def _tissue_type_map(slide: str, _stamp: tuple | None, mpp: float, sigma_um: float) -> TissueTypeMap:
    from scipy import ndimage as ndi
    from skimage.color import rgb2hed
    from sklearn.cluster import KMeans

    from wsi import open_slide

    with open_slide(slide) as s:
        base = s.require_mpp()
        W, H = s.dimensions
        size = (max(1, round(W * base / mpp)), max(1, round(H * base / mpp)))
        rgb = s.read_region_mpp((0, 0), size, mpp)
    tissue = _is_tissue(rgb)
    sigma = sigma_um / mpp
    t = ndi.gaussian_filter(tissue.astype(np.float64), sigma)
    h_density = ndi.gaussian_filter(rgb2hed(rgb)[..., 0] * tissue, sigma) / np.maximum(t, 1e-6)
    sel = t > 0.8  # dense tissue only: loose stroma, edges and holes stay unlabelled
    if sel.sum() < 100:
        raise ValueError(f"{slide}: too little tissue for a tissue-type map")
    x = h_density[sel]
    km = KMeans(3, n_init=10, random_state=0).fit(x[:: max(1, len(x) // 20000), None])
    centres = np.sort(km.cluster_centers_[:, 0])
    labels = np.full(tissue.shape, -1, np.int8)
    labels[sel] = np.digitize(x, (centres[:-1] + centres[1:]) / 2)
    return TissueTypeMap(labels, mpp, mpp / base, list(TISSUE_TYPES), str(slide))


def overlay_tissue_types(rgb: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The map drawn over the slide (green stroma, orange epithelium, blue dense-nuclear), for a
    visual check of :func:`tissue_type_map`."""
    colours = np.array([[0, 200, 0], [255, 170, 0], [40, 40, 255]], np.float64)
    out = rgb.astype(np.float64).copy()
    for c in range(len(colours)):
        m = labels == c
        out[m] = (1 - alpha) * out[m] + alpha * colours[c]
    return out.round().astype(np.uint8)


def colour_reference(images: list[np.ndarray] | np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` colours drawn from the pixels of ``images`` (each image contributing equally), sorted
    by luminance: the shared reference of :func:`match_colours`."""
    rng = np.random.default_rng(seed)
    per = int(np.ceil(n / len(images)))
    px = np.concatenate(
        [im.reshape(-1, 3)[rng.choice(im.shape[0] * im.shape[1], per, replace=True)] for im in images]
    )
    px = px[rng.choice(len(px), n, replace=False)]
    return px[np.argsort(px @ _LUMA, kind="stable")]


def match_colours(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``image`` (H, W, 3) uint8 with its colours replaced by ``reference`` (from
    :func:`colour_reference`) rank for rank in luminance: the result's colour histogram is the
    reference's (resampled to H·W pixels), its luminance order — its morphology — the image's."""
    flat = image.reshape(-1, 3)
    n = len(flat)
    ref = (
        reference
        if len(reference) == n
        else reference[np.linspace(0, len(reference) - 1, n).round().astype(int)]
    )
    order = np.argsort(flat @ _LUMA, kind="stable")
    out = np.empty_like(flat)
    out[order] = ref
    return out.reshape(image.shape)


def colour_statistics(images: np.ndarray, bins: int = 16) -> np.ndarray:
    """The colour shortcut's features of tiles ``(N, H, W, 3)``: per-channel mean, standard
    deviation and ``bins``-bin histogram — everything about a tile's colours, nothing about where
    they are."""
    f = images.reshape(len(images), -1, 3).astype(np.float32)
    hist = [np.concatenate([np.histogram(x[:, c], bins, (0, 256))[0] for c in range(3)]) for x in f]
    return np.concatenate([f.mean(1), f.std(1), np.array(hist, np.float32) / f.shape[1]], 1)


def sample_tissue_tiles(
    tmap: TissueTypeMap,
    *,
    per_class: int,
    size0: float,
    test: bool | None,
    block0: float,
    purity: float = 0.8,
    rng: np.random.Generator,
    margin0: float | None = None,
) -> list[tuple[int, int, int]]:
    """Level-0 tiles ``(x, y, class)`` of side ``size0`` that are at least ``purity`` one class,
    ``per_class`` of each class (fewer when the slide has too few places), inside the test or the
    training blocks of a checkerboard of ``block0``-sided blocks (``test=None``: anywhere). A tile
    keeps ``margin0`` (default ``size0 / 4``) from its block's border, so test and training tiles
    never touch."""
    h, w = tmap.labels.shape
    W, H = w * tmap.downsample, h * tmap.downsample
    if test is None:
        origins, spans = [(0.0, 0.0)], (W - size0, H - size0)
    else:
        margin0 = size0 / 4 if margin0 is None else margin0
        span = block0 - 2 * margin0 - size0
        if span <= 0:
            raise ValueError(f"blocks of {block0:.0f} px cannot hold tiles of {size0:.0f} px with margins")
        nbx, nby = int(W // block0), int(H // block0)
        origins = [
            (bx * block0 + margin0, by * block0 + margin0)
            for by in range(nby)
            for bx in range(nbx)
            if ((bx + by) % 2 == 1) == test
        ]
        spans = (span, span)
    # candidate places on a fine grid, then a random subset per class
    step = max(size0 / 4, 1.0)
    cands: dict[int, list[tuple[int, int]]] = {c: [] for c in range(len(tmap.classes))}
    for bx0, by0 in origins:
        for oy in np.arange(0, spans[1] + 1e-9, step):
            for ox in np.arange(0, spans[0] + 1e-9, step):
                x, y = bx0 + ox, by0 + oy
                f = tmap.fractions(x, y, size0)
                c = int(f.argmax())
                if f[c] >= purity:
                    cands[c].append((int(x), int(y)))
    out = []
    for c, places in cands.items():
        if not places:
            continue
        pick = rng.choice(len(places), min(per_class, len(places)), replace=False)
        out.extend((*places[i], c) for i in sorted(pick))
    return out


def build_tissue_type_task(
    slides: list[str | Path] | None = None,
    *,
    mpp: float = 0.5,
    tile: int = 64,
    per_class: int = 120,
    test_fraction: float = 0.35,
    block_um: float = 160.0,
    colour: str = "matched",
    seed: int = 0,
):
    """A patch-classification task: tiles of the three tissue types of :func:`tissue_type_map`.

    Training tiles lie in the "white" blocks of a checkerboard of ``block_um``-µm blocks and test
    tiles in the "black" ones (with a margin: no test tile touches a training tile). With
    ``colour="matched"`` (default) every tile's colours are replaced rank for rank by one shared
    reference (:func:`match_colours`), so the classes differ only in morphology; ``"natural"``
    keeps the stain (then colour alone separates them well). Returns a
    :class:`pipelines.evaluate.patch_tasks.PatchTask` named ``tissue-types``."""
    from wsi import open_slide

    from ..evaluate.patch_tasks import PatchTask

    if colour not in ("matched", "natural"):
        raise ValueError(f"colour must be 'matched' or 'natural', got {colour!r}")
    rng = np.random.default_rng(seed)
    images: list[np.ndarray] = []
    labels: list[int] = []
    is_test: list[bool] = []
    for path in slides or [DEMO_SLIDE]:
        tmap = tissue_type_map(path)
        with open_slide(path) as s:
            base = s.require_mpp()
            size0, block0 = tile * mpp / base, block_um / base
            n_test = int(round(per_class * test_fraction))
            for test, n in ((False, per_class - n_test), (True, n_test)):
                tiles = sample_tissue_tiles(tmap, per_class=n, size0=size0, test=test, block0=block0, rng=rng)
                if tiles:
                    images.extend(s.read_regions_mpp([(x, y) for x, y, _ in tiles], (tile, tile), mpp))
                    labels.extend(c for _, _, c in tiles)
                    is_test.extend([test] * len(tiles))
    if not images:
        raise ValueError("no tissue-type tiles found in the given slides")
    im, lab, te = np.stack(images), np.array(labels), np.array(is_test)
    if te.all() or not te.any() or len(set(lab[te])) < len(TISSUE_TYPES):
        raise ValueError("the slides are too small to hold every tissue type in training and test blocks")
    if colour == "matched":
        ref = colour_reference(list(im[~te]), tile * tile, seed=seed)
        im = np.stack([match_colours(t, ref) for t in im])
    return PatchTask("tissue-types", list(TISSUE_TYPES), im[~te], lab[~te], im[te], lab[te])


def tissue_patches(
    slide: str | Path = DEMO_SLIDE,
    *,
    per_class: int,
    size: int,
    mpp: float,
    test: bool | None,
    seed: int = 0,
    block_um: float = 256.0,
    purity: float = 0.9,
) -> dict[int, np.ndarray]:
    """Patches ``{class: (n, size, size, 3)}`` of each tissue type read at ``mpp`` µm/px, at most
    ``per_class`` each, from the test (``test=True``) or the training blocks (``False``) of a
    ``block_um``-µm checkerboard — the source crops of a held-out composite never overlap a
    training one — or from anywhere (``None``). Colours are the slide's own (see
    :func:`match_colours`)."""
    from wsi import open_slide

    tmap = tissue_type_map(slide)
    rng = np.random.default_rng(seed)
    with open_slide(slide) as s:
        base = s.require_mpp()
        tiles = sample_tissue_tiles(
            tmap,
            per_class=per_class,
            size0=size * mpp / base,
            test=test,
            block0=block_um / base,
            purity=purity,
            rng=rng,
        )
        imgs = s.read_regions_mpp([(x, y) for x, y, _ in tiles], (size, size), mpp) if tiles else []
    out: dict[int, np.ndarray] = {}
    for c in range(len(tmap.classes)):
        mine = [im for im, (_, _, k) in zip(imgs, tiles) if k == c]
        if mine:
            out[c] = np.stack(mine)
    return out


def fill_mosaic(
    shape: tuple[int, int], patches: np.ndarray, rng: np.random.Generator, reference: np.ndarray | None = None
) -> np.ndarray:
    """An ``(h, w, 3)`` image tiled with randomly chosen ``patches`` (each randomly rotated by a
    multiple of 90° and mirrored), every cell colour-matched to ``reference`` when given."""
    h, w = shape
    p = patches.shape[1]
    out = np.empty((h + p, w + p, 3), np.uint8)
    for y in range(0, h, p):
        for x in range(0, w, p):
            cell = np.rot90(patches[int(rng.integers(len(patches)))], int(rng.integers(4)))
            if rng.integers(2):
                cell = cell[:, ::-1]
            out[y : y + p, x : x + p] = match_colours(cell, reference) if reference is not None else cell
    return out[:h, :w]
