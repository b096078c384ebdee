"""The strict params loader: unknown keys, wrong types and out-of-range values are errors naming key and file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from wsss.config import Params, flatten, load_params, params_from_dict, to_dict
from wsss.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_repository_params_yaml_loads() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.base.dataset == "synthetic"
    paper = load_params(REPO / "pipelines" / "paper-tables" / "params.yaml")  # names checked through the types
    assert paper.train_ccam.ecs_classifier == "breed" and len(paper.make_cams.ensemble_members) == 5


def test_defaults_when_sections_missing(tmp_path: Path) -> None:
    assert load_params(_write(tmp_path, {})) == Params()


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"prepare": {"max_sidee": 10}}, "unknown key 'prepare.max_sidee'"),
        ({"nonsense": {}}, "unknown key 'nonsense'"),
        ({"prepare": {"max_side": "big"}}, "'prepare.max_side' must be an integer"),
        ({"prepare": {"max_side": 1.5}}, "'prepare.max_side' must be an integer"),
        ({"validate": {"check_files": "yes"}}, "'validate.check_files' must be true or false"),
        ({"make_cams": {"threshold": 1.5}}, "'make_cams.threshold' = 1.5 is outside its range [0.0, 1.0]"),
        ({"pseudo": {"crf": {"iterations": 0}}}, "'pseudo.crf.iterations' = 0 is outside its range"),
        ({"pseudo": {"crf": {"bogus": 1}}}, "unknown key 'pseudo.crf.bogus'"),
        ({"pseudo": {"refiner": "magic"}}, "'pseudo.refiner' must be one of"),
        ({"base": {"dataset": "voc"}}, "'base.dataset' must be one of"),
        ({"make_cams": {"scales": 1.0}}, "'make_cams.scales' must be a list"),
        ({"train_classifier": {"arch": "vgg16"}}, "'train_classifier.arch'"),
        ({"train_classifier": {"weights": "imagenet21k"}}, "'train_classifier.weights'"),
        ({"make_cams": {"ensemble_members": ["cam"], "ensemble_weights": [1, 2]}}, "one weight per entry"),
        ({"pseudo": {"grabcut": {"bg_threshold": 0.9}}}, "bg_threshold <= pfg_threshold"),
        ({"prepare": None}, "'prepare' must be a mapping"),
        ({"make_cams": {"ensemble_members": ["cam_classifier-species", "../cams/x"]}},
         "'make_cams.ensemble_members[1]': map variant '../cams/x'"),
        ({"pretrain": {"name": "a..b"}}, "'pretrain.name'"),
        ({"train_ccam": {"ecs_classifier": "../species"}}, "'train_ccam.ecs_classifier'"),
        ({"train_unet": {"encoder_weights": "pretrain:../x"}}, "'train_unet.encoder_weights'"),
        ({"tune": {"refiners": ["crf", "magic"]}}, "'tune.refiners' entry 'magic'"),
        ({"prepare": {"val_fraction": True}}, "'prepare.val_fraction' must be a number"),
        ({"make_cams": {"threshold": float("nan")}}, "'make_cams.threshold' must be a finite number"),
        ({"base": {"background_root": 3}}, "'base.background_root' must be str or NoneType"),
    ],
)
def test_invalid_params_name_key_and_file(tmp_path: Path, data: dict, fragment: str) -> None:
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert fragment in str(err.value)
    assert str(path) in str(err.value)


def test_empty_file_yields_the_defaults(tmp_path: Path) -> None:
    empty = tmp_path / "params.yaml"
    empty.write_text("")
    assert load_params(empty) == Params()


@pytest.mark.parametrize("text", ["", "# nothing set yet\n"])
def test_an_empty_file_says_once_that_every_value_is_a_default(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                text: str) -> None:
    empty = tmp_path / "params.yaml"
    empty.write_text(text)
    load_params(empty)
    notes = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(notes) == 1 and str(empty) in notes[0] and "empty" in notes[0] and "default" in notes[0], notes


def test_a_file_with_settings_prints_no_notice(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("base:\n  seed: 3\n")
    assert load_params(path).base.seed == 3
    assert capsys.readouterr().err == ""


def test_a_params_file_that_is_not_utf8_names_the_file_and_the_byte(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    data = b"base:\n  experiment: caf\xe9\n"  # Latin-1
    path.write_bytes(data)
    with pytest.raises(ConfigError) as err:
        load_params(path)
    message = str(err.value)
    assert str(path) in message and "UTF-8" in message and "0xe9" in message
    assert f"offset {data.index(0xE9)}" in message
    assert "\n" not in message


def test_a_non_utf8_params_file_exits_2_without_a_traceback(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from wsss.cli import app

    path = tmp_path / "params.yaml"
    data = b"base:\n  seed: \xff\n"
    path.write_bytes(data)
    result = CliRunner().invoke(app, ["runs", "--params", str(path)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "UnicodeDecodeError" not in result.output
    assert f"offset {data.index(0xFF)}" in result.output and "not UTF-8" in result.output


@pytest.mark.parametrize(("text", "key", "line", "first"), [
    ("base:\n  seed: 1\n  seed: 2\n", "seed", 3, 2),
    ("base:\n  seed: 1\nprepare:\n  min_side: 8\nbase:\n  seed: 2\n", "base", 5, 1),
    ("pseudo:\n  crf:\n    iterations: 3\n    scale: 1.0\n    iterations: 4\n", "iterations", 5, 3),
])
def test_a_duplicate_key_names_the_key_and_the_line(tmp_path: Path, text: str, key: str, line: int,
                                                     first: int) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_params(path)
    message = str(err.value)
    assert str(path) in message and f"duplicate key '{key}'" in message
    assert f"line {line}" in message and f"line {first}" in message and "\n" not in message


def test_yaml_merge_keys_may_still_be_overridden(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("base: &b\n  seed: 1\nsynthetic:\n  <<: {seed: 4, n_test: 6}\n  seed: 5\n")
    params = load_params(path)
    assert params.synthetic.seed == 5 and params.synthetic.n_test == 6


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_params(top)


def test_values_are_converted() -> None:
    p = params_from_dict({"make_cams": {"scales": [1, 2]}, "pseudo": {"crf": {"scale": 2}}})
    assert p.make_cams.scales == (1.0, 2.0)
    assert isinstance(p.pseudo.crf.scale, float)


def test_flatten_dotted_keys_and_round_trip() -> None:
    p = params_from_dict({"pseudo": {"crf": {"iterations": 7}}})
    flat = flatten(p)
    assert flat["pseudo.crf.iterations"] == 7
    assert flat["make_cams.scales"] == "0.5,1.0,1.5,2.0"
    assert all(isinstance(v, (int, float, str, bool, type(None))) for v in flat.values())
    assert params_from_dict(to_dict(p)) == p
