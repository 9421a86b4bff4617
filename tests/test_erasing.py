"""Tests for cascade.data.erasing: torchvision RandomErasing semantics, per-sample purity."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import RandomErasing

from cascade.data import erasing


@pytest.mark.parametrize("shape", [(3, 16, 16), (3, 37, 23), (3, 128, 128), (3, 1, 40)])
@pytest.mark.parametrize("p", [0.5, 1.0])
def test_same_box_as_torchvision(shape: tuple[int, int, int], p: float) -> None:
    """A generator seeded s gives the box torchvision erases after torch.manual_seed(s)."""
    ref_op = RandomErasing(p=p, scale=erasing.SCALE, ratio=erasing.RATIO, value=erasing.VALUE)
    img = torch.rand(shape, generator=torch.Generator().manual_seed(1)) + 0.5  # never 0
    state = torch.random.get_rng_state()
    erased = 0
    try:
        for s in range(40):
            torch.manual_seed(s)
            ref = ref_op(img.clone())
            box = erasing.erase_box(torch.Generator().manual_seed(s), shape[1], shape[2], p)
            ours = img.clone()
            if box is not None:
                top, left, h, w = box
                ours[:, top:top + h, left:left + w] = erasing.VALUE
                erased += h * w > 0
            torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    finally:
        torch.random.set_rng_state(state)
    if shape[1] > 1:
        assert erased >= (10 if p < 1 else 35)  # boxes really were drawn and compared


def test_random_erase_p0_is_identity_and_p1_erases_input_boxes() -> None:
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) + 0.1
    seeds = [11, 12, 13, 14]
    same = erasing.random_erase(x, seeds, 0.0)
    assert same is not x and torch.equal(same, x)
    y = erasing.random_erase(x, seeds, 1.0)
    assert torch.equal(x, x.clone()) and not torch.equal(y, x)  # x itself untouched
    for i, sd in enumerate(seeds):
        top, left, h, w = erasing.erase_box(erasing.erasing_generator(sd), 32, 32, 1.0)
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[top:top + h, left:left + w] = True
        area = int(inside.sum())
        assert 0.02 * 1024 * 0.8 <= area <= 0.33 * 1024 * 1.2  # scale (0.02, 0.33), rounded
        assert bool((y[i][:, inside] == 0).all())
        assert torch.equal(y[i][:, ~inside], x[i][:, ~inside])


def test_random_erase_is_per_sample() -> None:
    """A sample's box depends on its seed only, not on the rest of the batch."""
    x = torch.rand(5, 3, 24, 24, generator=torch.Generator().manual_seed(2)) + 0.1
    seeds = [3, 1, 4, 1, 5]
    full = erasing.random_erase(x, seeds, 0.7)
    part = erasing.random_erase(x[2:], seeds[2:], 0.7)
    assert torch.equal(full[2:], part)
    assert torch.equal(full[1], erasing.random_erase(x[1:2], [1], 0.7)[0])
    boxes = {erasing.erase_box(erasing.erasing_generator(s), 24, 24, 1.0) for s in range(20)}
    assert len(boxes) > 15  # seeds give different boxes
    # the erasing stream is not the generator a caller seeds with the same number
    assert erasing.erasing_generator(3).initial_seed() != 3


def test_random_erase_rejects_bad_arguments() -> None:
    x = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match="1 seeds for a batch of 2"):
        erasing.random_erase(x, [1], 0.5)
    with pytest.raises(ValueError, match="p=1.5 is not a probability"):
        erasing.random_erase(x, [1, 2], 1.5)
