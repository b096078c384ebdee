"""Device selection, mixed precision and seeding, so every training and inference stage behaves alike.

A GPU with native bfloat16 (Ampere, Hopper and later) runs bf16 autocast, which has fp32's exponent range and
so needs no ``GradScaler``; an older GPU runs fp16 autocast with a ``GradScaler``; a CPU with native bfloat16
(AVX512-BF16 or AMX) runs bf16 autocast; anything else runs plain fp32. Convolutional models use channels-last memory whenever autocast
is on, which is what the fast oneDNN / cuDNN kernels expect.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from wsss.errors import ConfigError

if TYPE_CHECKING:
    from wsss.config import Params

# CPU flags that mean bfloat16 matmuls run natively; without them oneDNN emulates bf16 and is slower than fp32.
_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn a device spec from params or the CLI into a ``torch.device``.

    Args:
        spec: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        ConfigError: the spec is malformed, or asks for a CUDA device that this machine lacks.
    """
    spec = str(spec).strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"device {spec!r} is not valid; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {spec!r} was requested but CUDA is not available (torch {torch.__version__}, "
                f"built for CUDA {torch.version.cuda or 'none'}); use device 'cpu' or 'auto'"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device {spec!r} was requested but only {count} CUDA device(s) exist")
    elif device.type != "cpu":
        raise ConfigError(f"device {spec!r} is not supported; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return device


@functools.cache
def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX) and torch's oneDNN can use it."""
    if not torch.backends.mkldnn.is_available():
        return False
    if not sys.platform.startswith("linux"):
        # No cheap, reliable flag source elsewhere; fp32 is the safe choice.
        return False
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool(_BF16_FLAGS & set(line.partition(":")[2].split()))
    return False


def cuda_supports_bf16(device: torch.device) -> bool:
    """Whether the GPU ``device`` computes bfloat16 natively (compute capability 8.0+, or ROCm).

    Emulated bf16 (older GPUs) does not count: it is slower than fp16 there.
    """
    if device.index is None:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


@dataclass(frozen=True)
class Precision:
    """How tensors and models are placed and which autocast dtype (if any) is used."""

    device: torch.device
    autocast_dtype: torch.dtype | None
    channels_last: bool
    use_grad_scaler: bool


# ``WSSS_CPU_BF16=0`` keeps the CPU in fp32 even where it has bf16 units: bf16 rounding depends on the batch
# shape, so comparisons across batch splits (1 process vs N data-parallel ranks) are exact only in fp32.
CPU_BF16_ENV = "WSSS_CPU_BF16"


def precision_for(device: torch.device, enabled: bool = True) -> Precision:
    """Pick the mixed-precision settings for ``device`` (on the CPU, fp32 when ``WSSS_CPU_BF16=0``).

    Args:
        device: where the model runs.
        enabled: ``False`` forces plain fp32 (useful to debug numerical problems).
    """
    # bf16 has fp32's exponent range, so no loss scaling is needed; fp16 underflows without it.
    if enabled and device.type == "cuda":
        if cuda_supports_bf16(device):
            return Precision(device, torch.bfloat16, channels_last=True, use_grad_scaler=False)
        return Precision(device, torch.float16, channels_last=True, use_grad_scaler=True)
    if enabled and device.type == "cpu" and cpu_supports_bf16() and os.environ.get(CPU_BF16_ENV, "1") != "0":
        return Precision(device, torch.bfloat16, channels_last=True, use_grad_scaler=False)
    return Precision(device, None, channels_last=False, use_grad_scaler=False)


def precision_from(spec: str | None, params: Params | None = None, enabled: bool = True) -> Precision:
    """:func:`precision_for` the device a stage runs on: ``spec`` (the CLI's ``--device``) or, when it is
    ``None``, ``params.base.device`` (``auto`` without params).

    Raises:
        ConfigError: the device spec is invalid or names a device this machine lacks.
    """
    default = params.base.device if params is not None else "auto"
    return precision_for(resolve_device(spec or default), enabled)


def autocast(p: Precision) -> contextlib.AbstractContextManager:
    """An autocast context for ``p`` (a no-op context when ``p`` is fp32)."""
    if p.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=p.device.type, dtype=p.autocast_dtype)


def grad_scaler(p: Precision) -> torch.amp.GradScaler | None:
    """A ``GradScaler`` when ``p`` needs one (fp16 on CUDA), else ``None`` (step the optimiser directly)."""
    return torch.amp.GradScaler(p.device.type) if p.use_grad_scaler else None


def prepare_model(model: nn.Module, p: Precision) -> nn.Module:
    """Move ``model`` to ``p.device`` (channels-last when ``p.channels_last``); returns the same module."""
    if p.channels_last:
        return model.to(device=p.device, memory_format=torch.channels_last)
    return model.to(device=p.device)


def to_device(x: Tensor, p: Precision) -> Tensor:
    """Move a batch to ``p.device``; 4-D tensors become channels-last when ``p.channels_last``."""
    if p.channels_last and x.dim() == 4:
        return x.to(device=p.device, non_blocking=True, memory_format=torch.channels_last)
    return x.to(device=p.device, non_blocking=True)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and all CUDA devices) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def compile_model(model: nn.Module, enabled: bool, inference: bool = False) -> nn.Module:
    """``torch.compile`` ``model`` in place when ``enabled`` (``base.compile``); returns the same module.

    The trunk (``model.backbone`` where there is one, else the whole model) is compiled through
    :meth:`nn.Module.compile`, so the module keeps its class, its methods (``cam``, ``forward_maps``) and
    its ``state_dict`` keys: checkpoints and saved models are the same as without compiling. Calling it
    again on a compiled module does nothing.

    Args:
        model: a prepared model (:func:`prepare_model`).
        enabled: ``params.base.compile``.
        inference: the weights stay fixed (map extraction): inductor may then fold them into the graph
            ("freezing"), which lets oneDNN pre-pack the convolution weights.
    """
    if not enabled:
        return model
    trunk = model.backbone if isinstance(getattr(model, "backbone", None), nn.Module) else model
    if getattr(trunk, "_compiled_call_impl", None) is None:
        trunk.compile(options={"freezing": True} if inference else None)
    return model
