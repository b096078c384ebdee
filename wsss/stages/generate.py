"""Stage ``generate-synthetic``: write the built-in synthetic pets dataset (Oxford-IIIT Pet layout)."""

from __future__ import annotations

import time
from typing import Any

from wsss.config import Params
from wsss.paths import Paths
from wsss.ui import console, task


def run(params: Params, paths: Paths) -> dict[str, Any]:
    """Generate the synthetic dataset into ``data/raw/synthetic`` (idempotent for equal params)."""
    from wsss.data.synthetic import generate

    cfg = params.synthetic
    total = cfg.n_trainval + cfg.n_test + cfg.n_background
    start = time.perf_counter()
    with task("generating synthetic pets", total) as advance:
        counts = generate(paths.raw_synthetic, cfg, progress=lambda done, _total: advance(completed=done))
    seconds = time.perf_counter() - start
    console.print(
        f"synthetic dataset: {counts} in {seconds:.1f}s -> {paths.raw_synthetic}"
    )
    return {**counts, "seconds": seconds}
