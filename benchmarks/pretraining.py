"""Scratch vs self-supervised backbone initialisation, measured downstream on real data (on demand; not a test).

Each route gets its own work project with the same params (a profile from ``benchmarks/profiles/``, ImageNet
never used) and differs only in where the backbones start:

    scratch:  train-classifier species -> make-cams cam -> train-ccam --init none        -> make-cams ccam
    <method>: pretrain (method)        -> the same, with weights / --init pretrain:<method>
    then, per route: tune crf on the CCAM maps (val split) -> evaluate --pseudo (test split)
    once, in the scratch project: evaluate --baselines (the label-free bars)

Reported per route: the pretraining time and k-NN probes, the CAM and CCAM maps' val fg IoU, the tuned
pseudo-masks' val fg IoU, and their fg IoU on the official test split (never used for training, tuning or
selection) before and after refinement, beside the label-free baselines on the same test images.

    python benchmarks/pretraining.py --train-root /data/oxford-iiit-pet [--extra-train-root ROOT]... \\
        [--profile cpu|gpu|smoke|FILE.yaml] [--methods simsiam,mocov2] [--workdir DIR] --out FILE.json

Writes FILE.json and FILE.md; the last line printed is
``<route>: ccam_val=… pseudo_test=… | … grabcut_rect=…`` (fg IoU in %).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from quality import (
    Runner,
    StepFailed,
    build_plan,
    deep_merge,
    load_profile,
    machine,
    pct,
    read_json,
    shown,
    shown_params,
    write_params,
)

SSL_METHODS = ("simsiam", "mocov2")
_TUNED = re.compile(r"mean val fg IoU ([0-9.]+)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-root", type=Path, required=True, help="Oxford-layout root with trimaps")
    ap.add_argument("--extra-train-root", type=Path, action="append", default=[],
                    help="label-only Oxford-layout root (pretraining and the weakly-supervised stages; repeatable)")
    ap.add_argument("--profile", default="cpu", help="cpu, gpu, smoke, or a profile YAML file")
    ap.add_argument("--methods", default=",".join(SSL_METHODS), help="comma-separated self-supervised methods")
    ap.add_argument("--workdir", type=Path, default=None, help="folder for the work projects (default: a temp one)")
    ap.add_argument("--device", default=None, help="base.device for every stage")
    ap.add_argument("--out", type=Path, required=True, help="JSON result; the markdown goes next to it (.md)")
    return ap.parse_args(argv)


def route_params(base: dict[str, Any], method: str | None) -> dict[str, Any]:
    """The params of one route: ``None`` is scratch, else the backbones start from ``pretrain:<method>``."""
    if method is None:
        return deep_merge(base, {"train_classifier": {"weights": "none"}})
    return deep_merge(base, {"pretrain": {"name": method, "method": method},
                             "train_classifier": {"weights": f"pretrain:{method}"}})


def ccam_model(method: str | None) -> str:
    """The CCAM model folder of a route (``ccam-none`` / ``ccam-pre-<method>``)."""
    return "ccam-none" if method is None else f"ccam-pre-{method}"


def run_route(runner: Runner, method: str | None, tune_trials: int, baselines: bool) -> None:
    """Every step of one route, in ``runner.root``."""
    route = method or "scratch"
    runner(f"{route}: prepare", "prepare", project=route)
    if method is not None:
        runner(f"{route}: pretrain", "pretrain", project=route)
    runner(f"{route}: train-classifier", "train-classifier", "--labels", "species", project=route)
    runner(f"{route}: make-cams cam", "make-cams", "--method", "cam", "--model", "classifier-species", project=route)
    init = "none" if method is None else f"pretrain:{method}"
    runner(f"{route}: train-ccam", "train-ccam", "--init", init, project=route)
    runner(f"{route}: make-cams ccam", "make-cams", "--method", "ccam", "--model", ccam_model(method), project=route)
    variant = f"ccam_{ccam_model(method)}"
    runner(f"{route}: tune crf", "tune", "crf", "--method", variant, "--trials", str(tune_trials), project=route)
    runner(f"{route}: evaluate --pseudo", "evaluate", "--pseudo", variant, project=route)
    if baselines:
        runner(f"{route}: evaluate --baselines", "evaluate", "--baselines", project=route)


def tuned_val_iou(crf_yaml: Path) -> float:
    """The best trial's mean val fg IoU, from the header ``wsss tune crf`` writes into the tuned params."""
    match = _TUNED.search(crf_yaml.read_text())
    if match is None:
        raise StepFailed(f"{crf_yaml}: no 'mean val fg IoU' in its header")
    return float(match.group(1))


def collect_route(project: Path, method: str | None) -> dict[str, Any]:
    """One route's scores (fg IoU in %) and pretraining figures, read from its reports."""
    reports = project / "reports"
    variant = f"ccam_{ccam_model(method)}"
    cam = read_json(reports / "cams" / "cam_classifier-species.json")
    ccam = read_json(reports / "cams" / f"{variant}.json")
    test = read_json(reports / "eval-pseudo" / f"{variant}.json")
    row: dict[str, Any] = {
        "route": method or "scratch",
        "cam_val_iou": pct(cam["iou_mean"]), "cam_val_best_iou": pct(cam.get("best_iou_mean")),
        "ccam_val_iou": pct(ccam["iou_mean"]), "ccam_val_best_iou": pct(ccam.get("best_iou_mean")),
        "pseudo_val_iou": pct(tuned_val_iou(reports / "crf" / f"{variant}.yaml")),
        "pseudo_test_iou_before": pct(test["before"]["iou_mean"]), "pseudo_test_iou": pct(test["after"]["iou_mean"]),
        "refiner": test.get("refiner"), "n_test_images": test.get("n_images"),
        "val_whole_iou": pct(ccam.get("baseline_whole_iou")), "val_ellipse_iou": pct(ccam.get("baseline_ellipse_iou")),
    }
    if method is not None:
        pre = read_json(reports / "training" / f"pretrain-{method}.json")
        row["pretrain"] = {k: pre.get(k) for k in (
            "epochs", "train_seconds", "images_per_s", "final_loss", "knn_balanced_acc", "knn_balanced_acc_init",
            "knn_loo_balanced_acc", "knn_loo_balanced_acc_init", "n_images", "world_size")}
    return row


