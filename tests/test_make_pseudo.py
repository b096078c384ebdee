"""make-pseudo: one mask per trainval map, resume, tuned parameters, report (tiny hand-built project)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import write_params
from wsss.cams import shard_path, write_shard
from wsss.config import load_params
from wsss.data.manifest import save_manifest
from wsss.io import read_json, write_json
from wsss.paths import Paths

VARIANT = "cam_classifier-species"
# Tiny sizes and serial refinement keep these tests quick on a shared 2-core machine.
SPLITS = {"train": 6, "val": 8, "test": 4}


def _pet(h: int, w: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, GT mask with a 1 px ignore ring, noisy blurred map) of one ellipse pet."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx = rng.uniform(0.4, 0.6) * h, rng.uniform(0.4, 0.6) * w
    ry, rx = rng.uniform(0.2, 0.35) * h, rng.uniform(0.2, 0.35) * w
    r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    inside = r <= 1.0
    gt = inside.astype(np.uint8)
    gt[(r > 1.0) & (r <= 1.0 + 1.5 / min(ry, rx))] = 255
    image = rng.integers(0, 80, size=(h, w, 3), dtype=np.uint8)
    image[inside] = rng.integers(160, 256, size=3, dtype=np.uint8)
    m = cv2.GaussianBlur(inside.astype(np.float32), (0, 0), 3.0) + rng.normal(0, 0.08, (h, w)).astype(np.float32)
    m = np.clip(m, 0, None)
    return image, gt, (m / m.max()).astype(np.float32)


def build_project(root: Path, params: dict | None = None, seed: int = 0) -> Paths:
    """A tiny prepared folder, manifest and map shards (including maps of test images, which must be ignored).

    One val background image (all-zero mask, no map) is in the manifest too.
    """
    rng = np.random.default_rng(seed)
    paths = Paths(root)
    rows, ids, maps = [], [], []
    for split, n in SPLITS.items():
        for k in range(n):
            image_id = f"{split}_{k:02d}"
            h, w = int(rng.integers(32, 41)), int(rng.integers(36, 49))
            image, gt, m = _pet(h, w, rng)
            _save(paths.prepared / "images" / f"{image_id}.png", image)
            _save(paths.prepared / "masks" / f"{image_id}.png", gt)
            rows.append(_row(image_id, split, h, w, background=False))
            ids.append(image_id)
            maps.append(m)
    _save(paths.prepared / "images" / "bg_00.png", np.zeros((32, 32, 3), np.uint8))
    _save(paths.prepared / "masks" / "bg_00.png", np.zeros((32, 32), np.uint8))
    rows.append(_row("bg_00", "val", 32, 32, background=True))
    save_manifest(pd.DataFrame(rows), paths.manifest)
    order = np.argsort(ids)
    cams = paths.cams_dir(VARIANT)
    write_shard(shard_path(cams, 0), [ids[i] for i in order], [maps[i] for i in order],
                [0] * len(ids), [1.0] * len(ids))
    write_json(cams / "_done.json", {"fingerprint": "test", "n_shards": 1, "n_images": len(ids)})
    write_params(root, params or {"pseudo": {"workers": 1}})
    return paths


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _row(image_id: str, split: str, h: int, w: int, background: bool) -> dict:
    return {
        "id": image_id, "split": split, "source": "background" if background else "pets",
        "species": -1 if background else 0, "breed": -1 if background else 0, "is_background": background,
        "has_mask": True, "width": w, "height": h, "orig_width": w, "orig_height": h,
        "image_path": f"images/{image_id}.png", "mask_path": f"masks/{image_id}.png",
        "fg_fraction": 0.3, "border_fraction": 0.05, "mask_values": "0,1,255",
    }


def trainval_ids() -> list[str]:
    return sorted(f"{s}_{k:02d}" for s in ("train", "val") for k in range(SPLITS[s]))


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}


def test_writes_masks_report_and_resumes(project: Path) -> None:
    from wsss.stages import make_pseudo

    paths = build_project(project)
    params = load_params(project / "params.yaml")
    report = make_pseudo.run(params, paths, VARIANT)

    masks = paths.masks_dir(VARIANT)
    assert sorted(p.stem for p in masks.glob("*.png")) == trainval_ids()  # no test image gets a mask
    for p in masks.glob("*.png"):
        assert set(np.unique(np.asarray(Image.open(p)))) <= {0, 1, 255}
    saved = read_json(paths.pseudo_report(VARIANT))
    assert saved["params_source"] == "params" and saved["n_masks"] == len(trainval_ids())
    assert saved["n_gt_images"] == len(trainval_ids())
    for key in ("before", "after", *(f"baselines.{b}" for b in ("whole_image", "ellipse", "grabcut_rect"))):
        scores = saved
        for part in key.split("."):
            scores = scores[part]
        assert set(scores) >= {"iou_mean", "dice_mean", "iou_dataset", "dice_dataset"}
        assert 0.0 <= scores["iou_mean"] <= 1.0
    assert report["after"]["iou_mean"] > 0.5  # the CRF on clean blobs is good

    # Rerun after losing one mask: only that one is redone.
    before = _mtimes(masks)
    (masks / "val_03.png").unlink()
    again = make_pseudo.run(params, paths, VARIANT)
    after = _mtimes(masks)
    assert again["n_refined"] == 1
    assert {k: v for k, v in after.items() if k != "val_03.png"} == {
        k: v for k, v in before.items() if k != "val_03.png"}
    assert "val_03.png" in after

    # Another configuration makes the old masks stale: everything is redone.
    write_params(project, {"pseudo": {"workers": 1, "refiner": "none", "threshold": 0.4}})
    changed = make_pseudo.run(load_params(project / "params.yaml"), paths, VARIANT)
    assert changed["n_refined"] == len(trainval_ids())


def test_tuned_yaml_is_used_unless_disabled(project: Path) -> None:
    from wsss.cli import app

    paths = build_project(project)
    tuned = {"refiner": "none", "confident": True, "fg_threshold": 0.6, "bg_threshold": 0.2, "workers": 7}
    dest = paths.crf_params(VARIANT)
    dest.parent.mkdir(parents=True)
    dest.write_text(yaml.safe_dump({"pseudo": tuned}))

    result = CliRunner().invoke(app, ["make-pseudo", "--method", VARIANT])
    assert result.exit_code == 0, result.output
    report = read_json(paths.pseudo_report(VARIANT))
    assert report["params_source"] == "tuned"
    assert report["config"]["confident"] is True and report["config"]["fg_threshold"] == 0.6
    assert report["config"]["workers"] == 1  # a machine setting: always from params.yaml
    assert report["mask_ignore_fraction"] > 0  # the confident band became 255

    result = CliRunner().invoke(app, ["make-pseudo", "--method", VARIANT, "--no-tuned"])
    assert result.exit_code == 0, result.output
    report = read_json(paths.pseudo_report(VARIANT))
    assert report["params_source"] == "params" and report["config"]["refiner"] == "crf"
    assert report["n_refined"] == len(trainval_ids())  # different configuration: masks redone


def test_invalid_tuned_yaml_is_a_clear_error(project: Path) -> None:
    from wsss.errors import ConfigError
    from wsss.stages import make_pseudo

    paths = build_project(project)
    dest = paths.crf_params(VARIANT)
    dest.parent.mkdir(parents=True)
    dest.write_text(yaml.safe_dump({"pseudo": {"thresholdd": 0.5}}))
    with pytest.raises(ConfigError, match="thresholdd"):
        make_pseudo.run(load_params(project / "params.yaml"), paths, VARIANT)


def test_pool_path_matches_serial(project: Path) -> None:
    from wsss.stages import make_pseudo

    grabcut = {"refiner": "grabcut", "grabcut": {"pfg_threshold": 0.4}}
    paths = build_project(project, {"pseudo": {"workers": 1, **grabcut}})
    serial = make_pseudo.run(load_params(project / "params.yaml"), paths, VARIANT)
    assert serial["before_threshold"] == 0.4  # plain GrabCut is compared with its own decision threshold
    first = {p.name: np.asarray(Image.open(p)) for p in paths.masks_dir(VARIANT).glob("*.png")}
    write_params(project, {"pseudo": {"workers": 2, **grabcut}})
    pooled = make_pseudo.run(load_params(project / "params.yaml"), paths, VARIANT)
    assert pooled["n_refined"] == 0  # workers is not part of the fingerprint
    for p in paths.masks_dir(VARIANT).glob("*.png"):
        p.unlink()
    pooled = make_pseudo.run(load_params(project / "params.yaml"), paths, VARIANT)
    assert pooled["n_refined"] == len(trainval_ids())
    for name, mask in first.items():
        np.testing.assert_array_equal(np.asarray(Image.open(paths.masks_dir(VARIANT) / name)), mask)
    assert pooled["after"] == serial["after"]


def test_grabcut_baseline_pool_matches_serial(project: Path) -> None:
    from wsss.data.manifest import load_manifest
    from wsss.stages.make_pseudo import grabcut_rect_scores

    paths = build_project(project)
    df = load_manifest(paths.manifest)
    rows = df[df["split"].isin(["train", "val"]) & ~df["is_background"]].sort_values("id")
    serial = grabcut_rect_scores(paths, rows, workers=1)
    cached = paths.state_dir("make-pseudo", "baselines")
    assert len(list(cached.glob("*.json"))) == 1
    for p in cached.glob("*.json"):
        p.unlink()
    assert grabcut_rect_scores(paths, rows, workers=2) == serial


@pytest.mark.parametrize(
    ("refiner", "confident", "expected"),
    [("none", False, 0.6), ("crf", False, 0.6), ("grabcut", False, 0.2), ("grabcut+crf", False, 0.2),
     ("grabcut+crf", True, 0.6)],
)
def test_before_refinement_uses_the_threshold_that_decides(refiner: str, confident: bool, expected: float) -> None:
    from wsss.config import GrabCutConfig, PseudoConfig
    from wsss.pseudo import plain_threshold_config

    cfg = PseudoConfig(refiner=refiner, threshold=0.6, confident=confident, fg_threshold=0.6, bg_threshold=0.1,
                       grabcut=GrabCutConfig(pfg_threshold=0.2, fg_threshold=0.7, bg_threshold=0.05))
    plain = plain_threshold_config(cfg)
    assert plain.refiner == "none" and plain.threshold == pytest.approx(expected)
