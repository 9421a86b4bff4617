"""The cascaded flare remover of Song & Bae, and inference on whole photographs.

`CascadedFlareRemover` chains two Uformers started from the same weights: the frozen *negative*
network sees the flared input; the trainable *anchor* network sees the negative's deflared output.
The loss (cascade.losses) pulls the anchor's output towards the ground truth and away from the
negative's.

`remove_flare` runs a Uformer or a cascade on images of any size at their native resolution: in
overlapping tiles (512 px, as the released networks were trained) blended with raised-cosine
weights that sum to one, so tiles leave no seams and an image that fits one tile gets exactly the
single-pass result. Optionally it re-blends saturated light sources from the input like Flare7K's
`test.py` (`blend_light_source`).

`official_output(model, image, base_kind, mode)` is what the evaluation calls, for the reference
and the cascade alike: the deflared image exactly as the official Flare7K scripts produce it for
that kind of base network. Both released Uformers (Flare7K v1 and Flare7K++) have 6 output
channels (deflared image 0:3, flare 3:6), so the kind is a config field, not a tensor shape:

- `flare7k` (v1): the light source is blended back from the input (test.py:97, threshold 0.97;
  test_large.py:159, threshold 0.95);
- `flare7kpp`: channels 0:3 as they are; the network keeps the light source itself
  (test.py:94-95, test_large.py:157).

`mode="native"` tiles at native resolution (test.py for the 512x512 test images);
`mode="flare7k-large"` is test_large.py: short side to 512, 512 px strips, the predicted flare
upsampled and subtracted at full resolution (`flare7k_large`). Line numbers refer to
github.com/ykdai/Flare7K @ d1fb66e.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cascade.errors import UserError
from cascade.uformer import Uformer, load_checkpoint

DEFAULT_TILE = 512
# Flare7K's test.py re-blends pixels whose channel mean exceeds 0.97 (test.py:97).
DEFAULT_LIGHT_THRESHOLD = 0.97
# blend_light_source's kernel side = round(1.5 x the largest light's equivalent diameter)
# (flare_util.py:133; 0.5 before commit c21e640).
LIGHT_KERNEL_FACTOR = 1.5

MODES = ("native", "flare7k-large")
BASE_KINDS = ("flare7k", "flare7kpp")
# mode -> base_kind -> channel-mean threshold of the official light-source re-blend (None: none).
OFFICIAL_LIGHT_THRESHOLDS: dict[str, dict[str, float | None]] = {
    "native": {"flare7k": 0.97, "flare7kpp": None},  # test.py:94-97
    "flare7k-large": {"flare7k": 0.95, "flare7kpp": None},  # test_large.py:157-159
}
# test_large.py: short side resized to 512 (:70), strips of 512 px every 256 px (:77, :84).
LARGE_TILE = 512
LARGE_STRIDE = 256


class CascadedFlareRemover(nn.Module):
    """negative (frozen) -> anchor (trained). Both map (B, 3, H, W) in [0, 1] to
    (B, output_ch, H, W) in (0, 1); the anchor's input is the negative's channels 0:3."""

    def __init__(self, negative: Uformer, anchor: Uformer) -> None:
        super().__init__()
        if negative.arch["output_ch"] < 3 or anchor.arch["img_ch"] != 3:
            raise UserError("CascadedFlareRemover: the negative must output an RGB image (>= 3 "
                            "channels) and the anchor must take 3 input channels")
        self.negative = negative
        self.anchor = anchor
        self.negative.requires_grad_(False)
        self.negative.eval()

    @classmethod
    def from_uformer(cls, model: Uformer) -> CascadedFlareRemover:
        """Two independent copies of `model` (which is left untouched)."""
        return cls(copy.deepcopy(model), copy.deepcopy(model))

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, **overrides: Any) -> CascadedFlareRemover:
        """Both networks from one checkpoint file (see cascade.uformer.load_checkpoint)."""
        return cls.from_uformer(load_checkpoint(path, **overrides))

    def train(self, mode: bool = True) -> CascadedFlareRemover:
        """Switch the anchor's mode; the negative stays in eval mode (no drop-path) always."""
        super().train(mode)
        self.negative.eval()
        return self

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) in [0, 1] -> (negative_out, anchor_out), each (B, output_ch, H, W)."""
        with torch.no_grad():  # the negative is a fixed function: build no graph for it
            negative_out = self.negative(x)
        anchor_out = self.anchor(negative_out[:, :3])
        return negative_out, anchor_out


# ------------------------------------------------------------------------------------------------
# Tiled inference
def default_overlap(tile: int) -> int:
    """A quarter of the tile side (128 px for 512 px tiles): wide enough for a gradual fade."""
    return tile // 4


def tile_spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) spans covering [0, size) with tiles of `tile` px overlapping >= `overlap` px.

    One span when the side fits a tile; otherwise the fewest full-size tiles, spread evenly.
    """
    if size <= tile:
        return [(0, size)]
    count = math.ceil((size - overlap) / (tile - overlap))
    starts = np.round(np.linspace(0, size - tile, count)).astype(int)
    return [(int(s), int(s) + tile) for s in starts]


