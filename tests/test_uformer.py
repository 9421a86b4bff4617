"""Tests for cascade.uformer: the released state-dict layout, the reference forward pass, window
helpers, arbitrary input sizes and checkpoint reading/writing with clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cascade.errors import UserError
from cascade.uformer import (
    ARCH_KEYS,
    Uformer,
    _cached_shift_mask,
    infer_arch,
    load_checkpoint,
    read_state_dict,
    relative_position_index,
    save_checkpoint,
    shift_attention_mask,
    window_partition,
    window_reverse,
)

MANIFEST = Path(__file__).parent / "data" / "uformer_flare7kpp_512_state_dict.tsv"
# Small enough for CPU tests; depth 2 in three stages so shifted windows are exercised.
TINY = dict(img_size=64, embed_dim=8, depths=(2, 1, 1, 1, 2, 1, 1, 1, 2), win_size=4)


def deterministic_state(model: Uformer) -> dict[str, torch.Tensor]:
    """Weights that are a fixed function of each tensor's position and shape (no RNG)."""
    state = {}
    for i, (name, t) in enumerate(model.state_dict().items()):
        if name.endswith("relative_position_index"):
            state[name] = t
            continue
        wave = torch.sin(torch.arange(t.numel(), dtype=torch.float64) * 0.37 + i).reshape(t.shape)
        if ".norm" in name:
            state[name] = (wave * 0.3 + (1.0 if name.endswith("weight") else 0.0)).float()
        else:
            fan_in = t[0].numel() if t.ndim > 1 else 4
            state[name] = (wave * 0.5 / math.sqrt(fan_in)).float()
    return state


def wave_image(h: int = 64, w: int = 64) -> torch.Tensor:
    """(1, 3, h, w) smooth test image in [0.1, 0.9]."""
    c, y, x = torch.meshgrid(torch.arange(3.0), torch.arange(float(h)), torch.arange(float(w)),
                             indexing="ij")
    return (0.5 + 0.4 * torch.sin(0.3 * y + 0.2 * x + c))[None]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny() -> Uformer:
    torch.manual_seed(0)
    return Uformer(**TINY).eval()


# -- architecture -------------------------------------------------------------------------------
def test_full_size_state_dict_matches_released_manifest() -> None:
    rows = [line.split("\t") for line in MANIFEST.read_text().splitlines()[1:]]
    expected = [(name, json.loads(shape)) for name, shape in rows]
    model = Uformer(img_size=512, output_ch=6)
    got = [(name, list(t.shape)) for name, t in model.state_dict().items()]
    assert got == expected  # same names, shapes and order
    n_params = sum(p.numel() for p in model.parameters())
    assert round(n_params / 1e6, 2) == 20.47
    assert model.stride == 128
    # A 3-channel variant (deflared image only) differs only in the output projection; the
    # released Flare7K v1 model has 6 channels like Flare7K++ (uformer_flare7k_option.yml:47).
    three = Uformer(img_size=512, output_ch=3).state_dict()
    assert list(three["output_proj.proj.0.weight"].shape) == [3, 64, 3, 3]


def test_arch_round_trips_and_is_json(tiny: Uformer) -> None:
    arch = tiny.arch
    assert tuple(arch) == ARCH_KEYS
    assert json.loads(json.dumps(arch)) == arch
    assert Uformer(**arch).arch == arch
    assert arch["depths"] == list(TINY["depths"]) and arch["drop_path_rate"] == 0.1


def test_forward_matches_reference_values(tiny: Uformer) -> None:
    """Expected numbers come from an independent transcription of Flare7K's uformer_arch.py
    forward pass (square token layout, explicit softmax, slice-built shift masks) run on the same
    deterministic weights; they pin window order, head split, bias indexing and shift masks."""
    model = Uformer(**TINY).eval()
    model.load_state_dict(deterministic_state(model))
    with torch.no_grad():
        out = model(wave_image())
    assert out.shape == (1, 6, 64, 64)
    assert out.mean().item() == pytest.approx(0.4575757682, abs=1e-6)
    assert out.std().item() == pytest.approx(0.0997884199, abs=1e-6)
    ref_10_20 = [0.5488492250, 0.4256476164, 0.5450167656, 0.3542146087, 0.5543113947, 0.3168254495]
    ref_63_0 = [0.5682763457, 0.4167553186, 0.5434205532, 0.3655579388, 0.5316697955, 0.3460154533]
    assert out[0, :, 10, 20].tolist() == pytest.approx(ref_10_20, abs=1e-5)
    assert out[0, :, 63, 0].tolist() == pytest.approx(ref_63_0, abs=1e-5)


