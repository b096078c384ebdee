"""Kinds of damage to an Oxford-IIIT Pet layout tree, each with the report it must produce.

A :class:`Damage` changes a clean tree built by :func:`clean_tree` (three breeds, four pets each, the
last of each in ``test.txt``) and returns an :class:`Expect`: the issues ``wsss prepare`` must list
(file, action and words of the reason), which clean ids must be missing from the manifest afterwards
and which new ids must be present, and the exit codes of ``prepare`` and ``validate``.

Damage is usually done to an *added* pet (``Abyssinian_9`` ...), so the clean rest is the same in every
case. Damage that the process cannot cause as root (unreadable files and folders) is simulated by
monkeypatching the one OS call that would fail.

Typical use::

    root = clean_tree(tmp_path / "pets")
    expect = DAMAGES["truncated_image"].apply(root, monkeypatch)
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.data_factory import (
    add_pet,
    append_split,
    deny_reading,
    make_oxford_tree,
    pet_image,
    pet_trimap,
    split_line,
    write_image,
    write_split,
    write_trimap,
)

SIZE = (48, 40)  # (width, height)
BREEDS_USED = (0, 1, 5)  # Abyssinian, american_bulldog, Bengal
CLEAN_IDS = frozenset(f"{b}_{i}" for b in ("Abyssinian", "american_bulldog", "Bengal") for i in range(1, 5))


@dataclass(frozen=True)
class Issue:
    """One expected entry of ``reports/prepare.json`` (``file`` relative to the tree root)."""

    file: str
    action: str  # excluded | ignored | converted
    words: tuple[str, ...]


@dataclass
class Expect:
    """What prepare and validate must report for one damage."""

    issues: list[Issue] = field(default_factory=list)
    gone: set[str] = field(default_factory=set)  # clean ids missing from the manifest
    added: set[str] = field(default_factory=set)  # new ids present in the manifest (converted inputs)
    prepare_exit: int = 0
    validate_exit: int = 0
    message: tuple[str, ...] = ()  # words of the one-line error when an exit code is non-zero


@dataclass(frozen=True)
class Damage:
    name: str
    apply: Callable[[Path, pytest.MonkeyPatch], Expect]
    doc: str


DAMAGES: dict[str, Damage] = {}


def damage(fn: Callable[[Path, pytest.MonkeyPatch], Expect]) -> Callable[[Path, pytest.MonkeyPatch], Expect]:
    """Register ``fn`` under its name; its docstring says what it does."""
    DAMAGES[fn.__name__] = Damage(fn.__name__, fn, (fn.__doc__ or "").strip())
    return fn


def clean_tree(root: Path) -> Path:
    """The undamaged tree: 3 breeds x 4 pets (3 trainval + 1 test each), 48x40 JPEGs with trimaps."""
    return make_oxford_tree(root, n_per_breed=4, breeds=BREEDS_USED, size=SIZE)


def _pet(root: Path, name: str = "Abyssinian_9", breed: int = 0, **kw: object) -> Path:
    kw.setdefault("size", SIZE)
    return add_pet(root, name, breed, **kw)  # type: ignore[arg-type]


def _rgb(seed: int = 7) -> np.ndarray:
    w, h = SIZE
    return pet_image(h, w, np.random.default_rng(seed))


def _tri(root: Path, name: str) -> Path:
    return root / "annotations" / "trimaps" / f"{name}.png"


def _img(root: Path, name: str, ext: str = ".jpg") -> Path:
    return root / "images" / f"{name}{ext}"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb: no pixel data follows)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _split_text(root: Path, split: str = "trainval") -> Path:
    return root / "annotations" / f"{split}.txt"


def _rewrite_split(root: Path, split: str, transform: Callable[[bytes], bytes]) -> None:
    path = _split_text(root, split)
    path.write_bytes(transform(path.read_bytes()))


# --------------------------------------------------------------------------------------------------
# image bytes


@damage
def truncated_image(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """A JPEG cut after 400 bytes."""
    p = _pet(root)
    p.write_bytes(p.read_bytes()[:400])
    return Expect([Issue("images/Abyssinian_9.jpg", "excluded", ("truncated",))])


@damage
def zero_byte_image(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """An empty image file."""
    _pet(root).write_bytes(b"")
    return Expect([Issue("images/Abyssinian_9.jpg", "excluded", ("empty file",))])


@damage
def random_bytes_image(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """Noise named .jpg."""
    _pet(root).write_bytes(np.random.default_rng(3).integers(0, 256, 500, dtype=np.uint8).tobytes())
    return Expect([Issue("images/Abyssinian_9.jpg", "excluded", ("not a recognised image format",))])


@damage
def refused_format(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """EPS (PostScript) bytes named .jpg: a format no plugin may open."""
    _pet(root).write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 48 40\nshowpage\n")
    return Expect([Issue("images/Abyssinian_9.jpg", "excluded", ("not a recognised image format",))])


@damage
def png_named_jpg(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """PNG bytes under a .jpg name (as in the real Oxford release): converted."""
    write_image(_pet(root), _rgb(), fmt="PNG")
    return Expect([Issue("images/Abyssinian_9.jpg", "converted", ("PNG bytes named .jpg",))],
                  added={"Abyssinian_9"})


@damage
def cmyk_jpeg(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """A CMYK JPEG: converted to RGB."""
    write_image(_pet(root), _rgb(), fmt="JPEG", mode="CMYK")
    return Expect([Issue("images/Abyssinian_9.jpg", "converted", ("CMYK -> RGB",))], added={"Abyssinian_9"})


@damage
def sixteen_bit_grayscale(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """A 16-bit grayscale PNG (mode I;16): scaled to 8 bits."""
    _pet(root).unlink()
    w, h = SIZE
    arr = (np.arange(w * h, dtype=np.uint16).reshape(h, w) * 30).astype(np.uint16)
    Image.fromarray(arr).save(_img(root, "Abyssinian_9", ".png"), format="PNG")
    return Expect([Issue("images/Abyssinian_9.png", "converted", ("16-bit",))], added={"Abyssinian_9"})


@damage
def one_bit_image(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """A 1-bit (mode 1) PNG: grayscale -> RGB."""
    _pet(root).unlink()
    Image.fromarray(_rgb()).convert("1").save(_img(root, "Abyssinian_9", ".png"), format="PNG")
    return Expect([Issue("images/Abyssinian_9.png", "converted", ("grayscale (1)",))], added={"Abyssinian_9"})


@damage
def palette_with_transparency(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """A palette PNG with a transparent index: composited on black."""
    _pet(root).unlink()
    im = Image.fromarray(_rgb()).convert("P")
    im.save(_img(root, "Abyssinian_9", ".png"), format="PNG", transparency=0)
    return Expect([Issue("images/Abyssinian_9.png", "converted", ("palette with transparency",))],
                  added={"Abyssinian_9"})


@damage
def float_tiff(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """A 32-bit float TIFF (mode F) in [0, 1]."""
    _pet(root).unlink()
    w, h = SIZE
    Image.fromarray(np.linspace(0, 1, w * h, dtype=np.float32).reshape(h, w)).save(
        _img(root, "Abyssinian_9", ".tif"), format="TIFF")
    return Expect([Issue("images/Abyssinian_9.tif", "converted", ("float grayscale",))], added={"Abyssinian_9"})


@damage
def multi_frame_gif(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """An animated GIF: the first frame is used."""
    _pet(root).unlink()
    frames = [Image.fromarray(_rgb(s)).convert("P") for s in (1, 2)]
    frames[0].save(_img(root, "Abyssinian_9", ".gif"), format="GIF", save_all=True, append_images=frames[1:])
    return Expect([Issue("images/Abyssinian_9.gif", "converted", ("2-frame GIF",))], added={"Abyssinian_9"})


@damage
def decompression_bomb(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """A PNG header claiming 100000 x 100000 pixels: refused before any pixel is decoded."""
    _pet(root).unlink()
    _img(root, "Abyssinian_9", ".png").write_bytes(png_header_only(100_000, 100_000))
    return Expect([Issue("images/Abyssinian_9.png", "excluded", ("too large",))])


@damage
def huge_dimensions(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """A real 700x500 image over prepare.max_pixels (200000 in these tests)."""
    _pet(root, size=(700, 500))
    return Expect([Issue("images/Abyssinian_9.jpg", "excluded", ("too large", "max_pixels"))])


@damage
def tiny_image(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """A 10x8 image, under prepare.min_side."""
    _pet(root, size=(10, 8))
    return Expect([Issue("images/Abyssinian_9.jpg", "excluded", ("too small",))])


@damage
def extreme_aspect_ratio(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """600x20: shrunk to max_side it falls under min_side."""
    _pet(root, size=(600, 20))
    return Expect([Issue("images/Abyssinian_9.jpg", "excluded", ("extreme aspect ratio",))])


# --------------------------------------------------------------------------------------------------
# trimaps


@damage
def missing_trimap(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """A listed image without its trimap."""
    _pet(root, trimap=False)
    return Expect([Issue("images/Abyssinian_9.jpg", "excluded", ("no trimap",))])


@damage
def trimap_size_mismatch(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """A 20x20 trimap for a 48x40 image."""
    _pet(root)
    write_trimap(_tri(root, "Abyssinian_9"), pet_trimap(20, 20))
    return Expect([Issue("annotations/trimaps/Abyssinian_9.png", "excluded", ("differs from the image size",))])


@damage
def trimap_bad_values(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """Trimap values 0 and 7 besides 1, 2, 3."""
    _pet(root)
    w, h = SIZE
    t = pet_trimap(h, w)
    t[0, 0], t[1, 1] = 7, 0
    write_trimap(_tri(root, "Abyssinian_9"), t)
    return Expect([Issue("annotations/trimaps/Abyssinian_9.png", "excluded", ("outside {1, 2, 3}", "0, 7"))])


@damage
def trimap_colour(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """An RGB trimap with different channels (a colour visualisation, not labels)."""
    _pet(root)
    w, h = SIZE
    Image.fromarray(_rgb()).save(_tri(root, "Abyssinian_9"), format="PNG")
    del w, h
    return Expect([Issue("annotations/trimaps/Abyssinian_9.png", "excluded", ("colour image",))])


@damage
def trimap_sixteen_bit_out_of_range(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """A 16-bit trimap with values up to 1000."""
    _pet(root)
    w, h = SIZE
    t = pet_trimap(h, w).astype(np.uint16)
    t[0, 0] = 1000
    Image.fromarray(t).save(_tri(root, "Abyssinian_9"), format="PNG")
    return Expect([Issue("annotations/trimaps/Abyssinian_9.png", "excluded", ("outside 0..255",))])


@damage
def truncated_trimap(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """A trimap PNG cut short."""
    _pet(root)
    t = _tri(root, "Abyssinian_9")
    w, h = SIZE
    Image.fromarray(np.random.default_rng(0).integers(1, 4, (h, w), dtype=np.uint8)).save(t, format="PNG")
    t.write_bytes(t.read_bytes()[:120])
    return Expect([Issue("annotations/trimaps/Abyssinian_9.png", "excluded", ("truncated",))])


@damage
def zero_byte_trimap(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """An empty trimap file."""
    _pet(root)
    _tri(root, "Abyssinian_9").write_bytes(b"")
    return Expect([Issue("annotations/trimaps/Abyssinian_9.png", "excluded", ("empty file",))])


@damage
def trimap_is_a_directory(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """annotations/trimaps/<name>.png is a folder."""
    _pet(root, trimap=False)
    _tri(root, "Abyssinian_9").mkdir()
    return Expect([Issue("annotations/trimaps/Abyssinian_9.png", "excluded", ("not a regular file",))])



@damage
def orphan_trimap(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """A trimap whose NAME has no image (and is listed nowhere)."""
    write_trimap(_tri(root, "Abyssinian_9"), pet_trimap(SIZE[1], SIZE[0]))
    return Expect([Issue("annotations/trimaps/Abyssinian_9.png", "ignored", ("orphan trimap",))])


@damage
def all_border_trimaps(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """Trimaps that are border everywhere: the trainval image stays without a mask, the test image goes."""
    for name in ("Abyssinian_1", "Abyssinian_4"):
        write_trimap(_tri(root, name), np.full((SIZE[1], SIZE[0]), 3, np.uint8))
    return Expect([Issue("annotations/trimaps/Abyssinian_1.png", "excluded", ("all border", "image kept")),
                   Issue("annotations/trimaps/Abyssinian_4.png", "excluded", ("all border", "test image"))],
                  gone={"Abyssinian_4"})

# --------------------------------------------------------------------------------------------------
# the file system


@damage
def image_is_a_directory(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """images/<name>.jpg is a folder; the name is listed."""
    _img(root, "Abyssinian_9").mkdir()
    write_trimap(_tri(root, "Abyssinian_9"), pet_trimap(SIZE[1], SIZE[0]))
    append_split(root, "trainval", [split_line("Abyssinian_9", 0)])
    return Expect([Issue("images/Abyssinian_9.jpg", "ignored", ("a folder inside images/",)),
                   Issue("images/Abyssinian_9.jpg", "excluded", ("has no image file",)),
                   Issue("annotations/trimaps/Abyssinian_9.png", "ignored", ("orphan trimap",))])


@damage
def image_symlink_to_directory(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """images/<name>.jpg is a symbolic link to its own folder (a directory loop)."""
    os.symlink(".", _img(root, "Abyssinian_9"))
    write_trimap(_tri(root, "Abyssinian_9"), pet_trimap(SIZE[1], SIZE[0]))
    append_split(root, "trainval", [split_line("Abyssinian_9", 0)])
    return Expect([Issue("images/Abyssinian_9.jpg", "excluded", ("not a regular file",))])


@damage
def directory_symlink_loop(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """images/loop -> images and images/deeper -> loop: folders that point back into the tree."""
    os.symlink("..", root / "images" / "loop")
    os.symlink("loop", root / "images" / "deeper")
    return Expect([Issue("images/loop", "ignored", ("not an image file",)),
                   Issue("images/deeper", "ignored", ("not an image file",))])


@damage
def symlink_loop(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """images/a.jpg -> b.jpg -> a.jpg, listed."""
    a, b = _img(root, "Abyssinian_9"), _img(root, "Abyssinian_8")
    os.symlink(b.name, a)
    os.symlink(a.name, b)
    write_trimap(_tri(root, "Abyssinian_9"), pet_trimap(SIZE[1], SIZE[0]))
    append_split(root, "trainval", [split_line("Abyssinian_9", 0)])
    return Expect([Issue("images/Abyssinian_9.jpg", "excluded", ("symbolic link loop",)),
                   Issue("images/Abyssinian_8.jpg", "ignored", ("not listed",))])


@damage
def dangling_symlink(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """images/<name>.jpg points to a file that does not exist."""
    os.symlink("nowhere/missing.jpg", _img(root, "Abyssinian_9"))
    write_trimap(_tri(root, "Abyssinian_9"), pet_trimap(SIZE[1], SIZE[0]))
    append_split(root, "trainval", [split_line("Abyssinian_9", 0)])
    return Expect([Issue("images/Abyssinian_9.jpg", "excluded", ("dangling symbolic link",))])


@damage
def fifo_as_image(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """A named pipe as an image (opening it would block forever)."""
    os.mkfifo(_img(root, "Abyssinian_9"))
    write_trimap(_tri(root, "Abyssinian_9"), pet_trimap(SIZE[1], SIZE[0]))
    append_split(root, "trainval", [split_line("Abyssinian_9", 0)])
    return Expect([Issue("images/Abyssinian_9.jpg", "excluded", ("not a regular file",))])


@damage
def unreadable_image(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """An image the process may not read (as root: simulated, open raises EACCES)."""
    from wsss.data import images

    deny_reading(mp, images, _pet(root))
    return Expect([Issue("images/Abyssinian_9.jpg", "excluded", ("permission denied",))])


@damage
def unreadable_images_folder(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """images/ cannot be listed (simulated EACCES): nothing can be prepared, one clear error."""
    from wsss.data import oxford_pet

    real = os.scandir
    images_dir = os.path.realpath(root / "images")

    def fake_scandir(path: object = ".") -> object:
        if os.path.realpath(str(path)) == images_dir:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)  # type: ignore[arg-type]

    mp.setattr(oxford_pet.os, "scandir", fake_scandir)
    return Expect(prepare_exit=1, validate_exit=1, message=("images", "cannot list folder", "permission denied"))


@damage
def unreadable_split_file(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """test.txt cannot be read (simulated EACCES): its pets are unlisted, the trainval ones prepared (no test split:
    validate fails)."""
    target = _split_text(root, "test").resolve()
    real = Path.read_bytes

    def fake_read_bytes(self: Path) -> bytes:
        if self.resolve() == target:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    mp.setattr(Path, "read_bytes", fake_read_bytes)
    gone = {f"{b}_4" for b in ("Abyssinian", "american_bulldog", "Bengal")}
    return Expect([Issue("annotations/test.txt", "excluded", ("cannot read split file", "ermission denied")),
                   *[Issue(f"images/{g}.jpg", "ignored", ("not listed",)) for g in sorted(gone)]],
                  gone=gone, validate_exit=1)


@damage
def non_utf8_file_name(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """An image whose file name is not UTF-8 (bytes 0xff 0xfe), listed with those bytes."""
    name = b"Abyssinian_\xff\xfe"
    images_dir = os.fsencode(root / "images")
    with open(os.path.join(images_dir, name + b".jpg"), "wb") as fh:
        Image.fromarray(_rgb()).save(fh, format="JPEG")
    with open(os.path.join(os.fsencode(root / "annotations" / "trimaps"), name + b".png"), "wb") as fh:
        Image.fromarray(pet_trimap(SIZE[1], SIZE[0])).save(fh, format="PNG")
    append_split(root, "trainval", name + b" 1 1 1\n")
    decoded = os.fsdecode(name)
    return Expect([Issue("annotations/trainval.txt", "ignored", ("not valid UTF-8",)),
                   Issue("annotations/trainval.txt", "excluded", ("not valid UTF-8",)),
                   Issue(f"images/{decoded}.jpg", "ignored", ("not listed",))])


@damage
def case_clash(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """abyssinian_1 next to Abyssinian_1: the same id on a case-insensitive file system."""
    _pet(root, "abyssinian_1")
    return Expect([Issue("images/abyssinian_1.jpg", "excluded", ("clashes with",))])


@damage
def two_files_one_name(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """Abyssinian_2.jpg and Abyssinian_2.png: one is used, the other reported."""
    write_image(_img(root, "Abyssinian_2", ".png"), _rgb(), fmt="PNG")
    return Expect([Issue("images/Abyssinian_2.png", "ignored", ("another file for Abyssinian_2 is used",))])


@damage
def unlisted_image(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """An image in no split file."""
    _pet(root, split=None)
    return Expect([Issue("images/Abyssinian_9.jpg", "ignored", ("not listed",))])


@damage
def listed_without_image(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """A split line whose image does not exist."""
    append_split(root, "trainval", [split_line("Abyssinian_9", 0)])
    return Expect([Issue("images/Abyssinian_9.jpg", "excluded", ("has no image file",))])


# --------------------------------------------------------------------------------------------------
# split files


@damage
def duplicate_line(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """The same line twice: the second is ignored."""
    append_split(root, "trainval", [split_line("Abyssinian_1", 0)])
    return Expect([Issue("annotations/trainval.txt", "ignored", ("Abyssinian_1", "duplicate"))])


@damage
def duplicate_name_other_class(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """Abyssinian_2 listed again as Bengal: both lines excluded."""
    append_split(root, "trainval", [split_line("Abyssinian_2", 5)])
    return Expect([Issue("annotations/trainval.txt", "excluded", ("Abyssinian_2", "different CLASS-ID")),
                   Issue("images/Abyssinian_2.jpg", "ignored", ("not listed",))],
                  gone={"Abyssinian_2"})


@damage
def name_in_both_splits(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """Abyssinian_1 in trainval.txt and test.txt."""
    append_split(root, "test", [split_line("Abyssinian_1", 0)])
    return Expect([Issue("annotations", "excluded", ("Abyssinian_1", "both"))], gone={"Abyssinian_1"})


@damage
def malformed_split_lines(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """Wrong field counts, non-integers, out-of-range ids, contradicting species, bad names."""
    _pet(root, "Abyssinian_9", split=None)
    append_split(root, "trainval", [
        "Abyssinian_9 1 1",  # 3 fields
        "Abyssinian_9 one 1 1",
        "Abyssinian_9 99 1 1",
        "Abyssinian_9 1 3 1",
        "Abyssinian_9 1 2 1",  # a cat listed as a dog
        "../etc/passwd 1 1 1",
        ".hidden 1 1 1",
        "x" * 5000 + " 1 1 1 extra",
    ])
    words = [("expected 4 fields",), ("must be integers",), ("outside 1..37",), ("must be 1 (cat) or 2 (dog)",),
             ("contradicts",), ("no path separators",), ("must not start with '.'",), ("expected 4 fields",)]
    return Expect([Issue("annotations/trainval.txt", "excluded", w) for w in words]
                  + [Issue("images/Abyssinian_9.jpg", "ignored", ("not listed",))])


@damage
def wrong_breed_id(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """BREED-ID disagrees with CLASS-ID: CLASS-ID wins, the image is kept."""
    _pet(root, split=None)
    append_split(root, "trainval", ["Abyssinian_9 1 1 7"])
    return Expect([Issue("annotations/trainval.txt", "ignored", ("BREED-ID 7", "using CLASS-ID"))],
                  added={"Abyssinian_9"})


@damage
def nul_bytes_in_split_file(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """A NUL byte inside a name."""
    _pet(root, split=None)
    append_split(root, "trainval", b"Abyssinian_\x009 1 1 1\n")
    return Expect([Issue("annotations/trainval.txt", "excluded", ("plain file stem",)),
                   Issue("images/Abyssinian_9.jpg", "ignored", ("not listed",))])


@damage
def empty_split_file(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """test.txt is empty: said so, and its pets reported as unlisted (no test split: validate fails)."""
    _split_text(root, "test").write_bytes(b"")
    gone = {f"{b}_4" for b in ("Abyssinian", "american_bulldog", "Bengal")}
    return Expect([Issue("annotations/test.txt", "ignored", ("lists no images",)),
                   *[Issue(f"images/{g}.jpg", "ignored", ("not listed",)) for g in sorted(gone)]], gone=gone,
                  validate_exit=1)


@damage
def both_split_files_empty(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """Nothing listed anywhere: one clear error."""
    for split in ("trainval", "test"):
        _split_text(root, split).write_bytes(b"")
    return Expect(prepare_exit=1, validate_exit=1, message=("no usable image",))


@damage
def split_file_is_a_directory(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """annotations/test.txt is a folder (no test split: validate fails)."""
    path = _split_text(root, "test")
    path.unlink()
    path.mkdir()
    gone = {f"{b}_4" for b in ("Abyssinian", "american_bulldog", "Bengal")}
    return Expect([Issue("annotations/test.txt", "ignored", ("split file missing",)),
                   *[Issue(f"images/{g}.jpg", "ignored", ("not listed",)) for g in sorted(gone)]], gone=gone,
                  validate_exit=1)


@damage
def latin1_split_file(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """A Latin-1 comment in an otherwise valid split file: reported, every line still read."""
    _rewrite_split(root, "trainval", lambda b: b"# caf\xe9 list\n" + b)
    return Expect([Issue("annotations/trainval.txt", "ignored", ("not valid UTF-8",))])


# Formatting that must be accepted silently: nothing reported, nothing lost.


@damage
def crlf_line_endings(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """Windows line endings."""
    _rewrite_split(root, "trainval", lambda b: b.replace(b"\n", b"\r\n"))
    return Expect()


@damage
def byte_order_mark(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """A UTF-8 BOM before the first line (and no header comment)."""
    lines = [split_line(f"Abyssinian_{i}", 0) for i in (1, 2, 3)]
    lines += [split_line(f"american_bulldog_{i}", 1) for i in (1, 2, 3)]
    lines += [split_line(f"Bengal_{i}", 5) for i in (1, 2, 3)]
    write_split(root, "trainval", lines, header=False)
    _rewrite_split(root, "trainval", lambda b: b"\xef\xbb\xbf" + b)
    return Expect()


@damage
def trailing_whitespace_and_blank_lines(root: Path, mp: pytest.MonkeyPatch) -> Expect:
    """Trailing spaces and tabs, blank lines, tabs between fields, no final newline."""
    _rewrite_split(root, "trainval", lambda b: b"\n\n" + b.replace(b"\n", b"  \t\n\n").replace(b" 1 ", b"\t1 ")
                   .rstrip(b"\n"))
    return Expect()


def relative_issues(report: dict, root: Path) -> list[dict[str, str]]:
    """The report's issues with ``file`` made relative to the tree root where it lies inside."""
    out = []
    for i in report["issues"]:
        f = i["file"]
        try:
            f = Path(f).relative_to(root).as_posix()
        except ValueError:
            pass
        out.append({**i, "file": f})
    return out
