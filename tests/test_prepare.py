"""The data layer: robust decoding, Oxford split parsing, prepare_dataset (atomic output, splits, issues)."""

from __future__ import annotations

import io
import os
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.data_factory import (
    add_pet,
    append_split,
    deny_reading,
    make_background_folder,
    make_oxford_tree,
    pet_image,
    pet_trimap,
    split_line,
    write_image,
    write_split,
    write_trimap,
)
from wsss.config import PrepareConfig
from wsss.data import fetch, images
from wsss.data.images import ImageIssue, decode_image, read_rgb, read_trimap
from wsss.data.manifest import COLUMNS, load_manifest
from wsss.data.oxford_pet import parse_split_file, read_split_files, trimap_to_mask
from wsss.data.prepare import prepare_dataset, stratified_val_mask, target_size
from wsss.errors import DataError

CFG = PrepareConfig(max_side=32, min_side=16, val_fraction=0.25, background_val_fraction=0.5)


def _issues_for(result_issues: list[dict[str, str]], path: Path) -> list[dict[str, str]]:
    return [i for i in result_issues if i["file"] == str(path)]


def _one_issue(result_issues: list[dict[str, str]], path: Path, action: str, *words: str) -> dict[str, str]:
    found = _issues_for(result_issues, path)
    assert found, f"no issue reported for {path}; issues: {result_issues}"
    match = [i for i in found if i["action"] == action and all(w in i["reason"] for w in words)]
    assert match, f"{path}: expected {action} with {words}, got {found}"
    return match[0]


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


# --------------------------------------------------------------------------------------------------
# happy path


def test_happy_path_manifest_splits_masks(tmp_path: Path) -> None:
    n = {0: 9, 1: 7, 5: 3, 7: 1}
    root = make_oxford_tree(tmp_path / "pets", n_per_breed=n, breeds=list(n), size=(64, 48))
    out = tmp_path / "prepared"
    res = prepare_dataset(root, out, CFG, seed=0)
    df = res.manifest
    assert list(df.columns) == list(COLUMNS)
    assert res.issues == []
    trainval = sum(v - 1 if v > 1 else v for v in n.values())  # one test image per breed with >1
    assert res.counts["test"] == 3 and res.counts["pets"] == 20 == len(df)
    assert res.counts["val"] == round(0.25 * trainval) == 4
    assert res.counts["train"] + res.counts["val"] == trainval
    assert res.counts["excluded"] == res.counts["converted"] == 0
    assert (df["source"] == "pets").all() and df["has_mask"].all() and not df["is_background"].any()
    # stratified: every breed keeps a train image, the single-image breed stays in train
    train, val = df[df["split"] == "train"], df[df["split"] == "val"]
    assert set(val["breed"]) <= {0, 1, 5}
    assert set(train["breed"]) >= {0, 1, 5, 7}
    # resize: longest side 32, aspect kept, never upscaled
    assert (df[["width", "height"]].to_numpy() == [32, 24]).all()
    assert (df[["orig_width", "orig_height"]].to_numpy() == [64, 48]).all()
    row = df.iloc[0]
    with Image.open(out / row["image_path"]) as im:
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (32, 24)
    for _, r in df.iterrows():
        mask = np.asarray(Image.open(out / r["mask_path"]))
        assert mask.shape == (24, 32) and set(np.unique(mask)) <= {0, 1, 255}
        assert r["mask_values"] == ",".join(str(v) for v in np.unique(mask))
        valid = mask != 255
        assert r["fg_fraction"] == pytest.approx((mask == 1).sum() / valid.sum())
        assert r["border_fraction"] == pytest.approx((~valid).mean())
    species = dict(zip(df["breed"], df["species"], strict=False))
    assert species == {0: 0, 1: 1, 5: 0, 7: 0}
    # the manifest file is the same table
    pd.testing.assert_frame_equal(load_manifest(out / "manifest.parquet"), df, check_dtype=False)
    assert _siblings(out) == []


