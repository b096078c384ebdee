"""CCAM / C²AM (Xie et al. 2022): the class-agnostic foreground logit map."""

from __future__ import annotations

from torch import Tensor, nn

from wsss.methods.base import MapMethod


class CCAM(MapMethod):
    """Foreground logits of a CCAM model; ``targets`` are ignored.

    The model applies its polarity flip to the logit itself, so the ReLU of the template comes after it
    (flipping after the ReLU would flatten the foreground into a plateau: the AUTH bug, docs/methods.md#polarity).
    """

    name = "ccam"
    needs_model = True
    model_kind = "ccam"

    def raw_map(self, model: nn.Module, x: Tensor, targets: Tensor | None) -> Tensor:
        """``model.logits(x)[:, 0]`` (B,h,w)."""
        return model.logits(x)[:, 0]
