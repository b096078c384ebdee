"""The embedded default dataset: deterministic synthetic "pets" in the Oxford-IIIT Pet on-disk layout.

Every image shows one procedurally drawn cat or dog on a cluttered background. Breeds differ in body
proportions, ears, tail, fur pattern and palette; cats and dogs differ systematically (slim bodies,
pointed ears, thin tails and short muzzles vs bulkier bodies, snouts and mostly floppy ears). Pets are
placed at varied scale and position, sometimes cut by the image border or occluded by a post, rail,
plant or object, and the background holds distractors painted in pet colours, so neither colour nor a
centre prior segments the pet. The output layout::

    <out_dir>/oxford-iiit-pet/images/<Name>_<n>.jpg
    <out_dir>/oxford-iiit-pet/annotations/trimaps/<Name>_<n>.png   (1 pet, 2 background, 3 border band)
    <out_dir>/oxford-iiit-pet/annotations/{trainval,test}.txt        (NAME CLASS-ID SPECIES BREED-ID)
    <out_dir>/background/images/bg_<n>.jpg
    <out_dir>/synthetic.json                                          (stamp, written last)

Each image is drawn from its own ``numpy`` generator seeded by ``(cfg.seed, split, index)``, so equal
configs give byte-identical files.
"""

from __future__ import annotations

import colorsys
import contextlib
import dataclasses
import io
import json
import os
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from wsss.config import SyntheticConfig
from wsss.data.breeds import BREED_SPECIES, BREEDS
from wsss.errors import DataError
from wsss.io import read_json, remove_tree, write_json

# Bump when the drawing changes: a stamp written by another version is regenerated.
GENERATOR_VERSION = 1
STAMP = "synthetic.json"
PET_DIR = "oxford-iiit-pet"
BACKGROUND_DIR = "background"
JPEG_QUALITY = 95

_SPLIT_CODE = {"trainval": 0, "test": 1, "background": 2}
_SPLIT_HEADER = (
    "#Image CLASS-ID SPECIES BREED ID\n"
    "#ID: 1:37 Class ids\n"
    "#SPECIES: 1:Cat 2:Dog\n"
    "#BREED ID: 1-12:Cat 1-25:Dog\n"
    "#Synthetic pets written by wsss.data.synthetic\n"
)

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class _Look:
    """A breed's appearance: fur pattern, palette and proportions (lengths relative to the body)."""

    texture: str  # solid ticked stripes brindle spots rosettes patches tricolor points saddle skin
    base: RGB
    second: RGB
    third: RGB = (240, 236, 228)  # white markings (tricolor, chest)
    ears: str = "pointed"  # pointed big_pointed small_pointed erect floppy long_floppy rose
    tail: str = "thin"  # thin bushy plume curl straight short
    body: float = 0.42  # body height / body length
    size: float = 1.0  # typical size (biases the image fraction a little)
    legs: float = 1.0  # leg length relative to body height
    head: float = 0.62  # head radius relative to body height
    snout: float = 0.25  # muzzle length relative to head radius
    fluffy: float = 0.0  # ragged fur outline, 0..1
    white: float = 0.0  # white chest / paws, 0..1
    dark_face: bool = False  # dark muzzle mask (boxer, pug)
    dark_ears: bool = False  # ears in the second colour


_LOOKS: dict[str, _Look] = {
    # --- cats: slim bodies, pointed ears, thin tails, short muzzles --------------------------------
    "Abyssinian": _Look("ticked", (178, 104, 58), (92, 52, 28), ears="big_pointed", body=0.38, head=0.6),
    "Bengal": _Look("rosettes", (212, 158, 82), (58, 38, 24), body=0.42, legs=0.9, head=0.56),
    "Birman": _Look("points", (236, 222, 196), (92, 68, 54), ears="small_pointed", tail="bushy",
                    body=0.46, head=0.64, fluffy=0.6, white=0.8),
    "Bombay": _Look("solid", (32, 30, 32), (58, 52, 52), body=0.42, head=0.6, dark_ears=True),
    "British_Shorthair": _Look("solid", (126, 132, 146), (98, 104, 118), ears="small_pointed", tail="bushy",
                               body=0.52, legs=0.75, head=0.78, snout=0.1, size=1.05),
    "Egyptian_Mau": _Look("spots", (192, 190, 182), (66, 66, 70), body=0.4, head=0.56),
    "Maine_Coon": _Look("stripes", (150, 110, 70), (58, 40, 28), ears="big_pointed", tail="bushy",
                        body=0.46, size=1.25, fluffy=0.5, white=0.4),
    "Persian": _Look("solid", (236, 226, 210), (200, 186, 166), ears="small_pointed", tail="bushy",
                     body=0.56, legs=0.6, head=0.86, snout=0.0, fluffy=1.0),
    "Ragdoll": _Look("points", (226, 214, 198), (118, 98, 88), tail="bushy", body=0.5, size=1.2,
                     fluffy=0.6, white=0.6),
    "Russian_Blue": _Look("ticked", (118, 128, 144), (160, 168, 180), ears="big_pointed", body=0.38),
    "Siamese": _Look("points", (228, 212, 182), (62, 44, 34), ears="big_pointed", body=0.34, head=0.52),
    "Sphynx": _Look("skin", (222, 172, 160), (176, 122, 116), ears="big_pointed", body=0.4, head=0.58),
    # --- dogs: bulkier bodies, snouts, mostly floppy ears --------------------------------------------
    "american_bulldog": _Look("patches", (236, 232, 224), (150, 100, 62), ears="rose", tail="straight",
                              body=0.62, size=1.15, legs=0.8, head=0.62, snout=0.45),
    "american_pit_bull_terrier": _Look("solid", (140, 122, 112), (96, 84, 78), ears="rose", tail="straight",
                                       body=0.56, head=0.58, snout=0.65, white=0.7),
    "basset_hound": _Look("tricolor", (186, 120, 60), (36, 30, 28), ears="long_floppy", tail="straight",
                          body=0.5, size=1.3, legs=0.42, head=0.56, snout=0.9, dark_ears=False),
    "beagle": _Look("tricolor", (204, 142, 72), (40, 34, 30), ears="floppy", tail="straight", body=0.55,
                    legs=0.9, head=0.54, snout=0.8),
    "boxer": _Look("solid", (190, 128, 70), (40, 30, 26), ears="floppy", tail="short", body=0.55,
                   legs=1.1, head=0.56, snout=0.45, white=0.7, dark_face=True),
    "chihuahua": _Look("solid", (222, 184, 126), (180, 140, 90), ears="erect", tail="straight",
                       body=0.55, size=0.7, head=0.8, snout=0.35),
    "english_cocker_spaniel": _Look("solid", (196, 132, 58), (150, 96, 40), ears="long_floppy",
                                    tail="short", body=0.56, head=0.56, snout=0.7, fluffy=0.5),
    "english_setter": _Look("spots", (236, 232, 226), (70, 56, 50), ears="floppy", tail="plume", body=0.5,
                            size=1.2, head=0.5, snout=0.9, fluffy=0.4),
    "german_shorthaired": _Look("ticked", (104, 58, 40), (222, 214, 206), ears="floppy", tail="short",
                                body=0.52, size=1.15, legs=1.1, head=0.5, snout=0.95),
    "great_pyrenees": _Look("solid", (240, 238, 230), (214, 206, 190), ears="floppy", tail="plume",
                            body=0.6, size=1.4, head=0.56, snout=0.7, fluffy=0.8),
    "havanese": _Look("patches", (232, 218, 192), (176, 146, 108), ears="floppy", tail="curl", body=0.6,
                      size=0.7, head=0.62, snout=0.4, fluffy=1.0),
    "japanese_chin": _Look("patches", (240, 238, 232), (34, 30, 30), ears="floppy", tail="curl", body=0.6,
                           size=0.7, head=0.7, snout=0.1, fluffy=0.7),
    "keeshond": _Look("saddle", (170, 170, 162), (46, 46, 46), ears="erect", tail="curl", body=0.62,
                      head=0.6, snout=0.5, fluffy=1.0),
    "leonberger": _Look("saddle", (196, 150, 86), (60, 44, 34), ears="floppy", tail="plume", body=0.58,
                        size=1.4, head=0.56, snout=0.7, fluffy=0.7, dark_face=True),
    "miniature_pinscher": _Look("points", (40, 32, 30), (178, 104, 50), ears="erect", tail="short",
                                body=0.5, size=0.7, legs=1.15, head=0.56, snout=0.7),
    "newfoundland": _Look("solid", (36, 32, 32), (60, 54, 52), ears="floppy", tail="plume", body=0.62,
                          size=1.45, head=0.6, snout=0.6, fluffy=0.6, dark_ears=True),
    "pomeranian": _Look("solid", (218, 140, 62), (236, 190, 130), ears="erect", tail="curl", body=0.66,
                        size=0.6, legs=0.6, head=0.66, snout=0.3, fluffy=1.0),
    "pug": _Look("solid", (208, 178, 130), (36, 30, 28), ears="rose", tail="curl", body=0.64, legs=0.7,
                 head=0.7, snout=0.12, dark_face=True, dark_ears=True),
    "saint_bernard": _Look("patches", (238, 232, 222), (160, 84, 44), ears="floppy", tail="plume",
                           body=0.6, size=1.45, head=0.62, snout=0.6, fluffy=0.4),
    "samoyed": _Look("solid", (244, 242, 236), (222, 218, 208), ears="erect", tail="curl", body=0.6,
                     size=1.1, head=0.56, snout=0.55, fluffy=1.0),
    "scottish_terrier": _Look("solid", (34, 32, 34), (64, 60, 62), ears="erect", tail="straight",
                              body=0.58, size=0.85, legs=0.45, head=0.56, snout=0.85, fluffy=0.5),
    "shiba_inu": _Look("solid", (204, 122, 60), (226, 170, 110), ears="erect", tail="curl", body=0.56,
                       head=0.58, snout=0.55, white=0.9),
    "staffordshire_bull_terrier": _Look("brindle", (150, 104, 64), (62, 44, 32), ears="rose",
                                        tail="straight", body=0.6, legs=0.8, head=0.64, snout=0.45,
                                        white=0.6),
    "wheaten_terrier": _Look("ticked", (222, 196, 150), (246, 232, 200), ears="floppy", tail="short",
                             body=0.58, head=0.56, snout=0.7, fluffy=0.8),
    "yorkshire_terrier": _Look("saddle", (196, 150, 90), (86, 96, 110), ears="erect", tail="short",
                               body=0.56, size=0.6, legs=0.6, head=0.6, snout=0.45, fluffy=0.8),
}


