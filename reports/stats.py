"""Statistics for Table 1: mean ± std over seeds, differences to the reference with intervals that
include the seed variance, flags a table can support, and how large a difference the sweep could
have detected at all (docs/design.md, "Differences and their intervals").

The paper reports single runs whose differences are 0.01-0.3 dB. A cell's Δ is the mean over its
seeds and the paired test images of (ours - reference); its interval is the t interval of the
seeds x images random-effects model (`reports.random_effects`), so seed-to-seed variation is in
it, with Satterthwaite's df. With one seed the seed variance is not measured: the interval is over
images alone, and such a Δ is flagged only when the caller asks (`flag_on_image_noise`). A table
of differences is one family of comparisons (its distinct rows x metrics); `family_flags` adds
Holm's adjustment over it. The percentile bootstrap over images (`paired_bootstrap`) stays as the
`*_images_only` columns: the interval for these trained weights, not for a rerun of the training.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from reports import random_effects
from reports.collect import METRICS
from reports.random_effects import LEVEL, POWER

N_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
# cascade.metrics.PSNR_CAP_DB (reports import no torch; a test keeps the two equal): a perfect
# image (PSNR = inf) counts as this many dB in differences exactly as in the means of table1.
PSNR_CAP_DB = 100.0
# Effect sizes of the paper's Table 1: |cascade - reference| spans 0.01-0.3 dB (PSNR; one cell
# reaches 0.65) and 0.0001-0.002 (SSIM). The sample sizes reports give are for these two ends.
PAPER_EFFECTS = {"psnr": (0.01, 0.3), "ssim": (0.0001, 0.002)}
DIFF_COLUMNS = ("diff", "ci_low", "ci_high", "se", "df", "p_value", "n_images", "n_seeds",
                "seed_variance_measured", "excludes_zero", "flagged", "ci_low_images_only",
                "ci_high_images_only", "pairing")
"""What `diff_rows` gives each metric, before POWER_COLUMNS (results/README.md, diff.csv)."""
POWER_COLUMNS = ("sd_image", "sd_seed", "mde", "effect_small", "effect_large", "n_images_small",
                 "n_images_large", "n_seeds_small", "n_seeds_large")
"""What `diff_rows` adds to each row from `power_analysis` (diff.csv, the Δ figure)."""
FAMILY_COLUMNS = ("p_holm", "flagged_holm", "family_size")
"""What `family_flags` adds to a whole diff frame."""


def aggregate_seeds(cells: pd.DataFrame) -> dict[str, object]:
    """Summarise the plan cells of one table row (same kind, k, λ; any seeds).

    Args:
        cells: rows of `SweepResults.cells` (columns trial_id, seed, status, shared, METRICS).
    Returns:
        {m: mean over finished trials, m + "_std": sample std (ddof=1; NaN with < 2 seeds),
         "n_seeds": finished trials, "n_planned": planned trials, "status" (done, partial, failed,
         stopped, pending), "seeds", "trial_ids", "shared"}. Means are NaN (never 0) when nothing
         finished.
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
    """Mean of paired differences and its percentile-bootstrap CI, resampling images only.

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

    Images lacking a region have no row for it in `per_image.csv`, hence NaN here. PSNR is capped
    at PSNR_CAP_DB, as `cascade.metrics.summarize` caps it for the means: a perfect image counts
    the same in a Δ as in the table (it used to be dropped from differences).
    """
    if per_image.empty:
        index = pd.MultiIndex.from_arrays([[], []], names=["trial_id", "image"])
        return pd.DataFrame(columns=list(METRICS), index=index, dtype=float)
    column = per_image["metric"].astype(str) + "_" + per_image["region"].astype(str)
    values = per_image["value"].to_numpy(dtype=float)
    values = np.where(per_image["metric"].to_numpy() == "psnr", np.minimum(values, PSNR_CAP_DB),
                      values)
    wide = per_image.assign(column=column, value=values).pivot_table(
        index=["trial_id", "image"], columns="column", values="value", aggfunc="mean")
    return wide.reindex(columns=list(METRICS))


