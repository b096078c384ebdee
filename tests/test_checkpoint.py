"""Resume checkpoints (atomic, fingerprinted, RNG included) and saved models with checked metadata."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from wsss.errors import ConfigError, DataError
from wsss.training.checkpoint import (
    CheckpointManager,
    fingerprint,
    load_model_state,
    rng_state,
    save_model,
    set_rng_state,
)


@dataclass(frozen=True)
class _Cfg:
    lr: float = 0.1
    epochs: int = 3


def _draws() -> tuple:
    return random.random(), random.gauss(0, 1), float(np.random.randn()), torch.rand(3).tolist()


def _training_state() -> dict:
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.rand(4, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": torch.amp.GradScaler("cpu").state_dict(),
        "epoch": 2,
        "best_value": float("-inf"),
        "history": [{"loss": 0.5}],
        "run_id": "abc123",
    }


def test_fingerprint_stable() -> None:
    assert fingerprint(_Cfg(), {"b": 1, "a": [1, 2]}) == fingerprint(_Cfg(), {"a": (1, 2), "b": 1})
    assert fingerprint(_Cfg()) != fingerprint(_Cfg(lr=0.2))
    assert fingerprint(Path("x/y")) == fingerprint("x/y")
    assert len(fingerprint()) == 40


def test_round_trip_with_rng(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path / "state", "fp1")
    assert mgr.load() is None and mgr.reason is None
    state = _training_state()
    # leave cached Gaussians in both Python's and NumPy's state so those fields are exercised too
    random.gauss(0, 1)
    np.random.randn()
    state["rng"] = rng_state()
    mgr.save(state)
    expected = _draws()

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    loaded = CheckpointManager(tmp_path / "state", "fp1").load()
    assert loaded is not None
    set_rng_state(loaded["rng"])
    assert _draws() == expected
    for key, value in state["model"].items():
        assert torch.equal(loaded["model"][key], value)
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert loaded["epoch"] == 2 and loaded["run_id"] == "abc123" and loaded["best_value"] == float("-inf")
    # the loaded optimizer state really restores
    opt = torch.optim.AdamW(nn.Linear(3, 2).parameters(), lr=0.5)
    opt.load_state_dict(loaded["optimizer"])
    assert opt.param_groups[0]["lr"] == 0.01


def test_fingerprint_mismatch_is_ignored(tmp_path: Path) -> None:
    CheckpointManager(tmp_path, "old").save({"epoch": 1})
    mgr = CheckpointManager(tmp_path, "new")
    assert mgr.load() is None
    assert "another configuration" in mgr.reason


@pytest.mark.parametrize("damage", ["garbage", "truncate", "empty"])
def test_corrupt_checkpoint_is_ignored(tmp_path: Path, damage: str) -> None:
    mgr = CheckpointManager(tmp_path, "fp")
    mgr.save(_training_state())
    data = mgr.path.read_bytes()
    mgr.path.write_bytes({"garbage": b"not a checkpoint" * 10, "truncate": data[: len(data) // 2],
                          "empty": b""}[damage])
    assert mgr.load() is None
    assert "unreadable" in mgr.reason


def test_failed_save_keeps_previous(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, "fp")
    mgr.save({"epoch": 1})
    with pytest.raises(Exception):  # noqa: B017 - any pickling error will do
        mgr.save({"epoch": 2, "bad": lambda: None})
    assert mgr.load() == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left
    mgr.clear()
    assert mgr.load() is None
    mgr.clear()  # clearing twice is fine


def test_model_round_trip(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    save_model(tmp_path / "m", model, {"arch": "tiny", "num_classes": 2, "scales": (1.0, 0.5)})
    state, meta = load_model_state(tmp_path / "m", {"arch": "tiny", "num_classes": 2, "scales": [1.0, 0.5]})
    assert meta["torch_version"] == torch.__version__ and len(meta["state_sha256"]) == 64
    fresh = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    fresh.load_state_dict(state)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)


def test_model_meta_mismatch_names_key_and_values(tmp_path: Path) -> None:
    save_model(tmp_path / "m", nn.Linear(2, 2), {"arch": "resnet18", "num_classes": 2})
    with pytest.raises(ConfigError, match=r"arch='resnet18'.*arch='resnet50'"):
        load_model_state(tmp_path / "m", {"arch": "resnet50"})
    with pytest.raises(ConfigError, match=r"pretrain='<missing>'"):
        load_model_state(tmp_path / "m", {"pretrain": "simclr"})


def test_model_missing_names_path_and_stage(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"model\.pt.*wsss train-classifier"):
        load_model_state(tmp_path / "nope", {}, stage="train-classifier")


def test_model_tampered_is_rejected(tmp_path: Path) -> None:
    save_model(tmp_path / "m", nn.Linear(2, 2), {"arch": "x"})
    torch.save({"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}, tmp_path / "m" / "model.pt")
    with pytest.raises(DataError, match="checksum"):
        load_model_state(tmp_path / "m", {"arch": "x"})


def test_saved_model_bytes_depend_only_on_the_weights(tmp_path: Path) -> None:
    """Two saves of the same weights give the same file (DVC hashes model.pt)."""
    from wsss.training.checkpoint import save_model

    model = torch.nn.Linear(3, 2)
    save_model(tmp_path / "a", model, {"kind": "test"})
    save_model(tmp_path / "b", model, {"kind": "test"})
    assert (tmp_path / "a" / "model.pt").read_bytes() == (tmp_path / "b" / "model.pt").read_bytes()
