"""Region-wise PSNR / SSIM (entire image, streak, glare) under named protocols, per image.

The paper's Table 1 reports PSNR and SSIM over the entire image, the streak region and the glare
region without defining the region versions, so every region metric here belongs to a named
protocol in `REGION_PROTOCOLS`, and the protocol is recorded with every result.

Conventions shared by every function below:
- Images are (H, W, 3) uint8 RGB in [0, 255]; all arithmetic is float64 (or exact integer
  sums); `data_range = 255`.
- Regions come from a Flare7K RGB mask through `cascade.masks.region_weights`: soft weights
  w in [0, 1] per pixel (streak = (R - G)/255, glare = G/255, global = 1 - B/255), applied to all
  three channels alike.
- No border crop, no colour conversion: PSNR is over every pixel and all three channels.
- "entire" is the unmasked image: PSNR and SSIM exactly as scikit-image computes them,
  `peak_signal_noise_ratio(gt, pred, data_range=255)` and
  `structural_similarity(gt, pred, channel_axis=2, data_range=255, **SSIM_WINDOWS[window])`.
- A region whose weights sum to zero in an image is absent there: it gets no row (it is skipped
  when averaging, never counted as zero).
- A perfect match gives PSNR = +inf (MSE = 0); per-image rows keep it, `summarize` caps it
  (see `PSNR_CAP_DB`).

Region PSNR definitions (`PSNR_DEFINITIONS`), with MSE_w = mean over H x W x 3 of
(gt*w - pred*w)^2:
- "masked_images": PSNR of the masked images, no area normalisation:
  10 log10(255^2 / MSE_w). Small regions have small MSE_w, hence high PSNR.
- "area_normalised": Flare7K's G-PSNR / S-PSNR: 10 log10(255^2 * a / MSE_w) with a = mean(w)
  (the region's area fraction of *this* image; Flare7K hard-codes 512*512 pixels, which is the
  same for 512 x 512 images), i.e. the mean squared error inside the region.

Region SSIM definitions (`SSIM_DEFINITIONS`):
- "masked_images": SSIM of the masked images, `structural_similarity(gt*w, pred*w, ...)`: the mean
  of the SSIM map over the whole image minus the (win_size - 1)//2 border, channels averaged.
  Pixels whose window lies outside the region compare 0 with 0 and score exactly 1, so this
  rewards small regions just like "masked_images" PSNR.
- "region_mean": the w-weighted mean of the *unmasked* SSIM map S = structural_similarity(gt,
  pred, full=True)[1] (H, W, 3) over the region:
  sum_{p in V, c} w_p S_pc / (3 * sum_{p in V} w_p), V = pixels at least (win_size - 1)//2 from
  every edge (where skimage itself says the map is valid). One map serves every region. A region
  that lies entirely in that border has no SSIM row.

The definitions say what the numbers are; the code gets them faster than calling skimage once
per region (tests compare every value with those calls to 1e-9, the entire-image values bit for
bit): one SSIM map per image, computed exactly as skimage does but only where its mean reads it
(`_ssim_exact`); masked-image SSIM only in the tiles where w is neither 0 nor 1 across the window
(`_masked_ssims`: elsewhere it is exactly 1, or the unmasked map); region PSNRs from one integer
squared-error map. `bench/bench_metrics.py` measures the difference (docs/performance.md).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy.ndimage import correlate1d, uniform_filter1d

from cascade.errors import UserError
from cascade.io import list_images, pair_images

if TYPE_CHECKING:  # pandas is imported lazily: pool workers never need it
    import pandas as pd

PathLike = str | os.PathLike

DATA_RANGE = 255.0

# skimage keyword arguments per SSIM window. "uniform" is skimage's default (7 x 7 box, sample
# covariance), which is what Flare7K's evaluate.py uses; "gaussian" is Wang et al. (2004).
SSIM_WINDOWS: dict[str, dict[str, Any]] = {
    "uniform": {"win_size": 7, "gaussian_weights": False, "use_sample_covariance": True},
    "gaussian": {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False},
}

PSNR_DEFINITIONS: dict[str, str] = {
    "masked_images": "10*log10(255^2 / mean((gt*w - pred*w)^2)); no area normalisation",
    "area_normalised": "10*log10(255^2 * mean(w) / mean((gt*w - pred*w)^2)); Flare7K G-/S-PSNR",
}

SSIM_DEFINITIONS: dict[str, str] = {
    "masked_images": "skimage SSIM of gt*w vs pred*w (mean map over the whole valid area)",
    "region_mean": "w-weighted mean of the unmasked skimage SSIM map over the valid area",
}


@dataclass(frozen=True)
class RegionProtocol:
    """How region metrics are computed; `psnr`/`ssim` name entries of *_DEFINITIONS."""

    regions: tuple[str, ...]  # flare regions with rows, besides "entire"
    psnr: str
    ssim: str
    score: bool  # Flare7K's Score = mean(G-PSNR, S-PSNR, Global-PSNR)
    description: str


REGION_PROTOCOLS: dict[str, RegionProtocol] = {
    # One reading of the paper: it would explain its streak > glare > entire ordering for both
    # PSNR and SSIM (masked-out pixels match trivially).
    "masked": RegionProtocol(
        regions=("streak", "glare"),
        psnr="masked_images",
        ssim="masked_images",
        score=False,
        description="PSNR and SSIM of the masked images (pred*w vs gt*w), no area normalisation",
    ),
    # Flare7K / MIPI 2023 evaluation; Flare7K defines no region SSIM, so the in-region mean of
    # the SSIM map is used, the SSIM counterpart of area normalisation.
    "flare7k": RegionProtocol(
        regions=("streak", "glare", "global"),
        psnr="area_normalised",
        ssim="region_mean",
        score=True,
        description="Flare7K G-/S-/Global-PSNR (masked MSE / mean(w)) and Score; "
        "region SSIM = in-region mean of the SSIM map",
    ),
}

# Summary keys that get an SSIM row per image (Flare7K reports no Global-SSIM).
_SSIM_REGIONS = ("entire", "streak", "glare")

# `summarize` caps PSNR at this value before averaging, so one perfect image (PSNR = inf) cannot
# make a mean infinite and improving an image never lowers the mean. Real results are far below.
PSNR_CAP_DB = 100.0


def _check_choice(name: str, value: str, choices: Mapping[str, Any]) -> None:
    if value not in choices:
        raise UserError(f"unknown {name} {value!r}; expected one of {', '.join(choices)}")


# skimage's SSIM constants (K1 = 0.01, K2 = 0.03 of the data range) and its Gaussian truncation
# (3.5 sigma: 11 taps at sigma = 1.5).
_C1 = (0.01 * DATA_RANGE) ** 2
_C2 = (0.03 * DATA_RANGE) ** 2
_GAUSSIAN_TRUNCATE = 3.5


def ssim_pad(ssim_window: str) -> int:
    """Width of the border where skimage's SSIM map is not valid: (win_size - 1) // 2."""
    _check_choice("ssim_window", ssim_window, SSIM_WINDOWS)
    kw = SSIM_WINDOWS[ssim_window]
    if kw["gaussian_weights"]:
        # skimage: radius = int(truncate * sigma + 0.5), as scipy.ndimage rounds it
        return int(_GAUSSIAN_TRUNCATE * kw["sigma"] + 0.5)
    return (kw["win_size"] - 1) // 2


