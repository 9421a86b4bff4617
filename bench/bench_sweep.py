"""Benchmark a sweep through Ray Tune against the same trials run one after another in one process;
with --scaling, the orchestrator's cost per trial at several sweep sizes against bare Ray Tune.

    python bench/bench_sweep.py [--space search_spaces/demo.yaml] [--concurrency 1 2]
        [--set KEY=VALUE ...] [--grid KEY=V1,V2 ...] [--serial-threads N] [--workdir DIR]
    python bench/bench_sweep.py --scaling [--sizes 100 1000] [--trial-ms 20] [--max-concurrent 8]
        [--cpu-per-trial 0.25] [--cpus 2] [--sides bare bare-s ours] [--workdir DIR]
    python bench/bench_sweep.py --scaling --driver-only [--sizes 100 1000 5000] [--max-concurrent 8]

Both sides run the space's trials (reference + the distinct k x lambda_ cells) with the real
`cascade.train.train`, writing checkpoints and results exactly as a sweep does:
- serial: one Python process calls `train()` for each trial in plan order, torch using
  `--serial-threads` threads (default: every core, what a user running trials by hand gets);
- ray: `sweep.run_sweep` (what `make sweep` calls) on a fresh local Ray with every core, once per
  `--concurrency` value (trials at once; each trial gets the space's `resources.cpu`, 1 in the demo,
  and Ray gives its process that many threads).
The base network and test set are built (or found in the cache) once before either side and not
charged to it; they are shared through the cache exactly as in a sweep.

Printed per Ray run, measured in the driver:
- wall: `run_sweep`'s whole call (planning, Ray start, trials, Ray shutdown);
- ray start: `ray.init` of the local cluster;
- to 1st trial: from the call to Tune starting the first trial (planning, ray start, Tuner set-up);
- after last: from the last trial's completion to the call's return (Tune's wind-down, Ray shutdown);
- per-trial overhead: Tune's trial start -> trial complete, minus the `wall_s` the trial's own
  `train()` call measured (process start, imports, reporting, actor teardown); median and sum;
- idle slot-s: concurrency x (first trial start -> last trial complete) minus the trials' own
  start -> complete spans: time a slot spent waiting for Tune to start its next trial (with an odd
  trial count at the end, some of it is inherent);
- in-trial: the sum of the trials' own `train()` seconds (1 thread each vs the serial side's N);
- ratio = serial wall / ray wall (above 1: the sweep is faster than running trials by hand).
The PSNR of every trial is compared between the two sides (same seed, same data; only the thread
count differs, which may change float reduction order); the largest difference is printed.

Run order is serial first, then each concurrency; the load average is printed before and after,
since wall times on a shared machine depend on it. Not a timed test: CI runs a 3-trial, few-step
configuration once.

--scaling (issue 21, item 3): is the orchestration O(1) per trial? At each size N, three sides, each
in a fresh process of its own (so each has its own peak RSS, its own Ray):
- bare: Ray Tune alone, the floor: a function trainable that sleeps --trial-ms and reports once,
  `tune.grid_search` over N integers, the same resources, max_concurrent_trials, reuse_actors,
  storage and verbose=0 as a sweep;
- bare-s: the same, the N integers handed out by a minimal Tune Searcher, which is how the sweep
  hands Tune its grid (sweep._grid_searcher): Tune then queues max_concurrent trials ahead, not
  200, which by itself changes Tune's cost per trial; ours - bare-s is the orchestration alone;
- ours: `sweep.run_sweep` (what `sweep.py run` calls, from `load_space` on) over a grid of N
  lambda_ cells whose trial, `stand_in_train`, sleeps the same --trial-ms and returns metrics; the
  base and test set are not built (`prepare` is a no-op), everything else is the real run: plan,
  lock, trial folders, heartbeats, metrics.json, provenance, the progress board.
Printed per side and size: wall (process start of the side's work -> return, Ray start and
shutdown included), wall / N, and the driver's peak RSS (ru_maxrss). Then per side the marginal
cost per trial between consecutive sizes, (wall(N2) - wall(N1)) / (N2 - N1), which the fixed
costs (Ray start, imports, shutdown) cancel out of, and ours - bare, ours - bare-s: the
orchestration's own cost per trial. Sizes run in the order given, every side at each size before
the next size, so slow drift of the machine's load hits the sides alike. `--sides` leaves some out
(a 5000-trial point of bare takes ~10 minutes on 2 cores).

--scaling --driver-only: the driver's own share alone, at sizes a real run cannot reach in minutes
(bare Tune costs ~0.3 s a trial on 2 cores). No Ray processes: the sweep's real plan, lock,
record, grid searcher, name functions and progress callback receive the events Tune delivers for
each trial (suggest, the two names and their pickles as Tune stores them, start, a step, a result,
complete), `--max-concurrent` trials in flight; each trial's metrics.json is written as its own
process would (timed apart and not charged). Printed: the driver's seconds per trial at each size
and its peak RSS; flat means O(1) per trial.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

import sweep
from orchestrator.record import SweepRecord
from orchestrator.space import SweepSpace, load_space
from orchestrator.trial import prepare_shared

ROOT = Path(__file__).resolve().parents[1]


def _value(text: str) -> Any:
    """A --set / --grid value as YAML reads it (numbers, booleans, strings)."""
    return yaml.safe_load(text)


def bench_space(space_path: Path, sets: list[str], grids: list[str], out: Path) -> Path:
    """A copy of the space with fixed fields (--set) and grid lists (--grid) replaced."""
    raw = yaml.safe_load(space_path.read_text())
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --set {item!r}: expected KEY=VALUE")
        raw.setdefault("fixed", {})[key] = _value(value)
    for item in grids:
        key, sep, values = item.partition("=")
        if not sep or key not in raw.get("grid", {}):
            raise SystemExit(f"error: --grid {item!r}: expected KEY=V1,V2 with KEY one of "
                             f"{sorted(raw.get('grid', {}))}")
        raw["grid"][key] = [_value(v) for v in values.split(",")]
    raw["name"] = f"{raw['name']}-bench"
    path = out / "space.yaml"
    comment = f"# {space_path.name} for bench/bench_sweep.py: " + " ".join([*sets, *grids])
    path.write_text(comment.rstrip() + "\n" + yaml.safe_dump(raw, sort_keys=False))
    return path


def prepare(space: SweepSpace) -> float:
    """Build (or find) the base network and test set every trial shares; seconds taken."""
    t0 = time.perf_counter()
    prepare_shared(space.name, [c.config for c in space.trials()], sweep._default_prepare())
    return time.perf_counter() - t0


def run_serial(space: SweepSpace, out: Path, threads: int) -> tuple[float, dict[str, dict]]:
    """Every trial of the plan through train(), one after another; (wall s, results by trial id)."""
    import torch

    from cascade.train import train

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    results: dict[str, dict] = {}
    try:
        t0 = time.perf_counter()
        for cell in space.trials():
            tdir = out / cell.trial_id
            results[cell.trial_id] = train(cell.config, checkpoint_dir=tdir / "checkpoints",
                                           output_dir=tdir)
        return time.perf_counter() - t0, results
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def instrumented(events: dict[str, Any]) -> Iterator[None]:
    """Time sweep's ray.init, and record Tune's trial start / complete times by trial id."""
    real_start, real_callback = sweep.start_local_ray, sweep._progress_callback

    def timed_start(*args: Any, **kwargs: Any) -> None:
        t0 = time.perf_counter()
        real_start(*args, **kwargs)
        events["ray_start_s"] = time.perf_counter() - t0

    def timed_callback(run: Any, cells: Any = None) -> Any:
        callback = real_callback(run, cells)
        on_start, on_complete = callback.on_trial_start, callback.on_trial_complete

        def trial_id(trial: Any) -> str:
            return trial.config[sweep.TRIAL_KEY]

        def start(iteration, trials, trial, **info):
            events["start"][trial_id(trial)] = time.time()
            on_start(iteration, trials, trial, **info)

        def complete(iteration, trials, trial, **info):
            events["complete"][trial_id(trial)] = time.time()
            on_complete(iteration, trials, trial, **info)

        callback.on_trial_start, callback.on_trial_complete = start, complete
        return callback

    sweep.start_local_ray, sweep._progress_callback = timed_start, timed_callback
    try:
        yield
    finally:
        sweep.start_local_ray, sweep._progress_callback = real_start, real_callback


def run_ray(space_path: Path, concurrency: int, out: Path, cpus: int) -> dict[str, Any]:
    """sweep.run_sweep over the space with `concurrency` trials at once; timings and results."""
    space = load_space(space_path, max_concurrent=concurrency)
    events: dict[str, Any] = {"start": {}, "complete": {}}
    with instrumented(events):
        t0, w0 = time.perf_counter(), time.time()
        outcome = sweep.run_sweep(space, sweep.RunOptions(results=out, cpus=cpus))
        wall, w1 = time.perf_counter() - t0, time.time()
    if outcome.left or outcome.interrupted:
        raise SystemExit(f"error: the Ray sweep in {out} did not finish ({outcome})")
    record = SweepRecord(out / space.name)
    results = {c.trial_id: record.read_metrics(c.trial_id, c.eval_id) for c in space.trials()}
    overheads = [events["complete"][tid] - events["start"][tid] - results[tid]["wall_s"]
                 for tid in results]
    return {"wall": wall, "ray_start": events.get("ray_start_s", float("nan")),
            "to_first": min(events["start"].values()) - w0,
            "after_last": w1 - max(events["complete"].values()),
            "overheads": overheads,
            # slot-seconds (concurrency x the trial phase) in which no trial was running
            "idle": concurrency * (max(events["complete"].values()) - min(events["start"].values()))
            - sum(events["complete"][t] - events["start"][t] for t in results), "in_trial": sum(r["wall_s"] for r in results.values()),
            "results": results}


# -- scaling (--scaling) ---------------------------------------------------------------------

TRIAL_S_ENV = "FLARESWEEP_BENCH_TRIAL_S"  # the stand-in's duration; FLARESWEEP_* reach the trials
SIDES = ("bare", "bare-s", "ours")  # --scaling: Tune's grid_search, Tune with a Searcher, the sweep

SCALING_SPACE = """\
# bench/bench_sweep.py --scaling: does the orchestrator's cost per trial stay flat as the sweep grows?
name: scaling-{n}
grid:
  k: [1]
  lambda_: [{lambdas}]
