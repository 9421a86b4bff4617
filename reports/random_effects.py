"""The seeds x images random-effects model of one cell's paired differences: the variance of their
mean, its degrees of freedom, the t interval, the minimum detectable difference and the seeds /
images an effect needs (docs/design.md, "Differences and their intervals").

Model. The paired difference of one cell to the reference on image i under seed s is
    d_si = mu + a_s + b_i + e_si,   a ~ (0, s2_seed), b ~ (0, s2_image), e ~ (0, s2_res),
the two-way random-effects model of a complete m seeds x n images table. Its mean squares are
MS_seed = n var_s(mean_i d) (m - 1 df), MS_image = m var_i(mean_s d) (n - 1 df) and MS_res, the
interaction ((m - 1)(n - 1) df), with expectations n s2_seed + s2_res, m s2_image + s2_res and
s2_res. The variance of the grand mean over m' seeds and n' images is
    V(m', n') = s2_seed / m' + s2_image / n' + s2_res / (m' n'),
estimated without bias at the table's own m, n by (MS_seed + MS_image - MS_res) / (m n). Where
MS_image < MS_res (the image component estimated below 0) the image term is dropped and
V = MS_seed / (m n), which never falls below the seed term's own estimate. The interval is
    mean +- t_{1 - alpha/2, df} sqrt(V),   alpha = 1 - level,
with Satterthwaite's df for that linear combination of mean squares (`satterthwaite_df`), taken
with MS_seed at its one-sided 75 % upper confidence bound (DF_SEED_BOUND; `variance_and_df` says
why) and at least min(m - 1, n - 1): close to m - 1 where the seed term dominates
(t_{0.975, 2} = 4.30 for 3 seeds), close to n - 1 where the image term does.

One seed. The seed variance cannot be estimated: V = var_i(d) / n with n - 1 df, the interval over
images alone (`seed_variance_measured` False): it holds its level only if a rerun with another seed
would give the same differences, which nothing in the data can show.

Power. A two-sided test at `level` has power `power` against a true difference
    MDE = (t_{1 - alpha/2, df} + t_{power, df}) sqrt(V)
(the usual approximation of the noncentral t; 2.80 sqrt(V) at 95 % / 80 % only for df -> inf).
For another design the components (s2_* >= 0) give the expected mean squares, hence V and df at
(m', n'); `sample_size` finds the fewest images (at the sweep's seeds) or seeds (at its images,
at least 2: one seed measures no seed variance) whose MDE reaches an effect.

Everything here takes a complete (seeds, images) float table; callers drop incomplete images.
numpy and scipy.stats only.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

LEVEL = 0.95
POWER = 0.8
# df is computed with MS_seed at this one-sided upper confidence bound (`variance_and_df`): the
# smallest round level that kept simulated coverage >= 0.93 at 2 seeds (0.5 gave 0.90; docs/design.md).
DF_SEED_BOUND = 0.75
# Sample sizes are searched on 2, 4, 8, ... up to this many seeds or images, then refined by
# bisection; an effect no design up to here reaches counts as unreachable (inf).
MAX_UNITS = 2**30


def mean_squares(d: np.ndarray) -> dict[str, float]:
    """Mean squares of a complete (m seeds, n images) table of differences.

    Returns {mean, ms_seed, ms_image, ms_res, m, n}. With one seed, ms_image is var_i(d) (the
    image and residual variance together) and ms_seed, ms_res are NaN; with fewer than two images
    everything but mean, m, n is NaN.
    """
    d = np.atleast_2d(np.asarray(d, dtype=float))
    m, n = d.shape
    out = {"mean": float(d.mean()) if d.size else math.nan, "ms_seed": math.nan,
           "ms_image": math.nan, "ms_res": math.nan, "m": m, "n": n}
    if n < 2:
        return out
    if m < 2:
        out["ms_image"] = float(d[0].var(ddof=1))
        return out
    seed_means, image_means = d.mean(axis=1), d.mean(axis=0)
    resid = d - seed_means[:, None] - image_means[None, :] + d.mean()
    out.update(ms_seed=float(n * seed_means.var(ddof=1)), ms_image=float(m * image_means.var(ddof=1)),
               ms_res=float((resid**2).sum() / ((m - 1) * (n - 1))))
    return out


def components(ms: dict[str, float]) -> dict[str, float]:
    """Variance components {s2_seed, s2_image, s2_res, m, n} from `mean_squares`, each >= 0.

    One seed: s2_seed NaN (not measured), s2_image = var_i(d), s2_res 0. Fewer than two images:
    NaN components."""
    m, n = ms["m"], ms["n"]
    if n < 2:
        return {"s2_seed": math.nan, "s2_image": math.nan, "s2_res": math.nan, "m": m, "n": n}
    if m < 2:
        return {"s2_seed": math.nan, "s2_image": ms["ms_image"], "s2_res": 0.0, "m": m, "n": n}
    res = ms["ms_res"]
    return {"s2_seed": max(0.0, (ms["ms_seed"] - res) / n),
            "s2_image": max(0.0, (ms["ms_image"] - res) / m), "s2_res": res, "m": m, "n": n}


def satterthwaite_df(terms: list[tuple[np.ndarray, float | np.ndarray]]) -> np.ndarray:
    """Satterthwaite's df of sum_k c_k MS_k, given (c_k MS_k, df_k) pairs (arrays broadcast):
    (sum_k c_k MS_k)^2 / sum_k (c_k MS_k)^2 / df_k. A term with df_k = inf contributes 0 to the
    denominator; a sum of zeros has df inf (no variance left to estimate)."""
    total = sum(np.asarray(value, dtype=float) for value, _ in terms)
    denom = sum(np.asarray(value, dtype=float) ** 2 / np.asarray(df, dtype=float)
                for value, df in terms)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, total**2 / np.where(denom > 0, denom, 1.0), np.inf)


def seed_inflation(m: np.ndarray | float, bound: float | None = DF_SEED_BOUND) -> np.ndarray:
    """(m - 1) / chi2_{1 - bound, m - 1}: MS_seed times this is its one-sided `bound` upper
    confidence bound (1 where m < 2 or `bound` is None)."""
    m = np.asarray(m, dtype=float)
    if bound is None:
        return np.ones_like(m)
    with np.errstate(invalid="ignore"):
        return np.where(m >= 2, (m - 1) / sps.chi2.ppf(1 - bound, np.maximum(m - 1, 1)), 1.0)


def _terms(ms_seed: np.ndarray, ms_image: np.ndarray, ms_res: np.ndarray, m: np.ndarray,
           n: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (c_k MS_k, df_k) terms of V (module docstring): m >= 2, MS_seed, MS_image and
    -MS_res over m n, the image pair dropped where MS_image <= MS_res; m == 1, MS_image / n."""
    one = m < 2  # then ms_seed and ms_res are NaN and unused
    keep_image = ms_image > ms_res
    mn = m * n
    with np.errstate(divide="ignore", invalid="ignore"):
        return [(np.where(one, 0.0, ms_seed / mn), np.where(one, np.inf, m - 1)),
                (np.where(one, ms_image / n, np.where(keep_image, ms_image / mn, 0.0)), n - 1),
                (np.where(one | ~keep_image, 0.0, -ms_res / mn),
                 np.where(one, np.inf, (m - 1) * (n - 1)))]


