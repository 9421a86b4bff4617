"""cascade.metrics: each metric against a direct numpy formula, skimage, and Flare7K's formula."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from cascade import config
from cascade.errors import UserError
from cascade.masks import paint_mask, region_weights
from cascade.metrics import (
    PSNR_CAP_DB,
    REGION_PROTOCOLS,
    SSIM_WINDOWS,
    _region_levels,
    evaluate_arrays,
    evaluate_pair,
    region_mean_ssim,
    ssim_map,
    ssim_pad,
    summarize,
)
from cascade.metrics_reference import SKIMAGE_WINDOW, skimage_reference


def make_triplet(size: int = 32, seed: int = 0, noise: int = 20) -> tuple[np.ndarray, ...]:
    """(pred, gt, mask) uint8: random gt, noisy pred, a glare disc, a streak band, a light dot."""
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    pred = np.clip(gt.astype(int) + rng.integers(-noise, noise + 1, gt.shape), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size]
    c = size / 2
    glare = (yy - c) ** 2 + (xx - c) ** 2 < (size / 4) ** 2
    streak = np.abs(yy - xx) < 2
    light = (yy - c) ** 2 + (xx - c) ** 2 < (size / 12) ** 2
    return pred, gt, paint_mask(streak, glare, light)


def as_dict(rows: list[dict]) -> dict[tuple[str, str], float]:
    return {(r["region"], r["metric"]): r["value"] for r in rows}


def test_protocol_names_match_config() -> None:
    assert set(REGION_PROTOCOLS) == set(config.PROTOCOLS)
    assert set(SSIM_WINDOWS) == set(config.SSIM_WINDOWS)


@pytest.mark.parametrize("protocol", list(REGION_PROTOCOLS))
@pytest.mark.parametrize("window", list(SSIM_WINDOWS))
def test_entire_image_equals_skimage(protocol: str, window: str) -> None:
    pred, gt, mask = make_triplet(seed=1)
    got = as_dict(evaluate_pair(pred, gt, mask, protocol=protocol, ssim_window=window))
    assert got["entire", "psnr"] == peak_signal_noise_ratio(gt, pred, data_range=255)
    ssim = structural_similarity(gt, pred, channel_axis=2, data_range=255, **SKIMAGE_WINDOW[window])
    assert got["entire", "ssim"] == ssim


def test_masked_protocol_equals_numpy_formula() -> None:
    pred, gt, mask = make_triplet(seed=2)
    got = as_dict(evaluate_pair(pred, gt, mask, protocol="masked"))
    r, g = mask[..., 0].astype(float), mask[..., 1].astype(float)
    for region, w in (("streak", (r - g) / 255), ("glare", g / 255)):
        diff = gt * w[..., None] - pred * w[..., None]
        assert got[region, "psnr"] == pytest.approx(10 * np.log10(255**2 / np.mean(diff**2)), abs=1e-10)
        masked_ssim = structural_similarity(
            gt * w[..., None], pred * w[..., None], channel_axis=2, data_range=255
        )
        assert got[region, "ssim"] == pytest.approx(masked_ssim, abs=1e-12)
    assert set(got) == {(r, m) for r in ("entire", "streak", "glare") for m in ("psnr", "ssim")}
    # The masked protocol's ordering comes from the masking: smaller region, higher numbers.
    assert got["streak", "psnr"] > got["glare", "psnr"] > got["entire", "psnr"]


def flare7k_published(img_gt: np.ndarray, img_input: np.ndarray, img_seg: np.ndarray) -> dict:
    """Flare7K evaluate.py's compare_score, transcribed: area over a hard-coded 512*512."""
    out = {}
    seg = img_seg.astype(np.float64)
    weights = {
        "glare": seg[:, :, 1] / 255,
        "streak": (seg[:, :, 0] - seg[:, :, 1]) / 255,
        "global": (255 - seg[:, :, 2]) / 255,
    }
    for name, m in weights.items():
        area = np.sum(m) / (512 * 512)
        if area > 0:
            m3 = np.repeat(m[..., None], 3, axis=2)
            mse = np.mean((img_gt * m3 - img_input * m3) ** 2) / (255 * 255 * area)
            out[name] = 10 * np.log10(1.0 / mse)
    return out


def test_flare7k_protocol_equals_published_formula_at_512() -> None:
    pred, gt, mask = make_triplet(size=512, seed=3)
    got = as_dict(evaluate_pair(pred, gt, mask, protocol="flare7k"))
    ref = flare7k_published(gt, pred, mask)
    for region in ("glare", "streak", "global"):
        assert got[region, "psnr"] == pytest.approx(ref[region], abs=1e-9)
    assert got["score", "psnr"] == pytest.approx(np.mean(list(ref.values())), abs=1e-9)


