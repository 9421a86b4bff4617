"""cascade.encoders: every name builds frozen, offline weights round-trip, errors are clear."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import ViT_L_16_Weights
from torchvision.models.vision_transformer import VisionTransformer

from cascade.config import ENCODER_NAMES
from cascade.encoders import (
    ENCODER_FEATURES,
    ENCODERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    VIT_L16_SWAG_E2E,
    VIT_L16_SWAG_LINEAR,
    PerceptualEncoder,
    TorchvisionViT,
    build_encoder,
    build_torchvision_vit,
    check_encoder_name,
    resize_square,
)
from cascade.errors import UserError

# Tiny timm models (a few hundred thousand parameters) standing in for "any timm model".
TINY_TIMM = ["timm:test_resnet", "timm:test_vit", "timm:test_convnext"]
# A torchvision ViT small enough to save and reload in a test; same code path as vit_l16_swag.
TINY_VIT = TorchvisionViT("IMAGENET1K_SWAG_LINEAR_V1", image_size=32, num_layers=1, num_heads=2,
                          hidden_dim=16, mlp_dim=32)


def batch(b: int = 2, h: int = 20, w: int = 28) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(0))


def assert_frozen(encoder: PerceptualEncoder) -> None:
    assert not encoder.training
    encoder.train()  # a parent's .train() must not unfreeze it
    assert not encoder.training and not any(m.training for m in encoder.modules())
    assert not any(p.requires_grad for p in encoder.parameters())


@pytest.fixture(scope="module")
def small_cpu() -> PerceptualEncoder:
    return build_encoder("small_cpu", pretrained=False)


# -- every name builds ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY_TIMM)
def test_timm_names_build_frozen_with_fixed_size_embedding(name: str) -> None:
    encoder = build_encoder(name, pretrained=False)
    assert encoder.name == name and encoder.pretrained is False
    assert encoder.weights_source == "random"
    assert encoder.image_size == 160  # the tiny models' own input size
    assert_frozen(encoder)
    out = encoder(batch(1, 20, 28))
    assert out.shape == (1, encoder.embed_dim) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_small_cpu_is_resnet18_at_128_px(small_cpu: PerceptualEncoder) -> None:
    assert "small_cpu" in ENCODERS
    assert ENCODER_NAMES == tuple(ENCODERS)  # what config validates without importing encoders
    assert small_cpu.embed_dim == 512 and small_cpu.image_size == 128
    assert small_cpu.weights_source == "random"
    assert_frozen(small_cpu)
    torch.testing.assert_close(small_cpu.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    assert small_cpu(batch(1, 200, 170)).shape == (1, 512)  # antialiased downsampling path


def test_gradient_reaches_the_input_not_the_weights(small_cpu: PerceptualEncoder) -> None:
    x = batch(1, 64, 64).requires_grad_(True)
    small_cpu(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in small_cpu.parameters())


def test_batching_does_not_change_embeddings(small_cpu: PerceptualEncoder) -> None:
    # cascade_loss batches positive and negative into one pass: eval-mode BatchNorm makes each
    # sample's embedding independent of its batch mates.
    x = batch(3, 64, 64)
    torch.testing.assert_close(small_cpu(x)[:1], small_cpu(x[:1]), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_vit_l16_swag_builds_with_random_weights() -> None:
    # 300M parameters: built once, at a 32 px input (4 tokens) to keep the forward cheap. The E2E
    # variant runs the same builder with another spec (checked below without building it).
    encoder = build_encoder("vit_l16_swag", pretrained=False, image_size=32)
    assert encoder.embed_dim == 1024 and encoder.image_size == 32
    assert encoder.weights_source == "random" and encoder.pretrained is False
    assert_frozen(encoder)
    assert sum(p.numel() for p in encoder.parameters()) > 300e6
    assert encoder(batch(2, 20, 20)).shape == (2, 1024)


def test_swag_specs_match_torchvision_metadata() -> None:
    for spec in (VIT_L16_SWAG_LINEAR, VIT_L16_SWAG_E2E):
        weights = getattr(ViT_L_16_Weights, spec.weights)
        preprocess = weights.transforms()
        assert spec.image_size == weights.meta["min_size"][0] == preprocess.crop_size[0]
        assert preprocess.resize_size[0] == spec.image_size  # resize == crop: no border dropped
        assert tuple(preprocess.mean) == IMAGENET_MEAN and tuple(preprocess.std) == IMAGENET_STD
        assert preprocess.interpolation.value == "bicubic"
    assert VIT_L16_SWAG_LINEAR.image_size == 224 and VIT_L16_SWAG_E2E.image_size == 512
    assert ENCODERS["vit_l16_swag"].args == (VIT_L16_SWAG_LINEAR, "vit_l16_swag")
    assert ENCODERS["vit_l16_swag_e2e"].args == (VIT_L16_SWAG_E2E, "vit_l16_swag_e2e")


# -- preprocessing --------------------------------------------------------------------------------

def test_resize_square_keeps_constants_and_crops_the_centre() -> None:
    flat = torch.full((1, 3, 40, 60), 0.3)
    torch.testing.assert_close(resize_square(flat, 16), torch.full((1, 3, 16, 16), 0.3))
    # A 2x4 image whose columns are 0,1,2,3: shorter side 2 -> 2, centre crop keeps columns 1,2.
    ramp = torch.arange(4.0).repeat(1, 1, 2, 1)
    torch.testing.assert_close(resize_square(ramp, 2), torch.tensor([[[[1.0, 2.0], [1.0, 2.0]]]]))
    same = torch.rand(1, 3, 8, 8)
    assert resize_square(same, 8) is same


def test_forward_is_resize_then_normalise_then_network() -> None:
    encoder = PerceptualEncoder(
        nn.Sequential(nn.Flatten()), name="id", embed_dim=3 * 16 * 16, image_size=16,
        mean=(0.5, 0.4, 0.3), std=(0.1, 0.2, 0.3), interpolation="bilinear", weights_source="random",
    )
    x = batch(1, 32, 32)
    expected = (F.interpolate(x, size=(16, 16), mode="bilinear", antialias=True)
                - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    torch.testing.assert_close(encoder(x), expected.flatten(1))


# -- features: cls | tokens -------------------------------------------------------------------------

def saved_tiny_vit(tmp_path: Path) -> tuple[VisionTransformer, str]:
    torch.manual_seed(3)
    arch = {k: getattr(TINY_VIT, k) for k in ("image_size", "patch_size", "num_layers",
                                              "num_heads", "hidden_dim", "mlp_dim")}
    model = VisionTransformer(**arch).eval()
    path = tmp_path / "vit.pth"
    torch.save(model.state_dict(), path)
    return model, str(path)


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def test_vit_cls_and_tokens_are_the_final_layernorm_output(tmp_path: Path) -> None:
    model, path = saved_tiny_vit(tmp_path)
    cls = build_torchvision_vit(TINY_VIT, "tiny_vit", pretrained=True, weights=path)
    tokens = build_torchvision_vit(TINY_VIT, "tiny_vit", pretrained=True, weights=path,
                                   features="tokens")
    assert cls.features == "cls" and tokens.features == "tokens"
    assert tokens.embed_dim == 4 * 16  # a 2x2 patch grid at 32 px, 16-d tokens
    assert "features='tokens'" in repr(tokens)
    assert_frozen(tokens)
    # The reference: torchvision's own forward, its final LayerNorm's output captured by a hook.
    seen: list[torch.Tensor] = []
    model.encoder.ln.register_forward_hook(lambda m, i, o: seen.append(o))
    x = batch(2, 32, 32)
    with torch.no_grad():
        model.heads = nn.Identity()
        class_token = model(normalise(x))
    ln = seen[0]  # (2, 1 + 4, 16)
    torch.testing.assert_close(class_token, ln[:, 0])
    torch.testing.assert_close(cls(x), ln[:, 0])
    out = tokens(x)
    assert out.shape == (2, 64) and out.dtype == torch.float32
    torch.testing.assert_close(out, ln[:, 1:].flatten(1))
    # Tokens reach the input's gradient like the class token does.
    x.requires_grad_(True)
    tokens(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_vit_tokens_follow_the_input_size(tmp_path: Path) -> None:
    _, path = saved_tiny_vit(tmp_path)
    bigger = build_torchvision_vit(TINY_VIT, "tiny_vit", pretrained=True, weights=path,
                                   image_size=48, features="tokens")
    assert bigger.embed_dim == 9 * 16 and bigger(batch(1, 40, 40)).shape == (1, 144)
    random = build_torchvision_vit(TINY_VIT, "tiny_vit", pretrained=False, features="tokens")
    assert random.weights_source == "random" and random(batch(1)).shape == (1, 64)


def test_build_encoder_passes_features_to_the_vit_builders(monkeypatch: pytest.MonkeyPatch) -> None:
    # The ENCODERS entries are called as builder(pretrained, weights, image_size, features=...):
    # the same partial as vit_l16_swag's, with the tiny spec instead of ViT-L.
    from functools import partial

    monkeypatch.setitem(ENCODERS, "vit_l16_swag", partial(build_torchvision_vit, TINY_VIT,
                                                          "vit_l16_swag"))
    encoder = build_encoder("vit_l16_swag", pretrained=False, image_size=48, features="tokens")
    assert encoder.features == "tokens" and encoder.embed_dim == 9 * 16


def test_small_cpu_tokens_are_the_map_its_embedding_pools(small_cpu: PerceptualEncoder) -> None:
    tokens = build_encoder("small_cpu", pretrained=False, features="tokens")
    assert tokens.embed_dim == 512 * 4 * 4 and tokens.image_size == 128  # resnet18 at 128 px
    x = batch(2, 128, 128)
    out = tokens(x)
    assert out.shape == (2, 8192) and out.min() >= 0  # the last block's ReLU output
    # Its global average pool is the `cls` embedding of the same network (TimmPreLogits).
    from cascade.encoders import TimmPreLogits

    with torch.no_grad():
        pooled = TimmPreLogits(tokens.backbone.model)(normalise(x))
    torch.testing.assert_close(out.view(2, 512, 16).mean(dim=2), pooled, rtol=1e-5, atol=1e-6)


def test_timm_vit_tokens_drop_the_class_token() -> None:
    tokens = build_encoder("timm:test_vit", pretrained=False, features="tokens")
    model = tokens.backbone.model
    assert tokens.backbone.num_prefix_tokens == model.num_prefix_tokens == 1
    x = batch(2, 160, 160)
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    normed = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        features = model.forward_features(normed)  # (2, 1 + 100, 64)
    assert tokens.embed_dim == 100 * 64
    torch.testing.assert_close(tokens(x), features[:, 1:].flatten(1))


@pytest.mark.parametrize("name", TINY_TIMM)
def test_timm_names_build_with_tokens(name: str) -> None:
    encoder = build_encoder(name, pretrained=False, features="tokens")
    assert encoder.features == "tokens" and encoder.embed_dim > 64
    out = encoder(batch(1, 20, 28))
    assert out.shape == (1, encoder.embed_dim) and torch.isfinite(out).all()


def test_tokens_need_one_feature_tensor() -> None:
    from cascade.encoders import TimmTokens

    class Pyramid(nn.Module):
        def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
            return [x, x[..., ::2, ::2]]

    with pytest.raises(UserError, match=r"encoder 'timm:pyramid': encoder_features=tokens needs "
                                        r"forward_features to return one .* got list; use "
                                        r"encoder_features: cls$"):
        TimmTokens(Pyramid(), "timm:pyramid")(batch(1, 8, 8))


@pytest.mark.parametrize("name", ["vit_l16_swag", "small_cpu", "timm:test_resnet"])
def test_unknown_features_are_a_user_error(name: str) -> None:
    with pytest.raises(UserError, match=rf"encoder '{name}': encoder_features='patch' is invalid; "
                                        r"expected one of cls, tokens"):
        build_encoder(name, pretrained=False, features="patch")  # before building anything


def test_features_are_mirrored_in_config() -> None:
    import cascade.config as config

    assert ENCODER_FEATURES == ("cls", "tokens")
    assert config.ENCODER_FEATURES == ENCODER_FEATURES


# -- local weights --------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_local_weights_round_trip(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(1)
    model = timm.create_model("test_resnet").eval()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": model.state_dict()}, path)  # a training checkpoint's wrapping
    else:
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(path))
    encoder = build_encoder("timm:test_resnet", pretrained=True, weights=str(path))
    assert encoder.pretrained is True and encoder.weights_source == str(path.resolve())
    x = batch(2, 160, 160)  # the model's own size: no resize, so the reference is exact
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    normed = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(normed), pre_logits=True)
    torch.testing.assert_close(encoder(x), expected)


def test_torchvision_local_weights_round_trip_and_resize(tmp_path: Path) -> None:
    torch.manual_seed(2)
    arch = {k: getattr(TINY_VIT, k) for k in ("image_size", "patch_size", "num_layers",
                                              "num_heads", "hidden_dim", "mlp_dim")}
    model = VisionTransformer(**arch).eval()  # with its 1000-class head, as torchvision saves it
    path = tmp_path / "vit.pth"
    torch.save(model.state_dict(), path)
    encoder = build_torchvision_vit(TINY_VIT, "tiny_vit", pretrained=True, weights=str(path))
    assert encoder.weights_source == str(path.resolve()) and encoder.embed_dim == 16
    x = batch(2, 32, 32)
    normed = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    model.heads = nn.Identity()
    with torch.no_grad():
        expected = model(normed)
    torch.testing.assert_close(encoder(x), expected)
    # A larger input size interpolates the 2x2 position grid to 3x3 instead of failing.
    bigger = build_torchvision_vit(TINY_VIT, "tiny_vit", pretrained=True, weights=str(path),
                                   image_size=48)
    assert bigger.backbone.encoder.pos_embedding.shape == (1, 10, 16)
    assert bigger(x).shape == (2, 16)


def test_weights_that_do_not_fit_are_a_user_error(tmp_path: Path) -> None:
    state = VisionTransformer(32, 16, 1, 2, 16, 32).state_dict()
    del state["encoder.ln.weight"]
    state["extra.bias"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(UserError, match=r"do not fit the network; missing \(1\): encoder\.ln\.weight; "
                                        r"unexpected \(1\): extra\.bias"):
        build_torchvision_vit(TINY_VIT, "tiny_vit", pretrained=True, weights=str(path))
    torch.save(timm.create_model("test_vit").state_dict(), path)
    with pytest.raises(UserError, match=r"encoder 'timm:test_resnet': cannot load weights from .*bad\.pth"):
        build_encoder("timm:test_resnet", pretrained=True, weights=str(path))
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(UserError, match=r"cannot read .*junk\.pth as a state dict"):
        build_torchvision_vit(TINY_VIT, "tiny_vit", pretrained=True, weights=str(tmp_path / "junk.pth"))


# -- errors ---------------------------------------------------------------------------------------

def test_offline_torchvision_weights_say_how_to_supply_them(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(UserError, match=r"encoder 'vit_l16_swag_e2e' .*IMAGENET1K_SWAG_E2E_V1.*"
                                        r"/path/to/vit_l_16_swag-4f3808c9\.pth"):
        build_encoder("vit_l16_swag_e2e", pretrained=True)  # fails before building the network
    with pytest.raises(UserError) as info:
        build_encoder("vit_l16_swag", pretrained=True)
    message = str(info.value)
    assert "\n" not in message
    assert "encoder 'vit_l16_swag' (torchvision:ViT_L_16_Weights.IMAGENET1K_SWAG_LINEAR_V1" in message
    assert "encoder_weights: /path/to/vit_l_16_lc_swag-4d563306.pth" in message
    assert "torch hub cache" in message and "Name or service not known" in message


def test_offline_timm_weights_say_how_to_supply_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args: object, **kwargs: object) -> None:
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr("timm.models._builder.load_state_dict_from_hf", offline)
    with pytest.raises(UserError, match=r"encoder 'timm:test_vit' \(timm:test_vit\.r160_in1k: "
                                        r"LocalEntryNotFoundError.*hf download timm/test_vit\.r160_in1k.*"
                                        r"encoder_weights: /path/to/model\.safetensors.*HF_HUB_OFFLINE=1"):
        build_encoder("timm:test_vit", pretrained=True)


@pytest.mark.parametrize(
    "name, message",
    [
        ("vgg", r"unknown encoder 'vgg'; expected one of vit_l16_swag, vit_l16_swag_e2e, small_cpu, "
                r"flare_seg, or timm:<model>"),
        ("timm:resnet19", r"'resnet19' is not a timm model \(did you mean timm:resnet18"),
        ("timm:test_vit.bogus", r"no weights tagged 'bogus' for test_vit; tags: r160_in1k"),
        ("timm:", r"'' is not a timm model"),
    ],
)
def test_unknown_names_list_the_valid_ones(name: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        check_encoder_name(name)
    with pytest.raises(UserError, match=message):
        build_encoder(name, pretrained=False)


def test_weights_without_pretrained_and_missing_files_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"encoder_weights='w\.pth' is given but encoder_pretrained is false"):
        build_encoder("small_cpu", pretrained=False, weights="w.pth")
    with pytest.raises(UserError, match=r"encoder_weights: .*nowhere\.pth does not exist"):
        build_encoder("timm:test_resnet", pretrained=True, weights=str(tmp_path / "nowhere.pth"))
    with pytest.raises(UserError, match=r"image_size=40 is not a multiple of the patch size 16"):
        build_encoder("vit_l16_swag", pretrained=False, image_size=40)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_moves_to_cuda_and_matches_cpu(small_cpu: PerceptualEncoder) -> None:
    x = batch(2, 64, 64)
    cpu = small_cpu(x)
    gpu = small_cpu.to("cuda")(x.to("cuda"))
    small_cpu.to("cpu")
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-3)
