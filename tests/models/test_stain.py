"""Stain normalisation: known stain matrices recovered, targets' stain statistics reproduced, an
identity fit leaves an image unchanged, and torchstain's results are matched on real tissue."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DEMO_SLIDE, demo_level0

from models.stain import Macenko, Reinhard, rgb_to_lab, stain_normalizer

IO = 240.0
# Haematoxylin and eosin OD vectors: the reference pair of Macenko's code (also torchstain's default
# target) and a bluer/pinker pair for a second "lab". Eosin's red OD must reach Macenko's background
# threshold (beta = 0.15 in every channel) for nearly pure eosin pixels to count at all, so
# Ruifrok's eosin (red OD 0.07) is not a recoverable answer at these concentrations.
H_E = np.array([[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]]).T
H_E_OTHER = np.array([[0.490, 0.769, 0.410], [0.250, 0.850, 0.460]]).T


def _unit(m: np.ndarray) -> np.ndarray:
    return m / np.linalg.norm(m, axis=0, keepdims=True)


def synthetic(stains: np.ndarray, *, scale: float = 1.0, side: int = 128, seed: int = 0) -> torch.Tensor:
    """(3, side, side) uint8 image mixed from two stain OD vectors: nearly pure H, nearly pure E and
    mixed pixels, rendered with the Macenko forward model I = Io * exp(-OD) - 1."""
    rng = np.random.default_rng(seed)
    n = side * side
    c = np.empty((2, n))
    third = n // 3
    c[0, :third], c[1, :third] = rng.uniform(0.3, 1.5, third), rng.uniform(0, 0.03, third)
    c[0, third : 2 * third], c[1, third : 2 * third] = (
        rng.uniform(0, 0.03, third),
        rng.uniform(0.3, 1.2, third),
    )
    c[:, 2 * third :] = rng.uniform(0.2, 1.0, (2, n - 2 * third))
    c *= scale
    od = _unit(stains) @ c
    img = np.clip(np.round(IO * np.exp(-od) - 1.0), 0, 255).astype(np.uint8)
    return torch.from_numpy(img.reshape(3, side, side))


def _cos(a: torch.Tensor, b: np.ndarray) -> np.ndarray:
    a = a.double().numpy()
    return (a * _unit(b)).sum(0) / np.linalg.norm(a, axis=0)


@pytest.fixture(scope="module")
def tissue() -> list[torch.Tensor]:
    import wsi

    with wsi.open_slide(DEMO_SLIDE) as s:
        locs = [(800, 1200), (1000, 1500), (1200, 2000), (1300, 1700), (900, 1900)]
        tiles = [s.read_region(loc, 0, (224, 224)) for loc in locs]
    return [torch.from_numpy(t).permute(2, 0, 1).contiguous() for t in tiles]


@pytest.mark.parametrize("stains", [H_E, H_E_OTHER], ids=["ruifrok", "other"])
def test_macenko_recovers_a_known_stain_matrix(stains):
    he, _ = Macenko().estimate(synthetic(stains))
    cos = _cos(he[0], stains)
    assert cos.min() > 0.995, cos  # both columns, haematoxylin first


def test_macenko_batch_gives_each_image_its_own_matrix():
    batch = torch.stack([synthetic(H_E), synthetic(H_E_OTHER, seed=1)])
    he, _ = Macenko().estimate(batch)
    assert _cos(he[0], H_E).min() > 0.995 and _cos(he[1], H_E_OTHER).min() > 0.995
    one, _ = Macenko().estimate(batch[1:])
    torch.testing.assert_close(he[1], one[0])


def test_macenko_output_has_the_targets_stain_statistics():
    target = synthetic(H_E, scale=1.3, seed=2)
    source = synthetic(H_E_OTHER, scale=0.7, seed=3)
    norm = Macenko().fit(target)
    out = norm(source.unsqueeze(0))
    he_out, c99_out = Macenko().estimate(out)
    he_t, c99_t = Macenko().estimate(target)
    assert _cos(he_out[0], he_t[0].numpy()).min() > 0.995
    torch.testing.assert_close(c99_out, c99_t, rtol=0.03, atol=0.0)
    he_src, c99_src = Macenko().estimate(source)
    assert (c99_src - c99_t).abs().max() > 0.3  # the statistics did change


def test_macenko_identity_fit_leaves_an_image_unchanged():
    img = synthetic(H_E, seed=4)
    out = Macenko().fit(img)(img.unsqueeze(0))[0]
    assert (out.int() - img.int()).abs().max() <= 1


def test_reinhard_output_has_the_targets_lab_statistics(tissue):
    """Two tissue-filled tiles: LAB means 9 apart before, within 1 after; standard deviations within
    5% (clipping to 0..255 and rounding keep it from being exact; a tile with much white background
    would clip more)."""
    target, source = tissue[3], tissue[4]
    out = Reinhard().fit(target)(source.unsqueeze(0))
    m_out, s_out = Reinhard.lab_stats(out)
    m_t, s_t = Reinhard.lab_stats(target.unsqueeze(0))
    m_s, _ = Reinhard.lab_stats(source.unsqueeze(0))
    assert (m_out - m_t).abs().max() < 1.0 < 5.0 < (m_s - m_t).abs().max()
    torch.testing.assert_close(s_out, s_t, rtol=0.05, atol=0.0)


def test_reinhard_identity_fit_leaves_an_image_unchanged(tissue):
    img = tissue[0]
    out = Reinhard().fit(img)(img.unsqueeze(0))[0]
    assert (out.int() - img.int()).abs().max() <= 1


def test_lab_round_trip():
    x = torch.randint(0, 256, (2, 3, 16, 16), generator=torch.Generator().manual_seed(0)).float()
    from models.stain import lab_to_rgb

    # float32 through gamma, a 3x3 mix and a cube root and back: round-off grows where the curves
    # are steep (dark values: 1.4e-3 measured at 9), so a relative bound plus a floor of 1/200 of a
    # grey level; a wrong constant or matrix is off by whole grey levels
    torch.testing.assert_close(lab_to_rgb(rgb_to_lab(x)), x, rtol=1e-4, atol=5e-3)


def test_matches_torchstain_on_real_tissue(tissue):
    """The library baseline: same fitted target, same images within one grey level (torchstain
    truncates and rebuilds Io*exp(-OD) without the -1 of the exact inverse; see models.stain)."""
    torchstain = pytest.importorskip("torchstain")
    target, source = tissue[0], tissue[1]
    ours = Macenko().fit(target)
    ref = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    ref.fit(target)
    torch.testing.assert_close(ours.stain_matrix, ref.HERef, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.max_conc, ref.maxCRef, rtol=1e-4, atol=1e-5)
    got = ours(source.unsqueeze(0))[0].int()
    want = ref.normalize(source, stains=False)[0].permute(2, 0, 1).int() - 1
    assert (got - want.clamp(0, 255)).abs().max() <= 1

    ours_r = Reinhard().fit(target)
    ref_r = torchstain.normalizers.ReinhardNormalizer(backend="torch")
    ref_r.fit(target)
    torch.testing.assert_close(ours_r.target_mean, ref_r.target_means, rtol=1e-4, atol=1e-4)
    got = ours_r(source.unsqueeze(0))[0].int()
    assert (got - ref_r.normalize(source).permute(2, 0, 1).int()).abs().max() <= 1


@pytest.mark.parametrize("cls", [Macenko, Reinhard])
def test_batched_equals_one_by_one_and_float_input(cls, tissue):
    norm = cls().fit(tissue[0])
    batch = torch.stack(tissue)
    out = norm(batch)
    assert out.dtype == torch.uint8 and out.shape == batch.shape
    for i, t in enumerate(tissue):
        assert torch.equal(out[i], norm(t.unsqueeze(0))[0])
    f = norm(batch.float() / 255)
    assert f.is_floating_point() and float(f.max()) <= 1.0
    assert (f * 255 - out.float()).abs().max() <= 0.5 + 1e-3


def test_from_numpy_region_and_state_dict(tissue):
    region = tissue[0].permute(1, 2, 0).numpy()  # (H, W, 3), as Slide.read_region returns
    norm = stain_normalizer("macenko", region)
    again = Macenko()
    again.load_state_dict(norm.state_dict())
    assert torch.equal(again(tissue[1].unsqueeze(0)), norm(tissue[1].unsqueeze(0)))
    d = norm.describe()
    assert d["method"] == "macenko" and len(d["stain_matrix"]) == 3
    with pytest.raises(ValueError, match="unknown stain normalisation"):
        stain_normalizer("vahadane", region)


def test_a_blank_tile_passes_through_and_leaves_the_others_alone():
    """In a loader one background tile must not fail its batch: it comes back unchanged, and the
    other images are normalised exactly as they are alone (each image has its own stain matrix)."""
    region = torch.as_tensor(np.array(demo_level0()[1400:1656, 1000:1256])).permute(2, 0, 1)
    norm = Macenko().fit(region)
    tissue = region.unsqueeze(0)
    white = torch.full((1, 3, 256, 256), 250, dtype=torch.uint8)
    out = norm(torch.cat([white, tissue, white]))
    assert torch.equal(out[0], white[0]) and torch.equal(out[2], white[0])
    # batched linear algebra may differ from a batch of one in the last bits: at most 1 after rounding
    assert (out[1:2].int() - norm(tissue).int()).abs().max() <= 1


def test_errors_are_clear():
    with pytest.raises(RuntimeError, match="not fitted"):
        Macenko()(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    white = torch.full((3, 32, 32), 250, dtype=torch.uint8)
    with pytest.raises(ValueError, match="fewer than 3 stained pixels"):
        Macenko().fit(white)
    with pytest.raises(ValueError, match="RGB batch"):
        Reinhard().fit(torch.zeros(4, 8, 8))
