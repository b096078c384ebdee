"""The on-demand benchmarks (benchmarks/speed.py, benchmarks/quality.py) on tiny sizes and fake reports."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import hostinfo  # noqa: E402
import pretraining  # noqa: E402
import quality  # noqa: E402
import speed  # noqa: E402
import unet_curve  # noqa: E402
import unet_seeds  # noqa: E402

from wsss.config import params_from_dict  # noqa: E402

# --- speed.py ---------------------------------------------------------------------------------------------


def test_hostinfo_is_one_line_every_benchmark_shares() -> None:
    line = hostinfo.describe()
    assert line.startswith(hostinfo.cpu_model()) and f"{hostinfo.usable_cores()} usable cores" in line
    assert "torch " in line and "threads" in line
    assert "torch" not in hostinfo.describe(with_torch=False)
    assert quality.machine() == line


def test_speed_pieces_on_tiny_sizes() -> None:
    cam = speed.bench_cam("resnet18", 32, 2, 2, (1.0,), repeats=2, compile=False)
    train = speed.bench_training("resnet18", 32, 2, steps=1, warmup=0, repeats=2)
    for row in (cam, train):
        assert row["ours_images_per_s"] > 0 and row["plain_images_per_s"] > 0 and row["ratio"] > 0
        assert len(row["ours_images_per_s_runs"]) == len(row["plain_images_per_s_runs"]) == 2
    assert train["precision"] in ("bfloat16", "fp32")
    assert cam["flops_per_image"] > 0 and "compiled_over_eager" not in cam
    cam["setting"] = train["setting"] = "tiny"
    result = {"machine": speed.machine_info(), "quick": True, "repro": None,
              "ceiling": {"n": 64, "dtype": "bfloat16", "tflops": 1.0},
              "rows": {"cam": cam, "classifier_training": train}}
    md = speed.to_markdown(result)
    assert "| CAM extraction (images/s) | tiny |" in md and "≥ 2.5x" in md and "% of the ceiling" in md
    share = speed.extraction_share(result)
    assert share is not None
    assert share["tflops"] == pytest.approx(cam["ours_images_per_s"] * cam["flops_per_image"] / 1e12)


def test_speed_median_ratio_pairs_adjacent_repeats() -> None:
    # The load doubled between the pairs: the ratio of each pair is 2, whatever the absolute rates.
    assert speed.median_ratio([10.0, 5.0, 10.0], [5.0, 2.5, 5.0]) == 2.0
    assert speed.median_ratio([3.0, 1.0, 2.0], [1.0, 1.0, 1.0]) == 2.0


def test_speed_ceiling_is_a_bf16_product() -> None:
    c = speed.bench_ceiling(64, 2)
    assert c["n"] == 64 and c["dtype"] == "bfloat16" and c["tflops"] > 0


@pytest.mark.slow
def test_speed_quick_writes_json_and_markdown(tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    result = speed.main(["--quick", "--repeats", "2", "--out", str(out)])
    data = json.loads(out.read_text())
    assert set(data["rows"]) == {"cam", "classifier_training", "crf_pool"}
    for row in data["rows"].values():
        assert row["ours_images_per_s"] > 0 and row["plain_images_per_s"] > 0 and row["ratio"] > 0
    assert data["rows"]["crf_pool"]["pool_equals_serial"] is True
    cam = data["rows"]["cam"]
    assert cam["compiled"] and cam["compiled_over_eager"] > 0 and cam["max_abs_diff_vs_eager"] < 0.1
    assert 0 < data["extraction_share"]["fraction_of_ceiling"]
    assert data["repro"] is None and data["machine"]["torch_threads"] >= 1
    md = out.with_suffix(".md").read_text()
    assert "CAM extraction" in md and "not run (`--repro` runs it)" in md and "`torch.compile` gain" in md
    assert result["verdicts"]["classifier_training"] == "report"


def test_speed_repro_stage_seconds_run_to_the_next_stage() -> None:
    starts = [("generate", 0.0), ("train@a", 2.5), ("train@b", 10.0)]
    assert speed.stage_seconds(starts, 12.0) == {"generate": 2.5, "train@a": 7.5, "train@b": 2.0}
    assert speed.stage_seconds([], 3.0) == {}
    lines = speed.repro_stage_table({"generate": 2.5, "train@a": 7.5, "train@b": 2.0}, 12.0)
    rows = [line for line in lines if line.startswith("| `")]
    assert rows == ["| `train` | 2 | 10 | 79 % |", "| `generate` | 1 | 2 | 21 % |"]


def _fake_dvc(bin_dir: Path, body: str) -> dict[str, str]:
    bin_dir.mkdir()
    exe = bin_dir / "dvc"
    exe.write_text("#!/bin/sh\n" + body)
    exe.chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin"}


def test_speed_timed_repro_reads_stages_from_dvc_output(tmp_path: Path) -> None:
    env = _fake_dvc(tmp_path / "bin", "echo \"Running stage 'a':\"; echo '> wsss a'; sleep 0.3; "
                                      "echo \"Running stage 'b@x':\"; echo done\n")
    total, stages = speed.timed_repro(tmp_path, env, timeout_s=30)
    assert list(stages) == ["a", "b@x"] and stages["a"] >= 0.3 and total >= sum(stages.values()) - 0.2


def test_speed_timed_repro_fails_on_a_failed_or_hung_repro(tmp_path: Path) -> None:
    env = _fake_dvc(tmp_path / "bin", "echo \"Running stage 'a':\"; echo 'ERROR: broken'; exit 3\n")
    with pytest.raises(RuntimeError, match=r"exit 3\)[\s\S]*ERROR: broken"):
        speed.timed_repro(tmp_path, env, timeout_s=30)
    env = _fake_dvc(tmp_path / "bin2", "exec sleep 30\n")
    with pytest.raises(RuntimeError, match="ran past 1 s"):
        speed.timed_repro(tmp_path, env, timeout_s=1)


def test_speed_markdown_shows_the_repro_target_and_stages() -> None:
    result = {"machine": speed.machine_info(), "quick": True, "rows": {},
              "repro": {"cold_s": 700.0, "noop_s": 5.0, "stages": {"a": 400.0, "b": 300.0},
                        "target_cold_s": speed.REPRO_TARGET_S, "verdict": "FAIL"}}
    md = speed.to_markdown(result)
    assert "| `dvc repro` (fresh clone) | cold / no-op | 700 s | 5.0 s | — | cold ≤ 600 s | FAIL |" in md
    assert "| `a` | 1 | 400 | 57 % |" in md


def test_speed_verdicts() -> None:
    assert speed.verdict("cam", 2.5) == "pass" and speed.verdict("cam", 2.49) == "FAIL"
    assert speed.verdict("crf_pool", 1.9) == "pass" and speed.verdict("crf_pool", 1.2) == "FAIL"
    assert speed.verdict("classifier_training", 0.5) == "report"


# --- quality.py: arguments, profiles, plan -------------------------------------------------------------


def test_quality_args() -> None:
    args = quality.parse_args(["--train-root", "a", "--extra-train-root", "b", "--extra-train-root", "c",
                               "--out", "r.json"])
    assert args.train_root == Path("a") and args.extra_train_root == [Path("b"), Path("c")]
    assert args.profile == "cpu" and args.eval_root is None and args.workdir is None
    with pytest.raises(SystemExit):
        quality.parse_args(["--out", "r.json"])  # --train-root is required


@pytest.mark.parametrize("name", ["cpu", "gpu", "smoke"])
def test_profiles_merge_into_valid_params(name: str, tmp_path: Path) -> None:
    profile = quality.load_profile(name)
    plan = quality.build_plan(profile, tmp_path / "pets", [tmp_path / "extra"], imagenet_check=lambda arch: False)
    params = params_from_dict(plan.params, f"{name}.yaml")  # the strict loader accepts the merged params
    assert params.base.dataset == "oxford-pet" and params.base.background_root is None
    assert params.base.data_root == str((tmp_path / "pets").resolve())
    assert params.base.extra_roots == (str((tmp_path / "extra").resolve()),)
    assert plan.variants and not any(plan.imagenet.values())
    assert plan.rounds == list(range(1, params.self_train.rounds + 1)) and plan.rounds  # self-training runs
    assert all(v.split("_", 1)[0] in ("cam", "ecs", "ccam", "ccam-ecs") for v in plan.variants)


def test_cpu_profile_is_small_enough() -> None:
    p = quality.build_plan(quality.load_profile("cpu"), Path("x"), [], imagenet_check=lambda a: False).params
    assert p["train_classifier"]["arch"] == "resnet18" and p["train_classifier"]["input_size"] <= 160
    assert 128 <= p["train_unet"]["input_size"] <= 160


def test_imagenet_when_cached(tmp_path: Path) -> None:
    plan = quality.build_plan(quality.load_profile("cpu"), tmp_path, [], imagenet_check=lambda arch: True)
    assert plan.imagenet == {"classifier": True, "ccam": True, "unet": True}
    assert plan.params["train_classifier"]["weights"] == "imagenet"
    assert plan.params["train_unet"]["encoder_weights"] == "imagenet"
    assert "imagenet" in plan.ccam_inits and "ccam_ccam-imagenet" in plan.variants
    params_from_dict(plan.params)


def test_deep_merge_does_not_alias() -> None:
    base = {"a": {"b": 1, "c": [1]}, "d": 2}
    merged = quality.deep_merge(base, {"a": {"b": 3}, "e": {"f": 4}})
    assert merged == {"a": {"b": 3, "c": [1]}, "d": 2, "e": {"f": 4}}
    merged["a"]["c"].append(2)
    assert base["a"]["c"] == [1]


def test_unknown_profile_and_bad_maps(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        quality.load_profile("nope")
    bad = tmp_path / "p.yaml"
    bad.write_text("steps:\n  maps: [cam]\n")
    with pytest.raises(SystemExit):
        quality.build_plan(quality.load_profile(str(bad)), tmp_path, [], imagenet_check=lambda a: False)


# --- quality.py: eval root, reports, summary -------------------------------------------------------------


def _oxford_root(root: Path, trainval: list[str], test: list[str]) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "annotations" / "trimaps").mkdir(parents=True)
    (root / "annotations" / "trainval.txt").write_text("".join(f"{n} 1 1 1\n" for n in trainval))
    (root / "annotations" / "test.txt").write_text("#comment\n" + "".join(f"{n} 2 2 1\n" for n in test))
    return root


def test_eval_root_view_lists_every_image_as_test(tmp_path: Path) -> None:
    src = _oxford_root(tmp_path / "src", ["a_1", "b_2"], ["c_3"])
    assert quality.split_names(src) == {"a_1", "b_2", "c_3"}
    view = quality.make_eval_root(src, tmp_path / "view")
    assert not (view / "annotations" / "trainval.txt").exists()
    assert [ln.split()[0] for ln in (view / "annotations" / "test.txt").read_text().splitlines()] == ["a_1", "b_2", "c_3"]
    assert (view / "images").resolve() == (src / "images").resolve()


def _fake_reports(root: Path, variants: list[str]) -> None:
    def scores(iou: float) -> dict[str, float]:
        return {"iou_mean": iou, "dice_mean": iou + 0.1, "iou_dataset": iou, "miou": iou}

    (root / "reports" / "eval-pseudo").mkdir(parents=True)
    (root / "reports" / "eval").mkdir(parents=True)
    for i, v in enumerate(variants):
        (root / "reports" / "eval-pseudo" / f"{v}.json").write_text(json.dumps(
            {"variant": v, "refiner": "crf", "n_images": 7, "before": scores(0.3), "after": scores(0.4 + 0.1 * i)}))
    def unet(iou: float, n_images: int) -> dict[str, object]:
        return {**scores(iou), "training": {"steps": 400, "n_images": n_images, "images": "gt", "epochs": 34}}

    (root / "reports" / "eval" / "best.json").write_text(json.dumps(unet(0.55, 1307)))  # unet-best: variants[1]
    (root / "reports" / "eval" / "same-best.json").write_text(json.dumps(unet(0.525, 198)))
    (root / "reports" / "eval" / "gt.json").write_text(json.dumps(unet(0.7, 198)))
    (root / "reports" / "eval" / "prior-grabcut.json").write_text(json.dumps(unet(0.681, 1307)))
    (root / "reports" / "eval" / "baselines.json").write_text(json.dumps(
        {"whole_image": scores(0.3), "ellipse": scores(0.456), "grabcut_rect": scores(0.5), "split": "test"}))


def test_tuned_val_iou_reads_the_last_study(tmp_path: Path) -> None:
    study = tmp_path / "studies" / "ensemble"
    study.mkdir(parents=True)
    (study / "study.json").write_text(json.dumps({"best_trial": 3, "best_value": 0.589, "n_images": 50}))
    assert quality.tuned_val_iou(tmp_path, "ensemble") == pytest.approx(0.589)
    (study / "study.json").write_text(json.dumps({"best_trial": None, "best_value": None, "n_images": 50}))
    with pytest.raises(quality.StepFailed, match="ensemble"):
        quality.tuned_val_iou(tmp_path, "ensemble")


def test_collect_and_summary_line(tmp_path: Path) -> None:
    plan = quality.build_plan(quality.load_profile("smoke"), tmp_path, [], imagenet_check=lambda a: False)
    best = plan.variants[1]
    _fake_reports(tmp_path, plan.variants)
    got = quality.collect(tmp_path, plan, best, {v: 0.5 for v in plan.variants})
    assert got["summary"] == pytest.approx({"pseudo_iou": 50.0, "wsss_unet_iou": 55.0, "supervised_unet_iou": 70.0,
                                            "ellipse_iou": 45.6, "grabcut_iou": 50.0, "label_free_unet_iou": 68.1,
                                            "same_images_unet_iou": 52.5,
                                            "wsss_unet_steps": 400, "same_images_unet_steps": 400,
                                            "supervised_unet_steps": 400, "label_free_unet_steps": 400})
    line = quality.summary_line(got["summary"])
    assert line == ("pseudo_iou=50.0 wsss_unet_iou=55.0 supervised_unet_iou=70.0 ellipse_iou=45.6 grabcut_iou=50.0 "
                    "label_free_unet_iou=68.1 same_images_unet_iou=52.5 wsss_unet_steps=400 "
                    "same_images_unet_steps=400 supervised_unet_steps=400 label_free_unet_steps=400")
    assert "U-Net on label-free rectangle-GrabCut masks (no labels)" in [r["name"] for r in got["rows"]]

    # a self-training round that beats round 0 on val is the WSSS U-Net of the summary (its test score only shown)
    (tmp_path / "reports" / "self-training.json").write_text(json.dumps({"champion": {
        "round": 2, "model": "unet-selftrain-r2", "val_iou": 0.6}}))
    (tmp_path / "reports" / "eval" / "selftrain-r2.json").write_text(json.dumps(
        {"iou_mean": 0.58, "dice_mean": 0.7, "training": {"steps": 400, "n_images": 1307}}))
    champ = quality.collect(tmp_path, plan, best, {v: 0.5 for v in plan.variants})
    assert champ["summary"]["wsss_unet_iou"] == pytest.approx(58.0)
    assert "U-Net self-training round 2 (champion, chosen on val)" in [r["name"] for r in champ["rows"]]
    (tmp_path / "reports" / "self-training.json").write_text(json.dumps({"champion": {"round": 0, "model": "unet-best"}}))
    assert quality.collect(tmp_path, plan, best, {})["summary"]["wsss_unet_iou"] == pytest.approx(55.0)
    (tmp_path / "reports" / "self-training.json").unlink()
    assert quality.summary_line({"pseudo_iou": math.nan}).startswith("pseudo_iou=nan wsss_unet_iou=nan")
    assert quality.summary_line({}).endswith("supervised_unet_steps=nan label_free_unet_steps=nan")
    result = {"profile": "smoke", "train_root": "t", "extra_train_roots": ["x"], "machine": "m",
              "eval": {"description": "the test split", "n_images": 7}, "imagenet_summary": "no",
              "total_seconds": 60.0, "steps": [{"step": "prepare", "project": "train", "command": "wsss prepare",
                                                "seconds": 1.0, "rc": 0}], "summary_line": line, **got}
    md = quality.to_markdown(result)
    assert "(selected)" in md and "| prepare | train | `wsss prepare` | 1.0 |" in md and line in md
    assert f"| U-Net on pseudo-masks ({best}), the GT train images only | 52.5 | 62.5 | — | — | 198 | 400 |" in md
    assert f"| U-Net on pseudo-masks ({best}), all train images | 55.0 | 65.0 | — | — | 1307 | 400 |" in md


# --- pretraining.py ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cpu", "gpu", "smoke"])
def test_pretraining_routes_differ_only_in_the_backbone_start(name: str, tmp_path: Path) -> None:
    plan = quality.build_plan(quality.load_profile(name), tmp_path, [], imagenet_check=lambda a: False)
    scratch = params_from_dict(pretraining.route_params(plan.params, None), "scratch")
    moco = params_from_dict(pretraining.route_params(plan.params, "mocov2"), "mocov2")
    assert scratch.train_classifier.weights == "none" and moco.train_classifier.weights == "pretrain:mocov2"
    assert moco.pretrain.method == "mocov2" and moco.pretrain.name == "mocov2"
    assert moco.pretrain.arch == moco.train_classifier.arch == moco.train_ccam.arch  # the backbone must load
    assert scratch.train_ccam == moco.train_ccam and scratch.tune == moco.tune and scratch.make_cams == moco.make_cams
    assert pretraining.ccam_model(None) == "ccam-none" and pretraining.ccam_model("simsiam") == "ccam-pre-simsiam"


def test_pretraining_rejects_unknown_methods(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="unknown"):
        pretraining.main(["--train-root", str(tmp_path), "--methods", "simsiam,byol", "--out", str(tmp_path / "r.json")])


def _fake_route(project: Path, method: str | None, ccam_iou: float) -> None:
    variant = f"ccam_{pretraining.ccam_model(method)}"
    reports = project / "reports"
    for sub in ("cams", "eval-pseudo", "crf", "training", "eval"):
        (reports / sub).mkdir(parents=True, exist_ok=True)
    (reports / "cams" / "cam_classifier-species.json").write_text(json.dumps({"iou_mean": 0.24, "best_iou_mean": 0.36}))
    (reports / "cams" / f"{variant}.json").write_text(json.dumps(
        {"iou_mean": ccam_iou, "best_iou_mean": ccam_iou + 0.02, "baseline_whole_iou": 0.37,
         "baseline_ellipse_iou": 0.49}))
    (reports / "crf" / f"{variant}.yaml").write_text(
        "# Best of Optuna study 'x' (16 trials): trial 3, mean val fg IoU 0.5899 on 50 images.\npseudo: {}\n")
    (reports / "eval-pseudo" / f"{variant}.json").write_text(json.dumps(
        {"refiner": "grabcut", "n_images": 222, "before": {"iou_mean": 0.38}, "after": {"iou_mean": 0.62}}))
    if method:
        (reports / "training" / f"pretrain-{method}.json").write_text(json.dumps(
            {"epochs": 40, "train_seconds": 840.0, "images_per_s": 77.0, "knn_balanced_acc": 0.5,
             "knn_balanced_acc_init": 0.6, "knn_loo_balanced_acc": 0.55, "knn_loo_balanced_acc_init": 0.56}))
    else:
        (reports / "eval" / "baselines.json").write_text(json.dumps(
            {k: {"iou_mean": v} for k, v in (("whole_image", 0.336), ("ellipse", 0.481), ("grabcut_rect", 0.665))}))


def test_pretraining_collects_routes_into_tables(tmp_path: Path) -> None:
    _fake_route(tmp_path / "scratch", None, 0.41)
    _fake_route(tmp_path / "simsiam", "simsiam", 0.30)
    routes = [pretraining.collect_route(tmp_path / "scratch", None),
              pretraining.collect_route(tmp_path / "simsiam", "simsiam")]
    assert routes[0]["ccam_val_iou"] == pytest.approx(41.0) and routes[0]["pseudo_val_iou"] == pytest.approx(58.99)
    assert "pretrain" not in routes[0] and routes[1]["pretrain"]["knn_loo_balanced_acc"] == 0.55
    result = {"profile": "cpu", "train_root": "t", "extra_train_roots": [], "machine": "m", "total_seconds": 120.0,
              "routes": routes, "baselines": pretraining.baselines(tmp_path / "scratch"),
              "steps": [{"step": "scratch: prepare", "seconds": 2.0}]}
    line = pretraining.summary_line(result)
    assert line == ("scratch: ccam_val=41.0 pseudo_test=62.0 | simsiam: ccam_val=30.0 pseudo_test=62.0 | "
                    "grabcut_rect=66.5")
    md = pretraining.to_markdown(result)
    assert "| scratch | 24.0 | 41.0 (43.0) | 59.0 | 38.0 → 62.0 | grabcut |" in md
    assert "| simsiam | 40 | 14.0 | 77.0 | 0.600 → 0.500 | 0.560 → 0.550 |" in md and line in md
    (tmp_path / "bad.yaml").write_text("pseudo: {}\n")
    with pytest.raises(quality.StepFailed, match="mean val fg IoU"):
        pretraining.tuned_val_iou(tmp_path / "bad.yaml")


def _steps_fixture(root: Path, plan: quality.Plan, best: str) -> dict:
    _fake_reports(root, plan.variants)
    (root / "reports" / "eval-pseudo" / "ensemble.json").write_text(json.dumps(
        {"before": {"iou_mean": 0.35}, "after": {"iou_mean": 0.45}}))
    (root / "reports" / "cams").mkdir(parents=True)
    (root / "reports" / "cams" / f"{plan.variants[0]}.json").write_text(json.dumps(
        {"baseline_whole_iou": 0.2, "baseline_ellipse_iou": 0.4}))
    (root / "reports" / "training").mkdir(parents=True)
    for source, val in (("best", 0.51), ("gt", 0.66), ("prior-grabcut", 0.6)):
        (root / "reports" / "training" / f"unet-{source}.json").write_text(json.dumps({"last_val_iou_mean": val,
                                                                                         "train_seconds": 100.04}))
    snap = {"val_map_iou": 0.3, "threshold": 0.25, "config": "tuned", "refiner": "crf", "val_best_iou": 0.43,
            "best_threshold": 0.15}
    ens = {"eval": {"before": {"iou_mean": 0.35}, "after": {"iou_mean": 0.45}}, "val_pseudo_iou": 0.44}
    return {**{v: snap for v in plan.variants}, "prior-grabcut": {**snap, "val_map_iou": 0.55, "config": "label-free"},
            "ensemble (without priors)": {**snap, **ens, "members": plan.variants, "weights": [0.7, 0.3]},
            "ensemble (with priors)": {**snap, **ens, "members": [*plan.variants, "prior-grabcut", "prior-ellipse"],
                                       "weights": [0.5, 0.2, 0.3, 0.0]},
            "self-training": {"note": "not run: this wsss has no `self-train` command"}}


def test_steps_table_has_every_step_chosen_on_val(tmp_path: Path) -> None:
    plan = quality.build_plan(quality.load_profile("smoke"), tmp_path, [], imagenet_check=lambda a: False)
    best = plan.variants[1]
    step_maps = _steps_fixture(tmp_path, plan, best)
    rows = quality.steps_table(tmp_path, tmp_path, plan, best, {v: 0.5 for v in plan.variants}, step_maps)
    by = {r["step"]: r for r in rows}
    steps = [r["step"] for r in rows]
    assert steps[:4] == ["label-free: whole image", "label-free: centred ellipse",
                         "label-free: GrabCut from a centred rectangle", "label-free: U-Net on the rectangle-GrabCut masks"]
    assert steps[-3:] == ["U-Net round 1 (self-training)", "U-Net round 2 (self-training)",
                          "supervised U-Net (GT masks) at equal steps"]
    assert (by["label-free: GrabCut from a centred rectangle"]["val_iou"],
            by["label-free: GrabCut from a centred rectangle"]["test_iou"]) == pytest.approx((55.0, 50.0))
    assert by["label-free: U-Net on the rectangle-GrabCut masks"]["val_iou"] == pytest.approx(60.0)
    assert by[f"map: CAM ({plan.variants[0]})"]["test_iou"] == pytest.approx(30.0)  # eval-pseudo "before"
    with_priors = by["map: ensemble with priors"]
    assert "prior-grabcut 0.3" in with_priors["chosen_by"] and "tune ensemble" in with_priors["chosen_by"]
    assert "selected" in by[f"pseudo-masks {best} after the tuned refiner"]["chosen_by"]
    assert by[f"U-Net round 0 (pseudo-masks {best}, all train images)"]["val_iou"] == pytest.approx(51.0)
    assert by["supervised U-Net (GT masks) at equal steps"]["steps"] == 400
    assert by["U-Net round 1 (self-training)"]["status"] == "not run"
    assert not any("test" in r["chosen_by"] for r in rows)  # nothing is chosen on the test split
    md = quality.steps_markdown({"profile": "smoke", "eval": "the test split", "rows": rows})
    assert "| U-Net round 2 (self-training) | not run | not run | not run: this wsss has no `self-train` command | |" in md
    # a map row also shows the map at its own best val threshold (no such cell on other rows)
    cam_row = next(line for line in md.splitlines() if line.startswith(f"| map: CAM ({plan.variants[0]})"))
    assert cam_row.endswith("| 43.0 (τ 0.15) |") and "threshold 0.25, where its tuned refiner decides" in cam_row
    assert by["label-free: centred ellipse"].get("val_best_iou") is None

    # rounds the self-training stage reports are read, and scored from their eval report when it has none
    (tmp_path / "reports" / "self-training.json").write_text(json.dumps({"rounds": [
        {"round": 1, "val_iou_mean": 0.53, "test_iou_mean": 0.56, "kept": True},
        {"round": 2, "val_iou": 0.52, "model": "unet-round-2", "kept": False}]}))
    (tmp_path / "reports" / "eval" / "round-2.json").write_text(json.dumps({"iou_mean": 0.54}))
    rounds = quality.self_training_rows(tmp_path, tmp_path, "ran")
    assert [v for r in rounds for v in (r["val_iou"], r["test_iou"])] == pytest.approx([53.0, 56.0, 52.0, 54.0])
    assert "not the champion" in rounds[1]["chosen_by"] and "not the champion" not in rounds[0]["chosen_by"]

    # the stage's own file: "kept" follows its champion, chosen on val
    (tmp_path / "reports" / "self-training.json").write_text(json.dumps({"selected_on": "val", "rounds": [
        {"round": 0, "model": "unet-best", "val_iou": 0.51}, {"round": 1, "model": "unet-selftrain-r1", "val_iou": 0.53},
        {"round": 2, "model": "unet-selftrain-r2", "val_iou": 0.52}],
        "champion": {"round": 1, "model": "unet-selftrain-r1", "val_iou": 0.53}}))
    (tmp_path / "reports" / "eval" / "selftrain-r1.json").write_text(json.dumps({"iou_mean": 0.57}))
    rounds = quality.self_training_rows(tmp_path, tmp_path, "ran", plan.rounds)
    assert rounds[0]["test_iou"] == pytest.approx(57.0) and math.isnan(rounds[1]["test_iou"])  # r2 not evaluated
    assert "champion (best val round)" in rounds[0]["chosen_by"] and "not the champion" in rounds[1]["chosen_by"]


# --- unet_seeds.py ----------------------------------------------------------------------------------------


def _unet_reports(project: Path, masks: str, val: float, test: float) -> None:
    (project / "reports" / "training").mkdir(parents=True, exist_ok=True)
    (project / "reports" / "eval").mkdir(parents=True, exist_ok=True)
    (project / "reports" / "training" / f"unet-{masks}.json").write_text(json.dumps({"last_val_iou_mean": val,
                                                                                         "train_seconds": 100.04}))
    (project / "reports" / "eval" / f"{masks}.json").write_text(json.dumps(
        {"iou_mean": test, "dice_mean": test + 0.1, "n_images": 222, "training": {"steps": 400}}))


def test_unet_seeds_chooses_the_threshold_on_val_only() -> None:
    def images(mean: float, spread: float = 0.0) -> np.ndarray:  # 4 images with this mean IoU
        return mean + spread * np.array([1.0, -1.0, 1.0, -1.0])

    val = {0.4: images(0.60), 0.5: images(0.62), 0.6: images(0.64, 0.2), 0.7: images(0.64, 0.2)}
    test = {0.4: images(0.70), 0.5: images(0.66), 0.6: images(0.61), 0.7: images(0.69)}
    chosen = unet_seeds.choose_threshold(val, test, min_gain_se=2.0)
    assert {k: round(v, 6) for k, v in chosen.items() if k not in ("gain", "gain_se")} == {
        "threshold": 0.6, "val_iou": 0.64, "test_iou": 0.61,  # the tie on val: nearest 0.5
        "val_iou_default": 0.62, "test_iou_default": 0.66,  # test's own best (0.4) is never chosen
        "guarded_threshold": 0.5, "guarded_test_iou": 0.66}  # a 0.02 gain with a 0.12 standard error: not kept
    assert chosen["gain"] == pytest.approx(0.02) and chosen["gain_se"] == pytest.approx(0.2 * 2 / np.sqrt(12))
    assert unet_seeds.choose_threshold(val, test, min_gain_se=0.0)["guarded_threshold"] == 0.6


def test_unet_seeds_retrains_each_source_per_seed_and_pairs_them(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "work"
    quality.write_params(source, {"base": {"seed": 0}})
    for rel in ("data/prepared", "masks/ensemble", "reports/pseudo"):
        (source / rel).mkdir(parents=True)
    _unet_reports(source, "best", 0.60, 0.66)
    _unet_reports(source, "gt", 0.64, 0.68)
    calls: list[tuple[Path, tuple[str, ...]]] = []
    scores = {1: {"best": (0.62, 0.67), "gt": (0.65, 0.69)}, 2: {"best": (0.61, 0.65), "gt": (0.63, 0.70)}}

    def runner_for(root: Path) -> Any:
        seed = unet_seeds.base_seed(root)

        class Fake:
            steps: list[dict[str, Any]] = []

            def __call__(self, name: str, *args: str) -> None:
                calls.append((root, args))
                if args[0] == "evaluate":
                    masks = args[-1].removeprefix("unet-")
                    _unet_reports(root, masks, *scores[seed][masks])
        return Fake()

    scanned: list[tuple[str, str]] = []

    def scan(project: Path, masks: str) -> dict[str, dict[str, float]]:
        scanned.append((project.name, masks))
        t = 0.6 if masks == "best" else 0.5
        one = {"threshold": t, "val_iou": 0.6, "test_iou": 0.7, "val_iou_default": 0.55, "test_iou_default": 0.65}
        return {"plain": one, "flip_tta": {**one, "test_iou": 0.71}}

    monkeypatch.setattr(unet_seeds, "scan_thresholds", scan)
    args = unet_seeds.parse_args(["--project", str(source), "--masks", "best", "gt", "--seeds", "1", "2",
                                  "--workdir", str(tmp_path / "seeds"), "--out", str(tmp_path / "out" / "s.json")])
    result = unet_seeds.run(args, runner_for=runner_for)
    assert sorted(scanned) == sorted((p, m) for p in ("work", "seed-1", "seed-2") for m in ("best", "gt"))
    thresholds = result["summary"]["decision_thresholds"]["best"]["plain"]
    assert thresholds["thresholds"] == [0.6, 0.6, 0.6] and thresholds["test_at_chosen"]["mean"] == pytest.approx(70.0)

    assert result["seeds"] == [0, 1, 2]
    assert [c[1][0] for c in calls] == ["train-unet", "evaluate"] * 4
    seed1 = tmp_path / "seeds" / "seed-1"
    assert unet_seeds.base_seed(seed1) == 1 and (seed1 / "masks").is_symlink() and (seed1 / "reports" / "pseudo").is_symlink()
    assert json.loads((source / "reports" / "eval" / "best.json").read_text())["iou_mean"] == 0.66  # never written
    best = result["summary"]["per_source"]["best"]["test"]
    assert (best["n"], best["mean"], best["min"], best["max"]) == (3, pytest.approx(66.0), 65.0, 67.0)
    pair = result["summary"]["paired_differences"]["best - gt"]
    assert pair["test_per_seed"] == pytest.approx([-2.0, -2.0, -5.0])
    md = (tmp_path / "out" / "s.md").read_text()
    assert "| `best` | 61.00 ± 1.00 (60.0–62.0) | 66.00 ± 1.00 (65.0–67.0) | 66.0, 67.0, 65.0 |" in md
    assert "| best - gt | -3.00 ± 1.73 (-5.0–-2.0) |" in md
    assert "| `best` | 0.6, 0.6, 0.6 | 65.00 ± 0.00 (65.0–65.0) | 70.00 ± 0.00 (70.0–70.0) |" in md

    # a rerun keeps what is already trained and evaluated; --no-thresholds skips the scan
    calls.clear()
    scanned.clear()
    again = unet_seeds.run(unet_seeds.parse_args([*map(str, (
        "--project", source, "--masks", "best", "gt", "--seeds", 1, 2, "--workdir", tmp_path / "seeds",
        "--out", tmp_path / "out" / "s.json")), "--no-thresholds"]), runner_for=runner_for)
    assert calls == [] and scanned == [] and again["summary"]["decision_thresholds"] == {}


def test_unet_seeds_needs_a_finished_project(tmp_path: Path) -> None:
    quality.write_params(tmp_path, {"base": {"seed": 0}})
    args = unet_seeds.parse_args(["--project", str(tmp_path), "--masks", "best", "--seeds", "1",
                                  "--out", str(tmp_path / "s.json"), "--no-thresholds"])
    with pytest.raises(quality.StepFailed, match="unet-best has no training or evaluation report"):
        unet_seeds.run(args)
    with pytest.raises(SystemExit):
        unet_seeds.parse_args(["--project", str(tmp_path / "nope")])


# --- unet_curve.py ----------------------------------------------------------------------------------------


def test_unet_curve_trains_each_point_in_a_sibling_and_chooses_on_val_only(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    from wsss.paths import Paths

    # (val, test) per point and source: 176x400 wins on test, 128x800 on mean val -> 128x800 is chosen
    scores = {"128x400": {"gt": (0.60, 0.66), "prior-grabcut": (0.62, 0.67)},
              "128x800": {"gt": (0.66, 0.64), "prior-grabcut": (0.63, 0.65)},
              "176x400": {"gt": (0.61, 0.75), "prior-grabcut": (0.64, 0.76)}}
    calls: list[tuple[str, tuple[str, ...]]] = []

    def runner_for(root: Path) -> Any:
        class Fake:
            def __init__(self) -> None:
                self.steps: list[dict[str, Any]] = []

            def __call__(self, name: str, *args: str) -> None:
                calls.append((root.name, args))
                self.steps.append({"step": name, "seconds": 5.0})
                paths = Paths(root)
                if args[0] == "prepare":
                    paths.manifest.parent.mkdir(parents=True, exist_ok=True)
                    paths.manifest.write_text("fake")
                elif args[0] == "make-pseudo":
                    paths.pseudo_report(quality.LABEL_FREE).parent.mkdir(parents=True, exist_ok=True)
                    paths.pseudo_report(quality.LABEL_FREE).write_text("{}")
                elif args[0] == "evaluate":
                    masks = args[-1].removeprefix("unet-")
                    _unet_reports(root, masks, *scores[root.name][masks])
        return Fake()

    monkeypatch.setattr(unet_curve, "n_val", lambda project: 50)
    (tmp_path / "pets" / "annotations").mkdir(parents=True)
    (tmp_path / "pets" / "annotations" / "trainval.txt").write_text("")
    argv = ["--train-root", str(tmp_path / "pets"), "--workdir", str(tmp_path / "curve"),
            "--points", "128x400", "128x800", "176x400", "--out", str(tmp_path / "out" / "c.json")]
    result = unet_curve.run(unet_curve.parse_args(argv), runner_for=runner_for)
    assert result["chosen_point"] == "128x800" and result["default_point"] == "128x400"
    assert [c for c in calls if c[0] == "base"] == [
        ("base", ("prepare",)), ("base", ("make-cams", "--method", "prior-grabcut")),
        ("base", ("make-pseudo", "--method", "prior-grabcut"))]
    assert sum(c[1][0] == "train-unet" for c in calls) == 6
    params = yaml.safe_load((tmp_path / "curve" / "176x400" / "params.yaml").read_text())
    assert (params["train_unet"]["input_size"], params["train_unet"]["steps"]) == (176, 400)
    assert params["train_unet"]["batch_size"] == quality.load_profile("cpu")["params"]["train_unet"]["batch_size"]
    assert (tmp_path / "curve" / "176x400" / "data").is_symlink()
    assert result["runs"]["gt"]["176x400"]["test_iou"] == 0.75 and result["runs"]["gt"]["128x800"]["train_seconds"] == 100.0
    md = (tmp_path / "out" / "c.md").read_text()
    assert "| `128x800` (chosen) | 66.0 | 64.0 | 63.0 | 65.0 | 64.5 | 100, 100 |" in md

    # a rerun reuses every finished U-Net and the base
    calls.clear()
    again = unet_curve.run(unet_curve.parse_args(argv), runner_for=runner_for)
    assert calls == [] and again["chosen_point"] == "128x800"


def test_unet_curve_rejects_bad_points_and_a_root_without_trainval(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "trainval.txt").write_text("")
    base = ["--train-root", str(tmp_path), "--workdir", "w", "--points"]
    for bad in (["128"], ["0x400"], ["128xabc"], ["128x400", "128X400"]):
        with pytest.raises(SystemExit):
            unet_curve.parse_args([*base, *bad])
    assert unet_curve.parse_args([*base, "128x400"]).points == [(128, 400)]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        unet_curve.parse_args(["--train-root", str(tmp_path.parent), "--workdir", "w"])
    assert f"--train-root {tmp_path.parent}: no annotations/trainval.txt" in capsys.readouterr().err
    assert unet_curve.point("176X800") == (176, 800)


def test_benchmark_cli_reports_a_failed_step_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    def fails(args: Any) -> dict[str, Any]:
        raise quality.StepFailed("train-unet gt failed (rc=1); see /w/unet-curve.log")

    assert unet_seeds.cli([], lambda argv: None, fails, str) == 1
    assert capsys.readouterr().err == "error: train-unet gt failed (rc=1); see /w/unet-curve.log\n"
    assert unet_seeds.cli([], lambda argv: None, lambda args: {"ok": 1}, lambda r: f"done {r['ok']}") == 0
    assert capsys.readouterr().out == "done 1\n"
