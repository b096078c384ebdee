"""Run ``wsss`` stages as subprocesses, SIGKILL them at chosen moments, and watch their output folders.

Used by ``tests/test_kill_resume.py``. A stage runs as ``python -m wsss <args>`` in its own session (so
the kill reaches its pool workers too, as a real ``kill -9`` of a job or an OOM kill of the container
would). While it runs, a :class:`Watcher` thread polls the output folders and records every *violation*:
a visible temporary file, or an artefact (``.npz .png .jpg .json .pt .yaml .parquet .csv .md``) that
does not load completely. Hidden ``.<name>.<pid>.<random>.tmp`` files (see :mod:`wsss.io`) are allowed
while their writer lives.

Typical use::

    ref = run_stage(root, ["make-cams", "--method", "cam", "--model", "classifier-species"], watch=["cams"])
    hit = run_stage(root2, [...same...], kill_after=0.6 * ref.seconds, watch=["cams"])
    again = run_stage(root2, [...], watch=["cams"])
    assert hit.killed and again.returncode == 0 and not hit.violations + again.violations
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# Checked formats: each loader must read the whole file (a truncated one raises).
CHECKED_SUFFIXES = (".npz", ".png", ".jpg", ".json", ".pt", ".yaml", ".yml", ".parquet", ".csv", ".md")
# Never an artefact of ours: MLflow's own store and Optuna's SQLite files (both have their own locking).
SKIPPED_PARTS = ("mlruns", "__pycache__")
SKIPPED_SUFFIXES = (".db", ".db-journal", ".db-wal", ".db-shm", ".lock")


def stage_env(root: Path, **extra: str) -> dict[str, str]:
    """Environment of a stage subprocess: the project's own MLflow DB, one thread, no colour, no network."""
    env = dict(os.environ)
    env.update({
        "MLFLOW_TRACKING_URI": f"sqlite:///{Path(root).resolve().as_posix()}/mlruns/mlflow.db",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "GX_ANALYTICS_ENABLED": "false",
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_OFFLINE": "1",
        # One thread: CPU kernels are then bit-reproducible across processes, and the 2-core CI box is shared.
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONHASHSEED": "0",
        "NO_COLOR": "1",
        "TERM": "dumb",
        "COLUMNS": "200",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")])),
    })
    env.update(extra)
    return env


# --------------------------------------------------------------------------------------------------
# checking one file


def check_file(path: Path) -> str | None:
    """Why ``path`` is not a complete artefact, or None if it is (or vanished while being read)."""
    name = path.name
    if name.endswith(".tmp") or ".tmp-" in name:
        return None if name.startswith(".") else "visible temporary file"
    if name.startswith(".") or path.suffix.lower() not in CHECKED_SUFFIXES:
        return None
    try:
        load_artefact(path)
    except FileNotFoundError:
        return None  # replaced or removed between listing and reading: not a partial file
    except Exception as exc:  # noqa: BLE001 - any failure to load is what we look for
        return f"does not load ({type(exc).__name__}: {str(exc)[:160]})"
    return None


def load_artefact(path: Path) -> object:
    """Load ``path`` completely by its suffix (raises on a truncated or malformed file)."""
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {k: np.array(data[k]) for k in data.files}
    if suffix in (".png", ".jpg"):
        from PIL import Image

        with Image.open(path) as im:
            im.load()
            return np.asarray(im)
    if suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    if suffix == ".pt":
        import torch

        return torch.load(path, map_location="cpu", weights_only=True)
    if suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(path.read_text(encoding="utf-8"))
    if suffix == ".parquet":
        import pandas as pd

        return pd.read_parquet(path)
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        raise ValueError("text file does not end with a newline (cut short?)")
    return text


def _walk(folders: Iterable[Path]) -> Iterable[Path]:
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = [d for d in dirnames if d not in SKIPPED_PARTS]
            for f in filenames:
                if not f.endswith(SKIPPED_SUFFIXES):
                    yield Path(dirpath) / f


def scan(folders: Iterable[Path], seen: dict[Path, tuple] | None = None) -> list[str]:
    """Check every file under ``folders`` (those unchanged since ``seen`` recorded them are skipped)."""
    problems = []
    for path in _walk(folders):
        try:
            st = path.stat()
        except OSError:
            continue
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if seen is not None:
            if seen.get(path) == key:
                continue
            seen[path] = key
        why = check_file(path)
        if why:
            problems.append(f"{path}: {why}")
    return problems


