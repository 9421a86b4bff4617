"""Tests for cascade.model: the frozen negative / trained anchor cascade, seamless tiling, the
Flare7K light-source re-blend, test_large.py's large-photo mode and the official output per base
kind."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageChops
from torch import nn
from torchvision import transforms

from cascade.data.images import to_tensor, to_uint8
from cascade.errors import UserError
from cascade.model import (
    CascadedFlareRemover,
    blend_light_source,
    flare7k_large,
    flare7k_large_ends,
    flare7k_large_size,
    light_kernel_size,
    light_source_mask,
    official_output,
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



# -- blend kernel (flare_util.py:119-144 @ d1fb66e) ------------------------------------------------
def official_light_source_mask(image: torch.Tensor, threshold: float) -> np.ndarray:
    """flare_util.blend_light_source's mask transcribed line by line, with skimage's own opening,
    label and regionprops; cv2.filter2D (not installed) as scipy's correlate with mode 'mirror'
    (= BORDER_REFLECT_101; origin k // 2 like OpenCV's default anchor), direct, in float64."""
    import skimage
    from scipy import ndimage
    from skimage import morphology

    binary = (image.mean(0) > threshold).numpy()
    with warnings.catch_warnings():  # binary_opening is deprecated in skimage 0.26, still there
        warnings.simplefilter("ignore", FutureWarning)
        binary = morphology.binary_opening(binary, morphology.disk(np.ceil(.5 * 0.01 * max(binary.shape))))
    max_diameter = 0
    for p in skimage.measure.regionprops(skimage.measure.label(binary)):
        max_diameter = max(max_diameter, p["equivalent_diameter_area"])
    kernel_size = round(1.5 * max_diameter)
    if kernel_size == 0:
        return np.zeros(binary.shape, np.float32)
    x = np.arange(kernel_size) - (kernel_size - 1) / 2
    xx, yy = np.meshgrid(x, x)
    kernel = np.float32(np.sqrt(xx**2 + yy**2) <= np.max(x)) + 1e-7
    kernel = kernel / np.sum(kernel)
    mask = ndimage.correlate(np.float64(binary), np.float64(kernel), mode="mirror")
    return np.clip(np.float32(mask) * 3.0, 0.0, 1.0)


def square_image(h: int, w: int, squares: list[tuple[int, int, int]], level: float = 1.0
                 ) -> torch.Tensor:
    """(3, H, W): background 0.2 with saturated squares (top, left, side)."""
    img = torch.full((3, h, w), 0.2)
    for top, left, side in squares:
        img[:, top:top + side, left:left + side] = level
    return img


def test_blend_kernel_is_1_5_equivalent_diameters_of_the_largest_light() -> None:
    # 200 px long side: opening disk radius ceil(1) = 1, a 3x3 cross. It keeps a 20x20 square
    # except its 4 corners (396 px): equivalent diameter sqrt(4 * 396 / pi) = 22.454 -> round(33.68)
    # = 34, where 0.5 x would give 11 and the bounding-box side 30. The 10x10 square (96 px) is
    # smaller, so it does not set the size.
    img = square_image(200, 160, [(40, 40, 20), (150, 100, 10)])
    binary = (img.mean(0) > 0.97).numpy()
    assert light_kernel_size(binary) == 34  # the unopened square: 400 px -> round(33.85) = 34
    from scipy import ndimage
    from skimage.morphology import disk
    opened = ndimage.binary_dilation(ndimage.binary_erosion(binary, disk(1), border_value=1),
                                     disk(1), border_value=0)
    assert opened.sum() == 396 + 96
    assert light_kernel_size(opened) == round(1.5 * math.sqrt(4 * 396 / math.pi)) == 34
    assert light_kernel_size(np.zeros((8, 8), bool)) == 0
    # A 1-px line of 30 px has the area of a 6-px disk: kernel round(1.5 * 6.18) = 9, not 45.
    line = np.zeros((50, 50), bool)
    line[10, 5:35] = True
    assert light_kernel_size(line) == 9


def test_blend_reaches_the_official_distance_and_equals_the_reference() -> None:
    img = square_image(200, 160, [(40, 40, 20), (150, 100, 10)])
    mask = light_source_mask(img)
    assert np.array_equal(mask.numpy(), official_light_source_mask(img, 0.97))
    # Kernel 34, anchor 17: pixel x sees columns x - 17 .. x + 16, so the 1e-7 floor of the kernel
    # first touches the square (columns 40..59) at column 24 and last at 76; the disk part of the
    # kernel (radius 16.5) from column 25 to 75. A 0.5 x kernel (11) would stop 6 px out (column 34).
    row = mask[49]
    assert row[23] == 0 and 0 < row[24] < 1e-6 and row[25] > 0.04
    assert row[75] > 0.04 and 0 < row[76] < 1e-6 and row[77] == 0
    assert row[30] > 0.3 and torch.all(row[25:40].diff() > 0) and torch.all(row[39:62] == 1)
    assert mask[50, 50] == 1.0  # the light's centre is wholly the input


@pytest.mark.parametrize("h,w,blobs,threshold", [
    (97, 131, [(40, 40, 9), (80, 100, 12)], 0.97),
    (64, 64, [(30, 20, 3)], 0.95),
    (120, 90, [(10, 10, 30), (70, 50, 11), (100, 80, 2)], 0.97),
])
def test_light_source_mask_matches_the_transcribed_reference(
        h: int, w: int, blobs: list[tuple[int, int, int]], threshold: float) -> None:
    g = torch.Generator().manual_seed(h * w)
    img = torch.rand(3, h, w, generator=g) * 0.9
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    for cy, cx, r in blobs:
        img[:, (y - cy) ** 2 + (x - cx) ** 2 <= r * r] = 0.99
    ours = light_source_mask(img, threshold).numpy()
    ref = official_light_source_mask(img, threshold)
    assert ref.max() == 1.0
    assert np.abs(ours - ref).max() <= 2e-7  # FFT sums vs direct float64 sums, then float32
    assert np.array_equal(ours > 0, ref > 0)


# -- official output per base kind ------------------------------------------------------------------
class StubNetwork(nn.Module):
    """A 6-channel 'Uformer' whose output we control: deflared = 0.7 x + 0.2 mean(tile) + 0.05 (so
    strips of one photo differ where they overlap), flare = a constant 0.1."""

    arch = {"img_ch": 3, "output_ch": 6}  # what CascadedFlareRemover checks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        deflared = 0.7 * x + 0.2 * x.mean() + 0.05
        return torch.cat([deflared, torch.full_like(x, 0.1)], 1)


class ConstantNetwork(nn.Module):
    """deflared = 0.3, flare = 0.1 everywhere."""

    arch = {"img_ch": 3, "output_ch": 6}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.full_like(x, 0.3), torch.full_like(x, 0.1)], 1)


