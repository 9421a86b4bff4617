"""flaresweep command line: run a search space with Ray Tune, show where it stands, write Table 1.

    python sweep.py run    --space search_spaces/demo.yaml [--data DIR --checkpoint PATH ...]
    python sweep.py status --space search_spaces/demo.yaml
    python sweep.py table1 --space search_spaces/demo.yaml

The only module that imports Ray. What a sweep is lives in `orchestrator/` (spaces, the plan, the
results record, progress text, pre-flight checks); what a trial is lives in `cascade/`. The results
folder (orchestrator.record) is the record: every `run` reads it, skips finished trials, resumes
interrupted ones from their own checkpoints, retries failed ones and runs new cells. Ray's
experiment state is not used for resuming (see `_run_tuner`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cascade.config import TrialConfig
from cascade.errors import UserError, cli_errors, first_line
from orchestrator import preflight
from orchestrator.plan import cut_short, load_plan, not_done, should_run, write_plan
from orchestrator.progress import (
    Board,
    next_command,
    outcome_line,
    plan_lines,
    progress_line,
    status_lines,
)
from orchestrator.record import SweepRecord
from orchestrator.space import Cell, SweepSpace, cell_for, load_space, space_name
from orchestrator.trial import PrepareFn, TrainFn, prepare_shared, run_trial


def _default_prepare() -> tuple[PrepareFn, ...]:
    from cascade.data.testset import ensure_test_data
    from cascade.pretrain import ensure_base

    return ensure_base, ensure_test_data


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
    # What a trial runs and what the driver builds once for all trials (the base network, the test
    # set); tests pass fast fakes with the same signatures. Module-level functions: Ray pickles them.
    train_fn: TrainFn | None = None  # None: cascade.train.train
    prepare: tuple[PrepareFn, ...] | None = None  # None: cascade's base network and test set


@dataclass(frozen=True)
class Outcome:
    """How a `run_sweep` call ended."""

    left: int  # trials neither done nor stopped early (0: the sweep is complete)
    interrupted: bool  # stopped by SIGINT; running the command again resumes


@dataclass
class _Run:
    """One `run` invocation: the space, its record and what Ray needs to run trials."""

    space: SweepSpace
    record: SweepRecord
    opts: RunOptions
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    storage: str = ""
    concurrency: int = 1

    def say(self, text: str) -> None:
        print(f"{self.space.name}: {text}", flush=True)


def run_sweep(space: SweepSpace, opts: RunOptions) -> Outcome:
    """Run (or resume) `space` in <results>/<name>/ and say how far it got."""
    run = _Run(space, SweepRecord((opts.results / space.name).resolve()), opts)
    configs = [c.config for c in space.cells] + ([space.search_probe()] if space.search else [])
    # Before anything is written: bad input leaves no trace.
    preflight.check_inputs(configs)
    preflight.check_run(run.record.root, opts.storage, opts.address, opts.connect_timeout_s)
    with run.record.lock(run.run_id):
        plan = load_plan(space, run.record)
        write_plan(space, run.record, plan)  # once here; only new search samples change it later
        statuses = {s.trial_id: s for s in run.record.statuses([t.trial_id for t in plan.trials()])}
        todo = [c for c in plan.trials() if should_run(statuses[c.trial_id].state, opts.retry_failed)]
        for line in plan_lines(space, plan, list(statuses.values()), len(todo), run.record.root,
                               opts.retry_failed):
            run.say(line)
        if not todo and not plan.new_samples(space):
            run.say(f"nothing to run. `{next_command(space, 'table1')}` writes the tables.")
            return Outcome(left=not_done(list(statuses.values())), interrupted=False)
        prepare_shared(space.name, [c.config for c in todo] + configs[len(space.cells):],
                       opts.prepare if opts.prepare is not None else _default_prepare())
        owns_ray = _connect(opts)
        try:
            run.storage = _storage(opts, run.record.root)
            run.concurrency = _concurrency(space)
            interrupted = False
            if todo:
                _run_tuner(run, todo)
                interrupted = cut_short(run.record, [c.trial_id for c in todo])
            if not interrupted and space.search is not None:
                asked = load_plan(space, run.record).new_samples(space)
                if asked:
                    ran = _run_tuner(run, None)
                    sampled = [c.trial_id for c, _ in load_plan(space, run.record).sampled]
                    interrupted = ran < asked or cut_short(run.record, sampled)
        finally:
            if owns_ray:
                import ray

                ray.shutdown()
        final = run.record.statuses([t.trial_id for t in load_plan(space, run.record).trials()])
        run.say(progress_line(final, 1))
        run.say(outcome_line(space, not_done(final), interrupted))
        return Outcome(left=not_done(final), interrupted=interrupted)


# -- Ray ---------------------------------------------------------------------------------------


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
    preflight.probe(opts.address, opts.connect_timeout_s)
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
        raise UserError(f"cannot attach to Ray at RAY_ADDRESS={opts.address}: "
                        f"{type(outcome['error']).__name__}: {first_line(outcome['error'])}")
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


def _storage(opts: RunOptions, sweep_dir: Path) -> str:
    """Ray's storage_path. On more than one node, the results and the storage must be shared."""
    import ray

    storage = opts.storage or str(sweep_dir / "ray")
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    nodes = sum(bool(n.get("Alive")) for n in ray.nodes())
    preflight.check_shared(nodes, storage, sweep_dir, trusted=opts.shared_storage)
    return storage


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


