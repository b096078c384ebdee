"""Background copy-paste (wsss.data.copy_paste): exact masks, the confidence rule, determinism, the feature
off without background images, and a tiny train-unet with it on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import write_params
from tests.test_pipeline import TINY_MODELS
from wsss.cams import shard_path, write_shard
from wsss.cli import app
from wsss.config import CopyPasteConfig, params_from_dict
from wsss.data import copy_paste as cp
from wsss.data.manifest import load_manifest, pets, save_manifest
from wsss.data.readers import read_mask
from wsss.errors import ConfigError
from wsss.paths import Paths

runner = CliRunner()
VARIANT = "cam_classifier-species"
PET_RGB = (250, 10, 200)


def _source(h: int = 40, w: int = 50) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An image with a magenta pet blob (mask 1), a one-pixel ignore ring around it and a speck of pet
    elsewhere; the map is 0.9 on the blob."""
    rgb = np.full((h, w, 3), 30, np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[10:30, 12:34] = 255
    mask[11:29, 13:33] = 1
    mask[2, 2] = 1  # a second, smaller component
    rgb[mask == 1] = PET_RGB
    pmap = np.where(mask == 1, 0.9, 0.1).astype(np.float32)
    return rgb, mask, pmap


def test_cut_out_is_the_largest_pet_component_without_ignore_pixels() -> None:
    rgb, mask, pmap = _source()
    cut = cp.cut_out("a", rgb, mask, pmap)
    assert cut is not None and cut.mask.shape == (18, 20) and cut.mask.all()  # the blob, not the ring or speck
    assert (cut.rgb == PET_RGB).all()
    assert cut.confidence == pytest.approx(360 / 361)  # the thresholded map also holds the speck
    assert cut.area_fraction == pytest.approx(18 * 20 / (40 * 50))
    assert cp.cut_out("b", rgb, np.zeros_like(mask), pmap) is None
    with pytest.raises(ValueError, match="differ in size"):
        cp.cut_out("c", rgb, mask, pmap[:-1])


def test_the_confidence_rule_drops_masks_the_map_does_not_support() -> None:
    rgb, mask, pmap = _source()
    cfg = CopyPasteConfig(enabled=True, min_confidence=0.5, min_area=0.01)
    assert cp.is_confident(cp.cut_out("a", rgb, mask, pmap), cfg)
    assert not cp.is_confident(cp.cut_out("a", rgb, mask, pmap * 0.3), cfg)  # the map is below threshold
    grown = pmap.copy()
    grown[11:29, 23:33] = 0.1  # the map supports only the left half: the refiner grew the mask past it
    half = cp.cut_out("a", rgb, mask, grown, map_threshold=0.3)
    assert half.confidence == pytest.approx((18 * 10) / (18 * 20 + 1)) and not cp.is_confident(
        half, CopyPasteConfig(enabled=True, min_confidence=0.6, min_area=0.01))
    assert not cp.is_confident(cp.cut_out("a", rgb, mask, pmap), CopyPasteConfig(min_area=0.5))  # a speck


def test_pasted_pixels_are_exactly_the_mask() -> None:
    rgb, mask, pmap = _source()
    cut = cp.cut_out("a", rgb, mask, pmap)
    bg = np.random.default_rng(1).integers(0, 200, (64, 80, 3), dtype=np.uint8)  # never magenta
    pairs = cp.make_pairs([cut], [rgb.shape[:2]], [bg], 12, (0.5, 1.5), seed=3)
    assert len(pairs) == 12
    for out, m in pairs:
        assert out.shape == bg.shape and m.shape == bg.shape[:2] and m.dtype == np.uint8
        assert set(np.unique(m)) == {0, 1}
        changed = (out != bg).any(-1)
        np.testing.assert_array_equal(changed, m == 1)  # pasted pixels = 1, the rest 0 and untouched
        assert (out[m == 1] == PET_RGB).all()
    assert bg.sum() == np.random.default_rng(1).integers(0, 200, (64, 80, 3), dtype=np.uint8).sum()  # not modified


def test_pairs_are_deterministic_under_a_seed() -> None:
    rgb, mask, pmap = _source()
    cuts = [cp.cut_out("a", rgb, mask, pmap), cp.cut_out("b", rgb[:, ::-1].copy(), mask[:, ::-1].copy(),
                                                          pmap[:, ::-1].copy())]
    bgs = [np.full((48, 48, 3), v, np.uint8) for v in (0, 60, 120)]

    def make(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return cp.make_pairs(cuts, [rgb.shape[:2]] * 2, bgs, 8, (0.4, 1.2), seed)

    a, b, c = make(5), make(5), make(6)
    assert all((x[0] == y[0]).all() and (x[1] == y[1]).all() for x, y in zip(a, b, strict=True))
    assert any((x[1] != y[1]).any() for x, y in zip(a, c, strict=True))
    assert cp.make_pairs(cuts, [rgb.shape[:2]] * 2, [], 8, (0.4, 1.2), 5) == []


def test_pair_count_and_config_checks() -> None:
    assert cp.pair_count(CopyPasteConfig(enabled=False, fraction=1.0), 10) == 0
    assert cp.pair_count(CopyPasteConfig(enabled=True, fraction=0.5), 10) == 5
    assert cp.pair_count(CopyPasteConfig(enabled=True, fraction=0.01), 10) == 1
    with pytest.raises(ConfigError, match="copy_paste.scale_min"):
        params_from_dict({"train_unet": {"copy_paste": {"scale_min": 1.5, "scale_max": 1.0}}}, "params.yaml")
    with pytest.raises(ConfigError, match="unknown key 'train_unet.copy_paste.count'"):
        params_from_dict({"train_unet": {"copy_paste": {"count": 3}}}, "params.yaml")


def test_without_background_images_the_feature_is_off_and_says_why(tmp_path: Path) -> None:
    cfg = CopyPasteConfig(enabled=True)
    train = pd.DataFrame({"id": ["a"], "image_path": ["a.png"]})
    result = cp.build(cfg, train, train.iloc[:0], tmp_path, tmp_path, lambda ids: {}, 0, 0.3)
    assert result.pairs == [] and "base.background_root" in result.note and result.summary()["copy_paste_pairs"] == 0


def test_the_label_free_baseline_never_gets_pasted_pairs(tmp_path: Path) -> None:
    """Which images hold no pet is an image-level label: the prior's U-Net must stay label-free."""
    from wsss.config import Params
    from wsss.stages import train_unet
    from wsss.variants import MaskSource

    params = params_from_dict({"train_unet": {"copy_paste": {"enabled": True}}})
    assert params.train_unet.copy_paste.enabled and params != Params()
    frame = pd.DataFrame({"id": ["a"], "is_background": [True], "split": ["train"]})
    result = train_unet._copy_paste(params, Paths(tmp_path), frame, frame, MaskSource.parse("prior-grabcut"),
                                    tmp_path)
    assert result.pairs == [] and "label-free" in result.note


def test_map_threshold_is_a_number_or_val() -> None:
    assert params_from_dict({}).train_unet.copy_paste.map_threshold == 0.3
    assert params_from_dict({"train_unet": {"copy_paste": {"map_threshold": "val"}}}).train_unet.copy_paste \
        .map_threshold == "val"
    with pytest.raises(ConfigError, match="'train_unet.copy_paste.map_threshold' must be"):
        params_from_dict({"train_unet": {"copy_paste": {"map_threshold": "auto"}}}, "params.yaml")
    with pytest.raises(ConfigError, match="outside its range"):
        params_from_dict({"train_unet": {"copy_paste": {"map_threshold": 1.5}}}, "params.yaml")


def test_val_map_threshold_reads_the_maps_val_best_threshold(tmp_path: Path) -> None:
    from wsss.errors import DataError
    from wsss.stages.train_unet import copy_paste_map_threshold
    from wsss.variants import MapVariant

    paths, variant = Paths(tmp_path), MapVariant.parse(VARIANT)
    assert copy_paste_map_threshold(0.45, paths, variant) == 0.45  # a number is itself; no report is read
    with pytest.raises(DataError, match=r"reports/cams/cam_classifier-species.json: missing.*`wsss make-cams --method cam --model classifier-species`"):
        copy_paste_map_threshold("val", paths, variant)
    report = paths.cams_report(variant)
    report.parent.mkdir(parents=True)
    for bad in ({"best_iou_mean": 0.4}, {"best_threshold": "0.8"}, {"best_threshold": 1.5}, [0.8]):
        report.write_text(json.dumps(bad))
        with pytest.raises(DataError, match=r"'best_threshold' must be a number in \[0, 1\].*`wsss make-cams --method cam"):
            copy_paste_map_threshold("val", paths, variant)
    report.write_text(json.dumps({"best_threshold": 0.8, "threshold": 0.3}))
    assert copy_paste_map_threshold("val", paths, variant) == 0.8


def test_the_map_threshold_decides_which_cut_outs_are_confident(tmp_path: Path) -> None:
    """A map with a high floor (0.5 outside the pet, as a from-scratch CAM keeps after max-normalisation)
    supports its pet only when it is cut above that floor."""
    rgb, mask, pmap = _source()
    floored = np.where(mask == 1, 0.9, 0.5).astype(np.float32)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(mask).save(tmp_path / "a_mask.png")
    (tmp_path / "masks").mkdir()
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
    train = pd.DataFrame({"id": ["a"], "image_path": ["a.png"]})
    backgrounds = pd.DataFrame({"image_path": ["a.png"]})
    cfg = CopyPasteConfig(enabled=True, fraction=1.0, min_confidence=0.5, min_area=0.01)

    def build(threshold: float) -> cp.CopyPasteResult:
        return cp.build(cfg, train, backgrounds, tmp_path, tmp_path / "masks", lambda ids: {"a": floored}, 0,
                        threshold)

    low, high = build(0.3), build(0.8)
    assert low.n_candidates == high.n_candidates == 1
    assert low.n_confident == 0 and not low.pairs and "cut at 0.3" in low.note
    assert high.n_confident == 1 and len(high.pairs) == 1 and high.note == ""
    assert high.summary()["copy_paste_map_threshold"] == 0.8 and low.summary()["copy_paste_map_threshold"] == 0.3


# --- a tiny project -----------------------------------------------------------------------------------------


def _invoke(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, f"wsss {' '.join(args)} failed:\n{result.output}\n{result.exception!r}"
    return result.output


def _fake_variant(paths: Paths) -> None:
    """Pseudo-masks = the GT masks (border as ignore) and maps = 0.8 on the pet, for every trainval pet."""
    df = load_manifest(paths.manifest)
    masks, cams = paths.masks_dir(VARIANT), paths.cams_dir(VARIANT)
    masks.mkdir(parents=True)
    cams.mkdir(parents=True)
    ids, maps = [], []
    for r in pets(df, ("train", "val"), with_mask=True).sort_values("id").itertuples():
        gt = read_mask(paths.prepared / r.mask_path)
        Image.fromarray(gt).save(masks / f"{r.id}.png")
        ids.append(r.id)
        maps.append(np.where(gt == 1, 0.8, 0.05).astype(np.float32))
    write_shard(shard_path(cams, 0), ids, maps, [-1] * len(ids), [1.0] * len(ids))


@pytest.mark.slow  # two tiny projects, each generate + prepare + a 4-step U-Net: ~15 s on an idle 2-core machine
@pytest.mark.parametrize("with_background", [True, False])
def test_train_unet_with_copy_paste(project: Path, with_background: bool) -> None:
    import mlflow

    unet = {**TINY_MODELS["train_unet"], "copy_paste": {"enabled": True, "fraction": 0.5, "min_confidence": 0.5}}
    write_params(project, {"train_unet": unet})
    _invoke("generate-synthetic")
    _invoke("prepare")
    paths = Paths(project)
    if not with_background:  # as a manifest prepared with base.background_root: null
        df = load_manifest(paths.manifest)
        save_manifest(df[~df["is_background"].astype(bool)].reset_index(drop=True), paths.manifest)
    _fake_variant(paths)
    out = _invoke("train-unet", "--masks", VARIANT)
    report = json.loads(paths.training_report(f"unet-{VARIANT}").read_text())
    n_train = len(pets(load_manifest(paths.manifest), "train", with_mask=True))
    assert report["steps"] == unet["steps"] and report["n_train"] == n_train  # same steps, same real images
    run = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    assert run.data.metrics["copy_paste_pairs"] == report["copy_paste_pairs"]
    if with_background:
        assert report["copy_paste_pairs"] == round(0.5 * n_train) and report["copy_paste_cutouts"] > 0
        assert "copy-paste:" in out
    else:
        assert report["copy_paste_pairs"] == 0
        assert "copy_paste is off" in out and "base.background_root" in out
