"""Stage ``report``: ``reports/report.md`` (the paper's tables, ours beside theirs), figures, model registry.

Reads whatever reports exist and never fails on a missing one: an absent number is shown as "—".

Where our numbers come from (map variants are ``<method>_<model>``, see ``make_cams.variant_name``):

===============================  ======================  ==============================================
variant                          paper row               paper column
===============================  ======================  ==============================================
``cam_imagenet``                 CAM                     Pretrained
``cam_classifier-species``       CAM                     2-Class
``cam_classifier-breed``         CAM                     37-Class
``cam_classifier-species-bg``    CAM                     2/bg (Table 2)
``cam_classifier-breed-bg``      CAM                     37/bg (Table 2)
``ecs_classifier-<labels>``      CAM+ECS                 as for CAM
``ccam_ccam-imagenet``           CCAM                    Pretrained (``ccam-pre-*`` or ``ccam-none``
                                                         stand in when no ImageNet-init CCAM exists)
``ccam_ccam-cls-species``        CCAM                    2-Class
``ccam_ccam-cls-breed``          CCAM                    37-Class
``ccam_ccam-cls-<labels>-bg``    CCAM                    2/bg, 37/bg (Table 2)
``ccam-ecs_ccam-cls-breed-ecs``  CCAM+ECS                37-Class (any ``-ecs`` model or the
                                                         ``ccam-ecs`` method gives a CCAM+ECS row)
``ccam*_ccam-*-perbreed``        Table 3 CCAM / +dCRF    37-Class (class-specific)
``ccam*_ccam-*-perspecies``      Table 3 CCAM / +dCRF    2-Class (class-specific; no stage makes one yet)
``ensemble``                     own table               (no paper counterpart, B10)
===============================  ======================  ==============================================

Tables 1–2 use the validation scores of ``reports/cams/<variant>.json`` (maps thresholded at
``make_cams.threshold``). Table 3 uses ``reports/pseudo/<variant>.json`` (``before`` = thresholded map,
``after`` = refined pseudo-mask, trainval images with GT) and ``reports/eval/*.json`` (test split).

The registry step registers the U-Net logged by the newest finished ``train-unet`` run of
``unet-best`` as a version of ``wsss-unet`` with alias ``champion`` (``unet-gt``: alias
``supervised``). ``unet-best`` was chosen by ``train-unet --masks best`` on non-test pseudo-mask IoU;
test scores play no part in it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsss import tracking
from wsss.config import Params
from wsss.io import atomic_path, read_json, write_text
from wsss.paths import Paths
from wsss.ui import console

STAGE = "report"
DASH = "—"
N_FIGURE_IMAGES = 6
REGISTERED_MODEL = "wsss-unet"
ALIASES = {"unet-best": "champion", "unet-gt": "supervised"}
MAX_CANDIDATE_RUNS = 5

Pair = tuple[float, float]  # (IoU, Dice) in %

# --- the paper's numbers (algorithms.md §5), in % -----------------------------------------------------
PAPER_TABLE1: dict[str, dict[str, Pair]] = {
    "CAM": {"Pretrained": (26.03, 40.51), "2-Class": (12.73, 21.70), "37-Class": (20.89, 33.19)},
    "CAM+ECS": {"Pretrained": (25.68, 40.13), "2-Class": (13.64, 23.13), "37-Class": (20.98, 33.32)},
    "CCAM": {"Pretrained": (68.21, 80.32), "2-Class": (41.07, 55.85), "37-Class": (15.10, 23.93)},
    "CCAM+ECS": {"37-Class": (24.59, 37.31)},
}
PAPER_TABLE2: dict[str, dict[str, Pair]] = {
    "CAM": {"2-Class": (12.73, 21.70), "2/bg": (29.64, 45.27), "37-Class": (20.89, 33.19),
            "37/bg": (20.90, 33.20)},
    "CAM+ECS": {"2-Class": (13.64, 23.13), "2/bg": (29.24, 44.81), "37-Class": (20.98, 33.32),
                "37/bg": (21.44, 33.96)},
    "CCAM": {"2-Class": (41.07, 55.85), "2/bg": (48.58, 63.27), "37-Class": (15.10, 23.93),
             "37/bg": (29.08, 41.76)},
    "CCAM+ECS": {"2/bg": (48.65, 63.44), "37-Class": (24.59, 37.31), "37/bg": (42.80, 58.36)},
}
PAPER_TABLE3: dict[str, dict[str, Pair]] = {
    "CCAM": {"Pretrained": (68.21, 80.32), "2-Class": (52.97, 67.63), "37-Class": (59.78, 73.26),
             "37-Class/U-Net": (59.29, 73.63)},
    "CCAM+dCRF": {"Pretrained": (76.02, 85.64), "2-Class": (51.15, 64.99), "37-Class": (59.79, 72.32),
                  "37-Class/U-Net": (61.58, 75.30)},
}
PAPER_SUPERVISED_UNET: Pair = (68.25, 84.77)
MAP_ROWS = ("CAM", "CAM+ECS", "CCAM", "CCAM+ECS")
TABLE1_COLUMNS = ("Pretrained", "2-Class", "37-Class")
TABLE2_COLUMNS = ("2-Class", "2/bg", "37-Class", "37/bg")
TABLE3_COLUMNS = ("Pretrained", "2-Class", "37-Class", "37-Class/U-Net")
_LABEL_COLUMNS = {"species": "2-Class", "breed": "37-Class", "species-bg": "2/bg", "breed-bg": "37/bg"}


@dataclass(frozen=True)
class Slot:
    """Where a map variant's numbers go: Tables 1–2 (``maps``) or Table 3 (``class-specific``)."""

    table: str
    row: str
    column: str
    rank: int = 0  # lower wins when several variants fill one cell
    note: str = ""


