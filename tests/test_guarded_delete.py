"""No code path deletes outside a stage's own output folder: wsss.io.remove_tree, reset_if_stale and the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.test_make_pseudo import VARIANT, build_project
from wsss.cli import app
from wsss.errors import DataError
from wsss.io import remove_tree, write_json
from wsss.stages.common import reset_if_stale

runner = CliRunner()


def _tree(root: Path) -> dict[str, int]:
    """Every file under ``root`` with its size (what a deletion would change)."""
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def owned(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(owner root ``out/``, a variant folder in it, a precious sibling folder outside it)."""
    owner, precious = tmp_path / "out", tmp_path / "precious"
    (owner / "a").mkdir(parents=True)
    (owner / "a" / "f.txt").write_text("a")
    precious.mkdir()
    (precious / "keep.txt").write_text("keep")
    return owner, owner / "a", precious


def test_removes_a_folder_inside_its_owner(owned: tuple[Path, Path, Path]) -> None:
    owner, victim, _ = owned
    remove_tree(victim, owner)
    assert not victim.exists() and owner.is_dir()
    remove_tree(victim, owner)  # already gone: nothing to do


@pytest.mark.parametrize("rel", ["../precious", "a/../../precious", "a/.."])
def test_refuses_dot_dot(owned: tuple[Path, Path, Path], rel: str) -> None:
    owner, victim, precious = owned
    with pytest.raises(DataError, match=r"'\.\.'"):
        remove_tree(owner / rel, owner)
    assert (precious / "keep.txt").exists() and victim.exists()


def test_refuses_absolute_paths_outside_and_the_root_itself(owned: tuple[Path, Path, Path]) -> None:
    owner, victim, precious = owned
    with pytest.raises(DataError, match="outside"):
        remove_tree(precious, owner)
    with pytest.raises(DataError, match="outside"):
        remove_tree(Path("/"), owner)
    with pytest.raises(DataError, match="outside"):
        remove_tree("a", owner)  # a relative name is not inside an absolute owner
    with pytest.raises(DataError, match="root"):
        remove_tree(owner, owner)
    assert (precious / "keep.txt").exists() and victim.exists()


def test_refuses_symlinks(owned: tuple[Path, Path, Path]) -> None:
    owner, victim, precious = owned
    (owner / "link").symlink_to(precious, target_is_directory=True)
    with pytest.raises(DataError, match="symlink"):
        remove_tree(owner / "link", owner)
    (precious / "sub").mkdir()
    with pytest.raises(DataError, match="symlink"):
        remove_tree(owner / "link" / "sub", owner)  # a component is a symlink
    (owner / "alias").symlink_to(victim, target_is_directory=True)
    with pytest.raises(DataError, match="symlink"):
        remove_tree(owner / "alias", owner)  # even a link to a sibling inside the owner
    assert (precious / "keep.txt").exists() and (precious / "sub").is_dir() and (victim / "f.txt").exists()


def test_owner_root_may_live_under_a_symlink(tmp_path: Path, owned: tuple[Path, Path, Path]) -> None:
    owner, victim, _ = owned
    (tmp_path / "linked").symlink_to(owner, target_is_directory=True)  # e.g. cams/ on another disk
    remove_tree(tmp_path / "linked" / "a", tmp_path / "linked")
    assert not victim.exists()


def test_reset_if_stale_keeps_a_symlinked_variant_folder_target(tmp_path: Path) -> None:
    """A variant folder that is a link to another variant's folder must not empty that folder."""
    masks = tmp_path / "masks"
    other = masks / "cam_classifier-species"
    other.mkdir(parents=True)
    (other / "x.png").write_bytes(b"png")
    write_json(other / "_fingerprint.json", {"fingerprint": "theirs"})
    (masks / "ecs_classifier-species").symlink_to(other, target_is_directory=True)
    before = _tree(other)
    with pytest.raises(DataError, match="symlink"):
        reset_if_stale(masks / "ecs_classifier-species", "ours", masks)
    assert _tree(other) == before


def test_reset_if_stale_refuses_dot_dot(tmp_path: Path) -> None:
    cams = tmp_path / "cams" / "cam_classifier-species"
    cams.mkdir(parents=True)
    (cams / "shard_00000.npz").write_bytes(b"maps")
    with pytest.raises(DataError, match=r"'\.\.'"):
        reset_if_stale(tmp_path / "masks" / ".." / "cams" / "cam_classifier-species", "other", tmp_path / "masks")
    assert sorted(p.name for p in cams.iterdir()) == ["shard_00000.npz"]  # nothing deleted, nothing written


def test_reset_if_stale_refuses_a_folder_of_another_stage(tmp_path: Path) -> None:
    """make-pseudo owns masks/: a resolved path into cams/ is refused even without '..' in it."""
    cams = tmp_path / "cams" / "cam_classifier-species"
    cams.mkdir(parents=True)
    (cams / "shard_00000.npz").write_bytes(b"maps")
    with pytest.raises(DataError):
        reset_if_stale(cams, "other", tmp_path / "masks")
    assert sorted(p.name for p in cams.iterdir()) == ["shard_00000.npz"]


