"""Optuna search over the map -> pseudo-mask step: refiner, dense-CRF / GrabCut parameters, thresholds.

The objective is the mean per-image pet IoU of the refined masks on the **validation split only**
(``split == 'val'``, pets with a GT mask; never test), loaded once into :class:`ObjectiveData`. Each trial
refines those images in a process pool (:func:`wsss.refiners.refine_many`) chunk by chunk and asks the
pruner after every chunk whether to stop. What it reports depends on ``tune.pruner``: ``median`` gets the
running mean after each chunk (step = chunk), ``wilcoxon`` every image's IoU (step = the image's position
in the fixed evaluation order, the same in every trial of a study), which Optuna's ``WilcoxonPruner``
pairs with the best trial's to test "worse than the best".

Search space (conditional on the refiner; parameters a refiner does not use are not sampled and keep
their ``params.yaml`` values): ``refiner`` from ``tune.refiners`` (CRF-based ones dropped when
``pseudo.crf.enabled`` is false); with ``pseudo.confident`` ``fg_threshold`` and ``bg_ratio``
(``bg_threshold = bg_ratio * fg_threshold``, so ``bg <= fg`` by construction); then the chosen refiner's
own part, declared with its registration in :mod:`wsss.refiners`.

With ``pseudo.confident`` ignore pixels (255) count as background in the objective, as in every
evaluation, so the study favours a narrow ignore band.

This module does no MLflow logging and writes no files except through :func:`write_best_params`; the
``tune-crf`` stage does the tracking.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from wsss import tracking
from wsss.baselines import RECT_BASELINE_FRAC, RECT_BASELINE_ITERATIONS
from wsss.config import PseudoConfig, flatten, params_from_dict, to_dict
from wsss.data.manifest import pets
from wsss.data.readers import read_mask, read_rgb
from wsss.errors import ConfigError, DataError, MissingDependencyError, TrackingError
from wsss.io import process_gone
from wsss.refiners import REGISTRY, Suggest

# Bump when the search space changes: it is part of the default study name, so an old study (whose
# trials used another space) is never continued by mistake.
SPACE_VERSION = 1
STUDY_DB = "optuna.db"
# Heartbeat of trials in a shared storage: beat every HEARTBEAT_S, declared dead after GRACE_S of silence.
HEARTBEAT_S = 60
GRACE_S = 300
# A trial exists (RUNNING) a moment before its process claims it (:func:`claim_trial`, first thing in the
# objective); one still unclaimed this long after it started was made by a process killed in between.
UNCLAIMED_GRACE_S = 10
# Trial user attrs naming the process that runs it: the keys MLflow runs are tagged with.
HOST_ATTR, PID_ATTR = tracking.process_tags()


# --------------------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class ObjectiveData:
    """Everything a trial reads, loaded once: validation images, their maps and GT masks.

    Attributes:
        ids: image ids in evaluation order (a seeded shuffle, so every pruning chunk is a random sample).
        images: uint8 (H, W, 3) RGB prepared images.
        maps: float32 (H, W) foreground maps in [0, 1].
        gts: uint8 (H, W) GT masks (0, 1, 255).
    """

    ids: tuple[str, ...]
    images: tuple[np.ndarray, ...]
    maps: tuple[np.ndarray, ...]
    gts: tuple[np.ndarray, ...]

    def __len__(self) -> int:
        return len(self.ids)

    def digest(self) -> str:
        """SHA-1 over ids and pixel data: identifies the objective's data exactly."""
        h = hashlib.sha1()
        for i, image, m, gt in zip(self.ids, self.images, self.maps, self.gts, strict=True):
            h.update(i.encode())
            for arr in (image, m, gt):
                h.update(str(arr.shape).encode())
                h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()


def tuning_rows(df: pd.DataFrame, max_images: int = 0, seed: int = 0) -> pd.DataFrame:
    """The manifest rows the study evaluates: validation pets with a GT mask, in a seeded random order.

    Args:
        df: the prepared manifest.
        max_images: keep at most this many (0 = all), a seeded random subset.
        seed: shuffling seed.

    Returns:
        The selected rows; never a ``train`` or ``test`` row.
    """
    sel = pets(df, "val", with_mask=True).sort_values("id", kind="stable")
    order = np.random.default_rng(seed).permutation(len(sel))
    sel = sel.iloc[order]
    if max_images:
        sel = sel.iloc[:max_images]
    return sel


