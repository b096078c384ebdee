"""End to end: every stage, through the CLI, on a tiny synthetic dataset (a few seconds per stage)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import write_params
from wsss.cli import app

runner = CliRunner()

TINY_MODELS = {
    "train_classifier": {"arch": "resnet18", "input_size": 32, "epochs": 2, "batch_size": 8},
    "train_ccam": {"arch": "resnet18", "resize": 72, "input_size": 64, "epochs": 1, "batch_size": 8,
                   "per_breed_epochs": 1, "breeds_per_batch": 2, "polarity_images": 8},
    "make_cams": {"scales": [1.0, 1.5], "batch_size": 8, "shard_size": 8,
                  "ensemble_members": ["cam_classifier-species", "ccam_ccam-none"]},
    "tune": {"trials": 2, "n_startup_trials": 1},
    "train_unet": {"architecture": "plain", "plain_filters": [4, 8, 16, 32], "input_size": 32, "steps": 4,
                   "batch_size": 8},
}


def invoke(*args: str) -> None:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, f"wsss {' '.join(args)} failed:\n{result.output}\n{result.exception!r}"


@pytest.fixture
def tiny_project(project: Path) -> Path:
    write_params(project, TINY_MODELS)
    for command in (["generate-synthetic"], ["prepare"], ["validate"]):
        invoke(*command)
    return project


def test_every_stage_runs_and_writes_its_outputs(tiny_project: Path) -> None:
    root = tiny_project
    invoke("train-classifier", "--labels", "species")
    invoke("train-classifier", "--labels", "breed", "--bg")
    invoke("train-ccam", "--init", "none")
    invoke("train-ccam", "--init", "none", "--per-breed")
    invoke("train-ccam", "--init", "classifier:species", "--ecs")
    invoke("make-cams", "--method", "cam", "--model", "classifier-species")
    invoke("make-cams", "--method", "ecs", "--model", "classifier-breed-bg")
    invoke("make-cams", "--method", "ccam", "--model", "ccam-none")
    invoke("make-cams", "--method", "ccam-ecs", "--model", "ccam-cls-species-ecs")
    invoke("make-cams", "--method", "ensemble")
    for variant in ("cam_classifier-species", "ensemble"):
        invoke("tune", "crf", "--method", variant, "--trials", "2")
        invoke("make-pseudo", "--method", variant)
    invoke("train-unet", "--masks", "best")
    invoke("train-unet", "--masks", "same-best")
    invoke("train-unet", "--masks", "gt")
    invoke("evaluate", "--model", "unet-best")
    invoke("evaluate", "--model", "unet-same-best")
    invoke("evaluate", "--model", "unet-gt")
    invoke("evaluate", "--baselines")
    invoke("report")

    for name in ("classifier-species", "classifier-breed-bg", "ccam-none", "ccam-none-perbreed",
                 "ccam-cls-species-ecs", "unet-best", "unet-same-best", "unet-gt"):
        assert (root / "models" / name / "model.pt").exists(), name
        assert (root / "models" / name / "meta.json").exists(), name
    meta = json.loads((root / "models" / "ccam-none" / "meta.json").read_text())
    assert meta["polarity"] in (1.0, -1.0) and meta["polarity_source"] == "border vs centre"
    # Per-breed fine-tuning acts on its parent's foreground side, so it keeps the parent's polarity.
    per_breed = json.loads((root / "models" / "ccam-none-perbreed" / "meta.json").read_text())
    assert per_breed["polarity"] == meta["polarity"] and "ccam-none" in per_breed["polarity_source"]
    ecs = json.loads((root / "models" / "ccam-cls-species-ecs" / "meta.json").read_text())
    assert ecs["polarity"] == 1.0 and ecs["polarity_source"] == "ECS foreground target"

    cams = json.loads((root / "reports" / "cams" / "cam_classifier-species.json").read_text())
    assert 0.0 <= cams["iou_mean"] <= 1.0 and len(cams["curve"]["threshold"]) == 21

    masks = sorted((root / "masks" / "ensemble").glob("*.png"))
    assert masks
    values = set(np.unique(np.asarray(Image.open(masks[0]))).tolist())
    assert values <= {0, 1, 255}
    assert (root / "reports" / "crf" / "ensemble.yaml").exists()

    for source in ("best", "same-best", "gt", "baselines"):
        assert (root / "reports" / "eval" / f"{source}.json").exists(), source
    for source in ("best", "same-best", "gt"):  # equal schedules whatever the images
        ev = json.loads((root / "reports" / "eval" / f"{source}.json").read_text())
        assert ev["training"]["steps"] == TINY_MODELS["train_unet"]["steps"], source
        # evaluate decides by the rule train-unet chose on val and stored with the model
        rule = json.loads((root / "models" / f"unet-{source}" / "meta.json").read_text())["decision"]
        assert ev["decision"] == {"threshold": rule["threshold"], "flip_tta": rule["flip_tta"]} and rule["flip_tta"]
        assert rule["chosen_on"] == "val" and rule["val"]["n_images"] > 0 and rule["val"]["curve"]["0.5"] >= 0
    report = (root / "reports" / "report.md").read_text()
    assert "Table 1" in report and "Table 3" in report
    assert "| WSSS, same images | `unet-same-best` |" in report


def test_training_resumes_from_checkpoint(tiny_project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed after its first epoch continues from the checkpoint instead of starting over."""
    from wsss.config import load_params
    from wsss.paths import Paths
    from wsss.stages import train_classifier
    from wsss.training import loop

    params, paths = load_params(tiny_project / "params.yaml"), Paths(tiny_project)
    real_fit = loop.fit

    class Killed(Exception):
        pass

    def dying_fit(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        def on_end(epoch: int, metrics: dict) -> None:
            if epoch == 0:
                raise Killed

        kwargs["on_epoch_end"] = on_end
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(loop, "fit", dying_fit)
    with pytest.raises(Killed):
        train_classifier.run(params, paths, "species", False)
    assert (paths.state_dir("train-classifier", "species") / "checkpoint.pt").exists()
    monkeypatch.setattr(loop, "fit", real_fit)

    seen: list[int] = []
    monkeypatch.setattr(loop, "fit", lambda *a, **k: (seen.append(int(k["state"]["epoch"])), real_fit(*a, **k))[1])
    final = train_classifier.run(params, paths, "species", False)
    assert seen == [0]
    assert final["epochs"] == 2
    assert not (paths.state_dir("train-classifier", "species") / "checkpoint.pt").exists()
