"""Map -> pseudo-mask refiners: thresholding, dense CRF, GrabCut, GrabCut+CRF and the confident variant.

Every refiner takes ``image`` (uint8 H x W x 3 RGB, de-normalised, at the map's resolution) and ``prob``
(float H x W in [0, 1], a max-normalised foreground map) and returns a uint8 H x W mask with
0 = background, 1 = pet and, only in the confident-region variant, 255 = ignore.

One *run* of a refiner turns the map into a {0, 1} mask around a decision threshold ``t``:

- ``none``: ``prob >= t``.
- ``crf``: dense CRF (pydensecrf) whose unary has its decision point at ``t`` (see :func:`soft_unary_prob`).
- ``grabcut``: GrabCut seeded from the map; ``t`` is the probable-fg / probable-bg boundary.
- ``grabcut+crf``: GrabCut, then a dense CRF whose unary blends the GrabCut labels with the map.

The confident-region variant (IRN) does two runs, at ``fg_threshold`` and at ``bg_threshold``; pixels
where both runs agree keep that label and the rest become 255.

These are the algorithms. The registry :data:`wsss.refiners.REGISTRY` declares each refiner once (its run,
CRF needs, deciding threshold and search space) and runs them: :func:`wsss.refiners.refine` for one map,
:func:`wsss.refiners.refine_many` for many, in a process pool.
"""

from __future__ import annotations

import cv2
import numpy as np

from wsss.baselines import PRIOR_BELOW, RECT_BASELINE_FRAC, RECT_BASELINE_ITERATIONS
from wsss.config import CrfConfig, GrabCutConfig, PseudoConfig
from wsss.errors import MissingDependencyError

IGNORE = 255
_CLIP = 1e-5
# Smallest gap from 0.5 given to the soft unary so that its argmax reproduces ``prob >= t`` even at ties.
_TIE = 1e-6
# cv2.grabCut fits 5-component GMMs by k-means: each side needs at least that many samples.
_GMM_COMPONENTS = 5
_CRF_HINT = (
    "pydensecrf is not installed: pip install pydensecrf2 (it compiles with gcc; needs python3-dev) "
    "or set pseudo.crf.enabled: false"
)


# --------------------------------------------------------------------------------------------------
# dependency and input checks


def crf_available() -> bool:
    """Whether pydensecrf (the ``pydensecrf2`` distribution) can be imported."""
    try:
        import pydensecrf.densecrf  # noqa: F401
        import pydensecrf.utils  # noqa: F401
    except ImportError:
        return False
    return True


def require_crf() -> None:
    """Raise :class:`MissingDependencyError` with an install hint unless pydensecrf is importable.

    Raises:
        MissingDependencyError: pydensecrf cannot be imported.
    """
    if not crf_available():
        raise MissingDependencyError(_CRF_HINT)


