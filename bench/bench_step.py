"""Benchmark one cascade fine-tuning step against one plain Uformer training step.

    python bench/bench_step.py [--size 128] [--batch 2] [--embed-dim 32] [--depth 2]
        [--encoders none small_cpu vit_l16_swag] [--repeats 3] [--threads 1]
        [--device cpu|cuda] [--precision fp32|bf16] [--compile] [--channels-last] [--no-profile]
        [--no-flops] [--peak-tflops T]

Both steps see the same `(batch, 3, size, size)` images in [0, 1] and a
`Uformer(img_size=size, embed_dim, depths=(depth,)*9)` in train mode (stochastic depth on), SGD
with momentum (the paper's optimizer), under `torch.use_deterministic_algorithms(True,
warn_only=True)` without NaN-filling uninitialised memory, as the trainer runs (`--nan-fill`
restores torch's default fill, the trainer's behaviour before it turned it off):
- plain: forward -> L1(out[:, :3], gt) -> backward -> optimizer step;
- cascade (the body of `cascade.train._train_rank`'s step loop): frozen negative forward under
  no_grad -> anchor forward -> `CascadeLoss` (k=1) -> backward -> optimizer step.
Encoder variants: `none` is lambda_=1, delta=0 (the one setting without an encoder); any other
name is built with `build_encoder(name, pretrained=False)` (random weights: same cost) and runs
with lambda_=0.5, delta=1e-3, so f(positive), f(negative) (one no-grad pass) and f(anchor) (with a
graph) are all computed, as in every lambda_ < 1 cell of the sweep.

For each variant the two steps are timed interleaved (plain, cascade, plain, cascade, ...) after
one warm-up each, so load on a shared machine hits both alike; medians of wall time and of
process CPU time (less inflated by other processes than wall time) and their ratio are printed,
with images/s. Then one cascade step runs under torch.profiler with a label per phase (negative
fwd, anchor fwd, encoder fwd on positive+negative without grad and on the anchor with grad, the
rest of the loss, backward, optimizer) and the table of where its time goes is printed, with the
top operators by self CPU time. Each kind's FLOPs per step are counted once in an extra eager
step (`torch.utils.flop_counter`, forward + backward, 2 per multiply-add; `--no-flops` skips it)
and turned into achieved TFLOP/s and model FLOPs utilisation (MFU: achieved / the device's dense
peak at `--precision`, from a datasheet table for known GPUs or `--peak-tflops`, printed with where
it comes from); on CUDA the peak memory of one step of each kind is printed, with MiB per image
above what stays resident (weights, gradients, optimizer state). The floor of the ratio is 1 + F/(F+B) ~ 1.33 (one extra no-grad
forward) plus the encoder's passes. `main(argv)` returns one dict per encoder (configuration and
every printed figure); bench/gpu_check.py collects them. Not a timed test: CI runs it with
`--size 32 --embed-dim 8 --depth 1 --encoders none --repeats 1`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from _timing import sync, timed
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode

from cascade.encoders import build_encoder
from cascade.losses import CascadeLoss
from cascade.model import CascadedFlareRemover
from cascade.uformer import Uformer

LR, MOMENTUM = 1e-3, 0.9
# Profiler labels of the cascade step's phases, in order (encoder passes nest inside "loss").
PHASES = ("negative fwd (no grad)", "anchor fwd", "loss", "backward", "optimizer")
ENC_TARGETS = "  encoder fwd pos+neg (no grad)"
ENC_ANCHOR = "  encoder fwd anchor (grad)"
# Dense peak TFLOP/s by (GPU name fragment, precision), from the vendors' datasheets, for MFU.
# The datasheets give bf16 tensor-core rates "with sparsity"; the dense rate is half of that
# (H100/H200 SXM: 1,979 -> 989.4). "fp32" is the non-tensor-core fp32 rate: torch leaves TF32
# matmuls off by default (cuDNN convolutions may still use TF32; the Uformer's FLOPs are mostly
# matmuls). First match wins, so the longer names come first ("H200 NVL" before "H200").
# Sources: nvidia.com/en-us/data-center/{h100,h200,a100,l40s}/ (datasheet tables).
PEAK_TFLOPS = (
    ("H100 PCIe", {"bf16": 756.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.0, "fp32": 60.0}),
    ("H100", {"bf16": 989.4, "fp32": 66.9}),  # SXM
    ("H200 NVL", {"bf16": 835.5, "fp32": 60.0}),
    ("H200", {"bf16": 989.4, "fp32": 66.9}),  # SXM (also matches GH200, same GPU rates)
    ("A100", {"bf16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.1, "fp32": 91.6}),
)


class LabelledEncoder(nn.Module):
    """Wraps an encoder so each call shows in the profile as the pass it is (targets or anchor)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor) -> Tensor:
        with record_function(ENC_ANCHOR if torch.is_grad_enabled() else ENC_TARGETS):
            return self.encoder(x)


