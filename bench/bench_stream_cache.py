"""Benchmark the stream cache (cascade.stream_cache): a sweep with it against the same sweep without.

    python bench/bench_stream_cache.py [--what flops time] [--space search_spaces/table1.yaml]
        [--set KEY=VALUE ...] [--embed-dim 32] [--depth 2] [--eval-size 512] [--n-eval 100]
        [--cells 8] [--steps 10] [--crop 64] [--batch 4] [--encoder small_cpu] [--flare-side 1440]

(a) `flops`: counted FLOPs of a whole sweep, cache off vs on. The cells are the space's grid
(k x lambda_, lambda_ = 0 once: its k does not matter, orchestrator.space.LAMBDA0_K) with its
fixed settings (default: the paper's table1.yaml: 11 cascade cells + the reference, ViT-L/16 at
128 px crops, batch 8, 1000 steps, delta 0.001) and `--set` overrides; the Uformer is
Flare7K-size (`--embed-dim 32 --depth 2`, random init: no weights are needed to count). One step
of each kind is counted with `torch.utils.flop_counter.FlopCounterMode` (2 FLOPs per multiply-add)
on fake tensors (nothing is computed) at batch `--count-batch` and scaled to the batch:
- frozen: the negative's forward N, and the target pass T of the cell's `target_kind` (f(p) and
  f(n), 2 images per sample, for lambda_ < 1; f(p), 1, for lambda_ = 1), as the trainer runs them
  (`cascade.stream_cache.FrozenHalf`);
- rest: the anchor's forward, f(anchor), the loss and the backward (`CascadeLoss` given the
  targets), what every cell computes either way.
Off, every cell computes N + T + rest each step; on, every cell computes rest, and each stream
computes N once and T once per target kind present. Evaluation (`--n-eval` images at
`--eval-size`: negative + anchor for a cascade cell, one Uformer for the reference) is added to
both sides. FlopCounterMode counts nothing for two CPU kernels the step uses: the fused CPU
attention (`_scaled_dot_product_flash_attention_for_cpu` and its backward, registered here with
torch's own SDPA formulas) and torch's fused MultiheadAttention inference path (switched off while
counting, so ViT's attention goes through the counted ops): without both, ViT-L's forward
counts 79 instead of 123 GFLOP at 224 px.

(b) `time`: CPU time of an `--cells`-cell grid (k in {1, 2} x lambda_ in {1.0, 0.8, 0.4, 0.2},
delta 0.001: 2 cells with f(p) only, as the paper's grid has) of `--steps` steps, on a fake
Flare7K++ tree (bench_data.fake_flare7k: 1440 px PNG flares, 1000 x 750 JPEG backgrounds,
synthesised at 512 px as the official loader does, then cropped), the procedural base and a small
encoder (`--encoder`, random weights). Each cell is trained with the real `cascade.train.train`
twice, cache off then on, interleaved cell by cell in one process (one torch thread, loader
workers 0, so every decoded file is charged to this process's CPU time); the cache starts empty,
so the first cell's "on" run builds it. Base network and test set are built before timing. Every
cell's results (final loss terms, PSNR/SSIM, d(p, n)) must be equal on both sides, else exit 1.
Printed per side: CPU seconds (process time; every trial's set-up and evaluation included),
training wall seconds (train()'s own `train_s`), steps built and read; then the on/off ratios and
the size of the shards written.

Result lines (tests/test_bench.py checks them):
    flops sweep: off <T> TFLOP, on <T> TFLOP, on/off <r>x (<n> cells)
    time grid: off <s> CPU-s, on <s> CPU-s, on/off <r>x (<n> cells, results identical)
Not a timed test: CI runs both at a toy size once.
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
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from cascade.config import TrialConfig
from cascade.io import parse_yaml
from cascade.losses import CascadeLoss, target_kind

ROOT = Path(__file__).resolve().parents[1]
SAME = ("final_loss", "final_reg", "final_perceptual", "final_triplet", "psnr_entire",
        "psnr_streak", "psnr_glare", "ssim_entire", "d_pn")
TIME_GRID = [(k, lam) for lam in (1.0, 0.8, 0.4, 0.2) for k in (1, 2)]


# -- (a) counted FLOPs --------------------------------------------------------------------------------


def _cpu_flash(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(q, k, v)


def _cpu_flash_backward(grad_out: Any, q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None,
                        **kwargs: Any) -> int:
    return sdpa_backward_flop_count(grad_out, q, k, v)


@contextlib.contextmanager
def counting() -> Iterator[FlopCounterMode]:
    """FlopCounterMode that also counts the CPU's fused attention (see the module docstring)."""
    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False, custom_mapping=mapping) as fc:
            yield fc
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def space_cells(path: Path, overrides: list[str]) -> tuple[list[TrialConfig], bool]:
    """The distinct cascade cells of a space's grid (first seed) and whether it has a reference."""
    from orchestrator.space import LAMBDA0_K

    raw = parse_yaml(path.read_text())
    fixed = dict(raw.get("fixed", {}))
    for item in overrides:
        key, _, value = item.partition("=")
        fixed[key] = parse_yaml(value)
    fixed = {k: v for k, v in fixed.items() if k in TrialConfig.__dataclass_fields__}
    grid = raw.get("grid", {})
    cells: dict[tuple, TrialConfig] = {}
    for k in grid.get("k", [fixed.get("k", 2)]):
        for lam in grid.get("lambda_", [fixed.get("lambda_", 0.6)]):
            values = {**fixed, "k": LAMBDA0_K if lam == 0 else k, "lambda_": lam,
                      "seed": (raw.get("seeds") or [0])[0], "checkpoint": None, "base_kind": None,
                      "data": None, "backgrounds": None}
            cfg = TrialConfig.from_dict(values)
            cells[(cfg.k, cfg.lambda_)] = cfg
    return list(cells.values()), bool(raw.get("reference"))


