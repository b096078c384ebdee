"""benchmarks/gpu_check.py (+ its lock and profiles) and benchmarks/scaling.py on tiny inputs; nothing is measured."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_check  # noqa: E402
import quality  # noqa: E402
import scaling  # noqa: E402

from wsss.config import params_from_dict  # noqa: E402


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock() -> tuple[dict[str, str], dict[str, str]]:
    text = (BENCH / "gpu_check.lock").read_text()
    head, tail = text.split("# their needs", 1)

    def pins(block: str) -> dict[str, str]:
        return {_norm(ln.split("==")[0]): ln.split("==")[1].strip() for ln in block.splitlines()
                if "==" in ln and not ln.startswith("#")}

    return pins(head), pins(tail)


# --- the lock ----------------------------------------------------------------------------------------------


def test_lock_agrees_with_constraints_and_carries_nothing_the_gpu_image_has() -> None:
    top, needs = _lock()
    constraints = {_norm(ln.split("==")[0]): ln.split("==")[1].strip()
                   for ln in (REPO / "requirements" / "constraints.txt").read_text().splitlines() if "==" in ln}
    assert top["mlflow-skinny"] == constraints["mlflow"]
    for name, version in top.items():
        if name in constraints:
            assert constraints[name] == version, name
    # What the image lacks of wsss's dependencies is all in the first block; dvc is not carried.
    assert {"optuna", "great-expectations", "segmentation-models-pytorch", "pydensecrf2", "sqlalchemy"} <= set(top)
    assert "dvc" not in top and "mlflow" not in top
    assert not set(top) & set(needs), "one version of each package"
    device = {_norm(ln) for ln in (BENCH / "gpu_check.device.txt").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")}
    assert {"torch", "numpy", "pandas", "pyarrow", "typer", "rich"} <= device
    assert not (set(top) | set(needs)) & (device - {"typing-extensions"})
    assert not any(n.startswith("nvidia-") or n in ("torch", "torchvision", "triton") for n in needs)


# --- profiles -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpu-check", "gpu-check-tiny"])
def test_gpu_check_profiles_are_valid(name: str, tmp_path: Path) -> None:
    plan = quality.build_plan(quality.load_profile(name), tmp_path / "pets", [tmp_path / "extra"], "cuda",
                              imagenet_check=lambda arch: True)
    params = params_from_dict(plan.params, f"{name}.yaml")
    assert params.base.device == "cuda" and not any(plan.imagenet.values())  # imagenet: never (no network)
    assert params.train_unet.architecture == "smp" and params.base.num_workers >= 1
    if name == "gpu-check":  # the real size the issue asks for
        assert params.train_classifier.arch == params.train_ccam.arch == "resnet50"
        assert min(params.train_classifier.input_size, params.train_ccam.input_size,
                   params.train_unet.input_size) >= 224
        assert params.make_cams.scales == (0.5, 1.0, 1.5, 2.0) and params.make_cams.flip


# --- stage-data and run ---------------------------------------------------------------------------------------


def _fake_root(root: Path, trimaps: bool) -> None:
    (root / "images").mkdir(parents=True)
    (root / "annotations" / "trimaps").mkdir(parents=True) if trimaps else (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "trainval.txt").write_text("Bengal_1 6 2 1\n")
    (root / "annotations" / "test.txt").write_text("Bengal_2 6 2 1\n")
    for name in ("Bengal_1", "Bengal_2"):
        Image.fromarray(np.full((300, 400, 3), 128, np.uint8)).save(root / "images" / f"{name}.jpg")
        if trimaps:
            tri = np.full((300, 400), 2, np.uint8)
            tri[100:200, 100:300], tri[100, 100:300] = 1, 3
            Image.fromarray(tri).save(root / "annotations" / "trimaps" / f"{name}.png")


def test_stage_data_downscales_and_keeps_trimap_values(tmp_path: Path) -> None:
    src, dest = tmp_path / "data", tmp_path / "staged"
    _fake_root(src / "oxford-pet-dev" / "oxford-iiit-pet", trimaps=True)
    _fake_root(src / "oxford-pet-dev-clsonly" / "oxford-iiit-pet", trimaps=False)
    info = gpu_check.stage_data(src, dest, max_side=200, jpeg_quality=85)
    dev = dest / "oxford-pet-dev" / "oxford-iiit-pet"
    assert info["files"] == {"oxford-pet-dev": 4, "oxford-pet-dev-clsonly": 2} and info["bytes"] > 0
    assert Image.open(dev / "images" / "Bengal_1.jpg").size == (200, 150)
    tri = np.asarray(Image.open(dev / "annotations" / "trimaps" / "Bengal_1.png"))
    assert tri.shape == (150, 200) and set(np.unique(tri)) <= {1, 2, 3}  # nearest: no blended labels
    assert (dev / "annotations" / "test.txt").read_text() == "Bengal_2 6 2 1\n"
    assert not (dest / "oxford-pet-dev-clsonly" / "oxford-iiit-pet" / "annotations" / "trimaps").exists()
    with pytest.raises(SystemExit, match="no such folder"):
        gpu_check.stage_data(tmp_path / "missing", dest, 200, 85)


def test_run_without_staged_data_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = gpu_check.main(["run", "--out", str(tmp_path / "out"), "--data", str(tmp_path / "none")])
    assert rc == 2 and "stage-data" in capsys.readouterr().err


def test_run_drives_quality_pipeline_and_writes_its_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run_check calls quality.py's pipeline and collect with their current signatures (a stale call
    is only found on the GPU otherwise) and writes the check's files."""
    data = tmp_path / "data"
    for name in ("oxford-pet-dev", "oxford-pet-dev-clsonly"):
        (data / name / "oxford-iiit-pet" / "annotations").mkdir(parents=True)
        (data / name / "oxford-iiit-pet" / "annotations" / "trainval.txt").write_text("Bengal_1 6 2 1\n")
    seen: dict[str, object] = {}

    def pipeline(plan, work, eval_root, runner, step_maps):  # noqa: ANN001, ANN202 - quality.run_pipeline's
        seen["pipeline"] = (eval_root, isinstance(step_maps, dict))
        (work / "quality.log").write_text("log\n")
        return work, "ccam_ccam-none", {"ccam_ccam-none": 0.5}

    def collect(eval_project, plan, best, val_scores, work=None):  # noqa: ANN001, ANN202 - quality.collect's
        seen["collect"] = (best, work)
        return {"rows": [{"name": "x", "kind": "baseline", "iou": 50.0, "dice": 60.0, "n_images": 3}],
                "summary": {"pseudo_iou": 0.5}}

    monkeypatch.setattr(quality, "run_pipeline", pipeline)
    monkeypatch.setattr(quality, "collect", collect)
    out, work = tmp_path / "out", tmp_path / "work"
    rc = gpu_check.main(["run", "--out", str(out), "--data", str(data), "--workdir", str(work),
                         "--profile", "gpu-check-tiny", "--device", "cpu"])
    assert rc == 0 and seen == {"pipeline": (None, True), "collect": ("ccam_ccam-none", work.resolve())}
    assert {p.name for p in out.iterdir()} >= {"gpu_check.json", "gpu_check.md", "quality.json", "wsss.log"}


