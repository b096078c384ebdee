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
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from wsss import tracking
from wsss.config import Params, to_dict
from wsss.data.breeds import BREED_SPECIES
from wsss.data.datasets import IMAGENET_MEAN, IMAGENET_STD, ClassificationDataset, denormalize_uint8
from wsss.data.manifest import load_manifest
from wsss.errors import ConfigError
from wsss.io import write_json
from wsss.paths import Paths
from wsss.stages.common import load_trained_model, loader, require_rows, resolve_weights
from wsss.ui import console, task
from wsss.variants import CcamId, CcamInit

STAGE = "train-ccam"
N_OVERLAYS = 8


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
        base, meta = load_trained_model(paths, model_name(init, ecs))
        if meta["arch"] != cfg.arch:  # the fine-tuned model's meta.json would claim cfg.arch
            raise ConfigError(
                f"train_ccam.arch is {cfg.arch} but models/{model_name(init, ecs)} is {meta['arch']}; "
                "per-breed fine-tuning keeps the architecture of the model it starts from"
            )
        return base
    if init.startswith("classifier:"):
        model = CCAM(cfg.arch, weights="none")
        classifier, meta = load_trained_model(paths, "classifier-" + init.split(":", 1)[1])
        if meta["arch"] != cfg.arch:
            raise ConfigError(
                f"train_ccam.arch is {cfg.arch} but models/classifier-{init.split(':', 1)[1]} is {meta['arch']}"
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
    """Train one CCAM variant and save ``models/<name>/`` with its polarity."""
    from wsss.data.samplers import BreedBatchSampler
    from wsss.device import autocast, precision_for, prepare_model, resolve_device, seed_everything, to_device
    from wsss.methods import METHODS
    from wsss.models.ccam import breed_contrastive_loss, ccam_loss, ccam_param_groups, decide_polarity
    from wsss.training.checkpoint import CheckpointManager, fingerprint, save_model
    from wsss.training.loop import fit

    cfg = params.train_ccam
    name = model_name(init, ecs, per_breed)
    df = load_manifest(paths.manifest)
    pets = df[~df["is_background"]]
    train_df = pets[pets["split"] == "train"].sort_values("id")
    val_df = pets[(pets["split"] == "val") & pets["has_mask"]].sort_values("id")
    require_rows(len(train_df), "training pet images", "check prepare's report", paths.manifest)
    epochs = cfg.per_breed_epochs if per_breed else cfg.epochs

    seed_everything(params.base.seed)
    prec = precision_for(resolve_device(device or params.base.device))
    model = prepare_model(_build_model(params, paths, init, per_breed, ecs), prec)
    fixed_polarity, polarity_source = polarity_rule(model, init, ecs, per_breed)
    groups = ccam_param_groups(model, cfg.lr_backbone, cfg.lr_head, cfg.weight_decay)
    optimizer = torch.optim.SGD(groups, momentum=cfg.momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: (1 - e / epochs) ** cfg.poly_power)
    scaler = torch.amp.GradScaler(prec.device.type, enabled=prec.use_grad_scaler)

    train_ds = ClassificationDataset(train_df, paths.prepared, "breed", False,
                                     _transform(cfg.resize, cfg.input_size, train=True))
    if per_breed:
        sampler = BreedBatchSampler(train_ds.targets, cfg.batch_size, cfg.breeds_per_batch, seed=params.base.seed)
        train_dl = DataLoader(train_ds, batch_sampler=sampler, num_workers=params.base.num_workers)
    else:
        sampler = None
        train_dl = loader(train_ds, cfg.batch_size, params, shuffle=True, seed=params.base.seed, drop_last=True)

    ecs_model, ecs_meta = None, None
    if ecs:
        ecs_model, ecs_meta = load_trained_model(paths, f"classifier-{cfg.ecs_classifier}")
        ecs_model = prepare_model(ecs_model, prec).eval()
        for p in ecs_model.parameters():
            p.requires_grad_(False)
    ecs_cams = dataclasses.replace(params.make_cams, scales=(1.0,), flip=False)

    overlay_df = val_df.head(N_OVERLAYS)
    overlay_ds = ClassificationDataset(overlay_df, paths.prepared, "breed", False,
                                       _transform(cfg.input_size, cfg.input_size, train=False))
    ckpt = CheckpointManager(
        paths.state_dir(STAGE, name),
        fingerprint(to_dict(cfg), init, ecs, per_breed, params.base.seed, tracking.data_hash(paths),
                    to_dict(params.make_cams) if ecs else None),
    )
    state = ckpt.load()
    holder: dict[str, str] = {}

    def ecs_target(x: torch.Tensor, breeds: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        assert ecs_model is not None and ecs_meta is not None
        labels = ecs_meta["labels"]
        t = breeds if labels == "breed" else torch.tensor(BREED_SPECIES, device=breeds.device)[breeds]
        with torch.no_grad():
            maps = METHODS.get("ecs").compute(ecs_model, x, t, ecs_cams).float()
        return F.adaptive_avg_pool2d(maps[:, None], size)

    def train_epoch(epoch: int) -> dict[str, float]:
        if sampler is not None:
            sampler.set_epoch(epoch)
        sums: dict[str, float] = {}
        n, t0 = 0, time.perf_counter()
        for x, breeds in train_dl:
            x, breeds = to_device(x, prec), breeds.to(prec.device)
            with autocast(prec):
                fg, bg, p = model(x)
            fg, bg, p = fg.float(), bg.float(), p.float()
            loss, parts = ccam_loss(fg, bg, cfg.alpha)
            terms = {f"loss_{k}": float(v.detach()) for k, v in parts.items()}
            pet, pet_map = pet_side(fg, bg, p, fixed_polarity)
            if ecs:
                target = ecs_target(x, breeds, tuple(p.shape[-2:]))
                ecs_loss = F.mse_loss(pet_map, target)
                loss = loss + cfg.ecs_weight * ecs_loss
                terms["loss_ecs"] = float(ecs_loss.detach())
            if per_breed:
                breed_loss = breed_contrastive_loss(pet, breeds, cfg.alpha)
                loss = loss + cfg.breed_weight * breed_loss
                terms["loss_breed"] = float(breed_loss.detach())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            terms["loss"] = float(loss.detach())
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v * len(x)
            n += len(x)
            advance(1)
        out = {k: v / max(n, 1) for k, v in sums.items()}
        out["train_images_per_s"] = n / max(time.perf_counter() - t0, 1e-9)
        return out

    def log_overlays(epoch: int, _: dict[str, float]) -> None:
        if len(overlay_ds) == 0:
            return
        model.eval()
        xs = torch.stack([overlay_ds[i][0] for i in range(len(overlay_ds))])
        with torch.no_grad(), autocast(prec):
            logits = model.logits(to_device(xs, prec)).float()
        # Sign of the current head as-is: polarity is only decided at the end of training.
        maps = torch.sigmoid(logits)
        maps = F.interpolate(maps, size=xs.shape[-2:], mode="bilinear", align_corners=False)[:, 0].cpu()
        tracking.log_image(_overlay_grid(xs, maps), key="overlays", step=epoch)
        model.train()

    start = time.perf_counter()
    with tracking.stage_run(STAGE, name, params, paths, sections=("train_ccam",),
                            run_id=(state or {}).get("run_id"),
                            extra_tags={"init": init, "ecs": str(ecs), "per_breed": str(per_breed)}) as run:
        holder["run_id"] = run.info.run_id
        with task(f"{STAGE} {name}", epochs * len(train_dl)) as advance:
            if state is not None:
                advance(completed=(int(state["epoch"]) + 1) * len(train_dl), info="resumed")
            result = fit(model, optimizer, scheduler, epochs, ckpt, train_epoch, None, select=None,
                         scaler=scaler, on_epoch_end=log_overlays,
                         extra_state=lambda: {"run_id": holder["run_id"]}, state=state,
                         progress=lambda done, summary: advance(0, info=summary),
                         generators=[g for g in (train_dl.generator,) if g is not None])
        model.load_state_dict(result.best_state)
        polarity_ds = ClassificationDataset(train_df, paths.prepared, "breed", False,
                                            _transform(cfg.input_size, cfg.input_size, train=False))
        if fixed_polarity is not None:
            polarity = fixed_polarity
        else:
            polarity = _decide_polarity(model, polarity_ds, cfg.polarity_images, prec, decide_polarity)
        model.polarity.fill_(polarity)
        meta = {"kind": "ccam", "arch": cfg.arch, "init": init, "ecs": ecs, "per_breed": per_breed,
                "polarity": polarity, "polarity_source": polarity_source, "input_size": cfg.input_size,
                "epochs": epochs}
        save_model(paths.model_dir(name), model, meta)
        final = {"final_loss": result.history[-1]["loss"] if result.history else float("nan"),
                 "polarity": polarity, "polarity_source": polarity_source, "epochs": epochs,
                 "train_seconds": time.perf_counter() - start,
                 "n_train": len(train_df)}
        write_json(paths.training_report(name), final)
        tracking.log_metrics(final)
    ckpt.clear()
    console.print(f"saved {paths.model_dir(name)} (polarity {polarity:+.0f})")
    return final


def _decide_polarity(model: torch.nn.Module, ds: ClassificationDataset, n: int, prec: Any,
                     decide: Any) -> float:
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


def _overlay_grid(images: torch.Tensor, maps: torch.Tensor) -> np.ndarray:
    """A row per image: the image and a red heat overlay of its map."""
    rows = []
    for img, m in zip(images, maps, strict=True):
        rgb = denormalize_uint8(img).astype(np.float32)
        heat = np.zeros_like(rgb)
        heat[..., 0] = 255.0 * m.numpy()
        rows.append(np.concatenate([rgb, 0.5 * rgb + 0.5 * heat], axis=1))
    return np.concatenate(rows, axis=0).clip(0, 255).astype(np.uint8)