def paired_differences(wide: pd.DataFrame, trials: list[tuple[str, int | None]],
                       references: dict[int | None, str]) -> pd.DataFrame:
    """Per-image differences (trial - its reference), averaged over seeds.

    Args:
        wide: `per_image_wide` output.
        trials: (trial_id, seed) of the finished trials of one row (any kind: cascade, control).
        references: seed -> finished reference trial id. A trial is paired with the reference of
            its own seed; without one, with the per-image mean over all reference trials (the
            pooled reference, then a fixed term common to those trials: exact when the reference
            is deterministic, as an evaluation of one base network on a fixed test set is).
    Returns:
        DataFrame indexed by image stem, columns METRICS; only images present in both. attrs:
        "per_trial", metric -> (trials, images) nested tuples (images in index order), the table
        `diff_rows` takes its interval from; "pairing", "same seed" / "pooled" / "mixed".
    """
    have = set(wide.index.get_level_values("trial_id"))
    refs = {s: t for s, t in references.items() if t in have}
    if not refs:
        return pd.DataFrame(columns=list(METRICS), dtype=float)
    pooled = pd.concat([wide.loc[t] for t in refs.values()]).groupby(level=0).mean()
    diffs, own = [], []
    for trial_id, seed in trials:
        if trial_id not in have:
            continue
        own.append(seed in refs)
        ref = wide.loc[refs[seed]] if seed in refs else pooled
        diffs.append((wide.loc[trial_id] - ref).dropna(how="all"))
    if not diffs:
        return pd.DataFrame(columns=list(METRICS), dtype=float)
    out = pd.concat(diffs).groupby(level=0).mean()
    # Tuples, not frames: pandas compares attrs when it combines frames.
    out.attrs["per_trial"] = {
        m: tuple(tuple(float(v) for v in d.reindex(out.index)[m]) if m in d else
                 (math.nan,) * len(out) for d in diffs) for m in out.columns}
    out.attrs["pairing"] = "same seed" if all(own) else "pooled" if not any(own) else "mixed"
    return out


def complete_table(d: np.ndarray) -> np.ndarray:
    """(seeds, images) -> the complete sub-table: trials without any value dropped, then images
    without a value under every remaining trial."""
    d = np.atleast_2d(np.asarray(d, dtype=float))
    d = d[np.isfinite(d).any(axis=1)]
    return d[:, np.isfinite(d).all(axis=0)] if len(d) else np.empty((0, 0))


