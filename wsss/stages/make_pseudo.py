"""Stage ``make-pseudo``: refine every stored map into a pseudo-mask, and score the masks against GT.

Writes ``masks/<variant>/<id>.png`` (uint8: 0 background, 1 pet, 255 ignore) for every image with a map
(trainval pets) and ``reports/pseudo/<variant>.json``: pet IoU / Dice (per-image mean and dataset-level,
GT border ignored) on the trainval images with GT, before refinement (the plain threshold) and after,
beside the label-free baselines (whole image, centred ellipse, GrabCut from a centred rectangle) on the
same images. GT is used for this report only; no mask depends on it.

Parameters: ``reports/crf/<variant>.yaml`` (written by ``wsss tune crf``) when it exists, else the
``pseudo`` section of params.yaml; ``pseudo.workers`` always comes from params.yaml.

Resume: masks are written atomically, and ``_fingerprint.json`` records the configuration and maps
they came from. A rerun with the same fingerprint skips finished masks; another one empties the folder.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wsss import tracking
from wsss.baselines import RECT_BASELINE_FRAC, RECT_BASELINE_ITERATIONS
from wsss.cams import SHARD_GLOB, iter_maps, load_index, shard_ids, verify_shard
from wsss.config import Params, PseudoConfig, to_dict
from wsss.data.manifest import TRAINVAL, load_manifest, pets
from wsss.data.readers import read_mask, read_rgb
from wsss.errors import DataError
from wsss.evaluation import SegMeter
from wsss.io import read_json, save_png, write_json
from wsss.paths import Paths
from wsss.pseudo import effective_config, plain_threshold_config
from wsss.sharding import ALL, Shard, folder_lock, local_workers
from wsss.stages.common import reset_if_stale
from wsss.ui import console, task

STAGE = "make-pseudo"
FINGERPRINT_FILE = "_fingerprint.json"
DONE_FILE = "_done.json"
# A sharded run's part stamps (``{"fingerprint", "n_refined"}``), removed by the part that finishes last.
PART_FILE = "_part-{tag}.json"
PART_GLOB = "_part-*.json"


def run(params: Params, paths: Paths, variant: str, use_tuned: bool = True, shard: Shard = ALL) -> dict[str, Any]:
    """Write the pseudo-masks of one map variant (resumable) and their report.

    Args:
        params: all params (reads ``pseudo``).
        paths: project paths.
        variant: map variant under ``cams/`` (e.g. ``cam_classifier-species``).
        use_tuned: prefer ``reports/crf/<variant>.yaml`` over params.yaml when it exists.
        shard: refine only this part of the images (sorted by id); the part that finds every mask present
            writes ``_done.json`` and the report, as one process would.

    Returns:
        The report written to ``reports/pseudo/<variant>.json``.
    """
    from wsss.refiners import refine_many

    cams_dir = paths.cams_dir(variant)
    if not (cams_dir / "_done.json").exists():
        raise DataError(f"{cams_dir}: no finished maps for '{variant}'; run `wsss make-cams` first")
    cfg, source = effective_config(params, paths, variant, use_tuned)
    df = load_manifest(paths.manifest)
    rows = df.set_index("id")
    map_ids = _map_ids(cams_dir)
    unknown = [i for i in map_ids if i not in rows.index]
    if unknown:
        raise DataError(f"{cams_dir}: maps of {len(unknown)} image(s) not in the manifest (e.g. {unknown[0]}); "
                        "the maps are stale, rerun `wsss make-cams`")
    # Pseudo-masks are training labels: never make one for a test image, whatever the shards hold.
    ids = [i for i in map_ids if rows.at[i, "split"] in TRAINVAL]
    if not ids:
        raise DataError(f"{cams_dir}: no map of a trainval image")
    out_dir = paths.masks_dir(variant)
    fp = _fingerprint(cfg, cams_dir, paths)
    with folder_lock(paths.masks_root):  # parts of a sharded run reset the folder one at a time
        reset_if_stale(out_dir, fp, paths.masks_root)
    todo = [i for i in shard.take(ids) if not _mask_done(out_dir, i)]
    workers = local_workers(cfg.workers) if shard.sharded else cfg.workers

    start = time.perf_counter()
    run_params = dataclasses.replace(params, pseudo=cfg)  # log what is actually used
    with tracking.stage_run(STAGE, variant, run_params, paths, sections=("pseudo",),
                            extra_tags={"pseudo.source": source,
                                        **({"wsss.shard": str(shard)} if shard.sharded else {})}):
        if todo:
            queue: deque[str] = deque()

            def pairs() -> Iterator[tuple[np.ndarray, np.ndarray]]:
                for image_id, prob, _ in iter_maps(cams_dir, set(todo)):
                    image = _image(paths, rows.loc[image_id], prob.shape, cams_dir, image_id)
                    queue.append(image_id)
                    yield image, prob

            with task(f"{STAGE} {variant} ({cfg.refiner})", len(todo)) as advance:
                for mask in refine_many(pairs(), cfg, workers, progress=advance):
                    save_png(out_dir / f"{queue.popleft()}.png", mask)
        else:
            console.print(f"{out_dir}: all {len(ids)} masks already done")
        seconds = time.perf_counter() - start
        n_refined = len(todo)
        if shard.sharded or any(out_dir.glob(PART_GLOB)):
            merged = _merge_parts(out_dir, ids, shard, fp, n_refined, {"fingerprint": fp, "n_images": len(ids),
                                                                         "source": source})
            if merged is None:
                tracking.log_metrics({"n_refined": n_refined})
                return {"shard": str(shard), "merged": False, "n_refined": n_refined, "seconds": round(seconds, 2)}
            n_refined = merged
        write_json(out_dir / DONE_FILE, {"fingerprint": fp, "n_images": len(ids), "source": source})

        report = score_masks(paths, df, cams_dir, out_dir, cfg, set(ids), params.evaluate.ellipse_scale)
        report.update({
            "variant": variant,
            "params_source": source,
            "config": to_dict(cfg),
            "n_masks": len(ids),
            "n_refined": n_refined,
            "seconds": round(seconds, 2),
            "images_per_s": round(len(todo) / seconds, 3) if todo and seconds > 0 else None,
        })
        write_json(paths.pseudo_report(variant), report)
        tracking.log_metrics(_flat_metrics(report))
        tracking.log_artifact(paths.pseudo_report(variant))
    console.print(
        f"{variant}: {len(ids)} masks ({len(todo)} new, refiner {cfg.refiner}, parameters from "
        f"{paths.crf_params(variant) if source == 'tuned' else 'params.yaml'}); "
        f"fg IoU {report['before']['iou_mean']:.3f} -> {report['after']['iou_mean']:.3f} "
        f"on {report['n_gt_images']} trainval images with GT; baselines: ellipse "
        f"{report['baselines']['ellipse']['iou_mean']:.3f}, GrabCut rect "
        f"{report['baselines']['grabcut_rect']['iou_mean']:.3f}, whole image "
        f"{report['baselines']['whole_image']['iou_mean']:.3f}"
    )
    return report


# --------------------------------------------------------------------------------------------------
# inputs, fingerprint, resume


def _map_ids(cams_dir: Path) -> list[str]:
    """Ids of every stored map, read from the shards' ``ids`` arrays only (no map is decompressed), after
    checking each shard's size and SHA-256 against its record, so a damaged shard stops the stage before
    the masks folder is touched."""
    index = load_index(cams_dir)
    ids: list[str] = []
    for path in sorted(Path(cams_dir).glob(SHARD_GLOB)):
        verify_shard(path, index)
        ids.extend(shard_ids(path))
    if not ids:
        raise DataError(f"{cams_dir}: no map shards; run `wsss make-cams` for this variant first")
    return ids


def _image(paths: Paths, row: pd.Series, shape: tuple[int, ...], cams_dir: Path, image_id: str) -> np.ndarray:
    """The prepared RGB image of a map: the CRF's colour input at the map's resolution."""
    image = read_rgb(paths.prepared / row["image_path"])
    if image.shape[:2] != tuple(shape):
        raise DataError(f"{cams_dir}: map of {image_id} is {tuple(shape)}, its prepared image "
                        f"{image.shape[:2]}; the maps are stale, rerun `wsss make-cams`")
    return image


def _fingerprint(cfg: PseudoConfig, cams_dir: Path, paths: Paths) -> str:
    """SHA-1 over the configuration (without ``workers``), the map shards' bytes and the data hash."""
    h = hashlib.sha1()
    h.update(json.dumps(to_dict(dataclasses.replace(cfg, workers=0)), sort_keys=True).encode())
    for path in sorted(Path(cams_dir).glob(SHARD_GLOB)):
        h.update(path.name.encode())
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    h.update(tracking.data_hash(paths).encode())
    return h.hexdigest()


