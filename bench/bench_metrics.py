"""Benchmark cascade.metrics against a naive per-region skimage evaluation; check they agree.

    python bench/bench_metrics.py [--n 100] [--size 512] [--workers 2] [--protocol both]
                                  [--window uniform] [--repeats 3]

Images, ground truths and masks are synthetic (numpy, seeded): a random smooth background, a
glare disc, streak lines and a light-source dot, and a prediction that leaves some flare behind.
"naive" is the obvious implementation: single process, one skimage SSIM call per region
(the SSIM of the masked images, or a fresh full SSIM map per region whose region mean is taken).
"ours" is cascade.metrics.evaluate_arrays: one exact SSIM map per image (skimage's numbers, bit
for bit, computed ~4x faster), masked-image SSIM only in the tiles where the mask is neither 0 nor
1 over the window, region PSNRs from one integer squared-error map; "ours 1p" runs it in this
process (the same resources as naive), "ours" over `--workers` processes. Its worker pool starts
once per process and is reused; the start-up is timed separately and the "ratio (cold)" column
charges it to each protocol's run, as a single CLI call would pay it. The three are run
`--repeats` times interleaved (naive, ours 1p, ours, naive, ...) and each column is the median.
"CPU ratio 1p" is the ratio of process CPU times of naive and ours 1p: the steadier number on a
loaded machine (other processes stretch wall time, not CPU time).
Prints seconds and the speed ratios side by side, then the largest difference between any of our
values and the naive one; exits non-zero if it exceeds 1e-9 (or a region is present in one and
not the other).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from cascade.masks import paint_mask
from cascade.metrics import REGION_PROTOCOLS, SSIM_WINDOWS, evaluate_arrays
from cascade.metrics_reference import skimage_reference

TOLERANCE = 1e-9


def synthetic_items(n: int, size: int, seed: int = 0) -> list[tuple[str, np.ndarray, ...]]:
    """n (stem, pred, gt, mask) triplets, (size, size, 3) uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    items = []
    for i in range(n):
        # Smooth background: a few random sinusoids per channel, plus pixel noise.
        gt = np.zeros((size, size, 3))
        for c in range(3):
            fy, fx = rng.uniform(0.5, 4, 2) * 2 * np.pi / size
            gt[..., c] = 100 + 60 * np.sin(fy * yy + rng.uniform(0, 6)) * np.cos(fx * xx)
        gt = np.clip(gt + rng.normal(0, 8, gt.shape), 0, 255)
        cy, cx = rng.uniform(0.2, 0.8, 2) * size
        r = np.hypot(yy - cy, xx - cx)
        glare = r < rng.uniform(0.08, 0.25) * size
        angle = rng.uniform(0, np.pi)
        streak = (np.abs((yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle)) < 1.5) & ~glare
        light = r < 0.02 * size + 1
        # The prediction keeps a fading residue of the flare and some noise.
        residue = rng.uniform(10, 60) * np.exp(-r / (0.1 * size)) + 40 * streak
        pred = np.clip(gt + residue[..., None] + rng.normal(0, 4, gt.shape), 0, 255)
        mask = paint_mask(streak, glare, light)
        items.append((f"{i:06d}", pred.astype(np.uint8), gt.astype(np.uint8), mask))
    return items


def naive_rows(
    pred: np.ndarray, gt: np.ndarray, mask: np.ndarray, protocol: str, window: str = "uniform"
) -> dict:
    """Per-region evaluation written the obvious way: one skimage call per region."""
    return skimage_reference(pred, gt, mask, protocol, window)


def compare(ours: dict, naive: dict) -> tuple[float, int]:
    """(max |difference|, number of bitwise-equal values); raises if the row sets differ."""
    if set(ours) != set(naive):
        raise AssertionError(f"rows differ: {sorted(set(ours) ^ set(naive))[:5]}")
    diffs = [0.0 if a == b else abs(a - b) for a, b in ((ours[k], naive[k]) for k in ours)]
    return max(diffs, default=0.0), sum(d == 0.0 for d in diffs)


