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

import torch
import torch.distributed as dist

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
