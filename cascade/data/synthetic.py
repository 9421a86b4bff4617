"""Procedural night-time lens-flare benchmark: nothing downloaded, every pixel a function of a seed.

Physics, in linear radiance (1.0 = sensor saturation):
- Scene: a bundled scikit-image photograph darkened and tinted to a night look, or a procedural
  night street (sky gradient with city glow, building silhouettes with lit windows, stars).
- Light sources: 1-3 small HDR discs/ellipses, 10-400x saturation, lamp colours.
- Scattering flare: the point-spread function of an aperture with dust and scratches,
  PSF = |FFT(A * exp(i*phi))|^2 summed over five wavelengths (polygon edges and scratches give
  streaks and starbursts, dust gives soft rings, wavelength scaling gives colour fringes). The
  diffraction-limited core is removed (it is the light source itself, kept in gt).
- Veiling glare: a broad radial halo (1 + (r/r0)^2)^-p around every light.
- Ghosts: faint aperture-shaped polygons on the line from the light through the optical centre.
- Camera: shared Poisson-Gaussian-like noise on the scene, clip, gamma ~ 2.2 encode, 8-bit levels.

gt = scene + light source (Flare7K++ convention: the light source stays), input = gt + flare,
flare target = flare alone; all three are gamma-encoded (B, 3, S, S) in [0, 1] on 8-bit levels.
Masks (Flare7K colours) are thresholds on the components rendered, see `MASK_THRESHOLDS`.

Randomness: every sample draws its scalars from a CPU `torch.Generator` seeded with
sha256(seed, epoch, index), so they are identical on any device, batch composition or worker
count; full-resolution noise (sensor noise, stars) comes from a generator on `device` seeded the
same way, so it is reproducible per device type. The PSF bank depends on the seed only.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cascade.data.images import to_uint8, write_png
from cascade.errors import UserError, cli_errors
from cascade.io import atomic_write_json
from cascade.masks import paint_mask

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
MAX_GHOSTS = 4
_LUMA = (0.2126, 0.7152, 0.0722)


def sample_seed(seed: int, index: int, epoch: int = 0) -> int:
    """A 63-bit seed for one sample: sha256 of (seed, epoch, index); independent of batching."""
    digest = hashlib.sha256(f"flaresweep:{seed}:{epoch}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, H, W) Rec.709 luminance."""
    w = x.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (x * w).sum(1)


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
        a = a * (1 - float(rnd(0.5, 1.0)) * torch.sigmoid((float(rnd(0.004, 0.015)) - dist.abs()) / soft))
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


def _affine_grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    return F.affine_grid(theta, [theta.shape[0], 1, size, size], align_corners=False)


