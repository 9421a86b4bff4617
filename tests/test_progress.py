"""orchestrator.progress: progress line, ETA, status text, and the driver's event board."""

from __future__ import annotations

from pathlib import Path

import pytest

from cascade.fmt import duration
from orchestrator.plan import load_plan, write_plan
from orchestrator.progress import Board, event_line, progress_line, status_lines, sweep_eta
from orchestrator.record import SweepRecord, TrialStatus
from orchestrator.space import cell_for, load_space

SPACE = """\
# Does the board follow the trials? (a test space)
name: board
grid: {k: [2], lambda_: [1.0, 0.5]}
fixed: {steps: 10}
seeds: [0]
"""


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


def test_best_and_eta_leave_the_evaluation_only_trials_out():
    """The reference and the control take seconds and are not what the sweep searches: the line's
    best PSNR is over the cascade trials, and its ETA is paced by them."""
    kinds = {"ref": "reference", "ctl": "control", "ref1": "reference"}
    statuses = [
        TrialStatus("ref", "done", elapsed_s=1.0, metrics={"psnr_entire": 23.57}),
        TrialStatus("ctl", "done", elapsed_s=2.0, metrics={"psnr_entire": 22.0, "kind": "control"}),
        TrialStatus("a", "done", elapsed_s=90.0, metrics={"psnr_entire": 20.5}),
        TrialStatus("b", "running", step=50, steps=100, elapsed_s=50.0, eta_s=50.0),
        TrialStatus("c", "pending"),
        TrialStatus("d", "interrupted", step=25, steps=100),  # resumes at step 25: 3/4 left
        TrialStatus("ref1", "pending"),
    ]
    # training: mean (90 + 100) / 2 = 95 s; evaluation: (1 + 2) / 2 = 1.5 s;
    # remaining 50 + 95 * (1 + 0.75) + 1.5 = 217.75 s over 2 slots
    assert sweep_eta(statuses, 2, kinds) == pytest.approx(108.875)
    assert "best PSNR entire 20.50 |" in progress_line(statuses, 2, kinds=kinds)
    # The kind comes from metrics.json when `kinds` lacks it; without either a trial is a cascade
    # (negative control: the reference is then the best).
    assert "best PSNR entire 22.00" not in progress_line(statuses, 2)
    assert "best PSNR entire 23.57" in progress_line(statuses, 2)
    # Only evaluations finished: no pace for the fine-tuning yet, so no ETA (the 1 s references
    # would have promised 1 s per trial) and no best.
    early = [TrialStatus("ref", "done", elapsed_s=1.0, metrics={"psnr_entire": 23.0}),
             TrialStatus("a", "pending"), TrialStatus("b", "running", steps=100)]
    assert sweep_eta(early, 1, kinds) is None
    assert progress_line(early, 1, 5.0, kinds) == "1/3 done, 1 running, 0 failed, 1 pending | elapsed 5s"
    # Once the running cascade trial reports, its pace counts: 20 s left + 40 s for "a".
    early[2] = TrialStatus("b", "running", step=50, steps=100, elapsed_s=20.0, eta_s=20.0)
    assert sweep_eta(early, 1, kinds) == pytest.approx(60.0)


def test_status_and_event_lines():
    cells = [{"trial_id": "ref", "kind": "reference", "seed": 0},
             {"trial_id": "t1", "kind": "cascade", "k": 2, "lambda_": 0.6, "seed": 0}]
    by_id = {"ref": TrialStatus("ref", "done", elapsed_s=65.0, metrics={"psnr_entire": 22.214}),
             "t1": TrialStatus("t1", "stopped", step=4, steps=10, metrics={"psnr_entire": 20.5})}
    lines = status_lines("demo", cells, by_id)
    assert lines[0].split() == ["reference", "s0", "done", "ref", "PSNR", "entire", "22.21,", "took", "1m05s"]
    assert lines[1].endswith("at step 4/10, PSNR entire 20.50 then")
    assert lines[2].startswith("demo: 1/2 done, 0 running, 0 failed, 0 pending, 1 stopped early")
    assert event_line(by_id["t1"]) == "  stopped t1 at step 4, PSNR entire 20.50 (early stopping)"
    assert event_line(TrialStatus("x", "failed", error="boom"), "x/error.json") == (
        "  FAILED  x: boom (see x/error.json)")


def test_board_follows_events_without_rescanning_the_folder(tmp_path: Path, capsys):
    (tmp_path / "space.yaml").write_text(SPACE)
    space = load_space(tmp_path / "space.yaml")
    record = SweepRecord(tmp_path / "results" / "board")
    board = Board(space, record, load_plan(space, record), concurrency=1)
    a, b = (c.trial_id for c in space.trials())
    board.started(space.cells[0], None)
    assert "0/2 done, 1 running" in capsys.readouterr().out
    board.result(a, 5)
    assert board.states[a].eta_s is not None and board.states[a].step == 5
    record.write_metrics(a, space.cells[0].eval_id, {"psnr_entire": 21.0, "wall_s": 3.0})
    board.completed(a, {})
    out = capsys.readouterr().out
    assert f"done    {a}: PSNR entire 21.00" in out and "1/2 done, 0 running" in out
    board.started(space.cells[1], None)
    board.completed(b, {"step": 4, "psnr_entire": 19.0})  # no metrics.json: the scheduler stopped it
    assert record.status(b, space.cells[1].eval_id).state == "stopped"
    assert f"stopped {b} at step 4, PSNR entire 19.00" in capsys.readouterr().out
    board.errored(b, "Traceback ...\nRayActorError: the actor died")  # died before writing error.json
    failed = record.status(b, space.cells[1].eval_id)
    assert (failed.state, failed.error) == ("failed", "trial process died: RayActorError: the actor died")
    assert f"FAILED  {b}: trial process died" in capsys.readouterr().out


