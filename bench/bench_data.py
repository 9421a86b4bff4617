"""Benchmark the training-pair data path against the rate a Uformer consumes it.

    python bench/bench_data.py [--sizes 64 128 256] [--batch 8] [--repeats 5] [--threads 1]
        [--devices cpu cuda] [--sources procedural flare7k] [--synth-size 512]
        [--data DIR --backgrounds DIR] [--embed-dim 8] [--depth 1]

For each source, image side S and device (CPU, and CUDA when available) it prints, side by side:
- synthesis: a batch of `--batch` fresh indices, pairs/s (wall), CPU-seconds per batch (process
  time, which a loaded machine inflates much less than wall time), and the first call (which
  builds banks and caches) separately. Sources:
  - `procedural`: `cascade.data.synthetic.ProceduralPairs(S, seed).batch(indices, device)`;
  - `flare7k`: `cascade.data.flare7k.Flare7KPairs(root, backgrounds, crop=S, synth_size=512)`
    as the trainer builds it: only the batched on-device `synthesize` is timed here, since the
    trainer decodes files in `num_workers` loader processes; the decoding (`decode`, CPU, one
    process, flare cache off as for a real set of thousands of flares) is timed apart, and
    `workers` = decode s / (synthesis s + training step s) is how many loader processes keep up.
    The files are a fake Flare7K++ tree made here at Flare7K's sizes (`fake_flare7k`: 1440 px
    PNG flares whatever `--synth-size`, 1000 x 750 JPEG backgrounds) unless `--data/--backgrounds`
    name real ones;
- consumption: one training step of `Uformer(img_size=S, embed_dim, depths=(depth,)*9)` (default
  the tiny embed_dim 8, depth 1; Flare7K's is 32, 2) (forward, L1 loss on the deflared channels,
  backward, AdamW step) on a batch of the same size: pairs/s (wall);
- ratio = synthesis pairs/s / consumption pairs/s. Above 1 the trainer never waits on data
  (synthesis in the training process itself); below 1 it does.
Times are the median of `--repeats` runs after one warm-up. The load average is printed, since
wall times on a shared machine depend on it. `main(argv)` returns one dict per printed row.
Not a timed test: CI runs it once with `--sizes 32 --repeats 1`.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _timing import timed
from PIL import Image

from cascade.data.images import write_png
from cascade.data.synthetic import ProceduralPairs
from cascade.uformer import Uformer

SOURCES = ("procedural", "flare7k")
FLARE7K_CROP, FLARE7K_FLARE = 512, 1440  # Flare7K: 512 px crops of 1440 px flare images
BACKGROUND_HW = (750, 1000)  # fake backgrounds (Flickr24K photos are of this order)


def fake_flare7k(root: Path, flare_side: int, n: int = 4, background_hw: tuple[int, int] = BACKGROUND_HW,
                 seed: int = 0) -> tuple[Path, Path]:
    """Write a fake Flare7K++ tree under `root`; returns (data root, backgrounds folder).

    `n` compound flares with light sources in Flare7K/Scattering_Flare and in Flare-R, `n`
    reflective flares: (flare_side, flare_side, 3) PNGs, mostly dark with a noisy glow and a
    streak, as real flares are (PNG decoding cost depends on the content); `n` JPEG backgrounds of
    `background_hw`. Only the sizes and formats are Flare7K's: good for timing, not for training.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:flare_side, :flare_side] / flare_side - 0.5  # [-0.5, 0.5)
    data, bgs = root / "Flare7Kpp", root / "Flickr24K"

    def glow(radius: float, level: float) -> np.ndarray:
        r2 = (yy - rng.uniform(-0.1, 0.1)) ** 2 + (xx - rng.uniform(-0.1, 0.1)) ** 2
        v = level * np.exp(-r2 / (2 * radius**2))[..., None] * rng.uniform(0.6, 1.0, 3)
        return v

    for i in range(n):
        for subset in ("Flare7K/Scattering_Flare", "Flare-R"):
            streak = 120 * np.exp(-np.abs(yy * math.cos(i) - xx * math.sin(i)) / 0.004)[..., None]
            flare = glow(0.12, 255) + streak + rng.normal(0, 3, (flare_side, flare_side, 3))
            write_png(data / subset / "Compound_Flare" / f"{i:04d}.png",
                      flare.clip(0, 255).astype(np.uint8))
            write_png(data / subset / "Light_Source" / f"{i:04d}.png",
                      glow(0.02, 255).clip(0, 255).astype(np.uint8))
        write_png(data / "Flare7K/Reflective_Flare" / f"{i:04d}.png",
                  (glow(0.05, 60) + rng.normal(0, 2, (flare_side, flare_side, 3))).clip(0, 255)
                  .astype(np.uint8))
        bgs.mkdir(parents=True, exist_ok=True)
        h, w = background_hw
        photo = rng.uniform(0, 255, (h // 8, w // 8, 3)).astype(np.uint8)  # smooth, photo-like
        Image.fromarray(photo).resize((w, h), Image.Resampling.BICUBIC).save(
            bgs / f"{i:04d}.jpg", quality=90)
    return data, bgs


def make_pairs(source: str, size: int, synth_size: int, files: tuple[Path, Path] | None,
               seed: int = 0) -> Any:
    """The training-pair object of `source` at crop `size` (Flare7K: synthesised at synth_size)."""
    if source == "procedural":
        return ProceduralPairs(size, seed)
    from cascade.data.flare7k import Flare7KPairs

    # cache_size=0: with thousands of real flares nearly every read misses a 256-entry cache.
    return Flare7KPairs(files[0], files[1], crop=size, seed=seed,
                        synth_size=max(size, synth_size), cache_size=0)


def time_synthesis(pairs: Any, batch: int, repeats: int, device: torch.device) -> dict[str, float]:
    """Medians of wall and CPU seconds per batch, the first call's, and for Flare7K the decoding.

    Flare7K: `synthesize` (the device side) alone is "wall"/"cpu"; `decode` of the batch's files
    (the CPU side, run by the trainer's loader workers) is "decode_wall"/"decode_cpu".
    """
    first_wall, first_cpu = timed(lambda: pairs.batch(list(range(batch)), device), device)
    split = hasattr(pairs, "decode")
    walls, cpus, dwalls, dcpus = [], [], [], []
    for r in range(1, repeats + 1):
        idx = list(range(r * batch, (r + 1) * batch))  # fresh samples each run
        if split:
            w0, c0 = time.perf_counter(), time.process_time()
            raw = [pairs.decode(i) for i in idx]
            dwalls.append(time.perf_counter() - w0)
            dcpus.append(time.process_time() - c0)
            wall, cpu = timed(lambda raw=raw: pairs.synthesize(raw, device), device)
        else:
            wall, cpu = timed(lambda idx=idx: pairs.batch(idx, device), device)
        walls.append(wall)
        cpus.append(cpu)
    out = {"wall": statistics.median(walls), "cpu": statistics.median(cpus),
           "first_wall": first_wall, "first_cpu": first_cpu}
    if split:
        out |= {"decode_wall": statistics.median(dwalls), "decode_cpu": statistics.median(dcpus)}
    return out


def time_training_step(size: int, batch: int, repeats: int, device: torch.device,
                       embed_dim: int = 8, depth: int = 1) -> float:
    """Median wall seconds of one Uformer training step on (batch, 3, size, size)."""
    torch.manual_seed(0)
    model = Uformer(img_size=size, embed_dim=embed_dim, depths=(depth,) * 9).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, size, size, device=device)
    target = torch.rand(batch, 3, size, size, device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.l1_loss(model(x)[:, :3], target)
        loss.backward()
        opt.step()

    step()  # warm-up: allocator, kernels
    walls = [timed(step, device)[0] for _ in range(repeats)]
    return statistics.median(walls)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256],
                        help="image sides (Flare7K: the crop)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 makes runs comparable on a shared machine)")
    parser.add_argument("--devices", nargs="+", default=None,
                        help="default: cpu, plus cuda when available")
    parser.add_argument("--sources", nargs="+", choices=SOURCES, default=["procedural"])
    parser.add_argument("--synth-size", type=int, default=FLARE7K_CROP,
                        help="flare7k: side of the synthesised image before the crop (default 512)")
    parser.add_argument("--data", type=Path, help="flare7k: a real Flare7K(++) root instead of fakes")
    parser.add_argument("--backgrounds", type=Path, help="flare7k: real backgrounds (with --data)")
    parser.add_argument("--fake-flares", type=int, default=4, help="flare7k: fake files per folder")
    parser.add_argument("--embed-dim", type=int, default=8, help="consuming Uformer (Flare7K: 32)")
    parser.add_argument("--depth", type=int, default=1, help="consuming Uformer (Flare7K: 2)")
    args = parser.parse_args(argv)
    if (args.data is None) != (args.backgrounds is None):
        parser.error("--data and --backgrounds go together")
    torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])

    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} cores, "
          f"load average {load:.1f}; batch {args.batch}, median of {args.repeats}; consuming "
          f"Uformer embed_dim={args.embed_dim} depths=({args.depth},)*9")
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        for source in args.sources:
            files = None
            if source == "flare7k":
                files = (args.data, args.backgrounds) if args.data else None
                what = f"real files {args.data}, {args.backgrounds}"
                if files is None:
                    # Flare7K's flare files are 1440 px; Flare7KPairs itself resizes every file by
                    # synth_size / 512, so the fakes have the real files' size whatever --synth-size.
                    side = FLARE7K_FLARE
                    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-data-")))
                    t0 = time.perf_counter()
                    files = fake_flare7k(tmp, side, n=args.fake_flares)
                    what = (f"fake Flare7K++ tree ({args.fake_flares} files per folder, {side} px PNG "
                            f"flares, {BACKGROUND_HW[1]}x{BACKGROUND_HW[0]} JPEG backgrounds, written "
                            f"in {time.perf_counter() - t0:.1f} s)")
                print(f"\nsource flare7k: Flare7KPairs, synthesised at {args.synth_size} px then "
                      f"cropped, flare cache off; {what}. synth = on-device synthesize() only; "
                      "decode = the loader workers' share, one process")
            else:
                print("\nsource procedural: ProceduralPairs.batch (synthesis, no files)")
            rows += _bench_source(source, files, devices, args)
    return rows


