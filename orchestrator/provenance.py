"""What produced a result, recorded beside it: code version, package versions, device, inputs.

`collect` runs in the trial's own process (on whatever node it ran), so what it records is what
really computed the numbers. Identities never include any of it (orchestrator.identity): a code
change does not silently retrain anything; instead reports warn when cells of one table come from
different code or inputs, and say whether the packages match the lock file.
"""

from __future__ import annotations

import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from cascade.machine import cpu_model, package_version

ROOT = Path(__file__).resolve().parents[1]
LOCK_FILE = ROOT / "requirements.lock"
# Packages whose versions change numbers (recorded in every metrics.json).
PACKAGES = ("torch", "torchvision", "timm", "ray", "optuna", "scikit-image", "numpy", "lpips")
_LOCK_LINE = re.compile(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s;#]+)")


def collect(fingerprints: dict[str, Any], device: str | None = None) -> dict[str, Any]:
    """Provenance of a result computed in this process."""
    versions = package_versions()
    return {"flaresweep": package_version("flaresweep"), "code": code_version(), "python": platform.python_version(),
            "packages": versions, "lock": lock_mismatches(versions), "device": describe_device(device),
            "host": platform.node(), "fingerprints": fingerprints}


def package_versions() -> dict[str, str | None]:
    return {name: package_version(name) for name in PACKAGES}


def code_version(root: Path = ROOT) -> str:
    """`<commit>` or `<commit>+dirty` (tracked files changed) of the flaresweep checkout;
    `unknown` outside a git checkout (an installed wheel records its version instead)."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                                capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def describe_device(device: str | None) -> str:
    """The GPU's name for a CUDA device (torch is loaded in a trial), else the CPU model."""
    if device and device.startswith("cuda") and "torch" in sys.modules:
        torch = sys.modules["torch"]
        try:
            return torch.cuda.get_device_name(torch.device(device))
        except Exception:  # noqa: BLE001 - a description must never fail a trial
            return device
    return cpu_model()


def read_lock(path: Path = LOCK_FILE) -> dict[str, str]:
    """name -> pinned version of a pip-compile / `uv pip compile` lock file ({} when absent)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    pins = {}
    for line in lines:
        match = _LOCK_LINE.match(line.strip())
        if match:
            pins[_normal(match.group(1))] = match.group(2)
    return pins


def lock_mismatches(versions: dict[str, str | None], path: Path = LOCK_FILE) -> dict[str, Any]:
    """Whether recorded versions match the lock file: {"file", "matches", "differs": {name: [ours, locked]}}."""
    pins = read_lock(path)
    if not pins:
        return {"file": path.name, "matches": None, "differs": {}}
    differs = {name: [ours, pins[_normal(name)]] for name, ours in versions.items()
               if ours is not None and _normal(name) in pins and _base(ours) != _base(pins[_normal(name)])}
    return {"file": path.name, "matches": not differs, "differs": differs}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _base(version: str) -> str:
    """A version without its local part: torch's `2.9.1+cu128` pins as `2.9.1`."""
    return version.split("+", 1)[0]
