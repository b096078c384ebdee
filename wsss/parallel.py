"""Process pools for CPU-bound work (refinement, the GrabCut baseline): cores and the start method."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Sequence
from multiprocessing.context import BaseContext


def cpu_count() -> int:
    """CPU cores usable by this process (the affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def process_context(preload: Sequence[str] = ()) -> BaseContext:
    """The start method of every wsss process pool: ``forkserver`` where available, else ``spawn``.

    Never fork: the parent may hold torch/OpenMP threads, and a forked child can deadlock on their locks.
    A forkserver is started once per parent and forks workers from a clean process that has already
    imported ``preload``, so later pools (one per Optuna trial, say) start fast.
    """
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        if preload:
            ctx.set_forkserver_preload(list(preload))
        return ctx
    return mp.get_context("spawn")
