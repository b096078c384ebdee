"""Torch datasets over the prepared manifest: classification, segmentation and inference."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from wsss.data.breeds import NUM_BREEDS, SPECIES
from wsss.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_label(row: pd.Series, labels: str, bg: bool) -> int:
    """Class index of a manifest row in a label space (background is the last class)."""
    if row["is_background"]:
        if not bg:
            raise ValueError(f"background image {row['id']} in a label space without 'bg'")
        return len(SPECIES) if labels == "species" else NUM_BREEDS
    return int(row["species"] if labels == "species" else row["breed"])


def load_rgb(prepared_dir: Path, rel: str) -> Image.Image:
    """Open a prepared image (already validated RGB)."""
    with Image.open(prepared_dir / rel) as im:
        return im.convert("RGB")


def load_mask(path: Path) -> np.ndarray:
    """Read a mask PNG (0 bg, 1 pet, 255 ignore).

    Raises:
        DataError: the file is missing or not a complete image (names it).
    """
    try:
        with Image.open(path) as im:
            return np.asarray(im, dtype=np.uint8).copy()
    except (OSError, SyntaxError, ValueError) as exc:  # PIL: UnidentifiedImageError, truncated data
        raise DataError(f"{path}: mask cannot be read ({type(exc).__name__}: {exc})") from None


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8/float [0,1] CHW -> ImageNet-normalised float."""
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    return TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)


def denormalize_uint8(x: torch.Tensor) -> np.ndarray:
    """Normalised CHW tensor -> HWC uint8 RGB (clipped), for CRF input and figures."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    img = (x.float() * std + mean).clamp(0, 1) * 255.0
    return img.round().byte().permute(1, 2, 0).cpu().numpy()


def classification_transform(size: int, train: bool, crop_scale_min: float = 0.35) -> Callable:
    """Random-resized crop + flip + mild colour jitter for training; a plain resize for evaluation."""
    if train:
        ops = [
            v2.RandomResizedCrop(size, scale=(crop_scale_min, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(0.2, 0.2, 0.2, 0.02),
        ]
    else:
        ops = [v2.Resize((size, size), antialias=True)]
    return v2.Compose([v2.PILToTensor(), *ops, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class ClassificationDataset(Dataset):
    """(image, class index) pairs of a manifest subset in a label space (species/breed, +bg)."""

    def __init__(self, df: pd.DataFrame, prepared_dir: Path, labels: str, bg: bool, transform: Callable):
        self.df = df.reset_index(drop=True)
        self.prepared_dir = Path(prepared_dir)
        self.targets = [image_label(r, labels, bg) for _, r in self.df.iterrows()]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.df)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = load_rgb(self.prepared_dir, self.df.at[i, "image_path"])
        return self.transform(img), self.targets[i]


class InferenceDataset(Dataset):
    """Images resized to ``size``×``size`` with their id, class index and prepared size (H, W)."""

    def __init__(self, df: pd.DataFrame, prepared_dir: Path, size: int, targets: list[int] | None = None):
        self.df = df.reset_index(drop=True)
        self.prepared_dir = Path(prepared_dir)
        self.size = size
        self.targets = targets if targets is not None else [-1] * len(self.df)
        self.transform = classification_transform(size, train=False)

    def __len__(self) -> int:
        return len(self.df)

    def __getitem__(self, i: int) -> dict:
        row = self.df.iloc[i]
        img = load_rgb(self.prepared_dir, row["image_path"])
        return {
            "image": self.transform(img),
            "id": row["id"],
            "target": self.targets[i],
            "size": torch.tensor([int(row["height"]), int(row["width"])]),
        }


class SegmentationDataset(Dataset):
    """(image, mask) pairs at ``size``×``size``; masks from GT (``mask_path``) or a pseudo-mask folder.

    Training applies one random resized crop (scale 0.5-1, ratio 3/4-4/3) and a horizontal flip to the
    image and its mask together (``torchvision.transforms.v2`` with a ``tv_tensors.Mask``, so the mask is
    resampled nearest-neighbour); evaluation only resizes both.
    """

    def __init__(self, df: pd.DataFrame, prepared_dir: Path, size: int, train: bool,
                 masks_dir: Path | None = None):
        self.df = df.reset_index(drop=True)
        self.prepared_dir = Path(prepared_dir)
        self.masks_dir = Path(masks_dir) if masks_dir else None
        self.size = size
        self.train = train
        if train:
            self.transform = v2.Compose([
                v2.RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
                v2.RandomHorizontalFlip(),
            ])
        else:
            self.transform = v2.Resize((size, size), antialias=True)

    def __len__(self) -> int:
        return len(self.df)

    def mask_path(self, i: int) -> Path:
        row = self.df.iloc[i]
        if self.masks_dir is not None:
            return self.masks_dir / f"{row['id']}.png"
        return self.prepared_dir / row["mask_path"]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = tv_tensors.Image(TF.pil_to_tensor(load_rgb(self.prepared_dir, self.df.at[i, "image_path"])))
        mask = tv_tensors.Mask(torch.from_numpy(load_mask(self.mask_path(i)))[None])
        img, mask = self.transform(img, mask)
        return normalize(img.as_subclass(torch.Tensor)), mask.as_subclass(torch.Tensor)[0].long()
