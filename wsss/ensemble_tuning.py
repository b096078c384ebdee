"""Optuna search of the ensemble's member weights on the validation split (``wsss tune ensemble``).

The objective of a weighting is the mean per-image pet IoU on the **validation split only** (pets with a
GT mask; never test) of the fused map (:func:`wsss.methods.ensemble.fuse` with ``make_cams.ensemble_fusion``)
thresholded at the best threshold of :data:`wsss.methods.ensemble.THRESHOLD_GRID` (the threshold is
recorded; ``tune crf`` later chooses the pseudo-mask threshold and refiner of the fused maps anyway).
Each member's weight is sampled in [0, 1]; every fusion is scale-free, so only their ratios matter.

The guarantee: a new study first evaluates every single-member weighting (one weight 1, the others 0)
and the params.yaml weighting (:func:`seed_weightings`). The best trial is the best of all trials, so the
tuned ensemble is never worse on val than its best single member scored the same way.

This module does no MLflow logging; the ``tune-ensemble`` stage does. Files go through
:func:`write_weights` / :func:`load_weights` only.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from wsss.config import CamsConfig
from wsss.errors import ConfigError, DataError

# Bump when the search space or the objective changes: part of the study name.
SPACE_VERSION = 1
ATTRS_KEY = "ensemble"  # trial user attr holding what the trial scored (logged to MLflow)


@dataclass(frozen=True)
class EnsembleData:
    """Validation maps of every member and the GT, loaded once.

    Attributes:
        members: member variants, in ``make_cams.ensemble_members`` order.
        ids: image ids.
        maps: per image, one (H, W) float32 map per member.
        gts: per image, the (H, W) GT mask (0, 1, 255).
    """

    members: tuple[str, ...]
    ids: tuple[str, ...]
    maps: tuple[tuple[np.ndarray, ...], ...]
    gts: tuple[np.ndarray, ...]

    def __len__(self) -> int:
        return len(self.ids)

    def digest(self) -> str:
        """SHA-1 over members, ids and pixel data: identifies the objective's data exactly."""
        h = hashlib.sha1(",".join(self.members).encode())
        for i, maps, gt in zip(self.ids, self.maps, self.gts, strict=True):
            h.update(i.encode())
            for arr in (*maps, gt):
                h.update(str(arr.shape).encode())
                h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()


def ensemble_members(cfg: CamsConfig, tuned: Path | None = None) -> tuple[list[str], list[float]]:
    """The ensemble's member variants and their weights.

    The weights are the tuned ones of ``tuned`` (``reports/ensemble-weights.yaml``, written by
    ``wsss tune ensemble``) when that file exists, else ``make_cams.ensemble_weights`` (equal when empty).

    Raises:
        ConfigError: fewer than two members, or a tuned file that is invalid or was tuned for other members
            or another fusion than params.yaml's.
    """
    if len(cfg.ensemble_members) < 2:
        raise ConfigError("params.yaml: 'make_cams.ensemble_members' must list at least two map variants")
    members = list(cfg.ensemble_members)
    if tuned is not None and Path(tuned).exists():
        tuned_members, weights, fusion = load_weights(Path(tuned))
        if tuned_members != members or fusion != cfg.ensemble_fusion:
            raise ConfigError(
                f"{tuned}: tuned for members {tuned_members} ({fusion}), but params.yaml's make_cams lists "
                f"{members} ({cfg.ensemble_fusion}); rerun `wsss tune ensemble` (or delete the file)")
        return members, weights
    return members, list(cfg.ensemble_weights) or [1.0] * len(members)


