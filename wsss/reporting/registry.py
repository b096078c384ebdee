"""MLflow model registry: the champion U-Net and ``unet-gt`` as versions of ``wsss-unet``.

The alias ``champion`` goes to the self-training champion of ``reports/self-training.json`` (the round
with the best val IoU; round 0 is ``unet-best``, whose pseudo-masks ``train-unet --masks best`` chose on
non-test pseudo-mask IoU), or to ``unet-best`` where no self-training report exists. ``unet-gt`` gets the
alias ``supervised``. Test scores play no part in either choice. Each alias points at a version whose
weights equal the DVC-tracked ``models/<name>/`` (``docs/artefacts.md#models``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.markup import escape

from wsss.io import read_json
from wsss.paths import Paths
from wsss.reporting.inputs import get, num
from wsss.reporting.markdown import DASH, md_table, pct
from wsss.ui import console

REGISTERED_MODEL = "wsss-unet"
CHAMPION, SUPERVISED = "champion", "supervised"
ROUND0, GT_UNET = "unet-best", "unet-gt"
SELFTRAIN_PREFIX = "unet-selftrain-r"
MAX_CANDIDATE_RUNS = 5  # newest finished train-unet runs searched for the model's weights


@dataclass
class Registration:
    """Outcome of registering one ``models/unet-*`` folder."""

    model: str
    alias: str
    version: str | None = None
    run_id: str | None = None
    uri: str | None = None
    masks: str | None = None
    note: str = ""
    chosen_by: str | None = None  # how the champion was chosen, for the report


def _logged_model_uri(run: Any) -> str | None:
    """``models:/<model id>`` of the model named ``model`` logged by a run (MLflow 3), else None."""
    import mlflow

    try:
        models = mlflow.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{run.info.run_id}'",
            output_format="list",
        )
    except Exception:  # an older server without logged models: fall back to the run artifact path
        return f"runs:/{run.info.run_id}/model"
    named = [m for m in models if m.name == "model"]
    if not named:
        return None
    return f"models:/{max(named, key=lambda m: m.creation_timestamp).model_id}"


def _state_matches(uri: str, sha: str | None) -> bool:
    """Whether the MLflow model's weights are those saved under ``models/`` (same state SHA-256).

    Loaded with the safe loader (format, weights checksum and state SHA-256 checked; nothing unpickled),
    so an old pickle-format model or a tampered one is skipped with a warning, never loaded.
    """
    from wsss.errors import DataError
    from wsss.serving.loader import load_mlflow_unet

    try:
        _, meta = load_mlflow_unet(uri)
    except DataError as exc:  # e.g. an old pickle-format model: try an older run
        console.print(f"[yellow]registry: skipped {escape(str(exc))}[/]")
        return False
    return not sha or meta.get("state_sha256") == sha


def _registered_exists(client: Any) -> bool:
    try:
        client.get_registered_model(REGISTERED_MODEL)
        return True
    except Exception:  # RESOURCE_DOES_NOT_EXIST
        return False


def register_unet(paths: Paths, experiment_id: str, model_name: str, alias: str) -> Registration:
    """Register the MLflow model of the newest finished train-unet run of ``model_name``; set ``alias``.

    The run must have logged a model whose weights equal ``models/<model_name>/`` (checked with the
    state SHA-256 in ``meta.json``), so the alias always points at the DVC-tracked model. A version
    already registered for that model is reused (re-running the report adds no duplicates).
    """
    import mlflow
    from mlflow import MlflowClient

    reg = Registration(model_name, alias)
    meta_path = paths.model_dir(model_name) / "meta.json"
    if not meta_path.is_file():
        reg.note = f"{meta_path} not found; not registered"
        return reg
    meta = read_json(meta_path)
    reg.masks = meta.get("masks")
    runs = mlflow.search_runs(
        experiment_ids=[experiment_id],
        filter_string=(f"tags.`wsss.stage` = 'train-unet' and tags.`wsss.variant` = '{model_name}' "
                       "and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    runs = [r for r in runs if r.data.tags.get("masks") in (None, reg.masks)][:MAX_CANDIDATE_RUNS]
    if not runs:
        reg.note = f"no finished train-unet run of {model_name} (masks {reg.masks}) in MLflow; not registered"
        return reg
    for run in runs:
        uri = _logged_model_uri(run)
        if uri and _state_matches(uri, meta.get("state_sha256")):
            reg.run_id, reg.uri = run.info.run_id, uri
            break
    if reg.uri is None:
        reg.note = (f"no train-unet run of {model_name} logged a model equal to {paths.model_dir(model_name)} "
                    "(retrained without MLflow?); not registered")
        return reg
    client = MlflowClient()
    existing = [v for v in client.search_model_versions(f"name = '{REGISTERED_MODEL}' and run_id = '{reg.run_id}'")
                if v.source == reg.uri] if _registered_exists(client) else []
    if existing:
        version = str(max(int(v.version) for v in existing))
    else:
        tags = {"wsss.model_dir": model_name, "wsss.masks": str(reg.masks),
                "input_size": str(meta.get("input_size", "")), "architecture": str(meta.get("architecture", "")),
                "encoder": str(meta.get("encoder", "")), "state_sha256": str(meta.get("state_sha256", ""))}
        version = str(mlflow.register_model(reg.uri, REGISTERED_MODEL, tags=tags).version)
        if alias != CHAMPION:
            how = "supervised baseline trained on GT masks"
        elif model_name == ROUND0:
            how = "weakly supervised; pseudo-mask source chosen by non-test pseudo-mask IoU (train-unet --masks best)"
        else:
            how = "weakly supervised; the self-training round with the best val IoU (wsss self-train-champion)"
        client.update_model_version(REGISTERED_MODEL, version, description=f"{model_name} on masks {reg.masks}: {how}")
    client.set_registered_model_alias(REGISTERED_MODEL, alias, version)
    reg.version = version
    return reg


def champion(self_training: Mapping[str, Any] | None) -> tuple[str, str | None]:
    """The champion's ``models/`` name and how it was chosen: the self-training champion (chosen on val IoU,
    :func:`wsss.self_training.choose_champion`) when ``self_training`` names a round model, else ``unet-best``."""
    report = self_training if isinstance(self_training, Mapping) else {}
    chosen = report.get("champion")
    model = chosen.get("model") if isinstance(chosen, Mapping) else None
    if not (isinstance(chosen, Mapping) and isinstance(model, str) and model.startswith(SELFTRAIN_PREFIX)
            and model.removeprefix(SELFTRAIN_PREFIX).isdigit()):
        return ROUND0, None  # round 0 (or no usable report): chosen by its pseudo-masks' IoU
    rounds = report.get("rounds") if isinstance(report.get("rounds"), list) else []
    round0 = next((r.get("val_iou") for r in rounds if isinstance(r, Mapping) and r.get("round") == 0), None)
    how = (f"self-training round {chosen.get('round')}: val IoU {pct(get(chosen, 'val_iou'))}"
           f" (round 0: {pct(num(round0))})")
    return model, how


def aliases(self_training: Mapping[str, Any] | None) -> dict[str, str]:
    """``models/<name>`` -> alias: the champion (:func:`champion`) and ``unet-gt``."""
    return {champion(self_training)[0]: CHAMPION, GT_UNET: SUPERVISED}


def register_all(paths: Paths, experiment_id: str,
                 self_training: Mapping[str, Any] | None = None) -> list[Registration]:
    """Register the champion (alias champion) and ``unet-gt`` (alias supervised) where possible;
    ``self_training`` is ``reports/self-training.json``, which says which round is the champion."""
    regs = []
    _, how = champion(self_training)
    for model_name, alias in aliases(self_training).items():
        try:
            reg = register_unet(paths, experiment_id, model_name, alias)
        except Exception as exc:  # the report itself must still be written
            reg = Registration(model_name, alias, note=f"registration failed ({type(exc).__name__}: {exc})")
        if alias == CHAMPION:
            reg.chosen_by = how
        if reg.version:
            console.print(f"registered {model_name} as {REGISTERED_MODEL} v{reg.version} @{alias} ({reg.uri})")
        else:
            console.print(f"[yellow]registry: {reg.note}[/]")
        regs.append(reg)
    return regs


def registry_section(regs: Sequence[Registration] | None, pseudo: Mapping[str, Mapping[str, Any]]) -> str:
    """The report's registry table (``regs`` None: registration was skipped with ``--no-register``)."""
    if regs is None:
        return "## Model registry\n\nSkipped (`--no-register`)."
    rows = []
    for r in regs:
        chosen = DASH
        if r.alias == CHAMPION and r.chosen_by:
            chosen = r.chosen_by
        elif r.alias == CHAMPION and r.masks:
            chosen = f"`{r.masks}`: pseudo-mask IoU {pct(get(pseudo.get(r.masks), 'after', 'iou_mean'))} (non-test)"
        ref = f"`models:/{REGISTERED_MODEL}@{r.alias}` (v{r.version})" if r.version else DASH
        rows.append([f"`{r.model}`", f"`{r.alias}`", ref, f"`{r.run_id}`" if r.run_id else DASH, chosen,
                     r.note or "registered"])
    return "\n".join([
        "## Model registry",
        "",
        f"Registered model `{REGISTERED_MODEL}`. The champion is the self-training round with the best val "
        "IoU, where round 0 is the U-Net trained on the pseudo-masks with the highest non-test pseudo-mask IoU "
        "and a later round must beat it; test scores play no part in the choice. "
        f"Use it with `wsss predict IMAGES --model models:/{REGISTERED_MODEL}@{CHAMPION} --out DIR`.",
        "",
        md_table(["model", "alias", "URI", "train-unet run", "chosen by", "status"], rows),
    ])
