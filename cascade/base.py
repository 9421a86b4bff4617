"""The base network and the test set a trial needs, made once and shared through an on-disk cache.

- `ensure_base(cfg)`: the Uformer the cascade fine-tunes (the paper's "legacy" network). With
  `cfg.checkpoint` that file is the base. Without one, a small Uformer is trained on the procedural
  benchmark (`cascade.data.synthetic`) and cached under `<cache>/bases/<hash>/base.pth`, the hash
  covering every field that changes its weights (`BASE_KEYS`), so all trials of a sweep, and later
  sweeps, share one base.
- `ensure_test_data(cfg)`: the folder of paired test images (`input/ gt/ mask/`): `cfg.test_data`,
  else `<data>/test_data/real` for Flare7K data, else a procedural test set cached under
  `<cache>/testsets/<hash>/`.

Concurrency: trials run in parallel processes (Ray). Each cached item is built under an exclusive
`fcntl.flock` on `<item>.lock`; whoever gets the lock first builds it, the others wait and then
find it ready. Items are published atomically (file rename / folder rename), so a build killed
half-way leaves nothing that looks finished; the base's training resumes from its own checkpoint.

Seeds: the base and the test set use fixed seeds (`BASE_SEED`, `TEST_SEED`), not the trial's, so
every trial of a sweep, whatever its seed, starts from the same base and is scored on the same
images, and neither shares samples with a trial's fine-tuning data (trial seeds are small).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from cascade import checkpoint as ckpt
from cascade.config import TrialConfig
from cascade.errors import UserError
from cascade.io import atomic_write_json

log = logging.getLogger(__name__)

BASE_SEED = 1000  # procedural data of the base network
TEST_SEED = 2000  # procedural test set
# Bump when the base's training procedure changes, so stale cached bases are not reused.
BASE_VERSION = 1
BASE_KEYS = ("embed_dim", "depth", "win_size", "output_ch", "base_steps", "base_lr", "crop",
             "batch_size")
TEST_KEYS = ("n_test", "test_size")
BASE_LOG_EVERY = 50


def cache_dir(cfg: TrialConfig) -> Path:
    """Where bases and test sets are cached: `cfg.base_cache`, `$FLARESWEEP_CACHE`, the repo's
    `.cache/` for a source checkout, else `~/.cache/flaresweep`. Always absolute (Ray trials run
    in their own working directory)."""
    if cfg.base_cache:
        return Path(cfg.base_cache).expanduser().resolve()
    if os.environ.get("FLARESWEEP_CACHE"):
        return Path(os.environ["FLARESWEEP_CACHE"]).expanduser().resolve()
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").is_file():
        return repo / ".cache"
    return Path.home() / ".cache" / "flaresweep"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created if missing); blocks until granted.

    flock locks belong to the open file description, so they are released when the process dies:
    a killed builder never leaves a stale lock behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def resolve_device(name: str) -> torch.device:
    """"auto" -> CUDA when available else CPU; "cuda" without a GPU is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is available (use device: cpu or auto)")
    return torch.device(name)


# -- base network -------------------------------------------------------------------------------


def _digest(obj: dict) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _generator() -> str:
    """Version tag of the procedural data generator: a new tag means new pixels, so new caches."""
    from cascade.data import synthetic

    return getattr(synthetic, "GENERATOR", "cascade.data.synthetic/1")


def base_spec(cfg: TrialConfig) -> dict:
    """Everything that determines the procedural base's weights (recorded in base.json)."""
    return {k: getattr(cfg, k) for k in BASE_KEYS} | {
        "base_seed": BASE_SEED, "version": BASE_VERSION, "generator": _generator()}


def base_key(cfg: TrialConfig) -> str:
    """Cache key of the procedural base: a hash of `base_spec`."""
    return _digest(base_spec(cfg))


def ensure_base(cfg: TrialConfig) -> Path:
    """Path of the base Uformer checkpoint for `cfg` (training and caching it if needed)."""
    if cfg.checkpoint is not None:
        path = Path(cfg.checkpoint).expanduser()
        if not path.is_file():
            raise UserError(f"checkpoint={cfg.checkpoint!r}: no such file")
        return path.resolve()
    folder = cache_dir(cfg) / "bases" / base_key(cfg)
    target = folder / "base.pth"
    if target.is_file():  # fast path, no lock: the file only ever appears complete (rename)
        return target
    with file_lock(folder.with_suffix(".lock")):
        if not target.is_file():  # someone else may have built it while we waited
            train_base(cfg, folder)
    return target


def build_base_uformer(cfg: TrialConfig):
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
    from cascade.data.synthetic import ProceduralPairs
    from cascade.uformer import save_checkpoint

    device = resolve_device(cfg.device)
    torch.manual_seed(BASE_SEED)
    model = build_base_uformer(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.base_lr)
    pairs = ProceduralPairs(cfg.crop, BASE_SEED)
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


def use_bf16(cfg: TrialConfig, device: torch.device) -> bool:
    """Whether the networks run under bf16 autocast: `precision: bf16`, on CUDA only."""
    return cfg.precision == "bf16" and device.type == "cuda"


# -- test set ---------------------------------------------------------------------------------------


def test_key(cfg: TrialConfig) -> str:
    """Cache key of the procedural test set."""
    return _digest({k: getattr(cfg, k) for k in TEST_KEYS} | {"test_seed": TEST_SEED,
                                                             "generator": _generator()})


def ensure_test_data(cfg: TrialConfig) -> Path:
    """Folder with `input/ gt/ mask/` the trial is evaluated on (see module docstring)."""
    if cfg.test_data is not None:
        path = Path(cfg.test_data).expanduser()
        if not path.is_dir():
            raise UserError(f"test_data={cfg.test_data!r}: no such folder")
        return path.resolve()
    if cfg.data is not None:
        real = Path(cfg.data).expanduser() / "test_data" / "real"
        if real.is_dir():
            return real.resolve()
        raise UserError(f"data={cfg.data!r} has no test_data/real folder; set test_data to the "
                        "folder with input/ gt/ mask/ to evaluate on")
    from cascade.data.synthetic import generate_dataset

    root = cache_dir(cfg) / "testsets"
    target = root / f"procedural-n{cfg.n_test}-s{cfg.test_size}-{test_key(cfg)}"
    if target.is_dir():
        return target
    with file_lock(target.with_suffix(".lock")):
        if not target.is_dir():
            # Build beside the target, publish with one rename: a half-written set is never seen.
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
            try:
                generate_dataset(tmp, n=cfg.n_test, size=cfg.test_size, seed=TEST_SEED)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target
