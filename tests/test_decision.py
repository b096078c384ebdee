"""The U-Net's decision rule (wsss.decision): the guarded val choice of its threshold, and that evaluate,
predict and the exported model apply the rule train-unet stored."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from wsss.cli import app
from wsss.config import DecisionConfig, UnetConfig
from wsss.decision import Decision, candidates, choose_rule, choose_threshold
from wsss.evaluation import per_image_ious

runner = CliRunner()


def _ious(gains: dict[float, np.ndarray], base: np.ndarray) -> dict[float, np.ndarray]:
    return {0.5: base, **{t: base + g for t, g in gains.items()}}


def test_a_consistent_val_gain_moves_the_threshold() -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(0.4, 0.8, 50)
    choice = choose_threshold(_ious({0.6: np.full(50, 0.01), 0.65: 0.03 + rng.normal(0, 0.01, 50)}, base), 2.0)
    assert choice.threshold == choice.best == 0.65
    assert choice.gain == pytest.approx(choice.val_iou - choice.val_iou_default)
    assert choice.gain > 2.0 * choice.gain_se and choice.n_images == 50


def test_a_noisy_val_gain_keeps_one_half() -> None:
    """The best threshold on 50 images is partly noise: a gain within two standard errors is not kept."""
    base = np.random.default_rng(1).uniform(0.4, 0.8, 50)
    noisy = np.tile([0.1, -0.09], 25)  # mean gain 0.005, standard error 0.013
    choice = choose_threshold(_ious({0.3: noisy}, base), 2.0)
    assert choice.best == 0.3 and choice.gain > 0  # it is the val best ...
    assert choice.threshold == 0.5 and choice.val_iou == choice.val_iou_default  # ... and not kept
    assert choose_threshold(_ious({0.3: noisy}, base), 0.0).threshold == 0.3  # no guard: the val best


def test_a_val_tie_goes_to_the_threshold_nearest_one_half() -> None:
    base = np.full(10, 0.6)
    choice = choose_threshold(_ious({0.3: np.full(10, 0.1), 0.65: np.full(10, 0.1)}, base), 0.0)
    assert choice.threshold == 0.65
    assert choose_threshold(_ious({0.7: np.zeros(10)}, base), 0.0).threshold == 0.5  # no gain: 0.5


def test_the_scan_always_holds_one_half_and_scores_the_same_images() -> None:
    assert candidates([0.7, 0.3, 0.3]) == (0.3, 0.5, 0.7)
    with pytest.raises(ValueError, match="0.5"):
        choose_threshold({0.3: np.ones(3)}, 2.0)
    with pytest.raises(ValueError, match="same images"):
        choose_threshold({0.5: np.ones(3), 0.3: np.ones(2)}, 2.0)


def test_per_image_ious_threshold_the_probability() -> None:
    prob = np.array([[0.2, 0.4], [0.6, 0.8]], np.float32)
    gt = np.array([[0, 1], [1, 255]], np.uint8)  # 255: ignored
    ious = per_image_ious([(prob, gt)], (0.3, 0.5, 0.7))
    assert ious[0.3][0] == pytest.approx(1.0)  # {0.4, 0.6} = the two pet pixels
    assert ious[0.5][0] == pytest.approx(0.5)  # only 0.6
    assert ious[0.7][0] == pytest.approx(0.0)


def test_a_model_without_a_recorded_rule_decides_at_one_half() -> None:
    assert Decision.from_meta({"kind": "unet"}) == Decision(0.5, False)
    assert Decision.from_meta({"decision": {"threshold": 0.65, "flip_tta": True}}) == Decision(0.65, True)
    assert Decision(0.65).mask(np.array([0.6, 0.65, 0.9])).tolist() == [0, 1, 1]


class _RedIsPet(torch.nn.Module):
    """A stand-in U-Net: its pet logit is the normalised red channel (pet probability = sigmoid of it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x[:, :1]), x[:, :1]], 1)


