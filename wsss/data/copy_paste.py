"""Background copy-paste: confident pet cut-outs pasted onto background-only images, with exact masks.

A *cut-out* is the largest connected pet component (value 1; ignore pixels 255 are never part of it) of a
train image's pseudo-mask. It is *confident* when the map the pseudo-mask was refined from agrees with
it: the IoU between the component and the map thresholded at ``map_threshold`` is at least
``min_confidence``. ``map_threshold: val`` takes the threshold that is best on val for that map variant
(``best_threshold`` of its ``make-cams`` report): from-scratch maps differ in scale (a CAM that keeps a high
floor after max-normalisation covers nearly the whole image at 0.3), and one fixed number judges that scale
rather than the map. Where the refiner and the map disagree (GrabCut following a colour edge into the
background, or cutting a weak map down to a fragment), one of them is wrong, and pasting the cut-out would
teach the U-Net that error on a clean background. Tiny components (under ``min_area`` of the image) are
dropped too.

Why this rule and not the map's mean value inside the component (measured on the synthetic default's 24
val images with the scratch-CCAM pseudo-masks; docs README "Background copy-paste"): the agreement
correlates with the cut-out's true IoU (+0.45), the mean inside does not (-0.59: a mask cut down to the
map's peak has a high mean and a poor IoU).

Each pair pastes one cut-out (random scale relative to the background, position, horizontal flip) onto
one train-split background-only image. The pair's mask is exact: 1 on the pasted pixels, 0 everywhere
else (no ignore band: the pasted region is known to the pixel). Everything is drawn from one
``numpy`` generator seeded with ``base.seed``, so the pairs are a function of the inputs and the seed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from wsss.config import CopyPasteConfig
from wsss.data.datasets import normalize
from wsss.data.readers import read_mask, read_rgb

PET = 1


@dataclass(frozen=True)
class CutOut:
    """A pet cut-out: the pixels of its bounding box and the component inside it."""

    id: str
    rgb: np.ndarray  # (h, w, 3) uint8, the bounding box of the component in the source image
    mask: np.ndarray  # (h, w) bool, the component
    confidence: float  # IoU of the component with the thresholded map
    area_fraction: float  # component area / source image area


def largest_component(mask: np.ndarray) -> np.ndarray | None:
    """The largest 8-connected component of the pet pixels (== 1) as a bool array, or None if none."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats((mask == PET).astype(np.uint8), connectivity=8)
    if n <= 1:
        return None
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == best


def cut_out(image_id: str, rgb: np.ndarray, mask: np.ndarray, pmap: np.ndarray,
            map_threshold: float = 0.3) -> CutOut | None:
    """The cut-out of one image (its largest pet component) with its confidence, or None without pet pixels.

    Raises:
        ValueError: the image, mask and map sizes differ.
    """
    if not (rgb.shape[:2] == mask.shape == pmap.shape):
        raise ValueError(f"{image_id}: image {rgb.shape[:2]}, mask {mask.shape} and map {pmap.shape} differ in size")
    comp = largest_component(mask)
    if comp is None:
        return None
    ys, xs = np.nonzero(comp)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    on = pmap >= map_threshold
    agreement = float((comp & on).sum() / max(int((comp | on).sum()), 1))
    return CutOut(image_id, rgb[y0:y1, x0:x1].copy(), comp[y0:y1, x0:x1].copy(), agreement,
                  float(comp.sum() / comp.size))


def is_confident(cut: CutOut, cfg: CopyPasteConfig) -> bool:
    """The confidence rule (module docstring): the map agrees with the cut-out, and it is not a speck."""
    return cut.confidence >= cfg.min_confidence and cut.area_fraction >= cfg.min_area


