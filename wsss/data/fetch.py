"""Download the real datasets (optional; the default pipeline uses the synthetic dataset).

Both functions turn network failures into a :class:`DataError` explaining how to place the files by hand,
since the machines this runs on are often offline.
"""

from __future__ import annotations

import http.client
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from wsss.errors import DataError
from wsss.io import atomic_path, remove_tree

STANFORD_BACKGROUND_URL = "http://dags.stanford.edu/data/iccv09Data.tar.gz"
# URLError, socket timeouts and connection resets are all OSErrors; HTTPException covers broken responses.
_NETWORK_ERRORS = (OSError, http.client.HTTPException)

_OXFORD_BY_HAND = """\
To place the files by hand, download images.tar.gz and annotations.tar.gz from
https://www.robots.ox.ac.uk/~vgg/data/pets/ on a machine with internet access and extract both into
{dest}/oxford-iiit-pet/ so that it holds:
  {dest}/oxford-iiit-pet/images/<NAME>.jpg
  {dest}/oxford-iiit-pet/annotations/trainval.txt
  {dest}/oxford-iiit-pet/annotations/test.txt
  {dest}/oxford-iiit-pet/annotations/trimaps/<NAME>.png
then set base.data_root to {dest}/oxford-iiit-pet."""

_STANFORD_BY_HAND = """\
To place the files by hand, download {url} on a machine with internet access and extract it into {dest}
so that it holds:
  {dest}/iccv09Data/images/<name>.jpg
then set base.background_root to {dest}/iccv09Data (or set it to null to train without background images)."""


def fetch_oxford_pet(dest: Path) -> Path:
    """Download Oxford-IIIT Pet (images, trimaps, split files) with torchvision into ``dest``.

    Args:
        dest: parent folder; the dataset lands in ``dest/oxford-iiit-pet`` (nothing is downloaded if
            torchvision finds it complete already).

    Returns:
        The ``oxford-iiit-pet`` folder (use it as ``base.data_root``).

    Raises:
        DataError: the download failed (offline, server unreachable, corrupt archive).
    """
    from torchvision.datasets import OxfordIIITPet

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        OxfordIIITPet(root=str(dest), split="trainval", download=True, target_types="segmentation")
    except (*_NETWORK_ERRORS, RuntimeError) as exc:
        raise DataError(
            f"downloading Oxford-IIIT Pet failed ({type(exc).__name__}: {exc}); the machine seems offline "
            "or the server is unreachable.\n" + _OXFORD_BY_HAND.format(dest=dest)
        ) from None
    return dest / "oxford-iiit-pet"


def _check_member(member: tarfile.TarInfo, dest: Path) -> None:
    """Fallback for Pythons without tar extraction filters: plain files/folders inside ``dest`` only."""
    target = (dest / member.name).resolve()
    if not (member.isfile() or member.isdir()) or not target.is_relative_to(dest.resolve()):
        raise DataError(f"unsafe entry in the archive: {member.name!r}")


def _extract(archive: Path, dest: Path) -> None:
    try:
        with tarfile.open(archive, "r:*") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
            else:  # pragma: no cover - Python < 3.10.12
                for member in tar.getmembers():
                    _check_member(member, dest)
                tar.extractall(dest)  # noqa: S202 - members checked above
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(
            f"{archive}: cannot extract ({type(exc).__name__}: {exc}); delete it and retry"
        ) from None


def fetch_stanford_background(dest: Path, url: str = STANFORD_BACKGROUND_URL, timeout: float = 60.0) -> Path:
    """Download and extract the Stanford Background Dataset into ``dest``.

    Args:
        dest: parent folder; the dataset lands in ``dest/iccv09Data`` (skipped if its images/ exists).
        url: archive URL.
        timeout: socket timeout in seconds.

    Returns:
        The ``iccv09Data`` folder (use it as ``base.background_root``).

    Raises:
        DataError: the download failed (offline, server unreachable) or the archive is broken/unsafe.
    """
    dest = Path(dest)
    root = dest / "iccv09Data"
    if (root / "images").is_dir() and any((root / "images").iterdir()):
        return root
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / "iccv09Data.tar.gz"
    if not archive.is_file():
        try:
            with atomic_path(archive) as tmp, urllib.request.urlopen(url, timeout=timeout) as resp:
                with open(tmp, "wb") as fh:
                    shutil.copyfileobj(resp, fh, length=1 << 20)
        except _NETWORK_ERRORS as exc:
            raise DataError(
                f"downloading {url} failed ({type(exc).__name__}: {exc}); the machine seems offline or the "
                "server is unreachable.\n" + _STANFORD_BY_HAND.format(url=url, dest=dest)
            ) from None
    # extract next to the destination, then move into place: a killed extraction leaves no partial tree
    with tempfile.TemporaryDirectory(prefix=".iccv09Data.", dir=dest) as tmpdir:
        _extract(archive, Path(tmpdir))
        extracted = Path(tmpdir) / "iccv09Data"
        if not (extracted / "images").is_dir():
            raise DataError(f"{archive}: the archive has no iccv09Data/images/ folder; delete it and retry")
        if root.exists():
            remove_tree(root, dest)
        extracted.rename(root)
    return root
