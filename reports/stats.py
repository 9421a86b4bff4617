"""Statistics for Table 1: mean ± std over seeds, paired bootstrap CIs against the reference, and
how large a difference the sweep could have detected at all.

The paper reports single runs whose differences are 0.01-0.3 dB; these functions say how much of
such a difference survives seed noise (std over seeds) and test-image noise (paired bootstrap),
and, from the same paired differences, the minimum detectable difference (`power_analysis`).

Minimum detectable difference (MDE). The paired difference of one cell to the reference on image
i under seed s is modelled as d_si = mu + a_s + b_i + e_si (seed effect a ~ (0, s2_seed), image
effect b ~ (0, s2_image), residual e ~ (0, s2_res)): the two-way random-effects model of a
seeds x images design. From the mean squares of the m x n table of d (complete images only),
MS_seed = n var_s(mean_i d), MS_image = m var_i(mean_s d), MS_res the interaction,
s2_res = MS_res, s2_seed = max(0, (MS_seed - MS_res) / n), s2_image = max(0, (MS_image - MS_res) /
m), and the variance of the mean difference with m' seeds and n' images is
    V(m', n') = s2_seed / m' + s2_image / n' + s2_res / (m' n')
(at the sweep's own m, n: (MS_seed + MS_image - MS_res) / (m n), unbiased). A two-sided test at
the CI's level (alpha = 1 - LEVEL) has power POWER against a true difference
    MDE = (z_{1 - alpha/2} + z_POWER) * sqrt(V(m, n))      (2.80 sqrt(V) for 95 % and 80 %),
and an effect Delta needs the smallest n' (or m') with (z_{1 - alpha/2} + z_POWER)^2 V <= Delta^2,
which is infinite when the other factor's term alone is larger. With one seed the seed variance
cannot be estimated: V = var_i(d) / n (what the bootstrap CI sees), and seeds needed is NaN.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pandas as pd

from reports.collect import METRICS

N_RESAMPLES = 2000
LEVEL = 0.95
BOOTSTRAP_SEED = 0
POWER = 0.8
# Effect sizes of the paper's Table 1: |cascade - reference| spans 0.01-0.3 dB (PSNR; one cell
# reaches 0.65) and 0.0001-0.002 (SSIM). The sample sizes reports give are for these two ends.
PAPER_EFFECTS = {"psnr": (0.01, 0.3), "ssim": (0.0001, 0.002)}
POWER_COLUMNS = ("sd_image", "sd_seed", "mde", "effect_small", "effect_large", "n_images_small",
                 "n_images_large", "n_seeds_small", "n_seeds_large")
"""What `diff_rows` adds to each row from `power_analysis` (diff.csv, the Δ figure)."""


def aggregate_seeds(cells: pd.DataFrame) -> dict[str, object]:
    """Summarise the plan cells of one table row (same kind, k, λ; any seeds).

    Args:
        cells: rows of `SweepResults.cells` (columns trial_id, seed, status, shared, METRICS).
    Returns:
        {m: mean over finished trials, m + "_std": sample std (ddof=1; NaN with < 2 seeds),
         "n_seeds": finished trials, "n_planned": planned trials, "status" (done, partial, failed, stopped, pending), "seeds", "trial_ids",
         "shared"}. Means are NaN (never 0) when nothing finished.
    """
    trials = cells.drop_duplicates("trial_id")
    done = trials[trials["status"] == "done"]
    out: dict[str, object] = {}
    for m in METRICS:
        values = done[m].to_numpy(dtype=float)
        values = values[np.isfinite(values)]
        out[m] = float(values.mean()) if values.size else np.nan
        out[m + "_std"] = float(values.std(ddof=1)) if values.size >= 2 else np.nan
    n_done, n_planned = len(done), len(trials)
    if n_done == n_planned:
        status = "done"
    elif n_done:
        status = "partial"
    else:
        # Say the most definite reason nothing finished: failed > stopped early > not yet run.
        seen = set(trials["status"])
        status = "failed" if "failed" in seen else "stopped" if "stopped" in seen else "pending"
    out.update(
        n_seeds=n_done,
        n_planned=n_planned,
        status=status,
        seeds=";".join(str(s) for s in sorted(done["seed"].dropna().astype(int).unique())),
        trial_ids=";".join(trials["trial_id"]),
        shared=bool(cells["shared"].any()),
    )
    return out


def paired_bootstrap(diffs: np.ndarray, *, n_resamples: int = N_RESAMPLES, level: float = LEVEL,
                     seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """Mean of paired differences and its percentile-bootstrap CI, resampling images.

    Args:
        diffs: (n_images,) per-image differences (ours - reference); NaNs are ignored.
    Returns:
        (mean, ci_low, ci_high); the CI is NaN for fewer than two images, everything NaN for none.
    """
    d = np.asarray(diffs, dtype=float)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return np.nan, np.nan, np.nan
    if d.size < 2:
        return float(d.mean()), np.nan, np.nan
    rng = np.random.default_rng(seed)
    # (n_resamples, n) image indices drawn with replacement: one row per bootstrap replicate.
    idx = rng.integers(0, d.size, size=(n_resamples, d.size))
    means = d[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(d.mean()), float(low), float(high)


def per_image_wide(per_image: pd.DataFrame) -> pd.DataFrame:
    """Long per-image rows -> one row per (trial_id, image), columns METRICS (NaN if absent).

    Images lacking a region have no row for it in `per_image.csv`, hence NaN here.
    """
    if per_image.empty:
        index = pd.MultiIndex.from_arrays([[], []], names=["trial_id", "image"])
        return pd.DataFrame(columns=list(METRICS), index=index, dtype=float)
    column = per_image["metric"].astype(str) + "_" + per_image["region"].astype(str)
    wide = per_image.assign(column=column).pivot_table(
        index=["trial_id", "image"], columns="column", values="value", aggfunc="mean")
    return wide.reindex(columns=list(METRICS))


def paired_differences(wide: pd.DataFrame, trials: list[tuple[str, int | None]],
                       references: dict[int | None, str]) -> pd.DataFrame:
    """Per-image differences (trial - its reference), averaged over seeds.

    Args:
        wide: `per_image_wide` output.
        trials: (trial_id, seed) of the finished trials of one cell.
        references: seed -> finished reference trial id. A trial is paired with the reference of
            its own seed; without one, with the per-image mean over all reference trials.
    Returns:
        DataFrame indexed by image stem, columns METRICS; only images present in both.
    """
    have = set(wide.index.get_level_values("trial_id"))
    refs = {s: t for s, t in references.items() if t in have}
    if not refs:
        return pd.DataFrame(columns=list(METRICS), dtype=float)
    pooled = pd.concat([wide.loc[t] for t in refs.values()]).groupby(level=0).mean()
    diffs = []
    for trial_id, seed in trials:
        if trial_id not in have:
            continue
        ref = wide.loc[refs[seed]] if seed in refs else pooled
        diffs.append((wide.loc[trial_id] - ref).dropna(how="all"))
    if not diffs:
        return pd.DataFrame(columns=list(METRICS), dtype=float)
    # Average over seeds per image first, so the bootstrap resamples images, not (image, seed).
    out = pd.concat(diffs).groupby(level=0).mean()
    # The per-trial differences stay attached for `power_analysis` (the seed variance): metric ->
    # (trials, images) as nested tuples, images in `out.index` order (tuples, not frames: pandas
    # compares attrs when it combines frames).
    out.attrs["per_trial"] = {
        m: tuple(tuple(float(v) for v in d.reindex(out.index)[m]) if m in d else
                 (math.nan,) * len(out) for d in diffs) for m in out.columns}
    return out


def diff_rows(diffs: pd.DataFrame, *, n_resamples: int = N_RESAMPLES, level: float = LEVEL,
              seed: int = BOOTSTRAP_SEED) -> list[dict[str, object]]:
    """One row per metric: diff, ci_low, ci_high, n_images, excludes_zero, then POWER_COLUMNS.

    `diffs` is a `paired_differences` result; its per-trial table (`attrs["per_trial"]`, when
    present) gives the seed variance of `power_analysis`, else one seed is assumed."""
    per_trial = diffs.attrs.get("per_trial")
    rows = []
    for m in METRICS:
        values = diffs[m].to_numpy(dtype=float) if m in diffs else np.array([])
        mean, low, high = paired_bootstrap(values, n_resamples=n_resamples, level=level, seed=seed)
        # (seeds, images): one row per trial when the per-trial differences are attached
        table = np.array(per_trial[m], dtype=float) if per_trial and m in per_trial else values[None, :]
        rows.append({
            "metric": m,
            "diff": mean,
            "ci_low": low,
            "ci_high": high,
            "n_images": int(np.isfinite(values).sum()),
            # NaN CI (too few images) never counts as excluding zero.
            "excludes_zero": bool(low > 0 or high < 0),
            **power_analysis(table, PAPER_EFFECTS[m.split("_")[0]], level=level),
        })
    return rows


# -- how much could the sweep see? -----------------------------------------------------------------


def z_sum(level: float = LEVEL, power: float = POWER) -> float:
    """z_{1 - alpha/2} + z_power with alpha = 1 - level: 2.8016 for 95 % and 80 %."""
    normal = NormalDist()
    return normal.inv_cdf(1 - (1 - level) / 2) + normal.inv_cdf(power)


def variance_components(d: np.ndarray) -> dict[str, float]:
    """Two-way random-effects variance components of a (seeds, images) table of differences.

    Images with a NaN under any seed are dropped. Returns {s2_seed, s2_image, s2_res, m, n}
    (module docstring); with one seed s2_seed is NaN and s2_image holds var_i(d) (the image and
    residual variance together), s2_res 0. Fewer than two images: everything NaN.
    """
    d = np.atleast_2d(np.asarray(d, dtype=float))
    d = d[:, np.isfinite(d).all(axis=0)]
    m, n = d.shape
    if n < 2:
        return {"s2_seed": math.nan, "s2_image": math.nan, "s2_res": math.nan, "m": m, "n": n}
    if m < 2:
        return {"s2_seed": math.nan, "s2_image": float(d[0].var(ddof=1)), "s2_res": 0.0,
                "m": m, "n": n}
    seed_means, image_means, grand = d.mean(axis=1), d.mean(axis=0), d.mean()
    ms_seed = n * seed_means.var(ddof=1)
    ms_image = m * image_means.var(ddof=1)
    resid = d - seed_means[:, None] - image_means[None, :] + grand
    ms_res = float((resid**2).sum() / ((m - 1) * (n - 1)))
    return {"s2_seed": max(0.0, (ms_seed - ms_res) / n), "s2_image": max(0.0, (ms_image - ms_res) / m),
            "s2_res": ms_res, "m": m, "n": n}


def mean_variance(c: dict[str, float], m: float, n: float) -> float:
    """V(m, n): variance of the mean difference over m seeds and n images (components `c`)."""
    seed = 0.0 if math.isnan(c["s2_seed"]) else c["s2_seed"]
    return seed / m + c["s2_image"] / n + c["s2_res"] / (m * n)


def sample_size(c: dict[str, float], effect: float, *, level: float = LEVEL, power: float = POWER,
                vary: str = "images") -> float:
    """Smallest number of images (`vary="images"`, seeds as in `c`) or seeds (`vary="seeds"`,
    images as in `c`) at which `effect` is detected with `power`; inf if it never is, NaN if the
    components are unknown (seeds: with one seed)."""
    budget = (effect / z_sum(level, power)) ** 2  # the largest V that still detects `effect`
    m, n = c["m"], c["n"]
    if vary == "images":
        if math.isnan(c["s2_image"]):
            return math.nan
        fixed = 0.0 if math.isnan(c["s2_seed"]) else c["s2_seed"] / m
        per_unit = c["s2_image"] + c["s2_res"] / m
    else:
        if math.isnan(c["s2_seed"]):
            return math.nan
        fixed = c["s2_image"] / n
        per_unit = c["s2_seed"] + c["s2_res"] / n
    if per_unit == 0.0:
        return 1.0 if fixed <= budget else math.inf
    if budget <= fixed:
        return math.inf
    return float(math.ceil(per_unit / (budget - fixed) - 1e-9))


def power_analysis(d: np.ndarray, effects: tuple[float, float], *, level: float = LEVEL,
                   power: float = POWER) -> dict[str, float]:
    """POWER_COLUMNS for one cell and metric from its (seeds, images) table of differences.

    sd_image: std over images of the seed-averaged difference; sd_seed: std over seeds of the
    image-averaged difference (NaN with one seed); mde: the minimum detectable difference at the
    sweep's own seeds and images; n_images_* / n_seeds_*: the images (at this many seeds) and
    seeds (at this many images) an effect of effect_small / effect_large needs."""
    d = np.atleast_2d(np.asarray(d, dtype=float))
    d = d[:, np.isfinite(d).all(axis=0)]
    c = variance_components(d)
    m, n = c["m"], c["n"]
    small, large = effects
    out = {
        "sd_image": float(d.mean(axis=0).std(ddof=1)) if n >= 2 else math.nan,
        "sd_seed": float(d.mean(axis=1).std(ddof=1)) if m >= 2 and n >= 1 else math.nan,
        "mde": z_sum(level, power) * math.sqrt(mean_variance(c, m, n)) if n >= 2 else math.nan,
        "effect_small": small,
        "effect_large": large,
    }
    for name, effect in (("small", small), ("large", large)):
        out[f"n_images_{name}"] = sample_size(c, effect, level=level, power=power, vary="images")
        out[f"n_seeds_{name}"] = sample_size(c, effect, level=level, power=power, vary="seeds")
    return out


def power_summary(diffs: pd.DataFrame) -> pd.DataFrame:
    """Per metric, over the cascade rows of a diff frame with POWER_COLUMNS: the median MDE over
    the cells, and the fewest images / seeds any cell needs for the paper's effects (what the
    best-behaved cell needs; the others need more). Columns: metric, n_images, n_seeds, mde,
    effect_small, effect_large, n_images_small, n_images_large, n_seeds_small, n_seeds_large."""
    rows = []
    for m in METRICS:
        sub = diffs[(diffs["metric"] == m) & diffs["mde"].notna()] if "mde" in diffs else diffs[:0]
        if sub.empty:
            continue
        sizes = [f"n_{what}_{end}" for what in ("images", "seeds") for end in ("small", "large")]
        rows.append({"metric": m, "n_images": int(sub["n_images"].max()),
                     "n_seeds": int(sub["n_seeds"].max()) if "n_seeds" in sub else 1,
                     "mde": float(sub["mde"].median()),
                     "effect_small": float(sub["effect_small"].iloc[0]),
                     "effect_large": float(sub["effect_large"].iloc[0]),
                     **{c: float(sub[c].min()) for c in sizes}})
    return pd.DataFrame(rows)