def build_ensemble_data(df: pd.DataFrame, prepared_dir: Path, member_dirs: Sequence[Path], members: Sequence[str],
                        max_images: int = 0, seed: int = 0,
                        progress: Callable[[int], None] | None = None) -> EnsembleData:
    """Load the validation maps of every member and the GT (rows as :func:`wsss.tuning.tuning_rows`).

    Raises:
        DataError: no validation image with a mask, a member without finished maps or without a map of a
            validation image, or a map whose size is not its GT's.
    """
    from wsss.cams import load_maps
    from wsss.data.readers import read_mask
    from wsss.tuning import tuning_rows

    rows = tuning_rows(df, max_images, seed)
    if rows.empty:
        raise DataError("the manifest has no validation pets with GT masks to tune on (prepare.val_fraction?)")
    ids = [str(i) for i in rows["id"]]
    loaded = []
    for member, folder in zip(members, member_dirs, strict=True):
        if not (Path(folder) / "_done.json").exists():
            raise DataError(f"{folder}: ensemble member '{member}' has no finished maps; run `wsss make-cams` first")
        maps = load_maps(folder, set(ids))
        missing = [i for i in ids if i not in maps]
        if missing:
            raise DataError(f"{folder}: no map for {len(missing)} validation image(s) (e.g. {missing[0]}); "
                            "rerun `wsss make-cams`")
        loaded.append(maps)
    per_image, gts = [], []
    for row in rows.itertuples():
        gt = read_mask(Path(prepared_dir) / row.mask_path)
        maps = tuple(m[str(row.id)] for m in loaded)
        for folder, m in zip(member_dirs, maps, strict=True):
            if m.shape != gt.shape:
                raise DataError(f"{folder}: map of {row.id} is {m.shape}, its GT {gt.shape}; rerun `wsss make-cams`")
        per_image.append(maps)
        gts.append(gt)
        if progress is not None:
            progress(1)
    return EnsembleData(tuple(members), tuple(ids), tuple(per_image), tuple(gts))


def score_weights(data: EnsembleData, weights: Sequence[float], fusion: str) -> tuple[float, float | None]:
    """(mean val pet IoU at the best grid threshold, that threshold) of one weighting; (0, None) when every
    weight is 0 (no map)."""
    from wsss.evaluation import THRESHOLD_GRID, threshold_curve
    from wsss.methods.ensemble import fuse

    if not any(w > 0 for w in weights):
        return 0.0, None
    fused = (fuse(list(maps), weights, fusion) for maps in data.maps)  # type: ignore[type-var]
    curve = threshold_curve(fused, data.gts, THRESHOLD_GRID)
    scores = [s if math.isfinite(s) else -1.0 for s in curve["iou_mean"]]
    best = int(np.argmax(scores))
    return float(curve["iou_mean"][best]), float(THRESHOLD_GRID[best])


def weight_key(member: str) -> str:
    """The Optuna parameter of a member's weight: ``w.<member>``."""
    return f"w.{member}"


def suggest_weights(trial: Any, members: Sequence[str]) -> list[float]:
    """One weight in [0, 1] per member (a ``FrozenTrial`` gives back the ones it sampled)."""
    return [float(trial.suggest_float(weight_key(m), 0.0, 1.0)) for m in members]


def seed_weightings(members: Sequence[str], configured: Sequence[float]) -> list[dict[str, float]]:
    """Trials a new study evaluates first: every single-member weighting (the val guarantee), then the
    configured weights scaled to a maximum of 1 (when not already one of them)."""
    out = [{weight_key(m): float(m == k) for m in members} for k in members]
    peak = max(configured, default=0.0)
    if peak > 0:
        scaled = {weight_key(m): float(w) / peak for m, w in zip(members, configured, strict=True)}
        if scaled not in out:
            out.append(scaled)
    return out


