"""Stage ``train-classifier``: an image-level classifier (species / breed, optionally + "bg").

Cross-entropy on the logits (not on pooled features: docs/seed-paper.md, B1), SGD with separate
backbone / head learning rates, cosine schedule, augmentation, and model selection on the validation
split only. Checkpoints every epoch under ``.wsss/state`` and resumes after a kill (:mod:`wsss.training.trainer`).
"""

from __future__ import annotations

import time
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from wsss import tracking
from wsss.config import ClassifierConfig, Params
from wsss.data.breeds import class_names, num_classes, variant_name
from wsss.data.datasets import ClassificationDataset, classification_transform
from wsss.data.loaders import loader
from wsss.data.manifest import load_manifest, trainval
from wsss.evaluation import balanced_accuracy
from wsss.paths import Paths
from wsss.stages.common import require_rows, resolve_weights
from wsss.training.distributed import DistContext
from wsss.training.trainer import Trainer
from wsss.ui import console
from wsss.variants import ClassifierId

STAGE = "train-classifier"


def model_name(labels: str, bg: bool) -> str:
    """``classifier-<variant>``, the folder under ``models/``."""
    return str(ClassifierId(labels, bg))


def select_rows(df: pd.DataFrame, labels: str, bg: bool) -> pd.DataFrame:
    """Rows used to train a classifier: labelled pets of train/val (+ background images with ``bg``)."""
    return trainval(df, bg)


