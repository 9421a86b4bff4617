"""Horovod, the optional data-parallel backend: is it installed, and the `horovodrun` command line.

Horovod is not a registry dependency of flaresweep: its last release (0.28.1) needs a C++20 patch to
build against current torch, which `make horovod` applies (scripts/build_horovod.sh). Nothing here
imports horovod or torch, so `cascade` imports fine without Horovod and asking costs microseconds.

Two words that are easy to mix up (Horovod's, not ours):
- the *controller* starts the ranks and coordinates them: Gloo (built by `make horovod`) or MPI
  (site builds, e.g. conda-forge's); it is what `--gloo` / `--mpi` choose on `horovodrun`;
- the *tensor operations* move the data: Gloo on CPU, NCCL on GPU when Horovod was built with
  `HOROVOD_GPU_OPERATIONS=NCCL` (`make horovod` does so on a host with GPUs). NCCL is used under
  either controller, so GPU runs launch with `--gloo` too.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

HOROVOD_VERSION = "0.28.1"  # the release scripts/build_horovod.sh builds
CONTROLLERS = ("gloo", "mpi")
NOT_INSTALLED = "horovod not installed (make horovod)"


def horovod_unavailable_reason() -> str | None:
    """Why `import horovod.torch` would fail, or None when it should work. Imports nothing.

    Looks for the `horovod` package, its compiled PyTorch extension, and (from the metadata.json
    Horovod's build writes) whether it was built for the torch version now installed: a Horovod
    built for another torch fails at import with undefined symbols.
    """
    try:
        spec = importlib.util.find_spec("horovod")
    except (ImportError, ValueError):  # ValueError: a half-imported module left in sys.modules
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return NOT_INSTALLED
    package = Path(next(iter(spec.submodule_search_locations)))
    if not any((package / "torch").glob("mpi_lib_v2*.so")):
        return f"horovod at {package} has no PyTorch extension (rebuild: make horovod)"
    built_for = _built_for_torch(package / "metadata.json")
    installed = _torch_version()
    if installed is None:
        return "torch is not installed"
    if built_for is not None and built_for != installed:
        return f"horovod was built for torch {built_for} but torch {installed} is installed (make horovod)"
    return None


def horovod_available() -> bool:
    """True when Horovod with its PyTorch extension is installed for this torch. Imports nothing."""
    return horovod_unavailable_reason() is None


def _built_for_torch(metadata: Path) -> str | None:
    """The torch version recorded by Horovod's build (`{"pytorch": "2.15.0+cu132", ...}`), if any."""
    try:
        return json.loads(metadata.read_text()).get("pytorch")
    except (OSError, ValueError, AttributeError):
        return None


def _torch_version() -> str | None:
    """torch.__version__ (local label included, e.g. "2.15.0+cu132") read from torch/version.py.

    The distribution metadata drops the local label, and a build for +cu132 is not one for +cpu.
    """
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        try:
            text = (Path(location) / "version.py").read_text()
        except OSError:
            continue
        match = re.search(r"^__version__\s*(?::\s*str\s*)?=\s*['\"]([^'\"]+)['\"]", text, re.M)
        if match:
            return match.group(1)
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def horovodrun_executable() -> str:
    """`horovodrun` beside this interpreter (a venv's bin/, which need not be on PATH), else PATH's."""
    beside = Path(sys.executable).parent / "horovodrun"
    if beside.is_file():
        return str(beside)
    return shutil.which("horovodrun") or "horovodrun"


def horovodrun_command(
    np: int,
    script_args: list[str],
    *,
    controller: str = "gloo",
    hosts: str | None = None,
) -> list[str]:
    """The argv that runs the worker command `script_args` on `np` Horovod ranks.

    `script_args` is the whole worker command, interpreter included, e.g.
    `[sys.executable, "-m", "cascade.distributed", payload]`. `controller` is "gloo" (what
    `make horovod` builds; also right for GPU runs, see the module docstring) or "mpi".
    `hosts` is horovodrun's `-H`, e.g. "node1:4,node2:4"; by default all ranks run on this machine.
    """
    if np < 1:
        raise ValueError(f"np must be >= 1, got {np}")
    if controller not in CONTROLLERS:
        raise ValueError(f"unknown controller {controller!r}; expected one of {', '.join(CONTROLLERS)}")
    if not script_args:
        raise ValueError("script_args is empty: give the worker command, e.g. [sys.executable, 'x.py']")
    command = [horovodrun_executable(), "-np", str(np)]
    if hosts:
        command += ["-H", hosts]
    return command + [f"--{controller}", *map(str, script_args)]
