"""Read an Oxford-IIIT Pet layout root: split files, image/trimap pairing, trimap -> mask.

Layout (torchvision's ``OxfordIIITPet`` on-disk form)::

    <root>/images/<NAME>.jpg
    <root>/annotations/trimaps/<NAME>.png        (optional for label-only roots)
    <root>/annotations/trainval.txt, test.txt    lines: NAME CLASS-ID SPECIES BREED-ID

Split files are parsed defensively: every malformed line becomes an issue, never an exception. Images
and trimaps are paired by NAME (file stem), never by listing order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsss.data.breeds import BREED_SPECIES, BREEDS, NUM_BREEDS
from wsss.data.images import IMAGE_EXTENSIONS, ImageIssue, is_image_name
from wsss.data.images import issue as _issue
from wsss.errors import DataError

SPLIT_FILES: dict[str, str] = {"trainval": "trainval.txt", "test": "test.txt"}
# Oxford split files: SPECIES 1 = cat, 2 = dog; our species index is 0 cat, 1 dog.
_SPECIES_FIELD = {1: 0, 2: 1}
_SPECIES_NAMES = ("cat", "dog")
# BREED-ID in the split files counts breeds within one species, in BREEDS order (1-based).
_BREED_ID_IN_SPECIES: tuple[int, ...] = tuple(
    sum(1 for j in range(i + 1) if BREED_SPECIES[j] == BREED_SPECIES[i]) for i in range(NUM_BREEDS)
)
_TRIMAP_LUT = np.full(256, 255, dtype=np.uint8)
_TRIMAP_LUT[1] = 1  # pet
_TRIMAP_LUT[2] = 0  # background
_TRIMAP_LUT[3] = 255  # border: ignored in training and evaluation
# The reason of the issue for a trimap whose NAME has no image file (the stage counts these).
ORPHAN_TRIMAP = "orphan trimap: no image file with this NAME in images/"


@dataclass(frozen=True)
class SplitEntry:
    """One valid line of a split file."""

    name: str
    split: str  # 'trainval' | 'test'
    breed: int  # 0..36
    species: int  # 0 cat, 1 dog
    line: int


@dataclass(frozen=True)
class PetRecord:
    """A listed image found on disk.

    Attributes:
        name: the NAME from the split file (= the image's file stem).
        split: ``trainval`` or ``test``.
        breed: 0..36 index into :data:`~wsss.data.breeds.BREEDS` (CLASS-ID - 1).
        species: 0 cat, 1 dog.
        image: path of the image file.
        trimap: path of ``annotations/trimaps/<NAME>.png``, or None if there is none.
    """

    name: str
    split: str
    breed: int
    species: int
    image: Path
    trimap: Path | None


def check_root(root: Path) -> None:
    """Raise a clear :class:`DataError` unless ``root`` looks like an Oxford-IIIT Pet layout root."""
    root = Path(root)
    if not root.exists():
        raise DataError(
            f"{root}: dataset root not found (expected an Oxford-IIIT Pet folder holding images/ and "
            "annotations/trainval.txt, annotations/test.txt)"
        )
    if not root.is_dir():
        raise DataError(f"{root}: dataset root is not a folder")
    ann = root / "annotations"
    if not any((ann / f).is_file() for f in SPLIT_FILES.values()):
        raise DataError(
            f"{root}: no split files: neither {ann / 'trainval.txt'} nor {ann / 'test.txt'} exists "
            "(lines: NAME CLASS-ID SPECIES BREED-ID)"
        )
    if not (root / "images").is_dir():
        raise DataError(f"{root}: the images/ folder is missing ({root / 'images'})")


def _valid_name(name: str) -> str | None:
    """Why ``name`` cannot be an image stem, or None if it can."""
    if "\ufffd" in name:
        return "NAME contains bytes that are not valid UTF-8"
    if "/" in name or "\\" in name or "\x00" in name or name in (".", ".."):
        return "NAME must be a plain file stem (no path separators)"
    if name.startswith("."):
        return "NAME must not start with '.'"
    return None


def parse_split_file(path: Path, split: str) -> tuple[list[SplitEntry], list[dict[str, str]]]:
    """Parse one split file; malformed lines become issues.

    Args:
        path: ``trainval.txt`` or ``test.txt``.
        split: ``trainval`` or ``test``.

    Returns:
        The valid entries (in file order, later duplicates removed) and the issues found.
    """
    issues: list[dict[str, str]] = []
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        return [], [_issue(path, f"cannot read split file ({exc.strerror or exc})", "excluded")]
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        text = raw.decode("utf-8-sig", errors="replace")
        issues.append(
            _issue(
                path,
                f"not valid UTF-8 (first bad byte at offset {exc.start}); decoded with replacement",
                "ignored",
            )
        )
    entries: list[SplitEntry] = []
    seen: dict[str, SplitEntry] = {}
    conflicted: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue

        def bad(reason: str, action: str = "excluded", n: int = lineno) -> None:
            issues.append(_issue(path, f"line {n}: {reason}", action))

        fields = stripped.split()
        if len(fields) != 4:
            bad(f"expected 4 fields 'NAME CLASS-ID SPECIES BREED-ID', got {len(fields)}: {stripped[:80]!r}")
            continue
        name = fields[0]
        why = _valid_name(name)
        if why:
            bad(f"{why}: {name[:80]!r}")
            continue
        try:
            class_id, species_id, breed_id = (int(f) for f in fields[1:])
        except ValueError:
            bad(f"CLASS-ID, SPECIES and BREED-ID must be integers: {stripped[:80]!r}")
            continue
        if not 1 <= class_id <= NUM_BREEDS:
            bad(f"{name}: CLASS-ID {class_id} outside 1..{NUM_BREEDS}")
            continue
        breed = class_id - 1
        species = BREED_SPECIES[breed]
        if species_id not in _SPECIES_FIELD:
            bad(f"{name}: SPECIES {species_id} must be 1 (cat) or 2 (dog)")
            continue
        if _SPECIES_FIELD[species_id] != species:
            bad(
                f"{name}: SPECIES {species_id} ({_SPECIES_NAMES[_SPECIES_FIELD[species_id]]}) contradicts "
                f"CLASS-ID {class_id} ({BREEDS[breed]} is a {_SPECIES_NAMES[species]})"
            )
            continue
        if breed_id != _BREED_ID_IN_SPECIES[breed]:
            # CLASS-ID is authoritative; a wrong per-species BREED-ID does not change the label.
            bad(
                f"{name}: BREED-ID {breed_id} does not match CLASS-ID {class_id} "
                f"(expected {_BREED_ID_IN_SPECIES[breed]}); using CLASS-ID",
                "ignored",
            )
        entry = SplitEntry(name, split, breed, species, lineno)
        if name in seen:
            first = seen[name]
            if first.breed == breed:
                bad(f"{name}: duplicate of line {first.line}; later line ignored", "ignored")
            else:
                bad(f"{name}: listed again with a different CLASS-ID (line {first.line}); both excluded")
                conflicted.add(name)
            continue
        seen[name] = entry
        entries.append(entry)
    entries = [e for e in entries if e.name not in conflicted]
    return entries, issues


def _scan(folder: Path) -> list[str]:
    """Non-hidden entry names of ``folder`` (sorted); a clear DataError if it cannot be listed."""
    try:
        with os.scandir(folder) as it:
            return sorted(e.name for e in it if not e.name.startswith("."))
    except OSError as exc:
        raise DataError(f"{folder}: cannot list folder ({exc.strerror or exc})") from None


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir() and not path.is_symlink()
    except OSError:
        return False


def _index_images(images_dir: Path) -> tuple[dict[str, list[Path]], list[dict[str, str]]]:
    """Map stem -> image files (best extension first); report non-image entries as ignored."""
    by_stem: dict[str, list[Path]] = {}
    issues: list[dict[str, str]] = []
    for name in _scan(images_dir):
        path = images_dir / name
        if _is_dir(path):
            issues.append(_issue(path, "a folder inside images/", "ignored"))
            continue
        if not is_image_name(name):
            issues.append(_issue(path, "not an image file (unknown extension)", "ignored"))
            continue
        by_stem.setdefault(Path(name).stem, []).append(path)
    rank = {ext: i for i, ext in enumerate(IMAGE_EXTENSIONS)}
    for paths in by_stem.values():
        paths.sort(key=lambda p: (rank[p.suffix.lower()], p.name))
    return by_stem, issues


def _index_trimaps(trimap_dir: Path) -> dict[str, Path]:
    if not trimap_dir.exists():
        return {}
    out: dict[str, Path] = {}
    for name in _scan(trimap_dir):
        if name.lower().endswith(".png"):
            out.setdefault(name[:-4], trimap_dir / name)
    return out


def read_split_files(root: Path) -> tuple[list[PetRecord], list[dict[str, str]]]:
    """Read ``trainval.txt`` / ``test.txt`` of an Oxford-layout root and pair images and trimaps by NAME.

    Args:
        root: the ``oxford-iiit-pet`` folder.

    Returns:
        ``(records, issues)``: records sorted by (split, name), one per listed NAME whose image exists;
        issues (``{"file", "reason", "action"}``) for malformed lines, duplicates, names in both splits,
        listed names without an image, image files not listed in any split and trimaps without an image
        (reason :data:`ORPHAN_TRIMAP`, action ``ignored``).

    Raises:
        DataError: the root is missing, has no split files or no images/ folder.
    """
    root = Path(root)
    check_root(root)
    issues: list[dict[str, str]] = []
    per_split: dict[str, list[SplitEntry]] = {}
    for split, fname in SPLIT_FILES.items():
        path = root / "annotations" / fname
        if not path.is_file():
            issues.append(_issue(path, f"split file missing: the root has no {split} images", "ignored"))
            per_split[split] = []
            continue
        entries, found = parse_split_file(path, split)
        per_split[split] = entries
        issues.extend(found)
        if not entries and not found:  # an empty file would otherwise only show as unlisted images
            issues.append(_issue(path, f"split file lists no images: the root has no {split} images", "ignored"))

    in_both = {e.name for e in per_split["trainval"]} & {e.name for e in per_split["test"]}
    for name in sorted(in_both):
        issues.append(
            _issue(
                root / "annotations",
                f"{name}: listed in both trainval.txt and test.txt; excluded",
                "excluded",
            )
        )

    images, found = _index_images(root / "images")
    issues.extend(found)
    trimaps = _index_trimaps(root / "annotations" / "trimaps")

    records: list[PetRecord] = []
    used: set[Path] = set()
    for split in SPLIT_FILES:
        for e in per_split[split]:
            if e.name in in_both:
                continue
            candidates = images.get(e.name)
            if not candidates:
                issues.append(
                    _issue(
                        root / "images" / f"{e.name}.jpg",
                        f"{e.name} is listed in {SPLIT_FILES[split]} (line {e.line}) but has no image file",
                        "excluded",
                    )
                )
                continue
            image = candidates[0]
            used.add(image)
            records.append(PetRecord(e.name, split, e.breed, e.species, image, trimaps.get(e.name)))
    listed = {r.name for r in records}
    for stem in sorted(images):
        for path in images[stem]:
            if path in used or stem in in_both:  # in_both: already reported
                continue
            reason = (
                f"another file for {stem} is used ({images[stem][0].name})"
                if stem in listed
                else "not listed in trainval.txt or test.txt"
            )
            issues.append(_issue(path, reason, "ignored"))
    for stem in sorted(trimaps.keys() - images.keys()):
        issues.append(_issue(trimaps[stem], ORPHAN_TRIMAP, "ignored"))
    records.sort(key=lambda r: (r.split, r.name))
    return records, issues


def trimap_to_mask(trimap: np.ndarray, path: str | Path = "<trimap>") -> np.ndarray:
    """Oxford trimap -> mask: 1 (pet) -> 1, 2 (background) -> 0, 3 (border) -> 255.

    Raises:
        ImageIssue: the trimap holds values other than 1, 2, 3.
    """
    trimap = np.asarray(trimap)
    values = np.unique(trimap)
    bad = [int(v) for v in values if v not in (1, 2, 3)]
    if bad:
        shown = ", ".join(str(v) for v in bad[:8]) + (", ..." if len(bad) > 8 else "")
        raise ImageIssue(path, f"trimap values outside {{1, 2, 3}}: {shown}")
    return _TRIMAP_LUT[trimap.astype(np.uint8)]
