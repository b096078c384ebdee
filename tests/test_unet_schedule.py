"""Fair U-Net schedules: a schedule in optimiser steps (every U-Net gets ``train_unet.steps`` whatever its
number of images, across a resume too) and the same-images WSSS U-Net (pseudo-masks of exactly the train
images with GT). The kill-and-resume of train-unet itself: ``test_kill_resume.py``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import write_params
from tests.test_pipeline import TINY_MODELS
from wsss.cli import app
from wsss.config import params_from_dict
from wsss.data.manifest import load_manifest, pets, save_manifest
from wsss.errors import ConfigError, DataError
from wsss.paths import Paths
from wsss.training.schedule import StepSchedule
from wsss.variants import MaskSource, UnetId

runner = CliRunner()
VARIANT = "cam_classifier-species"
STEPS = 5


# --- the schedule -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("steps", "per_epoch", "epochs", "last"), [(10, 3, 4, 1), (9, 3, 3, 3), (2, 12, 1, 2),
                                                                    (400, 12, 34, 4), (400, 81, 5, 76)])
def test_step_schedule_runs_exactly_its_steps(steps: int, per_epoch: int, epochs: int, last: int) -> None:
    s = StepSchedule(steps, per_epoch)
    assert s.epochs == epochs and s.steps_in(epochs - 1) == last
    assert sum(s.steps_in(e) for e in range(s.epochs)) == steps
    assert all(s.steps_in(e) == per_epoch for e in range(s.epochs - 1))
    with pytest.raises(ValueError):
        s.steps_in(epochs)


def test_step_schedule_refuses_empty_schedules() -> None:
    with pytest.raises(ConfigError, match="at least 1 step"):
        StepSchedule(0, 3)
    with pytest.raises(ConfigError, match="at least 1 batch"):
        StepSchedule(3, 0)


def test_epochs_key_names_its_replacement() -> None:
    with pytest.raises(ConfigError, match=r"'train_unet.epochs' was replaced by 'train_unet.steps'"):
        params_from_dict({"train_unet": {"epochs": 5}}, "params.yaml")
    assert params_from_dict({"train_unet": {"steps": 7}}).train_unet.steps == 7


def test_trainer_keeps_the_step_count_across_a_resume(tmp_path: Path) -> None:
    import torch

    from wsss.device import precision_from
    from wsss.training.checkpoint import CheckpointManager
    from wsss.training.trainer import Trainer

    def trainer() -> Trainer:
        return Trainer("train-x", "v", "x-v", params_from_dict({}), Paths(tmp_path), precision_from("cpu", None), "fp")

    first = trainer()
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    for _ in range(3):
        first.step(model(torch.ones(1, 2)).sum(), opt, sched)
    assert first.optimizer_steps == 3 and sched.last_epoch == 3  # the scheduler stepped with the optimiser
    CheckpointManager(Paths(tmp_path).state_dir("train-x", "v"), "fp").save({"epoch": 0,
                                                                               "optimizer_steps": 3})
    assert trainer().optimizer_steps == 3


# --- mask sources -----------------------------------------------------------------------------------------


def test_same_images_sources_parse_and_round_trip() -> None:
    for text in ("same-best", f"same-{VARIANT}", "same-ensemble"):
        source = MaskSource.parse(text)
        assert source.same_images and str(source) == text and str(UnetId.parse(f"unet-{text}").source) == text
    assert not MaskSource.parse("best").same_images
    for bad in ("same-gt", "same-", "same-same-best", "same_best"):
        with pytest.raises(ConfigError):
            MaskSource.parse(bad)


# --- a tiny project where only some train images have GT --------------------------------------------------


def _invoke(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, f"wsss {' '.join(args)} failed:\n{result.output}\n{result.exception!r}"
    return result.output


@pytest.fixture
def partly_labelled(project: Path) -> Path:
    """Every other train image label-only (no GT mask, as the extra roots), pseudo-masks for all of them."""
    write_params(project, {**TINY_MODELS, "train_unet": {**TINY_MODELS["train_unet"], "steps": STEPS}})
    _invoke("generate-synthetic")
    _invoke("prepare")
    paths = Paths(project)
    df = load_manifest(paths.manifest)
    train_ids = sorted(pets(df, "train")["id"])
    label_only = set(train_ids[::2])
    sel = df["id"].isin(label_only)
    df.loc[sel, "has_mask"] = False
    df.loc[sel, "mask_path"] = ""
    save_manifest(df, paths.manifest)
    masks = paths.masks_dir(VARIANT)
    masks.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for r in pets(df, ("train", "val")).itertuples():
        Image.fromarray(rng.integers(0, 2, (r.height, r.width), dtype=np.uint8)).save(masks / f"{r.id}.png")
    return project


def test_same_images_rows_are_exactly_the_gt_train_images(partly_labelled: Path) -> None:
    from wsss.stages.train_unet import training_rows

    paths = Paths(partly_labelled)
    df = load_manifest(paths.manifest)
    gt_rows, gt_dir = training_rows(df, paths, MaskSource.parse("gt"))
    same, same_dir = training_rows(df, paths, MaskSource.parse(f"same-{VARIANT}"))
    every, _ = training_rows(df, paths, MaskSource.parse(VARIANT))
    assert gt_dir is None and same_dir == paths.masks_dir(VARIANT)
    assert list(same["id"]) == list(gt_rows["id"])  # same images, same order (same shuffling)
    assert set(same["id"]) == set(pets(df, "train", with_mask=True)["id"])
    assert len(every) == len(pets(df, "train")) > len(same) > 0
    assert "val" not in set(same["split"]) | set(every["split"])
    missing = same["id"].iloc[0]
    (paths.masks_dir(VARIANT) / f"{missing}.png").unlink()
    with pytest.raises(DataError, match=rf"1 of the {len(same)} train images with GT have no pseudo-mask \(e.g. {missing}\)"):
        training_rows(df, paths, MaskSource.parse(f"same-{VARIANT}"))
    assert len(training_rows(df, paths, MaskSource.parse(VARIANT))[0]) == len(every) - 1  # all images: what exists


@pytest.mark.slow  # three U-Nets, MLflow and an evaluation: ~20 s on an idle 2-core machine
def test_every_unet_gets_the_same_steps_whatever_its_images(partly_labelled: Path) -> None:
    import mlflow

    paths = Paths(partly_labelled)
    df = load_manifest(paths.manifest)
    n_gt, n_all = len(pets(df, "train", with_mask=True)), len(pets(df, "train"))
    seen = {}
    for masks in ("gt", f"same-{VARIANT}", VARIANT):
        _invoke("train-unet", "--masks", masks)
        name = f"unet-{masks}"
        meta = json.loads((paths.model_dir(name) / "meta.json").read_text())
        report = json.loads(paths.training_report(name).read_text())
        assert meta["training"]["steps"] == report["steps"] == STEPS, name
        assert meta["training"]["n_images"] == report["n_train"]
        seen[masks] = (meta["masks"], meta["training"]["images"], report["n_train"], report["epochs"])
    assert seen["gt"] == ("gt", "gt", n_gt, seen["gt"][3])
    assert seen[f"same-{VARIANT}"][:3] == (f"same-{VARIANT}", "gt", n_gt)
    assert seen[VARIANT][:3] == (VARIANT, "all", n_all) and n_all > n_gt
    assert seen[VARIANT][3] < seen["gt"][3]  # more images: fewer (longer) epochs for the same steps

    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`wsss.stage` = 'train-unet'",
                              output_format="list")
    assert len(runs) == 3
    for run in runs:
        assert run.data.params["train_unet.steps"] == str(STEPS) and run.data.metrics["steps"] == STEPS
        assert run.data.tags["images"] in ("gt", "all")

    _invoke("evaluate", "--model", f"unet-same-{VARIANT}")
    ev = json.loads(paths.eval_report(f"same-{VARIANT}").read_text())
    assert ev["training"]["steps"] == STEPS and ev["training"]["n_images"] == n_gt and ev["masks"] == f"same-{VARIANT}"