def build_objective_data(
    df: pd.DataFrame,
    prepared_dir: Path,
    cams_dir: Path,
    max_images: int = 0,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> ObjectiveData:
    """Load the validation images, maps and GT masks the objective scores (see :func:`tuning_rows`).

    Args:
        df: the prepared manifest.
        prepared_dir: folder the manifest's paths are relative to.
        cams_dir: the map variant's shard folder.
        max_images: cap on the number of images (0 = the whole validation split).
        seed: seed of the random order and subset.
        progress: called with 1 after each image is loaded.

    Raises:
        DataError: no validation image with a mask, a map missing, or a map/image size mismatch.
    """
    from wsss.cams import load_maps

    rows = tuning_rows(df, max_images, seed)
    if rows.empty:
        raise DataError("the manifest has no validation pets with GT masks to tune on (prepare.val_fraction?)")
    ids = [str(i) for i in rows["id"]]
    maps = load_maps(cams_dir, set(ids))
    missing = [i for i in ids if i not in maps]
    if missing:
        raise DataError(
            f"{cams_dir}: no map for {len(missing)} validation image(s) (e.g. {missing[0]}); rerun `wsss make-cams`"
        )
    images, gts, ordered_maps = [], [], []
    for row in rows.itertuples():
        image = read_rgb(prepared_dir / row.image_path)
        gt = read_mask(prepared_dir / row.mask_path)
        m = maps[str(row.id)]
        if image.shape[:2] != m.shape or gt.shape != m.shape:
            raise DataError(
                f"{cams_dir}: map of {row.id} is {m.shape}, its prepared image {image.shape[:2]}; "
                "the maps are stale, rerun `wsss make-cams`"
            )
        images.append(image)
        gts.append(gt)
        ordered_maps.append(m)
        if progress is not None:
            progress(1)
    return ObjectiveData(tuple(ids), tuple(images), tuple(ordered_maps), tuple(gts))


# --------------------------------------------------------------------------------------------------
# search space


def search_refiners(base: PseudoConfig, refiners: Sequence[str]) -> tuple[str, ...]:
    """The refiners the study chooses from: ``tune.refiners`` minus CRF-based ones when CRF is disabled.

    Raises:
        ConfigError: nothing is left to choose from.
    """
    out = tuple(r for r in refiners if base.crf.enabled or not REGISTRY.get(r).uses_crf)
    if not out:
        raise ConfigError(
            "params.yaml: 'tune.refiners' has no refiner left to tune ('pseudo.crf.enabled' is false and "
            "only CRF refiners are listed)"
        )
    return out


# GrabCut seeded like the label-free centred-rectangle baseline (85 % rectangle = a 7.5 % border band),
# with the map only splitting the inside into probable fg / probable bg at a low threshold.
RECTANGLE_PRIOR_TRIAL = {
    "refiner": "grabcut", "grabcut.pfg_threshold": 0.05, "grabcut.iterations": RECT_BASELINE_ITERATIONS,
    "grabcut.fg_gap": 1.0, "grabcut.bg_ratio": 0.0, "grabcut.border": round((1.0 - RECT_BASELINE_FRAC) / 2, 6),
}


def seed_trials(base: PseudoConfig, refiners: Sequence[str]) -> list[dict[str, Any]]:
    """Trials a new study evaluates first, so the search starts from the label-free prior it must beat.

    Today one: :data:`RECTANGLE_PRIOR_TRIAL` when GrabCut is a choice (and the study is not confident-mode,
    whose thresholds the prior does not cover).
    """
    if "grabcut" in refiners and not base.confident:
        return [dict(RECTANGLE_PRIOR_TRIAL)]
    return []


def suggest_pseudo(trial: Suggest, base: PseudoConfig, refiners: Sequence[str]) -> PseudoConfig:
    """Sample one pseudo-mask configuration (or, given a ``FrozenTrial``, rebuild the one it sampled).

    Args:
        trial: an Optuna trial (or frozen trial).
        base: ``params.yaml``'s ``pseudo`` section: fields outside the sampled subspace keep its values.
        refiners: choices for ``refiner`` (see :func:`search_refiners`).

    Returns:
        A configuration that satisfies the config loader's cross-field checks.
    """
    refiner = trial.suggest_categorical("refiner", list(refiners))
    changes: dict[str, Any] = {"refiner": refiner}
    if base.confident:
        fg = trial.suggest_float("fg_threshold", 0.1, 0.95)
        changes["fg_threshold"] = fg
        changes["bg_threshold"] = fg * trial.suggest_float("bg_ratio", 0.05, 1.0)
    changes.update(REGISTRY.get(refiner).suggest(trial, base))
    return dataclasses.replace(base, **changes)


# --------------------------------------------------------------------------------------------------
# objective


def chunk_ends(n: int, chunks: int) -> list[int]:
    """End indices of ``min(chunks, n)`` nearly equal consecutive chunks of ``n`` items."""
    k = max(1, min(chunks, n))
    return [round(n * (j + 1) / k) for j in range(k)]


class Objective:
    """The study's objective: mean per-image pet IoU of the refined validation masks (maximise).

    Args:
        data: the validation images, maps and GT (:func:`build_objective_data`).
        base: ``params.yaml``'s ``pseudo`` section.
        refiners: refiner choices (:func:`search_refiners`).
        prune_chunks: number of chunks; the pruner is asked after each whether to stop the trial.
        workers: refinement processes (0 = every CPU core).
        on_report: called with ``(trial, chunk, running mean)`` after each chunk (e.g. to log it).
        per_image: report every image's IoU (step = its index) instead of the running mean per chunk
            (step = chunk index); what :class:`optuna.pruners.WilcoxonPruner` needs.
    """

    def __init__(
        self,
        data: ObjectiveData,
        base: PseudoConfig,
        refiners: Sequence[str],
        prune_chunks: int = 1,
        workers: int = 0,
        on_report: Callable[[Any, int, float], None] | None = None,
        per_image: bool = False,
    ) -> None:
        if not len(data):
            raise DataError("no images to tune on")
        self.data = data
        self.base = base
        self.refiners = tuple(refiners)
        self.ends = chunk_ends(len(data), prune_chunks)
        self.workers = workers
        self.on_report = on_report
        self.per_image = per_image

    def __call__(self, trial: Any) -> float:
        """Score one trial's configuration; raises ``optuna.TrialPruned`` when the pruner stops it."""
        import optuna

        from wsss.evaluation import SegMeter
        from wsss.refiners import refine_many

        cfg = suggest_pseudo(trial, self.base, self.refiners)
        trial.set_user_attr("pseudo", flatten(cfg, "pseudo."))
        meter = SegMeter()
        masks = refine_many(zip(self.data.images, self.data.maps, strict=True), cfg, self.workers)
        value = float("nan")
        start = 0
        try:
            for step, end in enumerate(self.ends):
                for i in range(start, end):
                    iou = meter.add(next(masks), self.data.gts[i])
                    if self.per_image:
                        trial.report(iou, i)
                start = end
                value = meter.result().iou_mean
                if not self.per_image:
                    trial.report(value, step)
                if self.on_report is not None:
                    self.on_report(trial, step, value)
                # The last chunk completes the trial: pruning it would only throw the result away.
                if end < len(self.data) and trial.should_prune():
                    raise optuna.TrialPruned(f"running mean IoU {value:.4f} after {end} images")
        finally:
            masks.close()  # stops the pool early on pruning
        return value


# --------------------------------------------------------------------------------------------------
# study


def default_storage(study_dir: Path) -> str:
    """``sqlite:////abs/studies/<variant>/optuna.db`` (four slashes: an absolute path)."""
    db = (Path(study_dir) / STUDY_DB).resolve()
    return f"sqlite:///{db.as_posix()}"


def study_name(variant: str, data: ObjectiveData, base: PseudoConfig, refiners: Sequence[str],
               pruner: str = "median") -> str:
    """``crf-<variant>-<fingerprint>``: a new study whenever trials would be scored differently.

    The fingerprint covers what a trial's value depends on besides its sampled parameters: the
    validation data (ids and pixels, so new maps start afresh), the refiner choices, ``pseudo.confident``
    and :data:`SPACE_VERSION`, plus the pruner kind (``median`` and ``wilcoxon`` store different
    intermediate values, which the other could not compare). Other ``pseudo`` values only fill fields a
    trial does not use, and budgets, seeds and the other pruning settings do not change values either, so
    a rerun after changing them continues the same study.
    """
    h = hashlib.sha1()
    for part in (data.digest(), ",".join(refiners), str(base.confident), str(SPACE_VERSION), pruner):
        h.update(part.encode())
        h.update(b"\0")
    return f"crf-{variant}-{h.hexdigest()[:10]}"


def redact(url: str) -> str:
    """A storage URL without its password (it ends up in MLflow tags, on the console and in errors)."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}{':***' if ':' in creds else ''}@{host}"
    return url


def storage_url(url: str) -> str:
    """``url`` with a bare ``postgresql://`` (or ``postgres://``) given the driver of the ``postgres`` extra.

    SQLAlchemy's default PostgreSQL driver is psycopg2; ``pip install 'wsss[postgres]'`` installs psycopg 3,
    which SQLAlchemy names ``postgresql+psycopg``.
    """
    for bare in ("postgresql://", "postgres://"):
        if url.startswith(bare):
            return "postgresql+psycopg://" + url[len(bare):]
    return url


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 120}}  # wait for the lock (several local workers)
    if url.startswith("postgresql+psycopg"):
        return {"connect_args": {"connect_timeout": 10}}  # an unroutable host fails in seconds, not minutes
    return {}


def check_storage(url: str) -> None:
    """Connect to ``url`` once, so a bad URL, a missing driver, an unreachable server or refused credentials
    end in one line naming the storage (password masked) before any work.

    Raises:
        ConfigError: the URL is not a database URL SQLAlchemy knows (exit 2).
        MissingDependencyError: its driver is not installed (exit 1).
        TrackingError: the server cannot be reached, or refuses the login or the database (exit 4).
    """
    import sqlalchemy
    import sqlalchemy.exc

    shown = redact(url)
    try:
        engine = sqlalchemy.create_engine(url, **_engine_kwargs(url))
    except sqlalchemy.exc.NoSuchModuleError:
        raise ConfigError(f"Optuna storage {shown}: unknown database dialect (e.g. postgresql+psycopg://, "
                          "sqlite:///)") from None
    except sqlalchemy.exc.ArgumentError as exc:
        raise ConfigError(f"Optuna storage {shown}: not a database URL ({_first_line(exc)})") from None
    except ImportError as exc:
        hint = " (pip install 'wsss[postgres]')" if url.startswith("postgres") else ""
        raise MissingDependencyError(f"Optuna storage {shown}: driver not installed: {exc}{hint}") from None
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.DBAPIError as exc:
        raise TrackingError(f"Optuna storage {shown}: cannot connect: {_first_line(exc.orig)}") from None
    finally:
        engine.dispose()


def _first_line(exc: BaseException | None) -> str:
    text = str(exc).strip().splitlines()
    return text[0].strip() if text else type(exc).__name__


def make_storage(url: str, shared: bool = False) -> Any:
    """An Optuna RDB storage at ``url`` (checked first with :func:`check_storage`).

    SQLite waits for its lock (several local workers) instead of failing. A ``shared`` storage
    (``tune.storage`` or ``--storage``, possibly used by workers on other hosts) also gets Optuna's
    heartbeat: a running trial records a heartbeat every :data:`HEARTBEAT_S` seconds, and a trial silent
    for :data:`GRACE_S` is marked ``FAIL`` when any worker starts its next trial.
    """
    import optuna
    import sqlalchemy.exc

    url = storage_url(url)
    check_storage(url)
    heartbeat = {"heartbeat_interval": HEARTBEAT_S, "grace_period": GRACE_S} if shared else {}
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
                return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url) or None, **heartbeat)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.ProgrammingError):
            # Workers starting together race to create the schema; the loser finds it made on retry.
            if attempt == 4:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def make_pruner(kind: str, n_startup_trials: int, wilcoxon_p: float = 0.1) -> Any:
    """The study's pruner: ``median`` (running mean per chunk vs the other trials' median at that chunk,
    after ``n_startup_trials`` trials) or ``wilcoxon`` (per-image IoUs vs the best trial's, at
    ``wilcoxon_p``). The objective must report accordingly (:class:`Objective` ``per_image``)."""
    import optuna

    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=max(1, n_startup_trials), n_warmup_steps=0)
    if kind == "wilcoxon":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.pruners.WilcoxonPruner(p_threshold=wilcoxon_p, n_startup_steps=2)
    raise ConfigError(f"'tune.pruner' {kind!r}; valid: median, wilcoxon")


def create_study(name: str, storage: Any, seed: int, n_startup_trials: int, pruner: str = "median",
                 wilcoxon_p: float = 0.1) -> Any:
    """Create or load (``load_if_exists``) a maximising study with a seeded TPE sampler and ``pruner``.

    Args:
        name: study name.
        storage: an Optuna storage or URL.
        seed: sampler seed.
        n_startup_trials: random trials before TPE models the results; also the median pruner's warm-up.
        pruner: ``median`` or ``wilcoxon`` (:func:`make_pruner`).
        wilcoxon_p: the Wilcoxon pruner's p-value threshold.
    """
    import optuna

    with warnings.catch_warnings():
        # `group` is flagged experimental; it is what lets multivariate TPE model a conditional space.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # constant_liar: workers sharing a storage see each other's running trials as bad ones, so they
        # do not all sample the same point (with one worker no other trial is running: no effect).
        sampler = optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=n_startup_trials, multivariate=True, group=True, constant_liar=True
        )
    return optuna.create_study(
        study_name=name, storage=storage, sampler=sampler, pruner=make_pruner(pruner, n_startup_trials, wilcoxon_p),
        direction="maximize", load_if_exists=True,
    )


def claim_trial(trial: Any) -> None:
    """Record this process on ``trial`` (user attrs ``wsss.host``, ``wsss.pid``), so a later run can tell
    a trial whose process was killed from one still running (:func:`fail_orphaned_trials`)."""
    for key, value in tracking.process_tags().items():
        trial.set_user_attr(key, value)


def fail_orphaned_trials(study: Any) -> list[int]:
    """Mark the study's ``RUNNING`` trials whose process is gone ``FAIL``; returns their numbers.

    A trial of a killed ``wsss tune crf`` would otherwise stay ``RUNNING`` for ever. Gone means: its
    :func:`claim_trial` host is this one and its pid no longer exists, or it was never (or only half)
    claimed and started more than :data:`UNCLAIMED_GRACE_S` ago (killed between Optuna creating it and
    the objective claiming it); with a heartbeat storage
    (:func:`make_storage` ``shared``) also any trial silent for longer than the grace period, wherever
    it ran.
    """
    import optuna

    running = optuna.trial.TrialState.RUNNING
    storage = study._storage  # Optuna's own fail_stale_trials works on it the same way
    before = {t.number for t in study.get_trials(deepcopy=False, states=(running,))}
    for t in study.get_trials(deepcopy=False, states=(running,)):
        # claim_trial writes host, then pid: a process killed between the two left a half claim.
        claimed = HOST_ATTR in t.user_attrs and PID_ATTR in t.user_attrs
        unclaimed = not claimed and t.datetime_start is not None and (
            datetime.datetime.now() - t.datetime_start).total_seconds() > UNCLAIMED_GRACE_S
        if unclaimed or process_gone(t.user_attrs.get(HOST_ATTR), t.user_attrs.get(PID_ATTR)):
            trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, t.number)
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # another worker did it
                storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a no-op without heartbeat
    after = {t.number for t in study.get_trials(deepcopy=False, states=(running,))}
    return sorted(before - after)


def best_config(study: Any, base: PseudoConfig, refiners: Sequence[str]) -> tuple[PseudoConfig, Any]:
    """The best completed trial's configuration and the trial itself.

    Raises:
        DataError: no trial of the study has completed.
    """
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not done:
        raise DataError(f"study '{study.study_name}' has no completed trial yet; run more trials")
    best = study.best_trial
    return suggest_pseudo(best, base, refiners), best


def write_best_params(dest: Path, cfg: PseudoConfig, header: Sequence[str] = ()) -> None:
    """Write ``pseudo:`` (a full mapping, strictly loadable) atomically, with comment lines on top.

    Raises:
        ConfigError: the configuration would not pass the strict loader (a bug in the search space).
    """
    from wsss.io import write_text

    data = {"pseudo": to_dict(cfg)}
    params_from_dict(data, str(dest))  # never write a file make-pseudo would reject
    lines = [f"# {h}" for h in header]
    write_text(dest, "\n".join(lines) + ("\n" if lines else "") + yaml.safe_dump(data, sort_keys=False))


def load_best_params(path: Path) -> PseudoConfig:
    """Read a best-params file written by :func:`write_best_params`, strictly.

    Raises:
        ConfigError: the file is not valid YAML or not a valid ``pseudo`` mapping.
    """
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or set(data) != {"pseudo"}:
        raise ConfigError(f"{path}: must hold exactly one top-level key 'pseudo' (rerun `wsss tune crf`)")
    return params_from_dict(data, str(path)).pseudo
