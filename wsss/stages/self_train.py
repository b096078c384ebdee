"""Stage ``self-train``: one constrained self-training round, and the champion over every round.

Round ``N`` (``wsss self-train --round N``, 1 <= N <= ``self_train.rounds``):

1. the previous U-Net (round 0: ``unet-best``, trained on the selected route's pseudo-masks; round N-1:
   ``unet-selftrain-r<N-1>``) predicts every train image that has a round-0 mask, as a soft pet
   probability (flip TTA with ``self_train.flip_tta``);
2. the selected route's refiner (``reports/crf/<variant>.yaml`` when tuned, as ``make-pseudo`` uses it)
   refines that map;
3. the mask rules of :mod:`wsss.self_training` hold it to round 0 (disagreement -> 255, an area jump
   -> round 0's mask, the GrabCut border band -> background), written to ``masks/selftrain-r<N>/``;
4. ``unet-selftrain-r<N>`` trains on those masks with the ``train_unet`` schedule (the trainer passed in
   by the command: the ``train-unet`` stage's run, with its resume checkpoint);
5. both U-Nets are scored on the validation split -> ``reports/selftrain/r<N>.json`` and an MLflow run.

Resume: masks are written atomically with their per-image numbers beside them and a fingerprint of the
previous model, the round-0 masks and the settings; a rerun skips finished masks, and the U-Net resumes
from its checkpoint. ``wsss self-train-champion`` writes ``reports/self-training.json``: each round's val
IoU and the champion (best val IoU, never test; a round must beat round 0 to be chosen;
:mod:`wsss.stages.self_train_champion`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from wsss import tracking
from wsss.config import Params, to_dict
from wsss.data.manifest import load_manifest, pets
from wsss.data.readers import read_mask, read_rgb
from wsss.errors import ConfigError, DataError
from wsss.io import read_json, save_png, write_json
from wsss.paths import Paths
from wsss.pseudo import effective_config
from wsss.self_training import ROUND0_MODEL, band_of, constrain, model_of
from wsss.stages.common import reset_if_stale
from wsss.ui import console, task
from wsss.variants import MapVariant, MaskSource

STAGE = "self-train"
STATS_DIR = "_stats"  # per-mask numbers, written before the mask (a mask on disk always has its numbers)
DONE_FILE = "_done.json"

TrainFn = Callable[..., dict[str, Any]]


def check_round(params: Params, round_: int) -> None:
    """``round_`` must be 1..``self_train.rounds``.

    Raises:
        ConfigError: outside that range (exit 2).
    """
    if not 1 <= round_ <= params.self_train.rounds:
        raise ConfigError(f"--round {round_}: must be between 1 and self_train.rounds = {params.self_train.rounds}")


def round0_variant(paths: Paths) -> MapVariant:
    """The pseudo-mask variant round 0 trained on (``masks`` in ``models/unet-best/meta.json``)."""
    meta_path = paths.model_dir(ROUND0_MODEL) / "meta.json"
    if not meta_path.exists():
        raise DataError(f"{meta_path}: round-0 U-Net not found; run `wsss train-unet --masks best` first")
    masks = read_json(meta_path).get("masks")
    try:
        return MapVariant.parse(masks)
    except (ConfigError, TypeError):
        raise DataError(f"{meta_path}: 'masks' is {masks!r}, not a pseudo-mask variant") from None


def run(params: Params, paths: Paths, round_: int, train: TrainFn, device: str | None = None) -> dict[str, Any]:
    """Run self-training round ``round_``: constrained masks, the next U-Net, their val IoU.

    Args:
        params: all params (reads ``self_train``; the refiner from ``pseudo`` / the tuned file).
        paths: project paths.
        round_: 1..``self_train.rounds``.
        train: ``train(params, paths, masks, device=...)`` trains ``models/unet-<masks>/`` (the train-unet stage).
        device: overrides ``base.device``.

    Returns:
        The report written to ``reports/selftrain/r<N>.json``.
    """
    check_round(params, round_)
    prev_name = model_of(round_ - 1)
    prev_dir = paths.model_dir(prev_name)
    if not (prev_dir / "model.pt").exists():
        how = "wsss train-unet --masks best" if round_ == 1 else f"wsss self-train --round {round_ - 1}"
        raise DataError(f"{prev_dir / 'model.pt'}: round {round_ - 1} U-Net not found; run `{how}` first")
    variant = round0_variant(paths)
    round0_dir = paths.masks_dir(variant)
    if not round0_dir.is_dir():
        raise DataError(f"{round0_dir}: round-0 pseudo-masks not found; run `wsss make-pseudo --method {variant}`")
    st = params.self_train
    cfg, cfg_source = effective_config(params, paths, str(variant))
    border = band_of(cfg, st)
    df = load_manifest(paths.manifest)
    have = {p.stem for p in round0_dir.glob("*.png")}
    train_rows = pets(df, "train")
    train_rows = train_rows[train_rows["id"].isin(have)].sort_values("id")
    if train_rows.empty:
        raise DataError(f"{round0_dir}: no round-0 mask of a train image")

    out_dir = paths.selftrain_masks_dir(round_)
    fp = _fingerprint(params, cfg, prev_dir, round0_dir, paths)
    reset_if_stale(out_dir, fp, paths.masks_root)
    (out_dir / STATS_DIR).mkdir(exist_ok=True)
    todo = [r for r in train_rows.itertuples() if not (out_dir / f"{r.id}.png").exists()]

    t0 = time.perf_counter()
    if todo:
        _relabel(params, paths, prev_dir, todo, round0_dir, out_dir, cfg, border, device, round_)
    else:
        console.print(f"{out_dir}: all {len(train_rows)} masks already done")
    mask_seconds = time.perf_counter() - t0
    stats = _mask_stats(out_dir, list(train_rows["id"]))
    write_json(out_dir / DONE_FILE, {"fingerprint": fp, "n_images": len(train_rows)})

    name = model_of(round_)
    trained = train(params, paths, str(MaskSource("selftrain", round=round_)), device=device)
    t1 = time.perf_counter()
    val = {r: _val_iou(params, paths, model_of(r), device) for r in (round_ - 1, round_)}
    report = {
        "round": round_, "model": name, "previous_model": prev_name, "round0_masks": str(variant),
        "refiner": cfg.refiner, "refiner_params": cfg_source, "border_band": border,
        **stats,
        "val_iou": val[round_]["iou_mean"], "previous_val_iou": val[round_ - 1]["iou_mean"],
        "n_val": val[round_]["n_images"], "decision": val[round_]["decision"], "steps": trained.get("steps"),
        "mask_seconds": round(mask_seconds, 2), "train_seconds": trained.get("train_seconds"),
        "val_seconds": round(time.perf_counter() - t1, 2),
    }
    write_json(paths.selftrain_report(round_), report)
    with tracking.stage_run(STAGE, f"r{round_}", params, paths, sections=("self_train",),
                            extra_tags={"round0_masks": str(variant), "pseudo.source": cfg_source}):
        tracking.log_metrics({k: v for k, v in report.items()
                              if isinstance(v, (int, float)) and not isinstance(v, bool)})
        tracking.log_artifact(paths.selftrain_report(round_))
    console.print(f"self-training round {round_}: {stats['n_reset']} of {stats['n_masks']} masks reset, "
                  f"{100 * stats['ignore_fraction']:.1f} % pixels ignored; val IoU "
                  f"{report['previous_val_iou']:.3f} ({prev_name}) -> {report['val_iou']:.3f} ({name})")
    return report


def _relabel(params: Params, paths: Paths, prev_dir: Path, todo: list[Any], round0_dir: Path, out_dir: Path,
             cfg: Any, border: float, device: str | None, round_: int) -> None:
    """Predict (flip TTA), refine and constrain the masks of ``todo``; each saved as soon as it is done."""
    from wsss.device import precision_from, prepare_model
    from wsss.inference import predict_probs
    from wsss.models.loading import load_model_dir
    from wsss.refiners import refine_many

    st = params.self_train
    net, meta = load_model_dir(prev_dir, "unet")
    prec = precision_from(device, params)
    net = prepare_model(net, prec)
    queue: deque[str] = deque()

    def pairs() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i in range(0, len(todo), st.batch_size):
            chunk = todo[i : i + st.batch_size]
            images = [read_rgb(paths.prepared / r.image_path) for r in chunk]
            probs = predict_probs(net, images, meta.input_size, prec, flip=st.flip_tta)
            for r, image, prob in zip(chunk, images, probs, strict=True):
                queue.append(str(r.id))
                yield image, np.clip(prob, 0.0, 1.0)

    with task(f"{STAGE} r{round_} ({cfg.refiner})", len(todo)) as advance:
        for new in refine_many(pairs(), cfg, cfg.workers, progress=advance):
            image_id = queue.popleft()
            round0 = read_mask(round0_dir / f"{image_id}.png")
            if round0.shape != new.shape:
                raise DataError(f"{round0_dir / (image_id + '.png')}: {round0.shape} mask for a {new.shape} image; "
                                "the round-0 masks are stale, rerun `wsss make-pseudo`")
            c = constrain(new, round0, st, border)
            write_json(out_dir / STATS_DIR / f"{image_id}.json",
                       {"reset": c.reset, "area_new": c.area_new, "area_round0": c.area_round0,
                        "ignored": int(np.count_nonzero(c.mask == 255)), "pet": int(np.count_nonzero(c.mask == 1)),
                        "pixels": int(c.mask.size)})
            save_png(out_dir / f"{image_id}.png", c.mask)


def _mask_stats(out_dir: Path, ids: list[str]) -> dict[str, Any]:
    """Totals over the round's masks: resets, ignored and pet pixel fractions, mean area change."""
    recs = []
    for image_id in ids:
        path = out_dir / STATS_DIR / f"{image_id}.json"
        if not path.exists():
            raise DataError(f"{path}: numbers of a finished mask are missing; delete {out_dir} and rerun")
        recs.append(read_json(path))
    pixels = sum(r["pixels"] for r in recs)
    n_reset = sum(bool(r["reset"]) for r in recs)
    changes = [abs(r["area_new"] - r["area_round0"]) / r["area_round0"] for r in recs if r["area_round0"] > 0]
    return {"n_masks": len(recs), "n_reset": n_reset, "reset_fraction": n_reset / max(len(recs), 1),
            "ignore_fraction": sum(r["ignored"] for r in recs) / max(pixels, 1),
            "fg_fraction": sum(r["pet"] for r in recs) / max(pixels, 1),
            "mean_area_change": float(np.mean(changes)) if changes else 0.0}


