"""Data-parallel layer: 2 gloo ranks on CPU average gradients like one process on the whole batch;
ranks die with the process that launched them; CUDA ranks need a GPU each."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cascade import distributed
from cascade.errors import UserError

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def _train_linear(dp: distributed.DataParallel, report, steps: int) -> dict:
    """Tiny regression; each rank sees its strided shard of the global batch of 8."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = dp.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    net = dp.wrap_model(model)
    dp.broadcast_state(model, opt)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)
    for _ in range(steps):
        idx = dp.shard(torch.arange(8))
        loss = torch.nn.functional.mse_loss(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    total = dp.all_reduce(torch.tensor([float(dp.rank)]), op="sum")
    low = dp.all_reduce(torch.tensor([float(dp.rank)]), op="min")
    if report is not None:  # only rank 0 gets one
        report({"rank": dp.rank, "step": steps}, None)
    return {"weight": model.weight.detach().clone(), "world": dp.world_size,
            "rank_sum": float(total), "rank_min": float(low)}


def _raise_on_rank_1(dp: distributed.DataParallel, report) -> None:
    if dp.rank == 1:
        raise UserError("bad input seen on rank 1")
    dp.barrier()  # rank 0 would block here forever if the launcher did not end the group


def test_local_shard_is_identity_and_collectives_are_identity():
    dp = distributed.Local()
    assert torch.equal(dp.shard(torch.arange(5)), torch.arange(5))
    assert dp.all_reduce(torch.tensor([3.0]), op="max").item() == 3.0 and dp.is_main


def test_shards_are_disjoint_and_cover_the_batch():
    parts = [distributed.DataParallel(rank=r, world_size=3).shard(torch.arange(12)) for r in range(3)]
    assert sorted(torch.cat(parts).tolist()) == list(range(12))


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_on_the_global_batch():
    reports: list = []
    single = distributed.launch("none", 1, _train_linear, (5,))
    double = distributed.launch("ddp", 2, _train_linear, (5,),
                                report=lambda m, c: reports.append((m, c)))
    assert reports == [({"rank": 0, "step": 5}, None)]  # relayed from rank 0 only
    assert double["world"] == 2 and single["world"] == 1
    assert double["rank_sum"] == 1.0 and double["rank_min"] == 0.0
    # mean of two shard-mean gradients == full-batch mean gradient (equal shard sizes)
    torch.testing.assert_close(double["weight"], single["weight"], rtol=1e-5, atol=1e-6)
    assert not torch.equal(single["weight"], _train_linear(distributed.Local(), None, 0)["weight"])


@pytest.mark.slow
def test_exception_on_one_rank_is_reraised_with_its_type():
    with pytest.raises(UserError, match="rank 1"):
        distributed.launch("ddp", 2, _raise_on_rank_1, ())


def test_unknown_backend_is_a_user_error():
    with pytest.raises(UserError, match="unknown backend"):
        distributed.init_backend("mpi", "cpu")


# -- ranks die with their trial (issue 19) ---------------------------------------------------------


def _write_pid_and_sleep(dp: distributed.DataParallel, report, folder: str) -> None:
    (Path(folder) / f"rank-{dp.rank}").write_text(str(os.getpid()))
    time.sleep(600)


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (a container's init may never reap it)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def _kill_parent_and_wait(parent: subprocess.Popen, pids: list[int], within_s: float = 15) -> list[int]:
    """SIGKILL `parent` (as Ray kills a trial's worker); the pids still running after `within_s`."""
    parent.kill()
    parent.wait(timeout=30)
    deadline = time.time() + within_s
    while time.time() < deadline and any(_running(p) for p in pids):
        time.sleep(0.1)
    alive = [p for p in pids if _running(p)]
    for p in alive:  # leave nothing behind, whatever the assertion says
        os.kill(p, signal.SIGKILL)
    return alive


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_ddp_ranks_die_with_the_trial_process_that_started_them(tmp_path):
    code = ("import sys; sys.path.insert(0, sys.argv[2]); import test_distributed as t; "
            "from cascade import distributed; "
            "distributed.launch('ddp', 2, t._write_pid_and_sleep, (sys.argv[1],))")
    trial = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(TESTS)], cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(tmp_path.glob("rank-*"))) < 2:
        assert trial.poll() is None, "the launching process ended early"
        time.sleep(0.2)
    pids = [int(p.read_text()) for p in sorted(tmp_path.glob("rank-*"))]
    assert len(pids) == 2 and all(_running(p) for p in pids)
    assert _kill_parent_and_wait(trial, pids) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_a_launcher_command_dies_with_its_parent(tmp_path):
    # What horovodrun is started through: exec'd with the parent-death signal set.
    pid_file = tmp_path / "pid"
    code = ("import subprocess, sys; from cascade import distributed; "
            "cmd = distributed.with_parent_death([sys.executable, '-c', "
            "'import os, sys, time; open(sys.argv[1], \"w\").write(str(os.getpid())); time.sleep(600)', "
            "sys.argv[1]]); subprocess.Popen(cmd).wait()")
    parent = subprocess.Popen([sys.executable, "-c", code, str(pid_file)], cwd=ROOT)
    deadline = time.time() + 60
    while time.time() < deadline and not pid_file.is_file() or not pid_file.read_text():
        time.sleep(0.1)
    child = int(pid_file.read_text())
    assert _running(child)
    assert _kill_parent_and_wait(parent, [child]) == []


def test_cuda_ranks_need_one_visible_gpu_each(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(UserError, match=r"^workers=2 on CUDA needs 2 GPUs, one per rank, but this "
                                        r"trial sees 1 \(CUDA_VISIBLE_DEVICES=3\)"):
        distributed.launch("ddp", 2, _raise_on_rank_1, (), device="cuda")
    distributed.check_gpus(2, "cpu")  # gloo on the CPU: any number of ranks


def _double(dp: distributed.DataParallel, report, x: int) -> int:
    return 2 * x


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_rank_under_an_external_launcher_refuses_to_start_for_a_dead_trial(tmp_path):
    # What horovodrun runs on each rank: `python -m cascade.distributed --rank TRIAL_PID PAYLOAD`.
    import pickle

    payload = tmp_path / "payload.pkl"
    payload.write_bytes(pickle.dumps(("none", "cpu", _double, (21,))))
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    rank = [sys.executable, "-m", "cascade.distributed", "--rank"]
    done = subprocess.run([*rank, str(os.getpid()), str(payload)], cwd=ROOT, env=env)
    assert done.returncode == 0 and pickle.loads((tmp_path / "result.pkl").read_bytes()) == 42
    (tmp_path / "result.pkl").unlink()
    orphan = subprocess.run([*rank, str(_dead_pid()), str(payload)], cwd=ROOT, env=env)
    assert orphan.returncode == 1 and not (tmp_path / "result.pkl").exists()
