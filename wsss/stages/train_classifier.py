"""Stage ``train-classifier``: an image-level classifier (species / breed, optionally + "bg").

Cross-entropy on the logits (not on pooled features: the seed code's bug B1), SGD with separate
backbone / head learning rates, cosine schedule, augmentation, and model selection on the validation
split only. Checkpoints every epoch under ``.wsss/state`` and resumes after a kill.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from wsss import tracking
from wsss.config import Params
from wsss.data.breeds import class_names, num_classes, variant_name
from wsss.data.datasets import ClassificationDataset, classification_transform
from wsss.data.manifest import load_manifest
from wsss.io import write_json
from wsss.paths import Paths
from wsss.stages.common import loader, require_rows, resolve_weights
from wsss.ui import console, task
from wsss.variants import ClassifierId

STAGE = "train-classifier"


def model_name(labels: str, bg: bool) -> str:
    """``classifier-<variant>``, the folder under ``models/``."""
    return str(ClassifierId(labels, bg))


def select_rows(df, labels: str, bg: bool):  # noqa: ANN001, ANN201 - pandas in, pandas out
    """Rows used to train a classifier: labelled pets of train/val (+ background images with ``bg``)."""
    keep = df["split"].isin(["train", "val"]) & (~df["is_background"] | bg)
    return df[keep]


def class_weights(targets: list[int], num_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights, normalised so a balanced set gets all ones (absent classes: 0)."""
    counts = torch.bincount(torch.as_tensor(targets, dtype=torch.long), minlength=num_classes).float()
    present = counts > 0
    weights = torch.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def balanced_accuracy(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Mean per-class recall over the classes present in ``target`` (NaN when empty)."""
    recalls = [float((pred[target == c] == c).float().mean()) for c in range(num_classes) if (target == c).any()]
    return sum(recalls) / len(recalls) if recalls else float("nan")


def run(params: Params, paths: Paths, labels: str, bg: bool, device: str | None = None) -> dict[str, Any]:
    """Train one classifier variant and save ``models/classifier-<variant>/``."""
    from wsss.device import autocast, precision_for, prepare_model, resolve_device, seed_everything, to_device
    from wsss.models.classifier import Classifier
    from wsss.training.checkpoint import CheckpointManager, fingerprint, save_model
    from wsss.training.loop import fit

    cfg = params.train_classifier
    variant = variant_name(labels, bg)
    name = model_name(labels, bg)
    df = select_rows(load_manifest(paths.manifest), labels, bg)
    if bg:
        require_rows(int(df["is_background"].sum()), "background images",
                     "set base.background_root to a Stanford Background folder (or use the synthetic dataset)",
                     paths.manifest)
    train_df, val_df = df[df["split"] == "train"], df[df["split"] == "val"]
    require_rows(len(train_df), "training images", "check prepare's report", paths.manifest)

    seed_everything(params.base.seed)
    prec = precision_for(resolve_device(device or params.base.device))
    k = num_classes(labels, bg)
    model = prepare_model(Classifier(cfg.arch, k, weights=resolve_weights(cfg.weights, paths)), prec)
    head = list(model.fc.parameters())
    head_ids = {id(p) for p in head}
    backbone = [p for p in model.parameters() if id(p) not in head_ids]
    optimizer = torch.optim.SGD(
        [{"params": backbone, "lr": cfg.lr_backbone}, {"params": head, "lr": cfg.lr_head}],
        momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0,
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    scaler = torch.amp.GradScaler(prec.device.type, enabled=prec.use_grad_scaler)

    train_tf = classification_transform(cfg.input_size, train=True, crop_scale_min=cfg.crop_scale_min)
    eval_tf = classification_transform(cfg.input_size, train=False)
    train_ds = ClassificationDataset(train_df, paths.prepared, labels, bg, train_tf)
    train_dl = loader(train_ds, cfg.batch_size, params, shuffle=True, seed=params.base.seed, drop_last=True)
    weight = class_weights(train_ds.targets, k).to(prec.device) if cfg.class_balance else None
    val_dl = loader(ClassificationDataset(val_df, paths.prepared, labels, bg, eval_tf), cfg.batch_size,
                    params, shuffle=False)

    ckpt = CheckpointManager(
        paths.state_dir(STAGE, variant),
        fingerprint(cfg, params.base.seed, labels, bg, tracking.data_hash(paths)),
    )
    state = ckpt.load()
    run_holder: dict[str, str] = {}

    def train_epoch(epoch: int) -> dict[str, float]:
        total, correct, loss_sum, seen_time = 0, 0, 0.0, time.perf_counter()
        for x, y in train_dl:
            x, y = to_device(x, prec), y.to(prec.device)
            with autocast(prec):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y, weight=weight, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
            advance(1)
        seconds = time.perf_counter() - seen_time
        return {"train_loss": loss_sum / max(total, 1), "train_acc": correct / max(total, 1),
                "train_images_per_s": total / max(seconds, 1e-9)}

    def validate(epoch: int) -> dict[str, float]:
        loss_sum, preds, targets = 0.0, [], []
        for x, y in val_dl:
            x, y = to_device(x, prec), y.to(prec.device)
            with autocast(prec):
                logits = model(x)
            loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            preds.append(logits.argmax(1).cpu())
            targets.append(y.cpu())
        pred, target = torch.cat(preds), torch.cat(targets)
        return {"val_loss": loss_sum / max(len(target), 1),
                "val_acc": float((pred == target).float().mean()) if len(target) else float("nan"),
                "val_balanced_acc": balanced_accuracy(pred, target, k)}

    select = ("val_balanced_acc" if cfg.class_balance else "val_acc") if len(val_df) else None
    if select is None:
        console.print("[yellow]no validation images: keeping the last epoch[/]")
    start = time.perf_counter()
    with tracking.stage_run(STAGE, variant, params, paths, sections=("train_classifier",),
                            run_id=(state or {}).get("run_id")) as run:
        run_holder["run_id"] = run.info.run_id
        with task(f"{STAGE} {variant}", cfg.epochs * len(train_dl)) as advance:
            if state is not None:
                advance(completed=(int(state["epoch"]) + 1) * len(train_dl), info="resumed")
                console.print(f"resuming {name} after epoch {int(state['epoch']) + 1}")
            result = fit(
                model, optimizer, scheduler, cfg.epochs, ckpt, train_epoch,
                validate if select else None, select=select, scaler=scaler,
                extra_state=lambda: {"run_id": run_holder["run_id"]}, state=state,
                progress=lambda done, summary: advance(0, info=summary), generators=[train_dl.generator],
            )
        model.load_state_dict(result.best_state)
        meta = {
            "kind": "classifier", "arch": cfg.arch, "num_classes": k, "labels": labels, "bg": bg,
            "classes": class_names(labels, bg), "input_size": cfg.input_size, "weights": cfg.weights,
            "best_epoch": result.best_epoch,
        }
        save_model(paths.model_dir(name), model, meta)
        best = result.history[result.best_epoch] if result.history else {}
        final = {
            "val_acc": best.get("val_acc", float("nan")),
            "val_balanced_acc": best.get("val_balanced_acc", float("nan")),
            "best_epoch": result.best_epoch,
            "epochs": cfg.epochs,
            "train_seconds": time.perf_counter() - start,
            "n_train": len(train_df),
            "n_val": len(val_df),
        }
        write_json(paths.training_report(name), final)
        tracking.log_metrics({f"final_{k_}": v for k_, v in final.items()})
    ckpt.clear()
    console.print(f"saved {paths.model_dir(name)} (val_acc {final['val_acc']:.3f}, epoch {result.best_epoch})")
    return final
