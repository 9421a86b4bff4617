"""The embedded demo's perceptual encoder f: a small CNN trained to segment flare, built once.

Why this network (issue 20): with random weights, L_PL and L_triplet measured distances in a random
feature space. The demo has no downloads, so f is trained here, on the procedural benchmark, for
the one thing the cascade's loss needs f to see: flare. `FlareSegNet` maps an image to per-pixel
logits of the three Flare7K regions (streak, glare, light source); its features are then frozen and
used as f, as Liu et al. (IJCAI'18) use a frozen high-level network as a loss. Trained on flared
inputs (targets: the rendered streak, glare and light-source masks) and on their flare-free ground
truths (targets: the light source alone), its features separate "flare here" from "no flare here",
so d(f(a), f(p)) is small when the anchor's output lost the flare and d(f(a), f(n)) is large when
the negative kept some.

Embedding (`cls`, the default): the global average of the last feature map (the activations the
segmentation head reads, "the layer just before the output layer"), standardised per dimension
with the mean and std measured on the encoder's training images when it was built, so that an MSE
of 1 is the features' typical spread over scenes (the units `config.DEFAULT_MARGIN` assumes);
`tokens`: that standardised map unpooled, (B, 64 * (S/4)^2).

Data: the procedural "encoder" split (`cascade.data.synthetic.SPLITS`): a stream sharing nothing
with the base's data, the trials' fine-tuning data or the test set. Held-out check (`learned`):
IoU of each region on `N_HELDOUT` images of the same split at indices no training step reached,
trained against the same network at its random initialisation; recorded in `encoder.json` and in
the encoder's `weights_source`, which the results keep.

Cache: `<cache>/encoders/<hash>/encoder.pth` (`cascade.io.cache_dir()`: $FLARESWEEP_CACHE or the
repo's .cache/), the hash covering `spec()` and the generator version; built under a file lock and
published atomically, like the procedural base (`cascade.pretrain`); a sweep builds it before any
trial starts (`ensure_for`, among its shared builds).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cascade.data import synthetic
from cascade.errors import UserError
from cascade.io import atomic_path, atomic_write_json, cache_dir, digest
from cascade.locks import build_once

if TYPE_CHECKING:
    from cascade.config import TrialConfig

log = logging.getLogger(__name__)

NAME = "flare_seg"
VERSION = 1  # bump when the network or its training changes (the cache key covers spec())
REGIONS = ("streak", "glare", "light")
IMAGE_SIZE = 64  # the demo's crop and test size: its images reach f without resampling
WIDTHS = (16, 32, 64)  # channels at full, 1/2 and 1/4 resolution
STEPS = 300
BATCH = 4  # flared inputs per step (each with its ground truth: 8 images)
LR = 3e-3
SEED = 0  # the encoder's stream in the "encoder" split
N_HELDOUT = 32
HELDOUT_START = 10**6  # held-out sample indices start here; training uses 0 .. STEPS * BATCH - 1
# Per-channel normalisation of the input ([0, 1] RGB): centred on the night scenes' dark levels.
MEAN = (0.1, 0.1, 0.1)
STD = (0.2, 0.2, 0.2)


class FlareSegNet(nn.Module):
    """(B, 3, H, W) normalised images -> region logits (B, 3, H, W) (streak, glare, light).

    Three stages of two 3x3 convolutions + ReLU (widths `WIDTHS`; stride 2 into stages 2 and 3),
    then a 1x1 head on the 1/4-resolution map, upsampled bilinearly. `features(x)` is that map,
    (B, WIDTHS[-1], H/4, W/4), after its ReLU.
    """

    def __init__(self, widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(widths):
            layers += [nn.Conv2d(c_in, c, 3, stride=1 if i == 0 else 2, padding=1), nn.ReLU(),
                       nn.Conv2d(c, c, 3, padding=1), nn.ReLU()]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(c_in, len(REGIONS), 1)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(self.head(self.features(x)), size=x.shape[-2:], mode="bilinear",
                             align_corners=False)


class Embedding(nn.Module):
    """A trained FlareSegNet's standardised features: (B, 3, S, S) normalised -> (B, D).

    `cls`: the global average of `features`, (B, C); `tokens`: the map, (B, C * h * w). Both
    standardised per channel: (feature - mean) / std, the statistics of the pooled features on
    the encoder's training images (buffers `feature_mean`, `feature_std`, (C,))."""

    def __init__(self, net: FlareSegNet, features: str = "cls") -> None:
        super().__init__()
        self.net = net
        self.pooled = features == "cls"
        c = net.head.in_channels
        self.register_buffer("feature_mean", torch.zeros(c))
        self.register_buffer("feature_std", torch.ones(c))

    def forward(self, x: Tensor) -> Tensor:
        f = self.net.features(x)  # (B, C, h, w)
        f = (f - self.feature_mean.view(1, -1, 1, 1)) / self.feature_std.view(1, -1, 1, 1)
        return f.mean((2, 3)) if self.pooled else f.flatten(1)


