"""Data-parallel training of train-classifier, train-ccam (plain and per-breed) and train-unet: two gloo ranks
on the CPU (``base.world_size: 2``) against one process, resume across world sizes, the launcher's checks.

Both runs see the same global batches with the same augmentation (drawn from seed, epoch and image alone),
and DDP averages the ranks' gradients, so the updates agree up to what cannot be split over ranks on the
CPU: BatchNorm normalises each rank's half batch with that half's statistics (PyTorch's SyncBatchNorm,
used on GPUs, has no CPU kernel), and a loss normalised per batch (class weights, ignored pixels, Dice) is
normalised per half. The CCAM losses are over the global batch on every rank (descriptors gathered with
their gradients). Hence a tolerance: the distance between the two final weights must be a small fraction
of how far training moved them from the common initial weights. A rank that trained on the wrong images, a
batch not split (twice the steps), gradients not averaged or a resume that restarted would all move them
by about as much as training itself.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import write_params
from wsss.cli import app

torch.set_num_threads(1)
runner = CliRunner()

TINY = {
    "base": {"num_workers": 0, "device": "cpu"},
    "train_classifier": {"arch": "resnet18", "input_size": 32, "epochs": 2, "batch_size": 8,
                         "class_balance": False},
    "train_ccam": {"arch": "resnet18", "resize": 72, "input_size": 64, "epochs": 2, "batch_size": 8,
                   "per_breed_epochs": 2, "breeds_per_batch": 2, "polarity_images": 8},
    "train_unet": {"architecture": "plain", "plain_filters": [4, 8, 16, 32], "input_size": 32, "steps": 6,
                   "batch_size": 8, "dice_weight": 0.5},
}
# |w(2 ranks) - w(1 process)| / |w(1 process) - w(init)|, in fp32 (WSSS_CPU_BF16=0, set for every test here; under
# bf16 autocast BatchNorm rounds differently on a half batch: 18 % relative gradient difference after one ResNet-18
# step, against 2e-6 in fp32). Measured: classifier 0.000, CCAM 0.009 (0.001 resumed; weights only: its polarity
# flip from +1 is compared apart), U-Net 0.014 (0.005 resumed; Adam's per-weight normalisation amplifies rounding
# where gradients are near 0). A U-Net loss averaged per rank instead of over the global batch's non-ignored pixels
# measured 0.184.
TOLERANCE = 0.05
# The per-breed fine-tune is compared over its first optimiser steps only (one per epoch: 16 images, 4 breeds
# of 4, two breeds per rank). Its rank-weighted terms are piecewise constant in the similarity order, so fp32
# rounding (one-process fp32 gradients are already up to 2.4e-3 off fp64 in some ResNet-18 layers) flips
# near-tied ranks and the trajectories part: after 6 steps of 8 images, 0.11 on an AMD EPYC, below 0.05 on
# the CPU of an earlier CI run. The exact equivalence of the gathered objective is checked in fp64 by
# tests/test_distributed.py::test_the_ccam_objective_on_two_ranks_has_the_one_process_gradient.
PER_BREED_SHORT = {"batch_size": 16, "breeds_per_batch": 4}


@pytest.fixture(autouse=True)
def _fp32_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every process of these tests (spawned ranks inherit the environment) trains in fp32."""
    from wsss.device import CPU_BF16_ENV

    monkeypatch.setenv(CPU_BF16_ENV, "0")


