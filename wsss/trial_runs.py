"""MLflow bookkeeping shared by the Optuna stages (``tune-crf``, ``tune-ensemble``): one nested run per trial
under the invocation's parent run, a progress callback, and small study helpers (``redact`` of a storage
URL lives in :mod:`wsss.tuning`).

Every MLflow call is guarded (:func:`wsss.tracking.guard`): a tracking failure mid-study must not fail a trial.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from wsss import tracking
from wsss.tuning import claim_trial


def logged_objective(objective: Callable[[Any], float], experiment_id: str, stage: str, variant: str, study: str,
                     attrs_key: str) -> Callable[[Any], float]:
    """Wrap ``objective`` so every trial is a nested MLflow run with its params, value and final state.

    A child run ends FINISHED (tag ``optuna.state=COMPLETE``), KILLED (``PRUNED``) or FAILED (``FAIL``).
    Logged params: ``trial.<name>`` per sampled parameter plus the dict the objective stored in the
    trial's user attr ``attrs_key`` (e.g. the full configuration it scored).
    """
    import mlflow
    import optuna

    def run_trial(trial: Any) -> float:
        claim_trial(trial)
        tracking.guard(
            mlflow.start_run,
            experiment_id=experiment_id, run_name=f"trial-{trial.number}", nested=True,
            tags={"wsss.stage": stage, "wsss.variant": variant, "optuna.study": study,
                  "optuna.trial": str(trial.number), "optuna.state": "RUNNING"},
        )
        status, state = "FAILED", "FAIL"
        try:
            value = objective(trial)
            tracking.log_metrics({"val_iou_mean": value})
            status, state = "FINISHED", "COMPLETE"
            return value
        except optuna.TrialPruned:
            status, state = "KILLED", "PRUNED"
            raise
        finally:
            # Params are logged last so a pruned or failed trial still records what it tried.
            logged = {f"trial.{k}": v for k, v in trial.params.items()}
            logged.update(trial.user_attrs.get(attrs_key, {}))
            if logged:
                tracking.guard(mlflow.log_params, logged)
            tracking.guard(mlflow.set_tag, "optuna.state", state)
            tracking.guard(mlflow.end_run, status=status)

    return run_trial


def progress(advance: Callable[..., None], finished: list[int]) -> Callable[[Any, Any], None]:
    """An Optuna callback: one progress step per finished trial, showing the best value so far.

    It runs in the parent run's context, where it also logs each completed trial's value (step = trial
    number) so the parent's chart shows the study's progress. Trial numbers run here go to ``finished``.
    """

    def callback(study: Any, trial: Any) -> None:
        finished.append(trial.number)
        try:
            best = f"best {study.best_value:.4f} (#{study.best_trial.number})"
        except ValueError:  # no completed trial yet
            best = "no completed trial yet"
        if trial.value is not None:
            tracking.log_metrics({"trial_value": trial.value}, step=trial.number)
        advance(1, info=f"{trial.state.name.lower()}; {best}")

    return callback


def n_trials(storage: Any, name: str) -> int:
    """Trials already stored in study ``name`` (0 when it does not exist yet)."""
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return 0
    return len(storage.get_all_trials(study_id, deepcopy=False))


def state_counts(study: Any) -> dict[str, int]:
    """Finished trials of ``study`` by state name (COMPLETE, PRUNED, FAIL)."""
    import optuna

    states = [t.state for t in study.get_trials(deepcopy=False)]
    return {s.name: states.count(s) for s in optuna.trial.TrialState if s.is_finished()}
