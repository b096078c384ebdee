"""U-Net inference on images of any size: resize, forward, upsample the logits back, softmax.

Models are loaded with :func:`wsss.models.loading.load_model_dir`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from wsss.data.datasets import normalize


@torch.no_grad()
def predict_probs(model: torch.nn.Module, images: list[np.ndarray], size: int, prec: Any) -> list[np.ndarray]:
    """Pet probability (H, W) float32 for each uint8 RGB image, at the image's own resolution."""
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