def test_max_side_zero_keeps_size_and_no_upscale(tmp_path: Path) -> None:
    root = make_oxford_tree(tmp_path / "pets", n_per_breed=2, breeds=[0], size=(40, 30), n_test_per_breed=0)
    for max_side in (0, 100):
        res = prepare_dataset(root, tmp_path / f"out{max_side}", PrepareConfig(max_side=max_side), seed=0)
        assert (res.manifest[["width", "height"]].to_numpy() == [40, 30]).all()
    assert target_size(300, 200, 64) == (64, 43) and target_size(20, 10, 64) == (20, 10)


def test_val_split_seeded_exact_and_proportional() -> None:
    groups = [0] * 40 + [1] * 20 + [2] * 2 + [3] * 2 + [4] * 3 + [5]
    rng = np.random.default_rng
    sizes = []
    landed: dict[int, int] = {g: 0 for g in range(6)}
    for seed in range(200):
        val = stratified_val_mask(groups, 0.15, rng(seed))
        sizes.append(int(val.sum()))
        g = np.asarray(groups)
        for b in range(6):
            in_val = int(val[g == b].sum())
            assert in_val < (g == b).sum() or (g == b).sum() == 0  # one always stays in train
            landed[b] += in_val > 0
    assert set(sizes) == {round(0.15 * len(groups))}
    assert landed[5] == 0  # a single image never leaves train
    assert all(landed[b] > 0 for b in (2, 3, 4))  # small breeds can land in val
    assert landed[0] == landed[1] == 200  # big breeds always contribute
    a = stratified_val_mask(groups, 0.15, rng(7))
    assert (a == stratified_val_mask(groups, 0.15, rng(7))).all()
    assert stratified_val_mask(groups, 0.0, rng(0)).sum() == 0


# --------------------------------------------------------------------------------------------------
# decoding


def test_decode_conversions(tmp_path: Path) -> None:
    rgb = pet_image(30, 40, np.random.default_rng(0))
    cases = {
        "gray.jpg": ("JPEG", "L", "grayscale"),
        "cmyk.jpg": ("JPEG", "CMYK", "CMYK -> RGB"),
        "rgba.png": ("PNG", "RGBA", "RGBA -> RGB"),
        "pal.png": ("PNG", "P", "palette"),
        "png_named.jpg": ("PNG", None, "PNG bytes named .jpg"),
        "gif_named.jpg": ("GIF", None, "GIF bytes named .jpg"),
    }
    for name, (fmt, mode, note) in cases.items():
        path = write_image(tmp_path / name, rgb, fmt=fmt, mode=mode)
        notes: list[str] = []
        arr = read_rgb(path, notes=notes)
        assert arr.shape == (30, 40, 3) and arr.dtype == np.uint8
        assert any(note in n for n in notes), (name, notes)
    # 16-bit grayscale PNG -> 8-bit RGB, scaled
    path = tmp_path / "g16.png"
    Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16)).save(path)
    dec = decode_image(path)
    assert dec.array.shape == (20, 20, 3) and dec.array.max() == 255 and dec.notes
    # transparent pixels composite on black
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[:10, :, 3] = 255
    path = tmp_path / "half.png"
    Image.fromarray(rgba).save(path)
    arr = read_rgb(path)
    assert (arr[:10] == 200).all() and (arr[10:] == 0).all()
    # plain RGB JPEG: no notes
    assert decode_image(write_image(tmp_path / "ok.jpg", rgb)).notes == []


def test_decode_failures_raise_image_issue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rgb = pet_image(40, 40, np.random.default_rng(0))
    good = write_image(tmp_path / "good.jpg", rgb)
    data = good.read_bytes()
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.jpg").write_bytes(os.urandom(500))
    reasons = {
        "empty.jpg": "empty",
        "trunc.jpg": "truncated",
        "junk.jpg": "not a recognised image",
        "missing.jpg": "not found",
    }
    for name, word in reasons.items():
        with pytest.raises(ImageIssue) as ei:
            read_rgb(tmp_path / name)
        assert word in ei.value.reason and ei.value.path == tmp_path / name
        assert isinstance(ei.value, DataError)
    with pytest.raises(ImageIssue, match="too large"):
        read_rgb(good, max_pixels=1000)
    with pytest.raises(ImageIssue, match="too small"):
        read_rgb(good, min_side=64)
    # PIL's own decompression-bomb guard (fires while reading the header) is converted too
    for limit in (100, 1000):  # 40x40 is beyond 2x the limit (PIL error) / beyond the limit (PIL warning)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(ImageIssue, match="too large"):
            read_rgb(good)


