"""Region metrics the obvious way: each row of `cascade.metrics.evaluate_pair` computed from its
definition with one scikit-image call per region.

The reference that the fast paths of cascade.metrics are tested against (tests/test_metrics.py)
and benchmarked against (bench/bench_metrics.py): slow, written independently of them (its own
SSIM window settings, its own border and masking), so a shared mistake is unlikely.
"""

from __future__ import annotations

import math

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from cascade.masks import region_weights
from cascade.metrics import REGION_PROTOCOLS

SKIMAGE_WINDOW = {
    "uniform": {},  # skimage's defaults: 7x7 box, sample covariance
    "gaussian": {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False},
}


def skimage_reference(
    pred: np.ndarray, gt: np.ndarray, mask: np.ndarray, protocol: str, window: str
) -> dict[tuple[str, str], float]:
    """Every row of `evaluate_pair`, computed directly from the definitions with skimage."""
    kw = {"channel_axis": 2, "data_range": 255, **SKIMAGE_WINDOW[window]}
    out = {
        ("entire", "psnr"): peak_signal_noise_ratio(gt, pred, data_range=255),
        ("entire", "ssim"): structural_similarity(gt, pred, **kw),
    }
    pad = {"uniform": 3, "gaussian": 5}[window]
    valid = np.zeros(gt.shape[:2], bool)
    valid[pad:-pad, pad:-pad] = True
    regions = REGION_PROTOCOLS[protocol].regions
    for region in regions:
        w = region_weights(mask)[region]
        if w.sum() == 0:
            continue
        gm, pm = gt * w[..., None], pred * w[..., None]
        if protocol == "masked":
            out[region, "psnr"] = peak_signal_noise_ratio(gm, pm, data_range=255)
            out[region, "ssim"] = structural_similarity(gm, pm, **kw)
            continue
        mse = np.mean((gm - pm) ** 2)
        out[region, "psnr"] = math.inf if mse == 0 else 10 * np.log10(255.0**2 * np.mean(w) / mse)
        if region != "global" and (w * valid).sum() > 0:
            _, full = structural_similarity(gt, pred, full=True, **kw)
            wv = w * valid
            out[region, "ssim"] = (wv[..., None] * full).sum() / (3 * wv.sum())
    if protocol == "flare7k" and all((r, "psnr") in out for r in regions):
        out["score", "psnr"] = np.mean([out[r, "psnr"] for r in regions])
    return out