def map_slot(variant: str) -> Slot | None:
    """The paper cell a map variant stands for (see the module docstring), or None."""
    method, sep, model = variant.partition("_")
    if not sep:
        return None
    if method in ("cam", "ecs"):
        row = "CAM" if method == "cam" else "CAM+ECS"
        if model == "imagenet":
            return Slot("maps", row, "Pretrained")
        column = _LABEL_COLUMNS.get(model.removeprefix("classifier-")) if model.startswith("classifier-") else None
        return Slot("maps", row, column) if column else None
    if method not in ("ccam", "ccam-ecs") or not model.startswith("ccam-"):
        return None
    rest = model.removeprefix("ccam-")
    specific = ""
    for suffix in ("-perbreed", "-perspecies"):
        if rest.endswith(suffix):
            specific, rest = suffix, rest.removesuffix(suffix)
    ecs = rest.endswith("-ecs") or method == "ccam-ecs"
    rest = rest.removesuffix("-ecs")
    if rest == "imagenet":
        column, rank, note = "Pretrained", 0, ""
    elif rest.startswith("pre-"):
        column, rank, note = "Pretrained", 1, f"self-supervised init {rest.removeprefix('pre-')}, not ImageNet"
    elif rest == "none":
        column, rank, note = "Pretrained", 2, "random init, not ImageNet"
    elif rest.startswith("cls-") and rest.removeprefix("cls-") in _LABEL_COLUMNS:
        column, rank, note = _LABEL_COLUMNS[rest.removeprefix("cls-")], 0, ""
    else:
        return None
    if specific:
        # Table 3's class-specific columns; ECS and init only order the candidates.
        col = "37-Class" if specific == "-perbreed" else "2-Class"
        return Slot("class-specific", "CCAM", col, rank + (10 if ecs else 0), note)
    return Slot("maps", "CCAM+ECS" if ecs else "CCAM", column, rank, note)


# --- small helpers --------------------------------------------------------------------------------------
def _num(value: Any) -> float | None:
    """A finite float, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _get(data: Mapping[str, Any] | None, *keys: str) -> float | None:
    """``data[k1][k2]...`` as a finite float, None when any level is missing."""
    cur: Any = data
    for key in keys:
        if not isinstance(cur, Mapping) or key not in cur:
            return None
        cur = cur[key]
    return _num(cur)


def pct(value: float | None, digits: int = 2) -> str:
    """A fraction in [0, 1] as a percentage, or "—"."""
    return DASH if value is None else f"{100 * value:.{digits}f}"


def _paper(value: float | None) -> str:
    return DASH if value is None else f"{value:.2f}"


def cell(ours: float | None, paper: float | None) -> str:
    """``ours (paper)``: ours a fraction (shown in %), the paper's already in %."""
    return f"{pct(ours)} ({_paper(paper)})"


