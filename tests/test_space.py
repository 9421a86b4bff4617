"""cascade.space: search-space schema, cell expansion, trial ids, λ=0 dedupe, trial states."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from cascade.config import TrialConfig
from cascade.errors import UserError
from cascade.io import atomic_write_json
from cascade.space import (
    LAMBDA0_K,
    SweepLock,
    TrialStatus,
    active_run,
    format_duration,
    load_space,
    progress_line,
    space_name,
    sweep_eta,
    trial_id,
    trial_status,
)

ROOT = Path(__file__).resolve().parents[1]

GRID = """\
# Which k and lambda_ are best? (a test space)
name: grid
grid:
  k: [1, 2]
  lambda_: [1.0, 0.5, 0.0]
fixed:
  steps: 10
reference: true
seeds: [0, 1]
resources: {cpu: 1, gpu: 0}
max_concurrent: 2
max_failures: 1
"""

SEARCH = """\
# Is there a better lambda_? (a test space)
name: search
fixed: {k: 2}
seeds: [0]
search:
  algorithm: optuna
  metric: psnr_entire
  mode: max
  num_samples: 4
  params:
    lambda_: {uniform: [0.0, 1.0]}
    margin: {loguniform: [0.01, 1.0]}
  scheduler:
    asha: {grace_period: 2}
