"""Robust image decoding for untrusted dataset files.

The real Oxford-IIIT Pet release contains PNG/GIF bytes named ``.jpg``, grayscale, CMYK and RGBA images;
other copies may hold zero-byte, truncated or absurdly large files. Everything here detects the format
from the bytes, converts to plain 8-bit RGB (or a single-channel label map for trimaps) and turns every
failure into :class:`ImageIssue`, never a raw PIL/OS traceback.
"""

from __future__ import annotations

import errno
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from wsss.errors import DataError

# Formats PIL may try; anything else (EPS, PSD, ...) is refused instead of handing it to a plugin.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "MPO", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp")
_EXT_FORMATS: dict[str, tuple[str, ...]] = {
    ".jpg": ("JPEG", "MPO"),
    ".jpeg": ("JPEG", "MPO"),
    ".png": ("PNG",),
    ".gif": ("GIF",),
    ".bmp": ("BMP",),
    ".tif": ("TIFF",),
    ".tiff": ("TIFF",),
    ".webp": ("WEBP",),
}
DEFAULT_MAX_PIXELS = 40_000_000


class ImageIssue(DataError):
    """An image file that cannot be used, with the reason (shown in the prepare report)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (str(self.path), self.reason))


@dataclass
class DecodedImage:
    """A decoded image plus what was done to it.

    Attributes:
        array: ``(H, W, 3)`` uint8 RGB, or ``(H, W)`` uint8 for label maps.
        format: the format detected from the bytes (``JPEG``, ``PNG``, ...).
        mode: the PIL mode of the file before conversion.
        notes: human-readable conversions, e.g. ``"CMYK -> RGB"``; empty when the file was plain RGB.
    """

    array: np.ndarray
    format: str
    mode: str
    notes: list[str] = field(default_factory=list)

    @property
    def width(self) -> int:
        return int(self.array.shape[1])

    @property
    def height(self) -> int:
        return int(self.array.shape[0])


def issue(file: str | Path, reason: str, action: str) -> dict[str, str]:
    """One entry of the prepare report: ``{"file", "reason", "action"}``."""
    return {"file": str(file), "reason": reason, "action": action}


def is_image_name(name: str) -> bool:
    """Whether a file name has an image extension (case-insensitive)."""
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _os_reason(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "symbolic link loop (too many levels of symbolic links)"
    if isinstance(exc, FileNotFoundError):
        return "file not found (or a dangling symbolic link)"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "is a folder, not a file"
    return f"cannot read file ({exc.strerror or exc})"


def _allowed_formats() -> list[str]:
    Image.init()  # registers every plugin; Image.open(formats=...) needs the names to be known
    return [f for f in ALLOWED_FORMATS if f in Image.OPEN]


def _open_checked(path: Path, max_pixels: int, min_side: int) -> tuple[Image.Image, BinaryIO]:
    """Open ``path`` lazily (header only) and apply the size guards before any pixel is decoded."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ImageIssue(path, _os_reason(exc)) from None
    if not os.path.isfile(path):
        raise ImageIssue(path, "not a regular file")
    if st.st_size == 0:
        raise ImageIssue(path, "empty file (0 bytes)")
    try:
        fh = open(path, "rb")  # closed by the caller, after decoding
    except OSError as exc:
        raise ImageIssue(path, _os_reason(exc)) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(fh, formats=_allowed_formats())
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        fh.close()
        raise ImageIssue(path, f"too large: refused before decoding ({exc})") from None
    except Image.UnidentifiedImageError:
        fh.close()
        raise ImageIssue(path, "not a recognised image format (undecodable bytes)") from None
    except Exception as exc:  # plugins raise SyntaxError, ValueError, struct.error, ... on bad headers
        fh.close()
        raise ImageIssue(path, _decode_reason(exc, "cannot decode header")) from None
    w, h = im.size
    if w * h > max_pixels:
        fh.close()
        raise ImageIssue(path, f"too large: {w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels}")
    if min(w, h) < min_side:
        fh.close()
        raise ImageIssue(path, f"too small: {w}x{h} (shorter side below min_side={min_side})")
    return im, fh


def _decode_reason(exc: Exception, what: str) -> str:
    msg = f"{type(exc).__name__}: {exc}"
    if "truncat" in str(exc).lower() or isinstance(exc, EOFError):
        return f"truncated file ({msg})"
    return f"{what} ({msg})"


def _load(im: Image.Image, path: Path) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "palette images with transparency ..."
            im.load()
    except MemoryError:
        raise ImageIssue(path, "too large: out of memory while decoding") from None
    except Exception as exc:
        raise ImageIssue(path, _decode_reason(exc, "cannot decode")) from None


def _format_note(path: Path, fmt: str) -> str | None:
    expected = _EXT_FORMATS.get(path.suffix.lower())
    if expected is not None and fmt not in expected:
        return f"{fmt} bytes named {path.suffix}"
    return None


def _sixteen_to_eight(arr: np.ndarray, always_scale: bool) -> np.ndarray:
    arr = arr.astype(np.float64)
    if always_scale or arr.max(initial=0) > 255:
        arr = arr / 257.0
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def _composite_on_black(rgba: np.ndarray) -> tuple[np.ndarray, bool]:
    """Premultiply by alpha (= composite on black); also says whether any pixel was transparent."""
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    opaque = bool((rgba[..., 3] == 255).all())
    rgb = np.rint(rgba[..., :3].astype(np.float32) * alpha).astype(np.uint8)
    return rgb, not opaque


