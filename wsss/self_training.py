"""Constrained self-training (docs/methods.md#self-training): the mask rules of a round and the champion.

A round relabels the train images with the previous U-Net, refines that soft output, and then keeps the
new labels on a short leash held by round 0 (the pseudo-masks the first U-Net trained on), so repeated
rounds cannot drift away from the evidence they started from:

- pixels where the new mask and round 0's disagree become ignore (255) (:func:`constrain`);
- a mask whose pet area moved more than ``max_area_change`` (a fraction of round 0's area) is replaced by
  round 0's mask whole;
- the border band GrabCut seeds as certain background (``pseudo.grabcut.border``) stays background.

The champion (:func:`choose_champion`) is the round with the best validation IoU; a round has to beat
round 0 strictly to be chosen, and the test split never enters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from wsss.config import PseudoConfig, SelfTrainConfig

IGNORE = 255
ROUND0_MODEL = "unet-best"  # round 0: the WSSS U-Net on the selected route's pseudo-masks


def model_of(round_: int) -> str:
    """The U-Net of a round: ``unet-best`` for round 0, ``unet-selftrain-r<N>`` after."""
    from wsss.variants import MaskSource, UnetId

    return ROUND0_MODEL if round_ == 0 else str(UnetId(MaskSource("selftrain", round=round_)))


@dataclass(frozen=True)
class Constrained:
    """One constrained mask: ``mask`` (uint8 0/1/255), whether it was ``reset`` to round 0's, and the new
    and round-0 pet areas (fractions of the image)."""

    mask: np.ndarray
    reset: bool
    area_new: float
    area_round0: float


def border_band(shape: tuple[int, int], border: float) -> np.ndarray:
    """Bool (H, W): the band of ``border`` x each side along the image edge (as :func:`wsss.refine.grabcut_seeds`)."""
    h, w = shape
    band = np.zeros((h, w), dtype=bool)
    if border <= 0:
        return band
    by, bx = round(h * border), round(w * border)
    band[:by], band[h - by:], band[:, :bx], band[:, w - bx:] = True, True, True, True
    return band


def band_of(cfg: PseudoConfig, st: SelfTrainConfig) -> float:
    """The border band the refiner seeds as background (0 when it uses none, or ``border_band`` is off)."""
    from wsss.refiners import REGISTRY

    uses_grabcut = REGISTRY.effective(cfg).name in ("grabcut", "grabcut+crf")
    return cfg.grabcut.border if (st.border_band and uses_grabcut) else 0.0


def pet_area(mask: np.ndarray) -> float:
    """Fraction of the image labelled pet (1)."""
    return float(np.count_nonzero(mask == 1)) / max(mask.size, 1)


def constrain(new: np.ndarray, round0: np.ndarray, cfg: SelfTrainConfig, border: float = 0.0) -> Constrained:
    """Apply the round constraints to a refined mask.

    Args:
        new: uint8 (H, W) refined mask of this round, {0, 1} (255 allowed).
        round0: uint8 (H, W) round-0 pseudo-mask, {0, 1, 255}.
        cfg: ``self_train`` settings (``max_area_change``, ``ignore_disagreement``).
        border: border band fraction forced to background (see :func:`band_of`).

    Returns:
        The constrained mask; a reset mask is round 0's (with the border band as background).

    Raises:
        ValueError: the two masks differ in shape.
    """
    if new.shape != round0.shape:
        raise ValueError(f"new mask {new.shape} and round-0 mask {round0.shape} differ in shape")
    new = new.astype(np.uint8, copy=True)
    band = border_band(new.shape, border)
    new[band] = 0
    a_new, a_0 = pet_area(new), pet_area(round0)
    # Relative to round 0's area; an empty round-0 mask allows no pet at all.
    moved = abs(a_new - a_0) / a_0 if a_0 > 0 else (np.inf if a_new > 0 else 0.0)
    if moved > cfg.max_area_change:
        reset = round0.astype(np.uint8, copy=True)
        reset[band] = 0  # a no-op for masks the same GrabCut refiner made; the band rule holds for all
        return Constrained(reset, True, a_new, a_0)
    out = np.where(new == round0, new, IGNORE).astype(np.uint8) if cfg.ignore_disagreement else new
    out[band] = 0
    return Constrained(out, False, a_new, a_0)


def choose_champion(val_iou: Mapping[int, float]) -> int:
    """The round with the best validation IoU; round 0 keeps it unless a round beats it strictly (ties go
    to the earlier round). Rounds without a finite score are skipped.

    Raises:
        ValueError: no round 0 score.
    """
    if 0 not in val_iou or not np.isfinite(val_iou[0]):
        raise ValueError("the round-0 validation IoU is missing")
    best = 0
    for r in sorted(val_iou):
        if np.isfinite(val_iou[r]) and val_iou[r] > val_iou[best]:
            best = r
    return best


def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """``reports/self-training.json`` from one entry per round (``round``, ``model``, ``val_iou``, ...)."""
    champion = choose_champion({int(r["round"]): float(r["val_iou"]) for r in rounds})
    chosen = next(r for r in rounds if int(r["round"]) == champion)
    return {"selected_on": "val", "rounds": rounds, "champion": {"round": champion, "model": chosen["model"],
                                                                 "val_iou": chosen["val_iou"]}}