"""


def _load(tmp_path: Path, text: str, **overrides):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return load_space(path, **overrides)


def _error(tmp_path: Path, text: str, **overrides) -> str:
    with pytest.raises(UserError) as info:
        _load(tmp_path, text, **overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- expansion and ids ---------------------------------------------------------------------------


def test_grid_expands_seeds_x_reference_and_cells_with_lambda0_shared(tmp_path):
    space = _load(tmp_path, GRID)
    assert space.name == "grid" and space.question == "Which k and lambda_ are best? (a test space)"
    assert len(space.cells) == 2 * (1 + 6)
    assert [(c.kind, c.k, c.lambda_, c.seed) for c in space.cells[:7]] == [
        ("reference", None, None, 0), ("cascade", 1, 1.0, 0), ("cascade", 1, 0.5, 0),
        ("cascade", 1, 0.0, 0), ("cascade", 2, 1.0, 0), ("cascade", 2, 0.5, 0), ("cascade", 2, 0.0, 0)]
    zero = [c for c in space.cells if c.lambda_ == 0.0 and c.seed == 0]
    assert [c.k for c in zero] == [1, 2]
    assert zero[0].trial_id == zero[1].trial_id and zero[0].config.k == LAMBDA0_K
    assert len(space.trials()) == 2 * 6
    assert len({c.trial_id for c in space.cells}) == 12
    assert all(c.config.steps == 10 for c in space.cells)
    assert space.cells[0].to_json()["config"]["kind"] == "reference"


def test_trial_id_is_stable_readable_and_ignores_runtime_only_fields():
    cfg = TrialConfig.from_dict({"k": 2, "lambda_": 0.6, "seed": 3})
    tid = trial_id(cfg)
    assert tid.startswith("k2-l0.6-s3-") and len(tid.rsplit("-", 1)[1]) == 8
    assert trial_id(TrialConfig.from_dict(cfg.to_dict())) == tid
    assert trial_id(cfg.replace(log_every=1, checkpoint_every=7, num_workers=0)) == tid
    assert trial_id(cfg.replace(steps=cfg.steps + 1)) != tid
    assert trial_id(cfg.replace(k=1)) != tid
    assert trial_id(cfg.replace(kind="reference")).startswith("ref-s3-")


def test_cli_overrides_seeds_gpus_concurrency_and_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rel").mkdir()
    (tmp_path / "rel" / "net.pth").touch()
    space = _load(tmp_path, GRID.replace("steps: 10", "steps: 10\n  device: auto"), seeds=3,
                  gpus_per_trial=0.25, max_concurrent=5, checkpoint="rel/net.pth")
    assert space.seeds == (0, 1, 2) and len(space.cells) == 21
    assert space.resources.gpu == 0.25 and space.max_concurrent == 5
    assert space.cells[0].config.checkpoint == str(tmp_path / "rel" / "net.pth")
    assert "checkpoint=" in _error(tmp_path, GRID, checkpoint=str(tmp_path / "missing.pth"))
    assert "no such file or folder" in _error(tmp_path, GRID, checkpoint=str(tmp_path / "missing.pth"))
    assert "pass --backgrounds DIR" in _error(tmp_path, GRID, data=str(tmp_path / "rel"))


def test_search_space(tmp_path):
    space = _load(tmp_path, SEARCH)
    assert space.cells == () and space.search is not None
    assert [p.name for p in space.search.params] == ["lambda_", "margin"]
    assert space.search.asha == {"grace_period": 2}
    cfg = space.search_config({"lambda_": 0.3, "margin": 0.05})
    assert (cfg.k, cfg.lambda_, cfg.margin, cfg.seed) == (2, 0.3, 0.05, 0)
    low = {p.name: p.args[0] for p in space.search.params}
    assert space.search_probe() == space.search_config(low)
    assert _load(tmp_path, GRID).search_probe() is None


def test_shipped_spaces_load(tmp_path):
    demo = load_space(ROOT / "search_spaces" / "demo.yaml")
    assert len(demo.cells) == 13 and len(demo.trials()) == 12
    assert demo.cells[0].kind == "reference"
    optuna = load_space(ROOT / "search_spaces" / "lambda_optuna.yaml")
    assert optuna.search is not None and optuna.search.algorithm == "optuna"
    (tmp_path / "Flare7Kpp").mkdir()
    (tmp_path / "Flickr24K").mkdir()
    (tmp_path / "net.pth").touch()
    table1 = load_space(ROOT / "search_spaces" / "table1.yaml", data=str(tmp_path / "Flare7Kpp"),
                        checkpoint=str(tmp_path / "net.pth"))
    assert table1.cells[0].config.backgrounds == str(tmp_path / "Flickr24K")  # found beside data
    assert {(c.k, c.lambda_) for c in table1.cells if c.kind == "cascade"} == {
        (k, lam) for k in (1, 2) for lam in (1.0, 0.8, 0.6, 0.4, 0.2, 0.0)}
    assert table1.cells[1].config.encoder == "vit_l16_swag" and table1.cells[1].config.crop == 128
    assert space_name(ROOT / "search_spaces" / "table1.yaml") == "table1"


# -- schema errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("old, new, expected", [
    ("max_failures: 1", "max_failure: 1", "unknown key 'max_failure'; expected one of name, grid"),
    ("steps: 10", "step: 10", "fixed: unknown key 'step' (did you mean 'steps'?)"),
    ("k: [1, 2]", "kk: [1, 2]", "grid: unknown key 'kk'"),
    ("resources: {cpu: 1, gpu: 0}", "resources: {cpu: 1, gpus: 0}", "resources: unknown key 'gpus'"),
    ("k: [1, 2]", "k: []", "grid.k is empty"),
    ("lambda_: [1.0, 0.5, 0.0]", "lambda_: [1.5]", "cell k=1, lambda_=1.5, seed=0: lambda_=1.5 is invalid; expected a number in [0, 1]"),
    ("k: [1, 2]", "k: [1, 3]", "k=3 is invalid; expected 1 or 2"),
    ("k: [1, 2]", "k: [1, 1]", "grid.k=[1, 1] repeats a value"),
    ("seeds: [0, 1]", "seeds: []", "seeds=[] is invalid"),
    ("max_concurrent: 2", "max_concurrent: 0", "max_concurrent=0 is invalid"),
    ("resources: {cpu: 1, gpu: 0}", "resources: {cpu: 1, gpu: 1.5}", "resources.gpu=1.5 is invalid"),
    ("steps: 10", "steps: 10\n  device: cuda", "device: cuda needs resources.gpu > 0"),
    ("steps: 10", "steps: 10\n  k: 2", "k is in both grid and fixed"),
    ("steps: 10", "steps: 10\n  seed: 2", "fixed.seed is set by the sweep"),
    ("name: grid", "name: ../up", "name='../up' is invalid"),
    ("# Which k and lambda_ are best? (a test space)\n", "", "start the file with a comment"),
    ("max_failures: 1", "max_failures: 1\nmax_failures: 2", "duplicate key 'max_failures'"),
    ("reference: true", "reference: yes please", "reference='yes please' is invalid"),
])
def test_schema_errors_name_the_file_and_key(tmp_path, old, new, expected):
    assert old in GRID
    message = _error(tmp_path, GRID.replace(old, new))
    assert message.startswith(str(tmp_path / "space.yaml"))
    assert expected in message


@pytest.mark.parametrize("old, new, expected", [
    ("uniform: [0.0, 1.0]", "uniform: [0.0, 1.5]", "search.params.lambda_: lambda_=1.5 is invalid"),
    ("uniform: [0.0, 1.0]", "uniform: [1.0, 0.0]", "is empty; expected low < high"),
    ("loguniform: [0.01, 1.0]", "loguniform: [0.0, 1.0]", "loguniform needs low > 0"),
    ("uniform: [0.0, 1.0]", "normal: [0.0, 1.0]", "unknown distribution 'normal'"),
    ("metric: psnr_entire", "metric: psnr", "search.metric='psnr'; expected one of psnr_entire"),
    ("num_samples: 4", "num_samples: 0", "search.num_samples=0"),
    ("grace_period: 2", "grace: 2", "search.scheduler.asha: unknown key 'grace'"),
    ("algorithm: optuna", "algorithm: hyperopt", "search.algorithm='hyperopt'"),
    ("fixed: {k: 2}", "fixed: {k: 2, lambda_: 0.5}", "lambda_ is also in fixed"),
    ("seeds: [0]", "seeds: [0, 1]", "a search runs one seed"),
    ("fixed: {k: 2}", "fixed: {k: 2}\ngrid: {k: [1]}", "give either grid or search"),
])
def test_search_schema_errors(tmp_path, old, new, expected):
    assert old in SEARCH
    assert expected in _error(tmp_path, SEARCH.replace(old, new))


def test_requires_names_the_flags_and_scientific_notation_reads_as_float(tmp_path):
    text = GRID.replace("reference: true", "reference: true\nrequires: [data, checkpoint]")
    assert "needs --data DIR and --checkpoint PATH" in _error(tmp_path, text)
    (tmp_path / "x.pth").touch()
    assert "needs --data DIR (e.g." in _error(tmp_path, text, checkpoint=str(tmp_path / "x.pth"))
    space = _load(tmp_path, GRID.replace("steps: 10", "steps: 10\n  lr: 1e-3"))
    assert space.cells[1].config.lr == 1e-3
    assert "cannot read search space" in str(pytest.raises(UserError, load_space, tmp_path / "no.yaml").value)


# -- trial states on disk ---------------------------------------------------------------------------


def test_trial_status_from_the_folder(tmp_path):
    now = time.time()
    t = tmp_path / "trials" / "k2-l0.6-s0-abc"
    assert trial_status(t, None, now).state == "pending"
    atomic_write_json(t / "progress.json", {"run_id": "r1", "step": 25, "steps": 100,
                                            "started": now - 50})
    running = trial_status(t, "r1", now)
    assert (running.state, running.step, running.steps) == ("running", 25, 100)
    assert running.elapsed_s == pytest.approx(50) and running.eta_s == pytest.approx(150)
    assert trial_status(t, "r2", now).state == "interrupted"  # a heartbeat of an older run
    atomic_write_json(t / "error.json", {"error": "RuntimeError: boom\nmore", "traceback": "", "step": 25})
    failed = trial_status(t, "r1", now)  # failed in the live run
    assert (failed.state, failed.error, failed.step) == ("failed", "RuntimeError: boom", 25)
    atomic_write_json(t / "metrics.json", {"psnr_entire": 23.5, "wall_s": 70.0, "steps": 100})
    done = trial_status(t, "r1", now)
    assert (done.state, done.elapsed_s, done.metrics["psnr_entire"]) == ("done", 70.0, 23.5)


def test_progress_line_and_eta():
    statuses = [
        TrialStatus("a", "done", elapsed_s=100.0, metrics={"psnr_entire": 23.1, "psnr_streak": 30.0}),
        TrialStatus("b", "done", elapsed_s=60.0, metrics={"psnr_entire": 23.9, "psnr_streak": 29.0}),
        TrialStatus("c", "running", step=50, steps=100, elapsed_s=40.0, eta_s=40.0),
        TrialStatus("d", "failed", error="x"),
        TrialStatus("e", "pending"),
        TrialStatus("f", "interrupted", step=3),
    ]
    # mean duration (100 + 60 + 80) / 3 = 80; remaining 40 + 2 * 80 = 200 over 2 slots
    assert sweep_eta(statuses, concurrency=2) == pytest.approx(100.0)
    assert progress_line(statuses, 2, elapsed_s=125) == (
        "2/6 done, 1 running, 1 failed, 2 pending | best PSNR entire 23.90 streak 30.00 | "
        "elapsed 2m05s, ETA 1m40s")
    assert sweep_eta([TrialStatus("e", "pending")], 1) is None
    assert format_duration(59.6) == "1m00s" and format_duration(7500) == "2h05m"


def test_sweep_lock_is_exclusive_and_marks_the_active_run(tmp_path):
    assert active_run(tmp_path) is None
    with SweepLock(tmp_path, "run-a"):
        assert active_run(tmp_path) == "run-a"
        run = json.loads((tmp_path / "run.json").read_text())
        assert run["pid"] == os.getpid()
        with pytest.raises(UserError, match="in use by another `sweep.py run`"):
            SweepLock(tmp_path, "run-b").__enter__()
    assert active_run(tmp_path) is None
