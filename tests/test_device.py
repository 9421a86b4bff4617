"""cascade.device: device names and bf16, with a UserError for what cannot run here."""

from __future__ import annotations

import pytest
import torch

from cascade.config import TrialConfig
from cascade.device import resolve_device, use_bf16
from cascade.errors import UserError


def test_resolve_device_names() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match=r"^device 'gpu7' is not a torch device \(try cpu, cuda or auto\)$"):
        resolve_device("gpu7")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_user_error() -> None:
    for name in ("cuda", "cuda:1"):
        with pytest.raises(UserError, match=rf"^device '{name}': no CUDA device is available"):
            resolve_device(name)


def test_bf16_only_when_asked_for_and_on_cuda() -> None:
    bf16, fp32 = TrialConfig(precision="bf16"), TrialConfig()
    assert use_bf16(bf16, torch.device("cuda")) and not use_bf16(bf16, torch.device("cpu"))
    assert not use_bf16(fp32, torch.device("cuda"))
