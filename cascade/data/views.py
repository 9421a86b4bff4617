"""Evaluation views: the readings of the paper's "images of size 128x128 were used".

Song & Bae evaluate "images of size 128x128" while the Flare7K test images are 512x512, and do
not say how one became the other. Each reading is a named view (`VIEWS`, the values of
`TrialConfig.eval_mode` beyond the inference modes): a function of one test item (input, gt and
mask alike) to one or more `size` x `size` items, which the evaluation predicts ("native" mode,
at that size) and scores at that size.

- "resize-bilinear": PIL's bilinear resize, antialiased when shrinking (PIL widens the filter's
  support by the scale factor). That is what torchvision 0.15's `transforms.Resize((128, 128))` does to
  a PIL image, the paper's stack and the way Flare7K's test.py resizes (`transforms.Resize`).
- "resize-bicubic": PIL's bicubic resize (antialiased likewise; overshoot clipped to [0, 255]).
- "resize-area": PIL's box filter: the mean of each source block (OpenCV's INTER_AREA for an
  integer factor such as 512 -> 128).
- "resize-bilinear-noaa": bilinear without antialiasing (`torch.nn.functional.interpolate(...,
  mode="bilinear", align_corners=False, antialias=False)`, also OpenCV's INTER_LINEAR): each
  output pixel reads only the 2 x 2 source pixels nearest its centre, the tensor-pipeline reading.
- "center-crop": the central crop (torchvision `CenterCrop`'s rounding of the offset).
- "tiles": the image cut into a centred grid of size x size tiles (16 for 512 px at 128), each a
  view; a metric of the image is the mean over its tiles that have the region
  (`image_means`), so per-image rows and their pairing stay one per test image. Under the
  "masked" protocol a tile's region PSNR rises as the region's share of the tile shrinks (no
  area normalisation), so tiles that barely touch a region weigh in with high values: the
  reading's own property, which the reference check compares like any other.

Masks take the image's own resize: the evaluation reads a mask as soft region weights that are
linear in its colours (`cascade.masks.region_weights`), so resizing the mask with the image's
filter gives each small pixel the share of its source pixels that lie in the region, the same
weights a resize of the weight maps would give (up to the 8-bit rounding of the colours).

Every view is (H', W', 3) uint8; resizes go through uint8 -> filter -> round, as a PIL or
torchvision pipeline writes 8-bit images. Torch-free (except "resize-bilinear-noaa", which uses
torch's own interpolation so that it is that reading exactly).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from cascade.data.testset import TestItem
from cascade.errors import UserError

if TYPE_CHECKING:  # pandas only for image_means' argument
    import pandas as pd

TILE_SEP = "@"
"""Separates an image's stem from its tile's position in a tile view's stem: `000001@r0c3`."""

_PIL_FILTERS = {"resize-bilinear": Image.Resampling.BILINEAR,
                "resize-bicubic": Image.Resampling.BICUBIC,
                "resize-area": Image.Resampling.BOX}


def _pil_resize(image: np.ndarray, size: int, mode: str) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8 through PIL's filter for `mode`."""
    return np.asarray(Image.fromarray(image).resize((size, size), _PIL_FILTERS[mode]))


