"""Data-parallel training across processes (``torch.distributed``): one process per GPU, or gloo on the CPU.

:func:`launch` runs ``fn(ctx, *args)`` in ``world_size`` processes started with ``torch.multiprocessing``'s
spawn method, each in its own process group member, and turns a :class:`~wsss.errors.WsssError` raised in
any of them back into the same one-line error in the caller (instead of a wall of child tracebacks).
With ``world_size == 1`` it calls ``fn`` in this process with a single-process context: no process group,
no spawn, so the single-device path is exactly the plain one. Under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK`` in the environment, one or several nodes) the process is already one rank: it joins the
launcher's process group instead of spawning.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler

from wsss import errors
from wsss.errors import ConfigError, WsssError

_ERROR_FILE = "rank{rank}.error.json"


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among ``world_size`` and the device it trains on."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, checkpoints, probes and saves."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def world_size_for(requested: int, device: torch.device) -> int:
    """How many processes to train with.

    Args:
        requested: 0 = one per visible GPU when ``device`` is a CUDA device without an index (else 1);
            N >= 1 = exactly N (on CUDA at most the number of visible GPUs; on the CPU N gloo processes).
        device: the resolved training device.
    """
    if requested < 0:
        raise ConfigError(f"world_size must be >= 0, got {requested}")
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        if requested == 0:
            return visible if device.index is None else 1
        if requested > visible:
            raise ConfigError(f"world_size {requested} asks for more GPUs than the {visible} visible ones")
        return requested
    return max(1, requested)


def launched_world_size() -> int:
    """The world size set by an external launcher (``torchrun``: ``WORLD_SIZE`` with ``RANK``), else 0."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0
    try:
        return int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def _launched_context(device: torch.device) -> DistContext:
    """Join the process group a launcher described in the environment (``env://``)."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank, world_size, device)


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world_size: int, device_type: str, port: int, error_dir: str,
            fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        # Every process would otherwise start one thread per core and they would spin against each other.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=world_size)
    try:
        fn(DistContext(rank, world_size, device), *args)
    except WsssError as exc:
        # Reported by the parent as the same user-facing error; the exit code tells spawn this rank failed.
        Path(error_dir, _ERROR_FILE.format(rank=rank)).write_text(
            json.dumps({"type": type(exc).__name__, "message": str(exc)}), encoding="utf-8")
        raise SystemExit(1) from None
    finally:
        dist.destroy_process_group()


def launch(fn: Callable[..., Any], world_size: int, device: torch.device, *args: Any) -> Any:
    """Run ``fn(ctx, *args)`` on ``world_size`` ranks; returns ``fn``'s result in this process (``None`` after
    spawning ranks). Under ``torchrun`` ``world_size`` is the launcher's and this process is one of the ranks.

    ``fn`` and ``args`` must be picklable (a module-level function, dataclasses, paths). Every rank calls
    ``fn``; only rank 0 should write files or log. A :class:`WsssError` raised by any rank is re-raised here.
    """
    if launched_world_size() > 1:
        # Started by torchrun (possibly on several nodes): this process is one rank; no spawning.
        ctx = _launched_context(device)
        try:
            result = fn(ctx, *args)
            dist.barrier()  # rank 0's files are complete before any rank returns
        finally:
            dist.destroy_process_group()
        return result
    if world_size <= 1:
        return fn(DistContext(0, 1, device), *args)
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="wsss-ddp-") as error_dir:
        try:
            mp.spawn(_worker, args=(world_size, device.type, _free_port(), error_dir, fn, args),
                     nprocs=world_size, join=True)
        except mp.ProcessExitedException as exc:
            for report in sorted(Path(error_dir).glob("rank*.error.json")):
                info = json.loads(report.read_text(encoding="utf-8"))
                cls = getattr(errors, info["type"], WsssError)
                raise cls(info["message"]) from None
            raise WsssError(f"a training process (rank {exc.error_index}) died with exit code "
                            f"{exc.exit_code}; see its output above") from None
    return None


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (the values themselves on one process)."""
    if not ctx.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def global_sum(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """``x`` summed over the ranks, differentiably (``x`` itself on one process).

    For a loss that is a ratio of sums over the global batch (a mean over non-ignored pixels, a soft Dice):
    every rank then holds the same global loss, its backward sends ``world_size`` x each rank's share of the
    gradient back to that rank, and DDP's average over the ranks makes it exactly the global gradient.
    """
    if not ctx.distributed:
        return x
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(x)


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank in rank order (no gradient); ``x`` itself outside a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@contextlib.contextmanager
def main_only(ctx: DistContext, cm: contextlib.AbstractContextManager) -> Iterator[Any]:
    """Enter ``cm`` on rank 0 only (e.g. the MLflow run); other ranks get ``None``."""
    if ctx.is_main:
        with cm as value:
            yield value
    else:
        yield None


def start(fn: Callable[..., Any], requested: int, device: torch.device, *args: Any, batch_size: int,
          batch_key: str, n_images: int, what: str, source: Path, report: Path, min_per_rank: int = 1) -> Any:
    """Check the data-parallel setup of a training stage, say it on rank 0 and :func:`launch` ``fn``.

    The one entry every training stage goes through: the world size is the launcher's (``torchrun``) or
    :func:`world_size_for` ``base.world_size``; ``batch_size`` (the params key ``batch_key``) is the
    global batch and must split evenly over the ranks, and every rank needs at least one of the
    ``n_images`` training images (``what``, read from ``source``) per step (``min_per_rank`` where the
    loss needs several). Returns ``fn``'s result, or after spawning ranks the JSON ``report`` rank 0 wrote.

    Raises:
        ConfigError: the global batch is not a multiple of the world size.
        DataError: fewer training images than ranks.
    """
    from wsss.errors import DataError
    from wsss.ui import console

    world_size = launched_world_size() or world_size_for(requested, device)
    if batch_size % world_size:
        raise ConfigError(f"{batch_key} {batch_size} must be a multiple of the {world_size} "
                          "data-parallel processes (it is the global batch)")
    if n_images < min_per_rank * world_size:
        raise DataError(f"{source}: training on {world_size} process(es) needs at least "
                        f"{min_per_rank * world_size} {what}, found {n_images}")
    if world_size > 1 and int(os.environ.get("RANK", "0")) == 0:
        console.print(f"training data-parallel on {world_size} {device.type} processes "
                      f"({batch_size // world_size} images per process and step)")
    result = launch(fn, world_size, device, *args)
    if result is None:
        from wsss.io import read_json

        return read_json(report)
    return result


def sync_batchnorm(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """``model`` with BatchNorm statistics over the global batch when data-parallel, as on one process:
    PyTorch's SyncBatchNorm on GPUs, :class:`GlobalBatchNorm2d` on the CPU (SyncBatchNorm has no CPU
    kernel); unchanged on one process. The state_dict keys stay those of ``nn.BatchNorm2d``."""
    if not ctx.distributed:
        return model
    if ctx.device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in list(model.named_children()):
        if type(child) is torch.nn.BatchNorm2d:
            setattr(model, name, GlobalBatchNorm2d.like(child))
        else:
            sync_batchnorm(child, ctx)
    return model


class GlobalBatchNorm2d(torch.nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are over every rank's batch (sums all-reduced with their
    gradients), for gloo ranks on the CPU; in eval mode or outside a process group a plain BatchNorm2d."""

    @classmethod
    def like(cls, bn: torch.nn.BatchNorm2d) -> GlobalBatchNorm2d:
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        new.load_state_dict(bn.state_dict())
        new.train(bn.training)
        for name, param in bn.named_parameters(recurse=False):  # a frozen affine stays frozen
            getattr(new, name).requires_grad_(param.requires_grad)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        xf = x if x.dtype == torch.float64 else x.float()  # low precision is summed in fp32, fp64 kept
        count = torch.tensor([float(xf.numel() // xf.shape[1])], device=x.device, dtype=xf.dtype)
        stats = torch.cat([xf.sum((0, 2, 3)), xf.pow(2).sum((0, 2, 3)), count])
        stats = _SumWithGrad.apply(stats)
        c = self.num_features
        n = stats[2 * c]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean.pow(2)).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * n / max(float(n) - 1, 1.0))
                self.num_batches_tracked.add_(1)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var[None, :, None, None] + self.eps)
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


class _SumWithGrad(torch.autograd.Function):
    """All-reduce (sum) whose backward sums the ranks' gradients too (each rank's input feeds every rank's
    output)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = x.detach().clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward returns this rank's slice of the gradient summed over ranks
    (all-reduce: gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Every rank's ``x`` (equal shapes) concatenated in rank order, differentiable; ``x`` on one process.

    For a loss over the whole global batch (contrastive terms): every rank computes the same loss from the
    gathered rows; the backward sums the ranks' gradients, and DDP's average then gives exactly the
    one-process gradient.
    """
    return _GatherWithGrad.apply(x) if ctx.distributed else x


def broadcast_metrics(compute: Callable[[], dict[str, float]], ctx: DistContext) -> dict[str, float]:
    """``compute()`` on rank 0, its result on every rank (one process: ``compute()``)."""
    if not ctx.distributed:
        return compute()
    box: list[Any] = [compute() if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return dict(box[0])


def _seed(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


class ShuffledBatches(Sampler[list[int]]):
    """The global batches of an epoch: a permutation of ``range(n)`` drawn from (``seed``, epoch) alone, so
    the same for every world size and after a resume (:meth:`set_epoch`). ``drop_last`` drops a partial
    last batch unless it is the only one."""

    def __init__(self, n: int, batch_size: int, seed: int, drop_last: bool = True) -> None:
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, 0
        self.drop_last = drop_last and n > batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(_seed(self.seed, self.epoch)))
        for b in range(len(self)):
            yield order[b * self.batch_size:(b + 1) * self.batch_size].tolist()


class RankBatches(Sampler[list[tuple[int, int]]]):
    """This rank's contiguous ``1/world_size`` of each global batch of ``batches`` (a batch sampler with
    ``set_epoch``), each index paired with the epoch for :class:`SeededItems`. A batch that does not split
    evenly is cut to a multiple of the world size (every rank steps with as many images)."""

    def __init__(self, batches: Any, ctx: DistContext) -> None:
        self.batches, self.ctx, self.epoch = batches, ctx, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.batches.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        rank, world = self.ctx.rank, self.ctx.world_size
        for batch in self.batches:
            per = len(batch) // world
            yield [(int(i), self.epoch) for i in batch[rank * per:(rank + 1) * per]]


class SeededItems(Dataset):
    """``ds[i]`` with the random augmentation drawn from (``seed``, epoch, ``i``) alone: the same image gets
    the same augmentation whichever rank or worker loads it, on any world size and after a resume."""

    def __init__(self, ds: Dataset, seed: int) -> None:
        self.ds, self.seed = ds, seed

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, epoch = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed(self.seed, epoch, index))
            return self.ds[index]
