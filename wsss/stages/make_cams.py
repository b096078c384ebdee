"""Stage ``make-cams``: foreground maps for every trainval pet, batched, multi-scale + flip, sharded.

Writes ``cams/<variant>/`` (see :mod:`wsss.cams`; a rerun recomputes missing shards and any whose size or
SHA-256 differs from the record made when it was written) and ``reports/cams/<variant>.json``: fg IoU on the
validation split at ``make_cams.threshold`` and the IoU-vs-threshold curve (GT used for reporting
only), beside the label-free baselines (whole image, centred ellipse) on the same images.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wsss import tracking
from wsss.cams import (
    INDEX_FILE,
    file_record,
    iter_maps,
    load_index,
    load_maps,
    plan_shards,
    record_shard,
    shard_path,
    shard_problem,
    write_shard,
)
from wsss.config import Params, to_dict
from wsss.data.manifest import TRAINVAL, load_manifest, pets
from wsss.data.readers import read_mask
from wsss.ensemble_tuning import ensemble_members
from wsss.errors import ConfigError, DataError
from wsss.evaluation import THRESHOLD_GRID
from wsss.io import read_json, write_json, write_text
from wsss.methods.extract import compute_maps, fuse_members, load_method_model
from wsss.paths import Paths
from wsss.sharding import ALL, Shard, folder_lock, rank_device
from wsss.stages.common import reset_if_stale
from wsss.ui import console, task
from wsss.variants import ENSEMBLE, IMAGENET, PRIORS, MapVariant

STAGE = "make-cams"
CURVE_THRESHOLDS = THRESHOLD_GRID
# A sharded run's own shard records, merged into _shards.json by the part that finishes last.
PART_INDEX = "_shards.part-{tag}.json"
PART_GLOB = "_shards.part-*.json"
# Report keys that score the validation split: logged to MLflow as ``val_<key>``.
VAL_SCORES = ("iou_mean", "dice_mean", "iou_dataset", "best_iou_mean", "cv_iou_mean", "baseline_ellipse_iou",
              "baseline_whole_iou")


def variant_name(method: str, model: str | None) -> str:
    """``<method>_<model>`` (e.g. ``cam_classifier-species``); ``ensemble`` and the priors have no model."""
    return str(MapVariant.of(method, model))


def map_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Images that get maps: every trainval pet (main and label-only roots), never test."""
    return pets(df, TRAINVAL).sort_values("id")


