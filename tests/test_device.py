"""Device resolution, precision choice, autocast and seeding."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from wsss import device as dev
from wsss.errors import ConfigError


def test_resolve_device_cpu_and_auto() -> None:
    assert dev.resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert dev.resolve_device("auto").type == expected


def test_resolve_device_cuda_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        dev.resolve_device("cuda")
    with pytest.raises(ConfigError, match="cuda:1"):
        dev.resolve_device("cuda:1")
    assert dev.resolve_device("auto") == torch.device("cpu")


def test_resolve_device_bad_index(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="only 1 CUDA device"):
        dev.resolve_device("cuda:3")


@pytest.mark.parametrize("spec", ["gpu", "tpu:0", "cpu:x"])
def test_resolve_device_malformed(spec: str) -> None:
    with pytest.raises(ConfigError):
        dev.resolve_device(spec)


@pytest.mark.parametrize("supported", [True, False])
def test_precision_on_cpu_follows_bf16_support(monkeypatch: pytest.MonkeyPatch, supported: bool) -> None:
    monkeypatch.setattr(dev, "cpu_supports_bf16", lambda: supported)
    p = dev.precision_for(torch.device("cpu"))
    assert p.autocast_dtype == (torch.bfloat16 if supported else None)
    assert p.channels_last is supported
    assert not p.use_grad_scaler
    assert dev.grad_scaler(p) is None


@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled")  # no CUDA here
@pytest.mark.parametrize(("bf16", "expected"), [(True, (torch.bfloat16, True, False)),
                                                 (False, (torch.float16, True, True))])
def test_precision_cuda_follows_bf16_support(monkeypatch: pytest.MonkeyPatch, bf16: bool, expected: tuple) -> None:
    asked: list[bool] = []

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return bf16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    p = dev.precision_for(torch.device("cuda"))
    assert (p.autocast_dtype, p.channels_last, p.use_grad_scaler) == expected
    assert asked == [False]  # emulated bf16 (pre-Ampere) is slower than fp16: it does not count
    assert (dev.grad_scaler(p) is not None) is (not bf16)
    off = dev.precision_for(torch.device("cuda"), enabled=False)
    assert (off.autocast_dtype, off.channels_last, off.use_grad_scaler) == (None, False, False)


def test_cpu_supports_bf16_is_cached_bool() -> None:
    assert isinstance(dev.cpu_supports_bf16(), bool)
    assert dev.cpu_supports_bf16() is dev.cpu_supports_bf16()


def test_wsss_cpu_bf16_0_keeps_the_cpu_in_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dev, "cpu_supports_bf16", lambda: True)
    monkeypatch.setenv(dev.CPU_BF16_ENV, "0")
    assert dev.precision_for(torch.device("cpu")).autocast_dtype is None
    monkeypatch.setenv(dev.CPU_BF16_ENV, "1")
    assert dev.precision_for(torch.device("cpu")).autocast_dtype == torch.bfloat16


@pytest.mark.parametrize("bf16", [True, False])
def test_autocast_runs_a_conv(monkeypatch: pytest.MonkeyPatch, bf16: bool) -> None:
    monkeypatch.setattr(dev, "cpu_supports_bf16", lambda: bf16)
    p = dev.precision_for(torch.device("cpu"))
    model = dev.prepare_model(nn.Conv2d(3, 4, 3, padding=1), p)
    x = dev.to_device(torch.rand(2, 3, 8, 8), p)
    if p.channels_last:
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert model.weight.is_contiguous(memory_format=torch.channels_last)
    with dev.autocast(p):
        y = model(x)
    assert y.shape == (2, 4, 8, 8)
    assert y.dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert torch.isfinite(y.float()).all()


def test_to_device_leaves_non_4d_alone() -> None:
    p = dev.Precision(torch.device("cpu"), torch.bfloat16, channels_last=True, use_grad_scaler=False)
    assert dev.to_device(torch.arange(5), p).tolist() == list(range(5))


def test_seed_everything_reproducible() -> None:
    def draw() -> tuple:
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    dev.seed_everything(123)
    a = draw()
    dev.seed_everything(123)
    assert draw() == a
    dev.seed_everything(124)
    assert draw() != a


class _WithTrunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x).mean(dim=(2, 3)))


def test_compile_model_off_leaves_the_model_alone() -> None:
    model = _WithTrunk()
    assert dev.compile_model(model, enabled=False) is model
    assert model.backbone._compiled_call_impl is None


@pytest.mark.slow  # inductor builds C++ kernels: ~12 s of CPU for both cases
@pytest.mark.parametrize("inference", [False, True])
def test_compile_model_compiles_the_trunk_in_place(inference: bool) -> None:
    torch.manual_seed(0)
    model = _WithTrunk().eval()
    x = torch.rand(2, 3, 8, 8)
    keys = list(model.state_dict())
    with torch.inference_mode():
        eager = model(x)
    assert dev.compile_model(model, enabled=True, inference=inference) is model
    compiled_call = model.backbone._compiled_call_impl
    assert compiled_call is not None and model._compiled_call_impl is None  # the trunk, not the head
    dev.compile_model(model, enabled=True, inference=inference)
    assert model.backbone._compiled_call_impl is compiled_call  # a second call does nothing
    assert list(model.state_dict()) == keys  # checkpoints and saved models keep their keys
    with torch.inference_mode():
        torch.testing.assert_close(model(x), eager)
