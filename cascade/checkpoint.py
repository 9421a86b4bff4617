"""Training checkpoints: model, optimizer, schedule, step, RNG states; atomic save, exact resume.

A training checkpoint is one file, `<checkpoint_dir>/last.pt`, replaced atomically (temporary file,
fsync, rename; `cascade.io.atomic_path`), so a process killed mid-write leaves the previous
checkpoint intact. It holds everything needed to continue a run so that, on the CPU, the resumed run
ends bit-identical to an uninterrupted one:

    {"format": FORMAT, "step": int,            # optimizer steps taken; the data position too,
                                               # since training data is a pure function of (seed, step)
     "model": state_dict, "optimizer": ..., "scheduler": ...,
     "rng": {"torch": ByteTensor, "cuda": [ByteTensor], "numpy": {...}, "python": tuple},
     "config": dict,                           # the resolved TrialConfig
     "extra": dict}                            # caller's bookkeeping (e.g. the base network used)

Everything in it is loadable with `torch.load(weights_only=True)`: no pickled classes, so reading a
checkpoint never executes code. The resolved config is also written beside it as `config.json`.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cascade.errors import UserError
from cascade.io import atomic_path, atomic_write_json

FORMAT = "flaresweep-train-v1"
CHECKPOINT_NAME = "last.pt"


def capture_rng_state() -> dict[str, Any]:
    """Every global RNG a training step may draw from (torch CPU and CUDA, numpy, random)."""
    np_state = np.random.get_state(legacy=False)  # {"bit_generator", "state": {"key", "pos"}, ...}
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            # uint32 key as int64 tensor: weights_only loading accepts tensors, not ndarrays.
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": random.getstate(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`. CUDA states are restored only when CUDA is in use."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        (n["bit_generator"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def checkpoint_path(checkpoint_dir: str | os.PathLike) -> Path:
    """The one checkpoint file of a run."""
    return Path(checkpoint_dir) / CHECKPOINT_NAME


def save_training_checkpoint(
    checkpoint_dir: str | os.PathLike,
    *,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Atomically write the training state after `step` optimizer steps; returns the file.

    `model` must be the bare module (not a DDP wrapper), so names carry no `module.` prefix.
    """
    path = checkpoint_path(checkpoint_dir)
    state = {
        "format": FORMAT,
        "step": int(step),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": capture_rng_state(),
        "config": config,
        "extra": extra or {},
    }
    # config.json first: if we die between the two writes, the old checkpoint + new config are
    # still consistent because the config of a resumable run cannot change (see `check_resumable`).
    atomic_write_json(Path(checkpoint_dir) / "config.json", config)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_training_checkpoint(checkpoint_dir: str | os.PathLike, map_location: str | torch.device = "cpu"
                    ) -> dict[str, Any] | None:
    """The saved state in `checkpoint_dir`, or None when there is none yet.

    Raises UserError naming the file when it exists but is not a flaresweep training checkpoint.
    """
    path = checkpoint_path(checkpoint_dir)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt / truncated / foreign pickle
        raise UserError(f"{path}: not a readable training checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path}: not a flaresweep training checkpoint (expected format {FORMAT!r})")
    return state


def restore_training_state(
    state: dict[str, Any],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    rng: bool = True,
) -> int:
    """Load a `load_training_checkpoint` state into live objects; returns the step to continue from."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if rng:
        restore_rng_state(state["rng"])
    return int(state["step"])


def check_resumable(saved: dict[str, Any], current: dict[str, Any], ignore: tuple[str, ...],
                    where: str) -> None:
    """Refuse to resume a run whose training-relevant config changed (it would silently mix runs).

    Keys in `ignore` (logging cadence, device, ...) may differ. Raises UserError naming the keys.
    """
    changed = sorted(
        key for key in set(saved) | set(current)
        if key not in ignore and saved.get(key) != current.get(key)
    )
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed[:4])
        raise UserError(
            f"{where}: checkpoint was written with a different config ({detail}); "
            "use a new checkpoint folder or the original config"
        )
