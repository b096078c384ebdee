"""Typed, strict configuration mirroring ``params.yaml``.

Defaults live in the dataclasses; ``params.yaml`` overrides them section by section. The loader is
strict: an unknown key, a value of the wrong type or a value outside its declared range is an error
that names the key and the file. Ranges are declared in field metadata (``_r(lo, hi)``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from wsss.errors import ConfigError
from wsss.variants import ClassifierId, MapVariant, WeightSpec, safe_name

# SQLAlchemy's `dialect[+driver]://...` form (what Optuna's RDBStorage takes); the rest is checked on use.
_STORAGE_URL = re.compile(r"^[a-z][a-z0-9]*(\+[a-z0-9_]+)?://", re.IGNORECASE)

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
# The registered refiners' names (wsss.refiners.REGISTRY, which imports cv2; a test keeps them equal).
REFINERS = ("crf", "grabcut", "grabcut+crf", "none")


def _r(lo: float | None = None, hi: float | None = None, **kw: Any) -> dict[str, Any]:
    """Field metadata declaring an inclusive numeric range."""
    return {"range": (lo, hi), **kw}


def _f(default: Any, lo: float | None = None, hi: float | None = None) -> Any:
    return field(default=default, metadata=_r(lo, hi))


@dataclass(frozen=True)
class BaseConfig:
    """Shared settings: which dataset, where it lives, seed, device."""

    seed: int = _f(0, 0)
    dataset: Literal["synthetic", "oxford-pet"] = "synthetic"
    # Oxford-IIIT Pet layout root (holds images/ and annotations/). For `synthetic` the generator writes it.
    data_root: str = "data/raw/synthetic/oxford-iiit-pet"
    # Extra Oxford-layout roots whose images carry image-level labels only (weakly-supervised stages).
    extra_roots: tuple[str, ...] = ()
    # Background-only images (Stanford Background `images/` layout). For `synthetic`: generated.
    background_root: str | None = "data/raw/synthetic/background"
    device: str = "auto"
    # torch.compile the models of the training stages and of map extraction (wsss.device.compile_model).
    # Off by default: on 2 CPU cores its compile time outweighs what it saves at the embedded default's size
    # (benchmarks/speed.py measures both).
    compile: bool = False
    num_workers: int = _f(0, 0, 64)
    # Data-parallel processes of every training stage: 0 = one per visible GPU (1 on the CPU); N > 1 on the
    # CPU runs N gloo processes (a correctness check, not a speed-up). Each stage's batch_size is the global
    # batch. Under torchrun the launcher's WORLD_SIZE replaces it.
    world_size: int = _f(0, 0, 64)
    # MLflow experiment name; empty means "wsss-<dataset>".
    experiment: str = ""


@dataclass(frozen=True)
class SyntheticConfig:
    """The built-in synthetic pets generator (the embedded default dataset)."""

    n_trainval: int = _f(160, 4)
    n_test: int = _f(80, 2)
    n_background: int = _f(40, 0)
    image_size: int = _f(128, 32, 1024)
    breeds_per_species: int = _f(3, 1, 18)
    occlusion_prob: float = _f(0.3, 0.0, 1.0)
    seed: int = _f(0, 0)


@dataclass(frozen=True)
class PrepareConfig:
    """Resizing and the validation split carved from trainval."""

    max_side: int = _f(320, 0, 4096)  # longest side after resizing; 0 keeps the original size
    min_side: int = _f(16, 1)  # smaller images are excluded
    max_pixels: int = _f(40_000_000, 1)  # decompression-bomb guard
    val_fraction: float = _f(0.15, 0.0, 0.9)
    background_val_fraction: float = _f(0.2, 0.0, 0.9)


@dataclass(frozen=True)
class ValidateConfig:
    """Thresholds of the data validation suite."""

    min_images_per_class: int = _f(2, 0)
    min_side: int = _f(16, 1)
    max_side: int = _f(4096, 1)
    check_files: bool = True


@dataclass(frozen=True)
class SimSiamConfig:
    """SimSiam heads (Chen & He 2021)."""

    proj_dim: int = _f(2048, 16, 8192)  # projector width and output dimension
    pred_dim: int = _f(512, 8, 8192)  # predictor bottleneck
    fix_pred_lr: bool = True  # predictor keeps the base lr (no cosine decay), as the paper recommends


@dataclass(frozen=True)
class MocoV2Config:
    """MoCo v2 head, queue and momentum encoder (Chen et al. 2020)."""

    dim: int = _f(128, 8, 4096)  # embedding dimension
    queue_size: int = _f(4096, 16, 1_000_000)  # negative keys kept
    temperature: float = _f(0.2, 0.01, 1.0)
    ema: float = _f(0.99, 0.0, 1.0)  # key encoder momentum (0.999 in the paper's 200-epoch ImageNet runs)
    bn_splits: int = _f(2, 1, 64)  # keys encoded in this many shuffled sub-batches (one-device shuffle BN)


@dataclass(frozen=True)
class PretrainConfig:
    """Self-supervised backbone pretraining on the project's own non-test images (no labels)."""

    name: str = "default"  # writes models/pretrain-<name>/; consumers use weights `pretrain:<name>`
    method: Literal["simsiam", "mocov2"] = "simsiam"
    arch: str = "resnet50"
    init: Literal["none", "imagenet"] = "none"  # imagenet: domain-adaptive pretraining from ImageNet weights
    output_stride: Literal[16, 32] = 32  # 32: torchvision's ResNet (cheapest); weights fit both strides
    include_background: bool = True  # background-only images are unlabelled images too
    input_size: int = _f(224, 32, 1024)
    crop_scale_min: float = _f(0.2, 0.01, 1.0)
    color_jitter: float = _f(0.4, 0.0, 1.0)  # brightness/contrast/saturation strength (hue: a quarter)
    color_jitter_prob: float = _f(0.8, 0.0, 1.0)
    grayscale_prob: float = _f(0.2, 0.0, 1.0)
    blur_prob: float = _f(0.5, 0.0, 1.0)
    epochs: int = _f(100, 1)
    batch_size: int = _f(64, 4)
    lr: float = _f(0.05, 0.0, 10.0)
    weight_decay: float = _f(1e-4, 0.0, 1.0)
    momentum: float = _f(0.9, 0.0, 1.0)
    warmup_epochs: int = _f(0, 0)
    knn_k: int = _f(20, 1, 1000)  # k-NN probe: neighbours among train-split labelled images
    knn_temperature: float = _f(0.07, 0.001, 10.0)
    simsiam: SimSiamConfig = field(default_factory=SimSiamConfig)
    mocov2: MocoV2Config = field(default_factory=MocoV2Config)