def test_shifted_windows_change_the_output() -> None:
    """Guards the test above: without the shift the numbers must differ."""
    model = Uformer(**TINY).eval()
    model.load_state_dict(deterministic_state(model))
    with torch.no_grad():
        base = model(wave_image())
        for stage in ("encoderlayer_0", "conv", "decoderlayer_3"):
            getattr(model, stage).blocks[1].shift = 0
        unshifted = model(wave_image())
    assert (base - unshifted).abs().max() > 1e-4


def test_small_img_size_clamps_windows_like_the_reference() -> None:
    model = Uformer(img_size=32, embed_dim=4, depths=(2,) * 9, win_size=8)
    # levels 0..4 see 32, 16, 8, 4, 2 px: windows 8, 8, 8 (unshifted at 8), 4, 2
    assert [model.encoderlayer_2.blocks[1].shift, model.encoderlayer_1.blocks[1].shift] == [0, 4]
    assert model.encoderlayer_3.win == 4 and model.conv.win == 2
    table = model.state_dict()["conv.blocks.0.attn.relative_position_bias_table"]
    assert table.shape == (9, 16)
    assert infer_arch(model.state_dict())["img_size"] == 32


@pytest.mark.parametrize("size", [(64, 64), (50, 37), (70, 130), (9, 20)])
def test_any_size_is_padded_and_cropped(tiny: Uformer, size: tuple[int, int]) -> None:
    x = wave_image(*size)
    with torch.no_grad():
        out = tiny(x)
    assert out.shape == (1, 6, *size)
    assert 0 < out.min() and out.max() < 1
    if size[0] > 32 and size[1] > 32:  # reflect-padding by hand gives the same pixels
        h, w = size
        padded = F.pad(x, (0, -w % 64, 0, -h % 64), mode="reflect")
        with torch.no_grad():
            assert torch.allclose(tiny(padded)[..., :h, :w], out, atol=1e-6)


def test_batch_elements_are_independent(tiny: Uformer) -> None:
    x = torch.cat([wave_image(), 1 - wave_image()])
    with torch.no_grad():
        both = tiny(x)
        second = tiny(x[1:])
    assert torch.allclose(both[1:], second, atol=1e-6)


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = Uformer(**TINY)
    model(wave_image(32, 32)).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# -- window helpers -------------------------------------------------------------------------------
def test_window_partition_round_trip_and_order() -> None:
    x = torch.arange(2 * 8 * 12 * 3, dtype=torch.float32).reshape(2, 8, 12, 3)
    windows = window_partition(x, 4)
    assert windows.shape == (2, 6, 16, 3)
    assert torch.equal(windows[0, 1, 0], x[0, 0, 4])  # second window starts at column 4
    assert torch.equal(windows[0, 3, 0], x[0, 4, 0])  # fourth window starts a row of windows lower
    assert torch.equal(window_reverse(windows, 4, 8, 12), x)


def test_shift_attention_mask_known_counts() -> None:
    mask = shift_attention_mask(8, 8, 4, 2, torch.device("cpu"))
    assert mask.shape == (4, 16, 16)
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    # windows: top-left one region; top-right and bottom-left two of 8 tokens; bottom-right four
    # of 4 tokens -> masked pairs 0, 16*8, 16*8, 16*12.
    assert (mask == -100).sum(dim=(1, 2)).tolist() == [0, 128, 128, 192]
    assert torch.equal(mask, mask.transpose(1, 2))


def test_masks_cached_under_inference_mode_serve_training() -> None:
    _cached_shift_mask.cache_clear()
    torch.manual_seed(0)
    model = Uformer(**TINY)
    with torch.inference_mode():
        model.eval()(wave_image(32, 32))
    assert _cached_shift_mask.cache_info().currsize > 0
    assert not shift_attention_mask(32, 32, 4, 2, torch.device("cpu")).is_inference()
    model.train()(wave_image(32, 32)).mean().backward()
    assert model.encoderlayer_0.blocks[1].attn.relative_position_bias_table.grad is not None


