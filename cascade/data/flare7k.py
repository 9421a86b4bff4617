"""Flare7K / Flare7K++ training pairs: files decoded on the CPU, synthesis batched on the device.

Layout (either the Flare7K++ root or the Flare7K folder itself may be given as `root`):
    Flare7K/Scattering_Flare/Compound_Flare/   flare images (light source included)
    Flare7K/Scattering_Flare/Light_Source/     Flare7K++ only: the light source of each flare
    Flare7K/Reflective_Flare/                  optional reflective flares (ghosts)
    Flare-R/{Compound_Flare,Light_Source}/     Flare7K++ real flares
`backgrounds` is a flat folder of flare-free images (Flickr24K).

Synthesis follows the reference facts (shared/reference/README.md), per sample:
gamma ~ U(1.8, 2.2) linearises background and flare; background noise sigma = 0.01*chi2(1), gain
U(0.5, 1.2), clamp; flare (+ optional reflective flare) background-removed, random affine
(rotation U(0, 360), scale U(0.8, 1.5), translate +-300 px at 1440 px, shear U(-20, 20)),
centre crop, flips, brightness U(0.8, 3), Gaussian blur (21 taps, sigma U(0.1, 3)), DC offset
U(-0.02, 0.02), clamp; input = clamp(background + flare); outputs re-encoded with x^(1/gamma).
With light sources (Flare7K++) the light image gets the same affine, flips and brightness, gt =
clamp(background + light) and the flare target = clamp(flare - light): 6-channel targets (gt, flare).
Without them (Flare7K v1) gt = background and the flare target is the flare.

Geometry: a synthesised image of side `synth_size` shows the same field of view as Flare7K's
512 px crop of a 1440 px flare, so flares keep their relative size at any `synth_size`; `crop`
is then a random crop of that (the paper fine-tunes on 128 px crops).

Deliberate difference from Flare7K's code: its "per-channel" background removal takes min/max over
axes (0, 1) of a (C, H, W) tensor, i.e. over channels and rows, leaving per-column statistics. Here
the min/max are per channel over the whole image, as intended.

Randomness: every sample's scalars come from a CPU torch.Generator seeded by
sha256(seed, epoch, index) (`synthetic.sample_seed`), so pairs do not depend on batching or the
number of loader workers; the background noise uses a generator on the device with the same seed.
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
from PIL import Image

from cascade.data.images import read_rgb
from cascade.data.synthetic import sample_seed
from cascade.errors import UserError
from cascade.io import image_files

_REF_CROP, _REF_FLARE = 512.0, 1440.0  # Flare7K: 512 px crops of ~1440 px flare images


@dataclass(frozen=True)
class FlareSet:
    """One source of flares: compound flare files and, for Flare7K++, matching light sources."""

    name: str
    flares: tuple[Path, ...]
    lights: tuple[Path, ...] | None


def find_flare_sets(root: str | os.PathLike) -> tuple[list[FlareSet], list[Path]]:
    """Scattering flare sets and reflective flare files under a Flare7K(++) root.

    Raises UserError naming the folder when nothing usable is found or when a Light_Source
    folder does not match its Compound_Flare folder file for file (paired by stem).
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: Flare7K folder does not exist")
    flare7k = root / "Flare7K" if (root / "Flare7K").is_dir() else root
    candidates = [("Flare7K", flare7k / "Scattering_Flare"), ("Flare-R", root / "Flare-R")]
    sets = []
    for name, base in candidates:
        compound = base / "Compound_Flare"
        if not compound.is_dir():
            continue
        flares = image_files(compound)
        if not flares:
            raise UserError(f"{compound}: no flare images")
        lights = None
        if (base / "Light_Source").is_dir():
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
    reflective_dir = flare7k / "Reflective_Flare"
    reflective = image_files(reflective_dir) if reflective_dir.is_dir() else []
    return sets, reflective