def lights_image() -> torch.Tensor:
    """(1, 3, 120, 100): 0.2 background, a saturated disk (mean 1) and a disk of mean 0.96, which
    only test_large.py's threshold (0.95), not test.py's (0.97), counts as a light."""
    img = disk_image(120, 100, radius=8, centre=(30, 30))
    y, x = torch.meshgrid(torch.arange(120), torch.arange(100), indexing="ij")
    img[:, (y - 90) ** 2 + (x - 70) ** 2 <= 64] = 0.96
    return img[None]


def test_flare7kpp_keeps_channels_0_3_as_they_are() -> None:
    x = lights_image()
    for mode in ("native", "flare7k-large"):
        out = official_output(ConstantNetwork(), x, "flare7kpp", mode=mode)
        assert out.shape == (1, 3, 120, 100)
    assert torch.equal(official_output(ConstantNetwork(), x, "flare7kpp"), torch.full_like(x, 0.3))


def test_flare7k_v1_blends_the_light_source_back_at_0_97() -> None:
    x = lights_image()
    out = official_output(ConstantNetwork(), x, "flare7k")  # native: test.py
    mask = light_source_mask(x[0], 0.97)
    assert torch.equal(out, x * mask + 0.3 * (1 - mask))
    assert out[0, :, 30, 30].tolist() == [1.0, 1.0, 1.0]  # the saturated light, from the input
    assert out[0, :, 90, 70].tolist() == pytest.approx([0.3] * 3)  # mean 0.96 < 0.97: not a light
    assert out[0, :, 115, 5].tolist() == pytest.approx([0.3] * 3)


def test_cascade_rows_blend_the_original_inputs_light() -> None:
    cascade = CascadedFlareRemover(ConstantNetwork(), StubNetwork())  # type: ignore[arg-type]
    x = lights_image()
    out = official_output(cascade, x, "flare7k")
    anchor = StubNetwork()(torch.full_like(x, 0.3))[:, :3]  # the anchor sees the negative's 0.3
    mask = light_source_mask(x[0], 0.97)
    assert torch.allclose(out, x * mask + anchor * (1 - mask))
    assert out[0, :, 30, 30].tolist() == [1.0, 1.0, 1.0]