@dataclass(frozen=True)
class ClassifierConfig:
    """Image-level classifier used by CAM / ECS (and as a CCAM initialisation)."""

    arch: str = "resnet50"
    weights: str = "none"  # imagenet | none | pretrain:<name> | path/to/backbone.pt
    input_size: int = _f(224, 32, 1024)
    crop_scale_min: float = _f(0.35, 0.01, 1.0)
    epochs: int = _f(8, 1)
    batch_size: int = _f(16, 1)
    lr_backbone: float = _f(0.01, 0.0)
    lr_head: float = _f(0.1, 0.0)
    momentum: float = _f(0.9, 0.0, 1.0)
    weight_decay: float = _f(1e-4, 0.0)
    warmup_epochs: int = _f(0, 0)
    label_smoothing: float = _f(0.0, 0.0, 0.5)
    # Weight the loss by inverse class frequency and select epochs on balanced accuracy, so an imbalanced
    # label space (Oxford-IIIT Pet has ~2 dogs per cat) cannot collapse to the majority class.
    class_balance: bool = True


@dataclass(frozen=True)
class CcamConfig:
    """Class-agnostic CCAM training (defaults: the official implementation's values)."""

    arch: str = "resnet50"
    resize: int = _f(512, 32, 2048)
    input_size: int = _f(448, 32, 2048)
    epochs: int = _f(10, 1)
    batch_size: int = _f(64, 2)
    alpha: float = _f(0.25, 0.0)
    lr_backbone: float = _f(1e-3, 0.0)
    lr_head: float = _f(1e-2, 0.0)
    weight_decay: float = _f(1e-4, 0.0)
    momentum: float = _f(0.0, 0.0, 1.0)  # the official code effectively trains without momentum
    poly_power: float = _f(0.9, 0.0)
    ecs_weight: float = _f(1.0, 0.0)  # weight of the ECS target term for ccam-ecs
    ecs_classifier: str = "species"  # classifier variant (species | breed, optionally -bg) giving the ECS target
    breed_weight: float = _f(1.0, 0.0)  # weight of the per-breed contrastive term
    breeds_per_batch: int = _f(4, 2)
    per_breed_epochs: int = _f(3, 1)
    polarity_images: int = _f(256, 1)


