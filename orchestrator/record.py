"""The results record: the one reader and writer of `results/<sweep>/`.

The results folder, not Ray's experiment state, is what a sweep is (docs/design.md, "Results on
disk"; every file in results/README.md). Everything that reads or writes it goes through
`SweepRecord`: the driver (`sweep.py run`), the Tune trial wrapper, `sweep.py status` and
`reports/`. So there is one idea of where a file lives and of what state a trial is in.

    results/<sweep>/
      sweep.json                 the plan: every cell with its trial id and resolved config
      .lock, run.json            held / written by the `sweep.py run` in progress
      ray/                       Ray Tune's own experiment folders (never read back)
      trials/<trial_id>/
        config.json metrics.json per_image.csv samples/ checkpoints/ train.log   (cascade.train)
        progress.json            heartbeat: run id, step, steps, started, updated, host, pid
        error.json               {"error": first line, "traceback", "step"}: the last attempt failed
        error.previous.json      the failure before a retry
        stopped.json             {"reason", "step", "metrics"}: ended early by the scheduler (ASHA)

Stdlib and cascade's torch-free modules only: `status` and `table1` start in a tenth of a second.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cascade.errors import UserError, first_line
from cascade.io import atomic_write_json, file_lock, read_json

# A trial's state, from its folder (and the run id of the live `sweep.py run`, if any).
STATES = ("done", "running", "failed", "stopped", "interrupted", "pending")
# Trials a run still has to finish: early-stopped ones are final, like finished ones.
UNFINISHED = ("running", "interrupted", "pending")


@dataclass(frozen=True)
class TrialStatus:
    """Where one trial stands, read from its folder."""

    trial_id: str
    state: str  # one of STATES
    error: str | None = None  # first line of error.json's "error" (state "failed")
    step: int | None = None  # last reported step
    steps: int | None = None  # steps the trial runs
    elapsed_s: float | None = None  # wall time so far (done: the trial's own wall_s)
    eta_s: float | None = None  # running: remaining time at its current pace
    # metrics.json (state "done"); the last reported test metrics (state "stopped", if any)
    metrics: dict[str, Any] | None = None


class SweepRecord:
    """The results folder of one sweep: paths, the plan, trial states, and the files a run keeps.

    The plan (`sweep.json`) is read once and cached; `write_plan` updates the cache, so a run never
    re-reads what it wrote.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self._plan: dict[str, Any] | None = None

    # -- paths ------------------------------------------------------------------------------------
    @property
    def plan_path(self) -> Path:
        return self.root / "sweep.json"

    def trial_dir(self, trial_id: str) -> Path:
        return self.root / "trials" / trial_id

    def checkpoint_dir(self, trial_id: str) -> Path:
        return self.trial_dir(trial_id) / "checkpoints"

    def per_image_path(self, trial_id: str) -> Path:
        return self.trial_dir(trial_id) / "per_image.csv"

    def log_path(self, trial_id: str) -> Path:
        return self.trial_dir(trial_id) / "train.log"

    # -- the plan -----------------------------------------------------------------------------------
    def read_plan(self) -> dict[str, Any] | None:
        """sweep.json (`{"name", "space", "question", "cells": [...]}`), or None before any run.

        UserError naming the file when it is unreadable or has no list of cells.
        """
        if self._plan is None:
            if not self.plan_path.is_file():
                return None
            plan = self.read_json(self.plan_path)
            cells = plan.get("cells") if isinstance(plan, dict) else None
            if not isinstance(cells, list) or not cells:
                raise UserError(f"{self.plan_path}: expected a non-empty list under 'cells'")
            self._plan = plan
        return self._plan

    def write_plan(self, plan: dict[str, Any]) -> None:
        atomic_write_json(self.plan_path, plan)
        self._plan = plan

    def plan_trial_ids(self) -> list[str]:
        """Distinct trial ids of the plan, in plan order (empty before any run)."""
        plan = self.read_plan()
        return list(dict.fromkeys(c["trial_id"] for c in plan["cells"])) if plan else []

    # -- trial states ---------------------------------------------------------------------------------
    def status(self, trial_id: str, active_run: str | None = None, now: float | None = None
               ) -> TrialStatus:
        """State of one trial; `active_run` is the run id of a live `sweep.py run` (None: none)."""
        return trial_status(self.trial_dir(trial_id), active_run, time.time() if now is None else now)

    def statuses(self, trial_ids: list[str], now: float | None = None) -> list[TrialStatus]:
        """`status` of every id (in order), against the run currently holding the sweep."""
        run, now = self.active_run(), time.time() if now is None else now
        return [trial_status(self.trial_dir(tid), run, now) for tid in trial_ids]

    def read_metrics(self, trial_id: str) -> dict[str, Any] | None:
        """metrics.json of a finished trial (UserError naming the file when it is not an object)."""
        path = self.trial_dir(trial_id) / "metrics.json"
        if not path.is_file():
            return None
        metrics = self.read_json(path)
        if not isinstance(metrics, dict):
            raise UserError(f"{path}: expected a JSON object")
        return metrics

    def read_config(self, trial_id: str) -> dict[str, Any]:
        """config.json the trial ran with ({} when it never started or the file is unreadable)."""
        config = _read_json_or_none(self.trial_dir(trial_id) / "config.json")
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

    def write_metrics(self, trial_id: str, result: dict[str, Any]) -> None:
        """metrics.json: what train() returned, plus the trial id; its appearance means done."""
        atomic_write_json(self.trial_dir(trial_id) / "metrics.json", {**result, "trial_id": trial_id})

    def write_error(self, trial_id: str, message: str, traceback: str, step: int | None) -> None:
        """error.json: the message's first line (what `status` shows), the traceback, the step."""
        atomic_write_json(self.trial_dir(trial_id) / "error.json", {
            "error": first_line(message, "unknown error"), "traceback": traceback, "step": step})

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
        """Run id of the `sweep.py run` holding the folder, or None when no run holds it."""
        lock = self.root / ".lock"
        if not lock.exists():
            return None
        try:
            with file_lock(lock, shared=True, blocking=False):
                return None
        except BlockingIOError:
            run = _read_json_or_none(self.root / "run.json") or {}
            return str(run.get("run_id", "?"))

    @staticmethod
    def read_json(path: Path) -> Any:
        """A JSON file of the record; UserError naming it when unreadable."""
        try:
            return read_json(path)
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: unreadable JSON ({exc})") from None


