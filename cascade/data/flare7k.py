"""Flare7K / Flare7K++ training pairs as the official loaders make them: files decoded on the CPU,
synthesis batched on the device.

Layout (either the Flare7K++ root or the Flare7K folder itself may be given as `root`):
    Flare7K/Scattering_Flare/Compound_Flare/   flare images (light source included)
    Flare7K/Scattering_Flare/Light_Source/     Flare7K++ only: the light source of each flare
    Flare7K/Reflective_Flare/                  optional reflective flares (ghosts)
    Flare-R/{Compound_Flare,Light_Source}/     Flare7K++ real flares
`backgrounds` is a flat folder of flare-free images (Flickr24K).

Two kinds of data, two official loaders (ykdai/Flare7K @ d1fb66e; step-by-step table with
file:line in docs/fidelity.md), chosen by `loader` (`TrialConfig.data_loader`) or, without one, by
the layout. The v1 release also ships a Scattering_Flare/Light_Source folder that its loader never
reads, so v1 data needs `loader="flare7k"`; by layout it would be taken for Flare7K++:
- With Light_Source folders, Flare7K++ (`basicsr/data/flare7kpp_dataset.py`, baseline option
  `options/uformer_flare7kpp_baseline_option.yml`): a flare set is drawn 1:1 (`data_ratio`), then
  a file uniformly; every Flare7K scattering flare gets a random reflective flare, no Flare-R
  flare does; flare and light share one affine, centre crop and flips; only the flare is blurred;
  NO brightness jitter and NO DC offset (both commented out there).
- Without them, Flare7K v1 (`basicsr/data/flare7k_dataset.py`,
  `options/uformer_flare7k_option.yml`): a flare uniformly from all files, a reflective flare
  added to every one; brightness x U(0.8, 3) clamped to [0, 1] (torchvision ColorJitter) before
  the blur and a DC offset U(-0.02, 0.02) after.

Per sample, in both: gamma ~ U(1.8, 2.2) linearises every image (x^gamma). Background: random
crop (reflect padding on both sides when smaller, as `RandomCrop(pad_if_needed=True)`), h/v flips,
noise sigma = 0.01*chi2(1), gain U(0.5, 1.2), clamp. Flare: (+ reflective, clamp), background
removed, torchvision `RandomAffine` (its default NEAREST interpolation, zero fill, about the image
centre): rotation U(0, 360) deg, scale U(0.8, 1.5), x-shear U(-20, 20) deg, translation
round(U(-1, 1) * 300/1440 * width) px and likewise for the height (a fraction of each file's own
size, so any size works); centre crop 512 (zero padded if smaller); h/v flips; Gaussian blur (21
taps, sigma U(0.1, 3)); clamp. input = clamp(background + flare); Flare7K++: gt = clamp(background
+ light), flare target = clamp(flare - light); v1: gt = background, flare target = flare; all
re-encoded with x^(1/gamma). Then ours: random crop to `crop` and h/v flips of the whole pair.
Random erasing (`cascade.data.erasing`, `erasing_on`): "background" zeroes the box in the
8-bit background before it is linearised, noised and composited (so the box, with the camera
noise on it, is in the input and in the ground truth; the box sits where the final crop will be,
so it is a box of the training crop); "input" zeroes it in the final input only.

Geometry: at `synth_size` 512 every file is used at its own pixels, exactly as officially. Any
other `synth_size` S renders the same pairs at scale S/512: backgrounds and flare files are
resized by S/512 first (bilinear, antialiased), so a flare keeps its size relative to the image.

Epochs: a training run reads sample indices 0, 1, 2, ... without end; sample `index` belongs to
epoch `index // len(backgrounds)`, and each epoch visits every background once in a random order
that is a pure function of (seed, epoch) (`background_order`), as the official loader shuffles
each epoch. `batch(indices, epoch=e)` is `batch(e * len(self) + indices)`.

Deliberate differences from Flare7K's code (reasons in docs/fidelity.md): its "per-channel"
background removal takes min/max over axes (0, 1) of a (C, H, W) tensor, i.e. over channels and
rows, leaving per-column statistics; here they are per channel over the whole image, as intended.
A reflective flare of another size than its flare is centre-cropped/zero-padded to it (the
official code would fail on the sum). The shuffle is also a function of the trial seed.

Randomness: every sample's choices come from CPU torch.Generators seeded by sha256(seed, index)
(`synthetic.sample_seed`), so pairs do not depend on batching, resumption or the number of loader
workers; the background noise uses a generator on the device with the same seed.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from cascade.config import ERASING_TARGETS
from cascade.data.erasing import VALUE, random_erase, sample_boxes
from cascade.data.images import read_rgb
from cascade.data.synthetic import sample_seed
from cascade.errors import UserError
from cascade.io import image_files
from cascade.seeds import derive_seed

_REF_SIZE = 512  # Flare7K's `img_size`: background crop and flare centre crop, px
_TRANSLATE = 300 / 1440  # RandomAffine translate: `translate / 1440`, a fraction of the size
_FLARE7K, _FLARE_R = "Flare7K", "Flare-R"
LOADERS = ("flare7k", "flare7kpp")  # cascade.config.DATA_LOADERS (a test keeps them equal)


@dataclass(frozen=True)
class FlareSet:
    """One source of flares: compound flare files and, for Flare7K++, matching light sources."""

    name: str
    flares: tuple[Path, ...]
    lights: tuple[Path, ...] | None


def find_flare_sets(root: str | os.PathLike, loader: str | None = None
                    ) -> tuple[list[FlareSet], list[Path]]:
    """Scattering flare sets and reflective flare files under a Flare7K(++) root.

    `loader`: "flare7k" reads what the v1 loader reads (uformer_flare7k_option.yml:15-18:
    Scattering_Flare/Compound_Flare and Reflective_Flare), ignoring Light_Source folders (the v1
    release ships one, which its loader never reads) and Flare-R; "flare7kpp" needs Light_Source
    folders; None: by layout (Light_Source folders present -> Flare7K++).
    Raises UserError naming the folder when nothing usable is found or when a Light_Source
    folder does not match its Compound_Flare folder file for file (paired by stem).
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: Flare7K folder does not exist")
    if loader not in (None, *LOADERS):
        raise UserError(f"data_loader={loader!r}; expected one of {', '.join(LOADERS)} or null")
    flare7k = root / "Flare7K" if (root / "Flare7K").is_dir() else root
    if not (flare7k / "Scattering_Flare").is_dir() and (root / "Flare7k").is_dir():
        flare7k = root / "Flare7k"  # the v1 release spells its folder so
    candidates = [(_FLARE7K, flare7k / "Scattering_Flare")]
    if loader != "flare7k":
        candidates.append((_FLARE_R, root / "Flare-R"))
    sets = []
    for name, base in candidates:
        compound = base / "Compound_Flare"
        if not compound.is_dir():
            continue
        flares = image_files(compound)
        if not flares:
            raise UserError(f"{compound}: no flare images")
        lights = None
        if loader != "flare7k" and (base / "Light_Source").is_dir():
            by_stem = {p.stem: p for p in image_files(base / "Light_Source")}
            missing = [p for p in flares if p.stem not in by_stem]
            if missing or len(by_stem) != len(flares):
                what = missing[0] if missing else base / "Light_Source"
                raise UserError(f"{what}: Light_Source and Compound_Flare do not match file for "
                                f"file ({len(by_stem)} vs {len(flares)} images in {base})")
            lights = tuple(by_stem[p.stem] for p in flares)
        sets.append(FlareSet(name, tuple(flares), lights))
    if not sets:
        raise UserError(f"{root}: no Scattering_Flare/Compound_Flare or Flare-R/Compound_Flare "
                        "folder (expected the Flare7K / Flare7K++ layout)")
    if len({s.lights is None for s in sets}) > 1:
        raise UserError(f"{root}: some flare sets have Light_Source folders and some do not")
    if loader == "flare7kpp" and sets[0].lights is None:
        raise UserError(f"{root}: data_loader=flare7kpp needs Scattering_Flare/Light_Source (the "
                        "Flare7K++ layout); use data_loader: flare7k for Flare7K v1 data")
    reflective_dir = flare7k / "Reflective_Flare"
    reflective = image_files(reflective_dir) if reflective_dir.is_dir() else []
    return sets, reflective