def count_flops(cells: list[TrialConfig], reference: bool, embed_dim: int, depth: int,
                eval_size: int, n_eval: int, count_batch: int) -> dict[str, Any]:
    """Counted FLOPs of the sweep, off and on (see the module docstring)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from cascade.encoders import build_encoder
    from cascade.stream_cache import FrozenHalf
    from cascade.uformer import Uformer

    first = cells[0]
    crop, batch, steps = first.crop, first.batch_size, first.steps
    assert all((c.crop, c.batch_size, c.steps, c.encoder, c.seed) ==
               (crop, batch, steps, first.encoder, first.seed) for c in cells), "one stream"
    torch.manual_seed(0)
    negative = Uformer(img_size=crop, embed_dim=embed_dim, depths=(depth,) * 9).eval()
    anchor = Uformer(img_size=crop, embed_dim=embed_dim, depths=(depth,) * 9).train()
    encoder = build_encoder(first.encoder, False, features=first.encoder_features)
    per_image: dict[str, float] = {}
    with FakeTensorMode(allow_non_fake_inputs=True):  # real modules, fake activations: no compute
        x, gt = torch.rand(count_batch, 3, crop, crop), torch.rand(count_batch, 3, crop, crop)
        for kind in ("pn", "p", None):
            lam, delta = {"pn": (0.6, 1e-3), "p": (1.0, 1e-3), None: (1.0, 0.0)}[kind]
            loss = CascadeLoss(encoder if kind else None, 2, lam, delta)
            frozen = FrozenHalf(negative, loss, bf16=False, channels_last=False)
            with counting() as fc:
                with torch.no_grad():
                    neg = negative(x)[:, :3]
            per_image["N"] = fc.get_total_flops() / count_batch
            with counting() as fc:
                targets = frozen.targets(gt, neg)
            per_image[f"T_{kind}"] = fc.get_total_flops() / count_batch
            with counting() as fc:
                anc = anchor(neg)[:, :3]
                loss(anc.float(), gt, neg.float(), targets).total.backward()
            per_image[f"rest_{kind}"] = fc.get_total_flops() / count_batch
            anchor.zero_grad(set_to_none=True)
        with counting() as fc, torch.no_grad():
            negative(torch.rand(1, 3, eval_size, eval_size))
        per_image["eval"] = fc.get_total_flops()  # one Uformer forward of one test image
    kinds = [target_kind(c.lambda_, c.delta) for c in cells]
    images = steps * batch
    evaluation = n_eval * per_image["eval"] * (2 * len(cells) + (1 if reference else 0))
    off = sum(images * (per_image["N"] + per_image[f"T_{k}"] + per_image[f"rest_{k}"])
              for k in kinds) + evaluation
    on = (sum(images * per_image[f"rest_{k}"] for k in kinds)
          + images * (per_image["N"] + sum(per_image[f"T_{k}"] for k in set(kinds))) + evaluation)
    return {"per_image": per_image, "kinds": kinds, "off": off, "on": on, "eval": evaluation,
            "images": images, "cells": len(cells) + (1 if reference else 0)}


def print_flops(r: dict[str, Any], cells: list[TrialConfig], embed_dim: int, depth: int,
                eval_size: int, n_eval: int) -> None:
    c, g = cells[0], 1e9
    print(f"(a) counted FLOPs: {r['cells']} cells ({len(cells)} cascade: "
          f"{r['kinds'].count('pn')} with f(p), f(n); {r['kinds'].count('p')} with f(p) only; "
          f"{r['kinds'].count(None)} without encoder), Uformer embed_dim {embed_dim} depth {depth}, "
          f"encoder {c.encoder} ({c.encoder_features}), crop {c.crop}, batch {c.batch_size}, "
          f"{c.steps} steps, evaluation {n_eval} images at {eval_size} px")
    p = r["per_image"]
    print(f"per training image, GFLOP: negative fwd N {p['N'] / g:.2f} | targets f(p), f(n) "
          f"{p['T_pn'] / g:.2f} | f(p) {p['T_p'] / g:.2f} | rest (anchor fwd, f(anchor), loss, "
          f"backward) {p['rest_pn'] / g:.2f} (pn), {p['rest_p'] / g:.2f} (p), "
          f"{p['rest_None'] / g:.2f} (no encoder)")
    print(f"per cascade step of a triplet cell: off {(p['N'] + p['T_pn'] + p['rest_pn']) / g:.1f}, "
          f"on {p['rest_pn'] / g:.1f} GFLOP per image "
          f"({p['rest_pn'] / (p['N'] + p['T_pn'] + p['rest_pn']):.3f}x); evaluation "
          f"{r['eval'] / 1e12:.1f} TFLOP per sweep (both sides)")
    print(f"flops sweep: off {r['off'] / 1e12:.4g} TFLOP, on {r['on'] / 1e12:.4g} TFLOP, "
          f"on/off {r['on'] / r['off']:.3f}x ({r['cells']} cells)")


# -- (b) measured CPU time ------------------------------------------------------------------------------


def time_grid(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Both sides of the `--cells` grid, interleaved cell by cell (see the module docstring)."""
    from bench_data import fake_flare7k

    from cascade.data import synthetic
    from cascade.data.testset import ensure_test_data
    from cascade.pretrain import ensure_base
    from cascade.train import train

    data, backgrounds = fake_flare7k(work / "files", args.flare_side, n=args.fake_flares)
    synthetic.generate_dataset(data / "test_data" / "real", n=args.n_test, size=args.test_size, seed=0)
    base = dict(embed_dim=args.embed_dim, depth=args.depth, base_steps=args.base_steps, base_lr=2e-3,
                crop=args.crop, batch_size=args.batch, steps=args.steps, lr=1e-2, delta=1e-3,
                encoder=args.encoder, encoder_pretrained=False, test_size=args.test_size,
                data=str(data), backgrounds=str(backgrounds), num_workers=0, eval_workers=0,
                n_samples=0, log_every=args.steps, checkpoint_every=args.steps,
                base_cache=str(work / "cache"), stream_cache_dir=str(work / "stream"))
    cells = [TrialConfig.from_dict({**base, "k": k, "lambda_": lam})
             for k, lam in TIME_GRID[: args.cells]]
    ensure_base(cells[0])
    ensure_test_data(cells[0])
    sides: dict[str, dict[str, list]] = {s: {"cpu": [], "wall": [], "train": [], "results": []}
                                        for s in ("off", "on")}
    load0 = os.getloadavg()
    for i, cfg in enumerate(cells):
        for side in ("off", "on"):
            c0, w0 = time.process_time(), time.perf_counter()
            result = train(cfg.replace(stream_cache=side == "on"))
            sides[side]["cpu"].append(time.process_time() - c0)
            sides[side]["wall"].append(time.perf_counter() - w0)
            sides[side]["train"].append(result["train_s"])
            sides[side]["results"].append(result)
            cache = result["stream_cache"] or {}
            print(f"  cell {i + 1}/{len(cells)} k={cfg.k} lambda_={cfg.lambda_} {side:3s}: "
                  f"{sides[side]['cpu'][-1]:.1f} CPU-s, train {result['train_s']:.1f} s"
                  + (f", built {cache['built_steps']} read {cache['read_steps']} steps"
                     if cache else ""), flush=True)
    disk = sum(f.stat().st_size for f in (work / "stream").rglob("*.pt"))
    return {"sides": sides, "cells": cells, "load": (load0, os.getloadavg()), "disk": disk}


