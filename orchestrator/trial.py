"""A trial's life in its folder, without Ray: what the Tune wrapper in sweep.py runs.

`run_trial` gives `train()` its folder (`results/<sweep>/trials/<id>/`), a heartbeat, its own log
file, and records how it ended (metrics.json or error.json). `prepare_shared` builds what all trials
share (base network, test set) once, in the driver, before any trial starts.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from cascade.config import TrialConfig
from cascade.errors import UserError
from orchestrator import identity, provenance
from orchestrator.record import DETERMINISTIC, SweepRecord
from orchestrator.space import Cell

TrainFn = Callable[..., dict]  # cascade.train.train's signature (metrics_file=False: we record it)
# builds a shared artifact for a config, returns its path (None: the config needs none)
PrepareFn = Callable[[TrialConfig], Any]


def run_trial(cell: Cell, record: SweepRecord, run_id: str, train_fn: TrainFn,
              report: Callable[[dict[str, Any], int], None]) -> dict[str, Any]:
    """Run `train_fn` for `cell` in its trial folder; return its result (written as metrics.json).

    `report(metrics, step)` receives every report of the trial (step: the last reported step).
    A finished evaluation is not run again: its metrics are returned as they are. A trial whose
    training finished but lacks this evaluation resumes at its last step: train() evaluates
    without a training step. Before anything runs, the input files must still have the content
    fingerprints the plan was made with. A failure writes error.json (first line, traceback, step,
    whether it is deterministic) and re-raises.
    """
    tid, eid = cell.trial_id, cell.eval_id
    if (done := record.read_metrics(tid, eid)) is not None:  # e.g. a search re-proposing a point
        return done
    record.start_attempt(tid)
    heartbeat = record.heartbeat(tid, run_id, steps=cell.config.steps if cell.kind == "cascade" else None)

    def on_report(metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        # The checkpoint stays in the trial folder (train() writes it there); Ray never copies it.
        heartbeat.beat(metrics.get("step"))
        report(metrics, heartbeat.step or 0)

    with open(record.log_path(tid), "a", buffering=1, encoding="utf-8") as log, \
            logging_to(log, "%(asctime)s %(name)s: %(message)s", ""), \
            contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            check_fingerprints(cell)
            result = train_fn(with_stream_cache(cell.config, record), report=on_report,
                              checkpoint_dir=str(record.checkpoint_dir(tid)),
                              output_dir=str(record.eval_dir(tid, eid)), metrics_file=False)
        except Exception as exc:
            record.write_error(tid, f"{type(exc).__name__}: {exc}", traceback.format_exc(),
                               getattr(exc, "step", heartbeat.step),
                               deterministic=type(exc).__name__ in DETERMINISTIC
                               or isinstance(exc, UserError))
            raise
    result = {**result, "provenance": provenance.collect(cell.fingerprints, result.get("device"))}
    record.write_metrics(tid, eid, result)
    return result


def with_stream_cache(cfg: TrialConfig, record: SweepRecord) -> TrialConfig:
    """A cascade trial's config with the sweep's stream cache folder (`stream_cache_dir`, a runtime
    field: the same trial), unless it has none or names its own. Trials of one stream share it."""
    if cfg.kind != "cascade" or not cfg.stream_cache or cfg.stream_cache_dir is not None:
        return cfg
    return cfg.replace(stream_cache_dir=str(record.stream_dir))


def check_fingerprints(cell: Cell) -> None:
    """The cell's input files still have the content they had when the sweep was planned.

    A file replaced, edited or gone in between would mix two inputs under one identity: the trial
    fails with one line naming the file (UserError, deterministic) instead.
    """
    now = {"training": identity.training_inputs(cell.config, memo=False),
           "evaluation": identity.evaluation_inputs(cell.config, memo=False)}
    for part, planned in cell.fingerprints.items():
        for key, value in planned.items():
            if now.get(part, {}).get(key) != value:
                where = _input_path(cell.config, key)
                raise UserError(f"{where}: changed since the sweep was planned ({key} fingerprint "
                                f"{value} -> {now.get(part, {}).get(key)}); run the sweep again to "
                                "plan it as a new input")


def prepare_shared(name: str, configs: list[TrialConfig], functions: tuple[PrepareFn, ...]) -> None:
    """Build what trials share (base network, test set) once, before they start.

    Each function takes a TrialConfig and returns a path, or None when the config needs nothing
    of it; they cache by config, so calling them for every config costs one build per distinct
    base / encoder / test set. cascade's INFO logs are shown:
    the first build takes minutes.
    """
    print(f"{name}: preparing the base network and the test set (built once, then cached)", flush=True)
    with logging_to(sys.stdout, f"{name}: %(message)s", "cascade"):
        done: set[str] = set()
        for cfg in configs:
            for function in functions:
                if (built := function(cfg)) is not None and (path := str(built)) not in done:
                    done.add(path)
                    print(f"{name}: using {path}", flush=True)


@contextlib.contextmanager
def logging_to(stream: TextIO, fmt: str, handler_on: str, info_on: str = "cascade") -> Iterator[None]:
    """Send the records reaching logger `handler_on` ("" = root) to `stream`, with `info_on`'s
    INFO records (cascade's step lines, the base network's progress) among them."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(fmt))
    target, ours = logging.getLogger(handler_on), logging.getLogger(info_on)
    level = ours.level
    target.addHandler(handler)
    ours.setLevel(logging.INFO)
    try:
        yield
    finally:
        ours.setLevel(level)
        target.removeHandler(handler)


def _input_path(cfg: TrialConfig, key: str) -> str:
    """The file or folder behind a fingerprint key (for messages)."""
    paths = {"checkpoint": cfg.checkpoint, "encoder_weights": cfg.encoder_weights, "data": cfg.data,
             "backgrounds": cfg.backgrounds, "test_data": identity.test_set_path(cfg),
             "lpips_weights": getattr(cfg, "lpips_weights", None)}
    return str(paths.get(key) or key)
