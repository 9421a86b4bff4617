"""Data parallelism for one trial: process launch, backend init/teardown, the collectives we use.

The trainer talks to a `DataParallel` object only, never to torch.distributed or horovod directly,
so a backend is one class here plus one entry in `GROUPS` (its name also in
`cascade.config.BACKENDS`, the one list of names; the module checks that they agree):

- `"none"`: `Local`, one process; every collective is the identity.
- `"ddp"`:  `DDP`, torch.distributed (gloo on CPU, NCCL on CUDA); gradients are averaged by
  `DistributedDataParallel` during `backward`; parameters are broadcast from rank 0 when wrapped.
- `"horovod"`: `Horovod`, same interface, with `hvd.DistributedOptimizer` averaging gradients and
  `hvd.broadcast_parameters` / `broadcast_optimizer_state` from rank 0 in `broadcast_state`;
  launched as `horovodrun -np N --gloo python -m cascade.distributed PAYLOAD`
  (`cascade.hvd.horovodrun_command`).

Semantics shared by every backend (documented for users in `cascade.train`): the global batch is
`batch_size` images per optimizer step, split into `world_size` rank-disjoint shards; gradients are
averaged over ranks, so a step equals a single-process step on the whole global batch and the
learning rate is *not* scaled with the number of workers. Only rank 0 evaluates and writes files.

`launch(backend, workers, target, args, report=...)` runs `target(dp, report, *args)` on every rank
and returns rank 0's return value; rank 0's progress reports are relayed to the caller's `report`.
Results, reports and exceptions come back through files in a private temporary folder, so the
same protocol works for processes we spawn (DDP) and for ones horovodrun starts; a `UserError` (or
any exception) raised on a rank is re-raised in the caller with its original type. Asking for
Horovod where it is not installed is one `UserError` before anything starts (`check_backend`).

Ranks die with the trial that started them: each spawned rank, each Horovod rank and `horovodrun`
itself ask Linux for SIGKILL when their parent dies (`die_with_parent`, PR_SET_PDEATHSIG), so a
trial process killed by Ray, the OOM killer or a lost node never leaves ranks behind that keep
their GPUs and keep writing the trial's checkpoints while Ray retries it (docs/design.md, "Cluster").
On CUDA each rank takes one of the GPUs the trial sees (cuda:LOCAL_RANK); fewer visible GPUs than
ranks is a UserError (NCCL refuses two ranks on one device).
"""

from __future__ import annotations

import ctypes
import datetime
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cascade.config import BACKENDS
from cascade.errors import UserError
from cascade.locks import pid_alive

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


class Horovod(DataParallel):
    """Horovod (gloo controller; gloo ops on CPU, NCCL on GPU when built so), one rank per
    process started by horovodrun. Tested in tests/test_hvd.py when `make horovod` has built it."""

    name = "horovod"

    def __init__(self, device: torch.device | str = "cpu") -> None:
        import horovod.torch as hvd  # optional dependency, imported only when asked for

        hvd.init()
        self._hvd = hvd
        device = torch.device(device)
        if device.type == "cuda":
            device = torch.device("cuda", hvd.local_rank() % torch.cuda.device_count())
            torch.cuda.set_device(device)
        super().__init__(hvd.rank(), hvd.size(), device)

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        # Averages gradients over ranks (op=Average), like DDP: lr is not scaled.
        return self._hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())

    def broadcast_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self._hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        # A fresh optimizer has no state, and horovod's broadcast_optimizer_state creates it by
        # stepping on zero gradients. That is not a no-op: Adam's step count (so its bias
        # correction) advances, and weight decay moves the weights, so the run would no longer
        # equal DDP's or one process's. Fresh optimizers are equal on every rank anyway (same config
        # over the parameters just broadcast); loaded state (a resume) is broadcast from rank 0.
        if optimizer.state_dict()["state"]:
            self._hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        ops = {"sum": self._hvd.Sum, "min": self._hvd.Min, "max": self._hvd.Max}
        return self._hvd.allreduce(tensor, op=ops[op])

    def barrier(self) -> None:
        self._hvd.barrier()

    def close(self) -> None:
        self._hvd.shutdown()


# backend name (cascade.config.BACKENDS) -> constructor(device) for a rank inside a launched group
GROUPS: dict[str, Callable[[torch.device | str], DataParallel]] = {
    "none": lambda device: Local(device=device),
    "ddp": DDP,
    "horovod": Horovod,
}
if tuple(GROUPS) != BACKENDS:  # one list of names: a backend added here is added there too
    raise ImportError(f"cascade.distributed.GROUPS {tuple(GROUPS)} != cascade.config.BACKENDS {BACKENDS}")


def check_name(name: str) -> None:
    """UserError unless `name` is one of cascade.config.BACKENDS."""
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")


def init_backend(name: str, device: torch.device | str) -> DataParallel:
    """Join the group of backend `name` from inside a launched rank."""
    check_name(name)
    return GROUPS[name](device)