def test_trimap_reading_and_mapping(tmp_path: Path) -> None:
    tri = pet_trimap(20, 30)
    p = tmp_path / "p.png"
    im = Image.frombytes("P", (30, 20), tri.tobytes())  # palette image: the indices are the labels
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    im.save(p)
    with Image.open(p) as check:
        assert check.mode == "P"
    assert (read_trimap(p) == tri).all()
    mask = trimap_to_mask(tri)
    assert set(np.unique(mask)) == {0, 1, 255}
    assert ((tri == 1) == (mask == 1)).all() and ((tri == 2) == (mask == 0)).all()
    with pytest.raises(ImageIssue, match="outside"):
        trimap_to_mask(np.array([[0, 1], [2, 4]], dtype=np.uint8), "x.png")
    rgb = np.zeros((10, 10, 3), dtype=np.uint8)
    rgb[..., 0] = 1
    with pytest.raises(ImageIssue, match="colour"):
        read_trimap(write_image(tmp_path / "c.png", rgb, fmt="PNG"))


# --------------------------------------------------------------------------------------------------
# split files


def test_parse_split_file_reports_malformed_lines(tmp_path: Path) -> None:
    path = tmp_path / "annotations" / "trainval.txt"
    path.parent.mkdir()
    lines = [
        "# comment",
        "",
        split_line("Abyssinian_1", 0),
        "Abyssinian_2 1 1",  # 3 fields
        "Abyssinian_3 one 1 1",  # not an integer
        "Abyssinian_4 38 1 1",  # class out of range
        "Abyssinian_5 1 2 1",  # species says dog
        "Abyssinian_6 1 1 5",  # wrong per-species BREED-ID: kept, reported
        split_line("Abyssinian_1", 0),  # duplicate
        split_line("Bengal_1", 5),
        split_line("Bengal_1", 6),  # conflicting duplicate
        "../etc/passwd 1 1 1",
    ]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"Abyss\xffinian_7 1 1 1\r\n")
    entries, issues = parse_split_file(path, "trainval")
    assert [e.name for e in entries] == ["Abyssinian_1", "Abyssinian_6"]
    reasons = " | ".join(i["reason"] for i in issues)
    for word in (
        "line 4: expected 4 fields",
        "line 5: CLASS-ID, SPECIES and BREED-ID must be integers",
        "CLASS-ID 38 outside",
        "contradicts",
        "BREED-ID 5",
        "duplicate of line 3",
        "different CLASS-ID",
        "path separators",
        "not valid UTF-8",
    ):
        assert word in reasons, word
    assert all(i["file"] == str(path) for i in issues)


