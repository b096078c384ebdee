"""Atomic file writes, guarded deletion and small I/O helpers.

Every artefact is written to a temporary file in the destination folder and then moved into place with
``os.replace``, so a killed process never leaves a half-written file under an output path. Folders are
deleted only through :func:`remove_tree`, which refuses anything outside its owner's folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from wsss.errors import DataError

_UMASK = os.umask(0)
os.umask(_UMASK)


_TMP_SUFFIX = ".tmp"
# This host in temporary-file names (dots would break their parsing; '@' separates it from the pid).
_HOST_TAG = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"
_swept: set[str] = set()


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: the process exists but belongs to someone else
        return True
    return True


def process_gone(host: str | None, pid: str | int | None) -> bool:
    """True only when ``pid`` (as recorded with ``host``) ran on this host and no such process exists any more."""
    text = str(pid if pid is not None else "")
    return host == socket.gethostname() and text.isdigit() and not pid_alive(int(text))


def require_inside(path: str | Path, owner_root: str | Path) -> None:
    """Check that ``path`` lies strictly inside ``owner_root`` (a stage's own output root), so it may be emptied.

    Refused: a path with a ``..`` component, one that is not below ``owner_root`` (lexically and, when it
    exists, once resolved), ``owner_root`` itself, and a path that is a symlink or passes through one below
    ``owner_root`` (a symlinked variant folder must not empty the folder it points at). ``owner_root``
    itself may lie under a symlink.

    Raises:
        DataError: the path is refused.
    """
    path, owner = Path(path), Path(owner_root)
    if ".." in path.parts or ".." in owner.parts:
        raise DataError(f"{path}: refusing to delete a path with '..' in it")
    try:
        rel = path.relative_to(owner)
    except ValueError:
        raise DataError(f"{path}: refusing to delete outside {owner}") from None
    if not rel.parts:
        raise DataError(f"{path}: refusing to delete the output root {owner} itself")
    cur = owner
    for part in rel.parts:
        cur = cur / part
        if cur.is_symlink():
            raise DataError(f"{path}: refusing to delete through the symlink {cur}")
    if path.exists() and (not path.resolve().is_relative_to(owner.resolve()) or path.resolve() == owner.resolve()):
        raise DataError(f"{path}: refusing to delete outside {owner}")


def remove_tree(path: str | Path, owner_root: str | Path, ignore_errors: bool = False) -> None:
    """Delete the folder ``path`` if :func:`require_inside` allows it (a missing ``path`` is nothing to do).

    ``ignore_errors`` ignores errors of the deletion itself, never a refusal.

    Raises:
        DataError: the deletion is refused (nothing is deleted).
    """
    require_inside(path, owner_root)
    if Path(path).exists():
        shutil.rmtree(path, ignore_errors=ignore_errors)


def sweep_stale_temps(folder: str | Path) -> list[Path]:
    """Remove temporary files that killed writers left in ``folder``; returns what was removed.

    Temporary files are named ``.<dest name>.<pid>@<host>.<random>.tmp``; one written on this host whose
    writer process no longer exists can never be completed. Another host's are left alone: their writer's pid
    means nothing here (parts of a sharded run on several nodes share one output folder). (They are hidden, so never mistaken for an artefact, but DVC would
    still hash them into a folder output, and a killed model save can leave hundreds of MB.)
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not (name.startswith(".") and name.endswith(_TMP_SUFFIX)):
            continue
        parts = name[: -len(_TMP_SUFFIX)].rsplit(".", 2)
        if len(parts) != 3:
            continue
        pid_text, _, host = parts[1].partition("@")
        if not pid_text.isdigit() or (host and host != _HOST_TAG):
            continue
        pid = int(pid_text)
        if pid == os.getpid() or pid_alive(pid):
            continue
        with contextlib.suppress(OSError):
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success it replaces ``dest``, on error it is removed.

    The first write into a folder in this process also removes temporary files of writers that were
    killed (:func:`sweep_stale_temps`).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    folder = os.path.abspath(dest.parent)
    if folder not in _swept:
        sweep_stale_temps(folder)
        _swept.add(folder)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.{os.getpid()}@{_HOST_TAG}.", suffix=_TMP_SUFFIX, dir=dest.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; artefacts get the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_open(dest: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file for writing; it replaces ``dest`` only if the block succeeds."""
    with atomic_path(dest) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh


def write_json(dest: str | Path, data: Any) -> None:
    """Write JSON atomically (sorted keys, indented, trailing newline)."""
    with atomic_open(dest, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=_json_default)
        fh.write("\n")


class UnreadableJsonError(DataError, ValueError):
    """A JSON file that is not UTF-8 JSON: a one-line :class:`DataError` naming it (and still a
    ``ValueError`` for callers that skip unreadable files)."""


def read_json(path: str | Path) -> Any:
    """Read a JSON file.

    Raises:
        UnreadableJsonError: the file is not valid UTF-8 JSON (names the file and where it breaks).
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UnreadableJsonError(f"{path}: not UTF-8 text (offset {exc.start}); delete it or rerun the "
                                  "stage that wrote it") from None
    except json.JSONDecodeError as exc:
        raise UnreadableJsonError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column "
                                  f"{exc.colno}); delete it or rerun the stage that wrote it") from None


def write_text(dest: str | Path, text: str) -> None:
    """Write text atomically."""
    with atomic_open(dest, "w", encoding="utf-8") as fh:
        fh.write(text)


def save_npz(dest: str | Path, **arrays: np.ndarray) -> None:
    """Save a compressed ``.npz`` atomically (never pickles: object arrays are rejected)."""
    for name, arr in arrays.items():
        if np.asarray(arr).dtype == object:
            raise TypeError(f"array '{name}' has dtype object; refusing to pickle into {dest}")
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Load an ``.npz`` without allowing pickles."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def save_png(dest: str | Path, array: np.ndarray) -> None:
    """Save a uint8 array (H×W or H×W×3) as PNG atomically."""
    from PIL import Image

    with atomic_path(dest) as tmp:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG")


def file_md5(path: str | Path, chunk: int = 1 << 20) -> str:
    """MD5 of a file's bytes."""
    h = hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
