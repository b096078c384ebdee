"""The registered U-Net is a self-contained MLflow model: usable outside this repository, pickle-free.

Fast: the architecture read off an smp U-Net rebuilds it; the declared requirements cover every
third-party package the pyfunc's code imports. Slow (a tiny smp U-Net logged and registered as
``models:/wsss-unet@champion``, then loaded by a fresh Python process outside the repository and served
by ``mlflow models serve``): the masks equal ``wsss predict``'s on the same odd-sized image.
"""

from __future__ import annotations

import ast
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import write_params
from wsss import tracking
from wsss.cli import app
from wsss.config import UnetConfig, load_params
from wsss.paths import Paths

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
SMP = UnetConfig(architecture="smp", encoder="resnet18", input_size=64)
SIZE = (37, 53)  # odd height and width: resized to 64 x 64 and back


# --------------------------------------------------------------------------------------------------
# fast


def test_the_architecture_read_off_an_smp_unet_rebuilds_it() -> None:
    from wsss.models.unet import build_unet
    from wsss.serving import unet_format

    model = build_unet(SMP, num_classes=2)
    arch = unet_format.describe(model)
    assert arch == {"architecture": "smp", "encoder": "resnet18", "plain_filters": None, "num_classes": 2}
    rebuilt = unet_format.build({**arch, "input_size": 64}, "test")
    rebuilt.load_state_dict(model.state_dict(), strict=True)


def _local_imports(module: str) -> set[str]:
    """Top-level names ``module`` imports anywhere (functions included), ``wsss.*`` modules resolved."""
    seen, third, todo = set(), set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = REPO / Path(*name.split("."))
        file = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for n in names:
                if n.split(".")[0] != "wsss":
                    third.add(n.split(".")[0])
                    continue
                parts = n.split(".")
                while parts and not ((REPO / Path(*parts)).is_dir() or (REPO / Path(*parts)).with_suffix(".py").is_file()):
                    parts.pop()  # ``from wsss.x import name``: name is not a module
                if parts:
                    todo.append(".".join(parts))
    return third


def test_declared_requirements_cover_every_package_the_pyfunc_imports() -> None:
    from wsss.serving.export import REQUIREMENTS, pip_requirements

    imported = set()
    for module in ("wsss.serving.pyfunc", "wsss.serving.unet_format"):
        imported |= _local_imports(module)
    dists = importlib_metadata.packages_distributions()
    third = {_norm(d) for top in imported if top not in sys.stdlib_module_names for d in dists.get(top, [top])}
    missing = third - _requirement_closure(list(REQUIREMENTS))
    assert not missing, f"the pyfunc imports {sorted(missing)} but export.REQUIREMENTS lacks them"
    assert {"torch", "segmentation-models-pytorch", "safetensors"} <= {r.lower() for r in REQUIREMENTS}
    pins = pip_requirements()
    assert all("==" in p and "+" not in p for p in pins), pins


# --------------------------------------------------------------------------------------------------
# slow: a registered champion


