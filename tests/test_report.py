"""``wsss report`` end to end: paper-shaped tables from fabricated reports, figures, and the model registry.

The parts alone (paper numbers, slots, sections, figures, registry table): ``tests/test_reporting.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from typer.testing import CliRunner

from tests.data_factory import markdown_table
from wsss import tracking
from wsss.cams import write_shard
from wsss.cli import app
from wsss.config import UnetConfig, load_params
from wsss.data.manifest import COLUMNS, save_manifest
from wsss.paths import Paths
from wsss.reporting.registry import REGISTERED_MODEL, register_all
from wsss.stages import report
from wsss.stages.make_cams import CURVE_THRESHOLDS

runner = CliRunner()
VAL_IDS = ("val_a", "val_b")
PERBREED = "ccam_ccam-none-perbreed"


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _cams_report(iou: float, dice: float) -> dict:
    curve = [round(min(1.0, iou * (1 - abs(t - 0.3))), 4) for t in CURVE_THRESHOLDS]
    return {"n_val_images": 2, "threshold": 0.3, "iou_mean": iou, "dice_mean": dice, "iou_dataset": iou,
            "best_threshold": 0.3, "best_iou_mean": max(curve), "baseline_ellipse_iou": 0.31,
            "baseline_whole_iou": 0.22,
            "curve": {"threshold": CURVE_THRESHOLDS, "iou_mean": curve, "iou_dataset": curve}}


def _scores(iou: float, dice: float) -> dict:
    return {"iou_mean": iou, "dice_mean": dice, "iou_dataset": iou, "dice_dataset": dice, "miou": iou}


def _pseudo_report(before: float, after: float) -> dict:
    return {"n_gt_images": 3, "before": _scores(before, before + 0.1), "after": _scores(after, after + 0.1),
            "baselines": {"whole_image": _scores(0.2, 0.33), "ellipse": _scores(0.3, 0.45),
                          "grabcut_rect": _scores(0.35, 0.5)},
            "config": {"refiner": "crf"}, "mask_ignore_fraction": 0.0}


def _manifest(paths: Paths) -> None:
    """Two validation pets (48x64, 40x56) with images, GT masks, maps and pseudo-masks."""
    rows, rng = [], np.random.default_rng(0)
    for image_id, (h, w) in zip(VAL_IDS, [(48, 64), (40, 56)], strict=True):
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 1
        (paths.prepared / "images").mkdir(parents=True, exist_ok=True)
        (paths.prepared / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(paths.prepared / "images" / f"{image_id}.png")
        Image.fromarray(mask).save(paths.prepared / "masks" / f"{image_id}.png")
        paths.masks_dir(PERBREED).mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(paths.masks_dir(PERBREED) / f"{image_id}.png")
        rows.append({"id": image_id, "split": "val", "source": "pets", "species": 0, "breed": 0,
                     "is_background": False, "has_mask": True, "width": w, "height": h, "orig_width": w,
                     "orig_height": h, "image_path": f"images/{image_id}.png", "mask_path": f"masks/{image_id}.png",
                     "fg_fraction": 0.25, "border_fraction": 0.0, "mask_values": "0,1"})
    save_manifest(pd.DataFrame(rows, columns=list(COLUMNS)), paths.manifest)
    maps = [np.linspace(0, 1, h * w, dtype=np.float32).reshape(h, w) for h, w in [(48, 64), (40, 56)]]
    for variant in ("cam_classifier-species", PERBREED):
        paths.cams_dir(variant).mkdir(parents=True, exist_ok=True)
        write_shard(paths.cams_dir(variant) / "shard-00000.npz", VAL_IDS, maps, [0, 0], [1.0, 1.0])


def _fabricate(paths: Paths) -> None:
    cams = paths.reports / "cams"
    _write(cams / "cam_classifier-species.json", _cams_report(0.4012, 0.5534))
    _write(cams / "ecs_classifier-breed.json", _cams_report(0.3123, 0.4456))
    _write(cams / "cam_classifier-species-bg.json", _cams_report(0.4444, 0.5555))
    _write(cams / "ccam_ccam-none.json", _cams_report(0.6066, 0.7077))
    _write(cams / f"{PERBREED}.json", _cams_report(0.6500, 0.7600))
    _write(cams / "ensemble.json", _cams_report(0.6789, 0.7890))
    (cams / "notes.json").write_text("{broken")  # unreadable: skipped, never a crash
    _write(paths.pseudo_report("ccam_ccam-none"), _pseudo_report(0.5511, 0.6622))
    _write(paths.pseudo_report(PERBREED), _pseudo_report(0.5733, 0.6844))
    _write(paths.eval_report("gt"), {**_scores(0.8000, 0.8800), "masks": "gt"})
    _write(paths.eval_report("best"), {**_scores(0.7000, 0.8100), "masks": PERBREED})
    _write(paths.eval_report("baselines"), {"whole_image": _scores(0.2501, 0.3901), "ellipse": _scores(0.3502, 0.5002),
                                            "grabcut_rect": _scores(0.4103, 0.5603), "split": "test"})


def test_report_tables_and_figures(project: Path) -> None:
    paths = Paths(project)
    _fabricate(paths)
    _manifest(paths)
    _save_unet(paths, "unet-best", PERBREED)  # its predictions join the per-breed grid
    result = runner.invoke(app, ["report", "--no-register"])
    assert result.exit_code == 0, result.output
    md = paths.report_md.read_text()
    for heading in ("## Label-free baselines", "## Table 1 — CAM-based pseudo-mask generation",
                    "## Table 2 — background-class augmentation", "## Ensemble of maps",
                    "## Table 3 — class-specific training and baseline", "## U-Nets on the official test split",
                    "## Protocol differences", "## Model registry"):
        assert heading in md

    base = markdown_table(md, "## Label-free baselines")
    assert base["test (official split)"]["whole image IoU"] == "25.01"
    assert base["test (official split)"]["GrabCut (centred rect) Dice"] == "56.03"
    assert base["validation (2 images)"]["centred ellipse IoU"] == "31.00"
    assert base["validation (2 images)"]["GrabCut (centred rect) IoU"] == "—"

    t1 = markdown_table(md, "## Table 1")
    assert t1["CAM"]["2-Class IoU"] == "40.12 (12.73)"
    assert t1["CAM"]["2-Class Dice"] == "55.34 (21.70)"
    assert t1["CAM"]["Pretrained IoU"] == "— (26.03)"  # no cam_imagenet report
    assert t1["CAM+ECS"]["37-Class IoU"] == "31.23 (20.98)"
    assert t1["CCAM"]["Pretrained IoU"] == "60.66 (68.21)"  # ccam-none stands in, noted as random init
    assert t1["CCAM+ECS"]["Pretrained IoU"] == "— (—)"
    assert "random init" in md

    t2 = markdown_table(md, "## Table 2")
    assert t2["CAM"]["2/bg IoU"] == "44.44 (29.64)"
    assert t2["CCAM+ECS"]["37/bg Dice"] == "— (58.36)"

    t3 = markdown_table(md, "## Table 3")
    assert t3["CCAM"]["Pretrained IoU"] == "55.11 (68.21)"
    assert t3["CCAM+dCRF"]["Pretrained IoU"] == "66.22 (76.02)"
    assert t3["CCAM+dCRF"]["37-Class IoU"] == "68.44 (59.79)"
    assert t3["CCAM+dCRF"]["2-Class IoU"] == "— (51.15)"
    assert t3["CCAM+dCRF"]["37-Class/U-Net IoU"] == "70.00 (61.58)"
    assert t3["CCAM"]["37-Class/U-Net IoU"] == "— (59.29)"
    assert t3["U-Net (GT-supervised), test"]["Pretrained IoU"] == "80.00 (68.25)"
    assert t3["WSSS / supervised"]["Pretrained IoU"] == "87.5 (90.2)"
    assert "67.89" in markdown_table(md, "## Ensemble of maps")["Ensemble"]["val IoU"]

    for bug in ("B3", "B4", "B5", "B6"):  # the seed paper's defects, defined in docs/seed-paper.md
        assert bug in md
    assert "(`docs/seed-paper.md`, B3)" in md and "see `docs/seed-paper.md`" in md
    assert "research/" not in md and "algorithms.md" not in md
    figures = paths.figures
    assert (figures / "iou_vs_threshold.png").is_file()
    assert (figures / "maps_cam_classifier-species.png").is_file()
    assert (figures / f"maps_{PERBREED}.png").is_file()
    assert not list(figures.glob(".*.tmp"))


def test_report_with_nothing_is_all_dashes(project: Path) -> None:
    params, paths = load_params(project / "params.yaml"), Paths(project)
    report.run(params, paths)
    md = paths.report_md.read_text()
    t1 = markdown_table(md, "## Table 1")
    assert t1["CCAM"]["Pretrained IoU"] == "— (68.21)"
    assert "not registered" in md
    assert "## Label-free baselines" in md


def _tiny_unet() -> torch.nn.Module:
    from wsss.models.unet import build_unet

    torch.manual_seed(0)
    return build_unet(UnetConfig(architecture="plain", plain_filters=(4, 8, 16, 32))).eval()


def _save_unet(paths: Paths, name: str, masks: str) -> torch.nn.Module:
    """models/<name>/ as train-unet writes it (state_dict + meta.json)."""
    from wsss.training.checkpoint import save_model

    model = _tiny_unet()
    meta = {"kind": "unet", "architecture": "plain", "encoder": "resnet34", "input_size": 64, "masks": masks,
            "num_classes": 2, "plain_filters": [4, 8, 16, 32]}
    save_model(paths.model_dir(name), model, meta)
    return model


def _train_unet_artifacts(project: Path, name: str, masks: str) -> None:
    """What train-unet leaves behind: a run with the logged model, and models/<name>/."""
    from wsss.stages.train_unet import log_mlflow_model

    params, paths = load_params(project / "params.yaml"), Paths(project)
    model = _save_unet(paths, name, masks)
    with tracking.stage_run("train-unet", name, params, paths, sections=("train_unet",), extra_tags={"masks": masks}):
        log_mlflow_model(model, 64)


def test_registry_champion_and_supervised(project: Path) -> None:
    from mlflow import MlflowClient

    _train_unet_artifacts(project, "unet-best", PERBREED)
    _train_unet_artifacts(project, "unet-gt", "gt")
    params, paths = load_params(project / "params.yaml"), Paths(project)
    _write(paths.pseudo_report(PERBREED), _pseudo_report(0.5, 0.6))
    summary = report.run(params, paths)
    assert summary["registered"] == {"champion": "1", "supervised": "2"}

    client = MlflowClient()
    champion = client.get_model_version_by_alias(REGISTERED_MODEL, "champion")
    assert champion.tags["wsss.masks"] == PERBREED
    assert champion.tags["input_size"] == "64"
    from wsss.serving.loader import load_mlflow_unet  # the safe loader: nothing unpickled

    model, meta = load_mlflow_unet(f"models:/{REGISTERED_MODEL}@champion")
    assert meta["masks"] == PERBREED and meta["input_size"] == 64
    with torch.no_grad():
        out = model(torch.rand(1, 3, 40, 56))
    assert out.shape == (1, 2, 40, 56)
    md = paths.report_md.read_text()
    assert "models:/wsss-unet@champion" in md and "(v1)" in md

    # Rerunning the report reuses the registered versions.
    report.run(params, paths, register=True)
    assert len(client.search_model_versions(f"name = '{REGISTERED_MODEL}'")) == 2

    # predict through the registry: the input size comes from the version's tag
    img = project / "pet.png"
    Image.fromarray(np.full((30, 50, 3), 128, np.uint8)).save(img)
    result = runner.invoke(app, ["predict", str(img), "--model", "models:/wsss-unet@champion", "--out", "pred",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "input 64px" in result.output
    with Image.open(project / "pred" / "pet_mask.png") as im:
        assert im.size == (50, 30)


def test_the_champion_alias_follows_the_self_training_champion(project: Path) -> None:
    from mlflow import MlflowClient

    _train_unet_artifacts(project, "unet-best", PERBREED)
    _train_unet_artifacts(project, "unet-selftrain-r1", "selftrain-r1")
    _train_unet_artifacts(project, "unet-gt", "gt")
    params, paths = load_params(project / "params.yaml"), Paths(project)
    rounds = [{"round": 0, "model": "unet-best", "val_iou": 0.51}, {"round": 1, "model": "unet-selftrain-r1", "val_iou": 0.53}]
    _write(paths.self_training_report, {"selected_on": "val", "rounds": rounds,
                                        "champion": {"round": 1, "model": "unet-selftrain-r1", "val_iou": 0.53}})
    report.run(params, paths)
    client = MlflowClient()
    assert client.get_model_version_by_alias(REGISTERED_MODEL, "champion").tags["wsss.model_dir"] == "unet-selftrain-r1"
    rows = markdown_table(paths.report_md.read_text(), "## Model registry")
    assert rows["`unet-selftrain-r1`"]["chosen by"] == "self-training round 1: val IoU 53.00 (round 0: 51.00)"
    assert "`unet-best`" not in rows

    # Round 0 wins on val: the alias moves back to unet-best.
    _write(paths.self_training_report, {"selected_on": "val", "rounds": rounds,
                                        "champion": {"round": 0, "model": "unet-best", "val_iou": 0.51}})
    report.run(params, paths)
    assert client.get_model_version_by_alias(REGISTERED_MODEL, "champion").tags["wsss.model_dir"] == "unet-best"


def test_registry_skips_a_model_that_mlflow_never_saw(project: Path) -> None:
    from wsss.training.checkpoint import save_model

    _train_unet_artifacts(project, "unet-best", PERBREED)
    params, paths = load_params(project / "params.yaml"), Paths(project)
    # models/unet-best replaced without a logged model: the alias must not point at other weights.
    meta = json.loads((paths.model_dir("unet-best") / "meta.json").read_text())
    save_model(paths.model_dir("unet-best"), _tiny_unet().apply(_perturb), meta)
    regs = register_all(paths, _experiment_id(params, paths))
    assert regs[0].version is None and "not registered" in regs[0].note


def _perturb(module: torch.nn.Module) -> None:
    for p in module.parameters(recurse=False):
        p.data.add_(1.0)


def _experiment_id(params, paths: Paths) -> str:  # noqa: ANN001
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri(paths))
    return mlflow.get_experiment_by_name(tracking.experiment_name(params)).experiment_id