fixed: {{steps: 1, log_every: 1, checkpoint_every: 1, encoder: small_cpu, encoder_pretrained: false}}
reference: false
seeds: [0]
resources: {{cpu: {cpu}, gpu: 0}}
max_concurrent: {max_concurrent}
max_failures: 0
"""


def stand_in_train(cfg: Any, report: Any = None, checkpoint_dir: str | None = None,
                   output_dir: str | None = None, metrics_file: bool = True) -> dict:
    """train()'s signature, a sleep of $FLARESWEEP_BENCH_TRIAL_S seconds, metrics that depend on
    lambda_ (the sweep records them as metrics.json; nothing else is written)."""
    t0 = time.perf_counter()
    time.sleep(float(os.environ.get(TRIAL_S_ENV, "0.02")))
    psnr = 20.0 + cfg.lambda_
    return {"psnr_entire": psnr, "psnr_streak": psnr + 6, "psnr_glare": psnr + 3,
            "ssim_entire": 0.8, "steps": cfg.steps, "wall_s": time.perf_counter() - t0}


def no_prepare(cfg: Any) -> str:
    """Stands in for the base network and test set builds (the stand-in trial uses neither)."""
    return "(none: bench/bench_sweep.py --scaling)"


def int_searcher(n: int) -> Any:
    """A minimal Tune Searcher handing out {"i": 0..n-1}, in order (the bare-s side)."""
    import collections

    from ray.tune.search import Searcher

    class Ints(Searcher):
        def __init__(self) -> None:
            super().__init__()
            self.todo = collections.deque(range(n))

        def suggest(self, trial_id: str) -> dict | str:
            return {"i": self.todo.popleft()} if self.todo else Searcher.FINISHED

        def on_trial_complete(self, trial_id: str, result: dict | None = None,
                              error: bool = False) -> None:
            pass

    return Ints()


def bare_trainable(config: dict[str, Any]) -> None:
    """The floor's trial: the stand-in's sleep and one report, nothing else."""
    from ray import tune

    time.sleep(float(os.environ.get(TRIAL_S_ENV, "0.02")))
    tune.report({"psnr_entire": 20.0, "step": 1})


def scaling_child(side: str, n: int, out: Path, max_concurrent: int, cpu: float, cpus: int) -> dict:
    """One side at one size, in this process: {"wall", "trials", "rss_mb"}."""
    import logging
    import resource

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if side == "ours":
        lambdas = ", ".join(f"{(i + 1) / (n + 1):.9f}" for i in range(n))
        path = out / "space.yaml"
        path.write_text(SCALING_SPACE.format(n=n, lambdas=lambdas, cpu=cpu,
                                             max_concurrent=max_concurrent))
        space = load_space(path)
        outcome = sweep.run_sweep(space, sweep.RunOptions(
            results=out / "results", cpus=cpus, train_fn=stand_in_train, prepare=(no_prepare,)))
        if outcome.left or outcome.interrupted:
            raise SystemExit(f"error: the sweep in {out} did not finish ({outcome})")
        record = SweepRecord(out / "results" / space.name)
        trials = sum(s.state == "done" for s in record.statuses(
            [(c.trial_id, c.eval_id) for c in space.trials()]))
    else:
        import ray
        from ray import tune

        os.environ.update({"RAY_CHDIR_TO_TRIAL_DIR": "0", "RAY_AIR_NEW_OUTPUT": "0"})
        sweep.start_local_ray(num_cpus=cpus, log_to_driver=False, logging_level=logging.WARNING)
        if side == "bare":
            grid: dict[str, Any] = {"param_space": {"i": tune.grid_search(list(range(n)))}}
            search: dict[str, Any] = {}
        else:
            grid, search = {}, {"search_alg": int_searcher(n), "num_samples": n}
        try:
            tuner = tune.Tuner(
                tune.with_resources(bare_trainable, {"cpu": cpu, "gpu": 0}), **grid,
                tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=max_concurrent,
                                            **search),
                run_config=tune.RunConfig(name="bare", storage_path=str(out / "ray"), verbose=0))
            trials = sum(r.error is None for r in tuner.fit())
        finally:
            ray.shutdown()
    wall = time.perf_counter() - t0
    if trials != n:
        raise SystemExit(f"error: {side} at {n} trials finished {trials}")
    return {"side": side, "n": n, "wall": wall, "trials": trials,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def driver_replay(n: int, out: Path, max_concurrent: int) -> dict:
    """The driver's part of an n-trial grid sweep without Ray (--driver-only): {"wall", ...}."""
    import collections
    import json
    import resource
    from types import SimpleNamespace

    from ray import cloudpickle

    from orchestrator.plan import load_plan, write_plan

    out.mkdir(parents=True, exist_ok=True)
    path = out / "space.yaml"
    lambdas = ", ".join(f"{(i + 1) / (n + 1):.9f}" for i in range(n))
    path.write_text(SCALING_SPACE.format(n=n, lambdas=lambdas, cpu=0.25,
                                         max_concurrent=max_concurrent))
    space = load_space(path)
    run = sweep._Run(space, SweepRecord((out / "results" / space.name).resolve()),
                     sweep.RunOptions(results=out / "results"), concurrency=max_concurrent)
    trials_own = 0.0  # what each trial's own process writes (metrics.json): not the driver's
    with run.record.lock(run.run_id), open(out / "driver.log", "w") as log, \
            contextlib.redirect_stdout(log):
        t0 = time.perf_counter()
        plan = load_plan(space, run.record)
        write_plan(space, run.record, plan)
        cells = plan.trials()
        callback, searcher = sweep._progress_callback(run, cells), sweep._grid_searcher(cells)
        live: collections.deque = collections.deque()

        def finish(trial: Any) -> None:
            nonlocal trials_own
            callback.on_trial_result(0, [], trial, {"step": 1})
            cell = callback_cells[trial.config[sweep.TRIAL_KEY]]
            t = time.perf_counter()
            run.record.write_metrics(cell.trial_id, cell.eval_id, stand_in_train(cell.config))
            trials_own += time.perf_counter() - t
            trial.last_result = {"step": 1, "psnr_entire": 20.0}
            callback.on_trial_complete(0, [], trial)

        callback_cells = {c.trial_id: c for c in cells}
        os.environ[TRIAL_S_ENV] = "0"
        for i in range(n):
            trial = SimpleNamespace(trial_id=f"{i:08x}", config=searcher.suggest(f"{i:08x}"),
                                    last_result={}, num_failures=0)
            sweep._trial_name(trial), sweep._trial_dirname(trial)
            # Tune json-encodes each trial's config and pickles its name functions (_to_argv,
            # Trial.get_json_state): what that costs is what we hand it.
            json.dumps(trial.config)
            cloudpickle.dumps(sweep._trial_name), cloudpickle.dumps(sweep._trial_dirname)
            callback.on_trial_start(0, [], trial)
            callback.on_step_end(0, [])
            live.append(trial)
            if len(live) == max_concurrent:
                finish(live.popleft())
            callback.on_step_end(0, [])
        while live:
            finish(live.popleft())
        wall = time.perf_counter() - t0 - trials_own
    return {"side": "driver", "n": n, "wall": wall, "trials": n, "trials_own_s": trials_own,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_scaling(args: argparse.Namespace, work: Path) -> None:
    """Both sides at every size (child processes), then the table and the per-trial costs."""
    import json
    import subprocess

    sizes = sorted(dict.fromkeys(args.sizes))
    if len(sizes) < 2 or sizes[0] < 1:
        raise SystemExit("error: --sizes needs at least two different sizes >= 1")
    env = {**os.environ, TRIAL_S_ENV: str(args.trial_ms / 1000)}
    command = ("python bench/bench_sweep.py --scaling --sizes " + " ".join(map(str, sizes))
               + f" --trial-ms {args.trial_ms:g} --max-concurrent {args.max_concurrent}"
               + f" --cpu-per-trial {args.cpu_per_trial:g} --cpus {args.cpus}"
               + (" --driver-only" if args.driver_only else
                  "" if list(args.sides) == list(SIDES) else " --sides " + " ".join(args.sides)))
    print(f"{command}\n{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; stand-in "
          f"trial {args.trial_ms:g} ms, {args.max_concurrent} at once, cpu {args.cpu_per_trial:g} "
          f"each, Ray with {args.cpus} CPUs", flush=True)
    rows: dict[tuple[str, int], dict] = {}
    sides = ("driver",) if args.driver_only else tuple(s for s in SIDES if s in args.sides)
    for n in sizes:
        for side in sides:
            child = [sys.executable, __file__, "--scaling-child", side, "--sizes", str(n),
                     "--max-concurrent", str(args.max_concurrent), "--cpu-per-trial",
                     str(args.cpu_per_trial), "--cpus", str(args.cpus),
                     "--workdir", str(work / f"{side}-{n}")]
            proc = subprocess.run(child, env=env, capture_output=True, text=True, cwd=ROOT)
            last = (proc.stdout.strip().splitlines() or [""])[-1]
            if proc.returncode != 0 or not last.startswith("{"):
                raise SystemExit(f"error: {side} at {n} trials failed (exit {proc.returncode}):\n"
                                 + proc.stdout[-2000:] + proc.stderr[-2000:])
            rows[side, n] = json.loads(last)
            r = rows[side, n]
            print(f"  {side} {n} trials: {r['wall']:.1f} s, peak RSS {r['rss_mb']:.0f} MB "
                  f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    if args.driver_only:
        header = (f"{'trials':>7} {'driver s':>9} {'wall/trial ms':>13} {'marginal ms/trial':>17} "
                  f"{'driver peak RSS MB':>18}")
        print(header + "\n" + "-" * len(header))
        marginals = []
        for i, n in enumerate(sizes):
            r = rows["driver", n]
            m = "" if not i else 1000 * (r["wall"] - rows["driver", sizes[i - 1]]["wall"]) / (
                n - sizes[i - 1])
            marginals += [m] if i else []
            print(f"{n:>7} {r['wall']:>9.2f} {1000 * r['wall'] / n:>13.2f} "
                  f"{f'{m:.2f}' if i else '-':>17} {r['rss_mb']:>18.0f}")
        a, b = marginals[0], marginals[-1]
        print(f"driver-only: {a:.2f} ms per trial {sizes[0]}->{sizes[1]} trials, {b:.2f} ms "
              f"{sizes[-2]}->{sizes[-1]} ({b / a:.2f}x); peak RSS {rows['driver', sizes[0]]['rss_mb']:.0f}"
              f" -> {rows['driver', sizes[-1]]['rss_mb']:.0f} MB")
        sys.stdout.flush()
        return

    header = f"{'trials':>7} {'side':6} {'wall s':>8} {'wall/trial s':>12} {'driver peak RSS MB':>18}"
    print(header + "\n" + "-" * len(header))
    for n in sizes:
        for side in sides:
            r = rows[side, n]
            print(f"{n:>7} {side:6} {r['wall']:>8.1f} {r['wall'] / n:>12.3f} {r['rss_mb']:>18.0f}")

    def marginal(side: str, n1: int, n2: int) -> float:
        return (rows[side, n2]["wall"] - rows[side, n1]["wall"]) / (n2 - n1)

    floors = [s for s in sides if s != "ours"]
    header = " ".join([f"{'trials':>12}", *(f"{s + ' s/trial':>14}" for s in sides),
                       *(f"{'ours-' + s + ' s':>13}" for s in floors if "ours" in sides)])
    print("marginal cost per trial, (wall(N2) - wall(N1)) / (N2 - N1):\n" + header + "\n"
          + "-" * len(header))
    for n1, n2 in zip(sizes, sizes[1:]):
        cost = {s: marginal(s, n1, n2) for s in sides}
        print(" ".join([f"{f'{n1}->{n2}':>12}", *(f"{cost[s]:>14.3f}" for s in sides),
                        *(f"{cost['ours'] - cost[s]:>13.3f}" for s in floors if "ours" in sides)]))
    n1, n2 = sizes[0], sizes[-1]
    cost = {s: marginal(s, n1, n2) for s in sides}
    rss = ", ".join(f"{s} {rows[s, n2]['rss_mb']:.0f} MB" for s in sides)
    if "ours" in sides and floors:
        diffs = ", ".join(f"ours - {s} {cost['ours'] - cost[s]:+.3f}" for s in floors)
        print(f"scaling: {diffs} s per trial ({n1}->{n2} trials; "
              + ", ".join(f"{s} {cost[s]:.3f}" for s in sides)
              + f"); driver peak RSS at {n2}: {rss}")
    else:
        print(f"scaling: {', '.join(f'{s} {cost[s]:.3f}' for s in sides)} s per trial "
              f"({n1}->{n2} trials); driver peak RSS at {n2}: {rss}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", type=Path, default=ROOT / "search_spaces" / "demo.yaml")
    parser.add_argument("--concurrency", type=int, nargs="+", default=None,
                        help="trials at once in the Ray runs, one run each (default: the space's "
                             "max_concurrent, capped by the cores)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="replace a fixed field of the space (e.g. steps=4)")
    parser.add_argument("--grid", dest="grids", action="append", default=[], metavar="KEY=V1,V2",
                        help="replace a grid list of the space (e.g. lambda_=1.0,0.0)")
    parser.add_argument("--serial-threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads of the serial side (default: every core)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where both sides write their trials (default: a temporary folder, "
                             "removed afterwards)")
    scaling = parser.add_argument_group("--scaling: ours vs bare Ray Tune at several sweep sizes")
    scaling.add_argument("--scaling", action="store_true",
                         help="measure the orchestrator's cost per trial against bare Ray Tune")
    scaling.add_argument("--sizes", type=int, nargs="+", default=[100, 1000],
                         help="trials per sweep, at least two (default: %(default)s)")
    scaling.add_argument("--trial-ms", type=float, default=20.0,
                         help="the stand-in trial's duration on both sides (default: %(default)s)")
    scaling.add_argument("--max-concurrent", type=int, default=8,
                         help="trials at once on both sides (default: %(default)s)")
    scaling.add_argument("--cpu-per-trial", type=float, default=0.25,
                         help="Ray CPUs per trial (default: %(default)s)")
    scaling.add_argument("--cpus", type=int, default=2,
                         help="CPUs of each side's local Ray (default: %(default)s)")
    scaling.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES),
                         help="which sides to run (default: all)")
    scaling.add_argument("--driver-only", action="store_true",
                         help="only the driver's share, replayed without Ray (sizes up to 5000+)")
    scaling.add_argument("--scaling-child", choices=(*SIDES, "driver"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cpus = os.cpu_count() or 1

    if args.scaling_child:  # one side at one size, for run_scaling; prints a JSON line
        import json

        if args.scaling_child == "driver":
            result = driver_replay(args.sizes[0], args.workdir, args.max_concurrent)
        else:
            result = scaling_child(args.scaling_child, args.sizes[0], args.workdir,
                                   args.max_concurrent, args.cpu_per_trial, args.cpus)
        print(json.dumps(result))
        return
    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-sweep-")))
        work.mkdir(parents=True, exist_ok=True)
        if args.scaling:
            run_scaling(args, work)
            return
        space_path = bench_space(args.space, args.sets, args.grids, work)
        space = load_space(space_path)
        concurrency = args.concurrency or [min(space.max_concurrent or cpus, cpus)]
        n = len(space.trials())
        import torch

        print(f"torch {torch.__version__}, {cpus} cores, load average {os.getloadavg()[0]:.1f}; "
              f"{args.space.name}: {n} trials", flush=True)
        prep = prepare(space)
        print(f"prepare (base + test set, not charged to either side): {prep:.1f}s", flush=True)

        serial_wall, serial = run_serial(space, work / "serial", args.serial_threads)
        print(f"serial done: {serial_wall:.1f}s", flush=True)
        runs = {c: run_ray(space_path, c, work / f"ray-c{c}", cpus) for c in concurrency}
        print(f"load average at the end {os.getloadavg()[0]:.1f}")

    header = (f"{'side':16} {'wall s':>7} {'ray start s':>11} {'to 1st trial s':>14} "
              f"{'after last s':>12} {'overhead/trial s':>16} {'idle slot-s':>11} {'in-trial sum s':>14} "
              f"{'max |dPSNR| dB':>14} {'serial/this':>11}")
    print(header)
    print("-" * len(header))
    print(f"{f'serial {args.serial_threads} thr':16} {serial_wall:>7.1f} {'-':>11} {'-':>14} "
          f"{'-':>12} {'-':>16} {'-':>11} {sum(r['wall_s'] for r in serial.values()):>14.1f} {'-':>14} "
          f"{'1.00x':>11}")
    for c, run in runs.items():
        diff = max(abs(run["results"][t]["psnr_entire"] - serial[t]["psnr_entire"]) for t in serial)
        print(f"{f'ray {c} at once':16} {run['wall']:>7.1f} {run['ray_start']:>11.1f} "
              f"{run['to_first']:>14.1f} {run['after_last']:>12.1f} "
              f"{statistics.median(run['overheads']):>16.1f} {run['idle']:>11.1f} {run['in_trial']:>14.1f} "
              f"{diff:>14.2e} {serial_wall / run['wall']:>10.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
