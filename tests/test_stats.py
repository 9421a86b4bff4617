"""reports.stats: mean ± std over seeds, paired bootstrap CIs, pairing by image stem."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from reports import stats
from reports.collect import METRICS
from reports.stats import aggregate_seeds, paired_bootstrap, paired_differences, per_image_wide


def _cells(values: list[float | None], statuses: list[str]) -> pd.DataFrame:
    """Plan cells of one row: one trial per seed, psnr_entire = value, other metrics value/100."""
    rows = []
    for seed, (value, status) in enumerate(zip(values, statuses)):
        row = {"trial_id": f"t{seed}", "seed": seed, "status": status, "shared": False}
        for m in METRICS:
            row[m] = np.nan if value is None else (value if m == "psnr_entire" else value / 100)
        rows.append(row)
    return pd.DataFrame(rows)


def test_mean_and_sample_std_over_seeds():
    out = aggregate_seeds(_cells([23.0, 23.2, 23.7], ["done"] * 3))
    assert out["psnr_entire"] == pytest.approx(np.mean([23.0, 23.2, 23.7]))
    assert out["psnr_entire_std"] == pytest.approx(np.std([23.0, 23.2, 23.7], ddof=1))
    assert (out["n_seeds"], out["n_planned"], out["status"], out["seeds"]) == (3, 3, "done", "0;1;2")


def test_partial_row_averages_finished_seeds_only():
    out = aggregate_seeds(_cells([23.0, None, 24.0], ["done", "failed", "done"]))
    assert out["psnr_entire"] == pytest.approx(23.5)
    assert (out["n_seeds"], out["n_planned"], out["status"]) == (2, 3, "partial")


def test_single_seed_has_no_std_and_nothing_finished_is_nan_not_zero():
    one = aggregate_seeds(_cells([23.0], ["done"]))
    assert one["psnr_entire"] == 23.0 and np.isnan(one["psnr_entire_std"])
    none = aggregate_seeds(_cells([None, None], ["failed", "pending"]))
    assert np.isnan(none["psnr_entire"]) and none["status"] == "failed" and none["n_seeds"] == 0
    assert aggregate_seeds(_cells([None], ["pending"]))["status"] == "pending"


def test_shared_trial_counts_once():
    cells = pd.concat([_cells([23.0], ["done"])] * 2, ignore_index=True)  # same trial id twice
    out = aggregate_seeds(cells)
    assert out["n_seeds"] == 1 and out["trial_ids"] == "t0"


def test_bootstrap_ci_brackets_the_true_mean_difference():
    rng = np.random.default_rng(1)
    true = 0.2
    diffs = true + rng.normal(0.0, 1.0, 400)
    mean, low, high = paired_bootstrap(diffs, n_resamples=4000)
    assert low < true < high
    assert low < mean < high and mean == pytest.approx(diffs.mean())
    # Width matches the normal approximation 2 * 1.96 * sd / sqrt(n) within 15%.
    expected = 2 * 1.96 * diffs.std(ddof=1) / np.sqrt(diffs.size)
    assert high - low == pytest.approx(expected, rel=0.15)


def test_bootstrap_is_seeded_and_ignores_nan():
    d = np.array([0.1, 0.3, np.nan, 0.2, 0.5])
    assert paired_bootstrap(d) == paired_bootstrap(d)
    assert paired_bootstrap(d)[0] == pytest.approx(0.275)
    wider = np.random.default_rng(0).normal(size=50)
    assert paired_bootstrap(wider, seed=1)[1:] != paired_bootstrap(wider, seed=2)[1:]


def test_bootstrap_degenerate_inputs():
    assert all(np.isnan(paired_bootstrap(np.array([]))))
    mean, low, high = paired_bootstrap(np.array([0.4]))
    assert mean == 0.4 and np.isnan(low) and np.isnan(high)


def _long(trial_id: str, values: dict[str, float], region: str = "entire") -> list[dict]:
    return [{"trial_id": trial_id, "image": img, "region": region, "metric": "psnr", "value": v}
            for img, v in values.items()]


def test_pairing_by_image_stem_and_missing_regions():
    per_image = pd.DataFrame(
        _long("ref", {"a": 20.0, "b": 22.0, "c": 30.0})
        + _long("ours", {"b": 22.5, "a": 21.0, "d": 99.0})  # other order; d has no reference
        + _long("ours", {"a": 35.0}, region="streak"))  # no reference streak value for a
    wide = per_image_wide(per_image)
    assert np.isnan(wide.loc[("ref", "a"), "psnr_streak"])
    diffs = paired_differences(wide, [("ours", 0)], {0: "ref"})
    assert diffs["psnr_entire"].dropna().to_dict() == {"a": 1.0, "b": 0.5}
    assert diffs["psnr_streak"].isna().all()


def test_each_seed_pairs_with_its_own_reference_then_averages():
    per_image = pd.DataFrame(
        _long("ref0", {"a": 20.0, "b": 20.0}) + _long("ref1", {"a": 30.0, "b": 30.0})
        + _long("s0", {"a": 21.0, "b": 22.0}) + _long("s1", {"a": 33.0, "b": 30.0}))
    wide = per_image_wide(per_image)
    diffs = paired_differences(wide, [("s0", 0), ("s1", 1)], {0: "ref0", 1: "ref1"})
    assert diffs["psnr_entire"].to_dict() == {"a": 2.0, "b": 1.0}  # (1+3)/2, (2+0)/2
    # A seed without its own reference is paired with the mean over references (25 dB).
    diffs = paired_differences(wide, [("s0", 7)], {0: "ref0", 1: "ref1"})
    assert diffs["psnr_entire"].to_dict() == {"a": -4.0, "b": -3.0}


def test_nothing_finished_says_the_most_definite_reason():
    stopped = _cells([None, None], ["stopped", "pending"])
    assert aggregate_seeds(stopped)["status"] == "stopped"
    assert aggregate_seeds(_cells([None, None], ["stopped", "failed"]))["status"] == "failed"


# -- minimum detectable difference (issue 20) -------------------------------------------------------


def test_z_sum_is_the_normal_quantiles_at_95_percent_and_80_percent_power():
    assert stats.z_sum() == pytest.approx(1.959964 + 0.841621, abs=1e-6)
    assert stats.z_sum(level=0.9, power=0.5) == pytest.approx(1.644854, abs=1e-6)


def test_variance_components_and_mde_known_values():
    # seed means 2, 3; image means 1.5, 2.5, 3.5; no interaction:
    # MS_seed = 3 * 0.5, MS_image = 2 * 1.0, MS_res = 0 -> s2_seed 0.5, s2_image 1.0
    d = np.array([[1.0, 2.0, 3.0], [2.0, 3.0, 4.0]])
    c = stats.variance_components(d)
    assert (c["s2_seed"], c["s2_image"], c["s2_res"], c["m"], c["n"]) == pytest.approx((0.5, 1.0, 0.0, 2, 3))
    out = stats.power_analysis(d, (0.01, 0.3))
    v = 0.5 / 2 + 1.0 / 3  # V(m=2, n=3)
    assert out["mde"] == pytest.approx(stats.z_sum() * np.sqrt(v))
    assert out["sd_image"] == pytest.approx(1.0) and out["sd_seed"] == pytest.approx(np.sqrt(0.5))
    # The seed term alone (0.5 / 2) exceeds (0.3 / 2.80)^2: no number of images is enough.
    assert out["n_images_large"] == np.inf
    # Seeds at 3 images: 1/3 > (0.3 / 2.80)^2 too, so no number of seeds either.
    assert out["n_seeds_large"] == np.inf


def test_sample_sizes_solve_the_power_equation():
    c = {"s2_seed": 0.01, "s2_image": 1.0, "s2_res": 0.04, "m": 3, "n": 48}
    z = stats.z_sum()
    budget = (0.3 / z) ** 2
    n = stats.sample_size(c, 0.3, vary="images")
    assert n == np.ceil((1.0 + 0.04 / 3) / (budget - 0.01 / 3))
    assert stats.mean_variance(c, 3, n) <= budget < stats.mean_variance(c, 3, n - 1)
    m = stats.sample_size(c, 0.3, vary="seeds")
    assert m == np.inf  # 1.0 / 48 images > budget: more seeds cannot fix too few images
    wide = {**c, "s2_seed": 0.05, "n": 1000}
    m = stats.sample_size(wide, 0.3, vary="seeds")
    assert m == 5 and stats.mean_variance(wide, m, 1000) <= budget < stats.mean_variance(wide, m - 1, 1000)


def test_one_seed_uses_the_image_variance_and_leaves_seeds_unknown():
    d = np.array([[0.1, 0.3, 0.2, 0.6]])
    out = stats.power_analysis(d, (0.01, 0.3))
    var = np.var(d, ddof=1)
    assert out["mde"] == pytest.approx(stats.z_sum() * np.sqrt(var / 4))
    assert out["n_images_large"] == np.ceil(var / (0.3 / stats.z_sum()) ** 2)
    assert np.isnan(out["sd_seed"]) and np.isnan(out["n_seeds_large"])


def test_the_model_recovers_known_components():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 0.1, (8, 1)), rng.normal(0, 0.5, (1, 400))
    d = 0.2 + a + b + rng.normal(0, 0.2, (8, 400))
    c = stats.variance_components(d)
    assert c["s2_image"] == pytest.approx(0.25, rel=0.2) and c["s2_res"] == pytest.approx(0.04, rel=0.05)
    assert c["s2_seed"] == pytest.approx(0.01, rel=0.8)


def test_diff_rows_carry_power_columns_from_the_per_seed_differences():
    per_image = pd.DataFrame(
        _long("ref0", {"a": 20.0, "b": 20.0, "c": 20.0}) + _long("ref1", {"a": 20.0, "b": 20.0, "c": 20.0})
        + _long("s0", {"a": 21.0, "b": 22.0, "c": 23.0}) + _long("s1", {"a": 22.0, "b": 23.0, "c": 24.0}))
    wide = per_image_wide(per_image)
    diffs = paired_differences(wide, [("s0", 0), ("s1", 1)], {0: "ref0", 1: "ref1"})
    (row,) = [r for r in stats.diff_rows(diffs, n_resamples=50) if r["metric"] == "psnr_entire"]
    assert set(stats.POWER_COLUMNS) <= set(row)
    # The table above, as in test_variance_components_and_mde_known_values.
    assert row["mde"] == pytest.approx(stats.z_sum() * np.sqrt(0.5 / 2 + 1.0 / 3))
    assert (row["effect_small"], row["effect_large"]) == stats.PAPER_EFFECTS["psnr"]
    # Without the per-trial table (one seed assumed): the image variance of the seed means.
    diffs.attrs.clear()
    (row,) = [r for r in stats.diff_rows(diffs, n_resamples=50) if r["metric"] == "psnr_entire"]
    assert row["mde"] == pytest.approx(stats.z_sum() * np.sqrt(1.0 / 3)) and np.isnan(row["sd_seed"])
