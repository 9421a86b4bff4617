"""What a person reads about a sweep: the progress line, the ETA, `status` lines, event lines.

Pure functions of `TrialStatus` values (orchestrator.record) and plan cells; no I/O, no Ray.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

from cascade.fmt import duration, psnr_text
from orchestrator.plan import Plan, cells_as_written, keys, write_plan
from orchestrator.record import STATES, SweepRecord, TrialStatus
from orchestrator.space import Cell, SweepSpace, space_name

SHIPPED_SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
PROGRESS_EVERY_S = 30.0  # the progress line repeats at least this often while trials run


def progress_line(statuses: list[TrialStatus], concurrency: int, elapsed_s: float | None = None) -> str:
    """One line a person can follow: counts, best-so-far PSNR per region, elapsed and ETA."""
    counts = {s: sum(t.state == s for t in statuses) for s in STATES}
    todo = counts["pending"] + counts["interrupted"] + counts["trained"]
    parts = [f"{counts['done']}/{len(statuses)} done", f"{counts['running']} running",
             f"{counts['failed']} failed", f"{todo} pending"]
    if counts["stopped"]:
        parts.append(f"{counts['stopped']} stopped early")
    best = {}
    for region in ("entire", "streak", "glare"):
        values = [t.metrics.get(f"psnr_{region}") for t in statuses if t.metrics]
        values = [v for v in values if _finite(v)]
        if values:
            best[f"psnr_{region}"] = max(values)
    line = " | ".join([", ".join(parts)]
                      + (["best " + psnr_text(best, ("entire", "streak", "glare"))] if best else []))
    times = [f"elapsed {duration(elapsed_s)}"] if elapsed_s is not None else []
    eta = sweep_eta(statuses, concurrency)
    if eta is not None and (todo or counts["running"]):
        times.append(f"ETA {duration(eta)}")
    return line + (" | " + ", ".join(times) if times else "")


def sweep_eta(statuses: list[TrialStatus], concurrency: int) -> float | None:
    """Seconds until every running and pending trial is done, at the pace seen so far.

    A trial's duration is estimated as the mean over finished trials and running ones (elapsed +
    remaining); None before any trial has finished or reported progress.
    """
    durations = [t.elapsed_s for t in statuses if t.state == "done" and t.elapsed_s]
    durations += [t.elapsed_s + t.eta_s for t in statuses if t.state == "running" and t.eta_s is not None]
    if not durations:
        return None
    mean = sum(durations) / len(durations)
    running = [t.eta_s if t.eta_s is not None else mean for t in statuses if t.state == "running"]
    waiting = sum(t.state in ("pending", "interrupted", "trained") for t in statuses)
    return (sum(running) + mean * waiting) / max(1, concurrency)


def cell_label(cell: dict[str, Any]) -> str:
    """`reference s0` / `k=2 lambda_=0.6 s0` for a plan cell (sweep.json entry)."""
    if cell.get("kind") == "reference":
        return f"reference s{cell.get('seed')}"
    return f"k={cell.get('k')} lambda_={cell.get('lambda_'):.4g} s{cell.get('seed')}"


def status_report(space_path: Path, results: Path, overrides: dict[str, Any]) -> list[str]:
    """`sweep.py status`: one line per cell of the space as written now (new cells show as
    pending) with its state, then the progress line. `overrides`: load_space's command-line ones."""
    name = space_name(space_path)
    record = SweepRecord((results / name).resolve())
    cells = cells_as_written(space_path, record, overrides)
    ids = [c["trial_id"] for c in cells]
    by_id = dict(zip(ids, record.statuses([(c["trial_id"], c["eval_id"]) for c in cells])))
    lines = status_lines(name, cells, by_id, {t: record.evaluations(t) for t in ids})
    if record.read_plan() is None:
        lines.insert(0, f"{name}: nothing run yet in {record.root}; "
                        f"`make sweep SPACE={space_path.stem}` starts it")
    return lines


