"""Two Ray nodes on this machine, one of them lost mid-trial (issue 19).

A head node and a worker node (`ray.cluster_utils.Cluster`, 1 CPU each); only the worker declares
the custom resource `flare_w` that both trials ask for (`--trial-resource flare_w=1`), so both run
there and the kill hits running trials. The driver is `sweep.py run` attached through RAY_ADDRESS
with `--shared-storage` (tmp_path is a local disk standing in for NFS). The worker node is killed
with SIGKILL mid-trial and a fresh one joins, as a replaced or requeued node would: the sweep
finishes (that run or the next), the trials resume from their checkpoints, and every trial's
metrics equal those of a one-node run. Without --shared-storage the local results folder is
refused first. The fake trainer of tests/test_sweep.py keeps this under a few minutes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
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


def _driver(space: Path, results: Path, *extra: str) -> list[str]:
    return [sys.executable, "-c", FAKE_MAIN, "run", "--space", str(space), "--results", str(results),
            *extra]


def _env(address: str | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(TESTS), "FAKE_STEP_S": "0.25", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    if address:
        env["RAY_ADDRESS"] = address
    return env


def _metrics(results: Path) -> dict[str, dict]:
    """trial id -> the metrics that must not depend on where and how often it ran."""
    out = {}
    for path in sorted((results / "mini" / "trials").glob("*/evals/*/metrics.json")):
        metrics = read_json(path)
        out[metrics["trial_id"]] = {k: metrics.get(k) for k in SAME}
    return out


def _steps_reached(results: Path) -> list[int]:
    return [read_json(p).get("step") or 0 for p in (results / "mini" / "trials").glob("*/progress.json")]


def test_losing_a_worker_node_mid_trial_loses_nothing(tmp_path, monkeypatch):
    cluster_utils = pytest.importorskip("ray.cluster_utils")
    space = _write(tmp_path, SPACE)
    # Raylets started here hand this to their workers: the fake trainer is importable there.
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    cluster = cluster_utils.Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "_system_config": FAST_HEALTH})
    try:
        worker = cluster.add_node(num_cpus=1, resources={"flare_w": 2})
        cluster.wait_for_nodes()
        address = cluster.address
        shared = tmp_path / "shared"
        run = _driver(space, shared, "--trial-resource", "flare_w=1")

        refused = subprocess.run(run, cwd=ROOT, env=_env(address), capture_output=True, text=True,
                                 timeout=180)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "the Ray cluster has 2 nodes but --storage" in refused.stderr
        assert "is on a local disk" in refused.stderr and "--shared-storage" in refused.stderr

        driver = subprocess.Popen([*run, "--shared-storage"], cwd=ROOT, env=_env(address),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 150
        while time.time() < deadline:
            reached = _steps_reached(shared)
            if len(reached) == 2 and min(reached) >= 4:
                break
            assert driver.poll() is None, driver.stdout.read()
            time.sleep(0.2)
        else:
            raise AssertionError(f"trials did not reach step 4: {_steps_reached(shared)}")
        cluster.remove_node(worker, allow_graceful=False)  # SIGKILL: raylet, workers, trials
        cluster.add_node(num_cpus=1, resources={"flare_w": 2})  # its replacement joins
        out, _ = driver.communicate(timeout=240)
        print(out)  # shown with -s: the retries and how the run ended
        if driver.returncode != 0:  # the sweep may need the next run to finish
            again = subprocess.run([*run, "--shared-storage"], cwd=ROOT, env=_env(address),
                                   capture_output=True, text=True, timeout=240)
            assert again.returncode == 0, out + again.stdout + again.stderr
    finally:
        cluster.shutdown()

    calls = (shared / "mini" / "calls.log").read_text().splitlines()
    resumed = [line for line in calls if " start=0 " not in line]
    assert resumed, calls  # the lost trials continued from their checkpoints

    alone = tmp_path / "alone"
    one_node = subprocess.run(_driver(space, alone, "--cpus", "2"), cwd=ROOT,
                              env=_env(None), capture_output=True, text=True, timeout=240)
    assert one_node.returncode == 0, one_node.stdout + one_node.stderr
    expected = _metrics(alone)
    assert len(expected) == 2 and _metrics(shared) == expected
