"""``wsss predict``: pet masks and overlays for new images with a trained U-Net.

For every input image ``<stem>.<ext>`` it writes ``<out>/<stem>_mask.png`` (uint8, 0 = background,
1 = pet: the same convention as the dataset masks; multiply by 255 to view) and
``<out>/<stem>_overlay.png`` (the image with the pet tinted). Images of any size are resized to the
model's input size and the prediction is upsampled back, so the mask has the image's own size.

Output names are unique per run: when stems repeat (``a/x.jpg``, ``b/x.png``) or would collide, later
inputs get ``<stem>-2``, ``<stem>-3``, ... (the first free one, inputs in the order collected; names
that differ only in case count as the same). ``<out>/index.json``, written last, says which input each
output came from: ``{"predicted": {input: {"mask": name, "overlay": name}}, "failed": {input: reason}}``
(inputs as given, output names relative to ``<out>``). Inputs that cannot be read, including symlink
loops, are failures with a reason; the rest is processed.

An existing ``--out`` folder is kept: this run adds its own files there. Before writing anything the run
claims the folder (``<out>/.wsss-predict.json``); a folder that ``wsss predict`` has not claimed (and
that has no ``index.json`` of an older run) where one of this run's output names already exists is
refused with exit 1, naming that file, so nobody's ``x_mask.png`` is silently replaced. A claimed
folder is this command's own: a rerun (or a resume after a kill) rewrites its outputs.

Sharded (``--shard i/n`` or ``torchrun``'s ranks): every part collects the same inputs and names outputs
alike, predicts its own contiguous block of them and records it in ``<out>/.index.part-<i>-of-<n>.json``;
the part that finds all ``n`` records of the same inputs, model and threshold writes ``index.json`` (the
bytes one process writes) and removes the records.

The model is a ``models/unet-*`` folder (``model.pt`` + ``meta.json``), an MLflow model folder (with an
``MLmodel`` file) or an MLflow model URI such as ``models:/wsss-unet@champion``. Nothing is unpickled:
MLflow U-Nets are safetensors weights + JSON metadata (docs/artefacts.md#mlflow-model), checked before
use; an old pickle-format MLflow model is refused with a message to retrain / re-register it.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsss.decision import Decision
from wsss.errors import ConfigError, DataError
from wsss.paths import Paths
from wsss.sharding import ALL, Shard, folder_lock, rank_device
from wsss.ui import console, task

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
INDEX_NAME = "index.json"
PART_INDEX = ".index.part-{tag}.json"
PART_GLOB = ".index.part-*.json"
OWNER_NAME = ".wsss-predict.json"  # a folder wsss predict has written into (its outputs may be rewritten)


@dataclass
class PredictResult:
    """What ``run`` did: written masks and per-file failures (``(path, reason)``)."""

    masks: list[Path] = field(default_factory=list)
    failures: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def _unfollowable(path: Path) -> str | None:
    """Why ``path`` cannot be followed (a symlink loop, no permission), or None (it exists or is missing)."""
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        return "symlink loop" if exc.errno == errno.ELOOP else f"cannot open ({exc.strerror or exc})"
    return None


def _inside(path: Path, folder: Path | None) -> bool:
    """Whether ``path`` (followed when it can be) lies in ``folder``; an unfollowable link is placed by its own name."""
    if folder is None:
        return False
    target = path.resolve() if _unfollowable(path) is None else path.parent.resolve() / path.name
    return target.is_relative_to(folder)


def collect_images(inputs: Sequence[Path], exclude: Path | None = None) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Image files of ``inputs`` (files as given; folders searched recursively by extension).

    Args:
        inputs: files or folders.
        exclude: a folder whose files are skipped (the output folder, so reruns do not eat their output).

    Returns:
        ``(images, failures)``: inputs that do not exist or cannot be followed (a symlink loop, also one
        found in a folder under an image name) are failures.
    """
    images: list[Path] = []
    failures: list[tuple[Path, str]] = []
    skip = exclude.resolve() if exclude is not None else None
    for item in inputs:
        path = Path(item)
        if reason := _unfollowable(path):
            failures.append((path, reason))
        elif path.is_dir():
            candidates = sorted(
                p for p in path.rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and not _inside(p, skip)
            )
            for p in candidates:
                if p.is_file():
                    images.append(p)
                elif p.is_symlink() and (reason := _unfollowable(p)):
                    failures.append((p, reason))
        elif path.exists() or path.is_symlink():
            images.append(path)  # named explicitly: tried whatever its extension
        else:
            failures.append((path, "not found"))
    seen: set[Path] = set()
    unique = []
    for p in images:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique, failures


