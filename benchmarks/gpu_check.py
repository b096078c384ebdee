"""The GPU check: the whole weakly-supervised pipeline on the dev data, timed, on one CUDA machine.

Two sub-commands (``benchmarks/gpu_check.sh`` is the entry point on the GPU machine):

    python benchmarks/gpu_check.py stage-data [--src ../shared/data] [--dest .gpu-data] [--max-side 256]
        # here: copy the dev data the check needs into a git-ignored folder that travels (JPEGs
        # re-encoded with the longest side <= --max-side, trimaps resized with nearest neighbour)
    python benchmarks/gpu_check.py run --out DIR [--profile gpu-check] [--data .gpu-data] [--workdir DIR]
        # there: prepare -> validate -> train-classifier -> train-ccam -> make-cams -> tune crf ->
        # make-pseudo -> train-unet -> evaluate (dvc.yaml's order; benchmarks/quality.py's steps, which
        # run each `wsss` command as a subprocess), then DIR/gpu_check.json + .md: every step's wall
        # time and exit code, the scores, the machine and GPU, the profile's params

No dvc on the GPU machine: the stages are called in ``dvc.yaml`` order by this script. Nothing is
reimplemented: the steps, the scoring and the tables are ``quality.py``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import quality  # noqa: E402  (benchmarks/quality.py: the pipeline's steps and its result tables)

ROOTS = {"oxford-pet-dev": True, "oxford-pet-dev-clsonly": False}  # folder -> has trimaps
BUDGET_S = 8 * 60
# The dev data: ../shared/data beside the checkout (a worktree may sit one level deeper).
DEV_DATA = next((d / "shared" / "data" for d in REPO.parents if (d / "shared" / "data").is_dir()),
                REPO.parent / "shared" / "data")  # the whole check must end inside this on one H200


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("stage-data", help="copy (and downscale) the dev data into a folder that travels")
    st.add_argument("--src", type=Path, default=DEV_DATA, help=f"default: {DEV_DATA}")
    st.add_argument("--dest", type=Path, default=REPO / ".gpu-data")
    st.add_argument("--max-side", type=int, default=256, help="longest side of the staged images (0 = as is)")
    st.add_argument("--quality", type=int, default=85, help="JPEG quality of re-encoded images")
    st.add_argument("--every", type=int, default=1,
                    help="keep every N-th image of each split file (1 = all; >1: a small set for a CPU check)")
    rn = sub.add_parser("run", help="run the pipeline and write DIR/gpu_check.json + .md")
    rn.add_argument("--out", type=Path, required=True, help="output folder (created)")
    rn.add_argument("--profile", default="gpu-check", help="a benchmarks/profiles/ name or a YAML file")
    rn.add_argument("--data", type=Path, default=REPO / ".gpu-data", help="the staged data (stage-data --dest)")
    rn.add_argument("--workdir", type=Path, default=None, help="work project (default: a new temp folder, kept)")
    rn.add_argument("--device", default=None, help="base.device (default: the profile's; cuda when available)")
    return ap.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# stage-data (here)


def _atomic_copy(write: Any, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    write(tmp)
    os.replace(tmp, dest)


def stage_data(src: Path, dest: Path, max_side: int, jpeg_quality: int, every: int = 1) -> dict[str, Any]:
    """Copy the Oxford-layout dev roots under ``src`` into ``dest``: split files (every ``every``-th line:
    a stride keeps every breed group of the sorted lists), images (JPEG) and trimaps (PNG, nearest
    neighbour) of the listed names, resized so the longest side is at most ``max_side``."""
    from PIL import Image

    if not src.is_dir():
        raise SystemExit(f"{src}: no such folder (the dev data, ../shared/data beside the checkout)")
    counts: dict[str, int] = {}
    for folder, has_trimaps in ROOTS.items():
        sroot, droot = src / folder / "oxford-iiit-pet", dest / folder / "oxford-iiit-pet"
        if not (sroot / "annotations" / "trainval.txt").is_file():
            raise SystemExit(f"{sroot}: not an Oxford-layout root (no annotations/trainval.txt)")
        subdirs = ["images", "annotations"] + (["annotations/trimaps"] if has_trimaps else [])
        for sub in subdirs:
            (droot / sub).mkdir(parents=True, exist_ok=True)
        names: set[str] = set()
        for name in ("trainval.txt", "test.txt"):
            lines = [ln for ln in (sroot / "annotations" / name).read_text().splitlines()
                     if ln.strip() and not ln.startswith("#")][::max(1, every)]
            names |= {ln.split()[0] for ln in lines}
            (droot / "annotations" / name).write_text("\n".join(lines) + "\n")
        n = 0
        for kind, pattern, resample in (("images", "*.jpg", Image.Resampling.BILINEAR),
                                        ("annotations/trimaps", "*.png", Image.Resampling.NEAREST)):
            if kind != "images" and not has_trimaps:
                continue
            for path in sorted((sroot / kind).glob(pattern)):
                if path.stem not in names:
                    continue
                out = droot / kind / path.name
                if out.exists():
                    n += 1
                    continue
                with Image.open(path) as im:
                    im.load()
                    if max_side and max(im.size) > max_side:
                        s = max_side / max(im.size)
                        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), resample)
                    if kind == "images":
                        rgb = im.convert("RGB")
                        _atomic_copy(lambda p, rgb=rgb: rgb.save(p, "JPEG", quality=jpeg_quality), out)
                    else:
                        _atomic_copy(lambda p, im=im: im.save(p, "PNG", optimize=True), out)
                n += 1
        counts[folder] = n
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"{dest}: {counts} files, {size / 2**20:.1f} MiB (max side {max_side or 'as is'})")
    return {"files": counts, "bytes": size}


# --------------------------------------------------------------------------------------------------
# run (there)


class CheckRunner(quality.Runner):
    """quality.py's runner with ``validate`` right after ``prepare`` of the training project, as in
    dvc.yaml (quality.py skips it)."""

    def __call__(self, name: str, *args: str, project: str = "train") -> None:
        super().__call__(name, *args, project=project)
        if name == "prepare":
            super().__call__("validate", "validate", project=project)


def gpu_info() -> dict[str, Any]:
    """The CUDA device as torch sees it (empty without one)."""
    import torch

    if not torch.cuda.is_available():
        return {"cuda": False}
    p = torch.cuda.get_device_properties(0)
    return {"cuda": True, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
            "capability": f"{p.major}.{p.minor}", "count": torch.cuda.device_count(),
            "bf16": bool(torch.cuda.is_bf16_supported()), "torch": torch.__version__,
            "cuda_version": torch.version.cuda}


def versions() -> dict[str, str]:
    """Versions of the packages the pipeline imports (the GPU image's, or the carried wheels')."""
    from importlib import metadata

    out = {}
    for name in ("torch", "torchvision", "numpy", "pandas", "pyarrow", "opencv-python-headless", "mlflow-skinny",
                 "mlflow", "optuna", "great-expectations", "segmentation-models-pytorch", "pydensecrf2", "sqlalchemy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def stage_seconds(steps: list[dict[str, Any]]) -> dict[str, float]:
    """Wall time summed per ``wsss`` command (its first word or two: ``tune crf``, ``train-unet``)."""
    out: dict[str, float] = {}
    for s in steps:
        words = s["command"].split()[1:]
        key = " ".join(words[:2]) if words and words[0] == "tune" else words[0]
        out[key] = round(out.get(key, 0.0) + s["seconds"], 1)
    return out


def to_markdown(check: dict[str, Any], quality_md: str) -> str:
    """The check's header (machine, GPU, budget, time per stage) above quality.py's tables."""
    g = check["gpu"]
    gpu = f"{g['name']} ({g['memory_gib']} GiB, sm {g['capability']}, bf16 {g['bf16']})" if g.get("cuda") else "none (CPU)"
    lines = [f"# wsss GPU check ({check['profile']} profile)", "",
             f"- GPU: {gpu}; {check['machine']}",
             f"- total: {check['total_seconds']:.0f} s of a {BUDGET_S} s budget "
             f"({'within' if check['within_budget'] else 'OVER'}); exit code {check['rc']}",
             f"- packages: {', '.join(f'{k} {v}' for k, v in check['versions'].items())}", "",
             "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in check["stage_seconds"].items()]
    if check.get("error"):
        lines += ["", "**failed:**", "", "```", check["error"], "```"]
    return "\n".join(lines) + "\n\n" + quality_md.split("\n", 1)[1]


def run_check(args: argparse.Namespace) -> int:
    """The pipeline through quality.py's steps; DIR/gpu_check.json + .md (also after a failed step)."""
    out_dir = args.out.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    data = args.data.resolve()
    train_root = data / "oxford-pet-dev" / "oxford-iiit-pet"
    extra = data / "oxford-pet-dev-clsonly" / "oxford-iiit-pet"
    for root in (train_root, extra):
        if not (root / "annotations" / "trainval.txt").is_file():
            print(f"error: {root}: no staged data (run `python benchmarks/gpu_check.py stage-data` first)",
                  file=sys.stderr)
            return 2
    profile = quality.load_profile(args.profile)
    device = args.device
    if device is None and not profile.get("params", {}).get("base", {}).get("device"):
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    plan = quality.build_plan(profile, train_root, [extra], device)
    # Not under --out: the device tool brings back at most 8 files from there (the six this writes).
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="wsss-gpu-check-"))).resolve()
    quality.write_params(work, plan.params)
    runner = CheckRunner(work, work / "quality.log")
    qual_json = out_dir / "quality.json"
    start = time.perf_counter()
    result: dict[str, Any] = {"profile": args.profile, "profile_file": quality.shown(profile["source"]),
                              "train_root": quality.shown(train_root), "extra_train_roots": [quality.shown(extra)],
                              "eval_root": None, "workdir": str(work), "out": str(qual_json),
                              "machine": quality.machine(), "imagenet": plan.imagenet,
                              "imagenet_summary": "yes: " + ", ".join(k for k, v in plan.imagenet.items() if v)
                              if any(plan.imagenet.values()) else "no (random init)",
                              "params": quality.shown_params(plan.params), "maps": plan.variants}
    rc, error = 0, None
    try:
        step_maps: dict[str, dict[str, Any]] = {}
        eval_project, best, val_scores = quality.run_pipeline(plan, work, None, runner, step_maps)
        scores = quality.collect(eval_project, plan, best, val_scores, work)
        result.update(scores, selected_variant=best, val_pseudo_iou={k: quality.pct(v) for k, v in val_scores.items()},
                      eval={"description": "the dev root's official test split",
                            "n_images": scores["rows"][0].get("n_images")})
    except quality.StepFailed as exc:
        rc, error = 1, str(exc)
        print(f"error: {exc}", file=sys.stderr)
        result.update(error=error, eval={"description": "(failed)"})
    total = round(time.perf_counter() - start, 1)
    result.update(steps=runner.steps, total_seconds=total)
    result.setdefault("summary", {})
    result["summary_line"] = quality.summary_line(result["summary"])
    qual_json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    quality_md = quality.to_markdown(result)
    check = {"profile": args.profile, "rc": rc, "error": error, "total_seconds": total, "budget_seconds": BUDGET_S,
             "within_budget": total <= BUDGET_S, "gpu": gpu_info(), "machine": result["machine"],
             "versions": versions(), "stage_seconds": stage_seconds(runner.steps), "steps": runner.steps,
             "summary": result["summary"], "summary_line": result["summary_line"], "params": result["params"],
             "rows": result.get("rows", [])}
    (out_dir / "gpu_check.json").write_text(json.dumps(check, indent=2, default=str) + "\n")
    (out_dir / "gpu_check.md").write_text(to_markdown(check, quality_md))
    shutil.copyfile(work / "quality.log", out_dir / "wsss.log")
    print(f"total {total:.0f} s (budget {BUDGET_S} s); {out_dir}/gpu_check.json", flush=True)
    print(result["summary_line"], flush=True)
    return rc


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    if args.cmd == "stage-data":
        stage_data(args.src.resolve(), args.dest.resolve(), args.max_side, args.quality, args.every)
        return 0
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
