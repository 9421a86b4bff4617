"""Data parallelism for one trial: process launch, backend init/teardown, the collectives we use.

The trainer talks to a `DataParallel` object only, never to torch.distributed or horovod directly,
so a backend is one class here plus one entry in `BACKENDS`:

- `"none"`: `Local`, one process; every collective is the identity.
- `"ddp"`:  `DDP`, torch.distributed (gloo on CPU, NCCL on CUDA); gradients are averaged by
  `DistributedDataParallel` during `backward`; parameters are broadcast from rank 0 when wrapped.
- `"horovod"`: `cascade.hvd.HorovodBackend` (written in the Horovod issue): same interface, with
  `hvd.DistributedOptimizer` averaging gradients and `hvd.broadcast_parameters` /
  `broadcast_optimizer_state` from rank 0 in `broadcast_state`; launched by `cascade.hvd.launch`
  (horovodrun running `python -m cascade.distributed PAYLOAD`).

Semantics shared by every backend (documented for users in `cascade.train`): the global batch is
`batch_size` images per optimizer step, split into `world_size` rank-disjoint shards; gradients are
averaged over ranks, so a step equals a single-process step on the whole global batch and the
learning rate is *not* scaled with the number of workers. Only rank 0 evaluates and writes files.

`launch(backend, workers, target, args)` runs `target(dp, *args)` on every rank and returns rank 0's
return value. Results and exceptions come back through files in a private temporary folder, so the
same protocol works for processes we spawn and for ones started by an external launcher; a
`UserError` (or any exception) raised on a rank is re-raised in the caller with its original type.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cascade.errors import UserError

# A rank that waits longer than this in a collective has a dead peer; fail rather than hang.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


class DataParallel:
    """One process's view of the data-parallel group. `Local` is the single-process case."""

    name = "none"

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu") -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that evaluates, writes checkpoints and results, and reports."""
        return self.rank == 0

    def shard(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's part of a global batch of sample indices (strided: rank, rank + W, ...)."""
        return indices[self.rank :: self.world_size]

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The module to call in the training step (DDP wraps it; others return it)."""
        return model

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer to step (Horovod's DistributedOptimizer averages gradients here)."""
        return optimizer

    def broadcast_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Make every rank's parameters and optimizer state equal to rank 0's."""

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce `tensor` over ranks (`op` in sum, min, max); returns the reduced tensor."""
        return tensor

    def barrier(self) -> None:
        """Wait for every rank."""

    def close(self) -> None:
        """Leave the group (idempotent)."""


class Local(DataParallel):
    """A single process: the default, and what every rank-agnostic code path runs under."""


class DDP(DataParallel):
    """torch.distributed + DistributedDataParallel. Rank/world/rendezvous come from the environment
    (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), as set by `launch` or by torchrun."""

    name = "ddp"
    _OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}

    def __init__(self, device: torch.device | str = "cpu") -> None:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        device = torch.device(device)
        if device.type == "cuda":
            # One GPU per rank: LOCAL_RANK picks it (torchrun sets it; `launch` sets it too).
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
            torch.cuda.set_device(device)
        super().__init__(rank, world, device)
        if not dist.is_initialized():
            dist.init_process_group(
                backend="nccl" if device.type == "cuda" else "gloo",
                rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT,
            )

    def wrap_model(self, model: nn.Module) -> nn.Module:
        ids = [self.device.index] if self.device.type == "cuda" else None
        # broadcast_buffers: rank 0's buffers each forward; the constructor broadcasts parameters.
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def broadcast_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        # Parameters: DDP's constructor broadcasts them from rank 0. Optimizer state: every rank
        # builds it identically (fresh, or loaded from the same checkpoint file), so nothing to do.
        pass

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=self._OPS[op])
        return out

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _horovod(device: torch.device | str) -> DataParallel:
    try:
        from cascade import hvd
    except ImportError as exc:
        raise UserError(f"backend 'horovod' is not available ({exc}); build it with `make horovod`") from exc
    return hvd.HorovodBackend(device)


# name -> constructor(device) for a rank inside an already launched group
BACKENDS: dict[str, Callable[[torch.device | str], DataParallel]] = {
    "none": lambda device: Local(device=device),
    "ddp": DDP,
    "horovod": _horovod,
}


