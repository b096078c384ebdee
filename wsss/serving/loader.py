"""The one safe loader of a wsss U-Net MLflow model: a local folder, ``models:/...``, ``runs:/...`` or another URI.

Used by ``wsss predict --model`` and by the registry check of ``wsss report``. It never calls
``mlflow.pytorch.load_model`` / ``mlflow.pyfunc.load_model`` (which would unpickle an old model or run
the model's code): it downloads the files, reads ``MLmodel`` as plain YAML, refuses anything that is not
our format (an old pickle-format model with a message to retrain / re-register), then rebuilds the
network with :func:`wsss.serving.unet_format.load` (checksum first, safetensors, no pickle).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from wsss.errors import DataError
from wsss.serving import unet_format
from wsss.serving.unet_format import CODE_FILE, FORMAT_TAG, format_tag, readable_tags

MLMODEL = "MLmodel"
ARTIFACTS = "artifacts"
URI_PREFIXES = ("models:/", "runs:/")
MAX_MLMODEL_BYTES = 1 << 20


def is_uri(spec: str) -> bool:
    """Whether ``spec`` is an MLflow URI (``models:/``, ``runs:/`` or any ``scheme://``)."""
    return "://" in spec or spec.startswith(URI_PREFIXES)


def is_mlflow_model(spec: str) -> bool:
    """Whether ``spec`` names an MLflow model: a URI or a folder with an ``MLmodel`` file."""
    return is_uri(spec) or (Path(spec) / MLMODEL).is_file()


def check_mlmodel(folder: Path, where: str) -> None:
    """Refuse a model folder that is not a wsss U-Net of this format, reading ``MLmodel`` as data only.

    Raises:
        DataError: no ``MLmodel``, an old pickle-format (``mlflow.pytorch``) U-Net, another kind of
            MLflow model, or a newer format version.
    """
    path = Path(folder) / MLMODEL
    try:
        if path.stat().st_size > MAX_MLMODEL_BYTES:
            raise DataError(f"{where}/{MLMODEL}: larger than {MAX_MLMODEL_BYTES} bytes; not a wsss U-Net model")
        conf = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{where}: no {MLMODEL} file; not an MLflow model") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DataError(f"{where}/{MLMODEL}: unreadable ({type(exc).__name__}); not a wsss U-Net model") from None
    conf = conf if isinstance(conf, dict) else {}
    flavors = conf.get("flavors") if isinstance(conf.get("flavors"), dict) else {}
    tag = (conf.get("metadata") or {}).get(FORMAT_TAG) if isinstance(conf.get("metadata"), dict) else None
    if tag is None and "pytorch" in flavors:
        raise DataError(f"{where}: an MLflow model in the old pickle format (mlflow.pytorch, data/model.pth), "
                        f"which wsss never unpickles; {unet_format.RETRAIN} to get the safetensors format")
    if tag is None:
        raise DataError(f"{where}: not a wsss U-Net MLflow model ({MLMODEL} has no metadata.{FORMAT_TAG})")
    if tag not in readable_tags():
        raise DataError(f"{where}: model format {tag!r}; this wsss reads {' and '.join(map(repr, readable_tags()))} "
                        f"(writes {format_tag()!r}): upgrade wsss or re-register the model")
    pyfunc = flavors.get("python_function") if isinstance(flavors.get("python_function"), dict) else {}
    if Path(str(pyfunc.get("model_code_path", ""))).name != CODE_FILE:
        raise DataError(f"{where}/{MLMODEL}: python_function is not the wsss U-Net code ({CODE_FILE})")


def load_folder(folder: Path, where: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the U-Net of a local MLflow model folder (checked first); CPU, eval mode."""
    label = where or str(folder)
    check_mlmodel(Path(folder), label)
    return unet_format.load(Path(folder) / ARTIFACTS, f"{label}/{ARTIFACTS}")


@contextlib.contextmanager
def _no_download_bars() -> Iterator[None]:
    """MLflow's per-file download bars off (unless the user set them): wsss shows its own progress."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    unset = key not in os.environ
    if unset:
        os.environ[key] = "false"
    try:
        yield
    finally:
        if unset:
            os.environ.pop(key, None)


def load_mlflow_unet(spec: str) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the U-Net of an MLflow model folder or URI (the tracking store must be set for URIs).

    Args:
        spec: a local folder with ``MLmodel``, ``models:/<name>@<alias>``, ``models:/<name>/<version>``,
            ``models:/<model id>``, ``runs:/<run id>/model`` or an artifact URI.

    Returns:
        ``(model on CPU in eval mode, metadata of wsss_unet.json)``.

    Raises:
        DataError: the model cannot be downloaded, is not our format, or fails a check.
    """
    if not is_uri(spec):
        return load_folder(Path(spec), spec)
    import mlflow

    with tempfile.TemporaryDirectory(prefix="wsss-model-") as tmp, _no_download_bars():
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=spec, dst_path=tmp)
        except Exception as exc:  # MlflowException, OSError, a bad URI ...
            lines = str(exc).strip().splitlines()
            reason = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
            raise DataError(f"{spec}: cannot download the MLflow model ({reason})") from None
        return load_folder(Path(local), spec)
