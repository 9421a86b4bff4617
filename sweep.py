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
import collections
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray_auth
from cascade.config import EVAL_MODES, PROTOCOLS, VIEW_MODES, TrialConfig
from cascade.errors import UserError, cli_errors, first_line
from orchestrator import preflight
from orchestrator import search as studies
from orchestrator.plan import (
    cells_as_written,
    cut_short,
    keys,
    load_plan,
    not_done,
    should_run,
    write_plan,
)
from orchestrator.progress import (
    Board,
    next_command,
    outcome_line,
    plan_lines,
    progress_line,
    status_report,
)
from orchestrator.record import SweepRecord
from orchestrator.space import Cell, SweepSpace, cell_for, load_space, space_name
from orchestrator.trial import PrepareFn, TrainFn, prepare_shared, run_trial


def _default_prepare() -> tuple[PrepareFn, ...]:
    from cascade import demo_encoder
    from cascade.data.testset import ensure_test_data
    from cascade.pretrain import ensure_base

    return demo_encoder.ensure_for, ensure_base, ensure_test_data


@dataclass(frozen=True)
class RunOptions:
    """How to run a sweep (the `run` subcommand's options that are not part of the space)."""

    results: Path  # the results root; the sweep writes results/<name>/
    storage: str | None = None  # Ray storage_path (path or URI); default <sweep>/ray
    address: str | None = None  # Ray cluster to attach to; None: start a local one
    cpus: int | None = None  # local cluster size; None: every core
    connect_timeout_s: float = 30.0
    # Failed trials: True retries all, False none, None (default) all but deterministic failures.
    retry_failed: bool | None = None
    shared_storage: bool = False  # the user vouches that results/storage are shared across nodes
    # What a trial runs and what the driver builds once for all trials (the base network, the test
    # set); tests pass fast fakes with the same signatures. Module-level functions: Ray pickles them.
    train_fn: TrainFn | None = None  # None: cascade.train.train
    prepare: tuple[PrepareFn, ...] | None = None  # None: the demo encoder, base network, test set
    # Custom Ray resources each trial asks for besides the space's cpu/gpu (--trial-resource).
    trial_resources: dict[str, float] = field(default_factory=dict)
    wait_for_resources: bool = False  # queue trials that no node fits now (nodes are coming)


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
    concurrency: int = 1  # trials at a time the cluster holds now: for the ETA only
    stopped: set[str] = field(default_factory=set)  # Tune trial ids the scheduler (ASHA) stopped

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
        statuses = dict(zip([c.trial_id for c in plan.trials()],
                            run.record.statuses(keys(plan.trials()))))
        # Grid cells run as a grid; unfinished search samples resume in the search phase, under
        # the study and ASHA (the study queues them first, `_search_setup`).
        grid = {c.trial_id for c in plan.grid}
        runnable = [c for c in plan.trials() if should_run(statuses[c.trial_id], opts.retry_failed)]
        todo = [c for c in runnable if c.trial_id in grid]
        resumed = len(runnable) - len(todo)
        for line in plan_lines(space, plan, list(statuses.values()), len(todo), run.record.root,
                               opts.retry_failed):
            run.say(line)
        if not todo and not plan.new_samples(space) and not resumed:
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
                interrupted = cut_short(run.record, todo)
            if not interrupted and space.search is not None:
                asked = load_plan(space, run.record).new_samples(space) + resumed
                if asked:
                    ran = _run_tuner(run, None)
                    searched = load_plan(space, run.record)
                    # The samples were appended one by one while they ran; sweep.json takes them in.
                    write_plan(space, run.record, searched)
                    sampled = [c for c, _ in searched.sampled]
                    interrupted = ran < asked or cut_short(run.record, sampled)
        finally:
            if owns_ray:
                import ray

                ray.shutdown()
        final = run.record.statuses(keys(load_plan(space, run.record).trials()))
        run.say(progress_line(final, 1))
        run.say(outcome_line(space, not_done(final), interrupted))
        return Outcome(left=not_done(final), interrupted=interrupted)


# -- Ray ---------------------------------------------------------------------------------------