def init_backend(name: str, device: torch.device | str) -> DataParallel:
    """Join the group of backend `name` from inside a launched rank."""
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return BACKENDS[name](device)


def free_port() -> int:
    """A TCP port that was free a moment ago (for the rendezvous of a local group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    backend: str,
    workers: int,
    target: Callable[..., Any],
    args: tuple[Any, ...],
    device: torch.device | str = "cpu",
) -> Any:
    """Run `target(dp, *args)` on `workers` ranks of `backend`; return rank 0's result.

    `target` must be a module-level function (it is pickled into fresh processes). With one worker
    or backend "none" it runs in this process. A rank's exception is re-raised here, same type.
    """
    if backend == "none" or workers == 1:
        return target(Local(device=device), *args)
    with tempfile.TemporaryDirectory(prefix="flaresweep-launch-") as tmp:
        payload = Path(tmp) / "payload.pkl"
        payload.write_bytes(pickle.dumps((backend, str(device), target, args)))
        if backend == "horovod":
            from cascade import hvd  # the Horovod issue's launcher: horovodrun ... -m cascade.distributed

            hvd.launch(workers, payload)
        elif backend == "ddp":
            _spawn(workers, payload)
        else:
            raise UserError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        return _collect(Path(tmp), workers)


def _spawn(workers: int, payload: Path) -> None:
    """Start `workers` processes of `run_payload` (spawn, not fork: safe with threads and CUDA)."""
    ctx = mp.get_context("spawn")
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(workers)}
    threads = max(1, torch.get_num_threads() // workers)
    procs = [ctx.Process(target=_spawned_rank, args=(rank, env, threads, str(payload)), daemon=False)
             for rank in range(workers)]
    for p in procs:
        p.start()
    try:
        pending = {p.sentinel: p for p in procs}
        while pending:
            for sentinel in wait(list(pending)):
                p = pending.pop(sentinel)
                p.join()
                if p.exitcode != 0:  # a dead rank would leave its peers blocked in a collective
                    for other in pending.values():
                        other.terminate()
                    pending.clear()
                    break
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def _spawned_rank(rank: int, env: dict[str, str], threads: int, payload: str) -> None:
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)  # share the parent's CPU budget instead of oversubscribing it
    run_payload(payload)


def run_payload(payload: str | os.PathLike) -> None:
    """Body of one rank, whoever launched it: init backend, run target, leave result/error files."""
    out = Path(payload).parent
    backend, device, target, args = pickle.loads(Path(payload).read_bytes())
    rank = int(os.environ.get("RANK", os.environ.get("HOROVOD_RANK", "0")))
    dp: DataParallel | None = None
    try:
        dp = init_backend(backend, device)
        rank = dp.rank
        result = target(dp, *args)
        if dp.is_main:
            (out / "result.pkl").write_bytes(pickle.dumps(result))
    except BaseException as exc:
        tb = traceback.format_exc()
        try:
            blob = pickle.dumps((exc, tb))
        except Exception:  # an unpicklable exception still reaches the caller, as RuntimeError
            blob = pickle.dumps((RuntimeError(f"{type(exc).__name__}: {exc}"), tb))
        (out / f"error-{rank}.pkl").write_bytes(blob)
        raise SystemExit(1) from None
    finally:
        if dp is not None:
            dp.close()


def _collect(tmp: Path, workers: int) -> Any:
    """Rank 0's result, or re-raise the root-cause exception: the first written (a rank that dies
    makes its peers fail too, with "connection closed" errors, a moment later)."""
    errors = sorted(tmp.glob("error-*.pkl"), key=lambda p: (p.stat().st_mtime_ns, p.name))
    if errors:
        exc, tb = pickle.loads(errors[0].read_bytes())
        note = f"(raised on rank {errors[0].stem.split('-')[1]} of {workers}; its traceback:)\n{tb}"
        if hasattr(exc, "add_note"):  # Python >= 3.11; the message itself stays one line
            exc.add_note(note)
        raise exc
    result = tmp / "result.pkl"
    if not result.is_file():
        raise RuntimeError(f"data-parallel run with {workers} workers ended without a result "
                           "(a worker was killed?)")
    return pickle.loads(result.read_bytes())


if __name__ == "__main__":  # `python -m cascade.distributed PAYLOAD`: one rank under an external launcher
    run_payload(sys.argv[1])