def _merge_parts(out_dir: Path, ids: list[str], shard: Shard, fp: str, n_refined: int,
                 done: dict[str, Any]) -> int | None:
    """After part ``shard`` of a sharded run: stamp this part; when every image has its mask, drop the part
    stamps and write ``done`` as ``_done.json``. Returns the masks refined by all parts, or None when this
    part does not finish the run (masks missing, or a peer finished it)."""
    with folder_lock(out_dir.parent):
        done_path = out_dir / DONE_FILE
        if done_path.exists() and read_json(done_path).get("fingerprint") == fp:
            console.print(f"{out_dir}: part {shard} done; another part already merged the run")
            return None
        if shard.sharded:
            write_json(out_dir / PART_FILE.format(tag=shard.tag), {"fingerprint": fp, "n_refined": n_refined})
        missing = [i for i in ids if not _mask_done(out_dir, i)]
        if missing:
            console.print(f"{out_dir}: part {shard} done; {len(missing)} of {len(ids)} masks not ready yet "
                          f"(e.g. {missing[0]}): the part that finishes last writes them")
            return None
        total = 0 if shard.sharded else n_refined
        for part in sorted(out_dir.glob(PART_GLOB)):
            stamp = read_json(part)
            if isinstance(stamp, dict) and stamp.get("fingerprint") == fp:
                total += int(stamp.get("n_refined") or 0)
            part.unlink()
        # Stamped inside the lock, so a peer finishing at the same moment sees the run is merged.
        write_json(done_path, done)
    console.print(f"{out_dir}: all {len(ids)} masks present; part {shard} writes the final outputs")
    return total


