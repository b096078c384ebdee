"""Helpers shared by the training and inference stages (data selection, loaders, weights)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from wsss.config import Params
from wsss.errors import DataError
from wsss.paths import Paths


def resolve_weights(spec: str, paths: Paths) -> str:
    """``imagenet`` / ``none`` pass through; ``pretrain:<name>`` becomes the pretrained backbone's path."""
    if spec.startswith("pretrain:"):
        name = spec.split(":", 1)[1]
        path = paths.model_dir(f"pretrain-{name}") / "model.pt"
        if not path.exists():
            raise DataError(f"{path}: self-supervised backbone '{name}' not found; run `wsss pretrain` first")
        return str(path)
    return spec


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

    kind = read_json(meta_path).get("kind")
    state, meta = load_model_state(src, {"kind": kind})
    if kind == "classifier":
        from wsss.models.classifier import Classifier

        model: torch.nn.Module = Classifier(meta["arch"], int(meta["num_classes"]), weights="none")
    elif kind == "ccam":
        from wsss.models.ccam import CCAM

        model = CCAM(meta["arch"], weights="none")
    else:
        raise DataError(f"{meta_path}: unknown model kind {kind!r}")
    model.load_state_dict(state)
    return model.eval(), meta
