"""The parts of the report alone (``wsss.reporting``): paper numbers, slots, inputs, cells, sections,
registry table and figures, on in-memory reports (no project, no MLflow run). End to end: ``test_report.py``."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from tests.data_factory import markdown_table
from wsss.config import CamsConfig, Params
from wsss.paths import Paths
from wsss.reporting import figures, inputs, markdown, paper, registry, slots, tables
from wsss.reporting.inputs import Reports
from wsss.reporting.slots import Slot, map_slot

PERBREED = "ccam_ccam-none-perbreed"


def _scores(iou: float, dice: float) -> dict:
    return {"iou_mean": iou, "dice_mean": dice, "iou_dataset": iou, "miou": iou}


def _reports() -> Reports:
    curve = {"threshold": [0.2, 0.3, 0.4], "iou_mean": [0.3, 0.4, 0.35]}
    cams = {"cam_classifier-species": {**_scores(0.4012, 0.5534), "n_val_images": 2, "threshold": 0.3,
                                       "best_threshold": 0.3, "best_iou_mean": 0.4, "baseline_ellipse_iou": 0.31,
                                       "baseline_whole_iou": 0.22, "curve": curve},
            "ccam_ccam-none": _scores(0.6066, 0.7077), "ccam_ccam-pre-simsiam": _scores(0.6111, 0.7111)}
    pseudo = {PERBREED: {"n_gt_images": 3, "before": _scores(0.5733, 0.6), "after": _scores(0.6844, 0.7)}}
    evals = {"gt": {**_scores(0.8, 0.88), "masks": "gt"}, "best": {**_scores(0.7, 0.81), "masks": PERBREED}}
    return Reports(cams, pseudo, evals)


# --- paper ------------------------------------------------------------------------------------------------
def test_paper_tables_agree_with_each_other_and_the_layout() -> None:
    for row, cols in paper.PAPER_TABLE1.items():
        assert row in paper.MAP_ROWS and set(cols) <= set(paper.TABLE1_COLUMNS)
        for column in set(cols) & set(paper.TABLE2_COLUMNS):  # Table 2 repeats Table 1's label columns
            assert paper.PAPER_TABLE2[row][column] == cols[column]
    for row, cols in paper.PAPER_TABLE2.items():
        assert row in paper.MAP_ROWS and set(cols) <= set(paper.TABLE2_COLUMNS)
    for cols in paper.PAPER_TABLE3.values():
        assert set(cols) <= set(paper.TABLE3_COLUMNS)
    assert paper.PAPER_TABLE3["CCAM"]["Pretrained"] == paper.PAPER_TABLE1["CCAM"]["Pretrained"]
    pairs = [p for t in (paper.PAPER_TABLE1, paper.PAPER_TABLE2, paper.PAPER_TABLE3) for c in t.values()
             for p in c.values()] + [paper.PAPER_SUPERVISED_UNET]
    assert all(0 < iou < dice < 100 for iou, dice in pairs)
    assert set(paper.LABEL_COLUMNS.values()) == set(paper.TABLE2_COLUMNS)
    # The protocol note's worked example of B3 is the paper's own number.
    assert f"{2 * paper.PAPER_TABLE1['CAM']['Pretrained'][0]:.1f} for CAM Pretrained" in tables.PROTOCOL_NOTE


# --- slots ------------------------------------------------------------------------------------------------
def test_variant_mapping() -> None:
    assert map_slot("cam_classifier-species") == Slot("maps", "CAM", "2-Class")
    assert map_slot("ecs_classifier-breed") == Slot("maps", "CAM+ECS", "37-Class")
    assert map_slot("cam_imagenet") == Slot("maps", "CAM", "Pretrained")
    assert map_slot("cam_classifier-breed-bg").column == "37/bg"
    assert map_slot("ccam_ccam-imagenet") == Slot("maps", "CCAM", "Pretrained")
    assert map_slot("ccam_ccam-cls-species").column == "2-Class"
    assert map_slot("ccam_ccam-cls-species-bg") == Slot("maps", "CCAM", "2/bg")
    assert map_slot("ccam-ecs_ccam-cls-breed-ecs") == Slot("maps", "CCAM+ECS", "37-Class")
    assert map_slot("ccam_ccam-cls-breed-ecs").row == "CCAM+ECS"
    assert map_slot(PERBREED) == Slot("class-specific", "CCAM", "37-Class", 2, "random init, not ImageNet")
    assert map_slot("ccam_ccam-imagenet-perspecies") is None  # not a model id (no stage makes one)
    assert map_slot("ccam_ccam-cls-breed-ecs-perbreed").rank == 10  # ECS only orders the candidates
    assert map_slot("ccam_ccam-pre-simsiam").note == "self-supervised init simsiam, not ImageNet"
    assert map_slot("ccam_ccam-none").rank > map_slot("ccam_ccam-imagenet").rank
    for name in ("ensemble", "cam_something-else", "ccam_ccam-cls-colour", "ccam_classifier-breed", "gradcam_imagenet"):
        assert map_slot(name) is None, name


def test_pick_prefers_imagenet_then_self_supervised_then_random_init() -> None:
    names = ["ccam_ccam-none", "ccam_ccam-pre-simsiam", "ccam_ccam-pre-moco", "cam_imagenet"]
    assert slots.pick(names, "maps", "CCAM", "Pretrained") == "ccam_ccam-pre-moco"  # ties: alphabetical
    assert slots.pick([*names, "ccam_ccam-imagenet"], "maps", "CCAM", "Pretrained") == "ccam_ccam-imagenet"
    assert slots.pick(["ccam_ccam-none"], "maps", "CCAM", "Pretrained") == "ccam_ccam-none"
    assert slots.pick(names, "maps", "CCAM+ECS", "Pretrained") is None


# --- inputs -----------------------------------------------------------------------------------------------
def test_numbers_are_finite_floats_or_none() -> None:
    assert inputs.num(np.float32(0.5)) == 0.5 and inputs.num(3) == 3.0
    assert inputs.num(True) is None and inputs.num(float("nan")) is None and inputs.num("0.5") is None
    data = {"after": {"iou_mean": 0.25, "bad": float("inf")}}
    assert inputs.get(data, "after", "iou_mean") == 0.25
    assert inputs.get(data, "after", "bad") is None and inputs.get(data, "before", "iou_mean") is None
    assert inputs.get(None, "x") is None and inputs.get({"after": 1}, "after", "iou_mean") is None
    assert inputs.ratio(0.7, 0.8) == 0.7 / 0.8
    assert inputs.ratio(0.7, 0.0) is None and inputs.ratio(None, 0.8) is None


def test_load_reports_skips_unreadable_and_non_objects(tmp_path: Path) -> None:
    assert inputs.load_reports(tmp_path / "missing") == {}
    (tmp_path / "a.json").write_text(json.dumps({"iou_mean": 0.5}))
    (tmp_path / "broken.json").write_text("{broken")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "notes.txt").write_text("{}")
    assert inputs.load_reports(tmp_path) == {"a": {"iou_mean": 0.5}}
    rep = Reports({}, {}, {"baselines": {}, "gt": {"iou_mean": 0.8}})
    assert list(rep.unet_evals) == ["gt"]


# --- markdown ---------------------------------------------------------------------------------------------
def test_cells_and_tables() -> None:
    assert markdown.pct(0.40123) == "40.12" and markdown.pct(0.875, 1) == "87.5"
    assert markdown.pct(None) == markdown.DASH == "—"
    assert markdown.cell(0.4012, 12.73) == "40.12 (12.73)"
    assert markdown.cell(None, None) == "— (—)"
    assert markdown.md_table(["a", "b|c"], [["1", "x|y"]]).splitlines() == [
        "| a | b\\|c |", "|---|---|", "| 1 | x\\|y |"]


# --- tables -----------------------------------------------------------------------------------------------
def test_sections_from_in_memory_reports() -> None:
    rep = _reports()
    md = tables.render(Params(), rep, "exp-x", "## Model registry\n\nREG", "## Figures\n\nFIG")
    assert md.startswith("# wsss report — synthetic\n\nExperiment `exp-x`.")
    order = ["## Label-free baselines", "## Table 1", "## Table 2", "## Table 3", "## U-Nets on the official",
             "## All map variants", "## All pseudo-mask variants", "## Model registry", "## Figures",
             "## Protocol differences"]
    assert [md.index(h) for h in order] == sorted(md.index(h) for h in order)
    assert "## Ensemble of maps" not in md  # no ensemble report
    assert "(`docs/seed-paper.md#the-papers-numbers`)" in md
    t1 = markdown_table(md, "## Table 1")
    assert t1["CAM"]["2-Class IoU"] == "40.12 (12.73)"
    assert t1["CCAM"]["Pretrained IoU"] == "61.11 (68.21)"  # self-supervised init beats random init
    assert "Pretrained ← `ccam_ccam-pre-simsiam` — self-supervised init simsiam, not ImageNet" in md
    t3 = markdown_table(md, "## Table 3")
    assert t3["CCAM+dCRF"]["37-Class IoU"] == "68.44 (59.79)"
    assert t3["CCAM+dCRF"]["37-Class/U-Net IoU"] == "70.00 (61.58)"  # unet-best was trained on PERBREED
    assert t3["WSSS / supervised"]["Pretrained IoU"] == "87.5 (90.2)"
    assert markdown_table(md, "## U-Nets on the official")["WSSS, all images"]["IoU / supervised"] == "87.5"


def _unet_eval(iou: float, masks: str, n_images: int, steps: int, images: str, threshold: float = 0.5) -> dict:
    return {**_scores(iou, iou + 0.05), "masks": masks, "decision": {"threshold": threshold, "flip_tta": True},
            "training": {"steps": steps, "n_images": n_images, "images": images, "batch_size": 16, "epochs": 3}}


def test_unet_table_compares_supervised_same_images_and_all_images_at_their_steps() -> None:
    evals = {"gt": _unet_eval(0.6, "gt", 198, 400, "gt"),
             "same-best": _unet_eval(0.54, "same-ccam_ccam-none", 198, 400, "gt"),
             "best": _unet_eval(0.66, "ccam_ccam-none", 1307, 400, "all", threshold=0.65),
             PERBREED: _unet_eval(0.3, PERBREED, 1307, 400, "all"), "baselines": {"ellipse": _scores(0.4, 0.5)}}
    md = tables.unets_section(Reports({}, {}, evals))
    t = markdown_table(md, "## U-Nets")
    assert list(t) == ["supervised", "WSSS, same images", "WSSS, all images", "—"]  # extra U-Nets after the rows
    assert [(t[k]["images"], t[k]["steps"]) for k in list(t)[:3]] == [("198", "400"), ("198", "400"), ("1307", "400")]
    assert t["WSSS, same images"]["model"] == "`unet-same-best`"
    assert t["WSSS, all images"]["decision"] == "0.65 + flip" and t["supervised"]["decision"] == "0.5 + flip"
    assert t["WSSS, same images"]["trained on"] == "pseudo-masks (`same-ccam_ccam-none`)"
    assert t["supervised"]["trained on"] == "GT masks" and t["—"]["model"] == f"`unet-{PERBREED}`"
    assert t["WSSS, same images"]["IoU / supervised"] == "90.0" and t["WSSS, all images"]["IoU / supervised"] == "110.0"
    assert "(WSSS same images / supervised): IoU 90.0 %, Dice 90.8 %." in md
    assert "both WSSS rows train on the same images" not in md
    # A U-Net row is one entry of UNET_ROWS: the table follows it.
    extra = tables.UnetRow("label-free", PERBREED, "GrabCut-rectangle masks")
    original = tables.UNET_ROWS
    try:
        tables.UNET_ROWS = (*original, extra)
        t = markdown_table(tables.unets_section(Reports({}, {}, evals)), "## U-Nets")
    finally:
        tables.UNET_ROWS = original
    assert list(t) == ["supervised", "WSSS, same images", "WSSS, all images", "label-free"]
    assert t["label-free"]["IoU"] == "30.00" and t["label-free"]["images"] == "1307"
    # Every train image with GT (the embedded default): said, so the equal rows are not a surprise.
    evals["best"] = _unet_eval(0.55, "ccam_ccam-none", 198, 400, "all")
    assert "both WSSS rows train on the same images" in tables.unets_section(Reports({}, {}, evals))


def test_empty_reports_are_dashes_and_ensemble_uses_params() -> None:
    empty = Reports({}, {}, {})
    assert markdown_table(tables.table1_section(empty), "## Table 1")["CCAM+ECS"]["37-Class IoU"] == "— (24.59)"
    assert "_No report filled any cell of this table yet._" in tables.table2_section(empty)
    unets = markdown_table(tables.unets_section(empty), "## U-Nets")
    assert list(unets) == [row.label for row in tables.UNET_ROWS] and unets["supervised"]["IoU"] == "—"
    params = replace(Params(), make_cams=CamsConfig(ensemble_members=("a", "b"), ensemble_weights=(2.0, 1.0)))
    ens = tables.ensemble_section(Reports({"ensemble": _scores(0.6789, 0.7)}, {}, {}), params)
    row = markdown_table(ens, "## Ensemble of maps")["Ensemble"]
    assert row["members"] == "`a`, `b`" and row["fusion (weights)"] == "mean (2, 1)" and row["val IoU"] == "67.89"
    assert tables.ensemble_section(empty, params) is None


def test_sections_import_neither_torch_nor_mlflow() -> None:
    code = ("import sys, wsss.reporting.tables, wsss.reporting.registry; "
            "print(sorted(m for m in ('torch', 'mlflow', 'matplotlib', 'wsss.stages') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- registry ---------------------------------------------------------------------------------------------
def test_registry_section() -> None:
    assert registry.aliases(None) == {"unet-best": registry.CHAMPION, "unet-gt": registry.SUPERVISED}
    selftrain = {"champion": {"round": 2, "model": "unet-selftrain-r2", "val_iou": 0.53},
                 "rounds": [{"round": 0, "model": "unet-best", "val_iou": 0.5}]}
    assert registry.aliases(selftrain) == {"unet-selftrain-r2": registry.CHAMPION, "unet-gt": registry.SUPERVISED}
    assert registry.champion(selftrain)[1] == "self-training round 2: val IoU 53.00 (round 0: 50.00)"
    for bad in ({"champion": {"model": "../models/x"}}, {"champion": {"model": "unet-best"}}, {"champion": 3}, {}):
        assert registry.champion(bad) == ("unet-best", None)  # round 0, chosen by its pseudo-masks
    regs = [registry.Registration("unet-best", registry.CHAMPION, "3", "abc", "models:/m-1", PERBREED),
            registry.Registration("unet-gt", registry.SUPERVISED, note="no finished run")]
    md = registry.registry_section(regs, {PERBREED: {"after": {"iou_mean": 0.6844}}})
    rows = markdown_table(md, "## Model registry")
    assert rows["`unet-best`"]["URI"] == "`models:/wsss-unet@champion` (v3)"
    assert rows["`unet-best`"]["chosen by"] == f"`{PERBREED}`: pseudo-mask IoU 68.44 (non-test)"
    assert rows["`unet-best`"]["status"] == "registered"
    assert rows["`unet-gt`"]["URI"] == "—" and rows["`unet-gt`"]["status"] == "no finished run"
    assert "wsss predict IMAGES --model models:/wsss-unet@champion" in md
    assert registry.registry_section(None, {}) == "## Model registry\n\nSkipped (`--no-register`)."


# --- figures ----------------------------------------------------------------------------------------------
def test_threshold_figure_and_section(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    assert figures.threshold_figure(Reports({"x": {"curve": {}}}, {}, {}), tmp_path / "none.png") is None
    dest = figures.threshold_figure(_reports(), paths.figures / "iou_vs_threshold.png")
    with Image.open(dest) as im:
        assert im.format == "PNG" and im.size[0] > 100
    assert not list(paths.figures.glob(".*.tmp"))
    assert figures.figures_section([dest], paths) == "## Figures\n\n![iou_vs_threshold](figures/iou_vs_threshold.png)"
    assert "None yet" in figures.figures_section([], paths)
    assert figures.figure_rows(paths) == []  # no manifest: no grids


def test_priors_section_and_label_free_unet_row() -> None:
    curve = {"threshold": [round(0.05 * i, 2) for i in range(21)], "iou_mean": [0.01 * i for i in range(21)]}
    cams = {"prior-grabcut": {**_scores(0.3, 0.4), "curve": curve, "best_threshold": 0.45, "best_iou_mean": 0.62}}
    rep = Reports(cams, {"prior-grabcut": {"after": {"iou_mean": 0.66}}},
                  {"prior-grabcut": {"iou_mean": 0.681, "dice_mean": 0.8, "masks": "prior-grabcut"}})
    md = tables.priors_section(rep)
    row = markdown_table(md, "## Label-free priors as maps")["`prior-grabcut`"]
    assert row["IoU at 0.5 (= hard baseline)"] == "10.00" and row["IoU at best τ"] == "62.00"
    assert "test IoU 68.10" in md and "IoU 66.00" in md
    t3 = markdown_table(tables.table3_section(rep), "## Table 3")
    assert t3["U-Net on label-free masks (`prior-grabcut`), test"]["Pretrained IoU"].startswith("68.10")
    assert tables.priors_section(Reports({}, {}, {})) is None
    ens = tables.ensemble_section(Reports({"ensemble": {**_scores(0.6, 0.7), "weights_source": "tuned",
                                                        "members": ["a", "prior-grabcut"], "weights": [0.25, 1.0]}},
                                          {}, {}), Params())
    row = markdown_table(ens, "## Ensemble of maps")["Ensemble"]
    assert row["members"] == "`a`, `prior-grabcut`" and row["fusion (weights)"] == "mean (0.25, 1)"
    assert "tuned on val" in ens


# --- did the models learn -----------------------------------------------------------------------------------


def test_learning_section_verdicts_follow_the_numbers() -> None:
    """Classifiers against chance, learned maps against the ellipse; priors and the ensemble are not judged."""
    cams = {"cam_classifier-species": {"iou_mean": 0.52, "best_iou_mean": 0.55, "baseline_ellipse_iou": 0.40},
            "ccam_ccam-none": {"iou_mean": 0.41, "baseline_ellipse_iou": 0.40},
            "ecs_classifier-species": {"iou_mean": 0.30, "baseline_ellipse_iou": 0.40},
            # judged at the val-chosen (cross-validated) threshold, not at make_cams.threshold
            "cam_classifier-breed": {"iou_mean": 0.20, "cv_iou_mean": 0.47, "baseline_ellipse_iou": 0.40},
            "ecs_classifier-breed": {"iou_mean": 0.50, "cv_iou_mean": 0.38, "baseline_ellipse_iou": 0.40},
            "prior-ellipse": {"iou_mean": 0.9, "baseline_ellipse_iou": 0.40},
            "ensemble": {"iou_mean": 0.9, "baseline_ellipse_iou": 0.40}}
    training = {"classifier-species": {"val_balanced_acc": 0.5, "best_epoch": 0, "n_val": 38},
                "classifier-breed": {"val_balanced_acc": 0.4, "best_epoch": 3},
                "classifier-species-bg": {"val_balanced_acc": 0.6, "best_epoch": 2, "n_val": 38},
                "ccam-none": {"loss": 1.0}}
    rep = Reports(cams, {}, {}, training)
    md = tables.learning_section(rep, {"classifier-species": 0.5, "classifier-breed": 1 / 6,
                                       "classifier-species-bg": 0.5})
    assert md is not None
    cls = {k: r["verdict"] for k, r in markdown_table(md, "| classifier").items()}
    # +10 points on 38 images is within two standard errors of guessing (16 points): not "clearly"
    assert cls == {"classifier-breed": "clearly above chance (+23.3)", "classifier-species": "not above chance (+0.0)",
                   "classifier-species-bg": "above chance, within noise (+10.0)"}
    assert abs(tables.chance_margin(0.5, 38) - 2 * (0.25 / 38) ** 0.5) < 1e-12
    assert tables.chance_margin(0.5, None) == tables.CLEAR_MARGIN
    maps = {k: r["verdict"] for k, r in markdown_table(md, "| map variant").items()}
    assert maps == {"cam_classifier-species": "clearly above the ellipse (+12.0)",
                    "ccam_ccam-none": "above the ellipse, within noise (+1.0)",
                    "ecs_classifier-species": "not above the ellipse (-10.0)",
                    "cam_classifier-breed": "clearly above the ellipse (+7.0)",
                    "ecs_classifier-breed": "not above the ellipse (-2.0)"}
    row = markdown_table(md, "| map variant")["cam_classifier-breed"]
    assert row["IoU at `make_cams.threshold`"] == "20.00" and row["IoU at a val-chosen threshold (k-fold)"] == "47.00"
    assert "1 of 3 classifiers are clearly above chance" in md
    assert "2 of 5 learned map variants clearly above the centred ellipse" in md
    assert tables.learning_section(Reports({}, {}, {}), {}) is None
