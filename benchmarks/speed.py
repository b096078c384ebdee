"""Speed of wsss's fast paths against plain baselines, side by side in one run (on demand; not a test).

Four measurements, each a ratio "ours / plain" on the same machine, model and data:

* CAM extraction images/s: batched, channels_last, bf16 (CPU) / fp16 (CUDA) vs a plain fp32 loop with one
  image per forward (``benchmarks/cam_speed.py``'s two paths).
* classifier training images/s: channels_last + bf16 autocast (CPU) / AMP (CUDA), as ``train-classifier``
  sets it up through ``wsss.device``, vs plain fp32 NCHW; same model, batch and optimiser, timed after
  warm-up steps.
* dense-CRF refinement images/s at 320x240: ``wsss.refiners.refine_many``'s process pool vs serial
  pydensecrf (``benchmarks/refine_speed.py``'s synthetic scenes).
* ``dvc repro`` of the embedded default in a fresh ``git clone``: cold, then no-op (``--skip-repro`` skips it:
  the cold run takes many minutes).

Usage:
    python benchmarks/speed.py [--out benchmarks/results/speed.json] [--quick] [--skip-repro]

Writes JSON and a markdown table next to it (same name, ``.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # the sibling benchmarks are scripts, not a package

import cam_speed  # noqa: E402
import refine_speed  # noqa: E402

# Targets: minimum ratio ours / plain (None: reported only).
TARGETS: dict[str, float | None] = {"cam": 2.5, "crf_pool": 1.8, "classifier_training": None}


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, torch version and threads, accelerator."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    from wsss.device import cpu_supports_bf16

    return {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "usable_cores": usable,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "bf16": cpu_supports_bf16(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def bench_cam(arch: str, size: int, n_images: int, batch_size: int, scales: tuple[float, ...]) -> dict[str, Any]:
    """CAM extraction images/s: wsss's batched path vs the plain one-image loop (cam_speed.py)."""
    from wsss.config import CamsConfig
    from wsss.device import precision_for, prepare_model
    from wsss.models.classifier import Classifier

    torch.manual_seed(0)
    cfg = CamsConfig(scales=scales, flip=True, batch_size=batch_size)
    images = torch.randn(n_images, 3, size, size)
    plain_model = Classifier(arch, 2).eval()
    prec = precision_for(torch.device("cpu"))
    fast = prepare_model(Classifier(arch, 2).eval(), prec)
    fast.load_state_dict(plain_model.state_dict())
    cam_speed.plain_loop(plain_model, images[:1], cfg)  # warm-up: first calls pick kernels
    cam_speed.batched(fast, images[:batch_size], cfg, prec)
    ours = cam_speed.batched(fast, images, cfg, prec)
    plain = cam_speed.plain_loop(plain_model, images, cfg)
    return {"arch": arch, "size": size, "images": n_images, "batch_size": batch_size, "scales": list(scales),
            "flip": True, "ours_images_per_s": ours, "plain_images_per_s": plain, "ratio": ours / plain}


def _train_steps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int,
                 prepare: Callable[[torch.Tensor], torch.Tensor], ctx: Callable[[], Any],
                 scaler: torch.amp.GradScaler | None) -> float:
    """Seconds for ``steps`` SGD steps on one batch (the loop of train-classifier, without data loading)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    start = time.perf_counter()
    for _ in range(steps):
        xb = prepare(x)
        with ctx():
            loss = F.cross_entropy(model(xb).float(), y)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_training(arch: str, size: int, batch_size: int, steps: int, warmup: int,
                   device: str = "cpu") -> dict[str, Any]:
    """Classifier training images/s: wsss's precision setup vs plain fp32 NCHW (same init, batch, steps)."""
    import contextlib

    from wsss.device import autocast, grad_scaler, precision_for, prepare_model, to_device
    from wsss.models.classifier import Classifier

    dev = torch.device(device)
    torch.manual_seed(0)
    x = torch.randn(batch_size, 3, size, size, device=dev)
    y = torch.randint(0, 2, (batch_size,), device=dev)
    init = Classifier(arch, 2).state_dict()

    plain = Classifier(arch, 2).to(dev).train()
    plain.load_state_dict(init)
    _train_steps(plain, x, y, warmup, lambda t: t, contextlib.nullcontext, None)
    plain_s = _train_steps(plain, x, y, steps, lambda t: t, contextlib.nullcontext, None)

    prec = precision_for(dev)
    fast = Classifier(arch, 2)
    fast.load_state_dict(init)
    fast = prepare_model(fast, prec).train()
    scaler = grad_scaler(prec)
    _train_steps(fast, x, y, warmup, lambda t: to_device(t, prec), lambda: autocast(prec), scaler)
    ours_s = _train_steps(fast, x, y, steps, lambda t: to_device(t, prec), lambda: autocast(prec), scaler)
    n = batch_size * steps
    return {"arch": arch, "size": size, "batch_size": batch_size, "steps": steps, "warmup_steps": warmup,
            "device": device, "precision": str(prec.autocast_dtype).removeprefix("torch.") if prec.autocast_dtype
            else "fp32", "channels_last": prec.channels_last,
            "ours_images_per_s": n / ours_s, "plain_images_per_s": n / plain_s, "ratio": plain_s / ours_s}


