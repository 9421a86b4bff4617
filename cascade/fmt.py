"""Short human-readable texts shared by log lines and progress lines (standard library only)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


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
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            parts.append(f"{region} {value:.2f}")
    return "PSNR " + " ".join(parts) if parts else ""
