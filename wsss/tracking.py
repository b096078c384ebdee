"""MLflow setup: SQLite backend under ``mlruns/``, one experiment per dataset, tagged stage runs.

Every stage run carries the tags ``wsss.stage``, ``wsss.variant``, ``git_commit``, ``data_hash`` and
``dataset`` so the MLflow UI's compare view lines up the variants of one stage.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from wsss.config import Params, flatten
from wsss.paths import Paths

MAX_PARAM_BATCH = 100


def default_tracking_uri(paths: Paths) -> str:
    """``sqlite:////abs/path/mlruns/mlflow.db`` (four slashes: an absolute path)."""
    db = (paths.mlruns / "mlflow.db").resolve()
    return f"sqlite:///{db.as_posix()}"  # the path starts with "/", giving the four slashes


def tracking_uri(paths: Paths) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the project's SQLite database."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(paths)


def git_commit(root: Path = Path(".")) -> str:
    """The current commit (``<sha>-dirty`` with uncommitted changes), or ``unknown`` outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        return f"{sha}-dirty" if dirty else sha
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def data_hash(paths: Paths) -> str:
    """MD5 of the prepared manifest: identifies the data a run used."""
    from wsss.io import file_md5

    return file_md5(paths.manifest)[:12] if paths.manifest.exists() else "none"


def experiment_name(params: Params) -> str:
    return params.base.experiment or f"wsss-{params.base.dataset}"


def _setup(paths: Paths, params: Params) -> str:
    """Point MLflow at the tracking store and select (or create) the experiment. Returns its id."""
    import logging

    import mlflow

    for noisy in ("mlflow.store.db.utils", "alembic", "alembic.runtime.migration"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    paths.mlruns.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri(paths))
    name = experiment_name(params)
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        # Artifacts next to the DB (absolute), not relative to whichever cwd the client runs in.
        artifact_root = None
        if not os.environ.get("MLFLOW_TRACKING_URI", "").startswith("http"):
            artifact_root = (paths.mlruns / "artifacts").resolve().as_uri()
        try:
            return mlflow.create_experiment(name, artifact_location=artifact_root)
        except Exception:  # created concurrently by another process
            exp = mlflow.get_experiment_by_name(name)
            if exp is None:
                raise
    return exp.experiment_id


@contextlib.contextmanager
def stage_run(
    stage: str,
    variant: str,
    params: Params,
    paths: Paths,
    sections: tuple[str, ...] = (),
    run_id: str | None = None,
    extra_tags: Mapping[str, str] | None = None,
) -> Iterator[Any]:
    """Start (or resume, given ``run_id``) a tagged MLflow run for one stage variant.

    Params of the listed ``params.yaml`` sections are logged flattened (``pseudo.crf.iterations``).
    An exception inside the block marks the run FAILED (``mlflow.start_run`` as a context manager).
    """
    import mlflow

    exp_id = _setup(paths, params)
    tags = {
        "wsss.stage": stage,
        "wsss.variant": variant,
        "git_commit": git_commit(paths.root),
        "data_hash": data_hash(paths),
        "dataset": params.base.dataset,
        **(extra_tags or {}),
    }
    resumed = run_id is not None and _run_exists(run_id)
    with mlflow.start_run(
        run_id=run_id if resumed else None,
        experiment_id=None if resumed else exp_id,
        run_name=None if resumed else f"{stage}:{variant}",
        tags=None if resumed else tags,
    ) as run:
        if not resumed:
            flat: dict[str, Any] = {}
            for section in ("base", *sections):
                flat.update(flatten(getattr(params, section), f"{section}."))
            items = list(flat.items())
            for i in range(0, len(items), MAX_PARAM_BATCH):
                mlflow.log_params(dict(items[i : i + MAX_PARAM_BATCH]))
        yield run


def _run_exists(run_id: str) -> bool:
    import mlflow

    try:
        mlflow.get_run(run_id)
        return True
    except Exception:
        return False


def log_metrics(metrics: Mapping[str, float], step: int | None = None, prefix: str = "") -> None:
    """Log numeric metrics (non-finite values and non-numbers are skipped)."""
    import mlflow

    clean = {
        f"{prefix}{k}": float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float, np.floating, np.integer)) and np.isfinite(float(v))
    }
    if clean:
        mlflow.log_metrics(clean, step=step)


def log_image(image: np.ndarray, key: str, step: int | None = None) -> None:
    """Log an RGB uint8 image; with ``step`` it appears in the UI's step slider."""
    import mlflow

    if step is None:
        mlflow.log_image(image, artifact_file=f"images/{key}.png")
    else:
        mlflow.log_image(image, key=key, step=step)


def log_text(text: str, artifact_file: str) -> None:
    import mlflow

    mlflow.log_text(text, artifact_file)


def log_artifact(path: Path, artifact_path: str | None = None) -> None:
    import mlflow

    if Path(path).exists():
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def figure_to_array(fig: Any) -> np.ndarray:
    """Render a matplotlib figure to an RGB uint8 array."""
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))
