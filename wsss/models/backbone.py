"""torchvision ResNets at output stride 16 (layer4 stride 1, no dilation), as in CCAM/IRN/the paper."""

from __future__ import annotations

import socket
import urllib.error
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn

from wsss.config import ARCHS
from wsss.errors import ConfigError, DataError, MissingDependencyError
from wsss.training.checkpoint import load_failure

# Prefixes a saved backbone state_dict may carry (wrapping modules, DataParallel, smp encoders).
_PREFIXES = ("module.", "backbone.", "encoder.", "net.")


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ConfigError(f"unknown backbone arch {arch!r}; valid: {', '.join(ARCHS)}")


def imagenet_cache_file(arch: str) -> Path:
    """Where torchvision's weights API caches the ImageNet (IMAGENET1K_V1) checkpoint of ``arch``.

    Follows ``TORCH_HOME`` (``torch.hub.get_dir()``), read at call time.
    """
    _check_arch(arch)
    url = torchvision.models.get_model_weights(arch).IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def _can_reach(url: str, timeout: float = 3.0) -> bool:
    """Cheap connectivity probe so an offline machine fails in milliseconds, not after a long timeout."""
    host = urlparse(url).hostname or ""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _missing_weights_error(arch: str, reason: str = "") -> MissingDependencyError:
    cache = Path(torch.hub.get_dir())
    file = imagenet_cache_file(arch)
    why = f" ({reason})" if reason else ""
    return MissingDependencyError(
        f"ImageNet weights for {arch} were not found in {cache}{why}; download them on a connected machine "
        f"with `python -c \"import torchvision; torchvision.models.{arch}(weights='IMAGENET1K_V1')\"` and copy "
        f"`<cache>/checkpoints/{file.name}` over (here: {file}), or set TORCH_HOME to a folder whose "
        f"hub/checkpoints/ holds it, or use `weights: none`."
    )


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Load a ResNet state_dict file safely; drop ``fc.*`` and a common wrapper prefix.

    Args:
        path: a ``.pt``/``.pth`` file holding a state_dict (optionally under a ``state_dict`` key).

    Returns:
        The state_dict with torchvision ResNet key names (no ``fc`` keys).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"backbone weights file not found: {path}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupted or not a tensor file
        raise DataError(f"cannot read backbone weights {path}: {load_failure(exc)}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise DataError(f"{path} does not hold a state_dict")
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


def load_torchvision_resnet(arch: str, weights: str) -> torchvision.models.ResNet:
    """Build a torchvision ResNet (stride 32, with its ``fc``) and load weights.

    Args:
        arch: one of ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``.
        weights: ``"imagenet"`` (torchvision's IMAGENET1K_V1 through its weights API, so ``TORCH_HOME`` and
            the usual cache work), ``"none"`` (random init) or a path to a state_dict file (``fc`` is
            ignored and stays randomly initialised).

    Raises:
        ConfigError: unknown arch or weights value.
        MissingDependencyError: ImageNet weights are neither cached nor downloadable.
    """
    _check_arch(arch)
    ctor = getattr(torchvision.models, arch)
    if weights == "none":
        return ctor(weights=None)
    if weights == "imagenet":
        enum = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
        if not imagenet_cache_file(arch).is_file() and not _can_reach(enum.url):
            raise _missing_weights_error(arch, "no cached file and the download host is unreachable")
        try:
            return ctor(weights=enum)
        except (urllib.error.URLError, OSError) as exc:
            raise _missing_weights_error(arch, f"download failed: {exc}") from None
    path = Path(weights)
    if not path.suffix and not path.exists():
        raise ConfigError(f"backbone weights {weights!r}: expected 'imagenet', 'none' or a state_dict path")
    model = ctor(weights=None)
    sd = read_state_dict(path)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise DataError(
            f"{path} does not match {arch}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    return model


def make_output_stride_16(model: torchvision.models.ResNet) -> torchvision.models.ResNet:
    """Set layer4's stride to 1 in place (no dilation), giving output stride 16."""
    block = model.layer4[0]
    # Bottleneck strides its 3x3 conv2, BasicBlock its conv1; both stride the 1x1 downsample conv.
    strided = block.conv2 if isinstance(block, torchvision.models.resnet.Bottleneck) else block.conv1
    strided.stride = (1, 1)
    if block.downsample is not None:
        block.downsample[0].stride = (1, 1)
    return model


class Backbone(nn.Module):
    """ResNet trunk at output stride 16 returning (layer3, layer4) features.

    Module names equal torchvision's (``conv1``, ``layer1``...), so its state_dict is a torchvision ResNet
    state_dict without ``fc``, loadable into smp's ResNet encoders.

    Args:
        arch: ``resnet18`` | ``resnet34`` | ``resnet50`` | ``resnet101``.
        weights: ``"imagenet"`` | ``"none"`` | a state_dict path (see :func:`load_torchvision_resnet`).
    """

    def __init__(self, arch: str = "resnet50", weights: str = "none") -> None:
        super().__init__()
        self._init_from(load_torchvision_resnet(arch, weights), arch)

    @classmethod
    def from_torchvision(cls, model: torchvision.models.ResNet, arch: str = "") -> Backbone:
        """Wrap an existing torchvision ResNet (its modules are shared, and layer4 is made stride 1)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._init_from(model, arch or "resnet")
        return self

    def _init_from(self, model: torchvision.models.ResNet, arch: str) -> None:
        make_output_stride_16(model)
        self.arch = arch
        self.conv1, self.bn1, self.relu, self.maxpool = model.conv1, model.bn1, model.relu, model.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = model.layer1, model.layer2, model.layer3, model.layer4
        last = self.layer4[-1]
        c4 = (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels
        self.out_channels: tuple[int, int] = (c4 // 2, c4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return (layer3, layer4) features, both at stride 16."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x3 = self.layer3(self.layer2(self.layer1(x)))
        return x3, self.layer4(x3)
