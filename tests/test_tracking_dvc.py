"""Stage runs as MLflow (and DVC) users expect them: DVC's experiment variables and MLflow's source tags on every
run, the store outside DVC's temporary experiment copies, the experiment kind the MLflow UI reads, the prepared
dataset as the run's input, and system metrics switched by ``tracking.system_metrics``."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import write_params
from wsss import tracking
from wsss.config import load_params
from wsss.paths import Paths

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


@pytest.fixture(autouse=True)
def _no_dvc_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("DVC_ROOT", "DVC_STAGE", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(var, raising=False)


def _git_repo(root: Path) -> str:
    env = {**os.environ, **GIT_ENV}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=root, check=True, env=env, capture_output=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, check=True, capture_output=True,
                          text=True).stdout.strip()


def _run(root: Path, stage: str = "make-cams", variant: str = "cam_classifier-species") -> str:
    params, paths = load_params(root / "params.yaml"), Paths(root)
    with tracking.stage_run(stage, variant, params, paths) as run:
        tracking.log_metrics({"val_iou_mean": 0.5})
    return run.info.run_id


def test_runs_carry_dvc_experiment_and_mlflow_source_tags(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sha = _git_repo(project)
    monkeypatch.setenv("DVC_STAGE", "make-cams@cam_classifier-species")
    monkeypatch.setenv("DVC_EXP_NAME", "bushy-lamb")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "a" * 40)
    run = mlflow.get_run(_run(project))
    tags = run.data.tags
    assert tags["dvc.stage"] == "make-cams@cam_classifier-species"
    assert tags["dvc.exp_name"] == "bushy-lamb"
    assert tags["dvc.exp_baseline_rev"] == "a" * 40
    assert tags["mlflow.source.git.commit"] == sha
    assert tags["git_commit"] == sha
    assert tags["mlflow.source.name"] == "make-cams@cam_classifier-species"
    assert tags["mlflow.runName"] == "make-cams:cam_classifier-species [bushy-lamb]"
    # The experiment's runs can be found by DVC experiment name (what the README's compare loop does).
    found = mlflow.search_runs([run.info.experiment_id], filter_string="tags.`dvc.exp_name` = 'bushy-lamb'")
    assert found["run_id"].tolist() == [run.info.run_id]


def test_without_dvc_there_are_no_dvc_tags_and_a_dirty_tree_keeps_the_clean_sha(project: Path) -> None:
    sha = _git_repo(project)
    (project / "params.yaml").write_text((project / "params.yaml").read_text() + "\n# edited\n")
    tags = mlflow.get_run(_run(project)).data.tags
    assert not [k for k in tags if k.startswith("dvc.")]
    assert tags["git_commit"] == f"{sha}-dirty"
    assert tags["mlflow.source.git.commit"] == sha  # MLflow's tag is a commit id, nothing else
    assert tags["mlflow.source.name"] == "wsss make-cams"
    assert tags["mlflow.runName"] == "make-cams:cam_classifier-species"


def _dvc_temp_copy(tmp_path: Path) -> tuple[Path, Path]:
    """An original repository and a copy where ``dvc exp run --temp`` puts one (``.dvc/tmp/exps/<tmp>``)."""
    origin = tmp_path / "repo"
    (origin / ".dvc").mkdir(parents=True)
    copy = origin / ".dvc" / "tmp" / "exps" / "tmp1234"
    (copy / ".dvc").mkdir(parents=True)
    write_params(copy)
    return origin, copy


def test_a_dvc_temp_experiment_tracks_into_the_original_repository(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    origin, copy = _dvc_temp_copy(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(origin))  # what DVC exports in an experiment: the original root
    monkeypatch.setenv("DVC_EXP_NAME", "tiny-exp")
    paths = Paths(Path("."))
    assert tracking.store_dir(paths) == (origin / "mlruns").resolve()
    assert tracking.default_tracking_uri(paths) == f"sqlite:///{(origin / 'mlruns' / 'mlflow.db').resolve()}"
    run_id = _run(copy)
    db = origin / "mlruns" / "mlflow.db"
    assert db.exists() and not (copy / "mlruns").exists()
    client = MlflowClient(f"sqlite:///{db}")
    run = client.get_run(run_id)
    assert run.data.tags["dvc.exp_name"] == "tiny-exp"
    assert run.info.artifact_uri.startswith((origin / "mlruns" / "artifacts").resolve().as_uri())


def test_pipeline_under_a_subfolder_keeps_its_relative_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``pipelines/paper-tables`` has its own ``mlruns/``: rebased onto the original repository, not merged."""
    origin, copy = _dvc_temp_copy(tmp_path)
    sub = copy / "pipelines" / "paper-tables"
    sub.mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(origin))
    monkeypatch.setenv("DVC_EXP_NAME", "x")
    assert tracking.store_dir(Paths(sub)) == (origin / "pipelines" / "paper-tables" / "mlruns").resolve()


