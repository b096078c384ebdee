"""``wsss runs``: the latest MLflow run of every (stage, variant) in the project's experiment, as a table."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from wsss import tracking
from wsss.config import Params
from wsss.paths import Paths

# The metrics worth a glance per stage (the first ones present are shown); stages in pipeline order.
STAGE_METRICS: dict[str, tuple[str, ...]] = {
    "prepare": ("n_images", "n_excluded"),
    "validate": ("success", "checks_failed"),
    "pretrain": ("final_loss", "final_knn_loo_balanced_acc", "final_knn_balanced_acc"),
    "train-classifier": ("final_val_balanced_acc", "final_val_acc", "val_acc"),
    "train-ccam": ("final_loss", "polarity"),
    "make-cams": ("val_iou_mean", "val_best_iou_mean"),
    "tune-crf": ("best_value", "val_iou_mean"),
    "tune-ensemble": ("best_value", "best_single_member_value", "val_iou_mean"),
    "make-pseudo": ("trainval_after_iou_mean", "trainval_before_iou_mean"),
    "train-unet": ("last_val_iou_mean", "final_train_loss"),
    "evaluate": ("test_iou_mean", "test_miou", "test_after_iou_mean", "test_ellipse_iou_mean",
                 "test_grabcut_rect_iou_mean"),
    "report": ("wsss_over_supervised", "n_figures"),
}
MAX_METRICS = 3
STATUS_STYLE = {"FINISHED": "green", "FAILED": "red", "RUNNING": "yellow", "KILLED": "dim", "SCHEDULED": "dim"}


def fetch_runs(params: Params, paths: Paths, stage: str | None = None, include_all: bool = False) -> list[Any] | None:
    """Runs of the project's experiment, newest first; None when the experiment does not exist yet.

    Without ``include_all`` only the newest top-level run of each (stage, variant) is kept (nested
    Optuna trial runs dropped); with it every run is returned.

    Raises:
        TrackingError: the server is unreachable or the store cannot be read (exit code 4).
    """
    import mlflow

    uri = tracking.connect(paths)  # fails fast on a dead server; creates a new store safely
    filters = []
    if stage:
        filters.append(f"tags.`wsss.stage` = '{stage.replace(chr(39), '')}'")
    try:
        exp = mlflow.get_experiment_by_name(tracking.experiment_name(params))
        if exp is None:
            return None
        runs = mlflow.search_runs(experiment_ids=[exp.experiment_id], filter_string=" and ".join(filters),
                                  order_by=["attributes.start_time DESC"], output_format="list")
    except Exception as exc:  # a corrupt or unusable store: one line and exit 4, like every other command
        raise tracking.store_error(uri, exc) from None
    if include_all:
        return runs
    latest: dict[tuple[str, str], Any] = {}
    for run in runs:
        tags = run.data.tags
        if "mlflow.parentRunId" in tags:
            continue
        key = (tags.get("wsss.stage", "?"), tags.get("wsss.variant", "?"))
        latest.setdefault(key, run)
    order = {stage: i for i, stage in enumerate(STAGE_METRICS)}  # pipeline order, unknown stages last

    def key(run: Any) -> tuple[int, str, str]:
        stage_, variant = run.data.tags.get("wsss.stage", ""), run.data.tags.get("wsss.variant", "")
        return order.get(stage_, len(order)), stage_, variant

    return sorted(latest.values(), key=key)


def _fmt_value(name: str, value: float) -> str:
    countish = name.startswith(("n_", "checks_", "trials_")) or name in ("success", "epochs", "best_epoch", "polarity")
    if countish and float(value).is_integer():
        return str(int(value))
    return f"{value:.3f}"


def key_metrics(stage: str, metrics: dict[str, float]) -> str:
    """``name value`` pairs of the stage's headline metrics (any three when the stage is unknown)."""
    names = [m for m in STAGE_METRICS.get(stage, ()) if m in metrics]
    if stage not in STAGE_METRICS:
        names = sorted(metrics)
    return ", ".join(f"{m} {_fmt_value(m, metrics[m])}" for m in names[:MAX_METRICS])


def _duration(start_ms: int | None, end_ms: int | None) -> str:
    if not start_ms:
        return "—"
    running = not end_ms
    end = end_ms or int(dt.datetime.now(dt.timezone.utc).timestamp() * 1000)
    seconds = max(0.0, (end - start_ms) / 1000)
    if seconds < 60:
        text = f"{seconds:.1f}s"
    elif seconds < 3600:
        text = f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    else:
        text = f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    return text + ("…" if running else "")


def _start(start_ms: int | None) -> str:
    if not start_ms:
        return "—"
    return dt.datetime.fromtimestamp(start_ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def _commit(sha: str | None) -> str:
    if not sha or sha == "unknown":
        return "—"
    dirty = sha.endswith("-dirty")
    return sha.removesuffix("-dirty")[:8] + ("*" if dirty else "")


def runs_table(runs: Sequence[Any], include_all: bool = False) -> Table:
    """A rich table of runs (``*`` after a commit = uncommitted changes)."""
    title = "all runs (newest first)" if include_all else "latest run per stage and variant"
    table = Table(title=title, title_justify="left")
    for name, kwargs in (("stage", {}), ("variant", {}), ("status", {}), ("start", {"no_wrap": True}),
                         ("duration", {"justify": "right", "no_wrap": True}), ("key metrics", {}),
                         ("commit", {"no_wrap": True})):
        table.add_column(name, **kwargs)
    if include_all:
        table.add_column("run", no_wrap=True)
    for run in runs:
        tags, info = run.data.tags, run.info
        stage = tags.get("wsss.stage", "?")
        variant = tags.get("wsss.variant", "?")
        if "optuna.trial" in tags:
            variant += f" (trial {tags['optuna.trial']})"
        status = info.status
        row = [stage, variant, f"[{STATUS_STYLE.get(status, 'white')}]{status}[/]", _start(info.start_time),
               _duration(info.start_time, info.end_time), key_metrics(stage, dict(run.data.metrics)),
               _commit(tags.get("git_commit"))]
        if include_all:
            row.append(info.run_id[:8])
        table.add_row(*row)
    return table


def run(params: Params, paths: Paths, stage: str | None = None, include_all: bool = False,
        console: Console | None = None) -> int:
    """Print the table to stdout; returns the number of runs shown."""
    console = console or Console()
    if not console.is_terminal:
        console.width = max(console.width, 160)  # piped or captured: do not squeeze the table to 80
    runs = fetch_runs(params, paths, stage, include_all)
    uri = tracking.tracking_uri(paths)
    if runs is None:
        console.print(f"no runs yet: experiment '{tracking.experiment_name(params)}' does not exist in {uri}")
        return 0
    if not runs:
        console.print(f"no runs{f' of stage {stage}' if stage else ''} in experiment "
                      f"'{tracking.experiment_name(params)}' ({uri})")
        return 0
    console.print(runs_table(runs, include_all))
    return len(runs)
