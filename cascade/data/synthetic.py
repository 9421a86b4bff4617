"""Procedural night-time lens-flare benchmark: nothing downloaded, every pixel a function of a seed.

Physics, in linear radiance (1.0 = sensor saturation):
- Scene, at a normal exposure: a bundled scikit-image photograph (desaturated, tinted, shadows
  crushed) or a procedural night street (sky gradient with city glow, building silhouettes with
  lit windows, stars), with vignetting.
- Camera, as Flare7K synthesises its backgrounds (`basicsr/data/flare7k_dataset.py`): gain
  U(0.5, 1.2) and Gaussian noise of sigma = 0.01 * chi2(1), both on the scene at that normal
  exposure, then the exposure is cut to night, log-U(0.03, 0.18). The noise-to-signal ratio is
  thus Flare7K's (`python bench/demo_check.py noise --size 128`: noise alone caps the SSIM of a
  noise-free output at 0.95, as Flare7K's camera does on its normally exposed backgrounds, 0.93;
  the same sigma added to the night radiance would cap it at 0.60, and the earlier shot/read model
  did at 0.57, so SSIM measured noise that no network can predict).
- Light sources: 1-3 small HDR discs/ellipses, 15-300x saturation, lamp colours.
- Scattering flare: the point-spread function of an aperture with dust and scratches,
  PSF = |FFT(A * exp(i*phi))|^2 summed over five wavelengths (polygon edges and scratches give
  streaks and starbursts, dust gives soft rings, wavelength scaling gives colour fringes). The
  diffraction-limited core is removed (it is the light source itself, kept in gt). A bank of
  PSFs is computed once per (split, seed); each light's flare is a bank PSF rotated, scaled and
  resampled straight onto the image at the light (the lights are 1-4 px discs, so the convolution
  is that of a point of the disc's energy).
- Veiling glare: a broad radial halo (1 + (r/r0)^2)^-p around every light, normalised in closed
  form.
- Ghosts: faint aperture-shaped polygons on the line from the light through the optical centre.
- Output: clip, gamma U(1.8, 2.2) encode (Flare7K's range), 8-bit levels.

gt = scene + light source (Flare7K++ convention: the light source stays), input = gt + flare,
flare target = flare alone; all three are gamma-encoded (B, 3, S, S) in [0, 1] on 8-bit levels.
Masks (Flare7K colours) are thresholds on the components rendered, see `MASK_THRESHOLDS`.

Scale: lights, PSFs and halos are sized relative to the rendered frame, so a training crop must
be cut from a frame rendered at the test resolution (`frame=test_size`), as Flare7K synthesises
at full size and then crops; rendering whole scenes at the crop size would make every training
flare several times smaller in pixels than the test flares.

Splits (`SPLITS`): each sample belongs to one named stream, and the streams share nothing. The
seeds of its random numbers, its PSF bank and its noise bank are derived from sha256 of
("flaresweep-procedural/<split>", seed, ...), so the same seed in two splits gives unrelated
streets, PSFs and flares; and the photographs are split by file: `test` renders only
`SCENES["test"]`, every training split only `SCENES["train"]`. A trial's seed (any integer) can
therefore never reproduce the test set or the base's data, and `batch()` (training pairs) refuses
the test split.

Randomness: every sample draws all its random numbers in one call to a CPU `torch.Generator`
seeded from (split, seed, epoch, index), so they are identical on any device, batch composition
or worker count. Full-resolution sensor noise is a per-sample window (offset, transpose, channel
roll, sign) of a (3, 2F, 2F) Gaussian field (F the frame side); that field, the PSF bank and the
scene bank depend on the split and seed only. Per-light and per-ghost work is added into its
sample in a fixed order, so a sample's pixels do not depend on the rest of its batch (tested).

Cost (one core, bench/bench_data.py): ~0.04 CPU-s per batch of 8 at 128^2, ~0.14 at 256^2.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cascade.config import ERASING_TARGETS
from cascade.data.erasing import VALUE, random_erase, sample_boxes
from cascade.data.images import to_uint8, write_png
from cascade.errors import UserError, cli_errors
from cascade.io import atomic_write_json
from cascade.masks import paint_mask
from cascade.seeds import derive_seed

# Data streams that never share a sample, a PSF or a photograph (module docstring, "Splits"):
# the procedural base's training data, a trial's fine-tuning data, the demo encoder's training
# data (cascade.demo_encoder) and the test sets.
SPLITS = ("base", "train", "encoder", "test")
TRAINING_SPLITS = ("base", "train", "encoder")
# Photographs bundled with the scikit-image wheel (no pooch download; verified offline), split by
# file so that no test scene is a crop of a training photo: each split has colour and grey ones.
# "motorcycle" is the left view of skimage.data.stereo_motorcycle (the right view is unused: it is
# the same scene).
SCENES = {
    "train": ("astronaut", "coffee", "hubble_deep_field", "motorcycle", "camera", "brick", "grass"),
    "test": ("chelsea", "rocket", "gravel"),
}
# Wavelengths (nm) and a coarse RGB response to each; rows = R, G, B, each normalised to sum 1.
WAVELENGTHS = (450.0, 500.0, 550.0, 600.0, 650.0)
_RGB_RESPONSE = torch.tensor([
    [0.05, 0.02, 0.13, 0.40, 0.40],
    [0.05, 0.30, 0.50, 0.15, 0.00],
    [0.55, 0.35, 0.10, 0.00, 0.00],
])
LAMP_COLOURS = torch.tensor([
    [1.00, 0.80, 0.55],  # warm white (halogen)
    [1.00, 0.55, 0.22],  # sodium vapour
    [0.85, 0.92, 1.00],  # cool LED
    [1.00, 0.95, 0.85],  # neutral white
    [1.00, 0.25, 0.12],  # red traffic / tail light
    [0.35, 1.00, 0.55],  # green traffic light
])
# Mask thresholds, on the gamma-encoded luminance of each component rendered alone:
#   light  : the light source's linear luminance >= 0.5 (its saturated core);
#   streak : the scattering (PSF) flare >= 0.30 and at least as bright as the halo there;
#   glare  : all flare (scattering + halo + ghosts) >= 0.18.
# Painted light over streak over glare (cascade.masks.paint_mask).
MASK_THRESHOLDS = {"light": 0.5, "streak": 0.30, "glare": 0.18}
MAX_LIGHTS = 3
# Version of the pixels this module renders; bump when they change (cascade.pretrain and
# cascade.data.testset key their caches on it). /2: PSF sprites, closed-form halo, one RNG draw
# per sample, noise bank. /3: splits (seed namespaces, photographs split by file), crops of a
# frame, Flare7K's noise, gain and gamma.
GENERATOR = "cascade.data.synthetic/3"
MAX_GHOSTS = 4
_N_SCALARS = 256  # uniform draws reserved per sample for scalar parameters (~160 used)
_LUMA = (0.2126, 0.7152, 0.0722)
# Night exposure of a scene (a fraction of its normal exposure): log-uniform in this range.
EXPOSURE = (0.03, 0.18)
# The procedural street is designed in night radiance at this exposure (the geometric mean of
# EXPOSURE), so that at its normal exposure it gets the same noise as a photograph.
STREET_EXPOSURE = math.sqrt(EXPOSURE[0] * EXPOSURE[1])


def sample_seed(seed: int, index: int, epoch: int = 0) -> int:
    """A 63-bit seed for one Flare7K training sample (`cascade.data.flare7k`): sha256 of
    ("flaresweep", seed, epoch, index); independent of batching. Procedural samples use
    `split_seed`, one namespace per split."""
    return derive_seed("flaresweep", seed, epoch, index)


def split_seed(split: str, seed: int, *parts: object) -> int:
    """A 63-bit seed in the namespace of one procedural split: sha256 of
    ("flaresweep-procedural/<split>", seed, *parts). Samples use parts (epoch, index), the PSF
    bank ("psf",), the noise bank ("noise",). Unknown splits are refused."""
    check_split(split)
    return derive_seed(f"flaresweep-procedural/{split}", seed, *parts)


def check_split(split: str) -> None:
    """UserError unless `split` is one of SPLITS."""
    if split not in SPLITS:
        raise UserError(f"procedural split {split!r} is unknown; expected one of {', '.join(SPLITS)}")


def scene_split(split: str) -> str:
    """Which photographs a split renders: "test" for the test split, "train" for the others."""
    check_split(split)
    return "test" if split == "test" else "train"


def _luma(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, H, W) Rec.709 luminance."""
    return _LUMA[0] * x[:, 0] + _LUMA[1] * x[:, 1] + _LUMA[2] * x[:, 2]