def variance_and_df(ms_seed: np.ndarray | float, ms_image: np.ndarray | float,
                    ms_res: np.ndarray | float, m: np.ndarray | float, n: np.ndarray | float,
                    *, bound: float | None = DF_SEED_BOUND) -> tuple[np.ndarray, np.ndarray]:
    """(V, df) of the grand mean from (expected or observed) mean squares of an m x n design.

    V: m >= 2, (MS_seed + max(MS_image - MS_res, 0)) / (m n); m == 1, MS_image / n (MS_image
    then holds var_i(d)). df: Satterthwaite's over the terms kept, with MS_seed at its one-sided
    `bound` upper confidence bound (`seed_inflation`; None: as observed), at least
    min(m - 1, n - 1) (n - 1 with one seed). Plain Satterthwaite is
    liberal when the seed term dominates with few df: an MS_seed small by chance both narrows the
    interval and raises df (bench/bench_coverage.py, cover_satt: 0.87 at 2 seeds); the bound keeps
    it from raising df. Arguments broadcast (the sample-size search passes arrays)."""
    ms_seed, ms_image, ms_res, m, n = np.broadcast_arrays(*(np.asarray(x, dtype=float) for x in
                                                            (ms_seed, ms_image, ms_res, m, n)))
    v = sum(value for value, _ in _terms(ms_seed, ms_image, ms_res, m, n))
    df = satterthwaite_df(_terms(ms_seed * seed_inflation(m, bound), ms_image, ms_res, m, n))
    # Floor: the smaller df of the two positive terms, which Satterthwaite's df never falls below
    # without the negative -MS_res term; with it, an image term MS_image - MS_res near 0 would
    # drive df towards 0 and the interval to +-infinity (t_{0.3} ~ 1e3).
    floor = np.where(m < 2, n - 1, np.minimum(m - 1, n - 1))
    return v, np.maximum(df, floor)


def multiplier(df: np.ndarray | float, *, level: float = LEVEL,
               power: float | None = None) -> np.ndarray:
    """t_{1 - alpha/2, df} (+ t_{power, df} when `power` is given) at df (inf: the normal)."""
    q = sps.t.ppf(1 - (1 - level) / 2, df)
    return q + sps.t.ppf(power, df) if power is not None else q


