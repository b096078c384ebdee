"""Label-free priors as map methods (docs/methods.md#priors): soft maps from the image alone, no model, no label.

``prior-grabcut`` is GrabCut from the centred rectangle of the baseline (:data:`wsss.baselines.RECT_BASELINE_FRAC`,
:data:`wsss.baselines.RECT_BASELINE_ITERATIONS`) as a soft map (:func:`wsss.refine.grabcut_rect_soft`);
``prior-ellipse`` is the centred ellipse of ``evaluate.ellipse_scale`` with a soft edge
(:func:`wsss.baselines.centred_prior`). Both are ``>= 0.5`` exactly on their hard baseline, so their
pseudo-masks (refiner ``none`` at 0.5, :func:`wsss.pseudo.effective_config`) are the label-free masks, and as
ensemble members they bring graded evidence rather than a binary mask.
"""

from __future__ import annotations

import concurrent.futures as cf
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from wsss.variants import MethodName

# Bump when a prior's map changes: part of make-cams' fingerprint, so stored maps are recomputed.
PRIOR_VERSION = 1


class Prior(ABC):
    """A map computed from one RGB image (no model): :meth:`compute`.

    Attributes:
        name: registry name (also the map variant: ``cams/<name>/``).
        needs_model: always False.
        model_kind: always None.
    """

    name: str = ""
    needs_model = False
    model_kind = None
    pooled = False  # worth a process pool (GrabCut: about 0.3 s an image)

    @abstractmethod
    def compute(self, image: np.ndarray, ellipse_scale: float) -> np.ndarray:
        """float32 (H, W) map in [0, 1] of a uint8 (H, W, 3) RGB image."""


class GrabCutPrior(Prior):
    """GrabCut from the baseline's centred rectangle: hard cut plus colour-model posterior, halved."""

    name = MethodName.prior_grabcut.value
    pooled = True

    def compute(self, image: np.ndarray, ellipse_scale: float) -> np.ndarray:
        """:func:`wsss.refine.grabcut_rect_soft` with the baseline's rectangle and iterations."""
        from wsss.refine import grabcut_rect_soft

        return grabcut_rect_soft(image)


class EllipsePrior(Prior):
    """The centred ellipse (axes ``ellipse_scale`` of the image) with a logistic edge."""

    name = MethodName.prior_ellipse.value

    def compute(self, image: np.ndarray, ellipse_scale: float) -> np.ndarray:
        """:func:`wsss.baselines.centred_prior` at the image's size."""
        from wsss.baselines import centred_prior

        return centred_prior(image.shape[0], image.shape[1], ellipse_scale)


def _map_of(name: str, path: str, ellipse_scale: float) -> np.ndarray:
    """One prior map of one image file (a pool task: the prior is looked up by name in the worker)."""
    from wsss.data.readers import read_rgb
    from wsss.methods import METHODS

    prior = METHODS.get(name)
    return np.clip(prior.compute(read_rgb(Path(path)), ellipse_scale), 0.0, 1.0).astype(np.float32)  # type: ignore[union-attr]


def prior_maps(prior: Prior, rows: pd.DataFrame, prepared: Path, ellipse_scale: float,
               progress: Callable[[int], None] | None = None, workers: int = 1) -> Iterator[tuple[str, np.ndarray]]:
    """``(id, map)`` of every manifest row, in order, each at its prepared image's size.

    A pooled prior (GrabCut) runs in ``workers`` processes (0 = every usable core) when there are several
    images; the order of the output is the order of ``rows`` either way.

    Raises:
        DataError: an image cannot be read (as :func:`wsss.data.readers.read_rgb`).
    """
    from wsss import parallel

    ids = [str(i) for i in rows["id"]]
    files = [str(Path(prepared) / p) for p in rows["image_path"]]
    n_workers = min(workers or parallel.cpu_count(), len(ids))
    if not prior.pooled or n_workers <= 1:
        for image_id, path in zip(ids, files, strict=True):
            yield image_id, _map_of(prior.name, path, ellipse_scale)
            if progress is not None:
                progress(1)
        return
    with cf.ProcessPoolExecutor(n_workers, mp_context=parallel.process_context(preload=(__name__,))) as pool:
        maps = pool.map(_map_of, [prior.name] * len(ids), files, [ellipse_scale] * len(ids), chunksize=2)
        for image_id, m in zip(ids, maps, strict=True):
            yield image_id, m
            if progress is not None:
                progress(1)
