"""The base network a trial fine-tunes, made once and shared through an on-disk cache.

`ensure_base(cfg)`: the Uformer the cascade fine-tunes (the paper's "legacy" network). With
`cfg.checkpoint` that file is the base. Without one, a small Uformer is trained on the procedural
benchmark (`cascade.data.synthetic`) and cached under `<cache>/bases/<hash>/base.pth`, the hash
covering every field that changes its weights (`config.BASE_FIELDS`, the test resolution its
crops are cut at, `BASE_SEED`, `BASE_VERSION`, the generator version), so all trials of a sweep,
and later sweeps, share one base. (The test set is cached the same way: `cascade.data.testset`.)

Training: Adam(base_lr), `WARMUP_STEPS` of linear warm-up then a cosine decay to 0 over
`base_steps` steps of `batch_size` crops of side `crop`, each cut from a frame rendered at the
test resolution (`frame = test_size`, so its flares have the test set's size in pixels), from the
"base" split of the procedural data: a stream of its own, sharing no sample, PSF or photograph
with a trial's fine-tuning data or the test set. L1 on the deflared image and on the flare, as
Flare7K++ trains its Uformer (without its VGG term). The output layer's bias starts at the logit
of the training images' mean level (`initial_output_bias`): from the default 0 (every output 0.5
on night scenes of mean ~0.08) the first Adam steps drove the sigmoid into saturation, and at
lr >= 1e-3 the base died (an all-black output with no gradient; measured in docs/performance.md).

Quality, recorded in `base.json` and logged when it is built (`deflare_quality`): on the trials'
test set, the base against the identity (the flared input as the output) on PSNR and SSIM over the
entire image and outside the flare masks; `deflares` says whether it beats identity by >= 3 dB
PSNR and on SSIM (entire) and keeps the scene (SSIM outside the masks >= identity's there).

Concurrency: trials run in parallel processes (Ray). The base is built under an exclusive
`io.file_lock` on `<folder>.lock`; whoever gets the lock first builds it, the others wait and then
find it ready. `base.pth` is published atomically (rename), so a build killed half-way leaves
nothing that looks finished; the base's training resumes from its own checkpoint. The demo encoder
(`cascade.demo_encoder`), when the config uses it, is built here too, before any trial starts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from cascade import checkpoint as ckpt
from cascade.config import BASE_FIELDS, TrialConfig
from cascade.data import synthetic
from cascade.device import resolve_device, use_bf16
from cascade.errors import UserError
from cascade.io import atomic_write_json, cache_dir, digest, file_lock

if TYPE_CHECKING:  # imported when needed: cascade.uformer pulls in timm (seconds)
    from torch import nn

    from cascade.uformer import Uformer

log = logging.getLogger(__name__)

BASE_SEED = 1000  # the base's stream in the "base" split (its own seed namespace: any trial seed is safe)
# Bump when the base's training procedure changes, so stale cached bases are not reused.
# 2: crops of test-resolution frames from the "base" split, warm-up + cosine lr, output bias at the
# data's mean level, quality in base.json.
BASE_VERSION = 2
BASE_LOG_EVERY = 50
WARMUP_STEPS = 20
# The procedural base and the demo encoder are tiny networks: on the CPU they train with one
# thread, which measured 3x faster than two on the 2-core machine whenever another process held
# the other core (0.11 against 0.31-0.37 s per base step at 64 px; docs/performance.md).
PREPARE_THREADS = 1
# What "the base deflares" means (module docstring): PSNR gain over identity, in dB.
MIN_PSNR_GAIN_DB = 3.0


def base_frame(cfg: TrialConfig) -> int:
    """Side of the frames the base's training crops are cut from: the test resolution."""
    return max(cfg.crop, cfg.test_size)


def base_spec(cfg: TrialConfig) -> dict:
    """Everything that determines the procedural base's weights (recorded in base.json)."""
    return {k: getattr(cfg, k) for k in BASE_FIELDS} | {
        "frame": base_frame(cfg), "base_seed": BASE_SEED, "version": BASE_VERSION,
        "generator": synthetic.GENERATOR}


def base_key(cfg: TrialConfig) -> str:
    """Cache key of the procedural base: a hash of `base_spec`."""
    return digest(base_spec(cfg))