class EnsembleObjective:
    """Mean val pet IoU of the fused map at its best grid threshold (maximise); records weights and threshold."""

    def __init__(self, data: EnsembleData, fusion: str) -> None:
        if not len(data):
            raise DataError("no images to tune on")
        self.data = data
        self.fusion = fusion

    def __call__(self, trial: Any) -> float:
        """Score one trial's weighting."""
        weights = suggest_weights(trial, self.data.members)
        value, threshold = score_weights(self.data, weights, self.fusion)
        trial.set_user_attr("threshold", threshold)
        trial.set_user_attr(ATTRS_KEY, {"ensemble.fusion": self.fusion, "ensemble.threshold": threshold,
                                        **{f"ensemble.{weight_key(m)}": w
                                           for m, w in zip(self.data.members, weights, strict=True)}})
        return value


def study_name(data: EnsembleData, fusion: str) -> str:
    """``ensemble-<fingerprint>`` of the val data (members, ids, pixels), fusion and :data:`SPACE_VERSION`."""
    h = hashlib.sha1()
    for part in (data.digest(), fusion, str(SPACE_VERSION)):
        h.update(part.encode())
        h.update(b"\0")
    return f"ensemble-{h.hexdigest()[:10]}"


def best_weights(study: Any, members: Sequence[str]) -> tuple[list[float], Any]:
    """The best completed trial's weights and the trial.

    Raises:
        DataError: no trial has completed, or the best one has no weight above 0.
    """
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not done:
        raise DataError(f"study '{study.study_name}' has no completed trial yet; run more trials")
    best = study.best_trial
    weights = suggest_weights(best, members)
    if not any(w > 0 for w in weights):
        raise DataError(f"study '{study.study_name}': the best trial weights every member 0")
    return weights, best


def write_weights(dest: Path, members: Sequence[str], weights: Sequence[float], fusion: str,
                  val: dict[str, Any], header: Sequence[str] = ()) -> None:
    """Write the tuned weighting atomically (``ensemble: {members, weights, fusion, val}``), comments on top."""
    from wsss.io import write_text

    data = {"ensemble": {"members": list(members), "weights": [round(float(w), 6) for w in weights],
                         "fusion": fusion, "val": val}}
    _check_weights(data, str(dest))
    lines = [f"# {h}" for h in header]
    write_text(dest, "\n".join(lines) + ("\n" if lines else "") + yaml.safe_dump(data, sort_keys=False))


def load_weights(path: Path) -> tuple[list[str], list[float], str]:
    """(members, weights, fusion) of a file written by :func:`write_weights`, read strictly.

    Raises:
        ConfigError: not valid YAML, or not a valid ``ensemble`` mapping (the message names the file).
    """
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc}") from None
    return _check_weights(data, str(path))


def _check_weights(data: Any, source: str) -> tuple[list[str], list[float], str]:
    from wsss.methods.ensemble import FUSIONS
    from wsss.variants import MapVariant

    ens = data.get("ensemble") if isinstance(data, dict) and set(data) == {"ensemble"} else None
    if not isinstance(ens, dict) or not {"members", "weights", "fusion"} <= set(ens) <= {
            "members", "weights", "fusion", "val"}:
        raise ConfigError(f"{source}: must hold one key 'ensemble' with members, weights, fusion (and val); "
                          "rerun `wsss tune ensemble`")
    members, weights, fusion = ens["members"], ens["weights"], ens["fusion"]
    if not isinstance(members, list) or not all(isinstance(m, str) for m in members) or len(members) < 2:
        raise ConfigError(f"{source}: 'ensemble.members' must list at least two map variants")
    for m in members:
        try:
            MapVariant.parse(m)
        except ConfigError as exc:
            raise ConfigError(f"{source}: 'ensemble.members': {exc}") from None
    ok = isinstance(weights, list) and len(weights) == len(members) and all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0 for w in weights)
    if not ok or not any(w > 0 for w in weights):
        raise ConfigError(f"{source}: 'ensemble.weights' needs one finite non-negative weight per member, "
                          "not all zero")
    if fusion not in FUSIONS:
        raise ConfigError(f"{source}: 'ensemble.fusion' {fusion!r}; valid: {', '.join(FUSIONS)}")
    return list(members), [float(w) for w in weights], str(fusion)
