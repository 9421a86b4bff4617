"""reports.stats: mean ± std over seeds, pairing by image stem, the diff rows and their flags,
Holm over a table, power columns, and (a small bench/bench_coverage.py) the intervals' coverage."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from reports import random_effects, stats
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


# -- infinite PSNR: capped in differences as in the means (issue 28, item 5) ------------------------


def test_psnr_cap_is_the_one_the_means_use():
    from cascade.metrics import PSNR_CAP_DB

    assert stats.PSNR_CAP_DB == PSNR_CAP_DB


def test_a_perfect_image_counts_the_same_in_a_difference_as_in_the_means():
    from cascade.metrics import summarize

    ref = {"a": 30.0, "b": 25.0, "c": 20.0}
    ours = {"a": np.inf, "b": 26.0, "c": 21.5}  # image a reproduced exactly
    per_image = pd.DataFrame(_long("ref", ref) + _long("ours", ours))
    wide = per_image_wide(per_image)
    assert wide.loc[("ours", "a"), "psnr_entire"] == stats.PSNR_CAP_DB
    diffs = paired_differences(wide, [("ours", 0)], {0: "ref"})
    (row,) = [r for r in stats.diff_rows(diffs, n_resamples=20) if r["metric"] == "psnr_entire"]

    def mean(values: dict[str, float]) -> float:
        frame = pd.DataFrame(_long("x", values)).drop(columns="trial_id")
        return summarize(frame, protocol="masked")["psnr_entire"]

    # Values <= 100 dB, 3 images: each mean is exact to 3 x 100 x 2.2e-16 < 1e-13; 1e-12 is headroom.
    assert row["n_images"] == 3  # the perfect image is kept, not dropped
    assert row["diff"] == pytest.approx(mean(ours) - mean(ref), abs=1e-12)
    assert mean(ours) - mean(ref) == pytest.approx((100 - 30 + 1 + 1.5) / 3, abs=1e-12)


# -- diff rows: the interval with the seed variance, flags, pairing ------------------------------


def _cell(values: list[list[float]], ref: list[float] | None = None, *, seeds: list | None = None,
          references: dict | None = None) -> pd.DataFrame:
    """paired_differences of one cell: trial s has per-image psnr_entire = ref + values[s]."""
    ref = ref if ref is not None else [20.0] * len(values[0])
    seeds = seeds if seeds is not None else list(range(len(values)))
    refs = references if references is not None else {s: f"ref{s}" for s in seeds}
    stems = [f"{i:03d}" for i in range(len(ref))]
    rows = [r for t in dict.fromkeys(refs.values()) for r in _long(t, dict(zip(stems, ref)))]
    for s, d in zip(seeds, values):
        rows += _long(f"t{s}", {i: r + v for i, r, v in zip(stems, ref, d)})
    wide = per_image_wide(pd.DataFrame(rows))
    return paired_differences(wide, [(f"t{s}", s) for s in seeds], refs)


def _psnr_row(diffs: pd.DataFrame, **kwargs) -> dict:
    return next(r for r in stats.diff_rows(diffs, n_resamples=50, **kwargs)
                if r["metric"] == "psnr_entire")


def test_diff_rows_give_the_two_way_interval_of_the_per_seed_table():
    d = [[1.0, 2.0, 3.0, 2.5], [2.0, 3.5, 4.0, 2.0], [0.5, 2.0, 2.5, 3.0]]
    row = _psnr_row(_cell(d))
    ci = random_effects.t_interval(np.array(d))
    for key in ("diff", "ci_low", "ci_high", "se", "df", "p_value"):
        # (20 + v) - 20 == v exactly for these binary fractions: the same table, the same
        # arithmetic; rel=1e-12 only absorbs summation order.
        assert row[key] == pytest.approx(ci[key], rel=1e-12), key
    assert row["diff"] == pytest.approx(np.mean(d), rel=1e-12)
    assert (row["n_seeds"], row["n_images"], row["seed_variance_measured"]) == (3, 4, True)
    assert row["flagged"] == row["excludes_zero"] == (row["ci_low"] > 0)
    assert row["pairing"] == "same seed"
    assert list(row) == ["metric", *stats.DIFF_COLUMNS, *stats.POWER_COLUMNS]
    # The images-only bootstrap resamples the seed-averaged differences: narrower here, since
    # the seed means (2.125, 2.875, 2.0) vary more than the images' noise shows.
    assert row["ci_high_images_only"] - row["ci_low_images_only"] < row["ci_high"] - row["ci_low"]


def test_one_seed_is_never_flagged_unless_asked():
    d = [[1.0, 1.2, 0.9, 1.1, 1.0, 0.8]]  # far from 0 on image noise alone
    row = _psnr_row(_cell(d))
    assert row["excludes_zero"] and not row["seed_variance_measured"] and not row["flagged"]
    assert np.isnan(row["sd_seed"]) and np.isnan(row["n_seeds_large"])
    # The interval over images: mean +- t_{0.975, n-1} sd / sqrt(n) (scipy's t as the reference).
    from scipy import stats as sps

    low, high = sps.t.interval(0.95, 5, loc=np.mean(d), scale=sps.sem(d[0]))
    assert (row["ci_low"], row["ci_high"], row["df"]) == pytest.approx((low, high, 5), rel=1e-12)
    assert _psnr_row(_cell(d), flag_on_image_noise=True)["flagged"]


def test_incomplete_images_and_trials_without_values_leave_the_complete_table():
    table = np.array([[1.0, np.nan, 3.0], [2.0, 2.0, 4.0], [np.nan] * 3])
    np.testing.assert_array_equal(stats.complete_table(table), [[1.0, 3.0], [2.0, 4.0]])
    assert stats.complete_table(np.full((2, 3), np.nan)).shape == (0, 0)
    row = next(r for r in stats.diff_rows(pd.DataFrame(columns=list(METRICS), dtype=float)))
    assert np.isnan(row["diff"]) and row["n_images"] == 0 and not row["flagged"]


def test_pairing_says_when_a_trial_used_the_pooled_reference():
    d = [[1.0, 2.0, 3.0], [2.0, 3.0, 4.5]]
    assert _cell(d, references={0: "ref0", 1: "ref1"}).attrs["pairing"] == "same seed"
    assert _cell(d, references={0: "ref0"}).attrs["pairing"] == "mixed"
    assert _cell(d, seeds=[5, 6], references={0: "ref0"}).attrs["pairing"] == "pooled"
    # A deterministic reference (the same values under every seed): pooling changes nothing.
    same, pooled = _cell(d), _cell(d, seeds=[5, 6], references={0: "ref0", 1: "ref1"})
    assert _psnr_row(same)["ci_low"] == pytest.approx(_psnr_row(pooled)["ci_low"], rel=1e-12)


def test_diff_rows_carry_power_columns_with_t_quantiles():
    d = np.array([[1.0, 2.0, 3.0], [2.0, 3.0, 4.0]])
    row = _psnr_row(_cell(d.tolist()))
    ci = random_effects.t_interval(d)
    q = random_effects.multiplier(ci["df"], power=stats.POWER)
    assert row["mde"] == pytest.approx(q * ci["se"], rel=1e-12)
    assert q > 2.80  # t, not the normal's 1.96 + 0.84, at df ~1.3
    assert row["sd_image"] == pytest.approx(1.0) and row["sd_seed"] == pytest.approx(np.sqrt(0.5))
    assert (row["effect_small"], row["effect_large"]) == stats.PAPER_EFFECTS["psnr"]
    # Without the per-trial table (one seed assumed): the image variance of the seed means.
    diffs = _cell(d.tolist())
    diffs.attrs.clear()
    row = _psnr_row(diffs)
    assert row["n_seeds"] == 1 and np.isnan(row["sd_seed"]) and not row["seed_variance_measured"]


# -- multiple comparisons (issue 28, item 4) --------------------------------------------------------


def test_holm_known_values():
    # sorted 0.005, 0.01, 0.03, 0.04 x 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04; running max 0.06.
    adjusted = stats.holm(np.array([0.01, 0.04, 0.03, 0.005]))
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02], rtol=1e-12)
    np.testing.assert_allclose(stats.holm(np.array([0.9, 0.01])), [0.9, 0.02], rtol=1e-12)
    assert stats.holm(np.array([0.7]))[0] == 0.7  # a family of one: unadjusted
    assert stats.holm(np.array([0.6, 0.6, 0.6])).max() == 1.0  # capped at 1


def _frame(rows: list[tuple]) -> pd.DataFrame:
    """(trial_ids, metric, diff, se, df, n_seeds) -> a diff frame's columns family_flags reads."""
    frame = pd.DataFrame(rows, columns=["trial_ids", "metric", "diff", "se", "df", "n_seeds"])
    frame["seed_variance_measured"] = frame["n_seeds"] >= 2
    return frame


