"""The U-Net's files inside an MLflow model: ``weights.safetensors`` + ``wsss_unet.json``, and their checked loading.

The metadata holds everything needed to rebuild and use the network without this repository's
``models/`` folder: architecture, encoder / filters, classes, input size, ImageNet mean/std, decision
rule (threshold, flip test-time augmentation; :mod:`wsss.decision`), and two checksums: the SHA-256 of the weights file (checked before a byte of it is parsed)
and the state SHA-256 of :func:`wsss.training.checkpoint.state_sha256` (the same value as
``models/<name>/meta.json``, so a logged model can be matched to the DVC-tracked one). Nothing here
unpickles: safetensors is a JSON header plus raw tensor bytes. Format: docs/artefacts.md#mlflow-model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from wsss.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from wsss.decision import Decision
from wsss.errors import DataError

FORMAT = "wsss-unet"
FORMAT_VERSION = 2  # 2: ``flip_tta`` (a version-1 file decides without flip)
METADATA_FILE = "wsss_unet.json"
WEIGHTS_FILE = "weights.safetensors"
CLASSES = ("background", "pet")
MAX_METADATA_BYTES = 1 << 20
RETRAIN = "retrain it (`wsss train-unet`) and re-register it (`wsss report`)"
FORMAT_TAG = "wsss_format"  # key in MLmodel's ``metadata`` that marks an MLflow model of this format
CODE_FILE = "pyfunc_code.py"  # the models-from-code file of the pyfunc (wsss/serving/pyfunc_code.py)


def format_tag() -> str:
    """The value of ``metadata.wsss_format`` in MLmodel this wsss writes, e.g. ``wsss-unet/2``."""
    return f"{FORMAT}/{FORMAT_VERSION}"


def readable_tags() -> tuple[str, ...]:
    """Every ``metadata.wsss_format`` this wsss loads: this version and the older ones."""
    return tuple(f"{FORMAT}/{v}" for v in range(1, FORMAT_VERSION + 1))


def file_sha256(data: bytes) -> str:
    """SHA-256 hex digest of ``data``."""
    return hashlib.sha256(data).hexdigest()


def describe(model: nn.Module) -> dict[str, Any]:
    """The architecture keys of a U-Net built by :func:`wsss.models.unet.build_unet`, read off the module.

    Raises:
        DataError: ``model`` is not a U-Net wsss builds.
    """
    from wsss.models.unet import PadCrop, PlainUNet

    if isinstance(model, PlainUNet):
        filters = [int(model.inc[0].out_channels)] + [int(d[1][0].out_channels) for d in model.down]
        return {"architecture": "plain", "encoder": None, "plain_filters": filters,
                "num_classes": int(model.out.out_channels)}
    net = getattr(model, "net", None)
    if isinstance(model, PadCrop) and type(net).__name__ == "Unet" and str(getattr(net, "name", "")).startswith("u-"):
        return {"architecture": "smp", "encoder": net.name.removeprefix("u-"), "plain_filters": None,
                "num_classes": int(net.segmentation_head[0].out_channels)}
    raise DataError(f"cannot export {type(model).__name__}: not a U-Net built by wsss.models.unet.build_unet")


def build(meta: dict[str, Any], where: str) -> nn.Module:
    """The untrained network ``meta`` describes (``where`` names the metadata in errors).

    Raises:
        DataError: the metadata does not describe a U-Net this wsss can build.
    """
    from wsss.config import UnetConfig
    from wsss.errors import WsssError
    from wsss.models.unet import build_unet

    try:
        arch = meta["architecture"]
        if arch not in ("smp", "plain"):
            raise ValueError(f"architecture {arch!r}")
        default = UnetConfig()
        cfg = UnetConfig(architecture=arch, encoder=str(meta.get("encoder") or default.encoder),
                         encoder_weights="none", input_size=int(meta["input_size"]),
                         plain_filters=tuple(int(f) for f in meta.get("plain_filters") or default.plain_filters))
        return build_unet(cfg, num_classes=int(meta["num_classes"]))
    except (WsssError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{where}: does not describe a U-Net wsss can build ({type(exc).__name__}: {exc}); "
                        f"{RETRAIN}") from None


def write(dest: Path, model: nn.Module, input_size: int, masks: str | None = None,
          rule: Decision | None = None) -> tuple[Path, Path]:
    """Write ``weights.safetensors`` and ``wsss_unet.json`` for ``model`` into ``dest``, deciding by ``rule``
    (default: 0.5 without flip).

    The description is checked by rebuilding the network from it and loading the weights strictly, so a
    metadata file that could not rebuild its weights is never written.

    Returns:
        ``(metadata path, weights path)``.
    """
    from safetensors.torch import save as safetensors_bytes

    from wsss import __version__
    from wsss.io import write_json
    from wsss.training.checkpoint import state_sha256

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    arch = describe(model)
    rule = rule or Decision()
    meta: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": "unet", **arch,
        "classes": list(CLASSES), "pet_class": CLASSES.index("pet"),
        "input_size": int(input_size), "threshold": float(rule.threshold),
        "flip_tta": bool(rule.flip_tta),
        "preprocessing": {"color": "RGB", "dtype": "uint8", "scale": 1 / 255, "mean": list(IMAGENET_MEAN),
                          "std": list(IMAGENET_STD),
                          "resize": "bilinear (antialiased) to input_size x input_size; the logits are "
                                    "resized back bilinearly to the image's size before the softmax; with "
                                    "flip_tta, averaged with the mirrored image's probability"},
        "masks": masks, "state_sha256": state_sha256(state), "torch_version": torch.__version__,
        "wsss_version": __version__,
    }
    rebuilt = build(meta, "export")
    rebuilt.load_state_dict(state, strict=True)  # raises if describe() missed something
    weights = dest / WEIGHTS_FILE
    data = safetensors_bytes(state, metadata={"format": FORMAT})
    weights.write_bytes(data)
    meta["weights"] = {"file": WEIGHTS_FILE, "sha256": file_sha256(data), "bytes": len(data)}
    write_json(dest / METADATA_FILE, meta)
    return dest / METADATA_FILE, weights


def read_metadata(path: Path, where: str) -> dict[str, Any]:
    """``wsss_unet.json``, checked to be this format (``where`` names it in errors).

    Raises:
        DataError: missing, unreadable, not our format or a newer version.
    """
    try:
        if path.stat().st_size > MAX_METADATA_BYTES:
            raise DataError(f"{where}: larger than {MAX_METADATA_BYTES} bytes; not wsss U-Net metadata")
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{where}: not found; not a wsss U-Net MLflow model") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{where}: unreadable ({type(exc).__name__}: {exc}); {RETRAIN}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{where}: not wsss U-Net metadata (format is not {FORMAT!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise DataError(f"{where}: format version {version!r}; this wsss reads version {FORMAT_VERSION}: "
                        "upgrade wsss or re-register the model")
    pre = meta.get("preprocessing")
    if (not isinstance(pre, dict) or [float(v) for v in pre.get("mean", ())] != list(IMAGENET_MEAN)
            or [float(v) for v in pre.get("std", ())] != list(IMAGENET_STD)):
        raise DataError(f"{where}: preprocessing is not the ImageNet mean/std this wsss applies; {RETRAIN}")
    threshold = meta.get("threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
        raise DataError(f"{where}: threshold {threshold!r} is not a number strictly between 0 and 1; {RETRAIN}")
    if not isinstance(meta.get("flip_tta", False), bool):
        raise DataError(f"{where}: flip_tta {meta.get('flip_tta')!r} is not true or false; {RETRAIN}")
    return meta


def _weights_entry(meta: dict[str, Any], where: str) -> tuple[str, str]:
    entry = meta.get("weights")
    name = entry.get("file") if isinstance(entry, dict) else None
    sha = entry.get("sha256") if isinstance(entry, dict) else None
    # A plain file name: the metadata must not point outside its own folder.
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise DataError(f"{where}: no valid weights file name; {RETRAIN}")
    if not isinstance(sha, str) or len(sha) != 64:
        raise DataError(f"{where}: no weights SHA-256; {RETRAIN}")
    return name, sha


def load(folder: Path, where: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the U-Net stored in ``folder`` (the MLflow model's ``artifacts/``), CPU, eval mode.

    Order: metadata checked, weights file read into memory and its SHA-256 compared with the recorded
    one *before* it is parsed (from the same bytes, so nothing can swap the file in between), tensors
    parsed by safetensors (no pickle), network rebuilt from the metadata, weights loaded strictly, state
    SHA-256 compared.

    Args:
        folder: holds ``wsss_unet.json`` and the weights file.
        where: how to name ``folder`` in errors (e.g. the ``models:/`` URI it was downloaded from).

    Returns:
        ``(model, metadata)``.

    Raises:
        DataError: anything missing, altered or not of this format.
    """
    from safetensors.torch import load as parse_safetensors  # looked up per call: tests replace it

    from wsss.training.checkpoint import state_sha256

    folder = Path(folder)
    label = where or str(folder)
    meta_where = f"{label}/{METADATA_FILE}"
    meta = read_metadata(folder / METADATA_FILE, meta_where)
    name, sha = _weights_entry(meta, meta_where)
    weights_where = f"{label}/{name}"
    try:
        data = (folder / name).read_bytes()
    except OSError as exc:
        raise DataError(f"{weights_where}: cannot be read ({exc.strerror or exc}); {RETRAIN}") from None
    if file_sha256(data) != sha:
        raise DataError(f"{weights_where}: SHA-256 differs from the one recorded in {METADATA_FILE} "
                        f"(altered or damaged); refused before reading it: {RETRAIN}")
    try:
        state: dict[str, Tensor] = parse_safetensors(data)
    except Exception as exc:  # safetensors raises its own SafetensorError on a bad header
        raise DataError(f"{weights_where}: not a valid safetensors file ({type(exc).__name__}: {exc})") from None
    model = build(meta, meta_where)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc).strip())[:240]
        raise DataError(f"{weights_where}: does not fit the U-Net {METADATA_FILE} describes ({first}); "
                        f"{RETRAIN}") from None
    if state_sha256(state) != meta.get("state_sha256"):
        raise DataError(f"{weights_where}: state SHA-256 differs from {METADATA_FILE}; {RETRAIN}")
    return model.eval(), meta
