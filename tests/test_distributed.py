"""Data-parallel pretraining (``wsss.training.distributed``): world sizes, error propagation from a rank, and
two gloo CPU processes training MoCo v2 in lockstep (identical weights and queues on both ranks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from wsss.errors import ConfigError, DataError, WsssError
from wsss.models.ssl import MoCoV2, build_encoder
from wsss.training.distributed import DistContext, all_reduce_sum, launch, world_size_for

CPU = torch.device("cpu")


def test_world_size_on_cpu_is_one_unless_asked() -> None:
    assert world_size_for(0, CPU) == 1
    assert world_size_for(1, CPU) == 1
    assert world_size_for(3, CPU) == 3
    with pytest.raises(ConfigError, match=">= 0"):
        world_size_for(-1, CPU)


def test_world_size_on_cuda_counts_visible_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert world_size_for(0, torch.device("cuda")) == 4
    assert world_size_for(0, torch.device("cuda", 1)) == 1  # an explicit GPU means that one only
    assert world_size_for(2, torch.device("cuda")) == 2
    with pytest.raises(ConfigError, match="4 visible"):
        world_size_for(5, torch.device("cuda"))


def test_single_process_launch_calls_in_process() -> None:
    seen: list[DistContext] = []
    assert launch(lambda ctx, x: seen.append(ctx) or x * 2, 1, CPU, 21) == 42
    assert seen == [DistContext(0, 1, CPU)] and seen[0].is_main and not seen[0].distributed
    assert all_reduce_sum([1.0, 2.0], seen[0]) == [1.0, 2.0]


def _fail_on_rank_1(ctx: DistContext) -> None:
    if ctx.rank == 1:
        raise DataError("images/broken.jpg: cannot be decoded")


def _crash_on_rank_1(ctx: DistContext) -> None:
    if ctx.rank == 1:
        raise SystemExit(3)


def test_a_rank_s_user_error_is_re_raised_by_the_launcher() -> None:
    with pytest.raises(DataError, match=r"images/broken.jpg: cannot be decoded"):
        launch(_fail_on_rank_1, 2, CPU)


def test_a_rank_that_dies_is_reported_by_rank_and_exit_code() -> None:
    with pytest.raises(WsssError, match=r"rank 1\) died with exit code 3"):
        launch(_crash_on_rank_1, 2, CPU)


def _moco_steps(ctx: DistContext, out_dir: str) -> None:
    torch.manual_seed(0)  # same initial weights on every rank (DDP broadcasts rank 0's anyway)
    enc, dim = build_encoder("resnet18")
    model = MoCoV2(enc, dim, dim=16, queue_size=64, bn_splits=2)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(100 + ctx.rank)  # each rank sees different images
    sums = []
    for _ in range(2):
        x = torch.randn(4, 3, 32, 32, generator=g)
        loss = ddp(x + 0.1 * torch.randn(x.shape, generator=g), x + 0.1 * torch.randn(x.shape, generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_step()
        sums.append(float(loss.detach()))
    total = all_reduce_sum([sum(sums), 1.0], ctx)
    # BatchNorm running statistics are per rank between broadcasts (DDP syncs buffers before each forward,
    # rank 0's are the ones saved); weights and the queue must agree exactly.
    synced = {k: v for k, v in model.state_dict().items() if "running_" not in k and "num_batches" not in k}
    torch.save({"state": synced, "total": total}, Path(out_dir) / f"rank{ctx.rank}.pt")


def test_two_gloo_ranks_stay_in_lockstep_and_share_one_queue(tmp_path: Path) -> None:
    launch(_moco_steps, 2, CPU, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    s0, s1 = r0["state"], r1["state"]
    assert s0.keys() == s1.keys()
    for key in s0:
        assert torch.equal(s0[key], s1[key]), f"{key} differs between the ranks"
    # 2 steps x 2 ranks x 2 views x 4 images entered the queue on each rank: all ranks' keys, not only its own.
    assert int(s0["queue_ptr"]) == 32
    # The random initial queue entries of the first 32 slots were overwritten by unit-norm keys.
    assert torch.allclose(s0["queue"][:32].norm(dim=1), torch.ones(32), atol=1e-4)
    assert r0["total"] == r1["total"] and r0["total"][1] == 2.0  # the loss sum was reduced over both ranks
    # Different data per rank and synchronised gradients: the weights moved from the common start.
    torch.manual_seed(0)
    start = MoCoV2(*build_encoder("resnet18"), dim=16, queue_size=64).state_dict()
    assert not torch.equal(start["encoder.conv1.weight"], s0["encoder.conv1.weight"])


def _ccam_objective_grads(ctx: DistContext, out_dir: str, per_breed: bool) -> None:
    """One backward of train-ccam's objective in fp64: the whole batch on one process, or this rank's half
    through DDP with BatchNorm over the global batch, as the stage runs it."""
    from wsss.config import CcamConfig
    from wsss.models.ccam import CCAM, ccam_param_groups
    from wsss.stages.train_ccam import _Objective
    from wsss.training.distributed import sync_batchnorm

    torch.manual_seed(0)
    model = CCAM("resnet18").double().train()
    ccam_param_groups(model, 1e-3, 1e-2, 0.0)  # freezes the BatchNorm affine parameters, as the stage does
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    breeds = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])  # each rank's half holds two breeds
    objective = _Objective(CcamConfig(), polarity=-1.0, ecs_target=None, per_breed=per_breed,
                           ctx=ctx if ctx.distributed else None)
    net: torch.nn.Module = model
    if ctx.distributed:
        half = slice(4 * ctx.rank, 4 * (ctx.rank + 1))
        x, breeds = x[half], breeds[half]
        net = DistributedDataParallel(sync_batchnorm(model, ctx))
    fg, bg, p = net(x)
    loss, _ = objective(x, breeds, fg, bg, p)
    loss.backward()
    grads = {k: q.grad for k, q in model.named_parameters() if q.grad is not None}
    torch.save({"loss": float(loss.detach()), "grads": grads}, Path(out_dir) / f"ws{ctx.world_size}_rank{ctx.rank}.pt")


@pytest.mark.parametrize("per_breed", [False, True], ids=["ccam", "per-breed"])
def test_the_ccam_objective_on_two_ranks_has_the_one_process_gradient(tmp_path: Path, per_breed: bool) -> None:
    """The gathered contrastive terms (and the per-breed term's breed labels) give DDP exactly the
    one-process gradient; in fp64, so what is left is rounding, not a wrong reduction."""
    launch(_ccam_objective_grads, 1, CPU, str(tmp_path), per_breed)
    launch(_ccam_objective_grads, 2, CPU, str(tmp_path), per_breed)
    one, r0, r1 = (torch.load(tmp_path / name, weights_only=True)
                   for name in ("ws1_rank0.pt", "ws2_rank0.pt", "ws2_rank1.pt"))
    assert one["loss"] == pytest.approx(r0["loss"], rel=1e-12) and r0["loss"] == r1["loss"]
    assert one["grads"].keys() == r0["grads"].keys() and len(one["grads"]) > 10
    for key, g in one["grads"].items():
        assert torch.equal(r0["grads"][key], r1["grads"][key]), f"{key}: the ranks disagree"
        gap = float((r0["grads"][key] - g).norm() / g.norm())
        assert gap < 1e-9, f"{key}: relative gradient gap {gap:.2e} between 2 ranks and 1 process"