def test_missing_root_and_split_files_raise(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        prepare_dataset(tmp_path / "nope", tmp_path / "out", CFG, seed=0)
    (tmp_path / "empty" / "images").mkdir(parents=True)
    with pytest.raises(DataError, match="no split files") as ei:
        prepare_dataset(tmp_path / "empty", tmp_path / "out", CFG, seed=0)
    assert str(tmp_path / "empty") in str(ei.value)
    root = make_oxford_tree(tmp_path / "cls", n_per_breed=2, breeds=[0], trimaps=False)
    with pytest.raises(DataError, match="trimaps"):
        prepare_dataset(root, tmp_path / "out", CFG, seed=0)
    assert not (tmp_path / "out").exists()


def test_pairing_by_name_not_listing_order(tmp_path: Path) -> None:
    root = make_oxford_tree(
        tmp_path / "pets",
        n_per_breed=5,
        breeds=[0, 1, 5],
        size=(36, 30),
        shuffle_lines=True,
        scale_jitter=True,
    )
    res = prepare_dataset(root, tmp_path / "out", PrepareConfig(max_side=0, val_fraction=0.2), seed=1)
    assert res.issues == [] and len(res.manifest) == 15
    for _, r in res.manifest.iterrows():
        expected = trimap_to_mask(read_trimap(root / "annotations" / "trimaps" / f"{r['id']}.png"))
        got = np.asarray(Image.open(tmp_path / "out" / r["mask_path"]))
        assert (got == expected).all(), r["id"]
    records, _ = read_split_files(root)
    assert all(rec.image.stem == rec.name == rec.trimap.stem for rec in records if rec.trimap)


# --------------------------------------------------------------------------------------------------
# bad input


def test_bad_inputs_are_reported_and_the_rest_prepared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_oxford_tree(tmp_path / "pets", n_per_breed=4, breeds=[0, 1], size=(48, 40))
    img_dir, tri_dir = root / "images", root / "annotations" / "trimaps"
    rgb = pet_image(40, 48, np.random.default_rng(1))
    tri = pet_trimap(40, 48)
    bad: dict[str, tuple[Path, str, tuple[str, ...]]] = {}

    def pet(name: str, breed: int = 0, **kw: object) -> Path:
        kw.setdefault("size", (48, 40))
        return add_pet(root, name, breed, **kw)  # type: ignore[arg-type]

    # corrupt / truncated / zero-byte images
    p = pet("Abyssinian_corrupt")
    p.write_bytes(os.urandom(300))
    bad["corrupt"] = (p, "excluded", ("not a recognised image",))
    p = pet("Abyssinian_trunc")
    p.write_bytes(p.read_bytes()[:400])
    bad["truncated"] = (p, "excluded", ("truncated",))
    p = pet("Abyssinian_empty")
    p.write_bytes(b"")
    bad["empty"] = (p, "excluded", ("empty",))
    # conversions (kept)
    for name, fmt, mode, word in [
        ("Abyssinian_gray", "JPEG", "L", "grayscale"),
        ("Abyssinian_cmyk", "JPEG", "CMYK", "CMYK -> RGB"),
        ("Abyssinian_rgba", "PNG", "RGBA", "RGBA -> RGB"),
        ("Abyssinian_png", "PNG", None, "PNG bytes named .jpg"),
        ("Abyssinian_gif", "GIF", None, "GIF bytes named .jpg"),
    ]:
        p = pet(name)
        write_image(p, rgb, fmt=fmt, mode=mode)
        bad[name] = (p, "converted", (word,))
    # trimap problems
    pet("Abyssinian_notri", trimap=False)
    bad["no trimap"] = (img_dir / "Abyssinian_notri.jpg", "excluded", ("no trimap",))
    pet("Abyssinian_trisize")
    write_trimap(tri_dir / "Abyssinian_trisize.png", pet_trimap(20, 20))
    bad["trimap size"] = (tri_dir / "Abyssinian_trisize.png", "excluded", ("differs",))
    pet("Abyssinian_trival")
    t = tri.copy()
    t[0, 0] = 7
    write_trimap(tri_dir / "Abyssinian_trival.png", t)
    bad["trimap values"] = (tri_dir / "Abyssinian_trival.png", "excluded", ("outside", "7"))
    # listed without image; image not listed
    append_split(root, "trainval", [split_line("Abyssinian_ghost", 0)])
    bad["no image"] = (img_dir / "Abyssinian_ghost.jpg", "excluded", ("no image file",))
    p = pet("Abyssinian_unlisted", split=None)
    bad["unlisted"] = (p, "ignored", ("not listed",))
    # sizes
    p = pet("Abyssinian_tiny", size=(12, 10))
    bad["too small"] = (p, "excluded", ("too small",))
    p = pet("Abyssinian_huge", size=(400, 300))
    bad["too large"] = (p, "excluded", ("too large",))
    # unreadable file (as root, permissions do not stop reads: simulate the OS error)
    p = pet("Abyssinian_noperm")
    if os.geteuid() != 0:
        p.chmod(0)
    else:
        deny_reading(monkeypatch, images, p)
    bad["permission"] = (p, "excluded", ("permission denied",))
    # symlink loop
    loop_a, loop_b = img_dir / "Abyssinian_loopa.jpg", img_dir / "Abyssinian_loopb.jpg"
    os.symlink(loop_b.name, loop_a)
    os.symlink(loop_a.name, loop_b)
    write_trimap(tri_dir / "Abyssinian_loopa.png", tri)
    append_split(root, "trainval", [split_line("Abyssinian_loopa", 0)])
    bad["symlink loop"] = (loop_a, "excluded", ("symbolic link loop",))
    # split-file problems
    append_split(root, "test", [split_line("Abyssinian_1", 0)])  # also in trainval
    append_split(root, "trainval", ["american_bulldog_2 2 1 1"])  # species mismatch (and duplicate)
    append_split(root, "trainval", [b"bad\xfe\xff 1 1 1\n"][0])  # non-UTF-8

    cfg = PrepareConfig(max_side=32, min_side=16, max_pixels=100_000, val_fraction=0.25)
    res = prepare_dataset(root, tmp_path / "out", cfg, seed=0)
    for kind, (path, action, words) in bad.items():
        _one_issue(res.issues, path, action, *words)
        stem = path.stem
        in_manifest = stem in set(res.manifest["id"])
        assert in_manifest == (action == "converted"), kind
    trainval_txt = root / "annotations" / "trainval.txt"
    _one_issue(res.issues, trainval_txt, "excluded", "contradicts")
    _one_issue(res.issues, trainval_txt, "ignored", "not valid UTF-8")
    _one_issue(res.issues, root / "annotations", "excluded", "Abyssinian_1", "both")
    ids = set(res.manifest["id"])
    assert "Abyssinian_1" not in ids
    # the good images all made it
    good = {f"Abyssinian_{i}" for i in (2, 3, 4)} | {f"american_bulldog_{i}" for i in (1, 2, 3, 4)}
    assert good <= ids
    assert res.counts["converted"] == 5
    assert res.counts["excluded"] == sum(1 for i in res.issues if i["action"] == "excluded")
    for _, r in res.manifest.iterrows():
        with Image.open(tmp_path / "out" / r["image_path"]) as im:
            assert im.mode == "RGB" and im.format == "JPEG"


def test_no_usable_image_raises(tmp_path: Path) -> None:
    root = make_oxford_tree(tmp_path / "pets", n_per_breed=2, breeds=[0], n_test_per_breed=0)
    for p in (root / "images").iterdir():
        p.write_bytes(b"")
    with pytest.raises(DataError, match="no usable image"):
        prepare_dataset(root, tmp_path / "out", CFG, seed=0)
    assert not (tmp_path / "out").exists() and _siblings(tmp_path / "out") == []


def test_orphan_trimaps_are_listed_and_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from wsss.stages.prepare import _print_issues

    root = make_oxford_tree(tmp_path / "pets", n_per_breed=4, breeds=[0, 1], size=(40, 40))
    clean = prepare_dataset(root, tmp_path / "clean", CFG, seed=0)
    tri_dir = root / "annotations" / "trimaps"
    orphans = [write_trimap(tri_dir / f"{name}.png", pet_trimap(40, 40)) for name in ("Bengal_9", "ghost")]
    # a listed name without an image: the image is reported as missing, its trimap as an orphan
    append_split(root, "trainval", [split_line("Abyssinian_ghost", 0)])
    orphans.append(write_trimap(tri_dir / "Abyssinian_ghost.png", pet_trimap(40, 40)))
    res = prepare_dataset(root, tmp_path / "out", CFG, seed=0)
    for path in orphans:
        _one_issue(res.issues, path, "ignored", "orphan trimap", "no image")
    _one_issue(res.issues, root / "images" / "Abyssinian_ghost.jpg", "excluded", "no image file")
    assert res.manifest.equals(clean.manifest)
    assert res.counts["ignored"] == 3 and clean.issues == []
    _print_issues(res.issues)
    assert "3 orphan trimap(s)" in " ".join(capsys.readouterr().err.split())


def test_all_border_mask_keeps_the_image_unmasked_or_excludes_a_test_image(tmp_path: Path) -> None:
    from wsss.config import ValidateConfig
    from wsss.data.validation import validate_manifest

    # two test images per breed: the dog breed keeps one in test (validation's class coverage needs it)
    root = make_oxford_tree(tmp_path / "pets", n_per_breed=5, breeds=[0, 1], size=(40, 40), n_test_per_breed=2)
    tri_dir = root / "annotations" / "trimaps"
    border = np.full((40, 40), 3, np.uint8)
    train_tri = write_trimap(tri_dir / "Abyssinian_1.png", border)  # trainval
    test_tri = write_trimap(tri_dir / "american_bulldog_5.png", border)  # test (the last of its breed)
    out = tmp_path / "out"
    res = prepare_dataset(root, out, CFG, seed=0)
    df = res.manifest.set_index("id")
    _one_issue(res.issues, train_tri, "excluded", "all border", "mask dropped, image kept")
    row = df.loc["Abyssinian_1"]
    assert not row["has_mask"] and row["mask_path"] == "" and row["split"] in ("train", "val")
    assert row["fg_fraction"] == -1 and row["mask_values"] == ""
    assert not (out / "masks" / "Abyssinian_1.png").exists() and (out / row["image_path"]).is_file()
    _one_issue(res.issues, test_tri, "excluded", "all border", "test image")
    assert "american_bulldog_5" not in df.index and not (out / "images" / "american_bulldog_5.jpg").exists()
    assert df["has_mask"].sum() == len(df) - 1
    checked = validate_manifest(res.manifest, out, ValidateConfig(min_images_per_class=1, max_side=32))
    assert checked.success, checked.summary()


# --------------------------------------------------------------------------------------------------
# atomic output


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_idempotent_rerun(tmp_path: Path) -> None:
    root = make_oxford_tree(tmp_path / "pets", n_per_breed=4, breeds=[0, 1], size=(40, 40))
    out = tmp_path / "prepared"
    first = prepare_dataset(root, out, CFG, seed=3)
    snap = _snapshot(out)
    second = prepare_dataset(root, out, CFG, seed=3)
    pd.testing.assert_frame_equal(first.manifest, second.manifest)
    assert _snapshot(out) == snap
    assert first.counts == second.counts and _siblings(out) == []


def test_interrupted_run_keeps_previous_output(tmp_path: Path) -> None:
    root = make_oxford_tree(tmp_path / "pets", n_per_breed=4, breeds=[0, 1], size=(40, 40))
    out = tmp_path / "prepared"
    prepare_dataset(root, out, CFG, seed=0)
    snap = _snapshot(out)

    def boom(done: int, total: int) -> None:
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(root, out, PrepareConfig(max_side=24), seed=5, progress=boom)
    assert _snapshot(out) == snap

    # a run killed hard leaves its build folder; one killed mid-swap leaves only the old output
    stale = out.parent / ".prepared.tmp-999999999-dead"
    (stale / "images").mkdir(parents=True)
    os.replace(out, out.parent / ".prepared.old-999999999-dead")
    calls: list[tuple[int, int]] = []
    prepare_dataset(root, out, CFG, seed=0, progress=lambda d, t: calls.append((d, t)))
    assert _snapshot(out) == snap
    assert _siblings(out) == []
    assert calls[0] == (0, 8) and calls[-1] == (8, 8)


# --------------------------------------------------------------------------------------------------
# extra roots and background images


def test_extra_roots_and_background(tmp_path: Path) -> None:
    main = make_oxford_tree(tmp_path / "main", n_per_breed=4, breeds=[0, 1], size=(40, 40))
    extra = make_oxford_tree(tmp_path / "extra", n_per_breed=3, breeds=[1, 5], trimaps=False, seed=2)
    # american_bulldog_1..3 also exist in main: duplicates
    extra2 = tmp_path / "extra2"
    make_oxford_tree(extra2, n_per_breed=2, breeds=[9], trimaps=False, seed=3)
    bg = make_background_folder(tmp_path / "iccv09Data", n=6)
    (bg / "images" / "notes.txt").write_text("x")
    res = prepare_dataset(
        main, tmp_path / "out", CFG, seed=0, extra_roots=[extra, extra2], background_root=bg
    )
    df = res.manifest
    ex = df[df["source"] == "extra"]
    assert set(ex["id"]) == {
        "x1_Bengal_1",
        "x1_Bengal_2",
        "x1_Bengal_3",
        "x2_British_Shorthair_1",
        "x2_British_Shorthair_2",
    }
    assert (ex["split"] == "train").all() and not ex["has_mask"].any() and (ex["mask_path"] == "").all()
    assert (ex["fg_fraction"] == -1).all() and (ex["mask_values"] == "").all()
    assert set(ex["breed"]) == {5, 9} and set(ex["species"]) == {0}
    for i in (1, 2, 3):
        _one_issue(res.issues, extra / "images" / f"american_bulldog_{i}.jpg", "excluded", "duplicate")
    b = df[df["source"] == "background"]
    assert len(b) == 6 and b["id"].str.startswith("bg_").all() and b["is_background"].all()
    assert (b["species"] == -1).all() and (b["breed"] == -1).all() and not b["has_mask"].any()
    assert (b["split"] == "val").sum() == 3 and set(b["split"]) == {"train", "val"}
    _one_issue(res.issues, bg / "images" / "notes.txt", "ignored", "not an image")
    assert res.counts["extra"] == 5 and res.counts["background"] == 6 and res.counts["pets"] == 8
    # the pets' split does not depend on the extra sources
    alone = prepare_dataset(main, tmp_path / "out2", CFG, seed=0).manifest
    pets = df[df["source"] == "pets"].reset_index(drop=True)
    assert list(pets["split"]) == list(alone["split"])
    # flat background folder; missing folder
    flat = make_background_folder(tmp_path / "flat", n=2, layout="flat")
    res = prepare_dataset(main, tmp_path / "out3", CFG, seed=0, background_root=flat)
    assert res.counts["background"] == 2
    with pytest.raises(DataError, match="background"):
        prepare_dataset(main, tmp_path / "out4", CFG, seed=0, background_root=tmp_path / "missing")


# --------------------------------------------------------------------------------------------------
# fetching (offline paths only)


def test_fetch_offline_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*a: object, **kw: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="offline") as ei:
        fetch.fetch_stanford_background(tmp_path / "bg")
    assert "iccv09Data/images" in str(ei.value)
    assert not (tmp_path / "bg" / "iccv09Data.tar.gz").exists()

    import torchvision.datasets

    class FakePet:
        def __init__(self, *a: object, **kw: object) -> None:
            offline()

    monkeypatch.setattr(torchvision.datasets, "OxfordIIITPet", FakePet)
    with pytest.raises(DataError, match="offline") as ei:
        fetch.fetch_oxford_pet(tmp_path / "pets")
    assert "oxford-iiit-pet/annotations/trimaps" in str(ei.value)