def _banded_val_images(root: Path, n: int) -> pd.DataFrame:
    """Row bands of red 255 / 147 (pet) and 128 / 0 (background): pet probability about 0.90, 0.60, 0.52,
    0.11, so 0.55 is the one threshold that gets every band right (0.5 takes the 0.52 band as pet)."""
    image = np.zeros((64, 48, 3), np.uint8)
    gt = np.zeros((64, 48), np.uint8)
    for i, (red, pet) in enumerate(((255, 1), (147, 1), (128, 0), (0, 0))):
        image[16 * i : 16 * (i + 1), :, 0] = red
        gt[16 * i : 16 * (i + 1)] = pet
    rows = []
    for k in range(n):
        Image.fromarray(image).save(root / f"im{k}.png")
        Image.fromarray(gt).save(root / f"gt{k}.png")
        rows.append({"image_path": f"im{k}.png", "mask_path": f"gt{k}.png"})
    return pd.DataFrame(rows)


def test_choose_rule_scans_val_under_the_flip_and_keeps_a_real_gain(tmp_path: Path) -> None:
    from wsss.device import precision_from

    rows = _banded_val_images(tmp_path, 6)
    cfg = DecisionConfig(flip_tta=True, thresholds=(0.3, 0.45, 0.55, 0.65), min_gain_se=2.0)
    rule, choice = choose_rule(_RedIsPet(), rows, tmp_path, 32, precision_from("cpu"), cfg, 4)
    assert choice is not None and choice.n_images == 6
    assert rule == Decision(0.55, True)
    assert choice.curve[0.55] > choice.curve[0.5] > choice.curve[0.3]
    off = DecisionConfig(flip_tta=True, choose_threshold=False)
    assert choose_rule(_RedIsPet(), rows, tmp_path, 32, None, off, 4) == (Decision(0.5, True), None)


def _save_unet(dest: Path, decision: dict | None) -> None:
    from wsss.models.unet import build_unet
    from wsss.training.checkpoint import save_model

    torch.manual_seed(0)
    model = build_unet(UnetConfig(architecture="plain", plain_filters=(4, 8, 16, 32)))
    meta = {"kind": "unet", "architecture": "plain", "encoder": "resnet34", "input_size": 32, "masks": "gt",
            "num_classes": 2, "plain_filters": [4, 8, 16, 32], **({"decision": decision} if decision else {})}
    save_model(dest, model, meta)


def test_predict_applies_the_models_rule_unless_told_otherwise(project: Path) -> None:
    """A threshold no pixel reaches gives an empty mask: the model's stored 0.999 is used by default and
    --threshold overrides it."""
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(project / "a.png")
    _save_unet(project / "models" / "unet-x", {"threshold": 0.999, "flip_tta": True})
    pet, said = {}, {}
    for label, extra in (("model", []), ("override", ["--threshold", "0.001"])):
        result = runner.invoke(app, ["predict", "a.png", "--model", "models/unet-x", "--out", f"o-{label}",
                                     "--device", "cpu", *extra])
        assert result.exit_code == 0, result.output
        pet[label] = int(np.asarray(Image.open(project / f"o-{label}" / "a_mask.png")).sum())
        said[label] = " ".join(result.output.split())
    assert pet["model"] == 0 and pet["override"] == 40 * 50
    assert "threshold 0.999, flip TTA" in said["model"] and "threshold 0.001, flip TTA" in said["override"]


def test_the_exported_model_carries_the_rule(tmp_path: Path) -> None:
    from wsss.models.unet import build_unet
    from wsss.serving import unet_format

    model = build_unet(UnetConfig(architecture="plain", plain_filters=(4, 8, 16, 32)))
    meta_path, _ = unet_format.write(tmp_path, model, 32, "best", Decision(0.65, True))
    meta = json.loads(meta_path.read_text())
    assert (meta["threshold"], meta["flip_tta"], meta["format_version"]) == (0.65, True, 2)
    _, loaded = unet_format.load(tmp_path)
    assert loaded["threshold"] == 0.65 and loaded["flip_tta"] is True
