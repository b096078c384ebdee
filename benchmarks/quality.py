"""Segmentation quality of the whole pipeline on real data (on demand; not a test).

Builds a work project (``params.yaml`` = a profile from ``benchmarks/profiles/`` merged onto the
real-data settings) and drives the ``wsss`` commands in it as subprocesses, timing each step:

    prepare -> train-classifier / train-ccam -> make-cams -> tune crf -> make-pseudo
    -> train-unet --masks best / same-best / gt / prior-grabcut (label-free: rectangle-GrabCut masks)
       (every U-Net: train_unet.steps steps)
    -> self-train --round 1..self_train.rounds -> self-train-champion
    -> evaluate --pseudo <variant> (each) / --model unet-best / unet-same-best / unet-gt /
       unet-prior-grabcut / unet-selftrain-r<N> / --baselines

The pseudo-mask variant for the weakly-supervised U-Net is the product's own choice (``train-unet --masks
best``: the best pseudo-mask fg IoU on the trainval images with GT, never on the evaluation images); that
U-Net is self-training's round 0, and the champion round is chosen on the val split. Everything is scored on the evaluation images: the
train root's official test split, or every image of ``--eval-root`` (prepared as a second project whose
test split is all its images, using the first project's models and tuned refiners).

    python benchmarks/quality.py --train-root /data/oxford-iiit-pet [--extra-train-root ROOT]... \\
        [--eval-root ROOT] [--profile cpu|gpu|smoke|FILE.yaml] [--workdir DIR] --out FILE.json

Writes FILE.json and FILE.md, and the table of what each step gives (``FILE-steps.md`` / ``FILE-steps.json``:
label-free baselines, each map, the ensemble without and with the label-free priors as members, the
pseudo-masks after the tuned refiner, the U-Net of self-training rounds 0-2, the supervised U-Net at equal
steps; each with its val and test fg IoU and what chose it, on val only); prints a table and, as its last
line,
``pseudo_iou=… wsss_unet_iou=… supervised_unet_iou=… ellipse_iou=… grabcut_iou=… label_free_unet_iou=…
same_images_unet_iou=… wsss_unet_steps=… same_images_unet_steps=… supervised_unet_steps=…
label_free_unet_steps=…`` (fg IoU in %; optimiser steps; label_free is the U-Net trained on the label-free
rectangle-GrabCut masks, same schedule).
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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hostinfo  # the sibling module (benchmarks/ is on sys.path when a script runs)
import yaml

from wsss.io import read_json, write_text

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PROFILES = HERE / "profiles"
SUMMARY_KEYS = ("pseudo_iou", "wsss_unet_iou", "supervised_unet_iou", "ellipse_iou", "grabcut_iou",
                "label_free_unet_iou", "same_images_unet_iou", "wsss_unet_steps", "same_images_unet_steps",
                "supervised_unet_steps", "label_free_unet_steps")
# The label-free pipeline: the prior-grabcut map's masks (the rectangle-GrabCut baseline) -> a U-Net.
LABEL_FREE = "prior-grabcut"
PRIORS = ("prior-grabcut", "prior-ellipse")
ENSEMBLE = "ensemble"
# The ensemble is built twice: on the profile's maps, then with the label-free priors as members too
# (its weights tuned on val each time); the second one is the "ensemble" variant the U-Net may train on, so
# only it is made into pseudo-masks for every train image.
ENSEMBLE_KINDS = ("without priors", "with priors")
# ``train-unet --masks best``: the U-Net on the product's selected pseudo-masks (models/unet-best), which
# is also self-training's round 0.
BEST = "best"
SELF_TRAIN_ROUNDS = 2  # self_train.rounds unless the profile sets it
NOT_RUN = "not run"


# --------------------------------------------------------------------------------------------------
# configuration


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-root", type=Path, required=True, help="Oxford-layout root with trimaps")
    ap.add_argument("--extra-train-root", type=Path, action="append", default=[],
                    help="label-only Oxford-layout root for the weakly-supervised stages (repeatable)")
    ap.add_argument("--eval-root", type=Path, default=None,
                    help="score on every image of this Oxford-layout root (default: the train root's test split)")
    ap.add_argument("--profile", default="cpu", help="cpu, gpu, smoke, or a profile YAML file")
    ap.add_argument("--workdir", type=Path, default=None, help="work project folder (default: a new temp folder)")
    ap.add_argument("--device", default=None, help="base.device for every stage (default: the profile's / auto)")
    ap.add_argument("--out", type=Path, required=True, help="JSON result; the markdown goes next to it (.md)")
    return ap.parse_args(argv)


def load_profile(name: str) -> dict[str, Any]:
    """A profile by name (``benchmarks/profiles/<name>.yaml``) or path."""
    path = Path(name)
    if not path.is_file():
        path = PROFILES / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES.glob("*.yaml")))
        raise SystemExit(f"profile {name!r} not found (known: {known}, or a path to a YAML file)")
    data = yaml.safe_load(path.read_text()) or {}
    unknown = set(data) - {"imagenet", "steps", "params"}
    if unknown:
        raise SystemExit(f"{path}: unknown top-level key(s) {sorted(unknown)}; valid: imagenet, steps, params")
    data.setdefault("imagenet", "auto")
    data.setdefault("params", {})
    steps = data.setdefault("steps", {})
    steps.setdefault("classifiers", ["species"])
    steps.setdefault("ccam_inits", ["none"])
    steps.setdefault("maps", ["cam:classifier-species", "ccam:ccam-none"])
    steps.setdefault("tune_trials", 8)
    data["source"] = str(path)
    return data


def shown(path: str | Path | None) -> str | None:
    """``path`` as a result file records it: relative to the repository root when it lies inside the
    repository or beside it (``../shared/data/...``), else as given, so results name no checkout path."""
    if path is None:
        return None
    resolved = Path(path).resolve()
    return os.path.relpath(resolved, REPO) if resolved.is_relative_to(REPO.parent) else str(path)


def shown_params(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with the data roots of ``base`` passed through :func:`shown` (the copy a result keeps)."""
    out = copy.deepcopy(params)
    base = out.get("base", {})
    for key in ("data_root", "background_root"):
        if key in base:
            base[key] = shown(base[key])
    if "extra_roots" in base:
        base["extra_roots"] = [shown(r) for r in base["extra_roots"]]
    return out


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``over`` recursively (mappings merged, everything else replaced); new dict."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def imagenet_available(arch: str) -> bool:
    """Whether torchvision's cache holds the ImageNet checkpoint of ``arch`` (no download is tried)."""
    try:
        from wsss.models.backbone import imagenet_cache_file

        return imagenet_cache_file(arch).is_file()
    except Exception:  # noqa: BLE001 - an unknown arch or a broken cache just means "not available"
        return False


