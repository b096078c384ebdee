"""Ensemble of stored maps (docs/methods.md#ensemble): weighted mean, pixel max or weighted geometric mean.

Members are max-normalised maps of the same image from different methods (e.g. CAM, ECS, CCAM). The paper
claims an ensemble but its code has none; these fusions are our spec. Mean is the default; max is a union
(higher recall); the geometric mean an intersection (higher precision).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, TypeVar

import numpy as np
import torch
from torch import Tensor

Map = TypeVar("Map", np.ndarray, Tensor)
Fusion = Literal["mean", "max", "geomean"]
FUSIONS: tuple[str, ...] = ("mean", "max", "geomean")


def _check(maps: Sequence[np.ndarray | Tensor], weights: Sequence[float] | None, fusion: str) -> list[float]:
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; valid: {', '.join(FUSIONS)}")
    if len(maps) == 0:
        raise ValueError("ensemble needs at least one map")
    if weights is None:
        weights = [1.0] * len(maps)
    weights = [float(w) for w in weights]
    if len(weights) != len(maps):
        raise ValueError(f"ensemble got {len(maps)} maps but {len(weights)} weights; give one weight per map")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"ensemble weights must be finite and non-negative, got {weights}")
    if sum(weights) <= 0:
        raise ValueError(f"ensemble weights must not all be zero, got {weights}")
    shapes = [tuple(m.shape) for m in maps]
    if len(shapes[0]) != 2:
        raise ValueError(f"ensemble maps must be 2-D (H, W), got shape {shapes[0]}")
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f"ensemble maps must have equal shapes, got {shapes}")
    total = sum(weights)
    return [w / total for w in weights]


def fuse(maps: Sequence[Map], weights: Sequence[float] | None = None, fusion: Fusion = "mean",
         eps: float = 1e-6) -> Map:
    """Fuse max-normalised maps of one image into one map, re-normalised by its max.

    Args:
        maps: K maps (H,W), each max-normalised to [0, 1]; NumPy arrays or tensors (the type of the first
            is returned).
        weights: K non-negative weights, not all zero (normalised to sum 1); None = equal.
        fusion: ``mean`` (weighted mean), ``max`` (pixel max of the maps each scaled by weight / max weight,
            so equal weights give the plain max and a zero weight drops a member) or ``geomean``
            (``exp(sum_k w_k log(m_k + eps)) - eps``, values <= eps set to 0).
        eps: keeps ``log`` finite for the geometric mean.

    Returns:
        (H,W) float32 map whose max is 1 (all zero if every member is zero).

    Raises:
        ValueError: unknown fusion, no maps, weights of the wrong length / negative / all zero, or maps of
            different or non-2-D shapes.
    """
    w = _check(maps, weights, fusion)
    as_tensor = isinstance(maps[0], Tensor)
    if as_tensor:
        device = maps[0].device
        stack = torch.stack([torch.as_tensor(m, device=device).float() for m in maps])
    else:
        stack = torch.from_numpy(np.stack([np.asarray(m, dtype=np.float32) for m in maps]))
    wt = torch.tensor(w, dtype=torch.float32, device=stack.device).view(-1, 1, 1)
    if fusion == "mean":
        out = (wt * stack).sum(0)
    elif fusion == "max":
        out = (wt / wt.max() * stack).amax(0)
    else:
        out = (wt * torch.log(stack.clamp_min(0) + eps)).sum(0).exp() - eps
        # Rounding leaves ~eps-sized residue where a member is zero; without this an all-zero input would
        # re-normalise to noise.
        out = torch.where(out > eps, out, torch.zeros_like(out))
    peak = out.max()
    out = out / peak if peak > 0 else torch.zeros_like(out)
    return out if as_tensor else out.numpy()


class Ensemble:
    """The ``ensemble`` entry: fuses maps already stored by other methods (no model)."""

    name = "ensemble"
    needs_model = False
    model_kind = None
