"""Resume state after a kill, and final models saved as ``state_dict`` + ``meta.json``.

Everything is written atomically (temp file + ``os.replace``) and read with ``torch.load(weights_only=True)``,
so no file here can execute code when loaded. RNG states are therefore stored as tensors and plain
Python values, never as pickled NumPy objects.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from wsss import io
from wsss.errors import ConfigError, DataError

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.pt"
META_FILE = "meta.json"
# Bumped when the layout of the checkpoint wrapper changes, so old files are ignored instead of misread.
_FORMAT = 1


def load_failure(exc: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` failed, in our own words.

    PyTorch's message advises retrying with ``weights_only=False``, which would run whatever code the file
    holds; this one never does.
    """
    if isinstance(exc, pickle.UnpicklingError):
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            return f"it holds the Python object {found.group(1)}; refused, as loading it could run code"
        return "it is not a plain tensor file; refused by the weights-only loader"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


# --- fingerprints ---------------------------------------------------------------------------------


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"__dataclass__": type(obj).__name__, **_jsonable(dataclasses.asdict(obj))}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(_jsonable(v) for v in obj)
    if isinstance(obj, Path):
        return obj.as_posix()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, enum.Enum):
        return _jsonable(obj.value)
    return obj


def fingerprint(*parts: object) -> str:
    """A stable SHA-1 over the JSON of ``parts`` (dataclasses via ``asdict``, keys sorted).

    Use it over the params and data hashes a run depends on: a checkpoint from a different
    configuration then never gets resumed.
    """
    text = json.dumps([_jsonable(p) for p in parts], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


# --- RNG state ------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU + every CUDA device) RNG states, loadable with ``weights_only=True``."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states produced by :func:`rng_state` (CUDA states only for devices that exist here)."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((
        npy["name"],
        npy["keys"].numpy().astype(np.uint32),
        int(npy["pos"]),
        int(npy["has_gauss"]),
        float(npy["cached_gaussian"]),
    ))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        for index, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, device=index)


# --- resume checkpoints ---------------------------------------------------------------------------


