"""Throughput of the pseudo-mask refiners, serial vs process pool (run on demand; not a test).

Synthetic 320x240 scenes (a textured ellipse on a textured background) with noisy, blurred maps.
Reports images/s for each refiner serially and through :func:`wsss.refiners.refine_many`'s pool (checking
that both give the same masks), and the pool start-up cost of the ``forkserver`` and ``spawn`` start
methods (first and second call: a forkserver is started once per process and reused).

Usage:
    python benchmarks/refine_speed.py [--n 64] [--workers 0] [--out benchmarks/results/refine_speed.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import time
from pathlib import Path

import cv2
import numpy as np

from wsss import parallel
from wsss.config import PseudoConfig
from wsss.refiners import refine_many


def make_pairs(n: int, w: int = 320, h: int = 240, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Synthetic (image, map) pairs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    pairs = []
    for _ in range(n):
        cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w
        ay, ax = rng.uniform(0.15, 0.35) * h, rng.uniform(0.15, 0.35) * w
        obj = ((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2 < 1.0
        fg, bg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        img = np.where(obj[..., None], fg, bg) + rng.normal(0, 25, (h, w, 3))
        img = np.clip(img, 0, 255).astype(np.uint8)
        m = cv2.GaussianBlur(obj.astype(np.float32) + rng.normal(0, 0.5, (h, w)).astype(np.float32), (0, 0), 6)
        m = np.clip(m, 0, None)
        pairs.append((img, (m / (m.max() + 1e-5)).astype(np.float32)))
    return pairs


def timed(pairs: list, cfg: PseudoConfig, workers: int) -> tuple[float, list[np.ndarray]]:
    t0 = time.perf_counter()
    out = list(refine_many(pairs, cfg, workers=workers))
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--workers", type=int, default=0, help="pool size; 0 = all usable cores")
    ap.add_argument("--out", default="benchmarks/results/refine_speed.json")
    args = ap.parse_args()

    load = os.getloadavg()[0]
    workers = args.workers or parallel.cpu_count()
    methods = [m for m in ("forkserver", "spawn") if m in mp.get_all_start_methods()]
    default_ctx = parallel.process_context

    # Pool start-up cost: 8 tiny items (the pool threshold), twice per start method. Measured first, so the
    # forkserver's first call includes starting the server.
    tiny = make_pairs(8, 32, 32, seed=1)
    startup = []
    for method in methods:
        parallel.process_context = lambda preload=(), method=method: mp.get_context(method)  # noqa: B023
        if method == "forkserver":
            mp.get_context("forkserver").set_forkserver_preload(["wsss.refine"])
        for call in ("first", "second"):
            dt, _ = timed(tiny, PseudoConfig(refiner="grabcut"), workers=workers)
            startup.append({"start_method": method, "call": call, "seconds": dt})
    parallel.process_context = default_ctx

    pairs = make_pairs(args.n)
    rows = []
    for refiner in ("crf", "grabcut", "grabcut+crf"):
        cfg = PseudoConfig(refiner=refiner)
        cv2.setNumThreads(1)  # serial = one core, the same per-process setting as a pool worker
        dt, ref = timed(pairs, cfg, workers=1)
        rows.append({"refiner": refiner, "mode": "serial", "seconds": dt, "images_per_s": args.n / dt})
        dt, out = timed(pairs, cfg, workers=workers)
        same = all(np.array_equal(a, b) for a, b in zip(ref, out, strict=True))
        rows.append({"refiner": refiner, "mode": f"pool x{workers}", "seconds": dt,
                     "images_per_s": args.n / dt, "equals_serial": same})

    result = {
        "n_images": args.n, "size": "320x240", "workers": workers, "cpu_count": parallel.cpu_count(),
        "loadavg_1m_before": load, "python": platform.python_version(),
        "opencv": cv2.__version__, "default_start_method": default_ctx().get_start_method(),
        "pool_startup": startup, "rows": rows,
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2))
    print(f"{args.n} images 320x240, {workers} workers, {parallel.cpu_count()} cores, load {result['loadavg_1m_before']:.1f}\n")
    print("| refiner | mode | images/s | s | = serial |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['refiner']} | {r['mode']} | {r['images_per_s']:.1f} | {r['seconds']:.2f} | {r.get('equals_serial', '')} |")
    print("\n| start method | call | s for 8 tiny items |\n|---|---|---|")
    for r in startup:
        print(f"| {r['start_method']} | {r['call']} | {r['seconds']:.2f} |")
    print(f"\nwrote {out_path}")


if __name__ == "__main__":
    main()