@dataclass(frozen=True)
class RawSample:
    """Decoded files for one sample (uint8 CHW tensors), ready for batched synthesis."""

    background: torch.Tensor  # (3, S, S) random crop, reflect-padded when the image is smaller
    flare: torch.Tensor  # (3, W, W) W = flare working size
    light: torch.Tensor | None  # (3, W, W) Flare7K++ light source, same geometry as `flare`
    reflective: torch.Tensor | None  # (3, W, W)
    seed: int


class Flare7KPairs:
    """Training pairs from Flare7K / Flare7K++ flares on flare-free backgrounds.

    Args:
        root: Flare7K++ (or Flare7K) folder; see the module docstring for the layout.
        backgrounds: folder of flare-free background images.
        crop: side of the returned pairs (random crop of the synthesised image).
        seed: dataset seed; a sample is a pure function of (seed, epoch, index).
        synth_size: side of the synthesised image (Flare7K: 512); >= crop.
        reflective: probability of adding a reflective flare when the folder exists.
        flips: random horizontal and vertical flips of the whole pair.
        random_erasing: probability of one erased box per sample (same box and fill colour in
            input and gt, flare target zero there, so input = gt + flare still holds).
        cache_size: decoded flare images kept in memory (per process).
    """

    def __init__(self, root: str | os.PathLike, backgrounds: str | os.PathLike, crop: int,
                 seed: int, *, synth_size: int = 512, reflective: float = 0.5,
                 flips: bool = True, random_erasing: float = 0.0, cache_size: int = 256) -> None:
        if crop < 16 or synth_size < crop:
            raise UserError(f"Flare7KPairs: need 16 <= crop <= synth_size, got crop={crop}, "
                            f"synth_size={synth_size}")
        self.sets, self.reflective_files = find_flare_sets(root)
        bg_dir = Path(backgrounds)
        if not bg_dir.is_dir():
            raise UserError(f"{bg_dir}: backgrounds folder does not exist")
        self.backgrounds = image_files(bg_dir)
        if not self.backgrounds:
            raise UserError(f"{bg_dir}: no background images")
        self.crop, self.seed, self.synth_size = int(crop), int(seed), int(synth_size)
        self.p_reflective, self.flips = float(reflective), bool(flips)
        self.random_erasing = float(random_erasing)
        self.has_light = self.sets[0].lights is not None
        # Flare working size: same pixel density as Flare7K's 1440 px flares at a 512 crop.
        self.flare_side = int(round(self.synth_size * _REF_FLARE / _REF_CROP))
        self._read_flare = functools.lru_cache(maxsize=cache_size)(self._read_flare_uncached)

    def __len__(self) -> int:
        return len(self.backgrounds)

    # -- CPU side: decoding (safe to run in DataLoader workers) ---------------------------------
    def decode(self, index: int, epoch: int = 0) -> RawSample:
        """Read and crop the files of sample `index`; all choices from its seeded generator."""
        sd = sample_seed(self.seed, index, epoch)
        g = torch.Generator().manual_seed(sd)
        bg = read_rgb(self.backgrounds[index % len(self.backgrounds)])
        s = self.synth_size
        pad_h, pad_w = max(0, s - bg.shape[0]), max(0, s - bg.shape[1])
        if pad_h or pad_w:
            bg = np.pad(bg, ((0, pad_h), (0, pad_w), (0, 0)), mode="reflect")
        top = int(torch.randint(0, bg.shape[0] - s + 1, (), generator=g))
        left = int(torch.randint(0, bg.shape[1] - s + 1, (), generator=g))
        background = torch.from_numpy(np.ascontiguousarray(bg[top:top + s, left:left + s]))
        # Flare sets equally likely (Flare7K++ mixes its sets 1:1), then a file uniformly.
        fs = self.sets[int(torch.randint(0, len(self.sets), (), generator=g))]
        k = int(torch.randint(0, len(fs.flares), (), generator=g))
        reflective = None
        if self.reflective_files and float(torch.rand((), generator=g)) < self.p_reflective:
            j = int(torch.randint(0, len(self.reflective_files), (), generator=g))
            reflective = self._read_flare(self.reflective_files[j])
        return RawSample(
            background=background.permute(2, 0, 1).contiguous(),
            flare=self._read_flare(fs.flares[k]),
            light=self._read_flare(fs.lights[k]) if fs.lights is not None else None,
            reflective=reflective,
            seed=sd,
        )

    def _read_flare_uncached(self, path: Path) -> torch.Tensor:
        """A flare image resized to the working size, (3, W, W) uint8."""
        img = read_rgb(path)
        w = self.flare_side
        if img.shape[:2] != (w, w):
            img = np.array(Image.fromarray(img).resize((w, w), Image.Resampling.BILINEAR))
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
        p = _params([r.seed for r in raw], device)
        gamma = p["gamma"].view(-1, 1, 1, 1)

        def linear(x: torch.Tensor) -> torch.Tensor:  # uint8 -> linear float on device
            return (x.to(device, torch.float32) / 255.0) ** gamma

        bg = linear(torch.stack([r.background for r in raw]))
        noise = torch.stack([torch.randn(3, s, s, device=device, generator=_dev_gen(r.seed, device))
                             for r in raw])
        bg = (p["gain"].view(-1, 1, 1, 1) * (bg + p["sigma"].view(-1, 1, 1, 1) * noise)).clamp(0, 1)

        flare = linear(torch.stack([r.flare for r in raw]))
        has_refl = torch.tensor([r.reflective is not None for r in raw], device=device)
        if has_refl.any():
            refl = linear(torch.stack([r.reflective if r.reflective is not None
                                       else torch.zeros_like(r.flare) for r in raw]))
            flare = torch.where(has_refl.view(-1, 1, 1, 1), (flare + refl).clamp(0, 1), flare)
        flare = _remove_background(flare)
        layers = [flare]
        if self.has_light:
            layers.append(linear(torch.stack([r.light for r in raw])))
        # One affine for flare and light: (B, 3 or 6, W, W) -> (B, ., S, S).
        moved = F.grid_sample(torch.cat(layers, 1), _flare_grid(p, s), mode="bilinear",
                              padding_mode="zeros", align_corners=False)
        moved = _flip(moved, p["flare_flip"])
        moved = moved * p["brightness"].view(-1, 1, 1, 1)
        flare = _gaussian_blur(moved[:, :3], p["blur_sigma"])
        flare = (flare + p["dc"].view(-1, 1, 1, 1)).clamp(0, 1)

        inp = (flare + bg).clamp(0, 1)
        if self.has_light:
            light = moved[:, 3:].clamp(0, 1)
            gt = (bg + light).clamp(0, 1)
            flare_t = (flare - light).clamp(0, 1)
        else:
            gt, flare_t = bg, flare
        out = torch.cat([inp, gt, flare_t], 1) ** (1 / gamma)  # (B, 9, S, S) re-encoded
        out = self._augment(out, p)
        return out[:, 0:3].contiguous(), out[:, 3:6].contiguous(), out[:, 6:9].contiguous()

    def _augment(self, out: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Random crop, h/v flips and random erasing, identical across input/gt/flare."""
        b, c = out.shape[:2]
        s = self.synth_size
        if self.crop < s:
            top = (p["crop_yx"][:, 0] * (s - self.crop + 1)).long().clamp(max=s - self.crop)
            left = (p["crop_yx"][:, 1] * (s - self.crop + 1)).long().clamp(max=s - self.crop)
            out = torch.stack([out[i, :, t:t + self.crop, lft:lft + self.crop]
                               for i, (t, lft) in enumerate(zip(top.tolist(), left.tolist()))])
        if self.flips:
            out = _flip(out, p["pair_flip"])
        if self.random_erasing > 0:
            n = self.crop
            ax = torch.arange(n, device=out.device, dtype=torch.float32) / n
            box = p["erase_box"]  # (B, 4): y0, x0, h, w as fractions
            inside = ((ax.view(1, -1, 1) >= box[:, 0, None, None])
                      & (ax.view(1, -1, 1) < (box[:, 0] + box[:, 2])[:, None, None])
                      & (ax.view(1, 1, -1) >= box[:, 1, None, None])
                      & (ax.view(1, 1, -1) < (box[:, 1] + box[:, 3])[:, None, None]))
            inside = inside & (p["erase_u"] < self.random_erasing).view(-1, 1, 1)
            fill = torch.cat([p["erase_fill"], p["erase_fill"], torch.zeros_like(p["erase_fill"])], 1)
            out = torch.where(inside[:, None], fill.view(b, c, 1, 1), out)
        return out


# ----------------------------------------------------------------------------------------------
def _params(seeds: list[int], device: torch.device) -> dict[str, torch.Tensor]:
    """Per-sample scalars, each drawn from the sample's own CPU generator (device independent)."""
    rows = []
    for sd in seeds:
        g = torch.Generator().manual_seed(sd ^ 0x5DEECE66D)  # distinct stream from decode()

        def u(lo: float, hi: float, *shape: int, g: torch.Generator = g) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(shape or (), generator=g)

        rows.append({
            "gamma": u(1.8, 2.2),
            "sigma": 0.01 * torch.randn((), generator=g) ** 2,  # 0.01 * chi2(1)
            "gain": u(0.5, 1.2),
            "angle": u(0, 2 * math.pi),
            "scale": u(0.8, 1.5),
            "translate": u(-300 / _REF_FLARE, 300 / _REF_FLARE, 2),
            "shear": u(-20, 20),
            "flare_flip": (u(0, 1, 2) < 0.5).float(),
            "brightness": u(0.8, 3.0),
            "blur_sigma": u(0.1, 3.0),
            "dc": u(-0.02, 0.02),
            "crop_yx": u(0, 1, 2),
            "pair_flip": (u(0, 1, 2) < 0.5).float(),
            "erase_u": u(0, 1),
            # torchvision-like erasing: area 2-33 %, aspect 0.3-3.3
            "erase_box": _erase_box(u(0.02, 0.33), torch.exp(u(math.log(0.3), math.log(3.3))),
                                    u(0, 1, 2)),
            "erase_fill": u(0, 1, 3),
        })
    return {k: torch.stack([r[k] for r in rows]).to(device) for k in rows[0]}


def _erase_box(area: torch.Tensor, aspect: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    h = torch.sqrt(area * aspect).clamp(max=1.0)
    w = torch.sqrt(area / aspect).clamp(max=1.0)
    return torch.stack([pos[0] * (1 - h), pos[1] * (1 - w), h, w])


def _flare_grid(p: dict[str, torch.Tensor], size: int) -> torch.Tensor:
    """Sampling grid (B, S, S, 2): output pixels -> flare image coords for the random affine.

    Output normalised coords [-1, 1] span 512 px of a 1440 px flare (Flare7K's centre crop);
    the forward map is x_out = T + R(angle) Shear(shear) scale x_flare, inverted here.
    """
    b = p["angle"].shape[0]
    a, sh = p["angle"], torch.deg2rad(p["shear"])
    rot = torch.stack([torch.cos(a), -torch.sin(a), torch.sin(a), torch.cos(a)], 1).view(b, 2, 2)
    shear = torch.zeros(b, 2, 2, device=a.device)
    shear[:, 0, 0], shear[:, 0, 1], shear[:, 1, 1] = 1.0, torch.tan(sh), 1.0
    fwd = rot @ shear * p["scale"].view(-1, 1, 1)
    inv = torch.linalg.inv(fwd)
    k = _REF_CROP / _REF_FLARE  # output half-width in flare half-widths
    t = 2 * p["translate"]  # fraction of the width -> normalised units
    theta = torch.cat([inv * k, (-inv @ t[:, :, None])], 2)  # (B, 2, 3)
    return F.affine_grid(theta, [b, 1, size, size], align_corners=False)


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
    """Separable Gaussian blur of (B, C, H, W) with a per-sample sigma, reflect padding."""
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