def _check_images(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray, ssim_window: str) -> None:
    for name, image in (("pred", pred), ("gt", gt), ("mask", mask)):
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
            kind = image.dtype if isinstance(image, np.ndarray) else type(image).__name__
            raise UserError(f"{name} must be a uint8 numpy array, got {kind}")
        if image.ndim != 3 or image.shape[2] != 3:
            raise UserError(f"{name} must be (H, W, 3), got shape {image.shape}")
    if pred.shape != gt.shape or mask.shape != gt.shape:
        raise UserError(f"shapes differ: pred {pred.shape}, gt {gt.shape}, mask {mask.shape}")
    side = 2 * ssim_pad(ssim_window) + 1
    if min(gt.shape[:2]) < side:
        raise UserError(
            f"image is {gt.shape[0]}x{gt.shape[1]}; {ssim_window} SSIM needs >= {side}x{side}"
        )


def psnr_from_mse(mse: float, scale: float = 1.0) -> float:
    """10 log10(255^2 * scale / mse) in dB; +inf when mse == 0 (a perfect match)."""
    if mse == 0.0:
        return math.inf
    return float(10.0 * np.log10(DATA_RANGE**2 * scale / mse))


# ---------------------------------------------------------------------------------------------
# SSIM. skimage's structural_similarity stays the reference (the tests compare with it); these
# compute its numbers faster: one exact SSIM map per image, and masked-image SSIM only where the
# mask varies.


@dataclass(frozen=True)
class _Window:
    """An SSIM window as skimage applies it."""

    pad: int  # radius; the map is valid at least this far from every edge
    taps: np.ndarray | None  # 1-D Gaussian taps (2 pad + 1,); None for the uniform box
    cov_norm: float  # N / (N - 1) with sample covariance, else 1


def _window(ssim_window: str) -> _Window:
    kw = SSIM_WINDOWS[ssim_window]
    pad = ssim_pad(ssim_window)
    n = (2 * pad + 1) ** 2  # pixels in the 2-D window
    taps = None
    if kw["gaussian_weights"]:
        # scipy's _gaussian_kernel1d, which skimage reaches through gaussian_filter. It is exactly
        # symmetric, so correlate1d's reversal of it changes nothing.
        x = np.arange(-pad, pad + 1)
        taps = np.exp(-0.5 / (kw["sigma"] * kw["sigma"]) * x**2)
        taps = taps / taps.sum()
    return _Window(pad, taps, n / (n - 1) if kw["use_sample_covariance"] else 1.0)


