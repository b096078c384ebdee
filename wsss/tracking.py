"""MLflow setup: SQLite backend under ``mlruns/``, one experiment per dataset, tagged stage runs.

Every stage run carries the tags ``wsss.stage``, ``wsss.variant``, ``data_hash`` and ``dataset`` so the
MLflow UI's compare view lines up the variants of one stage, MLflow's own source tags
(``mlflow.source.git.commit``, ``mlflow.source.name``; ``git_commit`` beside them adds ``-dirty`` for
uncommitted changes) and, when DVC runs the stage, ``dvc.stage``, ``dvc.exp_name`` and
``dvc.exp_baseline_rev`` (from the ``DVC_STAGE``, ``DVC_EXP_NAME`` and ``DVC_EXP_BASELINE_REV`` variables
DVC exports to stage commands). The prepared manifest is logged as the run's dataset input (``mlflow.data``)
and the experiment is tagged ``mlflow.experimentKind=custom_model_development``, so the MLflow UI opens
on its runs (not on the GenAI overview). ``tracking.system_metrics`` turns MLflow's system metrics on.

The store
---------
``MLFLOW_TRACKING_URI`` when set (make it absolute: a relative one moves with the working directory), else
``sqlite:///<project>/mlruns/mlflow.db``. Under ``dvc exp run --temp`` or ``--queue`` DVC runs the stages
in a temporary copy of the repository (``.dvc/tmp/exps/...``) that it deletes afterwards, and exports the
original repository's root as ``DVC_ROOT``: the default store (and its artifacts) is then the original
repository's ``mlruns/`` (:func:`store_dir`), so those runs are kept beside the workspace ones.

Tracking failures
-----------------
Tracking is a side channel: a stage must not start work it cannot track, and must never lose work
because tracking failed once it had started.

* **Before any work** (:func:`check_store`, called by every tracked ``wsss`` command before it reads
  data or writes anything): an ``http(s)://`` tracking URI is probed at ``<uri>/health`` with a short
  timeout (``WSSS_TRACKING_TIMEOUT`` seconds, default 5; :func:`check_available`, again by
  :func:`stage_run`), then the store is used once for real: the project's experiment is looked up and
  one of its runs searched, and a SQLite store file must be writable. A server that does not answer, a
  server whose API fails, a corrupt or read-only store or an unknown URI scheme stops the command with
  one line naming the URI and exit code 4 (:class:`~wsss.errors.TrackingError`), before the stage's
  outputs are touched. So does a run that cannot be started.
* **After the run has started**, every logging call goes through :func:`guard`: the first tracking
  error is reported once, as a warning naming the URI and the run; tracking is then off for the rest of
  the process (no later call waits on a dead server), and the stage finishes and writes all its outputs
  with exit code 0. The run stays ``RUNNING`` in MLflow, as nothing can tell the server otherwise.
* **A killed process** (SIGKILL, power loss) cannot end its runs either. Every run is tagged with the
  host and PID that started it; the next run of the same stage and variant marks such orphans, and
  their nested runs, ``KILLED`` when their process is gone from this host.
* MLflow's HTTP client retries a failed request for minutes by default (7 retries, doubling back-off,
  120 s timeout). Unless they are set in the environment, ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` is 2,
  ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR`` 1 and ``MLFLOW_HTTP_REQUEST_TIMEOUT`` 20 s here, so a server
  that dies mid-run costs seconds, once.
* A new SQLite store is created under a file lock (``<db file>.lock``): several processes may start on
  a fresh project at once (MLflow's schema migration is not safe against a concurrent one).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from wsss.config import Params, flatten
from wsss.errors import TrackingError
from wsss.io import process_gone
from wsss.paths import Paths

MAX_PARAM_BATCH = 100
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
DEFAULT_HEALTH_TIMEOUT_S = 5.0
# The experiment kind the MLflow UI (3.x) reads to choose its layout: "custom_model_development" is model
# training (runs table first); without it the UI may infer "genai_development" (traces, GenAI overview).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# What DVC exports to every stage command (dvc/env.py) -> the run tag that records it.
DVC_ENV_TAGS = {"DVC_STAGE": "dvc.stage", "DVC_EXP_NAME": "dvc.exp_name", "DVC_EXP_BASELINE_REV": "dvc.exp_baseline_rev"}
# How each stage uses the prepared dataset (the ``mlflow.data.context`` of its dataset input).
DATASET_CONTEXT = {"pretrain": "training", "train-classifier": "training", "train-ccam": "training",
                   "train-unet": "training", "make-cams": "validation", "tune-crf": "validation",
                   "make-pseudo": "training", "evaluate": "testing"}
SETUP_LOCK_TIMEOUT_S = 300.0
T = TypeVar("T")
log = logging.getLogger(__name__)
_checked: set[str] = set()  # URIs found reachable in this process
_failure: dict[str, str] = {}  # set on the first tracking error after a run started: tracking is off


def _dvc_workspace(start: Path) -> Path | None:
    """The nearest folder at or above ``start`` holding a ``.dvc`` folder (the DVC repository's root)."""
    for folder in (start, *start.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return None


def store_dir(paths: Paths) -> Path:
    """The folder of the default store (absolute): the project's ``mlruns/``, or, inside a DVC experiment's
    temporary copy, the same folder in the original repository (``DVC_ROOT``), which outlives the copy."""
    mlruns = paths.mlruns.resolve()
    origin = os.environ.get("DVC_ROOT")
    if not origin or not os.environ.get("DVC_EXP_NAME"):
        return mlruns
    workspace = _dvc_workspace(mlruns.parent)
    origin_root = Path(origin).resolve()
    if workspace is None or workspace == origin_root or not (origin_root / ".dvc").is_dir():
        return mlruns
    return origin_root / mlruns.relative_to(workspace)


def default_tracking_uri(paths: Paths) -> str:
    """``sqlite:////abs/path/mlruns/mlflow.db`` (four slashes: an absolute path); see :func:`store_dir`."""
    db = store_dir(paths) / "mlflow.db"
    return f"sqlite:///{db.as_posix()}"  # the path starts with "/", giving the four slashes


def tracking_uri(paths: Paths) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the project's SQLite database."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(paths)


def dvc_tags() -> dict[str, str]:
    """``dvc.stage`` / ``dvc.exp_name`` / ``dvc.exp_baseline_rev`` from the variables DVC sets (those present)."""
    return {tag: os.environ[var] for var, tag in DVC_ENV_TAGS.items() if os.environ.get(var)}


def source_tags(stage: str, commit: str) -> dict[str, str]:
    """MLflow's standard source tags: the commit (without ``-dirty``) and what ran (the DVC stage, or the
    ``wsss`` command)."""
    tags = {"mlflow.source.name": os.environ.get("DVC_STAGE") or f"wsss {stage}", "mlflow.source.type": "LOCAL"}
    sha = commit.removesuffix("-dirty")
    if sha != "unknown":
        tags["mlflow.source.git.commit"] = sha
    return tags


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


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


# Lines SQLAlchemy adds around the driver's message; they are never the reason.
_SQLALCHEMY_NOTES = ("(raised as a result of", "(Background on this error", "[SQL:", "[parameters:")


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception below ``exc``: the driver's error under SQLAlchemy's (``orig``), the socket
    error under urllib's (``reason``), the cause under an ``MlflowException`` (``__cause__``)."""
    seen = {id(exc)}
    while True:
        inner = next((e for e in (getattr(exc, "orig", None), getattr(exc, "reason", None), exc.__cause__)
                      if isinstance(e, BaseException)), None)
        if inner is None or id(inner) in seen:
            return exc
        seen.add(id(inner))
        exc = inner


def _reason(exc: BaseException) -> str:
    """A short reason for a tracking failure: ``connection refused``, ``attempt to write a readonly database``, ..."""
    inner = _root_cause(exc)
    if isinstance(inner, OSError) and inner.strerror:
        return inner.strerror.lower()
    lines = [line.strip() for line in str(inner).splitlines()]
    text = next((line for line in lines if line and not line.startswith(_SQLALCHEMY_NOTES)), "")
    return (text or type(inner).__name__)[:200]


def store_error(uri: str, exc: BaseException) -> TrackingError:
    """The one-line error for a tracking store that cannot be used (corrupt, read-only, ...)."""
    return TrackingError(f"MLflow tracking store {uri} cannot be used ({type(exc).__name__}: {_reason(exc)})")


def check_available(paths: Paths, timeout: float | None = None) -> None:
    """Fail fast, before any work, when the tracking server does not answer (``http(s)://`` URIs only).

    Raises:
        TrackingError: one line naming the URI and the reason (exit code 4 on the command line).
    """
    uri = tracking_uri(paths)
    if not _is_http(uri) or uri in _checked:
        return
    if timeout is None:
        timeout = float(os.environ.get("WSSS_TRACKING_TIMEOUT") or DEFAULT_HEALTH_TIMEOUT_S)
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - the user's tracking URI
            resp.read(256)
    except urllib.error.HTTPError as exc:
        if exc.code >= 500:
            raise TrackingError(
                f"MLflow tracking server {uri} is not healthy (HTTP {exc.code} from /health); "
                "fix the server or point MLFLOW_TRACKING_URI elsewhere"
            ) from None
        # 401/403/404: something answers (an auth proxy, a server without /health): let MLflow talk to it.
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise TrackingError(
            f"MLflow tracking server {uri} is not reachable ({_reason(exc)}); start it, or unset "
            f"MLFLOW_TRACKING_URI to track in {default_tracking_uri(paths)}"
        ) from None
    _checked.add(uri)


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores and in-memory databases)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return None if not path or path == ":memory:" else Path(path)


def connect(paths: Paths) -> str:
    """Point MLflow at the tracking store, checked and ready (for commands that only read runs or models).

    Sets the HTTP retry defaults, fails fast on an unreachable server and creates a new SQLite store
    atomically under its file lock. Returns the tracking URI.

    Raises:
        TrackingError: the server is unreachable or the store cannot be created.
    """
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    check_available(paths)
    import mlflow

    for noisy in ("alembic", "alembic.runtime.migration"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # MLflow logs every SQLAlchemy error with its traceback and SQL before it raises it; the raised error is
    # reported in one line (store_error), so the log would only bury the reason.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # retry chatter of a dead server
    # Four INFO lines per run (started, stopped, "Skip logging GPU metrics", ...) on every stage's console.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    uri = tracking_uri(paths)
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        store_dir(paths).mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    db = _sqlite_file(uri)
    if db is not None and not db.exists():
        try:
            with _store_lock(db):
                if not db.exists():
                    _create_sqlite_store(db, paths)
        except Exception as exc:
            raise TrackingError(f"MLflow tracking store {uri} cannot be created ({type(exc).__name__}: "
                                f"{_reason(exc)})") from None
    return uri


def check_store(paths: Paths, params: Params, writes: bool = True) -> str:
    """Open the tracking store and use it once (read-only), before a command does any work.

    :func:`connect`, then the project's experiment is looked up and one of its runs searched (the first
    experiment when it does not exist yet), so a server whose ``/health`` answers but whose API fails, a
    corrupt SQLite file or an unknown URI scheme fail here rather than when the stage logs its results.
    With ``writes`` a SQLite store file must also be writable. Returns the tracking URI.

    Raises:
        TrackingError: one line naming the URI and the reason (exit code 4 on the command line).
    """
    from mlflow.tracking import MlflowClient
    from mlflow.tracking.registry import UnsupportedModelRegistryStoreURIException

    uri = connect(paths)
    db = _sqlite_file(uri)
    if writes and db is not None and db.exists():
        try:
            os.close(os.open(db, os.O_RDWR))  # what SQLite needs to write; a read-only store only fails on write
        except OSError as exc:
            raise TrackingError(f"MLflow tracking store {uri} cannot be used (not writable: {_reason(exc)})") from None
    try:
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment_name(params))
        if exp is None:
            client.search_experiments(max_results=1)
        else:
            client.search_runs([exp.experiment_id], max_results=1)
    except UnsupportedModelRegistryStoreURIException:  # MLflow's name for any unknown scheme, tracking too
        raise TrackingError(f"MLflow tracking store {uri} cannot be used (unknown URI scheme "
                            f"'{uri.split(':', 1)[0]}')") from None
    except Exception as exc:  # whatever the store raises: it cannot be used
        raise store_error(uri, exc) from None
    return uri


def _store_lock(db: Path) -> Any:
    from filelock import FileLock

    db.parent.mkdir(parents=True, exist_ok=True)
    # The first connection to a new SQLite store runs MLflow's schema migrations, which crash when two
    # processes run them at once; the lock makes the second wait for the first.
    return FileLock(f"{db}.lock", timeout=SETUP_LOCK_TIMEOUT_S)


def _setup(paths: Paths, params: Params) -> str:
    """Point MLflow at the tracking store and select (or create) the experiment. Returns its id.

    Raises:
        TrackingError: the server is unreachable or the store cannot be opened.
    """
    import mlflow

    uri = connect(paths)
    db = _sqlite_file(uri)
    try:
        with _store_lock(db) if db is not None else contextlib.nullcontext():
            return _select_experiment(mlflow, paths, params)
    except TrackingError:
        raise
    except Exception as exc:
        raise store_error(uri, exc) from None


def _create_sqlite_store(db: Path, paths: Paths) -> None:
    """Create a new MLflow SQLite database atomically: built in a temporary file, then linked into place.

    MLflow creates its schema in dozens of migration steps; a process killed among them would leave a
    database that every later run fails to open ("index ... already exists").
    """
    import tempfile

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from wsss import io as wio

    wio.sweep_stale_temps(db.parent)  # half-built databases of killed processes
    fd, tmp = tempfile.mkstemp(prefix=f".{db.name}.{os.getpid()}.", suffix=".tmp", dir=db.parent)
    os.close(fd)
    os.unlink(tmp)  # SQLite creates the file itself
    tmp_uri = f"sqlite:///{Path(tmp).resolve().as_posix()}"
    try:
        store = SqlAlchemyStore(tmp_uri, (db.parent / "artifacts").as_uri())
        store.engine.dispose()  # no connection may stay open on the file that becomes the database
        with contextlib.suppress(Exception):
            SqlAlchemyStore._engine_map.pop(tmp_uri, None)
        with contextlib.suppress(FileExistsError):  # created meanwhile by a process outside our lock
            os.link(tmp, db)  # unlike os.replace, never clobbers an existing database
    finally:
        for leftover in (tmp, f"{tmp}-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)


def _select_experiment(mlflow: Any, paths: Paths, params: Params) -> str:
    name = experiment_name(params)
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        # Artifacts next to the DB (absolute), not relative to whichever cwd the client runs in.
        artifact_root = None
        uri = mlflow.get_tracking_uri()
        if not _is_http(uri):
            db = _sqlite_file(uri)
            artifact_root = ((db.parent if db is not None else store_dir(paths)) / "artifacts").resolve().as_uri()
        try:
            return mlflow.create_experiment(name, artifact_location=artifact_root,
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:  # created concurrently by another process
            exp = mlflow.get_experiment_by_name(name)
            if exp is None:
                raise
    if EXPERIMENT_KIND_TAG not in exp.tags:  # an experiment made before this tag (a user's choice is kept)
        mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


# --- tracking errors after a run started ----------------------------------------------------------


def tracking_failed() -> str | None:
    """Why tracking was switched off in this process (None while it works)."""
    return _failure.get("reason")


def reset_failure() -> None:
    """Switch tracking back on (a new process starts with it on; tests and notebooks may call this)."""
    _failure.clear()


def guard(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """Call an MLflow logging function; a tracking error is warned about once and switches tracking off.

    Returns ``fn``'s result, or None when it failed or tracking is already off.
    """
    if _failure:
        return None
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # any failure of the side channel: the computation must go on
        _switch_off(exc)
        return None


def _switch_off(exc: BaseException) -> None:
    import mlflow

    try:
        uri = mlflow.get_tracking_uri()
        active = mlflow.active_run()
    except Exception:  # noqa: BLE001 - only for the message
        uri, active = os.environ.get("MLFLOW_TRACKING_URI", "?"), None
    run = f"run {active.info.run_id} stays unfinished there; " if active is not None else ""
    reason = f"{type(exc).__name__}: {_reason(exc)}"
    _failure["reason"] = reason
    from rich.markup import escape

    from wsss.ui import console

    console.print(
        f"[yellow]warning:[/] {escape(f'MLflow tracking at {uri} failed ({reason}); {run}')}going on without "
        "tracking, every output is still written",
        highlight=False, soft_wrap=True, markup=True,
    )
    log.debug("tracking error", exc_info=exc)


def _forget_active_runs() -> None:
    """Drop this process's active-run stack without contacting the (failed) server."""
    with contextlib.suppress(Exception):
        from mlflow.tracking import fluent

        fluent._active_run_stack.get().clear()  # private, but there is no public offline end_run


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
    commit = git_commit(paths.root)
    tags = {
        "wsss.stage": stage,
        "wsss.variant": variant,
        "git_commit": commit,
        "data_hash": data_hash(paths),
        "dataset": params.base.dataset,
        **source_tags(stage, commit),
        **dvc_tags(),
        **process_tags(),
        **(extra_tags or {}),
    }
    exp_name = os.environ.get("DVC_EXP_NAME")
    run_name = f"{stage}:{variant}" + (f" [{exp_name}]" if exp_name else "")
    cfg = params.tracking
    try:
        resumed = run_id is not None and _run_exists(run_id)
        if cfg.system_metrics:
            mlflow.set_system_metrics_sampling_interval(cfg.system_metrics_interval_s)
        run = mlflow.start_run(
            run_id=run_id if resumed else None,
            experiment_id=None if resumed else exp_id,
            run_name=None if resumed else run_name,
            tags=None if resumed else tags,
            log_system_metrics=cfg.system_metrics,
        )
    except Exception as exc:
        raise TrackingError(f"cannot start an MLflow run at {mlflow.get_tracking_uri()} "
                            f"({type(exc).__name__}: {_reason(exc)})") from None
    _failure.clear()  # a new run: tracking works (it just started one)
    if resumed:
        guard(mlflow.set_tags, {**process_tags(), **dvc_tags()})
    else:
        guard(log_dataset, paths, params, stage)
    guard(close_orphaned_runs, run.info.experiment_id, stage, variant, keep=run.info.run_id)
    status = "FAILED"  # what `with mlflow.start_run()` records for an exception (crash = FAILED)
    try:
        if not resumed:
            flat: dict[str, Any] = {}
            for section in ("base", *sections):
                flat.update(flatten(getattr(params, section), f"{section}."))
            items = list(flat.items())
            for i in range(0, len(items), MAX_PARAM_BATCH):
                guard(mlflow.log_params, dict(items[i : i + MAX_PARAM_BATCH]))
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if _failure:
            _forget_active_runs()
        else:
            # end_run pops the run before it contacts the store, so a failure here leaves no active run.
            guard(mlflow.end_run, status=status)


def log_dataset(paths: Paths, params: Params, stage: str) -> bool:
    """Log the prepared manifest as the active run's dataset input (``mlflow.log_input``).

    Named ``<dataset>-prepared``, with the manifest's MD5 (the ``data_hash`` tag) as its digest, its
    project-relative path as its source and the stage's use of it (:data:`DATASET_CONTEXT`) as its context.
    Returns False when there is no manifest yet (nothing is logged).
    """
    import warnings

    import mlflow
    import pandas as pd

    if not paths.manifest.exists():
        return False
    df = pd.read_parquet(paths.manifest)
    try:
        source = paths.manifest.resolve().relative_to(paths.root.resolve()).as_posix()
    except ValueError:
        source = paths.manifest.as_posix()
    # MLflow warns that the source "can be interpreted in multiple ways" (a local path is meant) and that
    # integer columns cannot hold missing values (a model-signature hint; this is no model input).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(df, source=source, name=f"{params.base.dataset}-prepared",
                                          digest=data_hash(paths))
        mlflow.log_input(dataset, context=DATASET_CONTEXT.get(stage, stage))
    return True


def process_tags() -> dict[str, str]:
    """``wsss.host`` / ``wsss.pid`` of this process, so a later run can tell a killed run from a live one."""
    return {"wsss.host": socket.gethostname(), "wsss.pid": str(os.getpid())}


def close_orphaned_runs(experiment_id: str, stage: str, variant: str, keep: str | None = None) -> list[str]:
    """Mark ``RUNNING`` runs of ``stage``/``variant`` whose process was killed (and their children) ``KILLED``.

    Returns the ids of the runs it closed.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    orphans = [
        r for r in client.search_runs(
            [experiment_id],
            filter_string=f"attributes.status = 'RUNNING' and tags.`wsss.stage` = '{stage}' "
                          f"and tags.`wsss.variant` = '{variant}'",
            max_results=200,
        )
        if r.info.run_id != keep and process_gone(r.data.tags.get("wsss.host"), r.data.tags.get("wsss.pid"))
    ]
    closed: list[str] = []
    for run in orphans:
        children = client.search_runs(
            [experiment_id],
            filter_string=f"attributes.status = 'RUNNING' and tags.`mlflow.parentRunId` = '{run.info.run_id}'",
            max_results=5000,
        )
        for r in [*children, run]:
            client.set_terminated(r.info.run_id, status="KILLED")
            closed.append(r.info.run_id)
    if closed:
        log.info("marked %d run(s) of killed %s:%s processes KILLED", len(closed), stage, variant)
    return closed


def _run_exists(run_id: str) -> bool:
    import mlflow

    try:
        mlflow.get_run(run_id)
        return True
    except Exception:
        return False


def log_metrics(metrics: Mapping[str, float], step: int | None = None, prefix: str = "") -> None:
    """Log numeric metrics (non-finite values and non-numbers are skipped); never raises (see guard)."""
    import mlflow

    clean = {
        f"{prefix}{k}": float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float, np.floating, np.integer)) and np.isfinite(float(v))
    }
    if clean:
        guard(mlflow.log_metrics, clean, step=step)


def log_image(image: np.ndarray, key: str, step: int | None = None) -> None:
    """Log an RGB uint8 image; with ``step`` it appears in the UI's step slider. Never raises."""
    import mlflow

    if step is None:
        guard(mlflow.log_image, image, artifact_file=f"images/{key}.png")
    else:
        guard(mlflow.log_image, image, key=key, step=step)


def log_text(text: str, artifact_file: str) -> None:
    import mlflow

    guard(mlflow.log_text, text, artifact_file)


def log_artifact(path: Path, artifact_path: str | None = None) -> None:
    import mlflow

    if Path(path).exists():
        guard(mlflow.log_artifact, str(path), artifact_path=artifact_path)