def _ramp(n: int, device: torch.device) -> Tensor:
    """(n,) raised-cosine rise in (0, 1): ramp(j) + ramp(n-1-j) == 1, so two cross-fades sum to 1."""
    j = torch.arange(n, device=device, dtype=torch.float64)
    return torch.sin(math.pi * (j + 0.5) / (2 * n)) ** 2


def _axis_weights(spans: list[tuple[int, int]], device: torch.device) -> list[Tensor]:
    """Per span, (len,) weights: 1 inside, rising over the overlap with the previous span and
    falling over the overlap with the next. All > 0."""
    out = []
    for i, (start, end) in enumerate(spans):
        w = torch.ones(end - start, device=device, dtype=torch.float64)
        if i > 0 and spans[i - 1][1] > start:
            n = min(spans[i - 1][1] - start, end - start)
            w[:n] *= _ramp(n, device)
        if i + 1 < len(spans) and spans[i + 1][0] < end:
            n = min(end - spans[i + 1][0], end - start)
            w[end - start - n:] *= _ramp(n, device).flip(0)
        out.append(w)
    return out


def tiled_apply(fn: Callable[[Tensor], Tensor], x: Tensor, tile: int = DEFAULT_TILE,
                overlap: int | None = None) -> Tensor:
    """Apply an image-to-image `fn` in overlapping tiles and cross-fade the results.

    Args:
        fn: (B, C, h, w) -> (B, C', h, w), same spatial size.
        x: (B, C, H, W).
        tile: tile side in pixels; a side no longer than `tile` is processed whole.
        overlap: minimum overlap of neighbouring tiles, 0 <= overlap < tile; None: tile / 4.
    Returns:
        (B, C', H, W): the weighted mean of the tiles' outputs with weights normalised to sum to
        exactly one at every pixel; equal to `fn(x)` when the image fits one tile.
    """
    if overlap is None:
        overlap = default_overlap(tile)
    if tile < 1 or not 0 <= overlap < tile:
        raise UserError(f"tiling: need tile >= 1 and 0 <= overlap < tile, got tile={tile}, "
                        f"overlap={overlap}")
    H, W = x.shape[-2:]
    rows, cols = tile_spans(H, tile, overlap), tile_spans(W, tile, overlap)
    if len(rows) == 1 and len(cols) == 1:
        return fn(x)
    wy, wx = _axis_weights(rows, x.device), _axis_weights(cols, x.device)
    out: Tensor | None = None
    total = torch.zeros(H, W, device=x.device, dtype=torch.float64)
    for (y0, y1), w_row in zip(rows, wy):
        for (x0, x1), w_col in zip(cols, wx):
            y = fn(x[..., y0:y1, x0:x1])
            if out is None:
                out = torch.zeros(*y.shape[:2], H, W, device=x.device, dtype=torch.float32)
            w = w_row[:, None] * w_col[None, :]  # (h, w) float64
            out[..., y0:y1, x0:x1] += y.float() * w.float()
            total[y0:y1, x0:x1] += w
    assert out is not None
    return (out / total.float()).to(x.dtype)


