"""Rebuild a trained model from its folder (``models/<name>/``: ``model.pt`` + ``meta.json``).

``meta.json`` decides what is built, so it is checked to describe a model its weights can fill before
anything is loaded; every mismatch is one :class:`~wsss.errors.DataError` naming the folder. The folder
format is described in docs/artefacts.md#models.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from torch import nn

from wsss.errors import DataError
from wsss.paths import Paths

# Kinds a model loaded by name (``load_model``) may have; U-Nets are loaded from their folder.
MAP_MODEL_KINDS = ("classifier", "ccam")
IMAGENET = "imagenet"


@dataclass(frozen=True)
class ModelMeta:
    """What ``meta.json`` says about a model, typed; ``raw`` keeps every key (``polarity``, ``epochs``, ...).

    Attributes:
        kind: ``classifier`` | ``ccam`` | ``unet``.
        arch: backbone of a classifier / CCAM (``resnet50``, ...); None for a U-Net.
        input_size: the side images are resized to for the model.
        labels: a classifier's label space (``species`` | ``breed``).
        bg: whether a classifier has a background class.
        num_classes: output classes (classifier, U-Net); None for a CCAM.
        masks: the pseudo-mask variant (or ``gt``) a U-Net was trained on.
        raw: the whole ``meta.json`` mapping (read-only).
    """

    kind: str
    arch: str | None = None
    input_size: int = 224
    labels: str | None = None
    bg: bool = False
    num_classes: int | None = None
    masks: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, meta: Mapping[str, Any]) -> ModelMeta:
        """Typed view of an already checked ``meta.json`` mapping."""
        classes = meta.get("num_classes", 2 if meta.get("kind") == "unet" else None)
        labels = meta.get("labels")
        return cls(
            kind=str(meta["kind"]),
            arch=None if meta.get("arch") is None else str(meta["arch"]),
            input_size=int(meta.get("input_size", 224)),
            labels=None if labels is None else str(labels),
            bg=bool(meta.get("bg", False)),
            num_classes=None if classes is None else int(classes),
            masks=None if meta.get("masks") is None else str(meta["masks"]),
            raw=MappingProxyType(dict(meta)),
        )


# The paper's "Pretrained" setting: the ImageNet classifier with its own head (no folder).
_IMAGENET_META = {"kind": "classifier", "labels": "species", "bg": False, "input_size": 224, "arch": "resnet50",
                  "num_classes": 2}


def load_model(paths: Paths, name: str) -> tuple[nn.Module, ModelMeta]:
    """The classifier or CCAM ``models/<name>/`` (``imagenet``: the ImageNet classifier), CPU, eval mode.

    Raises:
        DataError: the model is missing, its ``meta.json`` is damaged or does not fit its weights.
    """
    if name == IMAGENET:
        from wsss.models.classifier import ImageNetSpeciesClassifier

        return ImageNetSpeciesClassifier().eval(), ModelMeta.from_dict(_IMAGENET_META)
    src = paths.model_dir(name)
    meta_path = Path(src) / "meta.json"
    if not meta_path.exists():
        raise DataError(f"{meta_path}: model '{name}' not found; train it first (see `wsss --help`)")
    from wsss.io import read_json

    try:
        kind = read_json(meta_path).get("kind")
    except (OSError, ValueError, AttributeError) as exc:
        raise DataError(f"{meta_path} is not a JSON object ({exc}); retrain the model") from None
    if kind not in MAP_MODEL_KINDS:
        raise DataError(f"{meta_path}: unknown model kind {kind!r}")
    return load_model_dir(src, kind)


def load_model_dir(model_dir: Path, kind: str) -> tuple[nn.Module, ModelMeta]:
    """Rebuild the model of ``kind`` saved in ``model_dir``, CPU, eval mode.

    Raises:
        DataError: a file is missing or damaged, or ``meta.json`` does not describe these weights.
        ConfigError: the saved kind is not ``kind``.
    """
    from wsss.training.checkpoint import load_model_state, load_weights

    if kind not in _BUILDERS:
        raise ValueError(f"unknown model kind {kind!r}; valid: {', '.join(_BUILDERS)}")
    state, meta = load_model_state(model_dir, {"kind": kind})
    model, described = _BUILDERS[kind](meta, Path(model_dir))
    load_weights(model, state, model_dir, described)
    return model.eval(), ModelMeta.from_dict(meta)


def _build_backbone_model(meta: dict[str, Any], src: Path) -> tuple[nn.Module, str]:
    """A classifier or CCAM as ``meta`` describes it (label space checked against ``num_classes``)."""
    from wsss.config import ARCHS
    from wsss.training.checkpoint import require_meta

    kind = meta["kind"]
    meta_path = src / "meta.json"
    require_meta(meta, ("arch",) + (("num_classes", "labels", "bg") if kind == "classifier" else ()), src)
    if meta["arch"] not in ARCHS:
        raise DataError(f"{meta_path}: arch {meta['arch']!r} is not one of {', '.join(ARCHS)}; retrain the model")
    if kind == "ccam":
        from wsss.models.ccam import CCAM

        return CCAM(meta["arch"], weights="none"), f"ccam {meta['arch']}"
    from wsss.data.breeds import num_classes
    from wsss.models.classifier import Classifier

    try:
        k = int(meta["num_classes"])
        expected = num_classes(str(meta["labels"]), bool(meta["bg"]))
    except (TypeError, ValueError, KeyError) as exc:
        raise DataError(f"{meta_path}: invalid label space ({exc}); retrain the model") from None
    if k != expected:
        raise DataError(
            f"{meta_path}: num_classes {k} does not match the label space labels={meta['labels']!r} "
            f"bg={meta['bg']} ({expected} classes); retrain the model"
        )
    return Classifier(meta["arch"], k, weights="none"), f"classifier {meta['arch']}, {k} classes"


def _build_unet(meta: dict[str, Any], src: Path) -> tuple[nn.Module, str]:
    """A U-Net as ``meta`` describes it."""
    from wsss.config import UnetConfig
    from wsss.errors import WsssError
    from wsss.models.unet import build_unet
    from wsss.training.checkpoint import require_meta

    require_meta(meta, ("architecture", "encoder", "input_size"), src)
    try:
        cfg = UnetConfig(architecture=meta["architecture"], encoder=meta["encoder"], encoder_weights="none",
                         input_size=int(meta["input_size"]), plain_filters=tuple(
                             int(f) for f in meta.get("plain_filters", ())) or UnetConfig().plain_filters)
        classes = int(meta.get("num_classes", 2))
        if cfg.architecture not in ("smp", "plain"):
            raise ValueError(f"architecture {cfg.architecture!r}")
        model = build_unet(cfg, num_classes=classes)
    except (WsssError, TypeError, ValueError) as exc:
        raise DataError(f"{src}/meta.json does not describe a U-Net wsss can build ({exc}); "
                        "retrain the model") from None
    return model, (f"{cfg.architecture} U-Net, encoder {cfg.encoder}, filters {list(cfg.plain_filters)}, "
                   f"{classes} classes")


_BUILDERS: dict[str, Callable[[dict[str, Any], Path], tuple[nn.Module, str]]] = {
    "classifier": _build_backbone_model,
    "ccam": _build_backbone_model,
    "unet": _build_unet,
}
