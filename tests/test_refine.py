"""Tests for wsss.refine: thresholding, dense CRF, GrabCut, the confident variant and the process pool."""

from __future__ import annotations

import builtins
import dataclasses
import multiprocessing as mp

import cv2
import numpy as np
import pytest

import wsss.refine as R
import wsss.refiners as RF
from wsss import parallel
from wsss.config import CrfConfig, GrabCutConfig, PseudoConfig
from wsss.errors import MissingDependencyError

REFINERS = ("none", "crf", "grabcut", "grabcut+crf")
needs_crf = pytest.mark.skipif(not R.crf_available(), reason="pydensecrf not installed")


def scene(n: int = 48, seed: int = 0, noise: float = 0.9, blur: float = 2.0):
    """Two-colour image with a disc, and a noisy blurred map of the disc; returns (image, map, disc)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n]
    disc = (yy - n / 2) ** 2 + (xx - n / 2) ** 2 < (n / 4) ** 2
    img = np.where(disc[..., None], [200, 60, 50], [40, 120, 200]) + rng.normal(0, 8, (n, n, 3))
    img = np.clip(img, 0, 255).astype(np.uint8)
    m = disc.astype(np.float32) + rng.normal(0, noise, disc.shape).astype(np.float32)
    m = np.clip(cv2.GaussianBlur(m, (0, 0), blur), 0, None)
    return img, (m / (m.max() + 1e-5)).astype(np.float32), disc


def iou(mask: np.ndarray, ref: np.ndarray) -> float:
    pred = mask == 1
    return float((pred & ref).sum() / (pred | ref).sum())


def cfg_for(refiner: str, **kw) -> PseudoConfig:
    return PseudoConfig(refiner=refiner, **kw)


@pytest.fixture(scope="module")
def data():
    return scene()


@pytest.mark.parametrize("refiner", REFINERS)
@pytest.mark.parametrize("confident", [False, True])
def test_output_values_and_determinism(data, refiner, confident):
    if "crf" in refiner and not R.crf_available():
        pytest.skip("pydensecrf not installed")
    img, m, _ = data
    cfg = cfg_for(refiner, confident=confident)
    a, b = RF.refine(img, m, cfg), RF.refine(img, m, cfg)
    assert a.dtype == np.uint8 and a.shape == m.shape
    allowed = {0, 1, 255} if confident else {0, 1}
    assert set(np.unique(a).tolist()) <= allowed
    np.testing.assert_array_equal(a, b)


def test_threshold_mask():
    m = np.array([[0.0, 0.04, 0.05, 0.2], [0.29, 0.3, 0.31, 1.0]], np.float32)
    np.testing.assert_array_equal(
        R.threshold_mask(m, PseudoConfig(threshold=0.3)), [[0, 0, 0, 0], [0, 1, 1, 1]]
    )
    conf = PseudoConfig(confident=True, fg_threshold=0.3, bg_threshold=0.05)
    np.testing.assert_array_equal(R.threshold_mask(m, conf), [[0, 0, 255, 255], [255, 1, 1, 1]])


def test_soft_unary_decision_point():
    m = np.linspace(0, 1, 1001, dtype=np.float32).reshape(7, 143)
    for t in (0.0, 0.05, 0.3, 0.5, 0.8, 1.0):
        for scale in (0.1, 1.0, 10.0):
            p = R.soft_unary_prob(m, t, scale)
            assert p.min() >= 1e-5 and p.max() <= 1 - 1e-5
            np.testing.assert_array_equal(p > 0.5, m >= np.float32(t))
    # scale = 1: Bayes' rule with the prior moved to t (away from the clip).
    t, x = 0.3, np.array([[0.1, 0.3, 0.6]], np.float32)
    expect = x * (1 - t) / (x * (1 - t) + (1 - x) * t)
    np.testing.assert_allclose(R.soft_unary_prob(x, t, 1.0), np.maximum(expect, [[0, 0.5 + 1e-6, 0]]), atol=1e-6)
    # Larger temperature, softer unary.
    assert R.soft_unary_prob(x, t, 4.0)[0, 2] < R.soft_unary_prob(x, t, 1.0)[0, 2]


@needs_crf
@pytest.mark.parametrize("unary", ["soft", "label"])
def test_crf_beats_threshold_on_noisy_map(unary):
    img, m, disc = scene(noise=1.2, blur=1.2, seed=3)
    base = iou(R.threshold_mask(m, PseudoConfig(threshold=0.3)), disc)
    out = R.dense_crf(img, m, CrfConfig(unary=unary), 0.3)
    assert set(np.unique(out).tolist()) <= {0, 1}
    assert iou(out, disc) > base + 0.05, (iou(out, disc), base)


def test_grabcut_recovers_disc_from_rough_map():
    img, _, disc = scene(n=64)
    rough = cv2.GaussianBlur(disc.astype(np.float32), (0, 0), 6)
    rough /= rough.max()
    g = GrabCutConfig()
    base = iou((rough >= g.pfg_threshold).astype(np.uint8), disc)
    out = R.grabcut(img, rough, g)
    assert set(np.unique(out).tolist()) <= {0, 1}
    assert iou(out, disc) > max(base + 0.1, 0.9), (iou(out, disc), base)


def test_grabcut_seeds():
    m = np.array([[0.0, 0.05, 0.3, 0.7, 1.0]], np.float32)
    seeds = R.grabcut_seeds(m, GrabCutConfig(fg_threshold=0.7, pfg_threshold=0.3, bg_threshold=0.05))
    np.testing.assert_array_equal(seeds, [[cv2.GC_BGD, cv2.GC_PR_BGD, cv2.GC_PR_FGD, cv2.GC_FGD, cv2.GC_FGD]])


@pytest.mark.parametrize("refiner", ["none", "grabcut"] + (["crf", "grabcut+crf"] if R.crf_available() else []))
def test_confident_is_255_where_runs_disagree(refiner):
    # A disc inside a ring of a third colour; the map is 1 on the disc and ~0.3 on the ring, so the ring is
    # foreground for the bg-threshold run and background for the fg-threshold run.
    n, rng = 48, np.random.default_rng(0)
    yy, xx = np.mgrid[:n, :n]
    r2 = (yy - n / 2) ** 2 + (xx - n / 2) ** 2
    disc = r2 < (n / 5) ** 2
    ring = (r2 < (n / 3) ** 2) & ~disc
    img = np.select([disc[..., None], ring[..., None]], [[200, 60, 50], [120, 90, 120]], [40, 120, 200])
    img = np.clip(img + rng.normal(0, 8, (n, n, 3)), 0, 255).astype(np.uint8)
    m = np.select([disc, ring], [1.0, 0.3], 0.0) + rng.normal(0, 0.05, (n, n))
    m = np.clip(m, 0, 1).astype(np.float32)
    cfg = cfg_for(refiner, confident=True, fg_threshold=0.5, bg_threshold=0.1)
    r = RF.Refiner(cfg)
    hi, lo = r.run(img, m, 0.5), r.run(img, m, 0.1)
    out = RF.refine(img, m, cfg)
    np.testing.assert_array_equal(out == 255, hi != lo)
    np.testing.assert_array_equal(out[hi == lo], hi[hi == lo])
    assert (out[ring] == 255).mean() > 0.9 and not (out[disc] == 255).any()


@pytest.mark.parametrize(
    ("image", "prob", "match"),
    [
        (np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.float32), "uint8"),
        (np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.float32), r"\(H, W, 3\)"),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9), np.float32), r"\(8, 8, 3\).*\(8, 9\)"),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 1), np.float32), "2-D"),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8), "floating"),
        (np.zeros((8, 8, 3), np.uint8), np.full((8, 8), 2.0, np.float32), r"\[0, 1\]"),
        (np.zeros((8, 8, 3), np.uint8), np.full((8, 8), np.nan, np.float32), "NaN"),
    ],
)
@pytest.mark.parametrize("refiner", REFINERS)
def test_bad_inputs_raise_value_error(image, prob, match, refiner):
    with pytest.raises(ValueError, match=match):
        RF.refine(image, prob, cfg_for(refiner))


def test_bad_inputs_direct_functions():
    img, m = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9), np.float32)
    with pytest.raises(ValueError, match="does not match"):
        R.grabcut(img, m, GrabCutConfig())
    with pytest.raises(ValueError, match="does not match"):
        R.dense_crf(img, m, CrfConfig(), 0.3)
    with pytest.raises(ValueError, match="frac"):
        R.grabcut_rect_baseline(img, frac=0.0)


@pytest.fixture
def no_crf(monkeypatch):
    """Make every pydensecrf import fail."""
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("pydensecrf"):
            raise ImportError("no pydensecrf (test)")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_require_crf_message(no_crf):
    assert not R.crf_available()
    with pytest.raises(MissingDependencyError, match=r"pip install pydensecrf2.*pseudo\.crf\.enabled: false"):
        R.require_crf()
    img, m, _ = scene(n=16)
    with pytest.raises(MissingDependencyError):
        RF.refine(img, m, cfg_for("crf"))
    with pytest.raises(MissingDependencyError):
        list(RF.refine_many([(img, m)], cfg_for("crf")))


@pytest.mark.parametrize("confident", [False, True])
def test_crf_disabled_works_without_pydensecrf(no_crf, confident):
    img, m, _ = scene(n=16)
    off = dataclasses.replace(PseudoConfig().crf, enabled=False)
    cfg = cfg_for("crf", crf=off, confident=confident)
    np.testing.assert_array_equal(RF.refine(img, m, cfg), R.threshold_mask(m, cfg))
    gc = cfg_for("grabcut+crf", crf=off, confident=confident)
    np.testing.assert_array_equal(RF.refine(img, m, gc), RF.refine(img, m, cfg_for("grabcut", confident=confident)))


@pytest.mark.parametrize("refiner", REFINERS)
@pytest.mark.parametrize("value", [0.0, 1.0])
@pytest.mark.parametrize("confident", [False, True])
def test_degenerate_maps(refiner, value, confident):
    if "crf" in refiner and not R.crf_available():
        pytest.skip("pydensecrf not installed")
    img, _, _ = scene(n=16)
    m = np.full((16, 16), value, np.float32)
    out = RF.refine(img, m, cfg_for(refiner, confident=confident))
    np.testing.assert_array_equal(out, np.full((16, 16), int(value), np.uint8))
    tiny = RF.refine(img[:1, :1], m[:1, :1], cfg_for(refiner, confident=confident))
    assert tiny.shape == (1, 1)


def test_grabcut_rect_baseline():
    img, _, disc = scene(n=48)
    out = R.grabcut_rect_baseline(img, frac=0.85)
    assert set(np.unique(out).tolist()) <= {0, 1}
    assert iou(out, disc) > 0.9
    np.testing.assert_array_equal(out, R.grabcut_rect_baseline(img, frac=0.85))
    # Whole-image rectangle: no background to model; falls back to the rectangle.
    assert R.grabcut_rect_baseline(img, frac=1.0).all()


@pytest.mark.parametrize("start_method", ["default", "spawn"])
def test_refine_many_pool_equals_serial(monkeypatch, start_method):
    if start_method == "spawn":
        monkeypatch.setattr(parallel, "process_context", lambda preload=(): mp.get_context("spawn"))
    used_pool: list[bool] = []
    real_pooled = RF._pooled
    monkeypatch.setattr(RF, "_pooled", lambda *a: (used_pool.append(True), real_pooled(*a))[1])
    pairs = [scene(n=24, seed=s)[:2] for s in range(10)]
    cfg = cfg_for("grabcut+crf" if R.crf_available() else "grabcut", confident=True)
    serial = [RF.refine(i, m, cfg) for i, m in pairs]
    ticks: list[int] = []
    pooled = list(RF.refine_many(iter(pairs), cfg, workers=2, progress=ticks.append))
    assert used_pool == [True]
    assert len(pooled) == len(pairs) and sum(ticks) == len(pairs)
    for a, b in zip(serial, pooled, strict=True):
        np.testing.assert_array_equal(a, b)


def test_refine_many_serial_paths():
    pairs = [scene(n=16, seed=s)[:2] for s in range(3)]
    cfg = cfg_for("grabcut")
    ticks: list[int] = []
    out = list(RF.refine_many(pairs, cfg, workers=0, progress=ticks.append))  # few items: serial
    assert ticks == [1, 1, 1]
    for (i, m), o in zip(pairs, out, strict=True):
        np.testing.assert_array_equal(o, RF.refine(i, m, cfg))
    assert list(RF.refine_many([], cfg)) == []
    with pytest.raises(ValueError, match="workers"):
        list(RF.refine_many(pairs, cfg, workers=-1))


def test_refine_many_worker_error_propagates():
    good = scene(n=16)[:2]
    bad = (np.zeros((16, 16, 3), np.uint8), np.zeros((16, 17), np.float32))
    with pytest.raises(ValueError, match="does not match"):
        list(RF.refine_many([good] * 8 + [bad], cfg_for("grabcut"), workers=2))


def test_refine_many_early_close():
    pairs = [scene(n=16, seed=s)[:2] for s in range(40)]
    gen = RF.refine_many(pairs, cfg_for("grabcut"), workers=2)
    first = next(gen)
    gen.close()  # a pruned trial stops reading: its queued chunks are cancelled, the pool stays for the next
    np.testing.assert_array_equal(first, RF.refine(*pairs[0], cfg_for("grabcut")))
    again = list(RF.refine_many(pairs[:8], cfg_for("grabcut", confident=True), workers=2))
    for (i, m), o in zip(pairs[:8], again, strict=True):  # another configuration on the same pool
        np.testing.assert_array_equal(o, RF.refine(i, m, cfg_for("grabcut", confident=True)))


def test_refine_many_reuses_its_pool_until_shut_down() -> None:
    pairs = [scene(n=16, seed=s)[:2] for s in range(8)]
    RF.shutdown_pool()
    list(RF.refine_many(pairs, cfg_for("grabcut"), workers=2))
    pool = RF._POOL
    assert pool is not None
    list(RF.refine_many(pairs, cfg_for("grabcut"), workers=2))
    assert RF._POOL is pool  # the second call started no workers
    list(RF.refine_many(pairs, cfg_for("grabcut"), workers=3))
    assert RF._POOL is not pool  # another size: a new pool
    RF.shutdown_pool()
    assert RF._POOL is None


def test_grabcut_border_band_is_certain_background_whatever_the_map() -> None:
    import cv2

    from wsss.config import GrabCutConfig
    from wsss.refine import grabcut_seeds

    prob = np.ones((40, 60), dtype=np.float32)
    off = grabcut_seeds(prob, GrabCutConfig(border=0.0))
    assert (off == cv2.GC_FGD).all()
    seeds = grabcut_seeds(prob, GrabCutConfig(border=0.1))
    inner = seeds[4:36, 6:54]
    assert (inner == cv2.GC_FGD).all()
    band = np.ones_like(seeds, dtype=bool)
    band[4:36, 6:54] = False
    assert (seeds[band] == cv2.GC_BGD).all()