def _run_tuner(run: _Run, cells: list[Cell] | None) -> int:
    """One Ray Tune run over `cells` (a grid), or over new search samples when `cells` is None.

    Returns the number of Tune trials it ran (fewer than asked: it was interrupted).

    Why a fresh Tuner, never Tuner.restore:
    the results folder already says which trials are finished, and every trial resumes from its
    own checkpoint folder, so Ray's experiment state adds nothing to resuming; restoring it would
    fail on a truncated tuner.pkl (ray#58179) and could not add new cells (ray#30223). Each
    invocation gets its own experiment name, so a Tuner never starts over an old experiment dir.
    """
    from ray import tune

    space = run.space
    trainable = tune.with_parameters(
        _trainable, space=space, sweep_dir=str(run.record.root), run_id=run.run_id,
        train_fn=run.opts.train_fn, metric=space.search.metric if cells is None else None)
    trainable = tune.with_resources(trainable, {"cpu": space.resources.cpu, "gpu": space.resources.gpu})
    tune_config: dict[str, Any] = {
        # CPU trials run one after another in the same worker process: ~4.5 s less per trial
        # (process start, imports, Tune's actor turnaround; bench/bench_sweep.py). GPU trials get
        # a fresh process each, so no trial inherits another's CUDA context or cached memory.
        "reuse_actors": not space.resources.gpu,
        "max_concurrent_trials": run.concurrency,
        "trial_name_creator": lambda trial: _cell_of(trial.config, space).trial_id,
        "trial_dirname_creator": lambda trial: f"{_cell_of(trial.config, space).trial_id}-{trial.trial_id}",
    }
    if cells is not None:
        param_space = {"cell": tune.grid_search([c.config.to_dict() for c in cells])}
    else:
        param_space, search_config = _search_setup(run)
        tune_config.update(search_config)
    tuner = tune.Tuner(
        trainable, param_space=param_space, tune_config=tune.TuneConfig(**tune_config),
        run_config=tune.RunConfig(
            name=f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}-{run.run_id[:6]}",
            storage_path=run.storage, verbose=0, callbacks=[_progress_callback(run)],
            failure_config=tune.FailureConfig(max_failures=space.max_failures)))
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
    return not str(record.msg).startswith(("Trials did not complete", "Experiment has been interrupted",
                                           "Training has been interrupted"))