@contextlib.contextmanager
def _phase(name: str, device: torch.device) -> Iterator[None]:
    with record_function(name):
        yield
        sync(device)  # so a CUDA phase's kernels are charged to it in the wall/CPU split


def make_plain_step(model: nn.Module, device: torch.device, bf16: bool
                    ) -> Callable[[Tensor, Tensor], None]:
    """One plain Uformer training step: forward -> L1 on the deflared channels -> backward -> SGD."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    def step(inp: Tensor, gt: Tensor) -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            out = model(inp)[:, :3]
        loss = F.l1_loss(out.float(), gt)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def make_cascade_step(cascade: CascadedFlareRemover, net: nn.Module, criterion: CascadeLoss,
                      device: torch.device, bf16: bool, labels: bool = False
                      ) -> Callable[[Tensor, Tensor], None]:
    """One cascade fine-tuning step, as cascade/train.py's loop body runs it (minus bookkeeping).

    `net` is the (possibly compiled) anchor; `labels` wraps each phase in a profiler range.
    """
    negative = cascade.negative
    optimizer = torch.optim.SGD(cascade.anchor.parameters(), lr=LR, momentum=MOMENTUM)
    phase = (lambda name: _phase(name, device)) if labels else (lambda name: contextlib.nullcontext())

    def step(inp: Tensor, gt: Tensor) -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            with phase(PHASES[0]), torch.no_grad():
                neg = negative(inp)[:, :3]
            with phase(PHASES[1]):
                anc = net(neg)[:, :3]
            with phase(PHASES[2]):
                terms = criterion(anc.float(), gt, neg.float())
        with phase(PHASES[3]):
            optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
        with phase(PHASES[4]):
            optimizer.step()

    return step


def count_flops(step: Callable[[], None]) -> float:
    """FLOPs of one call of `step` (eager; 2 per multiply-add), forward and backward together."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def peak_tflops(device: torch.device, precision: str, override: float | None
                ) -> tuple[float | None, str]:
    """(the device's dense peak TFLOP/s for `precision`, where that number comes from).

    --peak-tflops wins; else the PEAK_TFLOPS row whose fragment is in the CUDA device name;
    (None, why) on the CPU or for a GPU the table does not know.
    """
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "none on the CPU"
    name = torch.cuda.get_device_name(device)
    for fragment, peaks in PEAK_TFLOPS:
        if fragment in name:
            return peaks[precision], f"datasheet, dense {precision}: bench_step.PEAK_TFLOPS[{fragment!r}]"
    return None, f"unknown GPU {name!r}: pass --peak-tflops"


def peak_memory(step: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(peak allocated MiB during one step, MiB resident before it: weights, grads, optimizer)."""
    sync(device)
    resident = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**20, resident / 2**20


def profile_phases(step: Callable[[], None], device: torch.device) -> tuple[dict[str, float], str]:
    """Run `step` once under the profiler: ({label: exclusive wall ms}, top-operator table)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
    events = {e.key: e for e in prof.key_averages()}
    ms = {name: events[name].cpu_time_total / 1e3 for name in (*PHASES, ENC_TARGETS, ENC_ANCHOR)
          if name in events}
    # The encoder ranges nest inside "loss": report the loss's own remainder.
    ms["loss"] = ms["loss"] - ms.get(ENC_TARGETS, 0.0) - ms.get(ENC_ANCHOR, 0.0)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=48)
    return ms, table


