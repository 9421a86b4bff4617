"""Paired test folders (`input/ gt/ mask/`), paired by file stem and validated up front, and the
test set a trial is evaluated on (`ensure_test_data`).

Pairing is `cascade.io.pair_images`, the one rule shared with `cascade.metrics.evaluate_dirs`: by
stem, never by sort order (Flare7K's evaluation globbed each folder separately and could mis-pair
files). Unless every folder holds the same stems, a leading `<folder>_` is ignored, so both
`input/000001.png` and Flare7K-style `input/input_000001.png` pair with `gt/gt_000001.png` and
`mask/000001.png`.

Every problem a user can fix is a `UserError` naming the file or folder: missing or empty folder,
unmatched stems, duplicate stems, size mismatch, unreadable/truncated image, unexpected mask
colours. Grayscale/RGBA/16-bit images are converted by `read_rgb` with a warning.

Mask colours: Flare7K's evaluation reads masks as soft weights, so antialiased borders are
legitimate. A mask pixel is accepted if it is a blend of the four Flare7K colours, i.e. inside
their convex hull: G <= R (streak weight >= 0) and R + B <= 255 (weights sum to <= 1), each with
`MASK_TOLERANCE` levels of slack for lossy re-encoding. White, green, cyan, magenta... are errors.

`ensure_test_data(cfg)`: `cfg.test_data`, else `<data>/test_data/real` for Flare7K data, else a
procedural test set (`cascade.data.synthetic`, the "test" split, seed `TEST_SEED`) cached under
`<cache>/testsets/<name>-<hash>/`, the hash covering `config.TEST_FIELDS`, the split, the seed and
the generator version. It is built once under a `locks.file_lock` (`locks.build_once`) and published with one folder rename,
so concurrent trials share one build and a build killed half-way leaves nothing that looks
finished. The fixed seed means every trial of a sweep, whatever its seed, is scored on the same
images; the test split's own seed namespace and photographs (`synthetic.SCENES["test"]`) mean none
of them shares a scene, crop source, PSF or flare with any training data, whatever the trial's
seed (`TEST_SEED` included: a trial seed only ever selects a stream of the "train" split).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cascade.config import TEST_FIELDS, real_test_dir
from cascade.data import synthetic
from cascade.data.images import read_rgb
from cascade.errors import UserError
from cascade.io import cache_dir, digest, list_images, pair_images
from cascade.locks import build_once

if TYPE_CHECKING:
    from cascade.config import TrialConfig

FOLDERS = ("input", "gt", "mask")
MASK_TOLERANCE = 8  # 8-bit levels of slack on the convex-hull test (lossy masks)
TEST_SEED = 2000  # procedural test set: its seed in the "test" split (a namespace of its own)
TEST_SPLIT = "test"


@dataclass(frozen=True)
class TestItem:
    """One test pair. Images are (H, W, 3) uint8 RGB; mask in Flare7K colours."""

    __test__ = False  # not a pytest class, despite the name

    stem: str
    input: np.ndarray
    gt: np.ndarray
    mask: np.ndarray


def check_mask(mask: np.ndarray, path: str | os.PathLike) -> None:
    """Raise UserError if `mask` (H, W, 3) uint8 has colours outside the Flare7K palette hull."""
    m = mask.astype(np.int32)
    r, g, b = m[..., 0], m[..., 1], m[..., 2]
    bad = (g > r + MASK_TOLERANCE) | (r + b > 255 + MASK_TOLERANCE)
    if bad.any():
        y, x = np.argwhere(bad)[0]
        colour = tuple(int(c) for c in mask[y, x])
        raise UserError(
            f"{path}: unexpected mask colour {colour} at (x={x}, y={y}) in {int(bad.sum())} "
            "pixels; expected Flare7K colours glare (255,255,0), streak (255,0,0), "
            "light (0,0,255), other (0,0,0) or blends of them"
        )


class PairedTestSet:
    """Validated paired test set under `root` (holding `input/ gt/ mask/`).

    `len(ts)`; `ts[i] -> TestItem` in key order; `ts.stems` lists the pairing keys. Every image
    is decoded once at construction to validate it (sizes, readability, mask colours); items are
    read again on access so that large sets do not stay in memory.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"{self.root}: test set folder does not exist")
        for name in FOLDERS:
            if not (self.root / name).is_dir():
                raise UserError(f"{self.root / name}: missing folder (a test set holds "
                                f"{'/ '.join(FOLDERS)}/)")
        files = pair_images({name: list_images(self.root / name) for name in FOLDERS})
        keys = set(files["input"])
        for name in FOLDERS:
            for other in FOLDERS:
                missing = sorted(set(files[name]) - set(files[other]))
                if missing:
                    raise UserError(
                        f"{files[name][missing[0]]}: no matching file in {self.root / other}"
                        + (f" ({len(missing)} unmatched in {name}/)" if len(missing) > 1 else "")
                    )
        self.stems: list[str] = sorted(keys)
        self._files = files
        for stem in self.stems:
            self._load(stem)  # validate everything now; errors name the file

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, i: int) -> TestItem:
        return self._load(self.stems[i])

    def path(self, i: int, folder: str) -> Path:
        """The file of item `i` in `folder` (one of input, gt, mask)."""
        return self._files[folder][self.stems[i]]

    def _load(self, stem: str) -> TestItem:
        paths = {name: self._files[name][stem] for name in FOLDERS}
        images = {name: read_rgb(p) for name, p in paths.items()}
        shape = images["input"].shape
        for name in ("gt", "mask"):
            if images[name].shape != shape:
                raise UserError(
                    f"{paths[name]}: size {images[name].shape[1]}x{images[name].shape[0]} "
                    f"differs from {paths['input']} ({shape[1]}x{shape[0]})"
                )
        check_mask(images["mask"], paths["mask"])
        return TestItem(stem=stem, input=images["input"], gt=images["gt"], mask=images["mask"])


# -- the test set of a trial ------------------------------------------------------------------------


def test_key(cfg: TrialConfig) -> str:
    """Cache key of the procedural test set."""
    return digest({k: getattr(cfg, k) for k in TEST_FIELDS} | {
        "test_seed": TEST_SEED, "split": TEST_SPLIT, "generator": synthetic.GENERATOR})


def ensure_test_data(cfg: TrialConfig) -> Path:
    """Folder with `input/ gt/ mask/` the trial is evaluated on (see the module docstring)."""
    real = real_test_dir(cfg)
    if real is not None:
        path = Path(real).expanduser()
        if not path.is_dir():
            raise UserError(f"test_data={cfg.test_data!r}: no such folder")
        return path.resolve()
    root = cache_dir(cfg.base_cache) / "testsets"
    target = root / f"procedural-n{cfg.n_test}-s{cfg.test_size}-{test_key(cfg)}"

    def build() -> None:
        # Build beside the target, publish with one rename: a half-written set is never seen.
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
        try:
            synthetic.generate_dataset(tmp, n=cfg.n_test, size=cfg.test_size, seed=TEST_SEED,
                                       split=TEST_SPLIT)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    build_once(target, build)
    return target
