"""Segmenters trained on pseudo-masks: smp's U-Net (ResNet encoder) or the paper's plain U-Net."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss.config import UnetConfig
from wsss.errors import ConfigError, DataError, MissingDependencyError
from wsss.models.backbone import load_torchvision_resnet, read_state_dict
from wsss.variants import WeightSpec


def _pad_to_multiple(x: Tensor, multiple: int) -> tuple[Tensor, int, int]:
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x, h, w


class PadCrop(nn.Module):
    """Run ``net`` on the input padded (bottom/right, replicate) to a multiple of ``multiple``; crop back."""

    def __init__(self, net: nn.Module, multiple: int) -> None:
        super().__init__()
        self.net = net
        self.multiple = multiple

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, K, H, W) at the input size."""
        x, h, w = _pad_to_multiple(x, self.multiple)
        return self.net(x)[..., :h, :w]


class DoubleConv(nn.Sequential):
    """[Conv3x3 (bias) -> BN -> ReLU] x 2."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class PlainUNet(nn.Module):
    """The paper's U-Net (docs/methods.md#u-net), trained from scratch.

    ``len(filters) - 1`` max-pool downsamplings, a middle DoubleConv without pooling, ConvTranspose(k2,s2)
    upsampling with skip concatenation and a 1x1 output conv. Inputs of any size are padded to a multiple of
    ``2**(len(filters)-1)`` and the output cropped back.

    Args:
        in_channels: input channels.
        num_classes: output channels (logits).
        filters: channels per level, e.g. (32, 64, 128, 256).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 2, filters: Sequence[int] = (32, 64, 128, 256)):
        super().__init__()
        filters = tuple(filters)
        if len(filters) < 2:
            raise ConfigError(f"train_unet.plain_filters needs at least 2 levels, got {filters}")
        self.multiple = 2 ** (len(filters) - 1)
        self.inc = DoubleConv(in_channels, filters[0])
        self.down = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), DoubleConv(a, b)) for a, b in zip(filters[:-1], filters[1:], strict=True)
        )
        self.middle = DoubleConv(filters[-1], filters[-1])
        rev = filters[::-1]
        self.up = nn.ModuleList(nn.ConvTranspose2d(a, b, 2, stride=2) for a, b in zip(rev[:-1], rev[1:], strict=True))
        self.dec = nn.ModuleList(DoubleConv(2 * b, b) for b in rev[1:])
        self.out = nn.Conv2d(filters[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, num_classes, H, W)."""
        x, h, w = _pad_to_multiple(x, self.multiple)
        skips = [self.inc(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        y = self.middle(skips.pop())
        for up, dec in zip(self.up, self.dec, strict=True):
            y = dec(torch.cat([up(y), skips.pop()], dim=1))
        return self.out(y)[..., :h, :w]


def build_unet(cfg: UnetConfig, num_classes: int = 2, weights_path: str | Path | None = None) -> nn.Module:
    """Build the segmenter of ``train_unet``.

    ``architecture: smp`` builds ``segmentation_models_pytorch.Unet`` (never downloading through smp's hub);
    ``encoder_weights: imagenet`` loads torchvision's ImageNet ResNet into the encoder, ``pretrain:<name>`` or
    a ``.pt``/``.pth`` file loads the state_dict at ``weights_path`` (resolved by the caller). ``architecture: plain`` builds
    :class:`PlainUNet` from scratch. Both accept any input size (padded and cropped).

    Args:
        cfg: the ``train_unet`` section.
        num_classes: output channels.
        weights_path: encoder state_dict file for ``pretrain:<name>`` / a file.

    Raises:
        ConfigError: unsupported encoder/weights combination.
        DataError: the ``pretrain`` weights file is missing or does not fit the encoder.
        MissingDependencyError: ImageNet weights unavailable.
    """
    w = cfg.encoder_weights
    if cfg.architecture == "plain":
        if w != "none":
            raise ConfigError(f"train_unet.encoder_weights = {w!r}: the plain U-Net is trained from scratch; use none")
        return PlainUNet(3, num_classes, cfg.plain_filters)

    try:
        import segmentation_models_pytorch as smp
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise MissingDependencyError(f"segmentation-models-pytorch is not installed: {exc}") from None
    try:
        model = smp.Unet(encoder_name=cfg.encoder, encoder_weights=None, classes=num_classes)
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"train_unet.encoder = {cfg.encoder!r} is not an smp encoder: {exc}") from None

    try:
        spec = WeightSpec.parse(w)
    except ConfigError as exc:
        raise ConfigError(f"train_unet.encoder_weights: {exc}") from None
    if spec.kind != "none":
        if not cfg.encoder.startswith("resnet"):
            raise ConfigError(
                f"train_unet.encoder_weights = {w!r} needs a torchvision ResNet encoder, got {cfg.encoder!r}"
            )
        if w == "imagenet":
            sd = load_torchvision_resnet(cfg.encoder, "imagenet").state_dict()
            sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
        else:
            if weights_path is None:
                raise ConfigError(f"train_unet.encoder_weights = {w!r} needs the pretrained weights file")
            sd = read_state_dict(weights_path)
        try:
            model.encoder.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            raise DataError(f"encoder weights do not fit {cfg.encoder}: {exc}") from None
    return PadCrop(model, 32)