class CheckpointManager:
    """The last complete training state of one stage variant, kept in ``state_dir/checkpoint.pt``.

    A state is only resumed if it was written under the same ``fingerprint``; anything else (another
    configuration, an unreadable or truncated file) is logged, explained in :attr:`reason` and ignored.
    """

    def __init__(self, state_dir: Path, fingerprint: str) -> None:
        self.state_dir = Path(state_dir)
        self.fingerprint = fingerprint
        self.reason: str | None = None

    @property
    def path(self) -> Path:
        """Where the checkpoint lives."""
        return self.state_dir / CHECKPOINT_FILE

    def load(self, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        """The saved state if it exists, is readable and matches the fingerprint; otherwise ``None``.

        When ``None`` is returned, :attr:`reason` says why (``None`` reason: there was no checkpoint).
        """
        self.reason = None
        if not self.path.is_file():
            return None
        try:
            wrapper = torch.load(self.path, map_location=map_location, weights_only=True)
        except Exception as exc:  # any unreadable file means "start fresh", never a crash
            return self._ignore(f"checkpoint {self.path} is unreadable ({load_failure(exc)})")
        if not isinstance(wrapper, dict) or wrapper.get("format") != _FORMAT or "state" not in wrapper:
            return self._ignore(f"checkpoint {self.path} has an unknown layout")
        if wrapper.get("fingerprint") != self.fingerprint:
            return self._ignore(
                f"checkpoint {self.path} belongs to another configuration "
                f"(fingerprint {wrapper.get('fingerprint')!r}, this run {self.fingerprint!r})"
            )
        return wrapper["state"]

    def _ignore(self, reason: str) -> None:
        self.reason = reason
        log.warning("%s; starting from scratch", reason)
        return None

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` atomically: a kill mid-save leaves the previous checkpoint in place."""
        wrapper = {"format": _FORMAT, "fingerprint": self.fingerprint, "state": state}
        with io.atomic_path(self.path) as tmp:
            torch.save(wrapper, tmp)

    def clear(self) -> None:
        """Delete the checkpoint (after the stage's outputs are written)."""
        self.path.unlink(missing_ok=True)


# --- final models ---------------------------------------------------------------------------------


def state_sha256(state: dict[str, Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of a ``state_dict`` (independent of file layout)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_model(dest_dir: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Save ``model.pt`` (the ``state_dict``) and ``meta.json`` into ``dest_dir``, both atomically.

    Args:
        dest_dir: ``models/<name>/``.
        model: the trained module (any device; saved on CPU).
        meta: what a loader must agree with, e.g. ``{"arch": "resnet50", "num_classes": 2}``; the torch
            version and the state's SHA-256 are added.
    """
    dest_dir = Path(dest_dir)
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    full_meta = {**meta, "torch_version": torch.__version__, "state_sha256": state_sha256(state)}
    # Through a file object: given a path, torch.save records the (random) temporary file name inside the
    # archive, so the same weights would give different bytes and DVC would see a changed output.
    with io.atomic_path(dest_dir / MODEL_FILE) as tmp, open(tmp, "wb") as fh:
        torch.save(state, fh)
    io.write_json(dest_dir / META_FILE, full_meta)


def _same(a: Any, b: Any) -> bool:
    # Compare as JSON would store them, so tuples equal lists and dataclasses equal their dicts.
    return fingerprint(a) == fingerprint(b)


def load_model_state(
    src_dir: Path, expect: dict[str, Any] | None = None, stage: str | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load a model saved by :func:`save_model`, checking its metadata first.

    Args:
        src_dir: ``models/<name>/``.
        expect: metadata the caller relies on, e.g. ``{"arch": "resnet50", "num_classes": 2}``.
        stage: the command that produces ``src_dir``, named in the error when it is missing.

    Returns:
        ``(state_dict, meta)``.

    Raises:
        DataError: ``model.pt`` or ``meta.json`` is missing or damaged.
        ConfigError: a key of ``expect`` differs from the saved metadata.
    """
    src_dir = Path(src_dir)
    model_path, meta_path = src_dir / MODEL_FILE, src_dir / META_FILE
    for path in (model_path, meta_path):
        if not path.is_file():
            hint = f"run `wsss {stage}`" if stage else "run the stage that trains it"
            raise DataError(f"model file {path} not found; {hint} (or `dvc repro`) first")
    try:
        meta = io.read_json(meta_path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{meta_path} is not valid JSON ({exc}); retrain the model") from exc
    for key, want in (expect or {}).items():
        have = meta.get(key, "<missing>")
        if not _same(have, want):
            raise ConfigError(
                f"model in {src_dir} was saved with {key}={have!r} but {key}={want!r} is expected; "
                "retrain it with the current params or change the params back"
            )
    try:
        state = torch.load(model_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(f"{model_path} cannot be read ({load_failure(exc)}); retrain the model") from exc
    sha = meta.get("state_sha256")
    if sha is not None and state_sha256(state) != sha:
        raise DataError(f"{model_path} does not match the checksum in {meta_path}; retrain the model")
    return state, meta


def require_meta(meta: dict[str, Any], keys: tuple[str, ...], src_dir: Path) -> None:
    """Raise a clear :class:`DataError` if ``meta.json`` of ``src_dir`` lacks any of ``keys``."""
    missing = [k for k in keys if k not in meta]
    if missing:
        raise DataError(f"{Path(src_dir) / META_FILE} lacks {', '.join(repr(k) for k in missing)}; "
                        "it was not written by this version of wsss: retrain the model")


def load_weights(model: nn.Module, state: dict[str, Tensor], src_dir: Path, described: str) -> None:
    """``model.load_state_dict(state)``, turning a key / shape mismatch into one clear :class:`DataError`.

    Args:
        model: built from the metadata.
        state: the saved ``state_dict``.
        src_dir: the model folder (named in the error).
        described: what the metadata says, e.g. ``"classifier resnet50, 2 classes"``.
    """
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        details = [ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()]
        first = details[0] if details else str(exc).strip()
        if len(first) > 240:
            first = first[:240] + "..."
        raise DataError(
            f"{Path(src_dir) / MODEL_FILE} does not fit the model its {META_FILE} describes ({described}): "
            f"{first}{f' (+{len(details) - 1} more)' if len(details) > 1 else ''}; the two files do not "
            "belong together: retrain the model"
        ) from None