@dataclass
class Plan:
    """What quality.py runs: the work project's params and the commands' variants."""

    params: dict[str, Any]
    classifiers: list[str]
    ccam_inits: list[str]
    maps: list[tuple[str, str]]  # (method, model)
    tune_trials: int
    imagenet: dict[str, bool] = field(default_factory=dict)

    @property
    def variants(self) -> list[str]:
        """Map variants ``<method>_<model>``."""
        return [f"{m}_{n}" for m, n in self.maps]

    @property
    def rounds(self) -> list[int]:
        """The self-training rounds after round 0: 1..``self_train.rounds``."""
        return list(range(1, int(self.params["self_train"]["rounds"]) + 1))


def build_plan(profile: dict[str, Any], train_root: Path, extra_roots: list[Path], device: str | None = None,
               imagenet_check: Any = imagenet_available) -> Plan:
    """Merge the profile onto the real-data settings and decide on ImageNet weights.

    With ``imagenet: auto`` and the weights cached, the classifiers and the U-Net encoder start from
    ImageNet and a CCAM ``init: none`` becomes ``imagenet`` (its maps' model name follows).
    """
    real = {"base": {"dataset": "oxford-pet", "data_root": str(Path(train_root).resolve()),
                     "extra_roots": [str(Path(r).resolve()) for r in extra_roots], "background_root": None}}
    params = deep_merge(profile.get("params", {}), real)
    params.setdefault("self_train", {}).setdefault("rounds", SELF_TRAIN_ROUNDS)
    if device:
        params["base"]["device"] = device
    steps = profile["steps"]
    maps = []
    for item in steps["maps"]:
        method, sep, model = str(item).partition(":")
        if not sep or not method or not model:
            raise SystemExit(f"profile steps.maps entry {item!r}: expected <method>:<model>, e.g. cam:classifier-species")
        maps.append((method, model))
    plan = Plan(params, list(steps["classifiers"]), list(steps["ccam_inits"]), maps, int(steps["tune_trials"]))
    use = profile.get("imagenet", "auto")
    if use not in ("auto", "never"):
        raise SystemExit(f"profile imagenet: {use!r}; valid: auto, never")
    cls_arch = params.get("train_classifier", {}).get("arch", "resnet50")
    ccam_arch = params.get("train_ccam", {}).get("arch", "resnet50")
    unet = params.get("train_unet", {})
    unet_arch = unet.get("encoder", "resnet34") if unet.get("architecture", "smp") == "smp" else None
    plan.imagenet = {
        "classifier": use == "auto" and imagenet_check(cls_arch),
        "ccam": use == "auto" and imagenet_check(ccam_arch),
        "unet": use == "auto" and unet_arch is not None and unet_arch.startswith("resnet") and imagenet_check(unet_arch),
    }
    if plan.imagenet["classifier"]:
        params.setdefault("train_classifier", {})["weights"] = "imagenet"
    if plan.imagenet["unet"]:
        params.setdefault("train_unet", {})["encoder_weights"] = "imagenet"
    if plan.imagenet["ccam"]:
        plan.ccam_inits = ["imagenet" if i == "none" else i for i in plan.ccam_inits]
        plan.maps = [(m, "ccam-imagenet" if n == "ccam-none" else n) for m, n in plan.maps]
    return plan


# --------------------------------------------------------------------------------------------------
# running


@dataclass
class Runner:
    """Runs ``wsss`` commands in a project folder and records each step's wall time."""

    root: Path
    log: Path
    steps: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, name: str, *args: str, project: str = "train") -> None:
        cmd = [sys.executable, "-m", "wsss", *args]
        print(f"[{time.strftime('%H:%M:%S')}] {name}: wsss {' '.join(args)}", flush=True)
        start = time.perf_counter()
        with open(self.log, "a") as fh:
            fh.write(f"\n===== {name} ({project}): wsss {' '.join(args)}\n")
            fh.flush()
            proc = subprocess.run(cmd, cwd=self.root, stdout=fh, stderr=subprocess.STDOUT,
                                  env={**os.environ, "COLUMNS": "160"})
        seconds = time.perf_counter() - start
        self.steps.append({"step": name, "project": project, "command": "wsss " + " ".join(args),
                           "seconds": round(seconds, 1), "rc": proc.returncode})
        print(f"    {seconds:.1f}s rc={proc.returncode}", flush=True)
        if proc.returncode != 0:
            tail = self.log.read_text().splitlines()[-25:]
            raise StepFailed(f"{name} failed (rc {proc.returncode}); last lines of {self.log}:\n" + "\n".join(tail))