def spec() -> dict[str, Any]:
    """Everything that determines the trained weights (the cache key; recorded in encoder.json)."""
    return {"name": NAME, "version": VERSION, "widths": list(WIDTHS), "steps": STEPS,
            "batch": BATCH, "lr": LR, "image_size": IMAGE_SIZE, "split": "encoder", "seed": SEED,
            "generator": synthetic.GENERATOR}


def encoder_dir() -> Path:
    """The cache folder of the trained demo encoder."""
    return cache_dir() / "encoders" / digest(spec())


def ensure_demo_encoder() -> Path:
    """Path of the trained demo encoder's `encoder.pth`, training and caching it if needed."""
    folder = encoder_dir()
    target = folder / "encoder.pth"
    if target.is_file():  # published by rename: complete when it exists
        return target
    from cascade.pretrain import cpu_threads

    def build() -> None:
        with cpu_threads(torch.device("cpu")):  # a tiny CNN (cascade.pretrain.PREPARE_THREADS)
            train_demo_encoder(folder)

    build_once(target, build, lock=folder.with_suffix(".lock"))
    return target


def ensure_for(cfg: TrialConfig) -> Path | None:
    """`ensure_demo_encoder()` when `cfg` uses the demo encoder's trained weights, else None: the
    sweep driver builds it with the base and the test set, before any trial starts."""
    if cfg.encoder == NAME and cfg.encoder_pretrained and cfg.encoder_weights is None:
        return ensure_demo_encoder()
    return None


def _normalise(x: Tensor) -> Tensor:
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _examples(pairs: synthetic.ProceduralPairs, indices: list[int]) -> tuple[Tensor, Tensor]:
    """Flared inputs and their ground truths with region targets: (2B, 3, S, S) images in [0, 1]
    and (2B, 3, S, S) float {0, 1} targets (streak, glare, light); ground truths keep the light."""
    r = pairs.render(indices)
    regions = torch.stack([r.streak, r.glare, r.light], 1).float()
    clean = torch.stack([torch.zeros_like(r.streak), torch.zeros_like(r.glare), r.light], 1).float()
    return torch.cat([r.input, r.gt]), torch.cat([regions, clean])


