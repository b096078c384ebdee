"""How cost grows: wall time and peak memory of each stage at 1x, 4x and 16x the synthetic images and at one
larger image size, plus one epoch of each training stage (on demand; not a test).

    python benchmarks/scaling.py [--quick] [--workdir DIR] [--out benchmarks/results/scaling.json]

One work project per size (``params.yaml`` = the embedded default with ``synthetic`` resized); every stage
is its ``wsss`` command in a subprocess. The training stages (``pretrain``, ``train-classifier``,
``train-ccam``, ``train-unet --masks gt``) run one epoch each in the 1x project; the other projects use
its models (a link to its ``models/``), so the data stages see the same weights at every size:

    generate-synthetic -> prepare -> validate -> make-cams (cam, ccam) -> make-pseudo (--no-tuned)
    -> evaluate --pseudo / --model unet-gt -> predict (every test image)

Per stage: wall seconds, peak RSS of the largest process (``wait4``'s ``ru_maxrss``: the stage process or
any of its children) and the peak of the summed RSS of its process tree (sampled every 50 ms with psutil:
worker pools count once per worker). A streaming stage is *flat* when its 16x peak exceeds its 1x peak by
at most max(64 MiB, 15%). The JSON records the load average before and after, and the machine.
Full mode: 160/80/40 trainval/test/background images at 128 px (the embedded default) x 1, 4, 16 and 2x
the side at 1x; ``--quick``: 40/20/10 at 64 px, same factors (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import hostinfo  # the sibling module (benchmarks/ is on sys.path when a script runs)
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FACTORS = (1, 16, 4)  # run order: the flatness verdict (1x vs 16x) first; the tables sort by size
# Stages whose memory must not grow with the number of images (they stream shards, masks, images).
STREAMING = ("make-cams cam", "make-cams ccam", "make-pseudo", "evaluate pseudo", "evaluate unet", "predict")
DATA_STAGES = ("generate-synthetic", "prepare", "validate") + STREAMING
TRAINING = ("pretrain", "train-classifier", "train-ccam", "train-unet")
FLAT_ABS_MIB, FLAT_REL = 64.0, 0.15


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller base set (40/20/10 images at 64 px)")
    ap.add_argument("--workdir", type=Path, default=None, help="work projects (default: a new temp folder)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "scaling.json", help="JSON; .md beside it")
    ap.add_argument("--sizes", default="", help="comma-separated subset of x1,x16,x4,larger (default: all)")
    return ap.parse_args(argv)


def base_sizes(quick: bool) -> dict[str, int]:
    """The 1x synthetic set."""
    if quick:
        return {"n_trainval": 40, "n_test": 20, "n_background": 10, "image_size": 64}
    return {"n_trainval": 160, "n_test": 80, "n_background": 40, "image_size": 128}


def project_params(default: dict[str, Any], sizes: dict[str, int], quick: bool) -> dict[str, Any]:
    """The embedded default with ``synthetic`` resized and every training stage at one epoch."""
    p = copy.deepcopy(default)
    p["synthetic"].update(sizes)
    p["pretrain"]["epochs"] = 1
    p["train_classifier"]["epochs"] = 1
    p["train_ccam"]["epochs"] = 1
    n_train = round(sizes["n_trainval"] * (1 - p["prepare"]["val_fraction"]))
    p["train_unet"]["steps"] = max(1, math.ceil(n_train / p["train_unet"]["batch_size"]))  # one epoch
    if quick:  # the 64 px images: smaller inputs, as the smoke settings of the tests do
        p["pretrain"]["input_size"] = 32
        p["train_classifier"]["input_size"] = 64
        p["train_ccam"].update(resize=72, input_size=64, polarity_images=16)
        p["train_unet"]["input_size"] = 64
    return p


def _tree_rss(proc: Any) -> int:
    """Summed RSS of a psutil process and its descendants (0 once gone)."""
    import psutil

    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


def run_stage(root: Path, log: Path, *args: str) -> dict[str, Any]:
    """One ``wsss`` command in ``root``: wall seconds, exit code, peak RSS (largest process, process tree)."""
    import psutil

    cmd = [sys.executable, "-m", "wsss", *args]
    with open(log, "a") as fh:
        fh.write(f"\n===== wsss {' '.join(args)}\n")
        fh.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=root, stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, "COLUMNS": "160"})
        peak_tree, done = [0], threading.Event()

        def sample() -> None:
            ps = psutil.Process(proc.pid)
            while not done.is_set():
                peak_tree[0] = max(peak_tree[0], _tree_rss(ps))
                done.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    rc = proc.returncode
    return {"command": "wsss " + " ".join(args), "seconds": round(seconds, 2), "rc": rc,
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "peak_tree_rss_mib": round(peak_tree[0] / 2**20, 1)}


def stages_for(first: bool) -> list[tuple[str, list[str]]]:
    """(name, wsss args) in pipeline order; the training stages only in the 1x project."""
    out: list[tuple[str, list[str]]] = [("generate-synthetic", ["generate-synthetic"]), ("prepare", ["prepare"]),
                                        ("validate", ["validate"])]
    if first:
        out += [("pretrain", ["pretrain"]), ("train-classifier", ["train-classifier", "--labels", "species"]),
                ("train-ccam", ["train-ccam", "--init", "none"]), ("train-unet", ["train-unet", "--masks", "gt"])]
    out += [("make-cams cam", ["make-cams", "--method", "cam", "--model", "classifier-species"]),
            ("make-cams ccam", ["make-cams", "--method", "ccam", "--model", "ccam-none"]),
            ("make-pseudo", ["make-pseudo", "--method", "cam_classifier-species", "--no-tuned"]),
            ("evaluate pseudo", ["evaluate", "--pseudo", "cam_classifier-species"]),
            ("evaluate unet", ["evaluate", "--model", "unet-gt"]),
            ("predict", ["predict", "data/raw/synthetic/oxford-iiit-pet/images", "--model", "models/unet-gt",
                         "--out", "predictions"])]
    return out


def image_count(root: Path) -> dict[str, int]:
    """Images the project's prepare kept, by split (from its manifest)."""
    import pandas as pd

    df = pd.read_parquet(root / "data" / "prepared" / "manifest.parquet")
    return {str(k): int(v) for k, v in df["split"].value_counts().items()}


