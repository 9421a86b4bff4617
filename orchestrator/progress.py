"""What a person reads about a sweep: the progress line, the ETA, `status` lines, event lines.

Pure functions of `TrialStatus` values (orchestrator.record) and plan cells; no I/O, no Ray.

The progress line is about the cascade cells: its "best" PSNR is over trials of kind "cascade"
only, and its ETA is paced by them. The evaluation-only kinds (`config.EVAL_ONLY_KINDS`: the
reference and the control) take seconds and score the same base in every seed; the reference's
best PSNR would stand in the line from the first trial to the last, and a pace learnt from them
would promise seconds for minutes of fine-tuning. They are printed once each, on their own line
(`eval_only_line`), when the first of them finishes.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cascade.config import EVAL_ONLY_KINDS
from cascade.fmt import duration, is_number, psnr_text
from orchestrator.plan import Plan, add_sample, cells_as_written, keys
from orchestrator.record import STATES, SweepRecord, TrialStatus
from orchestrator.space import Cell, SweepSpace, space_name

SHIPPED_SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
PROGRESS_EVERY_S = 30.0  # the progress line repeats at least this often while trials run
REGIONS = ("entire", "streak", "glare")  # the regions whose best PSNR the progress line shows
WAITING = ("pending", "interrupted", "trained")  # states of trials still to start
# What the evaluation-only kinds are, in the line that prints each once.
EVAL_ONLY_NAMES = {"reference": "reference (the base network)",
                   "control": "control (the cascade at 0 steps)"}
PACES = ("train", "eval")  # a trial's pace class: it trains (cascade), or it only evaluates


def trial_kind(s: TrialStatus, kinds: Mapping[str, str] | None = None) -> str:
    """A trial's kind: from `kinds` (trial id -> the plan cell's kind), else its metrics.json's
    `kind`, else "cascade" (what a trial without either is: a search sample, an old record)."""
    kind = (kinds or {}).get(s.trial_id) or (s.metrics or {}).get("kind")
    return kind if isinstance(kind, str) else "cascade"


def progress_line(statuses: list[TrialStatus], concurrency: int, elapsed_s: float | None = None,
                  kinds: Mapping[str, str] | None = None) -> str:
    """One line a person can follow: counts, best-so-far PSNR per region over the cascade trials,
    elapsed and ETA. `kinds`: trial id -> kind (`trial_kind`)."""
    counts = {s: sum(t.state == s for t in statuses) for s in STATES}
    return _line(counts, len(statuses), best_psnr(statuses, kinds),
                 sweep_eta(statuses, concurrency, kinds), elapsed_s)


def best_psnr(statuses: list[TrialStatus], kinds: Mapping[str, str] | None = None) -> dict[str, float]:
    """`psnr_<region>` -> the largest finite value among the metrics of the cascade trials
    (regions that have one; the evaluation-only kinds are left out, see the module docstring)."""
    best = {}
    cascade = [t for t in statuses if t.metrics and trial_kind(t, kinds) not in EVAL_ONLY_KINDS]
    for region in REGIONS:
        values = [v for t in cascade if _finite(v := t.metrics.get(f"psnr_{region}"))]
        if values:
            best[f"psnr_{region}"] = max(values)
    return best


def eval_only_line(kind: str, s: TrialStatus) -> str:
    """The line an evaluation-only trial's result gets, once: "reference (the base network),
    seed 0: PSNR entire 23.57 streak 30.10 glare 24.02"."""
    seed = (s.metrics or {}).get("seed")
    where = f", seed {seed}" if isinstance(seed, int) else ""
    return f"{EVAL_ONLY_NAMES.get(kind, kind)}{where}: {psnr_text(s.metrics or {}, REGIONS) or 'no PSNR'}"


def _line(counts: dict[str, int], total: int, best: dict[str, float], eta: float | None,
          elapsed_s: float | None) -> str:
    """The progress line from its parts (`progress_line` computes them, `Board` keeps them)."""
    todo = counts["pending"] + counts["interrupted"] + counts["trained"]
    parts = [f"{counts['done']}/{total} done", f"{counts['running']} running",
             f"{counts['failed']} failed", f"{todo} pending"]
    if counts["stopped"]:
        parts.append(f"{counts['stopped']} stopped early")
    line = " | ".join([", ".join(parts)] + (["best " + psnr_text(best, REGIONS)] if best else []))
    times = [f"elapsed {duration(elapsed_s)}"] if elapsed_s is not None else []
    if eta is not None and (todo or counts["running"]):
        times.append(f"ETA {duration(eta)}")
    return line + (" | " + ", ".join(times) if times else "")


