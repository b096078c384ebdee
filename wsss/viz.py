"""Pictures of masks and maps: mask colours, overlay rows and grids, and the fixed set of overlay images.

Everything here works on HWC ``uint8`` RGB arrays (or normalised CHW tensors, turned into them) and returns
``uint8`` arrays, ready for :func:`wsss.tracking.log_image` or a PNG.
"""

from __future__ import annotations

import numpy as np
import torch

from wsss.data.datasets import denormalize_uint8
from wsss.evaluation import IGNORE

# Images in every per-epoch overlay grid of a training stage: the same ones each epoch, so the grids compare.
N_OVERLAYS = 8
TINT = np.array([255, 64, 160], dtype=np.float32)
TINT_ALPHA = 0.5


def overlay_ids(n: int, spread: bool = False) -> list[int]:
    """Indices of the fixed overlay images among ``n`` items.

    Args:
        n: how many items there are to choose from.
        spread: ``False`` takes the first :data:`N_OVERLAYS` (a sorted validation set);
            ``True`` takes :data:`N_OVERLAYS` evenly spaced over all ``n`` (first and last included).
    """
    k = min(N_OVERLAYS, n)
    if not spread:
        return list(range(k))
    return [int(i) for i in np.linspace(0, n - 1, num=k).round().astype(int)]


def colorize(mask: np.ndarray) -> np.ndarray:
    """0 -> black, 1 -> white, 255 (ignore) -> grey."""
    out = np.zeros((*mask.shape, 3), np.uint8)
    out[mask == 1] = 255
    out[mask == IGNORE] = 128
    return out


def overlay_row(image: np.ndarray, train_mask: np.ndarray, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """image | training mask | prediction | GT, side by side."""
    return np.concatenate([image, colorize(train_mask), colorize(pred.astype(np.uint8)), colorize(gt)], axis=1)


def heat_grid(images: torch.Tensor, maps: torch.Tensor) -> np.ndarray:
    """A row per image: the (normalised CHW) image and a red heat overlay of its [0, 1] map (HW)."""
    rows = []
    for img, m in zip(images, maps, strict=True):
        rgb = denormalize_uint8(img).astype(np.float32)
        heat = np.zeros_like(rgb)
        heat[..., 0] = 255.0 * m.numpy()
        rows.append(np.concatenate([rgb, 0.5 * rgb + 0.5 * heat], axis=1))
    return np.concatenate(rows, axis=0).clip(0, 255).astype(np.uint8)


def tint(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with pet pixels (``mask`` true) blended towards a tint colour."""
    out = image.astype(np.float32)
    pet = mask.astype(bool)
    out[pet] = (1 - TINT_ALPHA) * out[pet] + TINT_ALPHA * TINT
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
