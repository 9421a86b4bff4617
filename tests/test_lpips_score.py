"""LPIPS over the entire image (cascade.lpips_score): reference equality, offline weights."""

from __future__ import annotations

import urllib.error
import urllib.request
import warnings
from pathlib import Path

import lpips
import numpy as np
import pytest
import torch
import torchvision
from torchvision.transforms import ToTensor

from cascade.errors import UserError
from cascade.lpips_score import (
    ALEXNET_FILE,
    ALEXNET_URL,
    LPIPS_CONVENTIONS,
    MIN_SIDE,
    TRUNK_KEYS,
    build_lpips,
    lpips_available,
)

pytestmark = pytest.mark.usefixtures("one_thread")
CONVENTIONS = sorted(LPIPS_CONVENTIONS)
H, W = 40, 48  # not square, so a swapped H/W would change the shapes and the scores


@pytest.fixture(autouse=True)
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache, and any download attempt fails as it would without internet."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))

    def no_network(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    return home


def pair(seed: int, h: int = H, w: int = W) -> tuple[np.ndarray, np.ndarray]:
    """(pred, gt): gt random uint8 (h, w, 3); pred a noisy copy of it."""
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    noise = rng.integers(-40, 41, (h, w, 3))
    return np.clip(gt.astype(int) + noise, 0, 255).astype(np.uint8), gt


def reference(seed: int) -> torch.nn.Module:
    """A direct `lpips.LPIPS(net='alex', pnet_rand=True)`, random trunk from `seed`."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)


def flare7k_lpips(model: torch.nn.Module, pred: np.ndarray, gt: np.ndarray,
                  normalize: bool) -> float:
    """Flare7K evaluate.py's compare_lpips (lines 15-20), on CPU, gt first."""
    to_tensor = ToTensor()
    out = model(to_tensor(gt).unsqueeze(0), to_tensor(pred).unsqueeze(0), normalize=normalize)
    return float(out.detach().numpy()[0, 0, 0, 0])


def alexnet_file(path: Path, seed: int, full: bool = True) -> dict[str, torch.Tensor]:
    """Save a seeded random torchvision AlexNet state dict (all of it, or only `features.*`)."""
    torch.manual_seed(seed)
    state = torchvision.models.alexnet().state_dict()
    if not full:
        state = {k: v for k, v in state.items() if k.startswith("features.")}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


@pytest.fixture(scope="module")
def full_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A complete torchvision-format AlexNet file (classifier included, ~240 MB), made once."""
    path = tmp_path_factory.mktemp("alexnet") / ALEXNET_FILE
    return path, alexnet_file(path, seed=11)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_score_equals_direct_lpips_call_as_flare7k_converts(convention: str) -> None:
    torch.manual_seed(3)
    scorer = build_lpips(random_trunk=True)
    ref = reference(3)
    normalize = LPIPS_CONVENTIONS[convention].normalize
    for seed in range(3):
        pred, gt = pair(seed)
        want = flare7k_lpips(ref, pred, gt, normalize)
        assert want > 1e-3  # a real difference, so equality below is not 0 == 0
        assert scorer(pred, gt, convention) == pytest.approx(want, abs=1e-6)
    assert scorer.weights_source == "random"


def test_conventions_differ_and_flare7k_is_the_default() -> None:
    torch.manual_seed(3)
    scorer = build_lpips(random_trunk=True)
    pred, gt = pair(0)
    assert scorer(pred, gt) == scorer(pred, gt, "flare7k")
    assert abs(scorer(pred, gt, "flare7k") - scorer(pred, gt, "standard")) > 1e-4
    assert LPIPS_CONVENTIONS["flare7k"].normalize is False
    assert LPIPS_CONVENTIONS["standard"].normalize is True
    for conv in LPIPS_CONVENTIONS.values():
        assert conv.description and "\n" not in conv.description


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_identical_images_score_zero(convention: str) -> None:
    torch.manual_seed(5)
    scorer = build_lpips(random_trunk=True)
    _, gt = pair(1)
    assert scorer(gt.copy(), gt, convention) == pytest.approx(0.0, abs=1e-6)


def test_batched_scores_equal_one_by_one_with_mixed_sizes() -> None:
    torch.manual_seed(7)
    scorer = build_lpips(random_trunk=True)
    pairs = [pair(0), pair(1, 32, 36), pair(2), pair(3, 32, 36), pair(4)]
    preds, gts = [p for p, _ in pairs], [g for _, g in pairs]
    batched = scorer.score_many(preds, gts, "standard", batch_size=2)
    single = [scorer(p, g, "standard") for p, g in pairs]
    assert batched == pytest.approx(single, abs=1e-6)
    assert len(set(round(s, 6) for s in batched)) == len(pairs)  # order kept, not one value


def test_trunk_mapping_matches_lpips_layout() -> None:
    # Derived independently of TRUNK_KEYS: lpips' slices keep torchvision's child indices.
    model = reference(0)
    derived = {f"features.{name.split('.', 1)[1]}": f"net.{name}"
               for name, _ in model.net.named_parameters()}
    assert TRUNK_KEYS == derived
    assert TRUNK_KEYS["features.3.weight"] == "net.slice2.3.weight"
    assert set(TRUNK_KEYS) == {k for k in torchvision.models.alexnet().state_dict()
                               if k.startswith("features.")}


def test_local_torchvision_file_is_loaded(full_file: tuple[Path, dict[str, torch.Tensor]],
                                          tmp_path: Path) -> None:
    path, state = full_file
    scorer = build_lpips(weights=str(path))
    assert scorer.weights_source == str(path.resolve())
    own = scorer.model.state_dict()
    for src, dst in TRUNK_KEYS.items():
        assert torch.equal(own[dst], state[src]), src
    # The same scores as a direct LPIPS whose trunk is copied in by hand.
    ref = reference(0)
    with torch.no_grad():
        for n, k in ((0, 1), (3, 2), (6, 3), (8, 4), (10, 5)):
            conv = ref.net.get_submodule(f"slice{k}.{n}")
            conv.weight.copy_(state[f"features.{n}.weight"])
            conv.bias.copy_(state[f"features.{n}.bias"])
    pred, gt = pair(0)
    for convention in CONVENTIONS:
        want = flare7k_lpips(ref, pred, gt, LPIPS_CONVENTIONS[convention].normalize)
        assert scorer(pred, gt, convention) == pytest.approx(want, abs=1e-6)
    # Another init (a features-only file) gives another score and another fingerprint.
    other = tmp_path / "other.pth"
    alexnet_file(other, seed=12, full=False)
    scorer2 = build_lpips(weights=str(other))
    assert abs(scorer2(pred, gt) - scorer(pred, gt)) > 1e-4
    assert scorer2.fingerprint != scorer.fingerprint
    assert build_lpips(weights=str(other)).fingerprint == scorer2.fingerprint


def test_hub_cache_file_is_found(offline: Path) -> None:
    assert not lpips_available()
    state = alexnet_file(offline / "hub" / "checkpoints" / ALEXNET_FILE, seed=13, full=False)
    assert lpips_available()
    scorer = build_lpips()
    assert scorer.weights_source == "torchvision:AlexNet_Weights.IMAGENET1K_V1"
    assert torch.equal(scorer.model.net.get_submodule("slice5.10").weight, state["features.10.weight"])


def test_file_name_is_torchvisions() -> None:
    weights = torchvision.models.AlexNet_Weights.IMAGENET1K_V1
    assert weights.url == ALEXNET_URL
    assert ALEXNET_FILE == "alexnet-owt-7be5be79.pth"


def test_no_weights_offline_is_one_line_user_error(offline: Path) -> None:
    with pytest.raises(UserError) as info:
        build_lpips()
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    assert str(offline / "hub" / "checkpoints" / ALEXNET_FILE) in message
    assert ALEXNET_URL in message and "weights=" in message and "TORCH_HOME" in message
    assert not isinstance(info.value.__cause__, urllib.error.URLError)  # nothing was fetched


def test_lpips_available_checks_a_given_path(tmp_path: Path) -> None:
    path = tmp_path / "a.pth"
    assert not lpips_available(str(path))
    alexnet_file(path, seed=1, full=False)
    assert lpips_available(str(path))


@pytest.mark.parametrize("kind, fragment", [
    ("garbage", "cannot read"),
    ("resnet", r"missing \(10\): features.0.weight, features.0.bias"),
    ("squeezenet", r"shape mismatch \(1\): features.0.weight \(64, 3, 3, 3\) != \(64, 3, 11, 11\)"),
])
def test_bad_weight_files_are_user_errors(tmp_path: Path, kind: str, fragment: str) -> None:
    path = tmp_path / "bad.pth"
    if kind == "garbage":
        path.write_bytes(b"not a pickle")
    elif kind == "resnet":
        torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
    else:  # torchvision-format keys, another network: features.0 is a 3x3 convolution
        torch.save(torchvision.models.squeezenet1_1().state_dict(), path)
    with pytest.raises(UserError, match=fragment) as info:
        build_lpips(weights=str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_path_and_contradictory_options(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        build_lpips(weights=str(tmp_path / "nope.pth"))
    with pytest.raises(UserError, match="random_trunk"):
        build_lpips(weights=str(tmp_path / "nope.pth"), random_trunk=True)


@pytest.mark.parametrize("pred, gt, fragment", [
    (np.zeros((40, 48, 3), np.float32), np.zeros((40, 48, 3), np.uint8), "uint8"),
    (np.zeros((40, 48), np.uint8), np.zeros((40, 48), np.uint8), r"\(H, W, 3\)"),
    (np.zeros((40, 48, 3), np.uint8), np.zeros((48, 40, 3), np.uint8), "shapes differ"),
    (np.zeros((MIN_SIDE - 1, 48, 3), np.uint8), np.zeros((MIN_SIDE - 1, 48, 3), np.uint8),
     f">= {MIN_SIDE}x{MIN_SIDE}"),
])
def test_bad_images_are_user_errors(pred: np.ndarray, gt: np.ndarray, fragment: str) -> None:
    torch.manual_seed(0)
    scorer = build_lpips(random_trunk=True)
    with pytest.raises(UserError, match=fragment):
        scorer(pred, gt)


def test_min_side_is_the_smallest_alexnet_accepts() -> None:
    torch.manual_seed(0)
    scorer = build_lpips(random_trunk=True)
    image = np.full((MIN_SIDE, MIN_SIDE, 3), 128, np.uint8)
    assert scorer(image, image) == 0.0
    with torch.inference_mode(), pytest.raises(RuntimeError):
        x = torch.zeros(1, 3, MIN_SIDE - 1, MIN_SIDE - 1)
        scorer.model(x, x)


def test_unknown_convention_and_bad_batch_size() -> None:
    torch.manual_seed(0)
    scorer = build_lpips(random_trunk=True)
    pred, gt = pair(0)
    with pytest.raises(UserError, match="expected one of flare7k, standard"):
        scorer(pred, gt, "normalized")
    with pytest.raises(UserError, match="batch_size"):
        scorer.score_many([pred], [gt], batch_size=0)