@pytest.mark.parametrize("args", [
    ["make-pseudo", "--method", f"../cams/{VARIANT}"],
    ["make-pseudo", "--method", str(Path("cams").resolve() / VARIANT)],
    ["tune", "crf", "--method", f"../cams/{VARIANT}"],
    ["evaluate", "--pseudo", f"../cams/{VARIANT}"],
    ["evaluate", "--model", f"../cams/{VARIANT}"],
    ["train-unet", "--masks", f"../cams/{VARIANT}"],
    ["make-cams", "--method", "cam", "--model", "../cams"],
    ["make-cams", "--method", "ensemble", "--model", "../cams"],
    ["train-ccam", "--init", "classifier:../../cams"],
    ["pretrain", "--name", "../cams"],
])
def test_cli_refuses_a_path_as_a_name(project: Path, args: list[str]) -> None:
    """The reported defect: ``make-pseudo --method ../cams/<variant>`` emptied that variant's maps."""
    build_project(project)
    before = _tree(project / "cams")
    assert any(name.endswith(".npz") for name in before)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {args[-2]}"), result.output
    assert "Traceback" not in result.output
    assert _tree(project / "cams") == before
    assert not (project / "masks").exists() and not (project / "studies").exists()
    assert not any(p.name.startswith("_fingerprint") for p in (project / "cams").rglob("*"))  # nothing written


def test_cli_still_takes_good_names(project: Path) -> None:
    """A valid variant goes through parsing untouched (the stage then fails on the missing data, exit 1)."""
    result = runner.invoke(app, ["make-pseudo", "--method", "ccam_ccam-none"])
    assert result.exit_code != 2, result.output
    assert "ccam_ccam-none" in result.output


# --------------------------------------------------------------------------------------------------
# predict --out: a folder the user names (it may already hold other files, or be a symlink)


def _predict_setup(project: Path) -> None:
    import numpy as np
    from PIL import Image

    from tests.test_predict import _save_tiny_unet

    _save_tiny_unet(project / "models" / "unet-best")
    (project / "in").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
        project / "in" / "cat.png")


def _foreign(folder: Path) -> dict[str, int]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "thesis.tex").write_text("years of work")
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "data.csv").write_text("a,b\n1,2\n")
    (folder / "dog_mask.png").write_bytes(b"someone else's file")  # looks like an output, is not this run's
    return _tree(folder)


@pytest.mark.parametrize("linked", [False, True], ids=["folder", "symlink"])
def test_predict_out_keeps_foreign_files(project: Path, linked: bool) -> None:
    """``--out`` naming an existing folder (or a symlink to one) adds this run's outputs and deletes or
    rewrites nothing else there."""
    _predict_setup(project)
    target = project.parent / "elsewhere" if linked else project / "results"
    before = _foreign(target)
    out = project / "results"
    if linked:
        out.symlink_to(target, target_is_directory=True)
    result = runner.invoke(app, ["predict", "in", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    after = _tree(target)
    assert {k: after.get(k) for k in before} == before  # every foreign file kept, unchanged
    assert (target / "thesis.tex").read_text() == "years of work"
    assert sorted(set(after) - set(before)) == [".wsss-predict.json", "cat_mask.png", "cat_overlay.png", "index.json"]
    assert out.is_symlink() is linked  # the link itself is not replaced by a folder


def test_predict_refuses_to_replace_a_foreign_file_of_an_output_name(project: Path) -> None:
    """A ``cat_mask.png`` that ``wsss predict`` did not write is never replaced: exit 1 naming it, nothing
    written; once the folder is this command's own, a rerun rewrites its outputs."""
    _predict_setup(project)
    out = project / "results"
    out.mkdir()
    (out / "cat_mask.png").write_bytes(b"a hand-drawn mask")
    result = runner.invoke(app, ["predict", "in", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert "cat_mask.png" in result.output and "not written by `wsss predict`" in result.output
    assert _tree(out) == {"cat_mask.png": len(b"a hand-drawn mask")}  # nothing written, nothing replaced
    (out / "cat_mask.png").unlink()
    for _ in range(2):  # the first run claims the folder; the second rewrites its own outputs
        result = runner.invoke(app, ["predict", "in", "--out", str(out), "--device", "cpu"])
        assert result.exit_code == 0, result.output
    assert sorted(_tree(out)) == [".wsss-predict.json", "cat_mask.png", "cat_overlay.png", "index.json"]
    (out / ".wsss-predict.json").unlink()  # an older run's folder (index.json, no claim file) is its own too
    result = runner.invoke(app, ["predict", "in", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("out", ["../outside-out", "/ABS"], ids=["dotdot", "absolute"])
def test_predict_out_outside_the_project_touches_only_its_outputs(project: Path, out: str) -> None:
    """A ``..`` or absolute ``--out`` is where the user wants the files: written there, nothing else touched
    (the project's own outputs included)."""
    _predict_setup(project)
    dest = (project / out).resolve() if out.startswith("..") else project.parent / "abs-out"
    before_dest = _foreign(dest)
    before_project = _tree(project)
    arg = out if out.startswith("..") else str(dest)
    result = runner.invoke(app, ["predict", "in", "--out", arg, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    after = _tree(dest)
    assert {k: after.get(k) for k in before_dest} == before_dest
    changed = {k for k in _tree(project).keys() | before_project.keys()
               if _tree(project).get(k) != before_project.get(k)}
    assert all(k.startswith("mlruns") for k in changed), changed
