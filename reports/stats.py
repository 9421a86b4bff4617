"""Statistics for Table 1: mean ± std over seeds, and paired bootstrap CIs against the reference.

The paper reports single runs whose differences are 0.01-0.3 dB; these functions say how much of
such a difference survives seed noise (std over seeds) and test-image noise (paired bootstrap).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from reports.collect import METRICS

N_RESAMPLES = 2000
LEVEL = 0.95
BOOTSTRAP_SEED = 0


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
    return pd.concat(diffs).groupby(level=0).mean()


def diff_rows(diffs: pd.DataFrame, *, n_resamples: int = N_RESAMPLES, level: float = LEVEL,
               seed: int = BOOTSTRAP_SEED) -> list[dict[str, object]]:
    """One row per metric: diff, ci_low, ci_high, n_images, excludes_zero."""
    rows = []
    for m in METRICS:
        values = diffs[m].to_numpy(dtype=float) if m in diffs else np.array([])
        mean, low, high = paired_bootstrap(values, n_resamples=n_resamples, level=level, seed=seed)
        rows.append({
            "metric": m,
            "diff": mean,
            "ci_low": low,
            "ci_high": high,
            "n_images": int(np.isfinite(values).sum()),
            # NaN CI (too few images) never counts as excluding zero.
            "excludes_zero": bool(low > 0 or high < 0),
        })
    return rows