def test_flare7k_area_uses_actual_image_size() -> None:
    # At 40x40 the published formula (area over 512*512) is off by 10*log10(40*40 / 512**2) dB.
    pred, gt, mask = make_triplet(size=40, seed=4)
    got = as_dict(evaluate_pair(pred, gt, mask, protocol="flare7k"))
    ref = flare7k_published(gt, pred, mask)
    offset = 10 * np.log10(40 * 40 / 512**2)
    assert got["glare", "psnr"] == pytest.approx(ref["glare"] - offset, abs=1e-9)
    # Inside the region: the PSNR of the region's pixels alone (hard mask).
    w = region_weights(mask)["glare"] > 0
    mse = np.mean((gt[w].astype(float) - pred[w]) ** 2)
    assert got["glare", "psnr"] == pytest.approx(10 * np.log10(255**2 / mse), abs=1e-9)


@pytest.mark.parametrize("window", list(SSIM_WINDOWS))
def test_region_mean_ssim_equals_weighted_map_mean(window: str) -> None:
    pred, gt, mask = make_triplet(size=48, seed=5)
    got = as_dict(evaluate_pair(pred, gt, mask, protocol="flare7k", ssim_window=window))
    _, full = structural_similarity(
        gt, pred, channel_axis=2, data_range=255, full=True, **SKIMAGE_WINDOW[window]
    )
    pad = {"uniform": 3, "gaussian": 5}[window]
    assert ssim_pad(window) == pad
    valid = np.zeros(gt.shape[:2], bool)
    valid[pad:-pad, pad:-pad] = True
    for region in ("streak", "glare"):
        w = region_weights(mask)[region] * valid
        expected = (w[..., None] * full).sum() / (3 * w.sum())
        assert got[region, "ssim"] == pytest.approx(expected, abs=1e-12)
    # w = 1 everywhere reproduces skimage's mean SSIM.
    assert region_mean_ssim(full, np.ones(gt.shape[:2]), pad) == pytest.approx(
        got["entire", "ssim"], abs=1e-12
    )


@pytest.mark.parametrize("protocol", list(REGION_PROTOCOLS))
def test_identical_images_are_perfect(protocol: str) -> None:
    _, gt, mask = make_triplet(seed=6)
    got = as_dict(evaluate_pair(gt.copy(), gt, mask, protocol=protocol))
    for (region, metric), value in got.items():
        if metric == "ssim":
            assert value == pytest.approx(1.0, abs=1e-12), region
        else:
            assert value == math.inf, region


@pytest.mark.parametrize("protocol", list(REGION_PROTOCOLS))
def test_empty_regions_are_skipped(protocol: str) -> None:
    pred, gt, _ = make_triplet(seed=7)
    empty = np.zeros(gt.shape[:2], bool)
    glare_only = empty.copy()
    glare_only[8:20, 8:20] = True
    got = as_dict(evaluate_pair(pred, gt, paint_mask(empty, glare_only, empty), protocol=protocol))
    assert ("streak", "psnr") not in got and ("streak", "ssim") not in got
    assert ("glare", "psnr") in got and ("glare", "ssim") in got
    assert ("score", "psnr") not in got  # Score needs all three regions
    assert (("global", "psnr") in got) == (protocol == "flare7k")


def test_region_inside_ssim_border_has_psnr_but_no_region_mean_ssim() -> None:
    pred, gt, _ = make_triplet(seed=8)
    empty = np.zeros(gt.shape[:2], bool)
    corner = empty.copy()
    corner[:2, :2] = True  # within the 3-pixel border where the SSIM map is invalid
    got = as_dict(evaluate_pair(pred, gt, paint_mask(empty, corner, empty), protocol="flare7k"))
    assert ("glare", "psnr") in got and ("glare", "ssim") not in got


def test_bad_inputs_raise_user_errors() -> None:
    pred, gt, mask = make_triplet(size=16)
    with pytest.raises(UserError, match="unknown protocol 'paper'; expected one of masked, flare7k"):
        evaluate_pair(pred, gt, mask, protocol="paper")
    with pytest.raises(UserError, match="shapes differ"):
        evaluate_pair(pred[:8], gt, mask)
    with pytest.raises(UserError, match="pred must be a uint8 numpy array, got float64"):
        evaluate_pair(pred / 255.0, gt, mask)
    with pytest.raises(UserError, match=r"image is 10x10; gaussian SSIM needs >= 11x11"):
        evaluate_pair(pred[:10, :10], gt[:10, :10], mask[:10, :10], ssim_window="gaussian")
    with pytest.raises(UserError, match="duplicate image name 'a'"):
        evaluate_arrays([("a", pred, gt, mask), ("a", pred, gt, mask)], workers=0)


