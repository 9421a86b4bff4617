"""Worker for tests/test_hvd.py, run on every rank by `horovodrun -np N --gloo python THIS OUT_DIR`.

Each rank checks Horovod's collectives and one data-parallel SGD step, then writes
OUT_DIR/rank<r>.json for the test to compare across ranks:
- `rank_mean` / `rank_sum`: allreduce (average / sum) of the ranks' own rank numbers;
- `initial`: parameters after `broadcast_parameters` (each rank initialises differently first);
- `stepped`: parameters after one `DistributedOptimizer` step on this rank's shard of a global
  batch; `reference`: one plain SGD step on the whole batch from the same start (same values
  when gradients are averaged over ranks, since the shards are equal-sized).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import horovod.torch as hvd
import torch


def _flat(model: torch.nn.Module) -> list[float]:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist()


def _sgd_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def main(out_dir: Path) -> None:
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    own = torch.tensor([float(rank)])
    rank_mean = hvd.allreduce(own, name="rank_mean", op=hvd.Average).item()
    rank_sum = hvd.allreduce(own, name="rank_sum", op=hvd.Sum).item()

    torch.manual_seed(100 + rank)  # different initial weights on every rank, on purpose
    model = torch.nn.Linear(3, 1)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    initial = _flat(model)

    # Reference: a single process taking the same step on the whole global batch.
    reference_model = torch.nn.Linear(3, 1)
    reference_model.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4 * size, 3, generator=g), torch.randn(4 * size, 1, generator=g)  # (4N, 3), (4N, 1)
    _sgd_step(reference_model, torch.optim.SGD(reference_model.parameters(), lr=0.1), x, y)

    _sgd_step(model, opt, x[rank::size], y[rank::size])  # this rank's shard: (4, 3)
    result = {"rank": rank, "size": size, "rank_mean": rank_mean, "rank_sum": rank_sum,
              "initial": initial, "stepped": _flat(model), "reference": _flat(reference_model)}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    hvd.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
