"""Every artefact path in one place, relative to the project root (the folder holding params.yaml).

A path that holds a name is built only from a parsed name (:mod:`wsss.variants`): a plain string is parsed
first and refused (:class:`~wsss.errors.ConfigError`) when it is not a valid name, so no name can climb out
of its folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from wsss.variants import MapVariant, MaskSource, ModelId, UnetId, parse_model, safe_name

# ``reports/eval/<key>.json`` holds a U-Net's score under its mask source, or the baselines'.
EVAL_BASELINES = "baselines"


def _model(name: ModelId | str) -> str:
    return str(parse_model(name) if isinstance(name, str) else _typed(name, ModelId))


def _variant(variant: MapVariant | str) -> str:
    return str(MapVariant.parse(variant) if isinstance(variant, str) else _typed(variant, MapVariant))


def _typed(value: object, kind: object) -> object:
    if not isinstance(value, kind):  # type: ignore[arg-type]
        raise TypeError(f"expected a name of {kind}, got {type(value).__name__} {value!r}")
    return value


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

    @property
    def validation_gx_report(self) -> Path:
        """The GX suite's ``ExpectationSuiteValidationResult`` as GX serialises it (beside ours)."""
        return self.reports / "validation-gx.json"

    def shown(self, path: str | Path) -> str:
        """``path`` for a report: relative to the project root (POSIX) when inside it, else as given.

        So metrics files do not differ per machine; a path outside the project keeps the form the user
        gave (``../shared/data`` stays relative, an absolute one stays absolute), never absolutised.
        """
        p = Path(path)
        if p.is_absolute():
            try:
                return p.relative_to(self.root.absolute()).as_posix() or "."
            except ValueError:
                return str(p)
        return p.as_posix()

    # --- models -----------------------------------------------------------------------------------
    def model_dir(self, name: ModelId | str) -> Path:
        """``models/<name>/`` holding ``model.pt`` (state_dict) and ``meta.json``."""
        return self.root / "models" / _model(name)

    def training_report(self, name: ModelId | str) -> Path:
        """``reports/training/<model name>.json``: final metrics of a training stage (DVC metrics)."""
        return self.reports / "training" / f"{_model(name)}.json"

    def training_curve(self, name: ModelId | str) -> Path:
        """``reports/training/curves/<model name>.csv``: per-epoch metrics of a training stage (DVC plots)."""
        return self.reports / "training" / "curves" / f"{_model(name)}.csv"

    def state_dir(self, stage: str, key: str) -> Path:
        """Resume state of a running stage (outside DVC outs, which DVC deletes before a rerun).

        ``key`` (a model, variant or backbone name) must be a safe name (:func:`wsss.variants.safe_name`).
        """
        return self.root / ".wsss" / "state" / safe_name(stage, "stage") / safe_name(str(key), "state key")

    # --- maps, masks, reports ---------------------------------------------------------------------
    @property
    def cams_root(self) -> Path:
        """``cams/``: the folder every map variant's folder lives in (what make-cams may delete inside)."""
        return self.root / "cams"

    @property
    def masks_root(self) -> Path:
        """``masks/``: the folder every pseudo-mask variant's folder lives in."""
        return self.root / "masks"

    def cams_dir(self, variant: MapVariant | str) -> Path:
        return self.cams_root / _variant(variant)

    def cams_report(self, variant: MapVariant | str) -> Path:
        return self.reports / "cams" / f"{_variant(variant)}.json"

    def cams_curve(self, variant: MapVariant | str) -> Path:
        return self.reports / "cams" / "curves" / f"{_variant(variant)}.csv"

    def crf_params(self, variant: MapVariant | str) -> Path:
        return self.reports / "crf" / f"{_variant(variant)}.yaml"

    def study_dir(self, variant: MapVariant | str) -> Path:
        return self.root / "studies" / _variant(variant)

    @property
    def ensemble_weights(self) -> Path:
        """``reports/ensemble-weights.yaml``: the member weights ``wsss tune ensemble`` chose on val."""
        return self.reports / "ensemble-weights.yaml"

    @property
    def ensemble_study_dir(self) -> Path:
        """``studies/ensemble-weights/``: the weight study (``studies/ensemble/`` is tune-crf's of the fused maps)."""
        return self.root / "studies" / "ensemble-weights"

    def masks_dir(self, variant: MapVariant | str) -> Path:
        return self.masks_root / _variant(variant)

    def selftrain_masks_dir(self, round_: int) -> Path:
        """``masks/selftrain-r<N>/``: the constrained masks of self-training round ``N`` (``wsss self-train``)."""
        return self.masks_root / str(MaskSource("selftrain", round=round_))

    def selftrain_report(self, round_: int) -> Path:
        """``reports/selftrain/r<N>.json``: round ``N``'s masks (ignored fraction, resets) and its val IoU."""
        return self.reports / "selftrain" / f"r{MaskSource('selftrain', round=round_).round}.json"

    @property
    def self_training_report(self) -> Path:
        """``reports/self-training.json``: every round's val IoU (round 0 included) and the champion."""
        return self.reports / "self-training.json"

    def pseudo_report(self, variant: MapVariant | str) -> Path:
        return self.reports / "pseudo" / f"{_variant(variant)}.json"

    def eval_report(self, source: MaskSource | UnetId | str) -> Path:
        """``reports/eval/<source>.json``: a U-Net's test scores under its mask source (``unet-<source>``), or
        ``baselines``."""
        if isinstance(source, UnetId):
            source = source.source
        key = source if source == EVAL_BASELINES else str(
            MaskSource.parse(source) if isinstance(source, str) else _typed(source, MaskSource))
        return self.reports / "eval" / f"{key}.json"

    def eval_pseudo_report(self, variant: MapVariant | str) -> Path:
        """``reports/eval-pseudo/<variant>.json``: a pseudo-mask method scored on the test split."""
        return self.reports / "eval-pseudo" / f"{_variant(variant)}.json"

    @property
    def report_md(self) -> Path:
        return self.reports / "report.md"

    @property
    def figures(self) -> Path:
        return self.reports / "figures"

    @property
    def mlruns(self) -> Path:
        return self.root / "mlruns"
