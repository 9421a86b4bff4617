"""Timing shared by the bench scripts (imported as `_timing`: they run as `python bench/<x>.py`)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA), so a timer sees the work, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall s, process CPU s) of one call of `fn`, the device synchronised before and after."""
    sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - w0, time.process_time() - c0
