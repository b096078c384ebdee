"""Self-supervised pretraining (``wsss pretrain``): SimSiam / MoCo v2 models, the k-NN probe, params, the stage
end to end on a tiny synthetic project, its resume after an interruption, and every consumer of its output."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import write_params
from wsss.cli import app
from wsss.config import PretrainConfig, UnetConfig, load_params, params_from_dict
from wsss.errors import ConfigError, DataError
from wsss.models.ssl import (
    MoCoV2,
    SimSiam,
    TwoViews,
    build_encoder,
    build_ssl_model,
    knn_predict,
    lr_lambdas,
    view_transform,
)
from wsss.paths import Paths

torch.set_num_threads(1)
runner = CliRunner()

TINY_PRETRAIN = {
    "arch": "resnet18", "input_size": 32, "epochs": 2, "batch_size": 8, "knn_k": 5,
    "simsiam": {"proj_dim": 64, "pred_dim": 16}, "mocov2": {"dim": 32, "queue_size": 64},
}


def invoke(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, f"wsss {' '.join(args)} failed:\n{result.output}\n{result.exception!r}"
    return result.output


@pytest.fixture
def prepared(project: Path) -> Path:
    """The tiny project, generated and prepared, with tiny pretraining params."""
    write_params(project, {"base": {"num_workers": 0}, "pretrain": TINY_PRETRAIN, "train_ccam": {"arch": "resnet18"}})
    invoke("generate-synthetic")
    invoke("prepare")
    return project


def _batch(seed: int = 0, n: int = 8, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    return x + 0.1 * torch.randn(x.shape, generator=g), x + 0.1 * torch.randn(x.shape, generator=g)


def _steps(model: torch.nn.Module, x1: torch.Tensor, x2: torch.Tensor, steps: int, **kw: bool) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model.loss(x1, x2, **kw)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_step()
        losses.append(float(loss.detach()))
    return losses


# --- models ---------------------------------------------------------------------------------------


def test_encoder_state_dict_is_a_torchvision_resnet_without_fc() -> None:
    enc, dim = build_encoder("resnet18")
    assert dim == 512 and enc(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    keys = set(enc.state_dict())
    assert "conv1.weight" in keys and "layer4.1.bn2.running_mean" in keys
    assert not any(k.startswith("fc.") for k in keys)
    enc16, _ = build_encoder("resnet18", output_stride=16)
    assert enc16.layer4[0].conv1.stride == (1, 1)
    with pytest.raises(ConfigError):
        build_encoder("resnet18", output_stride=8)


def test_simsiam_steps_lower_the_loss() -> None:
    torch.manual_seed(0)
    enc, dim = build_encoder("resnet18")
    model = SimSiam(enc, dim, proj_dim=64, pred_dim=16)
    x1, x2 = _batch()
    losses = _steps(model, x1, x2, 8)
    assert all(-1.0 - 1e-5 <= v <= 1.0 + 1e-5 for v in losses)
    assert losses[-1] < losses[0] - 0.05, losses


def test_mocov2_steps_lower_the_loss_and_update_the_key_encoder() -> None:
    torch.manual_seed(0)
    enc, dim = build_encoder("resnet18")
    model = MoCoV2(enc, dim, dim=32, queue_size=64, temperature=0.2, ema=0.9)
    key_before = model.key_encoder.conv1.weight.clone()
    queue_before = model.queue.clone()
    x1, x2 = _batch()
    # A fixed queue keeps the objective fixed, so its decrease is meaningful.
    losses = _steps(model, x1, x2, 8, update_queue=False)
    assert losses[-1] < losses[0] - 0.05, losses
    assert torch.equal(model.queue, queue_before) and int(model.queue_ptr) == 0
    assert not torch.equal(model.key_encoder.conv1.weight, key_before)  # EMA moved it
    assert not any(p.requires_grad for p in model.key_encoder.parameters())


def test_mocov2_queue_is_a_ring_buffer() -> None:
    enc, dim = build_encoder("resnet18")
    model = MoCoV2(enc, dim, dim=4, queue_size=6)
    keys = torch.nn.functional.normalize(torch.randn(4, 4), dim=1)
    model.enqueue(keys)
    assert int(model.queue_ptr) == 4 and torch.equal(model.queue[:4], keys)
    model.enqueue(keys[:3])
    assert int(model.queue_ptr) == 1
    assert torch.equal(model.queue[4:], keys[:2]) and torch.equal(model.queue[0], keys[2])
    model.train()
    model.loss(*_batch(n=4))  # 8 keys (both views) into a queue of 6
    assert int(model.queue_ptr) == (1 + 8) % 6
    assert "queue" in model.state_dict() and "queue_ptr" in model.state_dict()


def test_simsiam_predictor_keeps_a_fixed_lr_under_the_cosine_schedule() -> None:
    enc, dim = build_encoder("resnet18")
    model = SimSiam(enc, dim, proj_dim=32, pred_dim=8, fix_pred_lr=True)
    groups = model.param_groups(0.1, 1e-4)
    assert [g["fixed_lr"] for g in groups] == [False, True]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    cosine, fixed = lr_lambdas(groups, epochs=4, warmup_epochs=1)
    assert fixed(3) == 1.0
    assert cosine(0) == 0.5 and cosine(1) == 1.0 and 0.0 < cosine(3) < cosine(2) < 1.0


def test_views_are_two_different_normalised_crops() -> None:
    from PIL import Image

    img = Image.fromarray(torch.randint(0, 255, (80, 60, 3), dtype=torch.uint8).numpy())
    torch.manual_seed(0)
    a, b = TwoViews(view_transform(32, blur_prob=1.0, grayscale_prob=0.5))(img)
    assert a.shape == b.shape == (3, 32, 32) and a.dtype == torch.float32
    assert not torch.equal(a, b)


def test_knn_predict_votes_by_similarity() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    queries = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    assert knn_predict(bank, labels, queries, k=2, num_classes=2).tolist() == [0, 1]
    # k larger than the bank is clamped; similarity weighting beats the 3-vs-2 majority.
    assert knn_predict(bank, labels, queries[:1], k=50, num_classes=2, temperature=0.05).tolist() == [0]
    with pytest.raises(ValueError):
        knn_predict(bank[:0], labels[:0], queries, k=2, num_classes=2)


def test_leave_one_out_knn_never_counts_an_image_as_its_own_neighbour() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.95, 0.05], [0.0, 1.0], [0.05, 0.95], [0.9, 0.1]])
    labels = torch.tensor([0, 0, 1, 1, 1])  # the last one sits among the class-0 images
    assert knn_predict(bank, labels, None, k=1, num_classes=2).tolist() == [0, 0, 1, 1, 0]
    # Including itself it would have voted for its own label.
    assert knn_predict(bank, labels, bank, k=1, num_classes=2).tolist() == [0, 0, 1, 1, 1]
    assert knn_predict(bank, labels, None, k=50, num_classes=2).shape == (5,)  # k clamped to N - 1
    with pytest.raises(ValueError, match="at least two"):
        knn_predict(bank[:1], labels[:1], None, k=2, num_classes=2)


# --- params ---------------------------------------------------------------------------------------


def test_params_yaml_pretrain_section_is_short() -> None:
    cfg = load_params(Path(__file__).resolve().parents[1] / "params.yaml").pretrain
    assert cfg.epochs <= 5 and cfg.input_size <= 96 and cfg.arch == "resnet18"


@pytest.mark.parametrize(("section", "needle"), [
    ({"method": "byol"}, "'pretrain.method' must be one of"),
    ({"arch": "vit"}, "'pretrain.arch'"),
    ({"lr": -1.0}, "'pretrain.lr' = -1.0 is outside its range"),
    ({"batch_size": 2}, "'pretrain.batch_size' = 2 is outside"),
    ({"output_stride": 8}, "'pretrain.output_stride' must be one of"),
    ({"name": "../x"}, "'pretrain.name'"),
    ({"name": ""}, "'pretrain.name'"),
    ({"epochs": 2, "warmup_epochs": 2}, "'pretrain.warmup_epochs'"),
    ({"method": "mocov2", "batch_size": 64, "mocov2": {"queue_size": 100}}, "'pretrain.mocov2.queue_size'"),
    ({"mocov2": {"ema": 1.5}}, "'pretrain.mocov2.ema' = 1.5 is outside"),
    ({"simsiam": {"projector": 3}}, "unknown key 'pretrain.simsiam.projector'"),
    ({"knn_k": 0}, "'pretrain.knn_k' = 0 is outside"),
])
def test_invalid_pretrain_params_name_the_key(section: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        params_from_dict({"pretrain": section}, "params.yaml")
    assert needle in str(exc.value)


def test_build_ssl_model_follows_params() -> None:
    sim = build_ssl_model(PretrainConfig(arch="resnet18", simsiam=params_from_dict(
        {"pretrain": {"simsiam": {"proj_dim": 32, "pred_dim": 8}}}).pretrain.simsiam))
    assert isinstance(sim, SimSiam) and sim.projector[-1].num_features == 32
    moco = build_ssl_model(params_from_dict({"pretrain": {"method": "mocov2", "arch": "resnet18",
                                                          "mocov2": {"queue_size": 256, "dim": 16}}}).pretrain)
    assert isinstance(moco, MoCoV2) and tuple(moco.queue.shape) == (256, 16)


# --- the stage ------------------------------------------------------------------------------------


def test_training_rows_never_include_test_images() -> None:
    from wsss.stages.pretrain import probe_rows, select_rows

    df = pd.DataFrame({
        "id": list("abcdef"), "split": ["train", "val", "test", "train", "val", "test"],
        "is_background": [False, False, False, True, True, True], "species": [0, 1, 0, -1, -1, -1],
        "breed": [0, 20, 1, -1, -1, -1],
    })
    assert select_rows(df, include_background=True)["id"].tolist() == ["a", "b", "d", "e"]
    assert select_rows(df, include_background=False)["id"].tolist() == ["a", "b"]
    bank, queries = probe_rows(df)
    assert bank["id"].tolist() == ["a"] and queries["id"].tolist() == ["b"]


def test_cli_pretrains_and_every_consumer_loads_the_backbone(prepared: Path) -> None:
    from wsss.data.manifest import load_manifest
    from wsss.models.classifier import Classifier
    from wsss.models.unet import build_unet
    from wsss.stages import train_ccam
    from wsss.stages.common import resolve_weights

    out = invoke("pretrain", "--name", "tiny")
    assert "saved" in out
    paths = Paths(prepared)
    model_dir = prepared / "models" / "pretrain-tiny"
    meta = json.loads((model_dir / "meta.json").read_text())
    assert meta["kind"] == "pretrain" and meta["arch"] == "resnet18" and meta["method"] == "simsiam"
    saved = torch.load(model_dir / "model.pt", weights_only=True)
    assert "conv1.weight" in saved and not any(k.startswith(("fc.", "encoder.", "projector.")) for k in saved)

    report = json.loads((prepared / "reports" / "training" / "pretrain-tiny.json").read_text())
    df = load_manifest(paths.manifest)
    assert report["n_images"] == int(df["split"].isin(["train", "val"]).sum())  # every non-test image
    for key in ("final_loss", "knn_acc", "knn_acc_init", "knn_loo_balanced_acc", "knn_loo_balanced_acc_init",
                "images_per_s", "epoch_seconds"):
        assert report[key] == report[key], key  # present, not NaN
    assert 0.0 <= report["knn_acc"] <= 1.0
    assert not (prepared / ".wsss" / "state" / "pretrain" / "tiny" / "checkpoint.pt").exists()

    weights = resolve_weights("pretrain:tiny", paths)
    clf = Classifier("resnet18", 2, weights=weights)
    assert torch.equal(clf.backbone.layer3[0].conv1.weight, saved["layer3.0.conv1.weight"])
    params = load_params(prepared / "params.yaml")
    ccam = train_ccam._build_model(params, paths, "pretrain:tiny", per_breed=False, ecs=False)
    assert torch.equal(ccam.backbone.bn1.running_var, saved["bn1.running_var"])
    assert train_ccam.model_name("pretrain:tiny") == "ccam-pre-tiny"
    unet = build_unet(UnetConfig(architecture="smp", encoder="resnet18", encoder_weights="pretrain:tiny"),
                      weights_path=weights)
    assert torch.equal(unet.net.encoder.layer4[1].conv2.weight, saved["layer4.1.conv2.weight"])
    with pytest.raises(DataError, match="does not match resnet34"):
        Classifier("resnet34", 2, weights=weights)

    import mlflow

    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`wsss.stage` = 'pretrain'")
    assert len(runs) == 1 and runs.iloc[0]["tags.wsss.variant"] == "tiny"
    history = mlflow.MlflowClient().get_metric_history(runs.iloc[0]["run_id"], "loss")
    assert [m.step for m in history] == [0, 1]


def test_missing_backbone_tells_to_run_pretrain(project: Path) -> None:
    from wsss.stages.common import resolve_weights

    with pytest.raises(DataError, match="run `wsss pretrain`"):
        resolve_weights("pretrain:nope", Paths(project))
    result = runner.invoke(app, ["pretrain", "--name", "a/b"])
    assert result.exit_code == 2 and "--name" in result.output


def test_resume_after_interruption_matches_an_uninterrupted_run(prepared: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from wsss.stages import pretrain as stage
    from wsss.training import loop
    from wsss.training.checkpoint import CheckpointManager

    write_params(prepared, {"base": {"num_workers": 0},
                            "pretrain": {**TINY_PRETRAIN, "method": "mocov2", "epochs": 3}})
    params, paths = load_params(prepared / "params.yaml"), Paths(prepared)
    reference = stage.run(params, paths, name="ref")

    original_save, fits = CheckpointManager.save, []

    def save_then_die(self: CheckpointManager, state: dict) -> None:
        original_save(self, state)
        if state["epoch"] == 1:
            raise RuntimeError("killed")

    original_fit = loop.fit

    def recording_fit(*args: object, **kwargs: object) -> loop.FitResult:
        result = original_fit(*args, **kwargs)
        fits.append(result.resumed_from)
        return result

    monkeypatch.setattr(CheckpointManager, "save", save_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        stage.run(params, paths, name="victim")
    assert (prepared / ".wsss" / "state" / "pretrain" / "victim" / "checkpoint.pt").exists()
    assert not (prepared / "models" / "pretrain-victim").exists()
    monkeypatch.setattr(CheckpointManager, "save", original_save)
    monkeypatch.setattr(loop, "fit", recording_fit)
    resumed = stage.run(params, paths, name="victim")
    assert fits == [2]  # continued after the saved epoch (epochs 0 and 1 done)

    ref_meta = json.loads((prepared / "models" / "pretrain-ref" / "meta.json").read_text())
    meta = json.loads((prepared / "models" / "pretrain-victim" / "meta.json").read_text())
    assert meta["state_sha256"] == ref_meta["state_sha256"]
    assert resumed["final_loss"] == reference["final_loss"]
    assert resumed["knn_acc_init"] == reference["knn_acc_init"]


def test_data_parallel_pretraining_on_two_gloo_processes(prepared: Path) -> None:
    write_params(prepared, {"base": {"num_workers": 0, "device": "cpu", "world_size": 2},
                            "pretrain": {**TINY_PRETRAIN, "method": "mocov2"}})
    out = invoke("pretrain", "--name", "ddp")
    assert "data-parallel on 2 cpu processes (4 images per process" in out
    report = json.loads((prepared / "reports" / "training" / "pretrain-ddp.json").read_text())
    assert report["world_size"] == 2 and report["final_loss"] == report["final_loss"]
    saved = torch.load(prepared / "models" / "pretrain-ddp" / "model.pt", weights_only=True)
    assert "conv1.weight" in saved and not any(k.startswith("module.") for k in saved)
    assert not (prepared / ".wsss" / "state" / "pretrain" / "ddp" / "checkpoint.pt").exists()

    import mlflow

    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`wsss.stage` = 'pretrain'")
    assert len(runs) == 1, "only rank 0 may log"  # not one run per process
    assert runs.iloc[0]["tags.world_size"] == "2" and runs.iloc[0]["status"] == "FINISHED"
    history = mlflow.MlflowClient().get_metric_history(runs.iloc[0]["run_id"], "loss")
    assert [m.step for m in history] == [0, 1]


def test_global_batch_must_split_evenly_over_the_processes(prepared: Path) -> None:
    write_params(prepared, {"base": {"num_workers": 0, "device": "cpu", "world_size": 2},
                            "pretrain": {**TINY_PRETRAIN, "batch_size": 9}})
    result = runner.invoke(app, ["pretrain"])
    assert result.exit_code == 2 and "multiple of the 2 data-parallel processes" in result.output


def test_consumers_accept_a_state_dict_file_as_weights(prepared: Path) -> None:
    from wsss.models.classifier import Classifier
    from wsss.models.unet import build_unet
    from wsss.stages.common import resolve_weights

    enc, _ = build_encoder("resnet18")
    (prepared / "weights").mkdir()
    torch.save(enc.state_dict(), prepared / "weights" / "mine.pth")
    paths = Paths(prepared)
    path = resolve_weights("weights/mine.pth", paths)  # relative to the project root
    assert Path(path) == prepared / "weights" / "mine.pth"
    clf = Classifier("resnet18", 2, weights=path)
    assert torch.equal(clf.backbone.conv1.weight, enc.conv1.weight)
    unet = build_unet(UnetConfig(architecture="smp", encoder="resnet18", encoder_weights="weights/mine.pth"),
                      weights_path=path)
    assert torch.equal(unet.net.encoder.conv1.weight, enc.conv1.weight)
    params_from_dict({"train_classifier": {"weights": "weights/mine.pth"},
                      "train_unet": {"encoder_weights": "/abs/other.pt"}})  # accepted by the loader
    with pytest.raises(ConfigError, match=r"\.pt/\.pth state_dict file"):
        params_from_dict({"train_classifier": {"weights": "imagnet"}})
    with pytest.raises(DataError, match="missing.pt: backbone weights file not found"):
        resolve_weights("weights/missing.pt", paths)


def test_pretraining_under_torchrun_joins_the_launcher_s_ranks(prepared: Path) -> None:
    import os
    import subprocess
    import sys

    write_params(prepared, {"base": {"num_workers": 0, "device": "cpu"},
                            "pretrain": {**TINY_PRETRAIN, "epochs": 1}})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "wsss", "pretrain", "--name", "launched"],
        cwd=prepared, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    output = " ".join((proc.stdout + proc.stderr).split())  # rich wraps long lines
    assert output.count("data-parallel on 2 cpu processes") == 1  # printed by rank 0 only
    assert output.count("saved ") == 1
    report = json.loads((prepared / "reports" / "training" / "pretrain-launched.json").read_text())
    assert report["world_size"] == 2
    assert (prepared / "models" / "pretrain-launched" / "model.pt").is_file()
