"""The reports the report is built from (``reports/cams``, ``reports/pseudo``, ``reports/eval``).

Formats: ``docs/artefacts.md#reports``. A missing or unreadable report is no error: its numbers are absent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsss.io import read_json
from wsss.paths import Paths
from wsss.ui import console


def num(value: Any) -> float | None:
    """A finite float, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def get(data: Mapping[str, Any] | None, *keys: str) -> float | None:
    """``data[k1][k2]...`` as a finite float, None when any level is missing."""
    cur: Any = data
    for key in keys:
        if not isinstance(cur, Mapping) or key not in cur:
            return None
        cur = cur[key]
    return num(cur)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, None when either is missing or the denominator is 0."""
    return None if numerator is None or not denominator else numerator / denominator


def load_reports(folder: Path) -> dict[str, dict[str, Any]]:
    """Every readable ``*.json`` of a folder by stem; unreadable ones are skipped with a note."""
    out: dict[str, dict[str, Any]] = {}
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("*.json")):
        try:
            data = read_json(path)
        except (OSError, ValueError) as exc:
            console.print(f"[yellow]report: skipping unreadable {path} ({exc})[/]")
            continue
        if isinstance(data, dict):
            out[path.stem] = data
    return out


@dataclass
class Reports:
    """Every input report, keyed by file stem."""

    cams: dict[str, dict[str, Any]]
    pseudo: dict[str, dict[str, Any]]
    eval: dict[str, dict[str, Any]]
    training: dict[str, dict[str, Any]] = field(default_factory=dict)  # reports/training/<model>.json
    self_training: dict[str, Any] | None = None  # reports/self-training.json (rounds, val IoU, champion)

    @classmethod
    def load(cls, paths: Paths) -> Reports:
        """Read ``reports/cams``, ``reports/pseudo``, ``reports/eval``, ``reports/training`` and
        ``reports/self-training.json`` of a project."""
        self_training = None
        if paths.self_training_report.is_file():
            try:
                self_training = read_json(paths.self_training_report)
            except (OSError, ValueError) as exc:
                console.print(f"[yellow]report: skipping unreadable {paths.self_training_report} ({exc})[/]")
        return cls(load_reports(paths.reports / "cams"), load_reports(paths.reports / "pseudo"),
                   load_reports(paths.reports / "eval"), load_reports(paths.reports / "training"),
                   self_training if isinstance(self_training, dict) else None)

    @property
    def unet_evals(self) -> dict[str, dict[str, Any]]:
        """Eval reports of U-Nets (everything but the baselines)."""
        return {k: v for k, v in self.eval.items() if k != "baselines"}