def _to_rgb(im: Image.Image) -> tuple[np.ndarray, str | None]:
    """Convert any PIL mode to ``(H, W, 3)`` uint8; the second value describes the conversion."""
    mode = im.mode
    if mode == "RGB":
        return np.array(im, dtype=np.uint8), None
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        if not has_alpha:
            return np.array(im.convert("RGB"), dtype=np.uint8), "palette (P) -> RGB"
        rgb, transparent = _composite_on_black(np.array(im.convert("RGBA"), dtype=np.uint8))
        how = "transparent pixels composited on black" if transparent else "opaque, alpha dropped"
        return rgb, f"palette with transparency -> RGB ({how})"
    if mode in ("RGBA", "RGBa", "LA", "La"):
        rgba = np.array(im.convert("RGBA"), dtype=np.uint8)
        rgb, transparent = _composite_on_black(rgba)
        how = "transparent pixels composited on black" if transparent else "opaque, alpha dropped"
        return rgb, f"{mode} -> RGB ({how})"
    if mode == "RGBX":
        return np.array(im.convert("RGB"), dtype=np.uint8), "RGBX -> RGB"
    if mode in ("L", "1"):
        gray = np.array(im.convert("L"), dtype=np.uint8)
        return np.repeat(gray[..., None], 3, axis=2), f"grayscale ({mode}) -> RGB"
    if mode.startswith("I;16") or mode == "I":
        gray = _sixteen_to_eight(np.array(im), always_scale=mode.startswith("I;16"))
        return np.repeat(
            gray[..., None], 3, axis=2
        ), f"{'16-bit' if mode != 'I' else '32-bit'} grayscale ({mode}) -> 8-bit RGB"
    if mode == "F":
        arr = np.array(im, dtype=np.float64)
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        gray = np.clip(np.rint(np.nan_to_num(arr)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2), "float grayscale (F) -> 8-bit RGB"
    # CMYK, YCbCr, LAB, HSV, ...: PIL knows the colour transform.
    return np.array(im.convert("RGB"), dtype=np.uint8), f"{mode} -> RGB"


def decode_image(
    path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 1
) -> DecodedImage:
    """Decode an image file into ``(H, W, 3)`` uint8 RGB.

    Args:
        path: image file; its real format is detected from the bytes, not the extension.
        max_pixels: width × height limit checked from the header before decoding (decompression bombs).
        min_side: smaller images (shorter side) are refused.

    Returns:
        The RGB array with the detected format, the original mode and conversion notes. EXIF orientation
        is deliberately not applied: the Oxford trimaps are aligned with the stored pixel grid.

    Raises:
        ImageIssue: empty, unreadable, truncated, undecodable, too large or too small.
    """
    path = Path(path)
    im, fh = _open_checked(path, max_pixels, min_side)
    try:
        fmt, mode = str(im.format), im.mode
        notes: list[str] = []
        fmt_note = _format_note(path, fmt)
        if fmt_note:
            notes.append(fmt_note)
        try:
            frames = int(getattr(im, "n_frames", 1))
        except Exception:  # counting frames walks the file; a broken tail shows up in load() below
            frames = 1
        if frames > 1:
            im.seek(0)
            notes.append(f"{frames}-frame {fmt}: first frame used")
        _load(im, path)
        try:
            arr, conv = _to_rgb(im)
        except ImageIssue:
            raise
        except Exception as exc:
            raise ImageIssue(
                path, f"cannot convert mode {mode} to RGB ({type(exc).__name__}: {exc})"
            ) from None
        if conv:
            notes.append(conv)
        return DecodedImage(np.ascontiguousarray(arr), fmt, mode, notes)
    finally:
        im.close()
        fh.close()


def read_rgb(
    path: str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = 1,
    notes: list[str] | None = None,
) -> np.ndarray:
    """Decode an image to ``(H, W, 3)`` uint8 RGB (see :func:`decode_image`).

    Args:
        path: image file.
        max_pixels: decompression-bomb guard (width × height).
        min_side: smaller images are refused.
        notes: if given, conversion notes (``"CMYK -> RGB"``, ``"PNG bytes named .jpg"``) are appended.

    Raises:
        ImageIssue: the file cannot be used.
    """
    decoded = decode_image(path, max_pixels=max_pixels, min_side=min_side)
    if notes is not None:
        notes.extend(decoded.notes)
    return decoded.array


def read_trimap(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a label map (trimap) to ``(H, W)`` uint8 label values.

    Palette images give their indices (not the palette colours); 16-bit maps keep their values when they
    fit in 8 bits; RGB(A) maps are accepted only when the colour channels are identical.

    Raises:
        ImageIssue: the file cannot be used or does not hold single-channel labels.
    """
    path = Path(path)
    im, fh = _open_checked(path, max_pixels, 1)
    try:
        _load(im, path)
        mode = im.mode
        try:
            if mode in ("L", "P"):
                arr = np.array(im, dtype=np.uint8)
            elif mode in ("LA", "PA"):
                arr = np.array(im.getchannel(0), dtype=np.uint8)
            elif mode == "1":
                arr = np.array(im.convert("L"), dtype=np.uint8) // 255
            elif mode.startswith("I"):
                wide = np.array(im).astype(np.int64)
                if wide.size and (wide.min() < 0 or wide.max() > 255):
                    raise ImageIssue(path, f"label values outside 0..255 in a {mode} label map")
                arr = wide.astype(np.uint8)
            elif mode in ("RGB", "RGBA", "RGBX"):
                rgb = np.array(im, dtype=np.uint8)[..., :3]
                if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()):
                    raise ImageIssue(path, f"label map is a colour image ({mode}), expected one channel")
                arr = np.ascontiguousarray(rgb[..., 0])
            else:
                raise ImageIssue(path, f"unsupported label map mode {mode}")
        except ImageIssue:
            raise
        except Exception as exc:
            raise ImageIssue(path, f"cannot read labels ({type(exc).__name__}: {exc})") from None
        return arr
    finally:
        im.close()
        fh.close()
