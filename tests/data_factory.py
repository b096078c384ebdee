"""Build tiny Oxford-IIIT Pet layout trees (and background folders) in temporary folders for tests.

Typical use::

    root = make_oxford_tree(tmp_path / "oxford-iiit-pet", n_per_breed=4, breeds=[0, 1, 5], size=(48, 40))

Every image is a noisy background with an ellipse "pet"; its trimap marks the ellipse 1, a thin ring 3
and the rest 2, so masks are easy to check. Names follow Oxford (``<breed name>_<k>``), split lines are
``NAME CLASS-ID SPECIES BREED-ID`` with the official numbering.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from wsss.data.breeds import BREED_SPECIES, BREEDS


def breed_id_in_species(breed: int) -> int:
    """The per-species BREED-ID (1-based) of breed index ``breed`` (0..36)."""
    return sum(1 for j in range(breed + 1) if BREED_SPECIES[j] == BREED_SPECIES[breed])


def split_line(name: str, breed: int) -> str:
    """A correct split-file line for ``name`` of breed index ``breed``."""
    return f"{name} {breed + 1} {BREED_SPECIES[breed] + 1} {breed_id_in_species(breed)}"


def pet_trimap(height: int, width: int, scale: float = 0.6, border: int = 1) -> np.ndarray:
    """Trimap of a centred ellipse: 1 inside, 3 on a ring of ``border`` px, 2 outside."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    cy, cx = (height - 1) / 2, (width - 1) / 2
    ry, rx = max(scale * height / 2, 1.0), max(scale * width / 2, 1.0)
    r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    ring = border / max(min(ry, rx), 1.0)
    tri = np.full((height, width), 2, dtype=np.uint8)
    tri[r <= 1.0 + ring] = 3
    tri[r <= 1.0] = 1
    return tri


def pet_image(height: int, width: int, rng: np.random.Generator, scale: float = 0.6) -> np.ndarray:
    """RGB uint8 image: noisy background with a bright ellipse matching :func:`pet_trimap`."""
    img = rng.integers(0, 90, size=(height, width, 3), dtype=np.uint8)
    colour = rng.integers(150, 256, size=3, dtype=np.uint8)
    img[pet_trimap(height, width, scale) == 1] = colour
    return img


def write_image(path: Path, array: np.ndarray, fmt: str = "JPEG", mode: str | None = None) -> Path:
    """Save ``array`` to ``path`` in ``fmt`` (regardless of the extension), optionally converted to ``mode``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(array)
    if mode is not None:
        im = im.convert(mode)
    kwargs = {"quality": 95} if fmt == "JPEG" else {}
    im.save(path, format=fmt, **kwargs)
    return path


def write_trimap(path: Path, trimap: np.ndarray) -> Path:
    """Save a trimap as a single-channel PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(trimap.astype(np.uint8)).save(path, format="PNG")
    return path


def write_split(root: Path, split: str, lines: Sequence[str], header: bool = True) -> Path:
    """Write ``annotations/<split>.txt`` (``trainval`` or ``test``) from raw lines."""
    path = root / "annotations" / f"{split}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = ("# Image CLASS-ID SPECIES BREED ID\n" if header else "") + "".join(line + "\n" for line in lines)
    path.write_text(text, encoding="utf-8")
    return path


def append_split(root: Path, split: str, lines: Sequence[str] | bytes) -> Path:
    """Append raw lines (or raw bytes) to ``annotations/<split>.txt``."""
    path = root / "annotations" / f"{split}.txt"
    data = lines if isinstance(lines, bytes) else "".join(line + "\n" for line in lines).encode()
    with open(path, "ab") as fh:
        fh.write(data)
    return path


