"""LPIPS (AlexNet, v0.1) over the entire image, offline, under named input conventions.

Flare7K's `evaluate.py` reports PSNR, SSIM and LPIPS; its LPIPS is
`lpips.LPIPS(net='alex')(ToTensor()(gt)[None], ToTensor()(pred)[None])` (evaluate.py:15-20, 55,
74 at ykdai/Flare7K@d1fb66e): images in [0, 1], *without* `normalize=True`, although LPIPS expects
[-1, 1] (its ScalingLayer maps [-1, 1] to ImageNet statistics). Its published numbers use that, so
both inputs are offered by name (`LPIPS_CONVENTIONS`), "flare7k" being the default:

- "flare7k": uint8 / 255 in [0, 1] fed as is (`normalize=False`), exactly ToTensor()'s float32.
- "standard": the same tensors with `normalize=True`, i.e. 2x - 1 in [-1, 1] inside LPIPS.

The score of a pair is LPIPS' spatial mean (spatial=False), one float per image; gt is the first
argument, as in evaluate.py. Identical images score exactly 0.

Weights, never downloaded here: the linear layers ship in the lpips wheel
(`lpips/weights/v0.1/alex.pth`); the AlexNet trunk is torchvision's
`AlexNet_Weights.IMAGENET1K_V1` (`alexnet-owt-7be5be79.pth`), which `LPIPS(net='alex')` would fetch
through `torchvision.models.alexnet(pretrained=True)` (a URLError offline). Here the model is built
with `pnet_rand=True` and the trunk is loaded from a local torchvision-format file (`weights=PATH`)
or from the torch hub cache (`torch.hub.get_dir()/checkpoints/`, where torchvision itself caches
it). lpips keeps torchvision's layer indices inside five slices (pretrained_networks.py:56-75:
features[0:2] -> slice1, [2:5] -> slice2, [5:8] -> slice3, [8:10] -> slice4, [10:12] -> slice5),
so `features.N.*` becomes `net.sliceK.N.*` (`TRUNK_KEYS`); the classifier is unused and ignored.

Use: `scorer = build_lpips(weights=None, device="cpu")`, then `scorer(pred, gt, "flare7k")` on
(H, W, 3) uint8 arrays, or `scorer.score_many(preds, gts, convention)` (batched). Without weights,
`build_lpips` raises one `UserError` saying how to supply them; `lpips_available()` tells cheaply
(no loading, no network) whether it would find them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from cascade.errors import UserError, brief

TORCHVISION_WEIGHTS = "AlexNet_Weights.IMAGENET1K_V1"
# torchvision's AlexNet_Weights.IMAGENET1K_V1.url (a test checks it against the installed one);
# spelled out so that lpips_available() needs no torchvision import.
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
ALEXNET_FILE = ALEXNET_URL.rsplit("/", 1)[-1]
# The smallest side AlexNet's trunk accepts: conv1 (k11, s4, p2) and two 3x3/2 max-pools must
# leave at least one pixel for conv3-5.
MIN_SIDE = 31
_LPIPS_REQUIREMENT = "lpips>=0.1.4,<0.2"


@dataclass(frozen=True)
class LPIPSConvention:
    """How uint8 images reach LPIPS: `normalize` is passed to `lpips.LPIPS.forward`."""

    normalize: bool  # False: [0, 1] as is; True: LPIPS maps [0, 1] to [-1, 1] first
    description: str  # one line, for table captions and footnotes


LPIPS_CONVENTIONS: dict[str, LPIPSConvention] = {
    "flare7k": LPIPSConvention(
        normalize=False,
        description="LPIPS (AlexNet, v0.1) on [0, 1] images without normalize=True, as Flare7K's "
                    "evaluate.py computes it (its published numbers)",
    ),
    "standard": LPIPSConvention(
        normalize=True,
        description="LPIPS (AlexNet, v0.1) on images scaled to [-1, 1] (normalize=True), the input "
                    "range LPIPS is calibrated for",
    ),
}
DEFAULT_CONVENTION = "flare7k"

# torchvision AlexNet `features.N` -> lpips `net.sliceK.N` (pretrained_networks.py:66-75); only the
# five convolutions have tensors.
TRUNK_KEYS: dict[str, str] = {
    f"features.{n}.{p}": f"net.slice{k}.{n}.{p}"
    for n, k in ((0, 1), (3, 2), (6, 3), (8, 4), (10, 5)) for p in ("weight", "bias")
}


def hub_weights_path() -> Path:
    """Where torchvision caches the AlexNet trunk: `torch.hub.get_dir()/checkpoints/<file>`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE


