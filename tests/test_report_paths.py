"""Metrics and report files hold no machine-specific path, and the GX validation result opens with GX.

``dvc metrics diff`` compares these files across machines and revisions: an absolute path would make
every comparison differ. A root outside the project keeps the form the user gave it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import write_params
from wsss.cli import app
from wsss.paths import Paths

runner = CliRunner()


def test_shown_is_project_relative_or_as_given(tmp_path: Path) -> None:
    paths = Paths(tmp_path / "proj")
    assert paths.shown(tmp_path / "proj" / "data" / "raw") == "data/raw"
    assert paths.shown(tmp_path / "proj") == "."
    assert paths.shown("../shared/data") == "../shared/data"  # relative: never absolutised
    assert paths.shown("data/raw") == "data/raw"
    outside = tmp_path / "elsewhere" / "data"
    assert paths.shown(outside) == str(outside)  # absolute outside the project: as given


@pytest.fixture
def outside_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project whose dataset lives beside it (``../shared/oxford-iiit-pet``), with one orphan trimap."""
    root = tmp_path / "proj"
    root.mkdir()
    write_params(root)
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root.as_posix()}/mlruns/mlflow.db")
    (root / "mlruns").mkdir()
    assert runner.invoke(app, ["generate-synthetic"]).exit_code == 0
    shared = tmp_path / "shared"
    shared.mkdir()
    shutil.move(root / "data" / "raw" / "synthetic" / "oxford-iiit-pet", shared / "oxford-iiit-pet")
    trimaps = shared / "oxford-iiit-pet" / "annotations" / "trimaps"
    Image.fromarray(np.full((8, 8), 2, np.uint8)).save(trimaps / "no_such_image_1.png")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["base"]["data_root"] = "../shared/oxford-iiit-pet"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def test_reports_hold_no_absolute_path(outside_project: Path, tmp_path: Path) -> None:
    root = outside_project
    for command in (["prepare"], ["validate"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 0, result.output
    prep = json.loads((root / "reports" / "prepare.json").read_text())
    assert prep["data_root"] == "../shared/oxford-iiit-pet"
    files = [i["file"] for i in prep["issues"]]
    assert "../shared/oxford-iiit-pet/annotations/trimaps/no_such_image_1.png" in files, files
    for report in sorted((root / "reports").rglob("*.json")):
        text = report.read_text()
        assert str(tmp_path) not in text and tmp_path.as_posix() not in text, report


def test_gx_result_beside_ours_loads_with_gx(project: Path) -> None:
    from great_expectations.core.expectation_validation_result import expectationSuiteValidationResultSchema

    for command in (["generate-synthetic"], ["prepare"], ["validate"]):
        assert runner.invoke(app, command).exit_code == 0
    ours = json.loads((project / "reports" / "validation.json").read_text())
    raw = json.loads((project / "reports" / "validation-gx.json").read_text())
    gx_result = expectationSuiteValidationResultSchema.load(raw)
    assert type(gx_result).__name__ == "ExpectationSuiteValidationResult"
    assert gx_result.success is True and gx_result.suite_name == "manifest"
    n_expectations = sum(1 for c in ours["checks"] if c["kind"] == "expectation")
    assert len(gx_result.results) == n_expectations == gx_result.statistics["evaluated_expectations"]

    # Broken data: both files say so, and GX's result names the failed expectation.
    manifest = project / "data" / "prepared" / "manifest.parquet"
    import pandas as pd

    df = pd.read_parquet(manifest)
    df.loc[df.index[df["has_mask"]][0], "fg_fraction"] = 1.0
    df.to_parquet(manifest, index=False)
    assert runner.invoke(app, ["validate"]).exit_code == 1
    gx_result = expectationSuiteValidationResultSchema.load(
        json.loads((project / "reports" / "validation-gx.json").read_text()))
    failed = [r.expectation_config.meta["name"] for r in gx_result.results if not r.success]
    assert failed == ["expect_column_values_to_be_between(fg_fraction | (has_mask == True AND is_background == False))"]
    assert json.loads((project / "reports" / "validation.json").read_text())["failed"] == failed
