"""Map shards: a damaged shard is named in one line by every reader, and ``make-cams`` verifies its shards
against the size and SHA-256 recorded at write time and recomputes a bad one (issue 17, defect 4)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.test_make_pseudo import VARIANT, build_project
from wsss.cams import INDEX_FILE, KEYS, file_record, load_index, read_shard, shard_ids, shard_path
from wsss.errors import DataError
from wsss.io import load_npz, read_json, write_json

REMAKE = f"wsss make-cams --method cam --model {VARIANT.split('_', 1)[1]}"


def _truncate_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _truncate_tail(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-5])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _garbage(path: Path) -> None:
    path.write_bytes(b"not a zip at all " * 20)


def _flip_in_maps(path: Path) -> None:
    """One flipped byte inside the compressed ``maps`` member: still a zip, its ids still readable."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _lacks_keys(path: Path) -> None:
    from wsss.io import save_npz

    save_npz(path, ids=np.array(["x"]))


DAMAGES = [_truncate_half, _truncate_tail, _empty, _garbage, _flip_in_maps, _lacks_keys]


def _one_line_naming(message: str, path: Path) -> None:
    assert "\n" not in message.strip()
    assert str(path) in message and REMAKE in message
    assert "allow_pickle" not in message  # numpy's advice to unpickle is never passed on


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__.strip("_"))
def test_readers_name_a_damaged_shard(project: Path, damage) -> None:
    paths = build_project(project)
    shard = shard_path(paths.cams_dir(VARIANT), 0)
    damage(shard)
    with pytest.raises(DataError) as err:
        read_shard(shard)
    _one_line_naming(str(err.value), shard)
    if damage is not _flip_in_maps and damage is not _lacks_keys:  # those keep a readable ids array
        with pytest.raises(DataError) as err:
            shard_ids(shard)
        _one_line_naming(str(err.value), shard)


@pytest.mark.parametrize("damage", [_truncate_half, _flip_in_maps], ids=["truncated", "flipped"])
def test_make_pseudo_names_the_shard_before_touching_its_masks(project: Path, damage) -> None:
    from wsss.cli import app

    paths = build_project(project)
    masks = paths.masks_dir(VARIANT)
    write_json(masks / "_fingerprint.json", {"fingerprint": "earlier"})
    (masks / "train_00.png").write_bytes(b"an earlier mask")
    shard = shard_path(paths.cams_dir(VARIANT), 0)
    damage(shard)
    result = CliRunner().invoke(app, ["make-pseudo", "--method", VARIANT])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert shard.name in result.output and "make-cams" in result.output
    # Refused before reset_if_stale: a damaged shard does not cost the masks of the earlier maps.
    assert (masks / "train_00.png").read_bytes() == b"an earlier mask"


def test_tune_crf_names_a_truncated_shard(project: Path) -> None:
    from wsss.cli import app

    paths = build_project(project, {"pseudo": {"workers": 1}, "tune": {"trials": 1}})
    shard = shard_path(paths.cams_dir(VARIANT), 0)
    _truncate_half(shard)
    result = CliRunner().invoke(app, ["tune", "crf", "--method", VARIANT])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "BadZipFile" not in result.output
    assert shard.name in result.output and "make-cams" in result.output
    assert not paths.crf_params(VARIANT).exists()


# --------------------------------------------------------------------------------------------------
# make-cams verifies and repairs (the ensemble: no model to train, the same shard bookkeeping)

ENSEMBLE_PARAMS = {
    "pseudo": {"workers": 1},
    "make_cams": {"shard_size": 4, "ensemble_members": [VARIANT, "ecs_classifier-species"]},
}


def _ensemble_project(project: Path):
    paths = build_project(project, ENSEMBLE_PARAMS)
    shutil.copytree(paths.cams_dir(VARIANT), paths.cams_dir("ecs_classifier-species"))
    return paths


def _make_ensemble(paths) -> str:
    from wsss.config import load_params
    from wsss.stages import make_cams
    from wsss.ui import console

    width = console.width
    console.width = 10_000  # one console line per message: no wrapping inside a path
    try:
        with console.capture() as captured:
            make_cams.run(load_params(paths.root / "params.yaml"), paths, "ensemble", None)
    finally:
        console.width = width
    return captured.get()


def _arrays(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    return {p.name: load_npz(p) for p in sorted(folder.glob("shard-*.npz"))}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[n][k], b[n][k]) for n in a for k in KEYS)


def test_make_cams_records_every_shard(project: Path) -> None:
    paths = _ensemble_project(project)
    _make_ensemble(paths)
    out = paths.cams_dir("ensemble")
    shards = sorted(out.glob("shard-*.npz"))
    assert len(shards) == 4  # 14 trainval images in shards of 4
    assert load_index(out) == {p.name: file_record(p) for p in shards}
    assert read_json(out / INDEX_FILE) == load_index(out)
    assert set(read_json(out / "_done.json")) == {"fingerprint", "n_shards", "n_images"}  # format unchanged


def test_make_cams_rerun_recomputes_damaged_and_missing_shards(project: Path) -> None:
    paths = _ensemble_project(project)
    _make_ensemble(paths)
    out = paths.cams_dir("ensemble")
    reference = _arrays(out)
    s0, s1, s2, s3 = (shard_path(out, i) for i in range(4))
    _truncate_half(s0)  # wrong size
    _flip_in_maps(s1)  # same size, other bytes
    s2.unlink()
    index = load_index(out)
    index[s3.name]["sha256"] = "0" * 64  # a readable shard whose bytes are not the ones written
    write_json(out / INDEX_FILE, index)
    assert (out / "_done.json").exists()

    printed = _make_ensemble(paths)
    for shard, why in ((s0, "recorded when it was written"), (s1, "SHA-256 differs"), (s3, "SHA-256 differs")):
        assert any(line.startswith(f"{shard}: ") and why in line and line.endswith("; recomputing it")
                   for line in printed.splitlines()), printed
    assert f"{out}: 0 of 4 shards done and verified; computing 4 (1 missing, 3 damaged)" in printed
    assert _same(_arrays(out), reference)
    assert load_index(out) == {p.name: file_record(p) for p in sorted(out.glob("shard-*.npz"))}


def test_make_cams_rerun_keeps_good_shards_and_records_unrecorded_ones(project: Path) -> None:
    paths = _ensemble_project(project)
    _make_ensemble(paths)
    out = paths.cams_dir("ensemble")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.npz")}
    index = load_index(out)
    (out / INDEX_FILE).unlink()  # a folder from before records were kept: verified by reading each shard

    printed = _make_ensemble(paths)
    assert "recomputing" not in printed and "all 4 shards already done" in printed
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.npz")} == before
    assert load_index(out) == index

    reference = _arrays(out)
    _truncate_tail(shard_path(out, 2))
    (out / INDEX_FILE).unlink()  # unrecorded and unreadable: recomputed
    printed = _make_ensemble(paths)
    assert f"{shard_path(out, 2)}: no record, and unreadable" in printed
    assert _same(_arrays(out), reference)
    assert load_index(out) == {p.name: file_record(p) for p in sorted(out.glob("shard-*.npz"))}
