"""Stage ``validate``: great-expectations suite + file checks over the prepared data."""

from __future__ import annotations

from typing import Any

from wsss import tracking
from wsss.config import Params
from wsss.data.manifest import load_manifest
from wsss.io import write_json
from wsss.paths import Paths
from wsss.ui import console


def run(params: Params, paths: Paths) -> tuple[bool, dict[str, Any]]:
    """Validate ``data/prepared``; writes ``reports/validation.json`` and the GX result
    ``reports/validation-gx.json``. Returns (success, metrics)."""
    from wsss.data.validation import validate_manifest

    df = load_manifest(paths.manifest)
    result = validate_manifest(df, paths.prepared, params.validate)
    write_json(paths.validation_report, result.to_dict())
    if result.gx_result is not None:
        write_json(paths.validation_gx_report, result.gx_result)
    stats = result.statistics
    metrics = {
        "success": float(result.success),
        "checks_evaluated": stats.get("evaluated", len(result.checks)),
        "checks_failed": stats.get("unsuccessful", sum(not c.success for c in result.checks)),
    }
    outcome = {"validation": "passed" if result.success else "failed"}
    with tracking.stage_run(
        "validate", params.base.dataset, params, paths, sections=("validate",), extra_tags=outcome
    ):
        tracking.log_metrics(metrics)
        tracking.log_artifact(paths.validation_report)
        if result.gx_result is not None:
            tracking.log_artifact(paths.validation_gx_report)
    if result.success:
        console.print(f"[green]validation passed[/]: {metrics['checks_evaluated']} checks on {len(df)} images")
    else:
        console.print("[red]validation failed[/]")
        console.print(result.summary())
    return result.success, metrics
