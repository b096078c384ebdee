"""The prepared-data manifest (``data/prepared/manifest.parquet``): one row per usable image.

Columns (dtype):

==================  ========  ==============================================================
id                  str       unique image id (file stem; prefixed ``bg_`` / ``x<k>_`` for others)
split               str       ``train`` | ``val`` | ``test``  (val is carved from trainval)
source              str       ``pets`` (main root) | ``extra`` (label-only root) | ``background``
species             int       0 cat, 1 dog, -1 background image
breed               int       0..36 (official id - 1), -1 background image
is_background       bool      background-only image (no pet)
has_mask            bool      a GT mask exists (main-root pets whose trimap is not all border; background, label-only: False)
width, height       int       prepared image size (pixels)
orig_width/height   int       size of the source image
image_path          str       prepared RGB JPEG/PNG, relative to the prepared folder
mask_path           str       prepared mask PNG (0 bg, 1 pet, 255 border/ignore), '' if none
fg_fraction         float     fraction of pet pixels among non-ignored ones; -1 without mask
border_fraction     float     fraction of 255 pixels; -1 without mask
mask_values         str       sorted unique mask values, e.g. ``0,1,255``; '' without mask
==================  ========  ==============================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from wsss.errors import DataError
from wsss.io import atomic_path

COLUMNS: dict[str, str] = {
    "id": "str",
    "split": "str",
    "source": "str",
    "species": "int64",
    "breed": "int64",
    "is_background": "bool",
    "has_mask": "bool",
    "width": "int64",
    "height": "int64",
    "orig_width": "int64",
    "orig_height": "int64",
    "image_path": "str",
    "mask_path": "str",
    "fg_fraction": "float64",
    "border_fraction": "float64",
    "mask_values": "str",
}
SPLITS = ("train", "val", "test")
TRAINVAL = ("train", "val")
SOURCES = ("pets", "extra", "background")


def empty_manifest() -> pd.DataFrame:
    """A manifest with the right columns and no rows."""
    return pd.DataFrame({c: pd.Series(dtype=("object" if t == "str" else t)) for c, t in COLUMNS.items()})


def normalise(df: pd.DataFrame) -> pd.DataFrame:
    """Order columns, cast dtypes, sort by (split, id)."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"manifest is missing columns: {', '.join(missing)}")
    df = df[list(COLUMNS)].copy()
    for col, dtype in COLUMNS.items():
        df[col] = df[col].astype("object" if dtype == "str" else dtype)
        if dtype == "str":
            df[col] = df[col].map(str)
    return df.sort_values(["split", "id"], kind="stable").reset_index(drop=True)


def save_manifest(df: pd.DataFrame, path: str | Path) -> None:
    """Write the manifest atomically as parquet."""
    df = normalise(df)
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def load_manifest(path: str | Path) -> pd.DataFrame:
    """Read the manifest; a clear error if it is missing or malformed."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: manifest not found; run `wsss prepare` first")
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read manifest ({exc.__class__.__name__}: {exc})") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: manifest lacks columns {', '.join(missing)}; rerun `wsss prepare`")
    return df


def pets(df: pd.DataFrame, split: str | Sequence[str] | None = None,
         with_mask: bool | None = None) -> pd.DataFrame:
    """Pet rows (no background images), optionally of one split or several (e.g. :data:`TRAINVAL`) and only
    rows with (or without) masks. Row order is kept.
    """
    # astype(bool): a hand-built frame may hold the flags as objects, where ``~`` would not negate.
    sel = ~df["is_background"].astype(bool)
    if split is not None:
        sel &= df["split"].isin([split] if isinstance(split, str) else list(split))
    if with_mask is not None:
        sel &= df["has_mask"].astype(bool) == with_mask
    return df[sel]


def official_test_rows(path: str | Path) -> pd.DataFrame:
    """The official test split's pet images with masks (what every test score is computed on), sorted by id.

    Raises:
        DataError: the manifest is missing, or its test split has no image with a mask.
    """
    test = pets(load_manifest(path), "test", with_mask=True).sort_values("id")
    if test.empty:
        raise DataError(f"{path}: no test images with masks in the manifest; the test split is scored only with GT")
    return test


def trainval(df: pd.DataFrame, include_background: bool = False) -> pd.DataFrame:
    """Train/val rows (never test): the pets, plus the background-only images when ``include_background``."""
    sel = df["split"].isin(TRAINVAL)
    if not include_background:
        sel &= ~df["is_background"].astype(bool)
    return df[sel]