def invoke(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, f"wsss {' '.join(args)} failed:\n{result.output}\n{result.exception!r}"
    return result.output


@pytest.fixture(scope="module")
def base_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated and prepared tiny project, copied by each test."""
    import os

    root = tmp_path_factory.mktemp("ddp-base")
    write_params(root, TINY)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        invoke("generate-synthetic")
        invoke("prepare")
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def prepared(base_project: Path, project: Path) -> Path:
    for item in base_project.iterdir():
        if item.name not in ("params.yaml", "mlruns"):
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, project / item.name)
    write_params(project, TINY)
    return project


def _params(root: Path, world_size: int, **sections: dict) -> None:
    merged = {k: dict(v) for k, v in TINY.items()}
    merged["base"]["world_size"] = world_size
    for section, values in sections.items():
        merged.setdefault(section, {}).update(values)
    write_params(root, merged)


def _trained(root: Path, name: str) -> tuple[dict[str, torch.Tensor], float | None]:
    """(the trained tensors of ``models/<name>``, CCAM's polarity or None). The tensors leave out BatchNorm's
    running statistics and the polarity, a sign decided after training whose flip from the initial +1 would
    swamp the weights' movement: it is compared on its own."""
    state = torch.load(root / "models" / name / "model.pt", weights_only=True)
    weights = {k: v.float() for k, v in state.items()
               if v.is_floating_point() and "running_" not in k and k != "polarity"}
    return weights, float(state["polarity"]) if "polarity" in state else None


def _weights(root: Path, name: str) -> dict[str, torch.Tensor]:
    return _trained(root, name)[0]


def _relative_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> float:
    """|a - b| / |a - start| over every trained tensor."""
    gap = sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5
    moved = sum(float((a[k] - start[k]).pow(2).sum()) for k in a) ** 0.5
    assert moved > 0, "training did not move the weights"
    return gap / moved


def _runs(stage: str) -> object:
    import mlflow

    return mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.`wsss.stage` = '{stage}'")


def _stop_after_first_epoch(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Make the in-process (world size 1) run raise right after its first checkpoint; returns the undo."""
    from wsss.training.checkpoint import CheckpointManager

    original = CheckpointManager.save

    def save_then_stop(self: CheckpointManager, state: dict) -> None:
        original(self, state)
        raise RuntimeError("stopped after the first epoch")

    monkeypatch.setattr(CheckpointManager, "save", save_then_stop)
    return lambda: monkeypatch.setattr(CheckpointManager, "save", original)


def _same_training_on_two_ranks(root: Path, name: str, command: list[str], start: dict[str, torch.Tensor],
                                stage: str, monkeypatch: pytest.MonkeyPatch) -> tuple[float, float]:
    """(gap of 2 ranks to 1 process, gap of 1-then-2 ranks (resumed) to 1 process); checks the outputs."""
    _params(root, 1)
    invoke(*command)
    one, polarity = _trained(root, name)
    report_one = json.loads((root / "reports" / "training" / f"{name}.json").read_text())
    assert report_one["world_size"] == 1

    _params(root, 2)
    out = invoke(*command)
    assert "data-parallel on 2 cpu processes (4 images per process and step)" in " ".join(out.split())
    two, two_polarity = _trained(root, name)
    assert two_polarity == polarity
    report = json.loads((root / "reports" / "training" / f"{name}.json").read_text())
    assert report["world_size"] == 2
    assert not any(k.startswith("module.") for k in two)
    assert not list((root / ".wsss" / "state" / stage).glob("*/checkpoint.pt"))
    runs = _runs(stage)
    assert len(runs) == 2, "one MLflow run per invocation (rank 0 alone logs)"
    assert sorted(runs["tags.world_size"]) == ["1", "2"]

    # Stopped after its first epoch on one process, resumed on two ranks: the same MLflow run carries on.
    _params(root, 1)
    undo = _stop_after_first_epoch(monkeypatch)
    result = runner.invoke(app, command)
    assert result.exit_code != 0 and "stopped after the first epoch" in repr(result.exception)
    undo()
    assert list((root / ".wsss" / "state" / stage).glob("*/checkpoint.pt"))
    _params(root, 2)
    invoke(*command)
    resumed, resumed_polarity = _trained(root, name)
    assert resumed_polarity == polarity
    assert not list((root / ".wsss" / "state" / stage).glob("*/checkpoint.pt"))
    runs = _runs(stage)
    assert len(runs) == 3 and (runs["status"] == "FINISHED").all()
    gaps = _relative_gap(one, two, start), _relative_gap(one, resumed, start)
    print(f"{name}: |2 ranks - 1 process| / |moved| = {gaps[0]:.4f}, resumed 1 -> 2 ranks: {gaps[1]:.4f}")
    return gaps


@pytest.mark.slow
def test_classifier_on_two_gloo_ranks(prepared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsss.device import seed_everything
    from wsss.models.classifier import Classifier

    seed_everything(0)
    start = {k: v.float() for k, v in Classifier("resnet18", 2).state_dict().items()
             if v.is_floating_point() and "running_" not in k}
    gap, resumed = _same_training_on_two_ranks(prepared, "classifier-species",
                                               ["train-classifier", "--labels", "species"], start,
                                               "train-classifier", monkeypatch)
    assert gap < TOLERANCE and resumed < TOLERANCE, (gap, resumed)


@pytest.mark.slow
def test_ccam_and_per_breed_on_two_gloo_ranks(prepared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsss.device import seed_everything
    from wsss.models.ccam import CCAM

    seed_everything(0)
    start = {k: v.float() for k, v in CCAM("resnet18").state_dict().items()
             if v.is_floating_point() and "running_" not in k}
    gap, resumed = _same_training_on_two_ranks(prepared, "ccam-none", ["train-ccam", "--init", "none"], start,
                                               "train-ccam", monkeypatch)
    assert gap < TOLERANCE and resumed < TOLERANCE, (gap, resumed)
    parent = _weights(prepared, "ccam-none")
    _params(prepared, 2, train_ccam=PER_BREED_SHORT)
    out = invoke("train-ccam", "--init", "none", "--per-breed")
    assert "data-parallel on 2 cpu processes (8 images per process and step)" in " ".join(out.split())
    report = json.loads((prepared / "reports" / "training" / "ccam-none-perbreed.json").read_text())
    assert report["world_size"] == 2 and report["polarity_source"] == "inherited from ccam-none"
    assert report["steps"] == 2  # two epochs of one global batch each
    two = _weights(prepared, "ccam-none-perbreed")
    _params(prepared, 1, train_ccam=PER_BREED_SHORT)
    invoke("train-ccam", "--init", "none", "--per-breed")
    gap = _relative_gap(_weights(prepared, "ccam-none-perbreed"), two, parent)
    print(f"ccam-none-perbreed: |2 ranks - 1 process| / |moved| = {gap:.4f}")
    assert gap < TOLERANCE


@pytest.mark.slow
def test_unet_on_two_gloo_ranks(prepared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsss.config import UnetConfig
    from wsss.device import seed_everything
    from wsss.models.unet import build_unet

    seed_everything(0)
    start = {k: v.float() for k, v in build_unet(UnetConfig(**{k: tuple(v) if isinstance(v, list) else v
                                                                for k, v in TINY["train_unet"].items()})
                                                 ).state_dict().items()
             if v.is_floating_point() and "running_" not in k}
    gap, resumed = _same_training_on_two_ranks(prepared, "unet-gt", ["train-unet", "--masks", "gt"], start,
                                               "train-unet", monkeypatch)
    assert gap < TOLERANCE and resumed < TOLERANCE, (gap, resumed)


class _NoisyImages(torch.utils.data.Dataset):
    """Fixed images with a random "augmentation" (noise drawn from torch's RNG, as torchvision's are)."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(5)
        self.x, self.y = torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i] + 0.1 * torch.randn(3, 8, 8), self.y[i]


def _small_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 2))


