"""The ``wsss`` command line: one command per pipeline stage.

Commands stay thin: they load params, call ``wsss.stages.<stage>.run`` and turn user errors into a
one-line message. Heavy libraries (torch, mlflow, great-expectations) are imported inside commands so
``wsss --help`` stays fast.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from wsss.errors import WsssError

app = typer.Typer(
    help="Weakly-supervised semantic segmentation: CAM / ECS / CCAM maps -> CRF pseudo-masks -> U-Net.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
data_app = typer.Typer(help="Download datasets (needs internet).", no_args_is_help=True)
app.add_typer(data_app, name="data")

ParamsOpt = Annotated[
    Path, typer.Option("--params", "-p", help="params.yaml to read.", dir_okay=False)
]
DeviceOpt = Annotated[
    str | None, typer.Option("--device", help="auto, cpu, cuda or cuda:N (overrides base.device).")
]
F = TypeVar("F", bound=Callable[..., Any])


class Labels(str, Enum):
    """Image-level label spaces."""

    species = "species"
    breed = "breed"


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


def _load(params_path: Path) -> tuple[Any, Any]:
    from wsss.config import load_params
    from wsss.paths import Paths

    params = load_params(params_path)
    return params, Paths(params_path.resolve().parent)


@app.command("generate-synthetic")
@_user_errors
def generate_synthetic(params_path: ParamsOpt = Path("params.yaml")) -> None:
    """Write the built-in synthetic pets dataset (the embedded default) to data/raw/synthetic."""
    from wsss.stages import generate

    params, paths = _load(params_path)
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


@app.command("make-cams")
@_user_errors
def make_cams(
    method: Annotated[str, typer.Option(help="Map method: cam, ecs, ccam, ccam-ecs, ensemble.")],
    model: Annotated[
        str | None, typer.Option(help="Model folder under models/ (e.g. classifier-species), or imagenet.")
    ] = None,
    params_path: ParamsOpt = Path("params.yaml"),
    device: DeviceOpt = None,
) -> None:
    """Extract maps for every trainval pet into cams/<method>_<model>/ (resumable) and score them on val."""
    from wsss.stages import make_cams as stage

    params, paths = _load(params_path)
    stage.run(params, paths, method, model, device=device)


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
