"""python -m cascade.evaluate: region-wise PSNR/SSIM of a folder of predictions.

    python -m cascade.evaluate --input PRED_DIR --gt GT_DIR --mask MASK_DIR \
        [--protocol masked|flare7k] [--ssim-window uniform|gaussian] [--workers N] \
        [--per-image-csv FILE] [--no-progress]

Prints the summary of `cascade.metrics.summarize` as a table; `--per-image-csv` also writes one
row per image x region x metric (columns image, region, metric, value), atomically.
Mistakes a user can fix (missing folder, unpaired file, unreadable image) end with one
`error: ...` line and exit status 2.

The same scoring for a model in memory (what a trial runs, `cascade.train`):
`predict(model, testset, device)` and `evaluate_model(model, testset, cfg, device)`: every test
image, whole (tiled above 512 px), in fp32, through `cascade.model.remove_flare`; channels 0:3
rounded to uint8 and scored by `cascade.metrics.evaluate_arrays` under `cfg.protocol`.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from cascade.errors import UserError, cli_errors
from cascade.io import atomic_path
from cascade.metrics import (
    PSNR_DEFINITIONS,
    REGION_PROTOCOLS,
    SSIM_DEFINITIONS,
    SSIM_WINDOWS,
    evaluate_arrays,
    evaluate_dirs,
    summarize,
    summary_keys,
)

if TYPE_CHECKING:  # torch is imported when a model is evaluated, not for the folder CLI
    import numpy as np
    import pandas as pd
    import torch
    from torch import nn

    from cascade.config import TrialConfig
    from cascade.data.testset import PairedTestSet


def predict(model: nn.Module, testset: PairedTestSet, device: torch.device
            ) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(stem, pred, gt, mask) per test image; pred = the model's deflared image, (H, W, 3) uint8.

    `model`: a Uformer (reference) or a CascadedFlareRemover (its anchor's output), run in eval
    mode, fp32, whole images (tiled above 512 px) through `cascade.model.remove_flare`.
    """
    from cascade.data.images import to_tensor, to_uint8
    from cascade.model import remove_flare

    model.eval()
    for i in range(len(testset)):
        item = testset[i]
        out = remove_flare(model, to_tensor(item.input, device)[None])  # (1, C, H, W)
        yield item.stem, to_uint8(out[0, :3].float()), item.gt, item.mask


def evaluate_model(model: nn.Module, testset: PairedTestSet, cfg: TrialConfig, device: torch.device
                   ) -> tuple[pd.DataFrame, list[tuple[str, np.ndarray]]]:
    """Per-image metrics DataFrame (cascade.metrics) and the first n_samples (stem, pred)."""
    items = list(predict(model, testset, device))
    per_image = evaluate_arrays(items, protocol=cfg.protocol, ssim_window=cfg.ssim_window,
                                workers=cfg.eval_workers)
    return per_image, [(stem, pred) for stem, pred, _, _ in items[: cfg.n_samples]]


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; choices come from the dicts in cascade.metrics."""
    protocols = "; ".join(f"{name}: {p.description}" for name, p in REGION_PROTOCOLS.items())
    parser = argparse.ArgumentParser(
        prog="python -m cascade.evaluate",
        description="PSNR and SSIM of predictions against ground truth over the entire image and "
        "the Flare7K mask regions (streak, glare; global and Score under flare7k). "
        "Files pair by name (exactly, or after a prefix such as gt_ / mask_ / input_).",
    )
    parser.add_argument("--input", required=True, metavar="PRED_DIR", help="predicted images")
    parser.add_argument("--gt", required=True, metavar="GT_DIR", help="ground-truth images")
    parser.add_argument(
        "--mask", required=True, metavar="MASK_DIR", help="Flare7K RGB masks (streak/glare/light)"
    )
    parser.add_argument(
        "--protocol",
        choices=list(REGION_PROTOCOLS),
        default="masked",
        help=f"region metric protocol (default: masked). {protocols}",
    )
    parser.add_argument(
        "--ssim-window",
        choices=list(SSIM_WINDOWS),
        default="uniform",
        help="uniform: 7x7 box as Flare7K's evaluation (default); gaussian: sigma 1.5, 11x11",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        metavar="N",
        help="processes evaluating images in parallel; 0 or 1: in this process (default: 2)",
    )
    parser.add_argument(
        "--per-image-csv",
        metavar="FILE",
        default=None,
        help="also write per-image rows (image, region, metric, value) to FILE",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table of a `summarize` dict: one line per metric, then how it was computed."""
    protocol = REGION_PROTOCOLS[summary["protocol"]]
    lines = [f"{'metric':<14}{'value':>10}"]
    for key in summary_keys(summary["protocol"]):
        value = summary[key]
        text = "n/a" if math.isnan(value) else f"{value:.4f}" if key.startswith("ssim") else f"{value:.2f}"
        lines.append(f"{key:<14}{text:>10}")
    lines += [
        f"{'n_images':<14}{summary['n_images']:>10}",
        f"protocol: {summary['protocol']} (SSIM window: {summary['ssim_window']})",
        f"  region PSNR: {PSNR_DEFINITIONS[protocol.psnr]}",
        f"  region SSIM: {SSIM_DEFINITIONS[protocol.ssim]}",
    ]
    return "\n".join(lines)


@cli_errors
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Evaluate, print the summary table, optionally write the per-image CSV; returns the summary."""
    args = build_parser().parse_args(argv)
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    per_image = evaluate_dirs(
        args.input,
        args.gt,
        args.mask,
        protocol=args.protocol,
        ssim_window=args.ssim_window,
        workers=args.workers,
        progress=not args.no_progress,
    )
    if args.per_image_csv:
        with atomic_path(args.per_image_csv, suffix=".csv") as tmp:
            per_image.to_csv(tmp, index=False)
    summary = summarize(per_image)
    print(format_summary(summary))
    if args.per_image_csv:
        print(f"per-image results: {args.per_image_csv}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
