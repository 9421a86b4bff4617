"""Which torch device and precision a trial (or `python -m cascade.infer`) runs on.

Device and dtype come from the config, CPU by default; nothing calls a bare `.cuda()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from cascade.errors import UserError

if TYPE_CHECKING:
    from cascade.config import TrialConfig


def resolve_device(name: str) -> torch.device:
    """"auto" -> CUDA when available, else CPU; otherwise `name` ("cpu", "cuda", "cuda:1", ...)
    must be a torch device that exists here, else a UserError. In a sweep, the trial's config
    arrives with "auto" already resolved to the GPUs Ray gave it (`assigned_device`)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device {name!r} is not a torch device (try cpu, cuda or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r}: no CUDA device is available on this machine "
                        "(use cpu or auto)")
    return device


def use_bf16(cfg: TrialConfig, device: torch.device) -> bool:
    """Whether the networks run under bf16 autocast: `precision: bf16`, on CUDA only."""
    return cfg.precision == "bf16" and device.type == "cuda"


def assigned_device(name: str, gpu_ids: Sequence[str]) -> str:
    """The `device` of a trial that its scheduler (Ray) gave the GPUs `gpu_ids`.

    "auto" means those GPUs: "cuda" with any, "cpu" with none, even on a machine with GPUs (since
    ray#54868 Ray leaves CUDA_VISIBLE_DEVICES alone for a worker given 0 GPUs, so CUDA's default
    device would be a GPU another trial holds). "cuda" with none is a UserError for that reason;
    "cpu" stays the CPU. The trial sees exactly `gpu_ids` (`visible_devices`), as cuda:0..N-1.
    """
    if name == "auto":
        return "cuda" if gpu_ids else "cpu"
    if torch.device(name).type == "cuda" and not gpu_ids:
        raise UserError(f"device {name!r}, but the scheduler gave this trial no GPU; ask for one "
                        "(resources.gpu or --gpus-per-trial) or use device: auto")
    return name


def visible_devices(gpu_ids: Sequence[str]) -> dict[str, str]:
    """Environment that shows a process exactly the GPUs `gpu_ids` (none: no GPU at all)."""
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in gpu_ids)}
