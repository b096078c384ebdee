"""tune ensemble: member weights tuned on val, never worse than the best single member; the weights file."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from tests.test_make_pseudo import VARIANT, build_project
from wsss.cams import load_maps
from wsss.errors import ConfigError, DataError
from wsss.io import read_json

# A model's maps and a prior (the cheap one: GrabCut's own maps are tested in tests/test_priors.py).
MEMBERS = [VARIANT, "prior-ellipse"]
PARAMS = {"pseudo": {"workers": 1},
          "make_cams": {"shard_size": 8, "ensemble_members": MEMBERS, "ensemble_weights": [1.0, 1.0]},
          "tune_ensemble": {"trials": 2, "n_startup_trials": 1}}


def _data(n: int = 6, seed: int = 0):
    """Val data where member 0 is good, member 1 noise and member 2 an inverted map."""
    from wsss.ensemble_tuning import EnsembleData

    rng = np.random.default_rng(seed)
    maps, gts = [], []
    for _ in range(n):
        gt = np.zeros((20, 24), np.uint8)
        gt[5:15, 6:18] = 1
        good = np.clip(gt + rng.normal(0, 0.3, gt.shape), 0, 1).astype(np.float32)
        good /= good.max()
        noise = rng.random(gt.shape).astype(np.float32)
        noise /= noise.max()
        maps.append((good, noise, (1.0 - good).astype(np.float32)))
        gts.append(gt)
    return EnsembleData(("a", "b", "c"), tuple(f"i{k}" for k in range(n)), tuple(maps), tuple(gts))


def _single_best(data, k: int) -> float:
    """A member's own val IoU at its best grid threshold, computed without the fusion."""
    from wsss.evaluation import THRESHOLD_GRID, threshold_curve

    return max(threshold_curve([m[k] / m[k].max() for m in data.maps], data.gts, THRESHOLD_GRID)["iou_mean"])


@pytest.mark.parametrize("fusion", ["mean", "max", "geomean"])
def test_tuned_weights_are_never_worse_on_val_than_the_best_member(tmp_path: Path, fusion: str) -> None:
    import optuna

    from wsss.ensemble_tuning import EnsembleObjective, best_weights, score_weights, seed_weightings
    from wsss.tuning import create_study

    data = _data()
    study = create_study("s", f"sqlite:///{tmp_path / 'o.db'}", seed=0, n_startup_trials=1)
    for s in seed_weightings(data.members, [1.0, 1.0, 1.0]):
        study.enqueue_trial(s)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(EnsembleObjective(data, fusion), n_trials=5)  # 4 seeds + 1 sampled
    weights, best = best_weights(study, data.members)
    singles = [_single_best(data, k) for k in range(3)]
    assert best.value >= max(singles) - 1e-12
    assert score_weights(data, weights, fusion)[0] == pytest.approx(best.value)
    # The single-member trials score exactly what the member scores alone.
    for k in range(len(data.members)):
        one_hot = [float(j == k) for j in range(3)]
        assert score_weights(data, one_hot, fusion)[0] == pytest.approx(singles[k])
    assert score_weights(data, [0.0, 0.0, 0.0], fusion) == (0.0, None)


def test_seed_weightings_cover_every_member_and_the_configured_weights() -> None:
    from wsss.ensemble_tuning import seed_weightings

    seeds = seed_weightings(["a", "b"], [2.0, 1.0])
    assert seeds == [{"w.a": 1.0, "w.b": 0.0}, {"w.a": 0.0, "w.b": 1.0}, {"w.a": 1.0, "w.b": 0.5}]
    assert seed_weightings(["a", "b"], [3.0, 0.0]) == seeds[:2]  # already a single-member weighting


def _project(project: Path):
    from wsss.cli import app

    paths = build_project(project, PARAMS)
    assert CliRunner().invoke(app, ["make-cams", "--method", "prior-ellipse"]).exit_code == 0
    return paths


def test_tune_ensemble_cli_writes_weights_used_by_make_cams(project: Path) -> None:
    from wsss.cli import app
    from wsss.config import load_params
    from wsss.ensemble_tuning import ensemble_members

    paths = _project(project)
    result = CliRunner().invoke(app, ["tune", "ensemble"])
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load(paths.ensemble_weights.read_text())["ensemble"]
    assert saved["members"] == MEMBERS and saved["fusion"] == "mean" and len(saved["weights"]) == 2
    singles = saved["val"]["single_member_iou"]
    assert set(singles) == set(MEMBERS) and saved["val"]["iou_mean"] >= max(singles.values())
    params = load_params(paths.root / "params.yaml")
    assert ensemble_members(params.make_cams, paths.ensemble_weights)[1] == saved["weights"]

    # MLflow: one parent run and one nested run per trial (2 single-member seeds + params' equal weights + 2).
    import mlflow

    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string="tags.`wsss.stage` = 'tune-ensemble'")
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) - len(children) == 1 and len(children) == 5

    # make-cams --method ensemble fuses with the tuned weights.
    assert CliRunner().invoke(app, ["make-cams", "--method", "ensemble"]).exit_code == 0
    report = read_json(paths.cams_report("ensemble"))
    assert report["weights_source"] == "tuned" and report["weights"] == saved["weights"]
    from wsss.methods.ensemble import fuse

    members = [load_maps(paths.cams_dir(m), None) for m in MEMBERS]
    fused = load_maps(paths.cams_dir("ensemble"), None)
    i = sorted(fused)[0]
    expected = fuse([m[i] for m in members], saved["weights"], "mean").astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(fused[i], expected, atol=1e-3)

    # A rerun continues the study: no seed trial again, only the new trials.
    again = CliRunner().invoke(app, ["tune", "ensemble", "--trials", "1"])
    assert again.exit_code == 0, again.output
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string="tags.`wsss.stage` = 'tune-ensemble'")
    assert len([r for r in runs if "mlflow.parentRunId" in r.data.tags]) == 6


def test_stale_or_bad_weights_file_is_a_config_error(project: Path) -> None:
    from wsss.cli import app
    from wsss.config import load_params
    from wsss.ensemble_tuning import ensemble_members, write_weights

    paths = build_project(project, PARAMS)
    params = load_params(paths.root / "params.yaml")
    write_weights(paths.ensemble_weights, [VARIANT, "prior-grabcut"], [1.0, 0.5], "mean", {})
    with pytest.raises(ConfigError, match="rerun `wsss tune ensemble`"):
        ensemble_members(params.make_cams, paths.ensemble_weights)
    paths.ensemble_weights.write_text("ensemble: {members: [a], weights: [1], fusion: mean}\n")
    result = CliRunner().invoke(app, ["make-cams", "--method", "ensemble"])
    assert result.exit_code == 2 and "ensemble-weights.yaml" in result.output


def test_tune_ensemble_needs_member_maps(project: Path) -> None:
    from wsss.cli import app

    paths = build_project(project, PARAMS)
    shutil.rmtree(paths.cams_dir(VARIANT))
    result = CliRunner().invoke(app, ["tune", "ensemble"])
    assert result.exit_code == DataError.exit_code and "has no finished maps" in result.output
