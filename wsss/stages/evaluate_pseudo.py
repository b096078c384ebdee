"""``wsss evaluate --pseudo VARIANT``: a pseudo-mask method scored on the official test split.

Kept apart from :mod:`wsss.stages.evaluate` (U-Nets and baselines) because it reads ``make_cams`` and
``pseudo`` params those DVC stages do not depend on. It shares their map extraction
(:mod:`wsss.methods.extract`) and refiner configuration (:mod:`wsss.pseudo`) with ``make-cams`` and
``make-pseudo``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from wsss import tracking
from wsss.config import Params
from wsss.data.manifest import official_test_rows
from wsss.data.readers import read_mask, read_rgb
from wsss.ensemble_tuning import ensemble_members
from wsss.errors import ConfigError
from wsss.io import write_json
from wsss.methods.extract import compute_maps, fuse_members, load_method_model
from wsss.paths import Paths
from wsss.pseudo import effective_config, plain_threshold_config
from wsss.ui import console, task
from wsss.variants import ENSEMBLE, MapVariant

STAGE = "evaluate"  # the command's stage: its MLflow runs sit beside the U-Net evaluations


def run_pseudo(params: Params, paths: Paths, variant: str, device: str | None = None,
               use_tuned: bool = True) -> dict[str, Any]:
    """Score a pseudo-mask variant on the test split: maps from each test image's own image-level label.

    The variant's trained model(s) make maps for the test images exactly as ``make-cams`` does for
    trainval (an ``ensemble`` fuses its members' maps), ``make-pseudo``'s configuration refines them
    (``reports/crf/<variant>.yaml`` when present and ``use_tuned``), and the masks are scored against the
    test GT: ``before`` (plain threshold) and ``after`` (refined). Nothing is written but the report
    ``reports/eval-pseudo/<variant>.json`` (outside ``reports/eval/``, which holds the U-Nets).
    """
    from wsss.device import precision_from, prepare_model
    from wsss.evaluation import SegMeter
    from wsss.methods import METHODS
    from wsss.refine import threshold_mask
    from wsss.refiners import refine_many

    test = official_test_rows(paths.manifest)
    cfg, source = effective_config(params, paths, variant, use_tuned)
    prec = precision_from(device, params)
    cams = params.make_cams
    if MapVariant.parse(variant).method == ENSEMBLE:
        members, weights = ensemble_members(cams, paths.ensemble_weights)
    else:
        members, weights = [variant], [1.0]
    start = time.perf_counter()
    member_maps: list[dict[str, np.ndarray]] = []
    for member in members:
        parsed = MapVariant.parse(member)
        if parsed.is_prior:
            from wsss.methods.priors import prior_maps

            with task(f"{STAGE} maps {member} (test)", len(test)) as advance:
                member_maps.append(dict(prior_maps(METHODS.get(parsed.method), test, paths.prepared,
                                                   params.evaluate.ellipse_scale, advance, workers=0)))
            continue
        if parsed.model is None:
            raise ConfigError(f"cannot rebuild maps of '{member}' for test images: an ensemble member must be "
                              "<method>_<model>, e.g. cam_classifier-species, or a label-free prior")
        method = METHODS.get(parsed.method)
        model, meta = load_method_model(paths, method, str(parsed.model))
        model = prepare_model(model, prec)
        with task(f"{STAGE} maps {member} (test)", len(test)) as advance:
            member_maps.append({i: m for i, m, _, _ in compute_maps(params, paths, method, model, meta, test,
                                                                    prec, progress=advance)})
    if len(member_maps) == 1:
        maps = member_maps[0]
    else:
        maps = {i: fuse_members(member_maps, i, weights, cams.ensemble_fusion, members) for i in member_maps[0]}
    rows = list(test.itertuples())
    plain = plain_threshold_config(cfg)
    before, after = SegMeter(), SegMeter()
    gts = {r.id: read_mask(paths.prepared / r.mask_path) for r in rows}
    pairs = ((read_rgb(paths.prepared / r.image_path), maps[r.id]) for r in rows)
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
        tracking.log_metrics({f"test_{k}_{m}": v for k in ("before", "after") for m, v in report[k].items()})
    console.print(f"{variant} pseudo-masks on test ({len(rows)} images, refiner {cfg.refiner}): fg IoU "
                  f"{report['before']['iou_mean']:.3f} -> {report['after']['iou_mean']:.3f}")
    return report