def _connect(opts: RunOptions) -> bool:
    """Start a local Ray or attach to `opts.address`; True when this process owns the Ray session.

    A local run always starts its own Ray (`address="local"`): it never attaches to processes left
    behind by a killed driver or to someone else's cluster. An address that does not answer is a
    UserError after `connect_timeout_s`, not a hang (ray.init retries for minutes), and one that
    refuses this driver's token (or its lack of one) a UserError saying how to fix it, at once
    (`ray_auth.check_token`). A local Ray runs with token authentication and a token of its own
    (`ray_auth.local_token_auth`, in `start_local_ray`). Either way the
    job's runtime_env carries what trials need from the driver's environment (`_trial_env`), and
    SIGTERM / SIGUSR1 interrupt like Ctrl-C from then on (`_interrupt_on_signals`).
    """
    import ray

    # Trials must keep the driver's working directory: every path we hand them is absolute anyway.
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    if ray.is_initialized():  # the caller (a test, a notebook) manages Ray
        return False
    runtime_env = {"env_vars": _trial_env()}
    if not opts.address:
        start_local_ray(num_cpus=opts.cpus, log_to_driver=False, logging_level=logging.WARNING,
                        runtime_env=runtime_env)
        _interrupt_on_signals()  # ray.init made SIGTERM a sys.exit
        return True
    preflight.probe(opts.address, opts.connect_timeout_s)
    outcome: dict[str, BaseException | None] = {}

    def attach() -> None:
        try:
            ray_auth.check_token(opts.address)
            ray.init(address=opts.address, log_to_driver=False, logging_level=logging.WARNING,
                     runtime_env=runtime_env)
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
    error = outcome["error"]
    if isinstance(error, UserError):
        raise error
    if isinstance(error, ray.exceptions.AuthenticationError):  # RAY_ADDRESS=auto, for one
        raise UserError(ray_auth.refusal(opts.address)) from None
    if error is not None:
        raise UserError(f"cannot attach to Ray at RAY_ADDRESS={opts.address}: "
                        f"{type(error).__name__}: {first_line(error)}")
    _interrupt_on_signals()
    return True


def _trial_env() -> dict[str, str]:
    """What trials need from the driver's environment: every FLARESWEEP_* variable, and the cache
    of bases and test sets as an absolute FLARESWEEP_CACHE. Workers of an attached cluster start
    from their raylet's environment, not the driver's; a job's runtime_env reaches all of them."""
    from cascade.io import cache_dir

    env = {k: v for k, v in os.environ.items() if k.startswith("FLARESWEEP_")}
    env["FLARESWEEP_CACHE"] = str(cache_dir())
    return env


# Names of the stop signals this driver received (the run ends "interrupted", exit code 130).
_SIGNALLED: list[str] = []


def _interrupt_on_signals() -> None:
    """SIGTERM and SIGUSR1 stop the sweep like Ctrl-C: trials stop, their checkpoints stay, the run
    says "interrupted" and exits 130, and the same command resumes it.

    SLURM sends SIGTERM at preemption and at the time limit, and with `--signal=B:USR1@N` USR1 to
    the batch shell N seconds before, which scripts/slurm/sweep.sbatch forwards to the driver.
    Tune catches SIGINT and SIGUSR1 only, and ray.init makes SIGTERM a `sys.exit`, so this runs
    after ray.init, and again after every Tuner run (Tune leaves its SIGUSR1 handler behind).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for name in ("SIGTERM", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _as_sigint)


def _as_sigint(signum: int, frame: Any) -> None:
    """Hand a stop signal to whatever handles SIGINT now: Tune's handler while trials run (they
    stop and fit() returns), Python's KeyboardInterrupt otherwise."""
    _SIGNALLED.append(signal.Signals(signum).name)
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:  # SIGINT ignored (a background job of a script): stop anyway
        raise KeyboardInterrupt


# Raylet settings under which a crashed or killed trial worker leaves no processes behind: each
# worker in its own process group, killed with it. Not the older subreaper setting
# (RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper): under it Ray ignores SIGCHLD in
# drivers and workers, so every child's exit status reads 0 (measured with Ray 2.60: a child's
# `sys.exit(2)` came back as 0), which would hide a failed DDP rank (docs/design.md, "Cluster").
RAYLET_CLEANUP = {"RAY_process_group_cleanup_enabled": "true"}


