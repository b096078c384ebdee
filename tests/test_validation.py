"""The data validation suite: a valid tiny prepared folder passes; each kind of breakage fails its check."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from wsss.config import ValidateConfig
from wsss.data.manifest import load_manifest, save_manifest
from wsss.data.validation import PYTHON_CHECKS, build_suite, validate_manifest

W, H = 24, 20

# (id, split, source, species, breed, has_mask)
ROWS = [
    ("Abyssinian_1", "train", "pets", 0, 0, True),
    ("Abyssinian_2", "train", "pets", 0, 0, True),
    ("american_bulldog_1", "train", "pets", 1, 1, True),
    ("american_bulldog_2", "train", "pets", 1, 1, True),
    ("x0_Bengal_1", "train", "extra", 0, 5, False),
    ("bg_0001", "train", "background", -1, -1, True),
    ("Abyssinian_3", "val", "pets", 0, 0, True),
    ("american_bulldog_3", "val", "pets", 1, 1, True),
    ("bg_0002", "val", "background", -1, -1, True),
    ("Abyssinian_4", "test", "pets", 0, 0, True),
    ("american_bulldog_4", "test", "pets", 1, 1, True),
]


def _pet_mask() -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[4:16, 5:19] = 255
    m[6:14, 7:17] = 1
    return m


def _write_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    records = []
    for rid, split, source, species, breed, has_mask in ROWS:
        image = f"images/{rid}.jpg"
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(root / image)
        mask_path, values, fg, border = "", "", -1.0, -1.0
        if has_mask:
            mask = _pet_mask() if source != "background" else np.zeros((H, W), np.uint8)
            mask_path = f"masks/{rid}.png"
            Image.fromarray(mask).save(root / mask_path)
            values = ",".join(str(v) for v in np.unique(mask))
            valid = mask != 255
            fg, border = float((mask[valid] == 1).mean()), float((mask == 255).mean())
        records.append({
            "id": rid, "split": split, "source": source, "species": species, "breed": breed,
            "is_background": source == "background", "has_mask": has_mask, "width": W, "height": H,
            "orig_width": 2 * W, "orig_height": 2 * H, "image_path": image, "mask_path": mask_path,
            "fg_fraction": fg, "border_fraction": border, "mask_values": values,
        })
    save_manifest(pd.DataFrame(records), root / "manifest.parquet")


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    _write_folder(root)
    return root


@pytest.fixture
def prepared(template: Path, tmp_path: Path) -> tuple[pd.DataFrame, Path]:
    """A fresh copy of the valid prepared folder and its manifest."""
    root = tmp_path / "prepared"
    shutil.copytree(template, root)
    return load_manifest(root / "manifest.parquet"), root


CFG = ValidateConfig()


def test_valid_folder_passes(prepared: tuple[pd.DataFrame, Path]) -> None:
    df, root = prepared
    res = validate_manifest(df, root, CFG)
    assert res.success, res.summary()
    names = [c.name for c in res.checks]
    assert len(names) == len(set(names))
    assert set(PYTHON_CHECKS) <= set(names)
    assert res.statistics == {"evaluated": len(names), "successful": len(names), "unsuccessful": 0}
    # Bengal has one train image: a breed under the floor is a warning, not a failure.
    counts = next(c for c in res.checks if c.name == "class_counts")
    assert counts.success and "warning" in counts.details and "Bengal" in counts.details
    assert "WARN class_counts" in res.summary()
    json.dumps(res.to_dict())
    # Bengal (label-only, train) is in neither val nor test: a warning; both species are everywhere.
    coverage = next(c for c in res.checks if c.name == "class_coverage")
    assert "absent from val: Bengal" in coverage.details and "absent from test: Bengal" in coverage.details
    hashed = next(c for c in res.checks if c.name == "duplicate_content")
    assert hashed.details == f"{len(ROWS)} image(s) hashed, no content in two splits"
    # The GX result as GX serialises it: one result per expectation of the suite.
    assert res.gx_result is not None and res.gx_result["success"] is True
    assert len(res.gx_result["results"]) == len(build_suite(CFG))
    json.dumps(res.gx_result)


def test_species_missing_from_val_only_warns(prepared: tuple[pd.DataFrame, Path]) -> None:
    df, root = prepared
    set_("american_bulldog_3", split="train")(df, root)
    res = validate_manifest(df, root, CFG)
    assert res.success, res.summary()
    coverage = next(c for c in res.checks if c.name == "class_coverage")
    assert "warning: no dog pet in val" in coverage.details


def test_duplicate_within_a_split_only_warns(prepared: tuple[pd.DataFrame, Path]) -> None:
    df, root = prepared
    copy_file("images/Abyssinian_1.jpg", "images/Abyssinian_2.jpg")(df, root)
    res = validate_manifest(df, root, CFG)
    assert res.success, res.summary()
    dup = next(c for c in res.checks if c.name == "duplicate_content")
    assert "warning: 1 image content(s) repeated within a split: Abyssinian_1 (train) = Abyssinian_2 (train)" \
        in dup.details


# --------------------------------------------------------------------------------------------------
# one breakage per case

Mutator = Callable[[pd.DataFrame, Path], pd.DataFrame | None]


def _idx(df: pd.DataFrame, rid: str) -> int:
    return int(df.index[df["id"] == rid][0])


def set_(rid: str, **values: object) -> Mutator:
    """Set manifest fields of one row."""

    def f(df: pd.DataFrame, root: Path) -> None:
        for k, v in values.items():
            df.loc[_idx(df, rid), k] = v

    return f


def add_copy(rid: str, **values: object) -> Mutator:
    """Append a copy of one row with some fields changed."""

    def f(df: pd.DataFrame, root: Path) -> pd.DataFrame:
        row = df.loc[[_idx(df, rid)]].copy()
        for k, v in values.items():
            row[k] = v
        return pd.concat([df, row], ignore_index=True)

    return f


def drop_row(rid: str) -> Mutator:
    return lambda df, root: df.drop(index=_idx(df, rid))


def drop_column(col: str) -> Mutator:
    return lambda df, root: df.drop(columns=[col])


def add_column(col: str) -> Mutator:
    return lambda df, root: df.assign(**{col: 0})


def remove_file(rel: str) -> Mutator:
    return lambda df, root: (root / rel).unlink()


def truncate_file(rel: str) -> Mutator:
    def f(df: pd.DataFrame, root: Path) -> None:
        data = (root / rel).read_bytes()
        (root / rel).write_bytes(data[: len(data) // 2])

    return f


def write_image(rel: str, array: np.ndarray | Callable[[Path], np.ndarray]) -> Mutator:
    """Write an image file (``array`` may be computed from the prepared folder)."""

    def f(df: pd.DataFrame, root: Path) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array(root) if callable(array) else array).save(root / rel)

    return f


def _pixels(rel: str) -> Callable[[Path], np.ndarray]:
    """The decoded pixels of a file of the prepared folder."""
    return lambda root: np.asarray(Image.open(root / rel).convert("RGB"))


def copy_file(src: str, dst: str) -> Mutator:
    def f(df: pd.DataFrame, root: Path) -> None:
        (root / dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / src, root / dst)

    return f


def combine(*fs: Mutator) -> Mutator:
    def f(df: pd.DataFrame, root: Path) -> pd.DataFrame:
        for g in fs:
            out = g(df, root)
            df = df if out is None else out
        return df

    return f


E = "expect_column_values_to_be_"
BG = " | is_background == True)"
PET_M = " | (has_mask == True AND is_background == False))"
BG_M = " | (has_mask == True AND is_background == True))"
NO_M = " | has_mask == False)"
PET_MASK_7 = np.where(_pet_mask() == 255, 7, _pet_mask()).astype(np.uint8)

CASES = [
    # --- the GX suite -----------------------------------------------------------------------------
    ("missing column", drop_column("orig_width"), None, {"expect_table_columns_to_match_set"}),
    ("extra column", add_column("note"), None, {"expect_table_columns_to_match_set"}),
    ("null id", set_("Abyssinian_3", id=None), None, {"expect_column_values_to_not_be_null(id)"}),
    ("duplicate id", set_("Abyssinian_2", id="Abyssinian_1"), None, {E + "unique(id)"}),
    ("null image_path", set_("Abyssinian_3", image_path=None), None,
     {"expect_column_values_to_not_be_null(image_path)"}),
    ("duplicate image_path", set_("Abyssinian_2", image_path="images/Abyssinian_1.jpg"), None,
     {E + "unique(image_path)"}),
    ("bad split", set_("Abyssinian_2", split="holdout"), None, {E + "in_set(split)"}),
    ("no test images", combine(drop_row("Abyssinian_4"), drop_row("american_bulldog_4")), None,
     {"expect_column_distinct_values_to_contain_set(split)", "class_coverage"}),
    ("bad source", set_("Abyssinian_1", source="web"), None, {E + "in_set(source)"}),
    ("species 5", set_("Abyssinian_1", species=5), None,
     {E + "in_set(species)", E + "in_set(species | is_background == False)"}),
    ("pet with species -1", set_("Abyssinian_1", species=-1), None,
     {E + "in_set(species | is_background == False)"}),
    ("breed 40", set_("Abyssinian_1", breed=40), None, {E + "between(breed)"}),
    ("width above max_side", None, {"max_side": W - 1}, {E + "between(width)"}),
    ("height below min_side", None, {"min_side": H + 1}, {E + "between(height)"}),
    ("bad mask_values", set_("x0_Bengal_1", mask_values="0,1,7"), None,
     {"expect_column_values_to_match_regex(mask_values)"}),
    # fg_fraction -1 on a masked pet was inside the old [-1, 1] bounds: the check could not catch it.
    ("masked pet with fg_fraction -1", set_("Abyssinian_1", fg_fraction=-1.0), None, {E + "between(fg_fraction" + PET_M}),
    ("all-pet mask", set_("Abyssinian_1", fg_fraction=1.0), None, {E + "between(fg_fraction" + PET_M}),
    ("no-pet mask on a pet", set_("american_bulldog_3", fg_fraction=0.0), None,
     {E + "between(fg_fraction" + PET_M}),
    ("background mask with pet pixels", set_("bg_0001", fg_fraction=0.2), None, {E + "between(fg_fraction" + BG_M}),
    ("fg_fraction without mask", set_("x0_Bengal_1", fg_fraction=0.5), None, {E + "in_set(fg_fraction" + NO_M}),
    ("border_fraction -3", set_("Abyssinian_1", border_fraction=-3.0), None,
     {E + "between(border_fraction | has_mask == True)"}),
    ("all-border mask", set_("Abyssinian_1", border_fraction=1.0), None,
     {E + "between(border_fraction | has_mask == True)"}),
    ("border_fraction without mask", set_("x0_Bengal_1", border_fraction=0.0), None,
     {E + "in_set(border_fraction" + NO_M}),
    ("has_mask without path", set_("Abyssinian_1", mask_path=""), None,
     {"expect_column_value_lengths_to_be_between(mask_path | has_mask == True)"}),
    ("mask path without has_mask", set_("Abyssinian_1", has_mask=False), None,
     {E + "in_set(mask_path" + NO_M, E + "in_set(fg_fraction" + NO_M, E + "in_set(border_fraction" + NO_M}),
    ("background in test", set_("bg_0002", split="test"), None, {E + "in_set(split" + BG}),
    ("background with species", set_("bg_0001", species=0), None, {E + "in_set(species" + BG}),
    ("background with breed", set_("bg_0001", breed=3), None, {E + "in_set(breed" + BG}),
    ("background source not flagged", set_("bg_0001", is_background=False), None,
     {E + "in_set(is_background | source == background)", E + "in_set(species | is_background == False)",
      E + "between(fg_fraction" + PET_M}),
    # --- cross-row checks -------------------------------------------------------------------------
    ("same image stem in train and test",
     combine(write_image("images/test/Abyssinian_1.jpg", np.zeros((H, W, 3), np.uint8)),
             add_copy("Abyssinian_1", id="x1_Abyssinian_1", split="test",
                      image_path="images/test/Abyssinian_1.jpg")),
     None, {"split_leak"}),
    ("id in two splits", add_copy("Abyssinian_1", split="test"), None,
     {"split_leak", E + "unique(id)", E + "unique(image_path)", "duplicate_content"}),
    ("species under floor", drop_row("american_bulldog_2"), None, {"class_counts"}),
    ("no cat in train (no count floor)",
     combine(drop_row("Abyssinian_1"), drop_row("Abyssinian_2"), drop_row("x0_Bengal_1")),
     {"min_images_per_class": 0}, {"class_coverage"}),
    ("no cat in test", combine(drop_row("Abyssinian_4")), None, {"class_coverage"}),
    ("test breed without train images", set_("american_bulldog_4", breed=2), None, {"class_coverage"}),
    ("val breed without train images", set_("Abyssinian_3", breed=6), None, {"class_coverage"}),
    ("test pet without mask",
     set_("Abyssinian_4", has_mask=False, mask_path="", mask_values="", fg_fraction=-1.0, border_fraction=-1.0),
     None, {"test_masks"}),
    ("breed of the other species", set_("Abyssinian_1", breed=1), None, {"breed_species"}),
    # --- file checks ------------------------------------------------------------------------------
    ("missing image", remove_file("images/Abyssinian_1.jpg"), None, {"files_exist"}),
    ("missing mask", remove_file("masks/Abyssinian_3.png"), None, {"files_exist"}),
    ("path outside folder", set_("Abyssinian_1", image_path="../Abyssinian_1.jpg"), None, {"files_exist"}),
    ("truncated image", truncate_file("images/Abyssinian_1.jpg"), None, {"files_decode"}),
    ("corrupt mask", truncate_file("masks/Abyssinian_1.png"), None, {"files_decode"}),
    ("size mismatch", write_image("images/Abyssinian_1.jpg", np.zeros((H, W + 3, 3), np.uint8)), None,
     {"files_size"}),
    ("mask with value 7", write_image("masks/Abyssinian_1.png", PET_MASK_7), None, {"mask_pixel_values"}),
    ("mask_values unlike the file", set_("Abyssinian_1", mask_values="0,1"), None, {"mask_pixel_values"}),
    # Same pixels under another id and file name: invisible to split_leak (ids and stems differ).
    ("same image content in train and test", copy_file("images/Abyssinian_1.jpg", "images/Abyssinian_4.jpg"),
     None, {"duplicate_content"}),
    ("same pixels re-encoded in val and train",
     combine(write_image("images/Abyssinian_3.png", _pixels("images/Abyssinian_2.jpg")),
             write_image("images/Abyssinian_2.png", _pixels("images/Abyssinian_2.jpg")),
             set_("Abyssinian_3", image_path="images/Abyssinian_3.png"),
             set_("Abyssinian_2", image_path="images/Abyssinian_2.png")),
     None, {"duplicate_content"}),
]


@pytest.mark.parametrize(("mutate", "cfg_changes", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_breakage_fails_its_check(
    prepared: tuple[pd.DataFrame, Path], mutate: Mutator | None, cfg_changes: dict | None, expected: set[str]
) -> None:
    df, root = prepared
    if mutate is not None:
        out = mutate(df, root)
        df = df if out is None else out
    cfg = dataclasses.replace(CFG, **(cfg_changes or {}))
    res = validate_manifest(df, root, cfg)
    failed = {c.name for c in res.failed}
    assert not res.success
    assert failed == expected, res.summary()
    assert res.statistics["unsuccessful"] == len(expected)
    for c in res.failed:
        assert c.details and c.name in res.summary()


def test_every_check_is_proven_to_fail() -> None:
    covered = set().union(*(c[3] for c in CASES))
    names = [e.meta["name"] for e in build_suite(CFG)]
    assert len(names) == len(set(names))
    assert set(names) | set(PYTHON_CHECKS) <= covered, set(names) | set(PYTHON_CHECKS) - covered


def test_details_name_offenders(prepared: tuple[pd.DataFrame, Path]) -> None:
    df, root = prepared
    set_("Abyssinian_3", split="holdout")(df, root)
    remove_file("images/Abyssinian_1.jpg")(df, root)
    res = validate_manifest(df, root, CFG)
    details = {c.name: c.details for c in res.failed}
    assert "holdout" in details[E + "in_set(split)"] and "Abyssinian_3" in details[E + "in_set(split)"]
    assert "images/Abyssinian_1.jpg" in details["files_exist"]
    report = json.loads(json.dumps(res.to_dict()))
    assert report["success"] is False and set(report["failed"]) == set(details)
    no_test = df[df["split"] != "test"]
    details = {c.name: c.details for c in validate_manifest(no_test, root, CFG).failed}
    assert details["expect_column_distinct_values_to_contain_set(split)"] == "1 expected value(s) absent: test"


def test_file_checks_can_be_skipped(prepared: tuple[pd.DataFrame, Path]) -> None:
    df, root = prepared
    remove_file("images/Abyssinian_1.jpg")(df, root)
    res = validate_manifest(df, root, dataclasses.replace(CFG, check_files=False))
    assert res.success, res.summary()
    assert not {c.name for c in res.checks} & {"files_exist", "files_decode", "files_size", "mask_pixel_values"}


def test_writes_no_files(prepared: tuple[pd.DataFrame, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    df, root = prepared
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    validate_manifest(df, root, CFG)
    assert not list(work.iterdir())
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
