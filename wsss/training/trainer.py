"""The scaffolding every training stage shares, around :func:`wsss.training.loop.fit`.

A stage builds its model, data and loss; :class:`Trainer` does the rest the same way for all of them:
the resume checkpoint (``.wsss/state/<stage>/<variant>/``, loaded on every rank, written by rank 0), the
MLflow run kept across a resume (its id is stored in each checkpoint), the progress bar, the optimiser
step with a ``GradScaler`` only where the precision needs one (fp16 on CUDA) and its count (a schedule in
optimiser steps: :mod:`wsss.training.schedule`), per-epoch metrics logged with ``step=epoch`` (and
written as ``reports/training/curves/<name>.csv`` for DVC plots), the per-epoch overlay grid, the final
model + training report, and deleting the
checkpoint once the outputs are written. It takes the process's :class:`DistContext`, so a stage trains
data-parallel by building its loader with :meth:`Trainer.loader` and stepping :meth:`Trainer.data_parallel`'s
module; on ranks other than 0 nothing is logged, checkpointed or saved.

Typical use::

    seed_everything(params.base.seed)
    prec = precision_from(device, params)
    model = prepare_model(build(...), prec)
    trainer = Trainer(STAGE, variant, name, params, paths, prec, fingerprint(cfg, ...))
    train_dl = trainer.loader(train_ds, cfg.batch_size)
    with trainer.session(sections=("train_x",)):
        result = trainer.fit(model, optimizer, scheduler, cfg.epochs, len(train_dl), train_epoch)
        model.load_state_dict(result.best_state)
        trainer.save(model, meta, report)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from wsss import tracking
from wsss.config import Params
from wsss.device import Precision, grad_scaler
from wsss.io import write_json, write_text
from wsss.paths import Paths
from wsss.training.checkpoint import CheckpointManager, save_model
from wsss.training.distributed import (
    DistContext,
    RankBatches,
    SeededItems,
    ShuffledBatches,
    broadcast_metrics,
    main_only,
)
from wsss.training.loop import FitResult, Metrics
from wsss.ui import console, task


def final_metrics(report: Mapping[str, Any]) -> dict[str, Any]:
    """``report`` with every key prefixed ``final_`` (unless it is already), so the summary logged at the
    end adds no points to the per-epoch curves of the same names."""
    return {k if k.startswith("final_") else f"final_{k}": v for k, v in report.items()}


def curves_csv(history: list[Metrics]) -> str:
    """Per-epoch metrics as CSV: ``epoch`` then every metric in first-seen order (empty where absent)."""
    keys = list(dict.fromkeys(k for row in history for k in row))
    lines = [",".join(["epoch", *keys])]
    for epoch, row in enumerate(history):
        lines.append(",".join([str(epoch), *(f"{row[k]:.6g}" if k in row else "" for k in keys)]))
    return "\n".join(lines) + "\n"


def _no_progress(*_args: Any, **_kwargs: Any) -> None:
    """The progress callback outside a bar (and on ranks other than 0: one bar is enough)."""


class Trainer:
    """One training run of one stage variant (see the module docstring).

    Args:
        stage: the command, e.g. ``train-classifier`` (MLflow tag, state folder).
        variant: the stage's variant (MLflow run name, state folder), e.g. ``species``.
        name: the model folder under ``models/`` and the training report's name, e.g. ``classifier-species``.
        prec: where and in which precision the model trains.
        fingerprint: of everything the run depends on; a checkpoint of another one is never resumed.
        ctx: this process's rank (default: a single process on ``prec.device``).
    """

    def __init__(self, stage: str, variant: str, name: str, params: Params, paths: Paths, prec: Precision,
                 fingerprint: str, ctx: DistContext | None = None) -> None:
        self.stage, self.variant, self.name = stage, variant, name
        self.params, self.paths, self.prec = params, paths, prec
        self.ctx = ctx or DistContext(0, 1, prec.device)
        self._ckpt = CheckpointManager(paths.state_dir(stage, variant), fingerprint)
        self.state: dict[str, Any] | None = self._ckpt.load()  # every rank resumes from the same file
        self.scaler = grad_scaler(prec)
        self.run_id: str | None = None
        # Optimiser steps taken by this run, resume included (checkpointed beside the run id).
        self.optimizer_steps = int((self.state or {}).get("optimizer_steps", 0))
        self.advance: Callable[..., None] = _no_progress
        self.started = time.perf_counter()
        self._generators: list[torch.Generator] = []
        self._samplers: list[RankBatches] = []
        self.history: list[Metrics] = []  # per-epoch metrics of the last fit (resumed epochs included)

    @property
    def seconds(self) -> float:
        """Seconds since :meth:`session` started."""
        return time.perf_counter() - self.started

    # --- data and model ---------------------------------------------------------------------------

    def loader(self, ds: Dataset, batch_size: int, drop_last: bool = True) -> DataLoader:
        """The shuffled training loader, seeded with ``base.seed``; ``batch_size`` is the global batch.

        The epoch's order and every image's augmentation are drawn from (``base.seed``, epoch, image)
        alone (:class:`~wsss.training.distributed.ShuffledBatches`, :class:`SeededItems`): one process and
        N ranks see the same global batches, each rank its contiguous ``1/world_size`` of every one, and a
        resume (on any number of ranks) continues with the batches an uninterrupted run would have seen.
        """
        return self.batch_loader(ds, ShuffledBatches(len(ds), batch_size, self.params.base.seed, drop_last))

    def batch_loader(self, ds: Dataset, batches: Sampler[list[int]]) -> DataLoader:
        """A training loader over the global batches of ``batches`` (a batch sampler with ``set_epoch``,
        called by :meth:`fit` each epoch), split over the ranks as :meth:`loader` does."""
        sampler = RankBatches(batches, self.ctx)
        self._samplers.append(sampler)
        workers = self.params.base.num_workers
        return DataLoader(SeededItems(ds, self.params.base.seed), batch_sampler=sampler, num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=self.ctx.device.type == "cuda")

    def data_parallel(self, model: nn.Module) -> nn.Module:
        """``model`` wrapped in ``DistributedDataParallel`` when data-parallel (else ``model`` itself).

        Step the wrapper (its forward averages the gradients over the ranks); rank 0's weights are
        broadcast at construction, so every rank starts, and stepping in lockstep stays, identical.
        """
        if not self.ctx.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device = self.ctx.device
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler: Any | None = None) -> None:
        """One optimiser step on ``loss``, through the ``GradScaler`` when the precision needs one; then
        ``scheduler.step()`` if given (a schedule in steps: pass ``scheduler_per_step=True`` to :meth:`fit`)."""
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
        self.optimizer_steps += 1
        if scheduler is not None:
            scheduler.step()

    # --- the run ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def session(self, sections: tuple[str, ...], extra_tags: Mapping[str, str] | None = None
                ) -> Iterator[Trainer]:
        """The MLflow run (rank 0; resumed with the checkpoint's run id); the checkpoint is deleted when
        the block ends without an exception, i.e. once the stage's outputs are written.

        Args:
            sections: the ``params.yaml`` sections logged as the run's params (after ``base``).
            extra_tags: run tags beside the standard ones.
        """
        self.started = time.perf_counter()
        run_cm = tracking.stage_run(self.stage, self.variant, self.params, self.paths, sections=sections,
                                    run_id=(self.state or {}).get("run_id"), extra_tags=extra_tags)
        with main_only(self.ctx, run_cm) as run:
            if run is not None:
                self.run_id = run.info.run_id
            yield self
        if self.ctx.is_main:
            self._ckpt.clear()

    def fit(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any | None,
        epochs: int,
        steps_per_epoch: int,
        train_epoch: Callable[[int], Metrics],
        *,
        validate: Callable[[int], Metrics] | None = None,
        select: str | None = None,
        overlays: Callable[[], np.ndarray | None] | None = None,
        extra_state: Callable[[], dict[str, Any]] | None = None,
        title: str | None = None,
        total_steps: int | None = None,
        scheduler_per_step: bool = False,
    ) -> FitResult:
        """Train (or finish training) under a progress bar; see :func:`wsss.training.loop.fit`.

        ``train_epoch`` calls :attr:`advance` once per step. ``validate`` runs on rank 0 only; when it
        selects the epoch (``select``) every rank gets rank 0's metrics (one evaluation, one choice). ``overlays`` returns the epoch's overlay
        grid (or ``None``), computed on rank 0 in eval mode without gradients and logged as ``overlays``
        at ``step=epoch``. ``extra_state`` adds entries to each checkpoint beside the MLflow run id.
        ``title`` is the bar's text (default ``<stage> <variant>``).

        A schedule in optimiser steps (:class:`wsss.training.schedule.StepSchedule`): pass its ``epochs``,
        its ``steps_per_epoch`` and ``total_steps=schedule.steps`` (the bar's total; ``train_epoch`` stops
        the last epoch at :meth:`StepSchedule.steps_in`), and ``scheduler_per_step=True`` when the LR
        scheduler is stepped by :meth:`step` rather than once per epoch. :attr:`optimizer_steps` counts
        the steps taken, across a resume.
        """
        from wsss.device import compile_model
        from wsss.training import loop

        compile_model(model, self.params.base.compile)  # in place: the stage's closures step the same module
        is_main, state, ctx = self.ctx.is_main, self.state, self.ctx
        if validate is not None and select and ctx.distributed:
            rank0_validate = validate

            def validate(epoch: int) -> Metrics:
                return broadcast_metrics(lambda: rank0_validate(epoch), ctx)

        def epoch_with_samplers(epoch: int) -> Metrics:
            for sampler in self._samplers:
                sampler.set_epoch(epoch)
            return train_epoch(epoch)

        def log_overlays(epoch: int, _: Metrics) -> None:
            assert overlays is not None
            model.eval()
            with torch.no_grad():
                grid = overlays()
            if grid is not None:
                tracking.log_image(grid, key="overlays", step=epoch)
            model.train()

        total = epochs * steps_per_epoch if total_steps is None else total_steps
        bar = task(title or f"{self.stage} {self.variant}", total) if is_main \
            else contextlib.nullcontext(_no_progress)
        with bar as advance:
            self.advance = advance
            if state is not None and is_main:
                done = int(state["epoch"]) + 1
                advance(completed=min(done * steps_per_epoch, total), info="resumed")
                console.print(f"resuming {self.name} after epoch {done} ({self.optimizer_steps} optimiser steps)")
            result = loop.fit(
                model, optimizer, scheduler, epochs, self._ckpt if is_main else None, epoch_with_samplers,
                validate if (is_main or select) else None, select=select, scaler=self.scaler,
                on_epoch_end=log_overlays if (overlays is not None and is_main) else None,
                extra_state=lambda: {"run_id": self.run_id, "optimizer_steps": self.optimizer_steps,
                                     **(extra_state() if extra_state else {})},
                state=state, progress=lambda done, summary: advance(0, info=summary),
                generators=self._generators, log=is_main, scheduler_per_step=scheduler_per_step,
            )
        self.advance = _no_progress
        self.history = result.history
        return result

    def save(self, module: nn.Module, meta: dict[str, Any], report: dict[str, Any],
             logged: Mapping[str, Any] | None = None) -> None:
        """Rank 0: save ``models/<name>/`` (``module``'s state_dict + ``meta``), write the training report
        ``reports/training/<name>.json``, the per-epoch curves ``reports/training/curves/<name>.csv`` and log
        ``logged`` (default :func:`final_metrics` of the report)."""
        if not self.ctx.is_main:
            return
        save_model(self.paths.model_dir(self.name), module, meta)
        write_json(self.paths.training_report(self.name), report)
        write_text(self.paths.training_curve(self.name), curves_csv(self.history))
        tracking.log_metrics(final_metrics(report) if logged is None else logged)
