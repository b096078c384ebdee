"""Helpers shared by the training and inference stages (data selection, loaders, weights)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from wsss.config import Params
from wsss.errors import DataError
from wsss.paths import Paths
from wsss.variants import WeightSpec


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


def loader(ds: Dataset, batch_size: int, params: Params, shuffle: bool, seed: int = 0,
           drop_last: bool = False) -> DataLoader:
    """A DataLoader seeded for reproducible shuffling."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    workers = params.base.num_workers
    return DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last and len(ds) > batch_size,
        num_workers=workers, generator=gen, persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def require_rows(n: int, what: str, hint: str, source: Path) -> None:
    """Fail clearly when a selection of the manifest is empty."""
    if n == 0:
        raise DataError(f"{source}: no {what} in the manifest; {hint}")


def load_trained_model(paths: Paths, name: str) -> tuple[torch.nn.Module, dict]:
    """Rebuild a trained model from ``models/<name>/`` (state_dict + meta.json), on the CPU, eval mode.

    ``imagenet`` is the paper's "Pretrained" setting: the ImageNet classifier with its own head.
    """
    from wsss.training.checkpoint import load_model_state

    if name == "imagenet":
        from wsss.models.classifier import ImageNetSpeciesClassifier

        model = ImageNetSpeciesClassifier()
        return model.eval(), {"kind": "classifier", "labels": "species", "bg": False, "input_size": 224,
                              "arch": "resnet50", "num_classes": 2}
    src = paths.model_dir(name)
    meta_path = Path(src) / "meta.json"
    if not meta_path.exists():
        raise DataError(f"{meta_path}: model '{name}' not found; train it first (see `wsss --help`)")
    from wsss.io import read_json

    try:
        kind = read_json(meta_path).get("kind")
    except (OSError, ValueError, AttributeError) as exc:
        raise DataError(f"{meta_path} is not a JSON object ({exc}); retrain the model") from None
    if kind not in ("classifier", "ccam"):
        raise DataError(f"{meta_path}: unknown model kind {kind!r}")
    state, meta = load_model_state(src, {"kind": kind})
    # meta.json decides what is built: check it describes a model these weights can fill.
    from wsss.config import ARCHS
    from wsss.training.checkpoint import load_weights, require_meta

    require_meta(meta, ("arch",) + (("num_classes", "labels", "bg") if kind == "classifier" else ()), src)
    if meta["arch"] not in ARCHS:
        raise DataError(f"{meta_path}: arch {meta['arch']!r} is not one of {', '.join(ARCHS)}; retrain the model")
    if kind == "classifier":
        from wsss.data.breeds import num_classes
        from wsss.models.classifier import Classifier

        try:
            k = int(meta["num_classes"])
            expected = num_classes(str(meta["labels"]), bool(meta["bg"]))
        except (TypeError, ValueError, KeyError) as exc:
            raise DataError(f"{meta_path}: invalid label space ({exc}); retrain the model") from None
        if k != expected:
            raise DataError(
                f"{meta_path}: num_classes {k} does not match the label space labels={meta['labels']!r} "
                f"bg={meta['bg']} ({expected} classes); retrain the model"
            )
        model: torch.nn.Module = Classifier(meta["arch"], k, weights="none")
        described = f"classifier {meta['arch']}, {k} classes"
    else:
        from wsss.models.ccam import CCAM

        model = CCAM(meta["arch"], weights="none")
        described = f"ccam {meta['arch']}"
    load_weights(model, state, src, described)
    return model.eval(), meta


def reset_if_stale(out_dir: Path, fp: str) -> None:
    """Prepare a resumable output folder: files of another configuration (fingerprint) are removed,
    files of this one are kept, and the completion stamp ``_done.json`` is cleared until the run ends.

    ``out_dir`` is a variant's folder (``cams/<variant>``, ``masks/<variant>``): a symlink or a path with
    ``..`` is refused before anything is read or written (:func:`wsss.io.require_inside`).
    """
    from wsss.io import read_json, remove_tree, require_inside, write_json

    require_inside(out_dir, out_dir.parent)  # before reading or writing anything in it
    stamp = out_dir / "_fingerprint.json"
    if out_dir.exists():
        old = read_json(stamp).get("fingerprint") if stamp.exists() else None
        if old != fp:
            remove_tree(out_dir, out_dir.parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(stamp, {"fingerprint": fp})
    done = out_dir / "_done.json"
    if done.exists():
        done.unlink()
