"""ECS as the paper describes it (docs/methods.md#ecs): erase the top region, re-run, fuse by max.

Inference only: the region where the current map exceeds ``ecs_delta`` is removed from the input (strong
Gaussian blur, or the ImageNet mean), the base method is re-run on the erased image for the *same* class,
and the two maps are fused by pixel max. The erased pass surfaces the less discriminative parts of the
object that the first pass left dim. ``ecs_rounds`` > 1 repeats this with the grown map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss.config import CamsConfig
from wsss.methods.base import MapMethod, normalise


def _kernel_1d(sigma: float, radius: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    t = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (B,C,H,W) with reflect padding.

    Args:
        images: (B,C,H,W) images (any value range).
        sigma: standard deviation in pixels; <= 0 returns ``images`` unchanged.

    Returns:
        Blurred images, same shape and dtype. The kernel reaches 3 sigma, cut at the image size (reflect
        padding cannot reach further), so a very large sigma tends to a global average.
    """
    if sigma <= 0:
        return images
    # Outside autocast, fp32 and contiguous: a long depthwise kernel in bf16 / channels_last hits a very
    # slow oneDNN path on CPU (measured: minutes instead of 0.05 s for 16x3x112x112).
    with torch.autocast(images.device.type, enabled=False):
        return _blur_fp32(images.float().contiguous(), sigma).to(images.dtype)


def _blur_fp32(x: Tensor, sigma: float) -> Tensor:
    c = x.shape[1]
    radius = math.ceil(3.0 * sigma)
    for dim in (-1, -2):
        r = min(radius, x.shape[dim] - 1)
        if r <= 0:
            continue
        k = _kernel_1d(sigma, r, x.dtype, x.device)
        if dim == -1:
            x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        else:
            x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x


def erase_fill(images: Tensor, cfg: CamsConfig) -> Tensor:
    """What erased pixels are replaced with: the blurred image, or zeros (the ImageNet mean once normalised)."""
    if cfg.ecs_erase == "mean":
        return torch.zeros_like(images)
    if cfg.ecs_erase == "blur":
        return gaussian_blur(images, cfg.ecs_blur_sigma * min(images.shape[-2:]))
    raise ValueError(f"make_cams.ecs_erase = {cfg.ecs_erase!r}; valid: blur, mean")


class ECS(MapMethod):
    """Erase-and-re-run around a base method (``cam`` -> ``ecs``, ``ccam`` -> ``ccam-ecs``).

    Unlike the other methods, :meth:`compute` returns maps that are already max-normalised, because the
    fusion is defined on normalised maps (each pass normalised by its own max, then the pixel max).

    Args:
        base: the method whose maps are erased and fused.
        name: registry name.
    """

    def __init__(self, base: MapMethod, name: str) -> None:
        self.base = base
        self.name = name
        self.needs_model = True
        self.model_kind = base.model_kind

    def resolve_targets(self, model: nn.Module, images: Tensor, targets: Tensor | None) -> Tensor | None:
        """The base method's targets."""
        return self.base.resolve_targets(model, images, targets)

    def raw_map(self, model: nn.Module, x: Tensor, targets: Tensor | None) -> Tensor:
        """The base method's raw map (one pass, no erasing)."""
        return self.base.raw_map(model, x, targets)

    def compute(self, model: nn.Module, images: Tensor, targets: Tensor | None, cfg: CamsConfig) -> Tensor:
        """Fused ECS maps.

        Args:
            model: the base method's model.
            images: (B,3,H,W) normalised images.
            targets: (B,) class per image, or None (predicted / class-agnostic, as the base method does).
            cfg: map settings (``scales``, ``flip``, ``ecs_delta``, ``ecs_erase``, ``ecs_blur_sigma``,
                ``ecs_rounds``).

        Returns:
            (B,H,W) float32 maps, max-normalised (max just under 1; all-zero maps stay zero).
        """
        with torch.inference_mode():
            # Resolve once: the erased image must be scored for the class of the original, not its own argmax.
            targets = self.resolve_targets(model, images, targets)
            fused = normalise(self.base.compute(model, images, targets, cfg))
            fill = erase_fill(images, cfg)
            for _ in range(cfg.ecs_rounds):
                mask = (fused > cfg.ecs_delta)[:, None]
                if not bool(mask.any()):
                    break
                erased = torch.where(mask, fill, images)
                second = normalise(self.base.compute(model, erased, targets, cfg))
                fused = normalise(torch.maximum(fused, second))
        return fused