class Watcher(threading.Thread):
    """Poll ``folders`` every ``interval`` seconds until stopped, collecting :func:`scan` violations."""

    def __init__(self, folders: Sequence[Path], interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.folders = list(folders)
        self.interval = interval
        self.violations: list[str] = []
        self.polls = 0
        self._stop_event = threading.Event()
        self._seen: dict[Path, tuple] = {}

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.violations += scan(self.folders, self._seen)
            self.polls += 1
            self._stop_event.wait(self.interval)

    def stop(self) -> list[str]:
        self._stop_event.set()
        self.join(timeout=30)
        # One last full pass over the final state (every file, changed or not).
        self.violations += scan(self.folders)
        return sorted(set(self.violations))


# --------------------------------------------------------------------------------------------------
# running and killing


@dataclass
class Outcome:
    """What one stage process did."""

    args: list[str]
    returncode: int | None
    killed: bool
    seconds: float
    output: str
    violations: list[str] = field(default_factory=list)
    polls: int = 0

    def describe(self) -> str:
        state = "killed" if self.killed else f"exit {self.returncode}"
        tail = self.output[-3000:]
        return f"wsss {' '.join(self.args)}: {state} after {self.seconds:.1f}s\n{tail}"


def run_stage(
    root: Path,
    args: Sequence[str],
    *,
    watch: Sequence[str] = (),
    kill_after: float | None = None,
    kill_when: Callable[[Path], bool] | None = None,
    timeout: float = 600.0,
    env: dict[str, str] | None = None,
) -> Outcome:
    """Run ``python -m wsss <args>`` in ``root``; SIGKILL its process group at a chosen moment.

    Args:
        root: project folder (cwd; holds params.yaml).
        args: the command line after ``wsss``.
        watch: folders (relative to ``root``) polled for partial files while it runs, and once after.
        kill_after: seconds after the start at which to kill (None: never; a process that has finished
            by then is simply not killed, and ``killed`` is False).
        kill_when: alternatively, a predicate on ``root`` polled every 20 ms; kill as soon as it holds.
        timeout: the run is killed and the test fails after this long (bounds every wait).
        env: environment (default :func:`stage_env`).
    """
    root = Path(root)
    watcher = Watcher([root / w for w in watch])
    watcher.start()
    log_path = root / f".killer-{time.monotonic_ns()}.log"
    start = time.monotonic()
    killed = False
    with open(log_path, "w+b") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "wsss", *args], cwd=root, env=env or stage_env(root),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            deadline = start + timeout
            while proc.poll() is None:
                now = time.monotonic()
                if now > deadline:
                    _kill_group(proc)
                    raise TimeoutError(f"wsss {' '.join(args)} ran past {timeout:.0f}s")
                if (kill_after is not None and now - start >= kill_after) or (
                    kill_when is not None and kill_when(root)
                ):
                    _kill_group(proc)
                    killed = True
                    break
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                _kill_group(proc)
            proc.wait(timeout=60)
            seconds = time.monotonic() - start
            _wait_group_gone(proc.pid)
            violations = watcher.stop()
            log.seek(0)
            output = log.read().decode("utf-8", errors="replace")
    log_path.unlink(missing_ok=True)
    return Outcome(list(args), None if killed else proc.returncode, killed, seconds, output, violations,
                   watcher.polls)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _wait_group_gone(pgid: int, timeout: float = 20.0) -> None:
    """Kill and reap stragglers of the stage's process group (pool workers), bounded in time."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------------
# comparing outputs


def digest_tree(folder: Path, ignore: Callable[[Path], bool] = lambda p: False) -> dict[str, str]:
    """``{relative path: sha256 of the bytes}`` of every non-hidden file under ``folder``."""
    out = {}
    folder = Path(folder)
    for path in sorted(_walk([folder])):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or ignore(rel):
            continue
        out[rel.as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def hidden_temps(folders: Iterable[Path]) -> list[Path]:
    """Hidden temporary files (``.*.tmp``) left under ``folders``."""
    return [p for p in _walk(folders) if p.name.startswith(".") and p.name.endswith(".tmp")]


def npz_equal(a: Path, b: Path) -> bool:
    """Two ``.npz`` files hold the same keys and bit-identical arrays (compression bytes may differ)."""
    x, y = load_artefact(a), load_artefact(b)
    assert isinstance(x, dict) and isinstance(y, dict)
    return x.keys() == y.keys() and all(
        x[k].dtype == y[k].dtype and x[k].shape == y[k].shape and np.array_equal(x[k], y[k]) for k in x
    )


def json_without(path: Path, drop: Iterable[str]) -> object:
    """A JSON report minus its timing keys (at any depth)."""
    drop = set(drop)

    def strip(v: object) -> object:
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k not in drop}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    return strip(json.loads(Path(path).read_text(encoding="utf-8")))
