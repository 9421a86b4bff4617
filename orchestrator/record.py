"""The results record: the one reader and writer of `results/<sweep>/`.

The results folder, not Ray's experiment state, is what a sweep is (docs/design.md, "Results on
disk"; every file in results/README.md). Everything that reads or writes it goes through
`SweepRecord`: the driver (`sweep.py run`), the Tune trial wrapper, `sweep.py status` and
`reports/`. So there is one idea of where a file lives and of what state a trial is in.

    results/<sweep>/
      sweep.json                 the plan (layout 2): every cell with its trial id (training
                                 identity), eval id (evaluation identity), config, fingerprints
      samples.jsonl              search samples drawn since sweep.json was last written, one
                                 sweep.json cell a line (appended per sample: a rewrite of the
                                 whole plan per sample cost O(trials)); sweep.json takes them in
                                 at the end of the search and at the next run's start
      .lock, run.json            held / written by the `sweep.py run` in progress (.lock.lease
                                 on a network file system; run.json: heartbeat, then "ended")
      ray/                       Ray Tune's own experiment folders (never read back)
      stream/<key>/              the stream cache the trials share (cascade.stream_cache; safe
                                 to delete)
      optuna.journal             a search's Optuna study (written by orchestrator.search)
      <eval label>/              tables and figures of one evaluation (reports/, `sweep.py table1`)
      trials/<trial_id>/         one training run
        checkpoints/ train.log   (cascade.train; checkpoints/last.pt holds the final weights)
        progress.json            heartbeat: run id, step, steps, started, updated, host, pid
        error.json               {"error": first line, "traceback", "step", "deterministic"}
        error.previous.json      the failure before a retry
        stopped.json             {"reason", "step", "metrics"}: ended early by the scheduler (ASHA)
        evals/<eval_id>/         one evaluation of its weights: config.json metrics.json
                                 per_image.csv samples/ (metrics.json means "done")

Stdlib and cascade's torch-free modules only: `status` and `table1` start in a tenth of a second.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cascade.errors import UserError, first_line
from cascade.fmt import is_number
from cascade.io import atomic_write_json, read_json
from cascade.locks import describe_holder, file_lock, lease_stale_s, pid_alive

# A trial's state, from its folder (and the run id of the live `sweep.py run`, if any). "trained":
# its training finished (another evaluation exists) but this evaluation does not exist yet.
STATES = ("done", "running", "failed", "stopped", "interrupted", "trained", "pending")
# Trials a run still has to finish: early-stopped ones are final, like finished ones.
UNFINISHED = ("running", "interrupted", "trained", "pending")
# The results layout this module reads and writes; sweep.json records it.
LAYOUT = 2
# Failures that happen again from the same checkpoint (bad input, a diverging loss): not retried
# unless asked (`--retry-failed`); anything else (a killed worker, OOM, a lost node) is.
DETERMINISTIC = ("UserError", "NonFiniteLossError")


@dataclass(frozen=True)
class TrialStatus:
    """Where one trial stands, read from its folder."""

    trial_id: str
    state: str  # one of STATES
    error: str | None = None  # first line of error.json's "error" (state "failed")
    deterministic: bool = False  # failed with an error that repeats (DETERMINISTIC)
    step: int | None = None  # last reported step
    steps: int | None = None  # steps the trial runs
    elapsed_s: float | None = None  # wall time so far (done: the trial's own wall_s)
    eta_s: float | None = None  # running: remaining time at its current pace
    # metrics.json (state "done"); the last reported test metrics (state "stopped", if any)
    metrics: dict[str, Any] | None = None


class SweepRecord:
    """The results folder of one sweep: paths, the plan, trial states, and the files a run keeps.

    The plan (`sweep.json` plus the samples appended to `samples.jsonl`) is read once and cached;
    `write_plan` and `add_sample` update the cache, so a run never re-reads what it wrote.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self._plan: dict[str, Any] | None = None

    # -- paths ------------------------------------------------------------------------------------
    @property
    def plan_path(self) -> Path:
        return self.root / "sweep.json"

    @property
    def samples_path(self) -> Path:
        """Search samples appended since sweep.json was written (`add_sample`)."""
        return self.root / "samples.jsonl"

    def trial_dir(self, trial_id: str) -> Path:
        return self.root / "trials" / trial_id

    def checkpoint_dir(self, trial_id: str) -> Path:
        return self.trial_dir(trial_id) / "checkpoints"

    @property
    def stream_dir(self) -> Path:
        """The trials' stream cache (cascade.stream_cache writes it: one folder per stream key)."""
        return self.root / "stream"

    def eval_dir(self, trial_id: str, eval_id: str) -> Path:
        """One evaluation of a trial's weights: config.json, metrics.json, per_image.csv, samples/."""
        return self.trial_dir(trial_id) / "evals" / eval_id

    def per_image_path(self, trial_id: str, eval_id: str) -> Path:
        return self.eval_dir(trial_id, eval_id) / "per_image.csv"

    def samples_dir(self, trial_id: str, eval_id: str) -> Path:
        return self.eval_dir(trial_id, eval_id) / "samples"

    def evaluations(self, trial_id: str) -> list[str]:
        """Eval ids of the finished evaluations of a trial, sorted."""
        evals = self.trial_dir(trial_id) / "evals"
        return sorted(p.parent.name for p in evals.glob("*/metrics.json")) if evals.is_dir() else []

    def log_path(self, trial_id: str) -> Path:
        return self.trial_dir(trial_id) / "train.log"

    # -- the plan -----------------------------------------------------------------------------------
    def read_plan(self) -> dict[str, Any] | None:
        """sweep.json (`{"name", "space", "question", "cells": [...]}`) with the samples of
        samples.jsonl it lacks appended to its cells, or None before any run.

        UserError naming the file when it is unreadable or has no list of cells.
        """
        if self._plan is None:
            if not self.plan_path.is_file():
                return None
            plan = self.read_json(self.plan_path)
            cells = plan.get("cells") if isinstance(plan, dict) else None
            if isinstance(cells, list):  # a search without a reference starts with no cell
                known = {c.get("trial_id") for c in cells if isinstance(c, dict) and "sampled" in c}
                for cell in self._appended_samples():
                    if cell["trial_id"] not in known:  # sweep.json may have taken it in already
                        known.add(cell["trial_id"])
                        cells.append(cell)
            if not isinstance(cells, list) or not cells:
                raise UserError(f"{self.plan_path}: expected a non-empty list under 'cells'")
            if plan.get("layout") != LAYOUT:
                raise UserError(
                    f"{self.root} was written by an older flaresweep (results layout "
                    f"{plan.get('layout', 1)}, this one reads {LAYOUT}: trials are now named by the "
                    "content of their inputs); move it aside (mv "
                    f"{self.root} {self.root}.layout{plan.get('layout', 1)}) and run the sweep again")
            self._plan = plan
        return self._plan

    def write_plan(self, plan: dict[str, Any]) -> None:
        """sweep.json, the whole plan (search samples included); samples.jsonl is then redundant
        and goes (a crash in between leaves duplicates, which `read_plan` skips)."""
        plan = {**plan, "layout": LAYOUT}
        atomic_write_json(self.plan_path, plan)
        self.samples_path.unlink(missing_ok=True)
        self._plan = plan

    def add_sample(self, cell: dict[str, Any]) -> None:
        """One new search sample (a sweep.json cell with "sampled"), appended to samples.jsonl and
        flushed to disk: the cost of a sample does not grow with the plan. sweep.json must exist."""
        line = json.dumps(cell, sort_keys=True, allow_nan=True)
        with open(self.samples_path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if self._plan is not None:  # the cache holds what a fresh read would (uncached: it will)
            self._plan["cells"].append(json.loads(line))

    def _appended_samples(self) -> list[dict[str, Any]]:
        """The cells of samples.jsonl; a line cut short by a crash (the last one) is skipped."""
        try:
            lines = self.samples_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise UserError(f"{self.samples_path}: unreadable ({exc.strerror or exc})") from None
        cells = []
        for number, line in enumerate(lines, 1):
            try:
                cell = json.loads(line)
            except ValueError:
                if number == len(lines):  # an append the crash interrupted
                    break
                raise UserError(f"{self.samples_path}:{number}: unreadable JSON line") from None
            if not isinstance(cell, dict) or "trial_id" not in cell or "sampled" not in cell:
                raise UserError(f"{self.samples_path}:{number}: expected a sweep.json cell with "
                                "'trial_id' and 'sampled'")
            cells.append(cell)
        return cells

    def plan_trial_ids(self) -> list[str]:
        """Distinct trial ids of the plan, in plan order (empty before any run)."""
        return list(dict.fromkeys(tid for tid, _ in self.plan_keys()))

    def plan_keys(self) -> list[tuple[str, str]]:
        """Distinct (trial id, eval id) of the plan, in plan order (empty before any run): what
        `statuses` takes."""
        plan = self.read_plan()
        return list(dict.fromkeys((c["trial_id"], c.get("eval_id", "")) for c in plan["cells"])) if plan else []

    def finished_at(self, trial_id: str, eval_id: str) -> float | None:
        """When an evaluation finished (its metrics.json's mtime), None when it has not."""
        try:
            return (self.eval_dir(trial_id, eval_id) / "metrics.json").stat().st_mtime
        except OSError:
            return None

    # -- trial states ---------------------------------------------------------------------------------
    def status(self, trial_id: str, eval_id: str, active_run: str | None = None,
               now: float | None = None) -> TrialStatus:
        """State of one evaluation of a trial; `active_run`: the run id of a live `sweep.py run`."""
        return trial_status(self.trial_dir(trial_id), eval_id, active_run,
                            time.time() if now is None else now)

    def statuses(self, keys: list[tuple[str, str]], now: float | None = None) -> list[TrialStatus]:
        """`status` of every (trial id, eval id), in order, against the run holding the sweep."""
        run, now = self.active_run(), time.time() if now is None else now
        return [trial_status(self.trial_dir(tid), eid, run, now) for tid, eid in keys]

    def read_metrics(self, trial_id: str, eval_id: str) -> dict[str, Any] | None:
        """metrics.json of a finished evaluation (UserError naming the file when not an object)."""
        path = self.eval_dir(trial_id, eval_id) / "metrics.json"
        if not path.is_file():
            return None
        metrics = self.read_json(path)
        if not isinstance(metrics, dict):
            raise UserError(f"{path}: expected a JSON object")
        return metrics

    def read_config(self, trial_id: str, eval_id: str) -> dict[str, Any]:
        """config.json the evaluation ran with ({} when it never started or is unreadable)."""
        config = _read_json_or_none(self.eval_dir(trial_id, eval_id) / "config.json")
        return config if isinstance(config, dict) else {}

    # -- what a run writes ----------------------------------------------------------------------------
    def start_attempt(self, trial_id: str) -> Path:
        """Before a trial (re)starts: the previous failure moves aside, a stale stop mark goes."""
        tdir = self.trial_dir(trial_id)
        tdir.mkdir(parents=True, exist_ok=True)
        if (tdir / "error.json").exists():
            os.replace(tdir / "error.json", tdir / "error.previous.json")
        (tdir / "stopped.json").unlink(missing_ok=True)
        return tdir

    def write_metrics(self, trial_id: str, eval_id: str, result: dict[str, Any]) -> None:
        """metrics.json: what train() returned, plus both ids; its appearance means done."""
        atomic_write_json(self.eval_dir(trial_id, eval_id) / "metrics.json",
                          {**result, "trial_id": trial_id, "eval_id": eval_id})

    def write_error(self, trial_id: str, message: str, traceback: str, step: int | None,
                    deterministic: bool = False) -> None:
        """error.json: the message's first line (what `status` shows), the traceback, the step, and
        whether the same attempt would fail the same way (`deterministic`: not retried by default)."""
        atomic_write_json(self.trial_dir(trial_id) / "error.json", {
            "error": first_line(message, "unknown error"), "traceback": traceback, "step": step,
            "deterministic": deterministic})

    def write_stopped(self, trial_id: str, step: Any, metrics: dict[str, Any]) -> None:
        """stopped.json: the scheduler ended the trial early; it is final, never resumed."""
        atomic_write_json(self.trial_dir(trial_id) / "stopped.json", {
            "reason": "stopped early by the scheduler", "step": step,
            "metrics": {k: v for k, v in metrics.items() if k.startswith(("psnr_", "ssim_"))}})

    def heartbeat(self, trial_id: str, run_id: str, steps: int | None) -> Heartbeat:
        return Heartbeat(self.trial_dir(trial_id) / "progress.json", run_id, steps)

    # -- the run holding the folder -------------------------------------------------------------------
    def lock(self, run_id: str) -> SweepLock:
        return SweepLock(self.root, run_id)

    def active_run(self) -> str | None:
        """Run id of the live `sweep.py run` holding the folder, or None when no run holds it.

        Reads run.json and takes no lock: a `status` can never make a starting `run` fail (a
        brief shared lock could), and it works on a read-only mount of the results.
        """
        run = _read_json_or_none(self.root / "run.json")
        return str(run.get("run_id", "?")) if run_is_live(run) else None

    @staticmethod
    def read_json(path: Path) -> Any:
        """A JSON file of the record; UserError naming it when unreadable."""
        try:
            return read_json(path)
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: unreadable JSON ({exc})") from None


def trial_status(trial_dir: Path, eval_id: str, active_run: str | None, now: float) -> TrialStatus:
    """State of evaluation `eval_id` of the trial in `trial_dir` (`SweepRecord.status`)."""
    tid = trial_dir.name
    metrics = _read_json_or_none(trial_dir / "evals" / eval_id / "metrics.json")
    if isinstance(metrics, dict):
        return TrialStatus(tid, "done", elapsed_s=_number(metrics.get("wall_s")),
                           steps=_number(metrics.get("steps")), metrics=metrics)
    progress = _read_json_or_none(trial_dir / "progress.json") or {}
    step, steps = _number(progress.get("step")), _number(progress.get("steps"))
    # A retry moves error.json aside and deletes stopped.json when it starts, so either file
    # belongs to the trial's last attempt, even one of the live run.
    if (trial_dir / "error.json").exists():
        error = _read_json_or_none(trial_dir / "error.json")
        error = error if isinstance(error, dict) else {}
        text = first_line(error.get("error"), "unknown error (unreadable error.json)")
        return TrialStatus(tid, "failed", error=text, step=_number(error.get("step")), steps=steps,
                           deterministic=error.get("deterministic") is True)
    if (trial_dir / "stopped.json").exists():
        stopped = _read_json_or_none(trial_dir / "stopped.json")
        stopped = stopped if isinstance(stopped, dict) else {}
        return TrialStatus(tid, "stopped", step=_number(stopped.get("step")) or step, steps=steps,
                           metrics=stopped.get("metrics"))
    if active_run is not None and progress.get("run_id") == active_run:
        elapsed = now - float(progress.get("started", now))
        eta = elapsed * (steps - step) / step if step and steps else None
        return TrialStatus(tid, "running", step=step, steps=steps, elapsed_s=elapsed, eta_s=eta)
    if any((trial_dir / "evals").glob("*/metrics.json")):  # trained; this evaluation is new
        return TrialStatus(tid, "trained", step=step, steps=steps)
    if progress or any((trial_dir / "checkpoints").glob("*")):
        return TrialStatus(tid, "interrupted", step=step, steps=steps)
    return TrialStatus(tid, "pending")


class Heartbeat:
    """progress.json of a running trial: which run it belongs to, its step, when it started."""

    def __init__(self, path: Path, run_id: str, steps: int | None) -> None:
        self.path, self.step = path, None
        self.state = {"run_id": run_id, "step": None, "steps": steps, "started": time.time(),
                      "host": socket.gethostname(), "pid": os.getpid()}
        self.beat(None)

    def beat(self, step: Any) -> None:
        if isinstance(step, int):
            self.step = step
        atomic_write_json(self.path, {**self.state, "step": self.step, "updated": time.time()})


class SweepLock:
    """Held by `sweep.py run` for its whole life: one run per results folder at a time.

    The lock is `cascade.locks.file_lock` on `.lock`: an flock on a local disk (it dies with its
    process), a lease file on a network file system, where flock is missing or only node-local
    (stale once its heartbeat stops for `lease_stale_s()`, at once when its pid is gone from this
    host). Both write run.json (run id, host, pid, started) and touch it every
    `lease_stale_s() / 6`: that heartbeat is what `active_run` (and so `status`) reads, lock-free;
    leaving marks it "ended".
    """

    def __init__(self, sweep_dir: Path, run_id: str) -> None:
        self.sweep_dir, self.run_id = Path(sweep_dir), run_id
        self.kind: str | None = None  # "flock" or "lease" while held
        self._held: Any = None
        self._info: dict[str, Any] = {}
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @property
    def run_path(self) -> Path:
        return self.sweep_dir / "run.json"

    def __enter__(self) -> SweepLock:
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        held = file_lock(self.sweep_dir / ".lock", blocking=False, owner={"run_id": self.run_id})
        try:
            self.kind = held.__enter__()
        except BlockingIOError as exc:
            # The holder may have taken the lock a moment ago and not written run.json yet.
            deadline, run = time.time() + 2.0, None
            while not run_is_live(run) and time.time() < deadline:
                time.sleep(0.05)
                run = _read_json_or_none(self.run_path)
            if not run_is_live(run):
                run = getattr(exc, "holder", None) or run
            run = run if isinstance(run, dict) else {}
            raise UserError(f"{self.sweep_dir} is in use by another `sweep.py run` (run "
                            f"{run.get('run_id', '?')}, {describe_holder(run)}); wait for it or "
                            "stop it first") from None
        self._held = held
        self._info = {"run_id": self.run_id, "pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.time(), "lock": self.kind}
        self._write()
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name="sweep lock", daemon=True)
        self._beat.start()
        return self

    def __exit__(self, *exc: object) -> None:
        held, self._held = self._held, None
        if held is None:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        try:
            if self._ours():
                self._write(ended=time.time())
        finally:
            held.__exit__(None, None, None)

    def _write(self, **extra: Any) -> None:
        atomic_write_json(self.run_path, {**self._info, "updated": time.time(), **extra})

    def _ours(self) -> bool:
        """run.json still names this run (a lease broken while we were stalled names another)."""
        run = _read_json_or_none(self.run_path)
        return isinstance(run, dict) and run.get("run_id") == self.run_id

    def _heartbeat(self) -> None:
        while not self._stop.wait(max(0.05, lease_stale_s() / 6)):
            if not self._ours():
                return
            try:
                self._write()
            except OSError:  # a full or briefly unreachable file server: try again next beat
                continue


def run_is_live(run: Any, now: float | None = None) -> bool:
    """Whether run.json content `run` describes a `sweep.py run` that is alive: not ended, its
    heartbeat no older than `lease_stale_s()`, and, on this host, its pid still there."""
    if not isinstance(run, dict) or run.get("ended") is not None:
        return False
    if run.get("host") == socket.gethostname() and not pid_alive(run.get("pid")):
        return False
    updated = _number(run.get("updated", run.get("started")))
    now = time.time() if now is None else now
    return updated is not None and now - updated <= lease_stale_s()


def _read_json_or_none(path: Path) -> Any:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def _number(value: Any) -> Any:
    return value if is_number(value) else None