def bench_encoder(name: str, args: argparse.Namespace, device: torch.device,
                  base: Uformer, inp: Tensor, gt: Tensor) -> dict[str, float | str]:
    bf16 = args.precision == "bf16"
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    plain_model = copy.deepcopy(base).to(device, memory_format=fmt).train()
    cascade = CascadedFlareRemover.from_uformer(base).to(device, memory_format=fmt).train()
    if name == "none":
        criterion = CascadeLoss(None, k=1, lambda_=1.0, delta=0.0)
    else:
        encoder = LabelledEncoder(build_encoder(name, pretrained=False))
        criterion = CascadeLoss(encoder, k=1, lambda_=0.5, delta=1e-3).to(device)
    net: nn.Module = cascade.anchor
    plain_net: nn.Module = plain_model
    if args.compile:
        net, plain_net = torch.compile(net), torch.compile(plain_net)
    plain = make_plain_step(plain_net, device, bf16)
    casc = make_cascade_step(cascade, net, criterion, device, bf16)
    flops = {}
    if args.flops:  # one eager step of each (FlopCounterMode does not see inside compiled code)
        flops = {"plain": count_flops(lambda: make_plain_step(plain_model, device, bf16)(inp, gt)),
                 "cascade": count_flops(lambda: make_cascade_step(
                     cascade, cascade.anchor, criterion, device, bf16)(inp, gt))}

    warm = {"plain": timed(lambda: plain(inp, gt), device),
            "cascade": timed(lambda: casc(inp, gt), device)}
    times: dict[str, list[tuple[float, float]]] = {"plain": [], "cascade": []}
    for _ in range(args.repeats):  # interleaved: load hits both alike
        times["plain"].append(timed(lambda: plain(inp, gt), device))
        times["cascade"].append(timed(lambda: casc(inp, gt), device))
    med = {f"{k}_{m}": statistics.median(t[i] for t in v)
           for k, v in times.items() for i, m in enumerate(("wall", "cpu"))}
    med["warm_plain_wall"], med["warm_cascade_wall"] = warm["plain"][0], warm["cascade"][0]
    peak, med["peak_source"] = peak_tflops(device, args.precision, args.peak_tflops)
    med["peak_tflops"] = peak if peak else float("nan")
    for k, step in (("plain", plain), ("cascade", casc)):
        if flops:
            med[f"{k}_gflop"] = flops[k] / 1e9
            med[f"{k}_tflops"] = flops[k] / med[f"{k}_wall"] / 1e12
            med[f"{k}_mfu"] = med[f"{k}_tflops"] / peak if peak else float("nan")
        if device.type == "cuda":
            top, resident = peak_memory(lambda step=step: step(inp, gt), device)
            med[f"{k}_peak_mib"], med[f"{k}_mib_per_image"] = top, (top - resident) / args.batch

    print(f"\n== encoder={name}  ({'lambda_=1, delta=0' if name == 'none' else 'lambda_=0.5, delta=1e-3'})"
          f"  first steps (warm-up, incl. compile): plain {warm['plain'][0]:.3f} s, "
          f"cascade {warm['cascade'][0]:.3f} s")
    print(f"{'step':<9}{'wall s':>10}{'CPU s':>10}{'images/s':>11}{'GFLOP':>10}{'TFLOP/s':>10}"
          f"{'MFU':>8}{'peak MiB':>10}{'MiB/img':>9}")
    for k in ("plain", "cascade"):
        print(f"{k:<9}{med[k + '_wall']:>10.3f}{med[k + '_cpu']:>10.3f}"
              f"{args.batch / med[k + '_wall']:>11.2f}{_fmt(med, k + '_gflop', 10, '.1f')}"
              f"{_fmt(med, k + '_tflops', 10, '.3f')}{_fmt(med, k + '_mfu', 8, '.1%')}"
              f"{_fmt(med, k + '_peak_mib', 10, '.0f')}{_fmt(med, k + '_mib_per_image', 9, '.0f')}")
    med["ratio_wall"] = med["cascade_wall"] / med["plain_wall"]
    med["ratio_cpu"] = med["cascade_cpu"] / med["plain_cpu"]
    print(f"{'ratio':<9}{med['ratio_wall']:>10.3f}{med['ratio_cpu']:>10.3f}"
          f"   (cascade / plain; medians of {args.repeats}, interleaved)")

    if args.profile:
        labelled = make_cascade_step(cascade, net, criterion, device, bf16, labels=True)
        ms, table = profile_phases(lambda: labelled(inp, gt), device)
        total = sum(ms.values())
        print(f"\ncascade step by phase (torch.profiler, CPU-side ms of one step, total {total:.0f} ms):")
        for label in (*PHASES[:2], ENC_TARGETS, ENC_ANCHOR, *PHASES[2:]):
            if label in ms:
                shown = "  loss (rest)" if label == "loss" else label
                print(f"  {shown:<34}{ms[label]:>10.1f}{100 * ms[label] / total:>7.1f}%")
        print("\ntop operators by self CPU time (same step):")
        print(table)
    return med


