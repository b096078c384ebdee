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

``_done.json`` (written last) records the fingerprint of the params and model that produced the
shards, so a rerun skips finished shards and a changed configuration starts afresh.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from wsss.errors import DataError
from wsss.io import load_npz, save_npz

SHARD_GLOB = "shard-*.npz"


def shard_path(cams_dir: Path, index: int) -> Path:
    return Path(cams_dir) / f"shard-{index:05d}.npz"


def plan_shards(ids: Sequence[str], shard_size: int) -> list[list[str]]:
    """Sorted ids cut into shards of ``shard_size`` (deterministic, so resume can skip finished ones)."""
    ordered = sorted(ids)
    return [ordered[i : i + shard_size] for i in range(0, len(ordered), shard_size)]


def write_shard(path: Path, ids: Sequence[str], maps: Sequence[np.ndarray], targets: Sequence[int],
                raw_max: Sequence[float]) -> None:
    """Pack per-image maps of different sizes into one padded float16 shard (atomic write)."""
    sizes = np.array([m.shape for m in maps], dtype=np.int32).reshape(-1, 2)
    hmax, wmax = (sizes.max(0) if len(maps) else (0, 0))
    packed = np.zeros((len(maps), hmax, wmax), dtype=np.float16)
    for i, m in enumerate(maps):
        packed[i, : m.shape[0], : m.shape[1]] = np.clip(m, 0.0, 1.0)
    save_npz(path, ids=np.array(list(ids), dtype=str), maps=packed, sizes=sizes,
             targets=np.array(list(targets), dtype=np.int32), raw_max=np.array(list(raw_max), dtype=np.float32))


def read_shard(path: Path) -> dict[str, np.ndarray]:
    """Load one shard, checking its keys."""
    try:
        data = load_npz(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable map shard ({exc}); rerun `wsss make-cams`") from None
    missing = {"ids", "maps", "sizes", "targets", "raw_max"} - set(data)
    if missing:
        raise DataError(f"{path}: map shard lacks keys {sorted(missing)}")
    return data


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
