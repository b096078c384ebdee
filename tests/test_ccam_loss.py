"""ccam_loss / breed_contrastive_loss against deliberately naive, loop-based transcriptions of the spec."""

from __future__ import annotations

import math

import pytest
import torch

from wsss.models.ccam import breed_contrastive_loss, ccam_loss

torch.set_num_threads(1)


def naive_sim(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return min(max(dot / (na * nb), 5e-4), 0.9995)


def naive_ranks(row: list[float]) -> list[int]:
    """rank[j] = 0-based position of j in the row sorted descending."""
    order = sorted(range(len(row)), key=lambda j: -row[j])
    ranks = [0] * len(row)
    for pos, j in enumerate(order):
        ranks[j] = pos
    return ranks


def naive_pos(x: list[list[float]], alpha: float) -> float:
    n = len(x)
    total = 0.0
    for i in range(n):
        row = [naive_sim(x[i], x[j]) for j in range(n)]
        ranks = naive_ranks(row)
        for j in range(n):
            total += math.exp(-alpha * (ranks[j] - 1)) * -math.log(row[j])
    return total / (n * n)


def naive_ccam(fg: list[list[float]], bg: list[list[float]], alpha: float) -> tuple[float, float, float]:
    n = len(fg)
    neg = 0.0
    for i in range(n):
        for j in range(n):
            neg += -math.log(1.0 - naive_sim(bg[i], fg[j]))
    return naive_pos(fg, alpha), neg / (n * n), naive_pos(bg, alpha)


def naive_breed(fg: list[list[float]], breeds: list[int], alpha: float) -> float:
    n = len(fg)
    pos_rows, neg_rows = [], []
    for i in range(n):
        positives = [j for j in range(n) if j != i and breeds[j] == breeds[i]]
        negatives = [j for j in range(n) if breeds[j] != breeds[i]]
        if positives:
            sims = [naive_sim(fg[i], fg[j]) for j in positives]
            ranks = naive_ranks(sims)
            terms = [math.exp(-alpha * r) * -math.log(s) for r, s in zip(ranks, sims, strict=True)]
            pos_rows.append(sum(terms) / len(terms))
        if negatives:
            terms = [-math.log(1.0 - naive_sim(fg[i], fg[j])) for j in negatives]
            neg_rows.append(sum(terms) / len(terms))
    pos = sum(pos_rows) / len(pos_rows) if pos_rows else 0.0
    neg = sum(neg_rows) / len(neg_rows) if neg_rows else 0.0
    return pos + neg


def _inputs(seed: int, n: int = 5, d: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Positive-ish features (like ReLU outputs) plus noise, so similarities spread over (0, 1).
    fg = torch.rand(n, d, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    bg = torch.rand(n, d, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return fg, bg


@pytest.mark.parametrize("alpha", [0.25, 1.3])
@pytest.mark.parametrize("seed", [0, 1])
def test_ccam_loss_matches_naive(alpha: float, seed: int) -> None:
    fg, bg = _inputs(seed)
    total, parts = ccam_loss(fg, bg, alpha)
    pos_f, neg, pos_b = naive_ccam(fg.tolist(), bg.tolist(), alpha)
    assert parts["pos_fg"].item() == pytest.approx(pos_f, rel=1e-9)
    assert parts["neg"].item() == pytest.approx(neg, rel=1e-9)
    assert parts["pos_bg"].item() == pytest.approx(pos_b, rel=1e-9)
    assert total.item() == pytest.approx(pos_f + neg + pos_b, rel=1e-9)


def test_rank_weights_matter() -> None:
    # Each row has its own similarity order, different from the index order, so rank weights change the value.
    fg = torch.tensor(
        [[1.0, 0.0, 0.0], [0.9, 0.4, 0.0], [0.1, 1.0, 0.2], [0.0, 0.3, 1.0], [0.5, 0.5, 0.5]], dtype=torch.float64
    )
    bg = fg.flip(0) + 0.1
    alpha = 0.7
    rows = fg.tolist()
    n = len(rows)
    by_index = 0.0  # weights by column index instead of rank: a wrong implementation
    for i in range(n):
        for j in range(n):
            s = naive_sim(rows[i], rows[j])
            by_index += math.exp(-alpha * (j - 1)) * -math.log(s)
    by_index /= n * n
    _, parts = ccam_loss(fg, bg, alpha)
    assert parts["pos_fg"].item() == pytest.approx(naive_pos(rows, alpha), rel=1e-9)
    assert parts["pos_fg"].item() != pytest.approx(by_index, rel=1e-3)
    assert parts["pos_fg"].item() != pytest.approx(naive_pos(rows, 0.0), rel=1e-3)


def test_clamping_follows_spec() -> None:
    # Identical and orthogonal vectors hit both clamps: -log(0.9995) and -log(1 - 5e-4).
    fg = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    bg = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    total, parts = ccam_loss(fg, bg, 0.25)
    assert parts["neg"].item() == pytest.approx(-math.log(1 - 5e-4))
    assert torch.isfinite(total)


def test_ccam_loss_gradients_flow() -> None:
    fg, bg = _inputs(3)
    fg.requires_grad_(True)
    bg.requires_grad_(True)
    total, _ = ccam_loss(fg, bg, 0.25)
    total.backward()
    assert fg.grad is not None and fg.grad.abs().sum() > 0
    assert bg.grad is not None and bg.grad.abs().sum() > 0


@pytest.mark.parametrize("alpha", [0.3, 1.1])
@pytest.mark.parametrize(
    "breeds", [[0, 0, 1, 1, 1], [2, 0, 2, 2, 1], [4, 4, 4, 4, 4], [0, 1, 2, 3, 4], [1, 1, 1, 0, 2, 2]]
)
def test_breed_loss_matches_naive(alpha: float, breeds: list[int]) -> None:
    fg, _ = _inputs(7, n=len(breeds))
    got = breed_contrastive_loss(fg, torch.tensor(breeds), alpha)
    assert got.item() == pytest.approx(naive_breed(fg.tolist(), breeds, alpha), rel=1e-9, abs=1e-12)


def test_breed_loss_gradients_flow() -> None:
    fg, _ = _inputs(5)
    fg.requires_grad_(True)
    breed_contrastive_loss(fg, torch.tensor([0, 0, 1, 1, 2]), 0.25).backward()
    assert fg.grad is not None and fg.grad.abs().sum() > 0


def test_per_breed_and_ecs_terms_act_on_the_pet_side() -> None:
    """With a parent of polarity -1 (P marks the background), the breed term must get the (1-P) descriptors."""
    from wsss.models.ccam import CCAM
    from wsss.stages import train_ccam

    model = CCAM("resnet18", weights="none")
    model.polarity.fill_(-1.0)
    assert train_ccam.polarity_rule(model, "none", ecs=False, per_breed=True) == (-1.0, "inherited from ccam-none")
    assert train_ccam.polarity_rule(model, "none", ecs=True, per_breed=False) == (1.0, "ECS foreground target")
    assert train_ccam.polarity_rule(model, "none", ecs=False, per_breed=False) == (None, "border vs centre")

    fg, bg, p = torch.randn(4, 8), torch.randn(4, 8), torch.rand(4, 1, 3, 3)
    pet, pet_map = train_ccam.pet_side(fg, bg, p, -1.0)
    assert torch.equal(pet, bg) and torch.allclose(pet_map, 1.0 - p)
    for polarity in (1.0, None):
        pet, pet_map = train_ccam.pet_side(fg, bg, p, polarity)
        assert torch.equal(pet, fg) and torch.equal(pet_map, p)
