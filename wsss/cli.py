"""The ``wsss`` command line: one command per pipeline stage.

Commands stay thin: they parse the names they are given (:mod:`wsss.variants`; a bad one fails with exit 2
before any path is built), load params, call ``wsss.stages.<stage>.run`` and turn user errors into a
one-line message. Heavy libraries (torch, mlflow, great-expectations) are imported inside commands so
``wsss --help`` stays fast.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from wsss.errors import ConfigError, WsssError
from wsss.variants import CcamInit, Labels, MapVariant, MaskSource, MethodName, UnetId, parse_model, safe_name

app = typer.Typer(
    help="Weakly-supervised semantic segmentation: CAM / ECS / CCAM maps -> CRF pseudo-masks -> U-Net.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
data_app = typer.Typer(help="Download datasets (needs internet).", no_args_is_help=True)
app.add_typer(data_app, name="data")
tune_app = typer.Typer(help="Hyper-parameter studies (Optuna).", no_args_is_help=True)
app.add_typer(tune_app, name="tune")

ParamsOpt = Annotated[
    Path, typer.Option("--params", "-p", help="params.yaml to read.", dir_okay=False)
]
DeviceOpt = Annotated[
    str | None, typer.Option("--device", help="auto, cpu, cuda or cuda:N (overrides base.device).")
]
ShardOpt = Annotated[
    str | None,
    typer.Option("--shard", help="i/n: do part i (from 0) of n, e.g. one task of a Slurm or Kubernetes job array; "
                                 "the part that finishes last writes the final outputs. Under torchrun, RANK/WORLD_SIZE "
                                 "set it."),
]
# The two Optuna studies (tune crf, tune ensemble) stop the same way.
TimeoutOpt = Annotated[
    float | None, typer.Option(min=0, help="Start no new trial after this many seconds (0: no limit).")
]
F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def _user_errors(fn: F) -> F:
    """Print a :class:`WsssError` as one clear line and exit with its code (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except WsssError as exc:
            from wsss.ui import console

            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


def _parse(parse: Callable[[str], T], value: str, option: str) -> T:
    """``parse(value)``; a bad value is a :class:`ConfigError` naming the option (one line, exit 2)."""
    try:
        return parse(value)
    except ConfigError as exc:
        raise ConfigError(f"{option}: {exc}") from None


def _load(params_path: Path, track: bool = True, writes: bool = True) -> tuple[Any, Any]:
    """Params and paths; with ``track``, fail fast (exit 4) if the MLflow store cannot be used.

    ``writes``: the command logs runs, so the store must also be writable (False for ``wsss runs``).
    """
    from wsss.config import load_params
    from wsss.paths import Paths

    params = load_params(params_path)
    paths = Paths(params_path.resolve().parent)
    if track:
        from wsss import tracking

        tracking.check_store(paths, params, writes=writes)  # before any work: never compute what cannot be tracked
    return params, paths


@app.command("generate-synthetic")
@_user_errors
def generate_synthetic(params_path: ParamsOpt = Path("params.yaml")) -> None:
    """Write the built-in synthetic pets dataset (the embedded default) to data/raw/synthetic."""
    from wsss.stages import generate

    params, paths = _load(params_path, track=False)
    generate.run(params, paths)


@app.command()
@_user_errors
def prepare(params_path: ParamsOpt = Path("params.yaml")) -> None:
    """Resize images, convert trimaps to masks (0 bg, 1 pet, 255 border), write the manifest.

    Bad files are converted where safe or excluded, and listed in reports/prepare.json.
    """
    from wsss.stages import prepare as stage

    params, paths = _load(params_path)
    stage.run(params, paths)


@app.command()
@_user_errors
def validate(params_path: ParamsOpt = Path("params.yaml")) -> None:
    """Check the prepared data with a great-expectations suite and file checks; non-zero exit on failure."""
    from wsss.stages import validate as stage

    params, paths = _load(params_path)
    ok, _ = stage.run(params, paths)
    if not ok:
        raise typer.Exit(1)


@app.command("pretrain")
@_user_errors
def pretrain(
    name: Annotated[
        str | None, typer.Option(help="Backbone name (overrides pretrain.name): writes models/pretrain-<name>/.")
    ] = None,
    params_path: ParamsOpt = Path("params.yaml"),
    device: DeviceOpt = None,
) -> None:
    """Self-supervised backbone pretraining (SimSiam / MoCo v2) on every non-test image, no labels. Resumes after a kill.

    Consumers: train_classifier.weights or train_unet.encoder_weights `pretrain:<name>`, `train-ccam --init pretrain:<name>`.
    """
    from wsss.stages import pretrain as stage

    if name is not None:
        _parse(safe_name, name, "--name")
    params, paths = _load(params_path)
    stage.run(params, paths, name=name, device=device)


@app.command("train-classifier")
@_user_errors
def train_classifier(
    labels: Annotated[Labels, typer.Option(help="species (2-way) or breed (37-way).")] = Labels.species,
    bg: Annotated[bool, typer.Option("--bg/--no-bg", help="Add a background class (3 / 38-way).")] = False,
    params_path: ParamsOpt = Path("params.yaml"),
    device: DeviceOpt = None,
) -> None:
    """Train an image-level classifier (for CAM / ECS, and as a CCAM initialisation). Resumes after a kill."""
    from wsss.stages import train_classifier as stage

    params, paths = _load(params_path)
    stage.run(params, paths, labels.value, bg, device=device)


@app.command("train-ccam")
@_user_errors
def train_ccam(
    init: Annotated[
        str, typer.Option(help="Backbone start: none, imagenet, classifier:<labels>[-bg], pretrain:<name>.")
    ] = "none",
    ecs: Annotated[bool, typer.Option("--ecs/--no-ecs", help="Add the ECS target term (CCAM+ECS).")] = False,
    per_breed: Annotated[
        bool, typer.Option("--per-breed/--no-per-breed", help="Fine-tune ccam-<init> with per-breed contrast.")
    ] = False,
    params_path: ParamsOpt = Path("params.yaml"),
    device: DeviceOpt = None,
) -> None:
    """Train class-agnostic CCAM (optionally with the ECS term, or per-breed fine-tuning). Resumes after a kill."""
    from wsss.stages import train_ccam as stage

    _parse(CcamInit.parse, init, "--init")
    params, paths = _load(params_path)
    stage.run(params, paths, init, ecs=ecs, per_breed=per_breed, device=device)


@app.command("make-cams")
@_user_errors
def make_cams(
    method: Annotated[MethodName, typer.Option(help="Map method (ensemble fuses make_cams.ensemble_members; "
                                                    "prior-grabcut and prior-ellipse are label-free, no model).")],
    model: Annotated[
        str | None, typer.Option(help="Model folder under models/ (e.g. classifier-species), or imagenet.")
    ] = None,
    params_path: ParamsOpt = Path("params.yaml"),
    device: DeviceOpt = None,
    shard: ShardOpt = None,
) -> None:
    """Extract maps for every trainval pet into cams/<method>_<model>/ (resumable) and score them on val."""
    from wsss.sharding import resolve
    from wsss.stages import make_cams as stage

    part = resolve(shard)

    if model is not None:  # ensemble ignores --model, but a bad name is still refused
        _parse(parse_model, model, "--model")
        if method is not MethodName.ensemble:  # a prior given a model is refused here
            _parse(lambda m: MapVariant.of(method.value, m), model, "--model")
    params, paths = _load(params_path)
    stage.run(params, paths, method.value, model, device=device, shard=part)


@app.command("train-unet")
@_user_errors
def train_unet(
    masks: Annotated[
        str, typer.Option(help="gt (supervised baseline), a pseudo-mask variant, or best (by non-test IoU); "
                          "same-best / same-<variant>: those pseudo-masks on the train images with GT only.")
    ] = "best",
    params_path: ParamsOpt = Path("params.yaml"),
    device: DeviceOpt = None,
) -> None:
    """Train a U-Net on pseudo-masks or GT masks for train_unet.steps optimiser steps (the same for every U-Net, last step kept). Resumes after a kill."""
    from wsss.stages import train_unet as stage

    _parse(MaskSource.parse, masks, "--masks")
    params, paths = _load(params_path)
    stage.run(params, paths, masks, device=device)


@app.command("self-train")
@_user_errors
def self_train(
    round_: Annotated[int, typer.Option("--round", help="Round N, 1..self_train.rounds (round 0 is unet-best).")],
    params_path: ParamsOpt = Path("params.yaml"),
    device: DeviceOpt = None,
) -> None:
    """One constrained self-training round: the previous U-Net relabels the train images (flip TTA), the route's tuned refiner refines, round-0 constraints apply -> masks/selftrain-r<N>/, then unet-selftrain-r<N> trains on them (train_unet schedule). Resumes after a kill."""
    from wsss.stages import self_train as stage
    from wsss.stages import train_unet

    params, paths = _load(params_path)
    stage.check_round(params, round_)
    stage.run(params, paths, round_, train=train_unet.run, device=device)


@app.command("self-train-champion")
@_user_errors
def self_train_champion(params_path: ParamsOpt = Path("params.yaml")) -> None:
    """Choose the self-training round with the best val IoU (round 0 included, never test) -> reports/self-training.json."""
    from wsss.stages import self_train_champion as stage

    params, paths = _load(params_path)
    stage.run_champion(params, paths)


@app.command()
@_user_errors
def evaluate(
    model: Annotated[
        str | None, typer.Option(help="U-Net folder under models/ (e.g. unet-gt, unet-best).")
    ] = None,
    baselines: Annotated[
        bool, typer.Option("--baselines", help="Score the label-free baselines instead of a model.")
    ] = False,
    pseudo: Annotated[
        str | None,
        typer.Option(help="Score a pseudo-mask variant (e.g. cam_classifier-species) on the test split: "
                          "maps from each test image's label, refined as make-pseudo does -> reports/eval-pseudo/."),
    ] = None,
    params_path: ParamsOpt = Path("params.yaml"),
    device: DeviceOpt = None,
) -> None:
    """Score a U-Net (or the label-free baselines, or a pseudo-mask method) on the official test split -> reports/eval/."""
    from wsss.stages import evaluate as stage

    if pseudo is not None:  # an empty name is a bad name, not "no option"
        _parse(MapVariant.parse, pseudo, "--pseudo")
    elif model is not None and not baselines:
        _parse(UnetId.parse, model, "--model")
    params, paths = _load(params_path)
    if pseudo is not None:
        from wsss.stages.evaluate_pseudo import run_pseudo

        run_pseudo(params, paths, pseudo, device=device)
    elif baselines:
        stage.run_baselines(params, paths)
    elif model:
        stage.run(params, paths, model, device=device)
    else:
        raise WsssError("give --model unet-<source>, --baselines or --pseudo <variant>")


@tune_app.command("crf")
@_user_errors
def tune_crf(
    method: Annotated[str, typer.Option(help="Map variant under cams/, e.g. cam_classifier-species.")],
    trials: Annotated[
        int | None, typer.Option(min=1, help="Trials to add in this run (default: tune.trials).")
    ] = None,
    timeout: TimeoutOpt = None,
    storage: Annotated[
        str | None,
        typer.Option(help="Optuna storage URL (default: tune.storage, else SQLite in studies/<variant>/optuna.db)."),
    ] = None,
    study: Annotated[
        str | None, typer.Option(help="Study name (default: crf-<variant>-<fingerprint of the objective>).")
    ] = None,
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """Tune the refiner, its CRF / GrabCut parameters and thresholds on the validation split (never test).

    Maximises the mean pet IoU of the refined masks with a seeded TPE study (pruned by chunks of images), logs one MLflow run per trial nested under one run per invocation, and writes the best trial's pseudo section to reports/crf/<variant>.yaml, which make-pseudo uses. Running it again continues the same study.

    Many workers: run this command in several processes or machines with the same storage (tune.storage in params.yaml, or --storage, which overrides it) pointing at a database server, e.g. --storage postgresql+psycopg://user@host/optuna with the password in PGPASSWORD (pip install 'wsss[postgres]'); they share one study (same default name for the same data) and each adds --trials trials. For several processes on one machine a SQLite URL works too, e.g. --storage sqlite:////abs/path/optuna.db.
    """
    from wsss.stages import tune_crf as stage

    _parse(MapVariant.parse, method, "--method")
    params, paths = _load(params_path)
    stage.run(params, paths, method, trials=trials, timeout_s=timeout, storage=storage, study=study)


@tune_app.command("ensemble")
@_user_errors
def tune_ensemble(
    trials: Annotated[
        int | None, typer.Option(min=1, help="Trials to add in this run (default: tune_ensemble.trials).")
    ] = None,
    timeout: TimeoutOpt = None,
    storage: Annotated[
        str | None,
        typer.Option(help="Optuna storage URL (default: SQLite in studies/ensemble-weights/optuna.db)."),
    ] = None,
    study: Annotated[
        str | None, typer.Option(help="Study name (default: ensemble-<fingerprint of the objective>).")
    ] = None,
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """Tune the ensemble's member weights on the validation split (never test).

    Maximises the mean pet IoU of the fused map (make_cams.ensemble_members, make_cams.ensemble_fusion) at its best threshold with a seeded TPE study. A new study first scores every single-member weighting, so the result is never worse on val than the best member. Logs one MLflow run per trial nested under one run per invocation and writes reports/ensemble-weights.yaml, which make-cams --method ensemble uses. Running it again continues the same study.
    """
    from wsss.stages import tune_ensemble as stage

    params, paths = _load(params_path)
    stage.run(params, paths, trials=trials, timeout_s=timeout, storage=storage, study=study)


@app.command("make-pseudo")
@_user_errors
def make_pseudo(
    method: Annotated[str, typer.Option(help="Map variant under cams/, e.g. cam_classifier-species.")],
    tuned: Annotated[
        bool, typer.Option("--tuned/--no-tuned", help="Use reports/crf/<variant>.yaml when it exists.")
    ] = True,
    params_path: ParamsOpt = Path("params.yaml"),
    shard: ShardOpt = None,
) -> None:
    """Refine every map into a pseudo-mask in masks/<variant>/ (0 bg, 1 pet, 255 ignore); resumable.

    Also writes reports/pseudo/<variant>.json: pet IoU / Dice against GT on the trainval images, before and after refinement, beside label-free baselines (GT for reporting only). Parameters come from reports/crf/<variant>.yaml when it exists, else from params.yaml's pseudo section. Uses every CPU core (pseudo.workers: 0).
    """
    from wsss.sharding import resolve
    from wsss.stages import make_pseudo as stage

    _parse(MapVariant.parse, method, "--method")
    part = resolve(shard)
    params, paths = _load(params_path)
    stage.run(params, paths, method, use_tuned=tuned, shard=part)


@app.command()
@_user_errors
def report(
    register: Annotated[
        bool, typer.Option("--register/--no-register", help="Register the U-Nets in the MLflow model registry.")
    ] = True,
    params_path: ParamsOpt = Path("params.yaml"),
    device: DeviceOpt = None,
) -> None:
    """Write reports/report.md (the paper's Tables 1-3, ours beside theirs) and reports/figures/.

    Reads whatever reports exist (missing numbers show as "—"). Registers the U-Net of unet-best as wsss-unet with alias champion (and unet-gt with alias supervised); the champion was chosen on non-test pseudo-mask IoU, never on test.
    """
    from wsss.stages import report as stage

    params, paths = _load(params_path)
    stage.run(params, paths, register=register, device=device)


@app.command()
@_user_errors
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files or folders (searched recursively).")],
    model: Annotated[
        str, typer.Option(help="A models/unet-* folder, or an MLflow model URI such as models:/wsss-unet@champion.")
    ] = "models/unet-best",
    out: Annotated[Path, typer.Option(help="Output folder.", file_okay=False)] = Path("predictions"),
    threshold: Annotated[
        float | None,
        typer.Option(help="Pet probability threshold (default: the model's, chosen on val by train-unet)."),
    ] = None,
    params_path: ParamsOpt = Path("params.yaml"),
    device: DeviceOpt = None,
    shard: ShardOpt = None,
) -> None:
    """Predict pet masks for new images: <out>/<stem>_mask.png (0 bg, 1 pet) and <stem>_overlay.png.

    Images of any size (jpg, jpeg, png, bmp, gif, webp). A file that cannot be read is reported with the reason and skipped; the command then exits with code 3 after processing the others.
    """
    from wsss.paths import Paths
    from wsss.sharding import resolve
    from wsss.stages import predict as stage

    part = resolve(shard)
    result = stage.run(images, model, out, device=device, paths=Paths(params_path.resolve().parent),
                       threshold=threshold, shard=part)
    if not result.ok:
        raise typer.Exit(3)


@app.command()
@_user_errors
def runs(
    stage: Annotated[str | None, typer.Option(help="Only this stage, e.g. train-unet.")] = None,
    all_runs: Annotated[
        bool, typer.Option("--all", help="Every run, newest first, nested tuning trials included.")
    ] = False,
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """List the latest MLflow run of every stage and variant: status, time, key metrics, git commit."""
    from wsss.stages import runs as runs_stage

    params, paths = _load(params_path, writes=False)
    runs_stage.run(params, paths, stage, include_all=all_runs)


@data_app.command("fetch")
@_user_errors
def data_fetch(
    dataset: Annotated[str, typer.Argument(help="oxford-pet or stanford-background")],
    dest: Annotated[Path, typer.Option(help="Folder to download into.")] = Path("data/raw"),
) -> None:
    """Download Oxford-IIIT Pet (torchvision) or Stanford Background, for users who are online."""
    from wsss.data import fetch
    from wsss.ui import console

    if dataset == "oxford-pet":
        root = fetch.fetch_oxford_pet(dest)
    elif dataset == "stanford-background":
        root = fetch.fetch_stanford_background(dest)
    else:
        raise WsssError(f"unknown dataset {dataset!r}; valid: oxford-pet, stanford-background")
    console.print(f"downloaded to {root}; set it in params.yaml (base.data_root / base.background_root)")


def main() -> None:  # pragma: no cover - console entry point alias
    app()
