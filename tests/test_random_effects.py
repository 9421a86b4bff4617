"""reports.random_effects: mean squares, V and its df, the t interval, MDE and sample sizes.

Reference values are hand-computed fractions or scipy.stats' own t intervals; the arithmetic is a
few dozen float64 operations on numbers of order 1, so rel=1e-12 (~5000 eps) is ample headroom.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from reports import random_effects as rfx

REL = 1e-12


def test_mean_squares_and_variance_known_values():
    # seed means 2, 3; image means 1.5, 2.5, 3.5; no interaction:
    # MS_seed = 3 * 0.5, MS_image = 2 * 1.0, MS_res = 0 -> V = (1.5 + 2.0 - 0) / 6
    d = np.array([[1.0, 2.0, 3.0], [2.0, 3.0, 4.0]])
    ms = rfx.mean_squares(d)
    assert (ms["ms_seed"], ms["ms_image"], ms["ms_res"], ms["m"], ms["n"]) == pytest.approx(
        (1.5, 2.0, 0.0, 2, 3), abs=1e-15)
    c = rfx.components(ms)
    assert (c["s2_seed"], c["s2_image"], c["s2_res"]) == pytest.approx((0.5, 1.0, 0.0), abs=1e-15)
    v, df = rfx.variance_and_df(1.5, 2.0, 0.0, 2, 3, bound=None)
    # Satterthwaite: (1/4 + 1/3)^2 / ((1/4)^2 / 1 + (1/3)^2 / 2) = 49/17
    assert float(v) == pytest.approx(7 / 12, rel=REL) and float(df) == pytest.approx(49 / 17, rel=REL)


def test_df_takes_the_seed_mean_square_at_its_upper_bound():
    inflate = float(rfx.seed_inflation(2))
    assert inflate == pytest.approx(1 / sps.chi2.ppf(0.25, 1), rel=REL)  # (m - 1) / chi2_{0.25}
    v, df = rfx.variance_and_df(1.5, 2.0, 0.0, 2, 3)
    seed, image = inflate * 1.5 / 6, 2.0 / 6
    assert float(v) == pytest.approx(7 / 12, rel=REL)  # V itself is unchanged
    assert float(df) == pytest.approx((seed + image) ** 2 / (seed**2 + image**2 / 2), rel=REL)
    assert 1 < float(df) < 49 / 17  # pulled towards the seed term's own 1 df
    assert float(rfx.seed_inflation(1)) == 1.0 and float(rfx.seed_inflation(5, None)) == 1.0


def test_no_image_variation_is_the_one_sample_t_interval_of_the_seed_means():
    seeds = np.array([0.3, -0.1, 0.5, 0.2])
    d = np.repeat(seeds[:, None], 10, axis=1)  # every image the same within a seed
    out = rfx.t_interval(d)
    low, high = sps.t.interval(0.95, 3, loc=seeds.mean(), scale=sps.sem(seeds))
    assert (out["ci_low"], out["ci_high"], out["df"]) == pytest.approx((low, high, 3), rel=REL)
    assert out["p_value"] == pytest.approx(sps.ttest_1samp(seeds, 0.0).pvalue, rel=1e-9)


def test_one_seed_is_the_t_interval_over_images_and_says_so():
    d = np.array([[0.1, 0.3, 0.2, 0.6]])
    out = rfx.t_interval(d)
    low, high = sps.t.interval(0.95, 3, loc=d.mean(), scale=sps.sem(d[0]))
    assert (out["ci_low"], out["ci_high"], out["df"]) == pytest.approx((low, high, 3), rel=REL)
    assert not out["seed_variance_measured"] and out["n_seeds"] == 1
    assert rfx.t_interval(np.array([[0.1, 0.2]]), level=0.9)["ci_high"] == pytest.approx(
        0.15 + sps.t.ppf(0.95, 1) * 0.05, rel=REL)


def test_image_term_below_the_residual_is_dropped():
    ms_seed, ms_image, ms_res = 0.9, 0.2, 0.3  # s2_image estimated < 0
    v, df = rfx.variance_and_df(ms_seed, ms_image, ms_res, 3, 8)
    assert float(v) == pytest.approx(0.9 / 24, rel=REL) and float(df) == pytest.approx(2, rel=REL)


def test_satterthwaite_df_of_one_term_is_its_own_and_zeros_have_infinite_df():
    assert float(rfx.satterthwaite_df([(0.4, 7.0)])) == pytest.approx(7.0, rel=REL)
    two = float(rfx.satterthwaite_df([(1.0, 2.0), (1.0, 2.0)]))
    assert two == pytest.approx(4.0, rel=REL)  # (1 + 1)^2 / (1/2 + 1/2)
    assert float(rfx.satterthwaite_df([(0.0, 2.0), (0.0, 5.0)])) == math.inf


def test_degenerate_tables():
    out = rfx.t_interval(np.zeros((0, 0)))
    assert math.isnan(out["diff"]) and math.isnan(out["ci_low"]) and out["n_images"] == 0
    one_image = rfx.t_interval(np.array([[0.5], [0.7]]))
    assert one_image["diff"] == pytest.approx(0.6) and math.isnan(one_image["se"])
    flat = rfx.t_interval(np.full((3, 4), 0.25))  # V = 0: the interval is the point
    assert (flat["ci_low"], flat["ci_high"], flat["p_value"]) == (0.25, 0.25, 0.0)


def test_mde_uses_t_quantiles_at_the_interval_df():
    assert float(rfx.multiplier(math.inf, power=0.8)) == pytest.approx(1.959964 + 0.841621, abs=1e-6)
    assert float(rfx.multiplier(2.0)) == pytest.approx(4.302653, abs=1e-6)  # t_{0.975, 2}
    c = {"s2_seed": 0.09, "s2_image": 0.25, "s2_res": 0.0625, "m": 3, "n": 96}
    v, df = rfx.variance_and_df(96 * 0.09 + 0.0625, 3 * 0.25 + 0.0625, 0.0625, 3, 96)
    expected = (sps.t.ppf(0.975, df) + sps.t.ppf(0.8, df)) * np.sqrt(v)
    assert float(rfx.mde_at(c, 3, 96)) == pytest.approx(float(expected), rel=REL)


def test_sample_sizes_are_the_fewest_units_that_reach_the_effect():
    c = {"s2_seed": 0.0, "s2_image": 1.0, "s2_res": 0.04, "m": 3, "n": 48}
    n = rfx.sample_size(c, 0.3, vary="images")
    assert rfx.mde_at(c, 3, n) <= 0.3 < rfx.mde_at(c, 3, n - 1)
    # No seed variance: df ~ 88 there, where t_{0.975} + t_{0.8} is within 1.2 % of the normal's
    # 2.8016, so n is within (1.012^2 - 1) ~ 2.5 % (+ 1 for the ceiling) of the normal answer.
    normal = (2.8016 / 0.3) ** 2 * (1 + 0.04 / 3)
    assert normal < n <= 1.025 * normal + 1
    m = rfx.sample_size({**c, "s2_seed": 0.05, "n": 1000}, 0.3, vary="seeds")
    wide = {**c, "s2_seed": 0.05, "n": 1000}
    assert m >= 2 and rfx.mde_at(wide, m, 1000) <= 0.3 < rfx.mde_at(wide, m - 1, 1000)
    # More seeds cannot make up for 48 images: the image term alone is (1.0 / 48) > (0.3 / 2.8)^2.
    assert rfx.sample_size(c, 0.3, vary="seeds") == math.inf
    # 0.3 dB at 3 seeds of SD 0.3 dB: t_{2} multipliers, the seed term alone is too large.
    assert rfx.sample_size({**c, "s2_seed": 0.09}, 0.3, vary="images") == math.inf
    one = {"s2_seed": math.nan, "s2_image": 0.25, "s2_res": 0.0, "m": 1, "n": 96}
    assert math.isnan(rfx.sample_size(one, 0.3, vary="seeds"))
    n1 = rfx.sample_size(one, 0.3, vary="images")
    assert rfx.mde_at(one, 1, n1) <= 0.3 < rfx.mde_at(one, 1, n1 - 1)


def test_family_p_value_is_never_below_the_intervals():
    rng = np.random.default_rng(0)
    d = rng.normal(0, 0.3, (3, 1)) + rng.normal(0, 0.5, (1, 40)) + rng.normal(0, 0.2, (3, 40)) + 0.4
    ci = rfx.t_interval(d)
    p = rfx.family_p_value(ci["diff"], ci["se"], ci["df"], 3)
    assert p >= ci["p_value"]
    assert p == pytest.approx(2 * sps.t.sf(abs(ci["diff"]) / ci["se"], min(ci["df"], 2)), rel=REL)
    assert rfx.family_p_value(0.2, 0.1, 30.0, 1) == pytest.approx(2 * sps.t.sf(2.0, 30), rel=REL)
    assert math.isnan(rfx.family_p_value(math.nan, 0.1, 3.0, 3))


def test_df_never_falls_below_the_smaller_df_of_the_positive_terms():
    # MS_image just above MS_res: without the floor, Satterthwaite's df would be ~6e-4.
    terms = [(0.01 / 24, 1), (1.0001 / 24, 11), (-1.0 / 24, 11)]
    assert float(rfx.satterthwaite_df(terms)) < 1e-3
    _, df = rfx.variance_and_df(0.01, 1.0001, 1.0, 2, 12, bound=None)
    assert float(df) == 1.0  # min(m - 1, n - 1)
    _, df = rfx.variance_and_df(0.01, 1.0001, 1.0, 10, 3, bound=None)
    assert float(df) == 2.0  # few images: n - 1
