"""Class activation maps (Zhou et al. 2016): the fc row of the target class applied to layer4 features."""

from __future__ import annotations

from torch import Tensor, nn

from wsss.methods.base import MapMethod


class CAM(MapMethod):
    """CAM of the given class per image; unlabelled images (``targets=None``) use the predicted class."""

    name = "cam"
    needs_model = True
    model_kind = "classifier"

    def resolve_targets(self, model: nn.Module, images: Tensor, targets: Tensor | None) -> Tensor:
        """``targets`` if given, else the argmax of the classifier's logits on the unscaled images."""
        if targets is not None:
            return targets
        return model(images).argmax(dim=1)

    def raw_map(self, model: nn.Module, x: Tensor, targets: Tensor | None) -> Tensor:
        """``model.cam(x, targets)`` (B,h,w), no ReLU."""
        if targets is None:  # only when called directly, bypassing compute()
            targets = model(x).argmax(dim=1)
        return model.cam(x, targets)