def test_stage_seconds_and_markdown() -> None:
    steps = [{"command": "wsss tune crf --method a", "seconds": 1.0}, {"command": "wsss tune crf --method b", "seconds": 2.0},
             {"command": "wsss train-unet --masks gt", "seconds": 3.5}]
    assert gpu_check.stage_seconds(steps) == {"tune crf": 3.0, "train-unet": 3.5}
    check = {"profile": "gpu-check", "gpu": {"cuda": True, "name": "H", "memory_gib": 1.0, "capability": "9.0",
                                            "bf16": True}, "machine": "m", "total_seconds": 500.0,
             "within_budget": False, "rc": 0, "versions": {"torch": "2"}, "stage_seconds": {"tune crf": 3.0}}
    md = gpu_check.to_markdown(check, "# quality\n| table |\n")
    assert "OVER" in md and "| tune crf | 3.0 |" in md and md.rstrip().endswith("| table |")


# --- scaling.py -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quick", [True, False])
def test_scaling_projects_are_valid_params(quick: bool) -> None:
    default = yaml.safe_load((REPO / "params.yaml").read_text())
    sizes = {**scaling.base_sizes(quick), "n_trainval": scaling.base_sizes(quick)["n_trainval"] * 16}
    params = params_from_dict(scaling.project_params(default, sizes, quick), "scaling.yaml")
    assert params.synthetic.n_trainval == sizes["n_trainval"]
    assert params.train_classifier.epochs == params.train_ccam.epochs == params.pretrain.epochs == 1
    n_train = round(sizes["n_trainval"] * (1 - params.prepare.val_fraction))
    assert (params.train_unet.steps - 1) * params.train_unet.batch_size < n_train <= params.train_unet.steps * params.train_unet.batch_size


def test_scaling_flatness_and_markdown() -> None:
    def row(rss: float, tree: float) -> dict[str, float]:
        return {"seconds": 1.0, "rc": 0, "peak_rss_mib": rss, "peak_tree_rss_mib": tree}

    rows = {"x1": {"make-pseudo": row(400, 800), "predict": row(500, 500)},
            "x16": {"make-pseudo": row(420, 850), "predict": row(900, 900)},
            "x1 128px": {"make-pseudo": row(600, 900)}}
    flat = scaling.flatness(rows, list(rows))
    assert flat["make-pseudo"]["flat"] is True and flat["predict"]["flat"] is False
    assert flat["evaluate unet"] == {"flat": None}
    result = {"quick": True, "machine": "m", "loadavg_before": [1, 1, 1], "loadavg_after": [2, 2, 2], "total_seconds": 60,
              "projects": {k: {"synthetic": {"n_trainval": 1, "n_test": 1, "n_background": 1, "image_size": 64}} for k in rows},
              "rows": rows, "flatness": flat}
    md = scaling.to_markdown(result)
    assert "| predict | 500 → 900 (+400) | 500 → 900 (+400) | NO |" in md and "not measured" in md


def test_scaling_run_stage_measures_the_child(tmp_path: Path) -> None:
    row = scaling.run_stage(tmp_path, tmp_path / "log", "--help")
    assert row["rc"] == 0 and row["peak_rss_mib"] > 10 and row["seconds"] > 0
    assert "generate-synthetic" in (tmp_path / "log").read_text()