@functools.lru_cache(maxsize=8)
def background_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order (a permutation of range(n), int64 CPU tensor) of the backgrounds in `epoch`.

    A pure function of (n, seed, epoch); cached, do not modify the returned tensor.
    """
    g = torch.Generator().manual_seed(derive_seed("flaresweep-backgrounds", seed, epoch))
    return torch.randperm(n, generator=g)


@dataclass(frozen=True)
class RawSample:
    """Decoded files for one sample (uint8 CHW tensors), ready for batched synthesis."""

    background: torch.Tensor  # (3, S, S): random crop (reflect-padded if smaller), h/v flipped
    flare: torch.Tensor  # (3, H, W) compound flare, at its own pixels x synth_size / 512
    light: torch.Tensor | None  # (3, H, W) Flare7K++ light source of `flare`, same size
    reflective: torch.Tensor | None  # (3, H', W') reflective flare added to `flare`, any size
    seed: int
    background_index: int  # into Flare7KPairs.backgrounds
    flare_set: str  # "Flare7K" or "Flare-R"


class Flare7KPairs:
    """Training pairs from Flare7K / Flare7K++ flares on flare-free backgrounds.

    Args:
        root: Flare7K++ (or Flare7K) folder; see the module docstring for the layout.
        backgrounds: folder of flare-free background images.
        crop: side of the returned pairs (random crop of the synthesised image).
        seed: dataset seed; a sample is a pure function of (seed, index).
        synth_size: side of the synthesised image (Flare7K: 512); >= crop. Other sizes render
            the 512 px synthesis at scale synth_size / 512.
        reflective: add reflective flares as the official option does (Flare7K++: to every
            Flare7K flare and no Flare-R one; v1: to every flare) when Reflective_Flare exists;
            False adds none (the option file's "comment this part" variant).
        flips: random horizontal and vertical flips of the whole pair (the paper's augmentation).
        random_erasing: probability of erasing one box per sample (`cascade.data.erasing`:
            torchvision RandomErasing's box, value 0).
        erasing_on: "background" (before the flare is added: input and gt) or "input" (input
            only; gt and flare target unchanged).
        loader: which official loader's files and steps: "flare7k" (v1), "flare7kpp", or None
            (by layout: `find_flare_sets`).
        cache_size: decoded flare images kept in memory (per process).
    """

    def __init__(self, root: str | os.PathLike, backgrounds: str | os.PathLike, crop: int,
                 seed: int, *, synth_size: int = _REF_SIZE, reflective: bool = True,
                 flips: bool = True, random_erasing: float = 0.0, erasing_on: str = "background",
                 loader: str | None = None, cache_size: int = 256) -> None:
        if crop < 16 or synth_size < crop:
            raise UserError(f"Flare7KPairs: need 16 <= crop <= synth_size, got crop={crop}, "
                            f"synth_size={synth_size}")
        if not 0.0 <= random_erasing <= 1.0:
            raise UserError(f"Flare7KPairs: random_erasing={random_erasing} is not a probability "
                            "in [0, 1]")
        self.sets, self.reflective_files = find_flare_sets(root, loader)
        bg_dir = Path(backgrounds)
        if not bg_dir.is_dir():
            raise UserError(f"{bg_dir}: backgrounds folder does not exist")
        self.backgrounds = image_files(bg_dir)
        if not self.backgrounds:
            raise UserError(f"{bg_dir}: no background images")
        self.crop, self.seed, self.synth_size = int(crop), int(seed), int(synth_size)
        self.reflective, self.flips = bool(reflective), bool(flips)
        if erasing_on not in ERASING_TARGETS:
            raise UserError(f"Flare7KPairs: erasing_on={erasing_on!r}; expected one of "
                            + ", ".join(ERASING_TARGETS))
        self.random_erasing, self.erasing_on = float(random_erasing), erasing_on
        self.has_light = self.sets[0].lights is not None
        # Which official loader this data follows (see the module docstring).
        self.loader = "flare7kpp" if self.has_light else "flare7k"
        self.resize = self.synth_size / _REF_SIZE  # files are used at their pixels x this
        # v1 draws one file from all scattering flares pooled (flare7k_dataset.py:108, :174).
        self._pooled = [(fs, k) for fs in self.sets for k in range(len(fs.flares))]
        self._read_flare = functools.lru_cache(maxsize=cache_size)(self._read_flare_uncached)

    def __len__(self) -> int:
        """Samples per epoch: one per background."""
        return len(self.backgrounds)

    def _position(self, index: int, epoch: int) -> int:
        pos = int(epoch) * len(self.backgrounds) + int(index)
        if pos < 0:
            raise ValueError(f"Flare7KPairs: sample index {index} (epoch {epoch}) is negative")
        return pos

    def background_of(self, index: int, epoch: int = 0) -> int:
        """Index into `self.backgrounds` of sample `index`'s background (see module doc)."""
        n = len(self.backgrounds)
        pos = self._position(index, epoch)
        return int(background_order(n, self.seed, pos // n)[pos % n])

    # -- CPU side: decoding (safe to run in DataLoader workers) ---------------------------------
    def decode(self, index: int, epoch: int = 0) -> RawSample:
        """Read and crop the files of sample `index`; all choices from its seeded generator."""
        pos = self._position(index, epoch)
        sd = sample_seed(self.seed, pos)
        g = torch.Generator().manual_seed(sd)
        b = self.background_of(pos)
        background = self._background(self.backgrounds[b], g)
        if self.has_light:  # Flare7K++: a set 1:1 (data_ratio [0.5, 0.5]), then a file
            fs = self.sets[int(torch.randint(0, len(self.sets), (), generator=g))]
            k = int(torch.randint(0, len(fs.flares), (), generator=g))
            with_reflective = fs.name == _FLARE7K  # Real_reflective1: ~ in the baseline option
        else:  # Flare7K v1: a file among all, a reflective flare on every one
            fs, k = self._pooled[int(torch.randint(0, len(self._pooled), (), generator=g))]
            with_reflective = True
        reflective = None
        if self.reflective and with_reflective and self.reflective_files:
            j = int(torch.randint(0, len(self.reflective_files), (), generator=g))
            reflective = self._read_flare(self.reflective_files[j])
        flare = self._read_flare(fs.flares[k])
        light = None
        if fs.lights is not None:
            light = self._read_flare(fs.lights[k])
            if light.shape != flare.shape:
                raise UserError(f"{fs.lights[k]}: light source is {tuple(light.shape[1:])} px but "
                                f"its flare {fs.flares[k].name} is {tuple(flare.shape[1:])} px")
        return RawSample(background=background, flare=flare, light=light, reflective=reflective,
                         seed=sd, background_index=b, flare_set=fs.name)

    def _background(self, path: Path, g: torch.Generator) -> torch.Tensor:
        """RandomCrop(S, pad_if_needed=True, padding_mode='reflect'), h/v flips: (3, S, S) uint8."""
        img = self._resized(read_rgb(path))
        s = self.synth_size
        # torchvision pads BOTH sides by the deficit (padding=[S - w, 0], then [0, S - h]).
        dh, dw = max(0, s - img.shape[0]), max(0, s - img.shape[1])
        if dh or dw:
            img = np.pad(img, ((dh, dh), (dw, dw), (0, 0)), mode="reflect")
        top = int(torch.randint(0, img.shape[0] - s + 1, (), generator=g))
        left = int(torch.randint(0, img.shape[1] - s + 1, (), generator=g))
        img = img[top:top + s, left:left + s]
        if float(torch.rand((), generator=g)) < 0.5:
            img = img[:, ::-1]
        if float(torch.rand((), generator=g)) < 0.5:
            img = img[::-1]
        return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).contiguous()

    def _resized(self, img: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 scaled by synth_size / 512 (unchanged at 512)."""
        if self.resize == 1.0:
            return img
        h, w = img.shape[:2]
        size = (max(1, round(w * self.resize)), max(1, round(h * self.resize)))
        return np.array(Image.fromarray(img).resize(size, Image.Resampling.BILINEAR))

    def _read_flare_uncached(self, path: Path) -> torch.Tensor:
        """A flare/light/reflective image at its pixels x synth_size / 512, (3, H, W) uint8."""
        img = self._resized(read_rgb(path))
        return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).contiguous()

    # -- device side: batched synthesis ----------------------------------------------------------
    def batch(self, indices: Sequence[int] | torch.Tensor, device: torch.device | str = "cpu",
              epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input, gt, flare), each (B, 3, crop, crop) float32 in [0, 1] on `device`."""
        idx = [int(i) for i in (indices.tolist() if torch.is_tensor(indices) else indices)]
        return self.synthesize([self.decode(i, epoch) for i in idx], device)

    def synthesize(self, raw: Sequence[RawSample], device: torch.device | str = "cpu",
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batched pair synthesis from decoded samples (use as a DataLoader collate + this)."""
        device = torch.device(device)
        s = self.synth_size
        seeds = [r.seed for r in raw]
        p = _params(seeds)  # CPU; per-sample geometry is read from here as Python numbers
        gamma = p["gamma"].to(device).view(-1, 1, 1, 1)

        def col(key: str) -> torch.Tensor:  # (B,) parameter -> (B, 1, 1, 1) on the device
            return p[key].to(device).view(-1, 1, 1, 1)

        bg = torch.stack([r.background for r in raw]).to(device, torch.float32) / 255
        if self.random_erasing > 0 and self.erasing_on == "background":
            bg = self._erase_background(bg, seeds, p)
        bg = bg ** gamma
        noise = torch.stack([torch.randn(3, s, s, device=device, generator=_dev_gen(r.seed, device))
                             for r in raw])
        bg = (col("gain") * (bg + col("sigma") * noise)).clamp(0, 1)

        # Per sample (files differ in size): linearise, add the reflective flare, remove the
        # background, then one affine + centre crop for flare and light: (3 or 6, S, S) each.
        moved = []
        for i, r in enumerate(raw):
            g_i = float(p["gamma"][i])

            def linear(x: torch.Tensor, g_i: float = g_i) -> torch.Tensor:  # uint8 -> linear
                return (x.to(device, torch.float32) / 255) ** g_i

            flare = linear(r.flare)
            if r.reflective is not None:
                refl = linear(r.reflective)
                if refl.shape != flare.shape:
                    refl = TF.center_crop(refl, list(flare.shape[1:]))
                flare = (flare + refl).clamp(0, 1)
            layers = _remove_background(flare[None])[0]
            if r.light is not None:
                layers = torch.cat([layers, linear(r.light)])
            h, w = layers.shape[1:]
            tx, ty = (int(round(float(u) * _TRANSLATE * n))
                      for u, n in zip(p["translate"][i], (w, h)))
            moved.append(affine_center_crop(layers, float(p["angle"][i]), (tx, ty),
                                            float(p["scale"][i]), float(p["shear"][i]), s))
        moved = _flip(torch.stack(moved), p["flare_flip"].to(device))  # (B, 3 or 6, S, S)
        flare = moved[:, :3]
        if not self.has_light:  # v1 only: ColorJitter(brightness=(0.8, 3)) clamps to [0, 1]
            flare = (flare * col("brightness")).clamp(0, 1)
        flare = _gaussian_blur(flare, p["blur_sigma"].to(device))
        if not self.has_light:  # v1 only: the DC offset
            flare = flare + col("dc")
        flare = flare.clamp(0, 1)

        inp = (flare + bg).clamp(0, 1)
        if self.has_light:
            light = moved[:, 3:].clamp(0, 1)
            gt = (bg + light).clamp(0, 1)
            flare_t = (flare - light).clamp(0, 1)
        else:
            gt, flare_t = bg, flare
        out = torch.cat([inp, gt, flare_t], 1) ** (1 / gamma)  # (B, 9, S, S) re-encoded
        out = self._augment(out, p)
        inp = out[:, 0:3]
        if self.random_erasing > 0 and self.erasing_on == "input":
            inp = random_erase(inp, seeds, self.random_erasing)
        return inp.contiguous(), out[:, 3:6].contiguous(), out[:, 6:9].contiguous()

    def _crop_offsets(self, p: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
        """(top, left) of each sample's `crop` x `crop` window in the synthesised S x S image."""
        span = self.synth_size - self.crop
        top = (p["crop_yx"][:, 0] * (span + 1)).long().clamp(max=span)
        left = (p["crop_yx"][:, 1] * (span + 1)).long().clamp(max=span)
        return list(zip(top.tolist(), left.tolist()))

    def _erase_background(self, bg: torch.Tensor, seeds: list[int], p: dict[str, torch.Tensor]
                          ) -> torch.Tensor:
        """`bg` (B, 3, S, S) in [0, 1] with each sample's erasing box set to 0, before
        linearisation and noise. The box is a box of the returned training crop: placed where
        `_augment` will cut that crop, mirrored where it will flip it, so that it ends at the
        (top, left, h, w) `sample_boxes` gives, as the "input" target's box does."""
        bg = bg.clone()
        offsets = self._crop_offsets(p)
        flips = p["pair_flip"].tolist() if self.flips else [[0.0, 0.0]] * len(seeds)
        c = self.crop
        for i, box in enumerate(sample_boxes(seeds, c, c, self.random_erasing)):
            if box is None:
                continue
            (top, left, h, w), (dy, dx) = box, offsets[i]
            if flips[i][0] > 0.5:  # horizontal flip after the crop: mirror the columns
                left = c - left - w
            if flips[i][1] > 0.5:  # vertical flip: mirror the rows
                top = c - top - h
            bg[i, :, dy + top:dy + top + h, dx + left:dx + left + w] = VALUE
        return bg

    def _augment(self, out: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Random crop and h/v flips, identical across input/gt/flare: (B, 9, S, S) -> crop."""
        if self.crop < self.synth_size:
            out = torch.stack([out[i, :, t:t + self.crop, lft:lft + self.crop]
                               for i, (t, lft) in enumerate(self._crop_offsets(p))])
        if self.flips:
            out = _flip(out, p["pair_flip"].to(out.device))
        return out


# ----------------------------------------------------------------------------------------------
def _params(seeds: list[int]) -> dict[str, torch.Tensor]:
    """Per-sample scalars (CPU tensors, leading dim B), each drawn from the sample's own CPU
    generator, so they do not depend on the device or the batch."""
    rows = []
    for sd in seeds:
        g = torch.Generator().manual_seed(sd ^ 0x5DEECE66D)  # distinct stream from decode()

        def u(lo: float, hi: float, *shape: int, g: torch.Generator = g) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(shape or (), generator=g)

        rows.append({
            "gamma": u(1.8, 2.2),
            "sigma": 0.01 * torch.randn((), generator=g) ** 2,  # 0.01 * chi2(1)
            "gain": u(0.5, 1.2),
            "angle": u(0, 360),  # degrees, RandomAffine(degrees=(0, 360))
            "scale": u(0.8, 1.5),
            "translate": u(-1, 1, 2),  # x, y as fractions of the maximum translation
            "shear": u(-20, 20),  # degrees, x-shear only: shear=(-20, 20)
            "flare_flip": (u(0, 1, 2) < 0.5).float(),
            "brightness": u(0.8, 3.0),  # v1 only
            "blur_sigma": u(0.1, 3.0),
            "dc": u(-0.02, 0.02),  # v1 only
            "crop_yx": u(0, 1, 2),
            "pair_flip": (u(0, 1, 2) < 0.5).float(),
        })
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def inverse_affine_matrix(angle: float, translate: tuple[int, int], scale: float,
                          shear: float) -> list[float]:
    """torchvision's `_get_inverse_affine_matrix` for centre (0, 0) and an x-shear only: the 2x3
    map (row-major) from output pixel coords to input ones, both relative to the image centre."""
    rot, sx = math.radians(angle), math.radians(shear)
    tx, ty = translate
    # Rotation x shear with sy = 0 (torchvision's RSS), in its float64 operation order; det == 1.
    a, b = math.cos(rot), -math.cos(rot) * math.tan(sx) - math.sin(rot)
    c, d = math.sin(rot), -math.sin(rot) * math.tan(sx) + math.cos(rot)
    m = [v / scale for v in (d, -b, 0.0, -c, a, 0.0)]
    m[2] += m[0] * -tx + m[1] * -ty
    m[5] += m[3] * -tx + m[4] * -ty
    return m


def affine_center_crop(img: torch.Tensor, angle: float, translate: tuple[int, int],
                       scale: float, shear: float, size: int) -> torch.Tensor:
    """`TF.center_crop(TF.affine(img, angle, translate, scale, [shear, 0]), size)` computed only
    for the cropped pixels: (C, H, W) -> (C, size, size), nearest neighbour, zero fill.

    Same grid arithmetic as torchvision's tensor `affine` (pixel centres relative to the image
    centre, theta / (W/2, H/2), grid_sample align_corners=False); centre_crop's offsets
    round((H - size) / 2), or zero padding (size - H) // 2 before when the image is smaller.
    """
    c, h, w = img.shape
    dev = img.device
    theta = torch.tensor(inverse_affine_matrix(angle, translate, scale, shear),
                         dtype=img.dtype, device=dev).reshape(1, 2, 3)
    off_y = -((size - h) // 2) if size > h else int(round((h - size) / 2.0))
    off_x = -((size - w) // 2) if size > w else int(round((w - size) / 2.0))
    rows = torch.arange(size, device=dev, dtype=img.dtype) + off_y  # affine-output pixel rows
    cols = torch.arange(size, device=dev, dtype=img.dtype) + off_x
    base = torch.empty(1, size, size, 3, dtype=img.dtype, device=dev)
    base[..., 0].copy_(cols - w * 0.5 + 0.5)
    base[..., 1].copy_((rows - h * 0.5 + 0.5).unsqueeze(-1))
    base[..., 2].fill_(1)
    rescaled = theta.transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h], dtype=img.dtype, device=dev)
    grid = base.view(1, size * size, 3).bmm(rescaled).view(1, size, size, 2)
    out = F.grid_sample(img[None], grid, mode="nearest", padding_mode="zeros",
                        align_corners=False)[0]
    if size > h or size > w:  # centre_crop's zero padding around a smaller image
        inside = (((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None])
        out = out * inside
    return out


def _flip(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Per-sample horizontal (flip[:, 0]) and vertical (flip[:, 1]) flips of (B, C, H, W)."""
    x = torch.where(flip[:, 0].view(-1, 1, 1, 1) > 0.5, x.flip(-1), x)
    return torch.where(flip[:, 1].view(-1, 1, 1, 1) > 0.5, x.flip(-2), x)


def _remove_background(x: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-channel: (x - min) * max / (max - min), min/max over (H, W).

    Flare7K's version reduces over the wrong axes (channels and rows); this is the intended one.
    """
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    return (x - lo) * hi / (hi - lo + 1e-7)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, taps: int = 21) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with a per-sample sigma, reflect padding
    (torchvision's GaussianBlur kernel: exp(-x^2 / 2 sigma^2) on x = -10..10, normalised)."""
    b, c, h, w = x.shape
    r = torch.arange(taps, device=x.device, dtype=x.dtype) - taps // 2
    k = torch.exp(-(r[None] ** 2) / (2 * sigma.view(-1, 1) ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, taps)
    y = F.pad(x.reshape(1, b * c, h, w), (taps // 2,) * 4, mode="reflect")
    y = F.conv2d(y, k.view(b * c, 1, 1, taps), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, taps, 1), groups=b * c)
    return y.view(b, c, h, w)


def _dev_gen(sample: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed((sample * 0x9E3779B1 + 7) % (1 << 63))
