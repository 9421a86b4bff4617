"""Which torch device and precision a trial (or `python -m cascade.infer`) runs on.

Device and dtype come from the config, CPU by default; nothing calls a bare `.cuda()`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cascade.errors import UserError

if TYPE_CHECKING:
    from cascade.config import TrialConfig


def resolve_device(name: str) -> torch.device:
    """"auto" -> CUDA when available, else CPU; otherwise `name` ("cpu", "cuda", "cuda:1", ...)
    must be a torch device that exists here, else a UserError."""
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