def _fmt(values: dict[str, float], key: str, width: int, spec: str) -> str:
    value = values.get(key)
    return f"{'-' if value is None or value != value else format(value, spec):>{width}}"


def main(argv: list[str] | None = None) -> list[dict[str, float | str | bool]]:
    """Run the benchmark; one dict per encoder: the configuration, the medians and derived
    figures printed in the tables (seconds, GFLOP, TFLOP/s, MFU, MiB), `peak_source`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="image side (default 128)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--embed-dim", type=int, default=32, help="Uformer width (Flare7K: 32)")
    parser.add_argument("--depth", type=int, default=2, help="blocks per stage (Flare7K: 2)")
    parser.add_argument("--encoders", nargs="+", default=["none", "small_cpu", "vit_l16_swag"],
                        help="'none' and/or cascade.encoders names (random weights)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps of each kind")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: autocast the networks (the trainer's precision: bf16 on CUDA)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the trained networks")
    parser.add_argument("--channels-last", action="store_true",
                        help="networks and input in channels_last memory format")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="skip the per-phase profile")
    parser.add_argument("--nan-fill", action="store_true",
                        help="keep deterministic mode's NaN fill of new tensors (torch's default)")
    parser.add_argument("--no-flops", dest="flops", action="store_false",
                        help="skip counting FLOPs (one extra eager step of each kind)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense peak TFLOP/s at --precision, for MFU (default: "
                             "known GPUs from a datasheet table; none on the CPU)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":  # as cascade.train: cuBLAS needs it for deterministic algorithms
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)  # as cascade.train runs
    torch.utils.deterministic.fill_uninitialized_memory = args.nan_fill
    torch.manual_seed(args.seed)
    base = Uformer(img_size=args.size, embed_dim=args.embed_dim, depths=(args.depth,) * 9)
    g = torch.Generator().manual_seed(args.seed)
    inp = torch.rand(args.batch, 3, args.size, args.size, generator=g).to(device)
    gt = torch.rand(args.batch, 3, args.size, args.size, generator=g).to(device)
    if args.channels_last:
        inp = inp.contiguous(memory_format=torch.channels_last)

    params = sum(p.numel() for p in base.parameters())
    load = os.getloadavg()
    print(f"bench_step: torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f", {torch.get_num_threads()} thread(s) of {os.cpu_count()} cores")
          + f", precision {args.precision}, compile {args.compile}, channels_last {args.channels_last}"
          + f", nan_fill {args.nan_fill}")
    print(f"Uformer embed_dim={args.embed_dim} depths=({args.depth},)*9 ({params / 1e6:.2f} M params), "
          f"batch {args.batch} x 3 x {args.size} x {args.size}, SGD momentum {MOMENTUM}")
    peak, source = peak_tflops(device, args.precision, args.peak_tflops)
    print(f"MFU peak: {f'{peak:g} TFLOP/s' if peak else 'none'} ({source})")
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    config = {"device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "size": args.size, "batch": args.batch, "embed_dim": args.embed_dim,
              "depth": args.depth, "precision": args.precision, "compile": args.compile,
              "channels_last": args.channels_last, "repeats": args.repeats}
    results = []
    for name in args.encoders:
        results.append({"encoder": name, **config, **bench_encoder(name, args, device, base, inp, gt)})
    load = os.getloadavg()
    print(f"\nsummary (batch {args.batch}, {args.size} px; ratio = cascade / plain step, medians)")
    print(f"{'encoder':<14}{'plain s':>9}{'cascade s':>11}{'ratio wall':>12}{'ratio CPU':>11}"
          f"{'plain img/s':>13}{'cascade img/s':>15}{'plain MFU':>11}{'cascade MFU':>13}"
          f"{'cascade MiB/img':>17}")
    for r in results:
        print(f"{r['encoder']:<14}{r['plain_wall']:>9.3f}{r['cascade_wall']:>11.3f}"
              f"{r['ratio_wall']:>12.3f}{r['ratio_cpu']:>11.3f}"
              f"{args.batch / r['plain_wall']:>13.2f}{args.batch / r['cascade_wall']:>15.2f}"
              f"{_fmt(r, 'plain_mfu', 11, '.1%')}{_fmt(r, 'cascade_mfu', 13, '.1%')}"
              f"{_fmt(r, 'cascade_mib_per_image', 17, '.0f')}")
    print(f"load average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return results


if __name__ == "__main__":
    main()