def _ssim_from_moments(
    ux: np.ndarray,
    uy: np.ndarray,
    uxx: np.ndarray,
    uyy: np.ndarray,
    uxy: np.ndarray,
    cov_norm: float,
    out: np.ndarray,
) -> np.ndarray:
    """skimage's SSIM expression on filtered moments (same shapes), rounding for rounding.

    Each operation is one of skimage's, in its order; only exact rewrites are used (x * 2 is
    exact, so 2 * (cov_norm * t) == (2 * cov_norm) * t, and ux * uy serves both of its uses).
    uxx, uyy and uxy are overwritten.
    """
    uxuy = ux * uy
    uxux = ux * ux  # skimage's ux**2 is this product
    uyuy = uy * uy
    vx = np.subtract(uxx, uxux, out=uxx)
    vy = np.subtract(uyy, uyuy, out=uyy)
    vxy = np.subtract(uxy, uxuy, out=uxy)
    if cov_norm != 1.0:  # skimage multiplies by 1.0 too, which changes nothing
        vx *= cov_norm
        vy *= cov_norm
    vxy *= 2.0 * cov_norm
    a1 = np.multiply(uxuy, 2.0, out=uxuy)
    a1 += _C1  # A1 = 2 ux uy + C1
    a2 = np.add(vxy, _C2, out=vxy)  # A2 = 2 vxy + C2
    b1 = np.add(uxux, uyuy, out=uxux)
    b1 += _C1  # B1 = ux^2 + uy^2 + C1
    b2 = np.add(vx, vy, out=vx)
    b2 += _C2  # B2 = vx + vy + C2
    np.multiply(a1, a2, out=a1)
    np.multiply(b1, b2, out=b1)
    return np.divide(a1, b1, out=out)  # (A1 A2) / (B1 B2)


_BLOCK_ROWS = 32  # map rows per block: a block's moment planes stay in the CPU cache


def _ssim_exact(gt: np.ndarray, pred: np.ndarray, ssim_window: str) -> tuple[float, np.ndarray]:
    """structural_similarity(gt, pred, channel_axis=2, data_range=255, **SSIM_WINDOWS[window]).

    Bit for bit the same mean, and the same map where it is valid, 3-5x faster (see
    docs/performance.md): skimage runs ten scipy passes per channel over the whole image, half of
    them along the strided axis, then 28 whole-image array operations; this computes only the map
    rows its mean reads, in blocks that stay in cache:
    - first pass (along H) only for map rows pad..H-pad, which never reach skimage's padding.
      Uniform: sums of 7 integers are exact in any order, so int32 sums / 7 are scipy's running
      sums / 7. Gaussian: scipy's symmetric correlate1d order (centre tap, then
      (x[-j] + x[j]) * w[j] from the outermost pair in), vectorised over rows.
    - second pass (along W) by scipy itself (uniform_filter1d / correlate1d, reflect), on blocks
      of rows holding all five moments.
    - `_ssim_from_moments`, then skimage's per-channel means over the same (H', W') view.

    Args:
        gt, pred: (H, W, 3) uint8, H and W >= the window.
    Returns:
        (mean SSIM, map (3, H, W) float64; NaN within `pad` of an edge).
    """
    win = _window(ssim_window)
    r, taps = win.pad, win.taps
    size = 2 * r + 1
    h, w, _ = gt.shape
    hv = h - 2 * r
    full = np.full((3, h, w), np.nan)
    rows = min(_BLOCK_ROWS, hv)
    # moment planes per block (gt, pred, gt^2, pred^2, gt*pred) over the rows the block reads
    planes = np.empty((5, rows + 2 * r, w), np.int32 if taps is None else np.float64)
    sums = np.empty((5, rows, w), np.int32)
    first = np.empty((5, rows, w))
    second = np.empty((5, rows, w))
    means = np.empty(3)
    for c in range(3):
        x, y = gt[:, :, c], pred[:, :, c]
        for h0 in range(0, hv, rows):
            n = min(rows, hv - h0)
            q = planes[:, : n + 2 * r]
            q[0], q[1] = x[h0 : h0 + n + 2 * r], y[h0 : h0 + n + 2 * r]
            np.multiply(q[0], q[0], out=q[2])
            np.multiply(q[1], q[1], out=q[3])
            np.multiply(q[0], q[1], out=q[4])
            u = first[:, :n]
            if taps is None:
                s = np.add(q[:, :n], q[:, 1 : n + 1], out=sums[:, :n])
                for i in range(2, size):
                    s += q[:, i : i + n]
                np.divide(s, size, out=u)  # scipy divides its (exact) running sum by the size
                f = uniform_filter1d(u, size, axis=-1, output=second[:, :n])
            else:
                np.multiply(q[:, r : r + n], taps[r], out=u)
                t = second[:, :n]  # scratch until the second pass writes it
                for j in range(r, 0, -1):
                    np.add(q[:, r - j : r - j + n], q[:, r + j : r + j + n], out=t)
                    t *= taps[r - j]
                    u += t
                f = correlate1d(u, taps, axis=-1, output=second[:, :n])
            _ssim_from_moments(*f, win.cov_norm, out=full[c, r + h0 : r + h0 + n])
        # skimage: crop(S, pad).mean() per channel, a view of this shape and these strides
        means[c] = full[c, r : h - r, r : w - r].mean(dtype=np.float64)
    full[:, :, :r] = np.nan
    full[:, :, w - r :] = np.nan
    return float(means.mean()), full


