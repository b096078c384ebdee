"""Networks: OS16 ResNet backbone, CAM classifiers, C²AM (CCAM) and the U-Net segmenters."""

from wsss.models.backbone import Backbone, load_torchvision_resnet
from wsss.models.ccam import CCAM, breed_contrastive_loss, ccam_loss, ccam_param_groups, decide_polarity
from wsss.models.classifier import Classifier, ImageNetSpeciesClassifier
from wsss.models.unet import PlainUNet, build_unet

__all__ = [
    "CCAM",
    "Backbone",
    "Classifier",
    "ImageNetSpeciesClassifier",
    "PlainUNet",
    "breed_contrastive_loss",
    "build_unet",
    "ccam_loss",
    "ccam_param_groups",
    "decide_polarity",
    "load_torchvision_resnet",
]
