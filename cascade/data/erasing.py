"""Random erasing of training inputs, as a pure function of each sample's seed.

Semantics are torchvision's `transforms.RandomErasing(p, scale=(0.02, 0.33), ratio=(0.3, 3.3),
value=0)`: with probability p, one box of area fraction U(scale) and aspect ratio log-U(ratio)
(h = round(sqrt(area * ratio)), w = round(sqrt(area / ratio)), up to 10 tries for a box strictly
smaller than the image, else nothing is erased) is set to `value`. `erase_box` makes torchvision's
random draws in torchvision's order, so with a generator seeded s it picks the box that
`RandomErasing` picks after `torch.manual_seed(s)` (tested).

Two targets (`TrialConfig.random_erasing_on`, names in `cascade.config.ERASING_TARGETS`):
- "background": the box is erased in the flare-free background before the flare (and, in
  Flare7K++ data, the light source) is composited onto it, so it is in the input *and* in the
  ground truth. That is what the paper's sentence says: "the background images were augmented
  using random crop, vertical flip, horizontal flip, and random erasing techniques" — an
  augmentation of the backgrounds, like the crop and flips beside it (`background_boxes`).
- "input": the box is erased in the network's input only and the ground truth keeps the content
  (Zhong et al., AAAI 2020: an occlusion augmentation; input = gt + flare no longer holds inside
  the box). Kept as a named option: it teaches something else, filling in unseen content.
Either way the box is drawn relative to the returned training crop (same box statistics for both
targets), from the same per-sample stream, so the two options erase the same box of the same
sample. Used by `Flare7KPairs` and `ProceduralPairs`.

Randomness: each sample's box comes from a CPU `torch.Generator` seeded by
`derive_seed("flaresweep-erasing", sample seed)`, a stream separate from every other use of that
seed, so the box is the same on any device, batch composition or worker count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from cascade.seeds import derive_seed

SCALE = (0.02, 0.33)  # torchvision RandomErasing defaults
RATIO = (0.3, 3.3)
VALUE = 0.0


def erase_box(g: torch.Generator, height: int, width: int, p: float,
              scale: tuple[float, float] = SCALE, ratio: tuple[float, float] = RATIO,
              ) -> tuple[int, int, int, int] | None:
    """(top, left, h, w) of the box to erase in a `height` x `width` image, or None.

    Draws exactly as `RandomErasing.forward` + `get_params` do (one `rand` for p, then per try
    a uniform area, a uniform log-ratio and, on success, two `randint`s), from `g`.
    """
    if not float(torch.rand(1, generator=g)) < p:
        return None
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        erase_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        aspect = torch.exp(torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]),
                                                   generator=g)).item()
        h = int(round(math.sqrt(erase_area * aspect)))
        w = int(round(math.sqrt(erase_area / aspect)))
        if not (h < height and w < width):
            continue
        top = int(torch.randint(0, height - h + 1, size=(1,), generator=g).item())
        left = int(torch.randint(0, width - w + 1, size=(1,), generator=g).item())
        return top, left, h, w
    return None  # torchvision returns the image unchanged


def erasing_generator(sample_seed: int) -> torch.Generator:
    """The CPU generator of one sample's erasing draws (a stream of its own, see module doc)."""
    return torch.Generator().manual_seed(derive_seed("flaresweep-erasing", int(sample_seed)))


def sample_boxes(seeds: Sequence[int], height: int, width: int, p: float
                 ) -> list[tuple[int, int, int, int] | None]:
    """Each sample's box (top, left, h, w) in a `height` x `width` crop, or None (see module doc).

    The boxes `random_erase` erases with the same arguments; callers that erase a background
    before compositing (the "background" target) place them themselves."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"random erasing: p={p} is not a probability in [0, 1]")
    if p == 0:
        return [None] * len(seeds)
    return [erase_box(erasing_generator(sd), height, width, p) for sd in seeds]


def random_erase(x: torch.Tensor, seeds: Sequence[int], p: float,
                 value: float = VALUE) -> torch.Tensor:
    """Erase one random box per sample of `x` (B, C, H, W) with probability `p`.

    `seeds[i]` is sample i's seed (any int); returns a new tensor (x is not modified), equal to
    `x` when p == 0. Value range is untouched except inside the boxes, which hold `value`.
    """
    if len(seeds) != x.shape[0]:
        raise ValueError(f"random_erase: {len(seeds)} seeds for a batch of {x.shape[0]}")
    out = x.clone()
    for i, box in enumerate(sample_boxes(seeds, x.shape[-2], x.shape[-1], p)):
        if box is not None:
            top, left, h, w = box
            out[i, :, top:top + h, left:left + w] = value
    return out
