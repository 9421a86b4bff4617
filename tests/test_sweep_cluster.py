"""sweep.py as a cluster runs it (issue 19): placement and resource fit before anything queues,
the driver's settings reaching trials, SIGTERM like Ctrl-C, two drivers on one folder, the Optuna
study across resumes, and a trial's final state when its files show up late (NFS).

Real Ray (2 CPUs) with the fake trainer of tests/test_sweep.py; trial processes import the test
modules by name (PYTHONPATH=tests/). tests/test_multinode.py runs two Ray nodes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from test_sweep import (
    FAKE_MAIN,
    MINI,
    ROOT,
    SEARCH,
    TESTS,
    _calls,
    _opts,
    _space,
    _variant,
    _write,
    fake_train,
)

import sweep
from cascade.errors import UserError
from cascade.io import cache_dir, read_json
from orchestrator import search as studies
from orchestrator.record import SweepRecord

ONE = _variant(MINI, grid={"k": [2], "lambda_": [0.5]}, reference=False)


def probe_train(cfg, report=None, checkpoint_dir=None, output_dir=None, metrics_file=True) -> dict:
    """fake_train, after writing what the trial process sees to <sweep>/probe.json."""
    sweep_dir = Path(checkpoint_dir).parents[2]
    (sweep_dir / "probe.json").write_text(json.dumps({
        "device": cfg.device, "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "probe": os.environ.get("FLARESWEEP_PROBE"), "cache": os.environ.get("FLARESWEEP_CACHE")}))
    return fake_train(cfg, report=report, checkpoint_dir=checkpoint_dir, output_dir=output_dir,
                      metrics_file=metrics_file)


def _run(tmp_path: Path, space, **changes) -> sweep._Run:
    return sweep._Run(space, SweepRecord((tmp_path / "results" / space.name).resolve()),
                      _opts(tmp_path, **changes))


def _journal(sweep_dir: Path, search) -> optuna.Study:
    storage = studies.open_storage(sweep_dir / studies.JOURNAL)
    return optuna.load_study(study_name=studies.study_name(search), storage=storage)


# -- placement ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_device_auto_is_the_cpu_without_gpus_and_the_drivers_settings_reach_trials(
        ray_session, tmp_path, monkeypatch):
    # Set after Ray started: only what the driver hands over can bring it into the trial.
    monkeypatch.setenv("FLARESWEEP_PROBE", "from-the-driver")
    space = _space(tmp_path, _variant(ONE, fixed={"device": "auto"}))
    assert sweep.run_sweep(space, _opts(tmp_path, train_fn=probe_train)).left == 0
    probe = read_json(tmp_path / "results" / "mini" / "probe.json")
    assert probe == {"device": "cpu", "cuda_visible": "", "probe": "from-the-driver",
                     "cache": str(cache_dir())}


@pytest.mark.slow
def test_a_trial_that_fits_no_node_is_refused_before_anything_queues(ray_session, tmp_path):
    space = _space(tmp_path, _variant(ONE, resources={"cpu": 4, "gpu": 0}))
    with pytest.raises(UserError, match=r"^a trial needs 4 CPU, which no node of the Ray cluster "
                                        r"offers \(1 node\(s\), at most 2 CPU, 0 GPU\); .*"
                                        r"\(--cpus-per-trial 2\)"):
        sweep.run_sweep(space, _opts(tmp_path))
    assert _calls(tmp_path) == []
    sweep._check_cluster(_run(tmp_path, sweep._with_cpus(space, 2)), [space.cells[0].config])
    sweep._check_cluster(_run(tmp_path, space, wait_for_resources=True), [space.cells[0].config])
    with pytest.raises(UserError, match=r"drop --trial-resource node_w"):
        sweep._check_cluster(_run(tmp_path, sweep._with_cpus(space, 1),
                                  trial_resources={"node_w": 1.0}), [space.cells[0].config])


def test_cuda_ranks_without_a_gpu_each_are_refused_before_anything_queues(tmp_path):
    # Refused when the space is loaded: before Ray starts, before any base network is built.
    with pytest.raises(UserError, match=r"workers=2 \(ddp on CUDA\) needs 2 whole GPUs per trial"):
        _space(tmp_path, _variant(ONE, fixed={"device": "auto", "backend": "ddp", "workers": 2},
                                  resources={"cpu": 1, "gpu": 1}))


def test_run_flags_for_resources():
    assert sweep._trial_resources(["node_w=1", "big_mem=0.5"]) == {"node_w": 1.0, "big_mem": 0.5}
    for bad in ("node_w", "node_w=0", "=1", "w=x"):
        with pytest.raises(UserError, match="expected NAME=AMOUNT with an amount > 0"):
            sweep._trial_resources([bad])
    with pytest.raises(UserError, match="use --cpus-per-trial / --gpus-per-trial"):
        sweep._trial_resources(["GPU=1"])
    with pytest.raises(UserError, match=r"--cpus-per-trial 0 is invalid"):
        sweep._with_cpus(None, 0)


# -- signals --------------------------------------------------------------------------------------


def test_sigterm_and_sigusr1_are_handed_to_whatever_handles_sigint():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        sweep._interrupt_on_signals()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # no Tune run: KeyboardInterrupt
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), sig)
                time.sleep(1)
        got: list[int] = []
        signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))  # Tune's, in fit()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        assert got == [signal.SIGINT] and sweep._SIGNALLED[-1] == "SIGTERM"
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@pytest.mark.slow
def test_sigterm_stops_like_ctrl_c_and_a_second_driver_is_told_who_runs(tmp_path):
    _write(tmp_path, _variant(MINI, fixed={"steps": 400}, reference=False))
    env = {**os.environ, "PYTHONPATH": str(TESTS), "FAKE_STEP_S": "0.05", "FLARESWEEP_LOCK": "lease"}
    cmd = [sys.executable, "-c", FAKE_MAIN, "run", "--space", str(tmp_path / "space.yaml"),
           "--results", str(tmp_path / "results"), "--cpus", "2"]
    first = subprocess.Popen(cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, env=env)
    sweep_dir = tmp_path / "results" / "mini"
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not any(sweep_dir.glob("trials/*/checkpoints/last.json")):
            assert first.poll() is None, first.stdout.read()
            time.sleep(0.5)
        run_id = read_json(sweep_dir / "run.json")["run_id"]
        second = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, env=env, timeout=120)
        assert second.returncode == 2, second.stdout + second.stderr
        assert second.stderr.startswith(
            f"error: {sweep_dir} is in use by another `sweep.py run` (run {run_id}, pid "
            f"{first.pid} on {socket.gethostname()}"), second.stderr
        lines = sweep.status(tmp_path / "space.yaml", tmp_path / "results")
        assert any(" running " in line for line in lines), lines
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, out
    assert "interrupted. Run the same command again to resume" in out
    assert "stopped by SIGTERM; run the same command again to resume." in out
    assert "SIGTERM received" not in out and "Tuner.restore" not in out
    lines = sweep.status(tmp_path / "space.yaml", tmp_path / "results")
    assert any(" interrupted " in line for line in lines), lines


# -- the search study -----------------------------------------------------------------------------

STUDY = _variant(SEARCH, reference=False, max_concurrent=1,
                 search={"num_samples": 4, "seed": 3, "params": {"lambda_": {"uniform": [0.0, 1.0]}}})


@pytest.mark.slow
def test_the_study_survives_resumes_and_a_narrowed_bound(ray_session, tmp_path, capsys):
    space = _space(tmp_path, STUDY)
    sweep_dir = tmp_path / "results" / "mini"
    assert sweep.run_sweep(space, _opts(tmp_path)).left == 0
    study = _journal(sweep_dir, space.search)
    record = SweepRecord(sweep_dir)
    states = Counter(t.state.name for t in study.get_trials())
    cells = [c for c in read_json(sweep_dir / "sweep.json")["cells"] if "sampled" in c]
    stopped = [c for c in cells if (record.trial_dir(c["trial_id"]) / "stopped.json").is_file()]
    assert len(cells) == 4 and states == {"COMPLETE": 4 - len(stopped), "PRUNED": len(stopped)}
    assert stopped, "seed 3 stops one of four at the first rung; the PRUNED check needs one"
    for trial in study.get_trials():
        steps = set(trial.intermediate_values)
        assert 2 in steps and steps <= {2, 4, 6}, steps  # keyed by step (2, 4, 6), not 1, 2, 3
    # A driver that died with a trial RUNNING in the study; then one sample more.
    study.ask({"lambda_": optuna.distributions.FloatDistribution(0.0, 1.0)})
    capsys.readouterr()
    more = _space(tmp_path, _variant(STUDY, search={"num_samples": 5}))
    assert sweep.run_sweep(more, _opts(tmp_path)).left == 0
    out = capsys.readouterr().out
    assert "continuing study" in out and "1 a stopped run left running marked failed" in out
    states = Counter(t.state.name for t in _journal(sweep_dir, space.search).get_trials())
    assert states["FAIL"] == 1 and states["COMPLETE"] + states["PRUNED"] == 5  # no second warm start
    # Narrowing the bound after samples exist: no ValueError; the samples that fit are kept.
    values = [c["sampled"]["lambda_"] for c in read_json(sweep_dir / "sweep.json")["cells"]
              if "sampled" in c]
    inside = sum(v <= 0.5 for v in values)
    assert 0 < inside < 5, values
    narrow = _space(tmp_path, _variant(STUDY, search={
        "num_samples": 6, "params": {"lambda_": {"uniform": [0.0, 0.5]}}}))
    assert sweep.run_sweep(narrow, _opts(tmp_path)).left == 0
    out = capsys.readouterr().out
    assert f"keeps {inside} of 5 samples of study {studies.study_name(space.search)}, dropped " \
           f"{5 - inside} outside it: lambda_=" in out, out
    kept = _journal(sweep_dir, narrow.search).get_trials()
    assert all(t.params["lambda_"] <= 0.5 for t in kept) and len(kept) == inside + 1


@pytest.mark.slow
def test_identical_choice_proposals_never_train_one_folder_twice(ray_session, tmp_path):
    # TPE with seed 1 proposes lambda_=0.75 twice in a row; both trials would share one folder.
    space = _space(tmp_path, _variant(SEARCH, reference=False, max_concurrent=2, fixed={"steps": 60},
                                      search={"num_samples": 2, "seed": 1, "scheduler": None,
                                              "params": {"lambda_": {"choice": [0.25, 0.75]}}}))
    assert sweep.run_sweep(space, _opts(tmp_path)).left == 0
    trained = Counter(line.split()[0] for line in _calls(tmp_path))
    assert len(trained) == 2 and set(trained.values()) == {1}, trained
    study = _journal(tmp_path / "results" / "mini", space.search)
    twins = [t for t in study.get_trials() if "duplicate_of" in t.user_attrs]
    assert twins and all(t.state.name in ("COMPLETE", "PRUNED") for t in twins)


# -- a trial's final state comes from Tune, its files may show up late -------------------------------


def _tune_trial(cell, trial_id: str = "tune-1", error: Exception | None = None) -> SimpleNamespace:
    """What the progress callback reads of a Tune trial (config as _run_tuner builds a grid's)."""
    return SimpleNamespace(config={"cell": {"config": cell.config.to_dict(),
                                            "fingerprints": cell.fingerprints}},
                           trial_id=trial_id, last_result={"step": 6, "psnr_entire": 21.0},
                           num_failures=1, get_error=lambda: "Traceback ...\nboom",
                           get_pickled_error=lambda: error)


def _later(seconds: float, write) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(seconds), write()))
    thread.start()
    return thread