def missing_weights_message() -> str:
    """One line saying how to supply the AlexNet trunk offline (also a footnote for '—')."""
    return (f"LPIPS needs the AlexNet trunk weights (torchvision:{TORCHVISION_WEIGHTS}), not found "
            f"at {hub_weights_path()}. Without internet, download {ALEXNET_URL} elsewhere, then "
            f"either put the file at {hub_weights_path()} (the torch hub cache; TORCH_HOME moves "
            f"it) or pass its path as the LPIPS weights (build_lpips(weights=/path/to/"
            f"{ALEXNET_FILE})). The linear layers ship with the lpips package.")


def find_weights(weights: str | None = None) -> tuple[Path, str] | None:
    """`(file, weights_source)` of the AlexNet trunk, or None when no file is there; reads nothing.

    `weights` (a torchvision-format state-dict file) wins; a given path that is not a file is a
    UserError rather than a silent fall-back to the cache. Otherwise the torch hub cache.
    """
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserError(f"LPIPS weights: {weights} does not exist or is not a file")
        path = path.resolve()
        return path, str(path)
    path = hub_weights_path()
    return (path, f"torchvision:{TORCHVISION_WEIGHTS}") if path.is_file() else None


def lpips_available(weights: str | None = None) -> bool:
    """True when `build_lpips(weights)` would find its weights; cheap (file checks, no network).

    A file that exists but is not an AlexNet state dict still fails later, in `build_lpips`.
    """
    if importlib.util.find_spec("lpips") is None:
        return False
    try:
        return find_weights(weights) is not None
    except UserError:
        return False


class LPIPSScorer:
    """LPIPS of (H, W, 3) uint8 pairs, one float per image (lower is closer; 0 for identical).

    Attributes: `model` (the frozen, eval-mode `lpips.LPIPS`), `device`, `weights_source`
    ("torchvision:AlexNet_Weights.IMAGENET1K_V1" for the hub cache, a file's absolute path, or
    "random"), `fingerprint` (sha256 prefix of every tensor in the model: the identity of what
    produced a score, independent of where the file lay).
    """

    def __init__(self, model: nn.Module, device: torch.device, weights_source: str) -> None:
        self.model = model
        self.device = device
        self.weights_source = weights_source
        self.fingerprint = _fingerprint(model)

    def __call__(self, pred: np.ndarray, gt: np.ndarray,
                 convention: str = DEFAULT_CONVENTION) -> float:
        """LPIPS of one pair of (H, W, 3) uint8 images under `convention`."""
        return self.score_many([pred], [gt], convention)[0]

    def score_many(self, preds: Sequence[np.ndarray], gts: Sequence[np.ndarray],
                   convention: str = DEFAULT_CONVENTION, batch_size: int = 16) -> list[float]:
        """LPIPS of every pair, in order; pairs of one shape run in batches of `batch_size`.

        preds[i], gts[i]: (H_i, W_i, 3) uint8, each side >= MIN_SIDE; sizes may vary.
        """
        conv = _convention(convention)
        if len(preds) != len(gts):
            raise UserError(f"LPIPS: {len(preds)} predictions but {len(gts)} ground truths")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"LPIPS: batch_size={batch_size!r} must be a positive integer")
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, (pred, gt) in enumerate(zip(preds, gts)):
            _check_pair(i, pred, gt)
            by_shape.setdefault(gt.shape, []).append(i)
        scores: list[float] = [0.0] * len(preds)
        with torch.inference_mode():
            for indices in by_shape.values():
                for start in range(0, len(indices), batch_size):
                    chunk = indices[start:start + batch_size]
                    gt_t = _to_tensor([gts[i] for i in chunk], self.device)  # (B, 3, H, W)
                    pred_t = _to_tensor([preds[i] for i in chunk], self.device)
                    # gt first, as evaluate.py calls loss_fn_alex(img_gt, img_input)
                    out = self.model(gt_t, pred_t, normalize=conv.normalize)  # (B, 1, 1, 1)
                    for i, value in zip(chunk, out.reshape(-1).tolist()):
                        scores[i] = float(value)
        return scores

    def __repr__(self) -> str:
        return (f"LPIPSScorer(net='alex', device={str(self.device)!r}, "
                f"weights_source={self.weights_source!r}, fingerprint={self.fingerprint!r})")


