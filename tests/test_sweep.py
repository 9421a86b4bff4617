"""sweep.py: Ray Tune runs of small spaces with a fast fake train(), resume from the results folder.

The fake `fake_train` has train()'s signature and writes the documented results layout; it appends
one line per call to <sweep>/calls.log, so a test can prove that no training happened. Ray runs
for real (2 CPUs); the trial processes import this module by name (PYTHONPATH=tests/).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

import sweep
from cascade.io import atomic_write_json, read_json
from orchestrator.record import SweepRecord
from orchestrator.space import TOP_KEYS, load_space

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


# -- the fake trainer (runs inside Ray trial processes) ------------------------------------------


def fake_train(cfg, report=None, checkpoint_dir=None, output_dir=None, metrics_file=True) -> dict:
    """train() stand-in: cfg.steps steps of nothing, checkpoints, metrics that depend on k and λ.

    Resumes from `checkpoint_dir/last.json`. Fails at `cfg.fail_at_step`. When the sweep folder
    holds a file `crash-<trial folder>`, the process dies (os._exit) once, at step 3.
    """
    out, ckpt = Path(output_dir), Path(checkpoint_dir)  # trials/<id>/evals/<eval>, trials/<id>/checkpoints
    trial, sweep_dir = ckpt.parent.name, ckpt.parents[2]
    start = read_json(ckpt / "last.json")["step"] if (ckpt / "last.json").exists() else 0
    with open(sweep_dir / "calls.log", "a") as fh:
        fh.write(f"{trial} start={start} eval={out.name}\n")
    atomic_write_json(out / "config.json", cfg.to_dict())
    for step in range(start + 1, (cfg.steps if cfg.kind == "cascade" else 0) + 1):
        time.sleep(float(os.environ.get("FAKE_STEP_S", "0.05")))
        if cfg.fail_at_step == step:
            raise FloatingPointError(f"non-finite loss at step {step}\nsecond line")
        crash = sweep_dir / f"crash-{trial}"
        if step == 3 and crash.exists():
            crash.unlink()
            os._exit(3)
        if step % cfg.checkpoint_every == 0:
            atomic_write_json(ckpt / "last.json", {"step": step})
        if report is not None and step % cfg.log_every == 0:
            report({"step": step, "loss": 1.0 / step, "psnr_entire": _psnr(cfg) * step / cfg.steps},
                   str(ckpt))
    psnr = _psnr(cfg)
    (out / "per_image.csv").write_text(
        "image,region,metric,value\n" + "".join(f"img{i}.png,entire,psnr,{psnr}\n" for i in range(2)))
    metrics = {"psnr_entire": psnr, "psnr_streak": psnr + 6, "psnr_glare": psnr + 3,
               "ssim_entire": 0.8, "ssim_streak": 0.9, "ssim_glare": 0.85, "n_images": 2,
               "steps": cfg.steps, "wall_s": 0.5, "protocol": cfg.protocol}
    if metrics_file:
        atomic_write_json(out / "metrics.json", metrics)
    return metrics


def _psnr(cfg) -> float:
    return 20.0 if cfg.kind == "reference" else 20.0 + cfg.lambda_ + cfg.k / 10 - (cfg.margin - 0.1) ** 2


def fake_base(cfg) -> Path:
    return Path("/nonexistent/fake-base.pth")


# -- helpers ----------------------------------------------------------------------------------

# A reduced demo grid for the sweep tests. Spaces are built from dicts (`_variant`), so a change
# that no longer applies fails loudly instead of silently testing the unchanged space.
MINI: dict[str, Any] = {
    "name": "mini",
    "grid": {"k": [1, 2], "lambda_": [1.0, 0.0]},
    "fixed": {"steps": 6, "log_every": 2, "checkpoint_every": 2, "encoder": "small_cpu",
              "encoder_pretrained": False},
    # The control row is off: these tests count the machinery's trials (tests/test_paper_setup.py
    # runs a sweep with it).
    "reference": True, "control": False, "seeds": [0], "resources": {"cpu": 1, "gpu": 0},
    "max_concurrent": 2, "max_failures": 0,
}

# An Optuna search over lambda_ and margin, early-stopped by ASHA, on the fake trainer.
SEARCH: dict[str, Any] = {
    "name": "mini",
    "fixed": {"k": 2, "steps": 6, "log_every": 2, "checkpoint_every": 2},
    "reference": True, "control": False, "seeds": [0], "resources": {"cpu": 1}, "max_concurrent": 2,
    "search": {"algorithm": "optuna", "metric": "psnr_entire", "mode": "max", "num_samples": 3,
               "seed": 1, "params": {"lambda_": {"uniform": [0.0, 1.0]},
                                     "margin": {"loguniform": [0.01, 1.0]}},
               "scheduler": {"asha": {"grace_period": 2, "reduction_factor": 2}}},
}


def _variant(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """`base` with top-level keys replaced; `grid`, `fixed` and `search` are merged one level deep
    (a value of None removes the key). Every merged key must exist or be new on purpose."""
    space = copy.deepcopy(base)
    for key, value in changes.items():
        if key in ("grid", "fixed", "search") and isinstance(value, dict):
            for sub, v in value.items():
                if v is None:
                    del space[key][sub]  # KeyError if it was not there
                else:
                    space[key][sub] = v
        elif value is None:
            del space[key]
        else:
            space[key] = value
    return space


def _write(tmp_path: Path, space: dict[str, Any], name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text("# A reduced demo grid for the sweep tests.\n" + yaml.safe_dump(space, sort_keys=False))
    return path


def _space(tmp_path: Path, space: dict[str, Any] = MINI, name: str = "space.yaml"):
    return load_space(_write(tmp_path, space, name))


def _opts(tmp_path: Path, **changes) -> sweep.RunOptions:
    return sweep.RunOptions(**{"results": tmp_path / "results", "train_fn": fake_train,
                               "prepare": (fake_base,), **changes})


def _calls(tmp_path: Path, sweep_name: str = "mini", evals: bool = False) -> list[str]:
    """`<trial> start=<step>` per call of the fake trainer (with ` eval=<eval id>` if `evals`)."""
    log = tmp_path / "results" / sweep_name / "calls.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return lines if evals else [line.split(" eval=")[0] for line in lines]


def test_what_tune_keeps_per_trial_does_not_grow_with_the_grid(tmp_path):
    """Issue 21: Tune pickles each trial's name functions and config into its state; closures over
    the space made that O(cells) per trial. The grid searcher hands out cells in plan order."""
    cloudpickle = pytest.importorskip("ray.cloudpickle")
    from ray.tune.search import Searcher

    sizes = {}
    for n in (2, 60):
        lambdas = [round(1.0 - i / 100, 2) for i in range(n)]
        space = _space(tmp_path, _variant(MINI, name=f"g{n}", grid={"lambda_": lambdas}), f"s{n}.yaml")
        cells = space.trials()
        searcher = sweep._grid_searcher(cells)
        configs = [searcher.suggest(str(i)) for i in range(len(cells))]
        assert searcher.suggest("one more") == Searcher.FINISHED
        assert [c[sweep.TRIAL_KEY] for c in configs] == [c.trial_id for c in cells]
        trial = SimpleNamespace(trial_id="abc12", config=configs[-1])
        assert sweep._trial_name(trial) == cells[-1].trial_id
        assert sweep._trial_dirname(trial) == f"{cells[-1].trial_id}-abc12"
        assert sweep._cell_of(configs[-1], space) == cells[-1]
        assert sweep._TrialCells(space, cells)(trial) is cells[-1]  # looked up, not rebuilt
        sizes[n] = [len(cloudpickle.dumps(x)) for x in (sweep._trial_name, sweep._trial_dirname,
                                                        configs[-1])]
    assert sizes[60][:2] == sizes[2][:2]
    assert abs(sizes[60][2] - sizes[2][2]) < 16  # one cell's config, whatever the grid
    search = _space(tmp_path, SEARCH, "search.yaml")
    values = {"lambda_": 0.25, "margin": 0.1}
    expected = sweep.cell_for(search.search_config(values), fingerprints=search.search_fingerprints)
    trial = SimpleNamespace(trial_id="def34", config={**values, sweep.TRIAL_KEY: expected.trial_id})
    assert sweep._TrialCells(search, None)(trial) == expected
    assert sweep._trial_name(trial) == expected.trial_id


def test_a_grid_without_a_cap_keeps_tunes_own_queue_of_pending_trials(monkeypatch):
    """Tune queues one trial ahead for a searcher without max_concurrent, 200 (or 1.1 x CPUs) for
    its grid_search: an uncapped grid (table1.yaml) must keep showing the autoscaler its demand."""
    monkeypatch.delenv("TUNE_MAX_PENDING_TRIALS_PG", raising=False)
    assert sweep._grid_pending(None, 64.0) == {"TUNE_MAX_PENDING_TRIALS_PG": "200"}
    assert sweep._grid_pending(None, 1000.0) == {"TUNE_MAX_PENDING_TRIALS_PG": "1100"}
    assert sweep._grid_pending(8, 1000.0) == {}  # Tune queues up to the cap itself
    monkeypatch.setenv("TUNE_MAX_PENDING_TRIALS_PG", "5")
    assert sweep._grid_pending(None, 64.0) == {}  # the user's setting wins


# -- tests with real Ray ---------------------------------------------------------------------------


@pytest.mark.slow
def test_grid_runs_every_cell_then_resume_skips_and_new_cells_run_alone(ray_session, tmp_path, capsys):
    space = _space(tmp_path)
    assert sweep.run_sweep(space, _opts(tmp_path)).left == 0
    sweep_dir = tmp_path / "results" / "mini"
    plan = read_json(sweep_dir / "sweep.json")
    assert len(plan["cells"]) == 5  # reference + 2 k x 2 lambda_
    ids = {c["trial_id"] for c in plan["cells"]}
    assert len(ids) == 4  # the λ=0 pair is one trial
    record = SweepRecord(sweep_dir)
    for cell in plan["cells"]:
        tid, eid = cell["trial_id"], cell["eval_id"]
        metrics = record.read_metrics(tid, eid)
        assert metrics["trial_id"] == tid and metrics["eval_id"] == eid
        assert metrics["provenance"]["fingerprints"] == cell["fingerprints"]
        assert record.per_image_path(tid, eid).is_file()
        assert record.read_config(tid, eid)["seed"] == 0
    calls = _calls(tmp_path)
    assert sorted(line.split()[0] for line in calls) == sorted(ids)
    out = capsys.readouterr().out
    assert "4/4 done" in out and "complete" in out

    # Re-running: nothing trains, Ray is not even needed.
    assert sweep.run_sweep(space, _opts(tmp_path)).left == 0
    assert _calls(tmp_path) == calls
    assert "nothing to run" in capsys.readouterr().out

    # A cell added to the space runs alone.
    bigger = _space(tmp_path, _variant(MINI, grid={"lambda_": [1.0, 0.5, 0.0]}))
    assert sweep.run_sweep(bigger, _opts(tmp_path)).left == 0
    new = _calls(tmp_path)[len(calls):]
    assert sorted(line.split()[0] for line in new) == sorted(
        c.trial_id for c in bigger.trials() if c.lambda_ == 0.5)
    assert len(read_json(sweep_dir / "sweep.json")["cells"]) == 7

    lines = sweep.status(tmp_path / "space.yaml", tmp_path / "results")
    assert len(lines) == 8 and all(" done " in line for line in lines[:-1])
    assert lines[-1].startswith("mini: 6/6 done, 0 running, 0 failed, 0 pending")


@pytest.mark.slow
def test_failed_trial_is_recorded_and_retried_interrupted_one_resumes(ray_session, tmp_path):
    space = _space(tmp_path, _variant(MINI, grid={"lambda_": [1.0]}, reference=False,
                                      fixed={"fail_at_step": 5}))
    sweep_dir = tmp_path / "results" / "mini"
    assert sweep.run_sweep(space, _opts(tmp_path)).left == 2
    lines = sweep.status(tmp_path / "space.yaml", tmp_path / "results")
    assert all("failed" in line and "FloatingPointError: non-finite loss at step 5" in line
               for line in lines[:2])
    error = read_json(sweep_dir / "trials" / space.cells[0].trial_id / "error.json")
    assert error["error"] == "FloatingPointError: non-finite loss at step 5"
    assert "Traceback" in error["traceback"] and error["step"] == 4

    # --no-retry-failed leaves them alone; the default retries them (from their checkpoints).
    assert sweep.run_sweep(space, _opts(tmp_path, retry_failed=False)).left == 2
    assert len(_calls(tmp_path)) == 2
    assert sweep.run_sweep(space, _opts(tmp_path)).left == 2
    assert sorted(_calls(tmp_path)[2:]) == sorted(f"{c.trial_id} start=4" for c in space.cells)
    assert (sweep_dir / "trials" / space.cells[0].trial_id / "error.previous.json").is_file()

    # A trial whose process dies is failed with a message, then resumes from its checkpoint.
    ok = _space(tmp_path, _variant(MINI, grid={"lambda_": [0.5]}, reference=False), name="ok.yaml")
    victim = ok.cells[0].trial_id
    (sweep_dir / f"crash-{victim}").touch()
    assert sweep.run_sweep(ok, _opts(tmp_path)).left == 1
    error = read_json(sweep_dir / "trials" / victim / "error.json")
    assert error["error"].startswith("trial process died")
    assert sweep.run_sweep(ok, _opts(tmp_path)).left == 0
    assert _calls(tmp_path)[-1] == f"{victim} start=2"
    assert SweepRecord(sweep_dir).read_metrics(victim, ok.cells[0].eval_id)["trial_id"] == victim


@pytest.mark.slow
def test_interrupted_trial_continues_from_its_checkpoint(ray_session, tmp_path):
    space = _space(tmp_path, _variant(MINI, grid={"k": [2], "lambda_": [0.6]}, reference=False))
    tid = space.cells[0].trial_id
    tdir = tmp_path / "results" / "mini" / "trials" / tid
    # What a killed run leaves: a checkpoint and a stale heartbeat of another run.
    atomic_write_json(tdir / "checkpoints" / "last.json", {"step": 4})
    atomic_write_json(tdir / "progress.json", {"run_id": "old", "step": 4, "steps": 6})
    lines = sweep.status(tmp_path / "space.yaml", tmp_path / "results")
    assert "nothing run yet" in lines[0]
    assert sweep.run_sweep(space, _opts(tmp_path)).left == 0
    assert _calls(tmp_path) == [f"{tid} start=4"]


@pytest.mark.slow
def test_optuna_search_records_its_trials_and_resumes(ray_session, tmp_path):
    space = _space(tmp_path, SEARCH)
    left = sweep.run_sweep(space, _opts(tmp_path)).left
    sweep_dir = tmp_path / "results" / "mini"
    plan = read_json(sweep_dir / "sweep.json")
    sampled = [c for c in plan["cells"] if "sampled" in c]
    assert left == 0 and len(sampled) == 3 and plan["cells"][0]["kind"] == "reference"
    for cell in sampled:
        assert 0.0 <= cell["lambda_"] <= 1.0 and cell["config"]["margin"] == cell["sampled"]["margin"]
        state = SweepRecord(sweep_dir).status(cell["trial_id"], cell["eval_id"]).state
        assert state in ("done", "stopped")
    assert len(_calls(tmp_path)) == 4

    # Asking for more samples runs only the new ones (warm-started from the finished three).
    more = _space(tmp_path, _variant(SEARCH, search={"num_samples": 4}))
    assert sweep.run_sweep(more, _opts(tmp_path)).left == 0
    assert len(_calls(tmp_path)) == 5
    assert len([c for c in read_json(sweep_dir / "sweep.json")["cells"] if "sampled" in c]) == 4


@pytest.mark.slow
def test_asha_stops_trials_that_report_a_worse_metric_while_training(ray_session, tmp_path):
    # One trial at a time, so each reaches ASHA's rung (step 2) after the previous ones. The fake
    # reports psnr_entire growing with lambda_ at every log step (as train() does with eval_every).
    # Sampler seeds 0-5 all give 2-4 stopped trials of 6, so this does not hinge on seed 3.
    space = _space(tmp_path, _variant(
        SEARCH, reference=False, max_concurrent=1,
        search={"num_samples": 6, "seed": 3, "params": {"lambda_": {"uniform": [0.0, 1.0]}}}))
    assert sweep.run_sweep(space, _opts(tmp_path)).left == 0
    sweep_dir = tmp_path / "results" / "mini"
    cells = [c for c in read_json(sweep_dir / "sweep.json")["cells"] if "sampled" in c]
    record = SweepRecord(sweep_dir)
    stopped = [c for c in cells if record.status(c["trial_id"], c["eval_id"]).state == "stopped"]
    done = [c for c in cells if record.status(c["trial_id"], c["eval_id"]).state == "done"]
    assert len(cells) == 6 and stopped and done and len(stopped) + len(done) == 6
    # A trial is stopped only for being worse than one that reached the rung before it.
    for cell in stopped:
        earlier = cells[: cells.index(cell)]
        assert any(c["lambda_"] > cell["lambda_"] for c in earlier)
        info = read_json(sweep_dir / "trials" / cell["trial_id"] / "stopped.json")
        assert info["step"] < 6 and "psnr_entire" in info["metrics"]
    lines = sweep.status(tmp_path / "space.yaml", tmp_path / "results")
    assert any("stopped" in line and "PSNR entire" in line for line in lines)
    # Stopped trials are final: running again trains nothing.
    calls = len(_calls(tmp_path))
    assert sweep.run_sweep(space, _opts(tmp_path)).left == 0 and len(_calls(tmp_path)) == calls


def _tiny_checkpoint(path: Path) -> Path:
    from cascade.uformer import Uformer, save_checkpoint

    save_checkpoint(Uformer(img_size=32, embed_dim=8, depths=(1,) * 9), path)
    return path


def _with_checkpoint(checkpoint: Path) -> dict[str, Any]:
    from dataclasses import fields as dc_fields

    from cascade.config import TrialConfig

    fixed = {"checkpoint": str(checkpoint)}
    if "base_kind" in {f.name for f in dc_fields(TrialConfig)}:
        fixed["base_kind"] = "flare7kpp"
    return _variant(MINI, fixed=fixed, grid={"lambda_": [1.0]}, reference=False)


@pytest.mark.slow
def test_identity_is_content_not_path_and_a_new_protocol_reevaluates(ray_session, tmp_path):
    ckpt = _tiny_checkpoint(tmp_path / "a" / "net.pth")
    space = _space(tmp_path, _with_checkpoint(ckpt))
    assert sweep.run_sweep(space, _opts(tmp_path)).left == 0
    calls = _calls(tmp_path)
    assert sorted(calls) == sorted(f"{c.trial_id} start=0" for c in space.cells)

    # The same bytes on another mount: the same trials, nothing runs.
    moved = tmp_path / "elsewhere" / "net.pth"
    moved.parent.mkdir()
    moved.write_bytes(ckpt.read_bytes())
    table = sweep.table1(tmp_path / "space.yaml", tmp_path / "results")
    before_csv = (tmp_path / "results" / "mini" / "masked" / "table1.csv").read_text()
    same = _space(tmp_path, _with_checkpoint(moved))
    assert [c.trial_id for c in same.cells] == [c.trial_id for c in space.cells]
    assert [c.eval_id for c in same.cells] == [c.eval_id for c in space.cells]
    assert sweep.run_sweep(same, _opts(tmp_path)).left == 0 and _calls(tmp_path) == calls
    assert sweep.table1(tmp_path / "space.yaml", tmp_path / "results") == table
    assert (tmp_path / "results" / "mini" / "masked" / "table1.csv").read_text() == before_csv

    # Another protocol: every trial is evaluated again from its last checkpoint (step 6 of 6),
    # beside the first evaluation, which stays as it was.
    record = SweepRecord(tmp_path / "results" / "mini")
    before = {c.trial_id: record.read_metrics(c.trial_id, c.eval_id) for c in space.cells}
    flare7k = load_space(_write(tmp_path, _with_checkpoint(moved)), protocol="flare7k")
    assert {c.trial_id for c in flare7k.cells} == set(before)
    assert not {c.eval_id for c in flare7k.cells} & {c.eval_id for c in space.cells}
    lines = sweep.status(tmp_path / "space.yaml", tmp_path / "results", protocol="flare7k")
    assert all(" trained " in line and "other evaluations: masked-" in line for line in lines[:-1])
    assert sweep.run_sweep(flare7k, _opts(tmp_path)).left == 0
    assert sorted(_calls(tmp_path)[len(calls):]) == sorted(f"{c.trial_id} start=6" for c in flare7k.cells)
    for c in flare7k.cells:
        assert record.read_metrics(c.trial_id, c.eval_id)["protocol"] == "flare7k"
    assert {c.trial_id: record.read_metrics(c.trial_id, c.eval_id) for c in space.cells} == before
    sweep.table1(tmp_path / "space.yaml", tmp_path / "results", protocol="flare7k")
    assert (tmp_path / "results" / "mini" / "flare7k" / "table1.csv").is_file()
    assert (tmp_path / "results" / "mini" / "masked" / "table1.csv").read_text() == before_csv

    # One byte of the checkpoint changes: every trial is new.
    data = bytearray(moved.read_bytes())
    data[-1] ^= 1
    moved.write_bytes(bytes(data))
    changed = _space(tmp_path, _with_checkpoint(moved))
    assert not {c.trial_id for c in changed.cells} & set(before)


@pytest.mark.slow
def test_a_deterministic_failure_is_not_retried_unless_asked(ray_session, tmp_path):
    space = _space(tmp_path, _variant(MINI, grid={"lambda_": [1.0], "k": [2]}, reference=False,
                                      fixed={"fail_at_step": 3}))
    tid = space.cells[0].trial_id
    raising = _opts(tmp_path, train_fn=fake_train_user_error)
    assert sweep.run_sweep(space, raising).left == 1
    status = SweepRecord(tmp_path / "results" / "mini").status(tid, space.cells[0].eval_id)
    assert status.state == "failed" and status.deterministic
    lines = sweep.status(tmp_path / "space.yaml", tmp_path / "results")
    assert "(deterministic; not retried without --retry-failed) UserError: bad input" in lines[0]
    assert sweep.run_sweep(space, raising).left == 1 and len(_calls(tmp_path)) == 1  # left alone
    again = _opts(tmp_path, retry_failed=True, train_fn=fake_train_user_error)
    assert sweep.run_sweep(space, again).left == 1  # asked: retried (and fails the same way)
    assert _calls(tmp_path) == [f"{tid} start=0", f"{tid} start=2"]


@pytest.mark.slow
def test_an_input_changed_after_planning_fails_its_trial_in_one_line(ray_session, tmp_path):
    weights = tmp_path / "encoder.pth"
    weights.write_bytes(b"encoder weights")
    space = _space(tmp_path, _variant(MINI, grid={"k": [2], "lambda_": [0.5]}, reference=False,
                                      fixed={"encoder_pretrained": True, "encoder_weights": str(weights)}))
    weights.write_bytes(b"other weights!!")  # between planning (load_space) and the trial's start
    assert sweep.run_sweep(space, _opts(tmp_path)).left == 1
    status = SweepRecord(tmp_path / "results" / "mini").status(space.cells[0].trial_id,
                                                               space.cells[0].eval_id)
    assert status.state == "failed" and status.deterministic
    assert status.error.startswith(f"UserError: {weights}: changed since the sweep was planned")
    assert _calls(tmp_path) == []  # nothing trained on the mixed inputs


def fake_train_user_error(cfg, report=None, checkpoint_dir=None, output_dir=None,
                          metrics_file=True) -> dict:
    """fake_train whose failure at `fail_at_step` is a UserError (it repeats from the checkpoint)."""
    try:
        return fake_train(cfg, report, checkpoint_dir, output_dir, metrics_file)
    except FloatingPointError:
        from cascade.errors import UserError

        raise UserError("bad input at step 3") from None


# -- command line ------------------------------------------------------------------------------


def _cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "sweep.py"), *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout, env={**os.environ, **(env or {})})


# `sweep.py` as a process, with the fake trainer and base: main() takes them as arguments, and the
# trial processes import this module by name (PYTHONPATH=tests/).
FAKE_MAIN = ("import sys, sweep, test_sweep; sys.exit(sweep.main(sys.argv[1:], "
             "train_fn=test_sweep.fake_train, prepare=(test_sweep.fake_base,)))")


def test_unreachable_ray_address_is_a_one_line_error(tmp_path):
    _write(tmp_path, MINI)
    env = {"RAY_ADDRESS": "127.0.0.1:1"}
    start = time.time()
    proc = _cli("run", "--space", str(tmp_path / "space.yaml"), "--results", str(tmp_path / "r"),
                "--connect-timeout", "5", env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: cannot reach Ray at RAY_ADDRESS=127.0.0.1:1")
    assert time.time() - start < 60


def test_schema_errors_exit_2_with_one_line(tmp_path):
    _write(tmp_path, _variant(MINI, max_failures=None, max_failure=0), "bad.yaml")
    proc = _cli("run", "--space", str(tmp_path / "bad.yaml"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: {tmp_path / 'bad.yaml'}: unknown key 'max_failure'; "
                                   "expected one of " + ", ".join(TOP_KEYS))
    proc = _cli("run", "--space", "search_spaces/table1.yaml")
    assert proc.returncode == 2 and "needs --data DIR and --checkpoint PATH and --test-data DIR" in proc.stderr


def test_help_of_each_subcommand(tmp_path):
    for command, words in (("run", ("--space", "--storage", "--gpus-per-trial", "--retry-failed",
                                    "RAY_ADDRESS")),
                           ("status", ("--space", "--results")), ("table1", ("--space",))):
        proc = _cli(command, "--help")
        assert proc.returncode == 0
        for word in words:
            assert word in proc.stdout, (command, word)


@pytest.mark.slow
def test_sigint_stops_cleanly_and_says_how_to_resume(tmp_path):
    _write(tmp_path, _variant(MINI, fixed={"steps": 400}, reference=False))
    env = {"PYTHONPATH": str(TESTS), "FAKE_STEP_S": "0.05"}
    proc = subprocess.Popen(
        [sys.executable, "-c", FAKE_MAIN, "run", "--space", str(tmp_path / "space.yaml"),
         "--results", str(tmp_path / "results"), "--cpus", "2"],
        cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, **env})
    sweep_dir = tmp_path / "results" / "mini"
    deadline = time.time() + 180
    while time.time() < deadline and not any(
            (p / "last.json").exists() for p in sweep_dir.glob("trials/*/checkpoints")):
        time.sleep(1)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "interrupted. Run the same command again" in out
    assert "Tuner.restore" not in out
    lines = sweep.status(tmp_path / "space.yaml", tmp_path / "results")
    assert any(" interrupted " in line for line in lines), lines
    assert json.loads((sweep_dir / "sweep.json").read_text())["name"] == "mini"


def test_multi_node_cluster_needs_shared_storage(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": True}, {"Alive": False}])
    sweep_dir = tmp_path / "results" / "mini"
    with pytest.raises(sweep.UserError, match=r"has 2 nodes but --storage .* is on a local disk"):
        sweep._storage(_opts(tmp_path, storage=str(tmp_path / "ray")), sweep_dir)
    with pytest.raises(sweep.UserError, match=r"the results folder \(--results\) .* local disk"):
        sweep._storage(_opts(tmp_path, storage="s3://bucket/ray"), sweep_dir)
    trusted = _opts(tmp_path, storage=str(tmp_path / "ray"), shared_storage=True)
    assert sweep._storage(trusted, sweep_dir) == str(tmp_path / "ray")
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}])  # one node: local is fine
    assert sweep._storage(_opts(tmp_path), sweep_dir) == str(sweep_dir / "ray")
