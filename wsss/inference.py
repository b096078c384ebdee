"""U-Net inference on images of any size: resize, forward, upsample the logits back, softmax.

Models are loaded with :func:`wsss.models.loading.load_model_dir`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from wsss.data.datasets import normalize


def flip_tta_probs(predict: Callable[[list[np.ndarray]], list[np.ndarray]], images: Sequence[np.ndarray],
                   flip: bool) -> list[np.ndarray]:
    """``predict(images)`` (pet probability per image), averaged with the mirrored images' (mirrored back)."""
    probs = predict(list(images))
    if not flip:
        return probs
    mirrored = predict([np.ascontiguousarray(im[:, ::-1]) for im in images])
    return [((p + m[:, ::-1]) / 2).astype(np.float32) for p, m in zip(probs, mirrored, strict=True)]


def predict_probs(model: torch.nn.Module, images: list[np.ndarray], size: int, prec: Any,
                  flip: bool = False) -> list[np.ndarray]:
    """Pet probability (H, W) float32 for each uint8 RGB image, at the image's own resolution; ``flip``
    averages it with the horizontally mirrored image's (test-time augmentation, twice the cost)."""
    return flip_tta_probs(lambda ims: _probs(model, ims, size, prec), images, flip)


@torch.no_grad()
def _probs(model: torch.nn.Module, images: list[np.ndarray], size: int, prec: Any) -> list[np.ndarray]:
    from wsss.device import autocast, to_device

    batch = torch.stack([
        F.interpolate(normalize(torch.from_numpy(im).permute(2, 0, 1))[None], size=(size, size),
                      mode="bilinear", align_corners=False, antialias=True)[0]
        for im in images
    ])
    with autocast(prec):
        logits = model(to_device(batch, prec)).float()
    out = []
    for im, lg in zip(images, logits, strict=True):
        up = F.interpolate(lg[None], size=im.shape[:2], mode="bilinear", align_corners=False)[0]
        out.append(up.softmax(0)[1].cpu().numpy())
    return out