@dataclass(frozen=True)
class CamsConfig:
    """Map extraction (CAM, ECS, CCAM, ensemble)."""

    scales: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
    flip: bool = True
    batch_size: int = _f(8, 1)
    shard_size: int = _f(64, 1)
    threshold: float = _f(0.3, 0.0, 1.0)  # threshold used in the map report
    ecs_delta: float = _f(0.5, 0.0, 1.0)
    ecs_erase: Literal["blur", "mean"] = "blur"
    ecs_blur_sigma: float = _f(0.08, 0.0, 1.0)  # fraction of the image's short side
    ecs_rounds: int = _f(1, 1, 5)
    ensemble_members: tuple[str, ...] = ()
    ensemble_weights: tuple[float, ...] = ()
    ensemble_fusion: Literal["mean", "max", "geomean"] = "mean"


@dataclass(frozen=True)
class CrfConfig:
    """Dense CRF (pydensecrf) parameters."""

    enabled: bool = True
    unary: Literal["soft", "label"] = "soft"
    scale: float = _f(1.0, 0.01, 100.0)  # soft unary temperature: sigmoid((logit M - logit t) / scale)
    gt_prob: float = _f(0.7, 0.5, 0.999)
    gaussian_sxy: float = _f(3.0, 0.1)
    gaussian_compat: float = _f(3.0, 0.0)
    bilateral_sxy: float = _f(50.0, 0.1)
    bilateral_srgb: float = _f(5.0, 0.1)
    bilateral_compat: float = _f(10.0, 0.0)
    iterations: int = _f(10, 1, 100)


@dataclass(frozen=True)
class GrabCutConfig:
    """OpenCV GrabCut seeded from the map's thresholds."""

    iterations: int = _f(5, 1, 50)
    fg_threshold: float = _f(0.7, 0.0, 1.0)  # >= : confident foreground
    pfg_threshold: float = _f(0.3, 0.0, 1.0)  # >= : probable foreground
    bg_threshold: float = _f(0.05, 0.0, 1.0)  # < : confident background (between: probable bg)
    # Width of a band along the image border, as a fraction of each side, seeded as confident background
    # whatever the map says (0 = off). The centred-rectangle GrabCut baseline's prior is 0.075.
    border: float = _f(0.0, 0.0, 0.45)


@dataclass(frozen=True)
class PseudoConfig:
    """Map -> pseudo-mask: threshold, refiner and the confident-region (ignore) variant."""

    refiner: Literal[REFINERS] = "crf"  # type: ignore[valid-type]
    threshold: float = _f(0.3, 0.0, 1.0)
    confident: bool = False  # IRN dual threshold: disagreement -> 255
    fg_threshold: float = _f(0.3, 0.0, 1.0)
    bg_threshold: float = _f(0.05, 0.0, 1.0)
    workers: int = _f(0, 0, 256)  # 0 = all CPU cores
    crf: CrfConfig = field(default_factory=CrfConfig)
    grabcut: GrabCutConfig = field(default_factory=GrabCutConfig)


@dataclass(frozen=True)
class TuneConfig:
    """Optuna study over refiner, CRF/GrabCut parameters and thresholds."""

    trials: int = _f(30, 1)
    timeout_s: float = _f(0.0, 0.0)  # 0 = no timeout
    seed: int = _f(0, 0)
    n_startup_trials: int = _f(8, 0)
    prune_chunks: int = _f(4, 1)
    refiners: tuple[str, ...] = REFINERS
    max_images: int = _f(0, 0)  # 0 = the whole validation split
    # median: running mean IoU vs other trials' at each chunk; wilcoxon: paired signed-rank test of the
    # per-image IoUs against the best trial's (benchmarks/results/pruners.md compares them).
    pruner: Literal["median", "wilcoxon"] = "median"
    wilcoxon_p: float = _f(0.1, 0.0, 1.0)  # prune when the test says "worse than the best" at this p
    # Optuna storage URL shared by every worker (e.g. postgresql+psycopg://user@host/db); empty = the
    # SQLite file studies/<variant>/optuna.db. `wsss tune crf --storage` overrides it.
    storage: str = ""


@dataclass(frozen=True)
class TuneEnsembleConfig:
    """Optuna study of the ensemble's member weights on the validation split (tune-ensemble)."""

    trials: int = _f(24, 1)  # added per run, on top of the seed trials of a new study
    timeout_s: float = _f(0.0, 0.0)  # 0 = no timeout
    seed: int = _f(0, 0)
    n_startup_trials: int = _f(8, 0)
    max_images: int = _f(0, 0)  # 0 = the whole validation split


