"""The on-disk format of extracted maps: ``cams/<variant>/shard-NNNNN.npz``.

Each shard is a compressed ``.npz`` (no pickles) with keys:

=========  =====================  ===========================================================
ids        (N,) unicode           image ids (manifest ``id``), sorted within and across shards
maps       (N, Hmax, Wmax) f16    foreground maps max-normalised to [0, 1] at the prepared image
                                  size; image i occupies ``maps[i, :h_i, :w_i]`` (the rest is 0)
sizes      (N, 2) int32           (h_i, w_i)
targets    (N,) int32             class index the map was computed for (-1: class-agnostic)
raw_max    (N,) float32           max of the map the method computed, before this file's
                                  max-normalisation: the raw multi-scale sum for CAM and
                                  CCAM (then ``maps * raw_max`` is that sum, up to resizing
                                  and float16); just under 1 for ECS, whose maps are
                                  already normalised; 1.0 for the ensemble (fused maps)
=========  =====================  ===========================================================

``_shards.json`` records every shard as :func:`write_shard` writes it:
``{"shard-NNNNN.npz": {"bytes": <size>, "sha256": "<hex digest>"}, ...}`` (sorted keys), so a rerun can
tell a finished shard from a truncated, overwritten or swapped one (:func:`shard_problem`) and
recompute it.

``_done.json`` (written last) records the fingerprint of the params and model that produced the
shards, so a rerun skips finished shards and a changed configuration starts afresh.

Readers turn any unreadable shard into a :class:`~wsss.errors.DataError` naming the file, the reason
and the ``wsss make-cams`` command that rewrites it.
"""

from __future__ import annotations

import hashlib
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsss.errors import ConfigError, DataError
from wsss.io import load_npz, read_json, save_npz, write_json

SHARD_GLOB = "shard-*.npz"
INDEX_FILE = "_shards.json"
KEYS = ("ids", "maps", "sizes", "targets", "raw_max")
# What a damaged or foreign file raises inside zipfile / numpy while it is opened or decompressed.
_UNREADABLE = (zipfile.BadZipFile, EOFError, zlib.error, OSError, ValueError, KeyError)


def shard_path(cams_dir: Path, index: int) -> Path:
    return Path(cams_dir) / f"shard-{index:05d}.npz"


def plan_shards(ids: Sequence[str], shard_size: int) -> list[list[str]]:
    """Sorted ids cut into shards of ``shard_size`` (deterministic, so resume can skip finished ones)."""
    ordered = sorted(ids)
    return [ordered[i : i + shard_size] for i in range(0, len(ordered), shard_size)]


def write_shard(path: Path, ids: Sequence[str], maps: Sequence[np.ndarray], targets: Sequence[int],
                raw_max: Sequence[float], index_file: str = INDEX_FILE) -> None:
    """Pack per-image maps of different sizes into one padded float16 shard (atomic write), and record its
    size and SHA-256 in the folder's ``_shards.json`` (or ``index_file``: a sharded run's own part)."""
    sizes = np.array([m.shape for m in maps], dtype=np.int32).reshape(-1, 2)
    hmax, wmax = (sizes.max(0) if len(maps) else (0, 0))
    packed = np.zeros((len(maps), hmax, wmax), dtype=np.float16)
    for i, m in enumerate(maps):
        packed[i, : m.shape[0], : m.shape[1]] = np.clip(m, 0.0, 1.0)
    save_npz(path, ids=np.array(list(ids), dtype=str), maps=packed, sizes=sizes,
             targets=np.array(list(targets), dtype=np.int32), raw_max=np.array(list(raw_max), dtype=np.float32))
    record_shard(path, index_file)


# --------------------------------------------------------------------------------------------------
# integrity: the size and SHA-256 of every shard, recorded as it is written