def _bench_source(source: str, files: tuple[Path, Path] | None, devices: list[str],
                  args: argparse.Namespace) -> list[dict[str, Any]]:
    header = (f"{'device':6} {'size':>5} | {'synth pairs/s':>13} {'CPU s/batch':>11} "
              f"{'first call s':>12} | {'decode s/batch':>14} {'workers':>7} | "
              f"{'train pairs/s':>13} | {'synth/train':>11}")
    print(header)
    print("-" * len(header))
    rows = []
    for name in devices:
        device = torch.device(name)
        for size in args.sizes:
            pairs = make_pairs(source, size, args.synth_size, files)
            synth = time_synthesis(pairs, args.batch, args.repeats, device)
            step = time_training_step(size, args.batch, args.repeats, device,
                                      args.embed_dim, args.depth)
            synth_rate, train_rate = args.batch / synth["wall"], args.batch / step
            decode = synth.get("decode_wall")
            # Loader processes needed: each decodes a batch while the trainer synthesises + steps.
            workers = decode / (synth["wall"] + step) if decode is not None else None
            print(f"{name:6} {size:>5} | {synth_rate:>13.1f} {synth['cpu']:>11.4f} "
                  f"{synth['first_wall']:>12.2f} | "
                  f"{'-' if decode is None else format(decode, '.4f'):>14} "
                  f"{'-' if workers is None else format(workers, '.2f'):>7} | {train_rate:>13.1f} | "
                  f"{synth_rate / train_rate:>10.1f}x")
            rows.append({"source": source, "device": name, "size": size,
                         "synth_size": max(size, args.synth_size) if source == "flare7k" else size,
                         "batch": args.batch, "synth_pairs_per_s": synth_rate,
                         "synth_cpu_s": synth["cpu"], "first_call_s": synth["first_wall"],
                         "decode_s": decode, "decode_cpu_s": synth.get("decode_cpu"),
                         "workers_needed": workers, "train_step_s": step,
                         "train_pairs_per_s": train_rate, "ratio": synth_rate / train_rate,
                         "embed_dim": args.embed_dim, "depth": args.depth})
    return rows


if __name__ == "__main__":
    main()
