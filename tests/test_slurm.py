"""scripts/slurm/sweep.sbatch (issues 19 and 29).

With stub `sbatch`, `srun`, `scontrol` and a stub Python on PATH: it starts a Ray head and a worker
per other node as Ray's SLURM guide does, with the Ray of the Python that runs sweep.py and token
authentication on, runs the sweep against them, forwards SLURM's USR1 (and TERM) to the driver, and
requeues the job when USR1 stopped it resumably, not when the sweep finished or a TERM (scancel,
preemption) stopped it. Against a real single-node SLURM: see the second half.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
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
if [[ "$1" == hostname ]]; then echo "127.0.0.1"; exit 0; fi
exec "$@"
""",
    # The Python: `-m ray.scripts.scripts` is Ray's CLI (the head answers on its port until TERM),
    # anything else the driver, which logs how it was called and exits with $DRIVER_EXIT, or 130
    # on TERM (like sweep.py).
    "python": """#!/bin/bash
if [[ "$1 $2" == "-m ray.scripts.scripts" ]]; then
  shift 2
  echo "ray $* RAY_process_group_cleanup_enabled=$RAY_process_group_cleanup_enabled RAY_AUTH_MODE=$RAY_AUTH_MODE" >> "$STUB_LOG"
  if [[ " $* " == *" --head "* ]]; then exec "$REAL_PYTHON" "$(dirname "$0")/head.py"; fi
  trap 'echo "ray stopped" >> "$STUB_LOG"; exit 0' TERM
  while true; do sleep 0.05; done
fi
echo "driver $* RAY_ADDRESS=$RAY_ADDRESS RAY_AUTH_MODE=$RAY_AUTH_MODE" >> "$STUB_LOG"
trap 'echo "driver got TERM" >> "$STUB_LOG"; exit 130' TERM
if [[ -n "${DRIVER_EXIT:-}" ]]; then exit "$DRIVER_EXIT"; fi
while true; do sleep 0.05; done
""",
    "head.py": """import os, signal, socket, sys
server = socket.create_server(("127.0.0.1", int(os.environ["RAY_PORT"])))
def stop(*_):
    with open(os.environ["STUB_LOG"], "a") as log:
        log.write("ray stopped\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
while True:
    server.accept()[0].close()
""",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def stubs(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in STUBS.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    token = tmp_path / "token"
    token.write_text("a-token")
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(tmp_path / "log"),
            "PYTHON": str(bin_dir / "python"), "REAL_PYTHON": sys.executable,
            "RAY_PORT": str(_free_port()), "RAY_AUTH_TOKEN_PATH": str(token),
            "RAY_WORKER_WAIT_S": "0.3"}


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
    log, port = _log(stubs), stubs["RAY_PORT"]
    assert "srun@node1 hostname --ip-address" in log
    # The Ray of the Python that runs sweep.py, not whichever `ray` is on PATH.
    ray = f"{stubs['PYTHON']} -m ray.scripts.scripts"
    head = f"start --head --node-ip-address=127.0.0.1 --port={port} --num-cpus 4 --num-gpus 1 --block"
    assert f"srun@node1 {ray} {head}" in log
    assert f"ray {head} RAY_process_group_cleanup_enabled=true RAY_AUTH_MODE=token" in log
    worker = f"start --address 127.0.0.1:{port} --num-cpus 4 --num-gpus 1 --block"
    assert f"srun@node2 {ray} {worker}" in log
    assert f"ray {worker} RAY_process_group_cleanup_enabled=true RAY_AUTH_MODE=token" in log
    assert ("driver sweep.py run --shared-storage --space search_spaces/table1.yaml "
            f"RAY_ADDRESS=127.0.0.1:{port} RAY_AUTH_MODE=token") in log
    assert log.count("ray stopped") == 2  # both Ray steps ended with the job
    assert not any(line.startswith("scontrol requeue") for line in log)
    assert "warning" not in out


def test_usr1_reaches_the_driver_and_the_job_is_requeued(stubs):
    # USR1: `--signal=B:USR1@300`, 5 minutes before the time limit.
    job = _submit(stubs, "--space", "search_spaces/table1.yaml")
    _wait_for(stubs, "driver sweep.py run")
    time.sleep(0.3)  # the shell is in `wait` now
    job.send_signal(signal.SIGUSR1)
    out, _ = job.communicate(timeout=60)
    log = _log(stubs)
    assert "driver got TERM" in log, (out, log)
    assert "flaresweep: USR1 received; stopping the sweep" in out
    assert "scontrol requeue 4242" in log
    assert log.count("ray stopped") == 2
    assert job.returncode == 130, out


def test_term_stops_the_driver_and_does_not_requeue(stubs):
    # TERM: scancel (the user means stop), preemption (SLURM requeues where PreemptMode=REQUEUE).
    job = _submit(stubs, "--space", "search_spaces/table1.yaml")
    _wait_for(stubs, "driver sweep.py run")
    time.sleep(0.3)
    job.send_signal(signal.SIGTERM)
    out, _ = job.communicate(timeout=60)
    log = _log(stubs)
    assert "driver got TERM" in log, (out, log)
    assert "flaresweep: TERM received; stopping the sweep" in out
    assert "not requeued by this script; submit the same command again to resume" in out
    assert not any(line.startswith("scontrol requeue") for line in log)
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


def test_without_a_token_nothing_starts(stubs, tmp_path):
    env = {**stubs, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing"), "DRIVER_EXIT": "0"}
    job = _submit(env, "--space", "x.yaml")
    out, _ = job.communicate(timeout=60)
    assert job.returncode == 2, out
    assert out.strip() == (
        f"flaresweep: error: no Ray token in {tmp_path / 'missing'}: run "
        f"`(umask 077; {tmp_path / 'bin'}/ray get-auth-token --generate >/dev/null)` once (it writes "
        "~/.ray/auth_token, which every node must see), or set RAY_AUTH_TOKEN_PATH to a token "
        "file every node reads (or RAY_AUTH_TOKEN)")
    assert [line.split()[0] for line in _log(stubs)] == ["sbatch"]  # no srun, no ray, no driver


def test_a_token_others_can_read_is_a_warning(stubs):
    Path(stubs["RAY_AUTH_TOKEN_PATH"]).chmod(0o644)
    job = _submit({**stubs, "DRIVER_EXIT": "0"}, "--space", "x.yaml")
    out, _ = job.communicate(timeout=60)
    assert job.returncode == 0, out
    assert (f"flaresweep: warning: {stubs['RAY_AUTH_TOKEN_PATH']} (mode 644) is readable by "
            "others") in out


def test_a_head_that_does_not_start_ends_the_job(stubs, tmp_path):
    (tmp_path / "bin" / "head.py").write_text("import sys; sys.exit(1)\n")  # `ray start` fails
    job = _submit({**stubs, "DRIVER_EXIT": "0"}, "--space", "x.yaml")
    out, _ = job.communicate(timeout=60)
    assert job.returncode == 1, out
    assert f"the Ray head on node1 did not answer at 127.0.0.1:{stubs['RAY_PORT']}" in out
    assert not any(line.startswith("driver") for line in _log(stubs))
