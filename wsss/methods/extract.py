"""Map extraction shared by ``make-cams`` (trainval) and ``evaluate --pseudo`` (test): a method's model,
its maps of manifest rows, and the ensemble's fusion of member maps (docs/methods.md#map-inference,
docs/methods.md#ensemble).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch.nn.functional as F
from torch import nn

from wsss.config import Params
from wsss.errors import ConfigError, DataError
from wsss.models.loading import ModelMeta, load_model
from wsss.paths import Paths


def load_method_model(paths: Paths, method: Any, model_name: str) -> tuple[nn.Module, ModelMeta]:
    """The method's model ``models/<model_name>/`` and its meta, checked to be of the kind the method needs.

    Raises:
        ConfigError: the model is of another kind.
        DataError: as :func:`wsss.models.loading.load_model`.
    """
    model, meta = load_model(paths, model_name)
    if method.model_kind and meta.kind != method.model_kind:
        raise ConfigError(
            f"method '{method.name}' needs a {method.model_kind} model; models/{model_name} is a {meta.kind}"
        )
    return model, meta


def compute_maps(params: Params, paths: Paths, method: Any, model: nn.Module, meta: ModelMeta,
                 rows: pd.DataFrame, prec: Any, progress: Callable[[int], None] | None = None,
                 ) -> Iterator[tuple[str, np.ndarray, int, float]]:
    """Maps of ``rows`` (manifest rows) with a prepared model: ``(id, map, target, raw peak)`` per image.

    The map is max-normalised, resized to the prepared image size and clipped to [0, 1]; the raw peak is
    the max of the method's multi-scale map before that normalisation. A classifier's target is the image's
    own label in the model's label space (image-level labels only).
    """
    from wsss.data.datasets import InferenceDataset, image_label
    from wsss.data.loaders import loader
    from wsss.device import autocast, compile_model, to_device

    compile_model(model, params.base.compile, inference=True)
    cfg = params.make_cams
    rows = rows.reset_index(drop=True)
    targets = None
    if meta.kind == "classifier":
        targets = [image_label(r, str(meta.labels), meta.bg) for _, r in rows.iterrows()]
    ds = InferenceDataset(rows, paths.prepared, meta.input_size, targets)
    for batch in loader(ds, cfg.batch_size, params, shuffle=False):
        x = to_device(batch["image"], prec)
        t = batch["target"].to(prec.device) if targets is not None else None
        with autocast(prec):
            raw = method.compute(model, x, t, cfg).float()
        peak = raw.flatten(1).amax(1)
        norm = raw / (peak.view(-1, 1, 1) + 1e-5)
        for j in range(len(x)):
            h, w = (int(v) for v in batch["size"][j])
            resized = F.interpolate(norm[j][None, None], size=(h, w), mode="bilinear", align_corners=False)
            yield (batch["id"][j], resized[0, 0].clamp(0, 1).cpu().numpy(), int(batch["target"][j]),
                   float(peak[j]))
        if progress is not None:
            progress(len(x))


def fuse_members(members: Sequence[Mapping[str, np.ndarray]], image_id: str, weights: Sequence[float],
                 fusion: str, sources: Sequence[str | Path]) -> np.ndarray:
    """The ensemble map of one image: its member maps fused (:func:`wsss.methods.ensemble.fuse`), float32.

    Args:
        members: per member, ``{image id: map}``.
        image_id: the image.
        weights: one weight per member.
        fusion: ``make_cams.ensemble_fusion``.
        sources: where each member's maps come from (named when one lacks the image).

    Raises:
        DataError: a member has no map of the image.
    """
    from wsss.methods.ensemble import fuse

    parts = []
    for source, member in zip(sources, members, strict=True):
        if image_id not in member:
            raise DataError(f"{source}: no map for image {image_id}")
        parts.append(member[image_id])
    return np.asarray(fuse(parts, weights, fusion), dtype=np.float32)  # type: ignore[arg-type]