def sweep_eta(statuses: list[TrialStatus], concurrency: int,
              kinds: Mapping[str, str] | None = None) -> float | None:
    """Seconds until every running and waiting trial is done, at the pace seen so far.

    Paced per class (`pace_of`): a training trial takes the mean duration of the finished
    training trials and of the running ones that reported (elapsed + remaining), times the share
    of its configured steps still to run (an interrupted trial resumes at its checkpoint); an
    evaluation takes the mean of the finished evaluations (0 before any: they take seconds).
    None while training is still to come and no training trial has finished or reported: a pace
    learnt from evaluations would promise seconds for minutes of fine-tuning.
    """
    done = {p: [0.0, 0] for p in PACES}
    waiting = dict.fromkeys(PACES, 0.0)
    running = []
    for t in statuses:
        p = pace_of(t, kinds)
        if t.state == "done" and t.elapsed_s:
            done[p][0] += t.elapsed_s
            done[p][1] += 1
        elif t.state in WAITING:
            waiting[p] += work_left(t)
        elif t.state == "running":
            running.append((t, p))
    return _eta(done, running, waiting, concurrency)


def pace_of(s: TrialStatus, kinds: Mapping[str, str] | None = None) -> str:
    """"eval" for an evaluation-only kind and for a trained trial (its new evaluation runs no
    training step), "train" otherwise."""
    return "eval" if s.state == "trained" or trial_kind(s, kinds) in EVAL_ONLY_KINDS else "train"


def work_left(s: TrialStatus) -> float:
    """Share of a waiting trial's configured steps still to run: 1 - step/steps for one that
    resumes from a checkpoint, else 1."""
    if s.step and s.steps and s.state != "trained":
        return max(0.0, 1.0 - s.step / s.steps)
    return 1.0


def _eta(done: Mapping[str, list], running: list[tuple[TrialStatus, str]],
         waiting: Mapping[str, float], concurrency: int) -> float | None:
    """`sweep_eta` from its parts, per pace class p: done[p] = [summed seconds, count] of the
    finished trials, the running trials with their class, waiting[p] = the summed `work_left` of
    the trials still to start."""
    mean: dict[str, float | None] = {}
    for p in PACES:
        durations = [t.elapsed_s + t.eta_s for t, q in running
                     if q == p and t.eta_s is not None and t.elapsed_s is not None]
        n = done[p][1] + len(durations)
        mean[p] = (done[p][0] + sum(durations)) / n if n else None
    if mean["train"] is None and (mean["eval"] is None or waiting["train"]
                                  or any(q == "train" and t.eta_s is None for t, q in running)):
        return None
    mean["eval"] = mean["eval"] or 0.0
    remaining = sum(mean[p] * waiting[p] for p in PACES if waiting[p])
    for t, p in running:
        remaining += t.eta_s if t.eta_s is not None else max(0.0, mean[p] - (t.elapsed_s or 0.0))
    return remaining / max(1, concurrency)