def test_family_counts_each_comparison_once_and_only_those_a_table_can_flag():
    frame = _frame([("a", "psnr_entire", 1.0, 0.1, 50.0, 3), ("b", "psnr_entire", 0.05, 0.1, 50.0, 3),
                    ("l0", "psnr_entire", 1.0, 0.1, 50.0, 3), ("l0", "psnr_entire", 1.0, 0.1, 50.0, 3),
                    ("one", "psnr_entire", 1.0, 0.1, 50.0, 1), ("none", "psnr_entire", np.nan, np.nan, np.nan, 0)])
    out = stats.family_flags(frame)
    assert (out["family_size"] == 3).all()  # a, b, and the λ = 0 trial shown twice
    assert out["p_holm"].iloc[2] == out["p_holm"].iloc[3]
    assert out["p_holm"].iloc[4:].isna().all() and not out["flagged_holm"].iloc[4:].any()
    # The family p-value refers t = 10 to t with min(df, m - 1) = 2 df, times Holm's K - j + 1.
    from scipy import stats as sps

    p2 = 2 * sps.t.sf(10.0, 2)
    assert out["p_holm"].iloc[0] == pytest.approx(3 * p2, rel=1e-9)
    assert stats.family_flags(frame, flag_on_image_noise=True)["family_size"].iloc[0] == 4