def paste(background: np.ndarray, cut: CutOut, rng: np.random.Generator, scale: tuple[float, float],
          source_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Paste ``cut`` onto a copy of ``background``; returns ``(rgb, mask)`` with mask 1 = pasted, 0 = rest.

    The cut-out keeps its size relative to its source image, times a factor drawn from ``scale``, shrunk
    further if it would not fit; it is flipped horizontally with probability 1/2 and placed uniformly at
    random where it fits entirely.
    """
    bh, bw = background.shape[:2]
    rel = min(bh / source_shape[0], bw / source_shape[1]) * float(rng.uniform(*scale))
    ch, cw = cut.mask.shape
    rel = min(rel, bh / ch, bw / cw)
    h, w = max(1, round(ch * rel)), max(1, round(cw * rel))
    rgb = cv2.resize(cut.rgb, (w, h), interpolation=cv2.INTER_LINEAR)
    comp = cv2.resize(cut.mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
    if rng.random() < 0.5:
        rgb, comp = rgb[:, ::-1], comp[:, ::-1]
    y = int(rng.integers(0, bh - h + 1))
    x = int(rng.integers(0, bw - w + 1))
    out = background.copy()
    mask = np.zeros((bh, bw), np.uint8)
    out[y:y + h, x:x + w][comp] = rgb[comp]
    mask[y:y + h, x:x + w][comp] = PET
    return out, mask


def make_pairs(cuts: Sequence[CutOut], source_shapes: Sequence[tuple[int, int]], backgrounds: Sequence[np.ndarray],
               count: int, scale: tuple[float, float], seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` pasted pairs, each a random cut-out on a random background (deterministic given ``seed``)."""
    if not cuts or not backgrounds:
        return []
    rng = np.random.default_rng([seed, 0xC0B7])  # its own stream: turning the feature on moves no other draw
    pairs = []
    for _ in range(count):
        i = int(rng.integers(len(cuts)))
        bg = backgrounds[int(rng.integers(len(backgrounds)))]
        pairs.append(paste(bg, cuts[i], rng, scale, source_shapes[i]))
    return pairs


def pair_count(cfg: CopyPasteConfig, n_train: int) -> int:
    """How many pairs: ``fraction`` of the training images (at least one when enabled and fraction > 0)."""
    if not cfg.enabled or cfg.fraction <= 0:
        return 0
    return max(1, round(cfg.fraction * n_train))


@dataclass(frozen=True)
class CopyPasteResult:
    """The pairs and what went into them (for MLflow, the training report and the resume fingerprint)."""

    pairs: list[tuple[np.ndarray, np.ndarray]]
    n_candidates: int  # train images with a pet component
    n_confident: int  # of which confident
    n_backgrounds: int
    note: str  # why the feature is off, or empty
    map_threshold: float | None = None  # the confidence rule's map threshold, where cut-outs were judged

    def digest(self) -> str:
        h = hashlib.sha1()
        for rgb, mask in self.pairs:
            h.update(rgb.tobytes())
            h.update(mask.tobytes())
        return h.hexdigest()

    def summary(self) -> dict[str, float]:
        out = {"copy_paste_pairs": float(len(self.pairs)), "copy_paste_cutouts": float(self.n_confident),
               "copy_paste_candidates": float(self.n_candidates),
               "copy_paste_backgrounds": float(self.n_backgrounds)}
        if self.map_threshold is not None:
            out["copy_paste_map_threshold"] = float(self.map_threshold)
        return out


def build(cfg: CopyPasteConfig, train_df: pd.DataFrame, background_df: pd.DataFrame, prepared: Path,
          masks_dir: Path, maps: Callable[[set[str]], dict[str, np.ndarray]], seed: int,
          map_threshold: float, max_side: int | None = None) -> CopyPasteResult:
    """Cut the confident pets out of ``train_df``'s pseudo-masks and paste them onto ``background_df``.

    Args:
        cfg: ``train_unet.copy_paste``.
        train_df: the U-Net's training rows (their masks are ``masks_dir/<id>.png``).
        background_df: background-only train images.
        prepared: the prepared data folder (``image_path`` is relative to it).
        masks_dir: the pseudo-mask folder.
        maps: loads the maps of the given ids (``wsss.cams.load_maps`` over the variant's folder).
        seed: ``base.seed``.
        map_threshold: the map threshold of the confidence rule (``cfg.map_threshold`` resolved to a number).
        max_side: backgrounds larger than this on their long side are shrunk to it first (the pairs are
            held in memory, and the U-Net sees them at ``train_unet.input_size`` anyway).
    """
    count = pair_count(cfg, len(train_df))
    if count == 0:
        return CopyPasteResult([], 0, 0, len(background_df), "disabled")
    if background_df.empty:
        return CopyPasteResult([], 0, 0, 0, "no background-only train images in the manifest "
                               "(set base.background_root to a Stanford Background folder and rerun `wsss prepare`)")
    ids = sorted(train_df["id"])
    by_id = train_df.set_index("id")
    pmaps = maps(set(ids))
    cuts, shapes, n_candidates = [], [], 0
    for image_id in ids:
        if image_id not in pmaps:
            continue
        rgb = read_rgb(prepared / by_id.at[image_id, "image_path"])
        cut = cut_out(image_id, rgb, read_mask(masks_dir / f"{image_id}.png"), pmaps[image_id], map_threshold)
        if cut is None:
            continue
        n_candidates += 1
        if is_confident(cut, cfg):
            cuts.append(cut)
            shapes.append(rgb.shape[:2])
    backgrounds = [_fit(read_rgb(prepared / p), max_side) for p in sorted(background_df["image_path"])]
    if not cuts:
        return CopyPasteResult([], n_candidates, 0, len(backgrounds),
                               f"no confident cut-out (of {n_candidates}, none agrees with its map cut at "
                               f"{map_threshold:g} at IoU >= {cfg.min_confidence} and area >= {cfg.min_area})",
                               map_threshold)
    pairs = make_pairs(cuts, shapes, backgrounds, count, (cfg.scale_min, cfg.scale_max), seed)
    return CopyPasteResult(pairs, n_candidates, len(cuts), len(backgrounds), "", map_threshold)


def _fit(rgb: np.ndarray, max_side: int | None) -> np.ndarray:
    h, w = rgb.shape[:2]
    if max_side is None or max(h, w) <= max_side:
        return rgb
    f = max_side / max(h, w)
    return cv2.resize(rgb, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)


class PastedPairs(Dataset):
    """The pasted pairs as ``(image, mask)`` tensors, through the real pairs' training ``transform``."""

    def __init__(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]], transform: Callable):
        self.pairs = list(pairs)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rgb, mask = self.pairs[i]
        img = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1))
        m = tv_tensors.Mask(torch.from_numpy(mask)[None])
        img, m = self.transform(img, m)
        return normalize(img.as_subclass(torch.Tensor)), m.as_subclass(torch.Tensor)[0].long()
