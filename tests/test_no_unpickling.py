"""Invariant: no command unpickles a file it did not write in the same process.

Two checks that try to break it:

* **static**: an AST scan of every module under ``wsss/`` for the calls that unpickle (``pickle``/``dill``/
  ``cloudpickle``/``joblib``/``shelve``/``marshal`` loaders, ``pandas.read_pickle``, every MLflow flavour's
  ``load_model``, ``torch.jit.load``), ``torch.load`` without ``weights_only=True`` and ``numpy.load``
  with ``allow_pickle`` not ``False``. Names are resolved through the module's imports (``import pickle
  as p``, ``from torch import load``).
* **at run time**: the main commands run in-process on a tiny trained project with every full unpickler
  (``pickle.load``, ``pickle.Unpickler`` and every module attribute bound to them, e.g. cloudpickle's)
  replaced by one that refuses and records the call. No command needs to unpickle a file, so any such
  call is a violation. ``pickle.loads`` of in-memory bytes stays allowed (results passed between a
  command's own worker processes); ``torch.load(weights_only=True)`` uses PyTorch's restricted unpickler,
  which builds only tensors and plain containers.

The MLflow U-Net is safetensors + JSON (issue 17, defect 2): predict and the registry rebuild it without
unpickling; the slow test at the end proves it at run time.
"""

from __future__ import annotations

import ast
import pickle
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.test_cli_fuzz import CAM, COMMANDS, UNET, _copy_base, trained_base  # noqa: F401 - fixture
from wsss.cli import app

PACKAGE = Path(__file__).resolve().parents[1] / "wsss"
runner = CliRunner()

# Calls that run a full unpickler on what they read (dotted names after resolving imports).
UNPICKLING = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "pickle._Unpickler", "_pickle.load", "_pickle.loads",
    "_pickle.Unpickler", "cPickle.load", "cPickle.loads", "dill.load", "dill.loads", "cloudpickle.load",
    "cloudpickle.loads", "joblib.load", "shelve.open", "marshal.load", "marshal.loads", "pandas.read_pickle",
    "torch.jit.load", "torch.package.PackageImporter", "mlflow.pyfunc.load_model", "mlflow.pyfunc.load_pyfunc",
}
# Any mlflow.<flavour>.load_model unpickles (pytorch, sklearn, pyfunc ...).


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted origin, from every import in the module (function-level ones too)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    names.setdefault("np", "numpy")
    names.setdefault("pd", "pandas")
    return names


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    head = aliases.get(node.id, node.id)
    return ".".join([head, *reversed(parts)])


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.AST | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unpickling_calls(source: str) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of every call in ``source`` that may unpickle what it reads."""
    tree = ast.parse(source)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases)
        if name is None:
            continue
        if name.startswith("torch.serialization."):
            name = "torch." + name.rsplit(".", 1)[1]
        bad = name in UNPICKLING or (name.startswith("mlflow.") and name.endswith(".load_model"))
        if name == "torch.load":
            bad = not _is_const(_keyword(node, "weights_only"), True)
        elif name in ("numpy.load", "numpy.lib.npyio.load"):
            allow = _keyword(node, "allow_pickle")
            bad = allow is not None and not _is_const(allow, False)
        if bad:
            found.append((node.lineno, name))
    return found


def _scan() -> list[tuple[str, int, str]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        out += [(rel, line, name) for line, name in unpickling_calls(path.read_text(encoding="utf-8"))]
    return out


def test_the_scanner_finds_each_form() -> None:
    src = """
import pickle as p, numpy as np, torch, joblib
from torch import load
from mlflow import pyfunc
import mlflow
from pandas import read_pickle
def f(x):
    p.loads(x); load(x); torch.load(x, weights_only=False); torch.load(x)
    np.load(x, allow_pickle=True); joblib.load(x); pyfunc.load_model(x); mlflow.sklearn.load_model(x)
    read_pickle(x)
    torch.load(x, weights_only=True); np.load(x); np.load(x, allow_pickle=False)  # safe
