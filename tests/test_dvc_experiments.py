"""``dvc exp run -S ...`` experiments reach MLflow: two experiments in DVC's temporary copies, found by name.

A fresh copy of the repository on the tiny profile (as ``tests/test_dvc_repro.py``), with no
``MLFLOW_TRACKING_URI``: each ``dvc exp run --temp`` runs ``prepare`` and ``validate`` in a copy under
``.dvc/tmp/exps/`` that DVC deletes, and their runs must land in the original repository's
``mlruns/mlflow.db``, tagged with the DVC experiment's name, baseline and stage. Slow (~1 min: two DVC
experiments of three stages each), so ``.ci/run`` runs it with the other slow tests.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.test_dvc_repro import _copy_worktree, _dvc, _merge_params, _ran

pytestmark = pytest.mark.slow

EXPERIMENTS = {"tiny-a": "0.3", "tiny-b": "0.2"}  # experiment name -> prepare.val_fraction


def test_two_dvc_experiments_are_in_mlflow_under_their_names(tmp_path: Path) -> None:
    root = tmp_path / "clone"
    root.mkdir()
    _copy_worktree(root)
    _merge_params(root / "params.yaml")
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "commit", "-qam", "tiny profile"], cwd=root, check=True, env={**env, "PATH": "/usr/bin:/bin"})
    baseline = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, check=True, capture_output=True,
                              text=True).stdout.strip()

    for name, fraction in EXPERIMENTS.items():
        out = _dvc(root, "exp", "run", "--temp", "--name", name, "-S", f"prepare.val_fraction={fraction}", "validate")
        assert {"prepare", "validate"} <= _ran(out), out[-2000:]

    shown = json.loads(_dvc(root, "exp", "show", "--json"))
    names = {e.get("name") for rev in shown for e in (rev.get("experiments") or [])}
    assert set(EXPERIMENTS) <= names, names

    assert not list((root / ".dvc" / "tmp").rglob("mlflow.db"))  # nothing tracked inside the copies
    db = root / "mlruns" / "mlflow.db"
    assert db.exists()
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("wsss-synthetic")
    assert exp is not None and exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`dvc.exp_name` != ''", max_results=100)
    by_exp: dict[str, dict[str, object]] = {}
    for run in runs:
        by_exp.setdefault(run.data.tags["dvc.exp_name"], {})[run.data.tags["dvc.stage"]] = run
    assert set(by_exp) == set(EXPERIMENTS), by_exp.keys()
    for name, fraction in EXPERIMENTS.items():
        assert set(by_exp[name]) == {"prepare", "validate"}, by_exp[name].keys()
        for run in by_exp[name].values():
            tags = run.data.tags
            assert tags["dvc.exp_baseline_rev"] == baseline
            assert tags["mlflow.source.git.commit"] == baseline
            assert tags["mlflow.runName"].endswith(f"[{name}]")
            assert run.info.status == "FINISHED"
            assert run.info.artifact_uri.startswith((root / "mlruns" / "artifacts").resolve().as_uri())
            assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["synthetic-prepared"]
        prepare = by_exp[name]["prepare"]
        assert prepare.data.params["prepare.val_fraction"] == fraction
