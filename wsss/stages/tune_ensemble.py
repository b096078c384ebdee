"""Stage ``tune-ensemble``: an Optuna study of the ensemble's member weights on the validation split.

Writes ``reports/ensemble-weights.yaml`` (members, tuned weights, fusion and the val scores: the tuned
weighting's and every single member's), which ``make-cams --method ensemble`` and ``evaluate --pseudo
ensemble`` use instead of ``make_cams.ensemble_weights``, and keeps the study in
``studies/ensemble-weights/optuna.db`` (or any RDB URL). A new study first scores every single-member
weighting and the params.yaml one (:func:`wsss.ensemble_tuning.seed_weightings`), so the tuned ensemble is
never worse on val than its best member. Running it again continues the study; a trial left ``RUNNING``
by a killed run is marked ``FAIL`` first.

MLflow: one parent run per invocation (stage ``tune-ensemble``) and one nested run per trial
(:mod:`wsss.trial_runs`).
"""

from __future__ import annotations

import os
import time
from typing import Any

from wsss import tracking
from wsss.config import Params
from wsss.data.manifest import load_manifest
from wsss.ensemble_tuning import (
    ATTRS_KEY,
    EnsembleObjective,
    best_weights,
    build_ensemble_data,
    ensemble_members,
    score_weights,
    seed_weightings,
    study_name,
    write_weights,
)
from wsss.paths import Paths
from wsss.trial_runs import logged_objective, progress, state_counts
from wsss.trial_runs import n_trials as stored_trials
from wsss.tuning import create_study, default_storage, fail_orphaned_trials, make_storage, redact, tuning_rows
from wsss.ui import console, task

STAGE = "tune-ensemble"
VARIANT = "ensemble"


def run(params: Params, paths: Paths, trials: int | None = None, timeout_s: float | None = None,
        storage: str | None = None, study: str | None = None) -> dict[str, Any]:
    """Run (or continue) the weight study of ``make_cams.ensemble_members`` and write the best weighting.

    Args:
        params: all params (reads ``tune_ensemble`` and ``make_cams``).
        paths: project paths.
        trials: trials to add in this invocation (default ``tune_ensemble.trials``; a new study's seed
            trials come on top).
        timeout_s: stop starting new trials after this many seconds (default ``tune_ensemble.timeout_s``).
        storage: Optuna storage URL (default SQLite in ``studies/ensemble-weights/``).
        study: study name (default ``ensemble-<fingerprint of the objective>``).

    Returns:
        Summary: study, trial counts, best value and trial, the weights and each single member's val IoU.
    """
    cfg = params.tune_ensemble
    cams = params.make_cams
    members, configured = ensemble_members(cams)  # never the tuned file: the study's own seed is params.yaml
    df = load_manifest(paths.manifest)
    with task(f"{STAGE}: load validation maps", len(tuning_rows(df, cfg.max_images, cfg.seed))) as advance:
        data = build_ensemble_data(df, paths.prepared, [paths.cams_dir(m) for m in members], members,
                                   cfg.max_images, cfg.seed, progress=advance)
    name = study or study_name(data, cams.ensemble_fusion)
    if storage is None:
        paths.ensemble_study_dir.mkdir(parents=True, exist_ok=True)
    url = storage or default_storage(paths.ensemble_study_dir)
    n_add = cfg.trials if trials is None else trials
    timeout = cfg.timeout_s if timeout_s is None else timeout_s

    start = time.perf_counter()
    with tracking.stage_run(STAGE, VARIANT, params, paths, sections=("tune_ensemble", "make_cams"),
                            extra_tags={"optuna.study": name, "optuna.storage": redact(url)}) as parent:
        study_obj, n_seeds = _open_study(params, name, url, storage is not None, members, configured)
        logged = logged_objective(EnsembleObjective(data, cams.ensemble_fusion), parent.info.experiment_id,
                                  STAGE, VARIANT, name, attrs_key=ATTRS_KEY)
        finished: list[int] = []
        with task(f"{STAGE}: trials", n_add + n_seeds) as advance:
            study_obj.optimize(logged, n_trials=n_add + n_seeds, timeout=timeout or None,
                               callbacks=[progress(advance, finished)], gc_after_trial=False)
        weights, best = best_weights(study_obj, members)
        singles = {m: score_weights(data, [float(m == k) for k in members], cams.ensemble_fusion)[0]
                   for m in members}
        counts = state_counts(study_obj)
        val = {"iou_mean": round(float(best.value), 6), "threshold": best.user_attrs.get("threshold"),
               "n_images": len(data), "single_member_iou": {m: round(v, 6) for m, v in singles.items()}}
        write_weights(paths.ensemble_weights, members, weights, cams.ensemble_fusion, val, header=[
            f"Best of Optuna study '{name}' ({sum(counts.values())} trials): trial {best.number}, mean val "
            f"fg IoU {best.value:.4f} on {len(data)} images (best single member {max(singles.values()):.4f}).",
            "Written by `wsss tune ensemble`; `wsss make-cams --method ensemble` fuses with these weights.",
        ])
        summary = {
            "study": name, "storage": redact(url), "n_images": len(data), "trials_this_run": len(finished),
            **{f"trials_{k.lower()}": v for k, v in counts.items()},
            "best_value": float(best.value), "best_trial": best.number,
            "best_single_member_value": max(singles.values()),
            "weights": dict(zip(members, weights, strict=True)),
            "seconds": round(time.perf_counter() - start, 2),
        }
        tracking.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        tracking.log_metrics({f"single_iou.{m}": v for m, v in singles.items()})
        tracking.log_artifact(paths.ensemble_weights)
    shown = ", ".join(f"{m} {w:.2f}" for m, w in zip(members, weights, strict=True))
    console.print(f"ensemble: best val fg IoU {best.value:.4f} (trial {best.number}; best single member "
                  f"{max(singles.values()):.4f}) with weights {shown} -> {paths.ensemble_weights}")
    return summary


def _open_study(params: Params, name: str, url: str, shared: bool, members: list[str],
                configured: list[float]) -> tuple[Any, int]:
    """Create or load the study; a new one gets the seed weightings enqueued. Returns it and their number."""
    import optuna

    cfg = params.tune_ensemble
    store = make_storage(url, shared=shared)
    n_before = stored_trials(store, name)
    # Continue the random stream instead of replaying it (as tune-crf).
    seed = cfg.seed + 1_000_003 * n_before + (os.getpid() if shared else 0)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study_obj = create_study(name, store, seed % 2**32, cfg.n_startup_trials)
    failed = fail_orphaned_trials(study_obj)
    if failed:
        console.print(f"study '{name}': trial(s) {', '.join(map(str, failed))} of a killed run marked FAIL")
    # Every seed weighting without a completed trial is (re-)enqueued, also after a kill that failed one
    # (Optuna's skip_if_exists would skip a FAILed one and lose the guarantee); they come on top of --trials.
    state = optuna.trial.TrialState
    done = [t.params for t in study_obj.get_trials(deepcopy=False, states=(state.COMPLETE,))]
    pending = [t.system_attrs.get("fixed_params") for t in study_obj.get_trials(deepcopy=False, states=(state.WAITING,))]
    for s in seed_weightings(members, configured):
        if s not in done and s not in pending:
            study_obj.enqueue_trial(s)
    return study_obj, len(study_obj.get_trials(deepcopy=False, states=(state.WAITING,)))
