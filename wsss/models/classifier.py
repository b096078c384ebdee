"""Image-level classifiers whose linear heads give class activation maps (CAM, Zhou et al. 2016)."""

from __future__ import annotations

import torch
import torchvision
from torch import Tensor, nn

from wsss.errors import MissingDependencyError
from wsss.models.backbone import Backbone, load_torchvision_resnet

# ImageNet-1k class ids: 281..285 are the domestic cats (tabby, tiger cat, Persian, Siamese, Egyptian cat),
# 151..268 the dog breeds (Chihuahua .. Mexican hairless).
IMAGENET_CAT_CLASSES: tuple[int, ...] = tuple(range(281, 286))
IMAGENET_DOG_CLASSES: tuple[int, ...] = tuple(range(151, 269))
IMAGENET_SPECIES_CLASSES: tuple[tuple[int, ...], ...] = (IMAGENET_CAT_CLASSES, IMAGENET_DOG_CLASSES)


def _cam(features: Tensor, weight_rows: Tensor) -> Tensor:
    """sum_k w[b,k] f[b,k,:,:] -> (B,h,w)."""
    return torch.einsum("bk,bkhw->bhw", weight_rows.to(features.dtype), features)


class Classifier(nn.Module):
    """Backbone (OS16) -> global average pooling -> Linear(c4, num_classes).

    The training loss must be applied to :meth:`forward`'s logits (never to the pooled features:
    docs/seed-paper.md, B1).

    Args:
        arch: ResNet name.
        num_classes: size of the label space.
        weights: backbone weights (``imagenet`` | ``none`` | state_dict path); the head is always new.
    """

    def __init__(self, arch: str = "resnet50", num_classes: int = 2, weights: str = "none") -> None:
        super().__init__()
        self.backbone = Backbone(arch, weights)
        self.fc = nn.Linear(self.backbone.out_channels[1], num_classes)
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, K)."""
        return self.forward_maps(x)[1]

    def forward_maps(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return (layer4 features (B,C,h,w), logits (B,K))."""
        f = self.backbone(x)[1]
        return f, self.fc(f.mean(dim=(2, 3)))

    def cam_from_features(self, features: Tensor, classes: Tensor) -> Tensor:
        """Raw CAMs (B,h,w) of ``classes`` (B,) from layer4 features (no bias, no ReLU)."""
        return _cam(features, self.fc.weight[classes])

    def cam(self, x: Tensor, classes: Tensor) -> Tensor:
        """Raw class activation maps (B,h,w): ``sum_k fc.weight[c,k] f_k`` (no bias, no ReLU)."""
        return self.cam_from_features(self.forward_maps(x)[0], classes)


class ImageNetSpeciesClassifier(nn.Module):
    """The paper's "Pretrained" setting done right: CAMs from the ImageNet classifier with its ImageNet head.

    The seed code discarded the ImageNet ``fc`` (docs/seed-paper.md, B2); here it is kept. Species 0 = cat
    maps to ImageNet classes 281..285, species 1 = dog to 151..268. A species' logit is the logsumexp of the ImageNet logits of its
    classes; its CAM uses, per image, the ``fc`` row of the top-scoring ImageNet class within that set.
    The trunk runs at output stride 16 like every other map source.

    Args:
        arch: ResNet name (ImageNet weights are loaded through torchvision's weights API).
        model: an already built torchvision ResNet with a 1000-way ``fc`` (tests inject a random one).

    Raises:
        MissingDependencyError: no ImageNet weights available (and no ``model`` given).
    """

    num_classes = 2

    def __init__(self, arch: str = "resnet50", model: torchvision.models.ResNet | None = None) -> None:
        super().__init__()
        if model is None:
            model = load_torchvision_resnet(arch, "imagenet")
        if model.fc.out_features != 1000:
            raise MissingDependencyError(
                f"ImageNetSpeciesClassifier needs a 1000-way ImageNet head, got {model.fc.out_features} outputs"
            )
        self.fc = model.fc
        self.backbone = Backbone.from_torchvision(model, arch)
        for i, ids in enumerate(IMAGENET_SPECIES_CLASSES):
            self.register_buffer(f"_ids{i}", torch.tensor(ids, dtype=torch.long), persistent=False)

    def _species_ids(self, species: int) -> Tensor:
        return getattr(self, f"_ids{species}")

    def forward(self, x: Tensor) -> Tensor:
        """Species logits (B, 2): logsumexp of the ImageNet logits over each species' classes."""
        return self.forward_maps(x)[1]

    def forward_maps(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return (layer4 features, species logits)."""
        f = self.backbone(x)[1]
        return f, self.species_logits(self.fc(f.mean(dim=(2, 3))))

    def species_logits(self, imagenet_logits: Tensor) -> Tensor:
        """(B,1000) ImageNet logits -> (B,2) species logits."""
        return torch.stack(
            [imagenet_logits[:, self._species_ids(s)].logsumexp(dim=1) for s in range(self.num_classes)], dim=1
        )

    def cam_from_features(self, features: Tensor, classes: Tensor) -> Tensor:
        """Raw CAMs (B,h,w) for species ``classes`` (B,) from layer4 features."""
        if ((classes < 0) | (classes >= self.num_classes)).any():
            raise ValueError(f"species classes must be 0 (cat) or 1 (dog), got {classes.tolist()}")
        imagenet_logits = self.fc(features.mean(dim=(2, 3)))
        rows = torch.empty(len(classes), dtype=torch.long, device=features.device)
        for s in range(self.num_classes):
            sel = classes == s
            if sel.any():
                ids = self._species_ids(s)
                rows[sel] = ids[imagenet_logits[sel][:, ids].argmax(dim=1)]
        return _cam(features, self.fc.weight[rows])

    def cam(self, x: Tensor, classes: Tensor) -> Tensor:
        """Raw CAMs (B,h,w) of species ``classes`` (0 = cat, 1 = dog), no bias, no ReLU."""
        return self.cam_from_features(self.backbone(x)[1], classes)
