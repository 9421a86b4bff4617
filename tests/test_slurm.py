"""scripts/slurm/sweep.sbatch (issues 19 and 29).

With stub `sbatch`, `srun`, `scontrol` and a stub Python on PATH: it starts a Ray head and a worker
per other node as Ray's SLURM guide does, with the Ray of the Python that runs sweep.py and token
authentication on, runs the sweep against them, forwards SLURM's USR1 (and TERM) to the driver, and
requeues the job when USR1 stopped it resumably, not when the sweep finished or a TERM (scancel,
preemption) stopped it. Against a real single-node SLURM: see the second half.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster_helpers import fake_python, free_port, readme_command, substitute, token_home, user_env
from test_sweep import FAKE_MAIN, TESTS, _write

import sweep
from cascade.io import read_json

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
            "RAY_PORT": str(free_port()), "RAY_AUTH_TOKEN_PATH": str(token),
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


# -- against a real single-node SLURM (issue 29) ------------------------------------------------
# slurmctld + slurmd + munged on this machine (.ci/run starts them: scripts/ci/start_slurm.sh), the
# README's sbatch command with a node's worth of sizing options, the fake trainer of
# tests/test_sweep.py (through sweep.sbatch's PYTHON), no virtual environment on PATH, and the Ray
# token in a home of the test's, made with the README's command.

SLURM_SPACE = {
    "name": "mini", "grid": {"k": [1, 2], "lambda_": [0.5]},
    "fixed": {"steps": 24, "log_every": 2, "checkpoint_every": 2, "encoder": "small_cpu",
              "encoder_pretrained": False},
    "reference": False, "control": False, "seeds": [0], "resources": {"cpu": 0.5, "gpu": 0},
    "max_concurrent": 2, "max_failures": 1,
}
SAME = ("psnr_entire", "psnr_streak", "psnr_glare", "ssim_entire", "ssim_streak", "ssim_glare",
        "steps", "n_images", "trial_id", "eval_id")


def _no_slurm() -> str | None:
    """Why there is no SLURM to submit to here, or None."""
    for tool in ("sbatch", "scontrol", "scancel", "sinfo"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    try:
        info = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo: {exc}"
    if info.returncode != 0 or not {"idle", "mix"} & set(info.stdout.split()):
        return f"no idle node (sinfo: {(info.stdout + info.stderr).strip() or 'nothing'})"
    return None


@pytest.fixture(scope="module")
def slurm() -> None:
    why = _no_slurm()
    if why:
        message = (f"no SLURM cluster here ({why}); .ci/run installs Debian's slurm-wlm and munge "
                   "and starts them (scripts/ci/start_slurm.sh)")
        if os.environ.get("FLARESWEEP_REQUIRE_SLURM") == "1":  # .ci/run started one: it must work
            pytest.fail(message)
        pytest.skip(message)


def _job(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict ({} once SLURM has forgotten the job)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                         timeout=30).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def _until(what: str, check, timeout: float = 180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := check():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _slurm_metrics(results: Path) -> dict[str, dict]:
    out = {}
    for path in sorted((results / "mini" / "trials").glob("*/evals/*/metrics.json")):
        metrics = read_json(path)
        out[metrics["trial_id"]] = {k: metrics.get(k) for k in SAME}
    return out


def _steps(results: Path) -> list[int]:
    return [read_json(p).get("step") or 0 for p in (results / "mini" / "trials").glob("*/progress.json")]


class _Jobs:
    """The jobs a test submitted: the README's sbatch command, each cancelled by its id at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.space = _write(tmp_path, SLURM_SPACE)
        self.results = tmp_path / "results"
        python = fake_python(tmp_path)
        home = token_home(tmp_path)
        # No venv on PATH: the recipe runs the Ray of its PYTHON. The README's shell exported
        # RAY_AUTH_MODE, but the recipe must not need it: it is left out here.
        env = user_env(home, venv=False, PYTHON=str(python), RAY_PORT=str(free_port()),
                       FAKE_STEP_S="0.25")
        self.env = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
        # The README's command; the paths the test's, sized to this one node without GPUs.
        self.command = substitute(readme_command("sbatch scripts/slurm/sweep.sbatch"), {
            "sbatch scripts/": f"sbatch --nodes=1 --cpus-per-task=1 --gpus-per-task=0 "
                               f"--output={tmp_path}/job-%j.out scripts/",
            "search_spaces/table1.yaml": str(self.space),
            " --data /nfs/Flare7Kpp --checkpoint /nfs/net_g_last.pth": "",
            "/nfs/flaresweep-results": str(self.results)})
        self.ids: list[str] = []

    def submit(self) -> str:
        done = subprocess.run(["bash", "-c", self.command], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        job_id = done.stdout.split()[-1]  # "Submitted batch job N"
        self.ids.append(job_id)
        return job_id

    def at_step(self, job_id: str, step: int) -> bool:
        """Whether both trials reached `step`; AssertionError when the job ended before."""
        if self.ended(job_id):
            raise AssertionError(f"job {job_id} ended early:\n{self.output(job_id)}")
        steps = _steps(self.results)
        return len(steps) == 2 and min(steps) >= step

    def output(self, job_id: str) -> str:
        path = self.tmp / f"job-{job_id}.out"
        return path.read_text() if path.exists() else ""

    def ended(self, job_id: str) -> dict[str, str] | None:
        job = _job(job_id)
        if job.get("JobState") in ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL"):
            return job
        return None

    def cancel_all(self) -> None:
        for job_id in self.ids:
            if _job(job_id).get("JobState") not in (None, "COMPLETED", "CANCELLED", "FAILED"):
                subprocess.run(["scancel", job_id], timeout=30)
        for job_id in self.ids:
            _until(f"job {job_id} to end", lambda j=job_id: _job(j).get("JobState") != "COMPLETING"
                   and not _job(j).get("JobState", "").startswith(("RUNNING", "PENDING")), 120)


@pytest.fixture(scope="module")
def uninterrupted(slurm, tmp_path_factory) -> dict[str, dict]:
    """The metrics of the same space run in one go by a local Ray."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SLURM_"))}
    done = subprocess.run([sys.executable, "-c", FAKE_MAIN, "run", "--space",
                           str(_write(tmp, SLURM_SPACE)), "--results", str(tmp / "results"),
                           "--cpus", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**env, "PYTHONPATH": str(TESTS), "FAKE_STEP_S": "0.05"})
    assert done.returncode == 0, done.stdout + done.stderr
    metrics = _slurm_metrics(tmp / "results")
    assert len(metrics) == 2
    return metrics


@pytest.mark.slow
def test_usr1_requeues_and_the_resumed_sweep_equals_an_uninterrupted_one(tmp_path, uninterrupted):
    jobs = _Jobs(tmp_path)
    try:
        job_id = jobs.submit()
        _until("both trials at step 4", lambda: jobs.at_step(job_id, 4))
        # What `--signal=B:USR1@300` does 5 minutes before the time limit, now.
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, timeout=30)
        _until("the requeue", lambda: _job(job_id).get("Restarts") == "1")
        # SLURM starts a requeued job once its credential expired (scripts/ci/start_slurm.sh: 10 s).
        job = _until("the resumed job to end", lambda: jobs.ended(job_id), 300)
    finally:
        jobs.cancel_all()
    out = jobs.output(job_id)
    print(out)  # shown with -s
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", (job, out)
    assert f"flaresweep: job {job_id} (restart 0): Ray head" in out
    assert "flaresweep: USR1 received; stopping the sweep" in out
    assert "mini: stopped by SIGTERM; run the same command again to resume." in out
    assert f"flaresweep: requeueing job {job_id}" in out
    assert f"flaresweep: job {job_id} (restart 1): Ray head" in out
    assert "mini: complete." in out
    assert "Token authentication is disabled" not in out and "No such file" not in out
    calls = (jobs.results / "mini" / "calls.log").read_text().splitlines()
    assert len(calls) == 4 and sum(" start=0 " not in c for c in calls) == 2, calls  # both resumed
    assert _slurm_metrics(jobs.results) == uninterrupted


@pytest.mark.slow
def test_scancel_stops_without_a_requeue_and_leaves_a_resumable_folder(tmp_path, uninterrupted):
    jobs = _Jobs(tmp_path)
    try:
        job_id = jobs.submit()
        _until("both trials at step 4", lambda: jobs.at_step(job_id, 4))
        subprocess.run(["scancel", job_id], check=True, timeout=30)
        job = _until("the cancelled job to end", lambda: jobs.ended(job_id), 120)
    finally:
        jobs.cancel_all()
    out = jobs.output(job_id)
    print(out)
    assert job["JobState"] == "CANCELLED" and job["Restarts"] == "0", (job, out)
    assert "requeueing" not in out
    lines = sweep.status(jobs.space, jobs.results)
    assert sum(" interrupted " in line for line in lines) == 2, lines  # none done, none failed
    # Resumable: the same sweep, here on a local Ray, continues both trials from their checkpoints.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SLURM_"))}
    again = subprocess.run([sys.executable, "-c", FAKE_MAIN, "run", "--space", str(jobs.space),
                            "--results", str(jobs.results), "--cpus", "1"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300,
                           env={**env, "PYTHONPATH": str(TESTS), "FAKE_STEP_S": "0.05"})
    assert again.returncode == 0, again.stdout + again.stderr
    calls = (jobs.results / "mini" / "calls.log").read_text().splitlines()
    assert sum(" start=0 " not in c for c in calls) == 2, calls
    assert _slurm_metrics(jobs.results) == uninterrupted
