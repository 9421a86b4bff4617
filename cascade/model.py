"""The cascaded flare remover of Song & Bae, and inference on whole photographs.

`CascadedFlareRemover` chains two Uformers started from the same weights: the frozen *negative*
network sees the flared input; the trainable *anchor* network sees the negative's deflared output.
The loss (cascade.losses) pulls the anchor's output towards the ground truth and away from the
negative's.

`remove_flare` runs a Uformer or a cascade on images of any size: in overlapping tiles (512 px, as
the released networks were trained) blended with raised-cosine weights that sum to one, so tiles
leave no seams and an image that fits one tile gets exactly the single-pass result. Optionally it
re-blends saturated light sources from the input like Flare7K's `test.py` (`blend_light_source`).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cascade.errors import UserError
from cascade.uformer import Uformer, load_checkpoint

DEFAULT_TILE = 512
# Flare7K's test.py re-blends pixels whose channel mean exceeds 0.97 (blend_light_source call).
DEFAULT_LIGHT_THRESHOLD = 0.97


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
# Light-source re-blend (Flare7K test.py)
def light_source_mask(image: Tensor, threshold: float = DEFAULT_LIGHT_THRESHOLD) -> Tensor:
    """Soft mask of saturated light sources, as Flare7K's `blend_light_source` computes it.

    Pixels whose channel mean exceeds `threshold` -> binary opening with a disk of radius
    ceil(0.5% of the long side) -> the disk-averaged mask (disk diameter half the equivalent
    diameter of the largest light source), times 3, clipped.

    Args:
        image: (3, H, W) in [0, 1].
    Returns:
        (H, W) float32 in [0, 1] on `image`'s device; all zeros without a light source.
    """
    from scipy import ndimage  # scikit-image's own dependency
    from skimage.measure import label
    from skimage.morphology import disk

    H, W = image.shape[-2:]
    binary = (image.float().mean(0) > threshold).cpu().numpy()
    footprint = disk(math.ceil(0.5 * 0.01 * max(H, W)))
    # Opening with skimage's border convention: outside counts as set for the erosion and unset
    # for the dilation (scipy's binary_opening would use unset for both).
    opened = ndimage.binary_dilation(
        ndimage.binary_erosion(binary, footprint, border_value=1), footprint, border_value=0
    )
    labels = label(opened, connectivity=2)
    if labels.max() == 0:
        return torch.zeros(H, W, device=image.device)
    max_area = np.bincount(labels.ravel())[1:].max()
    k = round(0.5 * math.sqrt(4.0 * max_area / math.pi))  # Python's round, as the reference
    if k == 0:
        return torch.zeros(H, W, device=image.device)
    r = np.arange(k) - (k - 1) / 2
    kernel = (np.hypot(r[:, None], r[None, :]) <= r.max()).astype(np.float32) + 1e-7
    kernel /= kernel.sum()
    # OpenCV filter2D semantics: correlation, anchor at k // 2, BORDER_REFLECT_101 (numpy 'reflect').
    before, after = k // 2, k - 1 - k // 2
    padded = np.pad(opened.astype(np.float32), ((before, after), (before, after)), mode="reflect")
    mask = F.conv2d(torch.from_numpy(padded)[None, None], torch.from_numpy(kernel)[None, None])
    return (mask[0, 0] * 3.0).clamp(0.0, 1.0).to(image.device)


def blend_light_source(inputs: Tensor, deflared: Tensor,
                       threshold: float = DEFAULT_LIGHT_THRESHOLD) -> Tensor:
    """Put the input's saturated light sources back into the deflared image.

    Args:
        inputs, deflared: (B, 3, H, W) in [0, 1].
    Returns:
        (B, 3, H, W): input * mask + deflared * (1 - mask), mask per image (light_source_mask).
    """
    masks = torch.stack([light_source_mask(img, threshold) for img in inputs])[:, None]
    return inputs * masks.to(inputs.dtype) + deflared * (1 - masks.to(deflared.dtype))


# ------------------------------------------------------------------------------------------------
def remove_flare(model: Uformer | CascadedFlareRemover, image: Tensor, *, tile: int = DEFAULT_TILE,
                 overlap: int | None = None, blend_light: bool = False,
                 light_threshold: float = DEFAULT_LIGHT_THRESHOLD) -> Tensor:
    """Deflare whole images with a Uformer or a cascade (its anchor's output).

    Runs under no_grad in the model's current mode (call `.eval()` first for inference).

    Args:
        image: (B, 3, H, W) in [0, 1], any H, W, on the model's device.
        tile, overlap: see `tiled_apply`.
        blend_light: re-blend saturated light sources from the input (Flare7K test.py).
    Returns:
        (B, output_ch, H, W) in [0, 1]: channels 0:3 the deflared image (light sources re-blended
        if asked), 3:6 the predicted flare when the network has them.
    """
    if isinstance(model, CascadedFlareRemover):
        def fn(t: Tensor) -> Tensor:
            return model(t)[1]
    else:
        fn = model
    with torch.no_grad():
        out = tiled_apply(fn, image, tile=tile, overlap=overlap)
        if blend_light:
            out = torch.cat([blend_light_source(image, out[:, :3], light_threshold), out[:, 3:]], 1)
    return out