def flatness(rows: dict[str, dict[str, dict[str, Any]]], sizes: list[str]) -> dict[str, dict[str, Any]]:
    """For each streaming stage: peak RSS at 1x and at the largest factor, growth, flat or not."""
    counts = sorted((int(s[1:]), s) for s in sizes if s[:1] == "x" and s[1:].isdigit())  # x1, x4, x16
    if len(counts) < 2:
        return {stage: {"flat": None} for stage in STREAMING}
    lo, hi = counts[0][1], counts[-1][1]
    out = {}
    for stage in STREAMING:
        a, b = rows.get(lo, {}).get(stage), rows.get(hi, {}).get(stage)
        if not a or not b or a["rc"] or b["rc"]:
            out[stage] = {"flat": None}
            continue
        res = {}
        for key in ("peak_rss_mib", "peak_tree_rss_mib"):
            growth = b[key] - a[key]
            res[key] = {"x1": a[key], hi: b[key], "growth_mib": round(growth, 1),
                        "flat": growth <= max(FLAT_ABS_MIB, FLAT_REL * a[key])}
        res["flat"] = all(v["flat"] for v in res.values())
        out[stage] = res
    return out


def to_markdown(result: dict[str, Any]) -> str:
    """Tables: seconds and peak RSS per stage and size, then the flatness verdicts."""
    sizes = sorted(result["projects"], key=lambda s: (len(s.split()), int(s.split()[0][1:])))  # x1 x4 x16, then larger
    lines = [f"# wsss scaling ({'quick' if result['quick'] else 'full'} mode)", "",
             f"- machine: {result['machine']}",
             f"- load average (1, 5, 15 min) before: {result['loadavg_before']}, after: {result['loadavg_after']}",
             f"- total: {result['total_seconds'] / 60:.1f} min", "",
             "| size | synthetic trainval / test / background | image px | prepared images by split |", "|---|---|---|---|"]
    for s in sizes:
        pr = result["projects"][s]
        syn = pr["synthetic"]
        lines.append(f"| {s} | {syn['n_trainval']} / {syn['n_test']} / {syn['n_background']} | {syn['image_size']} | "
                     f"{pr.get('images', {})} |")
    lines += ["", "Wall seconds (peak RSS of the largest process / of the process tree, MiB):", "",
              "| stage | " + " | ".join(sizes) + " |", "|---|" + "---|" * len(sizes)]
    stages = list(dict.fromkeys(st for s in sizes for st in result["rows"][s]))
    for st in stages:
        cells = []
        for s in sizes:
            r = result["rows"][s].get(st)
            cells.append("—" if r is None else (f"{r['seconds']:.1f} s ({r['peak_rss_mib']:.0f} / "
                                                f"{r['peak_tree_rss_mib']:.0f})" + ("" if r["rc"] == 0 else f" rc {r['rc']}")))
        lines.append(f"| {st} | " + " | ".join(cells) + " |")
    lines += ["", f"Streaming stages: flat = the 16x peak within max({FLAT_ABS_MIB:.0f} MiB, {FLAT_REL:.0%}) of the 1x peak.", "",
              "| stage | largest process 1x → 16x MiB | process tree 1x → 16x MiB | flat |", "|---|---|---|---|"]
    for st, f in result["flatness"].items():
        if f.get("flat") is None:
            lines.append(f"| {st} | — | — | not measured |")
            continue
        a, b = f["peak_rss_mib"], f["peak_tree_rss_mib"]
        hi = next(k for k in a if k not in ("x1", "growth_mib", "flat"))
        lines.append(f"| {st} | {a['x1']:.0f} → {a[hi]:.0f} ({a['growth_mib']:+.0f}) | {b['x1']:.0f} → {b[hi]:.0f} "
                     f"({b['growth_mib']:+.0f}) | {'yes' if f['flat'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def machine() -> str:
    """CPU model and usable cores."""
    return hostinfo.describe(with_torch=False)


def main(argv: list[str] | None = None) -> int:
    """Run every size; write the JSON and markdown; exit 1 when a stage failed."""
    args = parse_args(argv)
    default = yaml.safe_load((REPO / "params.yaml").read_text())
    base = base_sizes(args.quick)
    sizes: dict[str, dict[str, int]] = {f"x{f}": {**base, **{k: base[k] * f for k in ("n_trainval", "n_test", "n_background")}}
                                        for f in FACTORS}
    sizes[f"x1 {base['image_size'] * 2}px"] = {**base, "image_size": base["image_size"] * 2}
    if args.sizes:
        keep = {k.strip() for k in args.sizes.split(",")}
        sizes = {k: v for k, v in sizes.items() if k in keep or (k.startswith("x1 ") and "larger" in keep) or k == "x1"}
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="wsss-scaling-"))).resolve()
    result: dict[str, Any] = {"quick": args.quick, "machine": machine(), "loadavg_before": [round(x, 2) for x in os.getloadavg()],
                              "workdir": str(work), "projects": {}, "rows": {}}
    start = time.perf_counter()
    first_models: Path | None = None
    failed = False
    for name, syn in sizes.items():
        root = work / name.replace(" ", "-")
        root.mkdir(parents=True, exist_ok=True)
        params = project_params(default, syn, args.quick)
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        if first_models is not None and not (root / "models").exists():
            (root / "models").symlink_to(first_models, target_is_directory=True)
        result["projects"][name] = {"synthetic": syn, "root": str(root)}
        rows: dict[str, dict[str, Any]] = {}
        for stage, cmd in stages_for(first_models is None):
            row = run_stage(root, work / "scaling.log", *cmd)
            rows[stage] = row
            print(f"[{time.strftime('%H:%M:%S')}] {name:>10} {stage:<18} {row['seconds']:7.1f} s  "
                  f"{row['peak_rss_mib']:6.0f} / {row['peak_tree_rss_mib']:6.0f} MiB  rc {row['rc']}", flush=True)
            if row["rc"] != 0:
                failed = True
                break
        result["rows"][name] = rows
        if "prepare" in rows and rows["prepare"]["rc"] == 0:
            result["projects"][name]["images"] = image_count(root)
        if first_models is None:
            first_models = root / "models"
        write(result, args.out.resolve(), start)  # after every size: an interrupted run keeps what it measured
        if failed:
            break
    print(to_markdown(result))
    return 1 if failed else 0


def write(result: dict[str, Any], out: Path, start: float) -> None:
    """The JSON and markdown of what has run so far (atomically: temp file, then rename)."""
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    result["flatness"] = flatness(result["rows"], list(result["rows"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out, json.dumps(result, indent=2) + "\n"), (out.with_suffix(".md"), to_markdown(result))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