# ----------------------------------------------------------------------------------------------
# Scattering PSF bank
# ----------------------------------------------------------------------------------------------
def _aperture(m: int, radius_px: float, g: torch.Generator) -> tuple[torch.Tensor, int]:
    """Amplitude transmission (M, M) in [0, 1] of a polygonal/circular aperture of radius
    `radius_px` with opaque dust specks and scratches, and its blade count (0 = circle)."""
    def rnd(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape or (), generator=g)

    blades = [0, 5, 6, 6, 7, 8, 8, 9][int(torch.randint(0, 8, (), generator=g))]
    ax = (torch.arange(m, dtype=torch.float32) - m / 2) / radius_px
    v, u = torch.meshgrid(ax, ax, indexing="ij")
    soft = 1.0 / radius_px  # ~1 px antialiased edges
    r = torch.sqrt(u * u + v * v)
    if blades:  # regular polygon: apothem / cos(angle to the nearest edge normal)
        sector = 2 * math.pi / blades
        local = torch.remainder(torch.atan2(v, u) - float(rnd(0, math.pi)), sector) - sector / 2
        edge = math.cos(math.pi / blades) / torch.cos(local)
    else:
        edge = torch.ones_like(r)
    a = torch.sigmoid((edge - r) / soft)
    n_dust = int(torch.randint(4, 16, (), generator=g))
    dust = torch.stack([rnd(-0.8, 0.8, n_dust), rnd(-0.8, 0.8, n_dust), rnd(0.02, 0.08, n_dust)], 1)
    d = torch.cdist(torch.stack([u, v], -1).view(-1, 2), dust[:, :2])  # (M*M, D)
    a = a * (1 - torch.sigmoid((dust[:, 2] - d) / soft)).prod(1).view(m, m)
    for _ in range(int(torch.randint(2, 10, (), generator=g))):  # scratches -> long streaks
        ang = float(rnd(0, math.pi))
        dist = u * math.sin(ang) - v * math.cos(ang) - float(rnd(-0.7, 0.7))
        depth, width = float(rnd(0.5, 1.0)), float(rnd(0.004, 0.015))
        a = a * (1 - depth * torch.sigmoid((width - dist.abs()) / soft))
    return a, blades


def _psf(m: int, g: torch.Generator) -> torch.Tensor:
    """One RGB scattering PSF, (3, M, M), centred at (M/2, M/2), core removed, G sums to 1."""
    radius_px = m * (0.22 + 0.08 * float(torch.rand((), generator=g)))  # sets the PSF scale
    a, _ = _aperture(m, radius_px, g)
    ax = (torch.arange(m, dtype=torch.float32) - m / 2) / radius_px
    v, u = torch.meshgrid(ax, ax, indexing="ij")
    # Optical path difference in waves at 550 nm: defocus, astigmatism and a smooth random
    # surface error (low-res noise upsampled), which breaks the PSF into natural speckle.
    coef = torch.rand(3, generator=g)
    rough = F.interpolate(torch.randn(1, 1, 8, 8, generator=g), size=(m, m), mode="bicubic",
                          align_corners=False)[0, 0]
    opd = (0.3 * coef[0] * (2 * (u * u + v * v) - 1) + 0.2 * (coef[1] - 0.5) * (u * u - v * v)
           + (0.02 + 0.08 * coef[2]) * rough)
    pupil = torch.stack([a, opd])[None]  # (1, 2, M, M)
    psfs = []
    for lam in WAVELENGTHS:
        s = lam / 550.0  # longer wavelength: pupil smaller in frequency units -> wider PSF
        # Resample the pupil at coordinates scaled by s (one grid_sample instead of re-rendering).
        theta = torch.tensor([[[s, 0.0, 0.0], [0.0, s, 0.0]]])
        a_l, opd_l = F.grid_sample(pupil, _affine_grid(theta, m), align_corners=False)[0]
        field = a_l * torch.exp(1j * (2 * math.pi / s) * opd_l)
        psf = torch.fft.fftshift(torch.fft.fft2(field)).abs() ** 2
        psfs.append(psf / psf.sum())
    rgb = torch.einsum("cl,lhw->chw", _RGB_RESPONSE, torch.stack(psfs))
    # Remove the diffraction-limited core (~ the Airy disc): that energy is the light source.
    airy = 1.22 * m / (2 * radius_px)
    rr = torch.sqrt(u * u + v * v) * radius_px / (m / 2)  # image-plane radius, 1 = kernel edge
    rgb = rgb * (1 - torch.exp(-(rr * (m / 2) / (2.0 * airy)) ** 2))
    # Taper to zero at the kernel edge: the FFT's periodic wrap-around otherwise shows as lines.
    rgb = rgb * torch.cos(0.5 * math.pi * ((rr - 0.8) / 0.2).clamp(0, 1)) ** 2
    return rgb / rgb[1].sum()