class StepFailed(RuntimeError):
    """A ``wsss`` command exited non-zero."""


def write_params(root: Path, params: dict[str, Any]) -> None:
    """The work project's params.yaml (checked by wsss's strict loader at once)."""
    from wsss.config import params_from_dict

    root.mkdir(parents=True, exist_ok=True)
    params_from_dict(params, str(root / "params.yaml"))  # fail here, not in the first subprocess
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def split_names(root: Path) -> set[str]:
    """Image names listed in an Oxford-layout root's trainval.txt / test.txt."""
    names = set()
    for fname in ("trainval.txt", "test.txt"):
        path = Path(root) / "annotations" / fname
        if path.is_file():
            names |= {ln.split()[0] for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")}
    return names


def make_eval_root(src: Path, dest: Path) -> Path:
    """An Oxford-layout view of ``src`` whose test split is every listed image (images/trimaps linked)."""
    src = Path(src).resolve()
    root = dest / "oxford-iiit-pet"
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for link, target in ((root / "images", src / "images"), (root / "annotations" / "trimaps", src / "annotations" / "trimaps")):
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)
    lines = []
    for fname in ("trainval.txt", "test.txt"):
        path = src / "annotations" / fname
        if path.is_file():
            lines += [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    (root / "annotations" / "test.txt").write_text("\n".join(lines) + "\n")
    return root


def val_pseudo_iou(project: Path, variant: str) -> float:
    """Mean fg IoU of a variant's pseudo-masks on the validation split (the only selection data)."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    from wsss.evaluation import SegMeter

    df = pd.read_parquet(project / "data" / "prepared" / "manifest.parquet")
    val = df[(df["split"] == "val") & df["has_mask"].astype(bool) & ~df["is_background"].astype(bool)]
    meter, n = SegMeter(), 0
    for r in val.itertuples():
        mask = project / "masks" / variant / f"{r.id}.png"
        if mask.exists():
            meter.add(np.asarray(Image.open(mask)), np.asarray(Image.open(project / "data" / "prepared" / r.mask_path)))
            n += 1
    if n == 0:
        raise StepFailed(f"no val pseudo-masks for {variant} to select with")
    return meter.result().iou_mean


def tuned_val_iou(project: Path, variant: str) -> float:
    """The best trial's mean val fg IoU of the variant's last ``tune crf`` study: the score its pseudo-masks
    get on the val split, without making them for every train image."""
    study = read_json(project / "studies" / variant / "study.json")
    if study.get("best_value") is None:
        raise StepFailed(f"tune crf for {variant} finished no trial to score it with")
    return float(study["best_value"])


def val_map_iou(project: Path, variant: str) -> tuple[float, float, str]:
    """Mean fg IoU on the val split of a variant's stored maps at the decision threshold of its pseudo-mask
    configuration with no refiner (what ``evaluate --pseudo`` reports as ``before`` on test): the score, the
    threshold and where the configuration came from (``tuned`` on val, ``params``, or ``label-free``)."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    from wsss.cams import load_maps
    from wsss.config import load_params
    from wsss.evaluation import SegMeter
    from wsss.paths import Paths
    from wsss.pseudo import effective_config, plain_threshold_config
    from wsss.refine import threshold_mask

    paths = Paths(project)
    cfg, source = effective_config(load_params(project / "params.yaml"), paths, variant)
    plain = plain_threshold_config(cfg)
    df = pd.read_parquet(paths.manifest)
    val = df[(df["split"] == "val") & df["has_mask"].astype(bool) & ~df["is_background"].astype(bool)]
    maps = load_maps(paths.cams_dir(variant), set(val["id"]))
    meter = SegMeter()
    for r in val.itertuples():
        if r.id in maps:
            meter.add(threshold_mask(maps[r.id], plain), np.asarray(Image.open(paths.prepared / r.mask_path)))
    return meter.result().iou_mean, float(plain.threshold), source


def map_snapshot(project: Path, variant: str) -> dict[str, Any]:
    """What the steps table keeps of a map variant while it is on disk: its val score at the plain threshold,
    the refiner its pseudo-masks use, and (an ensemble) the tuned member weights."""
    iou, threshold, source = val_map_iou(project, variant)
    snap: dict[str, Any] = {"val_map_iou": iou, "threshold": threshold, "config": source}
    cams = project / "reports" / "cams" / f"{variant}.json"
    if cams.is_file():  # make-cams' val curve: the map at its own best threshold (chosen on those images)
        curve = read_json(cams)
        snap["val_best_iou"], snap["best_threshold"] = curve.get("best_iou_mean"), curve.get("best_threshold")
    crf = project / "reports" / "crf" / f"{variant}.yaml"
    if crf.is_file():
        snap["refiner"] = ((yaml.safe_load(crf.read_text()) or {}).get("pseudo") or {}).get("refiner")
    weights = project / "reports" / "ensemble-weights.yaml"
    if variant == ENSEMBLE and weights.is_file():
        snap["weights"] = (yaml.safe_load(weights.read_text()) or {}).get("ensemble", {}).get("weights")
    return snap


def set_ensemble_members(project: Path, members: list[str]) -> None:
    """Rewrite ``make_cams.ensemble_members`` (equal starting weights) in a work project's params.yaml."""
    params = yaml.safe_load((project / "params.yaml").read_text()) or {}
    cams = params.setdefault("make_cams", {})
    cams["ensemble_members"] = list(members)
    cams["ensemble_weights"] = [1.0] * len(members)
    write_params(project, params)


def has_command(root: Path, *command: str) -> bool:
    """Whether this checkout's ``wsss`` has ``command`` (e.g. ``self-train``, built in parallel)."""
    proc = subprocess.run([sys.executable, "-m", "wsss", *command, "--help"], cwd=root, capture_output=True)
    return proc.returncode == 0


def run_self_training(runner: Runner, work: Path, rounds: list[int]) -> str:
    """``wsss self-train --round N`` for each of ``rounds``, then ``self-train-champion``, when the CLI has
    them; returns what happened (for the steps table: a round that did not run is "not run", with why)."""
    if not has_command(work, "self-train"):
        return f"{NOT_RUN}: this wsss has no `self-train` command"
    for n in rounds:
        try:
            runner(f"self-train round {n}", "self-train", "--round", str(n))
        except StepFailed as exc:
            print(f"    self-training stopped: {exc}", file=sys.stderr)
            return f"{NOT_RUN} past round {n - 1}: `wsss self-train --round {n}` failed (see quality.log)"
    runner("self-train-champion", "self-train-champion")
    return "ran"


# --------------------------------------------------------------------------------------------------
# results


def pct(x: float | None) -> float:
    """A 0-1 score in percent (nan when absent)."""
    return float("nan") if x is None else 100.0 * float(x)


def summary_line(summary: dict[str, float | None]) -> str:
    """``key=value`` for each of :data:`SUMMARY_KEYS`: IoUs in % (1 decimal), ``*_steps`` as integers."""
    def fmt(k: str, v: float | None) -> str:
        if v is None or not math.isfinite(v):
            return "nan"
        return f"{int(v)}" if k.endswith("_steps") else f"{v:.1f}"

    return " ".join(f"{k}={fmt(k, summary.get(k))}" for k in SUMMARY_KEYS)


def steps_of(report: dict[str, Any]) -> float:
    """The optimiser steps a U-Net's eval report says it trained for (nan when absent)."""
    steps = (report.get("training") or {}).get("steps")
    return float(steps) if isinstance(steps, (int, float)) else float("nan")


def _unet_row(name: str, report: dict[str, Any]) -> dict[str, Any]:
    training = report.get("training") or {}
    return {"name": name, "kind": "unet", "iou": pct(report["iou_mean"]), "dice": pct(report["dice_mean"]),
            "miou": pct(report.get("miou")), "n_images": training.get("n_images"), "steps": training.get("steps")}


def collect(eval_project: Path, plan: Plan, best: str, val_scores: dict[str, float],
            work: Path | None = None) -> dict[str, Any]:
    """Read the evaluation reports into rows (IoU / Dice in %) and the summary. ``wsss_unet_iou`` is the
    self-training champion's (chosen on val; round 0 = ``unet-best`` unless a round beats it)."""
    work = eval_project if work is None else work
    reports = eval_project / "reports"
    rows: list[dict[str, Any]] = []
    for variant in plan.variants:
        rep = read_json(reports / "eval-pseudo" / f"{variant}.json")
        rows.append({"name": f"pseudo-masks {variant}" + (" (selected)" if variant == best else ""),
                     "kind": "pseudo", "variant": variant, "refiner": rep.get("refiner"),
                     "iou": pct(rep["after"]["iou_mean"]), "dice": pct(rep["after"]["dice_mean"]),
                     "iou_before_refine": pct(rep["before"]["iou_mean"]), "val_iou": pct(val_scores.get(variant)),
                     "n_images": rep.get("n_images")})
    wsss_unet = read_json(reports / "eval" / f"{BEST}.json")
    same_unet = read_json(reports / "eval" / f"same-{BEST}.json")
    gt_unet = read_json(reports / "eval" / "gt.json")
    base = read_json(reports / "eval" / "baselines.json")
    if best == ENSEMBLE:  # the rows above are the profile's maps; the selected ensemble has priors as members
        rep = read_json(reports / "eval-pseudo" / f"{ENSEMBLE}.json")
        rows.append({"name": f"pseudo-masks {ENSEMBLE} (with priors) (selected)", "kind": "pseudo", "variant": ENSEMBLE,
                     "refiner": rep.get("refiner"), "iou": pct(rep["after"]["iou_mean"]),
                     "dice": pct(rep["after"]["dice_mean"]), "iou_before_refine": pct(rep["before"]["iou_mean"]),
                     "val_iou": pct(val_scores.get(ENSEMBLE)), "n_images": rep.get("n_images")})
    rows.append(_unet_row(f"U-Net on pseudo-masks ({best}), all train images", wsss_unet))
    champion = self_training_champion(work, eval_project)
    if champion is not None and champion["round"] > 0:
        wsss_unet = champion["eval"]
        rows.append(_unet_row(f"U-Net self-training round {champion['round']} (champion, chosen on val)", wsss_unet))
    rows.append(_unet_row(f"U-Net on pseudo-masks ({best}), the GT train images only", same_unet))
    rows.append(_unet_row("U-Net on GT (supervised)", gt_unet))
    free_unet = read_json(reports / "eval" / f"{LABEL_FREE}.json")
    rows.append(_unet_row("U-Net on label-free rectangle-GrabCut masks (no labels)", free_unet))
    for key, label in (("ellipse", "centred ellipse (label-free)"), ("grabcut_rect", "GrabCut, centred 85% rectangle (label-free)"),
                       ("whole_image", "whole image (label-free)")):
        rows.append({"name": label, "kind": "baseline", "iou": pct(base[key]["iou_mean"]),
                     "dice": pct(base[key]["dice_mean"]), "miou": pct(base[key].get("miou"))})
    best_row = next(r for r in rows if r.get("variant") == best)
    summary = {"pseudo_iou": best_row["iou"], "wsss_unet_iou": pct(wsss_unet["iou_mean"]),
               "supervised_unet_iou": pct(gt_unet["iou_mean"]), "ellipse_iou": pct(base["ellipse"]["iou_mean"]),
               "grabcut_iou": pct(base["grabcut_rect"]["iou_mean"]), "label_free_unet_iou": pct(free_unet["iou_mean"]),
               "same_images_unet_iou": pct(same_unet["iou_mean"]), "wsss_unet_steps": steps_of(wsss_unet),
               "same_images_unet_steps": steps_of(same_unet), "supervised_unet_steps": steps_of(gt_unet),
               "label_free_unet_steps": steps_of(free_unet)}
    return {"rows": rows, "summary": summary}


def eval_of_model(eval_project: Path, model: Any) -> dict[str, Any] | None:
    """The ``wsss evaluate --model unet-<x>`` report of ``model`` (``reports/eval/<x>.json``), None when
    ``model`` is not a U-Net name or it was not evaluated."""
    if not isinstance(model, str) or not model.startswith("unet-"):
        return None
    path = eval_project / "reports" / "eval" / f"{model[len('unet-'):]}.json"
    return read_json(path) if path.is_file() else None


def self_training_champion(work: Path, eval_project: Path) -> dict[str, Any] | None:
    """``{round, model, eval}`` of the champion in ``reports/self-training.json`` (chosen on val), with its
    evaluation report; None when self-training did not run or the champion was not evaluated."""
    path = work / "reports" / "self-training.json"
    if not path.is_file():
        return None
    champ = read_json(path).get("champion") or {}
    ev = eval_of_model(eval_project, champ.get("model"))
    return None if ev is None else {"round": int(champ.get("round", 0)), "model": champ["model"], "eval": ev}


def _unet_val(project: Path, source: str) -> float:
    """The last-step val fg IoU (%) of ``models/unet-<source>`` from its training report (nan if absent)."""
    path = project / "reports" / "training" / f"unet-{source}.json"
    return pct(read_json(path).get("last_val_iou_mean")) if path.is_file() else float("nan")


def _score(entry: dict[str, Any], *keys: str) -> float | None:
    """The first of ``keys`` present in ``entry`` as a 0-1 score."""
    for key in keys:
        v = entry.get(key)
        if isinstance(v, (int, float)):
            return float(v)
    return None


def self_training_rows(work: Path, eval_project: Path, note: str = NOT_RUN,
                       rounds: list[int] | None = None) -> list[dict[str, Any]]:
    """Rounds 1, 2 from ``reports/self-training.json`` (``rounds: [{round, val_iou_mean | val_iou,
    test_iou_mean | test_iou, kept, model}, ...]``, read leniently: the stage is built in parallel), else
    "not run" (``note`` says why). A round with a model but no test score is scored by its ``reports/eval/`` report when the
    evaluation project has one."""
    path = work / "reports" / "self-training.json"
    data = read_json(path) if path.is_file() else {}
    by_round = {int(r["round"]): r for r in data.get("rounds", []) if isinstance(r, dict) and "round" in r}
    champion = (data.get("champion") or {}).get("round")
    rows = []
    for n in rounds or list(range(1, SELF_TRAIN_ROUNDS + 1)):
        r = by_round.get(n)
        if r is None:
            rows.append({"step": f"U-Net round {n} (self-training)", "val_iou": None, "test_iou": None,
                         "chosen_by": note if note != "ran" else NOT_RUN, "status": NOT_RUN})
            continue
        test = _score(r, "test_iou_mean", "test_iou")
        if test is None:
            test = (eval_of_model(eval_project, r.get("model")) or {}).get("iou_mean")
        kept = r.get("kept", None if champion is None else champion == n)
        rows.append({"step": f"U-Net round {n} (self-training)", "val_iou": pct(_score(r, "val_iou_mean", "val_iou")),
                     "test_iou": pct(test), "status": "ran",
                     "chosen_by": "refiner: the route's, tuned on val (tune crf); constraints: self_train params; "
                                  + ("champion (best val round)" if kept else "not the champion (a round with a "
                                     "better val IoU exists)" if kept is not None else "champion = best val round")})
    return rows


def steps_table(work: Path, eval_project: Path, plan: Plan, best: str, val_scores: dict[str, float],
                step_maps: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per step of the pipeline: val and test fg IoU (%) and what chose it (val only, never test)."""
    reports = eval_project / "reports"
    base = read_json(reports / "eval" / "baselines.json")
    cams_report = read_json(work / "reports" / "cams" / f"{plan.variants[0]}.json")
    rows: list[dict[str, Any]] = []

    def add(step: str, val: float | None, test: float | None, chosen_by: str, **extra: Any) -> None:
        rows.append({"step": step, "val_iou": val, "test_iou": test, "chosen_by": chosen_by, **extra})

    fixed = "nothing (a fixed rule, no label, no learning)"
    add("label-free: whole image", pct(cams_report.get("baseline_whole_iou")), pct(base["whole_image"]["iou_mean"]), fixed)
    add("label-free: centred ellipse", pct(cams_report.get("baseline_ellipse_iou")), pct(base["ellipse"]["iou_mean"]),
        fixed)
    grabcut_val = pct(step_maps[LABEL_FREE]["val_map_iou"])  # its masks: the map at the prior threshold
    add("label-free: GrabCut from a centred rectangle", grabcut_val, pct(base["grabcut_rect"]["iou_mean"]), fixed)
    add("label-free: U-Net on the rectangle-GrabCut masks", _unet_val(work, LABEL_FREE),
        pct(read_json(reports / "eval" / f"{LABEL_FREE}.json")["iou_mean"]),
        "nothing (no label anywhere; last of train_unet.steps steps)")

    def map_row(label: str, key: str, ev: dict[str, Any], extra: str = "") -> None:
        snap = step_maps[key]
        add(f"map: {label}", pct(snap["val_map_iou"]), pct(ev["before"]["iou_mean"]),
            f"threshold {snap['threshold']:.2f}, where its tuned refiner decides "
            f"({'tune crf on val' if snap['config'] == 'tuned' else snap['config']})" + extra,
            val_best_iou=None if snap.get("val_best_iou") is None else pct(snap["val_best_iou"]),
            best_threshold=snap.get("best_threshold"))

    for variant in plan.variants:
        method = variant.split("_", 1)[0].upper()
        map_row(f"{method} ({variant})", variant, read_json(reports / "eval-pseudo" / f"{variant}.json"))
    for kind in ENSEMBLE_KINDS:
        snap = step_maps[f"{ENSEMBLE} ({kind})"]
        weights = snap.get("weights")
        members = ", ".join(f"{m} {w:g}" for m, w in zip(snap["members"], weights or [], strict=False))
        map_row(f"ensemble {kind}", f"{ENSEMBLE} ({kind})", snap["eval"],
                f"; member weights tuned on val (tune ensemble): {members or 'params'}")
    for variant in plan.variants:
        ev = read_json(reports / "eval-pseudo" / f"{variant}.json")
        add(f"pseudo-masks {variant} after the tuned refiner", pct(val_scores[variant]), pct(ev["after"]["iou_mean"]),
            f"refiner {step_maps[variant].get('refiner', '?')} and its params: tune crf on val"
            + ("; selected for the U-Net (train-unet --masks best)" if variant == best else ""))
    for kind in ENSEMBLE_KINDS:
        snap = step_maps[f"{ENSEMBLE} ({kind})"]
        selected = kind == "with priors" and best == ENSEMBLE
        add(f"pseudo-masks ensemble {kind} after the tuned refiner", pct(snap["val_pseudo_iou"]),
            pct(snap["eval"]["after"]["iou_mean"]),
            f"refiner {snap.get('refiner', '?')} and its params: tune crf on val"
            + ("; selected for the U-Net (train-unet --masks best)" if selected else ""))
    wsss_unet = read_json(reports / "eval" / f"{BEST}.json")
    add(f"U-Net round 0 (pseudo-masks {best}, all train images)", _unet_val(work, BEST), pct(wsss_unet["iou_mean"]),
        "its masks: the best pseudo-masks on the trainval images with GT (train-unet --masks best); "
        "last of train_unet.steps steps", steps=(wsss_unet.get("training") or {}).get("steps"))
    rows.extend(self_training_rows(work, eval_project, step_maps.get("self-training", {}).get("note", NOT_RUN),
                                   plan.rounds))
    gt = read_json(reports / "eval" / "gt.json")
    add("supervised U-Net (GT masks) at equal steps", _unet_val(work, "gt"), pct(gt["iou_mean"]),
        "nothing (GT of the train images with masks; last of train_unet.steps steps)",
        steps=(gt.get("training") or {}).get("steps"))
    return rows


def steps_markdown(result: dict[str, Any]) -> str:
    """The steps table as markdown."""
    def num(v: Any) -> str:
        return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.1f}"

    lines = [f"# What each step gives ({result['profile']} profile)", "",
             f"fg IoU % on the val split (the only selection data) and on {result['eval']} (never used for "
             "training, tuning or selection). \"chosen by\" says what was decided on val for that row. A map "
             "row scores the map thresholded where its tuned refiner decides (GrabCut: its probable-foreground "
             "threshold); the last column is the same map at its own best val threshold, read off the val "
             "curve of those same images, so optimistic.", "",
             "| step | val fg IoU % | test fg IoU % | chosen by | map: val at its best threshold |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        best = (f"{num(r['val_best_iou'])} (τ {r['best_threshold']:.2f})"
                if r.get("val_best_iou") is not None and r.get("best_threshold") is not None else "")
        if r.get("status") == NOT_RUN:
            lines.append(f"| {r['step']} | {NOT_RUN} | {NOT_RUN} | {r['chosen_by']} | |")
        else:
            lines.append(f"| {r['step']} | {num(r['val_iou'])} | {num(r['test_iou'])} | {r['chosen_by']} | {best} |")
    return "\n".join(lines) + "\n"


def to_markdown(result: dict[str, Any]) -> str:
    """Markdown: settings, the scores table and the step timings."""
    def num(v: Any) -> str:
        return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.1f}"

    ev = result["eval"]
    lines = [
        f"# wsss quality benchmark ({result['profile']} profile)",
        "",
        f"- train root: `{result['train_root']}`" + (f", extra label-only roots: {', '.join(f'`{r}`' for r in result['extra_train_roots'])}"
                                                    if result["extra_train_roots"] else ""),
        f"- evaluated on: {ev['description']} ({ev.get('n_images', '?')} images, never used for training or tuning)",
        f"- ImageNet weights: {result['imagenet_summary']}",
        f"- machine: {result['machine']}",
        f"- total wall time: {result['total_seconds'] / 60:.1f} min",
        "",
        "| method | fg IoU % | Dice % | fg IoU before refinement % | val fg IoU % (selection) | train images | "
        "optimiser steps |",
        "|---|---|---|---|---|---|---|",
    ]

    def count(v: Any) -> str:
        return "—" if v is None else str(v)

    for r in result.get("rows", []):
        lines.append(f"| {r['name']} | {num(r['iou'])} | {num(r['dice'])} | {num(r.get('iou_before_refine'))} | "
                     f"{num(r.get('val_iou'))} | {count(r.get('n_images') if r['kind'] == 'unet' else None)} | "
                     f"{count(r.get('steps'))} |")
    lines += ["", "| step | project | command | seconds |", "|---|---|---|---|"]
    for s in result["steps"]:
        lines.append(f"| {s['step']} | {s['project']} | `{s['command']}` | {s['seconds']:.1f} |")
    lines += ["", "`" + result["summary_line"] + "`", ""]
    return "\n".join(lines)


def print_table(result: dict[str, Any]) -> None:
    """The scores as a rich table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fg IoU on {result['eval']['description']} ({result['profile']} profile)")
    for col in ("method", "fg IoU %", "Dice %", "before refine %", "val IoU %", "steps"):
        table.add_column(col, justify="left" if col == "method" else "right")

    def num(v: Any) -> str:
        return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.1f}"

    for r in result.get("rows", []):
        table.add_row(r["name"], num(r["iou"]), num(r["dice"]), num(r.get("iou_before_refine")), num(r.get("val_iou")),
                      "—" if r.get("steps") is None else str(r["steps"]))
    console = Console(width=max(120, Console().width))  # no wrapping when piped to a log
    console.print(table)
    console.print(f"ImageNet weights: {result['imagenet_summary']}; total {result['total_seconds'] / 60:.1f} min; "
                  f"steps and times in {result['out']}")


def machine() -> str:
    """CPU model and cores, torch threads, GPU."""
    return hostinfo.describe(with_torch=True)


# --------------------------------------------------------------------------------------------------


def run_pipeline(plan: Plan, work: Path, eval_root: Path | None, runner: Runner,
                 step_maps: dict[str, dict[str, Any]]) -> tuple[Path, str, dict[str, float]]:
    """Every step; returns the evaluation project, the selected variant and the val scores. Fills
    ``step_maps`` with what the steps table needs of each map variant before a later step replaces it
    (the ensemble is built twice under one name)."""
    run = runner
    run("prepare", "prepare")
    for labels in plan.classifiers:
        run(f"train-classifier {labels}", "train-classifier", "--labels", labels)
    for init in plan.ccam_inits:
        run(f"train-ccam {init}", "train-ccam", "--init", init)
    for method, model in plan.maps:
        run(f"make-cams {method}_{model}", "make-cams", "--method", method, "--model", model)
    for prior in PRIORS:
        run(f"make-cams {prior}", "make-cams", "--method", prior)
    for variant in plan.variants:
        run(f"tune crf {variant}", "tune", "crf", "--method", variant, "--trials", str(plan.tune_trials))
        run(f"make-pseudo {variant}", "make-pseudo", "--method", variant)

    eval_project, project = work, "train"
    if eval_root is not None:
        eval_project, project = work / "eval", "eval"
        view = make_eval_root(eval_root, eval_project / "data" / "eval-root")
        eval_params = deep_merge(plan.params, {"base": {"data_root": str(view), "extra_roots": [],
                                                        "background_root": None}})
        write_params(eval_project, eval_params)
        for name in ("models",):
            link = eval_project / name
            if not link.exists():
                link.symlink_to(work / name, target_is_directory=True)
        (eval_project / "reports").mkdir(parents=True, exist_ok=True)
        for rel, is_dir in (("crf", True), ("ensemble-weights.yaml", False)):  # what the train project tuned
            link = eval_project / "reports" / rel
            if not link.is_symlink():
                link.symlink_to(work / "reports" / rel, target_is_directory=is_dir)
        runner.root = eval_project
        run("prepare (eval root)", "prepare", project=project)
        runner.root = work
    for variant in [*plan.variants, *PRIORS]:
        step_maps[variant] = map_snapshot(work, variant)
    for kind in ENSEMBLE_KINDS:
        members = plan.variants + (list(PRIORS) if kind == "with priors" else [])
        for root in {work, eval_project}:
            set_ensemble_members(root, members)
        run(f"tune ensemble ({kind})", "tune", "ensemble", "--trials", str(plan.tune_trials))
        run(f"make-cams ensemble ({kind})", "make-cams", "--method", ENSEMBLE)
        run(f"tune crf ensemble ({kind})", "tune", "crf", "--method", ENSEMBLE, "--trials", str(plan.tune_trials))
        selectable = kind == ENSEMBLE_KINDS[-1]
        if selectable:  # the other one is replaced under the same name: its train-set masks would go unused
            run(f"make-pseudo ensemble ({kind})", "make-pseudo", "--method", ENSEMBLE)
        runner.root = eval_project
        run(f"evaluate pseudo ensemble ({kind})", "evaluate", "--pseudo", ENSEMBLE, project=project)
        runner.root = work
        step_maps[f"{ENSEMBLE} ({kind})"] = {
            **map_snapshot(work, ENSEMBLE), "members": members,
            "eval": read_json(eval_project / "reports" / "eval-pseudo" / f"{ENSEMBLE}.json"),
            "val_pseudo_iou": val_pseudo_iou(work, ENSEMBLE) if selectable else tuned_val_iou(work, ENSEMBLE)}
    candidates = [*plan.variants, ENSEMBLE]  # the ensemble with priors
    val_scores = {v: val_pseudo_iou(work, v) for v in candidates}  # shown beside the product's choice
    run(f"train-unet {BEST}", "train-unet", "--masks", BEST)
    best = str(read_json(work / "models" / f"unet-{BEST}" / "meta.json")["masks"])
    print(f"    train-unet --masks best chose {best}; val pseudo-mask IoU: "
          + ", ".join(f"{v} {s:.3f}" for v, s in val_scores.items()))
    run(f"train-unet same-{BEST}", "train-unet", "--masks", f"same-{BEST}")
    run("train-unet gt", "train-unet", "--masks", "gt")
    run(f"make-pseudo {LABEL_FREE} (label-free)", "make-pseudo", "--method", LABEL_FREE)
    run(f"train-unet {LABEL_FREE} (label-free)", "train-unet", "--masks", LABEL_FREE)
    step_maps["self-training"] = {"note": run_self_training(runner, work, plan.rounds)}

    runner.root = eval_project
    for variant in plan.variants:
        run(f"evaluate pseudo {variant}", "evaluate", "--pseudo", variant, project=project)
    run(f"evaluate unet-{BEST}", "evaluate", "--model", f"unet-{BEST}", project=project)
    run(f"evaluate unet-same-{BEST}", "evaluate", "--model", f"unet-same-{BEST}", project=project)
    for n in plan.rounds:
        if (work / "models" / f"unet-selftrain-r{n}" / "model.pt").is_file():
            run(f"evaluate unet-selftrain-r{n}", "evaluate", "--model", f"unet-selftrain-r{n}", project=project)
    run("evaluate unet-gt", "evaluate", "--model", "unet-gt", project=project)
    run(f"evaluate unet-{LABEL_FREE}", "evaluate", "--model", f"unet-{LABEL_FREE}", project=project)
    run("evaluate baselines", "evaluate", "--baselines", project=project)
    runner.root = work
    return eval_project, best, val_scores


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit code."""
    args = parse_args(argv)
    profile = load_profile(args.profile)
    plan = build_plan(profile, args.train_root, args.extra_train_root, args.device)
    if args.eval_root is not None:
        overlap = split_names(args.eval_root) & set().union(
            *(split_names(r) for r in [args.train_root, *args.extra_train_root]))
        if overlap:
            raise SystemExit(f"--eval-root shares {len(overlap)} image name(s) with the training roots "
                             f"(e.g. {sorted(overlap)[0]}); evaluation images must be unseen")
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="wsss-quality-"))).resolve()
    write_params(work, plan.params)
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    used = [k for k, v in plan.imagenet.items() if v]
    result: dict[str, Any] = {
        "profile": args.profile, "profile_file": shown(profile["source"]), "train_root": shown(args.train_root),
        "extra_train_roots": [shown(r) for r in args.extra_train_root],
        "eval_root": shown(args.eval_root), "workdir": shown(work), "out": shown(out),
        "machine": machine(), "imagenet": plan.imagenet,
        "imagenet_summary": ("yes: " + ", ".join(used)) if used else "no (random init; none cached or profile says never)",
        "params": shown_params(plan.params), "maps": plan.variants,
    }
    print(f"work project {work}; ImageNet weights: {result['imagenet_summary']}", flush=True)
    runner = Runner(work, work / "quality.log")
    start = time.perf_counter()
    rc = 0
    summary: dict[str, float | None] = {}
    step_maps: dict[str, dict[str, Any]] = {}
    steps_out = out.with_name(out.stem + "-steps.json")
    try:
        eval_project, best, val_scores = run_pipeline(plan, work, args.eval_root, runner, step_maps)
        table = steps_table(work, eval_project, plan, best, val_scores, step_maps)
        steps_result = {"profile": args.profile, "train_root": shown(args.train_root), "selected_variant": best,
                        "eval": "every image of the eval root" if args.eval_root else "the official test split",
                        "rows": table}
        # atomic (a killed run leaves the previous file whole); json.dumps keeps the rows' key order
        write_text(steps_out, json.dumps(steps_result, indent=2, default=str) + "\n")
        write_text(steps_out.with_suffix(".md"), steps_markdown(steps_result))
        result["steps_table"] = shown(steps_out)
        scores = collect(eval_project, plan, best, val_scores, work)
        result.update(scores)
        summary = scores["summary"]
        result["selected_variant"] = best
        result["val_pseudo_iou"] = {k: pct(v) for k, v in val_scores.items()}
        n_images = scores["rows"][0].get("n_images")
        result["eval"] = {"description": f"every image of {args.eval_root}" if args.eval_root
                          else "the train root's official test split", "n_images": n_images}
    except StepFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        result["error"] = str(exc)
        result["eval"] = {"description": "(failed)"}
        rc = 1
    result["steps"] = runner.steps
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    result["summary"] = summary
    result["summary_line"] = summary_line(summary)
    write_text(out, json.dumps(result, indent=2, default=str) + "\n")
    write_text(out.with_suffix(".md"), to_markdown(result))
    if rc == 0:
        print_table(result)
    print(result["summary_line"], flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
