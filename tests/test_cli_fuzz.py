"""Hostile inputs to every CLI command: one error line naming the file or option, the documented exit
code, no traceback, nothing changed outside the command's own outputs.

Each :class:`Case` is one command line on a copy of a base project, after an optional ``setup`` that
damages something (params file, tracking store, an upstream output, a name given on the command line).
For every case:

* no output contains ``Traceback``;
* the exit code is the documented one (:mod:`wsss.errors`, README "Reliability": 1 unusable data or
  missing input, 2 invalid params or option, 3 ``predict`` skipped inputs, 4 tracking unusable);
* a failure prints exactly one ``error:`` line, the last line of the output, holding every word of
  ``Case.words`` (the file or option and the reason); a click usage error (exit 2) names the option;
* every file under the case's folder (the project *and* a sibling ``outside/`` folder that paths and
  symlinks point into) is unchanged except under the command's own outputs (:data:`OWNS`).

Two bases: ``empty`` (params.yaml and a created MLflow store; the fast suite) and ``trained`` (a tiny
project with prepared data, a classifier, its CAMs, pseudo-masks and a U-Net; built once per module,
the cases on it are ``slow``). ``test_case_count`` prints the size of the matrix (``FUZZ CASES``).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import write_params
from tests.test_pipeline import TINY_MODELS
from wsss.cli import app

runner = CliRunner()
CAM = "cam_classifier-species"
UNET = f"unet-{CAM}"
EMPTY_CASE_LIMIT_S = 60.0  # an error on an empty project needs imports, no work (the first case pays them)
OUTSIDE = "outside"  # a sibling of the project with a file that no command may touch

# What each command may change (paths relative to the project; prefixes). The MLflow store is everyone's.
OWNS: dict[str, tuple[str, ...]] = {
    "generate-synthetic": ("data/raw/",),
    "prepare": ("data/prepared/", "reports/prepare.json"),
    "validate": ("reports/validation",),
    "pretrain": ("models/pretrain-", ".wsss/state/pretrain", "reports/training/pretrain-", "reports/training/curves/pretrain-"),
    "train-classifier": ("models/classifier-", ".wsss/state/train-classifier", "reports/training/classifier-", "reports/training/curves/classifier-"),
    "train-ccam": ("models/ccam-", ".wsss/state/train-ccam", "reports/training/ccam-", "reports/training/curves/ccam-"),
    "make-cams": ("cams/", "reports/cams/"),
    "tune": ("studies/", "reports/crf/"),
    "make-pseudo": ("masks/", "reports/pseudo/"),
    "train-unet": ("models/unet-", ".wsss/state/train-unet", "reports/training/unet-", "reports/training/curves/unet-"),
    "evaluate": ("reports/eval/", "reports/eval-pseudo/"),
    "report": ("reports/report.md", "reports/figures/"),
    "self-train": ("masks/selftrain-r", "models/unet-selftrain-r", ".wsss/state/train-unet/unet-selftrain-r",
                   "reports/selftrain/", "reports/training/unet-selftrain-r", "reports/training/curves/unet-selftrain-r"),
    "self-train-champion": ("reports/self-training.json",),
    "predict": ("predictions/",),
    "runs": (),
}
ALWAYS_OWNED = ("mlruns/",)

# A valid command line for each command (the bad input then comes from the case's setup or extra args).
COMMANDS: dict[str, list[str]] = {
    "generate-synthetic": ["generate-synthetic"],
    "prepare": ["prepare"],
    "validate": ["validate"],
    "pretrain": ["pretrain"],
    "train-classifier": ["train-classifier", "--labels", "species"],
    "train-ccam": ["train-ccam", "--init", "none"],
    "make-cams": ["make-cams", "--method", "cam", "--model", "classifier-species"],
    "tune-crf": ["tune", "crf", "--method", CAM, "--trials", "1"],
    "make-pseudo": ["make-pseudo", "--method", CAM, "--no-tuned"],
    "train-unet": ["train-unet", "--masks", CAM],
    "evaluate-model": ["evaluate", "--model", UNET],
    "evaluate-baselines": ["evaluate", "--baselines"],
    "evaluate-pseudo": ["evaluate", "--pseudo", CAM],
    "report": ["report", "--no-register"],
    "self-train": ["self-train", "--round", "1"],
    "self-train-champion": ["self-train-champion"],
    "runs": ["runs"],
    "predict": ["predict", "in.png"],
}
TRACKED = [c for c in COMMANDS if c not in ("generate-synthetic", "predict")]


@dataclass(frozen=True)
class Case:
    """One hostile command line: ``args`` after ``setup(root)``; the documented outcome."""

    id: str
    args: list[str]
    exit: int
    words: tuple[str, ...] = ()
    setup: Callable[[Path], None] | None = None
    base: str = "empty"  # or "trained"
    usage: bool = False  # a click usage error (Usage: ... Error: ...) rather than our error line
    env: tuple[tuple[str, str], ...] = ()
    check: Callable[[Path], None] | None = None  # an extra assertion on the project afterwards
    xfail: str | None = None  # a known defect outside this branch's reach (strict: fails once fixed)

    @property
    def owner(self) -> str:
        return self.args[0]


# --------------------------------------------------------------------------------------------------
# damage helpers (each replaces files rather than editing them: the bases are hard-linked copies)


def _replace(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    path.write_bytes(data)


def _truncate(path: Path) -> None:
    _replace(path, path.read_bytes()[: max(1, path.stat().st_size // 3)])


class _Evil:
    """A pickle that creates ``<cwd>/PWNED`` when unpickled."""

    def __reduce__(self) -> tuple:
        return (open, ("PWNED", "w"))


def _evil_pickle(path: Path) -> None:
    import io
    import zipfile

    # A torch-style zip archive whose data.pkl runs code: a full unpickler would create PWNED.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(_Evil(), protocol=2))
        z.writestr("archive/version", "3\n")
    _replace(path, buf.getvalue())


def _params(text: bytes) -> Callable[[Path], None]:
    return lambda root: _replace(root / "params.yaml", text)


def _merge_params(section: str, values: dict) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        data = yaml.safe_load((root / "params.yaml").read_text())
        data.setdefault(section, {}).update(values)
        _replace(root / "params.yaml", yaml.safe_dump(data).encode())

    return setup


def _no_pwned(root: Path) -> None:
    assert not (root / "PWNED").exists() and not (root.parent / "PWNED").exists(), "a pickle was executed"


def _fake_unet(root: Path) -> None:
    """An input image for predict (in.png)."""
    from PIL import Image

    Image.new("RGB", (20, 16), (120, 30, 200)).save(root / "in.png")


# --------------------------------------------------------------------------------------------------
# the matrix

PARAMS_DAMAGE: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "params-missing": (lambda root: (root / "params.yaml").unlink(), ("params.yaml", "not found")),
    "params-not-utf8": (_params(b"base:\n  seed: 0\n  note: caf\xe9\n"), ("params.yaml", "utf-8", "offset")),
    "params-duplicate-key": (_params(b"base:\n  seed: 0\n  seed: 1\n"), ("params.yaml", "seed")),
    "params-bad-yaml": (_params(b"base: [seed: 0\nprepare: {\n"), ("params.yaml", "yaml")),
    "params-bad-value": (_merge_params("base", {"seed": "abc"}), ("params.yaml", "seed")),
    "params-unknown-key": (_merge_params("base", {"sede": 1}), ("params.yaml", "sede")),
    "params-not-mapping": (_params(b"- a\n- b\n"), ("params.yaml", "mapping")),
    "params-binary": (_params(bytes(range(256))), ("params.yaml",)),
}

TRACKING_DAMAGE: dict[str, tuple[Callable[[Path], None] | None, tuple[tuple[str, str], ...], tuple[str, ...]]] = {
    "store-corrupt": (lambda root: _replace(root / "mlruns" / "mlflow.db", b"this is not a database" * 100), (),
                      ("mlflow", "mlflow.db")),
    "store-unknown-scheme": (None, (("MLFLOW_TRACKING_URI", "bogus://nowhere/x"),), ("bogus", "scheme")),
    "store-unreachable": (None, (("MLFLOW_TRACKING_URI", "http://127.0.0.1:9"), ("WSSS_TRACKING_TIMEOUT", "1")),
                          ("127.0.0.1:9",)),
    "store-is-a-folder": (lambda root: (root / "mlruns" / "mlflow.db").unlink() or (root / "mlruns" / "mlflow.db").mkdir(),
                          (), ("mlflow.db",)),
    "store-truncated": (lambda root: _truncate(root / "mlruns" / "mlflow.db"), (), ("mlflow.db",)),
}


def _outside_abs(root: Path) -> str:
    return str(root.parent / OUTSIDE)


NAME_OPTIONS: list[tuple[str, list[str], str]] = [
    # (id, command line up to the name, option named in the error)
    ("make-pseudo", ["make-pseudo", "--method"], "--method"),
    ("tune-crf", ["tune", "crf", "--method"], "--method"),
    ("evaluate-pseudo", ["evaluate", "--pseudo"], "--pseudo"),
    ("evaluate-model", ["evaluate", "--model"], "--model"),
    ("train-unet", ["train-unet", "--masks"], "--masks"),
    ("make-cams", ["make-cams", "--method", "cam", "--model"], "--model"),
    ("make-cams-ensemble", ["make-cams", "--method", "ensemble", "--model"], "--model"),
    ("train-ccam", ["train-ccam", "--init"], "--init"),
    ("pretrain", ["pretrain", "--name"], "--name"),
]
BAD_NAMES = {
    "dotdot": f"../cams/{CAM}",
    "dotdot-outside": f"../../{OUTSIDE}",
    "absolute": "/tmp",
    "slash": "a/b",
    "empty": "",
    "dot": ".",
}


def _cases() -> list[Case]:
    cases: list[Case] = []
    for cmd, args in COMMANDS.items():
        if cmd == "predict":  # predict reads no params (its --params only locates the project)
            continue
        for dmg, (setup, words) in PARAMS_DAMAGE.items():
            cases.append(Case(f"{cmd}/{dmg}", args, 2, words, setup))
    for cmd in TRACKED:
        for dmg, (setup, env, words) in TRACKING_DAMAGE.items():
            cases.append(Case(f"{cmd}/{dmg}", COMMANDS[cmd], 4, words, setup, env=env))
    for opt_id, prefix, option in NAME_OPTIONS:
        for name_id, name in BAD_NAMES.items():
            init = prefix[-1] == "--init"
            value = f"classifier:{name}" if init and name_id != "empty" else name
            if opt_id == "pretrain" and name_id == "empty":
                continue  # --name "" means the default (params), not a bad name
            cases.append(Case(f"{opt_id}/name-{name_id}", [*prefix, value], 2, (option,)))
    cases += _option_cases() + _missing_input_cases() + _trained_cases()
    return cases


def _option_cases() -> list[Case]:
    """Bad option values: click refuses some (usage error, exit 2), our parsers the rest (exit 2)."""
    u = dict(usage=True)
    return [
        Case("train-classifier/bad-labels", ["train-classifier", "--labels", "species2"], 2, ("--labels",), **u),
        Case("make-cams/bad-method", ["make-cams", "--method", "gradcam"], 2, ("--method",), **u),
        Case("make-cams/no-method", ["make-cams"], 2, ("--method",), **u),
        Case("tune-crf/zero-trials", ["tune", "crf", "--method", CAM, "--trials", "0"], 2, ("--trials",), **u),
        Case("tune-crf/negative-timeout", ["tune", "crf", "--method", CAM, "--timeout", "-1"], 2, ("--timeout",), **u),
        Case("tune-crf/trials-not-int", ["tune", "crf", "--method", CAM, "--trials", "many"], 2, ("--trials",), **u),
        Case("predict/threshold-not-float", ["predict", "in.png", "--threshold", "half"], 2, ("--threshold",), **u),
        Case("runs/unknown-option", ["runs", "--bogus"], 2, ("--bogus",), **u),
        Case("make-cams/bad-init-kind", ["train-ccam", "--init", "resnet"], 2, ("--init",)),
        Case("predict/threshold-out-of-range", ["predict", "in.png", "--threshold", "1.5"], 2, ("--threshold",)),
        Case("predict/out-is-a-file", ["predict", "in.png", "--out", "params.yaml"], 2, ("--out",), **u),
        Case("evaluate/nothing-to-score", ["evaluate"], 1, ("--model", "--baselines", "--pseudo")),
        Case("self-train/round-out-of-range", ["self-train", "--round", "7"], 2, ("--round 7", "self_train.rounds")),
        Case("self-train/no-round-0-unet", COMMANDS["self-train"], 1, ("models/unet-best/model.pt",)),
        Case("self-train-champion/no-rounds", COMMANDS["self-train-champion"], 1, ("reports/selftrain/r1.json",)),
        Case("runs/path-as-stage-filter", ["runs", "--stage", "../x"], 0),  # a filter: matches nothing, writes nothing
    ]


def _missing_input_cases() -> list[Case]:
    """Upstream outputs that do not exist (an empty project): exit 1 naming what is missing."""
    return [
        Case("prepare/no-raw-data", ["prepare"], 1, ("data/raw/synthetic",)),
        Case("validate/no-manifest", ["validate"], 1, ("manifest.parquet",)),
        Case("pretrain/no-manifest", ["pretrain"], 1, ("manifest.parquet",)),
        Case("train-classifier/no-manifest", COMMANDS["train-classifier"], 1, ("manifest.parquet",)),
        Case("train-ccam/no-manifest", COMMANDS["train-ccam"], 1, ("manifest.parquet",)),
        Case("make-cams/no-manifest", COMMANDS["make-cams"], 1, ("manifest.parquet",)),
        Case("tune-crf/no-maps", COMMANDS["tune-crf"], 1, (CAM,)),
        Case("make-pseudo/no-maps", COMMANDS["make-pseudo"], 1, (CAM,)),
        Case("train-unet/no-manifest", COMMANDS["train-unet"], 1, ("manifest.parquet",)),
        Case("evaluate-model/no-manifest", COMMANDS["evaluate-model"], 1, ("manifest.parquet",)),
        Case("evaluate-baselines/no-manifest", COMMANDS["evaluate-baselines"], 1, ("manifest.parquet",)),
        Case("evaluate-pseudo/no-manifest", COMMANDS["evaluate-pseudo"], 1, ("manifest.parquet",)),
        Case("predict/no-model", ["predict", "in.png"], 1, ("unet-best",), _fake_unet),
        Case("predict/no-such-image", ["predict", "nope.png", "--model", "models/unet-x"], 1, ("unet-x",)),
    ]


def _trained_cases() -> list[Case]:
    """Damaged upstream outputs of a real (tiny) trained project; ``slow``."""
    t = dict(base="trained")
    shard = f"cams/{CAM}/shard-00000.npz"
    cls_pt, unet_pt = "models/classifier-species/model.pt", f"models/{UNET}/model.pt"

    def trunc(rel: str) -> Callable[[Path], None]:
        return lambda root: _truncate(root / rel)

    def garbage(rel: str) -> Callable[[Path], None]:
        return lambda root: _replace(root / rel, b"\x00garbage" * 64)

    def evil(rel: str) -> Callable[[Path], None]:
        return lambda root: _evil_pickle(root / rel)

    def both(*fs: Callable[[Path], None]) -> Callable[[Path], None]:
        def setup(root: Path) -> None:
            for f in fs:
                f(root)
        return setup

    def link(rel: str, target: Callable[[Path], Path]) -> Callable[[Path], None]:
        def setup(root: Path) -> None:
            p = root / rel
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.symlink_to(target(root), target_is_directory=True)
        return setup

    def shard_repaired(root: Path) -> None:
        from wsss.cams import read_shard

        read_shard(root / shard)  # loads completely again

    def rm(rel: str) -> Callable[[Path], None]:
        return lambda root: shutil.rmtree(root / rel)

    predict = ["predict", "in.png", "--model", f"models/{UNET}"]
    outside = lambda root: root.parent / OUTSIDE  # noqa: E731
    return [
        Case("train-classifier/bad-device", [*COMMANDS["train-classifier"], "--device", "tpu"], 2, ("tpu",), **t),
        Case("train-unet/bad-device", [*COMMANDS["train-unet"], "--device", "cuda:x"], 2, ("cuda:x",), **t),
        Case("make-cams/absent-device", [*COMMANDS["make-cams"], "--device", "cuda:7"], 2, ("cuda:7",),
             rm(f"cams/{CAM}"), **t),
        Case("tune-crf/unknown-storage-scheme", [*COMMANDS["tune-crf"], "--storage", "bogus://x"], 2,
             ("storage", "bogus://x"), **t),
        Case("tune-crf/storage-missing-driver", [*COMMANDS["tune-crf"], "--storage",
             "mysql+nodriver://u:secret@127.0.0.1/x"], 2, ("storage", "***"), **t),
        Case("make-cams/no-model", COMMANDS["make-cams"], 1, ("classifier-species",),
             rm("models/classifier-species"), **t),
        Case("train-ccam/no-init-model", ["train-ccam", "--init", "classifier:species"], 1, ("classifier-species",),
             rm("models/classifier-species"), **t),
        Case("make-pseudo/maps-removed", COMMANDS["make-pseudo"], 1, (CAM,), rm(f"cams/{CAM}"), **t),
        Case("train-unet/no-masks", COMMANDS["train-unet"], 1, (CAM,), rm(f"masks/{CAM}"), **t),
        Case("evaluate-model/no-model", COMMANDS["evaluate-model"], 1, (UNET,), rm(f"models/{UNET}"), **t),
        Case("evaluate-pseudo/no-classifier", COMMANDS["evaluate-pseudo"], 1, ("classifier-species",),
             rm("models/classifier-species"), **t),
        Case("make-pseudo/truncated-shard", COMMANDS["make-pseudo"], 1, ("shard-00000.npz",), trunc(shard), **t),
        Case("tune-crf/truncated-shard", COMMANDS["tune-crf"], 1, ("shard-00000.npz",), trunc(shard), **t),
        Case("evaluate-pseudo/truncated-classifier", COMMANDS["evaluate-pseudo"], 1, ("model.pt",), trunc(cls_pt), **t),
        Case("make-cams/corrupt-shard-index", COMMANDS["make-cams"], 0, (),
             lambda root: _replace(root / "cams" / CAM / "_shards.json", b"{oops"), **t),
        Case("make-pseudo/corrupt-fingerprint", COMMANDS["make-pseudo"], 1, ("_fingerprint.json",),
             lambda root: _replace(root / "masks" / CAM / "_fingerprint.json", b"\xff\xfe"), **t),
        Case("make-cams/truncated-shard-recomputed", COMMANDS["make-cams"], 0, (), trunc(shard), check=shard_repaired, **t),
        Case("make-cams/garbage-model", COMMANDS["make-cams"], 1, ("model.pt",), garbage(cls_pt), **t),
        Case("make-cams/evil-model", COMMANDS["make-cams"], 1, ("model.pt",), evil(cls_pt), check=_no_pwned, **t),
        Case("make-cams/truncated-model", COMMANDS["make-cams"], 1, ("model.pt",), trunc(cls_pt), **t),
        Case("make-cams/corrupt-meta", COMMANDS["make-cams"], 1, ("meta.json",),
             garbage("models/classifier-species/meta.json"), **t),
        Case("train-ccam/evil-init", ["train-ccam", "--init", "classifier:species"], 1, ("model.pt",), evil(cls_pt),
             check=_no_pwned, **t),
        Case("evaluate-model/garbage-model", COMMANDS["evaluate-model"], 1, ("model.pt",), garbage(unet_pt), **t),
        Case("evaluate-model/evil-model", COMMANDS["evaluate-model"], 1, ("model.pt",), evil(unet_pt),
             check=_no_pwned, **t),
        Case("predict/garbage-model", predict, 1, ("model.pt",), both(_fake_unet, garbage(unet_pt)), **t),
        Case("predict/evil-model", predict, 1, ("model.pt",), both(_fake_unet, evil(unet_pt)), check=_no_pwned, **t),
        Case("predict/corrupt-image", predict, 3, ("in.png",), lambda root: _replace(root / "in.png", b"\x89PNG junk"), **t),
        Case("predict/symlink-loop", [*predict[:1], "loop.png", *predict[2:]], 3, ("loop.png",),
             lambda root: (root / "loop.png").symlink_to(root / "loop.png"), **t),
        Case("train-classifier/truncated-manifest", COMMANDS["train-classifier"], 1, ("manifest.parquet",),
             trunc("data/prepared/manifest.parquet"), **t),
        Case("validate/truncated-manifest", COMMANDS["validate"], 1, ("manifest.parquet",),
             trunc("data/prepared/manifest.parquet"), **t),
        Case("train-unet/truncated-train-mask", COMMANDS["train-unet"], 1, (CAM, "mask"),
             lambda root: _truncate(_mask_of(root, "train")), **t),
        Case("train-unet/truncated-val-mask", COMMANDS["train-unet"], 1, (CAM, "mask"),
             lambda root: _truncate(_mask_of(root, "val")), **t),
        # report reads whatever reports exist: an unreadable one is skipped with a warning naming it.
        Case("report/corrupt-eval-json", COMMANDS["report"], 0, (),
             lambda root: _replace(root / "reports" / "eval" / f"{CAM}.json", b"{not json"), **t),
        Case("make-pseudo/masks-link-to-cams", COMMANDS["make-pseudo"], 1, ("symlink",),
             link(f"masks/{CAM}", lambda root: root / "cams" / CAM), **t),
        Case("make-cams/cams-link-outside", COMMANDS["make-cams"], 1, ("symlink",),
             link(f"cams/{CAM}", outside), **t),
        Case("make-pseudo/masks-link-outside", COMMANDS["make-pseudo"], 1, ("symlink",),
             link(f"masks/{CAM}", outside), **t),
        # Writing new files through an output folder the user linked elsewhere is allowed; nothing that
        # was there may be deleted or changed.
        Case("tune-crf/studies-link-outside", COMMANDS["tune-crf"], 0, (),
             link(f"studies/{CAM}", outside), **t),
        Case("train-unet/model-link-outside", COMMANDS["train-unet"], 0, (),
             link(f"models/{UNET}", outside), **t),
        Case("predict/out-link-outside", [*predict, "--out", "predictions"], 0, (),
             both(_fake_unet, link("predictions", outside)), **t),
    ]


def _mask_of(root: Path, split: str) -> Path:
    """The pseudo-mask of the first ``split`` image of the trained project."""
    from wsss.data.manifest import load_manifest

    df = load_manifest(root / "data" / "prepared" / "manifest.parquet")
    ids = sorted(df[(df["split"] == split) & ~df["is_background"]]["id"])
    return root / "masks" / CAM / f"{ids[0]}.png"


CASES = _cases()


# --------------------------------------------------------------------------------------------------
# bases and snapshots


def _copy_base(base: Path, dest: Path) -> Path:
    """``base``'s case folder copied: files hard-linked (cases replace, never edit, files), the SQLite store
    copied (SQLite writes in place)."""

    def copy(src: str, dst: str) -> None:
        if "mlruns" in Path(src).parts or src.endswith(".db"):
            shutil.copy2(src, dst)
        else:
            os.link(src, dst)

    shutil.copytree(base, dest, symlinks=True, copy_function=copy)
    return dest / "project"


def _new_case_folder(folder: Path) -> Path:
    root = folder / "project"
    root.mkdir(parents=True)
    (folder / OUTSIDE).mkdir()
    (folder / OUTSIDE / "precious.txt").write_text("not yours\n")
    (root / "mlruns").mkdir()
    return root


@pytest.fixture(scope="module")
def empty_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz-empty") / "case"
    root = _new_case_folder(folder)
    write_params(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root.as_posix()}/mlruns/mlflow.db")
        result = runner.invoke(app, ["runs"])  # creates the store once (a few seconds of migrations)
        assert result.exit_code == 0 and (root / "mlruns" / "mlflow.db").is_file(), result.output
    return folder


TRAINED_PARAMS = {
    **TINY_MODELS, "base": {"num_workers": 0}, "pseudo": {"workers": 1},
    "train_classifier": {**TINY_MODELS["train_classifier"], "epochs": 1},
    "train_unet": {**TINY_MODELS["train_unet"], "steps": 2},
    "tune": {"trials": 1, "n_startup_trials": 1},
}


@pytest.fixture(scope="module")
def trained_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz-trained") / "case"
    root = _new_case_folder(folder)
    write_params(root, TRAINED_PARAMS)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root.as_posix()}/mlruns/mlflow.db")
        for command in (["generate-synthetic"], ["prepare"], COMMANDS["train-classifier"], COMMANDS["make-cams"],
                        COMMANDS["make-pseudo"], COMMANDS["train-unet"], COMMANDS["evaluate-model"]):
            result = runner.invoke(app, command)
            assert result.exit_code == 0, f"{command}: {result.output}"
    return folder


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder``: symlink targets, folders, and files by content (large ones by
    inode, size and mtime: a replaced file gets a new inode)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(folder).as_posix()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                st = p.stat()
                if st.st_size > 1 << 18:
                    out[rel] = ("big", st.st_ino, st.st_size, st.st_mtime_ns)
                else:
                    out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def changed_outside(before: dict, after: dict, owned: tuple[str, ...]) -> list[str]:
    """Entries added, removed or changed that are not under one of ``owned`` (``project/``-relative).

    Under ``outside/`` only entries that existed before count: new files there come through an output
    folder the case linked to it (the user's choice of where outputs go).
    """
    prefixes = tuple(f"project/{o}" for o in (*owned, *ALWAYS_OWNED))
    changed = [k for k in before.keys() | after.keys() if before.get(k) != after.get(k)
               and not (k.startswith(f"{OUTSIDE}/") and k not in before)]
    # A folder an owned output lives in may appear (e.g. reports/ for reports/eval/).
    return sorted(k for k in changed
                  if not k.startswith(prefixes) and not any(p.startswith(f"{k}/") for p in prefixes)
                  and not (after.get(k) == ("dir",) and before.get(k) is None and _only_owned_below(k, after, prefixes)))


def _only_owned_below(folder: str, after: dict, prefixes: tuple[str, ...]) -> bool:
    return all(k.startswith(prefixes) for k in after if k.startswith(f"{folder}/"))


# --------------------------------------------------------------------------------------------------
# the checks


def outcome_problems(case: Case, exit_code: int, output: str) -> list[str]:
    """What is wrong with one case's outcome (empty: handled as documented)."""
    problems = []
    if "Traceback" in output:
        problems.append("traceback in the output")
    if exit_code != case.exit:
        problems.append(f"exit {exit_code}, documented {case.exit}")
    if case.exit == 0:
        return problems
    lines = [ln.rstrip() for ln in output.splitlines() if ln.strip()]
    if case.usage:
        if not any(w.lower() in output.lower() for w in case.words):
            problems.append(f"usage error does not name {case.words}")
        return problems
    errors = [ln for ln in lines if ln.startswith("error:")]
    if case.exit == 3:  # predict: one line per skipped input, a summary after them
        if not any(all(w.lower() in e.lower() for w in case.words) for e in errors):
            problems.append(f"no error line names {case.words}")
        return problems
    if len(errors) != 1:
        problems.append(f"{len(errors)} 'error:' lines")
    elif lines[-1] != errors[0]:
        problems.append("the error is not one line (more output after it)")
    elif missing := [w for w in case.words if w.lower() not in errors[0].lower()]:
        problems.append(f"error line does not name {missing}")
    return problems


def run_case(case: Case, base: Path, work: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], str]:
    """Run one case on a copy of ``base``; (problems, output)."""
    root = _copy_base(base, work)
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root.as_posix()}/mlruns/mlflow.db")
    monkeypatch.setenv("COLUMNS", "400")  # one error line stays one line however long
    for key, value in case.env:
        monkeypatch.setenv(key, value)
    if case.setup:
        case.setup(root)
    before = snapshot(work)
    start = time.monotonic()
    result = runner.invoke(app, case.args)
    seconds = time.monotonic() - start
    output = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        output += "\nTraceback (escaped the CLI):\n" + "".join(traceback.format_exception(result.exception))
    problems = outcome_problems(case, result.exit_code, output)
    if case.base == "empty" and seconds > EMPTY_CASE_LIMIT_S:
        problems.append(f"took {seconds:.0f}s to fail (a hang or retry loop)")
    owned = OWNS[case.owner]
    if case.owner == "predict" and "--out" in case.args:
        owned = (case.args[case.args.index("--out") + 1] + "/",)
    if stray := changed_outside(before, snapshot(work), owned):
        problems.append(f"changed outside its outputs: {stray[:5]}")
    if case.check:
        try:
            case.check(root)
        except AssertionError as exc:
            problems.append(str(exc))
    return problems, output


def _param(case: Case) -> object:
    marks = [pytest.mark.slow] if case.base == "trained" else []
    if case.xfail:
        marks.append(pytest.mark.xfail(strict=True, reason=case.xfail))
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_hostile_input(case: Case, request: pytest.FixtureRequest, tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    base = request.getfixturevalue(f"{case.base}_base")
    problems, output = run_case(case, base, tmp_path / "case", monkeypatch)
    assert not problems, f"wsss {' '.join(case.args)}: {problems}\n{output[-3000:]}"


def test_case_count() -> None:
    """The matrix covers every command, and its size is printed for the record."""
    fast = sum(c.base == "empty" for c in CASES)
    print(f"FUZZ CASES {len(CASES)} ({fast} fast, {len(CASES) - fast} slow)")
    covered = {" ".join(c.args[:2]) if c.args[0] == "tune" else c.args[0] for c in CASES}
    commands = {"generate-synthetic", "prepare", "validate", "pretrain", "train-classifier", "train-ccam",
                "make-cams", "tune crf", "make-pseudo", "train-unet", "evaluate", "report", "runs", "predict"}
    assert commands <= covered, commands - covered
    assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"