def start_local_ray(tries: int = 3, **init_kwargs: Any) -> None:
    """ray.init of a fresh local Ray (no dashboard), retried when its node is too slow to start.

    Ray's raylet gives its agent processes a hard-coded 15 s to start (ray#65983) and aborts the
    node otherwise; on a busy machine (CI, 2 shared cores) a second try usually gets through.
    The raylet kills whatever a dead worker leaves behind (a trial's DDP ranks or horovodrun) with
    its process group (RAYLET_CLEANUP; an attached cluster sets it on its `ray start`, see
    docs/design.md, "Cluster"); the ranks also die with their parent on their own (PDEATHSIG).
    """
    import ray

    for name, value in RAYLET_CLEANUP.items():
        os.environ.setdefault(name, value)  # read by the raylet ray.init starts
    ray_auth.local_token_auth()
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
    """Trials the cluster holds at once now (its CPUs and GPUs, capped by max_concurrent): the
    progress line's ETA only. Tune is capped by the space's max_concurrent alone (`_run_tuner`):
    a cap from the resources at start-up kept an autoscaling cluster that starts small at 1."""
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
    configs = [c.config for c in cells] if cells is not None else [space.search_probe()]
    resources = _check_cluster(run, configs)
    # Trials need the space's fixed fields and fingerprints, not its grid: Ray hands the
    # parameters to every trial start, and a trial's config carries its own cell.
    trainable = tune.with_parameters(
        _trainable, space=dataclasses.replace(space, cells=()), sweep_dir=str(run.record.root),
        run_id=run.run_id,
        train_fn=_OnAssignedDevices(run.opts.train_fn, _trial_env()),
        metric=space.search.metric if cells is None else None)
    trainable = tune.with_resources(trainable, resources)
    one_process = all(c.backend == "none" or c.workers == 1 for c in configs)
    tune_config: dict[str, Any] = {
        # CPU trials run one after another in the same worker process: ~4.5 s less per trial
        # (process start, imports, Tune's actor turnaround; bench/bench_sweep.py). GPU trials get
        # a fresh process each, so no trial inherits another's CUDA context or cached memory, and
        # so do data-parallel ones: a trial Tune stops ends with its process, ranks included.
        "reuse_actors": not space.resources.gpu and one_process,
        # The space's cap only: one from the cluster's resources at start-up would keep an
        # autoscaling cluster that starts small at one trial (Ray queues what does not fit yet).
        "max_concurrent_trials": space.max_concurrent,
        # Module-level functions of the config: Tune pickles both for every trial it creates and
        # into every trial's state (`Trial.get_json_state`); closures over the space put the whole
        # grid into each trial (2.7 GB in the driver at 1000 trials, docs/performance.md).
        "trial_name_creator": _trial_name,
        "trial_dirname_creator": _trial_dirname,
    }
    pending: dict[str, str] = {}
    if cells is not None:
        param_space: dict[str, Any] = {}
        tune_config.update(search_alg=_grid_searcher(cells), num_samples=len(cells))
        import ray

        pending = _grid_pending(space.max_concurrent, ray.cluster_resources().get("CPU", 1.0))
    else:
        param_space, search_config = _search_setup(run)
        tune_config.update(search_config)
    tuner = tune.Tuner(
        trainable, param_space=param_space, tune_config=tune.TuneConfig(**tune_config),
        run_config=tune.RunConfig(
            name=f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}-{run.run_id[:6]}",
            storage_path=run.storage, verbose=0, callbacks=[_progress_callback(run, cells)],
            failure_config=tune.FailureConfig(max_failures=space.max_failures)))
    # Trial failures are reported by the progress callback (with the error.json path); Ray's own
    # tracebacks and "Trials did not complete" would only repeat them, and its "Resume experiment
    # with: Tuner.restore(...)" hint is wrong here (re-running the command resumes).
    os.environ["TUNE_PRINT_ALL_TRIAL_ERRORS"] = "0"
    # The new output engine prints its experiment box and result paths even with verbose=0.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    tune_logger = logging.getLogger("ray.tune.tune")
    tune_logger.addFilter(_quiet_tune)
    on_sigint = signal.getsignal(signal.SIGINT)
    os.environ.update(pending)
    try:
        return len(tuner.fit())
    finally:
        for name in pending:
            os.environ.pop(name, None)
        tune_logger.removeFilter(_quiet_tune)
        if threading.current_thread() is threading.main_thread():
            # Tune leaves its handlers installed, bound to a run that is over: a Ctrl-C (or a
            # SIGTERM / SIGUSR1) between two Tuner runs must still stop the sweep.
            signal.signal(signal.SIGINT, on_sigint)
            _interrupt_on_signals()


# Every Tune trial's config names its trial folder under this key (a grid cell's config and
# fingerprints sit under "cell", a search trial's sampled values beside it): the driver names Tune's
# trials and finds their cells by it, without rebuilding a TrialConfig per event.
TRIAL_KEY = "trial_id"


def _trial_name(trial: Any) -> str:
    return trial.config[TRIAL_KEY]


def _trial_dirname(trial: Any) -> str:
    return f"{trial.config[TRIAL_KEY]}-{trial.trial_id}"


def _grid_searcher(cells: list[Cell]) -> Any:
    """The grid as a Tune Searcher that hands out one cell per trial, in plan order.

    Not `tune.grid_search` over the cells: Tune's variant generator deep-copies the whole list of
    values for every trial it makes (`_grid_search_generator` in ray/tune/search/
    variant_generator.py), O(trials) per trial with a full config per cell (17 % of the driver's
    time at 400 trials, growing with them; docs/performance.md, "Orchestrator scaling"). With a
    `max_concurrent`, Tune queues that many trials ahead of a searcher (see `_grid_pending`).
    """
    from ray.tune.search import Searcher

    class GridCells(Searcher):
        def __init__(self) -> None:
            super().__init__()
            self.todo = collections.deque(cells)

        def __reduce__(self) -> tuple:  # Tune pickles its config into tuner.pkl; never read here
            return (type(None), ())

        def suggest(self, trial_id: str) -> dict | str:
            if not self.todo:
                return Searcher.FINISHED
            cell = self.todo.popleft()  # its config dict made now: Tune keeps a copy per trial
            return {TRIAL_KEY: cell.trial_id, "cell": {"config": cell.config.to_dict(),
                                                       "fingerprints": cell.fingerprints}}

        def on_trial_complete(self, trial_id: str, result: dict | None = None,
                              error: bool = False) -> None:
            pass

        def save(self, checkpoint_path: str) -> None:  # Ray's experiment state is not resumed
            Path(checkpoint_path).write_bytes(b"")

        def restore(self, checkpoint_path: str) -> None:
            pass

    return GridCells()


