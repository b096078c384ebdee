"""The DVC side that needs no pipeline run: top-level plots point at real stage outputs, training curves
are written and declared, the remote extra is pinned, and ``dvc.lock`` is committable."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from wsss.training.trainer import curves_csv

REPO = Path(__file__).resolve().parents[1]


def test_curves_csv_has_one_row_per_epoch_and_every_metric() -> None:
    history = [{"train_loss": 1.5, "lr": 0.1}, {"train_loss": 0.25, "val_acc": 0.5, "lr": 0.05}]
    assert curves_csv(history) == "epoch,train_loss,lr,val_acc\n0,1.5,0.1,\n1,0.25,0.05,0.5\n"
    assert curves_csv([]) == "epoch\n"


@pytest.fixture(scope="module", params=[".", "pipelines/paper-tables"])
def index(request: pytest.FixtureRequest) -> tuple[dict[str, set[str]], list[dict]]:
    """Each stage's outputs (paths relative to the pipeline's folder) and the top-level plot definitions."""
    from dvc.repo import Repo

    with Repo(str(REPO / request.param)) as repo:
        outs = {s.addressing: {o.def_path for o in s.outs} for s in repo.index.stages}
        (plots,) = repo.index._plots.values()
    return outs, plots


def _plot(plots: list[dict], plot_id: str) -> dict:
    return next(p[plot_id] for p in plots if isinstance(p, dict) and plot_id in p)


def test_top_level_plots_draw_from_stage_outputs(index: tuple[dict[str, set[str]], list[dict]]) -> None:
    outs, plots = index
    every_out = set().union(*outs.values())
    for p in plots:
        if isinstance(p, str):
            assert p in every_out, p  # reports/figures
            continue
        ((plot_id, props),) = p.items()
        missing = set(props["y"]) - every_out
        assert not missing, (plot_id, missing)
    # The overlay has every map variant's curve (a new variant without it fails here).
    curves = {o for o in every_out if o.startswith("reports/cams/curves/")}
    assert set(_plot(plots, "iou-vs-threshold")["y"]) == curves and len(curves) >= 10


def test_every_training_stage_declares_its_curves(index: tuple[dict[str, set[str]], list[dict]]) -> None:
    outs, plots = index
    plotted = set()
    for p in plots:
        if isinstance(p, dict):
            ((plot_id, props),) = p.items()
            if plot_id.startswith("training-"):
                plotted |= set(props["y"])
    models = 0
    for stage, stage_outs in outs.items():
        for out in stage_outs:
            m = re.fullmatch(r"models/((?:classifier|ccam|unet|pretrain)-.+)", out)
            if m:
                models += 1
                curve = f"reports/training/curves/{m.group(1)}.csv"
                assert curve in stage_outs, (stage, curve)
                assert curve in plotted, curve
    assert models >= 11


def test_remote_extra_is_pinned() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("dvc-s3") for req in extras["remote"])
    pins = dict(line.split("==") for line in (REPO / "requirements" / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert pins["dvc-s3"] and pins["dvc"] == "3.67.1"


def test_dvc_lock_is_not_ignored() -> None:
    for folder in (REPO, REPO / "pipelines" / "paper-tables"):
        ignored = subprocess.run(["git", "check-ignore", "-q", "dvc.lock"], cwd=folder).returncode
        assert ignored == 1, f"{folder}/dvc.lock is git-ignored; it must be committable"
    assert subprocess.run(["git", "check-ignore", "-q", "dvc_plots/index.html"], cwd=REPO).returncode == 0
