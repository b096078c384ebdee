"""U-Net inference on images of any size: resize, forward, upsample the logits back, argmax."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from wsss.data.datasets import normalize


def load_unet(model_dir: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a U-Net from ``models/unet-*/`` (state_dict + meta.json), eval mode, CPU."""
    from wsss.config import UnetConfig
    from wsss.errors import DataError, WsssError
    from wsss.models.unet import build_unet
    from wsss.training.checkpoint import load_model_state, load_weights, require_meta

    state, meta = load_model_state(model_dir, {"kind": "unet"})
    require_meta(meta, ("architecture", "encoder", "input_size"), model_dir)
    try:
        cfg = UnetConfig(architecture=meta["architecture"], encoder=meta["encoder"], encoder_weights="none",
                         input_size=int(meta["input_size"]), plain_filters=tuple(
                             int(f) for f in meta.get("plain_filters", ())) or UnetConfig().plain_filters)
        classes = int(meta.get("num_classes", 2))
        if cfg.architecture not in ("smp", "plain"):
            raise ValueError(f"architecture {cfg.architecture!r}")
        model = build_unet(cfg, num_classes=classes)
    except (WsssError, TypeError, ValueError) as exc:
        raise DataError(f"{model_dir}/meta.json does not describe a U-Net wsss can build ({exc}); "
                        "retrain the model") from None
    described = f"{cfg.architecture} U-Net, encoder {cfg.encoder}, filters {list(cfg.plain_filters)}, {classes} classes"
    load_weights(model, state, model_dir, described)
    return model.eval(), meta


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
