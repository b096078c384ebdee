"""Class-agnostic activation maps: C²AM (Xie et al., CVPR 2022), following the official implementation.

See docs/methods.md#ccam (model, loss, parameter groups), docs/methods.md#per-breed-contrast (per-breed
fine-tuning) and docs/methods.md#polarity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss.models.backbone import Backbone

SIM_MIN = 5e-4
SIM_MAX = 0.9995


class CCAM(nn.Module):
    """ResNet trunk + activation head ``Conv2d(c3+c4 -> 1, 3x3, bias=False) -> BatchNorm2d(1)``.

    Features are ``Z = concat(layer4, layer3)``, both at stride 16. The head's sigmoid ``P`` is one of
    foreground/background; which one is arbitrary because the loss is symmetric, so the ``polarity`` buffer
    (+1 or -1, saved in the state_dict) records it once decided (:func:`decide_polarity`).

    Args:
        arch: ResNet name.
        weights: backbone weights (``imagenet`` | ``none`` | state_dict path).
    """

    polarity: Tensor

    def __init__(self, arch: str = "resnet50", weights: str = "none") -> None:
        super().__init__()
        self.backbone = Backbone(arch, weights)
        c3, c4 = self.backbone.out_channels
        self.head = nn.Sequential(nn.Conv2d(c3 + c4, 1, 3, padding=1, bias=False), nn.BatchNorm2d(1))
        self.register_buffer("polarity", torch.tensor(1.0))

    def features(self, x: Tensor) -> Tensor:
        """``Z = concat(layer4, layer3)`` (B, c4+c3, h, w)."""
        x3, x4 = self.backbone(x)
        return torch.cat([x4, x3], dim=1)

    def raw_logits(self, z: Tensor) -> Tensor:
        """Head output (B,1,h,w) before the sigmoid and without the polarity."""
        return self.head(z)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Training pass.

        Returns:
            ``(v_f, v_b, P)``: descriptors ``mean_p P_p Z_p`` and ``mean_p (1-P_p) Z_p`` (B,C) and the raw
            head map ``P = sigmoid(BN(conv(Z)))`` (B,1,h,w), polarity NOT applied (it is decided from P).
        """
        z = self.features(x)
        p = torch.sigmoid(self.raw_logits(z))
        fg = (p * z).mean(dim=(2, 3))
        bg = ((1.0 - p) * z).mean(dim=(2, 3))
        return fg, bg, p

    def logits(self, x: Tensor) -> Tensor:
        """Foreground logits (B,1,h,w): BN output times polarity, so higher means more foreground.

        Apply any ReLU/normalisation after this, never before (docs/seed-paper.md, B8).
        """
        return self.raw_logits(self.features(x)) * self.polarity


def _cos_sim(a: Tensor, b: Tensor) -> Tensor:
    """Clamped cosine similarity matrix (n_a, n_b)."""
    sim = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    return sim.clamp(SIM_MIN, SIM_MAX)


def _rank_weights(sim: Tensor, alpha: float) -> Tensor:
    """``exp(-alpha * (rank - 1))`` with rank the 0-based position of j in row i sorted descending."""
    with torch.no_grad():
        order = sim.argsort(dim=1, descending=True)
        rank = order.argsort(dim=1)
        return torch.exp(-alpha * (rank.to(sim.dtype) - 1.0))


def _pos_loss(x: Tensor, alpha: float) -> Tensor:
    sim = _cos_sim(x, x)
    return (_rank_weights(sim, alpha) * -torch.log(sim)).mean()


def ccam_loss(fg: Tensor, bg: Tensor, alpha: float) -> tuple[Tensor, dict[str, Tensor]]:
    """C²AM loss ``L_POS^f + L_NEG + L_POS^b`` over a batch, as in the official code.

    With ``sim = clamp(cos, 5e-4, 0.9995)``:
    ``L_NEG = mean_{i,j} -log(1 - sim(bg_i, fg_j))`` over all n² pairs, and for X in {fg, bg}
    ``L_POS^X = mean_{i,j} w_ij * -log sim(X_i, X_j)`` over all n² pairs (diagonal included), where
    ``w_ij = exp(-alpha * (r_ij - 1))`` and ``r_ij`` is the 0-based rank of j in row i sorted descending.
    The rank weights are constants (no gradient).

    Args:
        fg: foreground descriptors (n, C).
        bg: background descriptors (n, C).
        alpha: rank decay.

    Returns:
        The total loss and its parts ``{"pos_fg", "neg", "pos_bg"}`` (detached).
    """
    pos_fg = _pos_loss(fg, alpha)
    pos_bg = _pos_loss(bg, alpha)
    neg = -torch.log(1.0 - _cos_sim(bg, fg)).mean()
    total = pos_fg + neg + pos_bg
    return total, {"pos_fg": pos_fg.detach(), "neg": neg.detach(), "pos_bg": pos_bg.detach()}