def trial_status(trial_dir: Path, active_run: str | None, now: float) -> TrialStatus:
    """State of the trial in `trial_dir` (`SweepRecord.status` for a trial of a sweep)."""
    tid = trial_dir.name
    metrics = _read_json_or_none(trial_dir / "metrics.json")
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
        return TrialStatus(tid, "failed", error=text, step=_number(error.get("step")), steps=steps)
    if (trial_dir / "stopped.json").exists():
        stopped = _read_json_or_none(trial_dir / "stopped.json")
        stopped = stopped if isinstance(stopped, dict) else {}
        return TrialStatus(tid, "stopped", step=_number(stopped.get("step")) or step, steps=steps,
                           metrics=stopped.get("metrics"))
    if active_run is not None and progress.get("run_id") == active_run:
        elapsed = now - float(progress.get("started", now))
        eta = elapsed * (steps - step) / step if step and steps else None
        return TrialStatus(tid, "running", step=step, steps=steps, elapsed_s=elapsed, eta_s=eta)
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

    An flock dies with its process, so a killed driver never leaves a stale lock behind.
    """

    def __init__(self, sweep_dir: Path, run_id: str) -> None:
        self.sweep_dir, self.run_id = Path(sweep_dir), run_id
        self._held: Any = None

    def __enter__(self) -> SweepLock:
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        held = file_lock(self.sweep_dir / ".lock", blocking=False)
        try:
            held.__enter__()
        except BlockingIOError:
            run = _read_json_or_none(self.sweep_dir / "run.json") or {}
            raise UserError(f"{self.sweep_dir} is in use by another `sweep.py run` "
                            f"(pid {run.get('pid', '?')} on {run.get('host', '?')}); "
                            "wait for it or stop it first") from None
        self._held = held
        atomic_write_json(self.sweep_dir / "run.json", {
            "run_id": self.run_id, "pid": os.getpid(), "host": socket.gethostname(),
            "started": time.time()})
        return self

    def __exit__(self, *exc: object) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.__exit__(None, None, None)


def _read_json_or_none(path: Path) -> Any:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def _number(value: Any) -> Any:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