def add_pet(
    root: Path,
    name: str,
    breed: int,
    split: str | None = "trainval",
    size: tuple[int, int] = (48, 40),
    seed: int = 0,
    trimap: bool = True,
    scale: float = 0.6,
) -> Path:
    """Add one image (and trimap) to an existing tree; ``split`` appends its line (None: unlisted).

    Args:
        size: ``(width, height)``.

    Returns:
        The image path.
    """
    w, h = size
    img = write_image(root / "images" / f"{name}.jpg", pet_image(h, w, np.random.default_rng(seed), scale))
    if trimap:
        write_trimap(root / "annotations" / "trimaps" / f"{name}.png", pet_trimap(h, w, scale))
    if split is not None:
        append_split(root, split, [split_line(name, breed)])
    return img


def make_oxford_tree(
    root: Path,
    n_per_breed: int | Mapping[int, int] = 4,
    breeds: Sequence[int] = (0, 1, 5),
    size: int | tuple[int, int] = (48, 40),
    n_test_per_breed: int = 1,
    trimaps: bool = True,
    seed: int = 0,
    shuffle_lines: bool = False,
    scale_jitter: bool = False,
) -> Path:
    """Create an Oxford-IIIT Pet layout tree at ``root``.

    Args:
        root: the ``oxford-iiit-pet`` folder to create.
        n_per_breed: images per breed (an int, or ``{breed: n}``).
        breeds: breed indices 0..36.
        size: ``(width, height)`` or one int for square images.
        n_test_per_breed: the last this many images of each breed are listed in test.txt (the rest in
            trainval.txt); a breed with fewer images puts them all in trainval.
        trimaps: write ``annotations/trimaps/*.png``.
        seed: pixel noise seed.
        shuffle_lines: shuffle the split-file lines (pairing must not depend on order).
        scale_jitter: give each image a different ellipse size (so a mis-paired trimap is detectable).

    Returns:
        ``root``.
    """
    w, h = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    if trimaps:
        (root / "annotations" / "trimaps").mkdir(parents=True, exist_ok=True)
    lines: dict[str, list[str]] = {"trainval": [], "test": []}
    k = 0
    for breed in breeds:
        n = n_per_breed[breed] if isinstance(n_per_breed, Mapping) else n_per_breed
        n_test = n_test_per_breed if n > n_test_per_breed else 0
        for i in range(1, n + 1):
            name = f"{BREEDS[breed]}_{i}"
            scale = 0.3 + 0.5 * ((k * 7) % 11) / 10 if scale_jitter else 0.6
            k += 1
            write_image(root / "images" / f"{name}.jpg", pet_image(h, w, rng, scale))
            if trimaps:
                write_trimap(root / "annotations" / "trimaps" / f"{name}.png", pet_trimap(h, w, scale))
            lines["test" if i > n - n_test else "trainval"].append(split_line(name, breed))
    for split, split_lines in lines.items():
        if shuffle_lines:
            split_lines = [split_lines[i] for i in rng.permutation(len(split_lines))]
        write_split(root, split, split_lines)
    return root


def make_background_folder(
    root: Path, n: int = 5, size: tuple[int, int] = (40, 32), layout: str = "iccv09", seed: int = 0
) -> Path:
    """Create background-only images: ``root/images/*.jpg`` (``iccv09``) or ``root/*.jpg`` (``flat``).

    Returns:
        ``root``.
    """
    folder = root / "images" if layout == "iccv09" else root
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(n):
        write_image(folder / f"{i:07d}.jpg", rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
    return root


def deny_reading(monkeypatch: object, module: object, path: Path) -> None:
    """Make ``module``'s ``open`` raise EACCES for ``path`` (as root, file permissions do not stop reads)."""
    import builtins

    real_open = builtins.open

    def fake_open(file: object, *a: object, **kw: object) -> object:
        if Path(str(file)) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *a, **kw)  # type: ignore[call-overload]

    monkeypatch.setattr(module, "open", fake_open, raising=False)  # type: ignore[attr-defined]


def markdown_table(md: str, heading: str) -> dict[str, dict[str, str]]:
    """Rows of the first Markdown table after ``heading``: {first cell: {header: cell}}."""
    lines = md[md.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    headers = [c.strip() for c in lines[start].strip("|").split("|")]
    out = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[cells[0]] = dict(zip(headers, cells, strict=True))
    return out
