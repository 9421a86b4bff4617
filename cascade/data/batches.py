"""A trial's training batches: the pairs a config trains on and the global batch of each step.

- `build_pairs(cfg)`: the training pairs (`ProceduralPairs` or `Flare7KPairs`, with the config's
  erasing and loader), `.batch(indices, device) -> (input, gt, flare)`;
- `step_indices(cfg, step)`: the sample indices of a step's global batch (step*B .. step*B+B-1);
- `batches(pairs, cfg, dp, start, stop)`: this rank's batches of a range of steps, Flare7K files
  decoded in `num_workers` loader processes (`DecodeSteps`), synthesis batched on the device.
Data is a pure function of (seed, step): resuming at step s sees what an uninterrupted run saw.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from cascade.config import TrialConfig
from cascade.data.synthetic import frame_side

if TYPE_CHECKING:
    from cascade.distributed import DataParallel


def build_pairs(cfg: TrialConfig) -> Any:
    """Training pairs with `.batch(indices, device) -> (input, gt, flare)` (B, 3, crop, crop)."""
    if cfg.data is not None:
        from cascade.data.flare7k import Flare7KPairs

        return Flare7KPairs(cfg.data, cfg.backgrounds, cfg.crop, cfg.seed,
                            random_erasing=cfg.random_erasing, erasing_on=cfg.random_erasing_on,
                            loader=cfg.data_loader)
    from cascade.data.synthetic import ProceduralPairs

    # Crops of frames rendered at the test resolution, as the base's (`frame_side`): flares then
    # have the test images' size in pixels, as Flare7K synthesises at full size and crops.
    return ProceduralPairs(cfg.crop, cfg.seed, frame=frame_side(cfg.crop, cfg.test_size),
                           random_erasing=cfg.random_erasing, erasing_on=cfg.random_erasing_on)


def data_loader(pairs: Any) -> str:
    """Which pair synthesis a trial trained on: "procedural", or the official loader the Flare7K
    data follows ("flare7kpp" with light sources, "flare7k" without; `Flare7KPairs.loader`)."""
    return getattr(pairs, "loader", "procedural")


def step_indices(cfg: TrialConfig, step: int) -> torch.Tensor:
    """Sample indices of the global batch of `step` (0-based): step*B .. step*B + B - 1."""
    return torch.arange(step * cfg.batch_size, (step + 1) * cfg.batch_size)


def batches(pairs: Any, cfg: TrialConfig, dp: DataParallel, start: int, stop: int | None = None
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """This rank's (input, gt, flare) for steps start .. stop-1 (default: steps-1), on dp.device.

    Flare7K files are decoded in `num_workers` loader processes (each sample is a pure function of
    its index, so workers do not change the data); synthesis runs batched on the device.
    """
    steps = range(start, cfg.steps if stop is None else stop)
    if cfg.data is not None and cfg.num_workers > 0:
        loader = torch.utils.data.DataLoader(
            DecodeSteps(pairs, cfg, dp, steps), batch_size=None, num_workers=cfg.num_workers,
            persistent_workers=False, prefetch_factor=2,
        )
        for raw in loader:
            yield pairs.synthesize(raw, dp.device)
    else:
        for step in steps:
            yield pairs.batch(dp.shard(step_indices(cfg, step)), dp.device)


class DecodeSteps(torch.utils.data.Dataset):
    """Item i = this rank's decoded raw samples of step steps[i] (Flare7K CPU side)."""

    def __init__(self, pairs: Any, cfg: TrialConfig, dp: DataParallel, steps: range) -> None:
        self.pairs, self.cfg, self.steps = pairs, cfg, steps
        self.rank, self.world = dp.rank, dp.world_size

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: int) -> list[Any]:
        idx = step_indices(self.cfg, self.steps[i])[self.rank :: self.world]
        return [self.pairs.decode(int(j)) for j in idx]