def _mask_done(out_dir: Path, image_id: str) -> bool:
    # Masks are written atomically, so an existing non-empty file is a complete one.
    path = out_dir / f"{image_id}.png"
    return path.exists() and path.stat().st_size > 0


# --------------------------------------------------------------------------------------------------
# report


def score_masks(paths: Paths, df: pd.DataFrame, cams_dir: Path, masks_dir: Path, cfg: PseudoConfig,
                ids: set[str], ellipse_scale: float) -> dict[str, Any]:
    """Pet IoU / Dice of the maps (plain threshold), the masks and the baselines on trainval images with GT.

    Args:
        paths: project paths.
        df: the manifest.
        cams_dir: the variant's maps.
        masks_dir: its pseudo-masks.
        cfg: the configuration the masks were made with (see :func:`wsss.pseudo.plain_threshold_config`
            for "before").
        ids: images that have maps (and masks).
        ellipse_scale: the centred-ellipse baseline's scale (``evaluate.ellipse_scale``).

    Returns:
        ``before``, ``after`` and ``baselines`` (``whole_image``, ``ellipse``, ``grabcut_rect``) score
        dicts, ``n_gt_images`` and the fraction of ignore / pet pixels in the masks.
    """
    from wsss.baselines import centred_ellipse, whole_image
    from wsss.refine import threshold_mask

    plain = plain_threshold_config(cfg)

    gt_rows = pets(df, TRAINVAL, with_mask=True)
    gt_rows = gt_rows[gt_rows["id"].isin(ids)]
    gt_rows = gt_rows.sort_values("id")
    if gt_rows.empty:
        raise DataError(f"{paths.manifest}: no trainval image with maps has a GT mask to score against")
    gt_path = {str(r.id): paths.prepared / r.mask_path for r in gt_rows.itertuples()}
    before, after, whole, ellipse = SegMeter(), SegMeter(), SegMeter(), SegMeter()
    with task(f"{STAGE}: score vs GT", len(gt_rows)) as advance:
        for image_id, prob, _ in iter_maps(cams_dir, set(gt_path)):
            gt = read_mask(gt_path[image_id])
            before.add(threshold_mask(prob, plain), gt)
            after.add(read_mask(masks_dir / f"{image_id}.png"), gt)
            whole.add(whole_image(*gt.shape), gt)
            ellipse.add(centred_ellipse(*gt.shape, ellipse_scale), gt)
            advance(1)
    ignore, fg, total = 0, 0, 0
    for image_id in sorted(ids):
        mask = read_mask(masks_dir / f"{image_id}.png")
        ignore += int(np.count_nonzero(mask == 255))
        fg += int(np.count_nonzero(mask == 1))
        total += mask.size
    return {
        "n_gt_images": len(gt_rows),
        "before_threshold": plain.threshold,
        "before": before.result().to_dict(),
        "after": after.result().to_dict(),
        "baselines": {
            "whole_image": whole.result().to_dict(),
            "ellipse": ellipse.result().to_dict(),
            "grabcut_rect": grabcut_rect_scores(paths, gt_rows, cfg.workers),
        },
        "mask_ignore_fraction": ignore / total if total else 0.0,
        "mask_fg_fraction": fg / total if total else 0.0,
    }