def status_lines(name: str, cells: list[dict[str, Any]], by_id: dict[str, TrialStatus],
                 evaluations: dict[str, list[str]] | None = None) -> list[str]:
    """`sweep.py status`: one line per cell, then the progress line. `evaluations`: the eval ids
    each trial already has (listed when a trial has any other than the cell's own)."""
    lines = []
    for c in cells:
        s = by_id[c["trial_id"]]
        others = [e for e in (evaluations or {}).get(c["trial_id"], []) if e != c.get("eval_id")]
        extra = f" [other evaluations: {', '.join(others)}]" if others else ""
        lines.append(f"{cell_label(c):<28} {s.state:<11} {c['trial_id']:<28} {status_detail(s)}{extra}")
    return [*lines, f"{name}: {progress_line(list(by_id.values()), 1)}"]


def status_detail(s: TrialStatus) -> str:
    """What a status line says after the state: PSNR and time, step and ETA, or the error."""
    psnr = psnr_text(s.metrics or {})
    if s.state == "done":
        took = f"took {duration(s.elapsed_s)}" if s.elapsed_s else ""
        return ", ".join(p for p in (psnr, took) if p)
    if s.state == "running":
        step = f"step {s.step}/{s.steps}, " if s.step is not None and s.steps else ""
        eta = f", ETA {duration(s.eta_s)}" if s.eta_s is not None else ""
        return f"{step}elapsed {duration(s.elapsed_s or 0)}{eta}"
    if s.state == "failed":
        return ("(deterministic; not retried without --retry-failed) " if s.deterministic else "") + (s.error or "")
    if s.state == "trained":
        return "training done; this evaluation runs next (no training step)"
    if s.state in ("interrupted", "stopped") and s.step is not None:
        then = f", {psnr} then" if psnr else ""
        return f"at step {s.step}" + (f"/{s.steps}" if s.steps else "") + then
    return ""


def event_line(s: TrialStatus, where: str = "") -> str:
    """The driver's line when a trial ends: done (PSNR, time), stopped early, or FAILED."""
    if s.state == "done":
        return f"  done    {s.trial_id}: {status_detail(s)}"
    if s.state == "stopped":
        psnr = psnr_text(s.metrics or {})
        return f"  stopped {s.trial_id} at step {s.step}" + (f", {psnr}" if psnr else "") + " (early stopping)"
    return f"  FAILED  {s.trial_id}: {s.error}" + (f" (see {where})" if where else "")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def next_command(space: SweepSpace, sub: str) -> str:
    """The command a person types next: a make target for the shipped spaces."""
    if space.path.resolve() == SHIPPED_SPACES / space.path.name:
        return f"make {sub} SPACE={space.path.stem}"
    return f"python sweep.py {sub} --space {space.path}"


def plan_lines(space: SweepSpace, plan: Plan, statuses: list[TrialStatus], todo: int,
               where: Path, retry_failed: bool) -> list[str]:
    """What a run says before it starts: the question, the cells and trials by state, what runs."""
    counts = {state: n for state in STATES if (n := sum(s.state == state for s in statuses))}
    known = ", ".join(f"{n} {state}" for state, n in counts.items())
    lines = [re.split(r"(?<=[?.!]) ", space.question)[0],
             f"{len(plan.grid) + len(plan.sampled)} cells, {len(statuses)} trials ({known}) -> {where}"]
    new = plan.new_samples(space)
    if todo or new:
        lines.append(f"running {todo} trial(s)" + (f" + {new} new search sample(s)" if new else "")
                     + "; finished ones are skipped"
                     + ("" if retry_failed else "; failed ones are left alone (--no-retry-failed)"))
    return lines


def outcome_line(space: SweepSpace, left: int, interrupted: bool) -> str:
    """How a run ended, and what to type next."""
    if interrupted:
        return ("interrupted. Run the same command again to resume: finished trials are kept, "
                "unfinished ones continue from their last checkpoint.")
    if left:
        return (f"{left} trial(s) not done; `{next_command(space, 'status')}` shows why. "
                "Running again retries failed ones.")
    return f"complete. `{next_command(space, 'table1')}` writes the tables."


