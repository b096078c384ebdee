"""Stage ``train-ccam``: class-agnostic CCAM, CCAM+ECS and per-breed contrastive fine-tuning.

Variants (model folder names under ``models/``):

* ``ccam-<init>``: CCAM from ``none`` | ``imagenet`` | ``cls-<classifier variant>`` | ``pre-<name>``.
* ``--ecs`` adds the ECS target term (max of CAM and erased-image CAM of a trained classifier, MSE
  against the foreground map P) -> ``ccam-<init>-ecs``.
* ``--per-breed`` fine-tunes an existing ``ccam-<init>`` with a breed-aware batch sampler and the
  per-breed contrastive term (same-breed fg descriptors positive, other breeds negative) ->
  ``ccam-<init>-perbreed``.

The CCAM loss is symmetric in fg/bg, so the polarity is decided once per trained model and stored in
the model before any ReLU is applied: by border vs centre of P over many training images for plain
CCAM; by construction where a term breaks the symmetry (the ECS target is a foreground map, so P
learns the foreground side); inherited for per-breed fine-tuning, whose breed term acts on the
parent's foreground side.
Training uses the ``train`` split only (images, no labels except for the breed sampler / ECS target).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from wsss import tracking
from wsss.config import CcamConfig, Params, to_dict
from wsss.data.breeds import BREED_SPECIES
from wsss.data.datasets import IMAGENET_MEAN, IMAGENET_STD, ClassificationDataset
from wsss.data.manifest import load_manifest, pets
from wsss.data.samplers import BreedBatchSampler
from wsss.device import Precision
from wsss.errors import ConfigError
from wsss.models.loading import load_model
from wsss.paths import Paths
from wsss.stages.common import require_rows, resolve_weights
from wsss.training.distributed import DistContext
from wsss.training.trainer import Trainer
from wsss.ui import console
from wsss.variants import CcamId, CcamInit
from wsss.viz import heat_grid, overlay_ids

STAGE = "train-ccam"
# (images (B,3,H,W), breeds (B,), map size) -> the ECS foreground target (B,1,h,w)
EcsTarget = Callable[[torch.Tensor, torch.Tensor, tuple[int, int]], torch.Tensor]


def model_name(init: str, ecs: bool = False, per_breed: bool = False) -> str:
    """Folder name under ``models/`` for a CCAM variant (``--init`` as ``train-ccam`` takes it)."""
    return str(CcamId(CcamInit.parse(init), ecs, per_breed))


def _transform(size: int, crop: int, train: bool) -> v2.Compose:
    ops = [v2.Resize((size, size), antialias=True)]
    ops += [v2.RandomHorizontalFlip(), v2.RandomCrop(crop)] if train else [v2.CenterCrop(crop)]
    return v2.Compose([v2.PILToTensor(), *ops, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _build_model(params: Params, paths: Paths, init: str, per_breed: bool, ecs: bool) -> torch.nn.Module:
    from wsss.models.ccam import CCAM

    cfg = params.train_ccam
    if per_breed:
        base, meta = load_model(paths, model_name(init, ecs))
        if meta.arch != cfg.arch:  # the fine-tuned model's meta.json would claim cfg.arch
            raise ConfigError(
                f"train_ccam.arch is {cfg.arch} but models/{model_name(init, ecs)} is {meta.arch}; "
                "per-breed fine-tuning keeps the architecture of the model it starts from"
            )
        return base
    if init.startswith("classifier:"):
        model = CCAM(cfg.arch, weights="none")
        classifier, meta = load_model(paths, "classifier-" + init.split(":", 1)[1])
        if meta.arch != cfg.arch:
            raise ConfigError(
                f"train_ccam.arch is {cfg.arch} but models/classifier-{init.split(':', 1)[1]} is {meta.arch}"
            )
        model.backbone.load_state_dict(classifier.backbone.state_dict())
        return model
    weights = resolve_weights(init, paths) if init.startswith("pretrain:") else init
    return CCAM(cfg.arch, weights=weights)


def polarity_rule(model: torch.nn.Module, init: str, ecs: bool, per_breed: bool) -> tuple[float | None, str]:
    """(polarity fixed before training or None = decide after it, how it is known).

    Per-breed fine-tuning keeps its parent's polarity (loaded with the parent's weights); an ECS-trained
    CCAM has +1 (its raw map is trained towards a foreground map); plain CCAM is decided from the maps.
    """
    if per_breed:
        return float(model.polarity), f"inherited from {model_name(init, ecs)}"
    if ecs:
        return 1.0, "ECS foreground target"
    return None, "border vs centre"


def pet_side(fg: torch.Tensor, bg: torch.Tensor, p: torch.Tensor, polarity: float | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(pet descriptors, pet map) for the terms that are not symmetric in fg/bg (ECS target, breed term).

    ``polarity`` -1 (a parent whose P marks the background) swaps the sides; +1 or None (not decided yet:
    the ECS term itself makes P the foreground) keeps P.
    """
    if polarity is not None and polarity < 0:
        return bg, 1.0 - p
    return fg, p