def grabcut_rect_scores(paths: Paths, rows: pd.DataFrame, workers: int = 0) -> dict[str, float]:
    """Scores of GrabCut from a centred rectangle on ``rows``, cached per data and image set (label-free).

    It is the same for every map variant, and the slowest part of the report, hence the cache under
    ``.wsss/state`` (outside DVC outs).
    """
    from wsss.parallel import cpu_count, process_context

    prepared = paths.prepared.resolve()  # workers may not share the caller's cwd
    items = [(str(prepared / r.image_path), str(prepared / r.mask_path)) for r in rows.itertuples()]
    key = hashlib.sha1(json.dumps([tracking.data_hash(paths), RECT_BASELINE_FRAC, RECT_BASELINE_ITERATIONS,
                                   sorted(rows["id"].astype(str))]).encode()).hexdigest()[:16]
    cache = paths.state_dir(STAGE, "baselines") / f"grabcut-rect-{key}.json"
    if cache.exists():
        return read_json(cache)
    meter = SegMeter()
    chunks = [items[i : i + 8] for i in range(0, len(items), 8)]
    n_workers = min(workers or cpu_count(), len(chunks))
    with task(f"{STAGE}: GrabCut rectangle baseline", len(items)) as advance:
        if n_workers <= 1:
            for chunk in chunks:
                meter.merge(_rect_chunk(chunk))
                advance(len(chunk))
        else:
            with cf.ProcessPoolExecutor(max_workers=n_workers, mp_context=process_context()) as pool:
                # Merged in submission order, so the result does not depend on scheduling.
                for chunk, part in zip(chunks, pool.map(_rect_chunk, chunks), strict=True):
                    meter.merge(part)
                    advance(len(chunk))
    scores = meter.result().to_dict()
    write_json(cache, scores)
    return scores


def _rect_chunk(items: list[tuple[str, str]]) -> SegMeter:
    """Worker: GrabCut-rectangle masks of a few images, scored against their GT."""
    import cv2

    from wsss.refine import grabcut_rect_baseline

    cv2.setNumThreads(1)  # the pool already uses every core
    meter = SegMeter()
    for image_path, mask_path in items:
        image = read_rgb(Path(image_path))
        meter.add(grabcut_rect_baseline(image, RECT_BASELINE_FRAC, RECT_BASELINE_ITERATIONS), read_mask(Path(mask_path)))
    return meter


def _flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    """``trainval_before_iou_mean``, ``trainval_after_iou_mean``, ``trainval_baseline_ellipse_iou_mean``, ...
    for MLflow: scores say their split (the trainval images with GT)."""
    out: dict[str, float] = {}
    for key in ("before", "after"):
        out.update({f"trainval_{key}_{k}": v for k, v in report[key].items()})
    for name, scores in report["baselines"].items():
        out.update({f"trainval_baseline_{name}_{k}": v for k, v in scores.items()})
    for key in ("mask_ignore_fraction", "mask_fg_fraction", "n_masks", "n_refined", "seconds", "images_per_s"):
        if report.get(key) is not None:
            out[key] = report[key]
    return out