@dataclass(frozen=True)
class CopyPasteConfig:
    """Background copy-paste (``wsss.data.copy_paste``): confident pet cut-outs of the pseudo-masks pasted
    onto background-only train images as extra U-Net pairs with exact masks. Changes what the steps see,
    never how many there are (``train_unet.steps``)."""

    enabled: bool = False
    fraction: float = _f(0.5, 0.0, 10.0)  # pairs made = fraction x the U-Net's training images
    min_confidence: float = _f(0.45, 0.0, 1.0)  # IoU of a cut-out with its map at map_threshold, at least
    # A number, or "val": the threshold that is best on val for the map variant the masks were refined from
    # (`best_threshold` of reports/cams/<variant>.json), so a map is judged at its own scale.
    map_threshold: float | Literal["val"] = _f(0.3, 0.0, 1.0)
    min_area: float = _f(0.02, 0.0, 1.0)  # a cut-out's area as a fraction of its image, at least
    scale_min: float = _f(0.6, 0.05, 4.0)  # size factor relative to the source image, drawn uniformly
    scale_max: float = _f(1.0, 0.05, 4.0)


@dataclass(frozen=True)
class DecisionConfig:
    """How a trained U-Net turns pet probabilities into masks (:mod:`wsss.decision`), chosen on val at the
    end of ``train-unet`` and applied by ``evaluate``, ``predict`` and the exported MLflow model."""

    flip_tta: bool = True  # average with the mirrored image's probability (twice the inference cost)
    choose_threshold: bool = True  # off: always 0.5
    thresholds: tuple[float, ...] = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)  # scanned on val (+ 0.5)
    # A threshold other than 0.5 is kept only when its paired val gain over 0.5 exceeds this many standard errors.
    min_gain_se: float = _f(2.0, 0.0)


@dataclass(frozen=True)
class UnetConfig:
    """Segmenter trained on pseudo-masks (or GT for the supervised baseline).

    The schedule is in optimiser steps, not epochs: every U-Net gets ``steps`` steps whatever its number
    of training images, so the supervised, same-images and all-images U-Nets compare at equal schedules.
    """

    architecture: Literal["smp", "plain"] = "smp"
    encoder: str = "resnet34"
    encoder_weights: str = "none"  # imagenet | none | pretrain:<name> | path/to/backbone.pt
    input_size: int = _f(256, 32, 2048)
    steps: int = _f(4000, 1)  # optimiser steps (batches of batch_size), the same for every U-Net
    batch_size: int = _f(16, 1)
    lr: float = _f(1e-3, 0.0)
    weight_decay: float = _f(1e-4, 0.0)
    dice_weight: float = _f(0.0, 0.0)
    plain_filters: tuple[int, ...] = (32, 64, 128, 256)
    copy_paste: CopyPasteConfig = field(default_factory=CopyPasteConfig)
    decision: DecisionConfig = field(default_factory=DecisionConfig)


@dataclass(frozen=True)
class EvaluateConfig:
    """Test-split evaluation."""

    batch_size: int = _f(8, 1)
    ellipse_scale: float = _f(0.8, 0.05, 1.0)  # centred-ellipse baseline: axes as a fraction of the image


