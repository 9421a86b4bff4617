"""Benchmark a sweep through Ray Tune against the same trials run one after another in one process.

    python bench/bench_sweep.py [--space search_spaces/demo.yaml] [--concurrency 1 2]
        [--set KEY=VALUE ...] [--grid KEY=V1,V2 ...] [--serial-threads N] [--workdir DIR]

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

import torch
import yaml

import sweep
from cascade.train import train
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

    def timed_callback(run: Any) -> Any:
        callback = real_callback(run)
        on_start, on_complete = callback.on_trial_start, callback.on_trial_complete

        def trial_id(trial: Any) -> str:
            return sweep._cell_of(trial.config, run.space).trial_id

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
    args = parser.parse_args(argv)
    cpus = os.cpu_count() or 1

    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-sweep-")))
        work.mkdir(parents=True, exist_ok=True)
        space_path = bench_space(args.space, args.sets, args.grids, work)
        space = load_space(space_path)
        concurrency = args.concurrency or [min(space.max_concurrent or cpus, cpus)]
        n = len(space.trials())
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
