"""Stage ``evaluate``: score a U-Net, or the label-free baselines, on the official test split only.

Per-image mean fg IoU and Dice, dataset-level fg IoU, and mIoU over {background, pet}, border pixels
ignored, at the prepared mask resolution (the original resolution unless ``prepare.max_side``
shrank the image). Writes ``reports/eval/<source>.json`` (DVC metrics).
"""

from __future__ import annotations

import time
from typing import Any

from wsss import tracking
from wsss.config import Params
from wsss.data.manifest import official_test_rows
from wsss.data.readers import read_mask, read_rgb
from wsss.decision import Decision
from wsss.io import read_json, write_json
from wsss.paths import Paths
from wsss.ui import console, task
from wsss.variants import UnetId

STAGE = "evaluate"
BASELINES = ("whole_image", "ellipse", "grabcut_rect")


def run(params: Params, paths: Paths, model: str, device: str | None = None) -> dict[str, Any]:
    """Evaluate ``models/<model>/`` on the test split under its decision rule (chosen on val by train-unet)."""
    from wsss.device import precision_from, prepare_model
    from wsss.evaluation import SegMeter
    from wsss.models.loading import load_model_dir

    test = official_test_rows(paths.manifest)
    net, meta = load_model_dir(paths.model_dir(model), "unet")
    rule = Decision.of_model(meta.raw, paths.model_dir(model))
    prec = precision_from(device, params)
    net = prepare_model(net, prec)
    meter = SegMeter()
    bs = params.evaluate.batch_size
    start = time.perf_counter()
    rows = list(test.itertuples())
    with task(f"{STAGE} {model}", len(rows)) as advance:
        for i in range(0, len(rows), bs):
            chunk = rows[i : i + bs]
            images = [read_rgb(paths.prepared / r.image_path) for r in chunk]
            for r, prob in zip(chunk, rule.probs(net, images, meta.input_size, prec), strict=True):
                meter.add(rule.mask(prob), read_mask(paths.prepared / r.mask_path))
            advance(len(chunk))
    seconds = time.perf_counter() - start
    scores = meter.result().to_dict()
    # How it was trained (steps, images), so the report can show the schedules side by side.
    training = read_json(paths.model_dir(model) / "meta.json").get("training")
    training = training if isinstance(training, dict) else {}
    report = {"model": model, "masks": meta.masks, "split": "test", **scores,
              "decision": {"threshold": rule.threshold, "flip_tta": rule.flip_tta},
              **({"training": training} if training else {}),
              "seconds": round(seconds, 2), "images_per_s": len(rows) / max(seconds, 1e-9)}
    source = str(UnetId.parse(model).source)
    write_json(paths.eval_report(source), report)
    with tracking.stage_run(STAGE, source, params, paths, sections=("evaluate",)):
        # MLflow names say the split (test_...); the report's keys are the SegScores names, as in every report.
        logged = {(f"test_{k}" if k in scores else k): v for k, v in report.items() if isinstance(v, (int, float))}
        logged.update({f"train_{k}": v for k, v in training.items() if isinstance(v, (int, float))})
        logged.update({"decision_threshold": rule.threshold, "decision_flip_tta": float(rule.flip_tta)})
        tracking.log_metrics(logged)
    console.print(f"{model} on test ({rule.describe()}): fg IoU {scores['iou_mean']:.3f} "
                  f"(dataset {scores['iou_dataset']:.3f}), "
                  f"Dice {scores['dice_mean']:.3f}, mIoU {scores['miou']:.3f} over {len(rows)} images")
    return report


def run_baselines(params: Params, paths: Paths) -> dict[str, Any]:
    """Score the label-free baselines (whole image, centred ellipse, GrabCut from a centred rectangle)."""
    from wsss.baselines import centred_ellipse, whole_image
    from wsss.evaluation import SegMeter
    from wsss.refine import grabcut_rect_baseline

    test = official_test_rows(paths.manifest)
    meters = {name: SegMeter() for name in BASELINES}
    with task(f"{STAGE} baselines", len(test)) as advance:
        for r in test.itertuples():
            gt = read_mask(paths.prepared / r.mask_path)
            image = read_rgb(paths.prepared / r.image_path)
            h, w = gt.shape
            meters["whole_image"].add(whole_image(h, w), gt)
            meters["ellipse"].add(centred_ellipse(h, w, params.evaluate.ellipse_scale), gt)
            meters["grabcut_rect"].add(grabcut_rect_baseline(image), gt)
            advance(1)
    report = {name: m.result().to_dict() for name, m in meters.items()}
    report["split"] = "test"
    write_json(paths.eval_report("baselines"), report)
    with tracking.stage_run(STAGE, "baselines", params, paths, sections=("evaluate",)):
        tracking.log_metrics({f"test_{n}_{k}": v for n in BASELINES for k, v in report[n].items()
                              if isinstance(v, (int, float))})
    console.print("baselines on test: " + ", ".join(f"{n} {report[n]['iou_mean']:.3f}" for n in BASELINES))
    return report