def md_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table (``|`` inside cells escaped)."""
    def esc(text: object) -> str:
        return str(text).replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def load_reports(folder: Path) -> dict[str, dict[str, Any]]:
    """Every readable ``*.json`` of a folder by stem; unreadable ones are skipped with a note."""
    out: dict[str, dict[str, Any]] = {}
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("*.json")):
        try:
            data = read_json(path)
        except (OSError, ValueError) as exc:
            console.print(f"[yellow]report: skipping unreadable {path} ({exc})[/]")
            continue
        if isinstance(data, dict):
            out[path.stem] = data
    return out


def _pick(reports: Mapping[str, Mapping[str, Any]], table: str, row: str, column: str) -> str | None:
    """The best-ranked variant filling one cell (ties: alphabetical)."""
    found = [(slot.rank, v) for v in reports if (slot := map_slot(v)) is not None
             and (slot.table, slot.row, slot.column) == (table, row, column)]
    return min(found)[1] if found else None


def _sources_line(used: Mapping[str, str]) -> str:
    if not used:
        return "_No report filled any cell of this table yet._"
    parts = []
    for key, variant in used.items():
        slot = map_slot(variant)
        note = f" — {slot.note}" if slot is not None and slot.note else ""
        parts.append(f"{key} ← `{variant}`{note}")
    return "Our cells come from: " + "; ".join(parts) + "."


# --- sections -------------------------------------------------------------------------------------------
@dataclass
class Reports:
    """Every input report, keyed by file stem."""

    cams: dict[str, dict[str, Any]]
    pseudo: dict[str, dict[str, Any]]
    eval: dict[str, dict[str, Any]]

    @classmethod
    def load(cls, paths: Paths) -> Reports:
        return cls(load_reports(paths.reports / "cams"), load_reports(paths.reports / "pseudo"),
                   load_reports(paths.reports / "eval"))

    @property
    def unet_evals(self) -> dict[str, dict[str, Any]]:
        """Eval reports of U-Nets (everything but the baselines)."""
        return {k: v for k, v in self.eval.items() if k != "baselines"}


def baselines_section(rep: Reports) -> str:
    """Label-free baselines on validation (maps' images), trainval with GT (pseudo) and test."""
    names = ("whole_image", "ellipse", "grabcut_rect")
    rows = []
    val = next(iter(rep.cams.values()), None)
    val_n = _get(val, "n_val_images")
    rows.append([f"validation ({DASH if val_n is None else int(val_n)} images)", "reports/cams",
                 pct(_get(val, "baseline_whole_iou")), DASH, pct(_get(val, "baseline_ellipse_iou")), DASH,
                 DASH, DASH])
    pseudo = next(iter(rep.pseudo.values()), None)
    pseudo_n = _get(pseudo, "n_gt_images")
    row = [f"trainval with GT ({DASH if pseudo_n is None else int(pseudo_n)} images)", "reports/pseudo"]
    for name in names:
        row += [pct(_get(pseudo, "baselines", name, "iou_mean")), pct(_get(pseudo, "baselines", name, "dice_mean"))]
    rows.append(row)
    test = rep.eval.get("baselines")
    row = ["test (official split)", "reports/eval/baselines.json"]
    for name in names:
        row += [pct(_get(test, name, "iou_mean")), pct(_get(test, name, "dice_mean"))]
    rows.append(row)
    headers = ["images", "source", "whole image IoU", "whole image Dice", "centred ellipse IoU",
               "centred ellipse Dice", "GrabCut (centred rect) IoU", "GrabCut (centred rect) Dice"]
    return "\n".join([
        "## Label-free baselines",
        "",
        "Masks that use no label and no training: the whole image as pet, a centred ellipse, and GrabCut "
        "started from a centred rectangle. Pet IoU / Dice in % (per-image means, trimap border ignored). "
        "A method is only interesting where it beats these.",
        "",
        md_table(headers, rows),
    ])


def _map_pair(report: Mapping[str, Any] | None) -> tuple[float | None, float | None]:
    return _get(report, "iou_mean"), _get(report, "dice_mean")


def paper_map_table(rep: Reports, title: str, intro: str, columns: Sequence[str],
                    paper: Mapping[str, Mapping[str, Pair]]) -> str:
    """Table 1 or 2: method rows × label-space columns, IoU and Dice, ``ours (paper)``."""
    headers = ["method"] + [f"{c} {m}" for c in columns for m in ("IoU", "Dice")]
    rows, used = [], {}
    for row in MAP_ROWS:
        cells = [row]
        for column in columns:
            variant = _pick(rep.cams, "maps", row, column)
            iou, dice = _map_pair(rep.cams.get(variant) if variant else None)
            if variant:
                used[f"{row} / {column}"] = variant
            p = paper.get(row, {}).get(column)
            cells += [cell(iou, p[0] if p else None), cell(dice, p[1] if p else None)]
        rows.append(cells)
    return "\n".join([f"## {title}", "", intro, "", md_table(headers, rows), "", _sources_line(used)])


def ensemble_section(rep: Reports, params: Params) -> str | None:
    """A table for the fused map, if ``reports/cams/ensemble.json`` exists (no paper counterpart)."""
    ens = rep.cams.get("ensemble")
    if ens is None:
        return None
    cfg = params.make_cams
    members = ", ".join(f"`{m}`" for m in cfg.ensemble_members) or DASH
    weights = ", ".join(f"{w:g}" for w in cfg.ensemble_weights) or "equal"
    pseudo = rep.pseudo.get("ensemble")
    rows = [["Ensemble", members, f"{cfg.ensemble_fusion} ({weights})", pct(_get(ens, "iou_mean")),
             pct(_get(ens, "dice_mean")), pct(_get(ens, "best_iou_mean")),
             pct(_get(pseudo, "after", "iou_mean"))]]
    headers = ["method", "members", "fusion (weights)", "val IoU", "val Dice", "val IoU at best τ",
               "pseudo-mask IoU (after refinement)"]
    return "\n".join([
        "## Ensemble of maps",
        "",
        "The paper's title promises an ensemble but its code has none (B10); ours fuses max-normalised maps. "
        "Members and weights are from params.yaml (`make_cams`), as configured now.",
        "",
        md_table(headers, rows),
    ])


def table3_section(rep: Reports) -> str:
    """Table 3: CCAM vs CCAM+dCRF (pseudo-masks), class-specific CCAM, U-Nets and the supervised ratio."""
    used: dict[str, str] = {}
    pseudo_variant = {
        "Pretrained": _pick(rep.pseudo, "maps", "CCAM", "Pretrained"),
        "2-Class": _pick(rep.pseudo, "class-specific", "CCAM", "2-Class"),
        "37-Class": _pick(rep.pseudo, "class-specific", "CCAM", "37-Class"),
    }
    for column, variant in pseudo_variant.items():
        if variant:
            used[column] = variant
    perbreed = pseudo_variant["37-Class"]
    perbreed_eval = _eval_for_masks(rep, perbreed) if perbreed else None
    if perbreed_eval:
        used["37-Class/U-Net"] = f"eval/{perbreed_eval}"
    rows = []
    for row, key in (("CCAM", "before"), ("CCAM+dCRF", "after")):
        cells = [row]
        for column in TABLE3_COLUMNS:
            p = PAPER_TABLE3[row].get(column)
            if column == "37-Class/U-Net":
                # Our U-Nets always train on the refined masks: no U-Net on unrefined ones.
                src = rep.eval.get(perbreed_eval) if (perbreed_eval and key == "after") else None
            else:
                variant = pseudo_variant[column]
                src = (rep.pseudo.get(variant) or {}).get(key) if variant else None
            cells += [cell(_get(src, "iou_mean"), p[0] if p else None),
                      cell(_get(src, "dice_mean"), p[1] if p else None)]
        rows.append(cells)
    gt = rep.eval.get("gt")
    best = rep.eval.get("best")
    blanks = [""] * (2 * len(TABLE3_COLUMNS) - 2)  # as in the paper: these rows fill one column pair
    rows.append(["U-Net (GT-supervised), test", cell(_get(gt, "iou_mean"), PAPER_SUPERVISED_UNET[0]),
                 cell(_get(gt, "dice_mean"), PAPER_SUPERVISED_UNET[1]), *blanks])
    best_masks = (best or {}).get("masks")
    label = f"U-Net on best pseudo-masks (`{best_masks}`), test" if best_masks else "U-Net on best pseudo-masks, test"
    rows.append([label, cell(_get(best, "iou_mean"), None), cell(_get(best, "dice_mean"), None), *blanks])
    paper_ratio = (PAPER_TABLE3["CCAM+dCRF"]["37-Class/U-Net"][0] / PAPER_SUPERVISED_UNET[0],
                   PAPER_TABLE3["CCAM+dCRF"]["37-Class/U-Net"][1] / PAPER_SUPERVISED_UNET[1])
    ratio = (_ratio(_get(best, "iou_mean"), _get(gt, "iou_mean")), _ratio(_get(best, "dice_mean"), _get(gt, "dice_mean")))
    rows.append(["WSSS / supervised", f"{pct(ratio[0], 1)} ({100 * paper_ratio[0]:.1f})",
                 f"{pct(ratio[1], 1)} ({100 * paper_ratio[1]:.1f})", *blanks])
    headers = ["method"] + [f"{c} {m}" for c in TABLE3_COLUMNS for m in ("IoU", "Dice")]
    return "\n".join([
        "## Table 3 — class-specific training and baseline",
        "",
        "Each cell: `ours (paper)`, %. CCAM = the map thresholded at the pseudo-mask threshold, CCAM+dCRF = "
        "the refined pseudo-mask (our refiner is the tuned one: dense CRF, GrabCut or none), both scored on "
        "the trainval images with GT (never test). 2-Class / 37-Class = class-specific CCAM (ours: one CCAM "
        "fine-tuned with per-breed contrast, the paper's: one CCAM per class, trained and scored on the same "
        "images, B5). 37-Class/U-Net and the U-Net rows are on the official test split. "
        "WSSS / supervised: test IoU (Dice) of the best weakly-supervised U-Net over the GT-trained one; "
        "the paper's is its 37-Class/U-Net + dCRF over its supervised U-Net.",
        "",
        md_table(headers, rows),
        "",
        _sources_line(used),
    ])


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def _eval_for_masks(rep: Reports, masks: str) -> str | None:
    """The eval report of a U-Net trained on ``masks`` (its own file first, then unet-best's)."""
    if masks in rep.eval:
        return masks
    for name, data in sorted(rep.unet_evals.items()):
        if data.get("masks") == masks:
            return name
    return None


def unets_section(rep: Reports) -> str:
    """Every evaluated U-Net on the test split, with its fraction of the supervised IoU."""
    gt_iou = _get(rep.eval.get("gt"), "iou_mean")
    rows = []
    for name, data in sorted(rep.unet_evals.items()):
        iou = _get(data, "iou_mean")
        rows.append([f"`unet-{name}`", f"`{data.get('masks', DASH)}`", pct(iou), pct(_get(data, "dice_mean")),
                     pct(_get(data, "iou_dataset")), pct(_get(data, "miou")), pct(_ratio(iou, gt_iou), 1)])
    if not rows:
        rows.append([DASH] * 7)
    headers = ["model", "trained on", "IoU", "Dice", "dataset IoU", "mIoU (bg, pet)", "IoU / supervised"]
    return "\n".join(["## U-Nets on the official test split", "", md_table(headers, rows)])


def variants_section(rep: Reports) -> str:
    """Every map variant (validation) and every pseudo-mask variant (trainval with GT)."""
    map_rows = []
    for name, data in sorted(rep.cams.items()):
        map_rows.append([f"`{name}`", str(data.get("n_val_images", DASH)), str(data.get("threshold", DASH)),
                         pct(_get(data, "iou_mean")), pct(_get(data, "dice_mean")), pct(_get(data, "iou_dataset")),
                         str(data.get("best_threshold", DASH)), pct(_get(data, "best_iou_mean"))])
    pseudo_rows = []
    for name, data in sorted(rep.pseudo.items()):
        refiner = (data.get("config") or {}).get("refiner", DASH) if isinstance(data.get("config"), dict) else DASH
        pseudo_rows.append([f"`{name}`", str(refiner), str(data.get("n_gt_images", DASH)),
                            pct(_get(data, "before", "iou_mean")), pct(_get(data, "after", "iou_mean")),
                            pct(_get(data, "before", "dice_mean")), pct(_get(data, "after", "dice_mean")),
                            pct(_get(data, "after", "iou_dataset")), pct(_get(data, "mask_ignore_fraction"), 1)])
    return "\n".join([
        "## All map variants (validation split)",
        "",
        "τ is `make_cams.threshold`; the best τ is read off the validation curve (optimistic on the same "
        "images, shown for information).",
        "",
        md_table(["variant", "images", "τ", "IoU", "Dice", "dataset IoU", "best τ", "IoU at best τ"],
                 map_rows or [[DASH] * 8]),
        "",
        "## All pseudo-mask variants (trainval images with GT)",
        "",
        md_table(["variant", "refiner", "images", "IoU before", "IoU after", "Dice before", "Dice after",
                  "dataset IoU after", "ignored pixels %"], pseudo_rows or [[DASH] * 9]),
    ])


PROTOCOL_NOTE = """## Protocol differences: why the paper's numbers are not comparable

Ours (every number above):
- the official Oxford-IIIT Pet split; a validation subset carved from trainval is the only data used
  for choices (thresholds, CRF parameters, which pseudo-masks train the champion U-Net);
- the test split is used once, by `wsss evaluate`, and never for a choice;
- the trimap border is ignored; IoU and Dice are the standard per-image pet IoU / Dice
  (dataset-level IoU alongside).

The paper's (see `research/algorithms.md` §6):
- a random 80/20 split over trainval ∪ test at 224² after an aspect-distorting resize (B16);
- the CAM / CAM+ECS "IoU" is I/(|S|+|G|), at most 50 %, and its "Dice" is 2I/(|S|+|G|+I) (B3): those
  rows are not comparable with the CCAM rows or with ours (their true Dice is 2× the printed IoU, e.g.
  52.1 for CAM Pretrained); its CAM heads are random linear layers (B1, B2);
- epochs, thresholds and per-breed checkpoints were selected on the test split (B4); the threshold
  differs between the CCAM and CCAM+dCRF rows (B7);
- Table 3 leaks training images into the evaluation (B5): class-specific CCAMs and the pseudo-mask
  U-Net are scored on their own training images, and the baseline and WSSS U-Nets on different sets;
- the dense CRF received a corrupted image (normalised tensor × 255 cast to uint8, B6);
- the supervised baseline is a weak scratch U-Net (5 epochs) whose IoU / Dice pair is inconsistent (B9).
"""


# --- registry -------------------------------------------------------------------------------------------
@dataclass
class Registration:
    """Outcome of registering one ``models/unet-*`` folder."""

    model: str
    alias: str
    version: str | None = None
    run_id: str | None = None
    uri: str | None = None
    masks: str | None = None
    note: str = ""


def _logged_model_uri(run: Any) -> str | None:
    """``models:/<model id>`` of the model named ``model`` logged by a run (MLflow 3), else None."""
    import mlflow

    try:
        models = mlflow.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{run.info.run_id}'",
            output_format="list",
        )
    except Exception:  # an older server without logged models: fall back to the run artifact path
        return f"runs:/{run.info.run_id}/model"
    named = [m for m in models if m.name == "model"]
    if not named:
        return None
    return f"models:/{max(named, key=lambda m: m.creation_timestamp).model_id}"


