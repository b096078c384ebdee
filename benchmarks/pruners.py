"""Median vs Wilcoxon pruner for `wsss tune crf`, on equal trial budgets and the same seeds (on demand).

Runs ``wsss tune crf --method VARIANT --trials N --study bench-<pruner>-s<seed>`` in a prepared work
project (one with ``data/prepared`` and ``cams/VARIANT``, e.g. a ``quality.py`` work folder) once per
pruner and seed, each from its own params file (the project's ``params.yaml`` with ``tune.pruner``,
``tune.seed`` and the budget set; studies ``<tag>-<pruner>-s<seed>``), then reads every trial back from the study storage. Validation split
only, like the stage.

    python benchmarks/pruners.py --project WORK --variant cam_classifier-species \\
        [--trials 16] [--seeds 0 1] [--prune-chunks 5] --out benchmarks/results/pruners.json

Per run: best val IoU after the budget, wall time, trials complete / pruned, images refined (the cost
measure that does not move with the machine's load), and the best value reached by each image count and
second, so the two pruners can also be compared at the cost the cheaper one spent.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import hostinfo  # the sibling module (benchmarks/ is on sys.path when a script runs)
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PRUNERS = ("median", "wilcoxon")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", type=Path, required=True, help="work project with data/prepared and cams/")
    ap.add_argument("--variant", required=True, help="map variant under cams/")
    ap.add_argument("--trials", type=int, default=16, help="trial budget per run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--prune-chunks", type=int, default=5, help="pruning checks per trial (both pruners)")
    ap.add_argument("--n-startup-trials", type=int, default=4)
    ap.add_argument("--wilcoxon-p", type=float, default=0.1)
    ap.add_argument("--refiners", nargs="+", default=["crf", "grabcut", "none"])
    ap.add_argument("--pruners", nargs="+", default=list(PRUNERS), choices=PRUNERS)
    ap.add_argument("--tag", default="bench", help="study name prefix (a new tag = new studies)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "pruners.json")
    return ap.parse_args(argv)


def run_params(base: dict[str, Any], args: argparse.Namespace, pruner: str, seed: int) -> dict[str, Any]:
    """The project's params with this run's tune settings (everything else as the project has it)."""
    params = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    params["tune"] = {**params.get("tune", {}), "pruner": pruner, "seed": seed, "trials": args.trials,
                      "prune_chunks": args.prune_chunks, "n_startup_trials": args.n_startup_trials,
                      "wilcoxon_p": args.wilcoxon_p, "refiners": list(args.refiners), "storage": ""}
    return params


def images_refined(trial: Any, n_images: int, pruner: str, chunks: int) -> int:
    """Images a trial scored: all of them when it completed, else up to the chunk where it was pruned."""
    from wsss.tuning import chunk_ends

    if trial.state.name == "COMPLETE":
        return n_images
    if not trial.intermediate_values:
        return 0
    if pruner == "wilcoxon":  # one report per image
        return len(trial.intermediate_values)
    return chunk_ends(n_images, chunks)[max(trial.intermediate_values)]


def summarise(study: Any, n_images: int, pruner: str, chunks: int, wall_s: float) -> dict[str, Any]:
    """One run's numbers, and its best-so-far curve against images refined and seconds since the first trial."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    t0 = trials[0].datetime_start
    best, cost, curve = float("-inf"), 0, []
    for t in trials:
        cost += images_refined(t, n_images, pruner, chunks)
        if t.state.name == "COMPLETE":
            best = max(best, t.value)
        curve.append({"trial": t.number, "state": t.state.name, "value": t.value, "images": cost,
                      "seconds": round((t.datetime_complete - t0).total_seconds(), 2),
                      "best": None if best == float("-inf") else best})
    states = [t.state.name for t in trials]
    return {"best_value": best, "wall_s": round(wall_s, 1), "trials_s": curve[-1]["seconds"], "trials": len(trials),
            "complete": states.count("COMPLETE"), "pruned": states.count("PRUNED"), "failed": states.count("FAIL"),
            "images_refined": cost, "full_cost_images": n_images * len(trials), "curve": curve}


def best_within(curve: list[dict[str, Any]], key: str, budget: float) -> float | None:
    """The best value a run had reached once it had spent at most ``budget`` of ``key``."""
    reached = [c["best"] for c in curve if c[key] <= budget and c["best"] is not None]
    return max(reached) if reached else None