def naive_values(items: list[tuple], protocol: str, window: str) -> dict:
    """{(stem, region, metric): value} of `naive_rows` over all items."""
    return {
        (stem, *k): v
        for stem, p, g, m in items
        for k, v in naive_rows(p, g, m, protocol, window).items()
    }


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, float, Any]:
    """(wall s, process CPU s, result) of one call of `fn(*args, **kwargs)`."""
    w0, c0 = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return time.perf_counter() - w0, time.process_time() - c0, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="images (default 100)")
    parser.add_argument("--size", type=int, default=512, help="image side (default 512)")
    parser.add_argument("--workers", type=int, default=2, help="processes for ours (default 2)")
    parser.add_argument("--protocol", choices=[*REGION_PROTOCOLS, "both"], default="both")
    parser.add_argument("--window", choices=list(SSIM_WINDOWS), default="uniform",
                        help="SSIM window (default uniform, Flare7K's 7x7 box)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved runs, median reported (default 3)")
    args = parser.parse_args()
    items = synthetic_items(args.n, args.size)
    protocols = list(REGION_PROTOCOLS) if args.protocol == "both" else [args.protocol]
    t0 = time.perf_counter()
    evaluate_arrays(items[: max(2, args.workers)], workers=args.workers)  # start the pool
    t_pool = time.perf_counter() - t0
    print(f"{args.n} images {args.size}x{args.size}, {args.window} SSIM window; ours: "
          f"workers={args.workers}, pool start-up {t_pool:.2f} s (once per process); "
          f"1p = ours in one process; median of {args.repeats} interleaved run(s)")
    print(f"{'protocol':<10}{'naive s':>10}{'ours 1p s':>11}{'ours s':>9}{'ratio 1p':>10}"
          f"{'ratio':>8}{'ratio (cold)':>14}{'CPU ratio 1p':>14}{'max|diff|':>12}{'equal':>10}")
    worst, n_values, entire_equal = 0.0, 0, True
    for protocol in protocols:
        runs: dict[str, list[tuple[float, float]]] = {"naive": [], "single": [], "ours": []}
        for _ in range(args.repeats):
            wall, cpu, naive = timed(naive_values, items, protocol, args.window)
            runs["naive"].append((wall, cpu))
            ours_kw = {"protocol": protocol, "ssim_window": args.window}
            wall, cpu, _ = timed(evaluate_arrays, items, workers=0, **ours_kw)
            runs["single"].append((wall, cpu))
            wall, cpu, df = timed(evaluate_arrays, items, workers=args.workers, **ours_kw)
            runs["ours"].append((wall, cpu))
            ours = {(i, r, m): v for i, r, m, v in df.itertuples(index=False)}
            diff, equal = compare(ours, naive)
            worst = max(worst, diff)
            entire_equal &= all(v == naive[k] for k, v in ours.items() if k[1] == "entire")
        n_values += len(ours)
        wall = {k: statistics.median(t[0] for t in v) for k, v in runs.items()}
        cpu = {k: statistics.median(t[1] for t in v) for k, v in runs.items()}
        print(f"{protocol:<10}{wall['naive']:>10.2f}{wall['single']:>11.2f}{wall['ours']:>9.2f}"
              f"{wall['naive'] / wall['single']:>9.2f}x{wall['naive'] / wall['ours']:>7.2f}x"
              f"{wall['naive'] / (wall['ours'] + t_pool):>13.2f}x"
              f"{cpu['naive'] / cpu['single']:>13.2f}x{diff:>12.1e}{equal:>5}/{len(ours):<4}")
    if not worst <= TOLERANCE or math.isnan(worst):
        raise SystemExit(f"values differ by {worst:.3e} > {TOLERANCE:g}")
    print(f"values agree: max |ours - naive| = {worst:.1e} over {n_values} values per run "
          f"(tolerance {TOLERANCE:g}); entire-image PSNR and SSIM bitwise equal: "
          f"{'yes' if entire_equal else 'no'}")


if __name__ == "__main__":
    main()
