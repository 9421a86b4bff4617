"""The reference network under every evaluation reading: what `make reference-check` measures.

The paper evaluates "images of size 128x128" without saying how its 512x512 test images became
128 px, nor how its region metrics are defined. `measure_readings` evaluates the base network
(the reference row) once per evaluation mode (`cascade.config.EVAL_MODES`: the inference modes and
the 128 px views of `cascade.data.views`) and scores each prediction set under every region
protocol: one row of the six Table 1 numbers per (mode, protocol). `reports.reference_check`
puts them beside the paper's reference row. One prediction pass per mode, shared by the protocols.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import pandas as pd

from cascade.config import INFERENCE_MODES, TrialConfig
from cascade.errors import UserError
from cascade.metrics import summarize

SIX = ("psnr_entire", "psnr_streak", "psnr_glare", "ssim_entire", "ssim_streak", "ssim_glare")
"""The paper's Table 1 columns (reports.collect.METRICS; a test keeps them equal)."""


def measure_readings(cfg: TrialConfig, modes: Sequence[str], protocols: Sequence[str],
                     eval_size: int) -> pd.DataFrame:
    """One row per (eval_mode, protocol): the reference network's six Table 1 numbers.

    `cfg` is the space's reference cell (its base network, test set, device and SSIM window).
    Columns: eval_mode, eval_size (None for the inference modes), protocol, n_images, SIX,
    predict_s (that mode's prediction time, shared by its protocols), reason (why a reading has
    no numbers, e.g. a crop larger than the test images; None when it has them)."""
    from cascade.data.testset import PairedTestSet, ensure_test_data
    from cascade.device import resolve_device
    from cascade.evaluate import predict, score_views
    from cascade.pretrain import ensure_base
    from cascade.uformer import load_checkpoint

    device = resolve_device(cfg.device)
    model = load_checkpoint(ensure_base(cfg)).to(device)
    testset = PairedTestSet(ensure_test_data(cfg))
    rows: list[dict[str, Any]] = []
    for mode in modes:
        t0 = time.perf_counter()
        view = mode not in INFERENCE_MODES
        try:
            items = list(predict(model, testset, device, cfg.evaluated_base_kind, mode, eval_size))
        except UserError as exc:  # e.g. views larger than the images: this reading only
            rows += [{"eval_mode": mode, "eval_size": eval_size if view else None,
                      "protocol": protocol, "n_images": len(testset), **dict.fromkeys(SIX),
                      "predict_s": None, "reason": str(exc)} for protocol in protocols]
            continue
        predict_s = time.perf_counter() - t0
        for protocol in protocols:
            per_image = score_views(items, mode, protocol=protocol, ssim_window=cfg.ssim_window,
                                    workers=cfg.eval_workers)
            summary = summarize(per_image)
            rows.append({"eval_mode": mode, "eval_size": eval_size if view else None,
                         "protocol": protocol, "n_images": len(testset),
                         **{m: summary.get(m) for m in SIX}, "predict_s": predict_s,
                         "reason": None})
    return pd.DataFrame(rows)
