"""orchestrator/: the package's contract (no torch, no Ray) and the plan of a run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from orchestrator.plan import cut_short, load_plan, not_done, should_run, write_plan
from orchestrator.record import SweepRecord, TrialStatus
from orchestrator.space import load_space

ROOT = Path(__file__).resolve().parents[1]
SEARCH = """\
# A search whose samples are recorded in the plan (a test space)
name: s
fixed: {k: 2, steps: 4}
seeds: [0]
search:
  algorithm: optuna
  metric: psnr_entire
  mode: max
  num_samples: 3
  params: {lambda_: {uniform: [0.0, 1.0]}}
"""


def test_orchestrator_imports_neither_torch_nor_ray():
    code = ("import sys, orchestrator.space, orchestrator.record, orchestrator.plan, "
            "orchestrator.progress, orchestrator.preflight, orchestrator.trial; "
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_plan_records_samples_and_rederives_them_from_the_space(tmp_path):
    (tmp_path / "s.yaml").write_text(SEARCH)
    space = load_space(tmp_path / "s.yaml")
    record = SweepRecord(tmp_path / "results" / "s")
    plan = load_plan(space, record)
    assert plan.trials() == [] and plan.new_samples(space) == 3
    cell = space.search_config({"lambda_": 0.25})
    from orchestrator.space import cell_for

    plan = plan.with_sample(cell_for(cell), {"lambda_": 0.25})
    assert plan.with_sample(cell_for(cell), {"lambda_": 0.25}) is plan  # the same trial once
    write_plan(space, record, plan)
    again = load_plan(space, SweepRecord(record.root))
    assert [c.trial_id for c in again.trials()] == [cell_for(cell).trial_id]
    assert again.new_samples(space) == 2
    # A space whose search samples other parameters starts a new search.
    other = tmp_path / "o.yaml"
    other.write_text(SEARCH.replace("{lambda_: {uniform: [0.0, 1.0]}}", "{margin: {uniform: [0.1, 1.0]}}"))
    assert load_plan(load_space(other), SweepRecord(record.root)).sampled == ()
    sample = cell_for(cell)
    assert cut_short(record, [sample])  # never ran: not finished
    record.write_metrics(sample.trial_id, sample.eval_id, {"psnr_entire": 20.0})
    assert not cut_short(record, [sample])
    assert again.finished_samples(record, "psnr_entire") == ([{"lambda_": 0.25}], [20.0])


def test_what_runs_again():
    states = ("done", "stopped", "failed", "running", "interrupted", "trained", "pending")
    assert [s for s in states if should_run(TrialStatus("t", s), retry_failed=False)] == [
        "running", "interrupted", "trained", "pending"]
    crash, bad = TrialStatus("t", "failed"), TrialStatus("t", "failed", deterministic=True)
    assert should_run(crash, None) and not should_run(bad, None)  # the default: crashes only
    assert should_run(bad, True) and not should_run(crash, False)
    assert not_done([TrialStatus("a", "done"), TrialStatus("b", "stopped"), TrialStatus("c", "failed")]) == 1