def ssim_map(
    gt: np.ndarray, pred: np.ndarray, ssim_window: str = "uniform"
) -> tuple[float, np.ndarray]:
    """skimage SSIM of two (H, W, 3) uint8 images in [0, 255] and its map.

    Returns:
        (mean SSIM exactly as skimage returns it, map (H, W, 3) float64). The map equals skimage's
        at least `ssim_pad(ssim_window)` pixels from every edge, where skimage says it is valid,
        and is NaN closer to an edge.
    """
    _check_choice("ssim_window", ssim_window, SSIM_WINDOWS)
    value, full = _ssim_exact(gt, pred, ssim_window)
    return value, full.transpose(1, 2, 0)


def region_mean_ssim(full: np.ndarray, w: np.ndarray, pad: int) -> float | None:
    """w-weighted mean of an SSIM map over its valid area, channels averaged.

    Args:
        full: (H, W, 3) SSIM map. w: (H, W) weights >= 0 (their scale cancels). pad: invalid
            border width.
    Returns:
        sum(w * S) / (3 * sum(w)) over pixels >= pad from every edge; None if w is 0 there.
    """
    h, wd = w.shape
    valid = (slice(pad, h - pad), slice(pad, wd - pad))
    return _weighted_mean(full[valid].sum(axis=2), w[valid], channels=full.shape[2])


def _weighted_mean(channel_sum: np.ndarray, w: np.ndarray, channels: int) -> float | None:
    """sum(w * channel_sum) / (channels * sum(w)) over (H', W'); None if w is 0 throughout."""
    total = float(w.sum())
    if total == 0.0:
        return None
    return float(np.einsum("ij,ij->", w, channel_sum) / (channels * total))


# Masked-image SSIM is computed in tiles of this many map pixels a side (16 to 20 measured
# fastest on 512 x 512 Flare7K-like masks: smaller tiles skip more, larger ones waste less on
# the window's reach), a batch of tiles at a time (a batch's planes, ~2 MB, stay in cache).
_TILE = 16
_TILE_BATCH = 32