def baselines(project: Path) -> dict[str, float]:
    """The label-free baselines on the test split (fg IoU %)."""
    base = read_json(project / "reports" / "eval" / "baselines.json")
    return {k: pct(base[k]["iou_mean"]) for k in ("whole_image", "ellipse", "grabcut_rect")}


def num(v: Any, digits: int = 1) -> str:
    """A number for the tables (— when absent)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:.{digits}f}"


def summary_line(result: dict[str, Any]) -> str:
    """``scratch: ccam_val=… pseudo_test=… | simsiam: … | grabcut_rect=…``."""
    parts = [f"{r['route']}: ccam_val={num(r['ccam_val_iou'])} pseudo_test={num(r['pseudo_test_iou'])}"
             for r in result.get("routes", [])]
    base = result.get("baselines") or {}
    return " | ".join([*parts, f"grabcut_rect={num(base.get('grabcut_rect'))}"])


def to_markdown(result: dict[str, Any]) -> str:
    """Settings, the per-route table, the pretraining table and the step timings."""
    base = result.get("baselines") or {}
    lines = [
        f"# wsss pretraining benchmark ({result['profile']} profile)",
        "",
        f"- train root: `{result['train_root']}`; extra label-only roots: "
        + (", ".join(f"`{r}`" for r in result["extra_train_roots"]) or "none"),
        f"- machine: {result['machine']}",
        f"- total wall time: {result['total_seconds'] / 60:.1f} min",
        f"- label-free baselines on the test split: whole image {num(base.get('whole_image'))}, centred ellipse "
        f"{num(base.get('ellipse'))}, GrabCut from the centred rectangle {num(base.get('grabcut_rect'))}",
        "",
        "| route | CAM val IoU % | CCAM val IoU % (best τ) | pseudo val IoU % (tuned) | pseudo test IoU % before → after | refiner |",
        "|---|---|---|---|---|---|",
    ]
    for r in result.get("routes", []):
        lines.append(f"| {r['route']} | {num(r['cam_val_iou'])} | {num(r['ccam_val_iou'])} ({num(r['ccam_val_best_iou'])}) | "
                     f"{num(r['pseudo_val_iou'])} | {num(r['pseudo_test_iou_before'])} → {num(r['pseudo_test_iou'])} | "
                     f"{r.get('refiner') or '—'} |")
    pre = [r for r in result.get("routes", []) if "pretrain" in r]
    if pre:
        lines += ["", "| method | epochs | minutes | images/s | k-NN species bal. acc (val) init → end | "
                  "leave-one-out init → end |", "|---|---|---|---|---|---|"]
        for r in pre:
            p = r["pretrain"]
            lines.append(f"| {r['route']} | {p.get('epochs')} | {num((p.get('train_seconds') or math.nan) / 60)} | "
                         f"{num(p.get('images_per_s'))} | {num(p.get('knn_balanced_acc_init'), 3)} → "
                         f"{num(p.get('knn_balanced_acc'), 3)} | {num(p.get('knn_loo_balanced_acc_init'), 3)} → "
                         f"{num(p.get('knn_loo_balanced_acc'), 3)} |")
    lines += ["", "| step | seconds |", "|---|---|"]
    lines += [f"| {s['step']} | {s['seconds']:.1f} |" for s in result.get("steps", [])]
    lines += ["", "`" + summary_line(result) + "`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run every route; returns the exit code."""
    args = parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(SSL_METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; valid: {', '.join(SSL_METHODS)}")
    profile = load_profile(args.profile)
    # ImageNet is what this benchmark replaces: never use it, even when cached.
    plan = build_plan(profile, args.train_root, args.extra_train_root, args.device, imagenet_check=lambda _a: False)
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="wsss-pretraining-"))).resolve()
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "profile": args.profile, "profile_file": shown(profile["source"]), "train_root": shown(args.train_root),
        "extra_train_roots": [shown(r) for r in args.extra_train_root], "workdir": shown(work), "out": shown(out),
        "machine": machine(), "methods": methods, "params": shown_params(plan.params), "routes": [],
    }
    start = time.perf_counter()
    steps: list[dict[str, Any]] = []
    rc = 0
    try:
        for i, method in enumerate([None, *methods]):
            project = work / (method or "scratch")
            write_params(project, route_params(plan.params, method))
            runner = Runner(project, project / "benchmark.log")
            try:
                run_route(runner, method, plan.tune_trials, baselines=i == 0)
            finally:
                steps += runner.steps
            result["routes"].append(collect_route(project, method))
            if i == 0:
                result["baselines"] = baselines(project)
    except StepFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        result["error"] = str(exc)
        rc = 1
    result["steps"] = steps
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    result["summary_line"] = summary_line(result)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(to_markdown(result))
    print(result["summary_line"], flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
