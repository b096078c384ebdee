"""Typed names (wsss.variants): every name the stages write round-trips; anything else is refused before a path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from wsss.errors import ConfigError
from wsss.paths import Paths
from wsss.stages import make_cams, pretrain, train_ccam, train_classifier
from wsss.variants import (
    IMAGENET,
    CcamId,
    CcamInit,
    ClassifierId,
    MapVariant,
    MaskSource,
    PretrainId,
    UnetId,
    WeightSpec,
    parse_model,
    safe_name,
)

MODELS = ["classifier-species", "classifier-breed", "classifier-species-bg", "classifier-breed-bg",
          "ccam-none", "ccam-imagenet", "ccam-cls-species", "ccam-cls-breed-bg", "ccam-cls-species-ecs",
          "ccam-none-perbreed", "ccam-imagenet-perbreed", "ccam-pre-default", "ccam-pre-my_net.v2-ecs-perbreed",
          "unet-gt", "unet-best", "unet-ccam_ccam-none-perbreed", "unet-ensemble", "unet-same-best",
          "unet-same-ccam_ccam-none", "unet-same-ensemble", "pretrain-default",
          "pretrain-mocov2", "imagenet"]
VARIANTS = ["cam_classifier-species", "ecs_classifier-breed-bg", "ccam_ccam-none", "ccam_ccam-cls-breed",
            "ccam-ecs_ccam-cls-species-ecs", "ccam_ccam-none-perbreed", "cam_imagenet", "ensemble"]
# Strings that must never reach the file system as a name.
HOSTILE = ["", ".", "..", "../cams/cam_classifier-species", "cam_classifier-species/../x", "/etc", "/abs/x",
           "cam_classifier-species/", "cam_classifier-species\\x", "cam_..", "ccam_ccam-pre-..",
           "ccam_ccam-pre-.hidden", "cam_classifier-species\n", "cam classifier", "~", "cam_classifier-cat"]
UNSAFE_NAMES = ["", ".", "..", ".hidden", "a..b", "a/b", "/abs", "a\\b", "a b", "a\n", "~", "x" * 65, "ü"]


@pytest.mark.parametrize("text", MODELS)
def test_model_ids_round_trip(text: str) -> None:
    assert str(parse_model(text)) == text


@pytest.mark.parametrize("text", VARIANTS)
def test_map_variants_round_trip(text: str) -> None:
    assert str(MapVariant.parse(text)) == text


@pytest.mark.parametrize("text", ["imagenet", "none", "pretrain:default", "weights/mine.pth", "/abs/b.PT"])
def test_weight_specs_round_trip(text: str) -> None:
    assert str(WeightSpec.parse(text)) == text


@pytest.mark.parametrize("text", ["none", "imagenet", "classifier:species", "classifier:breed-bg", "pretrain:x"])
def test_ccam_init_round_trips(text: str) -> None:
    init = CcamInit.parse(text)
    assert str(init) == text
    assert CcamInit.from_tag(init.tag) == init


def test_stage_names_are_unchanged() -> None:
    """The strings the stages have always written (outputs and DVC paths depend on them)."""
    assert train_classifier.model_name("species", False) == "classifier-species"
    assert train_classifier.model_name("breed", True) == "classifier-breed-bg"
    assert train_ccam.model_name("none") == "ccam-none"
    assert train_ccam.model_name("imagenet", per_breed=True) == "ccam-imagenet-perbreed"
    assert train_ccam.model_name("classifier:species", ecs=True) == "ccam-cls-species-ecs"
    assert train_ccam.model_name("pretrain:tiny") == "ccam-pre-tiny"
    assert pretrain.model_name("default") == "pretrain-default"
    assert make_cams.variant_name("cam", "classifier-species") == "cam_classifier-species"
    assert make_cams.variant_name("ccam-ecs", "ccam-cls-species-ecs") == "ccam-ecs_ccam-cls-species-ecs"
    assert make_cams.variant_name("ensemble", None) == "ensemble"


def test_parsed_parts() -> None:
    ccam = CcamId.parse("ccam-cls-breed-bg-ecs-perbreed")
    assert ccam.init.classifier == ClassifierId("breed", True) and ccam.ecs and ccam.per_breed
    assert str(ccam.parent) == "ccam-cls-breed-bg-ecs"
    variant = MapVariant.parse("ccam_ccam-none-perbreed")
    assert variant.method == "ccam" and variant.model == CcamId(CcamInit("none"), per_breed=True)
    assert MapVariant.parse("cam_imagenet").model == IMAGENET
    assert UnetId.parse("unet-ensemble").source == MaskSource("pseudo", MapVariant("ensemble"))
    assert WeightSpec.parse("pretrain:tiny").pretrain_id == PretrainId("tiny")
    assert WeightSpec.parse("imagenet").pretrain_id is None


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_names_are_refused(text: str) -> None:
    for parse in (MapVariant.parse, parse_model, MaskSource.parse):
        with pytest.raises(ConfigError):
            parse(text)


@pytest.mark.parametrize("text", UNSAFE_NAMES)
def test_unsafe_names_are_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        safe_name(text)
    with pytest.raises(ConfigError):
        Paths(Path("/project")).state_dir("make-cams", text)
    with pytest.raises(ConfigError):
        PretrainId(text)


@pytest.mark.parametrize("text", HOSTILE)
def test_paths_refuse_what_does_not_parse(text: str) -> None:
    paths = Paths(Path("/project"))
    for build in (paths.cams_dir, paths.masks_dir, paths.crf_params, paths.study_dir, paths.pseudo_report,
                  paths.cams_report, paths.cams_curve, paths.eval_pseudo_report, paths.model_dir,
                  paths.training_report, paths.eval_report):
        with pytest.raises(ConfigError):
            build(text)


def test_paths_take_typed_names_and_refuse_other_types() -> None:
    paths = Paths(Path("/project"))
    variant = MapVariant.parse("cam_classifier-species")
    assert paths.cams_dir(variant) == paths.cams_dir("cam_classifier-species") == Path(
        "/project/cams/cam_classifier-species")
    assert paths.model_dir(ClassifierId("species")) == Path("/project/models/classifier-species")
    assert paths.eval_report(UnetId.parse("unet-gt")) == paths.eval_report("gt") == Path("/project/reports/eval/gt.json")
    assert paths.eval_report("baselines").name == "baselines.json"
    with pytest.raises(TypeError):
        paths.cams_dir(ClassifierId("species"))  # type: ignore[arg-type] - a model is not a map variant
    with pytest.raises(TypeError):
        paths.model_dir(Path("classifier-species"))  # type: ignore[arg-type]


@pytest.mark.parametrize(("parse", "text", "fragment"), [
    (MapVariant.parse, "cam_unet-gt", "map variant 'cam_unet-gt'"),
    (parse_model, "ccam-cls-cat", "ccam-<none|imagenet|cls-<labels>[-bg]|pre-<name>>"),
    (CcamInit.parse, "classifier:cat", "CCAM init 'classifier:cat'"),
    (CcamInit.parse, "classifier", "classifier:<species|breed>[-bg]"),
    (WeightSpec.parse, "imagenet21k", "pretrain:<name>"),
    (WeightSpec.parse, "pretrain:../x", "'../x'"),
    (MaskSource.parse, "../masks/x", "gt, best or a map variant"),
])
def test_errors_name_the_value_and_the_valid_forms(parse, text: str, fragment: str) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match=None) as info:
        parse(text)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_ambiguous_ccam_init_is_refused() -> None:
    """``ccam-pre-x-ecs`` would read back as backbone x with ECS: a backbone named x-ecs cannot start a CCAM."""
    with pytest.raises(ConfigError, match="ambiguous"):
        CcamInit.parse("pretrain:x-ecs")
    assert str(PretrainId("x-ecs")) == "pretrain-x-ecs"  # the backbone itself is a fine name


def test_module_imports_no_torch() -> None:
    code = "import sys, wsss.variants, wsss.paths; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
