"""What machine a benchmark ran on: one definition shared by every script's JSON and markdown."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what :mod:`platform` knows."""
    try:
        return next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def describe(with_torch: bool = True) -> str:
    """One line: CPU model, usable cores and Python; with ``with_torch`` also torch, its threads and the GPU."""
    line = f"{cpu_model()}, {usable_cores()} usable cores, Python {platform.python_version()}"
    if with_torch:
        import torch

        gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
        line += f", torch {torch.__version__} ({torch.get_num_threads()} threads){gpu}"
    return line