def _search_setup(run: _Run) -> tuple[dict[str, Any], dict[str, Any]]:
    """Param space and TuneConfig fields of an Optuna search warm-started from finished trials."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" lines
    space, search = run.space, run.space.search
    assert search is not None
    distributions = {"uniform": tune.uniform, "loguniform": tune.loguniform,
                     "randint": tune.randint, "choice": lambda *a: tune.choice(list(a))}
    param_space = {p.name: distributions[p.distribution](*p.args) for p in search.params}
    plan = load_plan(space, run.record)
    points, rewards = plan.finished_samples(run.record, search.metric)
    # The sampler seed moves on with every recorded sample: a resumed search with the same seed
    # would otherwise replay its first (random start-up) proposals, which already ran.
    seed = None if search.seed is None else search.seed + len(plan.sampled)
    searcher = OptunaSearch(seed=seed, points_to_evaluate=points or None,
                            evaluated_rewards=rewards or None)
    config: dict[str, Any] = {"search_alg": searcher, "metric": search.metric, "mode": search.mode,
                              "num_samples": plan.new_samples(space)}
    if search.asha is not None:
        # Rungs lie strictly below max_t = steps and reaching max_t stops nothing: the last report
        # of a trial that trained to the end must not kill it before it writes metrics.json.
        asha = {"max_t": max(space.search_probe().steps, 2), **search.asha}
        config["scheduler"] = ASHAScheduler(time_attr="step", stop_last_trials=False, **asha)
    return param_space, config


def _cell_of(config: dict[str, Any], space: SweepSpace) -> Cell:
    """The plan cell of a Tune trial config: a grid cell, or sampled values over the fixed fields."""
    if "cell" in config:
        return cell_for(TrialConfig.from_dict(config["cell"]))
    return cell_for(space.search_config(config))


def _trainable(config: dict[str, Any], *, space: SweepSpace, sweep_dir: str, run_id: str,
               train_fn: TrainFn | None, metric: str | None) -> None:
    """One Tune trial: `train_fn()` in results/<sweep>/trials/<id>/, resuming from its checkpoints.

    `config` is {"cell": full TrialConfig dict} (grid) or the sampled fields (search), laid over the
    space's fixed fields and first seed (`_cell_of`). Runs in a Ray worker process (CPU trials reuse
    one, one trial after another). With a search `metric`, only reports that carry it reach Tune
    (OptunaSearch and ASHA need it in every result), so ASHA can stop a trial early only if train()
    reports that metric while training (`eval_every`).
    """
    from ray import tune

    reported: list[dict[str, Any]] = []
    last_step = [0]

    def report(metrics: dict[str, Any], step: int) -> None:
        last_step[0] = step
        if metric is None or metric in metrics:
            tune.report({**_scalars(metrics), "step": step})
            reported.append(metrics)

    if train_fn is None:
        from cascade.train import train as train_fn
    result = run_trial(_cell_of(config, space), SweepRecord(sweep_dir), run_id, train_fn, report)
    if not reported or reported[-1] is not result:  # train() reports its result at the end itself
        tune.report({**_scalars(result), "step": last_step[0]})


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}


def _progress_callback(run: _Run):
    """A Tune callback that hands each trial event to an orchestrator.progress.Board (console lines,
    stopped.json / error.json only the driver can write, search samples into sweep.json)."""
    from ray import tune

    space = run.space
    board = Board(space, run.record, load_plan(space, run.record), run.concurrency)

    class Progress(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            sampled = None if "cell" in trial.config else {
                p.name: trial.config[p.name] for p in space.search.params}
            board.started(_cell_of(trial.config, space), sampled)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            board.result(_cell_of(trial.config, space).trial_id, result.get("step"))

        def on_trial_complete(self, iteration, trials, trial, **info):
            board.completed(_cell_of(trial.config, space).trial_id, _scalars(trial.last_result or {}))

        def on_trial_error(self, iteration, trials, trial, **info):
            board.errored(_cell_of(trial.config, space).trial_id, str(trial.get_error() or ""))

        def on_trial_recover(self, iteration, trials, trial, **info):
            board.say(f"  retry   {_cell_of(trial.config, space).trial_id} (failure "
                      f"{trial.num_failures} of max_failures={space.max_failures})")

        def on_step_end(self, iteration, trials, **info):
            board.tick()

    return Progress()


# -- status / table1 -----------------------------------------------------------------------------


def status(space_path: Path, results: Path) -> list[str]:
    """One line per plan cell (done / running / failed / stopped / interrupted / pending)."""
    name = space_name(space_path)
    record = SweepRecord((results / name).resolve())
    plan = record.read_plan()
    if plan is None:
        return [f"{name}: nothing run yet in {record.root}; `make sweep SPACE={space_path.stem}` starts it"]
    ids = record.plan_trial_ids()
    return status_lines(name, plan["cells"], dict(zip(ids, record.statuses(ids))))


def table1(space_path: Path, results: Path) -> list[Path]:
    """reports.build_reports over results/<sweep>/."""
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
    t1 = sub.add_parser("table1", help="write Table 1, differences and figures",
                        description="Write Table 1 (CSV, LaTeX), differences and figures into <results>/<name>/.")
    common(t1)
    return parser


@cli_errors
def main(argv: Sequence[str] | None = None, *, train_fn: TrainFn | None = None,
         prepare: tuple[PrepareFn, ...] | None = None) -> int:
    """The command line; `train_fn` / `prepare` replace the trial and the shared builds (tests)."""
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
                      shared_storage=args.shared_storage, train_fn=train_fn, prepare=prepare)
    try:
        outcome = run_sweep(space, opts)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the trials started
        print(f"\n{space.name}: aborted. Run the same command again to resume.", file=sys.stderr)
        return 130
    return 130 if outcome.interrupted else 1 if outcome.left else 0


if __name__ == "__main__":
    sys.exit(main())
