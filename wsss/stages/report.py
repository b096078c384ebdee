"""Stage ``report``: ``reports/report.md`` (the paper's tables, ours beside theirs), figures, model registry.

Reads whatever reports exist and never fails on a missing one: an absent number is shown as "—".
The parts live in ``wsss.reporting``: the paper's numbers (``paper``), which variant fills which cell
(``slots``), the sections (``tables``), the figures (``figures``) and the MLflow registry (``registry``).
"""

from __future__ import annotations

from typing import Any

from wsss import tracking
from wsss.config import Params
from wsss.io import write_text
from wsss.paths import Paths
from wsss.reporting.figures import figures_section, make_figures
from wsss.reporting.inputs import Reports, get, ratio
from wsss.reporting.registry import REGISTERED_MODEL, register_all, registry_section
from wsss.reporting.tables import render
from wsss.ui import console

STAGE = "report"


def chance_levels(paths: Paths) -> dict[str, float]:
    """Each classifier variant's chance balanced accuracy: 1 / the classes in the validation split.

    The label space may be larger than the classes present (the synthetic default draws 6 of 37 breeds);
    balanced accuracy averages over the present ones, so that is the chance level. {} without a manifest.
    """
    from wsss.data.manifest import load_manifest
    from wsss.errors import DataError

    try:
        df = load_manifest(paths.manifest)
    except (OSError, ValueError, DataError):
        return {}
    val = df[df["split"] == "val"]
    pet_rows = val[~val["is_background"].astype(bool)]
    has_bg = bool(val["is_background"].astype(bool).any())
    out: dict[str, float] = {}
    for labels in ("species", "breed"):
        for bg in (False, True):
            k = int(pet_rows[labels].nunique()) + int(bg and has_bg)
            if k:
                out[f"classifier-{labels}{'-bg' if bg else ''}"] = 1.0 / k
    return out


def run(params: Params, paths: Paths, register: bool = True, device: str | None = None) -> dict[str, Any]:
    """Write ``reports/report.md`` and ``reports/figures/``, register the U-Nets, log it all to MLflow."""
    import mlflow

    rep = Reports.load(paths)
    with tracking.stage_run(STAGE, "all", params, paths) as run_:
        regs = register_all(paths, run_.info.experiment_id, rep.self_training) if register else None
        figures = make_figures(params, paths, rep, device)
        md = render(params, rep, tracking.experiment_name(params), registry_section(regs, rep.pseudo),
                    figures_section(figures, paths), chance=chance_levels(paths))
        write_text(paths.report_md, md)
        tracking.log_artifact(paths.report_md)
        if paths.figures.is_dir() and any(paths.figures.iterdir()):
            tracking.guard(mlflow.log_artifacts, str(paths.figures), artifact_path="figures")
        gt, best = get(rep.eval.get("gt"), "iou_mean"), get(rep.eval.get("best"), "iou_mean")
        same = get(rep.eval.get("same-best"), "iou_mean")
        summary: dict[str, Any] = {
            "n_map_variants": len(rep.cams), "n_pseudo_variants": len(rep.pseudo), "n_figures": len(figures),
            "test_iou_best": best, "test_iou_gt": gt, "wsss_over_supervised": ratio(best, gt),
            "test_iou_same_images": same, "same_images_over_supervised": ratio(same, gt),
        }
        tracking.log_metrics({k: v for k, v in summary.items() if v is not None})
        for r in regs or []:
            if r.version:
                tracking.guard(mlflow.set_tag, f"registry.{r.alias}", f"{REGISTERED_MODEL}/{r.version}")
    summary["registered"] = {r.alias: r.version for r in regs or [] if r.version}
    console.print(f"wrote {paths.report_md} ({len(figures)} figures in {paths.figures})")
    return summary
