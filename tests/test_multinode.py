"""Two Ray nodes on this machine started with the README's commands, token authentication on, one
of them lost mid-trial (issues 19 and 29).

The README's "On a Ray cluster" commands, verbatim apart from host names, paths and node sizes:
the token made once (`ray get-auth-token --generate` into a home of the test's), `ray start
--head`, `ray start --address` (each with `--block`, so that the test ends the node by its pid),
and the driver as `RAY_ADDRESS=... make sweep ...` with `PY=` a Python that runs the fake trainer
of tests/test_sweep.py. Only the worker declares the custom resource `flare_w` that both trials
ask for (`--trial-resource flare_w=1`), so the kill of that node hits running trials.

A driver without the token, or with another one, is refused in one line that says how to fix it;
without --shared-storage the local results folder is refused; with it the worker node is killed
with SIGKILL mid-trial and a fresh one joins, as a replaced or requeued node would: the sweep
finishes (that run or the next), the trials resume from their checkpoints, and every trial's
metrics equal those of a one-node local run. Every Ray process the test started is gone at the end.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster_helpers import (
    RayNode,
    fake_python,
    free_port,
    readme_command,
    substitute,
    token_home,
    user_env,
)
from test_sweep import FAKE_MAIN, MINI, ROOT, TESTS, _variant, _write

from cascade.io import read_json

pytestmark = pytest.mark.slow

SPACE = _variant(MINI, grid={"k": [1, 2], "lambda_": [0.5]}, reference=False,
                 fixed={"steps": 20, "log_every": 2, "checkpoint_every": 2},
                 resources={"cpu": 0.5, "gpu": 0}, max_concurrent=2, max_failures=2)
# Node death is noticed in ~2 s instead of Ray's ~30 s default.
FAST_HEALTH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
               "health_check_failure_threshold": 2}
SAME = ("psnr_entire", "psnr_streak", "psnr_glare", "ssim_entire", "ssim_streak", "ssim_glare",
        "steps", "n_images", "trial_id", "eval_id")

def _make_sweep(env: dict[str, str], port: int, space: Path, tmp_path: Path, *args: str,
                popen: bool = False):
    """The README's driver command (bash, as a user's shell runs it) with the test's address and
    paths, `args` added to SWEEP_ARGS, no DATA and CKPT (the fake trainer reads none), and PY= the
    fake-trainer Python (-o: never reinstall the venv from here)."""
    rel = os.path.relpath(space.with_suffix(""), ROOT / "search_spaces")
    command = substitute(readme_command("RAY_ADDRESS="), {
        "RAY_ADDRESS=HEAD:6379": f"RAY_ADDRESS=127.0.0.1:{port}", "SPACE=table1": f"SPACE={rel}",
        " DATA=/nfs/Flare7Kpp CKPT=/nfs/net_g_last.pth": "", "/nfs/ray": str(tmp_path / "ray"),
        '/nfs/flaresweep-results"': " ".join([str(tmp_path / "shared"), *args]) + '"'})
    command += f" PY={tmp_path / 'bin' / 'python'} -o .venv/.flaresweep-installed"
    if popen:  # its own session: the test ends bash, make and the driver by that group's id
        return subprocess.Popen(["bash", "-c", command], cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)


def _driver_error(proc: subprocess.CompletedProcess) -> list[str]:
    """The driver's stderr lines, without make's own "make: *** ... Error 2" (or "make[1]: ***"
    when make itself runs under make, as `make test` runs these tests)."""
    return [line for line in proc.stderr.splitlines() if not re.match(r"make(\[\d+\])?: \*\*\*", line)]


def _metrics(results: Path) -> dict[str, dict]:
    """trial id -> the metrics that must not depend on where and how often it ran."""
    out = {}
    for path in sorted((results / "mini" / "trials").glob("*/evals/*/metrics.json")):
        metrics = read_json(path)
        out[metrics["trial_id"]] = {k: metrics.get(k) for k in SAME}
    return out


def _steps_reached(results: Path) -> list[int]:
    return [read_json(p).get("step") or 0 for p in (results / "mini" / "trials").glob("*/progress.json")]


def test_losing_a_worker_node_mid_trial_loses_nothing(tmp_path):
    space = _write(tmp_path, SPACE)
    fake_python(tmp_path)
    home = token_home(tmp_path)
    env = user_env(home, FAKE_STEP_S="0.25")
    port = free_port()
    temp_dir = Path(f"/tmp/fs-{os.getpid()}-{port}")  # Ray's sockets: short paths
    node_args = ["--node-ip-address=127.0.0.1", "--num-cpus=1", f"--temp-dir={temp_dir}"]
    head_args = [*node_args, f"--system-config={json.dumps(FAST_HEALTH)}"]
    worker_args = [*node_args, '--resources={"flare_w": 2}']
    head_cmd = substitute(readme_command("ray start --head"), {"6379": str(port)})
    worker_cmd = substitute(readme_command("ray start --address"), {"HEAD:6379": f"127.0.0.1:{port}"})
    nodes = [RayNode(head_cmd, head_args, env, tmp_path / "head.log")]
    driver = None
    left: list[str] = []
    try:
        nodes[0].wait_started()
        nodes.append(RayNode(worker_cmd, worker_args, env, tmp_path / "worker1.log"))
        nodes[-1].wait_started()

        # Token authentication: no token, or another one, is one line with the fix.
        no_mode = _make_sweep({k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}, port, space,
                              tmp_path, "--shared-storage")
        assert no_mode.returncode == 2, no_mode.stdout + no_mode.stderr
        assert _driver_error(no_mode) == [
            f"error: Ray at RAY_ADDRESS=127.0.0.1:{port} requires a token (token authentication) "
            "and this driver sent none (RAY_AUTH_MODE=unset): export RAY_AUTH_MODE=token, with the "
            "cluster's token (`ray get-auth-token` on the head node prints it) in ~/.ray/auth_token "
            "(a home every node shares), in the file RAY_AUTH_TOKEN_PATH names, or in RAY_AUTH_TOKEN"]
        wrong = _make_sweep({**env, "RAY_AUTH_TOKEN": "not-the-token"}, port, space, tmp_path,
                            "--shared-storage")
        assert wrong.returncode == 2, wrong.stdout + wrong.stderr
        assert _driver_error(wrong)[0].startswith(
            f"error: Ray at RAY_ADDRESS=127.0.0.1:{port} refused the token in RAY_AUTH_TOKEN: it is "
            "not the token the cluster was started with; put the cluster's token"), wrong.stderr
        assert not (tmp_path / "shared" / "mini" / "calls.log").exists()

        run = ("--trial-resource flare_w=1",)
        refused = _make_sweep(env, port, space, tmp_path, *run)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "the Ray cluster has 2 nodes but --storage" in refused.stderr
        assert "is on a local disk" in refused.stderr and "--shared-storage" in refused.stderr

        shared = tmp_path / "shared"
        driver = _make_sweep(env, port, space, tmp_path, *run, "--shared-storage", popen=True)
        deadline = time.time() + 150
        while time.time() < deadline:
            reached = _steps_reached(shared)
            if len(reached) == 2 and min(reached) >= 4:
                break
            assert driver.poll() is None, driver.stdout.read()
            time.sleep(0.2)
        else:
            raise AssertionError(f"trials did not reach step 4: {_steps_reached(shared)}")
        nodes[-1].kill()  # SIGKILL of the node's `ray start`: raylet, workers, trials with it
        nodes.append(RayNode(worker_cmd, worker_args, env, tmp_path / "worker2.log"))  # a replacement
        nodes[-1].wait_started()
        out, _ = driver.communicate(timeout=240)
        print(out)  # shown with -s: the retries and how the run ended
        if driver.returncode != 0:  # the sweep may need the next run to finish
            again = _make_sweep(env, port, space, tmp_path, *run, "--shared-storage")
            assert again.returncode == 0, out + again.stdout + again.stderr
    finally:
        if driver is not None and driver.poll() is None:
            os.killpg(driver.pid, signal.SIGTERM)
            driver.wait(timeout=60)
        for node in reversed(nodes):
            left += node.stop()
    assert left == [], f"processes of the Ray nodes outlived them: {left}"

    calls = (shared / "mini" / "calls.log").read_text().splitlines()
    resumed = [line for line in calls if " start=0 " not in line]
    assert resumed, calls  # the lost trials continued from their checkpoints

    alone = tmp_path / "alone"
    local_env = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    one_node = subprocess.run([sys.executable, "-c", FAKE_MAIN, "run", "--space", str(space),
                               "--results", str(alone), "--cpus", "2"], cwd=ROOT,
                              env={**local_env, "PYTHONPATH": str(TESTS)}, capture_output=True,
                              text=True, timeout=240)
    assert one_node.returncode == 0, one_node.stdout + one_node.stderr
    expected = _metrics(alone)
    assert len(expected) == 2 and _metrics(shared) == expected