# PSFs are computed at most at this side and resampled to 2S per sample: the cost stays fixed.
PSF_SIDE = 256


@functools.lru_cache(maxsize=4)
def _psf_bank(side: int, split: str, seed: int, count: int) -> torch.Tensor:
    """(count, 3, side, side) scattering PSFs for one (split, seed), computed once on CPU."""
    g = torch.Generator().manual_seed(split_seed(split, seed, "psf"))
    return torch.stack([_psf(side, g) for _ in range(count)])


@functools.lru_cache(maxsize=4)
def _noise_bank(size: int, split: str, seed: int) -> torch.Tensor:
    """(3, 2F, 2F) standard normal sensor-noise field for one (split, seed), on CPU."""
    g = torch.Generator().manual_seed(split_seed(split, seed, "noise"))
    return torch.randn(3, 2 * size, 2 * size, generator=g)


def _affine_grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    return F.affine_grid(theta, [theta.shape[0], 1, size, size], align_corners=False)


# ----------------------------------------------------------------------------------------------
# Backgrounds
# ----------------------------------------------------------------------------------------------
def _load_photo(name: str) -> np.ndarray:
    """One bundled scikit-image photograph, (H, W, 3) uint8."""
    import skimage.data

    img = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3])


@functools.lru_cache(maxsize=2)
def _skimage_photos(group: str) -> tuple[torch.Tensor, ...]:
    """The photographs of `SCENES[group]`, centre square crops, (3, n, n) uint8; decoded once."""
    out = []
    for name in SCENES[group]:
        t = torch.from_numpy(_load_photo(name)).permute(2, 0, 1)
        sq = min(t.shape[1:])  # centre square crop
        top, left = (t.shape[1] - sq) // 2, (t.shape[2] - sq) // 2
        out.append(t[:, top:top + sq, left:left + sq].contiguous())
    return tuple(out)


@functools.lru_cache(maxsize=4)
def _scene_bank(side: int, group: str) -> torch.Tensor:
    """(N, 3, side, side) photographs of `SCENES[group]`, linearised (sRGB^2.2), float32, CPU."""
    out = []
    for t in _skimage_photos(group):
        t = F.interpolate(t[None].float() / 255, size=(side, side), mode="bilinear",
                          antialias=True, align_corners=False)[0]
        out.append(t.clamp(0, 1) ** 2.2)
    return torch.stack(out)


@dataclass(frozen=True)
class Rendered:
    """One rendered batch. Images (B, 3, S, S) gamma-encoded in [0, 1] on 8-bit levels;
    masks (B, S, S) bool."""

    input: torch.Tensor
    gt: torch.Tensor
    flare: torch.Tensor
    streak: torch.Tensor
    glare: torch.Tensor
    light: torch.Tensor


def frame_side(crop: int, test_size: int) -> int:
    """Side of the frames training crops are cut from: the test resolution (never below the crop),
    so that training and test flares have the same size in pixels (module docstring, "Scale")."""
    return max(crop, test_size)