def segmentation_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-region BCE plus soft Dice, (B, 3, H, W) logits against {0, 1} targets.

    BCE alone lets the light source (~0.5 % of the pixels) be predicted nowhere; the Dice term
    (1 - 2|P.T| / (|P| + |T|) per region over the batch) weighs each region by its own size."""
    prob = torch.sigmoid(logits)
    inter = (prob * targets).sum((0, 2, 3))
    dice = 1 - (2 * inter + 1) / (prob.sum((0, 2, 3)) + targets.sum((0, 2, 3)) + 1)
    return F.binary_cross_entropy_with_logits(logits, targets) + dice.mean()


def train_segmenter(steps: int = STEPS, batch: int = BATCH, size: int = IMAGE_SIZE,
                    lr: float = LR, seed: int = SEED) -> FlareSegNet:
    """A FlareSegNet trained for `steps` Adam steps (cosine decay) of `segmentation_loss` on `batch`
    flared images and their ground truths of the "encoder" split at side `size`; sample indices of
    step s are s*batch .. s*batch + batch - 1."""
    torch.manual_seed(seed)
    net = FlareSegNet()
    pairs = synthetic.ProceduralPairs(size, seed, split="encoder")
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    for step in range(steps):
        images, targets = _examples(pairs, list(range(step * batch, (step + 1) * batch)))
        loss = segmentation_loss(net(_normalise(images)), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 50 == 0:
            log.info("demo encoder: step %d/%d loss %.4f", step + 1, steps, float(loss.detach()))
    return net.eval()


def heldout_iou(net: FlareSegNet, n: int = N_HELDOUT, size: int = IMAGE_SIZE,
                seed: int = SEED) -> dict[str, float]:
    """IoU per region (logit > 0 against the rendered mask), pooled over `n` held-out flared
    images of the "encoder" split (indices from HELDOUT_START: never a training sample)."""
    pairs = synthetic.ProceduralPairs(size, seed, split="encoder")
    inter, union = torch.zeros(len(REGIONS)), torch.zeros(len(REGIONS))
    with torch.no_grad():
        for start in range(0, n, 8):
            idx = list(range(HELDOUT_START + start, HELDOUT_START + min(n, start + 8)))
            r = pairs.render(idx)
            target = torch.stack([r.streak, r.glare, r.light], 1)
            pred = net(_normalise(r.input)) > 0
            inter += (pred & target).sum((0, 2, 3)).float()
            union += (pred | target).sum((0, 2, 3)).float()
    return {name: float(i / u) if u > 0 else float("nan")
            for name, i, u in zip(REGIONS, inter, union)}


def feature_stats(net: FlareSegNet, n: int = 64, size: int = IMAGE_SIZE,
                  seed: int = SEED) -> tuple[Tensor, Tensor]:
    """Mean and std (C,) of the pooled features over `n` training examples (flared and clean)."""
    pairs = synthetic.ProceduralPairs(size, seed, split="encoder")
    with torch.no_grad():
        images, _ = _examples(pairs, list(range(n // 2)))
        pooled = net.features(_normalise(images)).mean((2, 3))  # (n, C)
    return pooled.mean(0), pooled.std(0).clamp(min=1e-6)


def train_demo_encoder(folder: Path) -> Path:
    """Train, check and publish the demo encoder into `folder` (call under the lock)."""
    t0 = time.perf_counter()
    torch.manual_seed(SEED)  # train_segmenter starts from exactly this initialisation
    random_iou = heldout_iou(FlareSegNet().eval())
    net = train_segmenter()
    iou = heldout_iou(net)
    mean, std = feature_stats(net)
    report = {"heldout_iou": iou, "random_init_iou": random_iou, "train_s": time.perf_counter() - t0,
              "learned": learned(iou, random_iou)}
    log.info("demo encoder: held-out IoU %s; random init %s; %.0fs", _iou_text(iou),
             _iou_text(random_iou), report["train_s"])
    with atomic_path(folder / "encoder.pth") as tmp:
        torch.save({"net": net.state_dict(), "feature_mean": mean, "feature_std": std,
                    "spec": spec(), **report}, tmp)
    atomic_write_json(folder / "encoder.json", spec() | report)
    return folder / "encoder.pth"


def learned(iou: dict[str, float], random_iou: dict[str, float], margin: float = 0.2) -> bool:
    """True when the trained network's held-out IoU beats its random initialisation's by at least
    `margin` on every region (a network that learned nothing scores what chance scores)."""
    return all(iou[r] >= random_iou[r] + margin for r in REGIONS)


def _iou_text(iou: dict[str, float]) -> str:
    return "/".join(f"{iou[r]:.2f}" for r in REGIONS) + " (streak/glare/light)"


def build_demo_encoder(pretrained: bool, weights: str | None = None, image_size: int | None = None,
                       features: str = "cls") -> Any:
    """The `flare_seg` PerceptualEncoder: trained weights (`weights`, or the cached build) when
    `pretrained`, else the random initialisation (weights_source "random")."""
    from cascade.perceptual import PerceptualEncoder, check_features

    check_features(NAME, features)
    net = FlareSegNet()
    embedding = Embedding(net, features)
    source = "random"
    if pretrained:
        path = Path(weights).expanduser() if weights is not None else ensure_demo_encoder()
        if not path.is_file():
            raise UserError(f"encoder_weights: {weights} does not exist or is not a file")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            net.load_state_dict(state["net"])
            embedding.feature_mean.copy_(state["feature_mean"])
            embedding.feature_std.copy_(state["feature_std"])
        except (KeyError, RuntimeError, OSError) as exc:
            raise UserError(f"encoder {NAME!r}: cannot load {path}: {exc}") from None
        iou, random_iou = state.get("heldout_iou"), state.get("random_init_iou")
        source = (f"flaresweep:{NAME}/{path.parent.name} (trained {STEPS} steps on the procedural "
                  f"'encoder' split to segment streak/glare/light"
                  + (f"; held-out IoU {_iou_text(iou)}, random init {_iou_text(random_iou)}"
                     if iou and random_iou else "")
                  # a file given by the user is named; the cached build is named by its key
                  # (the machine's cache path would be noise in a caption)
                  + (f"; {path}" if weights is not None else "") + ")")
    size = image_size or IMAGE_SIZE
    side = math.ceil(math.ceil(size / 2) / 2)  # two stride-2 convolutions with padding 1
    dim = WIDTHS[-1] * (1 if features == "cls" else side * side)
    return PerceptualEncoder(embedding, name=NAME, embed_dim=dim, image_size=size, mean=MEAN,
                             std=STD, interpolation="bilinear", weights_source=source,
                             features=features)
