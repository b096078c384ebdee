"""DVC remote round trip and plots on a tiny profile, in a fresh copy of the repository.

What a second user (or machine) relies on: after ``dvc repro``, committing ``dvc.lock`` and the
uncached reports and ``dvc push`` to a remote, a fresh ``git clone`` + ``dvc pull`` has every output
and ``dvc repro`` there runs nothing. The remote is a local folder (the same protocol as ``s3://``
minus the plugin). On the way, the top-level plots render (``dvc plots show``, ``dvc plots diff``).
Slow (a whole tiny pipeline), so out of the default run; ``.ci/run`` runs it on its own. Measured on
the shared 2-core development machine under load (load average 8-11): the whole test 21 min 50 s, of
which the first ``dvc repro`` 21 min, ``dvc push`` 7 s, ``dvc pull`` 10 s, the clone's no-op ``dvc repro``
7 s (an earlier run: 25.5 min / 8 s / 17.5 s / 13.8 s); on a quiet machine expect the tiny repro to
dominate as in tests/test_dvc_repro.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.test_dvc_repro import _copy_worktree, _dvc, _merge_params, _ran

pytestmark = pytest.mark.slow

GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
# Top-level plot ids of dvc.yaml that draw from several files (overlays).
OVERLAYS = ("iou-vs-threshold", "training-loss-classifiers", "training-loss-ccam", "training-loss-unet")


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, env=GIT_ENV, check=True, capture_output=True,
                          text=True).stdout


def _check_plots(root: Path, out_dir: Path) -> None:
    """``dvc plots show`` renders the overlays and the figures (HTML and JSON), without errors."""
    _dvc(root, "plots", "show", "-o", str(out_dir))
    html = (out_dir / "index.html").read_text()
    assert all(plot_id in html for plot_id in OVERLAYS)
    top = json.loads(_dvc(root, "plots", "show", "--json"))
    assert not top.get("errors"), top.get("errors")
    shown = top["data"]
    spec = yaml.safe_load((root / "dvc.yaml").read_text())["plots"]
    for plot_id in OVERLAYS:
        (plot,) = shown[plot_id]
        files = {v["filename"] for v in plot["content"]["data"]["values"]}
        declared = next(p[plot_id]["y"] for p in spec if isinstance(p, dict) and plot_id in p)
        assert files == {Path(f).name for f in declared}, (plot_id, files)  # a line per declared file
    images = [k for k in shown if k.startswith("reports/figures/") and k.endswith(".png")]
    assert "reports/figures/iou_vs_threshold.png" in images and any("maps_" in k for k in images), images
    assert all(shown[k][0]["type"] == "image" for k in images)


def test_push_clone_pull_then_repro_is_a_noop(tmp_path: Path) -> None:
    origin = tmp_path / "origin"
    origin.mkdir()
    _copy_worktree(origin)
    _merge_params(origin / "params.yaml")
    times: dict[str, float] = {}

    t = time.perf_counter()
    _dvc(origin, "repro")
    times["repro"] = time.perf_counter() - t
    _round_trip(origin, tmp_path, times)


def _round_trip(origin: Path, tmp_path: Path, times: dict[str, float]) -> None:
    """After ``dvc repro`` in ``origin``: plots, commit, push, clone, pull, no-op repro."""
    _check_plots(origin, tmp_path / "plots")
    # Metrics and reports are the same files on any machine: no absolute path of this copy in them.
    for f in sorted((origin / "reports").rglob("*")):
        if f.suffix in (".json", ".csv", ".yaml", ".md"):
            assert str(tmp_path) not in f.read_text(), f

    remote = tmp_path / "remote"
    _dvc(origin, "remote", "add", "-d", "local", str(remote))
    _git(origin, "add", "-A")
    _git(origin, "commit", "-qm", "tiny pipeline run")
    tracked = set(_git(origin, "ls-files").split())
    assert {"dvc.lock", ".dvc/config", "reports/prepare.json", "reports/validation-gx.json"} <= tracked
    # The plots of the commit against the workspace: both revisions, same data.
    diff = json.loads(_dvc(origin, "plots", "diff", "HEAD", "--json"))
    assert not diff.get("errors"), diff.get("errors")
    values = diff["data"]["iou-vs-threshold"][0]["content"]["data"]["values"]
    assert set(values[0]) >= {"rev", "threshold", "iou_mean"}
    assert {v["rev"] for v in values} == {"HEAD", "workspace"}

    t = time.perf_counter()
    _dvc(origin, "push")
    times["push"] = time.perf_counter() - t
    assert any(p.is_file() for p in remote.rglob("*"))

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(origin), str(clone)], check=True, env=GIT_ENV)
    assert not (clone / "data" / "prepared").exists() and not (clone / "models").exists()
    t = time.perf_counter()
    _dvc(clone, "pull")
    times["pull"] = time.perf_counter() - t
    lock = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]
    outs = {o["path"] for s in lock.values() for o in s.get("outs", [])}
    assert all((clone / p).exists() for p in outs), sorted(p for p in outs if not (clone / p).exists())
    for rel in ("data/prepared/manifest.parquet", "models/unet-best/model.pt"):
        assert (clone / rel).read_bytes() == (origin / rel).read_bytes(), rel

    t = time.perf_counter()
    out = _dvc(clone, "repro")
    times["repro_clone"] = time.perf_counter() - t
    assert _ran(out) == set(), sorted(_ran(out))
    assert "Data and pipelines are up to date" in _dvc(clone, "status")
    print("seconds:", {k: round(v, 1) for k, v in times.items()})
