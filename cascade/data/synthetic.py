"""Procedural night-time lens-flare benchmark: nothing downloaded, every pixel a function of a seed.

Physics, in linear radiance (1.0 = sensor saturation):
- Scene: a bundled scikit-image photograph darkened and tinted to a night look, or a procedural
  night street (sky gradient with city glow, building silhouettes with lit windows, stars).
- Light sources: 1-3 small HDR discs/ellipses, 10-400x saturation, lamp colours.
- Scattering flare: the point-spread function of an aperture with dust and scratches,
  PSF = |FFT(A * exp(i*phi))|^2 summed over five wavelengths (polygon edges and scratches give
  streaks and starbursts, dust gives soft rings, wavelength scaling gives colour fringes). The
  diffraction-limited core is removed (it is the light source itself, kept in gt). A bank of
  PSFs is computed once per seed; each light's flare is a bank PSF rotated, scaled and resampled
  straight onto the image at the light (the lights are 1-4 px discs, so the convolution is that
  of a point of the disc's energy).
- Veiling glare: a broad radial halo (1 + (r/r0)^2)^-p around every light, normalised in closed
  form.
- Ghosts: faint aperture-shaped polygons on the line from the light through the optical centre.
- Camera: shared Poisson-Gaussian-like noise on the scene, clip, gamma ~ 2.2 encode, 8-bit levels.

gt = scene + light source (Flare7K++ convention: the light source stays), input = gt + flare,
flare target = flare alone; all three are gamma-encoded (B, 3, S, S) in [0, 1] on 8-bit levels.
Masks (Flare7K colours) are thresholds on the components rendered, see `MASK_THRESHOLDS`.

Randomness: every sample draws all its random numbers in one call to a CPU `torch.Generator`
seeded with sha256(seed, epoch, index), so they are identical on any device, batch composition
or worker count. Full-resolution sensor noise is a per-sample window (offset, transpose, channel
roll, sign) of a (3, 2S, 2S) Gaussian field; that field, the PSF bank and the scene bank depend
on the seed only. Per-light and per-ghost work is added into its sample in a fixed order, so a
sample's pixels do not depend on the rest of its batch (tested).

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

from cascade.data.erasing import random_erase
from cascade.data.images import to_uint8, write_png
from cascade.errors import UserError, cli_errors
from cascade.io import atomic_write_json
from cascade.masks import paint_mask
from cascade.seeds import derive_seed

# Bundled with the scikit-image wheel (no pooch download); verified offline. Colour first.
SKIMAGE_SCENES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
                  "camera", "brick", "grass", "gravel")
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
# cascade.data.testset key their caches on it). /2: PSF sprites, closed-form halo, one RNG draw per sample, noise bank.
GENERATOR = "cascade.data.synthetic/2"
MAX_GHOSTS = 4
_N_SCALARS = 256  # uniform draws reserved per sample for scalar parameters (~150 used)
_LUMA = (0.2126, 0.7152, 0.0722)


def sample_seed(seed: int, index: int, epoch: int = 0) -> int:
    """A 63-bit seed for one sample: sha256 of (seed, epoch, index); independent of batching."""
    return derive_seed("flaresweep", seed, epoch, index)


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
def _psf_bank(side: int, seed: int, count: int) -> torch.Tensor:
    """(count, 3, side, side) scattering PSFs for one seed, computed once on CPU."""
    g = torch.Generator().manual_seed(sample_seed(seed, -1))
    return torch.stack([_psf(side, g) for _ in range(count)])


@functools.lru_cache(maxsize=4)
def _noise_bank(size: int, seed: int) -> torch.Tensor:
    """(3, 2S, 2S) standard normal sensor-noise field for one seed, on CPU."""
    g = torch.Generator().manual_seed(sample_seed(seed, -2))
    return torch.randn(3, 2 * size, 2 * size, generator=g)


def _affine_grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    return F.affine_grid(theta, [theta.shape[0], 1, size, size], align_corners=False)


# ----------------------------------------------------------------------------------------------
# Backgrounds
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _skimage_photos() -> tuple[torch.Tensor, ...]:
    """The bundled skimage photographs, centre square crops, (3, n, n) uint8; decoded once."""
    import skimage.data

    out = []
    for name in SKIMAGE_SCENES:
        img = getattr(skimage.data, name)()
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        t = torch.from_numpy(np.ascontiguousarray(img[..., :3])).permute(2, 0, 1)
        sq = min(t.shape[1:])  # centre square crop
        top, left = (t.shape[1] - sq) // 2, (t.shape[2] - sq) // 2
        out.append(t[:, top:top + sq, left:left + sq].contiguous())
    return tuple(out)


@functools.lru_cache(maxsize=2)
def _scene_bank(side: int) -> torch.Tensor:
    """(N, 3, side, side) bundled skimage photographs, linearised (sRGB^2.2), float32 on CPU."""
    out = []
    for t in _skimage_photos():
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


class ProceduralPairs:
    """Procedural night-flare training/test pairs, each a pure function of (seed, epoch, index).

    Args:
        size: image side S in pixels (>= 16).
        seed: dataset seed; also seeds the PSF bank.
        n_psf: scattering PSFs in the bank (each sample rotates/scales one of them).
        natural_fraction: probability that a sample's scene is a darkened skimage photograph
            rather than a procedural street.
        ghosts: render aperture ghosts (reflective flare).
        random_erasing: probability of erasing one box of the *input* in `batch` (training pairs
            only; `render`, hence the test sets, never erases). `cascade.data.erasing`:
            torchvision RandomErasing semantics, value 0, gt and flare unchanged. 0 leaves the
            pairs byte-identical to a run without it.
    """

    def __init__(self, size: int, seed: int, *, n_psf: int = 6, natural_fraction: float = 0.5,
                 ghosts: bool = True, random_erasing: float = 0.0) -> None:
        if size < 16:
            raise UserError(f"ProceduralPairs: size={size} is too small; expected >= 16")
        if not 0.0 <= natural_fraction <= 1.0:
            raise UserError(f"ProceduralPairs: natural_fraction={natural_fraction} not in [0, 1]")
        if not 0.0 <= random_erasing <= 1.0:
            raise UserError(f"ProceduralPairs: random_erasing={random_erasing} not in [0, 1]")
        self.size, self.seed, self.n_psf = int(size), int(seed), int(n_psf)
        self.natural_fraction, self.ghosts = float(natural_fraction), bool(ghosts)
        self.random_erasing = float(random_erasing)
        self._device_cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    # -- public contract --------------------------------------------------------------------------
    def batch(self, indices: Sequence[int] | torch.Tensor, device: torch.device | str = "cpu",
              epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input, gt, flare), each (B, 3, S, S) float32 in [0, 1] on `device`; the input
        randomly erased when `random_erasing` > 0 (box from each sample's seed)."""
        r = self.render(indices, device, epoch)
        if self.random_erasing == 0:
            return r.input, r.gt, r.flare
        idx = [int(i) for i in (indices.tolist() if torch.is_tensor(indices) else indices)]
        seeds = [sample_seed(self.seed, i, epoch) for i in idx]
        return random_erase(r.input, seeds, self.random_erasing), r.gt, r.flare

    def render(self, indices: Sequence[int] | torch.Tensor, device: torch.device | str = "cpu",
               epoch: int = 0) -> Rendered:
        """Images plus region masks for a batch of sample indices (see `Rendered`)."""
        device = torch.device(device)
        idx = [int(i) for i in (indices.tolist() if torch.is_tensor(indices) else indices)]
        if not idx:
            raise ValueError("render: empty batch of indices")
        seeds = [sample_seed(self.seed, i, epoch) for i in idx]
        p = _stack([self._params(s) for s in seeds], device)
        psfs, scenes, noise = self._banks(device)

        scene = self._scene(p, scenes, noise)  # (B, 3, S, S) linear
        light, streak, halo = self._lights_and_scatter(p, psfs)  # each (B, 3, S, S) linear
        flare = streak + halo
        if self.ghosts:
            flare = flare + self._ghosts(p)

        gamma = p["gamma"].view(-1, 1, 1, 1)

        def encode(x: torch.Tensor) -> torch.Tensor:  # 8-bit levels, as written to PNG
            # 255 * x^(1/gamma) as exp(log(x) / gamma + log(255)): 2x faster than pow on CPU.
            y = x.clamp(0, 1).log_().mul_(1 / gamma).add_(math.log(255)).exp_()
            return y.add_(0.5).floor_().div_(255)

        gt_lin = scene + light
        # Thresholds on encoded luminance, compared in linear space: y^(1/g) >= t <=> y >= t^g.
        g1 = gamma[:, 0]
        streak_l = _luma(streak)
        light_m = _luma(light) >= MASK_THRESHOLDS["light"]
        streak_m = (streak_l >= MASK_THRESHOLDS["streak"] ** g1) & (streak_l >= _luma(halo))
        glare_m = _luma(flare) >= MASK_THRESHOLDS["glare"] ** g1
        return Rendered(input=encode(gt_lin + flare), gt=encode(gt_lin), flare=encode(flare),
                        streak=streak_m, glare=glare_m, light=light_m)

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

        n_lights = 1 + int(u(0, 1) < 0.5) + int(u(0, 1) < 0.3)
        q = {
            "natural": float(u(0, 1) < self.natural_fraction),
            # natural scene: which photo, crop (scale, centre), flips, night grading
            "photo": choice(len(SKIMAGE_SCENES)),
            "crop": [u(0.35, 1.0), u(-1, 1), u(-1, 1)],
            "flip": [-1.0 if u(0, 1) < 0.5 else 1.0 for _ in range(2)],
            "exposure": log_u(0.03, 0.18),
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
            # light sources: position (-1..1), radius (fraction of S), aspect, angle, radiance,
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
            # camera: gamma, noise levels; which window of the noise bank (offset, transpose,
            # channel roll, sign)
            "gamma": u(2.0, 2.4),
            "shot": u(0.0005, 0.004),
            "read": u(0.001, 0.006),
            "noise_at": [choice(self.size + 1), choice(self.size + 1), choice(2), choice(3),
                         choice(2)],
        }
        q["window_tex"] = draws[_N_SCALARS:_N_SCALARS + 64 * 64].view(64, 64)
        # Stars: pixel positions (x, y) in [0, 1), about 0.15% of the pixels.
        q["stars"] = draws[_N_SCALARS + 64 * 64:].view(n_stars, 2)
        return q

    def _n_stars(self) -> int:
        return max(1, round(0.0015 * self.size * self.size))

    def _banks(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(PSF bank, scene bank, noise bank) on `device`, built once per object and device."""
        key = str(device)
        if key not in self._device_cache:
            side = 128 if self.size <= 128 else 256 if self.size <= 256 else 512
            self._device_cache[key] = (_psf_bank(min(PSF_SIDE, 2 * self.size), self.seed,
                                                 self.n_psf).to(device),
                                       _scene_bank(side).to(device),
                                       _noise_bank(self.size, self.seed).to(device))
        return self._device_cache[key]

    # -- components -------------------------------------------------------------------------------
    def _axis(self, device: torch.device) -> torch.Tensor:
        """Pixel-centre coordinates (S,) in (0, 1)."""
        return (torch.arange(self.size, device=device, dtype=torch.float32) + 0.5) / self.size

    def _scene(self, p: dict, scenes: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Night scene plus sensor noise, (B, 3, S, S) linear radiance >= 0."""
        b, s = p["gamma"].shape[0], self.size
        device = scenes.device
        scene = torch.empty(b, 3, s, s, device=device)
        nat = p["natural"] > 0.5

        def select(mask: torch.Tensor) -> dict[str, torch.Tensor]:
            return {k: v[mask] for k, v in p.items() if torch.is_tensor(v)}

        if nat.any():  # render each kind only for the samples that use it
            scene[nat] = self._photo(select(nat), scenes)
        if (~nat).any():
            stars = [p["stars"][i] for i in (~nat).nonzero()[:, 0].tolist()]
            scene[~nat] = self._street(select(~nat), device, stars)
        ax = self._axis(device) - 0.5
        scene = scene * (1 - 0.35 * (ax.view(1, 1, -1) ** 2 + ax.view(1, -1, 1) ** 2))  # vignetting
        # Sensor noise (signal-dependent + read noise), shared by gt and input so that input >= gt:
        # a window of the seed's (3, 2S, 2S) Gaussian bank, transposed / channel-rolled / negated
        # per sample (cheaper than drawing 3 S^2 normals per sample).
        windows = []
        for ox, oy, tr, roll, neg in p["noise_at"].long().tolist():
            w = noise[:, oy:oy + s, ox:ox + s]
            w = w.transpose(1, 2) if tr else w
            windows.append(w.roll(roll, 0).neg() if neg else w.roll(roll, 0))
        sigma = torch.sqrt(p["shot"].view(-1, 1, 1, 1) * scene + p["read"].view(-1, 1, 1, 1) ** 2)
        return scene.addcmul_(sigma, torch.stack(windows)).clamp_(min=0)

    def _photo(self, p: dict, scenes: torch.Tensor) -> torch.Tensor:
        """A bundled photo cropped, flipped and graded to night, (B, 3, S, S) linear."""
        b, s = p["gamma"].shape[0], self.size
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
        photo = (photo * (1 - d) + luma * d).log_().mul_(p["crush"].view(-1, 1, 1, 1)).exp_()
        return photo.mul_(p["tint"].view(-1, 3, 1, 1) * p["exposure"].view(-1, 1, 1, 1))

    def _street(self, p: dict, device: torch.device, stars: list[torch.Tensor]) -> torch.Tensor:
        """Procedural night street, (B, 3, S, S) linear radiance; stars: per sample (n, 2)
        positions (x, y) in [0, 1).

        Sky, ground, building columns and window rows are separable in x and y, so they are
        computed on (B, ., S, 1) / (B, ., 1, S) vectors and only combined at full resolution."""
        b, s = p["gamma"].shape[0], self.size
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
        b, s = p["gamma"].shape[0], self.size
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
        b, s = p["gamma"].shape[0], self.size
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
                     chunk: int = 8) -> Path:
    """Write `n` procedural test pairs as PNGs in the Flare7K++ test layout.

    Layout: `out_dir/{input,gt,mask}/NNNNNN.png` (same stem in all three folders; gt keeps the
    light source; mask in Flare7K colours) plus `out_dir/synthetic.json` with the arguments.
    Same arguments -> byte-identical files. Returns `Path(out_dir)`.
    """
    if n < 1:
        raise UserError(f"generate_dataset: n={n} must be >= 1")
    out = Path(out_dir)
    pairs = ProceduralPairs(size, seed)
    for start in range(0, n, chunk):
        idx = list(range(start, min(n, start + chunk)))
        r = pairs.render(idx, "cpu")
        masks = _masks_uint8(r)
        for j, i in enumerate(idx):
            stem = f"{i:06d}.png"
            write_png(out / "input" / stem, to_uint8(r.input[j]))
            write_png(out / "gt" / stem, to_uint8(r.gt[j]))
            write_png(out / "mask" / stem, masks[j])
    atomic_write_json(out / "synthetic.json", {"n": n, "size": size, "seed": seed,
                                               "generator": GENERATOR})
    return out


def _masks_uint8(r: Rendered) -> list[np.ndarray]:
    return [paint_mask(r.streak[j].cpu().numpy(), r.glare[j].cpu().numpy(),
                       r.light[j].cpu().numpy()) for j in range(r.input.shape[0])]


def contact_sheet(path: str | os.PathLike, size: int, seed: int, n: int = 4) -> None:
    """Write a PNG grid: rows input / gt / mask, one column per sample, 4 px gaps."""
    r = ProceduralPairs(size, seed).render(list(range(n)), "cpu")
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
    parser.add_argument("--contact-sheet", default=None, help="also write this PNG grid")
    args = parser.parse_args(argv)
    out = generate_dataset(args.out, args.n, args.size, args.seed)
    if args.contact_sheet:
        contact_sheet(args.contact_sheet, args.size, args.seed)
    print(f"wrote {args.n} pairs to {out}")


if __name__ == "__main__":
    main()