def class_weights(targets: list[int], num_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights, normalised so a balanced set gets all ones (absent classes: 0)."""
    counts = torch.bincount(torch.as_tensor(targets, dtype=torch.long), minlength=num_classes).float()
    present = counts > 0
    weights = torch.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def _train_val_rows(paths: Paths, labels: str, bg: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The variant's training and validation rows; a clear error when training images (or, with ``bg``,
    background images) are missing."""
    df = select_rows(load_manifest(paths.manifest), labels, bg)
    if bg:
        require_rows(int(df["is_background"].sum()), "background images",
                     "set base.background_root to a Stanford Background folder (or use the synthetic dataset)",
                     paths.manifest)
    train_df, val_df = df[df["split"] == "train"], df[df["split"] == "val"]
    require_rows(len(train_df), "training images", "check prepare's report", paths.manifest)
    return train_df, val_df


def _optimizer(model: torch.nn.Module, cfg: ClassifierConfig) -> torch.optim.SGD:
    """SGD with the head (``fc``) at ``lr_head`` and the rest at ``lr_backbone``."""
    head = list(model.fc.parameters())
    head_ids = {id(p) for p in head}
    backbone = [p for p in model.parameters() if id(p) not in head_ids]
    return torch.optim.SGD(
        [{"params": backbone, "lr": cfg.lr_backbone}, {"params": head, "lr": cfg.lr_head}],
        momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0,
    )


def run(params: Params, paths: Paths, labels: str, bg: bool, device: str | None = None) -> dict[str, Any]:
    """Train one classifier variant and save ``models/classifier-<variant>/`` (data-parallel with
    ``base.world_size`` or under ``torchrun``: :func:`wsss.training.distributed.start`)."""
    from wsss.device import resolve_device
    from wsss.training.distributed import start

    cfg = params.train_classifier
    train_df, _ = _train_val_rows(paths, labels, bg)
    return start(_train, params.base.world_size, resolve_device(device or params.base.device),
                 params, paths, labels, bg, batch_size=cfg.batch_size, batch_key="train_classifier.batch_size",
                 n_images=len(train_df), what="training images", source=paths.manifest,
                 report=paths.training_report(model_name(labels, bg)))


def _train(ctx: DistContext, params: Params, paths: Paths, labels: str, bg: bool) -> dict[str, Any] | None:
    """The training of one rank (all of it on one process); rank 0 alone logs and saves."""
    from wsss.device import precision_for, prepare_model, seed_everything
    from wsss.models.classifier import Classifier
    from wsss.training.checkpoint import fingerprint
    from wsss.training.distributed import sync_batchnorm

    cfg = params.train_classifier
    variant, name = variant_name(labels, bg), model_name(labels, bg)
    train_df, val_df = _train_val_rows(paths, labels, bg)
    seed_everything(params.base.seed)
    prec = precision_for(ctx.device)
    k = num_classes(labels, bg)
    model = Classifier(cfg.arch, k, weights=resolve_weights(cfg.weights, paths))
    model = prepare_model(sync_batchnorm(model, ctx), prec)
    optimizer = _optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    trainer = Trainer(STAGE, variant, name, params, paths, prec,
                      fingerprint(cfg, params.base.seed, labels, bg, tracking.data_hash(paths)), ctx)
    step_model = trainer.data_parallel(model)

    train_tf = classification_transform(cfg.input_size, train=True, crop_scale_min=cfg.crop_scale_min)
    eval_tf = classification_transform(cfg.input_size, train=False)
    train_ds = ClassificationDataset(train_df, paths.prepared, labels, bg, train_tf)
    train_dl = trainer.loader(train_ds, cfg.batch_size)
    weight = class_weights(train_ds.targets, k).to(prec.device) if cfg.class_balance else None
    val_dl = loader(ClassificationDataset(val_df, paths.prepared, labels, bg, eval_tf), cfg.batch_size,
                    params, shuffle=False)

    select = ("val_balanced_acc" if cfg.class_balance else "val_acc") if len(val_df) else None
    if select is None and ctx.is_main:
        console.print("[yellow]no validation images: keeping the last epoch[/]")
    with trainer.session(sections=("train_classifier",), extra_tags={"world_size": str(ctx.world_size)}):
        result = trainer.fit(
            model, optimizer, scheduler, cfg.epochs, len(train_dl),
            lambda epoch: _train_epoch(trainer, step_model, optimizer, train_dl, weight, cfg.label_smoothing),
            validate=(lambda epoch: _validate(trainer, model, val_dl)) if select else None, select=select,
        )
        if not ctx.is_main:
            return None
        model.load_state_dict(result.best_state)
        meta = {
            "kind": "classifier", "arch": cfg.arch, "num_classes": k, "labels": labels, "bg": bg,
            "classes": class_names(labels, bg), "input_size": cfg.input_size, "weights": cfg.weights,
            "best_epoch": result.best_epoch,
        }
        best = result.history[result.best_epoch] if result.history else {}
        final = {
            "val_acc": best.get("val_acc", float("nan")),
            "val_balanced_acc": best.get("val_balanced_acc", float("nan")),
            "best_epoch": result.best_epoch,
            "epochs": cfg.epochs,
            "train_seconds": trainer.seconds,
            "n_train": len(train_df),
            "n_val": len(val_df),
            "world_size": ctx.world_size,
        }
        trainer.save(model, meta, final)
    console.print(f"saved {paths.model_dir(name)} (val_acc {final['val_acc']:.3f}, epoch {result.best_epoch})")
    return final


def _train_epoch(trainer: Trainer, model: torch.nn.Module, optimizer: torch.optim.Optimizer, dl: DataLoader,
                 weight: torch.Tensor | None, label_smoothing: float) -> dict[str, float]:
    """One epoch of (class-weighted, label-smoothed) cross-entropy on the logits; ``model`` is the one to step
    (the DDP wrapper when data-parallel)."""
    from wsss.device import autocast, to_device
    from wsss.training.distributed import all_reduce_sum

    prec = trainer.prec
    total, correct, loss_sum, t0 = 0, 0, 0.0, time.perf_counter()
    for x, y in dl:
        x, y = to_device(x, prec), y.to(prec.device)
        with autocast(prec):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, weight=weight, label_smoothing=label_smoothing)
        trainer.step(loss, optimizer)
        loss_sum += float(loss.detach()) * len(y)
        correct += int((logits.argmax(1) == y).sum())
        total += len(y)
        trainer.advance(1)
    seconds = time.perf_counter() - t0
    loss_sum, correct, total = all_reduce_sum([loss_sum, correct, total], trainer.ctx)  # over the ranks
    return {"train_loss": loss_sum / max(total, 1), "train_acc": correct / max(total, 1),
            "train_images_per_s": total / max(seconds, 1e-9)}


def _validate(trainer: Trainer, model: torch.nn.Module, dl: DataLoader) -> dict[str, float]:
    """Loss, accuracy and balanced accuracy on the validation split."""
    from wsss.device import autocast, to_device

    prec = trainer.prec
    loss_sum, preds, targets = 0.0, [], []
    for x, y in dl:
        x, y = to_device(x, prec), y.to(prec.device)
        with autocast(prec):
            logits = model(x)
        loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        preds.append(logits.argmax(1).cpu())
        targets.append(y.cpu())
    pred, target = torch.cat(preds), torch.cat(targets)
    return {"val_loss": loss_sum / max(len(target), 1),
            "val_acc": float((pred == target).float().mean()) if len(target) else float("nan"),
            "val_balanced_acc": balanced_accuracy(pred, target)}
