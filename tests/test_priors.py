"""Label-free priors as map methods: the soft maps, make-cams without a model, their label-free masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.test_make_pseudo import build_project
from wsss.baselines import PRIOR_THRESHOLD, centred_ellipse, centred_prior
from wsss.cams import load_maps
from wsss.data.manifest import load_manifest
from wsss.data.readers import read_rgb
from wsss.io import read_json
from wsss.refine import grabcut_rect_baseline, grabcut_rect_soft
from wsss.variants import PRIORS, MapVariant


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A noisy pet-like image: a bright ellipse on a dark textured background, the colours overlapping a little."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    inside = ((yy - h / 2) / (0.3 * h)) ** 2 + ((xx - w / 2) / (0.3 * w)) ** 2 <= 1.0
    base = np.where(inside[..., None], 170.0, 70.0) + rng.normal(0, 30, (h, w, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("h, w", [(48, 64), (61, 37)])
def test_grabcut_prior_is_soft_and_thresholds_to_the_hard_baseline(h: int, w: int) -> None:
    image = _photo(h, w)
    soft = grabcut_rect_soft(image)
    assert soft.shape == (h, w) and soft.dtype == np.float32
    assert soft.min() >= 0.0 and soft.max() <= 1.0
    # Soft: graded values on both sides of the cut, not a {0, 1} (or {0, 0.5, 1}) mask.
    assert len(np.unique(soft)) > 20
    assert ((soft > 0.05) & (soft < 0.45)).any() and ((soft > 0.55) & (soft < 0.95)).any()
    np.testing.assert_array_equal((soft >= PRIOR_THRESHOLD).astype(np.uint8), grabcut_rect_baseline(image))
    stored = soft.astype(np.float16).astype(np.float32)  # as the shards keep it
    np.testing.assert_array_equal((stored >= PRIOR_THRESHOLD).astype(np.uint8), grabcut_rect_baseline(image))
    np.testing.assert_array_equal(soft, grabcut_rect_soft(image.copy()))  # deterministic


def test_grabcut_prior_is_zero_outside_the_rectangle() -> None:
    soft = grabcut_rect_soft(_photo(40, 40))
    assert soft[0].max() == 0.0 and soft[:, -1].max() == 0.0


@pytest.mark.parametrize("h, w, scale", [(7, 9, 0.8), (100, 133, 0.8), (64, 64, 0.5), (31, 17, 1.0)])
def test_centred_prior_thresholds_to_the_ellipse_baseline(h: int, w: int, scale: float) -> None:
    soft = centred_prior(h, w, scale)
    assert soft.shape == (h, w) and soft.dtype == np.float32
    assert 0.0 < soft.min() and soft.max() < 1.0
    np.testing.assert_array_equal((soft >= PRIOR_THRESHOLD).astype(np.uint8), centred_ellipse(h, w, scale))
    stored = soft.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal((stored >= PRIOR_THRESHOLD).astype(np.uint8), centred_ellipse(h, w, scale))
    assert len(np.unique(soft)) > 10
    np.testing.assert_array_equal(soft, centred_prior(h, w, scale))


def test_priors_are_registered_map_variants_without_a_model() -> None:
    from wsss.methods import METHODS

    for name in PRIORS:
        assert name in METHODS and not METHODS.get(name).needs_model
        assert MapVariant.parse(name).is_prior and MapVariant.parse(name).model is None
    with pytest.raises(Exception, match="label-free prior and takes no model"):
        MapVariant.of("prior-grabcut", "classifier-species")


# GrabCut on every image takes a while: the grabcut case is in the slow suite (its maps are also made, more
# cheaply, by the pseudo-mask test below).
@pytest.mark.parametrize("prior", [pytest.param("prior-grabcut", marks=pytest.mark.slow), "prior-ellipse"])
def test_make_cams_writes_prior_shards_without_a_model(project: Path, prior: str) -> None:
    from wsss.cli import app

    paths = build_project(project, {"pseudo": {"workers": 1}, "make_cams": {"shard_size": 5}})
    assert not paths.root.joinpath("models").exists()
    result = CliRunner().invoke(app, ["make-cams", "--method", prior])
    assert result.exit_code == 0, result.output
    df = load_manifest(paths.manifest)
    trainval = df[(df["split"] != "test") & (~df["is_background"])]
    maps = load_maps(paths.cams_dir(prior), None)
    assert set(maps) == set(trainval["id"])
    assert len(list(paths.cams_dir(prior).glob("shard-*.npz"))) == -(-len(trainval) // 5)
    row = trainval.iloc[0]
    image = read_rgb(paths.prepared / row.image_path)
    expected = (grabcut_rect_soft(image) if prior == "prior-grabcut"
                else centred_prior(*image.shape[:2], 0.8))
    np.testing.assert_array_equal(maps[row.id], expected.astype(np.float16).astype(np.float32))  # shards: float16
    report = read_json(paths.cams_report(prior))
    assert report["method"] == prior and report["model"] is None
    # Thresholded at 0.5 the prior map is its baseline: for the ellipse the report says so exactly.
    if prior == "prior-ellipse":
        assert report["curve"]["iou_mean"][10] == pytest.approx(report["baseline_ellipse_iou"])
    # A model is refused.
    bad = CliRunner().invoke(app, ["make-cams", "--method", prior, "--model", "classifier-species"])
    assert bad.exit_code == 2 and "takes no model" in bad.output


def test_prior_pseudo_masks_are_the_label_free_baseline(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsss import parallel
    from wsss.cli import app
    from wsss.data.readers import read_mask

    monkeypatch.setattr(parallel, "cpu_count", lambda: 1)  # serial here; the pool has its own (slow) test

    paths = build_project(project, {"pseudo": {"workers": 1, "refiner": "grabcut"}})
    assert CliRunner().invoke(app, ["make-cams", "--method", "prior-grabcut"]).exit_code == 0
    result = CliRunner().invoke(app, ["make-pseudo", "--method", "prior-grabcut"])
    assert result.exit_code == 0, result.output
    report = read_json(paths.pseudo_report("prior-grabcut"))
    assert report["params_source"] == "label-free" and report["config"]["refiner"] == "none"
    assert report["config"]["threshold"] == PRIOR_THRESHOLD
    # Every mask is the rectangle-GrabCut baseline mask, so the report's "after" is that baseline.
    df = load_manifest(paths.manifest).set_index("id")
    for image_id in list(load_maps(paths.cams_dir("prior-grabcut"), None))[:4]:
        image = read_rgb(paths.prepared / df.loc[image_id, "image_path"])
        np.testing.assert_array_equal(read_mask(paths.masks_dir("prior-grabcut") / f"{image_id}.png"),
                                      grabcut_rect_baseline(image))
    assert report["after"]["iou_mean"] == pytest.approx(report["baselines"]["grabcut_rect"]["iou_mean"])


def test_best_pseudo_variant_skips_the_priors(project: Path) -> None:
    from wsss.io import write_json
    from wsss.stages.train_unet import best_pseudo_variant

    paths = build_project(project)
    write_json(paths.pseudo_report("prior-grabcut"), {"after": {"iou_mean": 0.99}})
    write_json(paths.pseudo_report("cam_classifier-species"), {"after": {"iou_mean": 0.5}})
    assert best_pseudo_variant(paths) == "cam_classifier-species"


@pytest.mark.slow  # a forkserver pool starts in seconds on a busy machine
def test_prior_maps_in_a_pool_equal_the_serial_ones_in_order(project: Path) -> None:
    from wsss.methods import METHODS
    from wsss.methods.priors import prior_maps

    paths = build_project(project)
    rows = load_manifest(paths.manifest).sort_values("id").iloc[:4]
    prior = METHODS.get("prior-grabcut")
    serial = list(prior_maps(prior, rows, paths.prepared, 0.8, workers=1))
    pooled = list(prior_maps(prior, rows, paths.prepared, 0.8, workers=2))
    assert [i for i, _ in pooled] == [i for i, _ in serial] == [str(i) for i in rows["id"]]
    for (_, a), (_, b) in zip(serial, pooled, strict=True):
        np.testing.assert_array_equal(a, b)