def breed_contrastive_loss(fg: Tensor, breeds: Tensor, alpha: float) -> Tensor:
    """Per-breed contrastive term on foreground descriptors (the paper's class-specific fine-tuning).

    Intra-breed positives and inter-breed negatives (the paper's description; the seed code had no negatives:
    docs/seed-paper.md, B12).
    With ``S_ij = clamp(cos(fg_i, fg_j), 5e-4, 0.9995)``, ``P_i = {j != i: breed_j = breed_i}`` and
    ``N_i = {j: breed_j != breed_i}``::

        L_pos = mean_{i: P_i != {}} (1/|P_i|) sum_{j in P_i} exp(-alpha * r_ij) * -log S_ij
        L_neg = mean_{i: N_i != {}} (1/|N_i|) sum_{j in N_i} -log(1 - S_ij)
        L     = L_pos + L_neg

    where ``r_ij`` is the 0-based rank of j among ``P_i`` sorted by ``S_ij`` descending (nearest
    same-breed image weight 1, as in ``L_POS``). A term with no valid row is 0.

    Args:
        fg: foreground descriptors (n, C).
        breeds: breed label per row (n,).
        alpha: rank decay.
    """
    n = fg.shape[0]
    sim = _cos_sim(fg, fg)
    same = breeds.view(-1, 1) == breeds.view(1, -1)
    eye = torch.eye(n, dtype=torch.bool, device=fg.device)
    pos_mask = same & ~eye
    neg_mask = ~same
    zero = fg.sum() * 0.0

    with torch.no_grad():
        masked = sim.masked_fill(~pos_mask, float("-inf"))
        # Non-positives sort last, so a positive's rank is its position among the positives.
        rank = masked.argsort(dim=1, descending=True).argsort(dim=1)
        w = torch.exp(-alpha * rank.to(sim.dtype)) * pos_mask

    def row_mean(values: Tensor, mask: Tensor) -> Tensor:
        counts = mask.sum(dim=1)
        valid = counts > 0
        if not valid.any():
            return zero
        per_row = (values * mask).sum(dim=1)[valid] / counts[valid]
        return per_row.mean()

    l_pos = row_mean(w * -torch.log(sim), pos_mask)
    l_neg = row_mean(-torch.log(1.0 - sim), neg_mask)
    return l_pos + l_neg


def ccam_param_groups(
    model: nn.Module, lr_backbone: float, lr_head: float, weight_decay: float
) -> list[dict]:
    """Optimizer groups as in the official C²AM: only Conv2d/GroupNorm weights and biases are trained.

    Groups (empty ones dropped): backbone weights (``lr_backbone``, wd), backbone biases
    (``2*lr_backbone``, no wd), head weights (``lr_head``, wd), head biases (``2*lr_head``, no wd).
    Modules under ``model.backbone`` count as backbone, the rest as head. BatchNorm affine parameters are
    frozen (``requires_grad=False``); their running statistics still update in train mode. Other parameters
    (e.g. a linear ``fc``) are left untouched and not included.

    Returns:
        A list of dicts for ``torch.optim.SGD``; each carries a ``name`` key.
    """
    groups: dict[str, dict] = {
        "backbone_weight": {"params": [], "lr": lr_backbone, "weight_decay": weight_decay},
        "backbone_bias": {"params": [], "lr": 2 * lr_backbone, "weight_decay": 0.0},
        "head_weight": {"params": [], "lr": lr_head, "weight_decay": weight_decay},
        "head_bias": {"params": [], "lr": 2 * lr_head, "weight_decay": 0.0},
    }
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            for p in module.parameters(recurse=False):
                p.requires_grad_(False)
            continue
        if not isinstance(module, (nn.Conv2d, nn.GroupNorm)):
            continue
        part = "backbone" if name.startswith("backbone.") else "head"
        if module.weight is not None:
            groups[f"{part}_weight"]["params"].append(module.weight)
        if module.bias is not None:
            groups[f"{part}_bias"]["params"].append(module.bias)
    return [{"name": k, **g} for k, g in groups.items() if g["params"]]


def decide_polarity(p_maps: Tensor, border: int = 1) -> float:
    """Decide whether the head's sigmoid marks the foreground (+1) or the background (-1).

    Pets are roughly centred, so the side with more mass on the ``border``-pixel ring than in the centre
    is the background (docs/methods.md#polarity). Use maps from many training images.

    Args:
        p_maps: head maps P (N,1,h,w) (or (N,h,w)) as returned by :meth:`CCAM.forward`.
        border: ring width in feature pixels.

    Returns:
        ``-1.0`` if the ring is brighter than the centre, else ``1.0``.
    """
    p = p_maps.detach().float()
    if p.dim() == 4:
        p = p[:, 0]
    h, w = p.shape[-2:]
    if border < 1 or h <= 2 * border or w <= 2 * border:
        raise ValueError(f"maps of size {h}x{w} have no centre inside a {border}-pixel border")
    centre_mask = torch.zeros(h, w, dtype=torch.bool, device=p.device)
    centre_mask[border:h - border, border:w - border] = True
    centre = p[:, centre_mask].mean()
    ring = p[:, ~centre_mask].mean()
    return -1.0 if ring > centre else 1.0