def file_record(path: Path) -> dict[str, Any]:
    """``{"bytes": size, "sha256": hex digest}`` of a file as it is now."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return {"bytes": Path(path).stat().st_size, "sha256": h.hexdigest()}


def load_index(cams_dir: Path, index_file: str = INDEX_FILE) -> dict[str, dict[str, Any]]:
    """The shard records of ``_shards.json`` (or ``index_file``; empty when it is missing or unreadable)."""
    try:
        index = read_json(Path(cams_dir) / index_file)
    except (OSError, ValueError):
        return {}
    if not isinstance(index, dict):
        return {}
    return {name: rec for name, rec in index.items() if isinstance(rec, dict)}


def record_shard(path: Path, index_file: str = INDEX_FILE) -> None:
    """Record the size and SHA-256 of the shard ``path`` in its folder's ``_shards.json`` (or ``index_file``)
    (atomic rewrite)."""
    path = Path(path)
    index = load_index(path.parent, index_file)
    index[path.name] = file_record(path)
    write_json(path.parent / index_file, index)


def shard_problem(path: Path, record: dict[str, Any] | None) -> str | None:
    """Why the shard at ``path`` is not the finished one ``record`` describes, or None when it is.

    A shard without a record (written before records were kept, or its writer killed between the shard
    and the record) counts as finished when it reads completely (every member's CRC-32 checks).
    """
    path = Path(path)
    if not path.exists():
        return "missing"
    if record is None:
        try:
            _load(path)
        except _Damaged as exc:
            return f"no record, and unreadable ({exc})"
        return None
    size = path.stat().st_size
    if size != record.get("bytes"):
        return f"{size} bytes, {record.get('bytes')} recorded when it was written"
    if file_record(path)["sha256"] != record.get("sha256"):
        return "its SHA-256 differs from the one recorded when it was written"
    return None


def verify_shard(path: Path, index: dict[str, dict[str, Any]]) -> None:
    """Check a stored shard against its record in ``index`` (one without a record is left to the readers).

    Raises:
        DataError: its size or SHA-256 is not the one recorded when it was written.
    """
    record = index.get(Path(path).name)
    problem = shard_problem(path, record) if record is not None else None
    if problem:
        raise DataError(f"{path}: damaged map shard ({problem}); rerun {remake_hint(Path(path).parent)} "
                        "to recompute it")


# --------------------------------------------------------------------------------------------------
# reading


class _Damaged(Exception):
    """A shard that cannot be read; the message is the reason."""


def remake_hint(cams_dir: Path) -> str:
    """The command that rewrites the maps of ``cams_dir`` (its folder name is the variant)."""
    from wsss.variants import MapVariant

    try:
        variant = MapVariant.parse(Path(cams_dir).name)
    except ConfigError:
        return "`wsss make-cams` for this variant"
    model = f" --model {variant.model}" if variant.model is not None else ""
    return f"`wsss make-cams --method {variant.method}{model}`"


def _unreadable(path: Path, exc: _Damaged) -> DataError:
    return DataError(f"{path}: unreadable map shard ({exc}); rerun {remake_hint(Path(path).parent)} to recompute it")


def _reason(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())  # one line, whatever the library said


def _require_zip(path: Path) -> None:
    """Refuse a file that is not a zip archive (numpy would try it as a pickle and advise allowing that)."""
    if not zipfile.is_zipfile(path):
        raise _Damaged("missing" if not path.exists() else "not an .npz (zip) archive: truncated or overwritten")


def _load(path: Path) -> dict[str, np.ndarray]:
    _require_zip(path)
    try:
        data = load_npz(path)
    except _UNREADABLE as exc:
        raise _Damaged(_reason(exc)) from None
    missing = set(KEYS) - set(data)
    if missing:
        raise _Damaged(f"lacks keys {sorted(missing)}")
    n = len(data["ids"])
    if not (data["ids"].ndim == 1 and data["maps"].ndim == 3 and data["sizes"].shape == (n, 2)
            and all(len(data[k]) == n for k in ("maps", "targets", "raw_max"))):
        raise _Damaged("its arrays do not describe the same images")
    return data


def read_shard(path: Path) -> dict[str, np.ndarray]:
    """Load one shard completely, checking its keys and their shapes.

    Raises:
        DataError: the shard is truncated, damaged or not a map shard (one line: the file, the reason and
            the command that recomputes it).
    """
    try:
        return _load(Path(path))
    except _Damaged as exc:
        raise _unreadable(path, exc) from None


def shard_ids(path: Path) -> list[str]:
    """The image ids of one shard, read from its ``ids`` array only (no map is decompressed).

    Raises:
        DataError: as :func:`read_shard`.
    """
    path = Path(path)
    try:
        _require_zip(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                return [str(i) for i in data["ids"]]
        except _UNREADABLE as exc:
            raise _Damaged(_reason(exc)) from None
    except _Damaged as exc:
        raise _unreadable(path, exc) from None


def iter_maps(cams_dir: Path, ids: set[str] | None = None) -> Iterator[tuple[str, np.ndarray, int]]:
    """Yield ``(id, map float32 (h, w), target)`` for every stored image (or only ``ids``)."""
    cams_dir = Path(cams_dir)
    shards = sorted(cams_dir.glob(SHARD_GLOB))
    if not shards:
        raise DataError(f"{cams_dir}: no map shards; run `wsss make-cams` for this variant first")
    for path in shards:
        data = read_shard(path)
        for i, image_id in enumerate(data["ids"]):
            if ids is not None and str(image_id) not in ids:
                continue
            h, w = (int(v) for v in data["sizes"][i])
            yield str(image_id), data["maps"][i, :h, :w].astype(np.float32), int(data["targets"][i])


def load_maps(cams_dir: Path, ids: set[str] | None = None) -> dict[str, np.ndarray]:
    """All (or selected) maps of a variant as ``{id: map}``."""
    return {i: m for i, m, _ in iter_maps(cams_dir, ids)}
