"""Background-only images (no pet) from a Stanford Background Dataset root.

Accepted layouts: ``<root>/images/*.jpg`` (the ``iccv09Data`` archive; its ``labels/`` folder is not used)
or ``<root>`` directly containing the images.
"""

from __future__ import annotations

import os
from pathlib import Path

from wsss.data.images import is_image_name
from wsss.data.images import issue as _issue
from wsss.errors import DataError


def background_folder(root: Path) -> Path:
    """The folder holding the images: ``<root>/images`` if it exists, else ``<root>``.

    Raises:
        DataError: ``root`` does not exist or is not a folder.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(
            f"{root}: background image folder not found (expected the Stanford Background layout "
            "<root>/images/*.jpg, e.g. iccv09Data/, or a folder of images; set base.background_root: null "
            "to train without background images)"
        )
    if not root.is_dir():
        raise DataError(f"{root}: background root is not a folder")
    images = root / "images"
    return images if images.is_dir() else root


def list_background_images(root: Path) -> tuple[list[Path], list[dict[str, str]]]:
    """List background images, sorted by file name.

    Args:
        root: Stanford Background root (``iccv09Data``) or a folder of images.

    Returns:
        ``(paths, issues)``: image files (by extension; decoding happens later) and ``ignored`` issues for
        other entries (non-image files, sub-folders, a second file with the same stem).

    Raises:
        DataError: the folder does not exist or cannot be listed.
    """
    folder = background_folder(root)
    try:
        with os.scandir(folder) as it:
            names = sorted(e.name for e in it if not e.name.startswith("."))
    except OSError as exc:
        raise DataError(f"{folder}: cannot list background folder ({exc.strerror or exc})") from None
    paths: list[Path] = []
    issues: list[dict[str, str]] = []
    stems: dict[str, Path] = {}
    for name in names:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            issues.append(_issue(path, "a folder inside the background folder", "ignored"))
            continue
        if not is_image_name(name):
            issues.append(_issue(path, "not an image file (unknown extension)", "ignored"))
            continue
        stem = Path(name).stem
        if stem in stems:
            issues.append(_issue(path, f"same name as {stems[stem].name}; only the first is used", "ignored"))
            continue
        stems[stem] = path
        paths.append(path)
    if not paths:
        issues.append(_issue(folder, "no background images found", "ignored"))
    return paths, issues
