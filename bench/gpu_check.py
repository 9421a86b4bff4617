"""Everything only a GPU can show, one section per call; bench/gpu_check.sh runs them all.

    python bench/gpu_check.py SECTION --out DIR [--dry-run] [section options]

Each section writes DIR/<section>.json (and step/compile a CSV) atomically as soon as it has a
result, so a run killed at its time limit keeps what it measured, and ends with one line
`gpu_check <section>: ...` (exit 0; 1 when part of it failed; 2 with one `error:` line for bad
input, or when there is no CUDA device; 124 when SIGTERM, e.g. `timeout`, ended it). Sections:
- env: the CUDA devices, their dense datasheet peaks (bench_step.PEAK_TFLOPS), torch/CUDA
  versions, the TF32 flags, nvidia-smi. Without a CUDA device: one line, exit 2, in seconds.
- step: `bench_step.main` for the Flare7K-size Uformer (embed_dim 32, depths 2 x 9) with the ViT-L
  encoder (random weights: same cost) at each --sizes (with its --batches) x --precisions: plain
  and cascade step seconds, images/s, GFLOP (torch.utils.flop_counter), TFLOP/s, MFU against
  the peak named in the row, MiB per image. `compile` is the same with torch.compile (bf16,
  128 px by default); its first steps ("warm_*_wall") include the compilation.
- data: `bench_data.main`: Flare7K++-style pair synthesis on the device (fake Flare7K++ files at
  Flare7K's sizes) and the procedural generator, against a Flare7K-size Uformer training step,
  and against the cascade step rates in DIR/step.json when that exists (the trainer's real rate).
- eval: the trainer's evaluation of 100 images at 512 px: `cascade.evaluate.predict` (a Flare7K-size
  cascade, random weights, fp32, as trials evaluate) over a PNG test set, then
  `cascade.metrics.evaluate_arrays` with each --workers (pool start-up timed apart).
- sweep: `python sweep.py run` over a temporary space of 2 tiny trials with
  resources {cpu: 2, gpu: 0.5} and device auto (two trials sharing one GPU); nvidia-smi is
  sampled meanwhile for how many trial processes held the GPU at once.
- ddp: `python -m cascade.train` with backend ddp, workers 2 on CUDA, when 2 GPUs exist;
  otherwise skipped (exit 0).
--dry-run: the CPU at toy sizes (Uformer embed_dim 8, depth 1, no encoder, 32-64 px, 1 repeat):
checks this script without a GPU; its numbers mean nothing.
Top-level imports are the standard library only: the no-CUDA exit stays fast, and the metric
pool's spawned workers (which re-import this file) stay light.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The Flare7K Uformer and the trainer's settings on a GPU (search_spaces/table1.yaml).
FLARE7K_ARCH = {"embed_dim": 32, "depth": 2}
TOY_ARCH = {"embed_dim": 8, "depth": 1}
STEP_COLUMNS = ("size", "batch", "precision", "compile", "encoder", "device_name", "plain_wall",
                "cascade_wall", "ratio_wall", "warm_plain_wall", "warm_cascade_wall", "plain_gflop",
                "cascade_gflop", "plain_tflops", "cascade_tflops", "plain_mfu", "cascade_mfu",
                "peak_tflops", "peak_source", "plain_peak_mib", "cascade_peak_mib",
                "plain_mib_per_image", "cascade_mib_per_image")
SWEEP_NAME = "gpu-check"


class Terminated(BaseException):
    """SIGTERM arrived (the shell's `timeout`): clean up children, keep what was written.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` (ours around a
    configuration, torch.compile's around its passes) mistakes the time limit for a failure.
    """


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated(f"signal {signum}")


def _write(out: Path, name: str, payload: dict[str, Any]) -> Path:
    """DIR/<name>.json, atomically (cascade.io), so a killed run never leaves half a file."""
    from cascade.io import atomic_write_json

    path = out / f"{name}.json"
    atomic_write_json(path, payload)
    return path


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    from cascade.io import atomic_write_text

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _error(exc: BaseException) -> str:
    """`Type: first line of the message`, for a JSON record and the result line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _free_cuda() -> None:
    """Drop what a finished configuration left on the GPU before the next one is measured."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _num(value: Any, spec: str, width: int) -> str:
    from cascade.fmt import is_number

    ok = is_number(value, finite=True)
    return f"{format(value, spec) if ok else '-':>{width}}"


def _nvidia_smi(*query: str) -> str | None:
    """nvidia-smi's output for `query` (None when it is missing or fails; never hangs)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        proc = subprocess.run(["nvidia-smi", *query], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _device(args: argparse.Namespace) -> str:
    return "cpu" if args.dry_run else "cuda"


# -- env ---------------------------------------------------------------------------------------


def section_env(args: argparse.Namespace) -> int:
    """The machine: CUDA devices with their datasheet peaks, versions, TF32 flags, nvidia-smi."""
    import torch

    from cascade.errors import UserError

    if not args.dry_run and not torch.cuda.is_available():
        raise UserError(
            f"no CUDA device: torch {torch.__version__} (CUDA build {torch.version.cuda}) sees none "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); nothing measured")
    import bench_step  # after the check: it imports the model stack (seconds)

    info: dict[str, Any] = {
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": sys.version.split()[0], "cpu_count": os.cpu_count(),
        # MFU's fp32 peak is the non-tensor-core rate: say whether TF32 could be in play.
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "dry_run": args.dry_run, "devices": [],
        "nvidia_smi": _nvidia_smi("--query-gpu=index,name,driver_version,memory.total,"
                                  "clocks.max.sm,power.limit", "--format=csv"),
    }
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        prop = torch.cuda.get_device_properties(i)
        dev = torch.device("cuda", i)
        (bf16, source), (fp32, _) = (bench_step.peak_tflops(dev, p, None) for p in ("bf16", "fp32"))
        info["devices"].append({"index": i, "name": prop.name, "capability": f"{prop.major}.{prop.minor}",
                                "total_mib": prop.total_memory / 2**20,
                                "sm_count": prop.multi_processor_count,
                                "peak_bf16_tflops": bf16, "peak_fp32_tflops": fp32,
                                "peak_source": source})
    path = _write(args.out, "env", info)
    if not info["devices"]:
        print(f"gpu_check env: dry run on the CPU ({os.cpu_count()} cores, torch "
              f"{torch.__version__}) -> {path}")
        return 0
    d = info["devices"][0]
    print(f"gpu_check env: {len(info['devices'])} CUDA device(s), cuda:0 {d['name']} (sm "
          f"{d['capability']}, {d['total_mib'] / 1024:.0f} GiB), MFU peaks {d['peak_bf16_tflops']} "
          f"bf16 / {d['peak_fp32_tflops']} fp32 TFLOP/s ({d['peak_source']}) -> {path}")
    return 0


# -- step / compile ----------------------------------------------------------------------------


def section_step(args: argparse.Namespace) -> int:
    """bench_step.main per size x precision; rows written after each configuration."""
    import bench_step

    name = "compile" if args.compile else "step"
    arch = TOY_ARCH if args.dry_run else FLARE7K_ARCH
    sizes, batches = (args.sizes, args.batches) if not args.dry_run else ([32], [1])
    encoders = ["none"] if args.dry_run else args.encoders
    repeats = 1 if args.dry_run else args.repeats
    if len(batches) != len(sizes):
        from cascade.errors import UserError

        raise UserError(f"--batches: expected one per --sizes ({len(sizes)}), got {len(batches)}")
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    configs = [(s, b, p) for s, b in zip(sizes, batches) for p in args.precisions]
    for n, (size, batch, precision) in enumerate(configs):
        argv = ["--device", _device(args), "--size", str(size), "--batch", str(batch),
                "--precision", precision, "--encoders", *encoders, "--repeats", str(repeats),
                "--embed-dim", str(arch["embed_dim"]), "--depth", str(arch["depth"])]
        argv += ["--compile"] if args.compile else []
        argv += [] if args.profile and n == 0 else ["--no-profile"]
        print(f"\n### bench_step.py {' '.join(argv)}", flush=True)
        try:
            rows += bench_step.main(argv)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: record it, measure the rest
            traceback.print_exc()
            errors.append({"size": size, "batch": batch, "precision": precision,
                           "error": _error(exc)})
        finally:
            _free_cuda()
        path = _write(args.out, name, {"section": name, "rows": rows, "errors": errors,
                                       "configs": len(configs), "arch": arch})
        _write_csv(args.out / f"{name}.csv", rows, STEP_COLUMNS)
        sys.stdout.flush()
    print(f"\n{'size':>5} {'batch':>5} {'precision':>9} {'mode':>7} {'encoder':<13}"
          f"{'plain s':>9} {'cascade s':>10} {'ratio':>6} {'plain img/s':>11} {'cascade img/s':>13}"
          f" {'plain MFU':>9} {'cascade MFU':>11} {'MiB/img':>8}  peak")
    for r in rows:
        print(f"{r['size']:>5} {r['batch']:>5} {r['precision']:>9} "
              f"{'compile' if r['compile'] else 'eager':>7} {r['encoder']:<13}"
              f"{r['plain_wall']:>9.4f} {r['cascade_wall']:>10.4f} {r['ratio_wall']:>6.2f}"
              f" {r['batch'] / r['plain_wall']:>11.1f} {r['batch'] / r['cascade_wall']:>13.1f}"
              f" {_num(r.get('plain_mfu'), '.1%', 9)} {_num(r.get('cascade_mfu'), '.1%', 11)}"
              f" {_num(r.get('cascade_mib_per_image'), '.0f', 8)}  "
              f"{_num(r.get('peak_tflops'), 'g', 0)} TFLOP/s ({r['peak_source']})")
    ok = len(configs) - len(errors)
    print(f"gpu_check {name}: {ok}/{len(configs)} configurations ok, {len(rows)} rows -> {path}"
          + (f"; failed: {'; '.join(e['error'] for e in errors)}" if errors else ""))
    return 0 if not errors else 1


# -- data --------------------------------------------------------------------------------------


def section_data(args: argparse.Namespace) -> int:
    """bench_data.main on the device (Flare7K fakes + procedural), then against step.json."""
    import bench_data

    arch = TOY_ARCH if args.dry_run else FLARE7K_ARCH
    size, synth, batch = (32, 64, 2) if args.dry_run else (args.size, args.synth_size, args.batch)
    argv = ["--devices", _device(args), "--sources", "flare7k", "procedural", "--sizes", str(size),
            "--synth-size", str(synth), "--batch", str(batch),
            "--repeats", str(1 if args.dry_run else args.repeats),
            "--embed-dim", str(arch["embed_dim"]), "--depth", str(arch["depth"]),
            "--fake-flares", str(args.fake_flares)]
    print(f"### bench_data.py {' '.join(argv)}", flush=True)
    rows = bench_data.main(argv)
    vs = _vs_trainer(rows, args.out / "step.json")
    path = _write(args.out, "data", {"section": "data", "rows": rows, "vs_trainer": vs,
                                     "arch": arch})
    if vs:
        print(f"\nagainst the cascade step of step.json (per pair; synthesis runs in the trainer "
              f"between steps, decoding in loader workers):\n{'source':<11}{'precision':>10}"
              f"{'encoder':>14}{'synth pairs/s':>15}{'step pairs/s':>14}{'ratio':>8}"
              f"{'synth share':>13}{'workers':>9}")
        for v in vs:
            print(f"{v['source']:<11}{v['precision']:>10}{v['encoder']:>14}"
                  f"{v['synth_pairs_per_s']:>15.1f}{v['step_pairs_per_s']:>14.1f}{v['ratio']:>7.1f}x"
                  f"{v['synth_share']:>13.1%}{_num(v['workers_needed'], '.2f', 9)}")
    head = next(r for r in rows if r["source"] == "flare7k")
    print(f"gpu_check data: flare7k synthesis on {head['device']} at {head['size']} px (from "
          f"{head['synth_size']} px): {head['synth_pairs_per_s']:.1f} pairs/s vs "
          f"{head['train_pairs_per_s']:.1f} pairs/s of a plain training step "
          f"({head['ratio']:.1f}x), decoding {head['decode_s']:.3f} s/batch of {head['batch']} "
          f"({head['workers_needed']:.2f} loader workers needed); {len(vs)} comparisons with "
          f"step.json -> {path}")
    return 0


def _vs_trainer(rows: list[dict[str, Any]], step_json: Path) -> list[dict[str, Any]]:
    """Each data row against the cascade step rows of the same size in step.json (if any)."""
    if not step_json.is_file():
        return []
    steps = json.loads(step_json.read_text()).get("rows", [])
    out = []
    for d in rows:
        for s in steps:
            if s["size"] != d["size"] or s["device"].split(":")[0] != d["device"]:
                continue
            t_synth = 1 / d["synth_pairs_per_s"]  # s per pair
            t_step = s["cascade_wall"] / s["batch"]
            decode = d["decode_s"] / d["batch"] if d["decode_s"] is not None else None
            out.append({"source": d["source"], "size": d["size"], "precision": s["precision"],
                        "encoder": s["encoder"], "synth_pairs_per_s": d["synth_pairs_per_s"],
                        "step_pairs_per_s": 1 / t_step, "ratio": t_step / t_synth,
                        "synth_share": t_synth / (t_synth + t_step),
                        "workers_needed": decode / (t_synth + t_step) if decode else None})
    return out


# -- eval --------------------------------------------------------------------------------------


def section_eval(args: argparse.Namespace) -> int:
    """predict + evaluate_arrays over n images of size px, as a trial evaluates."""
    import torch
    from bench_metrics import synthetic_items

    from cascade.data.images import write_png
    from cascade.data.testset import PairedTestSet
    from cascade.evaluate import predict
    from cascade.metrics import close_worker_pools, evaluate_arrays, summarize
    from cascade.model import CascadedFlareRemover
    from cascade.uformer import Uformer

    arch = TOY_ARCH if args.dry_run else FLARE7K_ARCH
    n, size = (4, 64) if args.dry_run else (args.n, args.size)
    default = [0] if args.dry_run else [4, os.cpu_count() or 1]
    workers = list(dict.fromkeys(args.workers or default))
    device = torch.device(_device(args))
    result: dict[str, Any] = {"section": "eval", "n": n, "size": size, "arch": arch,
                              "device": str(device), "protocol": args.protocol, "metrics": []}

    def save() -> Path:
        return _write(args.out, "eval", result)

    with tempfile.TemporaryDirectory(prefix="gpu-check-eval-") as tmp:
        t0 = time.perf_counter()
        # bench_metrics' images: smooth backgrounds, glare, streaks, light; its "pred" (gt + flare
        # residue) serves as the flared input here.
        items = synthetic_items(n, size)
        for stem, flared, gt, mask in items:
            for folder, image in (("input", flared), ("gt", gt), ("mask", mask)):
                write_png(Path(tmp) / folder / f"{stem}.png", image)
        testset = PairedTestSet(tmp)  # validates: every file decoded once, as train() does
        result["testset_s"] = time.perf_counter() - t0
        torch.manual_seed(0)
        base = Uformer(img_size=size, embed_dim=arch["embed_dim"], depths=(arch["depth"],) * 9)
        model = CascadedFlareRemover.from_uformer(base).to(device)
        t0 = time.perf_counter()
        next(iter(predict(model, testset, device)))  # first image: CUDA context, cuDNN, kernels
        result["first_image_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        preds = list(predict(model, testset, device))  # to_uint8 copies to the host: synchronous
        result["predict_s"] = time.perf_counter() - t0
        print(f"predict (cascade.evaluate.predict, {device}, fp32): {n} images {size} px in "
              f"{result['predict_s']:.2f} s ({1e3 * result['predict_s'] / n:.1f} ms/image; first "
              f"image {result['first_image_s']:.2f} s); test set written + validated in "
              f"{result['testset_s']:.1f} s", flush=True)
        save()
        for w in workers:
            t0 = time.perf_counter()
            if w > 1:
                evaluate_arrays(preds[: max(2, w)], protocol=args.protocol, workers=w)
            pool_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            df = evaluate_arrays(preds, protocol=args.protocol, workers=w)
            metrics_s = time.perf_counter() - t0
            close_worker_pools()
            n_images = summarize(df)["n_images"]
            result["metrics"].append({"workers": w, "pool_start_s": pool_s, "metrics_s": metrics_s,
                                      "n_images": n_images,
                                      "eval_s": result["predict_s"] + metrics_s})
            print(f"metrics ({args.protocol}, {w} workers): {metrics_s:.2f} s for {n_images} images "
                  f"(+ pool start-up {pool_s:.2f} s, once per trial process)", flush=True)
            save()
    m = result["metrics"]
    path = save()
    print(f"gpu_check eval: {n} images {size} px: predict {result['predict_s']:.2f} s on {device}, "
          + ", ".join(f"metrics {x['metrics_s']:.2f} s with {x['workers']} workers" for x in m)
          + f" -> {path}")
    return 0 if all(x["n_images"] == n for x in m) else 1


# -- sweep -------------------------------------------------------------------------------------


def _tiny_fixed(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """TrialConfig fields of a trial that takes seconds: the demo's tiny model, few steps."""
    return {"encoder": "small_cpu", "encoder_pretrained": False, **TOY_ARCH,
            "base_steps": 2 if args.dry_run else 20, "base_lr": 2.0e-3, "crop": 32 if args.dry_run else 64,
            "batch_size": 4, "steps": 4 if args.dry_run else args.steps, "lr": 1.0e-2, "n_test": 2,
            "test_size": 32 if args.dry_run else 64, "num_workers": 0, "eval_workers": 0,
            "n_samples": 1, "log_every": 2 if args.dry_run else 20,
            "checkpoint_every": 2 if args.dry_run else 50, "base_cache": str(tmp / "cache")}


@contextlib.contextmanager
def _child(cmd: list[str]) -> Iterator[subprocess.Popen]:
    """Run `cmd` from the repository root in its own session; on any exit (SIGTERM included)
    interrupt it (SIGINT: Ray Tune stops its trials and shuts down), then kill what is left."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _gpu_processes() -> list[tuple[int, float]] | None:
    """(pid, used MiB) of every process holding a CUDA context (None: nvidia-smi unavailable)."""
    text = _nvidia_smi("--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits")
    if text is None:
        return None
    procs = []
    for line in text.strip().splitlines():
        pid, _, mib = line.partition(",")
        with contextlib.suppress(ValueError):
            procs.append((int(pid), float(mib)))
    return procs


def section_sweep(args: argparse.Namespace) -> int:
    """2 tiny trials through `sweep.py run` with resources {cpu: 2, gpu: 0.5}, device auto."""
    import yaml

    from orchestrator.record import SweepRecord

    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-sweep-"))
    gpu = 0 if args.dry_run else 0.5
    space = {"name": SWEEP_NAME, "grid": {"k": [1], "lambda_": [1.0, 0.5]},
             "fixed": {**_tiny_fixed(tmp, args), "device": "auto"}, "reference": False,
             "seeds": [0], "resources": {"cpu": 1 if args.dry_run else 2, "gpu": gpu},
             "max_concurrent": 2, "max_failures": 0}
    space_path = tmp / "space.yaml"
    space_path.write_text(f"# bench/gpu_check.py: two tiny trials sharing one GPU (gpu: {gpu} "
                          "each), device auto.\n" + yaml.safe_dump(space, sort_keys=False))
    results = tmp / "results"
    cmd = [sys.executable, str(ROOT / "sweep.py"), "run", "--space", str(space_path),
           "--results", str(results)]
    print(f"### {' '.join(cmd)}\n{space_path.read_text()}", flush=True)
    samples: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    try:
        with _child(cmd) as proc:
            while proc.poll() is None:
                procs = None if args.dry_run else _gpu_processes()
                if procs is not None:  # the driver holds a context too (it built the base)
                    trials = [p for p in procs if p[0] != proc.pid]
                    samples.append({"t": time.perf_counter() - t0, "trial_processes": len(trials),
                                    "trial_mib": sum(m for _, m in trials)})
                    if len(samples) % 5 == 0:  # kept if the section is killed mid-sweep
                        _write(args.out, "sweep", {"section": "sweep", "running": True,
                                                   "space": space, "nvidia_smi_samples": samples})
                time.sleep(1.0)
            rc = proc.returncode
        wall = time.perf_counter() - t0
        record = SweepRecord(results / SWEEP_NAME)
        trials = []
        keys = record.plan_keys()
        for (tid, eid), status in zip(keys, record.statuses(keys)):
            metrics = record.read_metrics(tid, eid) or {}
            entry = {"trial_id": tid, "state": status.state, "error": status.error,
                     **{k: metrics.get(k) for k in ("device", "steps", "wall_s", "train_s",
                                                    "eval_s", "images_per_s", "psnr_entire")}}
            end = record.finished_at(tid, eid)
            if metrics and end is not None:  # [end - wall_s, end]: when the trial ran
                entry["end"] = end
                entry["start"] = end - float(metrics["wall_s"])
            trials.append(entry)
        spans = [(t["start"], t["end"]) for t in trials if "start" in t]
        overlap = (max(0.0, min(e for _, e in spans) - max(s for s, _ in spans))
                   if len(spans) == 2 else None)
        most = max((s["trial_processes"] for s in samples), default=None)
        result = {"section": "sweep", "rc": rc, "wall_s": wall, "space": space, "trials": trials,
                  "overlap_s": overlap, "max_trial_processes_on_gpu": most,
                  "peak_trial_mib": max((s["trial_mib"] for s in samples), default=None),
                  "nvidia_smi_samples": samples}
        path = _write(args.out, "sweep", result)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    done = [t for t in trials if t["state"] == "done"]
    devices = sorted({str(t["device"]) for t in done})
    print(f"gpu_check sweep: {len(done)}/{len(trials)} trials done (rc {rc}) on "
          f"{', '.join(devices) or '-'} in {wall:.0f} s; trials overlapped "
          f"{_num(overlap, '.1f', 0)} s; at most {_num(most, 'd', 0)} trial processes on the GPU "
          "at once (nvidia-smi)" + "".join(f"; {t['trial_id']}: {t['error']}" for t in trials
                                          if t["error"]) + f" -> {path}")
    return 0 if rc == 0 and len(done) == 2 else 1


# -- ddp ---------------------------------------------------------------------------------------


def section_ddp(args: argparse.Namespace) -> int:
    """One 2-worker DDP trial (`python -m cascade.train`) when 2 GPUs exist; else skipped."""
    import torch
    import yaml

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not args.dry_run and gpus < 2:
        path = _write(args.out, "ddp", {"section": "ddp", "skipped": f"{gpus} CUDA device(s)"})
        print(f"gpu_check ddp: skipped ({gpus} CUDA device(s); a 2-worker DDP trial needs 2) -> {path}")
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-ddp-"))
    try:
        cfg = {**_tiny_fixed(tmp, args), "kind": "cascade", "k": 1, "lambda_": 0.5,
               "device": _device(args), "backend": "ddp", "workers": 2}
        (tmp / "trial.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        cmd = [sys.executable, "-m", "cascade.train", "--config", str(tmp / "trial.yaml"),
               "--output-dir", str(tmp / "out")]
        print(f"### {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        with _child(cmd) as proc:
            rc = proc.wait()
        wall = time.perf_counter() - t0
        metrics_path = tmp / "out" / "metrics.json"  # cascade.train's own output folder
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        keep = ("device", "backend", "workers", "steps", "train_s", "images_per_s", "psnr_entire")
        path = _write(args.out, "ddp", {"section": "ddp", "rc": rc, "wall_s": wall, "config": cfg,
                                        **{k: metrics.get(k) for k in keep}})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"gpu_check ddp: rc {rc}, {metrics.get('workers')} {metrics.get('backend')} workers on "
          f"{metrics.get('device')}: {metrics.get('steps')} steps, "
          f"{_num(metrics.get('images_per_s'), '.1f', 0)} images/s, {wall:.0f} s -> {path}")
    return 0 if rc == 0 and metrics else 1


# -- command line ------------------------------------------------------------------------------

SECTIONS: dict[str, Callable[[argparse.Namespace], int]] = {
    "env": section_env, "step": section_step, "compile": section_step, "data": section_data,
    "eval": section_eval, "sweep": section_sweep, "ddp": section_ddp,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench/gpu_check.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="section", required=True, metavar="{" + ",".join(SECTIONS) + "}")

    def section(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="output folder")
        p.add_argument("--dry-run", action="store_true",
                       help="the CPU at toy sizes: checks the script, measures nothing")
        return p

    section("env", "CUDA devices, peaks, versions; exit 2 without CUDA")
    for name, sizes, batches, precisions in (("step", [128, 512], [8, 2], ["fp32", "bf16"]),
                                             ("compile", [128], [8], ["bf16"])):
        p = section(name, f"bench_step over sizes x precisions{' with torch.compile' * (name == 'compile')}")
        p.add_argument("--sizes", type=int, nargs="+", default=sizes)
        p.add_argument("--batches", type=int, nargs="+", default=batches, help="one per --sizes")
        p.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=precisions)
        p.add_argument("--encoders", nargs="+", default=["vit_l16_swag"])
        p.add_argument("--repeats", type=int, default=5)
        p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=name == "step",
                       help="the per-phase profile of the first configuration (default: step only)")
        p.set_defaults(compile=name == "compile")
    p = section("data", "pair synthesis on the device vs the training step")
    p.add_argument("--size", type=int, default=128, help="training crop (table1: 128)")
    p.add_argument("--synth-size", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--fake-flares", type=int, default=2, help="fake files per Flare7K folder")
    p = section("eval", "predict + metrics of n test images")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="metric processes, one run each (default: 4 as table1.yaml, and every core)")
    p.add_argument("--protocol", default="masked")
    p = section("sweep", "2 trials sharing one GPU through sweep.py run")
    p.add_argument("--steps", type=int, default=100)
    section("ddp", "a 2-worker DDP trial when 2 GPUs exist")
    return parser


def main(argv: list[str] | None = None) -> int:
    from cascade.errors import cli_errors

    args = build_parser().parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return cli_errors(SECTIONS[args.section])(args)
    except Terminated:
        print(f"gpu_check {args.section}: terminated (time limit); what it measured is in "
              f"{args.out}", flush=True)
        sys.stderr.flush()
        # No interpreter shutdown: atexit hooks (inductor's compile workers, the metric pool) can
        # wait on processes the same signal is stopping. Results are already on disk, atomically.
        os._exit(124)


if __name__ == "__main__":
    sys.exit(main())
