"""The template every map method follows: multi-scale + flip inference, upsampling, normalisation.

A subclass supplies only :meth:`MapMethod.raw_map` (one forward pass at one scale); :meth:`MapMethod.compute`
does the rest the same way for every method (IRN / official CCAM inference convention, docs/methods.md#map-inference).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss.config import CamsConfig

ModelKind = Literal["classifier", "ccam"]


def normalise(maps: Tensor, eps: float = 1e-5) -> Tensor:
    """Divide each map by its own max + ``eps``.

    Args:
        maps: (..., H, W) non-negative maps; every leading index is a separate map.
        eps: keeps all-zero maps at zero instead of NaN.

    Returns:
        Maps of the same shape, each with max just under 1 (all-zero maps stay zero).
    """
    peak = maps.amax(dim=(-2, -1), keepdim=True)
    return maps / (peak + eps)


def resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize of (B,C,H,W) to ``size`` (align_corners=False); identity when the size matches."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class MapMethod:
    """A foreground-map method backed by a model.

    Attributes:
        name: registry name.
        needs_model: whether ``make-cams`` must load a model for it.
        model_kind: the kind of model it needs (``classifier`` | ``ccam``).
    """

    name: str = ""
    needs_model: bool = True
    model_kind: ModelKind | None = None

    def raw_map(self, model: nn.Module, x: Tensor, targets: Tensor | None) -> Tensor:
        """One forward pass: raw (pre-ReLU) maps (B,h,w) for a batch ``x`` at one scale.

        Args:
            model: the method's model.
            x: (B,3,H',W') normalised images.
            targets: (B,) class per image (already resolved by :meth:`resolve_targets`), or None.
        """
        raise NotImplementedError

    def resolve_targets(self, model: nn.Module, images: Tensor, targets: Tensor | None) -> Tensor | None:
        """The class each map is computed for; class-agnostic methods return ``targets`` unchanged."""
        return targets

    def compute(self, model: nn.Module, images: Tensor, targets: Tensor | None, cfg: CamsConfig) -> Tensor:
        """Multi-scale (+ flip) maps summed at the input resolution.

        For each scale in ``cfg.scales`` the batch is resized (and, with ``cfg.flip``, run together with its
        horizontal flip in one forward), ReLU'd, un-flipped, upsampled to the input size and summed.

        Args:
            model: the method's model (eval mode is the caller's business).
            images: (B,3,H,W) normalised images.
            targets: (B,) class per image, or None (class-agnostic, or predicted when the method needs one).
            cfg: map-extraction settings (``scales``, ``flip``).

        Returns:
            (B,H,W) float32 raw maps (>= 0, not normalised).
        """
        b, _, h, w = images.shape
        with torch.inference_mode():
            targets = self.resolve_targets(model, images, targets)
            total = images.new_zeros((b, h, w), dtype=torch.float32)
            for scale in cfg.scales:
                size = (max(1, round(h * scale)), max(1, round(w * scale)))
                x = resize(images, size)
                t = targets
                if cfg.flip:
                    x = torch.cat([x, x.flip(-1)])
                    t = None if targets is None else torch.cat([targets, targets])
                # Autocast may hand back bf16/fp16; accumulate in float32.
                maps = F.relu(self.raw_map(model, x, t).float())
                if cfg.flip:
                    maps = maps[:b] + maps[b:].flip(-1)
                total += resize(maps[:, None], (h, w))[:, 0]
        return total
