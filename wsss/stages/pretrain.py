"""Stage ``pretrain``: self-supervised backbone pretraining (SimSiam or MoCo v2) on the project's own images.

Trains on every non-test image of the prepared manifest without reading a label: the train and val pets
(with or without masks, label-only ``extra`` roots included) and, with ``pretrain.include_background``, the
background images. Test images are never read. Labels are used only by the k-NN probe that is logged each
epoch: species of val-split pets predicted from their nearest train-split pets in feature space (weighted
k-NN, the standard cheap measure of representation quality), plus the same probe before training
(``knn_acc_init``: the random-init baseline).

Outputs: ``models/pretrain-<name>/model.pt`` (the backbone's state_dict with torchvision ResNet key names, no
``fc``) + ``meta.json``, and ``reports/training/pretrain-<name>.json``. Consumers load it with
``train_classifier.weights: pretrain:<name>``, ``train_unet.encoder_weights: pretrain:<name>`` or
``wsss train-ccam --init pretrain:<name>``. Checkpoints every epoch under ``.wsss/state`` and resumes after a
kill. Runs on one device (CPU with bf16 autocast where native, or one GPU with AMP) or, with more than one
GPU visible, data-parallel on all of them (``pretrain.world_size``; gloo processes on the CPU for testing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, DistributedSampler

from wsss import tracking
from wsss.config import Params, PretrainConfig, to_dict
from wsss.data.breeds import NUM_BREEDS
from wsss.data.datasets import InferenceDataset, denormalize_uint8
from wsss.data.manifest import load_manifest
from wsss.errors import ConfigError, DataError
from wsss.io import read_json, write_json
from wsss.paths import Paths
from wsss.stages.common import loader, require_rows
from wsss.training.distributed import DistContext
from wsss.ui import console, task
from wsss.variants import PretrainId, safe_name

STAGE = "pretrain"
N_OVERLAYS = 8


def model_name(name: str) -> str:
    """``pretrain-<name>``, the folder under ``models/`` (what ``pretrain:<name>`` resolves to)."""
    return str(PretrainId(name))


def select_rows(df: pd.DataFrame, include_background: bool) -> pd.DataFrame:
    """Images to pretrain on: every train/val row (test rows never), background rows if asked."""
    keep = df["split"].isin(["train", "val"]) & (~df["is_background"] | include_background)
    return df[keep].sort_values("id", kind="stable")


def probe_rows(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(bank, queries) of the k-NN probe: labelled train-split pets and val-split pets."""
    pets = df[~df["is_background"] & (df["species"] >= 0)]
    return (pets[pets["split"] == "train"].sort_values("id", kind="stable"),
            pets[pets["split"] == "val"].sort_values("id", kind="stable"))


def _balanced_accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    recalls = [float((pred[target == c] == c).float().mean()) for c in target.unique().tolist()]
    return sum(recalls) / len(recalls) if recalls else float("nan")


def run(params: Params, paths: Paths, name: str | None = None, device: str | None = None) -> dict[str, Any]:
    """Pretrain a backbone without labels and save ``models/pretrain-<name>/``.

    With ``pretrain.world_size`` (0: one process per visible GPU) above 1 it trains data-parallel
    (``DistributedDataParallel``; ``pretrain.batch_size`` is the global batch, split over the ranks).

    Args:
        name: overrides ``pretrain.name``.
        device: overrides ``base.device``.
    """
    from wsss.device import resolve_device
    from wsss.training.distributed import launch, launched_world_size, world_size_for

    cfg = params.pretrain
    if name is not None:
        safe_name(name, "--name")
        cfg = dataclasses.replace(cfg, name=name)
    df = load_manifest(paths.manifest)
    train_df = select_rows(df, cfg.include_background)
    require_rows(len(train_df), "train/val images", "check prepare's report", paths.manifest)
    resolved = resolve_device(device or params.base.device)
    world_size = launched_world_size() or world_size_for(cfg.world_size, resolved)
    if cfg.batch_size % world_size:
        raise ConfigError(f"pretrain.batch_size {cfg.batch_size} must be a multiple of the {world_size} "
                          "data-parallel processes (it is the global batch)")
    if len(train_df) < 2 * world_size:
        raise DataError(f"{paths.manifest}: pretraining on {world_size} process(es) needs at least "
                        f"{2 * world_size} non-test images, found {len(train_df)}")
    if world_size > 1 and int(os.environ.get("RANK", "0")) == 0:
        console.print(f"pretraining data-parallel on {world_size} {resolved.type} processes "
                      f"({cfg.batch_size // world_size} images per process and step)")
    final = launch(_train, world_size, resolved, params, paths, cfg)
    return final if final is not None else read_json(paths.training_report(model_name(cfg.name)))


