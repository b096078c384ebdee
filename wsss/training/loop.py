"""An epoch loop shared by the training stages: resume after a kill, model selection, per-epoch logging.

The caller supplies ``train_epoch(epoch) -> metrics`` and optionally ``validate(epoch) -> metrics``; the
loop restores the last complete epoch from the checkpoint, keeps the best weights by a validation
metric (never test data), logs every epoch to MLflow and checkpoints after each one.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from wsss import tracking
from wsss.training.checkpoint import CheckpointManager, rng_state, set_rng_state

Metrics = dict[str, float]


@dataclass
class FitResult:
    """Outcome of :func:`fit`: the selected weights and the metric history."""

    best_state: dict[str, torch.Tensor]
    best_epoch: int
    best_value: float
    history: list[Metrics] = field(default_factory=list)
    resumed_from: int = 0


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None,
    epochs: int,
    ckpt: CheckpointManager | None,
    train_epoch: Callable[[int], Metrics],
    validate: Callable[[int], Metrics] | None = None,
    select: str | None = None,
    mode: str = "max",
    scaler: torch.amp.GradScaler | None = None,
    on_epoch_end: Callable[[int, Metrics], None] | None = None,
    extra_state: Callable[[], dict[str, Any]] | None = None,
    state: dict[str, Any] | None = None,
    progress: Callable[[int, str], None] | None = None,
    generators: Sequence[torch.Generator] = (),
    log: bool = True,
    scheduler_per_step: bool = False,
) -> FitResult:
    """Train for ``epochs`` epochs, resuming from ``state`` (a loaded checkpoint) if given.

    Args:
        select: validation metric that picks the best epoch; ``None`` keeps the last epoch (a fixed
            schedule, as for the weakly-supervised U-Net which must not select with GT).
        mode: ``max`` or ``min`` for ``select``.
        extra_state: returns additional entries to store in each checkpoint (e.g. the MLflow run id).
        progress: called as ``progress(epochs_done, summary)`` after each epoch.
        generators: the data loaders' generators (shuffling order, worker seeds). Their states are
            checkpointed and restored like the global RNGs: a fresh loader would otherwise replay the
            first epoch's order after a resume, and the resumed run would diverge from an uninterrupted one.
        ckpt, log: ``None`` / ``False`` on the data-parallel ranks other than 0, which train in step with
            rank 0 but leave checkpoints and MLflow logging to it.
        scheduler_per_step: ``train_epoch`` steps ``scheduler`` after each optimiser step (a schedule in
            steps); the loop then only checkpoints it instead of stepping it after each epoch.
    """
    sign = 1.0 if mode == "max" else -1.0
    start, best_epoch, best_value = 0, -1, -math.inf
    best_state: dict[str, torch.Tensor] | None = None
    history: list[Metrics] = []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        start = int(state["epoch"]) + 1
        best_epoch, best_value = int(state["best_epoch"]), float(state["best_value"])
        best_state = state.get("best_model")
        history = list(state.get("history", []))
        set_rng_state(state["rng"])
        for gen, gen_state in zip(generators, state.get("generators") or [], strict=False):
            gen.set_state(gen_state)
    resumed_from = start

    for epoch in range(start, epochs):
        model.train()
        metrics = dict(train_epoch(epoch))
        if validate is not None:
            model.eval()
            with torch.no_grad():
                metrics.update(validate(epoch))
        metrics["lr"] = float(optimizer.param_groups[0]["lr"])
        if scheduler is not None and not scheduler_per_step:
            scheduler.step()
        value = sign * metrics[select] if select else float(epoch)
        if best_state is None or value > best_value:
            best_value, best_epoch, best_state = value, epoch, _cpu_state(model)
        metrics["best_epoch"] = float(best_epoch)
        history.append(metrics)
        if log:
            tracking.log_metrics(metrics, step=epoch)
        if ckpt is not None:
            ckpt.save({
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "epoch": epoch,
                "best_epoch": best_epoch,
                "best_value": best_value,
                "best_model": best_state,
                "history": history,
                "rng": rng_state(),
                "generators": [gen.get_state() for gen in generators],
                **(extra_state() if extra_state else {}),
            })
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)
        if progress is not None:
            shown = ", ".join(f"{k} {v:.3g}" for k, v in metrics.items() if k not in ("lr", "best_epoch"))
            progress(epoch + 1, shown)

    if best_state is None:  # nothing left to train (resumed after the last epoch)
        best_state = copy.deepcopy(_cpu_state(model))
    return FitResult(best_state, best_epoch, sign * best_value if select else float(best_epoch), history,
                     resumed_from)