def bench_crf_fresh(n_images: int, width: int, height: int, workers: int) -> dict[str, Any]:
    """:func:`bench_crf` in a fresh interpreter.

    Measured: timed in the process that had just run the torch benchmarks, the pool ratio fell from 1.90x
    to 1.09x (also in a ``spawn`` child of it), while ``make-pseudo`` itself gets the full pool speed-up.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "crf.json"
        code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import speed; "
                "json.dump(speed.bench_crf(*map(int, sys.argv[3:])), open(sys.argv[2], 'w'))")
        subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(out), str(n_images),
                        str(width), str(height), str(workers)], check=True)
        return json.loads(out.read_text())


def bench_crf(n_images: int, width: int, height: int, workers: int) -> dict[str, Any]:
    """Dense-CRF images/s: refine_many's process pool vs serial, on refine_speed.py's scenes."""
    import cv2
    import numpy as np

    from wsss.config import PseudoConfig
    from wsss.parallel import cpu_count
    from wsss.refine import require_crf

    require_crf()
    workers = workers or cpu_count()
    pairs = refine_speed.make_pairs(n_images, width, height)
    cfg = PseudoConfig(refiner="crf")
    refine_speed.timed(pairs[:8], cfg, workers=workers)  # warm-up: starts the pool's forkserver once
    cv2.setNumThreads(1)  # serial = one core, the same per-process setting as a pool worker
    serial_s, ref = refine_speed.timed(pairs, cfg, workers=1)
    pool_s, out = refine_speed.timed(pairs, cfg, workers=workers)
    same = all(np.array_equal(a, b) for a, b in zip(ref, out, strict=True))
    return {"images": n_images, "size": f"{width}x{height}", "workers": workers,
            "ours_images_per_s": n_images / pool_s, "plain_images_per_s": n_images / serial_s,
            "ratio": serial_s / pool_s, "pool_equals_serial": same}


def bench_repro(repo: Path, timeout_s: float = 3600.0) -> dict[str, Any]:
    """``dvc repro`` of the embedded default in a fresh clone: cold seconds, then no-op seconds."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("MLFLOW_TRACKING_URI", None)  # the clone's own store, not the caller's
    with tempfile.TemporaryDirectory(prefix="wsss-repro-") as tmp:
        clone = Path(tmp) / "wsss"
        subprocess.run(["git", "clone", "--quiet", str(repo), str(clone)], check=True)
        if shutil.which("dvc", path=env["PATH"]) is None:
            raise RuntimeError("dvc is not on PATH (install the project's dependencies)")
        times = {}
        for name in ("cold", "noop"):
            start = time.perf_counter()
            proc = subprocess.run(["dvc", "repro"], cwd=clone, env=env, capture_output=True, text=True,
                                  timeout=timeout_s)
            times[name] = time.perf_counter() - start
            if proc.returncode != 0:
                raise RuntimeError(f"dvc repro ({name}) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout
    return {"commit": commit.strip(), "cold_s": times["cold"], "noop_s": times["noop"]}


def verdict(name: str, ratio: float | None) -> str:
    """``pass`` / ``FAIL`` against :data:`TARGETS`, or ``report`` when the metric has no target."""
    target = TARGETS.get(name)
    if target is None or ratio is None:
        return "report"
    return "pass" if ratio >= target else "FAIL"


def to_markdown(result: dict[str, Any]) -> str:
    """A markdown summary: machine line and one row per measurement."""
    m = result["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['usable_cores']} usable cores ({m['cpu_count']} total), torch {m['torch']}, "
        f"{m['torch_threads']} threads, bf16 {'yes' if m['bf16'] else 'no'}"
        + (f", GPU {m['cuda']}" if m.get("cuda") else "") + f"; load {m['loadavg_1m']:.2f} at start"
        + (" (quick sizes)" if result.get("quick") else ""),
        "",
        "| measurement | setting | ours | plain | ratio | target | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = result["rows"]
    for key, label in (("cam", "CAM extraction (images/s)"), ("classifier_training", "classifier training (images/s)"),
                       ("crf_pool", "dense CRF (images/s)")):
        r = rows.get(key)
        if r is None:
            continue
        target = TARGETS.get(key)
        goal = f"≥ {target:.1f}x" if target else "—"
        lines.append(f"| {label} | {r['setting']} | {r['ours_images_per_s']:.2f} | {r['plain_images_per_s']:.2f} | "
                     f"{r['ratio']:.2f}x | {goal} | {verdict(key, r['ratio'])} |")
    repro = result.get("repro")
    if repro:
        lines.append(f"| `dvc repro` (fresh clone) | cold / no-op | {repro['cold_s']:.0f} s | "
                     f"{repro['noop_s']:.1f} s | — | — | report |")
    else:
        lines.append("| `dvc repro` (fresh clone) | skipped (--skip-repro) | — | — | — | — | — |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmarks, print the table and write JSON + markdown."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "speed.json")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (seconds): checks the harness, not the speed")
    ap.add_argument("--skip-repro", action="store_true", help="skip the dvc repro timing (cold takes minutes)")
    ap.add_argument("--cam-arch", default="resnet50")
    ap.add_argument("--train-arch", default="resnet18")
    ap.add_argument("--workers", type=int, default=0, help="CRF pool size; 0 = every usable core")
    ap.add_argument("--device", default="cpu", help="training benchmark device (cpu or cuda)")
    args = ap.parse_args(argv)

    if args.quick:
        cam = {"arch": "resnet18", "size": 64, "n_images": 4, "batch_size": 4, "scales": (1.0,)}
        train = {"arch": "resnet18", "size": 64, "batch_size": 4, "steps": 2, "warmup": 1}
        crf = {"n_images": 8, "width": 80, "height": 60}
    else:
        cam = {"arch": args.cam_arch, "size": 224, "n_images": 16, "batch_size": 8, "scales": (1.0,)}
        train = {"arch": args.train_arch, "size": 224, "batch_size": 16, "steps": 5, "warmup": 2}
        crf = {"n_images": 32, "width": 320, "height": 240}

    result: dict[str, Any] = {"machine": machine_info(), "quick": args.quick, "rows": {}}
    m = result["machine"]
    print(f"{m['cpu']} | {m['usable_cores']} usable cores | torch {m['torch']} | {m['torch_threads']} threads | "
          f"bf16 {m['bf16']}", flush=True)

    r = bench_cam(cam["arch"], cam["size"], cam["n_images"], cam["batch_size"], cam["scales"])
    r["setting"] = f"{r['arch']} {r['size']} px, batch {r['batch_size']}, scales {r['scales']} + flip"
    result["rows"]["cam"] = r
    print(f"CAM: {r['ratio']:.2f}x", flush=True)
    r = bench_training(train["arch"], train["size"], train["batch_size"], train["steps"], train["warmup"],
                       args.device)
    r["setting"] = (f"{r['arch']} {r['size']} px, batch {r['batch_size']}, {r['steps']} steps, "
                    f"{r['precision']}{' + channels_last' if r['channels_last'] else ''} on {r['device']}")
    result["rows"]["classifier_training"] = r
    print(f"classifier training: {r['ratio']:.2f}x", flush=True)
    r = bench_crf_fresh(crf["n_images"], crf["width"], crf["height"], args.workers)
    r["setting"] = f"{r['images']} images {r['size']}, pool x{r['workers']} vs serial"
    result["rows"]["crf_pool"] = r
    print(f"CRF pool: {r['ratio']:.2f}x", flush=True)
    result["repro"] = None if args.skip_repro else bench_repro(REPO)
    result["verdicts"] = {k: verdict(k, v["ratio"]) for k, v in result["rows"].items()}

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    md = to_markdown(result)
    args.out.with_suffix(".md").write_text(md)
    print()
    print(md, end="")
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
