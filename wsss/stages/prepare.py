"""Stage ``prepare``: dataset root(s) -> ``data/prepared/`` (resized images, masks, manifest)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from wsss import tracking
from wsss.config import Params
from wsss.errors import DataError
from wsss.io import write_json
from wsss.paths import Paths
from wsss.ui import console, task


def _resolve(paths: Paths, p: str) -> Path:
    path = Path(p).expanduser()
    return path if path.is_absolute() else paths.root / path


def _given(paths: Paths, p: str) -> str:
    """A configured root as the report shows it: project-relative if inside the project, else as given."""
    return p if p.startswith("~") or not Path(p).is_absolute() else paths.shown(p)


def _shower(paths: Paths, roots: dict[Path, str]) -> Callable[[str], str]:
    """Maps a file under one of ``roots`` (resolved root -> its given form) to ``given/relative``."""

    def show(file: str) -> str:
        for resolved, given in roots.items():
            try:
                rel = Path(file).relative_to(resolved)
            except ValueError:
                continue
            return (PurePosixPath(Path(given).as_posix()) / rel.as_posix()).as_posix()
        return paths.shown(file)

    return show


def run(params: Params, paths: Paths) -> dict[str, Any]:
    """Prepare the configured dataset; writes ``reports/prepare.json`` and logs an MLflow run."""
    from wsss.data.prepare import prepare_dataset

    base = params.base
    main_root = _resolve(paths, base.data_root)
    if base.dataset == "synthetic" and not main_root.exists():
        raise DataError(f"{main_root}: synthetic dataset not found; run `wsss generate-synthetic` first")
    extra = [_resolve(paths, r) for r in base.extra_roots]
    background = _resolve(paths, base.background_root) if base.background_root else None
    start = time.perf_counter()
    with task("preparing images", None) as advance:
        result = prepare_dataset(
            main_root, paths.prepared, params.prepare, seed=base.seed, extra_roots=extra,
            background_root=background,
            progress=lambda done, total: advance(completed=done, total=total),
        )
    seconds = time.perf_counter() - start
    # Report paths are project-relative (or as the user gave them), so the file is the same on any machine.
    given = [base.data_root, *base.extra_roots, *([base.background_root] if base.background_root else [])]
    show = _shower(paths, {_resolve(paths, g): _given(paths, g) for g in given})
    issues = [{**i, "file": show(i["file"])} for i in result.issues]
    report = {
        "dataset": base.dataset,
        "data_root": _given(paths, base.data_root),
        "counts": result.counts,
        "n_issues": len(issues),
        "issues_by_action": dict(Counter(i["action"] for i in issues)),
        "issues": issues,
        "seconds": round(seconds, 2),
    }
    write_json(paths.prepare_report, report)
    _print_issues(issues)
    df = result.manifest
    split_counts = df.groupby("split").size().to_dict()
    console.print(f"prepared {len(df)} images {split_counts} in {seconds:.1f}s -> {paths.prepared}")
    metrics = {
        "n_images": len(df),
        **{f"n_{k}": v for k, v in split_counts.items()},
        "n_excluded": sum(1 for i in issues if i["action"] == "excluded"),
        "n_converted": sum(1 for i in issues if i["action"] == "converted"),
        "seconds": seconds,
    }
    with tracking.stage_run("prepare", base.dataset, params, paths, sections=("prepare", "synthetic")):
        tracking.log_metrics(metrics)
        tracking.log_artifact(paths.prepare_report)
    return metrics


def _print_issues(issues: list[dict[str, str]], limit: int = 20) -> None:
    from wsss.data.oxford_pet import ORPHAN_TRIMAP

    if not issues:
        return
    console.print(f"[yellow]{len(issues)} input problem(s)[/] (all listed in reports/prepare.json):")
    orphans = sum(1 for i in issues if i["reason"] == ORPHAN_TRIMAP)
    if orphans:
        console.print(f"  [yellow]{orphans} orphan trimap(s)[/] (no image with their NAME) ignored")
    for issue in issues[:limit]:
        console.print(f"  [yellow]{issue['action']}[/] {issue['file']}: {issue['reason']}")
    if len(issues) > limit:
        console.print(f"  ... and {len(issues) - limit} more")