@pytest.mark.parametrize("protocol", list(REGION_PROTOCOLS))
def test_evaluate_arrays_rows_and_summary(protocol: str) -> None:
    items = [(f"img{i}", *make_triplet(seed=10 + i)) for i in range(3)]
    df = evaluate_arrays(items, protocol=protocol, workers=0)
    assert list(df.columns) == ["image", "region", "metric", "value"]
    assert df.attrs["protocol"] == protocol
    expected = [r for _, p, g, m in items for r in evaluate_pair(p, g, m, protocol=protocol)]
    assert df["value"].tolist() == [r["value"] for r in expected]
    summary = summarize(df)
    for metric in ("psnr", "ssim"):
        for region in ("entire", "streak", "glare"):
            sel = df[(df.metric == metric) & (df.region == region)]
            assert summary[f"{metric}_{region}"] == pytest.approx(sel.value.mean(), abs=1e-12)
    assert summary["n_images"] == 3 and summary["protocol"] == protocol
    if protocol == "flare7k":
        means = [summary[k] for k in ("psnr_glare", "psnr_streak", "psnr_global")]
        assert summary["score"] == pytest.approx(np.mean(means), abs=1e-12)
    else:
        assert "score" not in summary and "psnr_global" not in summary


def test_summarize_caps_inf_and_skips_missing_regions() -> None:
    df = pd.DataFrame(
        {
            "image": ["a", "a", "b", "b", "b"],
            "region": ["entire", "streak", "entire", "glare", "glare"],
            "metric": ["psnr", "psnr", "psnr", "psnr", "ssim"],
            "value": [math.inf, 30.0, 20.0, 25.0, 0.5],
        }
    )
    summary = summarize(df, protocol="masked")
    assert summary["psnr_entire"] == (PSNR_CAP_DB + 20.0) / 2
    assert summary["psnr_streak"] == 30.0  # image b has no streak: skipped, not zero
    assert summary["ssim_glare"] == 0.5
    assert math.isnan(summary["ssim_streak"])
    assert summary["n_images"] == 2
    with pytest.raises(UserError, match="pass protocol="):
        summarize(df)


@pytest.mark.slow
def test_process_pool_matches_in_process() -> None:
    items = [(f"img{i}", *make_triplet(seed=20 + i)) for i in range(4)]
    serial = evaluate_arrays(items, protocol="flare7k", workers=0)
    parallel = evaluate_arrays(items, protocol="flare7k", workers=2)
    pd.testing.assert_frame_equal(serial, parallel)


# ---------------------------------------------------------------------------------------------
# The fast paths against scikit-image computed the naive way: one skimage call per region.


def structured_triplet(h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(pred, gt) uint8 (h, w, 3): smooth gradients, a bright disc; pred = gt + a flare residue."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    ramps = [60 + 120 * (yy / h) ** (c + 1) + 40 * np.sin(xx / (3 + c)) for c in range(3)]
    gt = np.stack(ramps, axis=-1)
    gt[(yy - h / 3) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 5) ** 2] = 250
    residue = 50 * np.exp(-np.hypot(yy - h / 2, xx - w / 3) / 10)[..., None]
    pred = gt + residue + rng.normal(0, 3, gt.shape)
    return np.clip(pred, 0, 255).astype(np.uint8), np.clip(gt, 0, 255).astype(np.uint8)