class Board:
    """The driver's view of a running sweep, updated per trial event (Ray-free; sweep.py's Tune
    callback feeds it).

    States live in memory, read from the folder once at the start and per ended trial only, so an
    event costs the same in a sweep of 10 trials or 5000. It prints a progress line on each change
    of the counts and every PROGRESS_EVERY_S, and one line per ended trial; it writes what only the
    driver can: stopped.json (the scheduler ended a trial), error.json (a trial's process died
    before writing one), and new search samples into the plan.
    """

    def __init__(self, space: SweepSpace, record: SweepRecord, plan: Plan, concurrency: int) -> None:
        self.space, self.record, self.plan, self.concurrency = space, record, plan, concurrency
        cells = plan.trials()
        self.eval_ids = {c.trial_id: c.eval_id for c in cells}
        self.states = {c.trial_id: s for c, s in zip(cells, record.statuses(keys(cells)))}
        self.started_at, self.last_print, self.last_counts = time.time(), 0.0, None
        self.begun: dict[str, float] = {}

    def say(self, line: str) -> None:
        print(line, flush=True)

    def started(self, cell: Cell, sampled: dict[str, Any] | None) -> None:
        """A trial started; `sampled`: the values a search drew for it (None for a grid cell)."""
        if sampled is not None and (plan := self.plan.with_sample(cell, sampled)) is not self.plan:
            self.plan = plan
            write_plan(self.space, self.record, plan)
        self.eval_ids[cell.trial_id] = cell.eval_id
        self.begun[cell.trial_id] = time.time()
        self.states[cell.trial_id] = TrialStatus(cell.trial_id, "running", steps=cell.config.steps)
        self.tick(force=True)

    def result(self, trial_id: str, step: Any) -> None:
        """A trial reported; `step` moves its ETA."""
        steps = self.states[trial_id].steps if trial_id in self.states else None
        elapsed = time.time() - self.begun.get(trial_id, time.time())
        eta = elapsed * (steps - step) / step if isinstance(step, int) and step > 0 and steps else None
        self.states[trial_id] = TrialStatus(trial_id, "running", step=step, steps=steps,
                                            elapsed_s=elapsed, eta_s=eta)

    def completed(self, trial_id: str, last_result: dict[str, Any]) -> None:
        """Tune saw the trial end without an error: done, or stopped early by the scheduler."""
        status = self.record.status(trial_id, self.eval_ids[trial_id])
        if status.state not in ("done", "failed"):  # ended by the scheduler before train() returned
            self.record.write_stopped(trial_id, last_result.get("step"), last_result)
            status = self.record.status(trial_id, self.eval_ids[trial_id])
        self._ended(status)

    def errored(self, trial_id: str, error: str) -> None:
        """The trial raised, or its process died (then error.json is written here)."""
        tdir, eval_id = self.record.trial_dir(trial_id), self.eval_ids[trial_id]
        if not (tdir / "error.json").exists():
            text = error.strip()
            self.record.write_error(trial_id, "trial process died" + (
                f": {text.splitlines()[-1]}" if text else ""), text,
                self.record.status(trial_id, eval_id).step)
        self._ended(self.record.status(trial_id, eval_id),
                    where=f"{tdir / 'error.json'}, {self.record.log_path(trial_id)}")

    def tick(self, force: bool = False) -> None:
        """Print the progress line if the counts changed (with `force`) or PROGRESS_EVERY_S passed."""
        now = time.time()
        counts = [s.state for s in self.states.values()]
        if now - self.last_print < PROGRESS_EVERY_S and (not force or counts == self.last_counts):
            return
        self.last_print, self.last_counts = now, counts
        line = progress_line(list(self.states.values()), self.concurrency, now - self.started_at)
        self.say(f"[{self.space.name}] {line}")

    def _ended(self, status: TrialStatus, where: str = "") -> None:
        self.states[status.trial_id] = status
        self.say(event_line(status, where))
        self.tick(force=True)