def cell_label(cell: dict[str, Any]) -> str:
    """`reference s0` / `control s0` / `k=2 lambda_=0.6 s0` for a plan cell (sweep.json entry)."""
    if cell.get("kind") in EVAL_ONLY_KINDS:
        return f"{cell.get('kind')} s{cell.get('seed')}"
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
    kinds = {c["trial_id"]: c.get("kind") for c in cells}
    return [*lines, f"{name}: {progress_line(list(by_id.values()), 1, kinds=kinds)}"]


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
    return is_number(value, finite=True)


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

    States live in memory, read from the folder once at the start and per ended trial only, and
    so do the progress line's parts (counts per state, best PSNR, summed durations, the running
    trials): an event, a tick and a printed line cost the same in a sweep of 10 trials or 5000
    (O(running trials), not O(trials)). It prints a progress line on each change of the counts and
    every PROGRESS_EVERY_S, one line per ended trial, and, once per evaluation-only kind (the
    reference, the control), that kind's first result on a line of its own
    (`eval_only_line`); it writes what only the driver can:
    stopped.json (the scheduler ended a trial), error.json (a trial's process died before writing
    one), and new search samples (appended to the plan, `plan.add_sample`).
    """

    def __init__(self, space: SweepSpace, record: SweepRecord, plan: Plan, concurrency: int) -> None:
        self.space, self.record, self.concurrency = space, record, concurrency
        cells = plan.trials()
        self.eval_ids = {c.trial_id: c.eval_id for c in cells}
        self.kinds = {c.trial_id: c.kind for c in cells}
        self.sampled = {c.trial_id for c, _ in plan.sampled}  # search trials the plan records
        self.states: dict[str, TrialStatus] = {}
        self.counts = dict.fromkeys(STATES, 0)
        self.best: dict[str, float] = {}
        self._best_stale = False  # a status with metrics was replaced: recompute before printing
        # Per pace class (`pace_of`): [summed wall time, count] of the done trials that have one,
        # and the summed `work_left` of the waiting trials.
        self.done = {p: [0.0, 0] for p in PACES}
        self.waiting = dict.fromkeys(PACES, 0.0)
        self.running: dict[str, TrialStatus] = {}
        self.eval_only: dict[str, TrialStatus] = {}  # kind -> its first done trial
        self.announced: set[str] = set()  # the kinds whose line was printed
        for status in record.statuses(keys(cells)):
            self._set(status)
        self.started_at, self.last_print, self.last_counts = time.time(), 0.0, None
        self.begun: dict[str, float] = {}

    def say(self, line: str) -> None:
        print(line, flush=True)

    def started(self, cell: Cell, sampled: dict[str, Any] | None) -> None:
        """A trial started; `sampled`: the values a search drew for it (None for a grid cell)."""
        if sampled is not None and cell.trial_id not in self.sampled:
            self.sampled.add(cell.trial_id)
            add_sample(self.record, cell, sampled)
        self.eval_ids[cell.trial_id] = cell.eval_id
        self.kinds.setdefault(cell.trial_id, cell.kind)  # a plan cell keeps the kind it was counted as
        self.begun[cell.trial_id] = time.time()
        self._set(TrialStatus(cell.trial_id, "running", steps=cell.config.steps))
        self.tick(force=True)

    def result(self, trial_id: str, step: Any) -> None:
        """A trial reported; `step` moves its ETA."""
        steps = self.states[trial_id].steps if trial_id in self.states else None
        elapsed = time.time() - self.begun.get(trial_id, time.time())
        eta = elapsed * (steps - step) / step if isinstance(step, int) and step > 0 and steps else None
        self._set(TrialStatus(trial_id, "running", step=step, steps=steps, elapsed_s=elapsed,
                              eta_s=eta))

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
        counts = tuple(self.counts.values())
        if now - self.last_print < PROGRESS_EVERY_S and (not force or counts == self.last_counts):
            return
        self.last_print, self.last_counts = now, counts
        for kind, status in self.eval_only.items():
            if kind not in self.announced:
                self.announced.add(kind)
                self.say(f"[{self.space.name}] {eval_only_line(kind, status)}")
        self.say(f"[{self.space.name}] {self.line(now - self.started_at)}")

    def line(self, elapsed_s: float | None = None) -> str:
        """`progress_line` of the board's states, from the parts it keeps."""
        if self._best_stale:
            self.best, self._best_stale = best_psnr(list(self.states.values()), self.kinds), False
        running = [(s, pace_of(s, self.kinds)) for s in self.running.values()]
        waiting = {p: round(w, 9) for p, w in self.waiting.items()}  # sums of +/- fractions
        eta = _eta(self.done, running, waiting, self.concurrency)
        return _line(self.counts, len(self.states), self.best, eta, elapsed_s)

    def _set(self, status: TrialStatus) -> None:
        """Replace a trial's state, keeping the line's parts up to date."""
        old = self.states.get(status.trial_id)
        if old is not None:
            self._count(old, -1)
        self.states[status.trial_id] = status
        self._count(status, 1)

    def _count(self, s: TrialStatus, sign: int) -> None:
        self.counts[s.state] += sign
        kind, p = trial_kind(s, self.kinds), pace_of(s, self.kinds)
        if s.state == "done" and s.elapsed_s:
            self.done[p][0] += sign * s.elapsed_s
            self.done[p][1] += sign
        if s.state in WAITING:
            self.waiting[p] += sign * work_left(s)
        if s.state == "done" and sign > 0 and kind in EVAL_ONLY_KINDS:
            self.eval_only.setdefault(kind, s)
        if s.state == "running":
            if sign > 0:
                self.running[s.trial_id] = s
            else:
                self.running.pop(s.trial_id, None)
        if s.metrics and kind not in EVAL_ONLY_KINDS and not self._best_stale:
            if sign < 0:  # a maximum cannot forget a value: recompute when printing
                self._best_stale = True
            else:
                for key, value in best_psnr([s], self.kinds).items():
                    self.best[key] = max(value, self.best.get(key, value))

    def _ended(self, status: TrialStatus, where: str = "") -> None:
        self._set(status)
        self.say(event_line(status, where))
        self.tick(force=True)