# -- coverage, a small version of bench/bench_coverage.py (issue 28, item 6) --------------------------


def _bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_coverage.py"
    spec = importlib.util.spec_from_file_location("bench_coverage", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REPS = 200
# A coverage of at least the goal (0.93) falls below this in REPS repetitions with probability
# < 0.002 (normal approximation to the binomial, 2.9 standard errors): a margin derived from the
# repetitions, not fitted to one run; the fixed seeds make the test deterministic besides.
FLOOR = 0.93 - 2.9 * math.sqrt(0.93 * 0.07 / REPS)


def test_the_interval_holds_its_level_where_seeds_vary_and_the_old_one_did_not():
    bench = _bench()
    out = bench.simulate(3, 32, 0.3, 0.5, 0.25, REPS, n_resamples=200)
    assert out["cover"] >= FLOOR
    assert out["flag"] <= 1 - FLOOR
    # Negative control: the bootstrap over images (the interval diff.csv used to report) misses
    # the seed variance and fails the same floor (measured 0.6 in docs/design.md).
    assert out["cover_img"] < FLOOR


def test_one_seed_flags_nothing_by_default():
    out = _bench().simulate(1, 32, 0.3, 0.5, 0.25, 60, n_resamples=100)
    assert out["flag"] == 0.0 and out["cover"] < FLOOR  # seed variance not measured: not covered