def build_lpips(weights: str | None = None, device: str | torch.device = "cpu",
                random_trunk: bool = False) -> LPIPSScorer:
    """LPIPS (AlexNet, v0.1, the wheel's linear layers) with the trunk from a local file.

    weights: a torchvision-format AlexNet state dict (`features.N.*`; `classifier.*` is ignored);
    None looks in the torch hub cache. No file -> UserError (`missing_weights_message()`); nothing
    is ever downloaded. random_trunk: keep lpips' random trunk initialisation (tests only; the
    global torch RNG decides it), recorded as weights_source "random".
    """
    if importlib.util.find_spec("lpips") is None:
        raise UserError(f"LPIPS needs the lpips package: pip install '{_LPIPS_REQUIREMENT}'")
    if random_trunk and weights is not None:
        raise UserError(f"LPIPS weights: {weights} is given but random_trunk=True; pass one of them")
    dev = _device(device)
    found = None if random_trunk else find_weights(weights)  # before building: fail fast
    if found is None and not random_trunk:
        raise UserError(missing_weights_message())
    model = _random_lpips()
    source = "random"
    if found is not None:
        path, source = found
        _load_trunk(model, _read_state(path), path)
    model.requires_grad_(False)
    return LPIPSScorer(model.to(dev).eval(), dev, source)


# -- helpers -------------------------------------------------------------------------------------

def _random_lpips() -> nn.Module:
    """`lpips.LPIPS(net='alex', pnet_rand=True)`: wheel linear layers, random trunk, eval mode."""
    import lpips

    with warnings.catch_warnings():
        # lpips 0.1.4 calls torchvision.models.alexnet(pretrained=False), deprecated since 0.13
        warnings.filterwarnings("ignore", message=r".*(pretrained|weight enum)", category=UserWarning)
        return lpips.LPIPS(net="alex", version="0.1", pnet_rand=True, verbose=False)


def _read_state(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors have no common base class
        raise UserError(f"LPIPS weights: cannot read {path} as a state dict: {brief(exc)}") from exc
    if not isinstance(state, dict):
        raise UserError(f"LPIPS weights: {path} holds a {type(state).__name__}, not a state dict")
    # DataParallel-saved files prefix every key with `module.`
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_trunk(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    """Copy the file's `features.N.*` into the model's `net.sliceK.N.*`; strict on those ten."""
    own = model.state_dict()
    missing = [k for k in TRUNK_KEYS if k not in state]
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(own[v].shape)}" for k, v in TRUNK_KEYS.items()
              if k in state and tuple(state[k].shape) != tuple(own[v].shape)]
    if missing or shapes:
        parts = [f"{label} ({len(keys)}): {', '.join(keys[:5])}" + (" ..." if len(keys) > 5 else "")
                 for label, keys in (("missing", missing), ("shape mismatch", shapes)) if keys]
        raise UserError(f"LPIPS weights: {path} is not a torchvision AlexNet state dict; "
                        + "; ".join(parts))
    trunk = {v: state[k].to(own[v].dtype) for k, v in TRUNK_KEYS.items()}
    result = model.load_state_dict(trunk, strict=False)
    if result.unexpected_keys or set(own) - set(result.missing_keys) != set(trunk):
        raise RuntimeError(f"lpips trunk layout changed: {result}")  # a bug here, not the user's


def _convention(name: str) -> LPIPSConvention:
    if name not in LPIPS_CONVENTIONS:
        raise UserError(f"unknown LPIPS convention {name!r}; expected one of "
                        f"{', '.join(LPIPS_CONVENTIONS)}")
    return LPIPS_CONVENTIONS[name]


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UserError(f"LPIPS device: {device!r} is not a torch device ({brief(exc)})") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"LPIPS device: {device!r} requested but CUDA is not available")
    return dev


def _check_pair(i: int, pred: np.ndarray, gt: np.ndarray) -> None:
    for name, image in (("pred", pred), ("gt", gt)):
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
            kind = image.dtype if isinstance(image, np.ndarray) else type(image).__name__
            raise UserError(f"LPIPS pair {i}: {name} must be a uint8 numpy array, got {kind}")
        if image.ndim != 3 or image.shape[2] != 3:
            raise UserError(f"LPIPS pair {i}: {name} must be (H, W, 3), got shape {image.shape}")
    if pred.shape != gt.shape:
        raise UserError(f"LPIPS pair {i}: shapes differ: pred {pred.shape}, gt {gt.shape}")
    if min(gt.shape[:2]) < MIN_SIDE:
        raise UserError(f"LPIPS pair {i}: image is {gt.shape[0]}x{gt.shape[1]}; AlexNet LPIPS "
                        f"needs >= {MIN_SIDE}x{MIN_SIDE}")


def _to_tensor(images: list[np.ndarray], device: torch.device) -> Tensor:
    """(H, W, 3) uint8 images -> (B, 3, H, W) float32 in [0, 1], as torchvision's ToTensor()."""
    x = torch.from_numpy(np.stack(images)).to(device)  # (B, H, W, 3) uint8
    return x.permute(0, 3, 1, 2).to(torch.float32).div(255)


def _fingerprint(model: nn.Module) -> str:
    """sha256 (16 hex) over every tensor's name, dtype, shape and bytes, in key order."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()[:16]


