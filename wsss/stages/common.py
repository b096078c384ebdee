"""Helpers shared by the training and inference stages (data selection, loaders, weights)."""

from __future__ import annotations

from pathlib import Path

import torch

from wsss.config import is_weights_file
from wsss.data.loaders import loader
from wsss.errors import DataError
from wsss.paths import Paths

__all__ = ["load_trained_model", "loader", "require_rows", "reset_if_stale", "resolve_weights"]


def resolve_weights(spec: str, paths: Paths) -> str:
    """``imagenet`` / ``none`` pass through; ``pretrain:<name>`` becomes the pretrained backbone's path; a
    ``.pt``/``.pth`` file (relative to the project root) must exist."""
    if spec.startswith("pretrain:"):
        name = spec.split(":", 1)[1]
        path = paths.model_dir(f"pretrain-{name}") / "model.pt"
        if not path.exists():
            raise DataError(f"{path}: self-supervised backbone '{name}' not found; run `wsss pretrain` first")
        return str(path)
    if is_weights_file(spec):
        path = Path(spec) if Path(spec).is_absolute() else paths.root / spec
        if not path.is_file():
            raise DataError(f"{path}: backbone weights file not found")
        return str(path)
    return spec


def require_rows(n: int, what: str, hint: str, source: Path) -> None:
    """Fail clearly when a selection of the manifest is empty."""
    if n == 0:
        raise DataError(f"{source}: no {what} in the manifest; {hint}")


def load_trained_model(paths: Paths, name: str) -> tuple[torch.nn.Module, dict]:
    """TRANSITIONAL (issue 15): :func:`wsss.models.loading.load_model` with the meta as a dict.

    Kept only for ``train_ccam`` until it calls ``load_model`` (then ``meta.arch``); delete at the merge.
    """
    from wsss.models.loading import load_model

    model, meta = load_model(paths, name)
    return model, dict(meta.raw)


def reset_if_stale(out_dir: Path, fp: str) -> None:
    """Prepare a resumable output folder: files of another configuration (fingerprint) are removed,
    files of this one are kept, and the completion stamp ``_done.json`` is cleared until the run ends."""
    import shutil

    from wsss.io import read_json, write_json

    stamp = out_dir / "_fingerprint.json"
    if out_dir.exists():
        old = read_json(stamp).get("fingerprint") if stamp.exists() else None
        if old != fp:
            shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(stamp, {"fingerprint": fp})
    done = out_dir / "_done.json"
    if done.exists():
        done.unlink()