def diff_rows(diffs: pd.DataFrame, *, n_resamples: int = N_RESAMPLES, level: float = LEVEL,
              seed: int = BOOTSTRAP_SEED, flag_on_image_noise: bool = False
              ) -> list[dict[str, object]]:
    """One row per metric: "metric", DIFF_COLUMNS, then POWER_COLUMNS.

    `diffs` is a `paired_differences` result; its per-trial table (`attrs["per_trial"]`; without
    it, one seed is assumed) restricted to its complete images gives the Δ (grand mean), the t
    interval, its p-value and the power columns. `excludes_zero`: the interval excludes 0;
    `flagged`: what tables and figures mark, `excludes_zero` where the seed variance was measured
    (2+ seeds), and with one seed only if `flag_on_image_noise`."""
    per_trial = diffs.attrs.get("per_trial")
    rows = []
    for m in METRICS:
        values = diffs[m].to_numpy(dtype=float) if m in diffs else np.array([])
        table = np.array(per_trial[m], dtype=float) if per_trial and m in per_trial else values[None, :]
        table = complete_table(table)
        ci = random_effects.t_interval(table, level=level)
        seed_means = table.mean(axis=0) if table.size else np.array([])  # (images,)
        _, low_i, high_i = paired_bootstrap(seed_means, n_resamples=n_resamples, level=level,
                                            seed=seed)
        # A NaN interval (too few images) never excludes zero.
        excludes = bool(ci["ci_low"] > 0 or ci["ci_high"] < 0)
        rows.append({
            "metric": m, **ci, "excludes_zero": excludes,
            "flagged": excludes and bool(ci["seed_variance_measured"] or flag_on_image_noise),
            "ci_low_images_only": low_i, "ci_high_images_only": high_i,
            "pairing": diffs.attrs.get("pairing", "same seed"),
            **power_analysis(table, PAPER_EFFECTS[m.split("_")[0]], level=level),
        })
    return [{c: r[c] for c in ("metric", *DIFF_COLUMNS, *POWER_COLUMNS)} for r in rows]


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values of (K,) p-values, in their order: the j-th smallest
    becomes max over i <= j of min(1, (K - i + 1) p_(i)). Rejecting where it is below alpha holds
    the family-wise error rate at alpha under any dependence."""
    p = np.asarray(p, dtype=float)
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((p.size - np.arange(p.size)) * p[order]))
    out = np.empty_like(p)
    out[order] = adjusted
    return out


def family_flags(frame: pd.DataFrame, *, level: float = LEVEL,
                 flag_on_image_noise: bool = False) -> pd.DataFrame:
    """A diff frame (`diff_rows` rows of several table rows) with FAMILY_COLUMNS added.

    The family: every comparison the table could flag (an interval, and the seed variance
    measured or `flag_on_image_noise`), each counted once: rows naming the same trials
    (`trial_ids`, as the λ = 0 trial shown under both k) and metric are one comparison. p_holm:
    Holm-adjusted `random_effects.family_p_value` (NaN outside the family); flagged_holm:
    p_holm < 1 - level, the family-wise error rate held at 1 - level; family_size: K."""
    out = frame.copy()
    testable = out["se"].notna() & (out["seed_variance_measured"].astype(bool)
                                    | flag_on_image_noise)
    trials = (out["trial_ids"].astype(str) if "trial_ids" in out
              else pd.Series(out.index.astype(str), index=out.index))
    key = trials + "|" + out["metric"].astype(str)
    first = out[testable].assign(_key=key[testable]).drop_duplicates("_key")
    p = [random_effects.family_p_value(r.diff, r.se, r.df, int(r.n_seeds))
         for r in first.itertuples(index=False)]
    adjusted = dict(zip(first["_key"], holm(np.array(p, dtype=float))))
    out["p_holm"] = [adjusted[k] if t else math.nan for k, t in zip(key, testable)]
    out["flagged_holm"] = out["p_holm"].lt(1 - level)
    out["family_size"] = len(first)
    return out


# -- how much could the sweep see? -----------------------------------------------------------------


def power_analysis(d: np.ndarray, effects: tuple[float, float], *, level: float = LEVEL,
                   power: float = POWER) -> dict[str, float]:
    """POWER_COLUMNS for one cell and metric from its (seeds, images) table of differences.

    sd_image: std over images of the seed-averaged difference; sd_seed: std over seeds of the
    image-averaged difference (NaN with one seed); mde: the minimum detectable difference at the
    sweep's own seeds and images, (t_{1-alpha/2,df} + t_{power,df}) x the interval's se;
    n_images_* / n_seeds_*: the images (at this many seeds) and seeds (at this many images) an
    effect of effect_small / effect_large needs (`random_effects.sample_size`)."""
    d = complete_table(d)
    ms = random_effects.mean_squares(d)
    c = random_effects.components(ms)
    m, n = ms["m"], ms["n"]
    small, large = effects
    mde = math.nan
    if n >= 2:
        v, df = random_effects.variance_and_df(ms["ms_seed"], ms["ms_image"], ms["ms_res"], m, n)
        q = random_effects.multiplier(df, level=level, power=power)
        mde = float(q * math.sqrt(max(float(v), 0.0)))
    out = {
        "sd_image": float(d.mean(axis=0).std(ddof=1)) if n >= 2 else math.nan,
        "sd_seed": float(d.mean(axis=1).std(ddof=1)) if m >= 2 and n >= 1 else math.nan,
        "mde": mde,
        "effect_small": small,
        "effect_large": large,
    }
    for name, effect in (("small", small), ("large", large)):
        for what in ("images", "seeds"):
            out[f"n_{what}_{name}"] = random_effects.sample_size(c, effect, level=level,
                                                                 power=power, vary=what)
    return out


def power_summary(diffs: pd.DataFrame) -> pd.DataFrame:
    """Per metric, over the rows of a diff frame with POWER_COLUMNS (every kind compared with the
    reference): the median MDE over the cells, and the fewest images / seeds any cell needs for the
    paper's effects (what the best-behaved cell needs; the others need more). Rows that measured
    the seed variance only, where there are any (a one-seed row's MDE leaves it out). Columns:
    metric, n_images, n_seeds, seed_variance_measured, mde, effect_small, effect_large,
    n_images_small, n_images_large, n_seeds_small, n_seeds_large."""
    rows = []
    for m in METRICS:
        sub = diffs[(diffs["metric"] == m) & diffs["mde"].notna()] if "mde" in diffs else diffs[:0]
        if "seed_variance_measured" in sub and sub["seed_variance_measured"].astype(bool).any():
            sub = sub[sub["seed_variance_measured"].astype(bool)]
        if sub.empty:
            continue
        sizes = [f"n_{what}_{end}" for what in ("images", "seeds") for end in ("small", "large")]
        n_seeds = int(sub["n_seeds"].max()) if "n_seeds" in sub else 1
        measured = (bool(sub["seed_variance_measured"].astype(bool).any())
                    if "seed_variance_measured" in sub else n_seeds >= 2)
        rows.append({"metric": m, "n_images": int(sub["n_images"].max()), "n_seeds": n_seeds,
                     "seed_variance_measured": measured,
                     "mde": float(sub["mde"].median()),
                     "effect_small": float(sub["effect_small"].iloc[0]),
                     "effect_large": float(sub["effect_large"].iloc[0]),
                     **{c: float(sub[c].min()) for c in sizes}})
    return pd.DataFrame(rows)
