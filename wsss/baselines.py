"""Label-free baselines shown next to every method: how far does "the pet is in the middle" get you?

Pets in Oxford-IIIT Pet are mostly large and centred, so these priors score far above zero; a method
is only interesting by its margin over them. (GrabCut from a centred rectangle lives in
:mod:`wsss.refine`.) The soft versions of these priors (:func:`centred_prior` here, the soft GrabCut map in
:mod:`wsss.refine`) are map methods too (:mod:`wsss.methods.priors`): thresholded at
:data:`PRIOR_THRESHOLD` each gives back its hard baseline exactly.
"""

from __future__ import annotations

import numpy as np

# GrabCut from a centred rectangle (wsss.refine.grabcut_rect_baseline): the rectangle covers this fraction of
# each side, i.e. a border band of (1 - frac) / 2 is certain background. One definition for every report.
RECT_BASELINE_FRAC = 0.85
RECT_BASELINE_ITERATIONS = 5
# The soft priors' decision point: a prior map thresholded here is its hard baseline, pixel for pixel.
PRIOR_THRESHOLD = 0.5
# The largest value below PRIOR_THRESHOLD that survives the float16 map shards (wsss.cams): a prior pixel
# outside its baseline is at most this, so a stored map still thresholds to the baseline exactly.
PRIOR_BELOW = float(np.nextafter(np.float16(PRIOR_THRESHOLD), np.float16(0)))
# Width of the soft ellipse's edge, in units of the elliptical radius (logistic scale): the map falls from
# 0.73 to 0.27 between radius 0.9 and 1.1.
ELLIPSE_PRIOR_SOFTNESS = 0.1


def _check(h: int, w: int, scale: float | None = None) -> None:
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    if scale is not None and scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")


def _radius_sq(h: int, w: int, scale: float) -> np.ndarray:
    """Squared elliptical radius of every pixel centre: 1 on the ellipse with semi-axes scale·w/2, scale·h/2."""
    y = (np.arange(h, dtype=np.float64) + 0.5 - h / 2) / (scale * h / 2)
    x = (np.arange(w, dtype=np.float64) + 0.5 - w / 2) / (scale * w / 2)
    return y[:, None] ** 2 + x[None, :] ** 2


def whole_image(h: int, w: int) -> np.ndarray:
    """Every pixel is pet: uint8 (h, w) of ones."""
    _check(h, w)
    return np.ones((h, w), dtype=np.uint8)


def centred_ellipse(h: int, w: int, scale: float) -> np.ndarray:
    """A centred ellipse with semi-axes ``scale·w/2`` and ``scale·h/2``: uint8 (h, w) in {0, 1}.

    Its area is about ``π/4 · scale²`` of the image. Every report takes ``scale`` from
    ``params.evaluate.ellipse_scale``, so the val, trainval and test baselines are the same ellipse.
    """
    _check(h, w, scale)
    return (_radius_sq(h, w, scale) <= 1.0).astype(np.uint8)


def centred_prior(h: int, w: int, scale: float, softness: float = ELLIPSE_PRIOR_SOFTNESS) -> np.ndarray:
    """The centred ellipse as a soft map: ``sigmoid((1 - r) / softness)`` of the elliptical radius ``r``.

    float32 (h, w) in (0, 1), largest at the centre. ``>= PRIOR_THRESHOLD`` is exactly
    :func:`centred_ellipse` with the same ``scale`` (pixels on the ellipse are pinned to their side of 0.5,
    so rounding cannot move one across).
    """
    _check(h, w, scale)
    if softness <= 0:
        raise ValueError(f"softness must be positive, got {softness}")
    r2 = _radius_sq(h, w, scale)
    soft = (1.0 / (1.0 + np.exp((np.sqrt(r2) - 1.0) / softness))).astype(np.float32)
    return np.where(r2 <= 1.0, np.maximum(soft, np.float32(PRIOR_THRESHOLD)),
                    np.minimum(soft, np.float32(PRIOR_BELOW)))