class ProceduralPairs:
    """Procedural night-flare pairs of one split, each a pure function of (seed, epoch, index).

    Args:
        size: side S in pixels (>= 16) of the images returned: the whole frame, or a crop of it.
        seed: stream seed within the split; also seeds the split's PSF and noise banks.
        split: one of SPLITS (module docstring, "Splits"); "train" (a trial's fine-tuning data)
            by default. "test" renders test sets only (`render`); `batch` refuses it.
        frame: side F >= S of the frame each sample is rendered at before an S x S crop at a
            per-sample random position (None: F = S, the whole frame). Set it to the test
            resolution for training crops (module docstring, "Scale").
        n_psf: scattering PSFs in the bank (each sample rotates/scales one of them).
        natural_fraction: probability that a sample's scene is a darkened photograph rather
            than a procedural street.
        ghosts: render aperture ghosts (reflective flare).
        random_erasing: probability of erasing one box per sample in `batch` (training pairs
            only; test sets are never erased). `cascade.data.erasing`: torchvision
            RandomErasing's box, value 0. 0 leaves the pairs byte-identical to a run without it.
        erasing_on: "background": the box's scene radiance (the background, camera noise
            included) is zeroed in the frame before the lights and the flare are added, so the
            box is in input and gt; "input": the box is zeroed in the encoded input only (gt and
            flare unchanged).
    """

    def __init__(self, size: int, seed: int, *, split: str = "train", frame: int | None = None,
                 n_psf: int = 6, natural_fraction: float = 0.5, ghosts: bool = True,
                 random_erasing: float = 0.0, erasing_on: str = "background") -> None:
        check_split(split)
        if size < 16:
            raise UserError(f"ProceduralPairs: size={size} is too small; expected >= 16")
        if frame is not None and frame < size:
            raise UserError(f"ProceduralPairs: frame={frame} is smaller than the crop size={size}")
        if not 0.0 <= natural_fraction <= 1.0:
            raise UserError(f"ProceduralPairs: natural_fraction={natural_fraction} not in [0, 1]")
        if not 0.0 <= random_erasing <= 1.0:
            raise UserError(f"ProceduralPairs: random_erasing={random_erasing} not in [0, 1]")
        self.size, self.seed, self.split, self.n_psf = int(size), int(seed), split, int(n_psf)
        self.frame = int(frame) if frame is not None else self.size
        self.natural_fraction, self.ghosts = float(natural_fraction), bool(ghosts)
        if erasing_on not in ERASING_TARGETS:
            raise UserError(f"ProceduralPairs: erasing_on={erasing_on!r}; expected one of "
                            + ", ".join(ERASING_TARGETS))
        self.random_erasing, self.erasing_on = float(random_erasing), erasing_on
        self._device_cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    # -- public contract --------------------------------------------------------------------------
    def sample_seeds(self, indices: Sequence[int], epoch: int = 0) -> list[int]:
        """The seed of each sample (its RNG draws, its erasing box): `split_seed(split, seed,
        epoch, index)`."""
        return [split_seed(self.split, self.seed, epoch, int(i)) for i in indices]

    def batch(self, indices: Sequence[int] | torch.Tensor, device: torch.device | str = "cpu",
              epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pairs (input, gt, flare), each (B, 3, S, S) float32 in [0, 1] on `device`;
        the input randomly erased when `random_erasing` > 0 (box from each sample's seed).
        Refused for the test split: test images are never training pairs."""
        if self.split == "test":
            raise UserError("ProceduralPairs: the test split renders test sets only; training "
                            f"pairs come from one of {', '.join(TRAINING_SPLITS)}")
        on_background = self.random_erasing > 0 and self.erasing_on == "background"
        r = self.render(indices, device, epoch, erase_background=on_background)
        if self.random_erasing == 0 or on_background:
            return r.input, r.gt, r.flare
        idx = [int(i) for i in (indices.tolist() if torch.is_tensor(indices) else indices)]
        return random_erase(r.input, self.sample_seeds(idx, epoch), self.random_erasing), r.gt, r.flare

    def render(self, indices: Sequence[int] | torch.Tensor, device: torch.device | str = "cpu",
               epoch: int = 0, *, erase_background: bool = False) -> Rendered:
        """Images plus region masks for a batch of sample indices (see `Rendered`).

        `erase_background`: zero each sample's erasing box (`random_erasing`, a box of the S x S
        crop) in the scene before lights and flare are added (`batch` with "background")."""
        device = torch.device(device)
        idx = [int(i) for i in (indices.tolist() if torch.is_tensor(indices) else indices)]
        if not idx:
            raise ValueError("render: empty batch of indices")
        p = _stack([self._params(s) for s in self.sample_seeds(idx, epoch)], device)
        psfs, scenes, noise = self._banks(device)

        scene = self._scene(p, scenes, noise)  # (B, 3, F, F) linear
        if erase_background:
            scene = self._erase(scene, idx, epoch, p)
        light, streak, halo = self._lights_and_scatter(p, psfs)  # each (B, 3, F, F) linear
        flare = streak + halo
        if self.ghosts:
            flare = flare + self._ghosts(p)

        gamma = p["gamma"].view(-1, 1, 1, 1)

        def encode(x: torch.Tensor) -> torch.Tensor:  # 8-bit levels, as written to PNG
            # 255 * x^(1/gamma) as exp(log(x) / gamma + log(255)): 2x faster than pow on CPU.
            y = self._crop(x, p).clamp(0, 1).log_().mul_(1 / gamma).add_(math.log(255)).exp_()
            return y.add_(0.5).floor_().div_(255)

        gt_lin = scene + light
        # Thresholds on encoded luminance, compared in linear space: y^(1/g) >= t <=> y >= t^g.
        g1 = gamma[:, 0]
        streak_l = _luma(streak)
        light_m = _luma(light) >= MASK_THRESHOLDS["light"]
        streak_m = (streak_l >= MASK_THRESHOLDS["streak"] ** g1) & (streak_l >= _luma(halo))
        glare_m = _luma(flare) >= MASK_THRESHOLDS["glare"] ** g1
        return Rendered(input=encode(gt_lin + flare), gt=encode(gt_lin), flare=encode(flare),
                        streak=self._crop(streak_m, p), glare=self._crop(glare_m, p),
                        light=self._crop(light_m, p))

    def _erase(self, scene: torch.Tensor, idx: list[int], epoch: int, p: dict) -> torch.Tensor:
        """`scene` (B, 3, F, F) with each sample's box of its S x S crop (at `frame_at`) zeroed."""
        scene = scene.clone()
        boxes = sample_boxes(self.sample_seeds(idx, epoch), self.size, self.size, self.random_erasing)
        at = p["frame_at"].long().tolist() if self.frame != self.size else [(0, 0)] * len(idx)
        for j, box in enumerate(boxes):
            if box is not None:
                (top, left, h, w), (dy, dx) = box, at[j]
                scene[j, :, dy + top:dy + top + h, dx + left:dx + left + w] = VALUE
        return scene

    def _crop(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        """The S x S crop of each sample of (B, ..., F, F) at its `frame_at` offset."""
        if self.frame == self.size:
            return x
        s = self.size
        return torch.stack([x[j, ..., top:top + s, left:left + s]
                            for j, (top, left) in enumerate(p["frame_at"].long().tolist())])

    # -- sampling ---------------------------------------------------------------------------------
    def _params(self, sample: int) -> dict[str, object]:
        """All randomness of one sample as Python floats (plus its window texture), drawn in one
        call from a CPU generator: identical on every device and batch composition."""
        g = torch.Generator().manual_seed(sample)
        n_stars = self._n_stars()
        draws = torch.rand(_N_SCALARS + 64 * 64 + 2 * n_stars, generator=g)
        scalars = iter(draws[:_N_SCALARS].tolist())

        def u(lo: float, hi: float) -> float:
            return lo + (hi - lo) * next(scalars)

        def us(lo: float, hi: float, n: int) -> list[float]:
            return [u(lo, hi) for _ in range(n)]

        def log_u(lo: float, hi: float) -> float:
            return math.exp(u(math.log(lo), math.log(hi)))

        def choice(n: int) -> float:
            return float(min(int(u(0, n)), n - 1))

        def chi2_1() -> float:  # chi-squared, 1 degree of freedom: a squared standard normal
            r, angle = math.sqrt(-2 * math.log(max(u(0, 1), 1e-12))), u(0, 2 * math.pi)
            return (r * math.cos(angle)) ** 2  # Box-Muller

        n_lights = 1 + int(u(0, 1) < 0.5) + int(u(0, 1) < 0.3)
        q = {
            "natural": float(u(0, 1) < self.natural_fraction),
            # natural scene: which photo, crop (scale, centre), flips, grading
            "photo": choice(len(SCENES[scene_split(self.split)])),
            "crop": [u(0.35, 1.0), u(-1, 1), u(-1, 1)],
            "flip": [-1.0 if u(0, 1) < 0.5 else 1.0 for _ in range(2)],
            "desat": u(0.2, 0.7),
            "tint": [u(0.7, 1.0), u(0.75, 0.95), u(0.6, 1.0)],
            "crush": u(1.0, 1.5),
            # procedural street
            "horizon": u(0.45, 0.75),
            "sky_top": [u(0.0, 0.003), u(0.0, 0.004), u(0.004, 0.015)],
            "sky_glow": [u(0.02, 0.07), u(0.01, 0.04), u(0.01, 0.05)],
            "glow_width": u(0.08, 0.3),
            # 12 buildings: x0, width, top relative to the horizon, wall shade
            "buildings": [[u(0, 1), u(0.04, 0.22), u(-0.35, 0.05), u(0.002, 0.012)]
                          for _ in range(12)],
            "window": [u(0.012, 0.03), u(0.015, 0.035), u(0.15, 0.5), u(0.05, 0.35)],
            "ground": u(0.004, 0.02),
            # light sources: position (-1..1), radius (fraction of F), aspect, angle, radiance,
            # colour
            "l_on": [float(i < n_lights) for i in range(MAX_LIGHTS)],
            "l_pos": [us(-0.75, 0.75, 2) for _ in range(MAX_LIGHTS)],
            "l_rad": us(0.003, 0.010, MAX_LIGHTS),
            "l_aspect": us(1.0, 1.5, MAX_LIGHTS),
            "l_angle": us(0, math.pi, MAX_LIGHTS),
            "l_level": [log_u(15, 300) * f for f in (1.0, 0.5, 0.3)],
            "l_colour": [choice(len(LAMP_COLOURS)) for _ in range(MAX_LIGHTS)],
            # scattering flare and glare
            "psf": choice(self.n_psf),
            "psf_angle": u(0, 2 * math.pi),
            "psf_scale": u(0.8, 1.3),
            "streak_gain": log_u(1.5, 8.0),
            "halo_r0": u(0.01, 0.04),
            "halo_p": u(1.1, 1.6),
            "halo_gain": u(0.3, 1.2),
            # ghosts: on/off, position along the light-centre line, radius, sides, level, tint
            "g_on": [float(u(0, 1) < 0.6) for _ in range(MAX_GHOSTS)],
            "g_t": us(-1.3, 0.6, MAX_GHOSTS),
            "g_rad": us(0.02, 0.1, MAX_GHOSTS),
            "g_sides": 5 + choice(4),
            "g_angle": u(0, math.pi),
            "g_level": [log_u(0.004, 0.03) for _ in range(MAX_GHOSTS)],
            "g_tint": [[u(0.4, 1.0), u(0.6, 1.0), u(0.4, 1.0)] for _ in range(MAX_GHOSTS)],
            # camera (Flare7K's): gain, noise sigma, gamma; then the night exposure; which
            # window of the noise bank (offset, transpose, channel roll, sign)
            "gain": u(0.5, 1.2),
            "sigma": 0.01 * chi2_1(),
            "gamma": u(1.8, 2.2),
            "exposure": log_u(*EXPOSURE),
            "noise_at": [choice(self.frame + 1), choice(self.frame + 1), choice(2), choice(3),
                         choice(2)],
            # where the S x S crop sits in the F x F frame (top, left)
            "frame_at": [choice(self.frame - self.size + 1), choice(self.frame - self.size + 1)],
        }
        q["window_tex"] = draws[_N_SCALARS:_N_SCALARS + 64 * 64].view(64, 64)
        # Stars: pixel positions (x, y) in [0, 1), about 0.15% of the pixels.
        q["stars"] = draws[_N_SCALARS + 64 * 64:].view(n_stars, 2)
        return q

    def _n_stars(self) -> int:
        return max(1, round(0.0015 * self.frame * self.frame))

    def _banks(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(PSF bank, scene bank, noise bank) on `device`, built once per object and device."""
        key = str(device)
        if key not in self._device_cache:
            f = self.frame
            side = 128 if f <= 128 else 256 if f <= 256 else 512
            self._device_cache[key] = (
                _psf_bank(min(PSF_SIDE, 2 * f), self.split, self.seed, self.n_psf).to(device),
                _scene_bank(side, scene_split(self.split)).to(device),
                _noise_bank(f, self.split, self.seed).to(device))
        return self._device_cache[key]

    # -- components: rendered at the frame side F (written S in their shapes and comments) -------
    def _axis(self, device: torch.device) -> torch.Tensor:
        """Pixel-centre coordinates (F,) in (0, 1) across the frame."""
        return (torch.arange(self.frame, device=device, dtype=torch.float32) + 0.5) / self.frame

    def _scene(self, p: dict, scenes: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Night scene with Flare7K's gain and noise, (B, 3, F, F) linear radiance >= 0."""
        b, s = p["gamma"].shape[0], self.frame
        device = scenes.device
        scene = torch.empty(b, 3, s, s, device=device)  # at the scene's normal exposure
        nat = p["natural"] > 0.5

        def select(mask: torch.Tensor) -> dict[str, torch.Tensor]:
            return {k: v[mask] for k, v in p.items() if torch.is_tensor(v)}

        if nat.any():  # render each kind only for the samples that use it
            scene[nat] = self._photo(select(nat), scenes)
        if (~nat).any():
            stars = [p["stars"][i] for i in (~nat).nonzero()[:, 0].tolist()]
            scene[~nat] = self._street(select(~nat), device, stars) / STREET_EXPOSURE
        ax = self._axis(device) - 0.5
        scene = scene * (1 - 0.35 * (ax.view(1, 1, -1) ** 2 + ax.view(1, -1, 1) ** 2))  # vignetting
        # Flare7K's camera on the normally exposed scene: gain, then Gaussian noise shared by gt
        # and input (so input >= gt), a window of the split's (3, 2F, 2F) Gaussian bank,
        # transposed / channel-rolled / negated per sample (cheaper than 3 F^2 normals each).
        windows = []
        for ox, oy, tr, roll, neg in p["noise_at"].long().tolist():
            w = noise[:, oy:oy + s, ox:ox + s]
            w = w.transpose(1, 2) if tr else w
            windows.append(w.roll(roll, 0).neg() if neg else w.roll(roll, 0))
        scene = scene.mul_(p["gain"].view(-1, 1, 1, 1))
        scene = scene.addcmul_(p["sigma"].view(-1, 1, 1, 1), torch.stack(windows)).clamp_(min=0)
        return scene.mul_(p["exposure"].view(-1, 1, 1, 1))  # down to night

    def _photo(self, p: dict, scenes: torch.Tensor) -> torch.Tensor:
        """A bundled photo cropped, flipped and graded (desaturated, shadows crushed, tinted),
        (B, 3, F, F) linear at its normal exposure."""
        b, s = p["gamma"].shape[0], self.frame
        scale, cx, cy = p["crop"].unbind(1)
        theta = torch.zeros(b, 2, 3, device=scenes.device)
        theta[:, 0, 0] = scale * p["flip"][:, 0]
        theta[:, 1, 1] = scale * p["flip"][:, 1]
        theta[:, 0, 2] = cx * (1 - scale)
        theta[:, 1, 2] = cy * (1 - scale)
        photo = F.grid_sample(scenes[p["photo"].long()], _affine_grid(theta, s), mode="bilinear",
                              padding_mode="reflection", align_corners=False)
        luma = _luma(photo)[:, None]
        d = p["desat"].view(-1, 1, 1, 1)
        photo = (photo * (1 - d) + luma * d).clamp_(min=1e-12).log_()
        return photo.mul_(p["crush"].view(-1, 1, 1, 1)).exp_().mul_(p["tint"].view(-1, 3, 1, 1))

    def _street(self, p: dict, device: torch.device, stars: list[torch.Tensor]) -> torch.Tensor:
        """Procedural night street, (B, 3, S, S) linear radiance; stars: per sample (n, 2)
        positions (x, y) in [0, 1).

        Sky, ground, building columns and window rows are separable in x and y, so they are
        computed on (B, ., S, 1) / (B, ., 1, S) vectors and only combined at full resolution."""
        b, s = p["gamma"].shape[0], self.frame
        ax = self._axis(device)
        xs, ys = ax.view(1, 1, s), ax.view(1, s, 1)  # x along a row, y down a column
        h = p["horizon"].view(-1, 1, 1)
        # Sky: dark zenith, warm light-polluted glow near the horizon; ground below. (B, 3, S, 1)
        glow = torch.exp(-(h - ys).clamp(min=0) / p["glow_width"].view(-1, 1, 1))[:, None]
        sky = p["sky_top"].view(-1, 3, 1, 1) + p["sky_glow"].view(-1, 3, 1, 1) * glow
        ground = (p["ground"].view(-1, 1, 1) * (0.6 + 0.4 * ys))[:, None].expand(-1, 3, -1, -1)
        img = torch.where((ys < h)[:, None], sky, ground)
        img = img.expand(-1, -1, -1, s).contiguous()  # (B, 3, S, S)
        # Stars: single pixels well above the horizon.
        for i, xy in enumerate(stars):
            px = (xy * s).long().clamp_(max=s - 1)
            px = px[xy[:, 1] < float(p["horizon"][i]) - 0.1]
            img[i, :, px[:, 1], px[:, 0]] += 0.05
        # Buildings, later ones in front: the front one at (x, y) is the highest k whose column
        # span holds x and whose wall (top .. horizon + 0.02) holds y.
        bl = p["buildings"]  # (B, K, 4): x0, width, top relative to the horizon, wall shade
        x0, w = bl[..., 0, None], bl[..., 1, None]  # (B, K, 1)
        col_in = (xs >= x0) & (xs < x0 + w)  # (B, K, S) over x
        top = (p["horizon"][:, None] + bl[..., 2])[..., None]
        row_in = (ax.view(1, 1, s) >= top) & (ax.view(1, 1, s) < h + 0.02)  # (B, K, S) over y
        k_idx = torch.arange(1, bl.shape[1] + 1, device=device, dtype=torch.uint8).view(1, -1, 1, 1)
        front = ((row_in[..., :, None] & col_in[..., None, :]) * k_idx).amax(1).long()  # (B, S, S)
        any_b = front > 0
        k = (front - 1).clamp(min=0)
        shade = torch.gather(bl[..., 3], 1, k.view(b, -1)).view(b, 1, s, s)
        # Windows: a pane in each cell, lit from a per-sample random texture.
        ww, wh, p_lit, w_level = (t.view(-1, 1, 1) for t in p["window"].unbind(1))
        cell_x, cell_y = torch.remainder(xs / ww, 1.0), torch.remainder(ys / wh, 1.0)
        pane = (cell_x > 0.3) & (cell_x < 0.75) & (cell_y > 0.3) & (cell_y < 0.75)  # (B, S, S)
        row = (ys // wh).long() % 64
        col = ((xs // ww).long() + 17 * k) % 64  # each building its own lit pattern
        lit = torch.gather(p["window_tex"].view(b, -1), 1, (row * 64 + col).view(b, -1))
        lit = lit.view(b, s, s)
        lit = pane & (lit < p_lit)
        wall = shade * torch.tensor([1.0, 0.9, 0.8], device=device).view(1, 3, 1, 1)
        window = (lit.float() * w_level)[:, None] * torch.tensor(
            [1.0, 0.75, 0.45], device=device).view(1, 3, 1, 1)
        return torch.where(any_b[:, None], wall + window, img)

    def _lights_and_scatter(self, p: dict, psfs: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """HDR light sources, their scattering flare and their veiling glare, each (B, 3, S, S).

        The lights are 1-4 px discs, so each one's flare is the flare kernel placed at its centre
        and scaled by its energy (the convolution of a point): the PSF resampled straight onto the
        image grid, and the halo evaluated in closed form. Work is per light that is on."""
        b, s = p["gamma"].shape[0], self.frame
        device = p["gamma"].device
        bi, li = (p["l_on"] > 0.5).nonzero(as_tuple=True)  # (N,): sample-major, lights in order
        pos = p["l_pos"][bi, li]  # (N, 2) in [-1, 1]
        rad = 2 * p["l_rad"][bi, li]  # minor radius in [-1, 1] units
        aspect, ang = p["l_aspect"][bi, li], p["l_angle"][bi, li]
        level = p["l_level"][bi, li]
        colour = LAMP_COLOURS.to(device)[p["l_colour"][bi, li].long()]  # (N, 3)
        # Energy of a disc with a sigmoid edge of 1/2 px, in pixels x radiance (closed form, so it
        # does not hang on the rounding of a batch-sized reduction).
        energy = level * aspect * _sigmoid_disc_area(rad * s / 2)

        # Light discs in (N, P, P) patches around their centres (the edge is ~0 beyond 12 px).
        half = math.ceil(0.015 * s) + 12
        (xp, yp), origin = _patch_coords(pos, half, s)
        dx, dy = xp - pos[:, 0, None, None], yp - pos[:, 1, None, None]
        c, sn = torch.cos(ang)[:, None, None], torch.sin(ang)[:, None, None]
        along, across = dx * c + dy * sn, dy * c - dx * sn
        r = rad[:, None, None]
        d = torch.sqrt((along / (r * aspect[:, None, None])) ** 2 + (across / r) ** 2)
        disc = torch.sigmoid((1 - d) * (s * r)) * level[:, None, None]  # edge ~1/2 px
        light = _paste(disc[:, None] * colour[..., None, None], origin, bi, b, s)

        # Scattering: kernel coordinates of every pixel, per light. A pixel d px from the light
        # maps to d / (S * scale) in the bank's [-1, 1] (the kernel spans 2S px at scale 1), plus
        # the bank's half-pixel offset of its centre. x and y terms are separable: (N, 1, S, 2) +
        # (N, S, 1, 2) gives the (N, S, S, 2) grid in one pass.
        side = psfs.shape[-1]
        sb, a = p["psf_scale"][bi], p["psf_angle"][bi]
        ax = self._axis(device) * 2 - 1
        qx = (ax.view(1, 1, s) - pos[:, 0, None, None]) / 2  # (N, 1, S), units of S px
        qy = (ax.view(1, s, 1) - pos[:, 1, None, None]) / 2  # (N, S, 1)
        ca, sa = (torch.cos(a) / sb)[:, None, None], (torch.sin(a) / sb)[:, None, None]
        gx = torch.stack([ca * qx + 1 / side, sa * qx + 1 / side], -1)  # (N, 1, S, 2)
        gy = torch.stack([-sa * qy, ca * qy], -1)  # (N, S, 1, 2)
        # The bank's green channel sums to 1; resampling multiplies sums by the pixel-area ratio.
        w_streak = (energy * p["streak_gain"][bi] / (2 * s * sb / side) ** 2)[:, None] * colour
        # Veiling glare: (1 + (r/r0)^2)^-p with r in units of S px, normalised in closed form over
        # the disc of the 2S x 2S window's area (radius 2/sqrt(pi)).
        r0, hp = 2 * p["halo_r0"][bi], p["halo_p"][bi]
        norm = (s * r0) ** 2 * math.pi / (hp - 1) * (1 - (1 + 4 / math.pi / r0**2) ** (1 - hp))
        w_halo = (energy * p["halo_gain"][bi] / norm)[:, None] * colour  # (N, 3)
        tx = 1 + qx * qx / (r0 * r0)[:, None, None]  # (N, 1, S); + ty gives 1 + (r/r0)^2
        ty = qy * qy / (r0 * r0)[:, None, None]  # (N, S, 1)

        # One light at a time, added into its sample in order: nothing depends on the batch.
        streak = light.new_zeros(b, 3, s, s)
        halo = light.new_zeros(b, 3, s, s)
        psf_idx = p["psf"][bi].long().tolist()
        for n, sample in enumerate(bi.tolist()):
            kernel = F.grid_sample(psfs[psf_idx[n], None], (gx[n] + gy[n])[None], mode="bilinear",
                                   padding_mode="zeros", align_corners=False)[0]  # (3, S, S)
            streak[sample].addcmul_(kernel, w_streak[n, :, None, None])
            halo_k = (tx[n] + ty[n]).log_().mul_(-hp[n]).exp_()  # (S, S); log1p is slower
            halo[sample].addcmul_(halo_k[None], w_halo[n, :, None, None])
        return light, streak, halo

    def _ghosts(self, p: dict) -> torch.Tensor:
        """Aperture-shaped ghosts on the line light -> optical centre -> beyond, (B, 3, S, S).

        A regular n-gon's edge distance is the largest projection on its edge normals; each
        ghost is drawn in a patch around its centre."""
        b, s = p["gamma"].shape[0], self.frame
        device = p["gamma"].device
        bi, gi = (p["g_on"] > 0.5).nonzero(as_tuple=True)
        if bi.numel() == 0:
            return torch.zeros(b, 3, s, s, device=device)
        centre = p["l_pos"][bi, 0] * p["g_t"][bi, gi, None]  # (N, 2) on the brightest light's line
        n = p["g_sides"][bi]
        apothem = torch.cos(math.pi / n) * 2 * p["g_rad"][bi, gi]  # [-1, 1] units
        half = math.ceil(0.125 * s) + 12  # circumradius <= 0.1 S / cos(pi/5) px, edge ~0 beyond
        (xp, yp), origin = _patch_coords(centre, half, s)
        dx, dy = xp - centre[:, 0, None, None], yp - centre[:, 1, None, None]
        # Edge normals at angle + (k + 1/2) * 2pi/n; polygons with fewer than 8 sides repeat k=0.
        k = torch.arange(8, device=device, dtype=torch.float32)
        k = torch.where(k[None] < n[:, None], k[None], torch.zeros_like(k[None]))
        phi = p["g_angle"][bi, None] + (k + 0.5) * (2 * math.pi / n[:, None])  # (N, 8)
        cphi, sphi = torch.cos(phi)[..., None, None], torch.sin(phi)[..., None, None]
        dist = dx * cphi[:, 0] + dy * sphi[:, 0]
        for j in range(1, 8):
            dist = torch.maximum(dist, dx * cphi[:, j] + dy * sphi[:, j])
        ap = apothem[:, None, None]
        shape = torch.sigmoid((ap - dist) * (s / 3))  # ~1.5 px soft edge
        rim = 1 + 0.6 * (dist / ap).clamp(max=1) ** 4  # brighter rim, as real ghosts show
        level = p["g_level"][bi, gi] * p["l_level"][bi, 0] / 100
        amp = shape * rim * level[:, None, None]  # (N, P, P)
        return _paste(amp[:, None] * p["g_tint"][bi, gi][..., None, None], origin, bi, b, s)


def _sigmoid_disc_area(radius_px: torch.Tensor) -> torch.Tensor:
    """Integral over the plane of sigmoid(2 (R - rho)), rho the distance in px: the pixel area
    of a disc of radius R px with a 1/2 px soft edge. Exact: -pi/2 Li2(-e^{2R}), written with
    Li2's inversion formula and its fast alternating series in e^{-2R}."""
    x = 2 * radius_px
    q = torch.exp(-x)
    series = torch.zeros_like(x)
    term = torch.ones_like(x)
    for k in range(1, 41):
        term = term * q
        series = series + (-1) ** k * term / (k * k)
    return math.pi / 2 * (x * x / 2 + math.pi**2 / 6 + series)


def _patch_coords(centre: torch.Tensor, half: int, s: int
                  ) -> tuple[tuple[torch.Tensor, torch.Tensor], list[tuple[int, int]]]:
    """Coordinates in [-1, 1] of a (2*half)^2 pixel patch around each centre: x (N, 1, P),
    y (N, P, 1), and each patch's top-left pixel (x, y) in the image (may lie outside)."""
    pix = torch.floor((centre + 1) * (s / 2)).long() - half  # (N, 2) top-left pixel
    ar = torch.arange(2 * half, device=centre.device)
    coord = ((pix[..., None] + ar) + 0.5) * (2 / s) - 1  # (N, 2, P)
    return (coord[:, 0, None, :], coord[:, 1, :, None]), [tuple(o) for o in pix.tolist()]


def _paste(patches: torch.Tensor, origin: list[tuple[int, int]], bi: torch.Tensor, b: int,
           s: int) -> torch.Tensor:
    """Sum (N, C, P, P) patches into (B, C, S, S) at their top-left pixels, clipped to the image.
    One sample's patches are added in order, so its result does not depend on the batch."""
    out = patches.new_zeros(b, patches.shape[1], s, s)
    size = patches.shape[-1]
    for n, (sample, (x0, y0)) in enumerate(zip(bi.tolist(), origin)):
        xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + size, s), min(y0 + size, s)
        if xa < xb and ya < yb:
            out[sample, :, ya:yb, xa:xb] += patches[n, :, ya - y0:yb - y0, xa - x0:xb - x0]
    return out


def _stack(params: list[dict[str, object]], device: torch.device) -> dict[str, torch.Tensor]:
    """Per-sample parameter dicts -> batched float32 tensors on `device`; stars stay a list."""
    out: dict[str, object] = {}
    for k in params[0]:
        values = [q[k] for q in params]
        if k == "stars":
            out[k] = [v.to(device) for v in values]
        elif torch.is_tensor(values[0]):
            out[k] = torch.stack(values).to(device)
        else:
            out[k] = torch.tensor(values, dtype=torch.float32, device=device)
    return out


# ----------------------------------------------------------------------------------------------
# Dataset on disk
# ----------------------------------------------------------------------------------------------
def generate_dataset(out_dir: str | os.PathLike, n: int, size: int, seed: int,
                     chunk: int = 8, split: str = "test") -> Path:
    """Write `n` procedural test pairs (whole frames of `split`) as PNGs in the Flare7K++ test
    layout.

    Layout: `out_dir/{input,gt,mask}/NNNNNN.png` (same stem in all three folders; gt keeps the
    light source; mask in Flare7K colours) plus `out_dir/synthetic.json` with the arguments.
    Same arguments -> byte-identical files. Returns `Path(out_dir)`.
    """
    if n < 1:
        raise UserError(f"generate_dataset: n={n} must be >= 1")
    out = Path(out_dir)
    pairs = ProceduralPairs(size, seed, split=split)
    for start in range(0, n, chunk):
        idx = list(range(start, min(n, start + chunk)))
        r = pairs.render(idx, "cpu")
        masks = _masks_uint8(r)
        for j, i in enumerate(idx):
            stem = f"{i:06d}.png"
            write_png(out / "input" / stem, to_uint8(r.input[j]))
            write_png(out / "gt" / stem, to_uint8(r.gt[j]))
            write_png(out / "mask" / stem, masks[j])
    atomic_write_json(out / "synthetic.json", {"n": n, "size": size, "seed": seed, "split": split,
                                               "generator": GENERATOR})
    return out


def _masks_uint8(r: Rendered) -> list[np.ndarray]:
    return [paint_mask(r.streak[j].cpu().numpy(), r.glare[j].cpu().numpy(),
                       r.light[j].cpu().numpy()) for j in range(r.input.shape[0])]


def contact_sheet(path: str | os.PathLike, size: int, seed: int, n: int = 4,
                  split: str = "test") -> None:
    """Write a PNG grid: rows input / gt / mask, one column per sample, 4 px gaps."""
    r = ProceduralPairs(size, seed, split=split).render(list(range(n)), "cpu")
    masks = _masks_uint8(r)
    gap = 4
    sheet = np.full((3 * size + 2 * gap, n * size + (n - 1) * gap, 3), 255, np.uint8)
    for j in range(n):
        x0 = j * (size + gap)
        for row, img in enumerate((to_uint8(r.input[j]), to_uint8(r.gt[j]), masks[j])):
            y0 = row * (size + gap)
            sheet[y0:y0 + size, x0:x0 + size] = img
    write_png(path, sheet)


@cli_errors
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cascade.data.synthetic",
                                     description="Write a procedural night-flare test set.")
    parser.add_argument("--out", required=True, help="output folder (input/ gt/ mask/)")
    parser.add_argument("--n", type=int, default=24, help="number of pairs")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="test", choices=SPLITS,
                        help="which stream to render (module docstring, Splits)")
    parser.add_argument("--contact-sheet", default=None, help="also write this PNG grid")
    args = parser.parse_args(argv)
    out = generate_dataset(args.out, args.n, args.size, args.seed, split=args.split)
    if args.contact_sheet:
        contact_sheet(args.contact_sheet, args.size, args.seed, split=args.split)
    print(f"wrote {args.n} pairs to {out}")


if __name__ == "__main__":
    main()
