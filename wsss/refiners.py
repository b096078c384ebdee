"""Refiners by name: ``REGISTRY.get("crf")`` (docs/methods.md#refiners, docs/extending.md#add-a-refiner).

Each :class:`RefinerSpec` declares everything the rest of the code needs to know about a refiner: how one
run turns a map into a {0, 1} mask, whether it needs the dense CRF (and what runs instead when
``pseudo.crf.enabled`` is false), which threshold decides it (for the "before refinement" score) and its
part of the Optuna search space. Adding a refiner is one registration in :func:`_build` plus a test;
:data:`wsss.config.REFINERS` (the names, importable without cv2) is kept equal to it by a test. The
algorithms live in :mod:`wsss.refine`; this module runs them: :class:`Refiner` (one configured refiner,
with the confident-region variant), :func:`refine` (one map) and :func:`refine_many` (many, in a
process pool).

Search space per refiner (after ``refiner`` and, with ``pseudo.confident``, ``fg_threshold`` /
``bg_ratio``, sampled by :func:`wsss.tuning.suggest_pseudo`; parameters a refiner does not use keep their
``params.yaml`` values):

- ``none``: ``threshold`` (not with ``pseudo.confident``);
- ``crf``: ``threshold`` (not confident), then the CRF block: ``crf.unary``, ``crf.scale`` (soft unary),
  ``crf.gt_prob`` (label unary), ``crf.iterations``, the Gaussian and bilateral kernels;
- ``grabcut``: the GrabCut block: ``grabcut.pfg_threshold``, ``grabcut.iterations``, ``grabcut.fg_gap`` and
  ``grabcut.bg_ratio`` (``fg = pfg + fg_gap * (1 - pfg)``, ``bg = bg_ratio * pfg``, so ``bg <= pfg <= fg``
  always holds and no trial is wasted on an invalid configuration), ``grabcut.border``;
- ``grabcut+crf``: the CRF block (with a soft unary also ``threshold``, on which the map's unary is
  centred, and always ``crf.gt_prob``, the blend weight of the GrabCut labels), then the GrabCut block.

The order of the ``suggest_*`` calls is part of the study: the same seed gives the same trials only if it
never changes (bump :data:`wsss.tuning.SPACE_VERSION` when it does).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import cv2
import numpy as np

from wsss import parallel
from wsss.config import GrabCutConfig, PseudoConfig
from wsss.errors import ConfigError
from wsss.refine import IGNORE, check_pair, dense_crf, fg_at, grabcut, grabcut_crf, require_crf


class Suggest(Protocol):
    """The part of :class:`optuna.trial.Trial` the search space uses (``FrozenTrial`` replays it)."""

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float: ...

    def suggest_int(self, name: str, low: int, high: int) -> int: ...

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...


RunFn = Callable[[np.ndarray, np.ndarray, PseudoConfig], np.ndarray]
SuggestFn = Callable[[Suggest, PseudoConfig], dict[str, Any]]


@dataclass(frozen=True)
class RefinerSpec:
    """One registered refiner.

    Attributes:
        name: the ``pseudo.refiner`` value.
        run: one run on a checked ``(image, prob)`` pair, deciding at ``cfg.threshold`` (or, for GrabCut,
            ``cfg.grabcut.pfg_threshold``); returns uint8 {0, 1}.
        uses_crf: needs pydensecrf.
        decided_by: the threshold that decides it: ``threshold`` or GrabCut's ``pfg_threshold``.
        without_crf: the refiner run instead when ``pseudo.crf.enabled`` is false (CRF refiners only).
        suggest: its part of the search space: the ``PseudoConfig`` fields it samples (see the module doc).
        pooled: worth a process pool in :func:`refine_many` (plain thresholding is not).
    """

    name: str
    run: RunFn
    uses_crf: bool
    decided_by: Literal["threshold", "pfg_threshold"]
    suggest: SuggestFn
    without_crf: str | None = None
    pooled: bool = True


class UnknownRefinerError(ConfigError, KeyError):
    """A refiner name that is not registered."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class RefinerRegistry:
    """Name -> :class:`RefinerSpec`, in registration order."""

    def __init__(self, specs: Iterable[RefinerSpec]) -> None:
        self._specs: dict[str, RefinerSpec] = {}
        for spec in specs:
            if spec.name in self._specs:
                raise ValueError(f"refiner {spec.name!r} registered twice")
            self._specs[spec.name] = spec
        for spec in self._specs.values():
            if spec.uses_crf:
                fallback = self._specs.get(spec.without_crf or "")
                if fallback is None or fallback.uses_crf:
                    raise ValueError(f"refiner {spec.name!r} needs a registered non-CRF 'without_crf'")

    def get(self, name: str) -> RefinerSpec:
        """The refiner called ``name``.

        Raises:
            UnknownRefinerError: ``name`` is not registered (the message lists the valid names).
        """
        try:
            return self._specs[name]
        except KeyError:
            raise UnknownRefinerError(f"unknown refiner {name!r}; valid: {', '.join(self._specs)}") from None

    def effective(self, cfg: PseudoConfig) -> RefinerSpec:
        """The refiner actually run for ``cfg``: a CRF refiner's ``without_crf`` when the CRF is disabled."""
        spec = self.get(cfg.refiner)
        if spec.uses_crf and not cfg.crf.enabled:
            return self.get(str(spec.without_crf))
        return spec

    def names(self) -> tuple[str, ...]:
        """Registered names, in registration order."""
        return tuple(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs


# --------------------------------------------------------------------------------------------------
# runs


def _run_none(image: np.ndarray, prob: np.ndarray, cfg: PseudoConfig) -> np.ndarray:
    return fg_at(prob, cfg.threshold).astype(np.uint8)


def _run_crf(image: np.ndarray, prob: np.ndarray, cfg: PseudoConfig) -> np.ndarray:
    return dense_crf(image, prob, cfg.crf, cfg.threshold)


def _run_grabcut(image: np.ndarray, prob: np.ndarray, cfg: PseudoConfig) -> np.ndarray:
    return grabcut(image, prob, cfg.grabcut)


def _run_grabcut_crf(image: np.ndarray, prob: np.ndarray, cfg: PseudoConfig) -> np.ndarray:
    return grabcut_crf(image, prob, cfg.grabcut, cfg.crf, cfg.threshold)


# --------------------------------------------------------------------------------------------------
# search space


def _suggest_threshold(trial: Suggest, base: PseudoConfig) -> dict[str, Any]:
    # With pseudo.confident the two thresholds (sampled before) decide instead.
    return {} if base.confident else {"threshold": trial.suggest_float("threshold", 0.05, 0.95)}


def _suggest_crf(trial: Suggest, base: PseudoConfig, blend: bool) -> dict[str, Any]:
    """The CRF block; ``blend``: the unary mixes GrabCut labels with the map (GrabCut+CRF)."""
    changes: dict[str, Any] = {}
    unary = trial.suggest_categorical("crf.unary", ["soft", "label"])
    crf_changes: dict[str, Any] = {"unary": unary}
    if unary == "soft":
        if blend:  # the map's soft unary is centred on it
            changes.update(_suggest_threshold(trial, base))
        crf_changes["scale"] = trial.suggest_float("crf.scale", 0.25, 4.0, log=True)
    if unary == "label" or blend:
        crf_changes["gt_prob"] = trial.suggest_float("crf.gt_prob", 0.5, 0.95)
    crf_changes.update(
        iterations=trial.suggest_int("crf.iterations", 2, 10),
        gaussian_sxy=trial.suggest_float("crf.gaussian_sxy", 1.0, 10.0, log=True),
        gaussian_compat=trial.suggest_float("crf.gaussian_compat", 0.5, 10.0, log=True),
        bilateral_sxy=trial.suggest_float("crf.bilateral_sxy", 5.0, 120.0, log=True),
        bilateral_srgb=trial.suggest_float("crf.bilateral_srgb", 2.0, 30.0, log=True),
        bilateral_compat=trial.suggest_float("crf.bilateral_compat", 1.0, 20.0, log=True),
    )
    changes["crf"] = dataclasses.replace(base.crf, **crf_changes)
    return changes


def _suggest_grabcut(trial: Suggest, base: PseudoConfig) -> dict[str, Any]:
    pfg = trial.suggest_float("grabcut.pfg_threshold", 0.05, 0.9)
    return {"grabcut": dataclasses.replace(
        base.grabcut,
        iterations=trial.suggest_int("grabcut.iterations", 1, 10),
        pfg_threshold=pfg,
        fg_threshold=min(1.0, pfg + trial.suggest_float("grabcut.fg_gap", 0.0, 1.0) * (1.0 - pfg)),
        bg_threshold=pfg * trial.suggest_float("grabcut.bg_ratio", 0.0, 1.0),
        border=trial.suggest_float("grabcut.border", 0.0, 0.15),
    )}


def _suggest_crf_refiner(trial: Suggest, base: PseudoConfig) -> dict[str, Any]:
    return {**_suggest_threshold(trial, base), **_suggest_crf(trial, base, blend=False)}


def _suggest_grabcut_crf(trial: Suggest, base: PseudoConfig) -> dict[str, Any]:
    return {**_suggest_crf(trial, base, blend=True), **_suggest_grabcut(trial, base)}


# --------------------------------------------------------------------------------------------------
# registrations


def _build() -> RefinerRegistry:
    # The order is that of wsss.config.REFINERS, i.e. of the default ``tune.refiners`` choices.
    return RefinerRegistry([
        RefinerSpec("crf", _run_crf, uses_crf=True, decided_by="threshold", suggest=_suggest_crf_refiner,
                    without_crf="none"),
        RefinerSpec("grabcut", _run_grabcut, uses_crf=False, decided_by="pfg_threshold",
                    suggest=_suggest_grabcut),
        RefinerSpec("grabcut+crf", _run_grabcut_crf, uses_crf=True, decided_by="pfg_threshold",
                    suggest=_suggest_grabcut_crf, without_crf="grabcut"),
        RefinerSpec("none", _run_none, uses_crf=False, decided_by="threshold", suggest=_suggest_threshold,
                    pooled=False),
    ])


REGISTRY = _build()
# Below this many items a process pool costs more than it saves.
_MIN_POOL_ITEMS = 8


# --------------------------------------------------------------------------------------------------
# running a configured refiner


def _grabcut_at(g: GrabCutConfig, threshold: float) -> GrabCutConfig:
    """GrabCut settings whose probable-fg/bg boundary is ``threshold`` (certain seeds widened if needed)."""
    return dataclasses.replace(
        g,
        pfg_threshold=threshold,
        fg_threshold=max(g.fg_threshold, threshold),
        bg_threshold=min(g.bg_threshold, threshold),
    )


@dataclass(frozen=True)
class Refiner:
    """A configured refiner: ``Refiner(cfg)(image, prob)`` is :func:`refine`.

    Attributes:
        cfg: pseudo-mask settings.
    """

    cfg: PseudoConfig

    @property
    def spec(self) -> RefinerSpec:
        """The registered refiner actually run (a CRF refiner's fallback when ``crf.enabled`` is false)."""
        return REGISTRY.effective(self.cfg)

    @property
    def kind(self) -> str:
        """The name of the refiner actually run (see :attr:`spec`)."""
        return self.spec.name

    def run(self, image: np.ndarray, prob: np.ndarray, threshold: float | None = None) -> np.ndarray:
        """One run at a decision threshold; returns {0, 1}.

        Args:
            image: uint8 (H, W, 3) RGB at the map's resolution.
            prob: float (H, W) map in [0, 1].
            threshold: decision threshold; None uses the configured one (``cfg.threshold``; for GrabCut its
                ``pfg_threshold``).

        Returns:
            uint8 (H, W) labels in {0, 1}.
        """
        spec = self.spec
        image, prob = check_pair(image, prob)
        cfg = self.cfg
        if threshold is not None:
            cfg = dataclasses.replace(cfg, threshold=threshold, grabcut=_grabcut_at(cfg.grabcut, threshold))
        return spec.run(image, prob, cfg)

    def __call__(self, image: np.ndarray, prob: np.ndarray) -> np.ndarray:
        """Refine one map; with ``cfg.confident`` combine the fg- and bg-threshold runs (disagreement -> 255)."""
        if not self.cfg.confident:
            return self.run(image, prob)
        hi = self.run(image, prob, self.cfg.fg_threshold)
        lo = self.run(image, prob, self.cfg.bg_threshold)
        return np.where(hi == lo, hi, IGNORE).astype(np.uint8)


def refine(image: np.ndarray, prob: np.ndarray, cfg: PseudoConfig) -> np.ndarray:
    """Turn a foreground map into a pseudo-mask with the refiner named by ``cfg.refiner``.

    Args:
        image: uint8 (H, W, 3) de-normalised RGB at the map's resolution.
        prob: float (H, W) max-normalised foreground map in [0, 1].
        cfg: pseudo-mask settings.

    Returns:
        uint8 (H, W): 0 background, 1 pet, 255 ignore (only with ``cfg.confident``).

    Raises:
        ValueError: bad shapes, dtypes or values.
        MissingDependencyError: a CRF refiner is enabled and pydensecrf is missing.
    """
    return Refiner(cfg)(image, prob)


# --------------------------------------------------------------------------------------------------
# batch processing


# The worker's refiner, rebuilt only when a chunk brings another configuration (a new Optuna trial).
_WORKER_REFINER: Refiner | None = None


def _init_worker() -> None:
    # One OpenCV thread per process: the pool already uses every core.
    cv2.setNumThreads(1)


def _work(cfg: PseudoConfig, chunk: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    global _WORKER_REFINER
    if _WORKER_REFINER is None or _WORKER_REFINER.cfg != cfg:
        _WORKER_REFINER = Refiner(cfg)
    return [_WORKER_REFINER(image, prob) for image, prob in chunk]


# One pool per process, kept between calls: starting workers costs about as much as refining a few
# images, and `tune crf` refines chunk after chunk for every trial. Keyed by (workers, start method).
_POOL: tuple[tuple[int, str], cf.ProcessPoolExecutor] | None = None
_POOL_LOCK = threading.Lock()


def _shared_pool(n_workers: int) -> cf.ProcessPoolExecutor:
    """The process's refinement pool of ``n_workers`` workers (started on first use, then reused)."""
    global _POOL
    ctx = parallel.process_context(preload=(__name__,))
    key = (n_workers, ctx.get_start_method())
    with _POOL_LOCK:
        if _POOL is not None and (_POOL[0] != key or _POOL[1]._broken):  # noqa: SLF001 (no public flag)
            _POOL[1].shutdown(wait=False, cancel_futures=True)
            _POOL = None
        if _POOL is None:
            _POOL = (key, cf.ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx, initializer=_init_worker))
        return _POOL[1]


def shutdown_pool() -> None:
    """Stop the shared refinement pool's workers (a later call starts a new pool)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None:
            _POOL[1].shutdown(wait=True, cancel_futures=True)
            _POOL = None


def refine_many(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]],
    cfg: PseudoConfig,
    workers: int = 0,
    progress: Callable[[int], None] | None = None,
) -> Iterator[np.ndarray]:
    """Refine many (image, map) pairs, in a process pool when it pays; results come in input order.

    The output equals serial :func:`refine` pixel for pixel. Items are read lazily and at most a few chunks
    per worker are in flight, so memory stays bounded on long inputs. The pool is the process's shared one
    (started on first use and kept for later calls, whatever their ``cfg``; :func:`shutdown_pool` stops it). The ``none`` refiner, ``workers == 1``
    and inputs of fewer than 8 items run serially.

    Args:
        pairs: (image, prob) pairs as for :func:`refine`.
        cfg: pseudo-mask settings.
        workers: processes; 0 = every usable CPU core.
        progress: called in the caller's process with the number of items just finished (an increment).

    Yields:
        uint8 (H, W) masks, one per pair, in input order.
    """
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    refiner = Refiner(cfg)
    spec = refiner.spec
    if spec.uses_crf:
        require_crf()  # fail in the caller, before any worker starts
    n_workers = workers or parallel.cpu_count()
    it = iter(pairs)
    head: list[tuple[np.ndarray, np.ndarray]] = []
    for pair in it:
        head.append(pair)
        if len(head) >= _MIN_POOL_ITEMS:
            break
    if n_workers <= 1 or not spec.pooled or len(head) < _MIN_POOL_ITEMS:
        for image, prob in _chain(head, it):
            out = refiner(image, prob)
            if progress is not None:
                progress(1)
            yield out
        return
    yield from _pooled(_chain(head, it), cfg, n_workers, progress)


def _chain(head: list[Any], rest: Iterator[Any]) -> Iterator[Any]:
    yield from head
    yield from rest


def _chunks(it: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in it:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _pooled(
    pairs: Iterator[tuple[np.ndarray, np.ndarray]],
    cfg: PseudoConfig,
    n_workers: int,
    progress: Callable[[int], None] | None,
) -> Iterator[np.ndarray]:
    # Small chunks keep the cores evenly loaded (a CRF costs ~80 ms at 320x240) and pickling is cheap.
    chunks = _chunks(pairs, 2)
    max_in_flight = 4 * n_workers
    pool = _shared_pool(n_workers)
    pending: deque[cf.Future[list[np.ndarray]]] = deque()
    try:
        for chunk in chunks:
            pending.append(pool.submit(_work, cfg, chunk))
            if len(pending) >= max_in_flight:
                yield from _collect(pending.popleft(), progress)
        while pending:
            yield from _collect(pending.popleft(), progress)
    finally:
        # A consumer that stops early (or an error) does not wait for its queued chunks; the pool stays.
        for future in pending:
            future.cancel()


def _collect(future: cf.Future[list[np.ndarray]], progress: Callable[[int], None] | None) -> Iterator[np.ndarray]:
    results = future.result()
    if progress is not None:
        progress(len(results))
    yield from results


__all__ = ["REGISTRY", "Refiner", "RefinerRegistry", "RefinerSpec", "Suggest", "UnknownRefinerError", "refine",
           "refine_many", "shutdown_pool"]
