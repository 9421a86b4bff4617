"""Benchmark the procedural data path against the rate a tiny Uformer consumes it.

    python bench/bench_data.py [--sizes 64 128 256] [--batch 8] [--repeats 5] [--threads 1]

For each image side S and device (CPU, and CUDA when available) it prints, side by side:
- synthesis: `cascade.data.synthetic.ProceduralPairs(S, seed).batch(indices, device)` for a batch
  of `--batch` fresh indices: pairs/s (wall), and CPU-seconds per batch (process time, which a
  loaded machine inflates much less than wall time); the first call, which builds the PSF, scene
  and noise banks once per object, is reported separately;
- consumption: one training step of `Uformer(img_size=S, embed_dim=8, depths=(1,)*9)`
  (forward, L1 loss on the deflared channels, backward, AdamW step) on a batch of the same size:
  pairs/s (wall);
- ratio = synthesis pairs/s / consumption pairs/s. Above 1 the trainer never waits on data
  (synthesis in the training process itself, no workers); below 1 it does.
Times are the median of `--repeats` runs after one warm-up. The load average is printed, since
wall times on a shared machine depend on it. Not a timed test: CI runs it once with
`--sizes 32 --repeats 1`.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.nn.functional as F
from _timing import timed

from cascade.data.synthetic import ProceduralPairs
from cascade.uformer import Uformer


def time_synthesis(size: int, batch: int, repeats: int, device: torch.device,
                   seed: int = 0) -> dict[str, float]:
    """Wall and CPU seconds per batch (medians), and the first call's (bank building) seconds."""
    pairs = ProceduralPairs(size, seed)
    first_wall, first_cpu = timed(lambda: pairs.batch(list(range(batch)), device), device)
    walls, cpus = [], []
    for r in range(1, repeats + 1):
        idx = list(range(r * batch, (r + 1) * batch))  # fresh samples each run
        wall, cpu = timed(lambda idx=idx: pairs.batch(idx, device), device)
        walls.append(wall)
        cpus.append(cpu)
    return {"wall": statistics.median(walls), "cpu": statistics.median(cpus),
            "first_wall": first_wall, "first_cpu": first_cpu}


def time_training_step(size: int, batch: int, repeats: int, device: torch.device) -> float:
    """Median wall seconds of one tiny-Uformer training step on (batch, 3, size, size)."""
    torch.manual_seed(0)
    model = Uformer(img_size=size, embed_dim=8, depths=(1,) * 9).to(device)
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 makes runs comparable on a shared machine)")
    parser.add_argument("--devices", nargs="+", default=None,
                        help="default: cpu, plus cuda when available")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])

    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} cores, "
          f"load average {load:.1f}; batch {args.batch}, median of {args.repeats}")
    header = (f"{'device':6} {'size':>5} | {'synth pairs/s':>13} {'CPU s/batch':>11} "
              f"{'first call s':>12} | {'train pairs/s':>13} | {'synth/train':>11}")
    print(header)
    print("-" * len(header))
    for name in devices:
        device = torch.device(name)
        for size in args.sizes:
            synth = time_synthesis(size, args.batch, args.repeats, device)
            step = time_training_step(size, args.batch, args.repeats, device)
            synth_rate, train_rate = args.batch / synth["wall"], args.batch / step
            print(f"{name:6} {size:>5} | {synth_rate:>13.1f} {synth['cpu']:>11.4f} "
                  f"{synth['first_wall']:>12.2f} | {train_rate:>13.1f} | "
                  f"{synth_rate / train_rate:>10.1f}x")


if __name__ == "__main__":
    main()
