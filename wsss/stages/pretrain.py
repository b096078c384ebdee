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
GPU visible, data-parallel on all of them (``base.world_size``; gloo processes on the CPU for testing).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from wsss import tracking
from wsss.config import Params, PretrainConfig, to_dict
from wsss.data.breeds import NUM_BREEDS
from wsss.data.datasets import InferenceDataset, denormalize_uint8
from wsss.data.loaders import loader
from wsss.data.manifest import load_manifest, pets, trainval
from wsss.device import Precision
from wsss.errors import DataError
from wsss.evaluation import balanced_accuracy
from wsss.paths import Paths
from wsss.stages.common import require_rows
from wsss.training.distributed import DistContext, sync_batchnorm
from wsss.training.loop import Metrics
from wsss.training.trainer import Trainer
from wsss.ui import console
from wsss.variants import PretrainId, safe_name
from wsss.viz import overlay_ids

STAGE = "pretrain"


def model_name(name: str) -> str:
    """``pretrain-<name>``, the folder under ``models/`` (what ``pretrain:<name>`` resolves to)."""
    return str(PretrainId(name))


def select_rows(df: pd.DataFrame, include_background: bool) -> pd.DataFrame:
    """Images to pretrain on: every train/val row (test rows never), background rows if asked."""
    return trainval(df, include_background).sort_values("id", kind="stable")


