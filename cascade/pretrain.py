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
Flare7K++ trains its Uformer (without its VGG term). The sample mix (`sample_kinds`,
`mix_batch`): SELF_FRACTION of the samples give the network its own output on that sample as the
input, CLEAN_FRACTION the flare-free ground truth, both with the ground truth as the target, so
that the base survives being applied to its own output (the cascade's anchor starts as the base
and is given the negative's output). The output layer's bias starts at the logit
of the training images' mean level (`initial_output_bias`): from the default 0 (every output 0.5
on night scenes of mean ~0.08) the first Adam steps drove the sigmoid into saturation, and at
lr >= 1e-3 the base died (an all-black output with no gradient; measured in docs/performance.md).

Quality, recorded in `base.json` and logged when it is built (`deflare_quality`): on the trials'
test set, the base against the identity (the flared input as the output) on PSNR and SSIM over the
entire image and outside the flare masks; `deflares` says whether it beats identity by >= 3 dB
PSNR and on SSIM (entire) and keeps the scene (SSIM outside the masks >= identity's there). The
second pass (the cascade at 0 steps, which the control row evaluates) is scored too: `gap` is what
it costs against the base on PSNR and SSIM over the entire image, and `idempotent` says whether
that is within MAX_GAP_PSNR_DB and MAX_GAP_SSIM (`second_pass_gap`).

Concurrency: trials run in parallel processes (Ray). The base is built under an exclusive
`locks.file_lock` on `<folder>.lock`; whoever gets the lock first builds it, the others wait and then
find it ready. `base.pth` is published atomically (rename), so a build killed half-way leaves
nothing that looks finished; the base's training resumes from its own checkpoint. The demo encoder
(`cascade.demo_encoder`), when the config uses it, is built here too, before any trial starts.
"""

from __future__ import annotations

import contextlib
import json
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
from cascade.io import atomic_write_json, cache_dir, digest
from cascade.locks import build_once

if TYPE_CHECKING:  # imported when needed: cascade.uformer pulls in timm (seconds)
    from torch import nn

    from cascade.uformer import Uformer

log = logging.getLogger(__name__)

BASE_SEED = 1000  # the base's stream in the "base" split (its own seed namespace: any trial seed is safe)
# Bump when the base's training procedure changes, so stale cached bases are not reused (and
# cascade.versions.PROCEDURAL with it: trials of a new base are new trials).
# 2: crops of test-resolution frames from the "base" split, warm-up + cosine lr, output bias at the
# data's mean level, quality in base.json.
# 3: light sources weighted in the L1 (LIGHT_WEIGHT) and the sample mix (SELF_FRACTION,
# CLEAN_FRACTION), so that a second pass costs little (issue 26); the gap in base.json.
BASE_VERSION = 3
BASE_LOG_EVERY = 50
WARMUP_STEPS = 20
# The procedural base and the demo encoder are tiny networks: on the CPU they train with one
# thread, which measured 3x faster than two on the 2-core machine whenever another process held
# the other core (0.11 against 0.31-0.37 s per base step at 64 px; docs/performance.md).
PREPARE_THREADS = 1
# What "the base deflares" means (module docstring): PSNR gain over identity, in dB.
MIN_PSNR_GAIN_DB = 3.0
# The demo's base (search_spaces/demo.yaml) trained on flared inputs with a plain L1 scored 23.57
# dB / 0.701 SSIM on the test set and lost 3.70 dB / 0.060 to a second pass, so every cascade cell
# measured that, not its fine-tuning. The light sources were most of it: 1.2 % of the test pixels,
# 54 % of the base's squared error and 70 % of its second pass's; the base kept 56 % of their
# level and the second pass 15 % (to a network that dims what is bright, a deflared light source
# is one more thing to dim). Measured at the demo's size, one build each (BASE_SEED; gap = base -
# second pass, PSNR dB / SSIM):
#   recipe (shares of the samples)          base           gap
#   plain L1 (BASE_VERSION 2)               23.57 / 0.701  +3.70 / +0.060
#   self 0.5 in the last 400 steps          23.15 / 0.686  +1.86 / +0.023
#   self 0.4                                21.48 / 0.655  +0.98 / +0.012
#   clean 0.25                              20.72 / 0.641  +0.05 / +0.011
#   self 0.3 + clean 0.1                    20.22 / 0.629  +0.21 / +0.005 (lights erased: 18 %)
#   the same at embed_dim 16                20.36 / 0.640  +0.60 / +0.014 (not a capacity limit)
#   light weight 10                         23.69 / 0.704  +0.30 / +0.035
#   light 10 + clean 0.3                    22.46 / 0.676  +0.11 / -0.001
#     base seed 1001                        20.43 / 0.637  -0.69 / -0.007
#   light 10 + self 0.15 + clean 0.15       22.40 / 0.676  -0.06 / -0.001
#     base seed 1001                        21.99 / 0.675  -0.16 / -0.002
# Without the light weight, a mix only bought idempotence by erasing the light sources on the
# first pass too; the light weight alone keeps them (PSNR) but a second pass still smooths the
# scene (SSIM). Clean inputs teach the base to leave a flare-free scene as it is, its own outputs
# to leave (or finish) its own work. The last row, within both bounds with margin at two seeds
# (SSIM outside the masks 0.751 and 0.753 against identity's 0.730), is the recipe; it costs ~3 %
# more per step than the plain L1 (the "self" samples' extra forward pass, without gradient).
# Light-source pixels weigh 1 + LIGHT_WEIGHT in the image L1 (`base_loss`); SELF_FRACTION of the
# samples have the network's own output on them as the input ("self": what the cascade's anchor
# is given), CLEAN_FRACTION the flare-free ground truth ("clean"), both with the ground truth as
# the target (`sample_kinds`, `mix_batch`).
LIGHT_WEIGHT = 10.0
SELF_FRACTION = 0.15
CLEAN_FRACTION = 0.15
# What "a second pass costs little" means (`second_pass_gap`): the base's PSNR and SSIM over the
# entire image minus the cascade's at 0 steps (the base applied to its own output), at most.
MAX_GAP_PSNR_DB = 0.3
MAX_GAP_SSIM = 0.005
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0  # the low-discrepancy rotation of `sample_kinds`


def base_frame(cfg: TrialConfig) -> int:
    """Side of the frames the base's training crops are cut from: the test resolution."""
    return synthetic.frame_side(cfg.crop, cfg.test_size)


def base_spec(cfg: TrialConfig) -> dict:
    """Everything that determines the procedural base's weights (recorded in base.json)."""
    return {k: getattr(cfg, k) for k in BASE_FIELDS} | {
        "frame": base_frame(cfg), "base_seed": BASE_SEED, "version": BASE_VERSION,
        "generator": synthetic.GENERATOR,
        "mix": {"self": SELF_FRACTION, "clean": CLEAN_FRACTION}, "light_weight": LIGHT_WEIGHT}


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


_LOGGED: set[Path] = set()  # cached bases this process has logged (ensure_base runs per config)


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
        _log_cached(folder)
        return target
    def build() -> None:
        with cpu_threads(resolve_device(cfg.device)):
            train_base(cfg, folder)
        _LOGGED.add(folder)  # train_base logged its quality

    build_once(target, build, lock=folder.with_suffix(".lock"))
    return target


def _log_cached(folder: Path) -> None:
    """One line, once per process, for a cached base: its quality record (base.json is written
    just after base.pth appears: a base found in between is logged without it)."""
    if folder in _LOGGED:
        return
    _LOGGED.add(folder)
    try:
        quality = json.loads((folder / "base.json").read_text())["quality"]
        log.info("base %s (cached): %s", folder.name, quality_text(quality))
    except (OSError, ValueError, KeyError, TypeError):
        log.info("base %s (cached)", folder.name)


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


def sample_kinds(indices: Iterable[int], self_fraction: float = SELF_FRACTION,
                 clean_fraction: float = CLEAN_FRACTION) -> list[str]:
    """"self", "clean" or "flare" per global sample index n: "self" where frac(n * GOLDEN) <
    self_fraction, "clean" where it is below self_fraction + clean_fraction. The golden-ratio
    rotation spreads each kind evenly over the steps (any window of m samples holds each share to
    within ~1/m), and a function of n alone is the same on a resumed build."""
    out = []
    for n in indices:
        u = (n * GOLDEN) % 1.0
        out.append("self" if u < self_fraction else "clean" if u < self_fraction + clean_fraction
                   else "flare")
    return out


def mix_batch(model: nn.Module, inp: torch.Tensor, gt: torch.Tensor, flare: torch.Tensor,
              kinds: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training batch after `sample_kinds`: (input, gt, flare), each (B, 3, S, S) in [0, 1].

    "self": the input is `model`'s own deflared output on that sample's flared input, computed in
    eval mode without a gradient, as the cascade's negative computes the anchor's input; its flare
    target is what the output still has above the ground truth. "clean": the input is the ground
    truth, its flare target 0. The ground truth stays the target of both: a second pass should
    keep what the first one got right and may fix what it left."""
    own = [j for j, k in enumerate(kinds) if k == "self"]
    clean = [j for j, k in enumerate(kinds) if k == "clean"]
    if not own and not clean:
        return inp, gt, flare
    inp, flare = inp.clone(), flare.clone()
    if own:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            first = model(inp[own])[:, :3].float().clamp(0, 1)
        model.train(was_training)
        inp[own] = first
        flare[own] = (first - gt[own]).clamp(0, 1)
    if clean:
        inp[clean] = gt[clean]
        flare[clean] = 0.0
    return inp, gt, flare


def base_loss(out: torch.Tensor, gt: torch.Tensor, flare: torch.Tensor,
              light: torch.Tensor | None = None, light_weight: float = 0.0) -> torch.Tensor:
    """L1 on the deflared image (channels 0:3) and, for 6-channel networks, on the flare (3:6),
    as Flare7K++ trains its Uformer (without its VGG term: no downloads for the procedural base).
    With `light`, the image term weighs each light-source pixel 1 + light_weight and every other
    pixel 1, divided by the mean weight (so its scale stays the plain L1's).
    out: (B, C, S, S); gt, flare: (B, 3, S, S), all in [0, 1]; light: (B, S, S) bool."""
    if light is None or light_weight == 0:
        loss = F.l1_loss(out[:, :3], gt)
    else:
        w = 1.0 + light_weight * light.to(out.dtype)[:, None]  # (B, 1, S, S)
        loss = (w * (out[:, :3] - gt).abs()).mean() / w.mean()
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
        r = pairs.render(idx, device)  # = pairs.batch (no random erasing here), with the masks
        with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16(cfg, device)):
            inp, gt, flare = mix_batch(model, r.input, r.gt, r.flare, sample_kinds(idx))
            loss = base_loss(model(inp).float(), gt, flare, r.light, LIGHT_WEIGHT)
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
    if not quality["idempotent"]:
        log.warning("base %s loses more than %.1f dB PSNR or %.3f SSIM to a second pass: every "
                    "cascade cell's difference to the reference then measures that, not the "
                    "fine-tuning", folder.name, MAX_GAP_PSNR_DB, MAX_GAP_SSIM)
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
    """The base against identity, and against itself applied twice, on the trials' test set
    (`ensure_test_data(cfg)`): `deflare_scores` of identity, the base and the second pass (the
    cascade at 0 steps: `CascadedFlareRemover` of two copies of `model`, what every cascade trial
    starts from and the control row evaluates), `deflares` (module docstring), and
    `second_pass_gap`'s `gap` and `idempotent`. `model` is evaluated as the trials evaluate the
    procedural base (`evaluate.predict`, Flare7K++: channels 0:3 as they are)."""
    from cascade.data.testset import PairedTestSet, ensure_test_data
    from cascade.evaluate import predict
    from cascade.model import CascadedFlareRemover

    root = ensure_test_data(cfg)
    testset = PairedTestSet(root)
    with torch.no_grad():  # predict: exactly the trials' evaluation path (procedural base kind)
        base = deflare_scores((pred, gt, mask) for _, pred, gt, mask in predict(model, testset, device))
        twice = CascadedFlareRemover.from_uformer(model)
        second = deflare_scores((pred, gt, mask) for _, pred, gt, mask in predict(twice, testset, device))
    identity = deflare_scores((it.input, it.gt, it.mask)
                              for it in (testset[i] for i in range(len(testset))))
    deflares = bool(base["psnr_entire"] >= identity["psnr_entire"] + MIN_PSNR_GAIN_DB
                    and base["ssim_entire"] > identity["ssim_entire"]
                    and base["ssim_outside"] >= identity["ssim_outside"])
    return {"test_set": str(root), "identity": identity, "base": base, "deflares": deflares,
            "second_pass": second, **second_pass_gap(base, second)}


def second_pass_gap(base: dict[str, float], second: dict[str, float]) -> dict[str, Any]:
    """{"gap": {psnr_entire, ssim_entire}: the base's score minus the second pass's (> 0: the
    second pass costs), "idempotent": both gaps within MAX_GAP_PSNR_DB / MAX_GAP_SSIM}."""
    gap = {m: base[m] - second[m] for m in ("psnr_entire", "ssim_entire")}
    within = bool(gap["psnr_entire"] <= MAX_GAP_PSNR_DB and gap["ssim_entire"] <= MAX_GAP_SSIM)
    return {"gap": gap, "idempotent": within}


def quality_text(quality: dict[str, Any]) -> str:
    """One line: base vs identity, e.g. "PSNR 21.3 vs 15.2 dB, SSIM 0.71 vs 0.66, ...", then the
    second pass's cost (`gap`) against its bounds."""
    b, i = quality["base"], quality["identity"]
    text = (f"vs identity on {b['n_images']} test images: PSNR {b['psnr_entire']:.2f} vs "
            f"{i['psnr_entire']:.2f} dB, SSIM {b['ssim_entire']:.4f} vs {i['ssim_entire']:.4f}, "
            f"outside the flare masks SSIM {b['ssim_outside']:.4f} vs {i['ssim_outside']:.4f}"
            f" ({'deflares' if quality['deflares'] else 'does NOT deflare'})")
    if "gap" in quality:  # base.json of BASE_VERSION >= 3
        gap = quality["gap"]
        text += (f"; a second pass (the cascade at 0 steps) costs {gap['psnr_entire']:+.2f} dB "
                 f"PSNR, {gap['ssim_entire']:+.4f} SSIM ("
                 f"{'within' if quality['idempotent'] else 'NOT within'} {MAX_GAP_PSNR_DB:g} dB / "
                 f"{MAX_GAP_SSIM:g})")
    return text
