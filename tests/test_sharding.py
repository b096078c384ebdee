"""Sharded inference (issue 19, item 2): ``make-cams``, ``make-pseudo`` and ``predict`` split over ``--shard i/n``
processes or ``torchrun`` ranks write the same files, byte for byte, as one process; bad ``--shard`` values
exit 2 naming the option; a killed part resumes.

The multi-process tests start real ``python -m wsss`` (and ``torchrun``) processes, one thread each (as
:func:`tests.killer.stage_env` sets, so CPU kernels are bit-reproducible across processes).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.killer import run_stage, stage_env
from tests.test_make_pseudo import VARIANT, build_project
from wsss.errors import ConfigError
from wsss.sharding import Shard, resolve

runner = CliRunner()
CAMS = ["make-cams", "--method", "cam", "--model", "classifier-species"]
PSEUDO = ["make-pseudo", "--method", VARIANT]
# Fields that time the invocation itself: they differ between any two runs, sharded or not.
TIMING = ("seconds", "images_per_s")
TIMEOUT = 300


# --------------------------------------------------------------------------------------------------
# parsing and splitting


@pytest.mark.parametrize("text", ["3/2", "0/0", "a/b", "-1/2", "2/2", "1", "1/2/3", "", " /2"])
def test_bad_shard_values_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="--shard"):
        Shard.parse(text)


@pytest.mark.parametrize("command", [CAMS, PSEUDO, ["predict", "in"]], ids=["make-cams", "make-pseudo", "predict"])
@pytest.mark.parametrize("text", ["3/2", "0/0", "a/b", "-1/2"])
def test_cli_bad_shard_exits_2_in_one_line(project: Path, command: list[str], text: str) -> None:
    from wsss.cli import app

    result = runner.invoke(app, [*command, "--shard", text])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--shard" in lines[0] and text in lines[0], result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in project.iterdir()) == ["mlruns", "params.yaml"]  # nothing written


def test_launcher_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve(None) == Shard(0, 1) and resolve("1/3") == Shard(1, 3)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve(None) == Shard(1, 2) and resolve("1/2") == Shard(1, 2)
    with pytest.raises(ConfigError, match="contradicts"):
        resolve("0/2")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        resolve(None)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match="RANK"):
        resolve(None)


@pytest.mark.parametrize("n_items", range(0, 8))
@pytest.mark.parametrize("count", range(1, 5))
def test_parts_cover_every_item_once_in_order(n_items: int, count: int) -> None:
    items = [f"img{i}" for i in range(n_items)]
    parts = [Shard(i, count).take(items) for i in range(count)]
    assert sum(parts, []) == items
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


# --------------------------------------------------------------------------------------------------
# helpers of the multi-process tests


def _tree(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder``, hidden ones included."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".killer-")}


def _report(path: Path) -> dict:
    data = json.loads(path.read_text(encoding="utf-8"))
    for key in TIMING:
        assert key in data
        data.pop(key)
    return data


def _same_outputs(a: Path, b: Path, folders: list[str], reports: list[str]) -> None:
    for folder in folders:
        left, right = _tree(a / folder), _tree(b / folder)
        assert left and left == right, folder
    for report in reports:
        assert _report(a / report) == _report(b / report), report


def _start(root: Path, args: list[str], log: Path, launcher: list[str] | None = None) -> subprocess.Popen:
    with open(log, "wb") as fh:
        return subprocess.Popen([*(launcher or [sys.executable]), "-m", "wsss", *args], cwd=root,
                                env=stage_env(root), stdout=fh, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, log: Path) -> str:
    try:
        rc = proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text(errors="replace")
    assert rc == 0, output
    return output


def _two_at_once(root: Path, args: list[str]) -> list[str]:
    """``--shard 0/2`` and ``--shard 1/2`` as two processes running at the same time; their outputs."""
    procs = [(_start(root, [*args, "--shard", f"{i}/2"], root.parent / f"{root.name}-{i}.log"),
              root.parent / f"{root.name}-{i}.log") for i in range(2)]
    return [_finish(p, log) for p, log in procs]


def _torchrun(root: Path, args: list[str]) -> str:
    """``torchrun --standalone --nproc-per-node 2 -m wsss ...`` (RANK / WORLD_SIZE / LOCAL_RANK set by it)."""
    log = root.parent / f"{root.name}-torchrun.log"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return _finish(_start(root, args, log, launcher), log)


def _copies(base: Path, *names: str) -> list[Path]:
    out = []
    for name in names:
        shutil.copytree(base, base.parent / name, ignore=shutil.ignore_patterns("mlruns"))
        (base.parent / name / "mlruns").mkdir()
        out.append(base.parent / name)
    return out


def _cams_project(root: Path) -> None:
    from wsss.models.classifier import Classifier
    from wsss.training.checkpoint import save_model

    build_project(root, {"pseudo": {"workers": 1},
                         "make_cams": {"shard_size": 2, "batch_size": 1, "scales": [1.0], "flip": False}})
    shutil.rmtree(root / "cams")
    meta = {"kind": "classifier", "arch": "resnet18", "num_classes": 2, "labels": "species", "bg": False,
            "classes": ["cat", "dog"], "input_size": 64, "weights": "none", "best_epoch": 0}
    import torch

    torch.manual_seed(0)
    save_model(root / "models" / "classifier-species", Classifier("resnet18", 2, weights="none"), meta)


CAMS_OUT = [f"cams/{VARIANT}"]
CAMS_REPORTS = [f"reports/cams/{VARIANT}.json"]


# --------------------------------------------------------------------------------------------------
# make-cams


@pytest.mark.slow
def test_make_cams_two_shards_and_torchrun_equal_one_process(tmp_path: Path) -> None:
    base = tmp_path / "base"
    _cams_project(base)
    one, two, tr = _copies(base, "one", "two", "tr")
    ref = run_stage(one, CAMS, timeout=TIMEOUT)
    assert ref.returncode == 0, ref.output
    outputs = _two_at_once(two, CAMS)
    assert sum("writes the final outputs" in o for o in outputs) == 1, outputs  # exactly one part merges
    assert _torchrun(tr, CAMS).count("writes the final outputs") == 1  # both ranks ran, one merged
    for root in (two, tr):
        _same_outputs(one, root, [*CAMS_OUT, "reports/cams/curves"], CAMS_REPORTS)
    assert len(list((one / CAMS_OUT[0]).glob("shard-*.npz"))) == 7


@pytest.mark.slow
def test_make_cams_killed_part_resumes(tmp_path: Path) -> None:
    base = tmp_path / "base"
    _cams_project(base)
    one, two = _copies(base, "one", "two")
    assert run_stage(one, CAMS, timeout=TIMEOUT).returncode == 0
    first = run_stage(two, [*CAMS, "--shard", "0/2"], timeout=TIMEOUT)  # shards 0-2
    assert first.returncode == 0 and "not ready yet" in first.output, first.output
    out = two / CAMS_OUT[0]
    assert not (out / "_done.json").exists() and not (two / CAMS_REPORTS[0]).exists()
    # Part 1 (shards 3-6) is killed once its first shard is on disk.
    hit = run_stage(two, [*CAMS, "--shard", "1/2"], timeout=TIMEOUT, watch=["cams"],
                    kill_when=lambda r: (r / CAMS_OUT[0] / "shard-00003.npz").exists())
    assert hit.killed and not hit.violations, hit.output
    assert not (out / "_done.json").exists() and not (out / "shard-00006.npz").exists()
    again = run_stage(two, [*CAMS, "--shard", "1/2"], timeout=TIMEOUT)
    assert again.returncode == 0 and "writes the final outputs" in again.output, again.output
    assert "computing 3" in again.output or "computing 4" in again.output, again.output  # not part 0's
    _same_outputs(one, two, [*CAMS_OUT, "reports/cams/curves"], CAMS_REPORTS)


# --------------------------------------------------------------------------------------------------
# make-pseudo


@pytest.mark.slow
def test_make_pseudo_two_shards_and_torchrun_equal_one_process(tmp_path: Path) -> None:
    base = tmp_path / "base"
    build_project(base)
    one, two, tr = _copies(base, "one", "two", "tr")
    ref = run_stage(one, PSEUDO, timeout=TIMEOUT)
    assert ref.returncode == 0, ref.output
    outputs = _two_at_once(two, PSEUDO)
    assert sum("writes the final outputs" in o for o in outputs) == 1, outputs
    assert _torchrun(tr, PSEUDO).count("writes the final outputs") == 1
    for root in (two, tr):
        _same_outputs(one, root, [f"masks/{VARIANT}"], [f"reports/pseudo/{VARIANT}.json"])


# --------------------------------------------------------------------------------------------------
# predict


def _predict_project(root: Path) -> list[str]:
    from tests.test_predict import _save_tiny_unet

    root.mkdir(parents=True)
    _save_tiny_unet(root / "models" / "unet-best")
    rng = np.random.default_rng(0)
    (root / "in" / "sub").mkdir(parents=True)
    for k in range(5):
        h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "in" / f"img{k}.png")
    Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(root / "in" / "sub" / "img1.jpg")
    (root / "in" / "broken.jpg").write_bytes(b"not an image")
    (root / "mlruns").mkdir()
    return ["predict", "in", "missing.png", "--model", "models/unet-best", "--out", "out", "--device", "cpu"]


@pytest.mark.slow
def test_predict_two_shards_and_torchrun_equal_one_process(tmp_path: Path) -> None:
    base = tmp_path / "base"
    args = _predict_project(base)
    one, two, tr = _copies(base, "one", "two", "tr")
    ref = run_stage(one, args, timeout=TIMEOUT)
    assert ref.returncode == 3, ref.output  # a broken and a missing input
    index = json.loads((one / "out" / "index.json").read_text())
    assert len(index["predicted"]) == 6 and len(index["failed"]) == 2
    procs = [(_start(two, [*args, "--shard", f"{i}/2"], tmp_path / f"p{i}.log"), tmp_path / f"p{i}.log")
             for i in range(2)]
    codes = [p.wait(timeout=TIMEOUT) for p, _ in procs]
    assert 3 in codes, [log.read_text() for _, log in procs]  # the merging part reports every failure
    # torchrun itself exits 1 when a rank exits non-zero (here the merging rank's 3).
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "wsss", *args], cwd=tr, env=stage_env(tr), timeout=TIMEOUT, capture_output=True,
                          text=True)
    said = done.stdout + done.stderr  # 7 images (broken.jpg first): part 0 has 3, part 1 has 4; one merges
    assert ("part 0/2: 2 of 3 images predicted" in said) != ("part 1/2: 4 of 4 images predicted" in said), said
    for root in (two, tr):
        assert _tree(one / "out") == _tree(root / "out"), root  # hidden part records are gone too


# --------------------------------------------------------------------------------------------------
# fast, in one process: the merge logic of make-pseudo, with a part that stopped half-way


def test_make_pseudo_parts_merge_and_a_stopped_part_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsss.config import load_params
    from wsss.paths import Paths
    from wsss.stages import make_pseudo

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path.as_posix()}/mlruns/mlflow.db")
    base = tmp_path / "base"
    build_project(base)
    one, two = _copies(base, "one", "two")
    params = load_params(one / "params.yaml")
    make_pseudo.run(params, Paths(one), VARIANT)

    paths = Paths(two)
    masks = paths.masks_dir(VARIANT)
    first = make_pseudo.run(params, paths, VARIANT, shard=Shard(1, 2))
    assert first == {"shard": "1/2", "merged": False, "n_refined": 7, "seconds": first["seconds"]}
    assert not (masks / "_done.json").exists() and not paths.pseudo_report(VARIANT).exists()
    assert (masks / "_part-00001-of-00002.json").exists()
    # As if part 0 had been killed before two of its masks (and its stamp) were written: its rerun does those.
    make_pseudo.run(params, paths, VARIANT, shard=Shard(0, 2))
    for name in ("train_00.png", "train_03.png"):
        (masks / name).unlink()
    (masks / "_done.json").unlink()
    paths.pseudo_report(VARIANT).unlink()
    report = make_pseudo.run(params, paths, VARIANT, shard=Shard(0, 2))
    assert report["n_refined"] == 2 and report["n_masks"] == 14
    assert not list(masks.glob("_part-*"))
    assert _tree(one / "masks") == _tree(two / "masks")
    expected = _report(one / f"reports/pseudo/{VARIANT}.json")
    expected["n_refined"] = 2  # a resumed run counts what it refined, as one process's resume does
    assert _report(two / f"reports/pseudo/{VARIANT}.json") == expected
