"""Benchmark cascade.metrics against a naive per-region evaluation, and check they agree.

    python bench/bench_metrics.py [--n 100] [--size 512] [--workers 2] [--protocol both]

Images, ground truths and masks are synthetic (numpy, seeded): a random smooth background, a
glare disc, streak lines and a light-source dot, and a prediction that leaves some flare behind.
"naive" is the obvious implementation: single process, one skimage SSIM call per region
(the SSIM of the masked images, or a fresh full SSIM map per region whose region mean is taken).
"ours" is cascade.metrics.evaluate_arrays: one SSIM map per image shared by every region where the
protocol allows it, images spread over `--workers` processes. Its worker pool starts once per
process and is reused; the start-up is timed separately and the "ratio (cold)" column charges it
to each protocol's run, as a single CLI call would pay it.
Prints seconds and the speed ratio side by side and exits non-zero if any value differs by more
than 1e-12 (or a region is present in one and not the other).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from cascade.masks import paint_mask, region_weights
from cascade.metrics import REGION_PROTOCOLS, evaluate_arrays

TOLERANCE = 1e-12


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


def naive_rows(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray, protocol: str) -> dict:
    """Per-region evaluation written the obvious way: one skimage SSIM call per region."""
    out = {
        ("entire", "psnr"): peak_signal_noise_ratio(gt, pred, data_range=255),
        ("entire", "ssim"): structural_similarity(gt, pred, channel_axis=2, data_range=255),
    }
    weights = region_weights(mask)
    regions = REGION_PROTOCOLS[protocol].regions
    for region in regions:
        w = weights[region]
        if w.sum() == 0:
            continue
        gm, pm = gt * w[..., None], pred * w[..., None]
        if protocol == "masked":
            out[region, "psnr"] = peak_signal_noise_ratio(gm, pm, data_range=255)
            out[region, "ssim"] = structural_similarity(gm, pm, channel_axis=2, data_range=255)
        else:
            mse = np.mean((gm - pm) ** 2)
            out[region, "psnr"] = 10 * np.log10(255.0**2 * np.mean(w) / mse)
            if region == "global":
                continue
            _, full = structural_similarity(gt, pred, channel_axis=2, data_range=255, full=True)
            wv = w[3:-3, 3:-3]
            if wv.sum() > 0:
                out[region, "ssim"] = np.sum(wv[..., None] * full[3:-3, 3:-3]) / (3 * wv.sum())
    if protocol == "flare7k" and all((r, "psnr") in out for r in regions):
        out["score", "psnr"] = np.mean([out[r, "psnr"] for r in regions])
    return out


def compare(ours: dict, naive: dict) -> tuple[float, int]:
    """(max |difference|, number of bitwise-equal values); raises if the row sets differ."""
    if set(ours) != set(naive):
        raise AssertionError(f"rows differ: {sorted(set(ours) ^ set(naive))[:5]}")
    diffs = [0.0 if a == b else abs(a - b) for a, b in ((ours[k], naive[k]) for k in ours)]
    return max(diffs, default=0.0), sum(d == 0.0 for d in diffs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="images (default 100)")
    parser.add_argument("--size", type=int, default=512, help="image side (default 512)")
    parser.add_argument("--workers", type=int, default=2, help="processes for ours (default 2)")
    parser.add_argument("--protocol", choices=[*REGION_PROTOCOLS, "both"], default="both")
    args = parser.parse_args()
    items = synthetic_items(args.n, args.size)
    protocols = list(REGION_PROTOCOLS) if args.protocol == "both" else [args.protocol]
    t0 = time.perf_counter()
    evaluate_arrays(items[: max(2, args.workers)], workers=args.workers)  # start the pool
    t_pool = time.perf_counter() - t0
    print(f"{args.n} images {args.size}x{args.size}; ours: workers={args.workers}, "
          f"pool start-up {t_pool:.2f} s (once per process); 1p = ours in one process")
    print(f"{'protocol':<10}{'naive s':>10}{'ours 1p s':>11}{'ours s':>9}{'ratio':>8}"
          f"{'ratio (cold)':>14}{'max|diff|':>12}{'equal':>10}")
    worst = 0.0
    for protocol in protocols:
        t0 = time.perf_counter()
        naive = {(stem, *k): v for stem, p, g, m in items for k, v in naive_rows(p, g, m, protocol).items()}
        t_naive = time.perf_counter() - t0
        t0 = time.perf_counter()
        evaluate_arrays(items, protocol=protocol, workers=0)
        t_single = time.perf_counter() - t0
        t0 = time.perf_counter()
        df = evaluate_arrays(items, protocol=protocol, workers=args.workers)
        t_ours = time.perf_counter() - t0
        ours = {(i, r, m): v for i, r, m, v in df.itertuples(index=False)}
        diff, equal = compare(ours, naive)
        worst = max(worst, diff)
        print(f"{protocol:<10}{t_naive:>10.2f}{t_single:>11.2f}{t_ours:>9.2f}"
              f"{t_naive / t_ours:>7.2f}x{t_naive / (t_ours + t_pool):>13.2f}x{diff:>12.1e}{equal:>5}/{len(ours):<4}")
    if not worst <= TOLERANCE or math.isnan(worst):
        raise SystemExit(f"values differ by {worst:.3e} > {TOLERANCE:g}")


if __name__ == "__main__":
    main()
