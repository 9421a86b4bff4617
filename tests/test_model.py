"""Tests for cascade.model: the frozen negative / trained anchor cascade, seamless tiling and the
Flare7K light-source re-blend."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cascade.errors import UserError
from cascade.model import (
    CascadedFlareRemover,
    blend_light_source,
    light_source_mask,
    remove_flare,
    tile_spans,
    tiled_apply,
)
from cascade.uformer import Uformer, save_checkpoint

TINY = dict(img_size=64, embed_dim=8, depths=(1,) * 9, win_size=4)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_uformer(seed: int = 0, **changes: object) -> Uformer:
    torch.manual_seed(seed)
    return Uformer(**{**TINY, **changes})


def image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


# -- the cascade --------------------------------------------------------------------------------
def test_from_uformer_copies_the_same_weights_into_both() -> None:
    base = tiny_uformer()
    cascade = CascadedFlareRemover.from_uformer(base)
    for a, b, c in zip(cascade.negative.parameters(), cascade.anchor.parameters(),
                       base.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)
        assert a.data_ptr() != b.data_ptr() != c.data_ptr()  # copies, not shared storage
    assert all(p.requires_grad for p in base.parameters())  # the source is left untouched
    assert not any(p.requires_grad for p in cascade.negative.parameters())
    assert all(p.requires_grad for p in cascade.anchor.parameters())


def test_from_checkpoint(tmp_path: Path) -> None:
    base = tiny_uformer()
    save_checkpoint(base, tmp_path / "base.pth")
    cascade = CascadedFlareRemover.from_checkpoint(tmp_path / "base.pth")
    assert cascade.anchor.arch == base.arch
    assert all(torch.equal(a, b) for a, b in zip(cascade.anchor.parameters(), base.parameters()))


def test_negative_stays_in_eval_mode() -> None:
    cascade = CascadedFlareRemover.from_uformer(tiny_uformer())
    cascade.train()
    assert cascade.training and cascade.anchor.training and not cascade.negative.training
    assert not any(m.training for m in cascade.negative.modules())
    cascade.eval()
    assert not cascade.anchor.training


def test_optimizer_step_changes_only_the_anchor() -> None:
    cascade = CascadedFlareRemover.from_uformer(tiny_uformer()).train()
    negative_before = {k: v.clone() for k, v in cascade.negative.state_dict().items()}
    anchor_before = {k: v.clone() for k, v in cascade.anchor.state_dict().items()}
    # Everything trainable is offered to the optimizer; only the anchor may move.
    optimizer = torch.optim.SGD(cascade.parameters(), lr=0.1)
    negative_out, anchor_out = cascade(image(32, 32))
    assert not negative_out.requires_grad and anchor_out.requires_grad
    (anchor_out - 0.5).pow(2).mean().backward()
    assert all(p.grad is None for p in cascade.negative.parameters())
    assert all(p.grad is not None for p in cascade.anchor.parameters())
    optimizer.step()
    for k, v in cascade.negative.state_dict().items():
        assert torch.equal(v, negative_before[k]), k  # bit-identical
    changed = [k for k, v in cascade.anchor.state_dict().items() if not torch.equal(v, anchor_before[k])]
    assert "input_proj.proj.0.weight" in changed and "output_proj.proj.0.bias" in changed


def test_anchor_receives_the_negative_output() -> None:
    cascade = CascadedFlareRemover(tiny_uformer(seed=1), tiny_uformer(seed=2)).eval()
    seen = {}
    cascade.anchor.register_forward_hook(lambda mod, args, out: seen.update(x=args[0]))
    x = image(32, 48)
    with torch.no_grad():
        negative_out, anchor_out = cascade(x)
        assert torch.equal(seen["x"], negative_out[:, :3])
        assert torch.equal(negative_out, cascade.negative(x))
        assert torch.allclose(anchor_out, cascade.anchor(cascade.negative(x)[:, :3]))
        assert not torch.allclose(anchor_out, cascade.anchor(x), atol=1e-3)
    assert negative_out.shape == anchor_out.shape == (1, 6, 32, 48)


# -- tiling ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,tile,overlap", [(512, 512, 64), (1000, 512, 128), (1300, 512, 128),
                                               (200, 48, 40), (65, 64, 0)])
def test_tile_spans_cover_with_full_tiles(size: int, tile: int, overlap: int) -> None:
    spans = tile_spans(size, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == size
    assert all(end - start == min(tile, size) for start, end in spans)
    assert all(b[0] <= a[1] - overlap for a, b in zip(spans, spans[1:]))  # overlap at least that
    assert all(a[0] < b[0] for a, b in zip(spans, spans[1:]))


@pytest.mark.parametrize("tile,overlap", [(64, 16), (48, 40), (100, 0), (37, 5)])
def test_tiling_a_pixelwise_function_is_exact(tile: int, overlap: int) -> None:
    """Weights that do not sum to one, or a seam, would show on a per-pixel function."""
    x = image(200, 150)

    def fn(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.sigmoid(4 * t - 2), t.mean(1, keepdim=True)], 1)

    out = tiled_apply(fn, x, tile=tile, overlap=overlap)
    assert out.shape == (1, 4, 200, 150)
    assert torch.allclose(out, fn(x), atol=1e-6)
    ones = tiled_apply(lambda t: torch.ones_like(t[:, :1]), x, tile=tile, overlap=overlap)
    assert torch.allclose(ones, torch.ones(1, 1, 200, 150), atol=1e-6)


def test_tiles_cross_fade_smoothly() -> None:
    """Two constant 'tiles' (tile index as value) blend with a monotone, gradual ramp."""
    calls = []

    def fn(t: torch.Tensor) -> torch.Tensor:
        calls.append(None)
        return torch.full_like(t[:, :1], float(len(calls)))

    out = tiled_apply(fn, torch.zeros(1, 1, 8, 100), tile=64, overlap=28)[0, 0, 0]
    assert len(calls) == 2
    assert torch.all(out[:36] == 1) and torch.all(out[64:] == 2)
    steps = out[36:64].diff()
    assert torch.all(steps > 0) and steps.max() < 0.06  # no jump anywhere in the overlap


def test_bad_tiling_arguments() -> None:
    with pytest.raises(UserError, match="overlap < tile"):
        tiled_apply(lambda t: t, image(8, 8), tile=16, overlap=16)


def test_single_tile_equals_single_pass_at_256() -> None:
    model = tiny_uformer(img_size=256, win_size=8).eval()
    x = image(256, 256)
    with torch.no_grad():
        single = model(x)
    for tile in (256, 512):
        assert torch.allclose(remove_flare(model, x, tile=tile), single, atol=1e-4)


def test_tiled_uformer_and_cascade_shapes() -> None:
    model = tiny_uformer().eval()
    x = image(80, 70)
    out = remove_flare(model, x, tile=64, overlap=16)
    assert out.shape == (1, 6, 80, 70) and 0 < out.min() and out.max() < 1
    cascade = CascadedFlareRemover.from_uformer(model).eval()
    with torch.no_grad():
        expected = cascade(x)[1]
    assert torch.allclose(remove_flare(cascade, x, tile=128), expected, atol=1e-6)



# -- light-source re-blend ------------------------------------------------------------------------
def disk_image(h: int = 100, w: int = 120, radius: int = 10, centre: tuple[int, int] = (50, 60),
               speck: bool = False) -> torch.Tensor:
    """(3, H, W): dark background 0.2 with a saturated disk (and optionally a 1-px bright speck)."""
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img = torch.full((3, h, w), 0.2)
    img[:, (y - centre[0]) ** 2 + (x - centre[1]) ** 2 <= radius**2] = 1.0
    if speck:
        img[:, 5, 5] = 1.0
    return img


def test_light_source_mask_covers_the_light_and_drops_specks() -> None:
    mask = light_source_mask(disk_image(speck=True))
    assert mask.shape == (100, 120) and mask.min() >= 0 and mask.max() <= 1
    assert mask[50, 60] == 1.0  # the light's centre is taken from the input
    assert mask[5, 5] == 0.0  # a one-pixel speck does not survive the opening
    assert mask[0, 119] == 0.0 and mask[99, 0] == 0.0
    # soft edge a few pixels outside the disk (radius 10), monotone going outwards
    profile = mask[50, 60:80]
    assert 0 < mask[50, 73] < 1 and torch.all(profile.diff() <= 0)


def test_light_source_mask_without_light_is_zero() -> None:
    assert torch.equal(light_source_mask(torch.full((3, 40, 40), 0.5)), torch.zeros(40, 40))


def test_blend_light_source() -> None:
    inputs = disk_image()[None]
    deflared = torch.full_like(inputs, 0.3)
    blended = blend_light_source(inputs, deflared)
    mask = light_source_mask(inputs[0])
    assert torch.allclose(blended, inputs * mask + deflared * (1 - mask))
    assert blended[0, :, 50, 60].tolist() == [1.0, 1.0, 1.0]
    assert blended[0, :, 0, 0].tolist() == pytest.approx([0.3] * 3)


def test_remove_flare_blend_is_off_by_default_and_keeps_flare_channels() -> None:
    model = tiny_uformer().eval()
    x = disk_image(64, 64, radius=8, centre=(32, 32))[None]
    plain = remove_flare(model, x)
    blended = remove_flare(model, x, blend_light=True)
    assert torch.equal(plain[:, 3:], blended[:, 3:])
    assert torch.allclose(blended[0, :3, 32, 32], torch.ones(3))
    assert not torch.allclose(plain[0, :3, 32, 32], torch.ones(3), atol=1e-3)
