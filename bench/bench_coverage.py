"""Coverage of the intervals diff.csv reports, on simulated cells whose true Δ is 0 (issue 28).

    python bench/bench_coverage.py [--reps 1000] [--seeds 1 3 5] [--images 32 96]
                                   [--seed-sd 0 0.3] [--image-sd 0.5] [--residual-sd 0.25]
                                   [--family 66] [--family-reps 400]

Each repetition simulates one cell as a sweep records it: a reference per seed (the same per-image
values for every seed, as the evaluation of one base network on a fixed test set gives) and one
trial per seed whose per-image PSNR is reference + a_s + b_i + e_si, with a seed effect a ~ N(0,
seed_sd^2), an image effect b ~ N(0, image_sd^2) shared by the seeds and a seed x image residual
e ~ N(0, residual_sd^2). It goes through the report's own path (reports.stats.paired_differences,
then diff_rows), and counts per design:
- cover: how often the 95 % interval of diff.csv (ci_low, ci_high) contains 0,
- flag: how often the table would mark the cell (`flagged`; 1 seed: never, the default),
- cover_img / flag_img: the same for the percentile bootstrap over images (ci_*_images_only, the
  interval diff.csv reported before issue 28, then starred on),
- cover_satt: the same t interval with plain Satterthwaite df (MS_seed as observed, not at its
  75 % upper bound: `random_effects.variance_and_df(bound=None)`),
- cover_2st: a two-stage bootstrap (seeds, then images, with replacement; percentile), the
  alternative docs/design.md weighs,
- df, half: median Satterthwaite df and median half-width of the interval (dB).
Goal: cover >= 0.93 wherever the seed variance can be estimated (2+ seeds). The Monte-Carlo
standard error of a coverage near 0.95 is sqrt(0.95 x 0.05 / reps) (0.007 at 1000 repetitions).

The family block: `--family` independent null comparisons at 3 seeds and 96 images, per seed SD,
`--family-reps` tables: how often at least one is flagged per comparison, after Holm on the
intervals' p-values, and after Holm as diff.csv's p_holm does it (`random_effects.family_p_value`).
Prints one line per design; exits 0.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reports import random_effects, stats  # noqa: E402
from reports.collect import METRICS  # noqa: E402

GOAL = 0.93
TWO_STAGE_RESAMPLES = 400


def cell_table(rng: np.random.Generator, m: int, n: int, seed_sd: float, image_sd: float,
               residual_sd: float) -> tuple[np.ndarray, np.ndarray]:
    """One simulated cell at Δ = 0: (reference (n,), trials (m, n)) per-image PSNR in dB."""
    ref = 24.0 + rng.normal(0.0, 3.0, n)
    trials = (ref[None, :] + rng.normal(0.0, seed_sd, (m, 1)) + rng.normal(0.0, image_sd, (1, n))
              + rng.normal(0.0, residual_sd, (m, n)))
    return ref, trials


def as_wide(ref: np.ndarray, trials: np.ndarray) -> pd.DataFrame:
    """The cell as `stats.per_image_wide` gives it: rows (trial_id, image), columns METRICS
    (psnr_entire filled, the rest NaN); trials t<s>, references ref<s>, one per seed."""
    m, n = trials.shape
    stems = [f"{i:04d}" for i in range(n)]
    ids = [f"ref{s}" for s in range(m)] + [f"t{s}" for s in range(m)]
    values = np.concatenate([np.tile(ref, m), trials.ravel()])
    index = pd.MultiIndex.from_product([ids, stems], names=["trial_id", "image"])
    wide = pd.DataFrame(np.nan, index=index, columns=list(METRICS))
    wide["psnr_entire"] = values
    return wide


def two_stage_bootstrap(d: np.ndarray, rng: np.random.Generator, *, level: float = 0.95,
                        resamples: int = TWO_STAGE_RESAMPLES) -> tuple[float, float]:
    """Percentile interval of the mean of a (seeds, images) table, resampling seeds with
    replacement, then images with replacement (the same images for every seed drawn)."""
    m, n = d.shape
    seeds = rng.integers(0, m, (resamples, m))
    images = rng.integers(0, n, (resamples, n))
    # (resamples, m, n) -> mean of each resampled table
    means = d[seeds[:, :, None], images[:, None, :]].mean(axis=(1, 2))
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def simulate(m: int, n: int, seed_sd: float, image_sd: float, residual_sd: float, reps: int,
             *, rng_seed: int = 0, n_resamples: int = 500) -> dict[str, float]:
    """Coverage and flag rates of one design over `reps` cells at Δ = 0 (module docstring)."""
    rng = np.random.default_rng([rng_seed, m, n, round(1000 * seed_sd), round(1000 * image_sd),
                                 round(1000 * residual_sd)])
    trials = [(f"t{s}", s) for s in range(m)]
    references = {s: f"ref{s}" for s in range(m)}
    hits = {"cover": 0, "flag": 0, "cover_img": 0, "flag_img": 0, "cover_satt": 0, "cover_2st": 0}
    dfs, halves = [], []
    for _ in range(reps):
        ref, table = cell_table(rng, m, n, seed_sd, image_sd, residual_sd)
        diffs = stats.paired_differences(as_wide(ref, table), trials, references)
        row = stats.diff_rows(diffs, n_resamples=n_resamples, seed=int(rng.integers(2**31)))[0]
        hits["cover"] += row["ci_low"] <= 0 <= row["ci_high"]
        hits["flag"] += row["flagged"]
        hits["cover_img"] += row["ci_low_images_only"] <= 0 <= row["ci_high_images_only"]
        hits["flag_img"] += not row["ci_low_images_only"] <= 0 <= row["ci_high_images_only"]
        plain = random_effects.t_interval(table - ref[None, :], bound=None)
        hits["cover_satt"] += plain["ci_low"] <= 0 <= plain["ci_high"]
        low, high = two_stage_bootstrap(table - ref[None, :], rng)
        hits["cover_2st"] += low <= 0 <= high
        dfs.append(row["df"])
        halves.append((row["ci_high"] - row["ci_low"]) / 2)
    out = {k: v / reps for k, v in hits.items()}
    out.update(df=float(np.median(dfs)), half=float(np.median(halves)))
    return out


def family_rates(k: int, reps: int, *, m: int = 3, n: int = 96, seed_sd: float = 0.3,
                 image_sd: float = 0.5, residual_sd: float = 0.25, rng_seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """P(at least one of k independent null comparisons is flagged): per comparison (the
    interval's p-value), Holm on those p-values, and Holm on `random_effects.family_p_value`
    (what diff.csv's p_holm uses)."""
    rng = np.random.default_rng([rng_seed, k, m, n])
    any_raw = any_naive = any_holm = 0
    alpha = 1 - level
    for _ in range(reps):
        p, p_family = np.empty(k), np.empty(k)
        for j in range(k):
            ref, table = cell_table(rng, m, n, seed_sd, image_sd, residual_sd)
            ci = random_effects.t_interval(table - ref[None, :], level=level)
            p[j] = ci["p_value"]
            p_family[j] = random_effects.family_p_value(ci["diff"], ci["se"], ci["df"], m)
        any_raw += bool((p < alpha).any())
        any_naive += bool((stats.holm(p) < alpha).any())
        any_holm += bool((stats.holm(p_family) < alpha).any())
    return any_raw / reps, any_naive / reps, any_holm / reps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=1000, help="cells per design")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--images", type=int, nargs="+", default=[32, 96])
    parser.add_argument("--seed-sd", type=float, nargs="+", default=[0.0, 0.3])
    parser.add_argument("--image-sd", type=float, nargs="+", default=[0.5])
    parser.add_argument("--residual-sd", type=float, nargs="+", default=[0.25])
    parser.add_argument("--resamples", type=int, default=500,
                        help="bootstrap resamples of the images-only interval")
    parser.add_argument("--family", type=int, default=66, help="comparisons per table (0: skip)")
    parser.add_argument("--family-reps", type=int, default=400)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    print(f"coverage at true Δ = 0, {args.reps} cells per design (95 % intervals; MC se ~"
          f"{np.sqrt(0.95 * 0.05 / args.reps):.3f})")
    print(f"{'seeds':>5} {'images':>6} {'seed_sd':>7} {'img_sd':>6} {'res_sd':>6} | {'cover':>5} "
          f"{'flag':>5} | {'cover_img':>9} {'flag_img':>8} | {'cover_satt':>10} {'cover_2st':>9} | {'df':>6} "
          f"{'half':>6}")
    unmet = []
    for m, n, s_sd, i_sd, r_sd in itertools.product(args.seeds, args.images, args.seed_sd,
                                                    args.image_sd, args.residual_sd):
        r = simulate(m, n, s_sd, i_sd, r_sd, args.reps, n_resamples=args.resamples)
        note = "  (1 seed: seed variance not measured, never flagged)" if m == 1 else ""
        if m >= 2 and r["cover"] < GOAL:
            unmet.append((m, n, s_sd))
        print(f"{m:>5} {n:>6} {s_sd:>7.2f} {i_sd:>6.2f} {r_sd:>6.2f} | {r['cover']:>5.3f} "
              f"{r['flag']:>5.3f} | {r['cover_img']:>9.3f} {r['flag_img']:>8.3f} | "
              f"{r['cover_satt']:>10.3f} {r['cover_2st']:>9.3f} | {r['df']:>6.1f} {r['half']:>6.3f}"
              f"{note}")
    verdict = "met" if not unmet else "NOT met for " + ", ".join(map(str, unmet))
    print(f"goal cover >= {GOAL} with 2+ seeds: {verdict}")
    if args.family:
        for s_sd in args.seed_sd:
            raw, naive, holm = family_rates(args.family, args.family_reps, seed_sd=s_sd,
                                            image_sd=args.image_sd[0],
                                            residual_sd=args.residual_sd[0])
            print(f"family: {args.family} null comparisons, 3 seeds, 96 images, seed sd {s_sd:g}, "
                  f"{args.family_reps} tables: P(any flagged) per comparison {raw:.3f}; Holm on "
                  f"the interval's p {naive:.3f}; Holm on p_holm's p (min(df, m-1)) {holm:.3f}")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
