"""Stage ``evaluate``: score a U-Net, or the label-free baselines, on the official test split only.

Per-image mean fg IoU and Dice, dataset-level fg IoU, and mIoU over {background, pet}, border pixels
ignored, at the prepared mask resolution (the original resolution unless ``prepare.max_side``
shrank the image). Writes ``reports/eval/<source>.json`` (DVC metrics).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from wsss import tracking
from wsss.config import Params
from wsss.data.datasets import load_mask, load_rgb
from wsss.data.manifest import load_manifest
from wsss.errors import ConfigError
from wsss.io import write_json
from wsss.paths import Paths
from wsss.stages.common import require_rows
from wsss.ui import console, task

STAGE = "evaluate"
BASELINES = ("whole_image", "ellipse", "grabcut_rect")


def _test_rows(paths: Paths):  # noqa: ANN202 - pandas
    df = load_manifest(paths.manifest)
    test = df[(df["split"] == "test") & df["has_mask"] & ~df["is_background"]].sort_values("id")
    require_rows(len(test), "test images with masks", "the test split is scored only with GT", paths.manifest)
    return test


def run(params: Params, paths: Paths, model: str, device: str | None = None) -> dict[str, Any]:
    """Evaluate ``models/<model>/`` on the test split."""
    from wsss.device import precision_for, prepare_model, resolve_device
    from wsss.evaluation import SegMeter
    from wsss.inference import load_unet, predict_probs

    test = _test_rows(paths)
    net, meta = load_unet(paths.model_dir(model))
    prec = precision_for(resolve_device(device or params.base.device))
    net = prepare_model(net, prec)
    meter = SegMeter()
    bs = params.evaluate.batch_size
    start = time.perf_counter()
    rows = list(test.itertuples())
    with task(f"{STAGE} {model}", len(rows)) as advance:
        for i in range(0, len(rows), bs):
            chunk = rows[i : i + bs]
            images = [np.array(load_rgb(paths.prepared, r.image_path)) for r in chunk]
            for r, prob in zip(chunk, predict_probs(net, images, int(meta["input_size"]), prec), strict=True):
                meter.add((prob >= 0.5).astype(np.uint8), load_mask(paths.prepared / r.mask_path))
            advance(len(chunk))
    seconds = time.perf_counter() - start
    scores = meter.result().to_dict()
    report = {"model": model, "masks": meta.get("masks"), "split": "test", **scores,
              "seconds": round(seconds, 2), "images_per_s": len(rows) / max(seconds, 1e-9)}
    source = model.removeprefix("unet-")
    write_json(paths.eval_report(source), report)
    with tracking.stage_run(STAGE, source, params, paths, sections=("evaluate",)):
        tracking.log_metrics({k: v for k, v in report.items() if isinstance(v, (int, float))})
    console.print(f"{model} on test: fg IoU {scores['iou_mean']:.3f} (dataset {scores['iou_dataset']:.3f}), "
                  f"Dice {scores['dice_mean']:.3f}, mIoU {scores['miou']:.3f} over {len(rows)} images")
    return report


def run_baselines(params: Params, paths: Paths) -> dict[str, Any]:
    """Score the label-free baselines (whole image, centred ellipse, GrabCut from a centred rectangle)."""
    from wsss.baselines import centred_ellipse, whole_image
    from wsss.evaluation import SegMeter
    from wsss.refine import grabcut_rect_baseline

    test = _test_rows(paths)
    meters = {name: SegMeter() for name in BASELINES}
    with task(f"{STAGE} baselines", len(test)) as advance:
        for r in test.itertuples():
            gt = load_mask(paths.prepared / r.mask_path)
            image = np.array(load_rgb(paths.prepared, r.image_path))
            h, w = gt.shape
            meters["whole_image"].add(whole_image(h, w), gt)
            meters["ellipse"].add(centred_ellipse(h, w, params.evaluate.ellipse_scale), gt)
            meters["grabcut_rect"].add(grabcut_rect_baseline(image, frac=0.85, iterations=5), gt)
            advance(1)
    report = {name: m.result().to_dict() for name, m in meters.items()}
    report["split"] = "test"
    write_json(paths.eval_report("baselines"), report)
    with tracking.stage_run(STAGE, "baselines", params, paths, sections=("evaluate",)):
        tracking.log_metrics({f"{n}_{k}": v for n in BASELINES for k, v in report[n].items()
                              if isinstance(v, (int, float))})
    console.print("baselines on test: " + ", ".join(f"{n} {report[n]['iou_mean']:.3f}" for n in BASELINES))
    return report


def run_pseudo(params: Params, paths: Paths, variant: str, device: str | None = None,
               use_tuned: bool = True) -> dict[str, Any]:
    """Score a pseudo-mask variant on the test split: maps from each test image's own image-level label.

    The variant's trained model(s) make maps for the test images exactly as ``make-cams`` does for
    trainval (an ``ensemble`` fuses its members' maps), ``make-pseudo``'s configuration refines them
    (``reports/crf/<variant>.yaml`` when present and ``use_tuned``), and the masks are scored against the
    test GT: ``before`` (plain threshold) and ``after`` (refined). Nothing is written but the report
    ``reports/eval-pseudo/<variant>.json`` (outside ``reports/eval/``, which holds the U-Nets).
    """
    from wsss.device import precision_for, prepare_model, resolve_device
    from wsss.evaluation import SegMeter
    from wsss.methods import METHODS
    from wsss.refine import refine_many, threshold_mask
    from wsss.stages.make_cams import _load_model, compute_maps
    from wsss.stages.make_pseudo import effective_config, plain_threshold_config

    test = _test_rows(paths)
    cfg, source = effective_config(params, paths, variant, use_tuned)
    prec = precision_for(resolve_device(device or params.base.device))
    cams = params.make_cams
    if variant == "ensemble":
        members, weights = list(cams.ensemble_members), list(cams.ensemble_weights) or [1.0] * len(
            cams.ensemble_members)
        if len(members) < 2:
            raise ConfigError("params.yaml: 'make_cams.ensemble_members' must list at least two map variants")
    else:
        members, weights = [variant], [1.0]
    start = time.perf_counter()
    member_maps: list[dict[str, np.ndarray]] = []
    for member in members:
        method_name, sep, model_name = member.partition("_")
        if not sep or method_name not in METHODS.names() or not METHODS.get(method_name).needs_model:
            raise ConfigError(f"cannot rebuild maps of '{member}' for test images: expected <method>_<model>, "
                            "e.g. cam_classifier-species")
        method = METHODS.get(method_name)
        model, meta = _load_model(paths, method, model_name)
        model = prepare_model(model, prec)
        with task(f"{STAGE} maps {member} (test)", len(test)) as advance:
            member_maps.append({i: m for i, m, _, _ in compute_maps(params, paths, method, model, meta, test,
                                                                    prec, progress=advance)})
    if len(member_maps) == 1:
        maps = member_maps[0]
    else:
        from wsss.methods.ensemble import fuse

        maps = {i: np.asarray(fuse([m[i] for m in member_maps], weights, cams.ensemble_fusion), dtype=np.float32)
                for i in member_maps[0]}
    rows = list(test.itertuples())
    plain = plain_threshold_config(cfg)
    before, after = SegMeter(), SegMeter()
    gts = {r.id: load_mask(paths.prepared / r.mask_path) for r in rows}
    pairs = ((np.array(load_rgb(paths.prepared, r.image_path)), maps[r.id]) for r in rows)
    with task(f"{STAGE} refine {variant} ({cfg.refiner}, test)", len(rows)) as advance:
        for r, mask in zip(rows, refine_many(pairs, cfg, cfg.workers, progress=advance), strict=True):
            after.add(mask, gts[r.id])
            before.add(threshold_mask(maps[r.id], plain), gts[r.id])
    seconds = time.perf_counter() - start
    report = {"variant": variant, "split": "test", "params_source": source, "refiner": cfg.refiner,
              "n_images": len(rows), "before": before.result().to_dict(), "after": after.result().to_dict(),
              "seconds": round(seconds, 2)}
    write_json(paths.eval_pseudo_report(variant), report)
    with tracking.stage_run(STAGE, f"pseudo-{variant}", params, paths, sections=("evaluate", "make_cams", "pseudo"),
                            extra_tags={"pseudo.source": source}):
        tracking.log_metrics({f"{k}_{m}": v for k in ("before", "after") for m, v in report[k].items()})
    console.print(f"{variant} pseudo-masks on test ({len(rows)} images, refiner {cfg.refiner}): fg IoU "
                  f"{report['before']['iou_mean']:.3f} -> {report['after']['iou_mean']:.3f}")
    return report