@pytest.mark.parametrize("env", [{"DVC_ROOT": "same"}, {"DVC_EXP_NAME": "x"}, {}])
def test_workspace_runs_keep_the_project_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               env: dict[str, str]) -> None:
    """``dvc repro`` / ``dvc exp run`` in the workspace (DVC_ROOT is the project itself) or plain ``wsss``."""
    (tmp_path / ".dvc").mkdir()
    for key, value in env.items():
        monkeypatch.setenv(key, str(tmp_path) if value == "same" else value)
    if "DVC_EXP_NAME" in env:
        monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking.store_dir(Paths(tmp_path)) == (tmp_path / "mlruns").resolve()


def test_experiment_is_tagged_for_model_training_and_an_old_one_gets_the_tag(project: Path) -> None:
    params = load_params(project / "params.yaml")
    name = tracking.experiment_name(params)
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    old = mlflow.create_experiment(name)  # as an earlier wsss (or a user) made it: no kind
    _run(project)
    exp = mlflow.get_experiment(old)
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    # A kind the user chose in the UI is kept.
    MlflowClient().set_experiment_tag(old, tracking.EXPERIMENT_KIND_TAG, "genai_development")
    _run(project)
    assert mlflow.get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"


def test_new_experiment_has_the_kind_the_ui_reads(project: Path) -> None:
    run = mlflow.get_run(_run(project))
    tags = mlflow.get_experiment(run.info.experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_the_prepared_manifest_is_each_runs_dataset_input(project: Path) -> None:
    manifest = Paths(project).manifest
    manifest.parent.mkdir(parents=True)
    pd.DataFrame({"id": ["a", "b", "c"], "split": ["train", "val", "test"]}).to_parquet(manifest)
    run = mlflow.get_run(_run(project, stage="evaluate", variant="best"))
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1
    ds = inputs[0].dataset
    assert ds.name == "synthetic-prepared"
    assert ds.digest == run.data.tags["data_hash"] == tracking.data_hash(Paths(project))
    assert '"data/prepared/manifest.parquet"' in ds.source
    assert '"num_rows": 3' in ds.profile
    assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "testing"


def test_no_manifest_no_dataset_input(project: Path) -> None:
    assert mlflow.get_run(_run(project, stage="prepare", variant="synthetic")).inputs.dataset_inputs == []


@pytest.mark.parametrize("on", [True, False])
def test_system_metrics_follow_the_param(project: Path, on: bool) -> None:
    write_params(project, {"tracking": {"system_metrics": on, "system_metrics_interval_s": 0.2}})
    params, paths = load_params(project / "params.yaml"), Paths(project)
    with tracking.stage_run("train-unet", "gt", params, paths) as run:
        time.sleep(1.5)
    keys = set(MlflowClient().get_run(run.info.run_id).data.metrics)
    system = {k for k in keys if k.startswith("system/")}
    assert bool(system) is on, keys
    if on:
        assert "system/cpu_utilization_percentage" in system
