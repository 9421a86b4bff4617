"""Region-wise PSNR / SSIM (entire image, streak, glare) under named protocols, per image.

The paper's Table 1 reports PSNR and SSIM over the entire image, the streak region and the glare
region without defining the region versions, so every region metric here belongs to a named
protocol in `REGION_PROTOCOLS`, and the protocol is recorded with every result.

Conventions shared by every function below:
- Images are (H, W, 3) uint8 RGB in [0, 255]; all arithmetic is float64; `data_range = 255`.
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
  rewards small regions just like "masked_images" PSNR. Needs one SSIM map per region.
- "region_mean": the w-weighted mean of the *unmasked* SSIM map S = structural_similarity(gt,
  pred, full=True)[1] (H, W, 3) over the region:
  sum_{p in V, c} w_p S_pc / (3 * sum_{p in V} w_p), V = pixels at least (win_size - 1)//2 from
  every edge (where skimage itself says the map is valid). One map serves every region. A region
  that lies entirely in that border has no SSIM row.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from skimage.metrics import structural_similarity

from cascade.errors import UserError
from cascade.io import IMAGE_SUFFIXES, image_files
from cascade.masks import region_weights

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


def ssim_pad(ssim_window: str) -> int:
    """Width of the border where skimage's SSIM map is not valid: (win_size - 1) // 2."""
    _check_choice("ssim_window", ssim_window, SSIM_WINDOWS)
    kw = SSIM_WINDOWS[ssim_window]
    if kw["gaussian_weights"]:
        # skimage: truncate = 3.5, radius = int(truncate * sigma + 0.5)
        return int(3.5 * kw["sigma"] + 0.5)
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


def ssim_map(
    gt: np.ndarray, pred: np.ndarray, ssim_window: str = "uniform"
) -> tuple[float, np.ndarray]:
    """skimage SSIM of two (H, W, 3) images in [0, 255] and its full map.

    Returns:
        (mean SSIM exactly as skimage returns it, map (H, W, 3) float64). The map is only valid
        at least `ssim_pad(ssim_window)` pixels from every edge.
    """
    _check_choice("ssim_window", ssim_window, SSIM_WINDOWS)
    value, full = structural_similarity(
        gt, pred, channel_axis=2, data_range=DATA_RANGE, full=True, **SSIM_WINDOWS[ssim_window]
    )
    return float(value), full


def region_mean_ssim(full: np.ndarray, w: np.ndarray, pad: int) -> float | None:
    """w-weighted mean of an SSIM map over its valid area, channels averaged.

    Args:
        full: (H, W, 3) SSIM map. w: (H, W) weights in [0, 1]. pad: invalid border width.
    Returns:
        sum(w * S) / (3 * sum(w)) over pixels >= pad from every edge; None if w is 0 there.
    """
    h, wd = w.shape
    wv = w[pad : h - pad, pad : wd - pad]
    total = float(wv.sum())
    if total == 0.0:
        return None
    sv = full[pad : h - pad, pad : wd - pad, :]
    # (H', W') x (H', W', 3) summed over pixels and channels
    return float(np.einsum("ij,ijc->", wv, sv) / (3.0 * total))


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
    g = gt.astype(np.float64)
    p = pred.astype(np.float64)

    # Entire image: skimage's own numbers (its PSNR is this same MSE formula on float64).
    entire_ssim, full = ssim_map(gt, pred, ssim_window)
    rows = [
        {
            "region": "entire",
            "metric": "psnr",
            "value": psnr_from_mse(float(np.mean((g - p) ** 2))),
        },
        {"region": "entire", "metric": "ssim", "value": entire_ssim},
    ]

    weights = region_weights(mask)
    psnr_by_region: dict[str, float] = {}
    for region in proto.regions:
        w = weights[region]
        if not w.any():  # absent region: skipped, not zero
            continue
        w3 = w[..., None]  # (H, W, 1), broadcast over RGB
        gm, pm = g * w3, p * w3  # Flare7K masks both images, then subtracts
        mse = float(np.mean((gm - pm) ** 2))
        scale = float(w.mean()) if proto.psnr == "area_normalised" else 1.0
        psnr_by_region[region] = psnr_from_mse(mse, scale)
        rows.append({"region": region, "metric": "psnr", "value": psnr_by_region[region]})
        if region not in _SSIM_REGIONS:
            continue
        if proto.ssim == "masked_images":
            ssim: float | None = float(
                structural_similarity(
                    gm, pm, channel_axis=2, data_range=DATA_RANGE, **SSIM_WINDOWS[ssim_window]
                )
            )
        else:
            ssim = region_mean_ssim(full, w, pad)
        if ssim is not None:
            rows.append({"region": region, "metric": "ssim", "value": ssim})

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


def _pairing_key(stem: str, folder_prefixes: tuple[str, ...]) -> str:
    """`gt_000001` -> `000001` when the stem starts with a folder-style prefix."""
    for prefix in folder_prefixes:
        if stem.startswith(prefix + "_") and len(stem) > len(prefix) + 1:
            return stem[len(prefix) + 1 :]
    return stem


# Flare7K(++) test sets name files input_000000.png, gt_000000.png, mask_000000.png.
_FOLDER_PREFIXES = ("input", "gt", "mask", "pred", "output", "deflare", "blend", "flare")


def list_images(folder: PathLike) -> dict[str, Path]:
    """Image files of a folder by stem (suffixes in IMAGE_SUFFIXES, any case, not recursive)."""
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"{path}: no such folder")
    files: dict[str, Path] = {}
    for f in image_files(path):
        if f.stem in files:
            raise UserError(f"{path}: two images named {f.stem!r} ({files[f.stem].name}, {f.name})")
        files[f.stem] = f
    if not files:
        raise UserError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def pair_files(
    pred_dir: PathLike, gt_dir: PathLike, mask_dir: PathLike
) -> list[tuple[str, Path, Path, Path]]:
    """(key, pred, gt, mask) paths paired by file stem, sorted by key.

    Stems must match exactly, or match once a folder-style prefix is dropped (Flare7K's
    `gt_000000` / `mask_000000`, ours `input_000000`, ...). Anything unpaired is a UserError
    naming it.
    """
    folders = {"pred": pred_dir, "gt": gt_dir, "mask": mask_dir}
    listed = {name: list_images(folder) for name, folder in folders.items()}
    stems = [set(files) for files in listed.values()]
    if stems[0] == stems[1] == stems[2]:
        keyed = {name: dict(files) for name, files in listed.items()}
    else:
        keyed: dict[str, dict[str, Path]] = {}
        for name, files in listed.items():
            keyed[name] = {}
            for stem, path in files.items():
                key = _pairing_key(stem, _FOLDER_PREFIXES)
                if key in keyed[name]:
                    raise UserError(
                        f"{folders[name]}: {keyed[name][key].name} and {path.name} pair as {key!r}"
                    )
                keyed[name][key] = path
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
