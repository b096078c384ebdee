"""The shared trainer's parts that the stage tests do not reach: the optimiser step with and without a
GradScaler, the summary-metric names, the fixed overlay set, the joint U-Net augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from wsss.device import Precision, grad_scaler, precision_from
from wsss.training.trainer import final_metrics


def _two_steps(tmp_path: Path, scaler: torch.amp.GradScaler | None) -> torch.Tensor:
    from wsss.config import params_from_dict
    from wsss.paths import Paths
    from wsss.training.trainer import Trainer

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = Trainer("train-x", "v", "x-v", params_from_dict({}), Paths(tmp_path), precision_from("cpu", None), "fp")
    assert trainer.state is None and trainer.scaler is None  # no checkpoint yet; fp32/bf16 on the CPU
    trainer.scaler = scaler
    for _ in range(2):
        trainer.step(model(torch.ones(2, 4)).pow(2).mean(), opt)
    return model.weight.detach().clone()


def test_step_without_a_scaler_equals_a_disabled_grad_scaler(tmp_path: Path) -> None:
    # What the stages ran before the trainer: a GradScaler with enabled=False on the CPU.
    assert torch.equal(_two_steps(tmp_path, None), _two_steps(tmp_path, torch.amp.GradScaler("cpu", enabled=False)))


def test_step_with_an_enabled_scaler_scales_unscales_and_updates(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for _ in range(2):  # the stages' sequence before the trainer
        opt.zero_grad(set_to_none=True)
        scaler.scale(model(torch.ones(2, 4)).pow(2).mean()).backward()
        scaler.step(opt)
        scaler.update()
    assert torch.equal(_two_steps(tmp_path, torch.amp.GradScaler("cpu", init_scale=2.0**10)), model.weight.detach())


def test_a_scaler_only_where_the_precision_needs_one() -> None:
    cpu = Precision(torch.device("cpu"), torch.bfloat16, channels_last=True, use_grad_scaler=False)
    assert grad_scaler(cpu) is None
    assert precision_from(None, None).device.type in ("cpu", "cuda")  # auto without params
    assert precision_from("cpu", None, enabled=False).autocast_dtype is None


def test_final_metrics_prefix_each_key_once() -> None:
    assert final_metrics({"final_loss": 1.0, "knn_acc": 0.5}) == {"final_loss": 1.0, "final_knn_acc": 0.5}


def test_fixed_overlay_set() -> None:
    from wsss.viz import N_OVERLAYS, overlay_ids

    assert overlay_ids(3) == [0, 1, 2] and overlay_ids(50) == list(range(N_OVERLAYS))
    spread = overlay_ids(50, spread=True)
    assert len(spread) == N_OVERLAYS and spread[0] == 0 and spread[-1] == 49
    assert overlay_ids(0) == [] and overlay_ids(0, spread=True) == []


def _functional_reference(img: torch.Tensor, mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The augmentation as the U-Net stage wrote it by hand before it used transforms.v2 on tv_tensors."""
    i0, j0, h, w = v2.RandomResizedCrop.get_params(img, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3))
    img = TF.resized_crop(img, i0, j0, h, w, [size, size], antialias=True)
    mask = TF.resized_crop(mask, i0, j0, h, w, [size, size], interpolation=v2.InterpolationMode.NEAREST)
    if torch.rand(()) < 0.5:
        img, mask = TF.horizontal_flip(img), TF.horizontal_flip(mask)
    return img, mask


@pytest.mark.parametrize("train", [True, False])
def test_segmentation_augmentation_gives_the_same_pixels_and_rng_stream(tmp_path: Path, train: bool) -> None:
    from wsss.data.datasets import SegmentationDataset, normalize

    rng = np.random.default_rng(0)
    rows = []
    for k, (h, w) in enumerate([(48, 64), (70, 52), (33, 90), (64, 64)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"i{k}.png")
        mask = rng.integers(0, 2, (h, w), dtype=np.uint8)
        mask[:3] = 255
        Image.fromarray(mask).save(tmp_path / f"m{k}.png")
        rows.append({"id": f"i{k}", "image_path": f"i{k}.png", "mask_path": f"m{k}.png"})
    ds = SegmentationDataset(pd.DataFrame(rows), tmp_path, 32, train=train)
    for seed in range(12):
        k = seed % len(rows)
        img = TF.pil_to_tensor(Image.open(tmp_path / f"i{k}.png").convert("RGB"))
        mask = torch.from_numpy(np.asarray(Image.open(tmp_path / f"m{k}.png"), dtype=np.uint8).copy())[None]
        torch.manual_seed(seed)
        if train:
            ref_img, ref_mask = _functional_reference(img, mask, 32)
        else:
            ref_img = TF.resize(img, [32, 32], antialias=True)
            ref_mask = TF.resize(mask, [32, 32], interpolation=v2.InterpolationMode.NEAREST)
        after_ref = torch.rand(4)
        torch.manual_seed(seed)
        got_img, got_mask = ds[k]
        assert torch.equal(got_img, normalize(ref_img)) and torch.equal(got_mask, ref_mask[0].long())
        assert type(got_img) is torch.Tensor and type(got_mask) is torch.Tensor
        assert torch.equal(torch.rand(4), after_ref)  # the same number of draws from the global RNG
