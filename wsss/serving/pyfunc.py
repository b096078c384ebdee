"""The MLflow ``PythonModel`` of the U-Net: an RGB image of any size in, its pet mask and probabilities out.

Input: a DataFrame with one column ``image``, one row per image; a cell is the image file's bytes
(PNG, JPEG, ...; base64 in JSON over HTTP, which MLflow decodes for this ``binary`` column) or, from
Python, an ``(H, W, 3)`` uint8 RGB array. Output: a DataFrame with one row per input: ``mask``
(``(H, W)`` uint8, 1 = pet, 0 = background), ``pet_probability`` (``(H, W)`` float32), ``height``,
``width``, all at the input's own size. Param ``threshold`` (default from the metadata). Model config
``device`` (``cpu`` by default; ``cuda``/``auto`` at load time). The preprocessing (resize, ImageNet
normalisation), the decision rule (threshold chosen on val, flip test-time augmentation) and the
architecture come from ``wsss_unet.json``; prediction runs through :func:`wsss.inference.predict_probs`,
exactly as ``wsss predict`` does.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

INPUT_COLUMN = "image"
OUTPUT_COLUMNS = ("mask", "pet_probability", "height", "width")


class InvalidImage(ValueError):
    """An input cell that is not an image (its row number and the reason)."""


def to_rgb(value: Any, row: int) -> np.ndarray:
    """An input cell as ``(H, W, 3)`` uint8 RGB, decoded as ``wsss predict`` decodes files.

    Raises:
        InvalidImage: not image bytes nor an ``(H, W, 3)`` / ``(H, W)`` uint8 array.
    """
    from wsss.data.images import ImageIssue, read_rgb

    if isinstance(value, np.ndarray):
        if value.dtype != np.uint8 or value.ndim not in (2, 3) or (value.ndim == 3 and value.shape[2] != 3):
            raise InvalidImage(f"row {row}: an array must be (H, W, 3) uint8 RGB, got {value.shape} {value.dtype}")
        if min(value.shape[:2]) < 1:
            raise InvalidImage(f"row {row}: empty image {value.shape}")
        return np.ascontiguousarray(np.repeat(value[..., None], 3, axis=2) if value.ndim == 2 else value)
    if isinstance(value, (bytearray, memoryview)):
        value = bytes(value)
    if not isinstance(value, bytes):
        raise InvalidImage(f"row {row}: expected image file bytes or a uint8 array, got {type(value).__name__}")
    # Through a file, so bytes get the same guards and conversions as an image file given to wsss predict.
    fd, name = tempfile.mkstemp(prefix="wsss-image-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(value)
        return read_rgb(name)
    except ImageIssue as exc:
        raise InvalidImage(f"row {row}: {exc.reason}") from None
    finally:
        os.unlink(name)


class UnetPyfunc(mlflow.pyfunc.PythonModel):
    """The wsss U-Net as an MLflow pyfunc (see the module docstring for input and output)."""

    def load_context(self, context: Any) -> None:
        """Rebuild the network from the model's artifacts with the checked, pickle-free loader."""
        from wsss.device import precision_from, prepare_model
        from wsss.serving import unet_format

        folder = Path(context.artifacts["metadata"]).parent
        self.net, self.meta = unet_format.load(folder)
        config = dict(context.model_config or {})
        self.prec = precision_from(str(config.get("device", "cpu")))
        self.net = prepare_model(self.net, self.prec)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Masks and pet probabilities at each input image's size."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from wsss.inference import predict_probs

        threshold = float((params or {}).get("threshold", self.meta["threshold"]))
        if not 0.0 < threshold < 1.0:
            raise MlflowException(f"threshold {threshold}: must be strictly between 0 and 1",
                                  error_code=INVALID_PARAMETER_VALUE)
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame({INPUT_COLUMN: model_input})
        if INPUT_COLUMN not in frame.columns:
            raise MlflowException(f"input needs a column {INPUT_COLUMN!r} (image bytes or uint8 RGB arrays)",
                                  error_code=INVALID_PARAMETER_VALUE)
        rows = []
        for i, value in enumerate(frame[INPUT_COLUMN]):
            try:
                image = to_rgb(value, i)
            except InvalidImage as exc:
                raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
            prob = predict_probs(self.net, [image], int(self.meta["input_size"]), self.prec,
                                 flip=bool(self.meta.get("flip_tta", False)))[0]
            rows.append({"mask": (prob >= threshold).astype(np.uint8), "pet_probability": prob.astype(np.float32),
                         "height": image.shape[0], "width": image.shape[1]})
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))