def print_time(r: dict[str, Any], args: argparse.Namespace) -> bool:
    sides, cells = r["sides"], r["cells"]
    same = all(a[key] == b[key] for a, b in zip(sides["off"]["results"], sides["on"]["results"])
               for key in SAME)
    print(f"(b) CPU time: {len(cells)} cells x {args.steps} steps, crop {args.crop}, batch "
          f"{args.batch}, encoder {args.encoder}, Uformer embed_dim {args.embed_dim} depth "
          f"{args.depth}, fake Flare7K++ ({args.flare_side} px flares, synthesis at 512 px), "
          f"{torch.get_num_threads()} thread(s); load average {r['load'][0][0]:.1f} -> "
          f"{r['load'][1][0]:.1f}")
    print(f"{'side':5s} {'CPU s':>8s} {'wall s':>8s} {'train s':>8s} {'median CPU s/cell':>18s} "
          f"{'built steps':>12s} {'read steps':>11s}")
    for side in ("off", "on"):
        s = sides[side]
        caches = [res["stream_cache"] or {} for res in s["results"]]
        print(f"{side:5s} {sum(s['cpu']):8.1f} {sum(s['wall']):8.1f} {sum(s['train']):8.1f} "
              f"{statistics.median(s['cpu']):18.2f} "
              f"{sum(c.get('built_steps', 0) for c in caches):12d} "
              f"{sum(c.get('read_steps', 0) for c in caches):11d}")
    off, on = sides["off"], sides["on"]
    print(f"on/off: CPU {sum(on['cpu']) / sum(off['cpu']):.3f}x, training wall "
          f"{sum(on['train']) / sum(off['train']):.3f}x; the cache holds {r['disk'] / 2**20:.2f} MiB")
    print(f"time grid: off {sum(off['cpu']):.1f} CPU-s, on {sum(on['cpu']):.1f} CPU-s, on/off "
          f"{sum(on['cpu']) / sum(off['cpu']):.3f}x ({len(cells)} cells, results "
          f"{'identical' if same else 'DIFFERENT'})")
    return same


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--what", nargs="+", choices=("flops", "time"), default=["flops", "time"])
    parser.add_argument("--space", type=Path, default=ROOT / "search_spaces" / "table1.yaml",
                        help="flops: the space whose grid is counted")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="flops: override a fixed setting of the space (repeatable)")
    parser.add_argument("--embed-dim", type=int, default=None, help="Uformer (flops: 32, time: 8)")
    parser.add_argument("--depth", type=int, default=None, help="Uformer (flops: 2, time: 1)")
    parser.add_argument("--eval-size", type=int, default=512, help="flops: test image side")
    parser.add_argument("--n-eval", type=int, default=100, help="flops: test images per cell")
    parser.add_argument("--count-batch", type=int, default=1, help="flops: batch counted")
    parser.add_argument("--cells", type=int, default=8, choices=range(1, len(TIME_GRID) + 1),
                        metavar=f"1..{len(TIME_GRID)}", help="time: grid cells")
    parser.add_argument("--steps", type=int, default=10, help="time: steps per cell")
    parser.add_argument("--crop", type=int, default=64, help="time: training crop")
    parser.add_argument("--batch", type=int, default=4, help="time: batch size")
    parser.add_argument("--encoder", default="small_cpu", help="time: encoder (random weights)")
    parser.add_argument("--flare-side", type=int, default=1440, help="time: fake flare files' side")
    parser.add_argument("--fake-flares", type=int, default=4, help="time: fake files per folder")
    parser.add_argument("--base-steps", type=int, default=50, help="time: procedural base steps")
    parser.add_argument("--n-test", type=int, default=4, help="time: test images")
    parser.add_argument("--test-size", type=int, default=128, help="time: test image side")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", type=Path, help="time: keep files here (default: a temp dir)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ok = True
    if "flops" in args.what:
        cells, reference = space_cells(args.space, args.set)
        embed_dim, depth = args.embed_dim or 32, args.depth or 2
        print(f"space {args.space.name}{' with ' + ' '.join(args.set) if args.set else ''}")
        result = count_flops(cells, reference, embed_dim, depth, args.eval_size, args.n_eval,
                             args.count_batch)
        print_flops(result, cells, embed_dim, depth, args.eval_size, args.n_eval)
    if "time" in args.what:
        args.embed_dim, args.depth = args.embed_dim or 8, args.depth or 1
        with contextlib.ExitStack() as stack:
            work = args.workdir or Path(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="bench_stream_cache.")))
            import logging

            logging.getLogger("cascade").setLevel(logging.ERROR)  # no LPIPS/base warnings per cell
            ok = print_time(time_grid(args, work), args)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