def t_interval(d: np.ndarray, *, level: float = LEVEL,
               bound: float | None = DF_SEED_BOUND) -> dict[str, float | bool]:
    """The level-`level` t interval of the mean of a complete (seeds, images) table.

    Returns {diff, ci_low, ci_high, se, df, p_value, n_seeds, n_images, seed_variance_measured}:
    p_value is two-sided for a true difference of 0; with V = 0 (a table of equal differences) the
    interval is the point and p is 0 unless the difference is 0. Fewer than two images: interval,
    se, df and p are NaN.
    """
    ms = mean_squares(d)
    m, n = ms["m"], ms["n"]
    out: dict[str, float | bool] = {"diff": ms["mean"], "ci_low": math.nan, "ci_high": math.nan,
                                    "se": math.nan, "df": math.nan, "p_value": math.nan,
                                    "n_seeds": m, "n_images": n, "seed_variance_measured": m >= 2}
    if n < 2 or m < 1:
        return out
    v, df = (float(x) for x in variance_and_df(ms["ms_seed"], ms["ms_image"], ms["ms_res"], m, n,
                                               bound=bound))
    se = math.sqrt(max(v, 0.0))
    half = float(multiplier(df, level=level)) * se
    if se > 0:
        p = float(2 * sps.t.sf(abs(ms["mean"]) / se, df))
    else:
        p = 0.0 if ms["mean"] != 0 else 1.0
    out.update(ci_low=ms["mean"] - half, ci_high=ms["mean"] + half, se=se, df=df, p_value=p)
    return out


def family_p_value(diff: float, se: float, df: float, m: int) -> float:
    """Two-sided p-value of a Δ for a multiple-comparison family: the interval's t statistic
    referred to t with min(df, m - 1) df (m >= 2; df itself with one seed).

    A correction over K comparisons reads the far tail (Holm's first step: p < alpha / K, 0.0008
    for 66), where an estimated df is least trustworthy: small MS_seed draws both raise t and
    raise df (bench/bench_coverage.py, family). With the seed term's own m - 1 df the test is
    conservative whatever the seed share of V (the normal tail is convex in the variance), at
    every level."""
    if not (math.isfinite(diff) and math.isfinite(se)):
        return math.nan
    if se == 0:
        return 0.0 if diff != 0 else 1.0
    df_family = df if m < 2 else min(df, m - 1)
    return float(2 * sps.t.sf(abs(diff) / se, df_family))


def _expected(c: dict[str, float], m: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(V, df) of an m x n design from components `c` (expected mean squares)."""
    seed = 0.0 if math.isnan(c["s2_seed"]) else c["s2_seed"]
    return variance_and_df(n * seed + c["s2_res"], m * c["s2_image"] + c["s2_res"], c["s2_res"],
                           m, n)


def mde_at(c: dict[str, float], m: np.ndarray | float, n: np.ndarray | float, *,
           level: float = LEVEL, power: float = POWER) -> np.ndarray:
    """The minimum detectable difference of an m x n design with components `c`."""
    v, df = _expected(c, np.asarray(m, dtype=float), np.asarray(n, dtype=float))
    return multiplier(df, level=level, power=power) * np.sqrt(v)


def sample_size(c: dict[str, float], effect: float, *, level: float = LEVEL, power: float = POWER,
                vary: str = "images") -> float:
    """Fewest images (`vary="images"`, seeds as in `c`) or seeds (`vary="seeds"`, at least 2;
    images as in `c`) whose MDE is at most `effect`; inf if none up to MAX_UNITS is, NaN if the
    components are unknown (seeds: with one seed).

    The MDE need not fall monotonically in the images: as they grow, the seed term takes over and
    df falls towards m - 1. The search takes the first point of 2, 4, 8, ... that reaches the
    effect and bisects down from it (where the MDE is still falling)."""
    m, n = c["m"], c["n"]
    if math.isnan(c["s2_image"]) or (vary == "seeds" and math.isnan(c["s2_seed"])):
        return math.nan

    def reaches(units: np.ndarray) -> np.ndarray:
        shape = (m, units) if vary == "images" else (units, n)
        return mde_at(c, *shape, level=level, power=power) <= effect

    grid = 2 ** np.arange(1, int(math.log2(MAX_UNITS)) + 1)
    hits = np.flatnonzero(reaches(grid))
    if not hits.size:
        return math.inf
    high = int(grid[hits[0]])
    low = high // 2 if hits[0] > 0 else 1  # reaches(low) is False (or low is below the minimum)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if bool(reaches(np.array([mid]))[0]) else (mid, high)
    return float(high)