def run(params: Params, paths: Paths, method: str, model: str | None, device: str | None = None,
        shard: Shard = ALL) -> dict[str, Any]:
    """Extract maps of one method (with one model) and report their quality on the validation split.

    With ``shard`` ``i/n`` this process computes only part ``i`` of the map shards; the part that finds
    every shard present writes ``_shards.json``, ``_done.json`` and the report, as one process would.
    """
    from wsss.methods import METHODS

    m = METHODS.get(method)
    if m.needs_model and not model:
        raise ConfigError(f"method '{method}' needs --model (a folder under models/, e.g. classifier-species)")
    if not m.needs_model:
        model = None
    variant = variant_name(method, model)
    out_dir = paths.cams_dir(variant)
    df = map_rows(load_manifest(paths.manifest))
    if df.empty:
        raise DataError(f"{paths.manifest}: no trainval pet images to compute maps for")
    fp = _fingerprint(params, method, model, paths)
    # Load (and check) the model before touching the output folder: a model whose meta.json does not
    # fit its weights must fail without deleting the maps of a previous configuration.
    loaded = load_method_model(paths, m, model) if m.needs_model and model != str(IMAGENET) else None
    with folder_lock(paths.cams_root):  # parts of a sharded run reset the folder one at a time
        reset_if_stale(out_dir, fp, paths.cams_root)

    start = time.perf_counter()
    shards = plan_shards(df["id"].tolist(), params.make_cams.shard_size)
    index_file = PART_INDEX.format(tag=shard.tag) if shard.sharded else INDEX_FILE
    todo = _shards_to_compute(out_dir, shard.take_indices(len(shards)), index_file)
    device = rank_device(device or params.base.device)
    shard_tags = {"wsss.shard": str(shard)} if shard.sharded else {}
    with tracking.stage_run(STAGE, variant, params, paths, sections=("make_cams",),
                            extra_tags={"method": method, "model": model or "", **shard_tags}):
        if todo:
            if m.needs_model:
                n_images = _extract_with_model(params, paths, m, model, df, shards, todo, out_dir, device,
                                               loaded, index_file)
            elif method in PRIORS:
                n_images = _compute_prior(params, paths, m, df, shards, todo, out_dir, index_file)
            else:
                n_images = _fuse_ensemble(params, paths, shards, todo, out_dir, index_file)
        else:
            n_images = 0
            console.print(f"{out_dir}: all {len(shards)} shards{f' of part {shard}' if shard.sharded else ''} "
                          "already done")
        seconds = time.perf_counter() - start
        # Part records (this run's, or those an abandoned sharded run left) become _shards.json.
        if (shard.sharded or any(out_dir.glob(PART_GLOB))) and not _merge_parts(out_dir, len(shards), shard, fp,
                                                                                 len(df)):
            tracking.log_metrics({"n_computed": n_images})
            return {"shard": str(shard), "merged": False, "n_computed": n_images, "seconds": round(seconds, 2)}
        write_json(out_dir / "_done.json", {"fingerprint": fp, "n_shards": len(shards), "n_images": len(df)})
        report = map_report(paths, out_dir, df, params.make_cams.threshold, params.evaluate.ellipse_scale)
        report.update({"method": method, "model": model, "seconds": round(seconds, 2),
                       "images_per_s": n_images / seconds if n_images else None})
        if method == ENSEMBLE:
            members, weights = ensemble_members(params.make_cams, paths.ensemble_weights)
            report.update({"members": members, "weights": weights, "fusion": params.make_cams.ensemble_fusion,
                           "weights_source": "tuned" if paths.ensemble_weights.exists() else "params"})
        write_json(paths.cams_report(variant), report)
        _write_curve_csv(paths.cams_curve(variant), report)
        # MLflow names say the split (val_...): a run's metrics lose the file name that says it in DVC.
        tracking.log_metrics({(f"val_{k}" if k in VAL_SCORES else k): v for k, v in report.items()
                              if isinstance(v, (int, float)) and v is not None})
        for t, iou in zip(report["curve"]["threshold"], report["curve"]["iou_mean"], strict=True):
            tracking.log_metrics({"val_curve_iou_mean": iou}, step=int(round(t * 100)))
        tracking.log_artifact(paths.cams_report(variant))
    console.print(
        f"{variant}: val fg IoU {report['iou_mean']:.3f} at t={params.make_cams.threshold} "
        f"(best {report['best_iou_mean']:.3f} at t={report['best_threshold']}; at a val-chosen t, "
        f"{report['cv_folds']}-fold: {report['cv_iou_mean']:.3f}); "
        f"ellipse {report['baseline_ellipse_iou']:.3f}, whole image {report['baseline_whole_iou']:.3f}"
    )
    return report


def _shards_to_compute(out_dir: Path, mine: list[int], index_file: str = INDEX_FILE) -> list[int]:
    """Indices among ``mine`` of the shards to (re)compute: missing ones and any whose bytes are not those
    recorded at write (truncated, overwritten, swapped), each of the latter named on the console.

    ``_done.json`` is not trusted: every existing shard is checked against ``_shards.json`` (and a sharded
    run's part records), and one without a record that reads completely is recorded now, in
    ``index_file`` (see :func:`wsss.cams.shard_problem`).
    """
    index = _all_records(out_dir)
    todo, bad = [], 0
    n_shards = len(mine)
    for i in mine:
        path = shard_path(out_dir, i)
        if not path.exists():
            todo.append(i)
            continue
        problem = shard_problem(path, index.get(path.name))
        if problem:
            console.print(f"{path}: {problem}; recomputing it")
            todo.append(i)
            bad += 1
        elif path.name not in index:
            record_shard(path, index_file)
    if bad or 0 < len(todo) < n_shards:
        console.print(f"{out_dir}: {n_shards - len(todo)} of {n_shards} shards done and verified; computing "
                      f"{len(todo)} ({len(todo) - bad} missing, {bad} damaged)")
    return todo


def _all_records(out_dir: Path) -> dict[str, dict[str, Any]]:
    """The shard records of ``_shards.json`` and of every sharded part's own records."""
    index = load_index(out_dir)
    for part in sorted(out_dir.glob(PART_GLOB)):
        index.update(load_index(out_dir, part.name))
    return index


