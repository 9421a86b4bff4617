"""Random erasing of training inputs, as a pure function of each sample's seed.

Semantics are torchvision's `transforms.RandomErasing(p, scale=(0.02, 0.33), ratio=(0.3, 3.3),
value=0)`: with probability p, one box of area fraction U(scale) and aspect ratio log-U(ratio)
(h = round(sqrt(area * ratio)), w = round(sqrt(area / ratio)), up to 10 tries for a box strictly
smaller than the image, else nothing is erased) is set to `value`. `erase_box` makes torchvision's
random draws in torchvision's order, so with a generator seeded s it picks the box that
`RandomErasing` picks after `torch.manual_seed(s)` (tested).

Input only, why: the paper (Song & Bae) lists random erasing next to random crop and flips as a
training augmentation and gives no further detail. Random erasing (Zhong et al., AAAI 2020) is an
occlusion augmentation of the network's *input*: the target stays the clean image, so the network
learns to restore content it cannot see instead of copying it. Erasing the same box in input and
gt would instead teach "black in, black out" and leave the loss there at zero; only the input is
therefore erased, and gt and the flare target are left unchanged (input = gt + flare no longer
holds inside the box, on purpose). Used by `Flare7KPairs` and `ProceduralPairs`, after the crop
and flips, so the box is relative to the returned crop.

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


def random_erase(x: torch.Tensor, seeds: Sequence[int], p: float,
                 value: float = VALUE) -> torch.Tensor:
    """Erase one random box per sample of `x` (B, C, H, W) with probability `p`.

    `seeds[i]` is sample i's seed (any int); returns a new tensor (x is not modified), equal to
    `x` when p == 0. Value range is untouched except inside the boxes, which hold `value`.
    """
    if len(seeds) != x.shape[0]:
        raise ValueError(f"random_erase: {len(seeds)} seeds for a batch of {x.shape[0]}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"random_erase: p={p} is not a probability in [0, 1]")
    out = x.clone()
    if p == 0:
        return out
    height, width = x.shape[-2:]
    for i, sd in enumerate(seeds):
        box = erase_box(erasing_generator(sd), height, width, p)
        if box is not None:
            top, left, h, w = box
            out[i, :, top:top + h, left:left + w] = value
    return out
