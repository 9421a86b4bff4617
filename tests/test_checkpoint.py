"""Training checkpoints: RNG round-trip, atomic save, exact resume, config mismatch refused."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from cascade import checkpoint as ckpt
from cascade.errors import UserError


def _draws() -> tuple[torch.Tensor, float, float]:
    return torch.rand(4), float(np.random.rand()), random.random()


def test_rng_state_round_trip_restores_every_generator():
    state = ckpt.capture_rng_state()
    first = _draws()
    restore_target = _draws()  # advance further, so a no-op restore would be caught
    assert not torch.equal(first[0], restore_target[0])
    ckpt.restore_rng_state(state)
    again = _draws()
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


def _objects(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    return model, opt, sched


def _step(model, opt, sched, step: int) -> None:
    # data: a pure function of the step; dropout: the global RNG (restored from the checkpoint)
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


def test_resume_is_bit_identical(tmp_path):
    model, opt, sched = _objects()
    for s in range(6):
        _step(model, opt, sched, s)
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt, sched = _objects()
    for s in range(3):
        _step(model, opt, sched, s)
    ckpt.save_training_checkpoint(tmp_path, step=3, model=model, optimizer=opt, scheduler=sched,
                                  config={"seed": 0}, extra={"base": "x"})
    torch.rand(100)  # disturb the RNG as a new process would have a different state

    model, opt, sched = _objects(seed=123)  # fresh objects, different init: all must be restored
    state = ckpt.load_training_checkpoint(tmp_path)
    start = ckpt.restore_training_state(state, model=model, optimizer=opt, scheduler=sched)
    assert start == 3 and state["extra"] == {"base": "x"}
    for s in range(start, 6):
        _step(model, opt, sched, s)
    for k, v in model.state_dict().items():
        assert torch.equal(v, straight[k]), k
    assert (tmp_path / "config.json").is_file()


def test_missing_checkpoint_is_none_and_garbage_is_a_user_error(tmp_path):
    assert ckpt.load_training_checkpoint(tmp_path) is None
    ckpt.checkpoint_path(tmp_path).write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="last.pt"):
        ckpt.load_training_checkpoint(tmp_path)


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, opt, sched = _objects()
    ckpt.save_training_checkpoint(tmp_path, step=1, model=model, optimizer=opt, scheduler=sched, config={})

    def boom(*args, **kwargs):
        raise KeyboardInterrupt  # a kill in the middle of torch.save

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_training_checkpoint(tmp_path, step=2, model=model, optimizer=opt, scheduler=sched, config={})
    assert ckpt.load_training_checkpoint(tmp_path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp litter


def test_check_resumable_names_changed_keys_and_ignores_runtime_ones():
    ckpt.check_resumable({"lr": 0.1, "log_every": 1}, {"lr": 0.1, "log_every": 5}, ("log_every",), "t")
    with pytest.raises(UserError, match=r"lr: 0.1 -> 0.2"):
        ckpt.check_resumable({"lr": 0.1}, {"lr": 0.2}, (), "t")