def _fingerprint(params: Params, cfg: Any, prev_dir: Path, round0_dir: Path, paths: Paths) -> str:
    """SHA-1 of the mask settings (without ``workers`` / ``rounds`` / ``batch_size``), the previous
    model's weights, the round-0 masks and the data hash."""
    h = hashlib.sha1()
    st = dataclasses.replace(params.self_train, rounds=1, batch_size=1)
    h.update(json.dumps([to_dict(dataclasses.replace(cfg, workers=0)), to_dict(st)], sort_keys=True).encode())
    for path in [prev_dir / "model.pt", *sorted(round0_dir.glob("*.png"))]:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update(tracking.data_hash(paths).encode())
    return h.hexdigest()


def _val_iou(params: Params, paths: Paths, model: str, device: str | None) -> dict[str, Any]:
    """Per-image mean pet IoU of ``models/<model>/`` on the validation split, under the model's decision
    rule (as ``evaluate`` scores test)."""
    from wsss.decision import Decision
    from wsss.device import precision_from, prepare_model
    from wsss.evaluation import SegMeter
    from wsss.models.loading import load_model_dir

    val = pets(load_manifest(paths.manifest), "val", with_mask=True).sort_values("id")
    if val.empty:
        raise DataError(f"{paths.manifest}: no validation image with GT to choose self-training rounds on")
    net, meta = load_model_dir(paths.model_dir(model), "unet")
    prec = precision_from(device, params)
    net = prepare_model(net, prec)
    rule = Decision.of_model(meta.raw, paths.model_dir(model))
    meter = SegMeter()
    rows = list(val.itertuples())
    bs = params.self_train.batch_size
    for i in range(0, len(rows), bs):
        chunk = rows[i : i + bs]
        images = [read_rgb(paths.prepared / r.image_path) for r in chunk]
        for r, prob in zip(chunk, rule.probs(net, images, meta.input_size, prec), strict=True):
            meter.add(rule.mask(prob), read_mask(paths.prepared / r.mask_path))
    return {"iou_mean": meter.result().iou_mean, "n_images": len(rows), "decision": rule.describe()}