def test_final_states_wait_for_files_another_node_wrote(tmp_path, monkeypatch):
    from ray.exceptions import ActorDiedError, RayTaskError

    monkeypatch.setenv("FLARESWEEP_SETTLE_S", "20")
    space = _space(tmp_path, _variant(MINI, grid={"k": [1, 2], "lambda_": [0.5, 1.0]}, reference=False))
    run = _run(tmp_path, space)
    finished, raised, cut = space.cells[:3]
    callback = sweep._progress_callback(run)
    # A trial that returned: its metrics.json appears a second later (an NFS attribute cache).
    writer = _later(1.0, lambda: run.record.write_metrics(finished.trial_id, finished.eval_id,
                                                          {"psnr_entire": 21.0, "steps": 6}))
    start = time.monotonic()
    callback.on_trial_complete(0, [], _tune_trial(finished))
    writer.join()
    assert time.monotonic() - start >= 0.9
    assert not (run.record.trial_dir(finished.trial_id) / "stopped.json").exists()
    assert run.record.status(finished.trial_id, finished.eval_id).state == "done"
    # A trial that raised: its own error.json appears late and must not be overwritten.
    error = RayTaskError("train", "Traceback ...", FloatingPointError("non-finite loss"))
    writer = _later(1.0, lambda: run.record.write_error(raised.trial_id, "FloatingPointError: "
                                                        "non-finite loss at step 5", "tb", 5))
    callback.on_trial_error(0, [], _tune_trial(raised, "tune-2", error))
    writer.join()
    assert read_json(run.record.trial_dir(raised.trial_id) / "error.json")["error"] == \
        "FloatingPointError: non-finite loss at step 5"
    # A trial whose process died leaves no error.json: the driver writes one, at once.
    run.record.start_attempt(raised.trial_id)
    start = time.monotonic()
    callback.on_trial_error(0, [], _tune_trial(raised, "tune-3", ActorDiedError()))
    assert time.monotonic() - start < 5
    assert read_json(run.record.trial_dir(raised.trial_id) / "error.json")["error"].startswith(
        "trial process died")
    # A trial the scheduler stopped: stopped.json at once, no waiting for a metrics.json.
    run.stopped.add("tune-4")
    start = time.monotonic()
    callback.on_trial_complete(0, [], _tune_trial(cut, "tune-4"))
    assert time.monotonic() - start < 5
    assert read_json(run.record.trial_dir(cut.trial_id) / "stopped.json")["step"] == 6
