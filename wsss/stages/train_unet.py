"""Stage ``train-unet``: a segmenter trained on pseudo-masks (weak supervision) or on GT (the baseline).

Every U-Net is trained the same way, for ``train_unet.steps`` optimiser steps whatever its number of
images, with the last step kept: the weakly-supervised U-Net must never select epochs with GT, and the
supervised baseline follows the same recipe, so the two compare at equal schedules (an epoch schedule
would give the U-Net on the few GT images several times fewer steps). ``--masks same-<best|variant>``
trains on the pseudo-masks of exactly the train images that have GT, the supervised U-Net's images.
Per-epoch validation IoU is logged for information only. Cross-entropy with ``ignore_index=255``
(+ optional soft Dice), augmentation, AMP/bf16 + channels_last, a per-step cosine LR, resume.
``train_unet.copy_paste`` adds pasted pairs (:mod:`wsss.data.copy_paste`) to a pseudo-mask U-Net's data.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, DataLoader

from wsss import tracking
from wsss.config import Params, to_dict
from wsss.data import copy_paste
from wsss.data.datasets import SegmentationDataset, denormalize_uint8, load_mask
from wsss.data.loaders import loader
from wsss.data.manifest import load_manifest, pets
from wsss.decision import Decision, choose_rule
from wsss.device import Precision
from wsss.errors import DataError
from wsss.evaluation import IGNORE
from wsss.io import read_json
from wsss.paths import Paths
from wsss.stages.common import require_rows, resolve_weights
from wsss.training.distributed import DistContext
from wsss.training.schedule import StepSchedule
from wsss.training.trainer import Trainer
from wsss.ui import console
from wsss.variants import PRIORS, MapVariant, MaskSource, UnetId
from wsss.viz import overlay_ids, overlay_row

STAGE = "train-unet"


def best_pseudo_variant(paths: Paths) -> str:
    """The pseudo-mask variant with the highest fg IoU on non-test images (reports/pseudo/*.json); the
    label-free priors' masks are the baseline to beat, not candidates."""
    reports = [p for p in sorted((paths.reports / "pseudo").glob("*.json")) if p.stem not in PRIORS]
    if not reports:
        raise DataError(f"{paths.reports / 'pseudo'}: no pseudo-mask reports; run `wsss make-pseudo` first")
    scored = []
    for path in reports:
        rep = read_json(path)
        scored.append((float(rep.get("after", {}).get("iou_mean", float("nan"))), path.stem))
    scored = [s for s in scored if np.isfinite(s[0])]
    if not scored:
        raise DataError(f"{paths.reports / 'pseudo'}: no report has an 'after.iou_mean' score")
    return max(scored)[1]


def resolve_source(paths: Paths, masks: str) -> MaskSource:
    """``gt``, a pseudo-mask variant, or ``best`` (resolved from the pseudo-mask reports); ``same-`` kept."""
    source = MaskSource.parse(masks)
    if source.kind != "best":
        return source
    return MaskSource("pseudo", MapVariant.parse(best_pseudo_variant(paths)), source.same_images)


def training_rows(df: pd.DataFrame, paths: Paths, source: MaskSource) -> tuple[pd.DataFrame, Path | None]:
    """Training images and the mask folder (None = GT masks from the manifest).

    ``gt`` and ``same-<variant>`` train on the same rows, in the same order: the train images with a GT
    mask. A same-images U-Net needs a pseudo-mask for every one of them (else the comparison is not on
    the same images); an all-images one takes every train image that has a pseudo-mask.
    """
    gt_rows = pets(df, "train", with_mask=True)
    if source.kind == "selftrain":  # a self-training round's constrained masks (wsss self-train)
        masks_dir = paths.selftrain_masks_dir(source.round)
        if not (masks_dir / "_done.json").exists():
            raise DataError(f"{masks_dir}: round {source.round} masks not finished; run "
                            f"`wsss self-train --round {source.round}`")
        train = pets(df, "train")
        return train[train["id"].isin({p.stem for p in masks_dir.glob("*.png")})], masks_dir
    if source.variant is None:
        if source.kind != "gt":
            raise DataError(f"mask source {source}: resolve 'best' to a variant first")
        return gt_rows, None
    masks_dir = paths.masks_dir(source.variant)
    if not masks_dir.exists():
        raise DataError(f"{masks_dir}: pseudo-masks not found; run `wsss make-pseudo --method {source.variant}`")
    have = {p.stem for p in masks_dir.glob("*.png")}
    if source.same_images:
        missing = sorted(set(gt_rows["id"]) - have)
        if missing:
            raise DataError(f"{masks_dir}: {len(missing)} of the {len(gt_rows)} train images with GT have no "
                            f"pseudo-mask (e.g. {missing[0]}); rerun `wsss make-pseudo --method {source.variant}`")
        return gt_rows, masks_dir
    train = pets(df, "train")
    return train[train["id"].isin(have)], masks_dir


def _copy_paste(params: Params, paths: Paths, df: pd.DataFrame, train_df: pd.DataFrame, source: MaskSource,
                masks_dir: Path | None) -> copy_paste.CopyPasteResult:
    """The pasted pairs of ``train_unet.copy_paste`` (none for GT masks: the cut-outs come from pseudo-masks
    and their maps; none for a label-free prior's masks, which must stay label-free); says on the console why the feature is off when it is enabled but cannot run."""
    from wsss.cams import load_maps

    cfg = params.train_unet.copy_paste
    if masks_dir is None or source.variant is None:
        return copy_paste.CopyPasteResult([], 0, 0, 0, "GT masks")
    if source.variant.is_prior:  # knowing which images hold no pet is an image-level label
        return copy_paste.CopyPasteResult([], 0, 0, 0, "label-free masks (background images are an image label)")
    backgrounds = df[df["is_background"].astype(bool) & (df["split"] == "train")]
    cams_dir = paths.cams_dir(source.variant)
    threshold = copy_paste_map_threshold(cfg.map_threshold, paths, source.variant) if cfg.enabled else 0.0
    result = copy_paste.build(cfg, train_df, backgrounds, paths.prepared, masks_dir,
                              lambda ids: load_maps(cams_dir, ids), params.base.seed, threshold,
                              max_side=2 * params.train_unet.input_size)
    if cfg.enabled and result.note:
        console.print(f"note: train_unet.copy_paste is off for this run: {result.note}", highlight=False,
                      markup=False, soft_wrap=True)
    elif result.pairs:
        console.print(f"copy-paste: {len(result.pairs)} pairs from {result.n_confident} confident cut-outs "
                      f"(of {result.n_candidates}, map cut at {threshold:g}) on {result.n_backgrounds} "
                      "background images")
    return result


def copy_paste_map_threshold(setting: float | str, paths: Paths, variant: MapVariant) -> float:
    """``train_unet.copy_paste.map_threshold`` as a number: itself, or for ``val`` the ``best_threshold``
    of ``variant``'s make-cams report (chosen on the val split, never on test).

    Raises:
        DataError: ``val`` and the report is missing, unreadable or has no threshold in [0, 1].
    """
    from wsss.cams import remake_hint

    if not isinstance(setting, str):
        return float(setting)
    report, rerun = paths.cams_report(variant), remake_hint(paths.cams_dir(variant))
    if not report.is_file():
        raise DataError(f"{paths.shown(report)}: missing; train_unet.copy_paste.map_threshold is 'val', which "
                        f"reads this map's val-best threshold (run {rerun} first)")
    data = read_json(report)
    value = data.get("best_threshold") if isinstance(data, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise DataError(f"{paths.shown(report)}: 'best_threshold' must be a number in [0, 1], got {value!r}; "
                        f"rerun {rerun}")
    return float(value)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, ctx: DistContext | None = None) -> torch.Tensor:
    """1 - Dice of the pet class on non-ignored pixels, over the global batch when data-parallel."""
    from wsss.training.distributed import global_sum

    valid = (target != IGNORE).float()
    prob = logits.softmax(1)[:, 1] * valid
    tgt = (target == 1).float() * valid
    sums = torch.stack([(prob * tgt).sum(), prob.sum(), tgt.sum()])
    if ctx is not None:
        sums = global_sum(sums, ctx)
    inter, prob_sum, tgt_sum = sums
    return 1 - (2 * inter + 1) / (prob_sum + tgt_sum + 1)


def unet_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float, ctx: DistContext) -> torch.Tensor:
    """Cross-entropy over the non-ignored pixels + ``dice_weight`` x soft Dice, both over the global batch:
    the ranks' halves of a batch hold different numbers of ignored pixels, so per-rank means averaged by
    DDP would weight pixels by their rank (the result would depend on the number of ranks)."""
    from wsss.training.distributed import global_sum

    ce_and_count = torch.stack([F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum"),
                                (target != IGNORE).sum().to(logits.dtype)])
    ce_sum, count = global_sum(ce_and_count, ctx)
    loss = ce_sum / count.clamp(min=1)
    if dice_weight > 0:
        loss = loss + dice_weight * soft_dice_loss(logits, target, ctx)
    return loss


def run(params: Params, paths: Paths, masks: str, device: str | None = None) -> dict[str, Any]:
    """Train ``models/unet-<masks>/`` on GT or pseudo-masks for ``train_unet.steps`` optimiser steps
    (data-parallel with ``base.world_size`` or under ``torchrun``: :func:`wsss.training.distributed.start`)."""
    from wsss.device import resolve_device
    from wsss.training.distributed import start

    cfg = params.train_unet
    source = resolve_source(paths, masks)
    train_df, _ = training_rows(load_manifest(paths.manifest), paths, source)
    require_rows(len(train_df), "training images with masks", f"check masks for source '{source}'", paths.manifest)
    return start(_train, params.base.world_size, resolve_device(device or params.base.device), params, paths,
                 masks, batch_size=cfg.batch_size, batch_key="train_unet.batch_size", n_images=len(train_df),
                 what="training images with masks", source=paths.manifest,
                 report=paths.training_report(str(UnetId(MaskSource.parse(masks)))))


def _train(ctx: DistContext, params: Params, paths: Paths, masks: str) -> dict[str, Any] | None:
    """The training of one rank (all of it on one process); rank 0 alone logs and saves."""
    from wsss.device import precision_for, prepare_model, seed_everything
    from wsss.models.unet import build_unet
    from wsss.training.checkpoint import fingerprint
    from wsss.training.distributed import sync_batchnorm

    cfg = params.train_unet
    requested = MaskSource.parse(masks)
    name = str(UnetId(requested))  # unet-best / unet-same-best keep the unresolved name
    source = resolve_source(paths, masks)
    df = load_manifest(paths.manifest)
    train_df, masks_dir = training_rows(df, paths, source)
    val_df = pets(df, "val", with_mask=True).sort_values("id")

    seed_everything(params.base.seed)
    prec = precision_for(ctx.device)
    weights_path = None
    if cfg.encoder_weights not in ("imagenet", "none"):  # pretrain:<name> or a state_dict file
        weights_path = resolve_weights(cfg.encoder_weights, paths)
    model = prepare_model(sync_batchnorm(build_unet(cfg, num_classes=2, weights_path=weights_path), ctx), prec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Cosine over optimiser steps (stepped by trainer.step), so every U-Net anneals on the same curve.
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.steps)
    mask_fp = None if masks_dir is None else sorted((p.name, p.stat().st_size) for p in masks_dir.glob("*.png"))
    pasted = _copy_paste(params, paths, df, train_df, source, masks_dir)
    trainer = Trainer(STAGE, name, name, params, paths, prec,
                      fingerprint(to_dict(cfg), str(source), params.base.seed, tracking.data_hash(paths), mask_fp,
                                  pasted.digest()),
                      ctx)
    step_model = trainer.data_parallel(model)
    train_ds = SegmentationDataset(train_df, paths.prepared, cfg.input_size, train=True, masks_dir=masks_dir)
    if pasted.pairs:  # extra pairs in the same shuffled loader: the steps stay cfg.steps
        train_ds = ConcatDataset([train_ds, copy_paste.PastedPairs(pasted.pairs, train_ds.transform)])
    val_ds = SegmentationDataset(val_df, paths.prepared, cfg.input_size, train=False)
    train_dl = trainer.loader(train_ds, cfg.batch_size)
    val_dl = loader(val_ds, cfg.batch_size, params, shuffle=False)
    schedule = StepSchedule(cfg.steps, len(train_dl))
    steps_before = trainer.optimizer_steps  # > 0 when resuming

    images = "gt" if (source.kind == "gt" or source.same_images) else "all"
    with trainer.session(sections=("train_unet",), extra_tags={"masks": str(source), "images": images,
                                                               "world_size": str(ctx.world_size)}):
        result = trainer.fit(
            model, optimizer, scheduler, schedule.epochs, schedule.steps_per_epoch,
            lambda epoch: _train_epoch(trainer, step_model, optimizer, scheduler, train_dl, cfg.dice_weight,
                                       schedule.steps_in(epoch)),
            validate=(lambda epoch: _validate(model, val_dl, prec)) if len(val_ds) else None,
            overlays=lambda: _overlay_grid(model, val_ds, val_df, masks_dir, paths, prec),
            total_steps=schedule.steps, scheduler_per_step=True,
        )
        if not ctx.is_main:
            return None
        model.load_state_dict(result.best_state)
        rule, choice = choose_rule(model, val_df, paths.prepared, cfg.input_size, prec, cfg.decision, cfg.batch_size)
        training = {"steps": trainer.optimizer_steps, "n_images": len(train_df), "images": images,
                    "batch_size": cfg.batch_size, "epochs": schedule.epochs}
        decision = {"threshold": rule.threshold, "flip_tta": rule.flip_tta,
                    "chosen_on": "val" if choice is not None else None,
                    **({"val": choice.to_dict()} if choice is not None else {})}
        meta = {"kind": "unet", "architecture": cfg.architecture, "encoder": cfg.encoder,
                "input_size": cfg.input_size, "masks": str(source), "num_classes": 2,
                "plain_filters": list(cfg.plain_filters), "training": training, "decision": decision}
        last = result.history[-1] if result.history else {}
        final = {
            "masks": str(source), "images": images, "steps": trainer.optimizer_steps, "epochs": schedule.epochs,
            "steps_per_epoch": schedule.steps_per_epoch, "n_train": len(train_df),
            "train_seconds": trainer.seconds,
            "seconds_per_step": trainer.seconds / max(trainer.optimizer_steps - steps_before, 1),
            "last_val_iou_mean": last.get("val_iou_mean", float("nan")),
            "final_train_loss": last.get("train_loss", float("nan")),
            "world_size": ctx.world_size,
            "decision_threshold": rule.threshold, "decision_flip_tta": rule.flip_tta,
            **({"decision_best_threshold": choice.best, "decision_val_iou": choice.val_iou,
                "decision_val_iou_default": choice.val_iou_default, "decision_gain": choice.gain,
                "decision_gain_se": choice.gain_se} if choice is not None else {}),
            **pasted.summary(),
        }
        trainer.save(model, meta, final, logged=final)
        tracking.guard(log_mlflow_model, model.cpu().float(), cfg.input_size, rule)
    chosen = "" if choice is None else (f"; val IoU {choice.val_iou:.3f} at {rule.describe()} "
                                        f"(0.5: {choice.val_iou_default:.3f}, best {choice.best:g})")
    console.print(f"saved {paths.model_dir(name)} ({source} on {len(train_df)} images, {trainer.optimizer_steps} "
                  f"steps; last val IoU {final['last_val_iou_mean']:.3f}{chosen})")
    return final


def _train_epoch(trainer: Trainer, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 dl: DataLoader, dice_weight: float, n_steps: int) -> dict[str, float]:
    """``n_steps`` steps (a whole epoch, or the schedule's remainder) of cross-entropy (ignoring 255) +
    ``dice_weight`` x soft Dice of the pet class; the LR scheduler steps with the optimiser. ``model`` is
    the one to step (the DDP wrapper when data-parallel)."""
    from wsss.device import autocast, to_device
    from wsss.training.distributed import all_reduce_sum

    prec = trainer.prec
    loss_sum, n, steps, t0 = 0.0, 0, 0, time.perf_counter()
    for x, y in dl:
        x, y = to_device(x, prec), y.to(prec.device)
        with autocast(prec):
            logits = model(x)
        logits = logits.float()
        loss = unet_loss(logits, y, dice_weight, trainer.ctx)
        trainer.step(loss, optimizer, scheduler)
        loss_sum += float(loss.detach()) * len(x)
        n += len(x)
        steps += 1
        trainer.advance(1)
        if steps == n_steps:  # before the next batch is loaded (its augmentation would draw random numbers)
            break
    loss_sum, n = all_reduce_sum([loss_sum, float(n)], trainer.ctx)  # over the ranks
    return {"train_loss": loss_sum / max(n, 1), "train_images_per_s": n / max(time.perf_counter() - t0, 1e-9),
            "optimizer_steps": float(trainer.optimizer_steps)}


def _validate(model: torch.nn.Module, dl: DataLoader, prec: Precision) -> dict[str, float]:
    """Validation IoU / Dice against GT (logged for information: never used to select an epoch)."""
    from wsss.device import autocast, to_device
    from wsss.evaluation import SegMeter

    meter = SegMeter()
    for x, y in dl:
        with autocast(prec):
            pred = model(to_device(x, prec)).float().argmax(1).cpu().numpy()
        for p, g in zip(pred, y.numpy(), strict=True):
            meter.add(p.astype(np.uint8), g.astype(np.uint8))
    s = meter.result()
    return {"val_iou_mean": s.iou_mean, "val_dice_mean": s.dice_mean, "val_iou_dataset": s.iou_dataset}


def _overlay_grid(model: torch.nn.Module, val_ds: SegmentationDataset, val_df: pd.DataFrame,
                  masks_dir: Path | None, paths: Paths, prec: Precision) -> np.ndarray | None:
    """A row per fixed overlay image: image | its training mask | prediction | GT."""
    from wsss.device import autocast, to_device

    rows = []
    for i in overlay_ids(len(val_ds)):
        x, gt = val_ds[i]
        with autocast(prec):
            pred = model(to_device(x[None], prec)).float().argmax(1)[0].cpu().numpy()
        train_mask = _mask_for_overlay(val_df.iloc[i], masks_dir, paths, gt.shape)
        rows.append(overlay_row(denormalize_uint8(x), train_mask, pred, gt.numpy()))
    return np.concatenate(rows, 0) if rows else None


def _mask_for_overlay(row: pd.Series, masks_dir: Path | None, paths: Paths, shape: tuple[int, ...]) -> np.ndarray:
    """The training mask of a val image (pseudo-mask if one exists, else GT), resized to ``shape``."""
    from PIL import Image

    path = (masks_dir / f"{row['id']}.png") if masks_dir is not None else paths.prepared / row["mask_path"]
    if not path.exists():
        return np.full(shape, IGNORE, np.uint8)
    mask = Image.fromarray(load_mask(path))  # a damaged file: DataError naming it
    return np.asarray(mask.resize((shape[1], shape[0]), Image.NEAREST), dtype=np.uint8)


def log_mlflow_model(model: torch.nn.Module, size: int, rule: Decision | None = None) -> None:
    """Log the U-Net as a self-contained, pickle-free MLflow pyfunc (safetensors weights + JSON metadata).

    Takes an RGB image of any size, returns its mask at that size under ``rule`` (default: 0.5, no flip;
    docs/artefacts.md#mlflow-model); the pseudo-mask source recorded is the active run's ``masks`` tag.
    """
    import mlflow

    from wsss.serving.export import log_unet

    run = mlflow.active_run()
    tags = mlflow.get_run(run.info.run_id).data.tags if run is not None else {}
    log_unet(model, size, masks=tags.get("masks"), rule=rule)