def _grid_pending(max_concurrent: int | None, cluster_cpus: float) -> dict[str, str]:
    """The environment under which Tune queues as many grid trials ahead as it did for its own
    grid_search: with a searcher and no `max_concurrent`, Tune keeps one trial pending
    (`_get_max_pending_trials`), so an autoscaling cluster (table1.yaml) would see the demand of
    one trial at a time instead of max(200, 1.1 x CPUs). With a cap, Tune queues up to the cap."""
    if max_concurrent or "TUNE_MAX_PENDING_TRIALS_PG" in os.environ:
        return {}
    return {"TUNE_MAX_PENDING_TRIALS_PG": str(max(200, int(cluster_cpus * 1.1)))}


def _check_cluster(run: _Run, configs: list[TrialConfig]) -> dict[str, float]:
    """A trial's Ray resources, checked before any trial is queued: data-parallel ranks on CUDA get
    one whole GPU each (preflight.check_placement), and one trial fits a live node, or a node type
    the cluster's autoscaler can add (preflight.check_fit; skipped with --wait-for-resources)."""
    import ray

    res = run.space.resources
    for cfg in dict.fromkeys(configs):
        preflight.check_placement(cfg, res.gpu, where=str(run.space.path))
    if not run.opts.wait_for_resources:
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        preflight.check_fit({"CPU": res.cpu, "GPU": res.gpu, **run.opts.trial_resources}, nodes,
                            _autoscaler_node_types())
    return {"cpu": res.cpu, "gpu": res.gpu, **run.opts.trial_resources}