@contextlib.contextmanager
def cpu_threads(device: torch.device, n: int = PREPARE_THREADS) -> Iterator[None]:
    """Run the block with `n` torch CPU threads when `device` is the CPU, then restore them."""
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def ensure_base(cfg: TrialConfig) -> Path:
    """Path of the base Uformer checkpoint for `cfg` (training and caching it if needed)."""
    if cfg.checkpoint is not None:
        path = Path(cfg.checkpoint).expanduser()
        if not path.is_file():
            raise UserError(f"checkpoint={cfg.checkpoint!r}: no such file")
        return path.resolve()
    folder = cache_dir(cfg.base_cache) / "bases" / base_key(cfg)
    target = folder / "base.pth"
    if target.is_file():  # fast path, no lock: the file only ever appears complete (rename)
        return target
    with file_lock(folder.with_suffix(".lock")):
        if not target.is_file():  # someone else may have built it while we waited
            with cpu_threads(resolve_device(cfg.device)):
                train_base(cfg, folder)
    return target


def build_base_uformer(cfg: TrialConfig) -> Uformer:
    """A freshly initialised Uformer of the procedural base's architecture."""
    from cascade.uformer import Uformer

    return Uformer(img_size=cfg.crop, output_ch=cfg.output_ch, embed_dim=cfg.embed_dim,
                   depths=(cfg.depth,) * 9, win_size=cfg.win_size)


def lr_factor(step: int, steps: int) -> float:
    """Learning-rate multiplier at `step` (0-based): linear warm-up over WARMUP_STEPS, then
    cosine from 1 to 0 at `steps`."""
    warm = min(1.0, (step + 1) / WARMUP_STEPS)
    return warm * 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / max(1, steps)))


def initial_output_bias(pairs: synthetic.ProceduralPairs, n: int = 16) -> float:
    """logit of the mean ground-truth level of the first `n` training samples (B, 3, S, S)."""
    _, gt, _ = pairs.batch(range(n))
    mean = float(gt.mean().clamp(1e-3, 1 - 1e-3))
    return math.log(mean / (1 - mean))


def base_loss(out: torch.Tensor, gt: torch.Tensor, flare: torch.Tensor) -> torch.Tensor:
    """L1 on the deflared image (channels 0:3) and, for 6-channel networks, on the flare (3:6),
    as Flare7K++ trains its Uformer (without its VGG term: no downloads for the procedural base).
    out: (B, C, S, S); gt, flare: (B, 3, S, S), all in [0, 1]."""
    loss = F.l1_loss(out[:, :3], gt)
    if out.shape[1] == 6:
        loss = loss + F.l1_loss(out[:, 3:6], flare)
    return loss


def train_base(cfg: TrialConfig, folder: Path) -> Path:
    """Train the procedural base into `folder/base.pth` (resumable from `folder/checkpoints`).

    Sample indices of step s are s*B .. s*B+B-1 of `ProceduralPairs(crop, BASE_SEED,
    split="base", frame=base_frame(cfg))`; see the module docstring. Call under the lock.
    """
    from cascade.uformer import save_checkpoint

    device = resolve_device(cfg.device)
    torch.manual_seed(BASE_SEED)
    pairs = synthetic.ProceduralPairs(cfg.crop, BASE_SEED, split="base", frame=base_frame(cfg))
    model = build_base_uformer(cfg)
    with torch.no_grad():  # output_proj: the Uformer's last 3x3 convolution, before its sigmoid
        model.output_proj.proj[0].bias.fill_(initial_output_bias(pairs))
    model = model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.base_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.base_steps))
    ckpt_dir = folder / "checkpoints"
    config = base_spec(cfg)
    start = 0
    state = ckpt.load_training_checkpoint(ckpt_dir, map_location=device)
    if state is not None:
        start = ckpt.restore_training_state(state, model=model, optimizer=opt, scheduler=sched)
        log.info("base %s: resuming at step %d/%d", folder.name, start, cfg.base_steps)
    model.train()
    t0, last = time.perf_counter(), float("nan")
    running = torch.zeros((), device=device)
    for step in range(start, cfg.base_steps):
        idx = range(step * cfg.batch_size, (step + 1) * cfg.batch_size)
        inp, gt, flare = pairs.batch(idx, device)
        with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16(cfg, device)):
            loss = base_loss(model(inp).float(), gt, flare)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += loss.detach()
        done = step + 1
        if done % BASE_LOG_EVERY == 0 or done == cfg.base_steps:
            n = (done - start) % BASE_LOG_EVERY or BASE_LOG_EVERY
            last = float(running) / n
            running.zero_()
            if not math.isfinite(last):
                raise RuntimeError(f"base network training diverged at step {done}: loss {last}")
            log.info("base %s: step %d/%d loss %.4f (%.1fs)", folder.name, done, cfg.base_steps,
                     last, time.perf_counter() - t0)
            if done % (4 * BASE_LOG_EVERY) == 0 and done < cfg.base_steps:
                ckpt.save_training_checkpoint(ckpt_dir, step=done, model=model, optimizer=opt,
                                              scheduler=sched, config=config)
    train_s = time.perf_counter() - t0
    model.eval()
    quality = base_quality(cfg, model, device)
    log.info("base %s: %s", folder.name, quality_text(quality))
    if not quality["deflares"]:
        log.warning("base %s does not deflare the test set (needs >= %.0f dB over identity, higher "
                    "SSIM, and SSIM outside the flare masks >= identity's): more base_steps?",
                    folder.name, MIN_PSNR_GAIN_DB)
    save_checkpoint(model, folder / "base.pth")  # atomic: its appearance publishes the base
    atomic_write_json(folder / "base.json", config | {"final_loss": last, "device": str(device),
                                                      "train_s": train_s, "quality": quality})
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return folder / "base.pth"