def test_relative_position_index_layout() -> None:
    idx = relative_position_index(8)
    assert idx.shape == (64, 64)
    assert idx.diagonal().unique().tolist() == [7 * 15 + 7]  # zero offset -> the table's centre
    assert idx.min() == 0 and idx.max() == 15 * 15 - 1
    assert idx[0, 63] == 0 and idx[63, 0] == 15 * 15 - 1  # (-7, -7) and (+7, +7)


def test_bad_constructor_arguments_are_user_errors() -> None:
    with pytest.raises(UserError, match="token_mlp='leff'"):
        Uformer(token_mlp="leff")
    with pytest.raises(UserError, match="9 entries"):
        Uformer(depths=(1, 1))
    with pytest.raises(UserError, match="width of 8 is not divisible by 3 heads"):
        Uformer(embed_dim=8, num_heads=(3,) * 9)


# -- checkpoints ----------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path: Path, tiny: Uformer) -> None:
    path = tmp_path / "ckpt" / "model.pth"
    save_checkpoint(tiny, path)
    assert [p.name for p in path.parent.iterdir()] == ["model.pth"]  # no temporary left behind
    loaded = load_checkpoint(path)
    assert loaded.arch == tiny.arch
    for (k, a), (k2, b) in zip(tiny.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(wave_image(32, 32)), tiny(wave_image(32, 32)))


def test_basicsr_file_with_ema_and_module_prefix_loads(tmp_path: Path, tiny: Uformer) -> None:
    ema = {f"module.{k}": v for k, v in tiny.state_dict().items()}
    plain = {f"module.{k}": torch.zeros_like(v) for k, v in tiny.state_dict().items()}
    torch.save({"params": plain, "params_ema": ema}, tmp_path / "net_g.pth")
    model = load_checkpoint(tmp_path / "net_g.pth", img_size=TINY["img_size"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 tiny.state_dict().values()))
    # the architecture was inferred from the shapes alone
    arch = infer_arch(read_state_dict(tmp_path / "net_g.pth"))
    for key in ("embed_dim", "depths", "num_heads", "win_size", "output_ch", "img_ch"):
        assert arch[key] == tiny.arch[key], key
    assert arch["mlp_ratio"] == 4.0 and arch["qkv_bias"] is True


def test_bare_state_dict_and_params_only(tmp_path: Path, tiny: Uformer) -> None:
    torch.save(tiny.state_dict(), tmp_path / "bare.pth")
    torch.save({"params": tiny.state_dict()}, tmp_path / "params.pth")
    for name in ("bare.pth", "params.pth"):
        state = read_state_dict(tmp_path / name)
        assert list(state) == list(tiny.state_dict())


def test_unreadable_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "notes.pth"
    bad.write_text("not a checkpoint")
    with pytest.raises(UserError, match=r"notes\.pth: not a readable PyTorch checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(UserError, match=r"missing\.pth: no such checkpoint file"):
        load_checkpoint(tmp_path / "missing.pth")
    torch.save({"epoch": 3}, tmp_path / "other.pth")
    with pytest.raises(UserError, match=r"other\.pth: expected a state dict"):
        read_state_dict(tmp_path / "other.pth")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "linear.pth")
    with pytest.raises(UserError, match=r"linear\.pth: not a Flare7K Uformer state dict"):
        load_checkpoint(tmp_path / "linear.pth")


def test_mismatched_weights_list_missing_unexpected_and_shapes(tmp_path: Path, tiny: Uformer) -> None:
    state = dict(tiny.state_dict())
    del state["conv.blocks.0.mlp.fc2.bias"]
    state["conv.blocks.0.extra"] = torch.zeros(1)
    state["decoderlayer_0.blocks.0.norm1.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(UserError) as info:
        load_checkpoint(tmp_path / "broken.pth", img_size=64)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'broken.pth'}: weights do not fit")
    assert "1 missing: conv.blocks.0.mlp.fc2.bias" in message
    assert "1 unexpected: conv.blocks.0.extra" in message
    assert "decoderlayer_0.blocks.0.norm1.weight: file [3] vs model [128]" in message
    with pytest.raises(UserError, match="unknown Uformer argument 'embed'"):
        load_checkpoint(tmp_path / "broken.pth", embed=8)