def test_bad_base_kind_or_mode() -> None:
    x = lights_image()
    with pytest.raises(UserError, match="base_kind: expected one of flare7k, flare7kpp"):
        official_output(ConstantNetwork(), x, "flare7k_v1")
    with pytest.raises(UserError, match="mode: expected one of native, flare7k-large"):
        official_output(ConstantNetwork(), x, "flare7k", mode="large")


# -- test_large.py (@ d1fb66e) ------------------------------------------------------------------------
def official_large(model: nn.Module, merge_img: Image.Image, flare7kpp_flag: bool) -> np.ndarray:
    """test_large.py's ImageProcessor and demo() transcribed line by line (CPU, output_ch 6),
    the light-source blend through cascade.model.blend_light_source (tested on its own above)."""
    to_tensor = transforms.ToTensor()

    def resize_image(image: Image.Image, target_size: int) -> Image.Image:
        original_width, original_height = image.size
        aspect_ratio = original_width / original_height
        if original_width < original_height:
            new_width = target_size
            new_height = int(target_size / aspect_ratio)
        else:
            new_height = target_size
            new_width = int(target_size * aspect_ratio)
        return image.resize((new_width, new_height))

    def process_image(image: Image.Image) -> torch.Tensor:
        resized_image = resize_image(image, 512)
        resized_width, resized_height = resized_image.size
        segments, overlaps = [], []
        if resized_width > 512:
            for end_x in range(512, resized_width + 256, 256):
                end_x = min(end_x, resized_width)
                overlaps.append(end_x)
                cropped_image = resized_image.crop((end_x - 512, 0, end_x, 512))
                segments.append(model(to_tensor(cropped_image).unsqueeze(0)).squeeze(0))
        else:
            for end_y in range(512, resized_height + 256, 256):
                end_y = min(end_y, resized_height)
                overlaps.append(end_y)
                cropped_image = resized_image.crop((0, end_y - 512, 512, end_y))
                segments.append(model(to_tensor(cropped_image).unsqueeze(0)).squeeze(0))
        overlaps = [0] + [prev - cur + 512 for prev, cur in zip(overlaps[:-1], overlaps[1:])]
        for i in range(1, len(segments)):
            overlap = overlaps[i]
            alpha = torch.linspace(0, 1, steps=overlap)
            if resized_width > 512:
                alpha = alpha.view(1, -1, 1).expand(512, -1, 6).permute(2, 0, 1)
                segments[i][:, :, :overlap] = (alpha * segments[i][:, :, :overlap]
                                               + (1 - alpha) * segments[i - 1][:, :, -overlap:])
            else:
                alpha = alpha.view(-1, 1, 1).expand(-1, 512, 6).permute(2, 0, 1)
                segments[i][:, :overlap, :] = (alpha * segments[i][:, :overlap, :]
                                               + (1 - alpha) * segments[i - 1][:, -overlap:, :])
        if resized_width > 512:
            blended = [s[:, :, :-o] for s, o in zip(segments[:-1], overlaps[1:])] + [segments[-1]]
            return torch.cat(blended, dim=2)
        blended = [s[:, :-o, :] for s, o in zip(segments[:-1], overlaps[1:])] + [segments[-1]]
        return torch.cat(blended, dim=1)

    with torch.no_grad():
        output_img = process_image(merge_img).unsqueeze(0)
        deflare_img = output_img[:, :3, :, :]  # predict_flare_from_6_channel
        if not flare7kpp_flag:
            deflare_img = blend_light_source(to_tensor(resize_image(merge_img, 512)).unsqueeze(0),
                                             deflare_img, 0.95)
        deflare_img_np = deflare_img.squeeze(0).permute(1, 2, 0).clamp(0, 1).cpu().numpy()
        deflare_img_pil = Image.fromarray((deflare_img_np * 255).astype(np.uint8))
        flare_img_orig = ImageChops.difference(merge_img.resize(deflare_img_pil.size), deflare_img_pil)
        deflare_img_orig = ImageChops.difference(
            merge_img, flare_img_orig.resize(merge_img.size, resample=Image.BICUBIC))
    return np.asarray(deflare_img_orig)


def photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint8: per-channel ramps along both axes (so strips differ in mean) plus noise,
    with two saturated lights, one across the seam of the first two strips."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    slopes = rng.uniform(-0.4, 0.4, (2, 3))
    scene = 0.4 + slopes[0] * xx[..., None] + slopes[1] * yy[..., None]
    scene = scene + 0.05 * rng.standard_normal((h, w, 3))
    for cy, cx, r in ((h // 3, int(w * 0.42), h // 20), (2 * h // 3, w // 8, h // 30)):
        scene[(yy * max(h, w) - cy) ** 2 + (xx * max(h, w) - cx) ** 2 <= r * r] = 1.0
    return np.floor(np.clip(scene, 0, 1) * 255 + 0.5).astype(np.uint8)


def test_large_mode_geometry() -> None:
    # 1024x768: aspect 4/3, long side int(682.67) = 682; strips end at 512 and 682 (overlap 342).
    assert flare7k_large_size(1024, 768) == (682, 512)
    assert flare7k_large_ends(682) == [512, 682]
    assert flare7k_large_size(768, 1024) == (512, 682)  # portrait: vertical strips
    assert flare7k_large_size(512, 512) == (512, 512) and flare7k_large_ends(512) == [512]
    assert flare7k_large_size(300, 200) == (768, 512)  # small photos are enlarged
    # 2048x768 -> 1365 px: overlaps 256, 256, 256 and 427 (the last two overlaps overlap).
    assert flare7k_large_size(2048, 768) == (1365, 512)
    assert flare7k_large_ends(1365) == [512, 768, 1024, 1280, 1365]


@pytest.mark.parametrize("w,h,base_kind", [
    (1024, 768, "flare7k"), (1024, 768, "flare7kpp"),  # 2 horizontal strips
    (768, 1024, "flare7k"),  # portrait: vertical strips
    (2048, 768, "flare7kpp"),  # 5 strips; the last two overlaps overlap (in-place order matters)
    (512, 512, "flare7k"),  # one strip; PIL's resize to the same size is a copy
    (300, 200, "flare7kpp"),  # enlarged to 768x512
])
def test_large_mode_equals_the_transcribed_test_large_py(w: int, h: int, base_kind: str) -> None:
    array = photo(w, h)
    x = to_tensor(array)[None]  # (1, 3, h, w)
    ours = official_output(StubNetwork(), x, base_kind, mode="flare7k-large")
    ref = official_large(StubNetwork(), Image.fromarray(array), base_kind == "flare7kpp")
    assert ours.shape == (1, 3, h, w)
    assert np.array_equal(to_uint8(ours[0]), ref)


def test_large_mode_by_hand_on_1024x768() -> None:
    """The official steps written out for this size, independently of both implementations."""
    array = photo(1024, 768, seed=3)
    full = Image.fromarray(array)
    small = np.array(full.resize((682, 512), Image.BICUBIC))  # test_large.py:62, PIL bicubic
    x = to_tensor(small)[None]
    net = StubNetwork()
    left, right = net(x[..., 0:512]), net(x[..., 170:682])  # strips [0, 512) and [170, 682)
    alpha = torch.linspace(0, 1, 342)  # overlap 512 - (682 - 512) = 342: columns 170..511
    merged = torch.cat([left[..., :170], alpha * right[..., :342] + (1 - alpha) * left[..., 170:],
                        right[..., 342:]], -1)
    deflared = blend_light_source(x, merged[:, :3], 0.95)  # v1, threshold 0.95 (:159)
    d8 = (deflared[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.uint8)  # truncation
    flare = np.abs(small.astype(int) - d8).astype(np.uint8)
    flare_full = np.asarray(Image.fromarray(flare).resize((1024, 768), Image.BICUBIC)).astype(int)
    expected = np.abs(array.astype(int) - flare_full).astype(np.uint8)
    ours = flare7k_large(net, to_tensor(array)[None], light_threshold=0.95)
    assert np.array_equal(to_uint8(ours[0]), expected)
    # The strips really differ in the overlap (so the cross-fade is exercised) and the light came
    # back: the light source at (256, 430) is saturated in the output, the stub alone would dim it.
    assert (left[:, :3, :, 170:] - right[:, :3, :, :342]).abs().min() > 1e-3
    assert (expected[256, 430] == 255).all()
    # test.py's threshold would not matter here, but a missing blend would.
    plain = flare7k_large(net, to_tensor(array)[None], light_threshold=None)
    assert not torch.equal(plain, ours)