def run(params: Params, paths: Paths, init: str, ecs: bool = False, per_breed: bool = False,
        device: str | None = None) -> dict[str, Any]:
    """Train one CCAM variant and save ``models/<name>/`` with its polarity (data-parallel with
    ``base.world_size`` or under ``torchrun``: :func:`wsss.training.distributed.start`)."""
    from wsss.device import resolve_device
    from wsss.training.distributed import start

    cfg = params.train_ccam
    train_df = pets(load_manifest(paths.manifest), "train")
    require_rows(len(train_df), "training pet images", "check prepare's report", paths.manifest)
    # A per-breed batch holds batch_size // breeds_per_batch images of each of its breeds.
    batch = (cfg.batch_size // cfg.breeds_per_batch) * cfg.breeds_per_batch if per_breed else cfg.batch_size
    return start(_train, params.base.world_size, resolve_device(device or params.base.device),
                 params, paths, init, ecs, per_breed, batch_size=batch,
                 batch_key="train_ccam.batch_size" + (" (rounded down to breeds_per_batch)" if per_breed else ""),
                 n_images=len(train_df), what="training pet images", source=paths.manifest,
                 report=paths.training_report(model_name(init, ecs, per_breed)))


def _train(ctx: DistContext, params: Params, paths: Paths, init: str, ecs: bool, per_breed: bool
           ) -> dict[str, Any] | None:
    """The training of one rank (all of it on one process); rank 0 alone logs, decides the polarity and
    saves."""
    from wsss.device import precision_for, prepare_model, seed_everything
    from wsss.models.ccam import ccam_param_groups, decide_polarity
    from wsss.training.checkpoint import fingerprint
    from wsss.training.distributed import sync_batchnorm

    cfg = params.train_ccam
    name = model_name(init, ecs, per_breed)
    df = load_manifest(paths.manifest)
    train_df = pets(df, "train").sort_values("id")
    val_df = pets(df, "val", with_mask=True).sort_values("id")
    epochs = cfg.per_breed_epochs if per_breed else cfg.epochs

    seed_everything(params.base.seed)
    prec = precision_for(ctx.device)
    model = prepare_model(sync_batchnorm(_build_model(params, paths, init, per_breed, ecs), ctx), prec)
    fixed_polarity, polarity_source = polarity_rule(model, init, ecs, per_breed)
    groups = ccam_param_groups(model, cfg.lr_backbone, cfg.lr_head, cfg.weight_decay)
    optimizer = torch.optim.SGD(groups, momentum=cfg.momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: (1 - e / epochs) ** cfg.poly_power)
    trainer = Trainer(STAGE, name, name, params, paths, prec, fingerprint(
        to_dict(cfg), init, ecs, per_breed, params.base.seed, tracking.data_hash(paths),
        to_dict(params.make_cams) if ecs else None), ctx)
    step_model = trainer.data_parallel(model)

    train_ds = ClassificationDataset(train_df, paths.prepared, "breed", False,
                                     _transform(cfg.resize, cfg.input_size, train=True))
    train_dl, sampler = _train_loader(trainer, train_ds, per_breed)
    objective = _Objective(cfg, fixed_polarity, _ecs_teacher(params, paths, prec) if ecs else None, per_breed,
                           ctx)
    eval_tf = _transform(cfg.input_size, cfg.input_size, train=False)
    overlay_ds = ClassificationDataset(val_df.iloc[overlay_ids(len(val_df))], paths.prepared, "breed", False,
                                       eval_tf)

    with trainer.session(sections=("train_ccam",),
                         extra_tags={"init": init, "ecs": str(ecs), "per_breed": str(per_breed),
                                     "world_size": str(ctx.world_size)}):
        result = trainer.fit(
            model, optimizer, scheduler, epochs, len(train_dl),
            lambda epoch: _train_epoch(trainer, step_model, optimizer, train_dl, sampler, objective, epoch),
            overlays=lambda: _map_grid(model, overlay_ds, prec),
        )
        if not ctx.is_main:
            return None
        model.load_state_dict(result.best_state)
        if fixed_polarity is not None:
            polarity = fixed_polarity
        else:
            polarity_ds = ClassificationDataset(train_df, paths.prepared, "breed", False, eval_tf)
            polarity = _decide_polarity(model, polarity_ds, cfg.polarity_images, prec, decide_polarity)
        model.polarity.fill_(polarity)
        meta = {"kind": "ccam", "arch": cfg.arch, "init": init, "ecs": ecs, "per_breed": per_breed,
                "polarity": polarity, "polarity_source": polarity_source, "input_size": cfg.input_size,
                "epochs": epochs}
        final = {"final_loss": result.history[-1]["loss"] if result.history else float("nan"),
                 "polarity": polarity, "polarity_source": polarity_source, "epochs": epochs,
                 "steps": trainer.optimizer_steps, "train_seconds": trainer.seconds, "n_train": len(train_df),
                 "world_size": ctx.world_size}
        trainer.save(model, meta, final, logged=final)
    console.print(f"saved {paths.model_dir(name)} (polarity {polarity:+.0f})")
    return final


def _train_loader(trainer: Trainer, ds: ClassificationDataset, per_breed: bool
                  ) -> tuple[DataLoader, BreedBatchSampler | None]:
    """(loader, its breed sampler): batches of ``breeds_per_batch`` breeds for per-breed fine-tuning, else
    the trainer's shuffled loader."""
    cfg, params = trainer.params.train_ccam, trainer.params
    if not per_breed:
        return trainer.loader(ds, cfg.batch_size), None
    # Every rank takes its slice of the same global breed batches (the trainer sets their epoch).
    sampler = BreedBatchSampler(ds.targets, cfg.batch_size, cfg.breeds_per_batch, seed=params.base.seed)
    return trainer.batch_loader(ds, sampler), None


def _ecs_teacher(params: Params, paths: Paths, prec: Precision) -> EcsTarget:
    """The ECS target of ``train_ccam.ecs_classifier``: its single-scale ECS map, pooled to the map size."""
    from wsss.device import prepare_model
    from wsss.methods import METHODS

    classifier, meta = load_model(paths, f"classifier-{params.train_ccam.ecs_classifier}")
    classifier = prepare_model(classifier, prec).eval()
    for p in classifier.parameters():
        p.requires_grad_(False)
    cams = dataclasses.replace(params.make_cams, scales=(1.0,), flip=False)
    labels = meta.labels

    def target(x: torch.Tensor, breeds: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        t = breeds if labels == "breed" else torch.tensor(BREED_SPECIES, device=breeds.device)[breeds]
        with torch.no_grad():
            maps = METHODS.get("ecs").compute(classifier, x, t, cams).float()
        return F.adaptive_avg_pool2d(maps[:, None], size)

    return target


@dataclass(frozen=True)
class _Objective:
    """The CCAM loss of a batch, plus the ECS target term and the per-breed term where the variant has them."""

    cfg: CcamConfig
    polarity: float | None  # fixed before training (see polarity_rule), None: decided after it
    ecs_target: EcsTarget | None
    per_breed: bool
    # Data-parallel: the contrastive terms are over the global batch (every rank's descriptors gathered).
    ctx: DistContext | None = None

    def __call__(self, x: torch.Tensor, breeds: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor,
                 p: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, its terms as floats) from the model's ``(fg, bg, P)`` on images ``x`` of ``breeds``."""
        from wsss.models.ccam import breed_contrastive_loss, ccam_loss
        from wsss.training.distributed import all_gather_cat, gather_with_grad

        cfg = self.cfg
        ctx = self.ctx

        def gathered(t: torch.Tensor) -> torch.Tensor:
            return t if ctx is None else gather_with_grad(t, ctx)

        loss, parts = ccam_loss(gathered(fg), gathered(bg), cfg.alpha)
        terms = {f"loss_{k}": float(v.detach()) for k, v in parts.items()}
        pet, pet_map = pet_side(fg, bg, p, self.polarity)
        if self.ecs_target is not None:
            ecs_loss = F.mse_loss(pet_map, self.ecs_target(x, breeds, tuple(p.shape[-2:])))
            loss = loss + cfg.ecs_weight * ecs_loss
            terms["loss_ecs"] = float(ecs_loss.detach())
        if self.per_breed:
            breed_loss = breed_contrastive_loss(gathered(pet), all_gather_cat(breeds), cfg.alpha)
            loss = loss + cfg.breed_weight * breed_loss
            terms["loss_breed"] = float(breed_loss.detach())
        return loss, terms


def _train_epoch(trainer: Trainer, model: torch.nn.Module, optimizer: torch.optim.Optimizer, dl: DataLoader,
                 sampler: BreedBatchSampler | None, objective: _Objective, epoch: int) -> dict[str, float]:
    """One epoch of ``model`` (the DDP wrapper when data-parallel); the metrics are the per-image means of
    the loss and its terms over all ranks."""
    from wsss.device import autocast, to_device
    from wsss.training.distributed import all_reduce_sum

    prec = trainer.prec
    if sampler is not None:
        sampler.set_epoch(epoch)
    sums: dict[str, float] = {}
    n, t0 = 0, time.perf_counter()
    for x, breeds in dl:
        x, breeds = to_device(x, prec), breeds.to(prec.device)
        with autocast(prec):
            fg, bg, p = model(x)
        loss, terms = objective(x, breeds, fg.float(), bg.float(), p.float())
        trainer.step(loss, optimizer)
        terms["loss"] = float(loss.detach())
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v * len(x)
        n += len(x)
        trainer.advance(1)
    keys = sorted(sums)
    *totals, n = all_reduce_sum([*(sums[k] for k in keys), float(n)], trainer.ctx)  # over the ranks
    out = {k: v / max(n, 1) for k, v in zip(keys, totals, strict=True)}
    out["train_images_per_s"] = n / max(time.perf_counter() - t0, 1e-9)
    return out


def _map_grid(model: torch.nn.Module, ds: ClassificationDataset, prec: Precision) -> np.ndarray | None:
    """The overlay images with their current P maps (sign of the head as-is: polarity is decided at the end)."""
    from wsss.device import autocast, to_device

    if len(ds) == 0:
        return None
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    with autocast(prec):
        logits = model.logits(to_device(xs, prec)).float()
    maps = torch.sigmoid(logits)
    maps = F.interpolate(maps, size=xs.shape[-2:], mode="bilinear", align_corners=False)[:, 0].cpu()
    return heat_grid(xs, maps)


def _decide_polarity(model: torch.nn.Module, ds: ClassificationDataset, n: int, prec: Precision,
                     decide: Callable[[torch.Tensor], float]) -> float:
    """P maps of up to ``n`` training images (``ds`` uses the eval transform) -> +1 / -1."""
    from wsss.device import autocast, to_device

    ids = np.linspace(0, len(ds) - 1, num=min(n, len(ds))).round().astype(int)
    model.eval()
    model.polarity.fill_(1.0)
    maps = []
    with torch.no_grad():
        for chunk in np.array_split(ids, max(1, len(ids) // 16)):
            xs = torch.stack([ds[int(i)][0] for i in chunk])
            with autocast(prec):
                maps.append(torch.sigmoid(model.logits(to_device(xs, prec)).float()).cpu())
    return float(decide(torch.cat(maps)))
