"""Helpers shared by the training and inference stages (data selection, loaders, weights)."""

from __future__ import annotations

from pathlib import Path

from wsss.data.loaders import loader
from wsss.errors import DataError
from wsss.paths import Paths
from wsss.variants import WeightSpec

__all__ = ["loader", "require_rows", "reset_if_stale", "resolve_weights"]


def resolve_weights(spec: WeightSpec | str, paths: Paths) -> str:
    """``imagenet`` / ``none`` pass through; ``pretrain:<name>`` becomes the pretrained backbone's path; a
    ``.pt``/``.pth`` file (relative to the project root) must exist."""
    spec = WeightSpec.parse(spec) if isinstance(spec, str) else spec
    if spec.pretrain_id is not None:
        path = paths.model_dir(spec.pretrain_id) / "model.pt"
        if not path.exists():
            raise DataError(f"{path}: self-supervised backbone '{spec.value}' not found; run `wsss pretrain` first")
        return str(path)
    if spec.kind == "file":
        path = Path(spec.value) if Path(spec.value).is_absolute() else paths.root / spec.value
        if not path.is_file():
            raise DataError(f"{path}: backbone weights file not found")
        return str(path)
    return str(spec)


def require_rows(n: int, what: str, hint: str, source: Path) -> None:
    """Fail clearly when a selection of the manifest is empty."""
    if n == 0:
        raise DataError(f"{source}: no {what} in the manifest; {hint}")



def reset_if_stale(out_dir: Path, fp: str, owner: Path) -> None:
    """Prepare a resumable output folder: files of another configuration (fingerprint) are removed,
    files of this one are kept, and the completion stamp ``_done.json`` is cleared until the run ends.

    ``out_dir`` is a variant's folder inside the stage's own output root ``owner`` (``cams/``, ``masks/``):
    anything else, a symlink or a path with ``..`` is refused before anything is read or written
    (:func:`wsss.io.require_inside`).
    """
    from wsss.io import read_json, remove_tree, require_inside, write_json

    require_inside(out_dir, owner)  # before reading or writing anything in it
    stamp = out_dir / "_fingerprint.json"
    if out_dir.exists():
        old = read_json(stamp).get("fingerprint") if stamp.exists() else None
        if old != fp:
            remove_tree(out_dir, owner)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(stamp, {"fingerprint": fp})
    done = out_dir / "_done.json"
    if done.exists():
        done.unlink()
