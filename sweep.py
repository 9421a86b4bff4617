"""flaresweep command line: run a search space with Ray Tune, show where it stands, write Table 1.

    python sweep.py run    --space search_spaces/demo.yaml [--data DIR --checkpoint PATH ...]
    python sweep.py status --space search_spaces/demo.yaml
    python sweep.py table1 --space search_spaces/demo.yaml

The only module that imports Ray. The results folder (results/<sweep>/, docs/design.md "Results on
disk") is the record: every invocation of `run` reads it, skips finished trials, resumes
interrupted ones from their own checkpoints, retries failed ones and runs new cells. Ray's
experiment state is not used for resuming (see `_run_tuner`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cascade.config import TrialConfig
from cascade.errors import UserError, cli_errors
from cascade.io import atomic_write_json, read_json
from cascade.space import (
    Cell,
    SweepLock,
    SweepSpace,
    cell_for,
    distinct_trials,
    format_duration,
    load_space,
    progress_line,
    sweep_statuses,
    trial_status,
)

# What a trial runs, and what the driver builds once before the trials share it (the base network,
# the test set), as "module:function" (comma-separated). The environment variables swap them:
# tests use fast fakes with the same signatures.
DEFAULT_TRAIN_FN, TRAIN_FN_ENV = "cascade.train:train", "FLARESWEEP_TRAIN_FN"
DEFAULT_PREPARE, PREPARE_ENV = "cascade.base:ensure_base,cascade.base:ensure_test_data", "FLARESWEEP_PREPARE"
PROGRESS_EVERY_S = 30.0
# File systems a multi-node cluster can share (from /proc/mounts); anything else counts as local.
SHARED_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "cephfs", "ceph",
             "glusterfs", "panfs", "wekafs", "afs", "9p", "fuse.")


# -- run ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunOptions:
    """How to run a sweep (the `run` subcommand's options that are not part of the space)."""

    results: Path  # the results root; the sweep writes results/<name>/
    storage: str | None = None  # Ray storage_path (path or URI); default <sweep>/ray
    address: str | None = None  # Ray cluster to attach to; None: start a local one
    cpus: int | None = None  # local cluster size; None: every core
    connect_timeout_s: float = 30.0
    retry_failed: bool = True
    shared_storage: bool = False  # the user vouches that results/storage are shared across nodes
    train_fn: str | None = None  # default: $FLARESWEEP_TRAIN_FN or DEFAULT_TRAIN_FN
    prepare: str | None = None  # default: $FLARESWEEP_PREPARE or DEFAULT_PREPARE


@dataclass(frozen=True)
class Outcome:
    """How a `run_sweep` call ended."""

    left: int  # trials neither done nor stopped early (0: the sweep is complete)
    interrupted: bool  # stopped by SIGINT; running the command again resumes


def run_sweep(space: SweepSpace, opts: RunOptions) -> Outcome:
    """Run (or resume) `space` in <results>/<name>/ and say how far it got."""
    sweep_dir = (opts.results / space.name).resolve()
    run_id = uuid.uuid4().hex[:12]
    _check_inputs(space, opts, sweep_dir)  # before anything is written: bad input leaves no trace
    with SweepLock(sweep_dir, run_id):
        plan = _plan(space, sweep_dir)
        # Written once here (dropping samples of a changed search); only new samples change it later.
        _write_plan(space, sweep_dir, plan)
        statuses = {t.trial_id: trial_status(sweep_dir / "trials" / t.trial_id, None, time.time())
                    for t in plan.trials()}
        todo = [c for c in plan.trials() if _should_run(statuses[c.trial_id].state, opts)]
        new_samples = _new_samples(space, plan)
        _print_plan(space, sweep_dir, plan, statuses, todo, new_samples, opts)
        if not todo and not new_samples:
            print(f"{space.name}: nothing to run. `{_command(space, 'table1')}` writes the tables.")
            return Outcome(left=_not_done(statuses.values()), interrupted=False)

        _prepare(space, todo, opts.prepare or os.environ.get(PREPARE_ENV) or DEFAULT_PREPARE)
        owns_ray = _connect(opts)
        try:
            storage = _storage(opts, sweep_dir)
            ctx = _RunContext(space=space, sweep_dir=sweep_dir, run_id=run_id, storage=storage,
                              train_fn=opts.train_fn or os.environ.get(TRAIN_FN_ENV) or DEFAULT_TRAIN_FN,
                              concurrency=_concurrency(space))
            interrupted = False
            if todo:
                _run_tuner(ctx, cells=todo)
                interrupted = _cut_short(sweep_dir, [c.trial_id for c in todo])
            if not interrupted and space.search is not None:
                plan = _plan(space, sweep_dir)  # warm-start the search from everything on disk
                asked = _new_samples(space, plan)
                if asked:
                    ran = _run_tuner(ctx, cells=None)
                    plan = _plan(space, sweep_dir)
                    interrupted = ran < asked or _cut_short(
                        sweep_dir, [c.trial_id for c, _ in plan.sampled])
        finally:
            if owns_ray:
                import ray

                ray.shutdown()
        plan = _plan(space, sweep_dir)
        final = sweep_statuses(sweep_dir, [t.trial_id for t in plan.trials()], time.time())
        print(f"{space.name}: {progress_line(final, 1)}")
        left = _not_done(final)
        if interrupted:
            print(f"{space.name}: interrupted. Run the same command again to resume: finished "
                  "trials are kept, unfinished ones continue from their last checkpoint.")
        elif left:
            print(f"{space.name}: {left} trial(s) not done; `{_command(space, 'status')}` shows "
                  "why. Running again retries failed ones.")
        else:
            print(f"{space.name}: complete. `{_command(space, 'table1')}` writes the tables.")
        return Outcome(left=left, interrupted=interrupted)


def _check_inputs(space: SweepSpace, opts: RunOptions, sweep_dir: Path) -> None:
    """Refuse what would only fail later, in a trial or in Ray, with one UserError naming it.

    Test sets are read in full (stems, decodable images, mask colours); checkpoints must be
    Uformers with 3 or 6 output channels; the results folder and a local storage path must be
    creatable. Nothing is written, so a refused run leaves the results folder as it was.
    """
    from cascade.data.testset import PairedTestSet
    from cascade.uformer import infer_arch, read_state_dict

    configs = [c.config for c in space.cells]
    if space.search is not None:
        configs.append(space.search_probe())
    for path in dict.fromkeys(c.test_data for c in configs if c.test_data):
        PairedTestSet(path)
    for path in dict.fromkeys(c.checkpoint for c in configs if c.checkpoint):
        output_ch = infer_arch(read_state_dict(path), where=str(path))["output_ch"]
        if output_ch not in (3, 6):
            raise UserError(f"{path}: a Uformer with {output_ch} output channels; expected 3 "
                            "(Flare7K) or 6 (Flare7K++)")
    if opts.address:
        _probe(opts.address, opts.connect_timeout_s)  # an address nobody listens at: before any file
    folders = [("--results", sweep_dir)]
    if opts.storage and "://" not in opts.storage:
        folders.append(("--storage", Path(opts.storage).expanduser().resolve()))
    for flag, folder in folders:
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise UserError(f"{flag} {folder}: cannot create it, {existing} is not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"{flag} {folder}: {existing} is not writable")


def _command(space: SweepSpace, sub: str) -> str:
    """The command a person types next: a make target for the shipped spaces."""
    shipped = Path(__file__).resolve().parent / "search_spaces" / space.path.name
    if space.path.resolve() == shipped:
        return f"make {sub} SPACE={space.path.stem}"
    return f"python sweep.py {sub} --space {space.path}"


def _should_run(state: str, opts: RunOptions) -> bool:
    """done and early-stopped trials are final; failed ones run again unless --no-retry-failed."""
    return state in ("pending", "interrupted", "running") or (state == "failed" and opts.retry_failed)


@dataclass(frozen=True)
class _Plan:
    """The grid cells of the space plus the search trials recorded so far (sweep.json)."""

    grid: tuple[Cell, ...]
    sampled: tuple[tuple[Cell, dict[str, Any]], ...]  # (cell, its sampled values)

    def trials(self) -> list[Cell]:
        return distinct_trials([*self.grid, *(c for c, _ in self.sampled)])


def _plan(space: SweepSpace, sweep_dir: Path) -> _Plan:
    """The plan: the space's cells, then the search trials sweep.json records for this space."""
    sampled: dict[str, tuple[Cell, dict[str, Any]]] = {}
    old = sweep_dir / "sweep.json"
    if space.search is not None and old.is_file():
        names = {p.name for p in space.search.params}
        for entry in read_json(old).get("cells", []):
            values = entry.get("sampled")
            if isinstance(values, dict) and set(values) == names:
                # Re-derived from this space's fixed fields: a changed space starts a new search.
                cell = cell_for(space.search_config(values))
                sampled.setdefault(cell.trial_id, (cell, values))
    return _Plan(grid=space.cells, sampled=tuple(sampled.values()))


def _write_plan(space: SweepSpace, sweep_dir: Path, plan: _Plan) -> None:
    """sweep.json: what `status`, `table1` and a resumed search read back."""
    cells = [c.to_json() for c in plan.grid]
    cells += [{**c.to_json(), "sampled": values} for c, values in plan.sampled]
    atomic_write_json(sweep_dir / "sweep.json", {
        "name": space.name, "space": str(space.path.resolve()), "question": space.question,
        "cells": cells})


def _cut_short(sweep_dir: Path, trial_ids: list[str]) -> bool:
    """After a Tuner run: did a trial it was given end neither done, failed nor stopped early?

    That happens only when the run was interrupted (SIGINT): Tune then stops running trials
    without an error, so the results folder, not Ray's trial states, tells us.
    """
    statuses = sweep_statuses(sweep_dir, trial_ids, time.time())
    return any(s.state in ("running", "interrupted", "pending") for s in statuses)


def _new_samples(space: SweepSpace, plan: _Plan) -> int:
    return 0 if space.search is None else max(0, space.search.num_samples - len(plan.sampled))


def _not_done(statuses) -> int:
    """Trials still to finish: early-stopped ones count as finished."""
    return sum(s.state not in ("done", "stopped") for s in statuses)


def _print_plan(space, sweep_dir, plan, statuses, todo, new_samples, opts) -> None:
    counts: dict[str, int] = {}
    for s in statuses.values():
        counts[s.state] = counts.get(s.state, 0) + 1
    known = ", ".join(f"{n} {state}" for state, n in counts.items())
    print(f"{space.name}: {re.split(r'(?<=[?.!]) ', space.question)[0]}")
    print(f"{space.name}: {len(plan.grid) + len(plan.sampled)} cells, {len(statuses)} trials "
          f"({known}) -> {sweep_dir}")
    if todo or new_samples:
        extra = f" + {new_samples} new search sample(s)" if new_samples else ""
        print(f"{space.name}: running {len(todo)} trial(s){extra}; finished ones are skipped"
              + ("" if opts.retry_failed else "; failed ones are left alone (--no-retry-failed)"))


def _prepare(space: SweepSpace, cells: list[Cell], prepare: str) -> None:
    """Build what trials share (base network, test set) once, in the driver, before they start.

    Each function takes a TrialConfig and returns a path; they cache by config, so calling them
    for every cell costs one build per distinct base / test set.
    """
    functions = [_importable(spec.strip()) for spec in prepare.split(",") if spec.strip()]
    configs = [c.config for c in cells]
    if space.search is not None:
        configs.append(space.search_probe())
    # cascade.base logs its training progress at INFO; show it, the first build takes minutes.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"{space.name}: %(message)s"))
    base_log = logging.getLogger("cascade.base")
    level = base_log.level
    base_log.addHandler(handler)
    base_log.setLevel(logging.INFO)
    print(f"{space.name}: preparing the base network and the test set (built once, then cached)",
          flush=True)
    try:
        done: set[str] = set()
        for cfg in configs:
            for function in functions:
                path = str(function(cfg))
                if path not in done:
                    done.add(path)
                    print(f"{space.name}: using {path}")
    finally:
        base_log.removeHandler(handler)
        base_log.setLevel(level)


# -- Ray ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RunContext:
    space: SweepSpace
    sweep_dir: Path
    run_id: str
    storage: str
    train_fn: str
    concurrency: int


def _connect(opts: RunOptions) -> bool:
    """Start a local Ray or attach to `opts.address`; True when this process owns the Ray session.

    A local run always starts its own Ray (`address="local"`): it never attaches to processes left
    behind by a killed driver or to someone else's cluster. An address that does not answer is a
    UserError after `connect_timeout_s`, not a hang (ray.init retries for minutes).
    """
    import ray

    # Trials must keep the driver's working directory: every path we hand them is absolute anyway.
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    if ray.is_initialized():  # the caller (a test, a notebook) manages Ray
        return False
    if not opts.address:
        start_local_ray(num_cpus=opts.cpus, log_to_driver=False, logging_level=logging.WARNING)
        return True
    _probe(opts.address, opts.connect_timeout_s)
    outcome: dict[str, BaseException | None] = {}

    def attach() -> None:
        try:
            ray.init(address=opts.address, log_to_driver=False, logging_level=logging.WARNING)
            outcome["error"] = None
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = exc

    thread = threading.Thread(target=attach, daemon=True)
    thread.start()
    thread.join(opts.connect_timeout_s)
    if "error" not in outcome:
        raise UserError(f"Ray at RAY_ADDRESS={opts.address} did not answer within "
                        f"{opts.connect_timeout_s:g}s; check the address (`ray status` on the head "
                        "node) or unset RAY_ADDRESS to run locally")
    if outcome["error"] is not None:
        first = str(outcome["error"]).strip().splitlines()[0] if str(outcome["error"]).strip() else ""
        raise UserError(f"cannot attach to Ray at RAY_ADDRESS={opts.address}: "
                        f"{type(outcome['error']).__name__}: {first}")
    return True


def start_local_ray(tries: int = 3, **init_kwargs: Any) -> None:
    """ray.init of a fresh local Ray (no dashboard), retried when its node is too slow to start.

    Ray's raylet gives its agent processes a hard-coded 15 s to start (ray#65983) and aborts the
    node otherwise; on a busy machine (CI, 2 shared cores) a second try usually gets through.
    """
    import ray

    for attempt in range(1, tries + 1):
        try:
            ray.init(address="local", include_dashboard=False, **init_kwargs)
            return
        except Exception as exc:  # Ray raises a bare Exception here
            if "timed out during startup" not in str(exc) or attempt == tries:
                raise
            ray.shutdown()
            print(f"Ray's node did not start in time (busy machine?); retrying ({attempt}/{tries - 1})",
                  file=sys.stderr)


def _probe(address: str, timeout_s: float) -> None:
    """Fail fast when nothing listens at a host:port address ("auto" is left to Ray)."""
    hostport = address.split("://", 1)[-1]
    if address == "auto" or ":" not in hostport:
        return
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=min(timeout_s, 10.0)):
            pass
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot reach Ray at RAY_ADDRESS={address} ({exc}); start the cluster "
                        "(`ray start --head`) or unset RAY_ADDRESS to run locally") from None