def to_markdown(result: dict[str, Any]) -> str:
    """The result as markdown tables."""
    s = result["setup"]
    lines = [
        "# Median vs Wilcoxon pruner (`wsss tune crf`, val split only)", "",
        f"- variant `{s['variant']}`, {s['n_images']} val images, refiners {', '.join(s['refiners'])}",
        f"- budget {s['trials']} trials per run, seeds {s['seeds']}, {s['prune_chunks']} pruning checks per "
        f"trial, {s['n_startup_trials']} startup trials, Wilcoxon p < {s['wilcoxon_p']}",
        f"- machine: {result['machine']}", "",
        "| pruner | seed | best val IoU | wall s (trials s) | complete / pruned | images refined (% of unpruned) | "
        "best at the other's image count |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        other = r.get("best_at_other_cost")
        lines.append(
            f"| {r['pruner']} | {r['seed']} | {r['best_value']:.4f} | {r['wall_s']:.0f} ({r['trials_s']:.0f}) | {r['complete']} / "
            f"{r['pruned']} | {r['images_refined']} ({100 * r['images_refined'] / r['full_cost_images']:.0f} %) | "
            f"{'—' if other is None else f'{other:.4f}'} |")
    lines += ["", "| pruner | mean best val IoU | mean wall s | mean trials s | mean images refined |",
              "|---|---|---|---|---|"]
    for p, m in result["means"].items():
        lines.append(f"| {p} | {m['best_value']:.4f} | {m['wall_s']:.0f} | {m['trials_s']:.0f} | {m['images_refined']:.0f} |")
    lines += ["", f"Verdict: {result['verdict']}", ""]
    return "\n".join(lines)


def machine() -> str:
    """CPU model, usable cores and the load when the run starts."""
    return f"{hostinfo.describe(with_torch=False)}, load {os.getloadavg()[0]:.1f} at start"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import optuna

    from wsss.config import load_params
    from wsss.paths import Paths
    from wsss.tuning import default_storage

    args = parse_args(argv)
    project = args.project.resolve()
    base = yaml.safe_load((project / "params.yaml").read_text())
    paths = Paths(project)
    storage = default_storage(paths.study_dir(args.variant))
    result: dict[str, Any] = {"machine": machine(), "runs": []}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for seed in args.seeds:
        for pruner in args.pruners:
            pfile = project / f"params-{args.tag}-{pruner}-s{seed}.yaml"
            pfile.write_text(yaml.safe_dump(run_params(base, args, pruner, seed), sort_keys=False))
            load_params(pfile)  # strict check before spending minutes
            name = f"{args.tag}-{pruner}-s{seed}"
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "wsss", "tune", "crf", "--method", args.variant,
                                   "--study", name, "--params", str(pfile)],
                                  cwd=project, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if proc.returncode:
                raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
            study = optuna.load_study(study_name=name, storage=storage)
            n_images = json.loads((paths.study_dir(args.variant) / "study.json").read_text())["n_images"]
            row = {"pruner": pruner, "seed": seed, **summarise(study, n_images, pruner, args.prune_chunks, wall)}
            result["runs"].append(row)
            print(f"{name}: best {row['best_value']:.4f}, {row['complete']} complete / {row['pruned']} pruned, "
                  f"{row['images_refined']} images, {row['wall_s']:.0f} s", flush=True)
    result["setup"] = {"variant": args.variant, "n_images": n_images, "trials": args.trials, "seeds": args.seeds,
                       "prune_chunks": args.prune_chunks, "n_startup_trials": args.n_startup_trials,
                       "wilcoxon_p": args.wilcoxon_p, "refiners": args.refiners}
    by = {(r["pruner"], r["seed"]): r for r in result["runs"]}
    for r in result["runs"]:  # compare at the cost the other pruner spent on the same seed
        others = [o for (p, s), o in by.items() if s == r["seed"] and p != r["pruner"]]
        if others:
            r["best_at_other_cost"] = best_within(r["curve"], "images", others[0]["images_refined"])
    result["means"] = {}
    for p in args.pruners:
        rows = [r for r in result["runs"] if r["pruner"] == p]
        result["means"][p] = {k: sum(r[k] for r in rows) / len(rows) for k in ("best_value", "wall_s", "trials_s", "images_refined")}
    result["verdict"] = verdict(result["means"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(to_markdown(result))
    print(to_markdown(result))
    return result


def verdict(means: dict[str, dict[str, float]]) -> str:
    """Which pruner is better: a higher mean best value wins; within 0.002 IoU, the cheaper one."""
    if len(means) < 2:
        return "one pruner only"
    (a, ma), (b, mb) = means.items()
    if abs(ma["best_value"] - mb["best_value"]) > 0.002:
        win = a if ma["best_value"] > mb["best_value"] else b
        return f"{win}: higher best val IoU on the same trial budget"
    win = a if ma["images_refined"] <= mb["images_refined"] else b
    return f"{win}: the same best val IoU (within 0.002) for fewer images refined"


if __name__ == "__main__":
    main()