# --------------------------------------------------------------------------------------------------
# public API


def synthetic_breeds(cfg: SyntheticConfig) -> list[int]:
    """The breeds used: the first ``breeds_per_species`` cats and dogs, as 0-based indices into BREEDS."""
    cats = [i for i, s in enumerate(BREED_SPECIES) if s == 0][: cfg.breeds_per_species]
    dogs = [i for i, s in enumerate(BREED_SPECIES) if s == 1][: cfg.breeds_per_species]
    return sorted(cats + dogs)


def generate(
    out_dir: Path, cfg: SyntheticConfig, progress: Callable[[int, int], None] | None = None
) -> dict[str, int]:
    """Write the synthetic dataset under ``out_dir``.

    Idempotent: if ``out_dir/synthetic.json`` records the same config (and generator version), its
    counts are returned without touching anything. Otherwise the whole tree is built in a temporary
    sibling folder and renamed into place at the end, so an interrupted run leaves ``out_dir`` as it was.

    Args:
        out_dir: Folder receiving ``oxford-iiit-pet/``, ``background/`` and the stamp.
        cfg: Generator settings.
        progress: Called as ``progress(done, total)`` after each image.

    Returns:
        Counts ``{"trainval": .., "test": .., "background": ..}``.

    Raises:
        DataError: ``out_dir`` holds other files (no stamp), which are never overwritten.
    """
    out_dir = Path(out_dir)
    config = _config_record(cfg)
    stamp = out_dir / STAMP
    if stamp.is_file():
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            rec = read_json(stamp)
            if rec.get("generator_version") == GENERATOR_VERSION and rec.get("config") == config:
                return {k: int(v) for k, v in rec["counts"].items()}
    elif out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(
            f"{out_dir}: exists but has no {STAMP}, so it was not written by the synthetic generator; "
            "move it away or choose another folder"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        counts = _write_tree(tmp, cfg, progress)
        names = [BREEDS[b] for b in synthetic_breeds(cfg)]
        write_json(tmp / STAMP, {
            "generator_version": GENERATOR_VERSION, "config": config, "counts": counts, "breeds": names,
        })
        _swap_into_place(tmp, out_dir)
    except BaseException:
        remove_tree(tmp, out_dir.parent, ignore_errors=True)
        raise
    return counts


# --------------------------------------------------------------------------------------------------
# tree writing


def _config_record(cfg: SyntheticConfig) -> dict[str, object]:
    # JSON round trip so the comparison with a stamp read from disk is like for like.
    return json.loads(json.dumps(dataclasses.asdict(cfg), sort_keys=True))


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``; a previous ``out_dir`` is moved aside first and then deleted."""
    old: Path | None = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        remove_tree(old, out_dir.parent, ignore_errors=True)


def _breed_id_in_species(breed: int) -> int:
    return sum(1 for b in range(breed + 1) if BREED_SPECIES[b] == BREED_SPECIES[breed])


def _write_tree(root: Path, cfg: SyntheticConfig, progress: Callable[[int, int], None] | None) -> dict[str, int]:
    pet_root = root / PET_DIR
    img_dir = pet_root / "images"
    tri_dir = pet_root / "annotations" / "trimaps"
    bg_dir = root / BACKGROUND_DIR / "images"
    for d in (img_dir, tri_dir, bg_dir):
        d.mkdir(parents=True, exist_ok=True)
    breeds = synthetic_breeds(cfg)
    palette = _distractor_palette(breeds)
    total = cfg.n_trainval + cfg.n_test + cfg.n_background
    done = 0
    instance = dict.fromkeys(breeds, 0)
    for split, n in (("trainval", cfg.n_trainval), ("test", cfg.n_test)):
        entries: list[tuple[int, int, str]] = []
        for i in range(n):
            breed = breeds[i % len(breeds)]
            instance[breed] += 1
            name = f"{BREEDS[breed]}_{instance[breed]}"
            rng = _rng(cfg.seed, split, i)
            image, trimap = render_pet_image(rng, breed, cfg, palette)
            _save_jpeg(img_dir / f"{name}.jpg", image)
            Image.fromarray(trimap).save(tri_dir / f"{name}.png", format="PNG")
            entries.append((breed, instance[breed], name))
            done += 1
            if progress is not None:
                progress(done, total)
        lines = [
            f"{name} {breed + 1} {BREED_SPECIES[breed] + 1} {_breed_id_in_species(breed)}\n"
            for breed, _, name in sorted(entries)
        ]
        (pet_root / "annotations" / f"{split}.txt").write_text(_SPLIT_HEADER + "".join(lines), encoding="utf-8")
    for i in range(cfg.n_background):
        rng = _rng(cfg.seed, "background", i)
        h, w = _image_shape(rng, cfg.image_size)
        image = _finish(rng, _background(rng, h, w, palette))
        _save_jpeg(bg_dir / f"bg_{i + 1}.jpg", image)
        done += 1
        if progress is not None:
            progress(done, total)
    return {"trainval": cfg.n_trainval, "test": cfg.n_test, "background": cfg.n_background}


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODE[split], index]))


def _save_jpeg(path: Path, image: np.ndarray) -> None:
    Image.fromarray(image).save(path, format="JPEG", quality=JPEG_QUALITY)


def _image_shape(rng: np.random.Generator, size: int) -> tuple[int, int]:
    """Square 40 % of the time, otherwise the short side is 75-100 % of ``size`` (either orientation)."""
    if rng.random() < 0.4:
        return size, size
    short = int(round(size * rng.uniform(0.75, 1.0)))
    return (short, size) if rng.random() < 0.6 else (size, short)


# --------------------------------------------------------------------------------------------------
# one pet image


def render_pet_image(
    rng: np.random.Generator, breed: int, cfg: SyntheticConfig, palette: list[np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one pet of ``breed`` on clutter.

    Returns:
        The RGB uint8 image and its uint8 trimap (1 pet, 2 background, 3 border band).
    """
    if palette is None:
        palette = _distractor_palette([breed])
    size = cfg.image_size
    h, w = _image_shape(rng, size)
    look = _LOOKS[BREEDS[breed]]
    scene = _background(rng, h, w, palette)
    scale = max(1.0, size / 128.0)
    for _ in range(8):
        colour, alpha = _draw_pet(rng, look, BREED_SPECIES[breed], scale)
        placed = _place(rng, colour, alpha, h, w, look)
        if placed is not None:
            break
    if placed is None:  # never in practice: fall back to a centred pet
        placed = _place(rng, colour, alpha, h, w, look, force_centre=True)
        assert placed is not None
    pet_rgb, pet_a = placed
    _shadow(rng, scene, pet_a)
    image = scene * (1 - pet_a[..., None]) + pet_rgb * pet_a[..., None]
    pet = pet_a >= 0.5
    if rng.random() < cfg.occlusion_prob:
        occ = _occluder(rng, h, w, pet, palette)
        if occ is not None:
            occ_rgb, occ_a = occ
            image = image * (1 - occ_a[..., None]) + occ_rgb * occ_a[..., None]
            pet &= occ_a < 0.5
    image = _finish(rng, image)
    return image, _trimap(pet, size)


def _trimap(pet: np.ndarray, size: int) -> np.ndarray:
    """1 inside, 2 outside, 3 on a band along the pet boundary (~2 px at 128 px, wider for big images)."""
    r = max(1, int(round(size / 160)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    m = pet.astype(np.uint8)
    band = (cv2.dilate(m, kernel) > 0) & ~(cv2.erode(m, kernel, borderType=cv2.BORDER_REPLICATE) > 0)
    tri = np.where(pet, 1, 2).astype(np.uint8)
    tri[band] = 3
    if not (tri == 1).any():  # a tiny sliver: keep its pixels as pet rather than all-band
        tri[pet] = 1
    return tri


def _place(
    rng: np.random.Generator, colour: np.ndarray, alpha: np.ndarray, h: int, w: int, look: _Look,
    force_centre: bool = False,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Scale, rotate, flip and position a sprite; returns full-size colour and alpha, or None if too cut."""
    area = float(alpha.sum())
    # Image fraction 8-45 % (uniform in linear size), nudged by breed size; border cuts lower it further.
    frac = float(rng.uniform(np.sqrt(0.08), np.sqrt(0.42)) ** 2) * look.size**0.35
    frac = min(max(frac, 0.08), 0.45)
    s = np.sqrt(frac * h * w / max(area, 1.0))
    if rng.random() < 0.5:
        colour, alpha = colour[:, ::-1], alpha[:, ::-1]
    sh, sw = alpha.shape
    nh, nw = max(2, int(round(sh * s))), max(2, int(round(sw * s)))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    colour = cv2.resize(np.ascontiguousarray(colour), (nw, nh), interpolation=interp)
    alpha = cv2.resize(np.ascontiguousarray(alpha), (nw, nh), interpolation=interp)
    angle = float(rng.normal(0, 8))
    rot = cv2.getRotationMatrix2D((nw / 2, nh / 2), angle, 1.0)
    cos, sin = abs(rot[0, 0]), abs(rot[0, 1])
    rw, rh = int(np.ceil(nw * cos + nh * sin)) + 2, int(np.ceil(nw * sin + nh * cos)) + 2
    rot[0, 2] += rw / 2 - nw / 2
    rot[1, 2] += rh / 2 - nh / 2
    colour = cv2.warpAffine(colour, rot, (rw, rh), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))
    alpha = cv2.warpAffine(alpha, rot, (rw, rh), flags=cv2.INTER_LINEAR, borderValue=0)
    if force_centre:
        x0, y0 = (w - rw) // 2, (h - rh) // 2
    else:
        # A third of the pets may hang over the border (up to ~35 % of their box).
        cut = 0.35 if rng.random() < 0.33 else 0.0
        lo_x, hi_x = sorted((-cut * rw, w - rw + cut * rw))
        lo_y, hi_y = sorted((-cut * rh, h - rh + cut * rh))
        x0, y0 = int(round(rng.uniform(lo_x, hi_x))), int(round(rng.uniform(lo_y, hi_y)))
    out_c = np.zeros((h, w, 3), np.float32)
    out_a = np.zeros((h, w), np.float32)
    ys, xs = max(0, y0), max(0, x0)
    ye, xe = min(h, y0 + rh), min(w, x0 + rw)
    if ye <= ys or xe <= xs:
        return None
    out_c[ys:ye, xs:xe] = colour[ys - y0 : ye - y0, xs - x0 : xe - x0]
    out_a[ys:ye, xs:xe] = alpha[ys - y0 : ye - y0, xs - x0 : xe - x0]
    if not force_centre and out_a.sum() < 0.6 * alpha.sum():
        return None
    if (out_a >= 0.5).sum() < 0.04 * h * w and not force_centre:
        return None
    return out_c, np.clip(out_a, 0, 1)


def _shadow(rng: np.random.Generator, scene: np.ndarray, pet_a: np.ndarray) -> None:
    """Darken a soft ellipse under the pet's lowest part (in place)."""
    ys, xs = np.nonzero(pet_a > 0.5)
    if len(ys) == 0 or rng.random() < 0.25:
        return
    h, w = pet_a.shape
    bottom = int(ys.max())
    cx, half = float(xs.mean()), (xs.max() - xs.min()) / 2
    m = np.zeros((h, w), np.uint8)
    cv2.ellipse(m, (int(cx), bottom), (max(2, int(half * 0.9)), max(1, int(half * 0.15))), 0, 0, 360, 255, -1)
    k = max(3, int(half * 0.3)) | 1
    m = cv2.GaussianBlur(m, (k, k), 0).astype(np.float32) / 255
    scene *= (1 - rng.uniform(0.25, 0.5) * m)[..., None]


# --------------------------------------------------------------------------------------------------
# the pet sprite


def _jitter(rng: np.random.Generator, rgb: RGB, amount: float) -> np.ndarray:
    c = np.asarray(rgb, np.float32) / 255
    c = c * rng.uniform(1 - amount, 1 + amount) + rng.normal(0, amount / 3, 3)
    return np.clip(c, 0.02, 0.98).astype(np.float32)


def _smooth(rng: np.random.Generator, h: int, w: int, cells: float) -> np.ndarray:
    """Smooth noise (about unit variance) with roughly ``cells`` blobs along the longer side."""
    gy = max(2, int(round(cells * h / max(h, w))) + 2)
    gx = max(2, int(round(cells * w / max(h, w))) + 2)
    grid = rng.standard_normal((gy, gx)).astype(np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def _sig(x: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(0.5 * x)  # logistic without exp overflow


_SUB = 16  # cv2 fixed-point shift 4: sub-pixel coordinates


def _pt(p: np.ndarray | tuple[float, float]) -> tuple[int, int]:
    return int(round(p[0] * _SUB)), int(round(p[1] * _SUB))


def _ellipse(m: np.ndarray, c: np.ndarray | tuple[float, float], ax: tuple[float, float], angle: float,
             value: float = 255) -> None:
    axes = (max(1, int(round(ax[0] * _SUB))), max(1, int(round(ax[1] * _SUB))))
    cv2.ellipse(m, _pt(c), axes, angle, 0, 360, value, -1, cv2.LINE_AA, 4)


def _poly(m: np.ndarray, pts: np.ndarray, value: float = 255) -> None:
    cv2.fillPoly(m, [np.round(np.asarray(pts) * _SUB).astype(np.int32)], value, cv2.LINE_AA, 4)


def _stroke(m: np.ndarray, pts: np.ndarray, r0: float, r1: float, value: float = 255) -> None:
    """A tapered stroke along a polyline: discs of radius r0 -> r1, densely spaced."""
    pts = np.asarray(pts, np.float64)
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    length = float(seg.sum())
    n = max(2, int(length / max(0.4 * min(r0, r1), 0.5)) + 1)
    t = np.concatenate([[0], np.cumsum(seg)]) / max(length, 1e-6)
    u = np.linspace(0, 1, n)
    xs = np.round(np.interp(u, t, pts[:, 0]) * _SUB).astype(int).tolist()
    ys = np.round(np.interp(u, t, pts[:, 1]) * _SUB).astype(int).tolist()
    rs = np.maximum(1, np.round(np.linspace(r0, r1, n) * _SUB)).astype(int).tolist()
    for x, y, r in zip(xs, ys, rs, strict=True):
        cv2.circle(m, (x, y), r, value, -1, cv2.LINE_AA, 4)


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, n: int = 16) -> np.ndarray:
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def _rot(v: tuple[float, float], deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    return np.array([v[0] * np.cos(a) - v[1] * np.sin(a), v[0] * np.sin(a) + v[1] * np.cos(a)])


def _draw_pet(rng: np.random.Generator, look: _Look, species: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Render a pet facing right: (colour HxWx3 float32 in [0, 1], alpha HxW float32), cropped tight."""
    a = 40.0 * scale * rng.uniform(0.92, 1.08)  # half body length, in sprite pixels
    b = a * look.body * rng.uniform(0.9, 1.1)
    hr = b * look.head * rng.uniform(0.92, 1.08)
    legs_len = b * 1.5 * look.legs * rng.uniform(0.9, 1.1)
    leg_r = b * (0.15 if species == 0 else 0.2)
    size = int(6.0 * a)
    o = np.array([size * 0.5, size * 0.5])  # body centre
    pose = rng.choice(["stand", "sit", "lie"], p=[0.55, 0.2, 0.25])

    body = np.zeros((size, size), np.uint8)
    far = np.zeros_like(body)  # far-side legs, drawn darker
    legs = np.zeros_like(body)
    head = np.zeros_like(body)
    snout = np.zeros_like(body)
    ears = np.zeros_like(body)
    inner_ear = np.zeros_like(body)
    tail = np.zeros_like(body)
    chest = np.zeros_like(body)

    if pose == "stand":
        tilt = float(rng.uniform(-6, 6))
        _ellipse(body, o, (a, b), tilt)
        ground = o[1] + b * 0.55 + legs_len
        for x, dst, near in ((0.55, legs, 1), (0.32, far, 0), (-0.6, legs, 1), (-0.38, far, 0)):
            top = o + (x * a, 0.35 * b)
            foot = np.array([top[0] + rng.normal(0, 0.12) * a, ground])
            _stroke(dst, [top, foot], leg_r * (1.25 if x < 0 else 1.05), leg_r * 0.85)
            _ellipse(dst, foot + (leg_r * 0.4, -leg_r * 0.2), (leg_r * 1.1, leg_r * 0.65), 0)
            if x < 0 and near:  # hind thigh
                _ellipse(body, o + (x * a + 0.1 * a, 0.2 * b), (0.32 * a, 0.65 * b), 10)
        neck0 = o + _rot((0.75 * a, -0.2 * b), tilt)
        head_c = neck0 + (0.35 * hr, -(0.55 * b + 0.6 * hr))
        rear = o + _rot((-0.95 * a, -0.25 * b), tilt)
    elif pose == "sit":
        ang = -55.0
        a2 = a * 0.85
        _ellipse(body, o, (a2, b), ang)
        rear_low = o + _rot((-a2 * 0.8, 0), ang)
        _ellipse(body, rear_low + (0.1 * a, 0.05 * b), (0.42 * a, 0.7 * b), 0)  # haunch
        ground = rear_low[1] + 0.7 * b
        front = o + _rot((a2 * 0.55, b * 0.6), ang)
        for dx, dst in ((0.0, legs), (-0.18 * a, far)):
            top = front + (dx, 0)
            foot = np.array([top[0] + 0.05 * a, ground])
            _stroke(dst, [top, foot], leg_r * 1.05, leg_r * 0.85)
            _ellipse(dst, foot + (leg_r * 0.5, -leg_r * 0.2), (leg_r * 1.15, leg_r * 0.65), 0)
        _ellipse(legs, np.array([rear_low[0] + 0.35 * a, ground - leg_r * 0.5]), (leg_r * 1.6, leg_r * 0.7), 0)
        neck0 = o + _rot((a2 * 0.85, 0), ang)
        head_c = neck0 + (0.2 * hr, -0.75 * hr)
        rear = rear_low + (-0.1 * a, 0.4 * b)
    else:  # lie
        a2 = a * 1.05
        _ellipse(body, o, (a2, b * 0.85), 0)
        _ellipse(body, o + (-0.55 * a, 0.15 * b), (0.4 * a, 0.65 * b), -5)  # haunch
        ground = o[1] + 0.85 * b
        for dy, dst in ((0.0, legs), (-0.25 * b, far)):
            top = o + (0.55 * a, 0.45 * b + dy)
            paw = np.array([top[0] + legs_len * 0.9 + 0.2 * a, ground - leg_r + dy])
            _stroke(dst, [top, paw], leg_r * 1.1, leg_r * 0.9)
        _ellipse(legs, o + (-0.25 * a, ground - o[1] - leg_r * 0.6), (leg_r * 1.8, leg_r * 0.7), 0)
        neck0 = o + (0.8 * a2, -0.35 * b)
        head_c = neck0 + (0.35 * hr, -(0.3 * b + 0.45 * hr))
        rear = o + (-0.95 * a2, -0.1 * b)

    head_c = head_c + rng.normal(0, 0.08, 2) * hr
    _stroke(body, [neck0, head_c], 0.8 * hr, 0.7 * hr)
    # white chest / bib
    _ellipse(chest, neck0 + (0.1 * hr, 0.2 * b), (0.55 * hr, 0.9 * hr), -20)

    # head: cats round, dogs slightly long with a muzzle
    if species == 0:
        _ellipse(head, head_c, (hr * 1.0, hr * 0.9), 0)
        _ellipse(head, head_c + (0.0, 0.35 * hr), (hr * 1.08, hr * 0.62), 0)  # cheeks
    else:
        _ellipse(head, head_c, (hr * 1.0, hr * 0.95), 0)
    muzzle_len = look.snout * hr
    drop = 0.35 if species == 1 else 0.3
    sn_c = head_c + (0.55 * hr + 0.5 * muzzle_len, drop * hr)
    if muzzle_len > 0.05 * hr:
        _ellipse(snout, sn_c, (0.45 * hr + 0.55 * muzzle_len, hr * (0.42 if species == 1 else 0.32)),
                 float(rng.uniform(0, 12)))
    nose_c = sn_c + (0.4 * hr + 0.5 * muzzle_len, -0.12 * hr)
    if muzzle_len <= 0.05 * hr:
        nose_c = head_c + (0.6 * hr, 0.15 * hr)

    # ears
    for k, centre_deg in enumerate((-62.0, -118.0)):
        c = centre_deg + rng.normal(0, 5)
        dst = ears
        if look.ears in ("pointed", "big_pointed", "small_pointed", "erect"):
            length = {"pointed": 0.75, "big_pointed": 1.0, "small_pointed": 0.45, "erect": 0.8}[look.ears]
            half = {"pointed": 22.0, "big_pointed": 24.0, "small_pointed": 22.0, "erect": 30.0}[look.ears]
            base0 = head_c + hr * 0.92 * _rot((1, 0), c - half)
            base1 = head_c + hr * 0.92 * _rot((1, 0), c + half)
            tip = head_c + hr * (0.9 + length) * _rot((1, 0), c + (8 if k == 0 else -8))
            tri = np.array([base0, tip, base1])
            if look.ears == "erect":  # rounder tip: stroke round the outline too
                _stroke(dst, [base0, tip, base1], 0.12 * hr, 0.12 * hr)
            _poly(dst, tri)
            inner = (tri - tri.mean(0)) * 0.55 + tri.mean(0) + (0, 0.08 * hr)
            _poly(inner_ear, inner)
        else:
            root = head_c + hr * 0.85 * _rot((1, 0), c + (15 if k == 0 else -15))
            if look.ears == "rose":
                tip = root + _rot((0.55 * hr, 0), c + (70 if k == 0 else -70))
                _stroke(dst, [root, tip], 0.28 * hr, 0.2 * hr)
            else:
                hang = (1.05 if look.ears == "floppy" else 1.7) * hr
                side = 1 if k == 0 else -1
                lobe_c = root + (side * 0.25 * hr, 0.55 * hang)
                _ellipse(dst, lobe_c, (0.36 * hr, 0.6 * hang), float(side * rng.uniform(8, 25)))

    # tail
    tstart = rear
    if look.tail == "thin":
        p1 = tstart + a * np.array([-0.55, 0.15]) + rng.normal(0, 0.1, 2) * a
        p2 = tstart + a * np.array([-0.75, -0.75]) + rng.normal(0, 0.15, 2) * a
        _stroke(tail, _bezier(tstart, p1, p2), 0.16 * b, 0.1 * b)
    elif look.tail == "bushy":
        p1 = tstart + a * np.array([-0.6, 0.1]) + rng.normal(0, 0.1, 2) * a
        p2 = tstart + a * np.array([-0.85, -0.5]) + rng.normal(0, 0.15, 2) * a
        _stroke(tail, _bezier(tstart, p1, p2), 0.2 * b, 0.3 * b)
    elif look.tail == "plume":
        p1 = tstart + a * np.array([-0.45, 0.0])
        p2 = tstart + a * np.array([-0.85, 0.35]) + rng.normal(0, 0.1, 2) * a
        _stroke(tail, _bezier(tstart, p1, p2), 0.17 * b, 0.13 * b)
    elif look.tail == "curl":
        cc = tstart + np.array([-0.05 * a, -0.55 * b])
        th = np.deg2rad(np.linspace(100, -200, 20))
        rad = 0.45 * b
        loop = cc + np.stack([rad * np.cos(th) * 1.2, rad * np.sin(th)], 1)
        _stroke(tail, np.vstack([tstart, loop]), 0.22 * b, 0.18 * b)
    elif look.tail == "straight":
        ang = rng.uniform(-70, -20)
        end = tstart + _rot((-0.65 * a, 0), -ang)
        mid = (tstart + end) / 2 + rng.normal(0, 0.06, 2) * a
        _stroke(tail, _bezier(tstart, mid, end), 0.12 * b, 0.06 * b)
    else:  # short
        end = tstart + _rot((-0.22 * a, 0), 30)
        _stroke(tail, [tstart, end], 0.12 * b, 0.1 * b)

    # --- combine ------------------------------------------------------------------------------------
    f = {k: v.astype(np.float32) / 255 for k, v in dict(
        body=body, far=far, legs=legs, head=head, snout=snout, ears=ears, inner=inner_ear, tail=tail,
        chest=chest).items()}
    alpha = np.maximum.reduce([f["body"], f["far"], f["legs"], f["head"], f["snout"], f["ears"], f["tail"]])
    ys, xs = np.nonzero(alpha > 0.02)
    pad = int(0.3 * a)
    y0, y1 = max(0, ys.min() - pad), min(size, ys.max() + pad + 1)
    x0, x1 = max(0, xs.min() - pad), min(size, xs.max() + pad + 1)
    f = {k: v[y0:y1, x0:x1] for k, v in f.items()}
    alpha = alpha[y0:y1, x0:x1]
    o = o - (x0, y0)
    head_c, nose_c, sn_c = head_c - (x0, y0), nose_c - (x0, y0), sn_c - (x0, y0)
    h, w = alpha.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    xn, yn = (xx - o[0]) / a, (yy - o[1]) / a

    base, second, third = (_jitter(rng, c, 0.08) for c in (look.base, look.second, look.third))
    col = base[None, None] * (1 + 0.1 * _smooth(rng, h, w, 4))[..., None]

    def mix(m: np.ndarray, c: np.ndarray) -> None:
        nonlocal col
        col = col * (1 - m[..., None]) + c[None, None] * m[..., None]

    tex = look.texture
    if tex in ("stripes", "brindle"):
        period = (0.3 if tex == "stripes" else 0.12) * rng.uniform(0.85, 1.15)
        warp = (1.2 if tex == "stripes" else 2.0) * _smooth(rng, h, w, 3)
        phase = 2 * np.pi * (xn + 0.25 * yn * rng.uniform(-1, 1)) / period + warp
        strength = 0.7 if tex == "stripes" else 0.5
        mix(strength * _sig((np.sin(phase) - 0.35) * 5), second)
    elif tex in ("spots", "rosettes"):
        spots = np.zeros((h, w), np.uint8)
        centres = np.zeros((h, w), np.uint8)
        n = int(rng.integers(28, 46))
        for _ in range(n):
            c = o + (rng.uniform(-1.1, 1.1) * a, rng.uniform(-1.0, 1.2) * b * 1.3)
            r = a * rng.uniform(0.06, 0.1)
            ang = float(rng.uniform(0, 180))
            _ellipse(spots, c, (r, r * rng.uniform(0.6, 1.0)), ang)
            if tex == "rosettes":
                _ellipse(centres, c, (r * 0.55, r * 0.45), ang)
        mix(spots.astype(np.float32) / 255 * 0.9, second)
        if tex == "rosettes":
            mix(centres.astype(np.float32) / 255 * 0.8, base * 0.72 + second * 0.1)
    elif tex == "patches":
        p = _smooth(rng, h, w, 3.5) + 0.35 * _smooth(rng, h, w, 9)
        mix(_sig((p - 0.3) * 6), second)
    elif tex == "tricolor":
        back = _sig((-(yn / look.body) - 0.15 + 0.35 * _smooth(rng, h, w, 3)) * 8) * f["body"]
        mix(np.clip(back, 0, 1), second)
        white = np.clip(f["legs"] + f["far"] + f["snout"] * 0.9 + f["chest"], 0, 1)
        white *= _sig((yn - 0.1) * 6) * 0.5 + 0.5
        mix(np.clip(white, 0, 1) * 0.95, third)
    elif tex == "points":
        r = np.sqrt((xn / 1.0) ** 2 + (yn / (look.body * 1.4)) ** 2)
        ext = _sig((r - 1.15) * 5)
        ext = np.maximum(ext, np.maximum.reduce([f["ears"], f["tail"] * 0.9, f["snout"] * 0.85]))
        face = np.exp(-(((xx - nose_c[0]) ** 2 + (yy - nose_c[1]) ** 2) / (2 * (0.55 * hr) ** 2)))
        ext = np.maximum(ext, 0.85 * face * f["head"])
        mix(np.clip(ext, 0, 1), second)
    elif tex == "saddle":
        back = _sig((-(yn / look.body) - 0.1 + 0.4 * _smooth(rng, h, w, 4)) * 5)
        mix(back * 0.85 * (1 - f["legs"]), second)
    elif tex == "ticked":
        grain = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), 0.35 * scale)
        mix(np.clip(0.45 * grain, 0, 0.7), second)
    elif tex == "skin":
        wrinkle = np.sin(yn * 38 + 2 * _smooth(rng, h, w, 5)) * _sig(_smooth(rng, h, w, 3) * 2)
        col *= (1 - 0.1 * np.clip(wrinkle, 0, 1))[..., None]
        mix(0.6 * _sig((_smooth(rng, h, w, 4) - 0.6) * 5), second)

    if look.white > 0:
        paws = (f["legs"] + f["far"]) * _sig(((yy - o[1]) / b - (1.0 + 0.8 * look.legs)) * 5)
        mix(np.clip(look.white * (f["chest"] * (1 - f["head"] * 0.5) + paws), 0, 1) * 0.95, third)
    if look.dark_face:
        mask = np.maximum(f["snout"], np.exp(-(((xx - nose_c[0]) ** 2 + (yy - nose_c[1]) ** 2)
                                                / (2 * (0.5 * hr) ** 2))) * f["head"])
        mix(0.85 * mask, second)
    ear_col = second if look.dark_ears or tex == "tricolor" else base * 0.8
    if look.ears in ("floppy", "long_floppy", "rose") or look.dark_ears:
        mix(f["ears"] * (1 - f["inner"]) * 0.9, ear_col)
    if species == 0:
        mix(f["inner"] * 0.7, np.array([0.86, 0.6, 0.6], np.float32))

    # --- shading: top-lit, darker rims, head and near legs separated from the body by a soft outline ----
    yr = (yy - yy[alpha > 0.5].min()) / max(1.0, float(np.ptp(yy[alpha > 0.5])))
    shade = 1.12 - 0.3 * yr
    dist = cv2.distanceTransform((alpha > 0.5).astype(np.uint8), cv2.DIST_L2, 3)
    shade *= 0.7 + 0.3 * np.clip(dist / (0.3 * b), 0, 1)
    for part, depth in (("head", 0.3 * hr), ("legs", leg_r)):
        pm = (f[part] > 0.5).astype(np.uint8)
        d = cv2.distanceTransform(pm, cv2.DIST_L2, 3)
        rim = (f[part] > 0.1) & (d < depth)
        shade[rim] *= 0.82 + 0.18 * np.clip(d[rim] / depth, 0, 1)
    shade *= 1 - 0.25 * f["far"] * (1 - f["legs"])
    streak_len = max(3, int(round((3 + 6 * look.fluffy) * scale))) | 1
    streak = cv2.blur(rng.standard_normal((h, w)).astype(np.float32), (1, streak_len))
    shade *= 1 + (0.1 + 0.12 * look.fluffy) * streak
    col = col * shade[..., None]

    # face: eyes and nose (cats: almond, coloured iris and slit pupil; dogs: dark round eyes)
    eye_r = hr * (0.17 if species == 0 else 0.12)
    for dx in (0.45, -0.05):
        ec = head_c + (dx * hr, -0.12 * hr)
        if species == 0:
            iris = _jitter(rng, (170, 190, 60) if rng.random() < 0.6 else (90, 160, 200), 0.1)
            e = np.zeros((h, w), np.uint8)
            _ellipse(e, ec, (eye_r, eye_r * 0.7), 0)
            mix(e.astype(np.float32) / 255, iris)
            e[:] = 0
            _ellipse(e, ec, (eye_r * 0.25, eye_r * 0.65), 0)
            mix(e.astype(np.float32) / 255, np.array([0.05, 0.05, 0.05], np.float32))
        else:
            e = np.zeros((h, w), np.uint8)
            _ellipse(e, ec, (eye_r, eye_r), 0)
            mix(e.astype(np.float32) / 255, np.array([0.12, 0.08, 0.06], np.float32))
            e[:] = 0
            _ellipse(e, ec + (0.3 * eye_r, -0.3 * eye_r), (eye_r * 0.3, eye_r * 0.3), 0)
            mix(e.astype(np.float32) / 255 * 0.8, np.array([0.9, 0.9, 0.9], np.float32))
    nose = np.zeros((h, w), np.uint8)
    if species == 0:
        _poly(nose, np.array([nose_c + (-0.12 * hr, -0.06 * hr), nose_c + (0.12 * hr, -0.06 * hr),
                              nose_c + (0, 0.1 * hr)]))
        mix(nose.astype(np.float32) / 255, np.array([0.8, 0.5, 0.5], np.float32) * (0.6 if tex == "points"
                                                                                   else 1.0))
    else:
        _ellipse(nose, nose_c, (0.2 * hr, 0.14 * hr), 0)
        mix(nose.astype(np.float32) / 255, np.array([0.07, 0.06, 0.06], np.float32))

    if look.fluffy > 0:
        sigma = 0.8 + 1.6 * look.fluffy
        soft = cv2.GaussianBlur(alpha, (0, 0), sigma * scale)
        fur = cv2.blur(rng.standard_normal((h, w)).astype(np.float32), (3, 3))
        alpha = np.clip((soft - 0.5 + 0.25 * look.fluffy * fur) * 4 + 0.5, 0, 1)
        alpha = np.maximum(alpha, (f["head"] > 0.5) * 1.0).astype(np.float32)
    return np.clip(col, 0, 1).astype(np.float32), alpha.astype(np.float32)


# --------------------------------------------------------------------------------------------------
# background, occluders, finishing


def _distractor_palette(breeds: list[int]) -> list[np.ndarray]:
    cols: list[np.ndarray] = []
    for b in breeds:
        look = _LOOKS[BREEDS[b]]
        cols += [np.asarray(c, np.float32) / 255 for c in (look.base, look.second)]
    return cols


def _random_colour(rng: np.random.Generator, palette: list[np.ndarray], p_pet: float = 0.4) -> np.ndarray:
    if palette and rng.random() < p_pet:
        c = palette[int(rng.integers(len(palette)))]
        return np.clip(c * rng.uniform(0.85, 1.15) + rng.normal(0, 0.04, 3), 0, 1).astype(np.float32)
    hue, sat, val = rng.random(), rng.uniform(0.05, 0.85), rng.uniform(0.15, 0.95)
    return np.array(colorsys.hsv_to_rgb(hue, sat, val), np.float32)


def _fill(rng: np.random.Generator, h: int, w: int, palette: list[np.ndarray], kind: str | None = None,
          ref: int | None = None) -> np.ndarray:
    """A textured H×W×3 fill: flat, gradient, noise, stripes, tiles, wood, grass, fur, dots.

    ``ref`` is the length pattern sizes are relative to (the whole image when filling a crop).
    """
    kinds = ["flat", "gradient", "noise", "stripes", "tiles", "wood", "grass", "fur", "dots"]
    kind = kind or kinds[int(rng.integers(len(kinds)))]
    ref = ref or max(h, w)
    c1 = _random_colour(rng, palette)
    c2 = _random_colour(rng, palette)
    out = np.empty((h, w, 3), np.float32)
    if kind == "flat":
        out[:] = c1
    elif kind in ("gradient", "stripes"):
        ang = rng.uniform(0, np.pi)
        proj = (np.arange(w, dtype=np.float32)[None] * np.cos(ang)
                + np.arange(h, dtype=np.float32)[:, None] * np.sin(ang)) / ref
        if kind == "gradient":
            t = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
        else:
            t = _sig(np.sin(2 * np.pi * proj / rng.uniform(0.04, 0.2)) * rng.uniform(2, 10))
        out[:] = c1 * (1 - t[..., None]) + c2 * t[..., None]
    elif kind == "noise":
        n = _smooth(rng, h, w, rng.uniform(3, 14) * max(h, w) / ref)
        out[:] = c1 * (1 + 0.18 * n[..., None]) + 0.05 * rng.standard_normal((h, w, 1)).astype(np.float32)
    elif kind == "tiles":
        p = max(4, int(ref * rng.uniform(0.08, 0.25)))
        yy, xx = np.ogrid[0:h, 0:w]
        line = ((xx % p) < max(1, p // 12)) | ((yy % p) < max(1, p // 12))
        out[:] = c1 * (1 + 0.06 * _smooth(rng, h, w, 8)[..., None])
        out[line] = c1 * 0.55
    elif kind == "wood":
        p = max(4, int(ref * rng.uniform(0.08, 0.2)))
        vertical = rng.random() < 0.5
        coord = np.arange(w)[None] if vertical else np.arange(h)[:, None]
        plank = coord // p
        shades = 1 + 0.12 * rng.standard_normal(int(plank.max()) + 1).astype(np.float32)
        grain = cv2.blur(rng.standard_normal((h, w)).astype(np.float32), (1, 15) if vertical else (15, 1))
        out[:] = c1 * (shades[plank] * (1 + 0.25 * grain))[..., None]
        out[np.broadcast_to((coord % p) < 1, (h, w))] *= 0.6
    elif kind == "grass":
        g = np.array([rng.uniform(0.15, 0.45), rng.uniform(0.35, 0.65), rng.uniform(0.1, 0.3)], np.float32)
        blades = cv2.blur(rng.standard_normal((h, w)).astype(np.float32), (1, 5))
        out[:] = g * (1 + 0.35 * blades[..., None] + 0.15 * _smooth(rng, h, w, 5)[..., None])
    elif kind == "fur":  # pet-coloured, fur-like rug or blanket: a distractor
        c1 = _random_colour(rng, palette, p_pet=0.9)
        streak = cv2.blur(rng.standard_normal((h, w)).astype(np.float32), (1, 7))
        out[:] = c1 * (1 + 0.15 * streak[..., None] + 0.1 * _smooth(rng, h, w, 6)[..., None])
    else:  # dots
        out[:] = c1
        m = np.zeros((h, w), np.uint8)
        r = max(1.0, ref * rng.uniform(0.01, 0.035))
        for _ in range(int(rng.integers(15, 60) * h * w / ref**2) + 1):
            _ellipse(m, (rng.uniform(0, w), rng.uniform(0, h)), (r, r * rng.uniform(0.6, 1)), 0)
        t = m.astype(np.float32)[..., None] / 255
        out[:] = out * (1 - t) + c2 * t
    return out


def _shape_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random clutter shape (rectangle, ellipse, polygon, blob, curve, triangle) as float alpha."""
    m = np.zeros((h, w), np.uint8)
    s = max(h, w)
    kind = int(rng.integers(6))
    c = np.array([rng.uniform(-0.1, 1.1) * w, rng.uniform(-0.1, 1.1) * h])
    r = s * rng.uniform(0.06, 0.35)
    if kind == 0:
        box = cv2.boxPoints(((float(c[0]), float(c[1])), (float(r * 2 * rng.uniform(0.3, 1.5)),
                                                           float(r * 2 * rng.uniform(0.2, 1.2))),
                             float(rng.uniform(-30, 30))))
        _poly(m, box)
    elif kind == 1:
        _ellipse(m, c, (r, r * rng.uniform(0.3, 1.0)), float(rng.uniform(0, 180)))
    elif kind == 2:
        n = int(rng.integers(4, 9))
        th = np.sort(rng.uniform(0, 2 * np.pi, n))
        rad = r * rng.uniform(0.4, 1.0, n)
        _poly(m, c + np.stack([rad * np.cos(th), rad * np.sin(th)], 1))
    elif kind == 3:
        for _ in range(int(rng.integers(3, 7))):
            _ellipse(m, c + rng.normal(0, 0.5, 2) * r, (r * rng.uniform(0.3, 0.6),) * 2, 0)
    elif kind == 4:
        pts = _bezier(c, c + rng.normal(0, 1.0, 2) * r, c + rng.normal(0, 1.5, 2) * r, 12)
        _stroke(m, pts, s * rng.uniform(0.008, 0.03), s * rng.uniform(0.008, 0.03))
    else:
        _poly(m, c + rng.normal(0, 0.8, (3, 2)) * r)
    return m.astype(np.float32) / 255


def _background(rng: np.random.Generator, h: int, w: int, palette: list[np.ndarray]) -> np.ndarray:
    """A cluttered scene: one or two textured regions (wall/floor), then 4-12 textured distractor shapes."""
    img = _fill(rng, h, w, palette)
    if rng.random() < 0.7:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        horizon = h * rng.uniform(0.2, 0.8) + (xx - w / 2) * rng.uniform(-0.3, 0.3)
        lower = _sig((yy - horizon) * 1.5)[..., None]
        img = img * (1 - lower) + _fill(rng, h, w, palette) * lower
    n = int(rng.integers(4, 13))
    ref = max(h, w)
    for _ in range(n):
        m = _shape_mask(rng, h, w)
        x, y, bw, bh = cv2.boundingRect((m > 0).astype(np.uint8))
        if bw == 0 or bh == 0:
            continue
        if rng.random() < 0.4:  # drop shadow, offset down-right
            dx, dy = (int(v) for v in rng.integers(1, max(2, h // 24), 2))
            sh = np.zeros_like(m)
            sh[dy:, dx:] = m[: h - dy, : w - dx]
            img *= (1 - 0.35 * cv2.GaussianBlur(sh, (0, 0), 1.5))[..., None]
        crop = m[y : y + bh, x : x + bw, None]
        fill = _fill(rng, bh, bw, palette, ref=ref) * (1 + 0.15 * _smooth(rng, bh, bw, 2))[..., None]
        img[y : y + bh, x : x + bw] = img[y : y + bh, x : x + bw] * (1 - crop) + fill * crop
    return np.clip(img, 0, 1).astype(np.float32)


def _occluder(rng: np.random.Generator, h: int, w: int, pet: np.ndarray, palette: list[np.ndarray]
              ) -> tuple[np.ndarray, np.ndarray] | None:
    """A post, rail, plant or object in front of the pet covering ~5-45 % of it, or None."""
    ys, xs = np.nonzero(pet)
    if len(ys) == 0:
        return None
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    total = float(len(ys))
    for _ in range(6):
        m = np.zeros((h, w), np.uint8)
        kind = int(rng.integers(4))
        if kind == 0:  # post
            cx = rng.uniform(x0 + 0.15 * (x1 - x0), x1 - 0.15 * (x1 - x0))
            half = max(1.5, w * rng.uniform(0.03, 0.07))
            slant = rng.uniform(-0.15, 0.15) * h
            _poly(m, np.array([[cx - half + slant, -1], [cx + half + slant, -1], [cx + half - slant, h + 1],
                               [cx - half - slant, h + 1]]))
            fill = _fill(rng, h, w, palette, "wood" if rng.random() < 0.6 else "flat")
        elif kind == 1:  # rail
            cy = rng.uniform(y0 + 0.2 * (y1 - y0), y1 - 0.2 * (y1 - y0))
            half = max(1.5, h * rng.uniform(0.025, 0.055))
            slant = rng.uniform(-0.1, 0.1) * w
            _poly(m, np.array([[-1, cy - half - slant], [w + 1, cy - half + slant], [w + 1, cy + half + slant],
                               [-1, cy + half - slant]]))
            fill = _fill(rng, h, w, palette, "wood" if rng.random() < 0.5 else "gradient")
        elif kind == 2:  # plant: stem and leaves
            base = np.array([rng.uniform(x0, x1), h + 2])
            top = np.array([base[0] + rng.normal(0, 0.1) * w, rng.uniform(y0, (y0 + y1) / 2)])
            _stroke(m, [base, top], max(1.0, w * 0.012), max(1.0, w * 0.008))
            for t in rng.uniform(0.2, 1.0, int(rng.integers(4, 8))):
                p = base + t * (top - base)
                leaf_len = w * rng.uniform(0.05, 0.11)
                ang = rng.uniform(-160, -20)
                _ellipse(m, p + _rot((leaf_len, 0), ang), (leaf_len, leaf_len * 0.35), float(ang))
            fill = _fill(rng, h, w, palette, "grass")
        else:  # object (ball, box, bowl) in front of the pet's lower part, sometimes pet-coloured
            c = np.array([rng.uniform(x0, x1), rng.uniform((y0 + y1) / 2, y1)])
            r = max(2.0, rng.uniform(0.2, 0.4) * min(x1 - x0, y1 - y0 + 1))
            if rng.random() < 0.5:
                _ellipse(m, c, (r, r * rng.uniform(0.6, 1.0)), float(rng.uniform(0, 180)))
            else:
                _poly(m, cv2.boxPoints(((float(c[0]), float(c[1])), (float(2 * r), float(1.6 * r)),
                                        float(rng.uniform(-20, 20)))))
            fill = _fill(rng, h, w, palette, ["flat", "stripes", "dots", "noise"][int(rng.integers(4))])
        occ = m.astype(np.float32) / 255
        covered = float((pet & (occ >= 0.5)).sum()) / total
        if 0.04 <= covered <= 0.45:
            shade = 1 + 0.12 * _smooth(rng, h, w, 2)
            return np.clip(fill * shade[..., None], 0, 1), occ
    return None


def _finish(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Camera effects: exposure/colour cast, vignetting, mild blur, noise, sometimes a JPEG round trip."""
    h, w = img.shape[:2]
    img = img * rng.uniform(0.85, 1.15) * rng.uniform(0.93, 1.07, 3).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((xx - w / 2) / w) ** 2 + ((yy - h / 2) / h) ** 2
    img = img * (1 - rng.uniform(0, 0.35) * r2)[..., None]
    if rng.random() < 0.5:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 0.8))
    img = img + rng.normal(0, rng.uniform(0.005, 0.025), img.shape).astype(np.float32)
    out = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    if rng.random() < 0.25:
        buf = io.BytesIO()
        Image.fromarray(out).save(buf, format="JPEG", quality=int(rng.integers(45, 85)))
        out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return np.ascontiguousarray(out)