# -- does the base deflare? -------------------------------------------------------------------------


def deflare_scores(items: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM over images, entire and outside the flare masks.

    Args:
        items: (pred, gt, mask) per image, each (H, W, 3) uint8; mask in Flare7K colours.
    Returns:
        {psnr_entire, ssim_entire, psnr_outside, ssim_outside, n_images}. "Outside" weighs each
        pixel by 1 - its flare weight (streak, glare or light source: max(R, B) / 255 of the
        mask): PSNR of the weighted MSE divided by the mean weight (Flare7K's region PSNR), SSIM
        the weighted mean of the SSIM map (`cascade.metrics.region_mean_ssim`). SSIM is
        scikit-image's (7x7 uniform window, data_range 255), as Table 1's.
    """
    from cascade.metrics import psnr_from_mse, region_mean_ssim, ssim_map, ssim_pad

    rows = []
    pad = ssim_pad("uniform")
    for pred, gt, mask in items:
        err = (pred.astype(np.float64) - gt.astype(np.float64)) ** 2  # (H, W, 3)
        outside = 1.0 - np.maximum(mask[..., 0], mask[..., 2]).astype(np.float64) / 255.0
        ssim, full = ssim_map(gt, pred)
        mean_w = float(outside.mean())
        ssim_out = region_mean_ssim(full, outside, pad)
        rows.append({
            "psnr_entire": psnr_from_mse(float(err.mean())),
            "ssim_entire": ssim,
            "psnr_outside": (psnr_from_mse(float((err * outside[..., None]).mean()) / mean_w)
                             if mean_w > 0 else math.nan),
            "ssim_outside": math.nan if ssim_out is None else ssim_out,
        })
    out = {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]} if rows else {}
    return out | {"n_images": len(rows)}


def base_quality(cfg: TrialConfig, model: nn.Module, device: torch.device) -> dict[str, Any]:
    """The base against identity on the trials' test set (`ensure_test_data(cfg)`): both
    `deflare_scores`, and `deflares` (module docstring). `model` is evaluated as the trials
    evaluate the procedural base (Flare7K++: channels 0:3 as they are)."""
    from cascade.data.testset import PairedTestSet, ensure_test_data
    from cascade.evaluate import predict

    root = ensure_test_data(cfg)
    testset = PairedTestSet(root)
    with torch.no_grad():  # predict: exactly the trials' evaluation path (procedural base kind)
        base = deflare_scores((pred, gt, mask) for _, pred, gt, mask in predict(model, testset, device))
    identity = deflare_scores((it.input, it.gt, it.mask)
                              for it in (testset[i] for i in range(len(testset))))
    deflares = bool(base["psnr_entire"] >= identity["psnr_entire"] + MIN_PSNR_GAIN_DB
                    and base["ssim_entire"] > identity["ssim_entire"]
                    and base["ssim_outside"] >= identity["ssim_outside"])
    return {"test_set": str(root), "identity": identity, "base": base, "deflares": deflares}


def quality_text(quality: dict[str, Any]) -> str:
    """One line: base vs identity, e.g. "PSNR 21.3 vs 15.2 dB, SSIM 0.71 vs 0.66, ..."."""
    b, i = quality["base"], quality["identity"]
    return (f"vs identity on {b['n_images']} test images: PSNR {b['psnr_entire']:.2f} vs "
            f"{i['psnr_entire']:.2f} dB, SSIM {b['ssim_entire']:.4f} vs {i['ssim_entire']:.4f}, "
            f"outside the flare masks SSIM {b['ssim_outside']:.4f} vs {i['ssim_outside']:.4f}"
            f" ({'deflares' if quality['deflares'] else 'does NOT deflare'})")
