"""Safe loading and bounds: no pickles, model metadata checked before use, params range-checked.

A model folder whose ``meta.json`` does not describe its ``model.pt`` (another architecture, another
label space, keys missing), or a model used where another architecture is configured, must stop the
command with one clear line naming the folder, never a shape-mismatch traceback.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import write_params
from tests.test_pipeline import TINY_MODELS
from wsss.cli import app
from wsss.config import load_params
from wsss.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_every_torch_load_is_weights_only_and_every_np_load_refuses_pickles() -> None:
    calls = []
    for path in sorted((REPO / "wsss").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"\b(torch\.load|np\.load)\(", text):
            depth, i = 1, m.end()
            while depth and i < len(text):  # the call's full argument list, across lines
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            calls.append((path.relative_to(REPO).as_posix(), m.group(1), text[m.end(): i - 1]))
    assert calls, "no torch.load / np.load found: the scan is broken"
    for where, fn, args in calls:
        if fn == "torch.load":
            assert "weights_only=True" in args, f"{where}: torch.load({args}) without weights_only=True"
        else:
            assert "allow_pickle=False" in args, f"{where}: np.load({args}) without allow_pickle=False"


def test_torch_load_refuses_a_pickled_object(tmp_path: Path) -> None:
    """A checkpoint file carrying arbitrary pickled objects is ignored, never executed."""
    import torch

    from wsss.training.checkpoint import CheckpointManager

    class Evil:
        def __reduce__(self) -> tuple:
            return (print, ("pwned",))

    ckpt = CheckpointManager(tmp_path, "fp")
    torch.save({"format": 1, "fingerprint": "fp", "state": {"x": Evil()}}, ckpt.path)
    assert ckpt.load() is None and "unreadable" in (ckpt.reason or "")


# --------------------------------------------------------------------------------------------------
# model metadata vs weights


@pytest.fixture(scope="module")
def prepared_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("safe") / "base"
    root.mkdir()
    write_params(root, TINY_MODELS)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root.as_posix()}/mlruns/mlflow.db")
        for command in (["generate-synthetic"], ["prepare"]):
            result = runner.invoke(app, command)
            assert result.exit_code == 0, result.output
    return root


@pytest.fixture
def proj(prepared_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "p"
    shutil.copytree(prepared_base, root, ignore=shutil.ignore_patterns("mlruns"))
    (root / "mlruns").mkdir()
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root.as_posix()}/mlruns/mlflow.db")
    return root


def _save_classifier(root: Path, name: str = "classifier-species", arch: str = "resnet18", k: int = 2,
                     **meta: object) -> Path:
    from wsss.models.classifier import Classifier
    from wsss.training.checkpoint import save_model

    full = {"kind": "classifier", "arch": arch, "num_classes": k, "labels": "species", "bg": False,
            "classes": ["cat", "dog"], "input_size": 32, "weights": "none", "best_epoch": 0, **meta}
    save_model(root / "models" / name, Classifier(arch, k, weights="none"), full)
    return root / "models" / name


def _save_unet(root: Path, filters: tuple[int, ...] = (4, 8, 16, 32)) -> Path:
    from wsss.config import UnetConfig
    from wsss.models.unet import build_unet
    from wsss.training.checkpoint import save_model

    cfg = UnetConfig(architecture="plain", plain_filters=filters, input_size=32)
    meta = {"kind": "unet", "architecture": "plain", "encoder": "resnet34", "input_size": 32, "masks": "gt",
            "num_classes": 2, "plain_filters": list(filters)}
    save_model(root / "models" / "unet-gt", build_unet(cfg), meta)
    return root / "models" / "unet-gt"


def _edit_meta(model_dir: Path, **changes: object) -> None:
    path = model_dir / "meta.json"
    meta = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    path.write_text(json.dumps(meta))


def _one_clear_error(args: list[str], *words: str) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code in (1, 2), f"{result.output}\n{result.exception!r}"
    assert "Traceback" not in result.output and result.exception is None or isinstance(
        result.exception, SystemExit), f"{result.output}\n{result.exception!r}"
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output
    text = " ".join(result.output.split())  # rich may wrap the line
    for w in words:
        assert w in text, f"{w!r} not in {text!r}"
    return text


MAKE_CAMS = ["make-cams", "--method", "cam", "--model", "classifier-species"]


@pytest.mark.parametrize(("change", "words"), [
    ({"arch": "resnet50"}, ("classifier-species", "does not fit", "resnet50")),
    ({"num_classes": 38, "labels": "breed", "bg": True}, ("classifier-species", "does not fit")),
    ({"labels": "breed"}, ("classifier-species", "label", "breed", "2")),
    ({"arch": None}, ("classifier-species", "meta.json", "arch")),
    ({"arch": "vgg16"}, ("classifier-species", "vgg16")),
])
def test_make_cams_with_a_classifier_whose_meta_lies(proj: Path, change: dict, words: tuple[str, ...]) -> None:
    _edit_meta(_save_classifier(proj), **change)
    previous = proj / "cams" / "cam_classifier-species"  # maps of an earlier configuration
    previous.mkdir(parents=True)
    (previous / "_fingerprint.json").write_text('{"fingerprint": "earlier"}')
    (previous / "shard-00000.npz").write_bytes(b"earlier maps")
    _one_clear_error(MAKE_CAMS, *words)
    # Checked before the output folder is touched: the earlier maps are still there.
    assert (previous / "shard-00000.npz").read_bytes() == b"earlier maps"


def test_make_cams_with_the_wrong_kind_of_model(proj: Path) -> None:
    _save_classifier(proj)
    _one_clear_error(["make-cams", "--method", "ccam", "--model", "classifier-species"], "ccam", "classifier")


def test_ccam_init_from_a_classifier_of_another_arch(proj: Path) -> None:
    _save_classifier(proj, arch="resnet34")
    _one_clear_error(["train-ccam", "--init", "classifier:species"], "resnet18", "resnet34")


def test_per_breed_fine_tuning_of_a_ccam_of_another_arch(proj: Path) -> None:
    """ccam-none trained as resnet34, params now say resnet18: the fine-tuned meta would lie."""
    from wsss.models.ccam import CCAM
    from wsss.training.checkpoint import save_model

    save_model(proj / "models" / "ccam-none", CCAM("resnet34", weights="none"),
               {"kind": "ccam", "arch": "resnet34", "init": "none", "ecs": False, "per_breed": False,
                "polarity": 1.0, "input_size": 64, "epochs": 1})
    _one_clear_error(["train-ccam", "--init", "none", "--per-breed"], "ccam-none", "resnet34", "resnet18")
    assert not (proj / "models" / "ccam-none-perbreed").exists()


@pytest.mark.parametrize(("change", "words"), [
    ({"plain_filters": [8, 16, 32, 64]}, ("unet-gt", "does not fit")),
    ({"architecture": "smp"}, ("unet-gt", "does not fit")),
    ({"architecture": None}, ("unet-gt", "meta.json", "architecture")),
    ({"num_classes": 3}, ("unet-gt", "does not fit")),
    ({"decision": {"threshold": 5, "flip_tta": True}}, ("unet-gt", "meta.json", "decision threshold 5")),
    ({"decision": {"threshold": 0.5, "flip_tta": "no"}}, ("unet-gt", "meta.json", "flip_tta 'no'")),
    ({"decision": [0.5]}, ("unet-gt", "meta.json", "not a mapping")),
])
def test_evaluate_with_a_unet_whose_meta_lies(proj: Path, change: dict, words: tuple[str, ...]) -> None:
    _edit_meta(_save_unet(proj), **change)
    _one_clear_error(["evaluate", "--model", "unet-gt"], *words)


def test_predict_with_a_unet_whose_meta_lies(proj: Path, tmp_path: Path) -> None:
    _edit_meta(_save_unet(proj), plain_filters=[8, 16, 32, 64])
    image = next((proj / "data" / "prepared" / "images").glob("*.jpg"))
    _one_clear_error(["predict", str(image), "--model", "models/unet-gt", "--out", str(tmp_path / "o")],
                     "unet-gt", "does not fit")


def test_intact_models_still_load(proj: Path) -> None:
    from wsss.models.loading import ModelMeta, load_model, load_model_dir
    from wsss.paths import Paths

    _save_classifier(proj)
    model, meta = load_model(Paths(proj), "classifier-species")
    assert isinstance(meta, ModelMeta) and meta.kind == "classifier" and meta.arch == "resnet18"
    assert meta.labels == "species" and meta.num_classes == 2 and not meta.bg
    net, meta = load_model_dir(_save_unet(proj), "unet")
    assert meta.kind == "unet" and meta.arch is None and meta.num_classes == 2
    assert meta.raw["architecture"] == "plain"  # every key of meta.json stays readable


# --------------------------------------------------------------------------------------------------
# params bounds: gaps found by this harness


@pytest.mark.parametrize(("data", "fragment"), [
    ({"train_classifier": {"lr_backbone": float("nan")}}, "'train_classifier.lr_backbone' must be a finite number"),
    ({"pseudo": {"crf": {"gaussian_sxy": float("inf")}}}, "'pseudo.crf.gaussian_sxy' must be a finite number"),
    ({"tune": {"timeout_s": float("nan")}}, "'tune.timeout_s' must be a finite number"),
    ({"make_cams": {"scales": [1.0, float("inf")]}}, "'make_cams.scales[1]' must be a finite number"),
    ({"train_unet": {"plain_filters": [4, 0, 16]}}, "'train_unet.plain_filters'"),
    ({"train_unet": {"plain_filters": [8]}}, "'train_unet.plain_filters'"),
    ({"make_cams": {"ensemble_members": ["a", "b"], "ensemble_weights": [1.0, -1.0]}}, "'make_cams.ensemble_weights'"),
    ({"make_cams": {"ensemble_members": ["a", "b"], "ensemble_weights": [0.0, 0.0]}}, "'make_cams.ensemble_weights'"),
])
def test_param_gaps_are_errors(tmp_path: Path, data: dict, fragment: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert fragment in str(err.value) and str(path) in str(err.value)


def test_bad_param_on_the_command_line_is_one_line(proj: Path) -> None:
    (proj / "params.yaml").write_text(yaml.safe_dump({"train_classifier": {"lr_head": float("nan")}}))
    _one_clear_error(["train-classifier"], "train_classifier.lr_head", "finite")


class _Evil:
    def __reduce__(self) -> tuple:
        return (print, ("pwned",))


def test_a_refused_pickle_is_explained_in_our_words_never_by_suggesting_weights_only_false(tmp_path: Path) -> None:
    """PyTorch's refusal advises ``weights_only=False`` (which would run the file's code); ours must not."""
    import torch

    from wsss.errors import DataError
    from wsss.models.backbone import read_state_dict
    from wsss.training.checkpoint import CheckpointManager, load_model_state

    weights = tmp_path / "backbone.pt"
    torch.save({"conv1.weight": _Evil()}, weights)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    torch.save({"x": _Evil()}, model_dir / "model.pt")
    (model_dir / "meta.json").write_text("{}")
    ckpt = CheckpointManager(tmp_path / "state", "fp")
    ckpt.path.parent.mkdir()
    torch.save({"format": 1, "fingerprint": "fp", "state": {"x": _Evil()}}, ckpt.path)

    messages = []
    for load in (lambda: read_state_dict(weights), lambda: load_model_state(model_dir)):
        with pytest.raises(DataError) as err:
            load()
        messages.append(str(err.value))
    assert ckpt.load() is None
    messages.append(ckpt.reason or "")
    for message in messages:
        assert "weights_only" not in message and "False" not in message and "trusted source" not in message, message
        assert "refused" in message and "Python object print" in message and "\n" not in message, message


# --------------------------------------------------------------------------------------------------
# MLflow models (issue 17, defect 2): loaded without unpickling, checksums verified first


class _Planter:
    """Unpickling this creates ``marker``: the proof that a loader ran a pickle's code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def _tiny_plain_unet():  # noqa: ANN202
    import torch

    from wsss.config import UnetConfig
    from wsss.models.unet import build_unet

    torch.manual_seed(0)
    return build_unet(UnetConfig(architecture="plain", plain_filters=(4, 8, 16, 32), input_size=32)).eval()