def test_board_line_equals_progress_line_of_its_states(tmp_path: Path, capsys):
    """The Board keeps the line's parts instead of rescanning its states; the text is the same."""
    (tmp_path / "space.yaml").write_text(SPACE.replace("lambda_: [1.0, 0.5]", "lambda_: [1.0, 0.5, 0.2, 0.1]"))
    space = load_space(tmp_path / "space.yaml")
    record = SweepRecord(tmp_path / "results" / "board")
    board = Board(space, record, load_plan(space, record), concurrency=2)
    cells = space.trials()
    ids = [c.trial_id for c in cells]

    def same() -> None:
        assert board.line(12.0) == progress_line(list(board.states.values()), 2, 12.0, board.kinds)

    same()
    board.started(cells[0], None)
    board.started(cells[1], None)
    board.result(ids[0], 5)
    board.result(ids[1], 2)
    same()
    record.write_metrics(ids[0], cells[0].eval_id, {"psnr_entire": 21.0, "psnr_glare": 30.0, "wall_s": 4.0})
    board.completed(ids[0], {})
    same()
    board.completed(ids[1], {"step": 2, "psnr_entire": 23.0})  # stopped early, with its metrics
    board.started(cells[2], None)
    board.errored(ids[2], "RayActorError: died")
    same()
    assert "2 done" not in board.line() and "best PSNR entire 23.00" in board.line()
    # A state with metrics replaced (the best must forget it): recomputed, still equal.
    board._set(TrialStatus(ids[1], "pending"))
    same()
    assert "best PSNR entire 21.00" in board.line()
    assert board.counts == {s: sum(t.state == s for t in board.states.values()) for s in board.counts}
    capsys.readouterr()


def test_board_appends_a_new_search_sample_without_rewriting_the_plan(tmp_path: Path):
    (tmp_path / "space.yaml").write_text(
        "# Does the board record samples? (a test space)\nname: board\nfixed: {steps: 10, k: 2}\n"
        "seeds: [0]\nsearch: {algorithm: optuna, metric: psnr_entire, mode: max, num_samples: 4, "
        "params: {lambda_: {uniform: [0.0, 1.0]}}}\n")
    space = load_space(tmp_path / "space.yaml")
    record = SweepRecord(tmp_path / "results" / "board")
    plan = load_plan(space, record)
    write_plan(space, record, plan)
    written = record.plan_path.read_bytes()
    board = Board(space, record, plan, concurrency=1)
    cell = cell_for(space.search_config({"lambda_": 0.3}))
    board.started(cell, {"lambda_": 0.3})
    board.started(cell, {"lambda_": 0.3})  # a retry of the same trial: recorded once
    assert record.plan_path.read_bytes() == written
    fresh = load_plan(space, SweepRecord(record.root))
    assert [(c.trial_id, v) for c, v in fresh.sampled] == [(cell.trial_id, {"lambda_": 0.3})]
    assert fresh.new_samples(space) == 3


def test_board_prints_each_evaluation_only_result_once_and_keeps_it_out_of_best(tmp_path: Path, capsys):
    (tmp_path / "space.yaml").write_text(SPACE.replace("seeds: [0]", "seeds: [0, 1]\nreference: true"))
    space = load_space(tmp_path / "space.yaml")
    record = SweepRecord(tmp_path / "results" / "board")
    board = Board(space, record, load_plan(space, record), concurrency=1)
    refs = [c for c in space.trials() if c.kind == "reference"]
    cascade = [c for c in space.trials() if c.kind == "cascade"]
    assert len(refs) == 2 and board.kinds[refs[0].trial_id] == "reference"
    for seed, ref in enumerate(refs):
        board.started(ref, None)
        record.write_metrics(ref.trial_id, ref.eval_id, {
            "psnr_entire": 23.57, "psnr_streak": 30.0, "kind": "reference", "seed": seed, "wall_s": 1.0})
        board.completed(ref.trial_id, {})
    out = capsys.readouterr().out
    assert out.count("reference (the base network)") == 1
    assert "[board] reference (the base network), seed 0: PSNR entire 23.57 streak 30.00\n" in out
    assert "best" not in board.line() and "ETA" not in board.line()
    board.started(cascade[0], None)
    record.write_metrics(cascade[0].trial_id, cascade[0].eval_id,
                         {"psnr_entire": 21.0, "kind": "cascade", "wall_s": 30.0})
    board.completed(cascade[0].trial_id, {})
    out = capsys.readouterr().out
    assert "reference (the base" not in out and "best PSNR entire 21.00" in out
    # 3 cascade trials left at the pace of the one finished (30 s), not at the references' 1 s;
    # the evaluation-only trials still waiting (controls, if the space has them) at 1 s each.
    evals = sum(board.kinds[t] != "cascade" and s.state == "pending" for t, s in board.states.items())
    assert board.line().endswith(f"ETA {duration(3 * 30.0 + evals * 1.0)}")
    assert board.line() == progress_line(list(board.states.values()), 1, None, board.kinds)
