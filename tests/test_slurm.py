"""scripts/slurm/sweep.sbatch with stub `sbatch`, `srun`, `scontrol`, `ray` and a stub driver on
PATH (issue 19): it starts a Ray head and a worker per other node as Ray's SLURM guide does, runs
the sweep against them, forwards SLURM's USR1 (and TERM) to the driver, and requeues the job when
the driver stopped resumably, not when the sweep finished."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm" / "sweep.sbatch"

STUBS = {
    # sbatch: run the batch script here, as SLURM would on the first node, with its variables.
    "sbatch": """#!/bin/bash
export SLURM_JOB_ID=4242 SLURM_JOB_NODELIST='node[1-2]' SLURM_JOB_NUM_NODES=2
export SLURM_CPUS_PER_TASK=4 SLURM_GPUS_PER_TASK=1 SLURM_SUBMIT_DIR="$PWD"
export SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}
echo "sbatch $*" >> "$STUB_LOG"
script=$1; shift
exec bash "$script" "$@"
""",
    "scontrol": """#!/bin/bash
echo "scontrol $*" >> "$STUB_LOG"
if [[ "$1 $2" == "show hostnames" ]]; then printf 'node1\\nnode2\\n'; fi
""",
    # srun: drop the step options, log the node, run the command (hostname answers an address).
    "srun": """#!/bin/bash
node=?
while [[ "$1" == -* ]]; do
  if [[ "$1" == -w ]]; then node=$2; shift; fi
  shift
done
echo "srun@$node $*" >> "$STUB_LOG"
if [[ "$1" == hostname ]]; then echo "10.1.2.3"; exit 0; fi
exec "$@"
""",
    "ray": """#!/bin/bash
echo "ray $* RAY_process_group_cleanup_enabled=$RAY_process_group_cleanup_enabled" >> "$STUB_LOG"
trap 'echo "ray stopped" >> "$STUB_LOG"; exit 0' TERM
while true; do sleep 0.05; done
""",
    # The driver: logs how it was called; exits with $DRIVER_EXIT, or 130 on TERM (like sweep.py).
    "python": """#!/bin/bash
echo "driver $* RAY_ADDRESS=$RAY_ADDRESS" >> "$STUB_LOG"
trap 'echo "driver got TERM" >> "$STUB_LOG"; exit 130' TERM
if [[ -n "${DRIVER_EXIT:-}" ]]; then exit "$DRIVER_EXIT"; fi
while true; do sleep 0.05; done
""",
}


@pytest.fixture
def stubs(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in STUBS.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(tmp_path / "log"),
            "PYTHON": str(bin_dir / "python"), "RAY_HEAD_WAIT_S": "0.3", "RAY_WORKER_WAIT_S": "0.3"}


def _log(env: dict[str, str]) -> list[str]:
    path = Path(env["STUB_LOG"])
    return path.read_text().splitlines() if path.exists() else []


def _submit(env: dict[str, str], *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(["sbatch", str(SCRIPT), *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def _wait_for(env: dict[str, str], prefix: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(line.startswith(prefix) for line in _log(env)):
            return
        time.sleep(0.05)
    raise AssertionError(f"no {prefix!r} in {_log(env)}")


def test_it_starts_ray_like_rays_guide_and_finishes_without_a_requeue(stubs):
    job = _submit({**stubs, "DRIVER_EXIT": "0"}, "--space", "search_spaces/table1.yaml")
    out, _ = job.communicate(timeout=60)
    assert job.returncode == 0, out
    log = _log(stubs)
    assert "srun@node1 hostname --ip-address" in log
    head = "ray start --head --node-ip-address=10.1.2.3 --port=6379 --num-cpus 4 --num-gpus 1 --block"
    assert f"srun@node1 {head}" in log
    assert f"{head} RAY_process_group_cleanup_enabled=true" in log
    assert "srun@node2 ray start --address 10.1.2.3:6379 --num-cpus 4 --num-gpus 1 --block" in log
    assert ("driver sweep.py run --shared-storage --space search_spaces/table1.yaml "
            "RAY_ADDRESS=10.1.2.3:6379") in log
    assert log.count("ray stopped") == 2  # both Ray steps ended with the job
    assert not any(line.startswith("scontrol requeue") for line in log)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_stop_signal_reaches_the_driver_and_the_job_is_requeued(stubs, sig):
    # USR1: `--signal=B:USR1@300` before the time limit; TERM: preemption or scancel.
    job = _submit(stubs, "--space", "search_spaces/table1.yaml")
    _wait_for(stubs, "driver sweep.py run")
    time.sleep(0.3)  # the shell is in `wait` now
    job.send_signal(sig)
    out, _ = job.communicate(timeout=60)
    log = _log(stubs)
    assert "driver got TERM" in log, (out, log)
    assert f"flaresweep: {sig.name.removeprefix('SIG')} received; stopping the sweep" in out
    assert "scontrol requeue 4242" in log
    assert job.returncode == 130, out


def test_no_requeue_past_max_requeues(stubs):
    job = _submit({**stubs, "SLURM_RESTART_COUNT": "3", "MAX_REQUEUES": "3"}, "--space", "x.yaml")
    _wait_for(stubs, "driver sweep.py run")
    time.sleep(0.3)
    job.send_signal(signal.SIGUSR1)
    out, _ = job.communicate(timeout=60)
    assert "requeued 3 times already (MAX_REQUEUES)" in out
    assert not any(line.startswith("scontrol requeue") for line in _log(stubs))


def test_a_driver_that_fails_is_not_requeued(stubs):
    job = _submit({**stubs, "DRIVER_EXIT": "2"}, "--space", "x.yaml")
    out, _ = job.communicate(timeout=60)
    assert job.returncode == 2, out
    assert not any(line.startswith("scontrol requeue") for line in _log(stubs))