def _fit_small_net(ctx: object, root: str, epochs: int, out: str) -> None:
    """Train the small net in fp32 through the shared Trainer path; rank 0 saves the final state."""
    import torch.nn.functional as F

    from wsss.config import params_from_dict
    from wsss.device import Precision
    from wsss.paths import Paths
    from wsss.training.distributed import sync_batchnorm
    from wsss.training.trainer import Trainer

    params = params_from_dict({"base": {"num_workers": 0, "seed": 3}})
    prec = Precision(torch.device("cpu"), None, channels_last=False, use_grad_scaler=False)
    model = sync_batchnorm(_small_net(), ctx)  # type: ignore[arg-type]
    trainer = Trainer("test-stage", "v", "small", params, Paths(Path(root)), prec, "fixed", ctx)  # type: ignore[arg-type]
    step_model = trainer.data_parallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    dl = trainer.loader(_NoisyImages(20), 8)
    val = _NoisyImages(6)

    def train_epoch(epoch: int) -> dict[str, float]:
        for x, y in dl:
            trainer.step(F.cross_entropy(step_model(x), y), opt)
        return {}

    def validate(epoch: int) -> dict[str, float]:  # rank 0 only; every rank gets its value for select
        return {"val_loss": float(F.cross_entropy(model(val.x), val.y))}

    result = trainer.fit(model, opt, None, epochs, len(dl), train_epoch, validate=validate, select="val_loss")
    if trainer.ctx.is_main:
        torch.save({"state": model.state_dict(), "best": result.best_state, "best_epoch": result.best_epoch}, out)
        import mlflow

        mlflow.end_run()  # the metrics logged without a stage run opened one in the test's MLflow store