"""
    assert [n for _, n in unpickling_calls(src)] == [
        "pickle.loads", "torch.load", "torch.load", "torch.load", "numpy.load", "joblib.load",
        "mlflow.pyfunc.load_model", "mlflow.sklearn.load_model", "pandas.read_pickle",
    ]


def test_no_module_calls_an_unpickler() -> None:
    found = [f"wsss/{rel}:{line}: {name}" for rel, line, name in _scan()]
    assert not found, "calls that unpickle what they read:\n" + "\n".join(found)


# --------------------------------------------------------------------------------------------------
# run time


class Refused(Exception):
    """Raised instead of unpickling (an Exception, so a command turns it into an error, never runs it)."""


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace every full unpickler reachable from loaded modules; returns the list of refused calls."""
    import cloudpickle  # noqa: F401 - MLflow's pickle module: bound to pickle's functions at import
    import mlflow.pytorch  # noqa: F401
    import torch  # noqa: F401

    refused: list[str] = []

    def refuse(what: str):
        def fn(*args: object, **kwargs: object) -> object:
            source = getattr(args[0], "name", type(args[0]).__name__) if args else "?"
            refused.append(f"{what}({source})")
            raise Refused(f"{what} refused on {source}")
        return fn

    def refusing_class(what: str) -> type:
        check = refuse(what)

        class RefusingUnpickler:  # a class: torch.load subclasses ``pickle_module.Unpickler``
            def __init__(self, *args: object, **kwargs: object) -> None:
                check(*args, **kwargs)

        return RefusingUnpickler

    originals = {id(pickle.load): refuse("pickle.load"), id(pickle.Unpickler): refusing_class("pickle.Unpickler"),
                 id(pickle._Unpickler): refusing_class("pickle._Unpickler"), id(pickle._load): refuse("pickle._load")}
    for module in list(sys.modules.values()):
        for attr in ("load", "Unpickler", "_Unpickler", "_load"):
            value = getattr(module, attr, None) if module is not None else None
            if value is not None and id(value) in originals:
                monkeypatch.setattr(module, attr, originals[id(value)])
    return refused


def test_the_runtime_guard_refuses_a_torch_full_load(tmp_path: Path, no_unpickling: list[str]) -> None:
    import torch

    torch.save({"a": 1}, tmp_path / "x.pt")
    with pytest.raises(Refused):
        torch.load(tmp_path / "x.pt", weights_only=False)
    assert torch.load(tmp_path / "x.pt", weights_only=True) == {"a": 1}  # the restricted one stays usable
    assert pickle.loads(pickle.dumps([1, 2])) == [1, 2]
    assert len(no_unpickling) == 1 and "Unpickler" in no_unpickling[0], no_unpickling
    with pytest.raises(Refused), open(tmp_path / "y.pkl", "wb+") as fh:
        pickle.dump([1], fh)
        fh.seek(0)
        pickle.load(fh)
    assert "y.pkl" in no_unpickling[-1]


RUNTIME_COMMANDS = [
    ["validate"],
    COMMANDS["make-cams"],
    ["tune", "crf", "--method", CAM, "--trials", "1"],
    COMMANDS["make-pseudo"],
    ["train-ccam", "--init", "classifier:species"],
    COMMANDS["evaluate-model"],
    COMMANDS["evaluate-baselines"],
    COMMANDS["evaluate-pseudo"],
    ["report", "--no-register"],
    ["predict", "data/prepared/images", "--model", f"models/{UNET}", "--out", "preds"],
    ["runs", "--all"],
]


def _run_all(root: Path, commands: list[list[str]]) -> None:
    for command in commands:
        result = runner.invoke(app, command)
        assert result.exit_code == 0, f"wsss {' '.join(command)}:\n{result.output}\n{result.exception!r}"


@pytest.mark.slow
def test_main_commands_never_unpickle_a_file(trained_base: Path, tmp_path: Path,  # noqa: F811
                                             monkeypatch: pytest.MonkeyPatch, no_unpickling: list[str]) -> None:
    root = _copy_base(trained_base, tmp_path / "case")
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root.as_posix()}/mlruns/mlflow.db")
    for rel in (f"cams/{CAM}", f"masks/{CAM}"):  # so make-cams and make-pseudo really run
        shutil.rmtree(root / rel)
    _run_all(root, RUNTIME_COMMANDS)
    assert not no_unpickling, no_unpickling


def _logged_unet(root: Path) -> str:
    """``runs:/<id>/model`` of the U-Net the base project's train-unet logged to MLflow."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root.as_posix()}/mlruns/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "tags.`wsss.stage` = 'train-unet'")
    assert runs, "the base project logged no U-Net"
    return f"runs:/{runs[0].info.run_id}/model"


@pytest.mark.slow
def test_registry_and_mlflow_predict_never_unpickle(trained_base: Path, tmp_path: Path,  # noqa: F811
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    no_unpickling: list[str]) -> None:
    from wsss.reporting import registry

    root = _copy_base(trained_base, tmp_path / "case")
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root.as_posix()}/mlruns/mlflow.db")
    uri = _logged_unet(root)
    registry._state_matches(uri, "any")  # the registry's check of a logged model's weights
    _run_all(root, [["predict", "data/prepared/images", "--model", uri, "--out", "preds"]])
    assert not no_unpickling, no_unpickling
