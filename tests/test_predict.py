"""``wsss predict``: masks and overlays for a folder of images, bad files reported, exit code 3."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from typer.testing import CliRunner

from wsss.cli import app
from wsss.config import UnetConfig
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
    assert sorted(p.name for p in out.iterdir()) == ["cat_mask.png", "cat_overlay.png", "dog_mask.png",
                                                     "dog_overlay.png"]
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


def test_overlay_tints_only_the_pet() -> None:
    image = np.zeros((2, 2, 3), np.uint8)
    mask = np.array([[1, 0], [0, 0]], np.uint8)
    out = tint(image, mask)
    assert out[0, 0].any() and not out[1, 1].any()
