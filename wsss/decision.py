"""A U-Net's decision rule: the pet-probability threshold and flip test-time augmentation.

``train-unet`` chooses the rule once, on the validation images, and stores it in the model's
``meta.json`` (``decision``); ``evaluate``, ``predict``, the self-training rounds' val scores and the
exported MLflow model all apply it, so every number and every mask comes from one rule.

Why a threshold other than 0.5: a U-Net learns the bias of its training masks (pseudo-masks that
over-segment move its val optimum above 0.5). Why a guard: the val split is small (50 dev images), and
the best of several thresholds on it is partly noise. A threshold other than 0.5 is kept only when its
paired per-image val gain over 0.5 exceeds ``min_gain_se`` standard errors of that gain.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_THRESHOLD = 0.5  # pet probability at or above which a pixel is pet (= argmax of the two classes)


@dataclass(frozen=True)
class Decision:
    """How pet probabilities become a mask: ``prob >= threshold``, the probability flip-averaged or not."""

    threshold: float = DEFAULT_THRESHOLD
    flip_tta: bool = False

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> Decision:
        """The rule a model's metadata records (``meta.json``'s ``decision``); a model saved before rules
        were recorded decided at 0.5 without flip.

        Raises:
            ValueError: ``decision`` is there but is not a threshold strictly between 0 and 1 and a boolean flip.
        """
        if "decision" not in meta:
            return cls()
        rule = meta["decision"]
        if not isinstance(rule, Mapping):
            raise ValueError(f"decision {rule!r} is not a mapping")
        threshold, flip = rule.get("threshold", DEFAULT_THRESHOLD), rule.get("flip_tta", False)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
            raise ValueError(f"decision threshold {threshold!r} is not a number strictly between 0 and 1")
        if not isinstance(flip, bool):
            raise ValueError(f"decision flip_tta {flip!r} is not true or false")
        return cls(float(threshold), flip)

    @classmethod
    def of_model(cls, meta: Mapping[str, Any], model_dir: str | Path) -> Decision:
        """:meth:`from_meta` of a saved model, a malformed rule being one error naming its ``meta.json``.

        Raises:
            DataError: the recorded rule is malformed.
        """
        from wsss.errors import DataError

        try:
            return cls.from_meta(meta)
        except ValueError as exc:
            raise DataError(f"{Path(model_dir) / 'meta.json'}: {exc}; retrain the model (`wsss train-unet`)") from None

    def probs(self, model: Any, images: Sequence[np.ndarray], size: int, prec: Any) -> list[np.ndarray]:
        """Pet probability per image at its own size, flip-averaged when the rule says so."""
        from wsss.inference import predict_probs

        return predict_probs(model, list(images), size, prec, flip=self.flip_tta)

    def mask(self, prob: np.ndarray) -> np.ndarray:
        """``{0, 1}`` uint8 mask of one probability map."""
        return (prob >= self.threshold).astype(np.uint8)

    def describe(self) -> str:
        return f"threshold {self.threshold:g}" + (", flip TTA" if self.flip_tta else "")


@dataclass(frozen=True)
class ThresholdChoice:
    """The outcome of :func:`choose_threshold` (all IoUs are mean per-image fg IoU on val).

    Attributes:
        threshold: the threshold kept.
        best: the threshold with the best val IoU, kept or not.
        val_iou: val IoU at ``threshold``.
        val_iou_default: val IoU at 0.5.
        gain: ``best``'s mean paired gain over 0.5; ``gain_se`` its standard error.
        n_images: val images scored.
        curve: val IoU per candidate threshold.
    """

    threshold: float
    best: float
    val_iou: float
    val_iou_default: float
    gain: float
    gain_se: float
    n_images: int
    curve: dict[float, float]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["curve"] = {f"{t:g}": v for t, v in self.curve.items()}
        return out


def candidates(thresholds: Iterable[float]) -> tuple[float, ...]:
    """The thresholds to scan, sorted, always with 0.5 (the rule to beat)."""
    return tuple(sorted({round(float(t), 6) for t in thresholds} | {DEFAULT_THRESHOLD}))


def choose_threshold(ious: Mapping[float, np.ndarray], min_gain_se: float) -> ThresholdChoice:
    """The val-best threshold when its paired gain over 0.5 exceeds ``min_gain_se`` standard errors, else 0.5.

    Ties in the val mean go to the threshold nearest 0.5. ``ious`` maps each threshold (0.5 among them)
    to the per-image IoUs of the same images in the same order.

    Raises:
        ValueError: 0.5 is not scanned, or the thresholds scored different numbers of images.
    """
    if DEFAULT_THRESHOLD not in ious:
        raise ValueError("the threshold scan must include 0.5")
    base = ious[DEFAULT_THRESHOLD]
    if any(len(v) != len(base) for v in ious.values()):
        raise ValueError("every threshold must score the same images")
    curve = {t: float(np.mean(v)) if len(v) else float("nan") for t, v in sorted(ious.items())}
    finite = [t for t, v in curve.items() if math.isfinite(v)]
    if not finite:
        return ThresholdChoice(DEFAULT_THRESHOLD, DEFAULT_THRESHOLD, float("nan"), float("nan"), 0.0, 0.0, 0, curve)
    best = max(finite, key=lambda t: (curve[t], -abs(t - DEFAULT_THRESHOLD)))
    diff = ious[best] - base
    gain = float(diff.mean())
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else float("inf")
    keep = best != DEFAULT_THRESHOLD and gain > 0 and gain > min_gain_se * se
    chosen = best if keep else DEFAULT_THRESHOLD
    return ThresholdChoice(chosen, best, curve[chosen], curve[DEFAULT_THRESHOLD], gain, se, len(base), curve)


def choose_rule(model: Any, rows: Any, prepared: Any, size: int, prec: Any, cfg: Any,
                batch_size: int) -> tuple[Decision, ThresholdChoice | None]:
    """The decision rule of a trained U-Net under ``cfg`` (:class:`wsss.config.DecisionConfig`): flip as
    configured, the threshold chosen on ``rows`` (val images with GT, under ``prepared``) by
    :func:`choose_threshold`. No scan (0.5) when ``cfg.choose_threshold`` is off or there are no rows."""
    from wsss.data.readers import read_mask, read_rgb
    from wsss.evaluation import per_image_ious

    if not cfg.choose_threshold or len(rows) == 0:
        return Decision(DEFAULT_THRESHOLD, cfg.flip_tta), None
    scan = Decision(DEFAULT_THRESHOLD, cfg.flip_tta)
    records = list(rows.itertuples())
    model.eval()

    def pairs() -> Iterable[tuple[np.ndarray, np.ndarray]]:
        for i in range(0, len(records), batch_size):
            chunk = records[i : i + batch_size]
            images = [read_rgb(Path(prepared) / r.image_path) for r in chunk]
            for r, prob in zip(chunk, scan.probs(model, images, size, prec), strict=True):
                yield prob, read_mask(Path(prepared) / r.mask_path)

    choice = choose_threshold(per_image_ious(pairs(), candidates(cfg.thresholds)), cfg.min_gain_se)
    return Decision(choice.threshold, cfg.flip_tta), choice
