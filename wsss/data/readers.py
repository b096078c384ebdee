"""Readers for the prepared data (``data/prepared/``): images and masks that ``wsss prepare`` already
validated, so no format checks (see :mod:`wsss.data.images` for untrusted source files).

Torch-free on purpose: refinement worker processes and the Optuna objective import only this.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def read_rgb(path: Path) -> np.ndarray:
    """A prepared image as a writable uint8 (H, W, 3) RGB array."""
    with Image.open(path) as im:
        # np.array copies: arrays over PIL buffers are read-only, and pydensecrf rejects those.
        return np.array(im.convert("RGB"), dtype=np.uint8)


def read_mask(path: Path) -> np.ndarray:
    """A mask PNG (0 bg, 1 pet, 255 ignore) as a writable uint8 (H, W) array."""
    with Image.open(path) as im:
        return np.array(im, dtype=np.uint8)