def _merge_parts(out_dir: Path, n_shards: int, shard: Shard, fp: str, n_images: int) -> bool:
    """After part ``shard`` of a sharded run: when every shard is present and matches its record, write
    ``_shards.json`` (the records one process would have written) and drop the part records. Returns
    whether this part is the one to finish the run (False: parts are missing, or a peer finished it)."""
    with folder_lock(out_dir.parent):
        done = out_dir / "_done.json"
        if done.exists() and read_json(done).get("fingerprint") == fp:
            console.print(f"{out_dir}: part {shard} done; another part already merged the run")
            return False
        index = _all_records(out_dir)
        missing = []
        for i in range(n_shards):
            path = shard_path(out_dir, i)
            problem = shard_problem(path, index.get(path.name))
            if problem:
                missing.append(f"{path.name} ({problem})")
            elif path.name not in index:
                index[path.name] = file_record(path)
        if missing:
            console.print(f"{out_dir}: part {shard} done; {len(missing)} of {n_shards} shards not ready yet "
                          f"(e.g. {missing[0]}): the part that finishes last writes them")
            return False
        write_json(out_dir / INDEX_FILE, {shard_path(out_dir, i).name: index[shard_path(out_dir, i).name]
                                          for i in range(n_shards)})
        for part in out_dir.glob(PART_GLOB):
            part.unlink(missing_ok=True)
        # Stamped inside the lock, so a peer finishing at the same moment sees the run is merged.
        write_json(done, {"fingerprint": fp, "n_shards": n_shards, "n_images": n_images})
    console.print(f"{out_dir}: all {n_shards} shards present; part {shard} writes the final outputs")
    return True


def _fingerprint(params: Params, method: str, model: str | None, paths: Paths) -> str:
    from wsss.training.checkpoint import fingerprint

    model_meta: Any = None
    if model and model != str(IMAGENET):
        meta_path = paths.model_dir(model) / "meta.json"
        model_meta = read_json(meta_path) if meta_path.exists() else None
    members: Any = None
    if method == ENSEMBLE:
        members = [read_json(paths.cams_dir(v) / "_done.json") if (paths.cams_dir(v) / "_done.json").exists()
                   else None for v in params.make_cams.ensemble_members]
        # The weights actually fused (tuned ones when reports/ensemble-weights.yaml exists).
        members.append(ensemble_members(params.make_cams, paths.ensemble_weights)[1])
    elif method in PRIORS:
        from wsss.baselines import ELLIPSE_PRIOR_SOFTNESS, RECT_BASELINE_FRAC, RECT_BASELINE_ITERATIONS
        from wsss.methods.priors import PRIOR_VERSION

        members = [PRIOR_VERSION, params.evaluate.ellipse_scale, ELLIPSE_PRIOR_SOFTNESS, RECT_BASELINE_FRAC,
                   RECT_BASELINE_ITERATIONS]
    return fingerprint(to_dict(params.make_cams), method, model, model_meta, members, tracking.data_hash(paths))


def _extract_with_model(params: Params, paths: Paths, method: Any, model_name: str, df: pd.DataFrame,
                        shards: list[list[str]], todo: list[int], out_dir: Path, device: str | None,
                        loaded: tuple[Any, Any] | None = None, index_file: str = INDEX_FILE) -> int:
    from wsss.device import precision_from, prepare_model

    model, meta = loaded or load_method_model(paths, method, model_name)
    prec = precision_from(device, params)
    model = prepare_model(model, prec)
    by_id = df.set_index("id")
    n_done = 0
    with task(f"{STAGE} {method.name} {model_name}", sum(len(shards[i]) for i in todo)) as advance:
        for index in todo:
            rows = by_id.loc[shards[index]].reset_index()
            ids, maps, tgts, raw_max = [], [], [], []
            for image_id, prob, target, peak in compute_maps(params, paths, method, model, meta, rows, prec,
                                                             progress=advance):
                ids.append(image_id)
                maps.append(prob)
                tgts.append(target)
                raw_max.append(peak)
                n_done += 1
            write_shard(shard_path(out_dir, index), ids, maps, tgts, raw_max, index_file)
    return n_done


def _compute_prior(params: Params, paths: Paths, prior: Any, df: pd.DataFrame, shards: list[list[str]],
                   todo: list[int], out_dir: Path, index_file: str = INDEX_FILE) -> int:
    """A label-free prior's maps, from the prepared images alone (no model, no label)."""
    from wsss.methods.priors import prior_maps

    by_id = df.set_index("id")
    rows = by_id.loc[[i for index in todo for i in shards[index]]].reset_index()
    n = 0
    with task(f"{STAGE} {prior.name}", len(rows)) as advance:
        # One pass (one process pool, every usable core) over the images of every shard to do, in order.
        stream = prior_maps(prior, rows, paths.prepared, params.evaluate.ellipse_scale, advance, workers=0)
        for index in todo:
            ids, maps = [], []
            for _ in shards[index]:
                image_id, prob = next(stream)
                ids.append(image_id)
                maps.append(prob)
            write_shard(shard_path(out_dir, index), ids, maps, [-1] * len(ids), [1.0] * len(ids), index_file)
            n += len(ids)
    return n