def test_fetch_stanford_extracts_safely(tmp_path: Path) -> None:
    def tar_with(names: list[str]) -> Path:
        path = tmp_path / f"a{len(list(tmp_path.glob('a*')))}" / "iccv09Data.tar.gz"
        path.parent.mkdir()
        with tarfile.open(path, "w:gz") as tar:
            for name in names:
                buf = io.BytesIO()
                Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(buf, format="JPEG")
                info = tarfile.TarInfo(name)
                info.size = len(buf.getvalue())
                tar.addfile(info, io.BytesIO(buf.getvalue()))
        return path

    good = tar_with(["iccv09Data/images/0000001.jpg"])
    root = fetch.fetch_stanford_background(good.parent)
    assert (root / "images" / "0000001.jpg").is_file()
    evil = tar_with(["iccv09Data/images/1.jpg", "../evil.jpg"])
    with pytest.raises(DataError, match="extract"):
        fetch.fetch_stanford_background(evil.parent)
    assert not (tmp_path / "evil.jpg").exists()


def test_write_split_helper_roundtrip(tmp_path: Path) -> None:
    root = tmp_path / "r"
    (root / "images").mkdir(parents=True)
    write_split(root, "trainval", [split_line("pug_1", 25)])
    write_image(root / "images" / "pug_1.jpg", pet_image(20, 20, np.random.default_rng(0)))
    records, issues = read_split_files(root)
    assert issues and issues[0]["reason"].startswith("split file missing")  # test.txt absent
    assert [(r.name, r.breed, r.species, r.trimap) for r in records] == [("pug_1", 25, 1, None)]