# ------------------------------------------------------------------------------------------------
# Light-source re-blend (Flare7K basicsr/utils/flare_util.py:119-144)
def light_kernel_size(binary: np.ndarray) -> int:
    """Side of blend_light_source's averaging disk for a refined light mask (flare_util.py:125-133).

    round(1.5 x the largest `equivalent_diameter` (sqrt(4 * area / pi), area in pixels) over the
    8-connected regions of `binary`): the diameter of the circle with the largest light's area,
    neither its bounding box nor its contour. Python's round (halves to even), as the reference.

    Args:
        binary: (H, W) bool, the opened highlight mask.
    Returns:
        the kernel side in pixels, 0 without a light source.
    """
    from skimage.measure import label

    labels = label(binary, connectivity=2)  # skimage's default for 2-D: 8-connectivity
    if labels.max() == 0:
        return 0
    max_area = int(np.bincount(labels.ravel())[1:].max())
    # equivalent_diameter is monotone in the area, so the largest region gives the max diameter.
    return round(LIGHT_KERNEL_FACTOR * math.sqrt(4.0 * max_area / math.pi))


def _disk_kernel_values(k: int) -> tuple[np.ndarray, float, float]:
    """flare_util._create_disk_kernel(k) (:95-101) as (inside (k, k) bool, inside value, outside
    value): float32 (rr <= max(x)) + 1e-7, normalised to sum 1 in float32."""
    r = np.arange(k) - (k - 1) / 2
    inside = np.hypot(r[:, None], r[None, :]) <= r.max()
    kernel = np.float32(inside) + np.float32(1e-7)
    kernel = kernel / np.sum(kernel)
    # k == 2 has no pixel inside (all four lie 0.71 > 0.5 from the centre); k == 1 none outside.
    w_in = float(kernel[inside][0]) if inside.any() else 0.0
    w_out = float(kernel[~inside][0]) if (~inside).any() else 0.0
    return inside, w_in, w_out


