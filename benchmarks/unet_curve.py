"""Is the U-Net the ceiling? Its curve over input size and optimiser steps, on the same masks.

``quality.py``'s U-Nets all train at one schedule (the cpu profile: 128 px, 400 steps), and there every mask
source, GT included, lands within a few points. This script asks whether that schedule caps them: it trains
``unet-<masks>`` for each mask source at each point ``SIZExSTEPS`` (``train_unet.input_size`` x
``train_unet.steps``; everything else is the profile's) and scores it on the val split (the training
report's last val fg IoU: what chooses) and on the test split (what is reported, never what chooses).

A light project is built first under ``<workdir>/base`` with only what the sources need: ``wsss prepare``,
the label-free rectangle-GrabCut map and its masks (``prior-grabcut``). Each point is a sibling project
``<workdir>/<SIZE>x<STEPS>/`` whose ``params.yaml`` is the base's with the two values replaced and whose
``data/``, ``masks/``, ``cams/`` and ``reports/pseudo/`` link to the base's. A rerun keeps every U-Net a
killed run finished.

    python benchmarks/unet_curve.py --train-root ../shared/data/oxford-pet-dev/oxford-iiit-pet \\
        --extra-train-root ../shared/data/oxford-pet-dev-clsonly/oxford-iiit-pet --workdir /tmp/ucurve \\
        --points 128x400 128x800 176x400 --masks gt prior-grabcut --out benchmarks/results/unet-curve-cpu.json

The chosen point is the one with the best val IoU averaged over the sources (one schedule for every row,
so the comparisons stay at equal schedules); its test IoUs are printed beside the profile's own point.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import (  # noqa: E402
    LABEL_FREE,
    Runner,
    StepFailed,
    build_plan,
    load_profile,
    machine,
    shown,
    write_params,
)
from unet_seeds import cli, scores, sibling_project, write_result  # noqa: E402

from wsss.io import read_json  # noqa: E402
from wsss.paths import Paths  # noqa: E402

# Sources that need nothing trained before the U-Net (the trainval GT, the label-free masks).
SOURCES = ("gt", LABEL_FREE)


def point(text: str) -> tuple[int, int]:
    """``SIZExSTEPS`` -> (input size, steps); an argparse type."""
    size, sep, steps = text.lower().partition("x")
    try:
        parsed = int(size), int(steps)
    except ValueError:
        parsed = None
    if not sep or parsed is None or min(parsed) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SIZExSTEPS with positive integers, e.g. 128x400")
    return parsed


def point_name(size: int, steps: int) -> str:
    return f"{size}x{steps}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-root", type=Path, required=True, help="Oxford-layout root with trimaps")
    ap.add_argument("--extra-train-root", type=Path, action="append", default=[],
                    help="more labelled images without masks (repeatable)")
    ap.add_argument("--profile", default="cpu", help="cpu, gpu, smoke, or a profile YAML file (its params are used)")
    ap.add_argument("--workdir", type=Path, required=True, help="where the base and point projects go")
    ap.add_argument("--points", nargs="+", type=point, default=[(128, 400), (128, 800), (176, 400)],
                    help="SIZExSTEPS points of train_unet.input_size x train_unet.steps")
    ap.add_argument("--masks", nargs="+", default=list(SOURCES), choices=SOURCES, help="mask sources")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/unet-curve.json"))
    args = ap.parse_args(argv)
    if not (args.train_root / "annotations" / "trainval.txt").is_file():
        ap.error(f"--train-root {args.train_root}: no annotations/trainval.txt (an Oxford-IIIT Pet layout root is needed)")
    if len(set(args.points)) != len(args.points):
        ap.error("--points: each point once")
    return args


def build_base(args: argparse.Namespace, runner_for: Any) -> tuple[Path, dict[str, Any], list[dict[str, Any]]]:
    """The light project every point links to: prepared data and the label-free masks."""
    plan = build_plan(load_profile(args.profile), args.train_root, args.extra_train_root)
    base = args.workdir.resolve() / "base"
    write_params(base, plan.params)
    runner = runner_for(base)
    paths = Paths(base)
    if not paths.manifest.is_file():
        runner("prepare", "prepare")
    if LABEL_FREE in args.masks and not paths.pseudo_report(LABEL_FREE).is_file():  # written last
        runner(f"make-cams {LABEL_FREE}", "make-cams", "--method", LABEL_FREE)
        runner(f"make-pseudo {LABEL_FREE}", "make-pseudo", "--method", LABEL_FREE)
    return base, plan.params, list(runner.steps)


def choose(runs: dict[str, dict[str, dict[str, Any]]], points: list[str]) -> str:
    """The point with the best val IoU averaged over the sources (ties: the earlier point). Val only."""
    def mean_val(p: str) -> float:
        return statistics.fmean(float(by_point[p]["val_iou"]) for by_point in runs.values())
    return max(points, key=lambda p: (mean_val(p), -points.index(p)))


def to_markdown(result: dict[str, Any]) -> str:
    def pct(v: Any) -> str:
        return "—" if v is None else f"{100 * float(v):.1f}"

    masks, points = result["masks"], result["points"]
    out = [f"# U-Net curve: input size x optimiser steps (`{result['workdir']}`)", "",
           f"{result['machine']}. Profile `{result['profile']}` (every other `train_unet` value as there: "
           f"batch {result['batch_size']}, lr {result['lr']}). fg IoU %: val = the {result['n_val']} val images "
           f"that choose; test = {result['n_test']} images never used to train or choose. Default point "
           f"`{result['default_point']}`; chosen on val: **`{result['chosen_point']}`**.", "",
           "| point | " + " | ".join(f"`{m}` val | `{m}` test" for m in masks) + " | mean val | train s (per U-Net) |",
           "|---|" + "---|---|" * len(masks) + "---|---|"]
    for p in points:
        cells = [f"{pct(result['runs'][m][p]['val_iou'])} | {pct(result['runs'][m][p]['test_iou'])}" for m in masks]
        mean_val = statistics.fmean(float(result["runs"][m][p]["val_iou"]) for m in masks)
        secs = [result["runs"][m][p].get("train_seconds") for m in masks]
        shown_secs = ", ".join("—" if s is None else f"{s:.0f}" for s in secs)
        mark = " (chosen)" if p == result["chosen_point"] else (" (default)" if p == result["default_point"] else "")
        out.append(f"| `{p}`{mark} | " + " | ".join(cells) + f" | {100 * mean_val:.1f} | {shown_secs} |")
    out += ["", f"Train s: the training loop's wall time from each U-Net's report. Total {result['total_seconds'] / 60:.1f} "
            "min in this invocation (U-Nets a previous one trained and evaluated are reused); every step it ran is "
            "in the JSON."]
    return "\n".join(out) + "\n"


def run(args: argparse.Namespace, runner_for: Any = None) -> dict[str, Any]:
    """Build the base, train and evaluate each (source, point); returns the result (JSON + markdown written)."""
    runner_for = runner_for or (lambda root: Runner(root, root / "unet-curve.log"))
    start = time.perf_counter()
    base, params, steps = build_base(args, runner_for)
    unet = params["train_unet"]
    default = point_name(int(unet["input_size"]), int(unet["steps"]))
    names = [point_name(*p) for p in args.points]
    runs: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in args.masks}
    for (size, n_steps), name in zip(args.points, names, strict=True):
        dest = sibling_project(base, args.workdir.resolve() / name,
                               {"train_unet": {"input_size": size, "steps": n_steps}})
        runner = runner_for(dest)
        for m in args.masks:
            if scores(dest, m) is None:
                runner(f"train-unet {m} ({name})", "train-unet", "--masks", m)
                runner(f"evaluate unet-{m} ({name})", "evaluate", "--model", f"unet-{m}")
            got = scores(dest, m)
            if got is None:
                raise StepFailed(f"{dest}: unet-{m} left no reports")
            runs[m][name] = {**got, "train_seconds": train_seconds(dest, m)}
        steps += runner.steps
    n_test = {r.get("n_test") for by_point in runs.values() for r in by_point.values()}
    result = {"workdir": shown(args.workdir), "profile": args.profile, "machine": machine(),
              "masks": list(args.masks), "points": names, "default_point": default,
              "chosen_point": choose(runs, names), "batch_size": unet["batch_size"], "lr": unet["lr"],
              "n_val": n_val(base), "n_test": n_test.pop() if len(n_test) == 1 else sorted(n_test), "runs": runs, "steps": steps,
              "total_seconds": round(time.perf_counter() - start, 1)}
    write_result(args.out, result, to_markdown)
    return result


def train_seconds(project: Path, masks: str) -> float | None:
    """The training loop's own wall time (its report's, so a reused U-Net keeps the time it took)."""
    seconds = read_json(project / "reports" / "training" / f"unet-{masks}.json").get("train_seconds")
    return None if seconds is None else round(float(seconds), 1)


def n_val(project: Path) -> int | None:
    """How many val pets with GT the project scores its U-Nets on (None before it is prepared)."""
    from wsss.data.manifest import load_manifest, pets

    manifest = Paths(project).manifest
    if not manifest.is_file():
        return None
    return len(pets(load_manifest(manifest), "val", with_mask=True))


def main(argv: list[str] | None = None) -> int:
    return cli(argv, parse_args, run, to_markdown)


if __name__ == "__main__":
    sys.exit(main())
