"""Log the U-Net as a self-contained, pickle-free MLflow pyfunc model (docs/artefacts.md#mlflow-model).

The model folder holds ``MLmodel`` (flavour ``python_function``, ``metadata.wsss_format``), the code
file ``pyfunc_code.py`` (models from code: nothing is cloudpickled), ``artifacts/weights.safetensors``
+ ``artifacts/wsss_unet.json``, ``code/wsss/`` (this package, so it loads outside this repository),
pinned ``requirements.txt`` / ``python_env.yaml``, the signature and an input example.
"""

from __future__ import annotations

import io
import shutil
import tempfile
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from wsss.decision import Decision
from wsss.serving import unet_format
from wsss.serving.pyfunc import INPUT_COLUMN

MODEL_NAME = "model"
PYFUNC_CODE = Path(__file__).with_name(unet_format.CODE_FILE)
# Distributions the pyfunc's code imports, also inside functions (wsss.serving, wsss.inference,
# wsss.models.unet and what they import; rich: wsss.config's messages); tests/test_mlflow_model.py checks
# this list against the imports and against what a fresh process really loads.
REQUIREMENTS = ("mlflow", "torch", "torchvision", "segmentation-models-pytorch", "safetensors", "numpy",
                "pandas", "pillow", "pyyaml", "rich")


def pip_requirements() -> list[str]:
    """:data:`REQUIREMENTS` pinned to the installed versions (local build tags such as ``+cu130`` dropped)."""
    return [f"{name}=={importlib_metadata.version(name).split('+')[0]}" for name in REQUIREMENTS]


def signature(threshold: float) -> Any:
    """Input: column ``image`` (binary); output: mask / pet_probability arrays + size; param ``threshold``."""
    from mlflow.models import ModelSignature
    from mlflow.types import DataType
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, INPUT_COLUMN)]),
        outputs=Schema([ColSpec(Array(Array(DataType.integer)), "mask"),
                        ColSpec(Array(Array(DataType.float)), "pet_probability"),
                        ColSpec(DataType.long, "height"), ColSpec(DataType.long, "width")]),
        params=ParamSchema([ParamSpec("threshold", DataType.double, threshold)]),
    )


def example_image(height: int = 24, width: int = 40) -> bytes:
    """A small PNG (a light ellipse on a dark background) for the model's input example."""
    from PIL import Image

    yy, xx = np.mgrid[:height, :width]
    inside = ((yy - height / 2) / (height / 3)) ** 2 + ((xx - width / 2) / (width / 3)) ** 2 <= 1
    rgb = np.where(inside[..., None], np.array([200, 170, 120], np.uint8), np.array([30, 60, 40], np.uint8))
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _package_copy(dest: Path) -> Path:
    """A copy of the ``wsss`` package without caches, for ``code_paths``."""
    src = Path(__file__).resolve().parents[1]
    shutil.copytree(src, dest / "wsss", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
    return dest / "wsss"


def _model_kwargs(tmp: Path, model: nn.Module, input_size: int, masks: str | None,
                  rule: Decision | None) -> dict[str, Any]:
    """What ``mlflow.pyfunc.log_model`` / ``save_model`` get (files written under ``tmp``)."""
    import pandas as pd

    rule = rule or Decision()
    meta_path, weights_path = unet_format.write(tmp / "artifacts", model, input_size, masks, rule)
    threshold = rule.threshold
    return {
        "python_model": str(PYFUNC_CODE),
        "artifacts": {"metadata": str(meta_path), "weights": str(weights_path)},
        "code_paths": [str(_package_copy(tmp / "code"))],
        "pip_requirements": pip_requirements(),
        "signature": signature(threshold),
        "input_example": (pd.DataFrame({INPUT_COLUMN: [example_image()]}), {"threshold": threshold}),
        "model_config": {"device": "cpu"},
        "metadata": {unet_format.FORMAT_TAG: unet_format.format_tag()},
    }


def log_unet(model: nn.Module, input_size: int, masks: str | None = None, rule: Decision | None = None) -> Any:
    """Log ``model`` (deciding by ``rule``, default 0.5 without flip) as the MLflow model ``model`` of the
    active run; returns MLflow's ``ModelInfo``."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="wsss-export-") as tmp:
        return mlflow.pyfunc.log_model(name=MODEL_NAME, **_model_kwargs(Path(tmp), model, input_size, masks, rule))


def save_unet(dest: Path, model: nn.Module, input_size: int, masks: str | None = None,
              rule: Decision | None = None) -> Path:
    """Write the same MLflow model as a local folder ``dest`` (no tracking store); returns ``dest``."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="wsss-export-") as tmp:
        mlflow.pyfunc.save_model(path=str(dest), **_model_kwargs(Path(tmp), model, input_size, masks, rule))
    return Path(dest)