@pytest.mark.slow
def test_shared_trainer_path_gives_one_process_weights_on_two_ranks_and_resumes_across(project: Path) -> None:
    """Exact in fp32: same global batches and augmentation, averaged gradients, global BatchNorm statistics
    (running statistics included), epoch selection on rank 0's validation, resume on another world size."""
    from wsss.training.distributed import launch

    cpu, tmp_path = torch.device("cpu"), project
    runs = {}
    for name, world, epochs in (("one", 1, 3), ("two", 2, 3), ("first", 2, 1), ("resumed", 1, 3)):
        root = tmp_path / ("shared" if name in ("first", "resumed") else name)
        launch(_fit_small_net, world, cpu, str(root), epochs, str(tmp_path / f"{name}.pt"))
        runs[name] = torch.load(tmp_path / f"{name}.pt", weights_only=True)
    for other in ("two", "resumed"):
        assert runs[other]["best_epoch"] == runs["one"]["best_epoch"]
        for key in ("state", "best"):
            for k, v in runs["one"][key].items():
                assert torch.allclose(v.float(), runs[other][key][k].float(), atol=1e-5), (other, key, k)
    start = _small_net().state_dict()
    assert not torch.allclose(start["0.weight"], runs["one"]["state"]["0.weight"], atol=1e-3)


def test_global_batch_and_images_are_checked_before_any_rank_starts(prepared: Path) -> None:
    _params(prepared, 2, train_classifier={"batch_size": 9})
    result = runner.invoke(app, ["train-classifier", "--labels", "species"])
    assert result.exit_code == 2
    assert "train_classifier.batch_size 9 must be a multiple of the 2 data-parallel processes" in result.output
    _params(prepared, 64, train_unet={"batch_size": 64})
    result = runner.invoke(app, ["train-unet", "--masks", "gt"])
    assert result.exit_code == 1 and "training on 64 process(es) needs at least 64 training images" in \
        " ".join(result.output.split())


def test_pretrain_world_size_moved_to_base(prepared: Path) -> None:
    write_params(prepared, {**TINY, "pretrain": {"world_size": 2}})
    result = runner.invoke(app, ["pretrain"])
    assert result.exit_code == 2 and "'pretrain.world_size' was replaced by 'base.world_size'" in result.output


@pytest.mark.slow
def test_training_stages_under_torchrun_join_the_launcher_s_ranks(prepared: Path) -> None:
    """The README's commands: `torchrun --standalone --nproc-per-node 2 -m wsss <stage> ...`."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for command, name in ((["train-classifier", "--labels", "species"], "classifier-species"),
                          (["train-ccam", "--init", "none"], "ccam-none"),
                          (["train-unet", "--masks", "gt"], "unet-gt")):
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
             "-m", "wsss", *command], cwd=prepared, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        output = " ".join((proc.stdout + proc.stderr).split())  # rich wraps long lines
        assert output.count("data-parallel on 2 cpu processes") == 1  # printed by rank 0 only
        assert output.count("saved ") == 1
        report = json.loads((prepared / "reports" / "training" / f"{name}.json").read_text())
        assert report["world_size"] == 2
        assert (prepared / "models" / name / "model.pt").is_file()
        assert not list((prepared / ".wsss" / "state").glob("*/*/checkpoint.pt"))
