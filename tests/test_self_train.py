"""Constrained self-training: the mask rules, a round end to end on a tiny project, kill/resume of a round,
the champion (chosen on val, never test) and bad ``--round`` values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import write_params
from tests.test_pipeline import TINY_MODELS
from wsss.cli import app
from wsss.config import PseudoConfig, SelfTrainConfig, params_from_dict
from wsss.data.manifest import load_manifest, pets
from wsss.data.readers import read_mask
from wsss.inference import flip_tta_probs
from wsss.paths import Paths
from wsss.self_training import band_of, border_band, choose_champion, constrain, summary

runner = CliRunner()
VARIANT = "cam_classifier-species"
ST = SelfTrainConfig(max_area_change=0.5)


# --- the mask rules -----------------------------------------------------------------------------------------


def _square(n: int, lo: int, hi: int) -> np.ndarray:
    m = np.zeros((n, n), np.uint8)
    m[lo:hi, lo:hi] = 1
    return m


def test_disagreeing_pixels_become_ignore() -> None:
    round0 = _square(20, 5, 15)  # 100 px
    new = _square(20, 6, 16)  # 100 px, shifted: same area, 19 + 19 pixels disagree
    c = constrain(new, round0, ST)
    assert not c.reset
    assert np.all(c.mask[(new == round0)] == new[new == round0])
    assert np.all(c.mask[new != round0] == 255) and np.count_nonzero(c.mask == 255) == 38
    off = constrain(new, round0, SelfTrainConfig(ignore_disagreement=False))
    assert np.array_equal(off.mask, new)


def test_round0_ignore_stays_ignored() -> None:
    round0 = _square(20, 5, 15)
    round0[0, 0] = 255
    assert constrain(round0.clip(0, 1), round0, ST).mask[0, 0] == 255


def test_a_mask_that_drifts_is_reset_to_round0() -> None:
    round0 = _square(20, 5, 15)  # 100 px
    grown = _square(20, 2, 18)  # 256 px: +156 %
    c = constrain(grown, round0, ST)
    assert c.reset and np.array_equal(c.mask, round0) and c.area_new > c.area_round0
    assert not constrain(_square(20, 5, 17), round0, ST).reset  # 144 px: +44 %, inside 50 %
    assert constrain(_square(20, 5, 17), round0, SelfTrainConfig(max_area_change=0.4)).reset
    empty = np.zeros((20, 20), np.uint8)
    assert constrain(round0, empty, ST).reset and not constrain(empty, empty, ST).reset


def test_border_band_stays_background() -> None:
    round0 = np.ones((20, 20), np.uint8)
    round0[:2], round0[-2:], round0[:, :2], round0[:, -2:] = 0, 0, 0, 0
    new = np.ones((20, 20), np.uint8)  # fills the band: within the area limit
    c = constrain(new, round0, ST, border=0.1)
    band = border_band((20, 20), 0.1)
    assert band.sum() == 400 - 256 and np.all(c.mask[band] == 0) and np.all(c.mask[~band] == 1)
    loose = SelfTrainConfig(max_area_change=1.0)  # without the band the new mask grows by 56 %
    assert constrain(new, round0, ST).reset and not constrain(new, round0, loose).reset
    assert np.count_nonzero(constrain(new, round0, loose).mask == 255) == 400 - 256  # band pixels disagree


def test_band_only_for_grabcut_refiners() -> None:
    grab = PseudoConfig(refiner="grabcut", grabcut=dataclass_replace(PseudoConfig().grabcut, border=0.1))
    assert band_of(grab, ST) == 0.1
    assert band_of(grab, SelfTrainConfig(border_band=False)) == 0.0
    assert band_of(PseudoConfig(refiner="none", grabcut=grab.grabcut), ST) == 0.0


def dataclass_replace(obj, **kw):  # noqa: ANN001, ANN003, ANN201
    import dataclasses

    return dataclasses.replace(obj, **kw)


def test_flip_tta_averages_the_mirrored_prediction() -> None:
    ramp = np.tile(np.linspace(0, 1, 8, dtype=np.float32), (4, 1))

    def predict(images: list[np.ndarray]) -> list[np.ndarray]:  # "pet" = bright columns of the input
        return [im[..., 0].astype(np.float32) / 255 for im in images]

    image = np.repeat((ramp * 255).astype(np.uint8)[..., None], 3, axis=2)
    (prob,) = flip_tta_probs(predict, [image], flip=True)
    (plain,) = flip_tta_probs(predict, [image], flip=False)
    assert np.allclose(plain, image[..., 0] / 255) and np.allclose(prob, plain)  # equivariant model: same map


def test_champion_is_chosen_on_val_and_must_beat_round0() -> None:
    assert choose_champion({0: 0.6, 1: 0.65, 2: 0.62}) == 1
    assert choose_champion({0: 0.6, 1: 0.6}) == 0  # a tie does not beat round 0
    assert choose_champion({0: 0.6, 1: 0.55}) == 0
    assert choose_champion({0: 0.6, 1: float("nan")}) == 0
    rounds = [{"round": 0, "model": "unet-best", "val_iou": 0.6, "test_iou": 0.9},
              {"round": 1, "model": "unet-selftrain-r1", "val_iou": 0.59, "test_iou": 0.1}]
    assert summary(rounds)["champion"]["round"] == 0  # test never chooses, whichever way it points
    rounds[1]["val_iou"] = 0.7
    assert summary(rounds)["champion"] == {"round": 1, "model": "unet-selftrain-r1", "val_iou": 0.7}


@pytest.mark.parametrize("folder", [".", "pipelines/paper-tables"])
def test_rounds_in_dvc_yaml_match_params(folder: str) -> None:
    import yaml

    root = Path(__file__).resolve().parents[1] / folder
    params = params_from_dict(yaml.safe_load((root / "params.yaml").read_text()))
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    entries = stages["self-train"]["foreach"]
    assert len(entries) == params.self_train.rounds
    assert [e["round"] for e in entries.values()] == list(range(1, params.self_train.rounds + 1))
    prev = ["unet-best"] + [f"unet-selftrain-r{r}" for r in range(1, params.self_train.rounds)]
    assert [e["prev"] for e in entries.values()] == prev  # each round names the model it starts from
    assert stages["evaluate-selftrain"]["foreach"] == [f"selftrain-r{r}" for r in
                                                       range(1, params.self_train.rounds + 1)]
    # The report registers the self-training champion: it depends on every round's model.
    assert {f"models/unet-selftrain-r{r}" for r in range(1, params.self_train.rounds + 1)} <= set(stages["report"]["deps"])
    champion_deps = stages["self-train-champion"]["deps"]
    assert [f"reports/selftrain/r{r}.json" for r in range(1, params.self_train.rounds + 1)] == \
        [d for d in champion_deps if d.startswith("reports/selftrain/")]


# --- a tiny project ----------------------------------------------------------------------------------------


def _invoke(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, f"wsss {' '.join(args)}:\n{result.output}\n{result.exception!r}"
    return result.output


TINY = {**TINY_MODELS, "train_unet": {**TINY_MODELS["train_unet"], "steps": 3},
        "pseudo": {"refiner": "grabcut", "workers": 1, "grabcut": {"border": 0.1, "iterations": 2}},
        "self_train": {"rounds": 2, "batch_size": 4}}


def round0_project(root: Path) -> Path:
    """Prepared tiny data, round-0 masks of ``VARIANT`` (GT with the trimap border as pet) and unet-best."""
    write_params(root, TINY)
    _invoke("generate-synthetic")
    _invoke("prepare")
    paths = Paths(root)
    df = load_manifest(paths.manifest)
    out = paths.masks_dir(VARIANT)
    out.mkdir(parents=True)
    for r in pets(df, ("train", "val"), with_mask=True).itertuples():
        gt = read_mask(paths.prepared / r.mask_path)
        Image.fromarray(np.where(gt == 255, 1, gt).astype(np.uint8)).save(out / f"{r.id}.png")
    (paths.reports / "pseudo").mkdir(parents=True)
    (paths.pseudo_report(VARIANT)).write_text(json.dumps({"after": {"iou_mean": 0.5}}))
    _invoke("train-unet", "--masks", "best")
    return root


def test_bad_round_and_missing_previous_round(project: Path) -> None:
    write_params(project, TINY)
    out = _invoke("self-train", "--round", "3", code=2)
    assert "--round 3: must be between 1 and self_train.rounds = 2" in out and "Traceback" not in out
    assert "between 1" in _invoke("self-train", "--round", "0", code=2)
    out = _invoke("self-train", "--round", "1", code=1)
    assert "models/unet-best/model.pt" in out.replace("\\", "/") and "round 0 U-Net not found" in out
    out = _invoke("self-train", "--round", "2", code=1)
    assert "models/unet-selftrain-r1/model.pt" in out.replace("\\", "/") and len(out.strip().splitlines()) <= 2
    out = _invoke("self-train-champion", code=1)
    assert "reports/selftrain/r1.json" in out.replace("\\", "/")


@pytest.mark.slow
def test_a_round_end_to_end(project: Path) -> None:
    import mlflow

    round0_project(project)
    paths = Paths(project)
    _invoke("self-train", "--round", "1")
    rep = json.loads(paths.selftrain_report(1).read_text())
    train = pets(load_manifest(paths.manifest), "train")
    masks = sorted(paths.selftrain_masks_dir(1).glob("*.png"))
    assert [p.stem for p in masks] == sorted(train["id"]) and rep["n_masks"] == len(train)
    for p in masks:
        m = read_mask(p)
        assert set(np.unique(m)) <= {0, 1, 255} and np.all(m[border_band(m.shape, 0.1)] == 0)
    assert 0 <= rep["n_reset"] <= rep["n_masks"] and 0 <= rep["ignore_fraction"] < 1
    assert rep["border_band"] == 0.1 and rep["steps"] == 3 and rep["previous_model"] == "unet-best"
    meta = json.loads((paths.model_dir("unet-selftrain-r1") / "meta.json").read_text())
    assert meta["masks"] == "selftrain-r1" and meta["training"]["steps"] == 3
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`wsss.stage` = 'self-train'",
                              output_format="list")
    assert len(runs) == 1 and runs[0].data.metrics["val_iou"] == pytest.approx(rep["val_iou"])
    assert runs[0].data.metrics["n_reset"] == rep["n_reset"] and "ignore_fraction" in runs[0].data.metrics
    _invoke("self-train", "--round", "2")
    assert json.loads(paths.selftrain_report(2).read_text())["previous_val_iou"] == pytest.approx(rep["val_iou"])
    _invoke("evaluate", "--model", "unet-selftrain-r1")
    champ = json.loads(_invoke_and_read(paths))
    vals = {e["round"]: e["val_iou"] for e in champ["rounds"]}
    assert sorted(vals) == [0, 1, 2] and champ["champion"]["round"] == choose_champion(vals)
    assert "test_iou" in champ["rounds"][1] and champ["selected_on"] == "val"
    _invoke("report", "--no-register")
    report = paths.report_md.read_text()
    assert "`unet-selftrain-r1`" in report and "self-training round 2" in report


def _invoke_and_read(paths: Paths) -> str:
    _invoke("self-train-champion")
    return paths.self_training_report.read_text()


@pytest.mark.slow
def test_a_killed_round_resumes_to_identical_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed while relabelling, then while its U-Net trains: the rerun gives byte-identical masks and
    bit-identical weights (the train-unet checkpoint resumes), as an uninterrupted run."""
    import shutil

    from tests.killer import digest_tree, run_stage
    from tests.test_kill_resume import compare_model

    base = tmp_path / "base"
    base.mkdir()
    monkeypatch.chdir(base)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{base.as_posix()}/mlruns/mlflow.db")
    round0_project(base)
    write_params(base, {**TINY, "train_unet": {**TINY["train_unet"], "steps": 5}, "self_train": {"rounds": 1}})
    args, watch = ("self-train", "--round", "1"), ("masks", "models", "reports", ".wsss")
    ref, victim = tmp_path / "ref", tmp_path / "victim"
    for dest in (ref, victim):
        shutil.copytree(base, dest, ignore=shutil.ignore_patterns("mlruns"))
        (dest / "mlruns").mkdir()
    assert run_stage(ref, args, watch=watch).returncode == 0
    masks = Path("masks") / "selftrain-r1"
    ckpt = Path(".wsss/state/train-unet/unet-selftrain-r1/checkpoint.pt")
    for event in (lambda root: len(list((root / masks).glob("*.png"))) >= 2, lambda root: (root / ckpt).exists()):
        hit = run_stage(victim, args, watch=watch, kill_when=event)
        assert hit.killed or hit.returncode == 0, hit.describe()
        assert not hit.violations, hit.violations
    final = run_stage(victim, args, watch=watch)
    assert final.returncode == 0 and "Traceback" not in final.output, final.describe()
    assert digest_tree(victim / masks) == digest_tree(ref / masks)
    compare_model("unet-selftrain-r1")(ref, victim)
    got = json.loads((victim / "reports/selftrain/r1.json").read_text())
    want = json.loads((ref / "reports/selftrain/r1.json").read_text())
    timing = ("mask_seconds", "train_seconds", "val_seconds")
    assert {k: v for k, v in got.items() if k not in timing} == {k: v for k, v in want.items() if k not in timing}
