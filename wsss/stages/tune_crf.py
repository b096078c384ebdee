"""Stage ``tune-crf``: an Optuna study of the refiner and its parameters on the validation split.

Writes ``reports/crf/<variant>.yaml`` (the best trial's full ``pseudo:`` mapping, which ``make-pseudo``
prefers over ``params.yaml``) and keeps the study in ``studies/<variant>/optuna.db``, or in the RDB
given by ``--storage`` / ``tune.storage`` (workers on many machines may share it), and
``studies/<variant>/study.json`` (study name, storage with its password masked, trial counts).
Running it again continues the same study; the best-params file always reflects every trial stored.
A trial left ``RUNNING`` by a killed run is marked ``FAIL`` first (:func:`wsss.tuning.fail_orphaned_trials`);
an explicit storage also gets Optuna's heartbeat. The storage is checked before any work: a bad URL, a
missing driver, an unreachable server or a refused login is one line naming it (exit 2, 1, 4).

MLflow: one parent run per invocation (stage ``tune-crf``) and one nested run per trial, logged by hand
(:mod:`wsss.trial_runs`; Optuna's MLflowCallback is deprecated and does not create the parent). A child run
ends FINISHED (tag ``optuna.state=COMPLETE``), KILLED (``PRUNED``) or FAILED (``FAIL``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

from wsss import tracking
from wsss.config import Params
from wsss.data.manifest import load_manifest
from wsss.errors import DataError
from wsss.io import write_json
from wsss.paths import Paths
from wsss.refiners import REGISTRY
from wsss.trial_runs import logged_objective, progress, state_counts
from wsss.trial_runs import n_trials as stored_trials
from wsss.tuning import (
    Objective,
    best_config,
    build_objective_data,
    create_study,
    default_storage,
    fail_orphaned_trials,
    make_storage,
    redact,
    search_refiners,
    seed_trials,
    study_name,
    tuning_rows,
    write_best_params,
)
from wsss.ui import console, task

STAGE = "tune-crf"


def run(
    params: Params,
    paths: Paths,
    variant: str,
    trials: int | None = None,
    timeout_s: float | None = None,
    storage: str | None = None,
    study: str | None = None,
) -> dict[str, Any]:
    """Run (or continue) the study for one map variant and write its best parameters.

    Args:
        params: all params (reads ``tune`` and ``pseudo``).
        paths: project paths.
        variant: map variant under ``cams/`` (e.g. ``cam_classifier-species``).
        trials: trials to add in this invocation (default ``tune.trials``).
        timeout_s: stop starting new trials after this many seconds (default ``tune.timeout_s``; 0 = none).
        storage: Optuna storage URL (default ``tune.storage``, and when that is empty SQLite in
            ``studies/<variant>/``); an RDB server lets many workers share one study.
        study: study name (default ``crf-<variant>-<fingerprint of the objective>``).

    Returns:
        Summary: study name, storage, trial counts, best value and trial number.
    """
    cfg = params.tune
    cams_dir = paths.cams_dir(variant)
    if not (cams_dir / "_done.json").exists():
        raise DataError(f"{cams_dir}: no finished maps for '{variant}'; run `wsss make-cams` first")
    refiners = search_refiners(params.pseudo, cfg.refiners)
    if any(REGISTRY.get(r).uses_crf for r in refiners):
        from wsss.refine import require_crf

        require_crf()
    n_trials = cfg.trials if trials is None else trials
    timeout = cfg.timeout_s if timeout_s is None else timeout_s
    storage = storage or cfg.storage or None
    paths.study_dir(variant).mkdir(parents=True, exist_ok=True)
    url = storage or default_storage(paths.study_dir(variant))
    store = make_storage(url, shared=storage is not None)  # fails fast, before loading anything
    df = load_manifest(paths.manifest)
    with task(f"{STAGE} {variant}: load validation data",
              len(tuning_rows(df, cfg.max_images, cfg.seed))) as advance:
        data = build_objective_data(df, paths.prepared, cams_dir, cfg.max_images, cfg.seed, progress=advance)
    name = study or study_name(variant, data, params.pseudo, refiners, cfg.pruner)
    study_obj = _open_study(params, name, store, shared=storage is not None, refiners=refiners)

    start = time.perf_counter()
    # The logged params hold tune.storage with its password masked (the MLflow store is no place for it).
    logged_params = dataclasses.replace(params, tune=dataclasses.replace(cfg, storage=redact(cfg.storage)))
    with tracking.stage_run(STAGE, variant, logged_params, paths, sections=("tune", "pseudo"),
                            extra_tags={"optuna.study": name, "optuna.storage": redact(url)}) as parent:
        objective = Objective(data, params.pseudo, refiners, cfg.prune_chunks, params.pseudo.workers,
                              on_report=_log_running, per_image=cfg.pruner == "wilcoxon")
        logged = _logged_objective(objective, parent.info.experiment_id, variant, name)
        finished: list[int] = []
        with task(f"{STAGE} {variant}: trials", n_trials) as advance:
            study_obj.optimize(
                logged, n_trials=n_trials, timeout=timeout or None, callbacks=[progress(advance, finished)],
                gc_after_trial=False,
            )
        best_cfg, best = best_config(study_obj, params.pseudo, refiners)
        counts = state_counts(study_obj)
        dest = paths.crf_params(variant)
        write_best_params(dest, best_cfg, header=[
            f"Best of Optuna study '{name}' ({sum(counts.values())} trials): trial {best.number}, "
            f"mean val fg IoU {best.value:.4f} on {len(data)} images.",
            "Written by `wsss tune crf`; `wsss make-pseudo` uses it instead of params.yaml's pseudo section.",
        ])
        summary = {
            "study": name,
            "storage": redact(url),
            "n_images": len(data),
            "trials_this_run": len(finished),
            **{f"trials_{k.lower()}": v for k, v in counts.items()},
            "best_value": float(best.value),
            "best_trial": best.number,
            "seconds": round(time.perf_counter() - start, 2),
        }
        tracking.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        write_json(paths.study_dir(variant) / "study.json", {k: v for k, v in summary.items() if k != "seconds"})
        tracking.log_artifact(dest)
    console.print(
        f"{variant}: best val fg IoU {best.value:.4f} (trial {best.number}, refiner {best_cfg.refiner}) "
        f"over {sum(counts.values())} trials of study '{name}' -> {dest}"
    )
    return summary


def _open_study(params: Params, name: str, store: Any, shared: bool, refiners: tuple[str, ...]) -> Any:
    """Create or load study ``name`` in ``store``, seeded to continue its random stream; a new study first gets
    the seed trials (the params.yaml configuration and the label-free rectangle prior)."""
    import optuna

    cfg = params.tune
    # Continue the random stream instead of replaying it: a resumed study would otherwise repeat its
    # first trials. Workers sharing an explicit storage also get their process id mixed in (their
    # interleaving makes such studies non-reproducible anyway).
    n_before = stored_trials(store, name)
    seed = cfg.seed + 1_000_003 * n_before + (os.getpid() if shared else 0)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar and MLflow say it all
    study_obj = create_study(name, store, seed % 2**32, cfg.n_startup_trials, cfg.pruner, cfg.wilcoxon_p)
    failed = fail_orphaned_trials(study_obj)
    if failed:
        console.print(f"study '{name}': trial(s) {', '.join(map(str, failed))} of a killed run marked FAIL")
    if n_before == 0:
        for seed_params in seed_trials(params.pseudo, refiners):
            study_obj.enqueue_trial(seed_params, skip_if_exists=True)
    return study_obj


def _log_running(trial: Any, step: int, value: float) -> None:
    tracking.log_metrics({"val_iou_running": value}, step=step)


def _logged_objective(objective: Callable[[Any], float], experiment_id: str, variant: str,
                      study: str) -> Callable[[Any], float]:
    """Every trial a nested MLflow run (:func:`wsss.trial_runs.logged_objective`), logging its pseudo config."""
    return logged_objective(objective, experiment_id, STAGE, variant, study, attrs_key="pseudo")