@pytest.fixture(scope="module")
def mlflow_unet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A U-Net MLflow model folder in the current (safetensors) format."""
    from wsss.serving.export import save_unet

    return save_unet(tmp_path_factory.mktemp("mlflow-unet") / "model", _tiny_plain_unet(), 32, masks="gt")


@pytest.fixture
def model_copy(mlflow_unet: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(mlflow_unet, dest)
    return dest


@pytest.fixture
def image(tmp_path: Path) -> Path:
    import numpy as np
    from PIL import Image

    path = tmp_path / "pet.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (29, 47, 3), dtype=np.uint8)).save(path)
    return path


def _old_pickle_model(dest: Path, marker: Path) -> Path:
    """An MLflow model as train-unet logged it before (mlflow.pytorch, pickle format), its pickle malicious."""
    import mlflow.pytorch
    import torch

    mlflow.pytorch.save_model(_tiny_plain_unet(), str(dest), serialization_format="pickle", pip_requirements=["torch"])
    pickled = dest / "data" / "model.pth"
    assert pickled.is_file(), sorted(p.name for p in (dest / "data").iterdir())
    torch.save(_Planter(marker), pickled)
    return dest


def test_predict_never_unpickles_an_mlflow_model(project: Path, image: Path) -> None:
    """Defect 2: a model folder whose data/model.pth is a malicious pickle ran it before the load failed."""
    marker = project / "pwned"
    model = _old_pickle_model(project / "evil-model", marker)
    result = runner.invoke(app, ["predict", str(image), "--model", str(model), "--out", "out", "--device", "cpu"])
    assert not marker.exists(), "the pickle was unpickled"
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output
    text = " ".join(result.output.split())
    assert "old pickle format" in text and "retrain" in text and "re-register" in text and "evil-model" in text
    assert not (project / "out").exists()


def test_the_registry_check_never_unpickles_either(tmp_path: Path) -> None:
    from wsss.reporting.registry import _state_matches

    marker = tmp_path / "pwned"
    model = _old_pickle_model(tmp_path / "evil-model", marker)
    assert _state_matches(str(model), "0" * 64) is False
    assert _state_matches(str(model), None) is False  # no checksum to compare: still never loaded
    assert not marker.exists()


def _predict(model: Path, image: Path, out: Path):  # noqa: ANN202
    return runner.invoke(app, ["predict", str(image), "--model", str(model), "--out", str(out), "--device", "cpu"])


def test_an_intact_mlflow_model_predicts_without_any_unpickling_loader(
        model_copy: Path, image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow.pyfunc
    import mlflow.pytorch
    import numpy as np
    import torch
    from PIL import Image

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("an unpickling loader was called")

    for owner, name in ((mlflow.pytorch, "load_model"), (mlflow.pyfunc, "load_model"), (torch, "load")):
        monkeypatch.setattr(owner, name, refuse)
    result = _predict(model_copy, image, tmp_path / "out")
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    text = " ".join(result.output.split())  # the console wraps lines at its width, anywhere in the header
    assert "input 32px" in text and "masks gt" in text
    with Image.open(tmp_path / "out" / "pet_mask.png") as m:
        assert m.size == (47, 29) and set(np.unique(np.asarray(m))) <= {0, 1}

    from wsss.reporting.registry import _state_matches
    from wsss.training.checkpoint import state_sha256

    sha = state_sha256(_tiny_plain_unet().state_dict())
    assert _state_matches(str(model_copy), sha) and not _state_matches(str(model_copy), "f" * 64)


def _meta(model: Path) -> dict:
    return json.loads((model / "artifacts" / "wsss_unet.json").read_text())


def _write_meta(model: Path, meta: dict) -> None:
    (model / "artifacts" / "wsss_unet.json").write_text(json.dumps(meta))


def test_a_tampered_weights_file_is_refused_before_it_is_read(
        model_copy: Path, image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    weights = model_copy / "artifacts" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one weight changed; the file still parses
    weights.write_bytes(bytes(data))
    parsed = []
    monkeypatch.setattr(safetensors.torch, "load", lambda *a, **k: parsed.append(1))
    result = _predict(model_copy, image, tmp_path / "out")
    assert result.exit_code != 0 and "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert "weights.safetensors" in text and "SHA-256 differs" in text and "refused before reading" in text, text
    assert not parsed, "the weights were parsed before their checksum was checked"
    assert not (tmp_path / "out").exists()


def test_weights_and_checksum_replaced_together_fail_the_state_check(model_copy: Path, image: Path,
                                                                     tmp_path: Path) -> None:
    import hashlib

    import safetensors.torch
    import torch

    weights = model_copy / "artifacts" / "weights.safetensors"
    state = safetensors.torch.load(weights.read_bytes())
    state = {k: (v + 1 if v.is_floating_point() else v) for k, v in state.items()}
    data = safetensors.torch.save(state)
    weights.write_bytes(data)
    meta = _meta(model_copy)
    meta["weights"]["sha256"] = hashlib.sha256(data).hexdigest()
    _write_meta(model_copy, meta)
    text = _one_clear_error(["predict", str(image), "--model", str(model_copy), "--out", str(tmp_path / "o")],
                            "weights.safetensors", "state SHA-256 differs")
    assert "retrain" in text
    assert torch.is_tensor(next(iter(state.values())))


@pytest.mark.parametrize(("edit", "words"), [
    (lambda m: m["weights"].update(file="../../MLmodel"), ("wsss_unet.json", "weights file name")),
    (lambda m: m.update(format_version=99), ("format version 99", "upgrade wsss")),
    (lambda m: m.update(plain_filters=[8, 16, 32, 64]), ("weights.safetensors", "does not fit")),
    (lambda m: m.update(architecture="deeplab"), ("wsss_unet.json", "architecture 'deeplab'")),
    (lambda m: m["preprocessing"].update(mean=[0.5, 0.5, 0.5]), ("ImageNet mean/std",)),
    (lambda m: m.update(threshold=1.5), ("wsss_unet.json", "threshold 1.5")),
    (lambda m: m.update(flip_tta="yes"), ("wsss_unet.json", "flip_tta 'yes'")),
])
def test_metadata_that_lies_is_one_clear_error(model_copy: Path, image: Path, tmp_path: Path, edit,  # noqa: ANN001
                                               words: tuple[str, ...]) -> None:
    meta = _meta(model_copy)
    edit(meta)
    _write_meta(model_copy, meta)
    _one_clear_error(["predict", str(image), "--model", str(model_copy), "--out", str(tmp_path / "o")], *words)


def test_an_mlflow_model_of_another_kind_is_refused(model_copy: Path, image: Path, tmp_path: Path) -> None:
    mlmodel = model_copy / "MLmodel"
    conf = yaml.safe_load(mlmodel.read_text())
    conf.pop("metadata")
    mlmodel.write_text(yaml.safe_dump(conf))
    _one_clear_error(["predict", str(image), "--model", str(model_copy), "--out", str(tmp_path / "o")],
                     "not a wsss U-Net MLflow model", "wsss_format")


def test_a_version_1_model_still_loads_and_decides_without_flip(model_copy: Path, image: Path,
                                                                 tmp_path: Path) -> None:
    """Models registered before the decision rule was recorded (format 1: no ``flip_tta``) keep working;
    a format newer than this wsss is refused."""
    mlmodel = model_copy / "MLmodel"
    conf = yaml.safe_load(mlmodel.read_text())
    conf["metadata"]["wsss_format"] = "wsss-unet/1"
    mlmodel.write_text(yaml.safe_dump(conf))
    meta = _meta(model_copy)
    meta["format_version"] = 1
    meta.pop("flip_tta")
    _write_meta(model_copy, meta)
    result = runner.invoke(app, ["predict", str(image), "--model", str(model_copy), "--out", str(tmp_path / "o"),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "threshold 0.5," in result.output and "flip TTA" not in result.output
    conf["metadata"]["wsss_format"] = "wsss-unet/3"
    mlmodel.write_text(yaml.safe_dump(conf))
    _one_clear_error(["predict", str(image), "--model", str(model_copy), "--out", str(tmp_path / "o2")],
                     "model format 'wsss-unet/3'", "upgrade wsss")
