"""Turn dataset roots into ``data/prepared/``: resized RGB images, 0/1/255 masks and the manifest.

Output layout::

    <out_dir>/images/<id>.jpg      RGB JPEG (quality 95), longest side <= max_side (never upscaled)
    <out_dir>/masks/<id>.png       0 background, 1 pet, 255 border/ignore (main-root pets only; none for
                                   an all-border trimap: such a test image is excluded)
    <out_dir>/manifest.parquet     see :mod:`wsss.data.manifest`

Everything is built in a hidden sibling folder and swapped in at the end, so a killed run never leaves a
half-written ``out_dir``; stale folders of killed runs are removed (or, if the swap itself was cut, the
previous output restored) at the start of the next run. Bad input never crashes the run and never passes
silently: each problem becomes an entry of :attr:`PrepareResult.issues`.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from wsss.config import PrepareConfig
from wsss.data.images import ImageIssue, decode_image, issue, read_trimap
from wsss.data.manifest import SOURCES, SPLITS, empty_manifest, normalise, save_manifest
from wsss.data.oxford_pet import check_root, read_split_files, trimap_to_mask
from wsss.data.stanford_background import list_background_images
from wsss.errors import DataError
from wsss.io import pid_alive, remove_tree

JPEG_QUALITY = 95
_TMP_TAG = ".tmp-"
_OLD_TAG = ".old-"


@dataclass
class PrepareResult:
    """What :func:`prepare_dataset` produced.

    Attributes:
        manifest: the written manifest (schema of :mod:`wsss.data.manifest`).
        issues: ``{"file", "reason", "action"}`` with action ``excluded`` | ``converted`` | ``ignored``.
        counts: images per split and per source, plus ``excluded``, ``converted``, ``ignored``, ``total``.
    """

    manifest: pd.DataFrame
    issues: list[dict[str, str]]
    counts: dict[str, int]


@dataclass(frozen=True)
class _Item:
    id: str
    source: str  # pets | extra | background
    group: str  # trainval | test | extra | background: decides the split
    species: int
    breed: int
    image: Path
    trimap: Path | None
    needs_mask: bool


# --------------------------------------------------------------------------------------------------
# resizing and splitting


def target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Size after shrinking so the longest side is ``max_side`` (never upscales; 0 keeps the size)."""
    longest = max(width, height)
    if max_side <= 0 or longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _allocate(sizes: dict[int, int], total: int, rng: np.random.Generator) -> dict[int, int]:
    """Split ``total`` val slots over groups proportionally to their sizes, keeping one per group in train.

    Fractional quotas are rounded by systematic sampling in a random order, so every group with >= 2
    members gets its extra slot with probability equal to its fractional quota and the sum is exact.
    """
    caps = {g: n - 1 for g, n in sizes.items() if n >= 2}
    total = min(total, sum(caps.values()))
    quota: dict[int, float] = {g: 0.0 for g in caps}
    free, remaining = set(caps), float(total)
    while free:  # proportional shares, capped (water filling)
        weight = sum(sizes[g] for g in free)
        share = {g: remaining * sizes[g] / weight for g in free}
        over = [g for g in free if share[g] >= caps[g]]
        if not over:
            quota.update(share)
            break
        for g in over:
            quota[g] = float(caps[g])
            remaining -= caps[g]
            free.discard(g)
    alloc = {g: min(caps[g], int(math.floor(q + 1e-9))) for g, q in quota.items()}
    frac = {g: max(0.0, quota[g] - alloc[g]) if alloc[g] < caps[g] else 0.0 for g in caps}
    extra = total - sum(alloc.values())
    if extra > 0:
        order = [int(g) for g in rng.permutation(sorted(caps))]
        u, cum, picked = float(rng.random()), 0.0, []
        for g in order:
            lo, cum = cum, cum + frac[g]
            # points u, u+1, ... falling in [lo, cum): at most one, since frac < 1
            if math.ceil(cum - u) - math.ceil(lo - u) > 0:
                picked.append(g)
        # float error can leave the count off by one: fix with the largest remaining fractions
        picked = picked[:extra]
        rest = sorted((g for g in order if g not in picked and frac[g] > 0), key=lambda g: -frac[g])
        picked += rest[: extra - len(picked)]
        for g in picked:
            alloc[g] += 1
    return alloc


