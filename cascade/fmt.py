"""Short human-readable texts shared by log lines and progress lines (standard library only)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def is_number(value: Any, *, finite: bool = False) -> bool:
    """True for an int or float read from JSON/YAML (bool, which is an int, excluded); with
    `finite`, also not NaN or +-inf."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and (not finite or math.isfinite(value))


def duration(seconds: float) -> str:
    """`42s`, `3m05s`, `2h04m` (rounded to the second; negative counts as 0)."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def psnr_text(metrics: Mapping[str, Any], regions: Sequence[str] = ("entire",)) -> str:
    """"PSNR entire 22.21 streak 29.77 glare 31.44" from `psnr_<region>` keys of a metrics dict
    (dB, 2 decimals). Regions whose value is missing, not a number or not finite are left out;
    "" when none is left."""
    parts = []
    for region in regions:
        value = metrics.get(f"psnr_{region}")
        if is_number(value, finite=True):
            parts.append(f"{region} {value:.2f}")
    return "PSNR " + " ".join(parts) if parts else ""
