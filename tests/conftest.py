"""Shared fixtures: a tiny project folder with its own params.yaml and MLflow store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_PARAMS: dict = {
    "base": {"seed": 0, "dataset": "synthetic"},
    "synthetic": {"n_trainval": 24, "n_test": 8, "n_background": 6, "image_size": 64, "breeds_per_species": 2},
    "prepare": {"max_side": 64, "val_fraction": 0.25},
    "validate": {"min_images_per_class": 1},
    "tracking": {"system_metrics": False},
}


def write_params(root: Path, overrides: dict | None = None) -> Path:
    """Write params.yaml into ``root`` (tiny defaults merged with ``overrides`` section by section)."""
    data = {k: dict(v) for k, v in TINY_PARAMS.items()}
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update(values)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny project folder (cwd) with params.yaml and an isolated MLflow SQLite store."""
    write_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path.as_posix()}/mlruns/mlflow.db")
    (tmp_path / "mlruns").mkdir()
    return tmp_path
