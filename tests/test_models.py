"""wsss.models (backbone, classifiers, CCAM, U-Nets) and the breed batch sampler, on tiny CPU inputs."""

from __future__ import annotations

import math
import time
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

from wsss.config import UnetConfig
from wsss.data.samplers import BreedBatchSampler
from wsss.errors import ConfigError, MissingDependencyError
from wsss.models import backbone as backbone_mod
from wsss.models.backbone import Backbone, imagenet_cache_file, load_torchvision_resnet
from wsss.models.ccam import CCAM, ccam_loss, ccam_param_groups, decide_polarity
from wsss.models.classifier import (
    IMAGENET_CAT_CLASSES,
    IMAGENET_DOG_CLASSES,
    Classifier,
    ImageNetSpeciesClassifier,
)
from wsss.models.unet import PlainUNet, build_unet

torch.set_num_threads(1)


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache and no network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(backbone_mod, "_can_reach", lambda url, timeout=3.0: False)
    return tmp_path / "torch" / "hub"


def _fake_imagenet_cache(arch: str, seed: int = 0) -> torchvision.models.ResNet:
    """Write a random torchvision ResNet where the weights API looks for the ImageNet checkpoint."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(weights=None)
    file = imagenet_cache_file(arch)
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), file)
    return model


# --------------------------------------------------------------------------------------------------
# backbone


@pytest.mark.parametrize(("arch", "size", "channels"), [("resnet18", 64, (256, 512)), ("resnet50", 32, (1024, 2048))])
def test_backbone_output_stride_16(arch: str, size: int, channels: tuple[int, int]) -> None:
    net = Backbone(arch).eval()
    assert net.out_channels == channels
    with torch.no_grad():
        x3, x4 = net(torch.randn(1, 3, size, size + 16))
    assert x3.shape == (1, channels[0], size // 16, size // 16 + 1)
    assert x4.shape == (1, channels[1], size // 16, size // 16 + 1)


def test_unknown_arch_lists_valid() -> None:
    with pytest.raises(ConfigError, match="resnet50"):
        Backbone("vgg16")
    with pytest.raises(ConfigError, match="imagenet"):
        load_torchvision_resnet("resnet18", "imagnet")


def test_imagenet_offline_fails_fast_and_helpfully(offline_hub: Path) -> None:
    t0 = time.perf_counter()
    with pytest.raises(MissingDependencyError) as info:
        Backbone("resnet18", weights="imagenet")
    assert time.perf_counter() - t0 < 5.0
    msg = str(info.value)
    assert "resnet18" in msg and str(offline_hub) in msg
    assert "torchvision.models.resnet18(weights='IMAGENET1K_V1')" in msg
    assert "resnet18-f37072fd.pth" in msg and "TORCH_HOME" in msg and "weights: none" in msg


def test_imagenet_download_error_is_missing_dependency(offline_hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backbone_mod, "_can_reach", lambda url, timeout=3.0: True)

    def refuse(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no route")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", refuse)
    with pytest.raises(MissingDependencyError, match="download failed"):
        load_torchvision_resnet("resnet18", "imagenet")


def test_imagenet_weights_come_from_the_torch_cache(offline_hub: Path) -> None:
    ref = _fake_imagenet_cache("resnet18")
    net = Backbone("resnet18", weights="imagenet")
    assert torch.equal(net.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)


def test_backbone_state_dict_path_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    src = Backbone("resnet18")
    path = tmp_path / "pre.pt"
    torch.save({"backbone." + k: v for k, v in src.state_dict().items()}, path)
    dst = Backbone("resnet18", weights=str(path))
    assert torch.equal(dst.conv1.weight, src.conv1.weight)


# --------------------------------------------------------------------------------------------------
# classifiers


def test_classifier_logits_and_cam() -> None:
    torch.manual_seed(0)
    model = Classifier("resnet18", num_classes=3).eval()
    x = torch.randn(2, 3, 48, 64)
    classes = torch.tensor([2, 0])
    with torch.no_grad():
        assert model(x).shape == (2, 3)
        feats, logits = model.forward_maps(x)
        cam = model.cam(x, classes)
    assert feats.shape == (2, 512, 3, 4) and logits.shape == (2, 3)
    expected = torch.einsum("bk,bkhw->bhw", model.fc.weight[classes], feats)
    assert cam.shape == (2, 3, 4)
    torch.testing.assert_close(cam, expected)
    # The CAM's spatial mean is the logit minus the bias (linearity of GAP + fc).
    torch.testing.assert_close(cam.mean(dim=(1, 2)) + model.fc.bias[classes], logits[torch.arange(2), classes])


def test_classifier_sgd_lowers_ce() -> None:
    torch.manual_seed(0)
    model = Classifier("resnet18", num_classes=2).train()
    x = torch.cat([torch.full((2, 3, 32, 32), 1.5), torch.full((2, 3, 32, 32), -1.5)]) + 0.1 * torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 0, 1, 1])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_imagenet_species_classifier_with_injected_model() -> None:
    torch.manual_seed(0)
    model = ImageNetSpeciesClassifier("resnet18", model=torchvision.models.resnet18(weights=None)).eval()
    x = torch.randn(3, 3, 64, 64)
    species = torch.tensor([0, 1, 1])
    with torch.no_grad():
        logits = model(x)
        cam = model.cam(x, species)
        feats = model.backbone(x)[1]
        imagenet = model.fc(feats.mean(dim=(2, 3)))
    assert logits.shape == (3, 2) and cam.shape == (3, 4, 4)
    torch.testing.assert_close(logits[:, 0], imagenet[:, list(IMAGENET_CAT_CLASSES)].logsumexp(1))
    torch.testing.assert_close(logits[:, 1], imagenet[:, list(IMAGENET_DOG_CLASSES)].logsumexp(1))
    for b, s in enumerate(species.tolist()):
        ids = list(IMAGENET_CAT_CLASSES if s == 0 else IMAGENET_DOG_CLASSES)
        top = ids[int(imagenet[b, ids].argmax())]
        torch.testing.assert_close(cam[b], torch.einsum("k,khw->hw", model.fc.weight[top], feats[b]))


def test_imagenet_species_classifier_needs_weights(offline_hub: Path) -> None:
    with pytest.raises(MissingDependencyError, match="ImageNet weights"):
        ImageNetSpeciesClassifier("resnet18")


# --------------------------------------------------------------------------------------------------
# CCAM


def test_ccam_shapes_and_polarity() -> None:
    torch.manual_seed(0)
    model = CCAM("resnet18").eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        fg, bg, p = model(x)
        logits = model.logits(x)
        model.polarity.fill_(-1.0)
        flipped = model.logits(x)
    assert fg.shape == bg.shape == (2, 256 + 512)
    assert p.shape == logits.shape == (2, 1, 4, 3)
    assert float(p.min()) >= 0.0 and float(p.max()) <= 1.0
    torch.testing.assert_close(torch.sigmoid(logits), p)
    torch.testing.assert_close(flipped, -logits)
    assert float(model.state_dict()["polarity"]) == -1.0


def test_decide_polarity_synthetic_maps() -> None:
    centre = torch.zeros(6, 1, 5, 5)
    centre[:, :, 1:4, 1:4] = 0.9
    assert decide_polarity(centre) == 1.0
    assert decide_polarity(1.0 - centre) == -1.0
    with pytest.raises(ValueError):
        decide_polarity(torch.rand(2, 1, 2, 2))


def test_decide_polarity_flips_with_inverted_head() -> None:
    torch.manual_seed(0)
    model = CCAM("resnet18").eval()
    x = torch.randn(4, 3, 64, 64) * 0.2
    x[:, :, 16:48, 16:48] += 2.0  # a bright centred "object"
    with torch.no_grad():
        p = model(x)[2]
        model.head[0].weight.neg_()
        p_inv = model(x)[2]
    torch.testing.assert_close(p_inv, 1.0 - p)
    assert decide_polarity(p_inv) == -decide_polarity(p)


def test_ccam_param_groups() -> None:
    model = CCAM("resnet18")
    groups = ccam_param_groups(model, lr_backbone=1e-3, lr_head=1e-2, weight_decay=1e-4)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"backbone_weight", "head_weight"}  # ResNet and head convs have no bias
    assert by_name["head_weight"]["lr"] == 1e-2 and by_name["backbone_weight"]["lr"] == 1e-3
    assert by_name["head_weight"]["params"] == [model.head[0].weight]
    ids = {id(p) for g in groups for p in g["params"]}
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert all(not p.requires_grad and id(p) not in ids for p in m.parameters())
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(ids) == len(convs)
    torch.optim.SGD(groups, lr=1e-3)


def test_ccam_training_lowers_loss() -> None:
    torch.manual_seed(0)
    model = CCAM("resnet18").train()
    x = torch.rand(4, 3, 64, 64)
    opt = torch.optim.SGD(ccam_param_groups(model, 0.01, 0.1, 1e-4), lr=0.01)
    losses = []
    for _ in range(5):
        fg, bg, _ = model(x)
        loss, _ = ccam_loss(fg, bg, alpha=0.25)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# --------------------------------------------------------------------------------------------------
# U-Nets


@pytest.mark.parametrize("size", [(64, 64), (60, 44)])
@pytest.mark.parametrize("architecture", ["smp", "plain"])
def test_unet_shapes(architecture: str, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    cfg = UnetConfig(architecture=architecture, encoder="resnet18", plain_filters=(8, 16, 32, 64))
    net = build_unet(cfg, num_classes=2).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, *size))
    assert out.shape == (2, 2, *size)


def test_plain_unet_default_filters() -> None:
    net = PlainUNet(3, 2).eval()
    n_params = sum(p.numel() for p in net.parameters())
    assert 2.5e6 < n_params < 3.5e6  # about 3.1 M in the paper's U-Net
    with torch.no_grad():
        assert net(torch.randn(1, 3, 36, 20)).shape == (1, 2, 36, 20)


def test_smp_unet_imagenet_encoder_from_torchvision_cache(offline_hub: Path) -> None:
    ref = _fake_imagenet_cache("resnet18", seed=3)
    net = build_unet(UnetConfig(encoder="resnet18", encoder_weights="imagenet"))
    assert torch.equal(net.net.encoder.layer3[0].conv1.weight, ref.layer3[0].conv1.weight)


def test_smp_unet_pretrain_weights(tmp_path: Path) -> None:
    torch.manual_seed(2)
    src = Backbone("resnet18")
    path = tmp_path / "backbone.pt"
    torch.save(src.state_dict(), path)
    cfg = UnetConfig(encoder="resnet18", encoder_weights="pretrain:ssl")
    net = build_unet(cfg, weights_path=path)
    assert torch.equal(net.net.encoder.conv1.weight, src.conv1.weight)
    with pytest.raises(ConfigError):
        build_unet(cfg)
    with pytest.raises(ConfigError):
        build_unet(UnetConfig(architecture="plain", encoder_weights="imagenet"))


# --------------------------------------------------------------------------------------------------
# sampler


def test_breed_batch_sampler() -> None:
    breeds = [0] * 9 + [1] * 7 + [2] * 3 + [3] * 1 + [4] * 12  # uneven, one breed with a single image
    sampler = BreedBatchSampler(breeds, batch_size=6, breeds_per_batch=3, seed=5)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    for batch in batches:
        assert len(batch) == 6
        present = [breeds[i] for i in batch]
        assert len(set(present)) == 3
        assert all(present.count(b) == 2 for b in set(present))
    # Nearly every image is seen in an epoch.
    assert len({i for b in batches for i in b}) >= 0.8 * len(breeds)
    again = BreedBatchSampler(breeds, batch_size=6, breeds_per_batch=3, seed=5)
    assert list(again) == batches
    again.set_epoch(1)
    epoch1 = list(again)
    assert epoch1 != batches
    sampler.set_epoch(1)
    assert list(sampler) == epoch1
    assert list(BreedBatchSampler(breeds, batch_size=6, breeds_per_batch=3, seed=6)) != batches
    with pytest.raises(ConfigError):
        BreedBatchSampler([0, 0, 1], batch_size=4, breeds_per_batch=3)


def test_class_weights_balance_an_imbalanced_label_set():
    from wsss.stages.train_classifier import class_weights

    w = class_weights([0, 1, 1, 1], 3)  # class 2 absent
    assert w.tolist() == pytest.approx([2.0, 2 / 3, 0.0])
    # Weighted counts are equal per present class: the majority class cannot dominate the loss.
    assert w[0] * 1 == pytest.approx(w[1] * 3)


def test_balanced_accuracy_exposes_a_majority_class_predictor():
    from wsss.evaluation import balanced_accuracy

    target = torch.tensor([0, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    always_one = torch.ones(10, dtype=torch.long)
    assert float((always_one == target).float().mean()) == pytest.approx(0.9)
    assert balanced_accuracy(always_one, target) == pytest.approx(0.5)
    assert balanced_accuracy(target, target) == pytest.approx(1.0)
    assert balanced_accuracy(torch.tensor([0, 2]), torch.tensor([2, 2])) == pytest.approx(0.5)  # absent class 1
    assert math.isnan(balanced_accuracy(target[:0], target[:0]))
