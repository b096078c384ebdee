"""`wsss evaluate --pseudo VARIANT`: pseudo-mask methods scored on test images from their image-level labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from tests.conftest import write_params
from wsss.cli import app

runner = CliRunner()

TINY = {
    "train_classifier": {"arch": "resnet18", "input_size": 32, "epochs": 1, "batch_size": 8},
    "train_ccam": {"arch": "resnet18", "resize": 72, "input_size": 64, "epochs": 1, "batch_size": 8,
                   "polarity_images": 8},
    "make_cams": {"scales": [1.0], "batch_size": 8, "shard_size": 8,
                  "ensemble_members": ["cam_classifier-species", "ccam_ccam-none"]},
    "pseudo": {"refiner": "grabcut", "workers": 1},
}


def invoke(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, f"wsss {' '.join(args)} failed:\n{result.output}\n{result.exception!r}"
    return result.output


def test_evaluate_pseudo_scores_test_images_only(project: Path) -> None:
    write_params(project, TINY)
    for command in (["generate-synthetic"], ["prepare"], ["train-classifier", "--labels", "species"],
                    ["train-ccam", "--init", "none"], ["make-cams", "--method", "cam", "--model", "classifier-species"],
                    ["make-cams", "--method", "ccam", "--model", "ccam-none"]):
        invoke(*command)
    manifest = pd.read_parquet(project / "data" / "prepared" / "manifest.parquet")
    n_test = int(((manifest["split"] == "test") & manifest["has_mask"] & ~manifest["is_background"]).sum())
    for variant in ("cam_classifier-species", "ensemble"):
        invoke("evaluate", "--pseudo", variant)
        rep = json.loads((project / "reports" / "eval-pseudo" / f"{variant}.json").read_text())
        assert rep["split"] == "test" and rep["n_images"] == n_test and rep["params_source"] == "params"
        for key in ("before", "after"):
            assert 0.0 <= rep[key]["iou_mean"] <= 1.0
    # U-Net reports stay alone in reports/eval/ (the report stage reads every file there as a U-Net).
    assert not (project / "reports" / "eval").exists() or not list((project / "reports" / "eval").glob("*.json"))
    # No mask is written for a test image.
    assert not (project / "masks").exists()

    # The shared map routine gives make-cams' maps (stored as float16) for the same images.
    _check_compute_maps_matches_stored(project)


def _check_compute_maps_matches_stored(project: Path) -> None:
    import torch

    from wsss.cams import iter_maps
    from wsss.config import load_params
    from wsss.device import precision_for, prepare_model
    from wsss.methods import METHODS
    from wsss.methods.extract import compute_maps, load_method_model
    from wsss.paths import Paths
    from wsss.stages.make_cams import map_rows

    params, paths = load_params(project / "params.yaml"), Paths(project)
    rows = map_rows(pd.read_parquet(paths.manifest)).head(5)
    prec = precision_for(torch.device("cpu"))
    method = METHODS.get("cam")
    model, meta = load_method_model(paths, method, "classifier-species")
    fresh = {i: m for i, m, _, _ in compute_maps(params, paths, method, prepare_model(model, prec), meta, rows, prec)}
    stored = {i: m for i, m, _ in iter_maps(paths.cams_dir("cam_classifier-species"), set(fresh))}
    assert set(stored) == set(fresh)
    for i, m in fresh.items():
        np.testing.assert_allclose(stored[i], m, atol=2e-2)
