"""Every artefact path in one place, relative to the project root (the folder holding params.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    """Artefact locations. Stage outputs match the ``outs`` declared in ``dvc.yaml``."""

    root: Path = Path(".")

    # --- data -------------------------------------------------------------------------------------
    @property
    def raw_synthetic(self) -> Path:
        """Where the synthetic generator writes its Oxford-layout tree and background images."""
        return self.root / "data" / "raw" / "synthetic"

    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared"

    @property
    def manifest(self) -> Path:
        return self.prepared / "manifest.parquet"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def prepare_report(self) -> Path:
        return self.reports / "prepare.json"

    @property
    def validation_report(self) -> Path:
        return self.reports / "validation.json"

    # --- models -----------------------------------------------------------------------------------
    def model_dir(self, name: str) -> Path:
        """``models/<name>/`` holding ``model.pt`` (state_dict) and ``meta.json``."""
        return self.root / "models" / name

    def training_report(self, name: str) -> Path:
        """``reports/training/<model name>.json``: final metrics of a training stage (DVC metrics)."""
        return self.reports / "training" / f"{name}.json"

    def state_dir(self, stage: str, variant: str) -> Path:
        """Resume state of a running stage (outside DVC outs, which DVC deletes before a rerun)."""
        return self.root / ".wsss" / "state" / stage / variant

    # --- maps, masks, reports ---------------------------------------------------------------------
    def cams_dir(self, variant: str) -> Path:
        return self.root / "cams" / variant

    def cams_report(self, variant: str) -> Path:
        return self.reports / "cams" / f"{variant}.json"

    def cams_curve(self, variant: str) -> Path:
        return self.reports / "cams" / "curves" / f"{variant}.csv"

    def crf_params(self, variant: str) -> Path:
        return self.reports / "crf" / f"{variant}.yaml"

    def study_dir(self, variant: str) -> Path:
        return self.root / "studies" / variant

    def masks_dir(self, variant: str) -> Path:
        return self.root / "masks" / variant

    def pseudo_report(self, variant: str) -> Path:
        return self.reports / "pseudo" / f"{variant}.json"

    def eval_report(self, source: str) -> Path:
        return self.reports / "eval" / f"{source}.json"

    def eval_pseudo_report(self, variant: str) -> Path:
        """``reports/eval-pseudo/<variant>.json``: a pseudo-mask method scored on the test split."""
        return self.reports / "eval-pseudo" / f"{variant}.json"

    @property
    def report_md(self) -> Path:
        return self.reports / "report.md"

    @property
    def figures(self) -> Path:
        return self.reports / "figures"

    @property
    def mlruns(self) -> Path:
        return self.root / "mlruns"