def output_stems(images: Sequence[Path]) -> dict[Path, str]:
    """A distinct output stem per image, whatever the names.

    The first image with a stem keeps it; each later one gets the first free ``<stem>-N`` (N = 2, 3, ...)
    that is neither another image's own stem nor already given. Names are compared case-folded, so the
    outputs stay distinct on case-insensitive file systems too.
    """
    taken = {p.stem.casefold() for p in images}
    first: dict[str, Path] = {}
    for p in images:
        first.setdefault(p.stem.casefold(), p)
    out: dict[Path, str] = {}
    for p in images:
        if first[p.stem.casefold()] is p:
            out[p] = p.stem
            continue
        n = 2
        while f"{p.stem}-{n}".casefold() in taken:
            n += 1
        out[p] = f"{p.stem}-{n}"
        taken.add(out[p].casefold())
    return out


def load_predictor(spec: str, paths: Paths) -> tuple[Any, int, Decision, str]:
    """Load a U-Net from a ``models/`` folder, an MLflow model folder or an MLflow URI; nothing is unpickled.

    MLflow models go through :func:`wsss.serving.loader.load_mlflow_unet` (format checked, weights
    checksum verified before they are read, safetensors, network rebuilt from the metadata).

    Returns:
        ``(model in eval mode on CPU, input size, its decision rule, description)``.

    Raises:
        DataError: the folder or URI does not hold a wsss U-Net, or it fails a check.
    """
    from wsss.models.loading import load_model_dir
    from wsss.serving import loader

    path = Path(spec)
    if path.is_dir() and (path / "meta.json").is_file():
        model, meta = load_model_dir(path, "unet")
        return model, meta.input_size, Decision.of_model(meta.raw, path), f"{path} (masks {meta.masks or '?'})"
    if not loader.is_mlflow_model(spec):
        raise DataError(f"--model {spec}: not a model folder (model.pt + meta.json), an MLflow model folder "
                        "or an MLflow model URI (e.g. models:/wsss-unet@champion)")
    if loader.is_uri(spec):
        from wsss import tracking

        tracking.connect(paths)  # fails fast on a dead server; creates a new store safely
    model, meta = loader.load_mlflow_unet(spec)
    rule = Decision(float(meta["threshold"]), bool(meta.get("flip_tta", False)))
    return model, int(meta["input_size"]), rule, f"{spec} (masks {meta.get('masks') or '?'})"


def _run_fingerprint(images: Sequence[Path], failures: Sequence[tuple[Path, str]], model: str, rule: Decision,
                     count: int) -> str:
    """What the parts of one sharded run agree on: the inputs (in order), the model, the decision rule, ``n``."""
    key = [[str(p) for p in images], [[str(p), r] for p, r in failures], model, rule.threshold, rule.flip_tta, count]
    return hashlib.sha1(json.dumps(key).encode()).hexdigest()


def _merge_parts(out: Path, shard: Shard, fp: str, index: dict[str, Any],
                 failures: Sequence[tuple[Path, str]]) -> dict[str, Any] | None:
    """Record part ``shard``'s index; when all parts of this run are recorded, remove the records and return the
    whole run's index (None until then)."""
    from wsss.io import read_json, write_json

    with folder_lock(out):
        write_json(out / PART_INDEX.format(tag=shard.tag), {"fingerprint": fp, **index})
        parts = {}
        for path in sorted(out.glob(PART_GLOB)):
            try:
                record = read_json(path)
            except DataError:
                continue  # another run's damaged record: not part of this one
            if isinstance(record, dict) and record.get("fingerprint") == fp:
                parts[path] = record
        if len(parts) < shard.count:
            return None
        merged: dict[str, Any] = {"predicted": {}, "failed": {str(p): r for p, r in failures}}
        for path, record in parts.items():
            merged["predicted"].update(record["predicted"])
            merged["failed"].update(record["failed"])
            path.unlink()
    return merged


def claim_out(out: Path, names: Sequence[str]) -> None:
    """Make ``out`` this command's own before any output is written.

    Under the folder's lock (shards claim it once, for every part's outputs): a folder already claimed,
    or holding an older run's ``index.json``, is taken as is; otherwise no file named in ``names`` may
    exist there, and the claim file is written.

    Raises:
        DataError: an output name exists in a folder wsss predict has not written into.
    """
    from wsss.io import write_json

    with folder_lock(out):
        if (out / OWNER_NAME).is_file() or (out / INDEX_NAME).is_file():
            return
        taken = [out / n for n in names if (out / n).exists() or (out / n).is_symlink()]
        if taken:
            raise DataError(f"{taken[0]}: exists and was not written by `wsss predict` ({len(taken)} of this run's "
                            f"output names are taken in {out}); move those files or choose another --out")
        write_json(out / OWNER_NAME, {"written_by": "wsss predict", "outputs": "<stem>_mask.png, <stem>_overlay.png, "
                                                                                "index.json"})