def _storage(opts: RunOptions, sweep_dir: Path) -> str:
    """Ray's storage_path. On more than one node, the results and the storage must be shared."""
    import ray

    storage = opts.storage or str(sweep_dir / "ray")
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and not opts.shared_storage:
        for what, path in (("--storage", storage), ("the results folder (--results)", str(sweep_dir))):
            if "://" not in path and not _on_shared_fs(Path(path)):
                raise UserError(
                    f"the Ray cluster has {len(nodes)} nodes but {what} {path} is on a local disk; "
                    "trials on other nodes could not write there. Use shared storage (an NFS path, "
                    "or s3://... for --storage), or pass --shared-storage if it is shared")
    return storage


def _on_shared_fs(path: Path) -> bool:
    """True when `path` lies on a network file system according to /proc/mounts."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return False
    path = path.resolve()
    best, best_fs = "", ""
    for mount, fstype in mounts:
        if (str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
            best, best_fs = mount, fstype
    return best_fs.startswith(SHARED_FS)


def _concurrency(space: SweepSpace) -> int:
    """Trials that can run at once: max_concurrent, capped by the cluster's CPUs and GPUs."""
    import ray

    total = ray.cluster_resources()
    caps = [int(total.get("CPU", 1) // space.resources.cpu)]
    if space.resources.gpu:
        caps.append(int(total.get("GPU", 0) // space.resources.gpu))
    if space.max_concurrent:
        caps.append(space.max_concurrent)
    return max(1, min(caps))


def _run_tuner(ctx: _RunContext, cells: list[Cell] | None) -> int:
    """One Ray Tune run over `cells` (a grid), or over new search samples when `cells` is None.

    Returns the number of Tune trials it ran (fewer than asked: it was interrupted).

    Why a fresh Tuner, never Tuner.restore:
    the results folder already says which trials are finished, and every trial resumes from its
    own checkpoint folder, so Ray's experiment state adds nothing to resuming; restoring it would
    fail on a truncated tuner.pkl (ray#58179) and could not add new cells (ray#30223). Each
    invocation gets its own experiment name, so a Tuner never starts over an old experiment dir.
    """
    from ray import tune

    space = ctx.space
    metric = space.search.metric if cells is None else None
    trainable = tune.with_parameters(
        _trainable, space=space, sweep_dir=str(ctx.sweep_dir),
        run_id=ctx.run_id, train_fn=ctx.train_fn, metric=metric)
    trainable = tune.with_resources(trainable, {"cpu": space.resources.cpu, "gpu": space.resources.gpu})
    progress = _progress_callback(ctx)
    tune_config: dict[str, Any] = {
        # CPU trials run one after another in the same worker process: ~4.5 s less per trial
        # (process start, imports, Tune's actor turnaround; bench/bench_sweep.py). GPU trials get
        # a fresh process each, so no trial inherits another's CUDA context or cached memory.
        "reuse_actors": not space.resources.gpu,
        "max_concurrent_trials": ctx.concurrency,
        "trial_name_creator": lambda trial: _cell_of(trial.config, space).trial_id,
        "trial_dirname_creator": lambda trial: f"{_cell_of(trial.config, space).trial_id}-{trial.trial_id}",
    }
    if cells is not None:
        param_space = {"cell": tune.grid_search([c.config.to_dict() for c in cells])}
    else:
        param_space, search_config = _search_setup(ctx)
        tune_config.update(search_config)
    name = f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}-{ctx.run_id[:6]}"
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(**tune_config),
        run_config=tune.RunConfig(
            name=name, storage_path=ctx.storage, verbose=0, callbacks=[progress],
            failure_config=tune.FailureConfig(max_failures=space.max_failures)),
    )
    # Trial failures are reported by the progress callback (with the error.json path); Ray's own
    # tracebacks and "Trials did not complete" would only repeat them, and its "Resume experiment
    # with: Tuner.restore(...)" hint is wrong here (re-running the command resumes).
    os.environ["TUNE_PRINT_ALL_TRIAL_ERRORS"] = "0"
    # The new output engine prints its experiment box and result paths even with verbose=0.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    tune_logger = logging.getLogger("ray.tune.tune")
    tune_logger.addFilter(_quiet_tune)
    try:
        return len(tuner.fit())
    finally:
        tune_logger.removeFilter(_quiet_tune)


def _quiet_tune(record: logging.LogRecord) -> bool:
    message = str(record.msg)
    return not message.startswith(("Trials did not complete", "Experiment has been interrupted",
                                    "Training has been interrupted"))


def _search_setup(ctx: _RunContext) -> tuple[dict[str, Any], dict[str, Any]]:
    """Param space and TuneConfig fields of an Optuna search warm-started from finished trials."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" lines

    space, search = ctx.space, ctx.space.search
    assert search is not None
    distributions = {"uniform": tune.uniform, "loguniform": tune.loguniform,
                     "randint": tune.randint, "choice": lambda *a: tune.choice(list(a))}
    param_space = {p.name: distributions[p.distribution](*p.args) for p in search.params}
    plan = _plan(space, ctx.sweep_dir)
    points, rewards = [], []
    for cell, values in plan.sampled:
        status = trial_status(ctx.sweep_dir / "trials" / cell.trial_id, None, time.time())
        value = (status.metrics or {}).get(search.metric)
        if isinstance(value, (int, float)):
            points.append(values)
            rewards.append(float(value))
    # The sampler seed moves on with every recorded sample: a resumed search with the same seed
    # would otherwise replay its first (random start-up) proposals, which already ran.
    seed = None if search.seed is None else search.seed + len(plan.sampled)
    searcher = OptunaSearch(seed=seed, points_to_evaluate=points or None,
                            evaluated_rewards=rewards or None)
    config: dict[str, Any] = {"search_alg": searcher, "metric": search.metric, "mode": search.mode,
                              "num_samples": _new_samples(space, plan)}
    if search.asha is not None:
        # Rungs lie strictly below max_t = steps and reaching max_t stops nothing: the last report
        # of a trial that trained to the end must not kill it before it writes metrics.json.
        steps = space.search_probe().steps
        asha = {"max_t": max(steps, 2), **search.asha}
        config["scheduler"] = ASHAScheduler(time_attr="step", stop_last_trials=False, **asha)
    return param_space, config


def _cell_of(config: dict[str, Any], space: SweepSpace) -> Cell:
    """The plan cell of a Tune trial config: a grid cell, or sampled values over the fixed fields."""
    if "cell" in config:
        return cell_for(TrialConfig.from_dict(config["cell"]))
    return cell_for(space.search_config(config))


def _importable(spec: str) -> Callable[..., dict]:
    module, _, attr = spec.partition(":")
    import importlib

    return getattr(importlib.import_module(module), attr)


def _trainable(config: dict[str, Any], *, space: SweepSpace, sweep_dir: str, run_id: str,
               train_fn: str, metric: str | None) -> None:
    """One Tune trial: `train()` in results/<sweep>/trials/<id>/, resuming from its checkpoints.

    `config` is {"cell": full TrialConfig dict} (grid) or the sampled fields (search), which are
    laid over the space's fixed fields and first seed (`_cell_of`). Runs in a Ray worker process
    (CPU trials reuse one, one trial after another). With a search `metric`, only reports that
    carry it reach Tune (OptunaSearch and ASHA need it in every result), so ASHA can stop a trial
    early only if train() reports that metric while training (`eval_every`).
    """
    from ray import tune

    cell = _cell_of(config, space)
    cfg, tdir = cell.config, Path(sweep_dir) / "trials" / cell.trial_id
    tdir.mkdir(parents=True, exist_ok=True)
    if (tdir / "metrics.json").is_file():  # e.g. a search proposing a point that already ran
        tune.report(_scalars(read_json(tdir / "metrics.json")))
        return
    # A retry starts clean; the previous failure stays readable beside it.
    if (tdir / "error.json").exists():
        os.replace(tdir / "error.json", tdir / "error.previous.json")
    (tdir / "stopped.json").unlink(missing_ok=True)
    heartbeat = _Heartbeat(tdir, run_id, steps=cfg.steps if cfg.kind == "cascade" else None)

    reported: list[dict[str, Any]] = []

    def report(metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        # The checkpoint stays in the trial folder (train() writes it there); Ray never copies it.
        heartbeat.beat(metrics.get("step"))
        if metric is None or metric in metrics:
            tune.report({**_scalars(metrics), "step": heartbeat.step or 0})
            reported.append(metrics)

    with _trial_log(tdir / "train.log"):
        try:
            result = _importable(train_fn)(cfg, report=report,
                                           checkpoint_dir=str(tdir / "checkpoints"),
                                           output_dir=str(tdir))
        except Exception as exc:
            _write_error(tdir, exc, traceback.format_exc(), getattr(exc, "step", heartbeat.step))
            raise
    atomic_write_json(tdir / "metrics.json", {**result, "trial_id": cell.trial_id})
    if not reported or reported[-1] is not result:  # train() reports its result at the end itself
        tune.report({**_scalars(result), "step": heartbeat.step or 0})


class _Heartbeat:
    """progress.json of a running trial: which run it belongs to, its step, when it started."""

    def __init__(self, tdir: Path, run_id: str, steps: int | None):
        self.path, self.step = tdir / "progress.json", None
        self.state = {"run_id": run_id, "step": None, "steps": steps, "started": time.time(),
                      "host": socket.gethostname(), "pid": os.getpid()}
        self.beat(None)

    def beat(self, step: Any) -> None:
        if isinstance(step, int):
            self.step = step
        atomic_write_json(self.path, {**self.state, "step": self.step, "updated": time.time()})


def _write_error(tdir: Path, exc: BaseException, trace: str, step: int | None) -> None:
    """error.json: the message's first line (what `status` shows), the traceback, the step."""
    message = f"{type(exc).__name__}: {exc}".strip()
    atomic_write_json(tdir / "error.json", {"error": message.splitlines()[0], "traceback": trace,
                                            "step": step})


@contextlib.contextmanager
def _trial_log(path: Path) -> Iterator[None]:
    """Send the trial's prints and log records to `path` (the console shows only progress)."""
    with open(path, "a", buffering=1, encoding="utf-8") as fh:
        handler = logging.StreamHandler(fh)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        root, ours = logging.getLogger(), logging.getLogger("cascade")
        root.addHandler(handler)
        level = ours.level
        ours.setLevel(logging.INFO)  # train()'s step lines
        try:
            with contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
                yield
        finally:
            ours.setLevel(level)
            root.removeHandler(handler)


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}


def _progress_callback(ctx: _RunContext):
    """A Tune callback for the driver's console and the bookkeeping only the driver can do.

    - a progress line (counts, best PSNR per region, ETA) every PROGRESS_EVERY_S and on each change;
    - one line per finished / failed / early-stopped trial;
    - error.json for a trial whose process died (it could not write one itself);
    - stopped.json for a trial the scheduler (ASHA) ended early;
    - search trials are added to sweep.json as they start.
    """
    from ray import tune

    space, sweep_dir = ctx.space, ctx.sweep_dir

    class Progress(tune.Callback):
        def __init__(self) -> None:
            self.started, self.last_print, self.last_counts = time.time(), 0.0, []

        def on_trial_start(self, iteration, trials, trial, **info):
            cell = _cell_of(trial.config, space)
            if "cell" not in trial.config:  # a new search sample: record it in the plan
                plan = _plan(space, sweep_dir)
                if cell.trial_id not in {c.trial_id for c, _ in plan.sampled}:
                    values = {p.name: trial.config[p.name] for p in space.search.params}
                    _write_plan(space, sweep_dir, _Plan(plan.grid, (*plan.sampled, (cell, values))))
            self._print()

        def on_trial_complete(self, iteration, trials, trial, **info):
            tdir = sweep_dir / "trials" / _cell_of(trial.config, space).trial_id
            status = trial_status(tdir, None, time.time())
            if status.state == "done":
                psnr = (status.metrics or {}).get("psnr_entire")
                score = f"PSNR entire {psnr:.2f}, " if isinstance(psnr, (int, float)) else ""
                print(f"  done    {tdir.name}: {score}took {format_duration(status.elapsed_s or 0)}")
            elif status.state != "failed":  # ended by the scheduler before train() returned
                last = _scalars(trial.last_result or {})
                atomic_write_json(tdir / "stopped.json", {
                    "reason": "stopped early by the scheduler", "step": last.get("step"),
                    "metrics": {k: v for k, v in last.items() if k.startswith(("psnr_", "ssim_"))}})
                psnr = last.get("psnr_entire")
                then = f", PSNR entire {psnr:.2f}" if isinstance(psnr, (int, float)) else ""
                print(f"  stopped {tdir.name} at step {last.get('step')}{then} (early stopping)")
            self._print()

        def on_trial_error(self, iteration, trials, trial, **info):
            tdir = sweep_dir / "trials" / _cell_of(trial.config, space).trial_id
            if not (tdir / "error.json").exists():  # the process died before it could write one
                text = str(trial.get_error() or "").strip()
                atomic_write_json(tdir / "error.json", {
                    "error": "trial process died" + (f": {text.splitlines()[-1]}" if text else ""),
                    "traceback": text, "step": trial_status(tdir, None, time.time()).step})
            error = trial_status(tdir, None, time.time()).error
            print(f"  FAILED  {tdir.name}: {error} (see {tdir / 'error.json'}, {tdir / 'train.log'})")
            self._print()

        def on_trial_recover(self, iteration, trials, trial, **info):
            tid = _cell_of(trial.config, space).trial_id
            print(f"  retry   {tid} (failure {trial.num_failures} of max_failures={space.max_failures})")

        def on_step_end(self, iteration, trials, **info):
            if time.time() - self.last_print >= PROGRESS_EVERY_S:
                self._print()

        def _print(self) -> None:
            """Print the progress line if the counts changed or PROGRESS_EVERY_S passed."""
            now = time.time()
            statuses = sweep_statuses(sweep_dir, _plan_trials(sweep_dir), now)
            counts = [s.state for s in statuses]
            if counts == self.last_counts and now - self.last_print < PROGRESS_EVERY_S:
                return
            self.last_print, self.last_counts = now, counts
            print(f"[{space.name}] {progress_line(statuses, ctx.concurrency, now - self.started)}",
                  flush=True)

    return Progress()


def _plan_trials(sweep_dir: Path) -> list[str]:
    """Distinct trial ids of sweep.json, in plan order."""
    return list(dict.fromkeys(c["trial_id"] for c in read_json(sweep_dir / "sweep.json")["cells"]))


# -- status / table1 -----------------------------------------------------------------------------


def status(space_path: Path, results: Path) -> list[str]:
    """One line per plan cell (done / running / failed / stopped / interrupted / pending)."""
    from cascade.space import space_name

    name = space_name(space_path)
    sweep_dir = (results / name).resolve()
    plan_path = sweep_dir / "sweep.json"
    if not plan_path.is_file():
        return [f"{name}: nothing run yet in {sweep_dir}; `make sweep SPACE={space_path.stem}` starts it"]
    cells = read_json(plan_path)["cells"]
    ids = list(dict.fromkeys(c["trial_id"] for c in cells))
    by_id = {s.trial_id: s for s in sweep_statuses(sweep_dir, ids, time.time())}
    lines = []
    for cell in cells:
        s = by_id[cell["trial_id"]]
        label = (f"reference s{cell.get('seed')}" if cell.get("kind") == "reference"
                 else f"k={cell.get('k')} lambda_={cell.get('lambda_'):.4g} s{cell.get('seed')}")
        lines.append(f"{label:<28} {s.state:<11} {cell['trial_id']:<28} {_status_detail(s)}")
    lines.append(f"{name}: {progress_line(list(by_id.values()), 1)}")
    return lines


def _status_detail(s) -> str:
    if s.state == "done":
        psnr = (s.metrics or {}).get("psnr_entire")
        value = f"PSNR entire {psnr:.2f}, " if isinstance(psnr, (int, float)) else ""
        return f"{value}took {format_duration(s.elapsed_s)}" if s.elapsed_s else value.rstrip(", ")
    if s.state == "running":
        step = f"step {s.step}/{s.steps}, " if s.step is not None and s.steps else ""
        eta = f", ETA {format_duration(s.eta_s)}" if s.eta_s is not None else ""
        return f"{step}elapsed {format_duration(s.elapsed_s or 0)}{eta}"
    if s.state == "failed":
        return s.error or ""
    if s.state in ("interrupted", "stopped") and s.step is not None:
        psnr = (s.metrics or {}).get("psnr_entire")
        then = f", PSNR entire {psnr:.2f} then" if isinstance(psnr, (int, float)) else ""
        return f"at step {s.step}" + (f"/{s.steps}" if s.steps else "") + then
    return ""


def table1(space_path: Path, results: Path) -> list[Path]:
    """reports.build_reports over results/<sweep>/."""
    from cascade.space import space_name
    from reports import build_reports

    return build_reports((results / space_name(space_path)).resolve())


# -- command line ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sweep.py", description="Run, resume and report the k x lambda ablation with Ray Tune.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,status,table1}")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--space", type=Path, default=Path("search_spaces/demo.yaml"),
                       help="search-space YAML (default: %(default)s)")
        p.add_argument("--results", type=Path, default=Path("results"),
                       help="results root; the sweep lives in <results>/<name>/ (default: %(default)s)")

    run = sub.add_parser(
        "run", help="run or resume a sweep",
        description="Run the trials of a search space that are not finished yet: finished trials "
                    "are skipped, interrupted ones resume from their checkpoints, failed ones are "
                    "retried, new cells run. Set RAY_ADDRESS (e.g. auto) to use a running cluster.")
    common(run)
    run.add_argument("--data", help="Flare7K/Flare7K++ root (sets `data`)")
    run.add_argument("--backgrounds", help="flare-free background images, e.g. Flickr24K")
    run.add_argument("--test-data", help="test folder with input/ gt/ mask/")
    run.add_argument("--checkpoint", help="pre-trained Flare7K(++) Uformer .pth (sets `checkpoint`)")
    run.add_argument("--storage", help="Ray storage path or URI (default: <results>/<name>/ray); "
                                       "must be shared (NFS, s3://) on a multi-node cluster")
    run.add_argument("--gpus-per-trial", type=float, help="GPUs per trial, fractions allowed "
                                                           "(default: the space's resources.gpu)")
    run.add_argument("--seeds", type=int, help="run seeds 0..N-1 instead of the space's seeds")
    run.add_argument("--max-concurrent", type=int, help="trials at a time (default: the space's)")
    run.add_argument("--cpus", type=int, help="CPUs of the local Ray (default: all); ignored with RAY_ADDRESS")
    run.add_argument("--retry-failed", action=argparse.BooleanOptionalAction, default=True,
                     help="run failed trials again (default: on)")
    run.add_argument("--connect-timeout", type=float, default=30.0,
                     help="seconds to wait for RAY_ADDRESS to answer (default: %(default)s)")
    run.add_argument("--shared-storage", action="store_true",
                     help="trust that --storage and --results are shared by every node")

    st = sub.add_parser("status", help="one line per cell: done / running / failed / pending",
                        description="Where each cell stands, read from the results folder.")
    common(st)
    t1 = sub.add_parser("table1", help="write Table 1, deltas and figures",
                        description="Write Table 1 (CSV, LaTeX), deltas and figures into <results>/<name>/.")
    common(t1)
    return parser


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "status":
        print("\n".join(status(args.space, args.results)))
        return 0
    if args.command == "table1":
        for path in table1(args.space, args.results):
            print(path)
        return 0
    space = load_space(args.space, data=args.data, backgrounds=args.backgrounds,
                       test_data=args.test_data, checkpoint=args.checkpoint, seeds=args.seeds,
                       gpus_per_trial=args.gpus_per_trial, max_concurrent=args.max_concurrent)
    opts = RunOptions(results=args.results, storage=args.storage,
                      address=os.environ.get("RAY_ADDRESS") or None, cpus=args.cpus,
                      connect_timeout_s=args.connect_timeout, retry_failed=args.retry_failed,
                      shared_storage=args.shared_storage)
    try:
        outcome = run_sweep(space, opts)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the trials started
        print(f"\n{space.name}: aborted. Run the same command again to resume.", file=sys.stderr)
        return 130
    return 130 if outcome.interrupted else 1 if outcome.left else 0


if __name__ == "__main__":
    sys.exit(main())
