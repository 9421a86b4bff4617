"""Data-parallel layer: 2 gloo ranks on CPU average gradients like one process on the whole batch."""

from __future__ import annotations

import pytest
import torch

from cascade import distributed
from cascade.errors import UserError


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