def _fast_length(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n: sizes numpy's FFT transforms quickly (a prime is slow)."""
    m = max(n, 1)
    while True:
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def _valid_convolutions(a: np.ndarray, kernels: list[np.ndarray]) -> list[np.ndarray]:
    """2-D convolutions of `a` with each (k, k) kernel, 'valid' part ((H - k + 1, W - k + 1)),
    through circular FFTs at least a's size: outputs at index >= k - 1 never wrap around.
    (numpy's FFT: scipy.signal and scipy.fft take a second or more to import.)"""
    shape = tuple(_fast_length(n) for n in a.shape)
    spectrum = np.fft.rfft2(a, s=shape)
    outs = []
    for kernel in kernels:
        kh, kw = kernel.shape
        full = np.fft.irfft2(spectrum * np.fft.rfft2(kernel, s=shape), s=shape)
        outs.append(full[kh - 1:a.shape[0], kw - 1:a.shape[1]])
    return outs


def light_source_mask(image: Tensor, threshold: float = DEFAULT_LIGHT_THRESHOLD) -> Tensor:
    """Soft mask of saturated light sources, as Flare7K's `blend_light_source` computes it.

    Steps (flare_util.py): pixels whose channel mean exceeds `threshold` (:91) -> binary opening
    with a disk of radius ceil(0.5% of the long side) (:113-116) -> cv2.filter2D with the
    normalised disk kernel of side `light_kernel_size` (:133-136) -> times 3, clipped (:137).

    Args:
        image: (3, H, W) in [0, 1].
    Returns:
        (H, W) float32 in [0, 1] on `image`'s device; all zeros without a light source.
    """
    from scipy import ndimage  # scikit-image's own dependency
    from skimage.morphology import disk

    H, W = image.shape[-2:]
    binary = (image.float().mean(0) > threshold).cpu().numpy()
    footprint = disk(math.ceil(0.5 * 0.01 * max(H, W)))
    # Opening with skimage's border convention: outside counts as set for the erosion and unset
    # for the dilation (scipy's binary_opening would use unset for both).
    opened = ndimage.binary_dilation(
        ndimage.binary_erosion(binary, footprint, border_value=1), footprint, border_value=0
    )
    k = light_kernel_size(opened)
    if k == 0:
        return torch.zeros(H, W, device=image.device)
    inside, w_in, w_out = _disk_kernel_values(k)
    # cv2.filter2D semantics: correlation (the kernel is symmetric, so convolution is the same),
    # anchor at k // 2, BORDER_REFLECT_101 (numpy 'reflect'). Kernel sides are 1.5 light diameters
    # (hundreds of px for big lights), so the sums go through FFTs; they count pixels of a binary
    # image, hence are integers, and rint() makes them exact (no FFT noise where the mask is 0).
    before, after = k // 2, k - 1 - k // 2
    padded = np.pad(opened.astype(np.float64), ((before, after), (before, after)), mode="reflect")
    in_count, box_count = (np.rint(c) for c in _valid_convolutions(
        padded, [inside.astype(np.float64), np.ones((k, k))]))
    mask = (in_count * w_in + (box_count - in_count) * w_out).astype(np.float32)
    mask = np.clip(mask * np.float32(3.0), 0.0, 1.0)
    return torch.from_numpy(mask).to(image.device)


def blend_light_source(inputs: Tensor, deflared: Tensor,
                       threshold: float = DEFAULT_LIGHT_THRESHOLD) -> Tensor:
    """Put the input's saturated light sources back into the deflared image (flare_util.py:141).

    Args:
        inputs, deflared: (B, 3, H, W) in [0, 1].
    Returns:
        (B, 3, H, W): input * mask + deflared * (1 - mask), mask per image (light_source_mask).
    """
    masks = torch.stack([light_source_mask(img, threshold) for img in inputs])[:, None]
    return inputs * masks.to(inputs.dtype) + deflared * (1 - masks.to(deflared.dtype))


# ------------------------------------------------------------------------------------------------
def _network(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """(B, 3, h, w) -> (B, output_ch, h, w): a Uformer itself, a cascade's anchor output."""
    if isinstance(model, CascadedFlareRemover):
        def fn(t: Tensor) -> Tensor:
            return model(t)[1]
        return fn
    return model


def remove_flare(model: Uformer | CascadedFlareRemover, image: Tensor, *, tile: int = DEFAULT_TILE,
                 overlap: int | None = None, blend_light: bool = False,
                 light_threshold: float = DEFAULT_LIGHT_THRESHOLD) -> Tensor:
    """Deflare whole images at native resolution with a Uformer or a cascade (its anchor's output).

    Runs under no_grad in the model's current mode (call `.eval()` first for inference).

    Args:
        image: (B, 3, H, W) in [0, 1], any H, W, on the model's device.
        tile, overlap: see `tiled_apply`.
        blend_light: re-blend saturated light sources from the input (Flare7K test.py:97).
    Returns:
        (B, output_ch, H, W) in [0, 1]: channels 0:3 the deflared image (light sources re-blended
        if asked), 3:6 the predicted flare.
    """
    fn = _network(model)
    with torch.no_grad():
        out = tiled_apply(fn, image, tile=tile, overlap=overlap)
        if blend_light:
            out = torch.cat([blend_light_source(image, out[:, :3], light_threshold), out[:, 3:]], 1)
    return out


# ------------------------------------------------------------------------------------------------
# Large photos the way Flare7K's test_large.py processes them
def flare7k_large_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) with the short side 512 (test_large.py:51-62): the long side is
    int(512 * aspect) (truncated); a square counts as landscape."""
    aspect = width / height
    if width < height:
        return LARGE_TILE, int(LARGE_TILE / aspect)
    return int(LARGE_TILE * aspect), LARGE_TILE


def flare7k_large_ends(length: int) -> list[int]:
    """End coordinates of test_large.py's 512 px strips along a side of `length` >= 512 px
    (:77-78, :84-85): every 256 px, the last one clamped to the side (so it overlaps more)."""
    return [min(end, length) for end in range(LARGE_TILE, length + LARGE_STRIDE, LARGE_STRIDE)]


def flare7k_large_tiles(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """test_large.py's ImageProcessor.process_image (:64-111) on an already resized image.

    Strips of 512 px along the long side (rows when the width exceeds 512, else columns); each
    strip after the first cross-fades into its predecessor over their whole overlap with
    alpha = linspace(0, 1, overlap) (in place, in order, so a strip's blended head feeds the next
    blend, as the reference), then the strips are concatenated, each cut before its successor.

    Args:
        fn: (1, C, 512, 512) -> (1, C, 512, 512); the reference hard-codes C = 6 (:97, :100), any C
            works here.
        x: (1, 3, h, w) with min(h, w) == 512.
    Returns:
        (1, C, h, w).
    """
    h, w = x.shape[-2:]
    if min(h, w) != LARGE_TILE:
        raise ValueError(f"flare7k_large_tiles expects a short side of {LARGE_TILE}, got {h}x{w}")
    horizontal = w > LARGE_TILE  # :76 -- a 512x512 image goes down the vertical branch: 1 strip
    axis = -1 if horizontal else -2
    ends = flare7k_large_ends(w if horizontal else h)
    # Contiguous crops, as the reference's PIL crops are: a strided view can change the order of
    # float reductions inside the network, hence the last bits, hence a truncated uint8 level.
    segments = [fn(x.narrow(axis, end - LARGE_TILE, LARGE_TILE).contiguous())  # :80-82, :87-89
                for end in ends]
    overlaps = [prev - cur + LARGE_TILE for prev, cur in zip(ends, ends[1:])]  # :90, >= 256
    for i, overlap in enumerate(overlaps, start=1):  # :93-101
        alpha = torch.linspace(0, 1, steps=overlap, device=x.device)
        alpha = alpha.view(1, 1, 1, -1) if horizontal else alpha.view(1, 1, -1, 1)
        head = segments[i].narrow(axis, 0, overlap)
        tail = segments[i - 1].narrow(axis, LARGE_TILE - overlap, overlap)
        head.copy_(alpha * head + (1 - alpha) * tail)  # in place, as the reference
    kept = [s.narrow(axis, 0, LARGE_TILE - o) for s, o in zip(segments, overlaps)]  # :104-109
    return torch.cat([*kept, segments[-1]], dim=axis)


def flare7k_large(model: Uformer | CascadedFlareRemover, image: Tensor,
                  light_threshold: float | None = None) -> Tensor:
    """Deflare photos of any size as Flare7K's test_large.py does (its "blend" output, :113-165).

    Per image: quantise to uint8 (the reference reads 8-bit files; exact for such images) ->
    resize (PIL bicubic, PIL's default) to a short side of 512 (:70) -> network in 512 px strips
    (`flare7k_large_tiles`) -> deflared = channels 0:3 (:150, flare_util.py:56), for v1 with the
    light source blended back from the *resized* input at `light_threshold` (:159, 0.95) ->
    uint8 by truncation, (x * 255).astype(uint8) (:160-161) -> predicted flare
    |resized input - deflared| (:162, ImageChops.difference) -> flare resized bicubic to full size
    (:163) -> result |input - flare| at full size (:163), an absolute difference, not a clamp.

    Args:
        model: a Uformer or a cascade (its anchor's output), in the mode to run (`.eval()`).
        image: (B, 3, H, W) in [0, 1], any H, W, on the model's device.
        light_threshold: channel-mean threshold of the light-source re-blend; None: no re-blend
            (Flare7K++, `--flare7kpp`).
    Returns:
        (B, 3, H, W) in [0, 1], multiples of 1/255 (the reference's 8-bit output).
    """
    from PIL import Image

    from cascade.data.images import to_tensor, to_uint8

    fn = _network(model)
    bicubic = Image.Resampling.BICUBIC
    results = []
    with torch.no_grad():
        for img in image:
            full = Image.fromarray(to_uint8(img))  # (H, W, 3) uint8
            small = full.resize(flare7k_large_size(*full.size), bicubic)
            x = to_tensor(np.array(small), device=image.device)[None]  # (1, 3, h, w)
            deflared = flare7k_large_tiles(fn, x)[:, :3]
            if light_threshold is not None:
                deflared = blend_light_source(x, deflared, light_threshold)
            d8 = (deflared[0].permute(1, 2, 0).clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)
            flare = np.abs(np.asarray(small, np.int16) - d8).astype(np.uint8)  # (h, w, 3)
            flare_full = Image.fromarray(flare).resize(full.size, bicubic)
            out = np.abs(np.asarray(full, np.int16) - np.asarray(flare_full, np.int16))
            results.append(to_tensor(out.astype(np.uint8), device=image.device))
    return torch.stack(results)


# ------------------------------------------------------------------------------------------------
# The official output per base kind: what the evaluation calls
def official_light_threshold(base_kind: str, mode: str = "native") -> float | None:
    """The official scripts' light-source threshold for this kind and mode; None: no re-blend."""
    if mode not in OFFICIAL_LIGHT_THRESHOLDS:
        raise UserError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    if base_kind not in BASE_KINDS:
        raise UserError(f"base_kind: expected one of {', '.join(BASE_KINDS)}, got {base_kind!r}")
    return OFFICIAL_LIGHT_THRESHOLDS[mode][base_kind]


def deflare(model: Uformer | CascadedFlareRemover, image: Tensor, *, mode: str = "native",
            light_threshold: float | None = None, tile: int = DEFAULT_TILE,
            overlap: int | None = None) -> Tensor:
    """The deflared image in either inference mode, with an explicit light-source re-blend.

    Args:
        image: (B, 3, H, W) in [0, 1] on the model's device.
        mode: "native" (`remove_flare`: tiles at native resolution; `tile`, `overlap` apply) or
            "flare7k-large" (`flare7k_large`: test_large.py; 512 px strips, tiling fixed).
        light_threshold: re-blend the input's light sources above this channel mean; None: none.
    Returns:
        (B, 3, H, W) in [0, 1].
    """
    if mode == "native":
        out = remove_flare(model, image, tile=tile, overlap=overlap,
                           blend_light=light_threshold is not None,
                           light_threshold=DEFAULT_LIGHT_THRESHOLD if light_threshold is None
                           else light_threshold)
        return out[:, :3]
    if mode == "flare7k-large":
        return flare7k_large(model, image, light_threshold)
    raise UserError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")


def official_output(model: Uformer | CascadedFlareRemover, image: Tensor, base_kind: str,
                    mode: str = "native", *, tile: int = DEFAULT_TILE,
                    overlap: int | None = None) -> Tensor:
    """The deflared image as the official Flare7K scripts make it for this kind of base network.

    Both released Uformers output 6 channels (v1: options/uformer_flare7k_option.yml:47; ++:
    options/uformer_flare7kpp_baseline_option.yml:53), so `base_kind` comes from the config:
    - "flare7k" (v1): channels 0:3 (flare_util.py:56) with the input's light sources blended back
      (test.py:97 at 0.97 in "native" mode; test_large.py:159 at 0.95 in "flare7k-large" mode).
    - "flare7kpp": channels 0:3 as they are (test.py:94-95 and test_large.py:157 skip the blend
      under --flare7kpp: the network reconstructs the light source itself).
    "native" (default) equals test.py (:60, :75-80) for 512x512 images, where its Resize((512, 512))
    is the identity; other sizes are tiled at native resolution instead of squashed to 512x512.
    "flare7k-large" is test_large.py (`flare7k_large`). Under no_grad, in the model's current mode.

    Args:
        model: a Uformer (reference row) or a CascadedFlareRemover (cascade row: its anchor's
            output; the light source comes from the original input, not the negative's output).
        image: (B, 3, H, W) in [0, 1] on the model's device.
        base_kind: "flare7k" or "flare7kpp".
        mode: "native" or "flare7k-large".
        tile, overlap: native mode's tiling (`tiled_apply`).
    Returns:
        (B, 3, H, W) in [0, 1]; round to uint8 as torchvision's save_image does (to_uint8).
    """
    threshold = official_light_threshold(base_kind, mode)
    return deflare(model, image, mode=mode, light_threshold=threshold, tile=tile, overlap=overlap)