def region_cases(h: int, w: int, seed: int) -> dict[str, np.ndarray]:
    """Flare7K masks (h, w, 3) covering every region combination the metrics distinguish."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    none = np.zeros((h, w), bool)
    disc = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 3) ** 2
    line = (np.abs(yy - xx * h / w) < 1.5) & ~disc
    dot = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < 9
    soft = np.zeros((h, w, 3), np.uint8)  # antialiased edges: fractional weights, R < G at places
    soft[disc] = (255, 255, 0)
    edge = np.abs(np.hypot(yy - h / 2, xx - w / 2) - min(h, w) / 3) < 3
    soft[edge] = rng.integers(0, 256, (int(edge.sum()), 3))
    corner, bottom = none.copy(), none.copy()
    corner[:2, :2] = True  # only in the border where the SSIM map is invalid
    bottom[-2:] = True
    return {
        "all_regions": paint_mask(line, disc, dot),
        "no_streak": paint_mask(none, disc, dot),
        "no_glare": paint_mask(line, none, dot),
        "no_flare": paint_mask(none, none, dot),
        "empty": paint_mask(none, none, none),
        "glare_everywhere": paint_mask(none, ~none, none),
        "streak_everywhere": paint_mask(~none, none, none),
        "light_everywhere": paint_mask(none, none, ~none),
        "border_only": paint_mask(bottom, corner, none),
        "soft": soft,
        "random": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
    }


IMAGE_KINDS = ("random", "structured")


def pair_of_kind(kind: str, h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if kind == "structured":
        return structured_triplet(h, w, seed)
    pred, gt, _ = make_triplet(size=max(h, w), seed=seed)
    return pred[:h, :w].copy(), gt[:h, :w].copy()


# (h, w) -> mask cases; 150 x 170 has ~100 tiles of the masked-image SSIM, several batches.
SHAPES = {(67, 45): None, (45, 67): None, (150, 170): ("all_regions", "soft", "glare_everywhere")}


@pytest.mark.parametrize("protocol", list(REGION_PROTOCOLS))
@pytest.mark.parametrize("window", list(SSIM_WINDOWS))
@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_every_value_equals_skimage_naive(protocol: str, window: str, kind: str) -> None:
    for (h, w), only in SHAPES.items():
        pred, gt = pair_of_kind(kind, h, w, seed=h)
        for case, mask in region_cases(h, w, seed=w).items():
            if only is not None and case not in only:
                continue
            got = as_dict(evaluate_pair(pred, gt, mask, protocol=protocol, ssim_window=window))
            ref = skimage_reference(pred, gt, mask, protocol, window)
            assert set(got) == set(ref), (case, set(got) ^ set(ref))
            for key, value in ref.items():
                assert got[key] == pytest.approx(value, abs=1e-9, rel=0), (case, key)
            # the entire image is skimage's, bit for bit
            assert got["entire", "ssim"] == ref["entire", "ssim"], case
            assert got["entire", "psnr"] == ref["entire", "psnr"], case


def test_region_cases_cover_absent_and_whole_image_regions() -> None:
    cases = region_cases(67, 45, 0)
    present = {c: {r for r, w in region_weights(m).items() if w.any()} for c, m in cases.items()}
    assert "streak" not in present["no_streak"] and "glare" not in present["no_glare"]
    assert present["empty"] == {"global"}
    assert (region_weights(cases["glare_everywhere"])["glare"] == 1).all()
    assert (region_weights(cases["streak_everywhere"])["streak"] == 1).all()
    assert "global" not in present["light_everywhere"]
    assert present["border_only"] == {"streak", "glare", "global"}
    soft = region_weights(cases["soft"])
    assert ((soft["glare"] > 0) & (soft["glare"] < 1)).any()


@pytest.mark.parametrize("window", list(SSIM_WINDOWS))
@pytest.mark.parametrize("shape", [(67, 45), (45, 67), (7, 8), (11, 11), (12, 40), (300, 13)])
def test_ssim_map_is_skimage_bit_for_bit(window: str, shape: tuple[int, int]) -> None:
    if min(shape) < 2 * ssim_pad(window) + 1:
        pytest.skip(f"{window} SSIM needs a larger image")  # covered by the UserError test
    pred, gt = structured_triplet(*shape, seed=1)
    value, full = ssim_map(gt, pred, window)
    ref, ref_full = structural_similarity(
        gt, pred, channel_axis=2, data_range=255, full=True, **SKIMAGE_WINDOW[window]
    )
    assert value == ref
    pad = ssim_pad(window)
    valid = (slice(pad, shape[0] - pad), slice(pad, shape[1] - pad))
    assert np.array_equal(full[valid], ref_full[valid])
    border = np.ones(shape, bool)
    border[valid] = False
    assert np.isnan(full[border]).all()


def test_region_levels_match_region_weights() -> None:
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)  # antialiased: any value, R < G too
    weights = region_weights(mask)
    for region, level in _region_levels(mask).items():
        assert level.dtype == np.uint8
        if region == "global":  # region_weights computes 1 - B/255, one rounding away
            np.testing.assert_allclose(level / 255.0, weights[region], rtol=0, atol=1e-15)
        else:  # masked-image SSIM multiplies by exactly these weights
            assert np.array_equal(level / 255.0, weights[region])