def _bilinear_noaa(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8, bilinear without antialiasing, rounded."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].double()
    y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return y[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def center_offset(length: int, size: int) -> int:
    """Start of the central `size` window of `length` pixels (torchvision CenterCrop's rounding)."""
    return int(round((length - size) / 2.0))


def tile_grid(height: int, width: int, size: int) -> list[tuple[int, int, int, int]]:
    """(row, col, top, left) of every tile of a centred grid of `size` tiles, row-major."""
    rows, cols = height // size, width // size
    top0, left0 = (height - rows * size) // 2, (width - cols * size) // 2
    return [(r, c, top0 + r * size, left0 + c * size) for r in range(rows) for c in range(cols)]


def _resized(item: TestItem, size: int, mode: str) -> list[TestItem]:
    resize: Callable[[np.ndarray], np.ndarray] = (
        (lambda a: _bilinear_noaa(a, size)) if mode == "resize-bilinear-noaa"
        else (lambda a: _pil_resize(a, size, mode)))
    return [TestItem(item.stem, resize(item.input), resize(item.gt), resize(item.mask))]


def _check_side(item: TestItem, size: int, mode: str) -> None:
    h, w = item.input.shape[:2]
    if min(h, w) < size:
        raise UserError(f"eval_mode={mode}: test image {item.stem} is {w}x{h} px, smaller than "
                        f"eval_size={size}; use a resize mode or a smaller eval_size")


def _center(item: TestItem, size: int) -> list[TestItem]:
    h, w = item.input.shape[:2]
    t, left = center_offset(h, size), center_offset(w, size)

    def cut(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a[t:t + size, left:left + size])

    return [TestItem(item.stem, cut(item.input), cut(item.gt), cut(item.mask))]


def _tiles(item: TestItem, size: int) -> list[TestItem]:
    out = []
    for r, c, t, left in tile_grid(*item.input.shape[:2], size):
        def cut(a: np.ndarray, t: int = t, left: int = left) -> np.ndarray:
            return np.ascontiguousarray(a[t:t + size, left:left + size])

        out.append(TestItem(f"{item.stem}{TILE_SEP}r{r}c{c}", cut(item.input), cut(item.gt),
                            cut(item.mask)))
    return out


VIEWS: dict[str, str] = {
    "resize-bilinear": "PIL bilinear resize (antialiased; torchvision 0.15 Resize on PIL images)",
    "resize-bicubic": "PIL bicubic resize (antialiased)",
    "resize-area": "area (box-filter) resize",
    "resize-bilinear-noaa": "bilinear resize without antialiasing (torch / OpenCV INTER_LINEAR)",
    "center-crop": "central crop",
    "tiles": "mean over the tiles of a centred grid",
}
"""View name -> what it does, for captions (names equal cascade.config.VIEW_MODES; a test)."""


def views(item: TestItem, mode: str, size: int) -> list[TestItem]:
    """The `size` x `size` views of one test item under `mode` (a name of VIEWS), in order.

    Resizes give one view, any input size; "center-crop" one and "tiles" one per tile, both
    needing both sides >= size (UserError naming the image otherwise). Stems: the item's, and for
    tiles `<stem>@r<row>c<col>`."""
    if mode not in VIEWS:
        raise UserError(f"eval_mode: expected one of {', '.join(VIEWS)}, got {mode!r}")
    if mode.startswith("resize-"):
        return _resized(item, size, mode)
    _check_side(item, size, mode)
    return _center(item, size) if mode == "center-crop" else _tiles(item, size)


def image_stem(view_stem: str) -> str:
    """The test image a view belongs to: `000001@r0c3` -> `000001`; other stems unchanged."""
    stem, sep, tile = view_stem.rpartition(TILE_SEP)
    return stem if sep and re.fullmatch(r"r\d+c\d+", tile) else view_stem


def image_means(per_view: pd.DataFrame) -> pd.DataFrame:
    """Per-view metric rows (image, region, metric, value) -> one row per (image, region, metric):
    the mean over the image's views that have the region (a tile without streak pixels has no
    streak row, so it is skipped, never counted as 0). A tile's PSNR is capped at
    `cascade.metrics.PSNR_CAP_DB` first, as `summarize` caps an image's: one perfect tile (+inf)
    would otherwise make its image's mean infinite. `.attrs` are kept."""
    from cascade.metrics import PSNR_CAP_DB

    if per_view.empty:
        return per_view
    capped = per_view["value"].where(per_view["metric"] != "psnr",
                                     per_view["value"].clip(upper=PSNR_CAP_DB))
    frame = per_view.assign(image=per_view["image"].map(image_stem), value=capped)
    out = (frame.groupby(["image", "region", "metric"], sort=False, as_index=False)["value"]
           .mean())
    out = out[list(per_view.columns)] if set(per_view.columns) == set(out.columns) else out
    out.attrs = dict(per_view.attrs)
    return out


def per_image(rows: pd.DataFrame, mode: str) -> pd.DataFrame:
    """Metric rows of `mode`'s views as one row per test image and region: `image_means` for
    tiles, the rows as they are for every other mode (one view per image)."""
    return image_means(rows) if mode == "tiles" else rows


def stitch(height: int, width: int, size: int, tiles: dict[str, np.ndarray]) -> np.ndarray:
    """One image's tile predictions (view stem -> (size, size, 3) uint8) put back in place:
    (height, width, 3) uint8, zero outside the grid (what a qualitative figure shows)."""
    out = np.zeros((height, width, 3), np.uint8)
    at = {f"r{r}c{c}": (t, left) for r, c, t, left in tile_grid(height, width, size)}
    for stem, tile in tiles.items():
        t, left = at[stem.rpartition(TILE_SEP)[2]]
        out[t:t + size, left:left + size] = tile
    return out