def _autoscaler_node_types() -> list[dict[str, float]] | None:
    """Per-node resources of the node types the cluster's autoscaler may still start (what it
    reports to the GCS, as Ray Train reads it), or None: no autoscaler, or no answer."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # a private API; without an answer, the cluster is what ray.nodes() says
        return None
    if config is None:
        return None
    types = [{k: float(v) for k, v in g.resources.items()} for g in config.node_group_configs
             if g.max_count != 0]
    return types or None


class _OnAssignedDevices:
    """`train_fn` as a Ray trial runs it: on the GPUs Ray gave it, with the driver's settings.

    Called in the trial's worker process: it sets the driver's FLARESWEEP_* variables and cache
    location (`_trial_env`), reads `ray.get_gpu_ids()`, shows the process only those GPUs
    (CUDA_VISIBLE_DEVICES, inherited by DDP ranks as cuda:0..N-1) and resolves `device: auto` to
    them, the CPU without any (cascade.device.assigned_device). Picklable: Ray ships it to workers.
    """

    def __init__(self, train_fn: TrainFn | None, env: dict[str, str]) -> None:
        self.train_fn, self.env = train_fn, dict(env)

    def __call__(self, cfg: TrialConfig, **kwargs: Any) -> dict:
        import ray

        from cascade.device import assigned_device, visible_devices

        os.environ.update(self.env)
        gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        os.environ.update(visible_devices(gpu_ids))
        device = assigned_device(cfg.device, gpu_ids)
        if device != cfg.device:
            cfg = cfg.replace(device=device)
        train_fn = self.train_fn
        if train_fn is None:
            from cascade.train import train as train_fn
        return train_fn(cfg, **kwargs)


def _quiet_tune(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(("Trials did not complete", "Experiment has been interrupted",
                                           "Training has been interrupted"))


def _search_setup(run: _Run) -> tuple[dict[str, Any], dict[str, Any]]:
    """Param space and TuneConfig fields of an Optuna search that continues the sweep's study.

    The study lives in results/<sweep>/optuna.journal (orchestrator.search): a resumed search
    continues it, samples an earlier run left unfinished run first (queued in the study, so they
    run under ASHA and their outcome reaches the sampler), and a changed parameter space keeps
    the history that still fits. The searcher (`_study_searcher`) and the scheduler
    (`_recording_asha`) record what Ray Tune alone would get wrong (see there).
    """
    import optuna
    from ray import tune

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" lines
    space, search = run.space, run.space.search
    assert search is not None
    distributions = {"uniform": tune.uniform, "loguniform": tune.loguniform,
                     "randint": tune.randint, "choice": lambda *a: tune.choice(list(a))}
    param_space = {p.name: distributions[p.distribution](*p.args) for p in search.params}
    plan = load_plan(space, run.record)
    study = studies.open_study(run.record.root, search, lambda: _recorded_samples(run, plan))
    again = [values for cell, values in plan.sampled
             if should_run(run.record.status(cell.trial_id, cell.eval_id), run.opts.retry_failed)]
    queued = studies.enqueue(study, again) if again else 0
    for note in study.notes:
        run.say(note)
    if queued:
        run.say(f"search: {queued} sample(s) an earlier run left unfinished run first")
    # The sampler seed moves on with every recorded sample: a resumed search with the same seed
    # would otherwise replay its first (random start-up) proposals, which already ran.
    seed = None if search.seed is None else search.seed + len(plan.sampled)
    config: dict[str, Any] = {"search_alg": _study_searcher(run, study, seed), "metric": search.metric,
                              "mode": search.mode, "num_samples": plan.new_samples(space) + queued}
    if search.asha is not None:
        # Rungs lie strictly below max_t = steps and reaching max_t stops nothing: the last report
        # of a trial that trained to the end must not kill it before it writes metrics.json.
        asha = {"max_t": max(space.search_probe().steps, 2), **search.asha}
        config["scheduler"] = _recording_asha(run.stopped, time_attr="step", stop_last_trials=False,
                                              **asha)
    return param_space, config


def _recorded_samples(run: _Run, plan: Any) -> list[studies.Sample]:
    """The plan's finished search samples as the record has them: a sweep from before the journal
    (done: COMPLETE with its metric; stopped early: PRUNED with its last metric at its step)."""
    metric, out = run.space.search.metric, []
    for cell, values in plan.sampled:
        status = run.record.status(cell.trial_id, cell.eval_id)
        value = (status.metrics or {}).get(metric)
        if not _is_number(value):
            continue
        if status.state == "done":
            out.append(studies.Sample(values, "COMPLETE", float(value), trial_id=cell.trial_id))
        elif status.state == "stopped":
            out.append(studies.Sample(values, "PRUNED", None, {int(status.step or 0): float(value)},
                                      trial_id=cell.trial_id))
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


MAX_ASKS = 20  # proposals per suggestion before the searcher waits (all duplicated running trials)


def _study_searcher(run: _Run, study: studies.Study, seed: int | None) -> Any:
    """Ray's OptunaSearch on the sweep's study, telling it what the sweep saw.

    - Intermediate values are keyed by the trial's `step` (Ray uses training_iteration).
    - A trial the scheduler stopped is PRUNED (Ray tells it COMPLETE: it reported the metric).
    - One Ray trial per trial folder: a proposal equal to a running trial (a `choice` drawn twice
      at once) waits for that trial's outcome, one equal to a finished trial gets its outcome at
      once; neither trains. Proposals that only repeat finished trials end the search.
    """
    from optuna.trial import TrialState
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch

    space, metric = run.space, run.space.search.metric

    def folder(values: dict[str, Any]) -> str:
        return _cell_of(values, space).trial_id

    class StudySearch(OptunaSearch):
        def __init__(self) -> None:
            super().__init__(seed=seed, storage=study.storage, study_name=study.name)
            self.known = {folder(s.values): s for s in studies.outcomes(study)}
            self.live: dict[str, str] = {}  # Tune trial id -> the trial folder it trains
            self.twins: dict[str, list[Any]] = {}  # trial folder -> Optuna trials waiting on it
            self.reported: dict[str, dict[int, float]] = {}  # Tune trial id -> step -> value
            self.blocked = False  # the last proposals all repeated running trials

        def __reduce__(self) -> tuple:  # Tune pickles its config into tuner.pkl; never read here
            return (type(None), ())

        def save(self, checkpoint_path: str) -> None:  # Ray's experiment state is not resumed
            Path(checkpoint_path).write_bytes(b"")

        def restore(self, checkpoint_path: str) -> None:
            pass

        def suggest(self, trial_id: str) -> dict | str | None:
            if self.blocked:
                return None
            for _ in range(MAX_ASKS):
                config = super().suggest(trial_id)
                if not isinstance(config, dict):
                    return config
                tid = folder(config)
                if tid not in self.known and tid not in self.live.values():
                    self.live[trial_id] = tid
                    return {**config, TRIAL_KEY: tid}
                twin = self._ot_trials.pop(trial_id)
                twin.set_user_attr("duplicate_of", tid)
                if tid in self.known:
                    self._tell(twin, self.known[tid])
                else:
                    self.twins.setdefault(tid, []).append(twin)
            if not self.live:
                run.say("search: the sampler proposes only points that already ran (a small "
                        "choice/randint space?); ending the search")
                return Searcher.FINISHED
            self.blocked = True
            return None

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            step, value = result.get("step"), result.get(metric)
            if trial_id in self._ot_trials and isinstance(step, int) and _is_number(value):
                steps = self.reported.setdefault(trial_id, {})
                if step not in steps:
                    steps[step] = float(value)
                    self._ot_trials[trial_id].report(float(value), step)

        def on_trial_complete(self, trial_id: str, result: dict | None = None,
                              error: bool = False) -> None:
            tid = self.live.pop(trial_id, None)
            self.blocked = False
            if trial_id not in self._ot_trials or trial_id in self._completed_trials:
                return
            value, step = (result or {}).get(metric), (result or {}).get("step")
            seen = dict(self.reported.pop(trial_id, {}))
            if error or not result or not _is_number(value):  # failed, or never ran
                outcome = studies.Sample({}, "FAIL", intermediate=seen)
            elif trial_id in run.stopped:
                if isinstance(step, int):
                    seen.setdefault(step, float(value))
                outcome = studies.Sample({}, "PRUNED", None, seen)
            else:
                outcome = studies.Sample({}, "COMPLETE", float(value), seen)
            self._tell(self._ot_trials[trial_id], outcome)
            self._completed_trials.add(trial_id)
            if tid is not None:
                if outcome.state in studies.FINAL:
                    self.known[tid] = outcome
                for twin in self.twins.pop(tid, []):
                    self._tell(twin, outcome)

        def _tell(self, ot_trial: Any, outcome: studies.Sample) -> None:
            reported = ot_trial.storage.get_trial(ot_trial._trial_id).intermediate_values
            for at, v in outcome.intermediate.items():
                if at not in reported:
                    ot_trial.report(v, at)
            value = outcome.value if outcome.state == "COMPLETE" else None
            try:
                self._ot_study.tell(ot_trial, value, state=getattr(TrialState, outcome.state))
            except Exception as exc:  # noqa: BLE001 - e.g. a NaN metric; Ray's OptunaSearch does so too
                logging.getLogger(__name__).warning("search: %s", exc)

    return StudySearch()


def _recording_asha(stopped: set[str], **kwargs: Any) -> Any:
    """ASHA that adds the Tune ids of the trials it stops to `stopped`: Tune ends them like trials
    that finished (done=True), and the sweep must tell the two apart (stopped.json, PRUNED)."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class RecordingASHA(ASHAScheduler):
        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
            decision = super().on_trial_result(tune_controller, trial, result)
            if decision == TrialScheduler.STOP:
                stopped.add(trial.trial_id)
            return decision

    return RecordingASHA(**kwargs)