# ----------------------------------------------------------------------------------------------
# Backgrounds
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _scene_bank(side: int) -> torch.Tensor:
    """(N, 3, side, side) bundled skimage photographs, linearised (sRGB^2.2), float32 on CPU."""
    import skimage.data

    out = []
    for name in SKIMAGE_SCENES:
        img = getattr(skimage.data, name)()
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        t = torch.from_numpy(np.ascontiguousarray(img[..., :3])).permute(2, 0, 1).float() / 255
        sq = min(t.shape[1:])  # centre square crop
        top, left = (t.shape[1] - sq) // 2, (t.shape[2] - sq) // 2
        t = t[:, top:top + sq, left:left + sq]
        t = F.interpolate(t[None], size=(side, side), mode="bilinear", antialias=True,
                          align_corners=False)[0]
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
    """

    def __init__(self, size: int, seed: int, *, n_psf: int = 6, natural_fraction: float = 0.5,
                 ghosts: bool = True) -> None:
        if size < 16:
            raise UserError(f"ProceduralPairs: size={size} is too small; expected >= 16")
        if not 0.0 <= natural_fraction <= 1.0:
            raise UserError(f"ProceduralPairs: natural_fraction={natural_fraction} not in [0, 1]")
        self.size, self.seed, self.n_psf = int(size), int(seed), int(n_psf)
        self.natural_fraction, self.ghosts = float(natural_fraction), bool(ghosts)
        self._device_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- public contract --------------------------------------------------------------------------
    def batch(self, indices: Sequence[int] | torch.Tensor, device: torch.device | str = "cpu",
              epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input, gt, flare), each (B, 3, S, S) float32 in [0, 1] on `device`."""
        r = self.render(indices, device, epoch)
        return r.input, r.gt, r.flare

    def render(self, indices: Sequence[int] | torch.Tensor, device: torch.device | str = "cpu",
               epoch: int = 0) -> Rendered:
        """Images plus region masks for a batch of sample indices (see `Rendered`)."""
        device = torch.device(device)
        idx = [int(i) for i in (indices.tolist() if torch.is_tensor(indices) else indices)]
        if not idx:
            raise ValueError("render: empty batch of indices")
        seeds = [sample_seed(self.seed, i, epoch) for i in idx]
        p = _stack([self._params(s) for s in seeds], device)
        psfs, scenes = self._banks(device)

        scene = self._scene(p, scenes, seeds, device)  # (B, 3, S, S) linear
        light, centre_xy = self._lights(p)  # (B, 3, S, S) linear HDR, (B, 2) in [-1, 1]
        streak, halo = self._scatter(p, psfs, light)
        ghosts = self._ghosts(p, centre_xy) if self.ghosts else torch.zeros_like(light)
        flare = streak + halo + ghosts

        gamma = p["gamma"].view(-1, 1, 1, 1)

        def encode(x: torch.Tensor) -> torch.Tensor:
            y = x.clamp(0, 1) ** (1 / gamma)
            return torch.floor(y * 255 + 0.5) / 255  # 8-bit levels, as written to PNG

        gt_lin = scene + light
        g1 = gamma[:, 0]
        streak_y = _luma(streak).clamp(0, 1) ** (1 / g1)
        all_y = _luma(flare).clamp(0, 1) ** (1 / g1)
        light_m = _luma(light) >= MASK_THRESHOLDS["light"]
        streak_m = (streak_y >= MASK_THRESHOLDS["streak"]) & (_luma(streak) >= _luma(halo))
        glare_m = all_y >= MASK_THRESHOLDS["glare"]
        return Rendered(input=encode(gt_lin + flare), gt=encode(gt_lin), flare=encode(flare),
                        streak=streak_m, glare=glare_m, light=light_m)

    # -- sampling ---------------------------------------------------------------------------------
    def _params(self, sample: int) -> dict[str, torch.Tensor]:
        """All scalar randomness of one sample, from a CPU generator (device independent)."""
        g = torch.Generator().manual_seed(sample)

        def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(shape or (), generator=g)

        def choice(n: int, *shape: int) -> torch.Tensor:
            return torch.randint(0, n, shape or (), generator=g)

        n_lights = 1 + int(u(0, 1) < 0.5) + int(u(0, 1) < 0.3)
        return {
            "natural": (u(0, 1) < self.natural_fraction).float(),
            # natural scene: which photo, crop (scale, centre), flips, night grading
            "photo": choice(len(SKIMAGE_SCENES)).float(),
            "crop": torch.stack([u(0.35, 1.0), u(-1, 1), u(-1, 1)]),
            "flip": (u(0, 1, 2) < 0.5).float() * -2 + 1,
            "exposure": torch.exp(u(math.log(0.03), math.log(0.18))),
            "desat": u(0.2, 0.7),
            "tint": torch.stack([u(0.7, 1.0), u(0.75, 0.95), u(0.6, 1.0)]),
            "crush": u(1.0, 1.5),
            # procedural street
            "horizon": u(0.45, 0.75),
            "sky_top": torch.stack([u(0.0, 0.003), u(0.0, 0.004), u(0.004, 0.015)]),
            "sky_glow": torch.stack([u(0.02, 0.07), u(0.01, 0.04), u(0.01, 0.05)]),
            "glow_width": u(0.08, 0.3),
            "buildings": torch.stack([u(0, 1, 12), u(0.04, 0.22, 12), u(-0.35, 0.05, 12),
                                      u(0.002, 0.012, 12)], 1),  # x0, width, top-h, shade
            "window": torch.stack([u(0.012, 0.03), u(0.015, 0.035), u(0.15, 0.5), u(0.05, 0.35)]),
            "window_tex": torch.rand(64, 64, generator=g),
            "ground": u(0.004, 0.02),
            # light sources: position (-1..1), radius (fraction of S), aspect, angle, radiance, colour
            "l_on": (torch.arange(MAX_LIGHTS) < n_lights).float(),
            "l_pos": u(-0.75, 0.75, MAX_LIGHTS, 2),
            "l_rad": u(0.003, 0.010, MAX_LIGHTS),
            "l_aspect": u(1.0, 1.5, MAX_LIGHTS),
            "l_angle": u(0, math.pi, MAX_LIGHTS),
            "l_level": torch.exp(u(math.log(15), math.log(300), MAX_LIGHTS))
            * torch.tensor([1.0, 0.5, 0.3]),
            "l_colour": choice(len(LAMP_COLOURS), MAX_LIGHTS).float(),
            # scattering flare and glare
            "psf": choice(self.n_psf).float(),
            "psf_angle": u(0, 2 * math.pi),
            "psf_scale": u(0.8, 1.3),
            "streak_gain": torch.exp(u(math.log(1.5), math.log(8.0))),
            "halo_r0": u(0.01, 0.04),
            "halo_p": u(1.1, 1.6),
            "halo_gain": u(0.3, 1.2),
            # ghosts: on/off, position along the light-centre line, radius, sides, level, tint
            "g_on": (u(0, 1, MAX_GHOSTS) < 0.6).float(),
            "g_t": u(-1.3, 0.6, MAX_GHOSTS),
            "g_rad": u(0.02, 0.1, MAX_GHOSTS),
            "g_sides": (5 + choice(4)).float(),
            "g_angle": u(0, math.pi),
            "g_level": torch.exp(u(math.log(0.004), math.log(0.03), MAX_GHOSTS)),
            "g_tint": torch.stack([u(0.4, 1.0, MAX_GHOSTS), u(0.6, 1.0, MAX_GHOSTS),
                                   u(0.4, 1.0, MAX_GHOSTS)], 1),
            # camera
            "gamma": u(2.0, 2.4),
            "shot": u(0.0005, 0.004),
            "read": u(0.001, 0.006),
        }

    def _banks(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._device_cache:
            self._device_cache[key] = (_psf_bank(min(PSF_SIDE, 2 * self.size), self.seed, self.n_psf).to(device),
                                       _scene_bank(128 if self.size <= 128 else 256 if self.size <= 256 else 512).to(device))
        return self._device_cache[key]

    # -- components -------------------------------------------------------------------------------
    def _grid(self, b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel-centre coordinates x, y in [0, 1], each (1, S, S)."""
        ax = (torch.arange(self.size, device=device, dtype=torch.float32) + 0.5) / self.size
        y, x = torch.meshgrid(ax, ax, indexing="ij")
        return x[None], y[None]

    def _scene(self, p: dict, scenes: torch.Tensor, seeds: list[int],
               device: torch.device) -> torch.Tensor:
        """Night scene plus sensor noise, (B, 3, S, S) linear radiance >= 0."""
        b, s = p["gamma"].shape[0], self.size
        # Full-resolution randomness from per-sample device generators: sensor noise + stars.
        gens = [_dev_gen(sd, device) for sd in seeds]
        noise = torch.stack([torch.randn(3, s, s, device=device, generator=g) for g in gens])
        stars = torch.stack([torch.rand(1, s, s, device=device, generator=g) for g in gens])
        scene = torch.empty(b, 3, s, s, device=device)
        nat = p["natural"] > 0.5
        if nat.any():  # render each kind only for the samples that use it
            scene[nat] = self._photo({k: v[nat] for k, v in p.items()}, scenes)
        if (~nat).any():
            scene[~nat] = self._street({k: v[~nat] for k, v in p.items()}, stars[~nat], device)
        x, y = self._grid(b, device)
        scene = scene * (1 - 0.35 * ((x - 0.5) ** 2 + (y - 0.5) ** 2))  # lens vignetting
        # Sensor noise (signal-dependent + read noise), shared by gt and input so that input >= gt.
        sigma = torch.sqrt(p["shot"].view(-1, 1, 1, 1) * scene + p["read"].view(-1, 1, 1, 1) ** 2)
        return (scene + sigma * noise).clamp(min=0)

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
        photo = (photo * (1 - d) + luma * d) ** p["crush"].view(-1, 1, 1, 1)
        return photo * p["tint"].view(-1, 3, 1, 1) * p["exposure"].view(-1, 1, 1, 1)

    def _street(self, p: dict, stars: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Procedural night street, (B, 3, S, S) linear radiance; stars: (B, 1, S, S) U(0, 1)."""
        b, s = p["gamma"].shape[0], self.size
        x, y = self._grid(b, device)
        h = p["horizon"].view(-1, 1, 1)
        # Sky: dark zenith, warm light-polluted glow near the horizon.
        glow = torch.exp(-(h - y).clamp(min=0) / p["glow_width"].view(-1, 1, 1))[:, None]
        sky = p["sky_top"].view(-1, 3, 1, 1) + p["sky_glow"].view(-1, 3, 1, 1) * glow
        # Stars: sparse single pixels above the horizon.
        star = (stars > 0.9985).float()
        sky = sky + star * 0.05 * (y < h - 0.1)[:, None].float()
        ground = p["ground"].view(-1, 1, 1, 1) * (0.6 + 0.4 * y[:, None])
        img = torch.where((y < h)[:, None], sky, ground.expand(-1, 3, -1, -1))
        # Buildings (B, K, S, S), later ones in front; windows lit from a per-sample random texture.
        bl = p["buildings"]  # (B, K, 4): x0, width, top relative to the horizon, wall shade
        x0, w = bl[..., 0, None, None], bl[..., 1, None, None]
        top = (p["horizon"][:, None] + bl[..., 2])[..., None, None]
        inside = (x[:, None] >= x0) & (x[:, None] < x0 + w) & (y[:, None] >= top)
        inside = inside & (y < h + 0.02)[:, None]
        k_idx = torch.arange(1, bl.shape[1] + 1, device=device).view(1, -1, 1, 1)
        front = (inside * k_idx).amax(1)  # (B, S, S): 1-based front building, 0 = none
        any_b = front > 0
        k = (front - 1).clamp(min=0)
        shade = torch.gather(bl[..., 3], 1, k.view(b, -1)).view(b, s, s)
        ww, wh, p_lit, w_level = (t.view(-1, 1, 1) for t in p["window"].unbind(1))
        cell_x, cell_y = torch.remainder(x / ww, 1.0), torch.remainder(y / wh, 1.0)
        pane = (cell_x > 0.3) & (cell_x < 0.75) & (cell_y > 0.3) & (cell_y < 0.75)
        row = (y // wh).long() % 64
        col = ((x // ww).long() + 17 * k) % 64  # each building its own lit pattern
        bidx = torch.arange(b, device=device).view(-1, 1, 1)
        lit = p["window_tex"][bidx, row, col] < p_lit
        wall = shade[:, None] * torch.tensor([1.0, 0.9, 0.8], device=device).view(1, 3, 1, 1)
        window = ((pane & lit).float() * w_level)[:, None] * torch.tensor(
            [1.0, 0.75, 0.45], device=device).view(1, 3, 1, 1)
        img = torch.where(any_b[:, None], wall + window, img)
        return img

    def _lights(self, p: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """HDR light sources (B, 3, S, S) and the brightest light's position (B, 2) in [-1, 1]."""
        b, s = p["gamma"].shape[0], self.size
        device = p["gamma"].device
        x, y = self._grid(b, device)
        x, y = (x * 2 - 1)[:, None], (y * 2 - 1)[:, None]  # (1, 1, S, S) in [-1, 1]
        pos = p["l_pos"]  # (B, L, 2)
        dx, dy = x - pos[..., 0, None, None], y - pos[..., 1, None, None]
        ang = p["l_angle"][..., None, None]
        along = dx * torch.cos(ang) + dy * torch.sin(ang)
        across = -dx * torch.sin(ang) + dy * torch.cos(ang)
        rad = (2 * p["l_rad"])[..., None, None]  # radius in [-1, 1] units
        d = torch.sqrt((along / (rad * p["l_aspect"][..., None, None])) ** 2 + (across / rad) ** 2)
        soft = 1.0 / (s * rad)  # ~1 px antialiased edge
        disc = torch.sigmoid((1 - d) / soft) * (p["l_on"] * p["l_level"])[..., None, None]
        colours = LAMP_COLOURS.to(device)[p["l_colour"].long()]  # (B, L, 3)
        light = torch.einsum("blhw,blc->bchw", disc, colours)
        return light, pos[:, 0]

    def _scatter(self, p: dict, psfs: torch.Tensor,
                 light: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scattering flare and veiling glare: the lights convolved with each kernel (FFT)."""
        b, s = light.shape[0], self.size
        m = 2 * s  # padding to 2S makes the circular convolution linear over the image
        device = light.device
        ang, sc = p["psf_angle"], p["psf_scale"]
        theta = torch.zeros(b, 2, 3, device=device)
        theta[:, 0, 0], theta[:, 0, 1] = torch.cos(ang) / sc, -torch.sin(ang) / sc
        theta[:, 1, 0], theta[:, 1, 1] = torch.sin(ang) / sc, torch.cos(ang) / sc
        kernel = F.grid_sample(psfs[p["psf"].long()], _affine_grid(theta, m), mode="bilinear",
                               padding_mode="zeros", align_corners=False)
        # Renormalise after resampling (green channel sums to the gain; colour ratios kept).
        kernel = kernel * (p["streak_gain"] / kernel[:, 1].sum((1, 2)).clamp(min=1e-12)).view(-1, 1, 1, 1)
        ax = (torch.arange(m, device=device, dtype=torch.float32) - m / 2) / s
        yy, xx = torch.meshgrid(ax, ax, indexing="ij")
        r0 = (2 * p["halo_r0"]).view(-1, 1, 1)
        halo_k = (1 + (xx**2 + yy**2) / r0**2) ** (-p["halo_p"].view(-1, 1, 1))
        halo_k = halo_k / halo_k.sum((1, 2), keepdim=True) * p["halo_gain"].view(-1, 1, 1)

        padded = F.pad(light, (0, m - s, 0, m - s))
        spec = torch.fft.rfft2(padded)
        k_spec = torch.fft.rfft2(torch.fft.ifftshift(torch.cat([kernel, halo_k[:, None]], 1),
                                                     dim=(-2, -1)))
        streak = torch.fft.irfft2(spec * k_spec[:, :3], s=(m, m))[..., :s, :s]
        halo = torch.fft.irfft2(spec * k_spec[:, 3:], s=(m, m))[..., :s, :s]
        return streak.clamp(min=0), halo.clamp(min=0)  # FFT round-off can dip below zero

    def _ghosts(self, p: dict, light_xy: torch.Tensor) -> torch.Tensor:
        """Aperture-shaped ghosts on the line light -> optical centre -> beyond, (B, 3, S, S)."""
        b, s = light_xy.shape[0], self.size
        device = light_xy.device
        x, y = self._grid(b, device)
        x, y = (x * 2 - 1)[:, None], (y * 2 - 1)[:, None]
        centre = light_xy[:, None, :] * p["g_t"][..., None]  # (B, G, 2)
        dx, dy = x - centre[..., 0, None, None], y - centre[..., 1, None, None]
        r = torch.sqrt(dx * dx + dy * dy)
        n = p["g_sides"].view(-1, 1, 1, 1)
        sector = 2 * math.pi / n
        local = torch.remainder(torch.atan2(dy, dx) - p["g_angle"].view(-1, 1, 1, 1), sector) - sector / 2
        edge = torch.cos(math.pi / n) / torch.cos(local) * (2 * p["g_rad"])[..., None, None]
        shape = torch.sigmoid((edge - r) * s / 3)  # ~1.5 px soft edge
        rim = 1 + 0.6 * (r / edge).clamp(max=1) ** 4  # brighter rim, as real ghosts show
        level = p["g_on"] * p["g_level"] * p["l_level"][:, :1] / 100
        amp = shape * rim * level[..., None, None]  # (B, G, S, S)
        return torch.einsum("bghw,bgc->bchw", amp, p["g_tint"])


def _dev_gen(sample: int, device: torch.device) -> torch.Generator:
    """A generator on `device` for full-resolution noise, seeded from a sample seed."""
    return torch.Generator(device=device).manual_seed((sample * 0x9E3779B1 + 1) % (1 << 63))


def _stack(params: list[dict[str, torch.Tensor]], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.stack([q[k] for q in params]).to(device) for k in params[0]}


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
                                               "generator": "cascade.data.synthetic/1"})
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
