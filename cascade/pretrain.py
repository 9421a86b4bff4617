"""The base network a trial fine-tunes, made once and shared through an on-disk cache.

`ensure_base(cfg)`: the Uformer the cascade fine-tunes (the paper's "legacy" network). With
`cfg.checkpoint` that file is the base. Without one, a small Uformer is trained on the procedural
benchmark (`cascade.data.synthetic`) and cached under `<cache>/bases/<hash>/base.pth`, the hash
covering every field that changes its weights (`config.BASE_FIELDS`), so all trials of a sweep, and
later sweeps, share one base. (The test set is cached the same way: `cascade.data.testset`.)

Concurrency: trials run in parallel processes (Ray). The base is built under an exclusive
`io.file_lock` on `<folder>.lock`; whoever gets the lock first builds it, the others wait and then
find it ready. `base.pth` is published atomically (rename), so a build killed half-way leaves
nothing that looks finished; the base's training resumes from its own checkpoint.

Seed: the base uses a fixed seed (`BASE_SEED`), not the trial's, so every trial of a sweep,
whatever its seed, starts from the same base, and it shares no samples with a trial's fine-tuning
data (trial seeds are small).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from cascade import checkpoint as ckpt
from cascade.config import BASE_FIELDS, TrialConfig
from cascade.data import synthetic
from cascade.device import resolve_device, use_bf16
from cascade.errors import UserError
from cascade.io import atomic_write_json, cache_dir, digest, file_lock

if TYPE_CHECKING:  # imported when needed: cascade.uformer pulls in timm (seconds)
    from cascade.uformer import Uformer

log = logging.getLogger(__name__)

BASE_SEED = 1000  # procedural data of the base network
# Bump when the base's training procedure changes, so stale cached bases are not reused.
BASE_VERSION = 1
BASE_LOG_EVERY = 50


def base_spec(cfg: TrialConfig) -> dict:
    """Everything that determines the procedural base's weights (recorded in base.json)."""
    return {k: getattr(cfg, k) for k in BASE_FIELDS} | {
        "base_seed": BASE_SEED, "version": BASE_VERSION, "generator": synthetic.GENERATOR}


def base_key(cfg: TrialConfig) -> str:
    """Cache key of the procedural base: a hash of `base_spec`."""
    return digest(base_spec(cfg))


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
            train_base(cfg, folder)
    return target


def build_base_uformer(cfg: TrialConfig) -> Uformer:
    """A freshly initialised Uformer of the procedural base's architecture."""
    from cascade.uformer import Uformer

    return Uformer(img_size=cfg.crop, output_ch=cfg.output_ch, embed_dim=cfg.embed_dim,
                   depths=(cfg.depth,) * 9, win_size=cfg.win_size)


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

    Adam(base_lr), `base_steps` steps of `batch_size` procedural crops of side `crop`; sample
    indices of step s are s*B .. s*B+B-1 of `ProceduralPairs(crop, BASE_SEED)`. Call under the lock.
    """
    from cascade.uformer import save_checkpoint

    device = resolve_device(cfg.device)
    torch.manual_seed(BASE_SEED)
    model = build_base_uformer(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.base_lr)
    pairs = synthetic.ProceduralPairs(cfg.crop, BASE_SEED)
    ckpt_dir = folder / "checkpoints"
    config = base_spec(cfg)
    start = 0
    state = ckpt.load_training_checkpoint(ckpt_dir, map_location=device)
    if state is not None:
        start = ckpt.restore_training_state(state, model=model, optimizer=opt, scheduler=None)
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
                                              scheduler=None, config=config)
    model.eval()
    save_checkpoint(model, folder / "base.pth")  # atomic: its appearance publishes the base
    atomic_write_json(folder / "base.json", config | {"final_loss": last, "device": str(device),
                                                      "train_s": time.perf_counter() - t0})
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return folder / "base.pth"