def stratified_val_mask(groups: Sequence[int], fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Pick a validation subset of size ``round(fraction * n)``, stratified by group (breed).

    Groups with a single member always stay in train; every other group keeps at least one member in
    train and contributes proportionally to its size.

    Args:
        groups: one group id per item (in a deterministic order).
        fraction: share of items to put in validation.
        rng: seeded generator.

    Returns:
        Boolean array, True = validation.
    """
    groups = np.asarray(groups, dtype=np.int64)
    mask = np.zeros(len(groups), dtype=bool)
    total = _round_half_up(fraction * len(groups))
    if total <= 0:
        return mask
    members = {int(g): np.flatnonzero(groups == g) for g in np.unique(groups)}
    alloc = _allocate({g: len(idx) for g, idx in members.items()}, total, rng)
    for g in sorted(alloc):
        if alloc[g] > 0:
            mask[rng.choice(members[g], size=alloc[g], replace=False)] = True
    return mask


def random_val_mask(n: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A seeded random validation subset of size ``round(fraction * n)`` (True = validation)."""
    mask = np.zeros(n, dtype=bool)
    k = min(n, _round_half_up(fraction * n))
    if k > 0:
        mask[rng.choice(n, size=k, replace=False)] = True
    return mask


# --------------------------------------------------------------------------------------------------
# the temporary build folder


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        remove_tree(path, path.parent, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _siblings(out_dir: Path, tag: str) -> list[tuple[Path, int]]:
    """Hidden ``.<name><tag><pid>-<token>`` siblings of ``out_dir`` with the pid that made them."""
    prefix = f".{out_dir.name}{tag}"
    found = []
    with contextlib.suppress(FileNotFoundError):
        for p in out_dir.parent.iterdir():
            if p.name.startswith(prefix):
                pid_s = p.name[len(prefix) :].split("-", 1)[0]
                found.append((p, int(pid_s) if pid_s.isdigit() else -1))
    return sorted(found)


def _cleanup_stale(out_dir: Path) -> None:
    """Remove build folders of killed runs; restore the previous output if a swap was cut short."""
    me = os.getpid()
    for path, pid in _siblings(out_dir, _TMP_TAG):
        if pid != me and pid > 0 and pid_alive(pid):
            continue  # another live process is building; leave it alone
        _remove(path)
    olds = [p for p, pid in _siblings(out_dir, _OLD_TAG) if pid == me or pid <= 0 or not pid_alive(pid)]
    if olds and not out_dir.exists():
        # killed between "move old away" and "move new in": the old output is still complete
        restore = max(olds, key=lambda p: p.stat().st_mtime)
        os.replace(restore, out_dir)
        olds.remove(restore)
    for path in olds:
        _remove(path)


def _swap_in(tmp: Path, out_dir: Path) -> None:
    old: Path | None = None
    if out_dir.exists() or out_dir.is_symlink():
        old = out_dir.parent / f".{out_dir.name}{_OLD_TAG}{os.getpid()}-{secrets.token_hex(4)}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        _remove(old)


# --------------------------------------------------------------------------------------------------
# one image


def _mask_stats(mask: np.ndarray | None) -> dict[str, Any]:
    if mask is None:
        return {"fg_fraction": -1.0, "border_fraction": -1.0, "mask_values": ""}
    total = int(mask.size)
    ignored = int(np.count_nonzero(mask == 255))
    valid = total - ignored
    fg = int(np.count_nonzero(mask == 1))
    return {
        "fg_fraction": fg / valid if valid else 0.0,
        "border_fraction": ignored / total if total else 0.0,
        "mask_values": ",".join(str(int(v)) for v in np.unique(mask)),
    }


def _process(
    item: _Item, tmp: Path, cfg: PrepareConfig, issues: list[dict[str, str]]
) -> dict[str, Any] | None:
    """Decode, check, resize and write one image (and mask); None (with an issue) if excluded."""
    if item.needs_mask and item.trimap is None:
        issues.append(issue(item.image, f"no trimap annotations/trimaps/{item.image.stem}.png", "excluded"))
        return None
    try:
        decoded = decode_image(item.image, max_pixels=cfg.max_pixels, min_side=cfg.min_side)
        mask = None
        if item.needs_mask:
            assert item.trimap is not None
            trimap = read_trimap(item.trimap, max_pixels=cfg.max_pixels)
            if trimap.shape != decoded.array.shape[:2]:
                raise ImageIssue(
                    item.trimap,
                    f"trimap size {trimap.shape[1]}x{trimap.shape[0]} differs from the image size "
                    f"{decoded.width}x{decoded.height}",
                )
            mask = trimap_to_mask(trimap, item.trimap)
    except ImageIssue as exc:
        issues.append(issue(exc.path, exc.reason, "excluded"))
        return None

    ow, oh = decoded.width, decoded.height
    w, h = target_size(ow, oh, cfg.max_side)
    if min(w, h) < cfg.min_side:
        issues.append(
            issue(
                item.image,
                f"extreme aspect ratio: {ow}x{oh} becomes {w}x{h}, below min_side={cfg.min_side}",
                "excluded",
            )
        )
        return None
    if mask is not None and (w, h) != (ow, oh):
        mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.Resampling.NEAREST))
    if mask is not None and not np.any(mask != 255):
        # Nothing to score or supervise against. A trainval image keeps its breed label, so it stays for
        # classification without a mask; a test image is scored only with its mask, so it goes.
        why = f"mask is all border/ignore (255) at {w}x{h}: no pet or background pixel"
        if item.group == "test":
            issues.append(issue(item.trimap or item.image, f"{why}; a test image needs one, excluded", "excluded"))
            return None
        issues.append(issue(item.trimap or item.image, f"{why}; mask dropped, image kept", "excluded"))
        mask = None
    img = Image.fromarray(decoded.array)
    if (w, h) != (ow, oh):
        img = img.resize(
            (w, h), Image.Resampling.BILINEAR
        )  # PIL widens the filter when shrinking (area-like)
    # Plain writes are fine inside the temporary build folder: it only becomes visible when complete.
    img.save(tmp / "images" / f"{item.id}.jpg", format="JPEG", quality=JPEG_QUALITY)
    mask_path = ""
    if mask is not None:
        mask_path = f"masks/{item.id}.png"
        Image.fromarray(mask).save(tmp / mask_path, format="PNG")
    if decoded.notes:
        issues.append(issue(item.image, "; ".join(decoded.notes), "converted"))
    return {
        "id": item.id,
        "split": "",
        "source": item.source,
        "species": item.species,
        "breed": item.breed,
        "is_background": item.source == "background",
        "has_mask": mask is not None,
        "width": w,
        "height": h,
        "orig_width": ow,
        "orig_height": oh,
        "image_path": f"images/{item.id}.jpg",
        "mask_path": mask_path,
        "_group": item.group,
        **_mask_stats(mask),
    }


