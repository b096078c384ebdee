"""Sharded inference: which part of the images this process handles, and the lock its merge takes.

``make-cams``, ``make-pseudo`` and ``predict`` split their work into ``n`` parts. A process handles part
``i`` when it is given ``--shard i/n`` (a scheduler's job array: Slurm, Kubernetes) or when a launcher
such as ``torchrun`` set ``RANK`` and ``WORLD_SIZE`` (then ``i = RANK``, ``n = WORLD_SIZE``). No process
group is needed: parts meet only on disk. Each part writes its own files (per-part records, atomic
renames); the invocation that finishes last finds every part present and writes the final outputs
(index and manifest files, reports), under :func:`folder_lock`, so they are the bytes one process writes.

No torch here (``make-pseudo`` does not need it); :func:`rank_device` imports it only when asked.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from wsss.errors import ConfigError

T = TypeVar("T")
OPTION = "--shard"


@dataclass(frozen=True)
class Shard:
    """Part ``index`` (0-based) of ``count`` parts."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str, option: str = OPTION) -> Shard:
        """``"i/n"`` with integers ``0 <= i < n``.

        Raises:
            ConfigError: anything else (one line naming ``option``).
        """
        parts = str(text).strip().split("/")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ConfigError(f"{option} {text!r}: expected i/n with integers 0 <= i < n, e.g. 0/4")
        index, count = (int(p) for p in parts)
        if count < 1 or index >= count:
            raise ConfigError(f"{option} {text!r}: needs n >= 1 and 0 <= i < n (i counts from 0)")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def sharded(self) -> bool:
        return self.count > 1

    @property
    def tag(self) -> str:
        """``00001-of-00004``: names this part's files."""
        return f"{self.index:05d}-of-{self.count:05d}"

    def take(self, items: Sequence[T]) -> list[T]:
        """This part's items: contiguous blocks, sizes differing by at most one (order kept)."""
        n = len(items)
        lo, hi = n * self.index // self.count, n * (self.index + 1) // self.count
        return list(items[lo:hi])

    def take_indices(self, n: int) -> list[int]:
        """This part's indices among ``range(n)`` (as :meth:`take`)."""
        return self.take(range(n))


ALL = Shard(0, 1)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} (set by the launcher) is not an integer") from None


def launched_shard() -> Shard | None:
    """The part a launcher assigned through ``RANK`` / ``WORLD_SIZE`` (``torchrun``), or None."""
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    if rank is None or world is None:
        return None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank}, WORLD_SIZE={world} (set by the launcher): need 0 <= RANK < WORLD_SIZE")
    return Shard(rank, world)


def resolve(option: str | None) -> Shard:
    """The part this process handles: ``--shard`` when given, else the launcher's ranks, else all of it.

    Raises:
        ConfigError: a bad ``--shard``, or one that contradicts the launcher's ``RANK`` / ``WORLD_SIZE``.
    """
    given = Shard.parse(option) if option is not None else None
    launched = launched_shard()
    if given is not None and launched is not None and launched.sharded and given != launched:
        raise ConfigError(f"{OPTION} {given} contradicts RANK/WORLD_SIZE {launched} set by the launcher; "
                          f"give one of them")
    return given or launched or ALL


def local_share() -> int:
    """How many processes of this job share this machine (``LOCAL_WORLD_SIZE`` from ``torchrun``, else 1)."""
    return max(1, _env_int("LOCAL_WORLD_SIZE") or 1)


def local_workers(workers: int) -> int:
    """A process pool size for this process: ``workers`` when set, else this machine's cores divided among
    the job's processes on it (so ``torchrun --nproc-per-node N`` does not start N pools of every core)."""
    if workers > 0:
        return workers
    from wsss.parallel import cpu_count

    return max(1, cpu_count() // local_share())


def rank_device(spec: str) -> str:
    """The device of this rank: under a launcher, ``auto`` / ``cuda`` become ``cuda:<LOCAL_RANK>`` (modulo the
    visible GPUs) when CUDA is available; anything else (``cpu``, ``cuda:N``, no launcher) is kept."""
    local = _env_int("LOCAL_RANK")
    if local is None or spec not in ("auto", "cuda"):
        return spec
    import torch

    if not torch.cuda.is_available():
        return spec
    return f"cuda:{local % torch.cuda.device_count()}"


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder`` itself (no lock file is left behind): shards that reset or
    merge one output folder take turns. Where ``fcntl`` is missing it does nothing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