def _check_prob(prob: np.ndarray) -> np.ndarray:
    """Validate a foreground map and return it as C-contiguous float32."""
    prob = np.asarray(prob)
    if prob.ndim != 2 or prob.shape[0] < 1 or prob.shape[1] < 1:
        raise ValueError(f"prob must be a non-empty 2-D (H, W) map, got shape {prob.shape}")
    if not np.issubdtype(prob.dtype, np.floating):
        raise ValueError(f"prob must be a floating-point map in [0, 1], got dtype {prob.dtype}")
    prob = np.ascontiguousarray(prob, dtype=np.float32)
    if not np.isfinite(prob).all():
        raise ValueError("prob contains NaN or infinite values")
    lo, hi = float(prob.min()), float(prob.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"prob values must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
    return prob


def _check_image(image: np.ndarray) -> np.ndarray:
    """Validate an RGB image and return it C-contiguous."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image must have shape (H, W, 3), got {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 RGB (de-normalised), got dtype {image.dtype}")
    return np.ascontiguousarray(image)


def check_pair(image: np.ndarray, prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate an (image, map) pair; return C-contiguous uint8 image and float32 map."""
    prob = _check_prob(prob)
    image = _check_image(image)
    if image.shape[:2] != prob.shape:
        raise ValueError(f"image shape {image.shape} does not match prob shape {prob.shape} (H, W must agree)")
    return image, prob


def fg_at(prob: np.ndarray, threshold: float) -> np.ndarray:
    """``prob >= threshold`` as bool, compared in float32 (how every refiner decides)."""
    # Compare in float32 everywhere so every refiner agrees on which pixels sit exactly at the threshold.
    return prob >= np.float32(threshold)


# --------------------------------------------------------------------------------------------------
# thresholding


def threshold_mask(prob: np.ndarray, cfg: PseudoConfig) -> np.ndarray:
    """The ``none`` refiner: plain thresholding of the map.

    Args:
        prob: float (H, W) foreground map in [0, 1].
        cfg: pseudo-mask settings; uses ``threshold``, or ``confident`` with ``fg_threshold``/``bg_threshold``.

    Returns:
        uint8 (H, W): ``prob >= threshold``; with ``cfg.confident``: 1 where ``prob >= fg_threshold``,
        0 where ``prob < bg_threshold`` and 255 in between.
    """
    prob = _check_prob(prob)
    if not cfg.confident:
        return fg_at(prob, cfg.threshold).astype(np.uint8)
    out = np.full(prob.shape, IGNORE, dtype=np.uint8)
    out[~fg_at(prob, cfg.bg_threshold)] = 0
    out[fg_at(prob, cfg.fg_threshold)] = 1
    return out


# --------------------------------------------------------------------------------------------------
# dense CRF


def soft_unary_prob(prob: np.ndarray, threshold: float, scale: float = 1.0) -> np.ndarray:
    """Foreground probability ``M'`` for the soft CRF unary, with its decision point moved to ``threshold``.

    ``M' = sigmoid((logit(M) - logit(t)) / scale)`` with ``M`` and ``t`` clipped to [1e-5, 1 - 1e-5].
    With ``scale = 1`` this is Bayes' rule with the prior odds changed by ``(1 - t) / t``, i.e.
    ``M' = M (1 - t) / (M (1 - t) + (1 - M) t)``: ``M' = 0.5`` exactly at ``M = t`` and the order of pixels is
    kept. ``scale > 1`` softens the unary (the pairwise terms weigh more), ``scale < 1`` sharpens it. Ties at
    0.5 are nudged so that ``argmax([1 - M', M'])`` equals ``prob >= threshold`` for every pixel. The result is
    clipped to [1e-5, 1 - 1e-5].

    Args:
        prob: float (H, W) map in [0, 1].
        threshold: decision threshold ``t``.
        scale: temperature (> 0).

    Returns:
        float32 (H, W) foreground probability.
    """
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    m = np.clip(prob.astype(np.float64), _CLIP, 1.0 - _CLIP)
    t = float(np.clip(threshold, _CLIP, 1.0 - _CLIP))
    z = (np.log(m) - np.log1p(-m) - (np.log(t) - np.log1p(-t))) / scale
    p = 0.5 * (1.0 + np.tanh(0.5 * z))  # a sigmoid that cannot overflow
    fg = fg_at(prob, threshold)
    p = np.where(fg, np.maximum(p, 0.5 + _TIE), np.minimum(p, 0.5 - _TIE))
    return np.clip(p, _CLIP, 1.0 - _CLIP).astype(np.float32)


def _crf_infer(image: np.ndarray, unary: np.ndarray, crf: CrfConfig) -> np.ndarray:
    """Run the 2-label dense CRF on a (2, H*W) unary energy; return {0, 1} uint8 labels."""
    require_crf()
    import pydensecrf.densecrf as dcrf

    h, w = image.shape[:2]
    d = dcrf.DenseCRF2D(w, h, 2)
    d.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    d.addPairwiseGaussian(sxy=crf.gaussian_sxy, compat=crf.gaussian_compat)
    d.addPairwiseBilateral(sxy=crf.bilateral_sxy, srgb=crf.bilateral_srgb, rgbim=image, compat=crf.bilateral_compat)
    q = np.asarray(d.inference(crf.iterations), dtype=np.float32).reshape(2, h, w)
    return q.argmax(0).astype(np.uint8)


def _soft_unary(p_fg: np.ndarray) -> np.ndarray:
    from pydensecrf.utils import unary_from_softmax

    return unary_from_softmax(np.stack([1.0 - p_fg, p_fg]).astype(np.float32), clip=_CLIP)


def _label_unary(labels: np.ndarray, gt_prob: float) -> np.ndarray:
    from pydensecrf.utils import unary_from_labels

    return unary_from_labels(labels.astype(np.int64), 2, gt_prob=gt_prob, zero_unsure=False)


def dense_crf(image: np.ndarray, prob: np.ndarray, crf: CrfConfig, threshold: float) -> np.ndarray:
    """Refine a map with a fully connected CRF (Gaussian + bilateral kernels).

    The unary is ``soft`` (``[1 - M', M']`` from :func:`soft_unary_prob`, temperature ``crf.scale``) or
    ``label`` (hard labels ``M >= threshold`` trusted with ``crf.gt_prob``). ``crf.enabled`` is not consulted
    here: :func:`refine` falls back to thresholding when it is false.

    Args:
        image: uint8 (H, W, 3) RGB at the map's resolution.
        prob: float (H, W) map in [0, 1].
        crf: CRF parameters.
        threshold: decision threshold of the unary.

    Returns:
        uint8 (H, W) labels in {0, 1}.

    Raises:
        ValueError: bad shapes or dtypes.
        MissingDependencyError: pydensecrf is not installed.
    """
    image, prob = check_pair(image, prob)
    require_crf()
    if crf.unary == "label":
        unary = _label_unary(fg_at(prob, threshold), crf.gt_prob)
    else:
        unary = _soft_unary(soft_unary_prob(prob, threshold, crf.scale))
    return _crf_infer(image, unary, crf)


# --------------------------------------------------------------------------------------------------
# GrabCut


def grabcut_seeds(prob: np.ndarray, g: GrabCutConfig) -> np.ndarray:
    """The GrabCut initial mask: ``>= fg`` -> GC_FGD, ``>= pfg`` -> GC_PR_FGD, ``< bg`` -> GC_BGD, else GC_PR_BGD.

    With ``g.border > 0`` a band of that fraction of each side along the image border is GC_BGD whatever
    the map says (the prior of the centred-rectangle baseline, here combined with the map inside it).
    """
    seeds = np.full(prob.shape, cv2.GC_PR_BGD, dtype=np.uint8)
    seeds[~fg_at(prob, g.bg_threshold)] = cv2.GC_BGD
    seeds[fg_at(prob, g.pfg_threshold)] = cv2.GC_PR_FGD
    seeds[fg_at(prob, g.fg_threshold)] = cv2.GC_FGD
    if g.border > 0:
        h, w = prob.shape
        by, bx = round(h * g.border), round(w * g.border)
        inside = np.zeros(prob.shape, dtype=bool)
        inside[by : h - by, bx : w - bx] = True
        seeds[~inside] = cv2.GC_BGD
    return seeds


def _fit_grabcut(image: np.ndarray, seeds: np.ndarray,
                 iterations: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """GrabCut from an initial mask: (labels {0, 1}, bg GMM, fg GMM in cv2's 65-float layout), or None
    when the seeds cannot fit both colour models."""
    is_fg = (seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD)
    n_fg = int(is_fg.sum())
    if min(n_fg, is_fg.size - n_fg) < _GMM_COMPONENTS:
        return None
    mask = seeds.copy()
    bgd = np.zeros((1, 65), np.float64)
    fgd = np.zeros((1, 65), np.float64)
    # GrabCut's k-means initialisation draws from cv2's thread-local RNG.
    cv2.setRNGSeed(0)
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    try:
        cv2.grabCut(bgr, mask, None, bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
    except cv2.error:
        return None
    return ((mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)).astype(np.uint8), bgd, fgd


def _run_grabcut(image: np.ndarray, seeds: np.ndarray, iterations: int) -> np.ndarray | None:
    """GrabCut from an initial mask; None when the seeds cannot fit both colour models."""
    fit = _fit_grabcut(image, seeds, iterations)
    return None if fit is None else fit[0]


def grabcut(image: np.ndarray, prob: np.ndarray, g: GrabCutConfig) -> np.ndarray:
    """Refine a map with OpenCV GrabCut seeded from its thresholds (see :func:`grabcut_seeds`).

    Seeds without enough foreground or background pixels (an all-zero or all-one map) make cv2 fail;
    the result is then ``prob >= g.pfg_threshold``.

    Args:
        image: uint8 (H, W, 3) RGB at the map's resolution.
        prob: float (H, W) map in [0, 1].
        g: GrabCut thresholds and iteration count.

    Returns:
        uint8 (H, W) labels in {0, 1}.
    """
    image, prob = check_pair(image, prob)
    out = _run_grabcut(image, grabcut_seeds(prob, g), g.iterations)
    return fg_at(prob, g.pfg_threshold).astype(np.uint8) if out is None else out


def rect_seeds(h: int, w: int, frac: float = RECT_BASELINE_FRAC) -> np.ndarray:
    """GrabCut seeds of the centred-rectangle baseline: GC_PR_FGD inside a centred rectangle covering ``frac``
    of each side, GC_BGD outside (what GC_INIT_WITH_RECT does)."""
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"frac must lie in (0, 1], got {frac}")
    rw, rh = max(1, round(w * frac)), max(1, round(h * frac))
    x0, y0 = (w - rw) // 2, (h - rh) // 2
    seeds = np.full((h, w), cv2.GC_BGD, dtype=np.uint8)
    seeds[y0 : y0 + rh, x0 : x0 + rw] = cv2.GC_PR_FGD
    return seeds


def grabcut_rect_baseline(image: np.ndarray, frac: float = RECT_BASELINE_FRAC,
                          iterations: int = RECT_BASELINE_ITERATIONS) -> np.ndarray:
    """Label-free baseline: GrabCut initialised with a centred rectangle covering ``frac`` of each side.

    Falls back to the rectangle itself when GrabCut cannot run (tiny image, rectangle = whole image).

    Args:
        image: uint8 (H, W, 3) RGB.
        frac: rectangle side as a fraction of the image side, in (0, 1].
        iterations: GrabCut iterations.

    Returns:
        uint8 (H, W) labels in {0, 1}.
    """
    image = _check_image(image)
    seeds = rect_seeds(*image.shape[:2], frac)
    out = _run_grabcut(image, seeds, iterations)
    return (seeds == cv2.GC_PR_FGD).astype(np.uint8) if out is None else out


def _gmm_log_likelihood(pixels: np.ndarray, model: np.ndarray) -> np.ndarray:
    """log p(colour | GMM) of (N, 3) float64 BGR pixels under a cv2 GrabCut GMM (1 x 65 floats: 5 weights,
    5 x 3 means, 5 x 3 x 3 covariances)."""
    flat = model.reshape(-1)
    k = _GMM_COMPONENTS
    weights, means, covs = flat[:k], flat[k : 4 * k].reshape(k, 3), flat[4 * k :].reshape(k, 3, 3)
    parts = []
    for j in range(k):
        if weights[j] <= 0:
            continue
        cov = covs[j] + np.eye(3) * 1e-6  # cv2 regularises singular ones the same way when it fits them
        inv = np.linalg.inv(cov)
        _, logdet = np.linalg.slogdet(cov)
        d = pixels - means[j]
        maha = np.einsum("ni,ij,nj->n", d, inv, d)
        parts.append(np.log(weights[j]) - 0.5 * (maha + logdet + 3 * np.log(2 * np.pi)))
    if not parts:  # GrabCut ended with no pixel on this side: its model is empty
        return np.full(len(pixels), -np.inf)
    return np.logaddexp.reduce(np.stack(parts), axis=0)


def grabcut_rect_soft(image: np.ndarray, frac: float = RECT_BASELINE_FRAC,
                      iterations: int = RECT_BASELINE_ITERATIONS) -> np.ndarray:
    """The centred-rectangle GrabCut as a soft map: its hard mask plus its colour-model posterior.

    ``(G + q) / 2`` where ``G`` is :func:`grabcut_rect_baseline`'s mask and ``q`` the per-pixel colour
    posterior under the foreground and background GMMs GrabCut ends with, tempered:
    ``q = sigmoid(llr / median |llr|)`` with ``llr = log p_fg - log p_bg`` and the median over the
    rectangle (0 outside it, certain background). So the map is ``>= 0.5`` exactly on ``G``
    (:data:`wsss.baselines.PRIOR_THRESHOLD`), and within each side of the cut it grades how sure the
    colour models are: a fusion can overturn the cut where they are unsure. When GrabCut cannot run the
    map is the rectangle (0.75 inside, 0 outside).

    Returns:
        float32 (H, W) in [0, 1].
    """
    image = _check_image(image)
    h, w = image.shape[:2]
    seeds = rect_seeds(h, w, frac)
    inside = seeds == cv2.GC_PR_FGD
    fit = _fit_grabcut(image, seeds, iterations)
    if fit is None:
        return np.where(inside, 0.75, 0.0).astype(np.float32)
    labels, bgd, fgd = fit
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR).reshape(-1, 3).astype(np.float64)
    log_fg, log_bg = _gmm_log_likelihood(bgr, fgd), _gmm_log_likelihood(bgr, bgd)
    llr = np.clip(np.nan_to_num(log_fg - log_bg), -1e3, 1e3).reshape(h, w)
    # The raw GMM ratio is extreme (|llr| of tens): its posterior would be as binary as the cut. Tempered by
    # the image's own median |llr| inside the rectangle, q is graded: 0.73 / 0.27 at a typical pixel.
    scale = max(float(np.median(np.abs(llr[inside]))), 1e-3)
    q = np.where(inside, 1.0 / (1.0 + np.exp(np.clip(-llr / scale, -50.0, 50.0))), 0.0)
    soft = (labels + q) / 2.0
    # A background pixel of the cut stays below 0.5, also in the float16 shards.
    return np.where(labels == 1, soft, np.minimum(soft, PRIOR_BELOW)).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# GrabCut + CRF


def grabcut_crf(
    image: np.ndarray, prob: np.ndarray, g: GrabCutConfig, crf: CrfConfig, threshold: float
) -> np.ndarray:
    """GrabCut, then a dense CRF that cleans up its boundary.

    The CRF unary trusts the GrabCut labels ``G`` with ``crf.gt_prob`` (``g``) and lets the map set the
    confidence: ``soft``: ``p_fg = g * G + (1 - g) * M'`` with ``M'`` from :func:`soft_unary_prob` at
    ``threshold``, so the unary's argmax is ``G`` and the CRF can overturn GrabCut where the map disagrees
    with it; ``label``: hard labels ``G`` with ``gt_prob``.

    Args:
        image: uint8 (H, W, 3) RGB at the map's resolution.
        prob: float (H, W) map in [0, 1].
        g: GrabCut settings.
        crf: CRF parameters.
        threshold: decision threshold of ``M'``.

    Returns:
        uint8 (H, W) labels in {0, 1}.
    """
    image, prob = check_pair(image, prob)
    require_crf()
    labels = grabcut(image, prob, g)
    if crf.unary == "label":
        unary = _label_unary(labels, crf.gt_prob)
    else:
        w = crf.gt_prob
        p = w * labels + (1.0 - w) * soft_unary_prob(prob, threshold, crf.scale)
        unary = _soft_unary(np.clip(p, _CLIP, 1.0 - _CLIP))
    return _crf_infer(image, unary, crf)
