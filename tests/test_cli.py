"""The CLI through Typer's CliRunner: help, user errors without tracebacks, data stages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from wsss.cli import app
from wsss.methods import METHODS, MethodName

runner = CliRunner()


def test_help_lists_every_stage() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("generate-synthetic", "prepare", "validate", "train-classifier", "train-ccam",
                    "make-cams", "train-unet", "evaluate", "report", "predict", "runs", "tune", "make-pseudo"):
        assert command in result.output


def test_help_does_not_import_heavy_libraries() -> None:
    code = ("import sys; from wsss.cli import app; "
            "heavy = [m for m in ('torch', 'mlflow', 'great_expectations', 'optuna') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_method_choices_equal_registry() -> None:
    assert [m.value for m in MethodName] == METHODS.names()


def test_bad_params_is_one_clear_line(project: Path) -> None:
    (project / "params.yaml").write_text("prepare:\n  max_sidee: 3\n")
    result = runner.invoke(app, ["prepare"])
    assert result.exit_code == 2
    assert "unknown key 'prepare.max_sidee'" in result.output
    assert "Traceback" not in result.output


def test_prepare_without_data_names_the_folder(project: Path) -> None:
    result = runner.invoke(app, ["prepare"])
    assert result.exit_code == 1
    assert "data/raw/synthetic/oxford-iiit-pet" in result.output
    assert "generate-synthetic" in result.output


def test_generate_prepare_validate(project: Path) -> None:
    for command in (["generate-synthetic"], ["prepare"], ["validate"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 0, result.output
    report = json.loads((project / "reports" / "validation.json").read_text())
    assert report["success"] is True
    prep = json.loads((project / "reports" / "prepare.json").read_text())
    assert prep["counts"]
    assert (project / "data" / "prepared" / "manifest.parquet").exists()


def test_validate_fails_on_broken_data(project: Path) -> None:
    for command in (["generate-synthetic"], ["prepare"]):
        assert runner.invoke(app, command).exit_code == 0
    victim = next((project / "data" / "prepared" / "masks").glob("*.png"))
    victim.write_bytes(b"not a png")
    result = runner.invoke(app, ["validate"])
    assert result.exit_code == 1
    assert "validation failed" in result.output
    assert json.loads((project / "reports" / "validation.json").read_text())["success"] is False