# --------------------------------------------------------------------------------------------------
# collecting the inputs


def _collect(
    main_root: Path, extra_roots: Sequence[Path], background_root: Path | None, issues: list[dict[str, str]]
) -> list[_Item]:
    check_root(main_root)
    if not (main_root / "annotations" / "trimaps").is_dir():
        raise DataError(
            f"{main_root}: annotations/trimaps/ is missing; the main root needs trimaps "
            "(pass label-only Oxford-layout roots as extra roots instead)"
        )
    items: list[_Item] = []
    taken: dict[str, str] = {}  # lower-cased id -> where it came from (case-insensitive file systems)

    def claim(item: _Item, origin: str) -> bool:
        key = item.id.lower()
        if key in taken:
            issues.append(
                issue(item.image, f"id '{item.id}' clashes with {taken[key]}; excluded", "excluded")
            )
            return False
        taken[key] = origin
        items.append(item)
        return True

    records, found = read_split_files(main_root)
    issues.extend(found)
    main_names = set()
    for r in records:
        item = _Item(r.name, "pets", r.split, r.species, r.breed, r.image, r.trimap, True)
        if claim(item, f"{r.image} (main root)"):
            main_names.add(r.name)

    seen_extra: dict[str, str] = {}
    for k, root in enumerate(extra_roots, start=1):
        records, found = read_split_files(Path(root))
        issues.extend(found)
        for r in records:
            if r.name in main_names:
                issues.append(
                    issue(
                        r.image,
                        f"{r.name} is also in the main root {main_root}; duplicate excluded",
                        "excluded",
                    )
                )
                continue
            if r.name in seen_extra:
                issues.append(
                    issue(
                        r.image,
                        f"{r.name} is also in extra root {seen_extra[r.name]}; duplicate excluded",
                        "excluded",
                    )
                )
                continue
            item = _Item(f"x{k}_{r.name}", "extra", "extra", r.species, r.breed, r.image, None, False)
            if claim(item, f"{r.image} (extra root {k})"):
                seen_extra[r.name] = str(root)

    if background_root is not None:
        paths, found = list_background_images(Path(background_root))
        issues.extend(found)
        for p in paths:
            claim(
                _Item(f"bg_{p.stem}", "background", "background", -1, -1, p, None, False), f"{p} (background)"
            )
    return items


