"""CAM extraction speed: wsss's batched path vs a plain fp32 one-image-at-a-time loop (the seed code's way).

Same model (a randomly initialised classifier: speed does not depend on the weights), same images,
same scales and flip, in one run. Writes JSON and prints a markdown table.

    python benchmarks/cam_speed.py --arch resnet50 --size 224 --images 32 --out benchmarks/results/cam_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from wsss.config import CamsConfig
from wsss.device import autocast, compile_model, cpu_supports_bf16, precision_for, prepare_model, to_device
from wsss.methods import METHODS
from wsss.models.classifier import Classifier


def plain_loop(model: torch.nn.Module, images: torch.Tensor, cfg: CamsConfig) -> float:
    """fp32, NCHW, one image per forward (and per scale / flip): images per second."""
    method = METHODS.get("cam")
    plain = CamsConfig(scales=cfg.scales, flip=cfg.flip)
    start = time.perf_counter()
    for x in images:
        method.compute(model, x[None], torch.zeros(1, dtype=torch.long), plain)
    return len(images) / (time.perf_counter() - start)


def batched(model: torch.nn.Module, images: torch.Tensor, cfg: CamsConfig, prec: object) -> float:
    """wsss's path: batches, channels_last, bf16 autocast where supported: images per second."""
    method = METHODS.get("cam")
    start = time.perf_counter()
    for i in range(0, len(images), cfg.batch_size):
        x = to_device(images[i : i + cfg.batch_size], prec)
        with autocast(prec):
            method.compute(model, x, torch.zeros(len(x), dtype=torch.long), cfg)
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--scales", default="1.0", help="comma-separated, e.g. 0.5,1,1.5,2")
    ap.add_argument("--compile", action="store_true", help="torch.compile the batched path (base.compile: true)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/cam_speed.json"))
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = CamsConfig(scales=tuple(float(s) for s in args.scales.split(",")), flip=True, batch_size=args.batch_size)
    images = torch.randn(args.images, 3, args.size, args.size)
    fp32 = Classifier(args.arch, 2).eval()
    prec = precision_for(torch.device("cpu"))
    fast = prepare_model(Classifier(args.arch, 2).eval(), prec)
    fast.load_state_dict(fp32.state_dict())
    compile_model(fast, args.compile, inference=True)
    # Warm-up: first calls build kernels (and compile).
    plain_loop(fp32, images[:2], cfg)
    batched(fast, images[: args.batch_size], cfg, prec)
    ours, plain = batched(fast, images, cfg, prec), plain_loop(fp32, images, cfg)
    result = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "bf16": cpu_supports_bf16(),
        "arch": args.arch, "size": args.size, "images": args.images, "scales": list(cfg.scales),
        "flip": True, "batch_size": args.batch_size, "compiled": args.compile,
        "ours_images_per_s": ours, "plain_images_per_s": plain, "speedup": ours / plain,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| path | images/s |\n|---|---|")
    print(f"| plain fp32, one image at a time | {plain:.2f} |")
    print(f"| wsss: batch {args.batch_size}, channels_last, {'bf16' if result['bf16'] else 'fp32'} | {ours:.2f} |")
    print(f"speedup {ours / plain:.2f}x ({args.arch}, {args.size} px, scales {list(cfg.scales)} + flip, "
          f"{result['threads']} threads, torch {torch.__version__})")


if __name__ == "__main__":
    main()
