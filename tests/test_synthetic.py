"""The synthetic pets generator: layout, determinism, atomicity and that it is not trivially segmentable."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss.config import SyntheticConfig
from wsss.data.breeds import BREED_SPECIES, BREEDS
from wsss.data.synthetic import STAMP, generate, synthetic_breeds
from wsss.errors import DataError

TINY = SyntheticConfig(n_trainval=12, n_test=6, n_background=4, image_size=64, breeds_per_species=2)


def _split(root: Path, split: str) -> list[tuple[str, int, int, int]]:
    rows = []
    for line in (root / "annotations" / f"{split}.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, cid, sp, bid = line.split()
            rows.append((name, int(cid), int(sp), int(bid)))
    return rows


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_breeds_are_first_cats_and_dogs() -> None:
    got = synthetic_breeds(TINY)
    assert [BREEDS[b] for b in got] == ["Abyssinian", "american_bulldog", "american_pit_bull_terrier", "Bengal"]
    assert sorted(BREED_SPECIES[b] for b in got) == [0, 0, 1, 1]


def test_layout_counts_and_trimaps(tmp_path: Path) -> None:
    out = tmp_path / "synthetic"
    counts = generate(out, TINY)
    assert counts == {"trainval": 12, "test": 6, "background": 4}
    root = out / "oxford-iiit-pet"
    used = set(synthetic_breeds(TINY))
    names: list[str] = []
    for split, n in (("trainval", 12), ("test", 6)):
        rows = _split(root, split)
        assert len(rows) == n
        for name, cid, sp, bid in rows:
            breed = cid - 1
            assert breed in used and name.rsplit("_", 1)[0] == BREEDS[breed]
            assert sp == BREED_SPECIES[breed] + 1
            assert bid == sum(1 for b in range(breed + 1) if BREED_SPECIES[b] == BREED_SPECIES[breed])
            names.append(name)
    assert len(set(names)) == len(names)  # trainval and test never share a name
    for name in names:
        with Image.open(root / "images" / f"{name}.jpg") as im:
            assert im.mode == "RGB" and im.format == "JPEG"
            size = im.size
        tri = np.asarray(Image.open(root / "annotations" / "trimaps" / f"{name}.png"))
        assert tri.dtype == np.uint8 and (tri.shape[1], tri.shape[0]) == size
        assert max(size) == 64 and min(size) >= 48
        assert set(np.unique(tri).tolist()) <= {1, 2, 3}
        assert (tri == 1).sum() > 0 and (tri == 2).sum() > 0
    bgs = sorted((out / "background" / "images").glob("bg_*.jpg"))
    assert len(bgs) == 4
    stamp = json.loads((out / STAMP).read_text())
    assert stamp["counts"] == counts and stamp["config"]["seed"] == 0


def test_deterministic_and_idempotent(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    generate(a, TINY)
    generate(b, TINY)
    files_a = _files(a)
    assert files_a == _files(b)
    mtimes = {p: p.stat().st_mtime_ns for p in a.rglob("*")}
    assert generate(a, TINY) == {"trainval": 12, "test": 6, "background": 4}
    assert {p: p.stat().st_mtime_ns for p in a.rglob("*")} == mtimes

    c = tmp_path / "c"
    generate(c, dataclasses.replace(TINY, seed=1))
    files_c = _files(c)
    images = [k for k in files_a if k.endswith(".jpg")]
    assert sum(files_a[k] != files_c.get(k) for k in images) == len(images)


def test_new_config_replaces_the_old_tree(tmp_path: Path) -> None:
    out = tmp_path / "synthetic"
    generate(out, TINY)
    before = _files(out)
    generate(out, dataclasses.replace(TINY, seed=3))
    assert _files(out) != before
    assert json.loads((out / STAMP).read_text())["config"]["seed"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]  # no temporary siblings left


class _Stop(Exception):
    pass


def _stop_after(n: int) -> Callable[[int, int], None]:
    def progress(done: int, total: int) -> None:
        if done >= n:
            raise _Stop

    return progress


def test_interrupted_generation_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "synthetic"
    with pytest.raises(_Stop):
        generate(out, TINY, progress=_stop_after(5))
    assert not (out / "oxford-iiit-pet").exists() and not (out / STAMP).exists()
    assert list(tmp_path.iterdir()) == []


def test_interrupted_regeneration_keeps_the_previous_dataset(tmp_path: Path) -> None:
    out = tmp_path / "synthetic"
    generate(out, TINY)
    before = _files(out)
    with pytest.raises(_Stop):
        generate(out, dataclasses.replace(TINY, seed=5), progress=_stop_after(3))
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]


def test_refuses_to_overwrite_a_foreign_folder(tmp_path: Path) -> None:
    out = tmp_path / "synthetic"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="no synthetic.json"):
        generate(out, TINY)
    assert (out / "precious.txt").read_text() == "keep me"


def test_not_solvable_by_a_centre_prior(tmp_path: Path) -> None:
    cfg = SyntheticConfig(n_trainval=30, n_test=10, n_background=0, image_size=64, breeds_per_species=2)
    generate(tmp_path / "s", cfg)
    root = tmp_path / "s" / "oxford-iiit-pet"
    whole, ellipse, centres = [], [], []
    for split in ("trainval", "test"):
        for name, *_ in _split(root, split):
            tri = np.asarray(Image.open(root / "annotations" / "trimaps" / f"{name}.png"))
            h, w = tri.shape
            valid, pet = tri != 3, tri == 1
            yy, xx = np.mgrid[0:h, 0:w]
            ell = ((xx + 0.5 - w / 2) / (0.4 * w)) ** 2 + ((yy + 0.5 - h / 2) / (0.4 * h)) ** 2 <= 1
            whole.append((pet & valid).sum() / valid.sum())
            ellipse.append((pet & ell).sum() / ((pet | ell) & valid).sum())
            ys, xs = np.nonzero(pet)
            centres.append((xs.mean() / w, ys.mean() / h))
    assert len(whole) == 40
    assert np.mean(whole) < 0.45 and np.mean(ellipse) < 0.45
    assert 0.01 < min(whole) and max(whole) < 0.6  # pets are neither specks nor the whole frame
    spread = np.asarray(centres).std(axis=0) * 64
    assert (spread > 4).all(), spread  # pet centres spread over several pixels in x and y