def _assign_splits(df: pd.DataFrame, cfg: PrepareConfig, seed: int) -> pd.DataFrame:
    df = df.sort_values("id", kind="stable").reset_index(drop=True)
    split = pd.Series("train", index=df.index, dtype=object)
    split[df["_group"] == "test"] = "test"
    trainval = df.index[df["_group"] == "trainval"]
    if len(trainval):
        val = stratified_val_mask(
            df.loc[trainval, "breed"].to_numpy(), cfg.val_fraction, np.random.default_rng(seed)
        )
        split[trainval[val]] = "val"
    bg = df.index[df["_group"] == "background"]
    if len(bg):
        # a separate stream: adding background images must not change the pets' split
        val = random_val_mask(len(bg), cfg.background_val_fraction, np.random.default_rng([seed, 1]))
        split[bg[val]] = "val"
    df["split"] = split
    return df.drop(columns="_group")


def _counts(df: pd.DataFrame, issues: list[dict[str, str]]) -> dict[str, int]:
    counts = {s: int((df["split"] == s).sum()) for s in SPLITS}
    counts.update({s: int((df["source"] == s).sum()) for s in SOURCES})
    for action in ("excluded", "converted", "ignored"):
        counts[action] = sum(1 for i in issues if i["action"] == action)
    counts["total"] = len(df)
    return counts


# --------------------------------------------------------------------------------------------------
# entry point


def prepare_dataset(
    main_root: Path,
    out_dir: Path,
    cfg: PrepareConfig,
    seed: int,
    extra_roots: Sequence[Path] = (),
    background_root: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PrepareResult:
    """Prepare images, masks and the manifest from an Oxford-layout root (plus optional extra sources).

    Args:
        main_root: Oxford-IIIT Pet layout root with trimaps: trainval -> train/val (seeded, stratified by
            breed), test -> test.
        out_dir: the prepared folder (replaced atomically).
        cfg: resizing, size limits and validation fractions.
        seed: seed of the validation splits.
        extra_roots: label-only Oxford-layout roots; all their listed images go to train (ids ``x<k>_NAME``).
        background_root: Stanford Background root (or folder of images); ids ``bg_<stem>``.
        progress: called as ``progress(done, total)`` after each image.

    Returns:
        The manifest, the issues found and the counts.

    Raises:
        DataError: the main root (or an extra/background root) is missing or has no split files, or no
            main-root image is usable.
    """
    main_root, out_dir = Path(main_root), Path(out_dir)
    issues: list[dict[str, str]] = []
    items = _collect(main_root, [Path(r) for r in extra_roots], background_root, issues)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _cleanup_stale(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}{_TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        (tmp / "images").mkdir(parents=True)
        (tmp / "masks").mkdir()
        rows: list[dict[str, Any]] = []
        if progress is not None:
            progress(0, len(items))
        for done, item in enumerate(items, start=1):
            row = _process(item, tmp, cfg, issues)
            if row is not None:
                rows.append(row)
            if progress is not None:
                progress(done, len(items))
        if not any(r["source"] == "pets" for r in rows):
            excluded = [i for i in issues if i["action"] == "excluded"][:3]
            detail = "; ".join(f"{i['file']}: {i['reason']}" for i in excluded)
            raise DataError(
                f"{main_root}: no usable image in the main root" + (f" (e.g. {detail})" if detail else "")
            )
        df = _assign_splits(pd.DataFrame(rows), cfg, seed) if rows else empty_manifest()
        df = normalise(df)
        save_manifest(df, tmp / "manifest.parquet")
        _swap_in(tmp, out_dir)
    except BaseException:
        _remove(tmp)
        raise
    return PrepareResult(manifest=df, issues=issues, counts=_counts(df, issues))
