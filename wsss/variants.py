"""Typed names of models, map variants and weight specs: a string is parsed once, and paths are built only
from these types, so a name can never be a path (no ``/``, no ``..``).

The grammar (every string is what the stages have always written)::

    model id     classifier-<labels>[-bg]        labels: species | breed
                 ccam-<init>[-ecs][-perbreed]    init: none | imagenet | cls-<labels>[-bg] | pre-<name>
                 unet-<source>                   source: gt | best | <map variant> | same-<best|map variant>
                 pretrain-<name>
                 imagenet                        the ImageNet classifier (the paper's "Pretrained" maps)
    map variant  <method>_<model id> | ensemble | <prior>
                 method: a map method that needs a model; prior: prior-grabcut | prior-ellipse (label-free)
    CCAM init    none | imagenet | classifier:<labels>[-bg] | pretrain:<name>    (``train-ccam --init``)
    weights      imagenet | none | pretrain:<name> | <file>.pt / <file>.pth
    <name>       1-64 letters, digits, '_', '-', '.'; not starting with '.', no '..'

Kept free of torch so the CLI can parse its options before importing anything heavy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from wsss.errors import ConfigError


class MethodName(str, Enum):
    """Map method names (the CLI's ``--method`` choices; a test keeps them equal to :data:`wsss.methods.METHODS`)."""

    cam = "cam"
    ecs = "ecs"
    ccam = "ccam"
    ccam_ecs = "ccam-ecs"
    ensemble = "ensemble"
    prior_grabcut = "prior-grabcut"
    prior_ellipse = "prior-ellipse"


class Labels(str, Enum):
    """Image-level label spaces of a classifier (also the CLI's ``--labels`` choices)."""

    species = "species"
    breed = "breed"


LABELS = tuple(label.value for label in Labels)
ENSEMBLE = MethodName.ensemble.value
# Label-free priors: maps computed from the image alone (no model, no label); the variant is the method name.
PRIORS = (MethodName.prior_grabcut.value, MethodName.prior_ellipse.value)
# Map methods that compute maps with a model; ``ensemble`` fuses stored maps, the priors need none.
MODEL_METHODS = tuple(m.value for m in MethodName if m is not MethodName.ensemble and m.value not in PRIORS)
# Variants that are a method name alone (no model).
MODEL_FREE = (ENSEMBLE, *PRIORS)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Suffixes of a CCAM id: a pretrained backbone's name must not end in one, or the id would be ambiguous.
_CCAM_SUFFIXES = ("-ecs", "-perbreed")

MODEL_FORMS = ("classifier-<species|breed>[-bg], ccam-<none|imagenet|cls-<labels>[-bg]|pre-<name>>[-ecs][-perbreed], "
               "unet-<gt|best|map variant|same-<best|map variant>>, pretrain-<name> or imagenet")
VARIANT_FORMS = (f"<method>_<model> (method {', '.join(MODEL_METHODS)}; model classifier-<species|breed>[-bg], "
                 f"ccam-<none|imagenet|cls-<labels>[-bg]|pre-<name>>[-ecs][-perbreed] or imagenet), {ENSEMBLE} "
                 f"or a label-free prior ({', '.join(PRIORS)})")
INIT_FORMS = "none, imagenet, classifier:<species|breed>[-bg] or pretrain:<name>"
WEIGHT_FORMS = "imagenet, none, pretrain:<name> or a .pt/.pth state_dict file"
NAME_FORM = "1-64 letters, digits, '_', '-', '.', not starting with '.', no '..'"


def safe_name(value: str, what: str = "name") -> str:
    """``value`` if it is a safe name (one path component that cannot climb: see the module docstring).

    Raises:
        ConfigError: it is not (the message names the value and the valid form).
    """
    if not isinstance(value, str) or not _NAME.fullmatch(value) or ".." in value:
        raise ConfigError(f"{what} {value!r}: use {NAME_FORM}")
    return value


def _bad(what: str, text: object, forms: str) -> ConfigError:
    return ConfigError(f"{what} {text!r} is not valid; use {forms}")


@dataclass(frozen=True)
class ClassifierId:
    """``classifier-<labels>[-bg]``: an image-level classifier and its label space."""

    labels: str
    bg: bool = False

    def __post_init__(self) -> None:
        if self.labels not in LABELS:
            raise _bad("classifier labels", self.labels, " or ".join(LABELS))

    @property
    def variant(self) -> str:
        """The label space, e.g. ``species`` or ``breed-bg``."""
        return f"{self.labels}-bg" if self.bg else self.labels

    @classmethod
    def from_variant(cls, text: str) -> ClassifierId:
        """Parse a label space such as ``species-bg``."""
        labels = text.removesuffix("-bg")
        if labels not in LABELS:
            raise _bad("classifier variant", text, "species, breed, species-bg or breed-bg")
        return cls(labels, text != labels)

    @classmethod
    def parse(cls, text: str) -> ClassifierId:
        """Parse ``classifier-<labels>[-bg]``."""
        if not text.startswith("classifier-"):
            raise _bad("classifier", text, "classifier-<species|breed>[-bg]")
        return cls.from_variant(text.removeprefix("classifier-"))

    def __str__(self) -> str:
        return f"classifier-{self.variant}"


@dataclass(frozen=True)
class PretrainId:
    """``pretrain-<name>``: a self-supervised backbone (what weights ``pretrain:<name>`` load)."""

    name: str

    def __post_init__(self) -> None:
        safe_name(self.name, "pretrained backbone name")

    @classmethod
    def parse(cls, text: str) -> PretrainId:
        """Parse ``pretrain-<name>``."""
        if not text.startswith("pretrain-"):
            raise _bad("pretrained backbone", text, "pretrain-<name>")
        return cls(text.removeprefix("pretrain-"))

    def __str__(self) -> str:
        return f"pretrain-{self.name}"


@dataclass(frozen=True)
class ImagenetId:
    """``imagenet``: torchvision's ImageNet classifier (no folder under ``models/``)."""

    @classmethod
    def parse(cls, text: str) -> ImagenetId:
        """Parse ``imagenet``."""
        if text != "imagenet":
            raise _bad("model", text, "imagenet")
        return cls()

    def __str__(self) -> str:
        return "imagenet"


IMAGENET = ImagenetId()


@dataclass(frozen=True)
class CcamInit:
    """Where a CCAM backbone starts: ``none``, ``imagenet``, a trained classifier or a pretrained backbone."""

    kind: Literal["none", "imagenet", "classifier", "pretrain"]
    classifier: ClassifierId | None = None
    pretrain: PretrainId | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("none", "imagenet", "classifier", "pretrain"):
            raise _bad("CCAM init", self.kind, INIT_FORMS)
        if (self.kind == "classifier") != (self.classifier is not None) or (
                (self.kind == "pretrain") != (self.pretrain is not None)):
            raise ConfigError(f"CCAM init {self.kind!r}: give exactly the classifier or the backbone it names")
        if self.pretrain is not None and self.pretrain.name.endswith(_CCAM_SUFFIXES):
            raise ConfigError(f"CCAM init 'pretrain:{self.pretrain.name}': a backbone name used as a CCAM init "
                              f"must not end in {' or '.join(_CCAM_SUFFIXES)} (the model id would be ambiguous)")

    @classmethod
    def parse(cls, text: str) -> CcamInit:
        """Parse the ``train-ccam --init`` form: none, imagenet, classifier:<variant>, pretrain:<name>."""
        if text in ("none", "imagenet"):
            return cls(text)  # type: ignore[arg-type]
        kind, sep, arg = text.partition(":")
        if not sep or kind not in ("classifier", "pretrain"):
            raise _bad("CCAM init", text, INIT_FORMS)
        try:
            part = ClassifierId.from_variant(arg) if kind == "classifier" else PretrainId(arg)
        except ConfigError as exc:
            raise ConfigError(f"CCAM init {text!r}: {exc}") from None
        return cls("classifier", classifier=part) if kind == "classifier" else cls("pretrain", pretrain=part)

    @classmethod
    def from_tag(cls, tag: str) -> CcamInit:
        """Parse the form inside a model id: none, imagenet, cls-<variant>, pre-<name>."""
        if tag in ("none", "imagenet"):
            return cls(tag)  # type: ignore[arg-type]
        if tag.startswith("cls-"):
            return cls("classifier", classifier=ClassifierId.from_variant(tag.removeprefix("cls-")))
        if tag.startswith("pre-"):
            return cls("pretrain", pretrain=PretrainId(tag.removeprefix("pre-")))
        raise _bad("CCAM init", tag, "none, imagenet, cls-<labels>[-bg] or pre-<name>")

    def _spelled(self, classifier: str, pretrain: str) -> str:
        if self.classifier is not None:
            return classifier + self.classifier.variant
        if self.pretrain is not None:
            return pretrain + self.pretrain.name
        return self.kind

    @property
    def tag(self) -> str:
        """The form inside a model id: ``none``, ``imagenet``, ``cls-species``, ``pre-<name>``."""
        return self._spelled("cls-", "pre-")

    def __str__(self) -> str:
        return self._spelled("classifier:", "pretrain:")


@dataclass(frozen=True)
class CcamId:
    """``ccam-<init>[-ecs][-perbreed]``: a class-agnostic CCAM model."""

    init: CcamInit
    ecs: bool = False
    per_breed: bool = False

    @classmethod
    def parse(cls, text: str) -> CcamId:
        """Parse ``ccam-<init>[-ecs][-perbreed]``."""
        if not text.startswith("ccam-"):
            raise _bad("CCAM model", text, "ccam-<init>[-ecs][-perbreed]")
        rest = text.removeprefix("ccam-")
        per_breed = rest.endswith("-perbreed")
        rest = rest.removesuffix("-perbreed")
        ecs = rest.endswith("-ecs")
        try:
            return cls(CcamInit.from_tag(rest.removesuffix("-ecs")), ecs, per_breed)
        except ConfigError:
            raise _bad("CCAM model", text,
                       "ccam-<none|imagenet|cls-<labels>[-bg]|pre-<name>>[-ecs][-perbreed]") from None

    @property
    def parent(self) -> CcamId:
        """The model per-breed fine-tuning starts from (itself when not per-breed)."""
        return CcamId(self.init, self.ecs)

    def __str__(self) -> str:
        return f"ccam-{self.init.tag}" + ("-ecs" if self.ecs else "") + ("-perbreed" if self.per_breed else "")


@dataclass(frozen=True)
class MapVariant:
    """``<method>_<model id>``, ``ensemble`` or a prior: a folder of maps under ``cams/`` (and its masks, reports)."""

    method: str
    model: ClassifierId | CcamId | ImagenetId | None = None

    def __post_init__(self) -> None:
        if self.method in MODEL_FREE:
            if self.model is not None:
                what = "fuses stored maps" if self.method == ENSEMBLE else "is a label-free prior"
                raise ConfigError(f"map variant {self.method!r} {what} and takes no model")
        elif self.method not in MODEL_METHODS:
            raise _bad("map method", self.method, ", ".join((*MODEL_METHODS, *MODEL_FREE)))
        elif not isinstance(self.model, (ClassifierId, CcamId, ImagenetId)):
            raise ConfigError(f"map method {self.method!r} needs a classifier, CCAM or imagenet model, "
                              f"got {str(self.model) if self.model is not None else 'none'!r}")

    @classmethod
    def parse(cls, text: str) -> MapVariant:
        """Parse ``<method>_<model id>``, ``ensemble`` or a prior name."""
        if text in MODEL_FREE:
            return cls(text)
        method, sep, model = text.partition("_")
        if sep and method in MODEL_METHODS:
            try:
                parsed = parse_model(model)
                if isinstance(parsed, (ClassifierId, CcamId, ImagenetId)):
                    return cls(method, parsed)
            except ConfigError:
                pass
        raise _bad("map variant", text, VARIANT_FORMS)

    @classmethod
    def of(cls, method: str, model: str | None) -> MapVariant:
        """The variant of ``method`` with the model id ``model`` (None for ``ensemble`` and the priors), both checked."""
        return cls(method, None if model is None else parse_model(model))  # type: ignore[arg-type]

    @property
    def is_prior(self) -> bool:
        """Whether this is a label-free prior (its masks are the label-free baseline, never tuned)."""
        return self.method in PRIORS

    def __str__(self) -> str:
        return self.method if self.model is None else f"{self.method}_{self.model}"


SAME_IMAGES = "same-"  # mask-source prefix: only the train images that have GT (as the supervised U-Net)
SELFTRAIN = "selftrain-r"  # mask source of self-training round N: masks/selftrain-r<N>/ (wsss self-train)
_SELFTRAIN_RE = re.compile(r"selftrain-r([1-9][0-9]?)")


@dataclass(frozen=True)
class MaskSource:
    """What a U-Net trains on: ``gt``, ``best`` (chosen from the pseudo-mask reports) or a map variant's masks.

    ``same-best`` / ``same-<variant>`` (``same_images``): those pseudo-masks on exactly the train images
    that have GT, the images the supervised U-Net (``gt``) trains on: weak vs full labels on the same images.
    ``selftrain-r<N>``: the constrained masks of self-training round ``N`` (``round``, 1-99).
    """

    kind: Literal["gt", "best", "pseudo", "selftrain"]
    variant: MapVariant | None = None
    same_images: bool = False
    round: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("gt", "best", "pseudo", "selftrain") or (self.kind == "pseudo") != (self.variant is not None):
            raise ConfigError(f"mask source {self.kind!r}: use gt, best or a map variant")
        if self.same_images and self.kind == "gt":
            raise ConfigError(f"mask source {SAME_IMAGES}gt: the GT masks are on those images already; use gt")
        if (self.kind == "selftrain") != (self.round > 0) or (self.kind == "selftrain" and self.same_images):
            raise ConfigError(f"mask source {self.kind!r}: a self-training round is {SELFTRAIN}<1-99>, all images")

    @classmethod
    def parse(cls, text: str) -> MaskSource:
        """Parse ``gt``, ``best``, a map variant, ``same-best`` or ``same-<map variant>``."""
        same = isinstance(text, str) and text.startswith(SAME_IMAGES)
        rest = text.removeprefix(SAME_IMAGES) if same else text
        if rest == "best" or (rest == "gt" and not same):
            return cls(rest, same_images=same)  # type: ignore[arg-type]
        if not same and isinstance(text, str) and (m := _SELFTRAIN_RE.fullmatch(text)):
            return cls("selftrain", round=int(m.group(1)))
        try:
            return cls("pseudo", MapVariant.parse(rest), same_images=same)
        except ConfigError:
            raise _bad("mask source", text, f"gt, best or a map variant, or {SAME_IMAGES}<best|map variant> "
                       f"for the train images with GT only (map variant: {VARIANT_FORMS})") from None

    def __str__(self) -> str:
        if self.kind == "selftrain":
            return f"{SELFTRAIN}{self.round}"
        name = str(self.variant) if self.variant is not None else self.kind
        return SAME_IMAGES + name if self.same_images else name


@dataclass(frozen=True)
class UnetId:
    """``unet-<source>``: a segmenter trained on GT, on the best pseudo-masks or on one variant's masks."""

    source: MaskSource

    @classmethod
    def parse(cls, text: str) -> UnetId:
        """Parse ``unet-<gt|best|map variant|same-best|same-<map variant>>``."""
        if text.startswith("unet-"):
            try:
                return cls(MaskSource.parse(text.removeprefix("unet-")))
            except ConfigError:
                pass
        raise _bad("U-Net", text, f"unet-<gt|best|map variant|same-<best|map variant>|{SELFTRAIN}<N>>")

    def __str__(self) -> str:
        return f"unet-{self.source}"


ModelId = ClassifierId | CcamId | UnetId | PretrainId | ImagenetId
_MODEL_PREFIXES: dict[str, type] = {"classifier-": ClassifierId, "ccam-": CcamId, "unet-": UnetId,
                                    "pretrain-": PretrainId}


def parse_model(text: str) -> ModelId:
    """Parse any model id (see the module docstring).

    Raises:
        ConfigError: not a model id (the message names it and lists the valid forms).
    """
    if text == "imagenet":
        return IMAGENET
    for prefix, kind in _MODEL_PREFIXES.items():
        if isinstance(text, str) and text.startswith(prefix):
            try:
                return kind.parse(text)
            except ConfigError:
                break
    raise _bad("model", text, MODEL_FORMS)


@dataclass(frozen=True)
class WeightSpec:
    """Backbone weights: ``imagenet``, ``none``, ``pretrain:<name>`` or a ``.pt``/``.pth`` file path."""

    kind: Literal["imagenet", "none", "pretrain", "file"]
    value: str = ""  # the backbone name or the file path

    @classmethod
    def parse(cls, text: str) -> WeightSpec:
        """Parse a weights value (a file path may be absolute or relative to the project root)."""
        if text in ("imagenet", "none"):
            return cls(text)  # type: ignore[arg-type]
        if text.startswith("pretrain:"):
            name = text.removeprefix("pretrain:")
            try:
                return cls("pretrain", PretrainId(name).name)
            except ConfigError as exc:
                raise ConfigError(f"weights {text!r}: {exc}") from None
        # A file, but not a URL or another keyword that happens to end in .pt (``pretrain:x.pt``, ``s3://``).
        if text.lower().endswith((".pt", ".pth")) and ":" not in text.split("/", 1)[0]:
            return cls("file", text)
        raise _bad("weights", text, WEIGHT_FORMS)

    @property
    def pretrain_id(self) -> PretrainId | None:
        """The backbone ``pretrain:<name>`` names (None for the other kinds)."""
        return PretrainId(self.value) if self.kind == "pretrain" else None

    def __str__(self) -> str:
        if self.kind == "pretrain":
            return f"pretrain:{self.value}"
        return self.value if self.kind == "file" else self.kind
