"""The pseudo-mask configuration a variant's masks are made with, and its "before refinement" twin.

Shared by ``make-pseudo`` (trainval masks) and ``evaluate --pseudo`` (test scores).
"""

from __future__ import annotations

import dataclasses

from wsss.config import Params, PseudoConfig
from wsss.paths import Paths


def effective_config(params: Params, paths: Paths, variant: str, use_tuned: bool = True) -> tuple[PseudoConfig, str]:
    """The pseudo-mask configuration to use and where it came from (``tuned``, ``params`` or ``label-free``).

    The tuned file (``reports/crf/<variant>.yaml``) replaces the whole ``pseudo`` section except ``workers``
    (a machine setting). A label-free prior's masks are its map at
    :data:`wsss.baselines.PRIOR_THRESHOLD` with no refiner, always: that is its hard baseline (e.g. the
    rectangle-GrabCut mask), and anything tuned on val would use labels.

    Raises:
        ConfigError: the tuned file exists but is invalid.
    """
    from wsss.baselines import PRIOR_THRESHOLD
    from wsss.tuning import load_best_params
    from wsss.variants import MapVariant

    if MapVariant.parse(variant).is_prior:
        # Defaults but for these: no other pseudo value can touch (or re-fingerprint) the label-free masks.
        return PseudoConfig(refiner="none", threshold=PRIOR_THRESHOLD, workers=params.pseudo.workers), "label-free"

    tuned = paths.crf_params(variant)
    if use_tuned and tuned.exists():
        cfg = load_best_params(tuned)
        return dataclasses.replace(cfg, workers=params.pseudo.workers), "tuned"
    return params.pseudo, "params"


def plain_threshold_config(cfg: PseudoConfig) -> PseudoConfig:
    """The "before refinement" counterpart of ``cfg``: the same decision threshold(s), no refiner.

    A refiner decided by GrabCut's probable-foreground threshold (GrabCut, alone or followed by the CRF)
    is compared with thresholding at that one.
    """
    from wsss.refiners import REGISTRY

    threshold = cfg.threshold
    if REGISTRY.effective(cfg).decided_by == "pfg_threshold" and not cfg.confident:
        threshold = cfg.grabcut.pfg_threshold
    return dataclasses.replace(cfg, refiner="none", threshold=threshold)