def _fuse_ensemble(params: Params, paths: Paths, shards: list[list[str]], todo: list[int], out_dir: Path,
                   index_file: str = INDEX_FILE) -> int:
    cfg = params.make_cams
    variants, weights = ensemble_members(cfg, paths.ensemble_weights)
    wanted = {i for index in todo for i in shards[index]}
    members = []
    for variant in variants:
        if not (paths.cams_dir(variant) / "_done.json").exists():
            raise DataError(f"{paths.cams_dir(variant)}: ensemble member '{variant}' has no finished maps")
        members.append({i: m for i, m, _ in iter_maps(paths.cams_dir(variant), wanted)})
    sources = [paths.cams_dir(v) for v in variants]
    n = 0
    with task(f"{STAGE} ensemble", len(wanted)) as advance:
        for index in todo:
            ids = shards[index]
            maps = []
            for image_id in ids:
                maps.append(fuse_members(members, image_id, weights, cfg.ensemble_fusion, sources))
                advance(1)
            write_shard(shard_path(out_dir, index), ids, maps, [-1] * len(ids), [1.0] * len(ids), index_file)
            n += len(ids)
    return n


def map_report(paths: Paths, cams_dir: Path, df: pd.DataFrame, threshold: float,
               ellipse_scale: float) -> dict[str, Any]:
    """fg IoU of the maps on validation images with GT, at ``threshold``, over a threshold sweep and at a
    threshold chosen on the other folds of val (:func:`wsss.evaluation.cross_validated_threshold`), beside
    the whole-image and centred-ellipse (``ellipse_scale``) baselines."""
    from wsss.baselines import centred_ellipse, whole_image
    from wsss.evaluation import SegMeter, cross_validated_threshold, per_image_ious, threshold_curve

    val = pets(df, "val", with_mask=True)
    if val.empty:
        raise DataError(f"{paths.manifest}: the validation split has no images with masks to score maps on")
    maps = load_maps(cams_dir, set(val["id"]))
    gts = {r.id: read_mask(paths.prepared / r.mask_path) for r in val.itertuples()}
    ids = sorted(maps)
    at_t, ellipse, whole = SegMeter(), SegMeter(), SegMeter()
    for i in ids:
        gt = gts[i]
        at_t.add((maps[i] >= threshold).astype(np.uint8), gt)
        ellipse.add(centred_ellipse(*gt.shape, ellipse_scale), gt)
        whole.add(whole_image(*gt.shape), gt)
    curve = threshold_curve((maps[i] for i in ids), (gts[i] for i in ids), CURVE_THRESHOLDS)
    best = int(np.argmax(curve["iou_mean"]))
    cv = cross_validated_threshold(per_image_ious(((maps[i], gts[i]) for i in ids), CURVE_THRESHOLDS),
                                   prefer=threshold)
    scores = at_t.result()
    return {
        "split": "val",
        "n_val_images": len(ids),
        "threshold": threshold,
        "iou_mean": scores.iou_mean,
        "dice_mean": scores.dice_mean,
        "iou_dataset": scores.iou_dataset,
        "best_threshold": CURVE_THRESHOLDS[best],
        "best_iou_mean": curve["iou_mean"][best],
        "cv_iou_mean": cv.iou_mean,
        "cv_thresholds": list(cv.thresholds),
        "cv_folds": cv.folds,
        "baseline_ellipse_iou": ellipse.result().iou_mean,
        "baseline_whole_iou": whole.result().iou_mean,
        "curve": {"threshold": CURVE_THRESHOLDS, **curve},
    }


def _write_curve_csv(dest: Path, report: dict[str, Any]) -> None:
    curve = report["curve"]
    lines = ["threshold,iou_mean,iou_dataset"]
    for t, a, b in zip(curve["threshold"], curve["iou_mean"], curve["iou_dataset"], strict=True):
        lines.append(f"{t:.2f},{a:.5f},{b:.5f}")
    write_text(dest, "\n".join(lines) + "\n")