def free_port() -> int:
    """A TCP port that was free a moment ago (for the rendezvous of a local group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int, sig: int = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when its parent dies; exit now if `parent` (the
    pid that started it) is already gone. Linux only (PR_SET_PDEATHSIG); a no-op elsewhere.

    The signal follows the *thread* that forked this process: launch() waits for its ranks in the
    thread that started them, so the two end together. It survives exec (not for setuid programs).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: nothing more to do than without it
        return
    if os.getppid() != parent:  # the parent died before prctl: no signal would come
        os._exit(1)


# `python -c` body that sets PR_SET_PDEATHSIG (SIGKILL), checks the parent, then execs argv[2:];
# inline, so starting a launcher does not pay for importing torch a second time.
_EXEC_DYING_WITH_PARENT = ("import ctypes, os, sys; ctypes.CDLL(None).prctl(1, 9, 0, 0, 0); "
                           "os.getppid() == int(sys.argv[1]) or os._exit(1); "
                           "os.execvp(sys.argv[2], sys.argv[2:])")


def with_parent_death(command: list[str]) -> list[str]:
    """`command` run so that it dies with this process (PR_SET_PDEATHSIG, then exec); Popen's
    preexec_fn could do the same but is unsafe in Ray's multi-threaded workers."""
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-c", _EXEC_DYING_WITH_PARENT, str(os.getpid()), *command]


# A trial's progress callback, `report(metrics, checkpoint_dir)`: what `cascade.train.train` takes
# and calls, and what `launch` relays from rank 0. Defined once, here.
Report = Callable[[dict[str, Any], "str | None"], None]


def launch(
    backend: str,
    workers: int,
    target: Callable[..., Any],
    args: tuple[Any, ...],
    device: torch.device | str = "cpu",
    report: Report | None = None,
) -> Any:
    """Run `target(dp, report, *args)` on `workers` ranks of `backend`; return rank 0's result.

    `target` must be a module-level function (it is pickled into fresh processes). With one worker
    or backend "none" it runs in this process (Horovod must still be usable when asked for).
    Rank 0's `report(metrics, checkpoint_dir)` calls are relayed to `report` in *this* process and
    thread (Ray's `tune.report` only works there); other ranks get `report=None`. A rank's
    exception is re-raised here with its original type.
    """
    check_backend(backend)
    if backend == "none" or workers == 1:
        return target(Local(device=device), report, *args)
    check_gpus(workers, device)
    with tempfile.TemporaryDirectory(prefix="flaresweep-launch-") as tmp:
        payload = Path(tmp) / "payload.pkl"
        payload.write_bytes(pickle.dumps((backend, str(device), target, args)))
        relay = _Relay(Path(tmp) / "progress.jsonl", report)
        launcher_log = None
        if backend == "horovod":
            launcher_log = _run_horovod(workers, payload, relay)
        else:
            _spawn(workers, payload, relay)
        relay.poll()
        return _collect(Path(tmp), workers, launcher_log)


def check_backend(backend: str) -> None:
    """UserError unless `backend` is known and usable here (Horovod: installed for this torch).

    Cheap (imports nothing): call it before spending time on a trial that would fail at launch.
    """
    check_name(backend)
    if backend == "horovod":
        from cascade import hvd

        reason = hvd.horovod_unavailable_reason()
        if reason == hvd.NOT_INSTALLED:
            raise UserError("horovod is not installed (run `make horovod`)")
        if reason is not None:
            raise UserError(f"horovod is not usable: {reason}")


def check_gpus(workers: int, device: torch.device | str) -> None:
    """On CUDA, `workers` ranks need `workers` visible GPUs (rank r takes cuda:r): UserError if not."""
    if torch.device(device).type != "cuda":
        return
    visible = torch.cuda.device_count()
    if visible < workers:
        raise UserError(f"workers={workers} on CUDA needs {workers} GPUs, one per rank, but this "
                        f"trial sees {visible} (CUDA_VISIBLE_DEVICES="
                        f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); give each trial "
                        f"{workers} whole GPUs (--gpus-per-trial {workers}) or set workers: {visible or 1}")


class _Relay:
    """Forward rank 0's report calls, written as JSON lines to `path`, to `report`."""

    def __init__(self, path: Path, report: Report | None) -> None:
        self.path, self.report, self.offset = path, report, 0

    def poll(self) -> None:
        if self.report is None or not self.path.is_file():
            return
        with open(self.path, encoding="utf-8") as fh:
            fh.seek(self.offset)
            while (line := fh.readline()).endswith("\n"):  # a partial last line waits
                self.offset += len(line.encode("utf-8"))
                item = json.loads(line)
                self.report(item["metrics"], item["checkpoint_dir"])


def _file_report(path: Path) -> Report:
    """Rank 0's `report` inside a launched group: append one JSON line per call."""

    def report(metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"metrics": metrics, "checkpoint_dir": checkpoint_dir}) + "\n")

    return report