def _state_matches(uri: str, sha: str | None) -> bool:
    """Whether the MLflow model's weights are those saved under ``models/`` (same state SHA-256)."""
    if not sha:
        return True
    import mlflow

    from wsss.training.checkpoint import state_sha256

    try:
        model = mlflow.pytorch.load_model(uri, map_location="cpu")
    except Exception as exc:  # e.g. pickled with a class that no longer exists: try an older run
        console.print(f"[yellow]registry: cannot load {uri} ({type(exc).__name__}: {exc})[/]")
        return False
    return state_sha256(model.state_dict()) == sha


def register_unet(paths: Paths, experiment_id: str, model_name: str, alias: str) -> Registration:
    """Register the MLflow model of the newest finished train-unet run of ``model_name``; set ``alias``.

    The run must have logged a model whose weights equal ``models/<model_name>/`` (checked with the
    state SHA-256 in ``meta.json``), so the alias always points at the DVC-tracked model. A version
    already registered for that model is reused (re-running the report adds no duplicates).
    """
    import mlflow
    from mlflow import MlflowClient

    reg = Registration(model_name, alias)
    meta_path = paths.model_dir(model_name) / "meta.json"
    if not meta_path.is_file():
        reg.note = f"{meta_path} not found; not registered"
        return reg
    meta = read_json(meta_path)
    reg.masks = meta.get("masks")
    runs = mlflow.search_runs(
        experiment_ids=[experiment_id],
        filter_string=(f"tags.`wsss.stage` = 'train-unet' and tags.`wsss.variant` = '{model_name}' "
                       "and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    runs = [r for r in runs if r.data.tags.get("masks") in (None, reg.masks)][:MAX_CANDIDATE_RUNS]
    if not runs:
        reg.note = f"no finished train-unet run of {model_name} (masks {reg.masks}) in MLflow; not registered"
        return reg
    for run in runs:
        uri = _logged_model_uri(run)
        if uri and _state_matches(uri, meta.get("state_sha256")):
            reg.run_id, reg.uri = run.info.run_id, uri
            break
    if reg.uri is None:
        reg.note = (f"no train-unet run of {model_name} logged a model equal to {paths.model_dir(model_name)} "
                    "(retrained without MLflow?); not registered")
        return reg
    client = MlflowClient()
    existing = [v for v in client.search_model_versions(f"name = '{REGISTERED_MODEL}' and run_id = '{reg.run_id}'")
                if v.source == reg.uri] if _registered_exists(client) else []
    if existing:
        version = str(max(int(v.version) for v in existing))
    else:
        tags = {"wsss.model_dir": model_name, "wsss.masks": str(reg.masks),
                "input_size": str(meta.get("input_size", "")), "architecture": str(meta.get("architecture", "")),
                "encoder": str(meta.get("encoder", "")), "state_sha256": str(meta.get("state_sha256", ""))}
        version = str(mlflow.register_model(reg.uri, REGISTERED_MODEL, tags=tags).version)
        how = ("weakly supervised; pseudo-mask source chosen by non-test pseudo-mask IoU (train-unet --masks best)"
               if alias == "champion" else "supervised baseline trained on GT masks")
        client.update_model_version(REGISTERED_MODEL, version, description=f"{model_name} on masks {reg.masks}: {how}")
    client.set_registered_model_alias(REGISTERED_MODEL, alias, version)
    reg.version = version
    return reg


def _registered_exists(client: Any) -> bool:
    try:
        client.get_registered_model(REGISTERED_MODEL)
        return True
    except Exception:  # RESOURCE_DOES_NOT_EXIST
        return False


def register_all(paths: Paths, experiment_id: str) -> list[Registration]:
    """Register ``unet-best`` (alias champion) and ``unet-gt`` (alias supervised) where possible."""
    regs = []
    for model_name, alias in ALIASES.items():
        try:
            reg = register_unet(paths, experiment_id, model_name, alias)
        except Exception as exc:  # the report itself must still be written
            reg = Registration(model_name, alias, note=f"registration failed ({type(exc).__name__}: {exc})")
        if reg.version:
            console.print(f"registered {model_name} as {REGISTERED_MODEL} v{reg.version} @{alias} ({reg.uri})")
        else:
            console.print(f"[yellow]registry: {reg.note}[/]")
        regs.append(reg)
    return regs


def registry_section(regs: Sequence[Registration] | None, pseudo: Mapping[str, Mapping[str, Any]]) -> str:
    if regs is None:
        return "## Model registry\n\nSkipped (`--no-register`)."
    rows = []
    for r in regs:
        chosen = DASH
        if r.alias == "champion" and r.masks:
            chosen = f"`{r.masks}`: pseudo-mask IoU {pct(_get(pseudo.get(r.masks), 'after', 'iou_mean'))} (non-test)"
        ref = f"`models:/{REGISTERED_MODEL}@{r.alias}` (v{r.version})" if r.version else DASH
        rows.append([f"`{r.model}`", f"`{r.alias}`", ref, f"`{r.run_id}`" if r.run_id else DASH, chosen,
                     r.note or "registered"])
    return "\n".join([
        "## Model registry",
        "",
        f"Registered model `{REGISTERED_MODEL}`. The champion is the U-Net trained on the pseudo-masks with "
        "the highest non-test pseudo-mask IoU; test scores play no part in the choice. "
        f"Use it with `wsss predict IMAGES --model models:/{REGISTERED_MODEL}@champion --out DIR`.",
        "",
        md_table(["model", "alias", "URI", "train-unet run", "chosen by", "status"], rows),
    ])


# --- figures --------------------------------------------------------------------------------------------
def _save_figure(fig: Any, dest: Path) -> Path:
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=80, bbox_inches="tight")
    return dest


def threshold_figure(rep: Reports, dest: Path) -> Path | None:
    """IoU vs threshold of every map variant on the validation split."""
    from matplotlib.figure import Figure

    curves = {n: d["curve"] for n, d in sorted(rep.cams.items())
              if isinstance(d.get("curve"), dict) and d["curve"].get("threshold") and d["curve"].get("iou_mean")}
    if not curves:
        return None
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for i, (name, curve) in enumerate(curves.items()):
        style = ("-", "--", ":", "-.")[(i // 10) % 4]  # the colour cycle repeats after 10 lines
        (line,) = ax.plot(curve["threshold"], [100 * v for v in curve["iou_mean"]], style, label=name)
        best = _num(rep.cams[name].get("best_threshold"))
        if best is not None and best in curve["threshold"]:
            ax.plot([best], [100 * curve["iou_mean"][curve["threshold"].index(best)]], "o", color=line.get_color())
    ellipse = _get(next(iter(rep.cams.values())), "baseline_ellipse_iou")
    if ellipse is not None:
        ax.axhline(100 * ellipse, color="grey", linewidth=2, alpha=0.5, label="centred ellipse (no labels)")
    ax.set_xlabel("threshold τ on the max-normalised map")
    ax.set_ylabel("validation pet IoU (%)")
    ax.set_title("Map quality vs threshold (dots: best τ)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save_figure(fig, dest)


def _figure_rows(paths: Paths) -> list[Any]:
    """Up to ``N_FIGURE_IMAGES`` validation pets with GT (sorted ids: the same images in every grid)."""
    from wsss.data.manifest import load_manifest

    if not paths.manifest.is_file():
        return []
    df = load_manifest(paths.manifest)
    val = df[(df["split"] == "val") & df["has_mask"].astype(bool) & ~df["is_background"]].sort_values("id")
    return list(val.head(N_FIGURE_IMAGES).itertuples())


def _unet_for(paths: Paths, variant: str, cache: dict[str, Any]) -> tuple[str, Any, dict[str, Any]] | None:
    """(name, model, meta) of a U-Net trained on ``variant``'s masks (``unet-<variant>``, ``unet-best``)."""
    from wsss.inference import load_unet

    for name in (f"unet-{variant}", "unet-best"):
        meta_path = paths.model_dir(name) / "meta.json"
        if not meta_path.is_file():
            continue
        try:
            if read_json(meta_path).get("masks") != variant:
                continue
            if name not in cache:
                cache[name] = (name, *load_unet(paths.model_dir(name)))
            return cache[name]
        except Exception as exc:  # a figure is not worth failing the report for
            console.print(f"[yellow]report: cannot load {paths.model_dir(name)} for figures ({exc})[/]")
    return None


def map_grid_figure(paths: Paths, variant: str, rows: Sequence[Any], unets: dict[str, Any], prec: Any,
                    dest: Path) -> Path | None:
    """image | map heat | pseudo-mask | U-Net prediction | GT for a few validation images."""
    from matplotlib.figure import Figure

    from wsss.cams import load_maps
    from wsss.data.datasets import load_mask, load_rgb
    from wsss.errors import DataError
    from wsss.inference import predict_probs
    from wsss.stages.train_unet import colorize

    try:
        maps = load_maps(paths.cams_dir(variant), {r.id for r in rows})
    except DataError:
        return None
    rows = [r for r in rows if r.id in maps]
    if not rows:
        return None
    masks_dir = paths.masks_dir(variant)
    unet = _unet_for(paths, variant, unets)
    columns = ["image", "map"]
    if masks_dir.is_dir():
        columns.append("pseudo-mask")
    if unet is not None:
        columns.append(f"U-Net ({unet[0]})")
    columns.append("GT")
    fig = Figure(figsize=(2.0 * len(columns), 2.0 * len(rows)))
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    for i, r in enumerate(rows):
        image = np.array(load_rgb(paths.prepared, r.image_path))  # writable: torch.from_numpy warns otherwise
        gt = load_mask(paths.prepared / r.mask_path)
        panels: list[tuple[np.ndarray, np.ndarray | None]] = [(image, None), (image, maps[r.id])]
        if "pseudo-mask" in columns:
            mask_path = masks_dir / f"{r.id}.png"
            panels.append((colorize(load_mask(mask_path)) if mask_path.is_file() else np.full_like(image, 64), None))
        if unet is not None:
            prob = predict_probs(unet[1], [image], int(unet[2]["input_size"]), prec)[0]
            panels.append((colorize((prob >= 0.5).astype(np.uint8)), None))
        panels.append((colorize(gt), None))
        for j, (ax, (picture, heat)) in enumerate(zip(axes[i], panels, strict=True)):
            ax.imshow(picture)
            if heat is not None:
                ax.imshow(heat, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(columns[j], fontsize=8)
            if j == 0:
                ax.set_ylabel(str(r.id), fontsize=6)
    fig.suptitle(variant, fontsize=9)
    return _save_figure(fig, dest)


def make_figures(params: Params, paths: Paths, rep: Reports, device: str | None = None) -> list[Path]:
    """Write the figures under ``reports/figures/`` (stale map grids are removed)."""
    from wsss.device import precision_for, resolve_device

    out: list[Path] = []
    fig_dir = paths.figures
    fig_dir.mkdir(parents=True, exist_ok=True)
    curve = threshold_figure(rep, fig_dir / "iou_vs_threshold.png")
    if curve:
        out.append(curve)
    rows = _figure_rows(paths)
    unets: dict[str, Any] = {}
    if rows:
        prec = precision_for(resolve_device(device or params.base.device), enabled=False)
        for variant in sorted(rep.cams):
            grid = map_grid_figure(paths, variant, rows, unets, prec, fig_dir / f"maps_{variant}.png")
            if grid:
                out.append(grid)
    for old in fig_dir.glob("maps_*.png"):
        if old not in out:
            old.unlink()
    return out


def figures_section(figures: Sequence[Path], paths: Paths) -> str:
    if not figures:
        return "## Figures\n\nNone yet (no map reports, or no prepared data)."
    lines = ["## Figures", ""]
    for f in figures:
        rel = f.relative_to(paths.reports).as_posix()
        lines.append(f"![{f.stem}]({rel})")
    return "\n".join(lines)


# --- the stage ------------------------------------------------------------------------------------------
def render(params: Params, rep: Reports, regs: Sequence[Registration] | None, figures: Sequence[Path],
           paths: Paths) -> str:
    """The whole ``report.md``."""
    sections = [
        f"# wsss report — {params.base.dataset}",
        "",
        f"Experiment `{tracking.experiment_name(params)}`. Paper-shaped tables read `ours (paper)` in %: ours "
        "measured as described under *Protocol differences*, the paper's copied from its Tables 1–3 "
        "(`research/algorithms.md` §5). \"—\" = not run (or no paper value).",
        "",
        baselines_section(rep),
        "",
        paper_map_table(
            rep, "Table 1 — CAM-based pseudo-mask generation",
            "Validation pet IoU / Dice of the maps thresholded at `make_cams.threshold`. Pretrained = ImageNet "
            "backbone (CCAM: ImageNet init), 2-Class / 37-Class = species / breed classifier (CCAM: initialised "
            "from it). The paper's CAM and CAM+ECS rows use a broken metric (B3).",
            TABLE1_COLUMNS, PAPER_TABLE1),
        "",
        paper_map_table(
            rep, "Table 2 — background-class augmentation",
            "As Table 1; 2/bg and 37/bg = classifiers with an extra background class (`species-bg`, "
            "`breed-bg`), and CCAM initialised from them.",
            TABLE2_COLUMNS, PAPER_TABLE2),
        "",
    ]
    ens = ensemble_section(rep, params)
    if ens:
        sections += [ens, ""]
    sections += [table3_section(rep), "", unets_section(rep), "", variants_section(rep), "",
                 registry_section(regs, rep.pseudo), "", figures_section(figures, paths), "", PROTOCOL_NOTE]
    return "\n".join(sections)


def run(params: Params, paths: Paths, register: bool = True, device: str | None = None) -> dict[str, Any]:
    """Write ``reports/report.md`` and ``reports/figures/``, register the U-Nets, log it all to MLflow."""
    import mlflow

    rep = Reports.load(paths)
    with tracking.stage_run(STAGE, "all", params, paths) as run_:
        regs = register_all(paths, run_.info.experiment_id) if register else None
        figures = make_figures(params, paths, rep, device)
        write_text(paths.report_md, render(params, rep, regs, figures, paths))
        tracking.log_artifact(paths.report_md)
        if paths.figures.is_dir() and any(paths.figures.iterdir()):
            tracking.guard(mlflow.log_artifacts, str(paths.figures), artifact_path="figures")
        gt, best = _get(rep.eval.get("gt"), "iou_mean"), _get(rep.eval.get("best"), "iou_mean")
        summary: dict[str, Any] = {
            "n_map_variants": len(rep.cams), "n_pseudo_variants": len(rep.pseudo), "n_figures": len(figures),
            "test_iou_best": best, "test_iou_gt": gt, "wsss_over_supervised": _ratio(best, gt),
        }
        tracking.log_metrics({k: v for k, v in summary.items() if v is not None})
        if regs:
            for r in regs:
                if r.version:
                    tracking.guard(mlflow.set_tag, f"registry.{r.alias}", f"{REGISTERED_MODEL}/{r.version}")
    summary["registered"] = {r.alias: r.version for r in regs or [] if r.version}
    console.print(f"wrote {paths.report_md} ({len(figures)} figures in {paths.figures})")
    return summary