def _masked_ssims(
    gt: np.ndarray, pred: np.ndarray, levels: list[np.ndarray], full: np.ndarray, ssim_window: str
) -> list[float]:
    """skimage SSIM of gt*w vs pred*w (the masked images) for each w = level / 255.

    Computed only where it has to be: a pixel whose window has w = 0 throughout compares 0 with 0
    and scores exactly 1; one whose window has w = 1 throughout sees the unmasked images, so it
    scores what `full` holds there. The map is split into tiles; tiles with any other pixel are
    computed from the masked images as skimage builds them (float64 gt * w), with valid-mode
    filters (sums of 7 x 7, or the Gaussian taps). The mean differs from skimage's by rounding
    only (~1e-15; its filters are running sums, these are direct sums).

    Args:
        gt, pred: (H, W, 3) uint8. levels: (H, W) uint8 region weights x 255.
        full: `_ssim_exact`'s map (3, H, W) of gt vs pred.
    Returns:
        One mean SSIM per level map, channels averaged as skimage does.
    """
    win = _window(ssim_window)
    r, t = win.pad, _TILE
    h, w, _ = gt.shape
    hv, wv = h - 2 * r, w - 2 * r
    na, nb = -(-hv // t), -(-wv // t)  # tiles over the valid map
    side = t + 2 * r  # a tile's input: its pixels plus the window's reach
    hp, wp = na * t + 2 * r, nb * t + 2 * r
    # pixels of the valid map per tile (the last row/column of tiles may be partial)
    npix = np.minimum(t, hv - t * np.arange(na))[:, None] * np.minimum(t, wv - t * np.arange(nb))
    tile_sums: np.ndarray | None = None  # (na, nb): the unmasked map summed over tile and RGB
    padded: tuple[np.ndarray, np.ndarray] | None = None
    out = []
    for level in levels:
        lp = np.zeros((hp, wp), np.uint8)
        lp[:h, :w] = level
        lmax = _tile_reduce(np.maximum, lp, t, side, (na, nb))
        lp[h:], lp[:, w:] = 255, 255  # neutral for the minimum
        lmin = _tile_reduce(np.minimum, lp, t, side, (na, nb))
        lp[h:], lp[:, w:] = 0, 0
        outside, inside = lmax == 0, lmin == 255
        total = 3.0 * float(npix[outside].sum())
        if inside.any():
            if tile_sums is None:
                grid = np.zeros((na * t, nb * t))
                np.sum(full[:, r : h - r, r : w - r], axis=0, out=grid[:hv, :wv])
                tile_sums = grid.reshape(na, t, nb, t).sum(axis=(1, 3))
            total += float(tile_sums[inside].sum())
        ia, ib = np.nonzero(~outside & ~inside)
        if len(ia) and padded is None:
            padded = (np.zeros((hp, wp, 3), np.uint8), np.zeros((hp, wp, 3), np.uint8))
            padded[0][:h, :w], padded[1][:h, :w] = gt, pred
        for s in range(0, len(ia), _TILE_BATCH):
            a, b = ia[s : s + _TILE_BATCH] * t, ib[s : s + _TILE_BATCH] * t
            total += _tile_ssim_sum(padded, lp, a, b, win, (hv, wv))
        out.append(total / (3.0 * hv * wv))
    return out


def _tile_reduce(
    op: np.ufunc, image: np.ndarray, t: int, side: int, tiles: tuple[int, int]
) -> np.ndarray:
    """op (np.maximum / np.minimum) over each window image[a t : a t + side, b t : b t + side].

    Separable, over strided slices: side row slices, then side column slices, instead of a
    reduction over an (na, nb, side, side) window view (several times slower in numpy).
    Returns (na, nb).
    """
    na, nb = tiles
    rows = image[0 : (na - 1) * t + 1 : t].copy()  # (na, W_p): rows a t
    for i in range(1, side):
        op(rows, image[i : i + (na - 1) * t + 1 : t], out=rows)
    out = rows[:, 0 : (nb - 1) * t + 1 : t].copy()
    for j in range(1, side):
        op(out, rows[:, j : j + (nb - 1) * t + 1 : t], out=out)
    return out


def _tile_ssim_sum(
    padded: tuple[np.ndarray, np.ndarray],
    level: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    win: _Window,
    valid: tuple[int, int],
) -> float:
    """Sum over RGB and valid pixels of the masked-image SSIM map of tiles at input rows a, cols b.

    padded: zero-padded (H_p, W_p, 3) uint8 gt and pred; level: (H_p, W_p) uint8 weights x 255;
    valid: (H', W') size of the valid map, whose pixel (i, j) is image pixel (i + pad, j + pad).
    """
    r, t = win.pad, _TILE
    side = t + 2 * r
    n = len(a)
    wt = sliding_window_view(level, (side, side))[a, b][:, None] / 255.0  # (n, 1, side, side)
    q = np.empty((5, n, 3, side, side))
    for i, image in enumerate(padded):
        np.multiply(sliding_window_view(image, (side, side), axis=(0, 1))[a, b], wt, out=q[i])
    np.multiply(q[0], q[0], out=q[2])
    np.multiply(q[1], q[1], out=q[3])
    np.multiply(q[0], q[1], out=q[4])
    if win.taps is None:  # 7 x 7 means: sums over rows, then columns, / 49
        size = 2 * r + 1
        rows = q[..., 0:t, :] + q[..., 1 : t + 1, :]
        for i in range(2, size):
            rows += q[..., i : i + t, :]
        m = rows[..., 0:t] + rows[..., 1 : t + 1]
        for i in range(2, size):
            m += rows[..., i : i + t]
        m /= size * size
    else:
        taps = win.taps
        rows = q[..., r : r + t, :] * taps[r]
        for j in range(r, 0, -1):
            rows += (q[..., r - j : r - j + t, :] + q[..., r + j : r + j + t, :]) * taps[r - j]
        m = rows[..., r : r + t] * taps[r]
        for j in range(r, 0, -1):
            m += (rows[..., r - j : r - j + t] + rows[..., r + j : r + j + t]) * taps[r - j]
    ssim = _ssim_from_moments(*m, win.cov_norm, out=np.empty((n, 3, t, t)))
    # tiles of the last row/column reach past the valid map: those pixels do not count
    inside = ((a[:, None] + np.arange(t)) < valid[0])[:, :, None] & (
        (b[:, None] + np.arange(t)) < valid[1]
    )[:, None, :]
    return float(np.einsum("nctu,ntu->", ssim, inside.astype(np.float64)))


def _region_levels(mask: np.ndarray) -> dict[str, np.ndarray]:
    """`cascade.masks.region_weights` x 255 as integers: (H, W) uint8 per region, w = level / 255.

    Integer weights keep the region PSNR sums exact and let tiles be classified by w = 0 / w = 1
    exactly; a test checks they match region_weights.
    """
    red, green, blue = mask[..., 0], mask[..., 1], mask[..., 2]
    return {
        "streak": np.clip(red.astype(np.int16) - green, 0, 255).astype(np.uint8),
        "glare": np.ascontiguousarray(green),
        "global": 255 - blue,
    }


def evaluate_pair(
    pred: np.ndarray,
    gt: np.ndarray,
    mask: np.ndarray,
    protocol: str = "masked",
    ssim_window: str = "uniform",
) -> list[dict[str, Any]]:
    """PSNR and SSIM of one prediction, entire image and per region, under `protocol`.

    Args:
        pred, gt: (H, W, 3) uint8 RGB in [0, 255], same shape, H and W >= the SSIM window.
        mask: (H, W, 3) uint8 Flare7K mask (see cascade.masks).
        protocol: a key of REGION_PROTOCOLS ("masked" or "flare7k"); definitions in the module
            docstring.
        ssim_window: a key of SSIM_WINDOWS ("uniform" 7x7 box or "gaussian" sigma 1.5).
    Returns:
        Rows {"region", "metric", "value"}: ("entire", "psnr"), ("entire", "ssim"), then per
        present region ("streak", "glare"; + "global" under flare7k) a "psnr" row and, for
        streak/glare, an "ssim" row; under flare7k a ("score", "psnr") row = mean of the glare,
        streak and global PSNR when all three are present. Absent regions give no rows.
    Raises:
        UserError: wrong dtype/shape, images smaller than the SSIM window, unknown names.
    """
    _check_choice("protocol", protocol, REGION_PROTOCOLS)
    _check_images(pred, gt, mask, ssim_window)
    proto = REGION_PROTOCOLS[protocol]
    pad = ssim_pad(ssim_window)
    h, w, _ = gt.shape
    entire_ssim, full = _ssim_exact(gt, pred, ssim_window)
    # Squared error per pixel summed over RGB: integers, so every sum of it below is exact and the
    # entire-image MSE equals skimage's float64 mean bit for bit.
    sq = gt.astype(np.int32) - pred
    sq *= sq
    err = sq[..., 0] + sq[..., 1]
    err += sq[..., 2]
    err = err.astype(np.int64)  # (H, W), <= 3 * 255^2; int64 for the sums below
    n = 3 * h * w
    rows = [
        {"region": "entire", "metric": "psnr", "value": psnr_from_mse(int(err.sum()) / n)},
        {"region": "entire", "metric": "ssim", "value": entire_ssim},
    ]

    levels = {r: k for r, k in _region_levels(mask).items() if r in proto.regions and k.any()}
    ssim_by_region: dict[str, float | None] = {}
    ssim_regions = [r for r in levels if r in _SSIM_REGIONS]
    if proto.ssim == "masked_images":
        found = _masked_ssims(gt, pred, [levels[r] for r in ssim_regions], full, ssim_window)
        ssim_by_region = dict(zip(ssim_regions, found))
    elif ssim_regions:  # region_mean: one map serves every region (region_mean_ssim, shared sum)
        valid = (slice(pad, h - pad), slice(pad, w - pad))
        channel_sum = full[(slice(None), *valid)].sum(axis=0)  # (H', W')
        for region in ssim_regions:
            ssim_by_region[region] = _weighted_mean(channel_sum, levels[region][valid], channels=3)

    psnr_by_region: dict[str, float] = {}
    for region in proto.regions:  # absent regions (all-zero weights) are skipped, not zero
        if region not in levels:
            continue
        k = levels[region].astype(np.int64)
        # mean((gt*w - pred*w)^2) with w = k / 255: sum(k^2 err) / 255^2, exact in int64
        mse = float(np.dot((k * k).ravel(), err.ravel())) / (DATA_RANGE**2 * n)
        scale = float(k.sum()) / (DATA_RANGE * h * w) if proto.psnr == "area_normalised" else 1.0
        psnr_by_region[region] = psnr_from_mse(mse, scale)
        rows.append({"region": region, "metric": "psnr", "value": psnr_by_region[region]})
        if ssim_by_region.get(region) is not None:
            rows.append({"region": region, "metric": "ssim", "value": ssim_by_region[region]})

    if proto.score and all(r in psnr_by_region for r in ("glare", "streak", "global")):
        score = (psnr_by_region["glare"] + psnr_by_region["streak"] + psnr_by_region["global"]) / 3
        rows.append({"region": "score", "metric": "psnr", "value": score})
    return rows


def summary_keys(protocol: str) -> tuple[str, ...]:
    """The metric keys `summarize` returns for `protocol` (Table 1's columns first)."""
    _check_choice("protocol", protocol, REGION_PROTOCOLS)
    keys = [f"{m}_{r}" for m in ("psnr", "ssim") for r in ("entire", "streak", "glare")]
    if REGION_PROTOCOLS[protocol].score:
        keys += ["psnr_global", "score"]
    return tuple(keys)


# ---------------------------------------------------------------------------------------------
# Many images: per-image DataFrames, in parallel, and their summary.

COLUMNS = ["image", "region", "metric", "value"]

# One evaluation job: (stem, pred, gt, mask, protocol, ssim_window); pred/gt/mask are uint8
# arrays, or file paths that the worker reads itself (no image pickling between processes).
_Job = tuple[str, "np.ndarray | Path", "np.ndarray | Path", "np.ndarray | Path", str, str]


def _evaluate_job(job: _Job) -> list[dict[str, Any]]:
    """Run evaluate_pair on one job, tagging rows with the image and errors with its name."""
    stem, pred, gt, mask, protocol, ssim_window = job
    if not isinstance(pred, np.ndarray):
        from cascade.data.images import read_rgb  # lazy: it imports torch

        pred, gt, mask = read_rgb(pred), read_rgb(gt), read_rgb(mask)
    try:
        rows = evaluate_pair(pred, gt, mask, protocol=protocol, ssim_window=ssim_window)
    except UserError as exc:
        raise UserError(f"image {stem!r}: {exc}") from None
    return [{"image": stem, **row} for row in rows]


# Worker pools by size, started on first use and kept until exit: spawning workers (each imports
# numpy/scipy/skimage, and re-imports the caller's __main__) costs seconds, and the trainer
# evaluates many times per trial.
_POOLS: dict[int, Any] = {}
_POOLS_PID = os.getpid()  # a forked child must not use its parent's pools


def _pool(workers: int) -> Any:
    global _POOLS_PID
    if _POOLS_PID != os.getpid():
        _POOLS.clear()
        _POOLS_PID = os.getpid()
    pool = _POOLS.get(workers)
    if pool is None:
        import atexit
        import multiprocessing

        if not _POOLS:
            atexit.register(close_worker_pools)
        # spawn, not fork: callers (the trainer, Ray workers) hold threads and CUDA contexts.
        pool = _POOLS[workers] = multiprocessing.get_context("spawn").Pool(workers)
    return pool


def close_worker_pools() -> None:
    """Stop the worker processes kept by `evaluate_arrays` / `evaluate_dirs` (also run at exit)."""
    while _POOLS:
        _, pool = _POOLS.popitem()
        pool.terminate()
        pool.join()


def _run_jobs(jobs: list[_Job], workers: int, progress: bool) -> list[dict[str, Any]]:
    """Evaluate jobs in order, in-process (workers <= 1) or over a spawn process pool."""
    from tqdm import tqdm

    bar = dict(total=len(jobs), desc="evaluate", unit="img", disable=not progress, leave=False)
    if workers <= 1 or len(jobs) <= 1:
        return [row for job in tqdm(jobs, **bar) for row in _evaluate_job(job)]
    # ~4 chunks per worker: few round trips, still balanced when images differ in cost.
    chunksize = max(1, math.ceil(len(jobs) / (4 * workers)))
    results = list(tqdm(_pool(workers).imap(_evaluate_job, jobs, chunksize=chunksize), **bar))
    return [row for rows in results for row in rows]


def _frame(rows: list[dict[str, Any]], protocol: str, ssim_window: str) -> pd.DataFrame:
    import pandas as pd

    df = pd.DataFrame(rows, columns=COLUMNS)
    df["value"] = df["value"].astype(np.float64)
    # attrs travel with the frame so `summarize` can record how the numbers were made.
    df.attrs.update(protocol=protocol, ssim_window=ssim_window)
    return df


def evaluate_arrays(
    items: Iterable[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
    protocol: str = "masked",
    ssim_window: str = "uniform",
    workers: int = 2,
    progress: bool = False,
) -> pd.DataFrame:
    """Per-image metrics for in-memory images (the trainer's path: no disk round trip).

    Args:
        items: iterable of (stem, pred, gt, mask); pred/gt/mask (H, W, 3) uint8 as in
            `evaluate_pair`; stems unique.
        protocol, ssim_window: as in `evaluate_pair`.
        workers: processes; 0 or 1 evaluates in this process. Pools (spawn start method) are
            started on first use and reused until `close_worker_pools` or exit.
        progress: show a tqdm bar on stderr.
    Returns:
        DataFrame with columns image, region, metric, value (one row per image x region x
        metric, images in input order); `.attrs` holds protocol and ssim_window.
    """
    _check_choice("protocol", protocol, REGION_PROTOCOLS)
    _check_choice("ssim_window", ssim_window, SSIM_WINDOWS)
    jobs: list[_Job] = []
    seen: set[str] = set()
    for stem, pred, gt, mask in items:
        if stem in seen:
            raise UserError(f"duplicate image name {stem!r}")
        seen.add(stem)
        jobs.append((str(stem), pred, gt, mask, protocol, ssim_window))
    return _frame(_run_jobs(jobs, workers, progress), protocol, ssim_window)


def pair_files(
    pred_dir: PathLike, gt_dir: PathLike, mask_dir: PathLike
) -> list[tuple[str, Path, Path, Path]]:
    """(key, pred, gt, mask) paths paired by file stem, sorted by key.

    The pairing rule is `cascade.io.pair_images` (shared with the test sets): stems match
    exactly, or once a folder-style prefix is dropped (Flare7K's `gt_000000` / `mask_000000`,
    ours `input_000000`, ...). Anything unpaired is a UserError naming it.
    """
    folders = {"pred": pred_dir, "gt": gt_dir, "mask": mask_dir}
    keyed = pair_images({name: list_images(folder) for name, folder in folders.items()})
    keys = set(keyed["gt"])
    for name in ("pred", "mask"):
        missing = sorted(keys - set(keyed[name]))
        extra = sorted(set(keyed[name]) - keys)
        if missing:
            raise UserError(
                f"{folders[name]}: no {name} image for gt {keyed['gt'][missing[0]].name}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        if extra:
            raise UserError(
                f"{folders['gt']}: no gt image for {name} {keyed[name][extra[0]].name}"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            )
    return [(k, keyed["pred"][k], keyed["gt"][k], keyed["mask"][k]) for k in sorted(keys)]


def evaluate_dirs(
    pred_dir: PathLike,
    gt_dir: PathLike,
    mask_dir: PathLike,
    protocol: str = "masked",
    ssim_window: str = "uniform",
    workers: int = 2,
    progress: bool = True,
) -> pd.DataFrame:
    """Per-image metrics for folders of predictions, ground truths and Flare7K masks.

    Files pair by stem (see `pair_files`); each worker reads its own images with
    `cascade.data.images.read_rgb`. Returns the DataFrame of `evaluate_arrays`, `image` = the
    pairing key.
    """
    _check_choice("protocol", protocol, REGION_PROTOCOLS)
    _check_choice("ssim_window", ssim_window, SSIM_WINDOWS)
    jobs: list[_Job] = [
        (key, pred, gt, mask, protocol, ssim_window)
        for key, pred, gt, mask in pair_files(pred_dir, gt_dir, mask_dir)
    ]
    return _frame(_run_jobs(jobs, workers, progress), protocol, ssim_window)


def summarize(per_image: pd.DataFrame, protocol: str | None = None) -> dict[str, Any]:
    """Mean of each region metric over the images that have the region (Table 1's numbers).

    Args:
        per_image: DataFrame with columns image, region, metric, value (from `evaluate_*` or
            read back from per_image.csv).
        protocol: the protocol that made it; defaults to `per_image.attrs["protocol"]`.
    Returns:
        {"psnr_entire", "psnr_streak", "psnr_glare", "ssim_entire", "ssim_streak", "ssim_glare"
        (+ "psnr_global", "score" under flare7k): float, "n_images": int, "protocol": str,
        "ssim_window": str | None}. PSNR values are capped at PSNR_CAP_DB (only +inf, a perfect
        match, ever reaches it) before averaging. A region no image has gives NaN. "score" is
        Flare7K's: the mean of the glare, streak and global PSNR *means* (not of per-image scores).
    """
    protocol = protocol if protocol is not None else per_image.attrs.get("protocol")
    if protocol is None:
        raise UserError("summarize: per-image results do not record their protocol; pass protocol=")
    _check_choice("protocol", protocol, REGION_PROTOCOLS)
    missing = [c for c in COLUMNS if c not in per_image.columns]
    if missing:
        raise UserError(f"summarize: per-image results lack column(s) {', '.join(missing)}")
    values = per_image["value"].astype(np.float64).to_numpy()
    is_psnr = (per_image["metric"] == "psnr").to_numpy()
    values = np.where(is_psnr, np.minimum(values, PSNR_CAP_DB), values)
    means = per_image.assign(value=values).groupby(["metric", "region"])["value"].mean().to_dict()
    out: dict[str, Any] = {}
    for key in summary_keys(protocol):
        if key == "score":
            continue
        metric, region = key.split("_", 1)
        out[key] = float(means.get((metric, region), math.nan))
    if REGION_PROTOCOLS[protocol].score:
        out["score"] = (out["psnr_glare"] + out["psnr_streak"] + out["psnr_global"]) / 3
    out["n_images"] = int(per_image["image"].nunique())
    out["protocol"] = protocol
    out["ssim_window"] = per_image.attrs.get("ssim_window")
    return out
