"""The report's figures under ``reports/figures/``: IoU vs threshold, and one grid per map variant.

A grid shows, for the same few validation pets: image | map heat | pseudo-mask | U-Net prediction | GT.
The U-Net column runs the U-Net trained on that variant's masks (``unet-<variant>`` or ``unet-best``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsss.config import Params
from wsss.io import atomic_path, read_json
from wsss.paths import Paths
from wsss.reporting.inputs import Reports, get, num
from wsss.ui import console

if TYPE_CHECKING:
    from wsss.models.loading import ModelMeta

N_FIGURE_IMAGES = 6  # validation pets per map grid


def _save_figure(fig: Any, dest: Path) -> Path:
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=80, bbox_inches="tight")
    return dest


def threshold_figure(rep: Reports, dest: Path) -> Path | None:
    """IoU vs threshold of every map variant on the validation split (None: no curve to draw)."""
    from matplotlib.figure import Figure

    curves = {n: d["curve"] for n, d in sorted(rep.cams.items())
              if isinstance(d.get("curve"), dict) and d["curve"].get("threshold") and d["curve"].get("iou_mean")}
    if not curves:
        return None
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for i, (name, curve) in enumerate(curves.items()):
        style = ("-", "--", ":", "-.")[(i // 10) % 4]  # the colour cycle repeats after 10 lines
        (line,) = ax.plot(curve["threshold"], [100 * v for v in curve["iou_mean"]], style, label=name)
        best = num(rep.cams[name].get("best_threshold"))
        if best is not None and best in curve["threshold"]:
            ax.plot([best], [100 * curve["iou_mean"][curve["threshold"].index(best)]], "o", color=line.get_color())
    ellipse = get(next(iter(rep.cams.values())), "baseline_ellipse_iou")
    if ellipse is not None:
        ax.axhline(100 * ellipse, color="grey", linewidth=2, alpha=0.5, label="centred ellipse (no labels)")
    ax.set_xlabel("threshold τ on the max-normalised map")
    ax.set_ylabel("validation pet IoU (%)")
    ax.set_title("Map quality vs threshold (dots: best τ)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save_figure(fig, dest)


def figure_rows(paths: Paths) -> list[Any]:
    """Up to ``N_FIGURE_IMAGES`` validation pets with GT (sorted ids: the same images in every grid)."""
    from wsss.data.manifest import load_manifest, pets

    if not paths.manifest.is_file():
        return []
    df = load_manifest(paths.manifest)
    val = pets(df, "val", with_mask=True).sort_values("id")
    return list(val.head(N_FIGURE_IMAGES).itertuples())


def _unet_for(paths: Paths, variant: str, cache: dict[str, Any]) -> tuple[str, Any, ModelMeta] | None:
    """(name, model, meta) of a U-Net trained on ``variant``'s masks (``unet-<variant>``, ``unet-best``)."""
    from wsss.models.loading import load_model_dir

    for name in (f"unet-{variant}", "unet-best"):
        meta_path = paths.model_dir(name) / "meta.json"
        if not meta_path.is_file():
            continue
        try:
            if read_json(meta_path).get("masks") != variant:
                continue
            if name not in cache:
                cache[name] = (name, *load_model_dir(paths.model_dir(name), "unet"))
            return cache[name]
        except Exception as exc:  # a figure is not worth failing the report for
            console.print(f"[yellow]report: cannot load {paths.model_dir(name)} for figures ({exc})[/]")
    return None


def map_grid_figure(paths: Paths, variant: str, rows: Sequence[Any], unets: dict[str, Any], prec: Any,
                    dest: Path) -> Path | None:
    """image | map heat | pseudo-mask | U-Net prediction | GT for a few validation images (None: no maps)."""
    from matplotlib.figure import Figure

    from wsss.cams import load_maps
    from wsss.data.datasets import load_mask, load_rgb
    from wsss.decision import Decision
    from wsss.errors import DataError
    from wsss.viz import colorize

    try:
        maps = load_maps(paths.cams_dir(variant), {r.id for r in rows})
    except DataError:
        return None
    rows = [r for r in rows if r.id in maps]
    if not rows:
        return None
    masks_dir = paths.masks_dir(variant)
    unet = _unet_for(paths, variant, unets)
    columns = ["image", "map"]
    if masks_dir.is_dir():
        columns.append("pseudo-mask")
    if unet is not None:
        columns.append(f"U-Net ({unet[0]})")
    columns.append("GT")
    fig = Figure(figsize=(2.0 * len(columns), 2.0 * len(rows)))
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    for i, r in enumerate(rows):
        image = np.array(load_rgb(paths.prepared, r.image_path))  # writable: torch.from_numpy warns otherwise
        gt = load_mask(paths.prepared / r.mask_path)
        panels: list[tuple[np.ndarray, np.ndarray | None]] = [(image, None), (image, maps[r.id])]
        if "pseudo-mask" in columns:
            mask_path = masks_dir / f"{r.id}.png"
            panels.append((colorize(load_mask(mask_path)) if mask_path.is_file() else np.full_like(image, 64), None))
        if unet is not None:
            rule = Decision.of_model(unet[2].raw, paths.model_dir(unet[0]))
            prob = rule.probs(unet[1], [image], unet[2].input_size, prec)[0]
            panels.append((colorize(rule.mask(prob)), None))
        panels.append((colorize(gt), None))
        for j, (ax, (picture, heat)) in enumerate(zip(axes[i], panels, strict=True)):
            ax.imshow(picture)
            if heat is not None:
                ax.imshow(heat, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(columns[j], fontsize=8)
            if j == 0:
                ax.set_ylabel(str(r.id), fontsize=6)
    fig.suptitle(variant, fontsize=9)
    return _save_figure(fig, dest)


def make_figures(params: Params, paths: Paths, rep: Reports, device: str | None = None) -> list[Path]:
    """Write the figures under ``reports/figures/`` (stale map grids are removed); the paths written."""
    from wsss.device import precision_from

    out: list[Path] = []
    fig_dir = paths.figures
    fig_dir.mkdir(parents=True, exist_ok=True)
    curve = threshold_figure(rep, fig_dir / "iou_vs_threshold.png")
    if curve:
        out.append(curve)
    rows = figure_rows(paths)
    unets: dict[str, Any] = {}
    if rows:
        prec = precision_from(device, params, enabled=False)
        for variant in sorted(rep.cams):
            grid = map_grid_figure(paths, variant, rows, unets, prec, fig_dir / f"maps_{variant}.png")
            if grid:
                out.append(grid)
    for old in fig_dir.glob("maps_*.png"):
        if old not in out:
            old.unlink()
    return out


def figures_section(figures: Sequence[Path], paths: Paths) -> str:
    """The report's figure list (links relative to ``reports/``)."""
    if not figures:
        return "## Figures\n\nNone yet (no map reports, or no prepared data)."
    lines = ["## Figures", ""]
    for f in figures:
        rel = f.relative_to(paths.reports).as_posix()
        lines.append(f"![{f.stem}]({rel})")
    return "\n".join(lines)