@dataclass(frozen=True)
class SelfTrainConfig:
    """Constrained self-training rounds (``wsss self-train --round N``; docs/methods.md#self-training).

    Round ``N`` relabels every train image with round ``N-1``'s U-Net (soft output), refines that with the
    selected route's tuned refiner and constrains the result against the round-0 pseudo-masks, then
    trains the next U-Net with the ``train_unet`` schedule.
    """

    rounds: int = _f(1, 1, 20)  # rounds after round 0 (the WSSS U-Net unet-best); dvc.yaml has one stage each
    # A new mask whose pet area differs from round 0's by more than this fraction of it is reset to round 0's.
    max_area_change: float = _f(0.5, 0.0, 100.0)
    ignore_disagreement: bool = True  # pixels where the new mask and round 0's differ -> 255 (ignore)
    flip_tta: bool = True  # average the prediction with that of the mirrored image
    border_band: bool = True  # keep the refiner's GrabCut border band background (when it uses one)
    batch_size: int = _f(16, 1)  # images per forward pass when relabelling


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow observability of every stage run. No stage output depends on it (no ``dvc.yaml`` lists it)."""

    # MLflow system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) in each run's
    # "System metrics" tab, sampled every ``system_metrics_interval_s`` seconds by a background thread.
    system_metrics: bool = True
    system_metrics_interval_s: float = _f(10.0, 0.1, 3600.0)


@dataclass(frozen=True)
class Params:
    """All of params.yaml."""

    base: BaseConfig = field(default_factory=BaseConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    train_classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    train_ccam: CcamConfig = field(default_factory=CcamConfig)
    make_cams: CamsConfig = field(default_factory=CamsConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    tune_ensemble: TuneEnsembleConfig = field(default_factory=TuneEnsembleConfig)
    train_unet: UnetConfig = field(default_factory=UnetConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    self_train: SelfTrainConfig = field(default_factory=SelfTrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# --------------------------------------------------------------------------------------------------
# loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (lists -> tuples)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def bad(expect: str) -> ConfigError:
        return ConfigError(f"{source}: '{key}' must be {expect}, got {value!r} ({type(value).__name__})")

    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad("a mapping")
        return _build(tp, value, source, prefix=key + ".")
    if origin is Literal:
        if value not in args:
            raise bad("one of " + ", ".join(repr(a) for a in args))
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for alt in args:
            if alt is type(None):
                continue
            with contextlib.suppress(ConfigError):
                return _coerce(value, alt, key, source)
        raise bad(" or ".join(_type_name(a) for a in args))
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        item_tp = args[0] if args else Any
        return tuple(_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        if not math.isfinite(value):  # YAML .nan / .inf would slip through every range check
            raise bad("a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    return value


def _check_range(value: Any, meta: dict[str, Any], key: str, source: str) -> None:
    lo, hi = meta.get("range", (None, None))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        lo_s = "-inf" if lo is None else lo
        hi_s = "inf" if hi is None else hi
        raise ConfigError(f"{source}: '{key}' = {value} is outside its range [{lo_s}, {hi_s}]")


# Keys that were replaced: the error says by what.
_REPLACED = {"pretrain.world_size": "'base.world_size' (one setting for every training stage)",
             "train_unet.epochs": "'train_unet.steps' (optimiser steps, equal for every U-Net whatever its "
                                  "number of images; epochs x images / batch_size gives the old schedule)"}


def _build(cls: type, data: dict[str, Any], source: str, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    for name in unknown:
        if prefix + name in _REPLACED:
            raise ConfigError(f"{source}: '{prefix}{name}' was replaced by {_REPLACED[prefix + name]}")
    if unknown:
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}' "
            f"(valid keys in '{prefix.rstrip('.') or 'top level'}': {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, value in data.items():
        key = prefix + name
        coerced = _coerce(value, hints[name], key, source)
        _check_range(coerced, dict(fields[name].metadata), key, source)
        kwargs[name] = coerced
    return cls(**kwargs)


def _validate_cross_fields(p: Params, source: str) -> None:
    for arch_key, arch in (("train_classifier.arch", p.train_classifier.arch), ("train_ccam.arch", p.train_ccam.arch)):
        if arch not in ARCHS:
            raise ConfigError(f"{source}: '{arch_key}' = {arch!r}; valid: {', '.join(ARCHS)}")
    if p.pretrain.arch not in ARCHS:
        raise ConfigError(f"{source}: 'pretrain.arch' = {p.pretrain.arch!r}; valid: {', '.join(ARCHS)}")
    if p.pretrain.warmup_epochs >= p.pretrain.epochs:
        raise ConfigError(f"{source}: 'pretrain.warmup_epochs' must be smaller than 'pretrain.epochs'")
    if p.pretrain.method == "mocov2" and p.pretrain.mocov2.queue_size < 2 * p.pretrain.batch_size:
        raise ConfigError(f"{source}: 'pretrain.mocov2.queue_size' must be at least 2 x 'pretrain.batch_size' "
                          "(each step enqueues the keys of both views)")
    if p.train_ccam.input_size > p.train_ccam.resize:
        raise ConfigError(f"{source}: 'train_ccam.input_size' must not exceed 'train_ccam.resize'")
    g = p.pseudo.grabcut
    if not g.bg_threshold <= g.pfg_threshold <= g.fg_threshold:
        raise ConfigError(
            f"{source}: 'pseudo.grabcut' thresholds must satisfy bg_threshold <= pfg_threshold <= fg_threshold"
        )
    if p.pseudo.bg_threshold > p.pseudo.fg_threshold:
        raise ConfigError(f"{source}: 'pseudo.bg_threshold' must not exceed 'pseudo.fg_threshold'")
    m = p.make_cams
    if m.ensemble_weights and len(m.ensemble_weights) != len(m.ensemble_members):
        raise ConfigError(
            f"{source}: 'make_cams.ensemble_weights' needs one weight per entry of 'make_cams.ensemble_members'"
        )
    if any(s <= 0 for s in m.scales) or not m.scales:
        raise ConfigError(f"{source}: 'make_cams.scales' must be a non-empty list of positive numbers")
    if m.ensemble_weights and (any(w < 0 for w in m.ensemble_weights) or not any(w > 0 for w in m.ensemble_weights)):
        raise ConfigError(f"{source}: 'make_cams.ensemble_weights' must be non-negative and not all zero")
    cp = p.train_unet.copy_paste
    if cp.scale_min > cp.scale_max:
        raise ConfigError(f"{source}: 'train_unet.copy_paste.scale_min' must not exceed 'scale_max'")
    thresholds = p.train_unet.decision.thresholds
    if not thresholds or any(not 0.0 < t < 1.0 for t in thresholds):
        raise ConfigError(f"{source}: 'train_unet.decision.thresholds' must be a non-empty list of numbers "
                          "strictly between 0 and 1")
    filters = p.train_unet.plain_filters
    if len(filters) < 2 or any(f < 1 for f in filters):
        raise ConfigError(f"{source}: 'train_unet.plain_filters' must list at least 2 positive channel counts")
    names: list[tuple[str, str, Callable[[str], object]]] = [
        ("pretrain.name", p.pretrain.name, safe_name),
        ("train_classifier.weights", p.train_classifier.weights, WeightSpec.parse),
        ("train_unet.encoder_weights", p.train_unet.encoder_weights, WeightSpec.parse),
        ("train_ccam.ecs_classifier", p.train_ccam.ecs_classifier, ClassifierId.from_variant),
        *((f"make_cams.ensemble_members[{i}]", v, MapVariant.parse) for i, v in enumerate(m.ensemble_members)),
    ]
    for key, value, parse in names:
        try:
            parse(value)
        except ConfigError as exc:
            raise ConfigError(f"{source}: '{key}': {exc}") from None
    for r in p.tune.refiners:
        if r not in REFINERS:
            raise ConfigError(f"{source}: 'tune.refiners' entry {r!r}; valid: {', '.join(REFINERS)}")
    if p.tune.storage and not _STORAGE_URL.match(p.tune.storage):
        raise ConfigError(f"{source}: 'tune.storage' must be empty (SQLite under studies/) or a database URL "
                          "such as postgresql+psycopg://user@host/db or sqlite:////abs/path.db")


def params_from_dict(data: dict[str, Any] | None, source: str = "<dict>") -> Params:
    """Build :class:`Params` from a mapping, strictly."""
    params = _build(Params, data or {}, source)
    _validate_cross_fields(params, source)
    return params


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden by design
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in first_line:
                    raise ConfigError(f"duplicate key '{key}' on line {line} (first given on line {first_line[key]})")
                first_line[key] = line
            except TypeError:  # an unhashable key: the base class reports it
                break
        return super().construct_mapping(node, deep=deep)


def _yaml_reason(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: the problem and where (line, column)."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if not problem:
        return " ".join(str(exc).split())
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def load_params(path: str | Path = "params.yaml") -> Params:
    """Load and validate ``params.yaml``.

    A missing file, text that is not UTF-8, invalid YAML or a key given twice is a :class:`ConfigError`; an
    empty file (or a missing section) yields the defaults, and an empty file says so on the console.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: file not found (run from the project root or pass --params)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                          "save it as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_reason(exc)}") from None
    if data is None:
        from wsss.ui import console

        console.print(f"note: {path} is empty: every parameter takes its default value", highlight=False, markup=False,
                      soft_wrap=True)
    elif not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return params_from_dict(data, str(path))


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a (nested) dataclass into dotted keys, e.g. ``pseudo.crf.iterations`` (for MLflow)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, key + "."))
        elif isinstance(value, tuple):
            out[key] = ",".join(str(v) for v in value)
        else:
            out[key] = value
    return out


def to_dict(obj: Any) -> dict[str, Any]:
    """A plain nested dict (tuples as lists) suitable for YAML/JSON."""

    def conv(v: Any) -> Any:
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(dataclasses.asdict(obj))
