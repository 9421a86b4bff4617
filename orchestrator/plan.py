"""A run's plan: the space's grid cells plus the search samples recorded so far, and what to run.

The plan is written to `sweep.json` (through orchestrator.record) once per run and once at the end
of a search; each new search sample is appended on its own (`add_sample`), so drawing one costs the
same in a plan of 10 trials or 5000. `status`, `table1` and a resumed search read it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cascade.errors import UserError
from cascade.fmt import is_number
from orchestrator.record import UNFINISHED, SweepRecord, TrialStatus
from orchestrator.space import Cell, SweepSpace, cell_for, distinct_trials, load_space


@dataclass(frozen=True)
class Plan:
    """The grid cells of the space plus the search trials recorded so far (sweep.json)."""

    grid: tuple[Cell, ...]
    sampled: tuple[tuple[Cell, dict[str, Any]], ...]  # (cell, its sampled values)

    def trials(self) -> list[Cell]:
        """One cell per distinct trial, grid first, in plan order."""
        return distinct_trials([*self.grid, *(c for c, _ in self.sampled)])

    def with_sample(self, cell: Cell, values: dict[str, Any]) -> Plan:
        """This plan plus one new search sample (unchanged when the trial is already in it)."""
        if cell.trial_id in {c.trial_id for c, _ in self.sampled}:
            return self
        return Plan(self.grid, (*self.sampled, (cell, values)))

    def finished_samples(self, record: SweepRecord, metric: str) -> tuple[list[dict], list[float]]:
        """(sampled values, metric) of the recorded samples that report `metric`: a warm start."""
        points, rewards = [], []
        for cell, values in self.sampled:
            value = (record.status(cell.trial_id, cell.eval_id).metrics or {}).get(metric)
            if is_number(value):
                points.append(values)
                rewards.append(float(value))
        return points, rewards

    def new_samples(self, space: SweepSpace) -> int:
        """Search samples still to draw (0 without a search)."""
        return 0 if space.search is None else max(0, space.search.num_samples - len(self.sampled))


def load_plan(space: SweepSpace, record: SweepRecord) -> Plan:
    """The space's cells, then the search trials sweep.json records for this space.

    Recorded samples are re-derived from this space's fixed fields: a changed space starts a new
    search; samples whose parameter names differ from the space's are dropped.
    """
    sampled: dict[str, tuple[Cell, dict[str, Any]]] = {}
    plan = record.read_plan() if space.search is not None else None
    if plan is not None:
        names = {p.name for p in space.search.params}
        for entry in plan["cells"]:
            values = entry.get("sampled")
            if isinstance(values, dict) and set(values) == names:
                cell = cell_for(space.search_config(values))
                sampled.setdefault(cell.trial_id, (cell, values))
    return Plan(grid=space.cells, sampled=tuple(sampled.values()))


def write_plan(space: SweepSpace, record: SweepRecord, plan: Plan) -> None:
    """sweep.json: the plan's cells (search samples marked with their sampled values)."""
    cells = [c.to_json() for c in plan.grid] + [sample_entry(c, values) for c, values in plan.sampled]
    record.write_plan({"name": space.name, "space": str(space.path.resolve()),
                       "question": space.question, "cells": cells})


def add_sample(record: SweepRecord, cell: Cell, values: dict[str, Any]) -> None:
    """Record one new search sample without rewriting the plan (O(1) in the plan's size)."""
    record.add_sample(sample_entry(cell, values))


def sample_entry(cell: Cell, values: dict[str, Any]) -> dict[str, Any]:
    """A search sample as sweep.json stores it: the cell with the values the search drew."""
    return {**cell.to_json(), "sampled": values}


def keys(cells: list[Cell]) -> list[tuple[str, str]]:
    """(trial id, eval id) of each cell: what the record's states are looked up by."""
    return [(c.trial_id, c.eval_id) for c in cells]


def should_run(status: TrialStatus, retry_failed: bool | None) -> bool:
    """done and early-stopped trials are final; failed ones run again when `retry_failed` is True,
    never when it is False, and by default (None) unless the failure was deterministic (a bad
    input or a diverging loss fails the same way from the same checkpoint)."""
    if status.state == "failed":
        return retry_failed is True or (retry_failed is None and not status.deterministic)
    return status.state in UNFINISHED


def not_done(statuses: list[TrialStatus]) -> int:
    """Trials still to finish: early-stopped ones count as finished."""
    return sum(s.state not in ("done", "stopped") for s in statuses)


def cut_short(record: SweepRecord, cells: list[Cell]) -> bool:
    """After a Tuner run: did a trial it was given end neither done, failed nor stopped early?

    That happens only when the run was interrupted (SIGINT): Tune then stops running trials
    without an error, so the results folder, not Ray's trial states, tells us.
    """
    return any(s.state in UNFINISHED for s in record.statuses(keys(cells)))


def cells_as_written(space_path: Path, record: SweepRecord, overrides: dict[str, Any]
                     ) -> list[dict[str, Any]]:
    """The cells (sweep.json entries) of the space file as it is now, with `overrides` (load_space's
    command-line ones) and the search samples recorded so far; the last run's plan when the space
    cannot be expanded without inputs it `requires` (e.g. `status` of table1.yaml without --data)."""
    try:
        space = load_space(space_path, **overrides)
    except UserError as exc:
        if record.read_plan() is None or " needs --" not in str(exc):
            raise
        return record.read_plan()["cells"]
    plan = load_plan(space, record)
    return [c.to_json() for c in plan.grid] + [sample_entry(c, v) for c, v in plan.sampled]