def run(inputs: Sequence[Path], model: str, out: Path, device: str | None = None, paths: Paths | None = None,
        threshold: float | None = None, shard: Shard = ALL) -> PredictResult:
    """Predict a mask and an overlay for every image; a bad file is reported and skipped.

    Args:
        inputs: image files or folders.
        model: a ``models/unet-*`` folder, an MLflow model folder or an MLflow model URI.
        out: output folder.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        paths: the project (for the MLflow tracking store of a URI).
        threshold: pet probability at or above which a pixel is pet (None: the model's own, which
            ``train-unet`` chose on val; 0.5 for a model saved without one).
        shard: predict only this part of the images; the part that finishes last writes ``index.json``
            (its result covers every part; another part's covers its own images).

    Raises:
        DataError: no input at all, or the model cannot be loaded.
        ConfigError: a bad device or threshold.
    """
    from wsss.data.images import ImageIssue, read_rgb
    from wsss.device import precision_from, prepare_model
    from wsss.io import save_png, write_json
    from wsss.viz import tint

    if threshold is not None and not 0.0 < threshold < 1.0:
        raise ConfigError(f"--threshold {threshold}: must be strictly between 0 and 1")
    paths = paths or Paths()
    out = Path(out)
    images, failures = collect_images(inputs, exclude=out)
    if not images and not failures:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {', '.join(map(str, inputs))}")
    prec = precision_from(rank_device(device or "auto"))
    net, size, rule, desc = load_predictor(model, paths)
    if threshold is not None:
        rule = dataclasses.replace(rule, threshold=threshold)
    net = prepare_model(net, prec)
    console.print(f"model {desc}, input {size}px, {rule.describe()}, device {prec.device}")
    result = PredictResult(failures=list(failures))
    stems = output_stems(images)
    claim_out(out, [f"{stems[p]}_{kind}.png" for p in images for kind in ("mask", "overlay")])
    (out / INDEX_NAME).unlink(missing_ok=True)  # a stale index must not describe this run's outputs
    predicted: dict[str, dict[str, str]] = {}
    mine = shard.take(images)
    if shard.sharded:
        result.failures = []  # inputs that were never images: reported once, by the part that merges
    with task("predict" + (f" part {shard}" if shard.sharded else ""), len(mine)) as advance:
        for path in mine:
            try:
                image = read_rgb(path)
                prob = rule.probs(net, [image], size, prec)[0]
            except ImageIssue as exc:
                result.failures.append((path, exc.reason))
                advance(1, info=f"failed: {path.name}")
                continue
            except (RuntimeError, MemoryError, ValueError) as exc:
                result.failures.append((path, f"prediction failed ({type(exc).__name__}: {exc})"))
                advance(1, info=f"failed: {path.name}")
                continue
            mask = rule.mask(prob)
            dest = out / f"{stems[path]}_mask.png"
            overlay = out / f"{stems[path]}_overlay.png"
            save_png(dest, mask)
            save_png(overlay, tint(image, mask))
            result.masks.append(dest)
            predicted[str(path)] = {"mask": dest.name, "overlay": overlay.name}
            advance(1, info=path.name)
    index = {"predicted": predicted, "failed": {str(p): r for p, r in result.failures}}
    if shard.sharded:
        fp = _run_fingerprint(images, failures, model, rule, shard.count)
        merged = _merge_parts(out, shard, fp, index, failures)
        if merged is None:
            console.print(f"part {shard}: {len(result.masks)} of {len(mine)} images predicted -> {out}; the last "
                          "part to finish writes index.json", highlight=False)
            return result
        index = merged
        result = PredictResult(masks=[out / v["mask"] for _, v in sorted(index["predicted"].items())],
                               failures=[(Path(p), r) for p, r in index["failed"].items()])
    write_json(out / INDEX_NAME, index)
    for path, reason in result.failures:
        console.print(f"[bold red]error:[/] {path}: {reason}", highlight=False, soft_wrap=True)
    total = len(result.masks) + len(result.failures)
    summary = f"{len(result.masks)} of {total} images predicted -> {out}"
    if result.failures:
        console.print(f"[bold red]{len(result.failures)} failed[/]; {summary}", highlight=False)
    else:
        console.print(summary, highlight=False)
    return result
