"""Map methods: registry, multi-scale + flip template, CAM / CCAM / ECS and the ensemble fusions."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss.config import CamsConfig
from wsss.methods import METHODS, MethodName, UnknownMethodError
from wsss.methods.base import normalise, resize
from wsss.methods.ecs import gaussian_blur
from wsss.methods.ensemble import fuse

torch.set_num_threads(1)

S = 32
SINGLE = CamsConfig(scales=(1.0,), flip=False)


class TinyClassifier(nn.Module):
    """Stand-in classifier: layer4 = 4x average-pooled input; class c weights channel c (so CAM = that channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("w", torch.eye(3)[:2])  # 2 classes: channel 0, channel 1
        self.calls: list[Tensor] = []

    def features(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x).mean(dim=(2, 3)) @ self.w.T

    def cam(self, x: Tensor, classes: Tensor) -> Tensor:
        self.calls.append(classes.clone())
        return torch.einsum("bk,bkhw->bhw", self.w[classes], self.features(x))


class TinyCCAM(nn.Module):
    """Stand-in CCAM: foreground logit = pooled channel 0 minus 0.5 (negative where dark)."""

    def logits(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x[:, :1], 4) - 0.5


class RampCCAM(nn.Module):
    """A map that ignores its input: a left-to-right ramp."""

    def logits(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        ramp = torch.linspace(0.0, 1.0, w // 4).expand(h // 4, -1)
        return ramp.expand(b, 1, -1, -1).clone()


def two_squares(bright: float = 3.0, dim: float = 1.0, dim_channel: int = 0, batch: int = 2) -> Tensor:
    """Bright square top-left in channel 0, dimmer square bottom-right in ``dim_channel``."""
    x = torch.zeros(batch, 3, S, S)
    x[:, 0, 4:12, 4:12] = bright
    x[:, dim_channel, 20:28, 20:28] = dim
    return x


# -------------------------------------------------------------------------------------------------- registry


def test_registry_names_and_attributes() -> None:
    assert METHODS.names() == ["cam", "ecs", "ccam", "ccam-ecs", "ensemble", "prior-grabcut", "prior-ellipse"]
    kinds = {n: (METHODS.get(n).needs_model, METHODS.get(n).model_kind) for n in METHODS.names()}
    assert kinds == {"cam": (True, "classifier"), "ecs": (True, "classifier"), "ccam": (True, "ccam"),
                     "ccam-ecs": (True, "ccam"), "ensemble": (False, None), "prior-grabcut": (False, None),
                     "prior-ellipse": (False, None)}
    assert all(METHODS.get(n).name == n for n in METHODS.names())
    assert METHODS.get("ccam-ecs").base is METHODS.get("ccam")
    assert METHODS.get("ecs").base is METHODS.get("cam")


def test_registry_rejects_unknown_name_listing_valid_ones() -> None:
    with pytest.raises(KeyError) as info:
        METHODS.get("gradcam")
    msg = str(info.value)
    assert "gradcam" in msg and all(n in msg for n in METHODS.names())
    assert isinstance(info.value, UnknownMethodError)


def test_enum_equals_registry() -> None:
    assert [m.value for m in MethodName] == METHODS.names()
    assert METHODS.get(MethodName.ccam_ecs).name == "ccam-ecs"


def test_import_does_not_pull_torch() -> None:
    code = "import sys, wsss.methods; from wsss.methods import MethodName; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# -------------------------------------------------------------------------------------------------- template


def test_normalise() -> None:
    maps = torch.rand(3, 5, 7) * 4
    maps[1] = 0
    out = normalise(maps)
    assert torch.all(out[1] == 0)
    assert torch.allclose(out.flatten(1).amax(1)[[0, 2]], torch.ones(2), atol=1e-4)


@pytest.mark.parametrize("name", ["cam", "ecs", "ccam", "ccam-ecs"])
def test_shapes_and_range(name: str) -> None:
    method = METHODS.get(name)
    model = TinyClassifier() if method.model_kind == "classifier" else TinyCCAM()
    x = two_squares()
    x[1] = x[1].flip(-1)
    cfg = CamsConfig(scales=(0.5, 1.0, 1.5), flip=True, ecs_erase="mean")
    out = method.compute(model, x, torch.tensor([0, 0]), cfg)
    assert out.shape == (2, S, S) and out.dtype == torch.float32
    assert torch.all(out >= 0)
    norm = normalise(out)
    assert torch.all(norm <= 1)
    assert torch.allclose(norm.flatten(1).amax(1), torch.ones(2), atol=1e-3)
    # CAM has spatial structure: the bright square outranks empty background.
    assert norm[0, 8, 8] > 0.9 and norm[0, 0, 31] < 0.1


def test_flip_of_a_gradient_is_symmetric() -> None:
    ccam = METHODS.get("ccam")
    x = torch.randn(1, 3, S, S)
    flipped = ccam.compute(RampCCAM(), x, None, CamsConfig(scales=(1.0,), flip=True))
    assert torch.allclose(flipped, flipped.flip(-1), atol=1e-5)
    plain = ccam.compute(RampCCAM(), x, None, SINGLE)
    assert not torch.allclose(plain, plain.flip(-1), atol=1e-3)


def test_flip_of_an_equivariant_model_doubles_the_map() -> None:
    cam = METHODS.get("cam")
    x = torch.rand(2, 3, S, S)
    t = torch.tensor([0, 1])
    both = cam.compute(TinyClassifier(), x, t, CamsConfig(scales=(1.0,), flip=True))
    assert torch.allclose(both, 2 * cam.compute(TinyClassifier(), x, t, SINGLE), atol=1e-5)


def test_single_scale_equals_upsampled_raw_map() -> None:
    cam = METHODS.get("cam")
    model = TinyClassifier()
    x = torch.randn(2, 3, S, S)
    t = torch.tensor([1, 0])
    expected = resize(F.relu(model.cam(x, t))[:, None], (S, S))[:, 0]
    assert torch.allclose(cam.compute(model, x, t, SINGLE), expected, atol=1e-6)
    twice = cam.compute(model, x, t, CamsConfig(scales=(1.0, 1.0), flip=False))
    assert torch.allclose(twice, 2 * expected, atol=1e-5)


def test_non_square_input_and_autocast_give_float32() -> None:
    x = torch.rand(1, 3, 24, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = METHODS.get("ecs").compute(TinyClassifier(), x, None, CamsConfig(scales=(0.5, 1.0)))
    assert out.shape == (1, 24, 40) and out.dtype == torch.float32


def test_ccam_applies_relu_after_the_logit() -> None:
    x = torch.zeros(1, 3, S, S)  # logit -0.5 everywhere -> empty map
    assert torch.all(METHODS.get("ccam").compute(TinyCCAM(), x, None, SINGLE) == 0)


def test_targets_none_uses_argmax() -> None:
    cam = METHODS.get("cam")
    x = two_squares(dim_channel=1)  # channel 0 dominates -> predicted class 0
    model = TinyClassifier()
    assert torch.equal(model(x).argmax(1), torch.tensor([0, 0]))
    auto = cam.compute(model, x, None, SINGLE)
    assert torch.allclose(auto, cam.compute(model, x, torch.tensor([0, 0]), SINGLE))
    assert not torch.allclose(auto, cam.compute(model, x, torch.tensor([1, 1]), SINGLE))


# -------------------------------------------------------------------------------------------------- ECS


@pytest.mark.parametrize("erase,sigma", [("mean", 0.08), ("blur", 0.5)])
def test_ecs_reveals_the_dimmer_square(erase: str, sigma: float) -> None:
    x = two_squares()
    t = torch.tensor([0, 0])
    cfg = CamsConfig(scales=(1.0,), flip=False, ecs_erase=erase, ecs_blur_sigma=sigma, ecs_delta=0.5)
    cam = normalise(METHODS.get("cam").compute(TinyClassifier(), x, t, cfg))
    ecs = METHODS.get("ecs").compute(TinyClassifier(), x, t, cfg)
    assert ecs.shape == (2, S, S) and ecs.dtype == torch.float32
    assert torch.all(ecs >= cam - 1e-4)  # ECS covers at least the CAM
    assert torch.all(ecs <= 1) and torch.allclose(ecs.flatten(1).amax(1), torch.ones(2), atol=1e-3)
    assert cam[0, 24, 24] < 0.5 < ecs[0, 24, 24]  # the dim square: absent from CAM, present in ECS
    assert ecs[0, 8, 8] > 0.9  # the bright square stays
    assert ecs[0, 0, 31] < 0.1  # the background stays empty


def test_ecs_keeps_the_original_class_for_the_erased_pass() -> None:
    # Once the channel-0 square is erased, channel 1 would win the argmax; ECS must stay on class 0.
    x = two_squares(dim_channel=1)
    model = TinyClassifier()
    cfg = CamsConfig(scales=(1.0,), flip=True, ecs_erase="mean", ecs_rounds=2)
    METHODS.get("ecs").compute(model, x, None, cfg)
    assert len(model.calls) >= 2
    assert all(torch.all(c == 0) for c in model.calls)
    erased = x.clone()
    erased[:, 0] = 0
    assert torch.equal(model(erased).argmax(1), torch.tensor([1, 1]))


def test_ccam_ecs_runs_on_a_ccam_model() -> None:
    out = METHODS.get("ccam-ecs").compute(TinyCCAM(), two_squares(dim=2.0), None,
                                          CamsConfig(scales=(1.0,), flip=False, ecs_erase="mean"))
    assert out.shape == (2, S, S) and out[0, 24, 24] > 0.5


def test_gaussian_blur() -> None:
    const = torch.full((1, 3, 10, 12), 0.7)
    assert torch.allclose(gaussian_blur(const, 3.0), const, atol=1e-6)  # reflect padding: no dark border
    x = torch.rand(2, 3, 16, 16)
    assert gaussian_blur(x, 0.0) is x
    blurred = gaussian_blur(x, 2.0)
    assert blurred.shape == x.shape and blurred.dtype == x.dtype
    assert blurred.std() < 0.5 * x.std()
    assert torch.allclose(gaussian_blur(x, 100.0).flatten(2).std(2), torch.zeros(2, 3), atol=0.05)


# -------------------------------------------------------------------------------------------------- ensemble


@pytest.mark.parametrize("fusion", ["mean", "max", "geomean"])
def test_ensemble_of_identical_maps_is_the_map(fusion: str) -> None:
    m = np.random.default_rng(0).random((6, 5)).astype(np.float32)
    m /= m.max()
    out = fuse([m, m, m], [0.2, 0.5, 0.3], fusion)
    assert isinstance(out, np.ndarray) and np.allclose(out, m, atol=1e-5)
    mt = torch.from_numpy(m)
    out_t = fuse([mt, mt], None, fusion)
    assert isinstance(out_t, Tensor) and torch.allclose(out_t, mt, atol=1e-5)


def test_ensemble_by_hand() -> None:
    a = np.array([[1.0, 0.0], [0.5, 0.0]], dtype=np.float32)
    b = np.array([[0.0, 1.0], [0.5, 0.0]], dtype=np.float32)
    assert np.allclose(fuse([a, b], [3, 1], "mean"), [[1.0, 1 / 3], [2 / 3, 0.0]], atol=1e-6)
    assert np.allclose(fuse([a, b], None, "mean"), [[1.0, 1.0], [1.0, 0.0]], atol=1e-6)
    assert np.allclose(fuse([a, b], [1, 0.5], "max"), [[1.0, 0.5], [0.5, 0.0]], atol=1e-6)
    c = np.array([[1.0, 0.25], [0.5, 0.0]], dtype=np.float32)
    geo = fuse([a, c], None, "geomean")  # sqrt(a*c), re-normalised (its max is already 1)
    assert np.allclose(geo, np.sqrt(a * c), atol=1e-3)
    assert np.all(fuse([np.zeros((2, 2)), np.zeros((2, 2))], None, "geomean") == 0)


def test_ensemble_validation() -> None:
    m = np.ones((3, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="2 maps but 3 weights"):
        fuse([m, m], [1, 1, 1])
    with pytest.raises(ValueError, match="non-negative"):
        fuse([m, m], [1, -1])
    with pytest.raises(ValueError, match="all be zero"):
        fuse([m, m], [0, 0])
    with pytest.raises(ValueError, match="equal shapes"):
        fuse([m, np.ones((3, 4))])
    with pytest.raises(ValueError, match="valid: mean, max, geomean"):
        fuse([m, m], None, "median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one"):
        fuse([])
