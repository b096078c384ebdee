"""``dvc repro`` of the whole pipeline on a tiny profile, in a fresh copy of the repository.

What a new user relies on: every stage's outputs exist, the report has every table, a second
``dvc repro`` does nothing, and a changed CRF parameter reruns only stages below it. Slow (a few
minutes: ~40 processes), so it is out of the default run; ``.ci/run`` runs it on its own.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

# Merged onto the repository's params.yaml (section by section): the same pipeline, tiny sizes.
TINY = {
    "synthetic": {"n_trainval": 32, "n_test": 8, "n_background": 8, "image_size": 64, "breeds_per_species": 2},
    "prepare": {"max_side": 64, "val_fraction": 0.25},
    "validate": {"min_images_per_class": 1},
    "pretrain": {"input_size": 32, "epochs": 1, "batch_size": 8, "knn_k": 3},
    "train_classifier": {"input_size": 32, "epochs": 1, "batch_size": 8},
    "train_ccam": {"resize": 72, "input_size": 64, "epochs": 1, "batch_size": 8, "per_breed_epochs": 1,
                   "breeds_per_batch": 2, "polarity_images": 8},
    "make_cams": {"scales": [1.0], "batch_size": 8, "shard_size": 16},
    "tune": {"trials": 2, "n_startup_trials": 1},
    "tune_ensemble": {"trials": 2, "n_startup_trials": 1},
    "train_unet": {"input_size": 32, "steps": 3, "batch_size": 8},
    "tracking": {"system_metrics": False},
}
REPORT_SECTIONS = (
    "## Label-free baselines", "## Label-free priors as maps", "## Table 1", "## Table 2", "## Ensemble of maps", "## Table 3",
    "## U-Nets on the official test split", "## All map variants", "## All pseudo-mask variants",
    "## Model registry", "## Figures",
)
# Stages that may rerun when a `pseudo.crf` parameter changes: the refiner's stages and what they feed
# (the self-training rounds refine with the same refiner).
BELOW_CRF = re.compile(r"^(tune-crf@.*|make-pseudo@.*|train-unet-best|train-unet-same|evaluate@(same-)?best|"
                       r"self-train@.*|evaluate-selftrain@.*|self-train-champion|report)$")


def _copy_worktree(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files (what a commit of the working tree would hold), as a repo."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)


def _merge_params(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    for section, values in TINY.items():
        data[section].update(values)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _dvc(root: Path, *args: str) -> str:
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the clone's own mlruns/
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run([str(bin_dir / "dvc"), *args], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def test_dvc_repro_runs_every_stage_then_is_a_noop_and_reruns_only_below_a_change(tmp_path: Path) -> None:
    root = tmp_path / "clone"
    root.mkdir()
    _copy_worktree(root)
    _merge_params(root / "params.yaml")

    out = _dvc(root, "repro")
    stages = set(_dvc(root, "stage", "list", "--name-only").split())
    assert _ran(out) == stages, f"not run: {sorted(stages - _ran(out))}"

    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(lock) == stages
    missing = [o["path"] for s in lock.values() for o in s.get("outs", []) if not (root / o["path"]).exists()]
    assert not missing, missing
    report = (root / "reports" / "report.md").read_text()
    assert all(section in report for section in REPORT_SECTIONS), [s for s in REPORT_SECTIONS if s not in report]
    assert list((root / "reports" / "figures").glob("*.png"))

    assert _ran(_dvc(root, "repro")) == set()  # a no-op

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["pseudo"]["crf"]["bilateral_srgb"] += 1.0
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rerun = _ran(_dvc(root, "repro"))
    assert {s for s in stages if s.startswith(("tune-crf@", "make-pseudo@"))} <= rerun
    assert all(BELOW_CRF.match(s) for s in rerun), sorted(rerun)