def _cell_of(config: dict[str, Any], space: SweepSpace) -> Cell:
    """The plan cell of a Tune trial config: a grid cell ({"cell": {"config", "fingerprints"}}) or
    sampled values over the fixed fields, with the fingerprints the plan was made with."""
    if "cell" in config:
        return cell_for(TrialConfig.from_dict(config["cell"]["config"]),
                        fingerprints=config["cell"]["fingerprints"])
    sampled = {k: v for k, v in config.items() if k != TRIAL_KEY}
    return cell_for(space.search_config(sampled), fingerprints=space.search_fingerprints)


class _TrialCells:
    """Tune trial -> its plan cell, in the driver: a grid cell looked up by the trial id its config
    carries, a search sample built once (a TrialConfig and its hashes take about a millisecond;
    the callback needs the cell on every event)."""

    def __init__(self, space: SweepSpace, cells: list[Cell] | None) -> None:
        self.space = space
        self.plan = {c.trial_id: c for c in cells or ()}
        self.by_trial: dict[str, Cell] = {}

    def __call__(self, trial: Any) -> Cell:
        cell = self.by_trial.get(trial.trial_id)
        if cell is None:
            cell = self.plan.get(trial.config.get(TRIAL_KEY)) or _cell_of(trial.config, self.space)
            self.by_trial[trial.trial_id] = cell
        return cell


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


