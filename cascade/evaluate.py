"""python -m cascade.evaluate: region-wise PSNR/SSIM of a folder of predictions.

    python -m cascade.evaluate --input PRED_DIR --gt GT_DIR --mask MASK_DIR \
        [--protocol masked|flare7k] [--ssim-window uniform|gaussian] [--workers N] \
        [--per-image-csv FILE] [--no-progress]

Prints the summary of `cascade.metrics.summarize` as a table; `--per-image-csv` also writes one
row per image x region x metric (columns image, region, metric, value), atomically.
Mistakes a user can fix (missing folder, unpaired file, unreadable image) end with one
`error: ...` line and exit status 2.

The same scoring for a model in memory (what a trial runs, `cascade.train`):
`predict(model, testset, device, base_kind, mode)` and `evaluate_model(model, testset, cfg,
device)`: every test image, whole, in fp32, through `cascade.model.official_output` (the deflared
image as Flare7K's test.py / test_large.py make it for `cfg.base_kind` and `cfg.eval_mode`, for
the reference and the cascade alike), rounded to uint8 and scored by
`cascade.metrics.evaluate_arrays` under `cfg.protocol`, plus LPIPS over the entire image
(`cascade.lpips_score`, convention `cfg.lpips`) when its AlexNet weights are available offline:
per-image rows `region=entire, metric=lpips`, summary key `lpips_entire` (`evaluation_summary`).
Without the weights `lpips_entire` is None and `lpips_reason` says why; the trial still runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cascade.config import INFERENCE_MODES, PROCEDURAL_BASE_KIND, inference_mode
from cascade.errors import UserError, cli_errors, first_line
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
    from cascade.lpips_score import LPIPSScorer

log = logging.getLogger(__name__)


def predict(model: nn.Module, testset: PairedTestSet, device: torch.device,
            base_kind: str = PROCEDURAL_BASE_KIND, mode: str = "native", eval_size: int = 128
            ) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(stem, pred, gt, mask) per scored image; pred = the model's deflared image, (H, W, 3) uint8.

    `model`: a Uformer (reference) or a CascadedFlareRemover (its anchor's output), run in eval
    mode, fp32, whole images through `cascade.model.official_output(model, x, base_kind, mode)`
    (base_kind "flare7k": the input's light sources blended back; "flare7kpp", the default and
    what the procedural base is: as predicted). A trial passes `cfg.evaluated_base_kind`.
    `mode` a view (config.VIEW_MODES): each test image's `eval_size` views
    (`cascade.data.views.views`, stems `<stem>@r<i>c<j>` for tiles) in "native" mode instead.
    """
    from cascade.data.images import to_tensor, to_uint8
    from cascade.data.views import views
    from cascade.model import official_output

    model.eval()
    infer = inference_mode(mode)
    for i in range(len(testset)):
        item = testset[i]
        for view in [item] if mode in INFERENCE_MODES else views(item, mode, eval_size):
            out = official_output(model, to_tensor(view.input, device)[None], base_kind, mode=infer)
            yield view.stem, to_uint8(out[0].float()), view.gt, view.mask  # out: (1, 3, h, w)


# -- LPIPS over the entire image -------------------------------------------------------------------

@dataclass(frozen=True)
class LPIPSSetup:
    """The LPIPS an evaluation uses: a scorer, or None and the reason there is none."""

    scorer: LPIPSScorer | None
    convention: str  # a name of cascade.lpips_score.LPIPS_CONVENTIONS
    reason: str | None = None  # one line, set exactly when scorer is None

    def record(self) -> dict[str, Any]:
        """What a result records about its LPIPS: convention, weights source and fingerprint
        (the identity of the weights that produced the scores), or the reason for none."""
        return {"lpips": self.convention,
                "lpips_weights_source": self.scorer.weights_source if self.scorer else None,
                "lpips_fingerprint": self.scorer.fingerprint if self.scorer else None,
                "lpips_reason": self.reason}


def prepare_lpips(cfg: TrialConfig, device: torch.device | str) -> LPIPSSetup:
    """The LPIPS scorer for `cfg` (built once per trial), or why there is none.

    No lpips package, or no AlexNet weights in the torch hub cache (the embedded default), or
    unusable ones there: no scorer, a reason; the trial goes on. A `lpips_weights` file the user
    named that is missing or not an AlexNet state dict: UserError naming the key.
    """
    from cascade.lpips_score import hub_weights_path

    setup = _prepare_lpips(cfg, device)
    if setup.scorer is None:  # the log names this machine's cache; results stay machine-free
        log.warning("LPIPS will not be computed: %s (torch hub cache here: %s)", setup.reason,
                    hub_weights_path().parent)
    return setup


def _prepare_lpips(cfg: TrialConfig, device: torch.device | str) -> LPIPSSetup:
    from cascade import lpips_score

    if importlib.util.find_spec("lpips") is None:
        return LPIPSSetup(None, cfg.lpips, "the lpips package is not installed "
                                           "(pip install 'lpips>=0.1.4,<0.2')")
    if cfg.lpips_weights is not None:
        try:
            return LPIPSSetup(lpips_score.build_lpips(cfg.lpips_weights, device=device), cfg.lpips)
        except UserError as exc:
            detail = str(exc).removeprefix("LPIPS weights: ")
            raise UserError(f"lpips_weights={cfg.lpips_weights!r}: {detail}") from None
    if not lpips_score.lpips_available(None):
        return LPIPSSetup(None, cfg.lpips, missing_lpips_weights())
    try:
        return LPIPSSetup(lpips_score.build_lpips(None, device=device), cfg.lpips)
    except UserError as exc:  # a broken file in the cache: say so in the results, go on
        return LPIPSSetup(None, cfg.lpips, f"the torch hub cache's AlexNet weights are unusable "
                                           f"({first_line(exc)})")


