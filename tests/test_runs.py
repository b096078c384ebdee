"""``wsss runs``: latest run per (stage, variant) with its key metrics; nested trials only with --all."""

from __future__ import annotations

from pathlib import Path

import mlflow
from typer.testing import CliRunner

from wsss import tracking
from wsss.cli import app
from wsss.config import load_params
from wsss.paths import Paths

runner = CliRunner()


def test_runs_lists_latest_per_stage_and_variant(project: Path) -> None:
    result = runner.invoke(app, ["runs"])
    assert result.exit_code == 0 and "no runs yet" in result.output

    params, paths = load_params(project / "params.yaml"), Paths(project)
    with tracking.stage_run("train-classifier", "species", params, paths):
        tracking.log_metrics({"final_val_acc": 0.25})
    with tracking.stage_run("train-classifier", "species", params, paths):  # newer run of the same variant
        tracking.log_metrics({"final_val_acc": 0.875})
    with tracking.stage_run("make-cams", "cam_classifier-species", params, paths):
        tracking.log_metrics({"val_iou_mean": 0.4321, "val_best_iou_mean": 0.5})
    with tracking.stage_run("tune-crf", "cam_classifier-species", params, paths) as parent:
        tracking.log_metrics({"best_value": 0.61})
        with mlflow.start_run(experiment_id=parent.info.experiment_id, run_name="trial-0", nested=True,
                              tags={"wsss.stage": "tune-crf", "wsss.variant": "cam_classifier-species",
                                    "optuna.trial": "0"}):
            tracking.log_metrics({"val_iou_mean": 0.55})

    result = runner.invoke(app, ["runs"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "train-classifier" in out and "final_val_acc 0.875" in out and "0.250" not in out
    assert "cam_classifier-species" in out and "val_iou_mean 0.432" in out and "val_best_iou_mean 0.500" in out
    assert "best_value 0.610" in out and "FINISHED" in out
    assert "trial 0" not in out

    result = runner.invoke(app, ["runs", "--all"])
    assert "trial 0" in result.output and "0.250" in result.output

    result = runner.invoke(app, ["runs", "--stage", "make-cams"])
    assert "make-cams" in result.output and "train-classifier" not in result.output


def test_runs_on_a_corrupt_store_is_one_line_and_exit_4(project: Path) -> None:
    db = project / "mlruns" / "mlflow.db"
    db.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 64)  # a header, then garbage
    result = runner.invoke(app, ["runs"])
    assert result.exit_code == 4, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    assert str(db) in lines[0] and "cannot be used" in lines[0] and "not a database" in lines[0], lines[0]
    assert "Traceback" not in result.output and "[SQL:" not in result.output