def _progress_callback(run: _Run, cells: list[Cell] | None = None):
    """A Tune callback that hands each trial event to an orchestrator.progress.Board (console lines,
    stopped.json / error.json only the driver can write, new search samples into the plan).

    How a trial ended comes from Tune, not from a glance at its folder: on NFS a metrics.json or
    error.json another node renamed into place seconds ago can be invisible here, which would
    make a spurious stopped.json, a false "interrupted", or overwrite the trial's own error.json.
    A trial the scheduler stopped (`run.stopped`) is stopped; one that returned has its
    metrics.json, one that raised its error.json: the folder is re-read until it shows them
    (`_settled`, at most FLARESWEEP_SETTLE_S); only a trial whose process died gets its error.json
    from the driver. `cells`: the grid cells the Tuner runs (None: a search)."""
    from ray import tune

    space = run.space
    board = Board(space, run.record, load_plan(space, run.record), run.concurrency)
    cell_of = _TrialCells(space, cells)

    class Progress(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            sampled = None if "cell" in trial.config else {
                p.name: trial.config[p.name] for p in space.search.params}
            board.started(cell_of(trial), sampled)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            board.result(cell_of(trial).trial_id, result.get("step"))

        def on_trial_complete(self, iteration, trials, trial, **info):
            cell, last = cell_of(trial), _scalars(trial.last_result or {})
            if trial.trial_id in run.stopped:  # the scheduler ended it: the Board marks it stopped
                board.completed(cell.trial_id, last)
                return
            status = _settled(run.record, cell, ("done", "failed"))
            if status.state in ("done", "failed"):
                board.completed(cell.trial_id, last)
            else:
                board.say(f"  done?   {cell.trial_id}: Ray says it finished, but its metrics.json "
                          f"is not visible here after {_settle_s():g}s; `status` will show it")

        def on_trial_error(self, iteration, trials, trial, **info):
            cell, error = cell_of(trial), str(trial.get_error() or "")
            if _raised(trial):  # run_trial wrote error.json before re-raising
                status = _settled(run.record, cell, ("failed", "done"))
                if status.state not in ("failed", "done"):
                    last = (error.strip().splitlines() or ["error"])[-1]
                    board.say(f"  FAILED  {cell.trial_id}: {last} (its error.json is not visible "
                              f"here after {_settle_s():g}s)")
                    return
            board.errored(cell.trial_id, error)

        def on_trial_recover(self, iteration, trials, trial, **info):
            board.say(f"  retry   {cell_of(trial).trial_id} (failure "
                      f"{trial.num_failures} of max_failures={space.max_failures})")

        def on_step_end(self, iteration, trials, **info):
            board.tick()

    return Progress()


SETTLE_S = 60.0  # NFS's default attribute-cache bound for folders (acdirmax)


def _settle_s() -> float:
    """SETTLE_S, or FLARESWEEP_SETTLE_S (seconds)."""
    try:
        return max(0.0, float(os.environ.get("FLARESWEEP_SETTLE_S", SETTLE_S)))
    except ValueError:
        return SETTLE_S


def _settled(record: SweepRecord, cell: Cell, states: tuple[str, ...]) -> Any:
    """The trial's status once its folder shows one of `states`, re-read for at most `_settle_s()`
    (listing its folders first: a READDIR makes an NFS client revalidate what it cached)."""
    deadline = time.monotonic() + _settle_s()
    while True:
        for folder in (record.trial_dir(cell.trial_id), record.eval_dir(cell.trial_id, cell.eval_id)):
            try:
                os.listdir(folder)
            except OSError:
                pass
        status = record.status(cell.trial_id, cell.eval_id)
        if status.state in states or time.monotonic() >= deadline:
            return status
        time.sleep(0.5)


def _raised(trial: Any) -> bool:
    """Whether the trial's last error was raised by its code (a RayTaskError), not the death of
    its process or node (a RayActorError)."""
    from ray.exceptions import RayActorError, RayTaskError

    try:
        error = trial.get_pickled_error()
    except Exception:  # noqa: BLE001 - unreadable: treat it as a death, the safe side
        return False
    return isinstance(error, RayTaskError) and not isinstance(error, RayActorError)


# -- status / table1 -----------------------------------------------------------------------------


def status(space_path: Path, results: Path, **overrides: Any) -> list[str]:
    """One line per cell of the space as written (orchestrator.progress.status_report)."""
    return status_report(space_path, results, overrides)


def evaluation_folder(cells: list[dict[str, Any]]) -> str:
    """The folder name of one evaluation's tables: its protocol(s) (`masked`), with the
    evaluation mode and size when it is not the native one (`masked_resize-bilinear128`)."""
    names = set()
    for c in cells:
        cfg = c["config"]
        mode = cfg.get("eval_mode", "native")
        names.add(cfg["protocol"] + ("" if mode == "native" else
                                     f"_{mode}{cfg.get('eval_size', '') if mode in VIEW_MODES else ''}"))
    return "-".join(sorted(names))


def table1(space_path: Path, results: Path, *, flag_on_image_noise: bool = False,
           **overrides: Any) -> list[Path]:
    """reports.build_reports for the space's cells as written (`overrides` as for `status`): the
    tables of one evaluation go to <results>/<name>/<evaluation_folder>/, beside those of other
    protocols and evaluation modes."""
    from reports.table1 import build_reports

    record = SweepRecord((results / space_name(space_path)).resolve())
    cells = cells_as_written(space_path, record, overrides)
    return build_reports(record.root, cells=cells, out_dir=record.root / evaluation_folder(cells),
                         flag_on_image_noise=flag_on_image_noise)


# -- command line ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sweep.py", description="Run, resume and report the k x lambda ablation with Ray Tune.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,status,table1}")

    def common(p: argparse.ArgumentParser) -> None:
        """What defines the cells: the space file and the inputs and seeds laid over it."""
        p.add_argument("--space", type=Path, default=Path("search_spaces/demo.yaml"),
                       help="search-space YAML (default: %(default)s)")
        p.add_argument("--results", type=Path, default=Path("results"),
                       help="results root; the sweep lives in <results>/<name>/ (default: %(default)s)")
        p.add_argument("--data", help="Flare7K/Flare7K++ root (sets `data`)")
        p.add_argument("--backgrounds", help="flare-free background images, e.g. Flickr24K")
        p.add_argument("--test-data", help="test folder with input/ gt/ mask/")
        p.add_argument("--checkpoint", help="pre-trained Flare7K(++) Uformer .pth (sets `checkpoint`)")
        p.add_argument("--base-kind", choices=("flare7k", "flare7kpp"),
                       help="which release the checkpoint is (sets `base_kind`; both have 6 channels)")
        p.add_argument("--seeds", type=int, help="seeds 0..N-1 instead of the space's seeds")
        p.add_argument("--protocol", choices=PROTOCOLS,
                       help="evaluation protocol instead of the space's: finished trials are "
                            "evaluated again from their weights, without training")
        p.add_argument("--eval-mode", choices=EVAL_MODES,
                       help="how test images become scored predictions, instead of the space's "
                            "(e.g. resize-bilinear, center-crop, tiles at --eval-size, native): "
                            "a re-evaluation of finished trials, no training")
        p.add_argument("--eval-size", type=int,
                       help="side of the evaluation views of the resize/crop/tiles modes "
                            "(default: the space's, else 128)")

    run = sub.add_parser(
        "run", help="run or resume a sweep",
        description="Run the trials of a search space that are not finished yet: finished trials "
                    "are skipped, interrupted ones resume from their checkpoints, failed ones are "
                    "retried, new cells run. Set RAY_ADDRESS (e.g. auto) to use a running cluster.")
    common(run)
    run.add_argument("--storage", help="Ray storage path or URI (default: <results>/<name>/ray); "
                                       "must be shared (NFS, s3://) on a multi-node cluster")
    run.add_argument("--gpus-per-trial", type=float, help="GPUs per trial, fractions allowed "
                                                           "(default: the space's resources.gpu); "
                                                           "N >= 2 runs N DDP ranks, one per GPU, "
                                                           "unless the space sets workers")
    run.add_argument("--cpus-per-trial", type=float,
                     help="CPUs per trial (default: the space's resources.cpu)")
    run.add_argument("--trial-resource", action="append", default=[], metavar="NAME=AMOUNT",
                     help="a custom Ray resource every trial asks for (declared by `ray start "
                          "--resources`, e.g. a node type); repeatable")
    run.add_argument("--wait-for-resources", action="store_true",
                     help="queue trials that no node can run now, for nodes still to come "
                          "(default: refuse such a sweep in one line, unless Ray's autoscaler "
                          "can add a node that fits)")
    run.add_argument("--max-concurrent", type=int, help="trials at a time (default: the space's)")
    run.add_argument("--cpus", type=int, help="CPUs of the local Ray (default: all); ignored with RAY_ADDRESS")
    run.add_argument("--retry-failed", action=argparse.BooleanOptionalAction, default=None,
                     help="run every failed trial again (--no-retry-failed: none); default: all "
                          "but deterministic failures (bad input, a non-finite loss)")
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
    t1.add_argument("--flag-on-image-noise", action="store_true",
                    help="with one seed, flag differences whose images-only interval excludes 0 "
                         "(the seed variance is not measured then; off by default)")
    return parser


@cli_errors
def main(argv: Sequence[str] | None = None, *, train_fn: TrainFn | None = None,
         prepare: tuple[PrepareFn, ...] | None = None) -> int:
    """The command line; `train_fn` / `prepare` replace the trial and the shared builds (tests)."""
    args = _parser().parse_args(argv)
    overrides = {"data": args.data, "backgrounds": args.backgrounds, "test_data": args.test_data,
                 "checkpoint": args.checkpoint, "seeds": args.seeds, "protocol": args.protocol,
                 "base_kind": args.base_kind, "eval_mode": args.eval_mode,
                 "eval_size": args.eval_size}
    if args.command == "status":
        print("\n".join(status(args.space, args.results, **overrides)))
        return 0
    if args.command == "table1":
        for path in table1(args.space, args.results, flag_on_image_noise=args.flag_on_image_noise,
                           **overrides):
            print(path)
        return 0
    space = load_space(args.space, **overrides, gpus_per_trial=args.gpus_per_trial,
                       max_concurrent=args.max_concurrent)
    space = _with_cpus(space, args.cpus_per_trial)
    opts = RunOptions(results=args.results, storage=args.storage,
                      address=os.environ.get("RAY_ADDRESS") or None, cpus=args.cpus,
                      connect_timeout_s=args.connect_timeout, retry_failed=args.retry_failed,
                      shared_storage=args.shared_storage, train_fn=train_fn, prepare=prepare,
                      trial_resources=_trial_resources(args.trial_resource),
                      wait_for_resources=args.wait_for_resources)
    _interrupt_on_signals()  # SIGTERM / SIGUSR1 before Ray starts: the same as Ctrl-C
    try:
        outcome = run_sweep(space, opts)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the trials started
        by = f" by {_SIGNALLED[-1]}" if _SIGNALLED else ""
        print(f"\n{space.name}: aborted{by}. Run the same command again to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    if outcome.interrupted and _SIGNALLED:
        print(f"{space.name}: stopped by {_SIGNALLED[0]}; run the same command again to resume.",
              flush=True)
    return EXIT_INTERRUPTED if outcome.interrupted else 1 if outcome.left else 0


# Exit status of a run that was interrupted (Ctrl-C, SIGTERM, SIGUSR1): run the same command again.
EXIT_INTERRUPTED = 130


def _with_cpus(space: SweepSpace, cpus: float | None) -> SweepSpace:
    """`space` with --cpus-per-trial as its resources.cpu (resources are no part of a trial's id)."""
    if cpus is None:
        return space
    if not cpus > 0:
        raise UserError(f"--cpus-per-trial {cpus:g} is invalid; expected a number > 0")
    return dataclasses.replace(space, resources=dataclasses.replace(space.resources, cpu=float(cpus)))


def _trial_resources(items: list[str]) -> dict[str, float]:
    """--trial-resource NAME=AMOUNT flags as {NAME: AMOUNT}; UserError naming a malformed one."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, amount = item.partition("=")
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        if not sep or not name.strip() or not value > 0:
            raise UserError(f"--trial-resource {item!r}: expected NAME=AMOUNT with an amount > 0")
        if name.strip().upper() in ("CPU", "GPU", "MEMORY"):
            raise UserError(f"--trial-resource {item!r}: use --cpus-per-trial / --gpus-per-trial")
        out[name.strip()] = value
    return out


if __name__ == "__main__":
    sys.exit(main())