def missing_lpips_weights() -> str:
    """Why there is no LPIPS without weights, and how to supply them (one line)."""
    from cascade import lpips_score

    return (f"no AlexNet trunk weights offline ({lpips_score.ALEXNET_FILE}, torchvision "
            f"{lpips_score.TORCHVISION_WEIGHTS}): put the file in the torch hub cache "
            "($TORCH_HOME/hub/checkpoints) or set lpips_weights to its path")


def lpips_rows(items: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]], lpips: LPIPSSetup
               ) -> tuple[list[dict[str, Any]], LPIPSSetup]:
    """Per-image rows `{image, region: "entire", metric: "lpips", value}` of (stem, pred, gt, mask)
    items, and the setup actually used (without a scorer, with its reason, when none could run)."""
    from cascade.lpips_score import MIN_SIDE

    if lpips.scorer is None:
        return [], lpips
    small = [stem for stem, _, gt, _ in items if min(gt.shape[:2]) < MIN_SIDE]
    if small:
        reason = f"test image {small[0]} is smaller than {MIN_SIDE} px, AlexNet LPIPS' minimum"
        log.warning("LPIPS not computed: %s", reason)
        return [], LPIPSSetup(None, lpips.convention, reason)
    scores = lpips.scorer.score_many([pred for _, pred, _, _ in items],
                                     [gt for _, _, gt, _ in items], lpips.convention)
    rows = [{"image": str(stem), "region": "entire", "metric": "lpips", "value": score}
            for (stem, *_), score in zip(items, scores)]
    return rows, lpips


def evaluate_model(model: nn.Module, testset: PairedTestSet, cfg: TrialConfig, device: torch.device,
                   lpips: LPIPSSetup | None = None
                   ) -> tuple[pd.DataFrame, list[tuple[str, np.ndarray]]]:
    """Per-image metrics DataFrame and the first n_samples (stem, pred).

    Rows of cascade.metrics (PSNR/SSIM under cfg.protocol), then the LPIPS rows (`lpips_rows`);
    `.attrs` holds protocol, ssim_window and "lpips" (`LPIPSSetup.record()`), which
    `evaluation_summary` reads. `lpips`: a prepared setup (None: `prepare_lpips(cfg, device)`).
    """
    import pandas as pd

    from cascade.data import views

    items = list(predict(model, testset, device, cfg.evaluated_base_kind, cfg.eval_mode,
                         cfg.eval_size))
    per_image = evaluate_arrays(items, protocol=cfg.protocol, ssim_window=cfg.ssim_window,
                                workers=cfg.eval_workers)  # per view; tiles averaged below
    rows, used = lpips_rows(items, lpips if lpips is not None else prepare_lpips(cfg, device))
    if rows:
        attrs = dict(per_image.attrs)
        per_image = pd.concat([per_image, pd.DataFrame(rows, columns=per_image.columns)],
                              ignore_index=True)
        per_image.attrs = attrs
    per_image.attrs["lpips"] = used.record()
    if cfg.eval_mode != "tiles":
        return per_image, [(stem, pred) for stem, pred, _, _ in items[: cfg.n_samples]]
    # Tiles: one row per test image (the mean over its tiles), samples stitched back together.
    samples = []
    for i, stem in enumerate(testset.stems[: cfg.n_samples]):
        h, w = testset[i].gt.shape[:2]
        tiles = {s: pred for s, pred, _, _ in items if views.image_stem(s) == stem}
        samples.append((stem, views.stitch(h, w, cfg.eval_size, tiles)))
    return views.per_image(per_image, cfg.eval_mode), samples


def score_views(items: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]], mode: str, *,
                protocol: str, ssim_window: str = "uniform", workers: int = 1) -> pd.DataFrame:
    """PSNR/SSIM rows (image, region, metric, value) of `predict`'s items under `protocol`, one
    row per test image and region (a tile view's rows averaged per image)."""
    from cascade.data.views import per_image

    per_view = evaluate_arrays(items, protocol=protocol, ssim_window=ssim_window, workers=workers)
    return per_image(per_view, mode)


def evaluation_summary(per_image: pd.DataFrame) -> dict[str, Any]:
    """`cascade.metrics.summarize` plus `lpips_entire` (mean LPIPS over the images; None without
    LPIPS rows) and, from `per_image.attrs["lpips"]`, how it was computed or why not."""
    is_lpips = (per_image["metric"] == "lpips") & (per_image["region"] == "entire")
    values = per_image.loc[is_lpips, "value"].astype(float)
    record = per_image.attrs.get("lpips") or {"lpips": None, "lpips_weights_source": None,
                                              "lpips_fingerprint": None, "lpips_reason": None}
    # summarize reads only its own metrics' rows (PSNR/SSIM), so the LPIPS rows can stay.
    return {**summarize(per_image),
            "lpips_entire": float(values.mean()) if len(values) else None, **record}


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