@pytest.fixture(scope="module")
def champion(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A project whose ``models:/wsss-unet@champion`` is a tiny smp U-Net logged by ``train-unet``'s code."""
    import mlflow

    from wsss.models.unet import build_unet
    from wsss.reporting.registry import CHAMPION, register_unet
    from wsss.stages.train_unet import log_mlflow_model
    from wsss.training.checkpoint import save_model

    root = tmp_path_factory.mktemp("champion") / "project"
    (root / "mlruns").mkdir(parents=True)
    write_params(root, {"train_unet": {"architecture": "smp", "encoder": "resnet18", "input_size": 64}})
    uri = f"sqlite:///{root.as_posix()}/mlruns/mlflow.db"
    image = tmp_path_factory.mktemp("images") / "odd pet.png"
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[: SIZE[0], : SIZE[1]]
    blob = ((yy - 18) / 12) ** 2 + ((xx - 26) / 18) ** 2 <= 1
    pixels = np.where(blob[..., None], 210, 40) + rng.integers(0, 30, (*SIZE, 3))
    Image.fromarray(pixels.astype(np.uint8)).save(image)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        params, paths = load_params(root / "params.yaml"), Paths(root)
        torch.manual_seed(0)
        model = build_unet(SMP, num_classes=2).eval()
        meta = {"kind": "unet", "architecture": "smp", "encoder": "resnet18", "input_size": 64, "masks": "gt",
                "num_classes": 2, "plain_filters": list(SMP.plain_filters)}
        save_model(paths.model_dir("unet-best"), model, meta)
        with tracking.stage_run("train-unet", "unet-best", params, paths, sections=("train_unet",),
                                extra_tags={"masks": "gt"}):
            log_mlflow_model(model, 64)
        experiment = mlflow.get_experiment_by_name(tracking.experiment_name(params)).experiment_id
        reg = register_unet(paths, experiment, "unet-best", CHAMPION)
        assert reg.version == "1", reg.note
        result = runner.invoke(app, ["predict", str(image), "--model", "models:/wsss-unet@champion",
                                     "--out", "pred", "--device", "cpu"])
        assert result.exit_code == 0, result.output
        assert "input 64px" in result.output
        result = runner.invoke(app, ["predict", str(image), "--model", f"runs:/{reg.run_id}/model",
                                     "--out", "pred-run", "--device", "cpu"])
        assert result.exit_code == 0, result.output
    with Image.open(root / "pred" / "odd pet_mask.png") as m, Image.open(root / "pred-run" / "odd pet_mask.png") as r:
        mask = np.asarray(m)
        assert (np.asarray(r) == mask).all()  # runs:/ and models:/ name the same model
    outside = tmp_path_factory.mktemp("elsewhere")  # cwd of the fresh processes: no repository, no wsss
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # As in an activated environment: `mlflow models serve` starts `uvicorn` from PATH.
    env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_DISABLE_TELEMETRY="true",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    return {"root": root, "image": image, "predict_mask": mask, "cwd": outside, "env": env}


FRESH = textwrap.dedent("""
    import json, sys
    from importlib import metadata

    # A clean environment: an installed distribution the model's requirements.txt does not pull in
    # cannot be imported (as if it were not installed).
    declared = set(json.loads(sys.argv[4]))
    norm = lambda n: n.lower().replace("_", "-")
    blocked = {top for top, ds in metadata.packages_distributions().items()
               if top != "wsss" and not any(norm(d) in declared for d in ds)}
    refused = set()

    from importlib.machinery import PathFinder

    class DeclaredOnly(PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name.split(".")[0] in blocked:
                refused.add(name.split(".")[0])
                return None  # what the path finder says of a module that is not installed
            return super().find_spec(name, path, target)

    sys.meta_path[:] = [DeclaredOnly if f is PathFinder else f for f in sys.meta_path]
    import mlflow, numpy as np, pandas as pd
    from PIL import Image
    model = mlflow.pyfunc.load_model("models:/wsss-unet@champion")
    data = open(sys.argv[1], "rb").read()
    pixels = np.asarray(Image.open(sys.argv[1]).convert("RGB"))
    out = model.predict(pd.DataFrame({"image": [data, pixels]}))
    np.save(sys.argv[2], np.stack([out["mask"][0], out["mask"][1]]))
    np.save(sys.argv[3], out["pet_probability"][0])
    print(json.dumps({"wsss": sys.modules["wsss"].__file__, "columns": list(out.columns),
                      "dtype": str(out["mask"][0].dtype), "shape": list(out["mask"][0].shape),
                      "refused": sorted(refused), "n_blocked": len(blocked)}))
""")


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def _requirement_closure(requirements: list[str]) -> set[str]:
    """Distribution names ``requirements`` pull in, transitively (extras not taken), lower-cased, ``-`` for ``_``."""
    from packaging.requirements import Requirement

    todo, seen = [Requirement(r).name for r in requirements], set()
    while todo:
        name = _norm(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = importlib_metadata.requires(name) or []
        except importlib_metadata.PackageNotFoundError:
            continue
        for line in reqs:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


@pytest.mark.slow
def test_a_fresh_process_outside_the_repo_loads_the_champion_with_pyfunc(champion: dict, tmp_path: Path) -> None:
    masks, probs = tmp_path / "masks.npy", tmp_path / "probs.npy"
    declared = _requirement_closure((_model_dir(champion) / "requirements.txt").read_text().split())
    proc = subprocess.run([sys.executable, "-c", FRESH, str(champion["image"]), str(masks), str(probs),
                           json.dumps(sorted(declared))],
                          cwd=champion["cwd"], env=champion["env"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["columns"] == ["mask", "pet_probability", "height", "width"]
    assert report["shape"] == list(SIZE) and report["dtype"] == "uint8"
    # wsss came from the model's own code/ folder, not from this checkout
    assert "/artifacts/code/wsss/" in report["wsss"] and not report["wsss"].startswith(str(REPO)), report["wsss"]
    pair = np.load(masks, allow_pickle=False)
    assert (pair[0] == pair[1]).all()  # bytes and an RGB array give the same mask
    assert (pair[0] == champion["predict_mask"]).all()  # the same as `wsss predict` on that image
    prob = np.load(probs, allow_pickle=False)
    assert prob.shape == SIZE and ((prob >= 0.5) == pair[0].astype(bool)).all()
    assert report["n_blocked"] > 0  # the venv holds undeclared distributions (dvc, optuna, ...): all refused
    print("refused imports of undeclared distributions:", report["refused"])


def _model_dir(champion: dict) -> Path:
    found = list((champion["root"] / "mlruns").rglob("MLmodel"))
    assert len(found) == 1, found
    return found[0].parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_mask(champion: dict, tmp_path: Path) -> None:
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", "models:/wsss-unet@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        cwd=champion["cwd"], env=champion["env"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow models serve did not answer /ping within 240 s"
            time.sleep(1)
        image = base64.b64encode(champion["image"].read_bytes()).decode("ascii")
        status, body = _post(f"{base}/invocations", {"dataframe_split": {"columns": ["image"], "data": [[image]]},
                                                     "params": {"threshold": 0.5}})
        assert status == 200, body
        [row] = body["predictions"]
        mask = np.asarray(row["mask"], dtype=np.uint8)
        assert mask.shape == SIZE and (row["height"], row["width"]) == SIZE
        assert (mask == champion["predict_mask"]).all()
        assert np.asarray(row["pet_probability"]).shape == SIZE
        # a payload that is not an image: a client error naming the row, and the server goes on
        junk = base64.b64encode(b"not an image").decode("ascii")
        status, body = _post(f"{base}/invocations", {"dataframe_split": {"columns": ["image"], "data": [[junk]]}})
        assert status == 400 and "row 0" in json.dumps(body), body
        # a lower threshold can only add pet pixels
        status, body = _post(f"{base}/invocations", {"dataframe_split": {"columns": ["image"], "data": [[image]]},
                                                     "params": {"threshold": 0.05}})
        assert status == 200 and (np.asarray(body["predictions"][0]["mask"]) >= mask).all()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers, by the PID we started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    assert proc.returncode is not None
