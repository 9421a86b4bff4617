"""orchestrator.record: the one reader/writer of results/<sweep>/ — trial states, plan, lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cascade.errors import UserError
from cascade.io import atomic_write_json
from orchestrator.record import SweepLock, SweepRecord, trial_status

ROOT = Path(__file__).resolve().parents[1]


def test_trial_status_from_the_folder(tmp_path):
    now = time.time()
    t = tmp_path / "trials" / "k2-l0.6-s0-abc"
    assert trial_status(t, "masked-1", None, now).state == "pending"
    atomic_write_json(t / "progress.json", {"run_id": "r1", "step": 25, "steps": 100,
                                            "started": now - 50})
    running = trial_status(t, "masked-1", "r1", now)
    assert (running.state, running.step, running.steps) == ("running", 25, 100)
    assert running.elapsed_s == pytest.approx(50) and running.eta_s == pytest.approx(150)
    assert trial_status(t, "masked-1", "r2", now).state == "interrupted"  # a heartbeat of an older run
    atomic_write_json(t / "error.json", {"error": "RuntimeError: boom\nmore", "traceback": "", "step": 25})
    failed = trial_status(t, "masked-1", "r1", now)  # failed in the live run
    assert (failed.state, failed.error, failed.step) == ("failed", "RuntimeError: boom", 25)
    atomic_write_json(t / "evals" / "masked-1" / "metrics.json", {"psnr_entire": 23.5, "wall_s": 70.0,
                                                                 "steps": 100})
    done = trial_status(t, "masked-1", "r1", now)
    assert (done.state, done.elapsed_s, done.metrics["psnr_entire"]) == ("done", 70.0, 23.5)
    (t / "error.json").unlink()
    assert trial_status(t, "flare7k-2", None, now).state == "trained"  # another evaluation exists


def test_attempt_files_error_stopped_and_metrics(tmp_path):
    record = SweepRecord(tmp_path)
    tid, eid = "k1-l0.5-s0-abc", "masked-1"
    record.start_attempt(tid)
    record.write_error(tid, "ValueError: first\nsecond", "Traceback ...", 3)
    assert json.loads((record.trial_dir(tid) / "error.json").read_text())["error"] == "ValueError: first"
    failed = record.status(tid, eid)
    assert failed.state == "failed" and not failed.deterministic
    record.write_error(tid, "UserError: bad", "", 3, deterministic=True)
    assert record.status(tid, eid).deterministic
    record.start_attempt(tid)  # a retry: the failure moves aside, the trial is pending again
    assert (record.trial_dir(tid) / "error.previous.json").is_file()
    assert record.status(tid, eid).state == "pending"
    record.write_stopped(tid, 4, {"psnr_entire": 21.0, "loss": 0.3, "step": 4})
    stopped = record.status(tid, eid)
    assert (stopped.state, stopped.step, stopped.metrics) == ("stopped", 4, {"psnr_entire": 21.0})
    record.write_metrics(tid, eid, {"psnr_entire": 22.0})
    assert record.read_metrics(tid, eid) == {"psnr_entire": 22.0, "trial_id": tid, "eval_id": eid}
    assert record.status(tid, eid).state == "done"  # metrics.json wins over a stale stop mark
    assert record.evaluations(tid) == [eid]
    (record.eval_dir(tid, eid) / "metrics.json").write_text("[1, 2]")
    with pytest.raises(UserError, match=r"metrics.json: expected a JSON object"):
        record.read_metrics(tid, eid)


def test_plan_is_read_once_and_validated(tmp_path):
    record = SweepRecord(tmp_path)
    assert record.read_plan() is None and record.plan_trial_ids() == []
    record.write_plan({"name": "x", "cells": [{"trial_id": "a"}, {"trial_id": "b"}, {"trial_id": "a"}]})
    (tmp_path / "sweep.json").write_text("{not json")  # the cache, not the file, answers now
    assert record.plan_trial_ids() == ["a", "b"]
    with pytest.raises(UserError, match="sweep.json: unreadable JSON"):
        SweepRecord(tmp_path).read_plan()
    (tmp_path / "sweep.json").write_text('{"cells": []}')
    with pytest.raises(UserError, match="expected a non-empty list under 'cells'"):
        SweepRecord(tmp_path).read_plan()
    # A folder of the layout before identities by content: refused in one line, never rerun.
    (tmp_path / "sweep.json").write_text('{"name": "x", "cells": [{"trial_id": "a"}]}')
    with pytest.raises(UserError, match=r"written by an older flaresweep \(results layout 1.*move it aside"):
        SweepRecord(tmp_path).read_plan()


def test_sweep_lock_is_exclusive_and_marks_the_active_run(tmp_path):
    record = SweepRecord(tmp_path)
    assert record.active_run() is None
    with SweepLock(tmp_path, "run-a"):
        assert record.active_run() == "run-a"
        run = json.loads((tmp_path / "run.json").read_text())
        assert run["pid"] == os.getpid()
        with pytest.raises(UserError, match="in use by another `sweep.py run`"):
            SweepLock(tmp_path, "run-b").__enter__()
        # Another process sees the holder too.
        code = ("import sys; from orchestrator.record import SweepRecord; "
                f"print(SweepRecord({str(tmp_path)!r}).active_run())")
        seen = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
        assert seen.stdout.strip() == "run-a", seen.stderr
    assert record.active_run() is None
    with SweepLock(tmp_path, "run-c"):  # released: the next run gets it
        assert record.active_run() == "run-c"


def test_search_samples_are_appended_and_taken_into_the_plan(tmp_path):
    record = SweepRecord(tmp_path)
    grid = {"trial_id": "g", "eval_id": "m-1"}
    record.write_plan({"name": "x", "cells": [grid]})
    before = (tmp_path / "sweep.json").read_bytes()
    a = {"trial_id": "a", "eval_id": "m-2", "sampled": {"lambda_": 0.25}}
    b = {"trial_id": "b", "eval_id": "m-3", "sampled": {"lambda_": 0.75}}
    record.add_sample(a)
    record.add_sample(b)
    assert (tmp_path / "sweep.json").read_bytes() == before  # a sample never rewrites the plan
    uncached = SweepRecord(tmp_path)
    uncached.add_sample({**a, "trial_id": "a2"})  # read afterwards: from the file, once
    assert uncached.plan_trial_ids() == ["g", "a", "b", "a2"]
    (tmp_path / "samples.jsonl").write_text(json.dumps(a) + "\n" + json.dumps(b) + "\n")
    assert record.plan_trial_ids() == ["g", "a", "b"]  # the cache has them
    assert SweepRecord(tmp_path).read_plan()["cells"] == [grid, a, b]  # and so has a fresh reader
    # A crash in the middle of an append leaves a cut line: the samples before it count.
    with open(tmp_path / "samples.jsonl", "a") as fh:
        fh.write('{"trial_id": "c", "sampl')
    assert SweepRecord(tmp_path).plan_trial_ids() == ["g", "a", "b"]
    # sweep.json takes them in; the journal goes. A crash before it went: no sample twice.
    record.write_plan({"name": "x", "cells": [grid, a, b]})
    assert not (tmp_path / "samples.jsonl").exists()
    (tmp_path / "samples.jsonl").write_text(json.dumps(b) + "\n")
    assert SweepRecord(tmp_path).read_plan()["cells"] == [grid, a, b]
    (tmp_path / "samples.jsonl").write_text('{"trial_id": "d"}\n' + json.dumps(b) + "\n")
    with pytest.raises(UserError, match=r"samples.jsonl:1: expected a sweep.json cell with 'trial_id' and 'sampled'"):
        SweepRecord(tmp_path).read_plan()
    (tmp_path / "samples.jsonl").write_text("{not json\n" + json.dumps(b) + "\n")
    with pytest.raises(UserError, match=r"samples.jsonl:1: unreadable JSON line"):
        SweepRecord(tmp_path).read_plan()


def test_plan_keys_and_finished_at_name_the_evaluation(tmp_path):
    # What a bench reads through the record: the plan's (trial, evaluation) pairs, when one ended.
    from orchestrator.record import SweepRecord

    record = SweepRecord(tmp_path / "s")
    assert record.plan_keys() == []
    cells = [{"trial_id": "t1", "eval_id": "e1"}, {"trial_id": "t1", "eval_id": "e1"},
             {"trial_id": "t2", "eval_id": "e2"}]
    atomic_write_json(record.plan_path, {"layout": 2, "cells": cells})
    assert record.plan_keys() == [("t1", "e1"), ("t2", "e2")]
    assert [s.state for s in record.statuses(record.plan_keys())] == ["pending", "pending"]
    assert record.finished_at("t1", "e1") is None
    atomic_write_json(record.eval_dir("t1", "e1") / "metrics.json", {"wall_s": 1.0})
    assert record.finished_at("t1", "e1") == (record.eval_dir("t1", "e1") / "metrics.json").stat().st_mtime
