"""``wsss predict``: masks and overlays for a folder of images, bad files reported, exit code 3."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from typer.testing import CliRunner

from wsss.cli import app
from wsss.config import UnetConfig
from wsss.io import read_json
from wsss.stages import predict
from wsss.viz import tint

runner = CliRunner()


def _save_tiny_unet(dest: Path) -> None:
    from wsss.models.unet import build_unet
    from wsss.training.checkpoint import save_model

    torch.manual_seed(0)
    model = build_unet(UnetConfig(architecture="plain", plain_filters=(4, 8, 16, 32)))
    meta = {"kind": "unet", "architecture": "plain", "encoder": "resnet34", "input_size": 32, "masks": "gt",
            "num_classes": 2, "plain_filters": [4, 8, 16, 32]}
    save_model(dest, model, meta)


def test_predict_folder_with_a_corrupt_file(project: Path) -> None:
    _save_tiny_unet(project / "models" / "unet-best")
    images = project / "in"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (37, 61, 3), dtype=np.uint8)).save(images / "cat.jpg")
    Image.fromarray(rng.integers(0, 255, (80, 45), dtype=np.uint8)).save(images / "sub" / "dog.PNG")  # grey
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (images / "notes.txt").write_text("not an image: ignored")

    result = runner.invoke(app, ["predict", str(images), "--model", "models/unet-best", "--out", "out",
                                 "--device", "cpu"])
    assert result.exit_code == 3, result.output
    assert "broken.jpg" in result.output
    assert "1 failed" in result.output and "2 of 3 images" in result.output
    assert "Traceback" not in result.output
    out = project / "out"
    assert sorted(p.name for p in out.iterdir()) == [".wsss-predict.json", "cat_mask.png", "cat_overlay.png", "dog_mask.png",
                                                     "dog_overlay.png", "index.json"]
    for stem, (w, h) in (("cat", (61, 37)), ("dog", (45, 80))):
        with Image.open(out / f"{stem}_mask.png") as m, Image.open(out / f"{stem}_overlay.png") as o:
            assert m.size == (w, h) and o.size == (w, h) and o.mode == "RGB"
            assert set(np.unique(np.asarray(m))) <= {0, 1}

    # A rerun into an output folder inside the input folder does not predict on its own outputs.
    result = runner.invoke(app, ["predict", str(images / "sub"), "--out", str(images / "sub" / "pred"),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["predict", str(images / "sub"), "--out", str(images / "sub" / "pred"),
                                 "--device", "cpu"])
    assert "1 of 1 images" in result.output


def test_missing_inputs_and_bad_model(project: Path) -> None:
    result = runner.invoke(app, ["predict", "nowhere.jpg", "--model", "models/unet-best", "--out", "o"])
    assert result.exit_code == 1  # the model is checked before any image
    assert "models/unet-best" in result.output and "Traceback" not in result.output
    _save_tiny_unet(project / "models" / "unet-best")
    result = runner.invoke(app, ["predict", "nowhere.jpg", "--out", "o", "--device", "cpu"])
    assert result.exit_code == 3 and "nowhere.jpg: not found" in result.output


def test_output_stems_are_unique() -> None:
    stems = predict.output_stems([Path("a/x.jpg"), Path("b/x.png"), Path("c/y.jpg")])
    assert list(stems.values()) == ["x", "x-2", "y"]


def _noise(dest: Path, seed: int) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shape = (20 + seed, 30 + 2 * seed, 3)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)).save(dest)


def test_output_stems_never_collide() -> None:
    # The old numbering renamed a.png to a-2, which a-2.jpg already had: one result was lost.
    stems = predict.output_stems([Path("a-2.jpg"), Path("a.jpg"), Path("a.png")])
    assert stems == {Path("a-2.jpg"): "a-2", Path("a.jpg"): "a", Path("a.png"): "a-3"}
    tricky = [Path(n) for n in ("x.png", "x.jpg", "x-2.gif", "x-3.jpg", "d/x-2.png", "X.bmp", "x-4.jpg")]
    stems = predict.output_stems(tricky)
    assert len({s.casefold() for s in stems.values()}) == len(tricky)
    assert all(stems[p].startswith(p.stem) for p in tricky)
    assert [stems[p] for p in tricky[:4]] == ["x", "x-5", "x-2", "x-3"]


def test_colliding_names_keep_every_result_and_the_index_says_whose(project: Path) -> None:
    _save_tiny_unet(project / "models" / "unet-best")
    for i, name in enumerate(("a-2.jpg", "a.jpg", "a.png")):
        _noise(project / "in" / name, i)
    (project / "in" / "bad.png").write_bytes(b"not a png")
    (project / "out").mkdir()
    (project / "out" / "index.json").write_text("{}")  # a stale index is replaced
    result = runner.invoke(app, ["predict", "in", "--out", "out", "--device", "cpu"])
    assert result.exit_code == 3, result.output
    assert "3 of 4 images" in result.output
    index = read_json(project / "out" / "index.json")
    assert index["predicted"] == {
        str(Path("in") / "a-2.jpg"): {"mask": "a-2_mask.png", "overlay": "a-2_overlay.png"},
        str(Path("in") / "a.jpg"): {"mask": "a_mask.png", "overlay": "a_overlay.png"},
        str(Path("in") / "a.png"): {"mask": "a-3_mask.png", "overlay": "a-3_overlay.png"},
    }
    assert list(index["failed"]) == [str(Path("in") / "bad.png")]
    masks = sorted(p.name for p in (project / "out").glob("*_mask.png"))
    assert masks == ["a-2_mask.png", "a-3_mask.png", "a_mask.png"]
    for src, files in index["predicted"].items():  # each output has its own input's size: none overwritten
        with Image.open(project / src) as im, Image.open(project / "out" / files["mask"]) as m:
            assert m.size == im.size


def test_symlink_loops_are_reported_and_the_rest_processed(project: Path) -> None:
    _save_tiny_unet(project / "models" / "unet-best")
    _noise(project / "in" / "cat.jpg", 0)
    (project / "loop.jpg").symlink_to("loop.jpg")  # named on the command line
    (project / "in" / "l1.png").symlink_to("l2.png")  # found in a folder
    (project / "in" / "l2.png").symlink_to("l1.png")
    result = runner.invoke(app, ["predict", "loop.jpg", "in", "--out", "out", "--device", "cpu"])
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    for name in ("loop.jpg", "l1.png", "l2.png"):
        assert f"{name}: symlink loop" in result.output
    assert "1 of 4 images" in result.output
    assert (project / "out" / "cat_mask.png").is_file()
    index = read_json(project / "out" / "index.json")
    assert sorted(index["failed"]) == sorted(str(p) for p in (Path("in/l1.png"), Path("in/l2.png"),
                                                             Path("loop.jpg")))
    assert set(index["failed"].values()) == {"symlink loop"}


def test_a_symlink_loop_in_a_folder_is_a_failure(tmp_path: Path) -> None:
    _noise(tmp_path / "dog.png", 0)
    (tmp_path / "loop.jpg").symlink_to("loop.jpg")
    (tmp_path / "loop").symlink_to("loop")  # not an image name: not a candidate, like notes.txt
    images, failures = predict.collect_images([tmp_path])
    assert images == [tmp_path / "dog.png"]
    assert failures == [(tmp_path / "loop.jpg", "symlink loop")]


def test_overlay_tints_only_the_pet() -> None:
    image = np.zeros((2, 2, 3), np.uint8)
    mask = np.array([[1, 0], [0, 0]], np.uint8)
    out = tint(image, mask)
    assert out[0, 0].any() and not out[1, 1].any()