def probe_rows(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(bank, queries) of the k-NN probe: labelled train-split pets and val-split pets."""
    labelled = pets(df)
    labelled = labelled[labelled["species"] >= 0]
    return (labelled[labelled["split"] == "train"].sort_values("id", kind="stable"),
            labelled[labelled["split"] == "val"].sort_values("id", kind="stable"))


def run(params: Params, paths: Paths, name: str | None = None, device: str | None = None) -> dict[str, Any]:
    """Pretrain a backbone without labels and save ``models/pretrain-<name>/``.

    With ``base.world_size`` (0: one process per visible GPU) above 1 it trains data-parallel
    (``DistributedDataParallel``; ``pretrain.batch_size`` is the global batch, split over the ranks).

    Args:
        name: overrides ``pretrain.name``.
        device: overrides ``base.device``.
    """
    from wsss.device import resolve_device
    from wsss.training.distributed import start

    cfg = params.pretrain
    if name is not None:
        safe_name(name, "--name")
        cfg = dataclasses.replace(cfg, name=name)
    df = load_manifest(paths.manifest)
    train_df = select_rows(df, cfg.include_background)
    require_rows(len(train_df), "train/val images", "check prepare's report", paths.manifest)
    # Two images per rank and step at least: the SSL losses compare the images of a batch.
    return start(_train, params.base.world_size, resolve_device(device or params.base.device), params, paths, cfg,
                 batch_size=cfg.batch_size, batch_key="pretrain.batch_size", n_images=len(train_df),
                 what="non-test images", source=paths.manifest,
                 report=paths.training_report(model_name(cfg.name)), min_per_rank=2)


def _train(ctx: DistContext, params: Params, paths: Paths, cfg: PretrainConfig) -> dict[str, Any] | None:
    """The training of one rank (all of it on a single device); rank 0 alone logs, probes and saves."""
    from wsss.device import precision_for, prepare_model, seed_everything
    from wsss.models.ssl import TwoViews, UnlabelledImages, build_ssl_model, lr_lambdas, view_transform
    from wsss.training.checkpoint import fingerprint

    df = load_manifest(paths.manifest)
    train_df = select_rows(df, cfg.include_background)
    seed_everything(params.base.seed)
    prec = precision_for(ctx.device)
    model = build_ssl_model(cfg)
    if model.sync_batchnorm:  # SimSiam; MoCo v2 shuffles its BatchNorm batches instead
        model = sync_batchnorm(model, ctx)
    model = prepare_model(model, prec)
    # base.world_size is not in it: the global batch is fixed, so a run may resume on another number of GPUs.
    trainer = Trainer(STAGE, cfg.name, model_name(cfg.name), params, paths, prec, fingerprint(
        to_dict(cfg), params.base.seed, tracking.data_hash(paths)), ctx)
    step_model = trainer.data_parallel(model)
    groups = model.param_groups(cfg.lr, cfg.weight_decay)
    optimizer = torch.optim.SGD([{k: v for k, v in g.items() if k != "fixed_lr"} for g in groups],
                                momentum=cfg.momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambdas(groups, cfg.epochs, cfg.warmup_epochs))
    views = TwoViews(view_transform(cfg.input_size, cfg.crop_scale_min, cfg.color_jitter, cfg.color_jitter_prob,
                                    cfg.grayscale_prob, cfg.blur_prob))
    train_ds = UnlabelledImages(train_df, paths.prepared, views)
    train_dl = trainer.loader(train_ds, cfg.batch_size)
    probe = KnnProbe(model, prec, params, paths, cfg, *probe_rows(df))

    knn_init = (trainer.state or {}).get("knn_init")
    with trainer.session(sections=("pretrain",), extra_tags={"method": cfg.method, "arch": cfg.arch,
                                                             "world_size": str(ctx.world_size)}):
        if ctx.is_main and trainer.state is None:
            _log_views(train_ds)
            model.eval()
            with torch.no_grad():
                knn_init = probe()
            tracking.log_metrics({f"{k}_init": v for k, v in knn_init.items()})
        result = trainer.fit(
            model, optimizer, scheduler, cfg.epochs, len(train_dl),
            lambda epoch: _train_epoch(trainer, model, step_model, optimizer, train_dl, epoch),
            validate=probe, extra_state=lambda: {"knn_init": knn_init},
            title=f"{STAGE} {cfg.name} ({cfg.method})",
        )
        if not ctx.is_main:
            return None
        model.load_state_dict(result.best_state)
        final = _report(result.history, knn_init or {}, cfg, ctx.world_size, trainer.seconds, len(train_df), probe)
        meta = {
            "kind": "pretrain", "format": "torchvision-resnet-state-dict", "arch": cfg.arch,
            "method": cfg.method, "init": cfg.init, "name": cfg.name, "input_size": cfg.input_size,
            "output_stride": cfg.output_stride, "epochs": cfg.epochs, "knn_acc": final["knn_acc"],
        }
        # Only the backbone: torchvision key names without fc, what Classifier/CCAM/smp encoders load.
        trainer.save(model.encoder, meta, final)
    console.print(f"saved {paths.model_dir(model_name(cfg.name))} (loss {final['final_loss']:.3f}, "
                  f"k-NN species acc {final['knn_acc']:.3f}, {final['images_per_s']:.1f} images/s)")
    return final


class KnnProbe:
    """k-NN species (and breed) accuracy of val-split pets against train-split pets in feature space.

    Called with no argument or an epoch (as a validation function); ``{}`` without a bank or queries.
    """

    def __init__(self, model: torch.nn.Module, prec: Precision, params: Params, paths: Paths, cfg: PretrainConfig,
                 bank_df: pd.DataFrame, query_df: pd.DataFrame) -> None:
        self.model, self.prec, self.cfg = model, prec, cfg
        self.n_bank, self.n_queries = len(bank_df), len(query_df)
        self.bank_dl, self.query_dl = (
            loader(InferenceDataset(frame, paths.prepared, cfg.input_size), 2 * cfg.batch_size, params,
                   shuffle=False) for frame in (bank_df, query_df))
        self.bank_species, self.bank_breed, self.query_species, self.query_breed = (
            torch.tensor(frame[col].tolist(), dtype=torch.long)
            for frame, col in ((bank_df, "species"), (bank_df, "breed"), (query_df, "species"), (query_df, "breed"))
        )

    def features(self, dl: DataLoader) -> torch.Tensor:
        """The model's pooled features of every image of ``dl`` (on the CPU)."""
        from wsss.device import autocast, to_device

        feats = []
        for batch in dl:
            with autocast(self.prec):
                feats.append(self.model.features(to_device(batch["image"], self.prec)).float().cpu())
        return torch.cat(feats) if feats else torch.zeros(0, 1)

    def __call__(self, epoch: int | None = None) -> Metrics:
        from wsss.models.ssl import knn_predict

        if self.n_bank == 0 or self.n_queries == 0:
            return {}
        cfg = self.cfg
        bank, queries = self.features(self.bank_dl), self.features(self.query_dl)
        species = knn_predict(bank, self.bank_species, queries, cfg.knn_k, 2, cfg.knn_temperature)
        breed = knn_predict(bank, self.bank_breed, queries, cfg.knn_k, NUM_BREEDS, cfg.knn_temperature)
        # The val split is small (50 pets on the dev data: +-7 points of binomial noise); leave-one-out over
        # every labelled pet is the steadier reading of the same quantity.
        pool, pool_species = torch.cat([bank, queries]), torch.cat([self.bank_species, self.query_species])
        loo = knn_predict(pool, pool_species, None, cfg.knn_k, 2, cfg.knn_temperature)
        return {"knn_acc": float((species == self.query_species).float().mean()),
                "knn_balanced_acc": balanced_accuracy(species, self.query_species),
                "knn_breed_acc": float((breed == self.query_breed).float().mean()),
                "knn_loo_balanced_acc": balanced_accuracy(loo, pool_species)}


def _train_epoch(trainer: Trainer, model: torch.nn.Module, step_model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, dl: DataLoader, epoch: int) -> Metrics:
    """One epoch of the SSL loss; loss and throughput are summed over the ranks."""
    from wsss.device import autocast, to_device
    from wsss.training.distributed import all_reduce_sum

    prec = trainer.prec
    loss_sum, n, t0 = 0.0, 0, time.perf_counter()
    for x1, x2 in dl:
        x1, x2 = to_device(x1, prec), to_device(x2, prec)
        with autocast(prec):
            loss = step_model(x1, x2)
        if not torch.isfinite(loss):
            raise DataError(f"pretraining diverged at epoch {epoch + 1} (loss {float(loss)}); "
                            "lower pretrain.lr or raise pretrain.batch_size")
        trainer.step(loss, optimizer)
        model.after_step()
        loss_sum += float(loss.detach()) * len(x1)
        n += len(x1)
        trainer.advance(1)
    loss_sum, n = all_reduce_sum([loss_sum, float(n)], trainer.ctx)
    seconds = time.perf_counter() - t0
    return {"loss": loss_sum / max(n, 1), "train_images_per_s": n / max(seconds, 1e-9), "epoch_seconds": seconds}


def _log_views(ds: Dataset) -> None:
    """A fixed grid (image pairs side by side) showing what the augmentation does, once per run."""
    rows = [np.concatenate([denormalize_uint8(v) for v in ds[i]], axis=1) for i in overlay_ids(len(ds), spread=True)]
    tracking.log_image(np.concatenate(rows, axis=0), key="views", step=0)


def _report(history: list[Metrics], knn_init: Metrics, cfg: PretrainConfig, world_size: int, seconds: float,
            n_images: int, probe: KnnProbe) -> dict[str, Any]:
    """``reports/training/pretrain-<name>.json``: the last epoch's loss and probe, the initial probe, speed."""
    last = history[-1] if history else {}
    total_images = sum(h["train_images_per_s"] * h["epoch_seconds"] for h in history)
    total_seconds = sum(h["epoch_seconds"] for h in history)
    return {
        "final_loss": last.get("loss", float("nan")),
        "knn_acc": last.get("knn_acc", float("nan")),
        "knn_balanced_acc": last.get("knn_balanced_acc", float("nan")),
        "knn_breed_acc": last.get("knn_breed_acc", float("nan")),
        "knn_loo_balanced_acc": last.get("knn_loo_balanced_acc", float("nan")),
        **{f"{k}_init": v for k, v in knn_init.items()},
        "images_per_s": total_images / total_seconds if total_seconds > 0 else float("nan"),
        "epoch_seconds": total_seconds / len(history) if history else float("nan"),
        "epochs": cfg.epochs,
        "world_size": world_size,
        "train_seconds": seconds,
        "n_images": n_images,
        "n_knn_bank": probe.n_bank,
        "n_knn_queries": probe.n_queries,
    }