def _spawn(workers: int, payload: Path, relay: _Relay) -> None:
    """Start `workers` processes of `run_payload` (spawn, not fork: safe with threads and CUDA)."""
    ctx = mp.get_context("spawn")
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(workers)}
    threads = max(1, torch.get_num_threads() // workers)
    procs = [ctx.Process(target=_spawned_rank, args=(rank, env, threads, str(payload), os.getpid()),
                         daemon=False)
             for rank in range(workers)]
    for p in procs:
        p.start()
    try:
        pending = {p.sentinel: p for p in procs}
        while pending:
            relay.poll()
            for sentinel in wait(list(pending), timeout=0.5):
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


def _spawned_rank(rank: int, env: dict[str, str], threads: int, payload: str, parent: int) -> None:
    die_with_parent(parent)  # a killed trial process must not leave this rank running
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)  # share the parent's CPU budget instead of oversubscribing it
    run_payload(payload)


def _run_horovod(workers: int, payload: Path, relay: _Relay) -> Path:
    """`horovodrun -np N --gloo python -m cascade.distributed PAYLOAD`, relaying progress.

    Returns the file holding horovodrun's own output (its ranks' stdout/stderr, prefixed
    `[rank]<stream>:`), which `_collect` quotes when no rank left a result or an error. It is not
    shown otherwise: a failing rank's exception comes back typed, and horovodrun's report of the
    same failure (a RuntimeError traceback) would only bury it.
    """
    from cascade import hvd

    env = dict(os.environ)
    # What spawn gives its children: this process's import path (a target defined in a test or a
    # script beside it must unpickle on every rank) and an equal share of its CPU threads.
    env["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve()) if p else os.getcwd() for p in sys.path)
    env["OMP_NUM_THREADS"] = str(max(1, torch.get_num_threads() // workers))
    cmd = with_parent_death(hvd.horovodrun_command(
        workers, [sys.executable, "-m", "cascade.distributed", "--rank", str(os.getpid()), str(payload)]))
    log_path = payload.parent / "horovodrun.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                relay.poll()
                time.sleep(0.5)
        finally:
            if proc.poll() is None:  # e.g. `report` raised: horovodrun ends its ranks on SIGTERM
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return log_path


def run_payload(payload: str | os.PathLike) -> None:
    """Body of one rank, whoever launched it: init backend, run target, leave result/error files."""
    out = Path(payload).parent
    rank = int(os.environ.get("RANK", os.environ.get("HOROVOD_RANK", "0")))
    dp: DataParallel | None = None
    try:
        # Inside the try: a target that does not unpickle here (not importable) is an error to report.
        backend, device, target, args = pickle.loads(Path(payload).read_bytes())
        dp = init_backend(backend, device)
        rank = dp.rank
        result = target(dp, _file_report(out / "progress.jsonl") if dp.is_main else None, *args)
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


def _collect(tmp: Path, workers: int, launcher_log: Path | None = None) -> Any:
    """Rank 0's result, or re-raise the root-cause exception: the first written (a rank that dies
    makes its peers fail too, with "connection closed" errors, a moment later). With neither, the
    tail of `launcher_log` (horovodrun's output) says what happened."""
    errors = sorted(tmp.glob("error-*.pkl"), key=lambda p: (p.stat().st_mtime_ns, p.name))
    if errors:
        exc, tb = pickle.loads(errors[0].read_bytes())
        note = f"(raised on rank {errors[0].stem.split('-')[1]} of {workers}; its traceback:)\n{tb}"
        if hasattr(exc, "add_note"):  # Python >= 3.11; the message itself stays one line
            exc.add_note(note)
        raise exc
    result = tmp / "result.pkl"
    if not result.is_file():
        exc = RuntimeError(f"data-parallel run with {workers} workers ended without a result "
                           "(a worker was killed?)")
        if launcher_log is not None and launcher_log.is_file():
            tail = launcher_log.read_text(encoding="utf-8", errors="replace").splitlines()[-40:]
            exc.add_note("launcher output (last lines):\n" + "\n".join(tail))
        raise exc
    return pickle.loads(result.read_bytes())


def _main(argv: list[str]) -> None:
    """`python -m cascade.distributed`: `--rank PID PAYLOAD` is one rank under horovodrun (or
    another launcher), dying with the launcher and refusing to start once the trial process PID is
    gone; a bare `PAYLOAD` is one rank without a parent to follow."""
    if argv[:1] == ["--rank"]:
        # Horovod's launcher forks helpers between the trial and this rank: follow whichever
        # process started this one (it dies with horovodrun, which dies with the trial).
        die_with_parent(os.getppid())
        if not pid_alive(int(argv[1])):  # the trial died while horovodrun was starting us
            raise SystemExit(1)
        argv = argv[2:]
    run_payload(argv[0])


if __name__ == "__main__":
    _main(sys.argv[1:])
