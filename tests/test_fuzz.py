"""Corrupted-data fuzzing: for each kind of damage in :mod:`tests.fuzz_tree`, ``wsss prepare`` then
``wsss validate`` through the CLI.

Each damage must be reported by file and reason (``reports/prepare.json``, nothing more and nothing
less than expected), the clean rest must be prepared and pass validation, and nothing may crash with a
traceback: exit codes are 0, or 1 with one clear line where nothing usable is left. Damage done to the
*prepared* folder afterwards is caught by ``validate`` (exit 1), naming the file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from tests.fuzz_tree import CLEAN_IDS, DAMAGES, Expect, clean_tree, relative_issues
from wsss.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return clean_tree(tmp_path_factory.mktemp("fuzz") / "oxford-iiit-pet")


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One MLflow store for the whole module (creating one costs a second or two)."""
    return f"sqlite:///{tmp_path_factory.mktemp('fuzz-mlruns').as_posix()}/mlflow.db"


def _project(tmp_path: Path, tree: Path, monkeypatch: pytest.MonkeyPatch, uri: str) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    params = {
        "base": {"dataset": "oxford-pet", "data_root": str(tree), "background_root": None, "seed": 0},
        "prepare": {"max_side": 64, "min_side": 16, "max_pixels": 200_000, "val_fraction": 0.25},
        "validate": {"min_images_per_class": 1},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return root


def _no_traceback(output: str) -> None:
    assert "Traceback" not in output, output


def _error_line(output: str, words: tuple[str, ...]) -> None:
    lines = [ln for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, output
    assert all(w.lower() in errors[0].lower() for w in words), errors[0]


@pytest.mark.parametrize("kind", sorted(DAMAGES))
def test_damage_is_reported_and_the_rest_prepared(kind: str, pristine: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch, mlflow_uri: str) -> None:
    tree = tmp_path / "oxford-iiit-pet"
    shutil.copytree(pristine, tree, symlinks=True)
    expect: Expect = DAMAGES[kind].apply(tree, monkeypatch)
    root = _project(tmp_path, tree, monkeypatch, mlflow_uri)

    prepared = runner.invoke(app, ["prepare"])
    _no_traceback(prepared.output)
    assert prepared.exit_code == expect.prepare_exit, f"{prepared.output}\n{prepared.exception!r}"
    validated = runner.invoke(app, ["validate"])
    _no_traceback(validated.output)
    assert validated.exit_code == expect.validate_exit, f"{validated.output}\n{validated.exception!r}"
    if expect.prepare_exit:
        _error_line(prepared.output, expect.message)
        _error_line(validated.output, ("manifest",))
        return

    report = json.loads((root / "reports" / "prepare.json").read_text())
    issues = relative_issues(report, tree)
    unmatched = list(issues)
    for want in expect.issues:
        hit = next((i for i in unmatched if i["file"] == want.file and i["action"] == want.action
                    and all(w in i["reason"] for w in want.words)), None)
        assert hit is not None, f"{kind}: no {want.action} issue for {want.file} with {want.words}; got {issues}"
        unmatched.remove(hit)
    assert not unmatched, f"{kind}: unexpected issues {unmatched}"
    if issues:
        assert f"{len(issues)} input problem(s)" in prepared.output

    from wsss.data.manifest import load_manifest

    ids = set(load_manifest(root / "data" / "prepared" / "manifest.parquet")["id"])
    assert ids == (CLEAN_IDS - expect.gone) | expect.added
    assert json.loads((root / "reports" / "validation.json").read_text())["success"] is (expect.validate_exit == 0)


def test_at_least_twenty_kinds() -> None:
    assert len(DAMAGES) >= 20
    assert all(d.doc for d in DAMAGES.values())


def test_all_damage_at_once(pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            mlflow_uri: str) -> None:
    """Every non-fatal damage in one tree (each on its own pet): all reported, the clean rest prepared."""
    tree = tmp_path / "oxford-iiit-pet"
    shutil.copytree(pristine, tree, symlinks=True)
    # The kinds that touch distinct files (most others all damage the added pet Abyssinian_9).
    kinds = ["duplicate_line", "name_in_both_splits", "two_files_one_name", "latin1_split_file",
             "crlf_line_endings", "wrong_breed_id", "directory_symlink_loop"]
    expects = [DAMAGES[k].apply(tree, monkeypatch) for k in kinds]
    root = _project(tmp_path, tree, monkeypatch, mlflow_uri)
    prepared = runner.invoke(app, ["prepare"])
    assert prepared.exit_code == 0, prepared.output
    validated = runner.invoke(app, ["validate"])
    assert validated.exit_code == 0, validated.output
    issues = relative_issues(json.loads((root / "reports" / "prepare.json").read_text()), tree)
    for expect in expects:
        for want in expect.issues:
            assert any(i["file"] == want.file and i["action"] == want.action and
                       all(w in i["reason"] for w in want.words) for i in issues), want


# --------------------------------------------------------------------------------------------------
# damage to the prepared folder: validate names the file


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 3])


def _bad_mask_value(p: Path) -> None:
    arr = np.array(Image.open(p))
    arr[0, 0] = 7
    Image.fromarray(arr).save(p, format="PNG")


def _to_directory(p: Path) -> None:
    p.unlink()
    p.mkdir()


PREPARED_DAMAGE = {
    "truncated image": ("images/{id}.jpg", _truncate, "files_decode"),
    "zero-byte image": ("images/{id}.jpg", lambda p: p.write_bytes(b""), "files_decode"),
    "missing mask": ("masks/{id}.png", lambda p: p.unlink(), "files_exist"),
    "mask value 7": ("masks/{id}.png", _bad_mask_value, "mask_pixel_values"),
    "image is a directory": ("images/{id}.jpg", _to_directory, "files_exist"),
    "resized image": ("images/{id}.jpg", lambda p: Image.new("RGB", (20, 20)).save(p, format="JPEG"), "files_size"),
}


@pytest.fixture(scope="module")
def prepared_project(pristine: Path, tmp_path_factory: pytest.TempPathFactory, mlflow_uri: str) -> Path:
    tmp = tmp_path_factory.mktemp("fuzz-prepared")
    with pytest.MonkeyPatch.context() as mp:
        root = _project(tmp, pristine, mp, mlflow_uri)
        result = runner.invoke(app, ["prepare"])
        assert result.exit_code == 0, result.output
    return root


@pytest.mark.parametrize("kind", sorted(PREPARED_DAMAGE))
def test_damaged_prepared_file_fails_validation_naming_it(
    kind: str, prepared_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_uri: str
) -> None:
    root = tmp_path / "project"
    shutil.copytree(prepared_project, root)
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    rel, hurt, check = PREPARED_DAMAGE[kind]
    rel = rel.format(id="Abyssinian_2")
    hurt(root / "data" / "prepared" / rel)
    result = runner.invoke(app, ["validate"])
    _no_traceback(result.output)
    assert result.exit_code == 1, result.output
    report = json.loads((root / "reports" / "validation.json").read_text())
    assert check in report["failed"], report["failed"]
    (failed,) = [c for c in report["checks"] if c["name"] == check]
    assert rel in failed["details"] and "Abyssinian_2" in failed["details"]
