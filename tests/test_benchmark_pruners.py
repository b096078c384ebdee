"""benchmarks/pruners.py's bookkeeping on a hand-made study (the benchmark itself runs on demand)."""

from __future__ import annotations

import sys
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import pruners  # noqa: E402


def _study() -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
    values = iter([0.5, None, 0.7])

    def objective(trial: optuna.Trial) -> float:
        v = next(values)
        for step in range(2 if v is None else 10):  # wilcoxon-style: one report per image
            trial.report(0.1, step)
        if v is None:
            raise optuna.TrialPruned()
        return v

    study.optimize(objective, n_trials=3)
    return study


def test_summary_counts_images_and_tracks_the_best() -> None:
    row = pruners.summarise(_study(), n_images=10, pruner="wilcoxon", chunks=5, wall_s=3.0)
    assert (row["complete"], row["pruned"], row["best_value"]) == (2, 1, 0.7)
    assert row["images_refined"] == 10 + 2 + 10 and row["full_cost_images"] == 30
    assert [c["best"] for c in row["curve"]] == [0.5, 0.5, 0.7]
    assert pruners.best_within(row["curve"], "images", 12) == 0.5
    assert pruners.best_within(row["curve"], "images", 5) is None
    # median: a pruned trial's last step is a chunk index, worth chunk_ends(10, 5)[1] = 4 images
    trial = [t for t in _study().trials if t.state.name == "PRUNED"][0]
    assert pruners.images_refined(trial, 10, "median", 5) == 4


def test_verdict_prefers_quality_then_cost() -> None:
    m = {"median": {"best_value": 0.60, "images_refined": 900}, "wilcoxon": {"best_value": 0.61, "images_refined": 1000}}
    assert pruners.verdict(m).startswith("wilcoxon: higher")
    m["wilcoxon"]["best_value"] = 0.601
    assert pruners.verdict(m).startswith("median: the same")