def _train(ctx: DistContext, params: Params, paths: Paths, cfg: PretrainConfig) -> dict[str, Any] | None:
    """The training of one rank (all of it on a single device); rank 0 alone logs, probes and saves."""
    from torch.nn.parallel import DistributedDataParallel

    from wsss.device import autocast, precision_for, prepare_model, seed_everything, to_device
    from wsss.models.ssl import (
        TwoViews,
        UnlabelledImages,
        build_ssl_model,
        knn_predict,
        lr_lambdas,
        view_transform,
    )
    from wsss.training.checkpoint import CheckpointManager, fingerprint, save_model
    from wsss.training.distributed import all_reduce_sum, main_only
    from wsss.training.loop import fit

    out_name = model_name(cfg.name)
    df = load_manifest(paths.manifest)
    train_df = select_rows(df, cfg.include_background)
    bank_df, query_df = probe_rows(df)

    seed_everything(params.base.seed)
    prec = precision_for(ctx.device)
    model = build_ssl_model(cfg)
    if ctx.distributed and ctx.device.type == "cuda" and model.sync_batchnorm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = prepare_model(model, prec)
    # DDP averages the gradients of what its forward (= the SSL loss) computed; rank 0's weights are
    # broadcast at construction, so every rank starts (and, stepping in lockstep, stays) identical.
    step_model: torch.nn.Module = model
    if ctx.distributed:
        step_model = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    groups = model.param_groups(cfg.lr, cfg.weight_decay)
    optimizer = torch.optim.SGD([{k: v for k, v in g.items() if k != "fixed_lr"} for g in groups],
                                momentum=cfg.momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambdas(groups, cfg.epochs, cfg.warmup_epochs))
    scaler = torch.amp.GradScaler(prec.device.type, enabled=prec.use_grad_scaler)

    views = TwoViews(view_transform(cfg.input_size, cfg.crop_scale_min, cfg.color_jitter, cfg.color_jitter_prob,
                                    cfg.grayscale_prob, cfg.blur_prob))
    train_ds = UnlabelledImages(train_df, paths.prepared, views)
    sampler: DistributedSampler | None = None
    if ctx.distributed:
        sampler = DistributedSampler(train_ds, ctx.world_size, ctx.rank, shuffle=True, seed=params.base.seed,
                                     drop_last=True)
        per_rank = cfg.batch_size // ctx.world_size
        gen = torch.Generator()
        gen.manual_seed(params.base.seed + ctx.rank)  # distinct augmentation streams per rank
        workers = params.base.num_workers
        train_dl = DataLoader(train_ds, batch_size=per_rank, sampler=sampler, num_workers=workers,
                              drop_last=len(sampler) > per_rank, generator=gen, persistent_workers=workers > 0,
                              pin_memory=ctx.device.type == "cuda")
    else:
        train_dl = loader(train_ds, cfg.batch_size, params, shuffle=True, seed=params.base.seed, drop_last=True)
    bank_dl = loader(InferenceDataset(bank_df, paths.prepared, cfg.input_size), 2 * cfg.batch_size, params,
                     shuffle=False)
    query_dl = loader(InferenceDataset(query_df, paths.prepared, cfg.input_size), 2 * cfg.batch_size, params,
                      shuffle=False)
    bank_species, bank_breed, query_species, query_breed = (
        torch.tensor(frame[col].tolist(), dtype=torch.long)
        for frame, col in ((bank_df, "species"), (bank_df, "breed"), (query_df, "species"), (query_df, "breed"))
    )

    # world_size is left out: the global batch is fixed, so a run may resume on another number of GPUs.
    ckpt = CheckpointManager(
        paths.state_dir(STAGE, cfg.name),
        fingerprint(to_dict(dataclasses.replace(cfg, world_size=0)), params.base.seed, tracking.data_hash(paths)),
    )
    state = ckpt.load()  # every rank resumes from the same file
    holder: dict[str, Any] = {"run_id": None, "knn_init": (state or {}).get("knn_init")}

    def features(dl: torch.utils.data.DataLoader) -> torch.Tensor:
        feats = []
        for batch in dl:
            with autocast(prec):
                feats.append(model.features(to_device(batch["image"], prec)).float().cpu())
        return torch.cat(feats) if feats else torch.zeros(0, 1)

    def probe(epoch: int | None = None) -> dict[str, float]:
        """k-NN species (and breed) accuracy of val pets against train pets; NaN without either."""
        if len(bank_df) == 0 or len(query_df) == 0:
            return {}
        bank, queries = features(bank_dl), features(query_dl)
        species = knn_predict(bank, bank_species, queries, cfg.knn_k, 2, cfg.knn_temperature)
        breed = knn_predict(bank, bank_breed, queries, cfg.knn_k, NUM_BREEDS, cfg.knn_temperature)
        # The val split is small (50 pets on the dev data: +-7 points of binomial noise); leave-one-out over
        # every labelled pet is the steadier reading of the same quantity.
        pool, pool_species = torch.cat([bank, queries]), torch.cat([bank_species, query_species])
        loo = knn_predict(pool, pool_species, None, cfg.knn_k, 2, cfg.knn_temperature)
        return {"knn_acc": float((species == query_species).float().mean()),
                "knn_balanced_acc": _balanced_accuracy(species, query_species),
                "knn_breed_acc": float((breed == query_breed).float().mean()),
                "knn_loo_balanced_acc": _balanced_accuracy(loo, pool_species)}

    def train_epoch(epoch: int) -> dict[str, float]:
        loss_sum, n, t0 = 0.0, 0, time.perf_counter()
        if sampler is not None:
            sampler.set_epoch(epoch)
        for x1, x2 in train_dl:
            x1, x2 = to_device(x1, prec), to_device(x2, prec)
            with autocast(prec):
                loss = step_model(x1, x2)
            if not torch.isfinite(loss):
                raise DataError(f"pretraining diverged at epoch {epoch + 1} (loss {float(loss)}); "
                                "lower pretrain.lr or raise pretrain.batch_size")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            model.after_step()
            loss_sum += float(loss.detach()) * len(x1)
            n += len(x1)
            advance(1)
        loss_sum, n = all_reduce_sum([loss_sum, float(n)], ctx)
        seconds = time.perf_counter() - t0
        return {"loss": loss_sum / max(n, 1), "train_images_per_s": n / max(seconds, 1e-9),
                "epoch_seconds": seconds}

    def log_views() -> None:
        """A fixed grid (image pairs side by side) showing what the augmentation does, once per run."""
        k = min(N_OVERLAYS, len(train_ds))
        ids = np.linspace(0, len(train_ds) - 1, num=k).round().astype(int)
        rows = [np.concatenate([denormalize_uint8(v) for v in train_ds[int(i)]], axis=1) for i in ids]
        tracking.log_image(np.concatenate(rows, axis=0), key="views", step=0)

    start = time.perf_counter()
    stage_run = tracking.stage_run(STAGE, cfg.name, params, paths, sections=("pretrain",),
                                   run_id=(state or {}).get("run_id"),
                                   extra_tags={"method": cfg.method, "arch": cfg.arch,
                                               "world_size": str(ctx.world_size)})
    with main_only(ctx, stage_run) as run:
        if ctx.is_main:
            holder["run_id"] = run.info.run_id
            if state is None:
                log_views()
                model.eval()
                with torch.no_grad():
                    holder["knn_init"] = probe()
                tracking.log_metrics({f"{k}_init": v for k, v in holder["knn_init"].items()})
        bar = task(f"{STAGE} {cfg.name} ({cfg.method})", cfg.epochs * len(train_dl)) if ctx.is_main \
            else contextlib.nullcontext(_no_progress)
        with bar as advance:
            if state is not None and ctx.is_main:
                advance(completed=(int(state["epoch"]) + 1) * len(train_dl), info="resumed")
                console.print(f"resuming {out_name} after epoch {int(state['epoch']) + 1}")
            result = fit(
                model, optimizer, scheduler, cfg.epochs, ckpt if ctx.is_main else None, train_epoch,
                probe if ctx.is_main else None, select=None, scaler=scaler,
                extra_state=lambda: {"run_id": holder["run_id"], "knn_init": holder["knn_init"]}, state=state,
                progress=lambda done, summary: advance(0, info=summary),
                generators=[] if ctx.distributed else [train_dl.generator], log=ctx.is_main,
            )
        if not ctx.is_main:
            return None
        model.load_state_dict(result.best_state)
        history = result.history
        last = history[-1] if history else {}
        total_images = sum(h["train_images_per_s"] * h["epoch_seconds"] for h in history)
        total_seconds = sum(h["epoch_seconds"] for h in history)
        final = {
            "final_loss": last.get("loss", float("nan")),
            "knn_acc": last.get("knn_acc", float("nan")),
            "knn_balanced_acc": last.get("knn_balanced_acc", float("nan")),
            "knn_breed_acc": last.get("knn_breed_acc", float("nan")),
            "knn_loo_balanced_acc": last.get("knn_loo_balanced_acc", float("nan")),
            **{f"{k}_init": v for k, v in (holder["knn_init"] or {}).items()},
            "images_per_s": total_images / total_seconds if total_seconds > 0 else float("nan"),
            "epoch_seconds": total_seconds / len(history) if history else float("nan"),
            "epochs": cfg.epochs,
            "world_size": ctx.world_size,
            "train_seconds": time.perf_counter() - start,
            "n_images": len(train_df),
            "n_knn_bank": len(bank_df),
            "n_knn_queries": len(query_df),
        }
        meta = {
            "kind": "pretrain", "format": "torchvision-resnet-state-dict", "arch": cfg.arch,
            "method": cfg.method, "init": cfg.init, "name": cfg.name, "input_size": cfg.input_size,
            "output_stride": cfg.output_stride, "epochs": cfg.epochs, "knn_acc": final["knn_acc"],
        }
        # Only the backbone: torchvision key names without fc, what Classifier/CCAM/smp encoders load.
        save_model(paths.model_dir(out_name), model.encoder, meta)
        write_json(paths.training_report(out_name), final)
        # Prefixed so the summary does not add points to the per-epoch curves of the same names.
        tracking.log_metrics({k if k.startswith("final_") else f"final_{k}": v for k, v in final.items()})
    ckpt.clear()
    console.print(f"saved {paths.model_dir(out_name)} (loss {final['final_loss']:.3f}, "
                  f"k-NN species acc {final['knn_acc']:.3f}, {final['images_per_s']:.1f} images/s)")
    return final


def _no_progress(*_args: Any, **_kwargs: Any) -> None:
    """The progress callback of ranks other than 0 (one bar is enough)."""
