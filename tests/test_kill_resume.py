"""Kill and resume: every long stage survives SIGKILL at any moment and then finishes with the outputs
of an uninterrupted run, and no partial file is ever visible under an output path.

Each stage runs as ``python -m wsss ...`` (see :mod:`tests.killer`) on a tiny synthetic project with
one CPU thread. For every case a fresh copy of a prepared base project is used:

* the *reference*: the stage run once, uninterrupted (its duration is T);
* the *victim*: the same stage killed with SIGKILL (the whole process group, pool workers included),
  rerun — in the slow sweep killed again for some seeds — and finally run to completion.

Then the victim's outputs must equal the reference's:

* ``make-cams``: every shard's arrays bit-identical (``np.array_equal`` per key), ``_done.json`` and the
  report (timing keys removed) equal;
* ``make-pseudo``: every mask PNG byte-identical, report equal without timing keys and ``n_refined``
  (which counts masks refined by the last invocation);
* ``train-classifier``, ``train-ccam``, ``train-unet``: **bitwise** equal weights (``meta.json`` holds
  the SHA-256 of the ``state_dict``) and equal final metrics. This holds on CPU with one thread and
  ``base.num_workers: 0``: the checkpoint restores model, optimizer, scheduler, global RNGs and the data
  loader's generator (with worker processes, their RNG streams cannot be checkpointed);
* ``tune crf``: a study is not replayed after a kill (each invocation adds ``--trials`` trials, with
  the random stream continued), so the contract is "no lost work": trials finished before the kill are
  still in the study, the rerun adds its own, and ``reports/crf/<variant>.yaml`` is the best completed
  trial of the whole study. A separate slow test kills it while a trial is RUNNING (seen in the
  study's database): the rerun marks that trial FAIL and leaves none RUNNING;
* ``evaluate``: the test scores equal (timing keys removed);
* ``report`` (``--no-register``): ``report.md`` and every figure byte-identical.

During every run a watcher polls the output folders (and once more after the kill): no visible
``*.tmp`` name, and every ``.npz .png .json .pt .yaml .parquet .csv .md`` present loads completely.
After the final run no hidden temporary file of a killed writer is left either.

The default run kills each of make-cams, make-pseudo, train-classifier, train-unet and report once, at a
moment chosen by an event (first shard / first masks / first checkpoint / first figure written), so resume
is really exercised (train-unet: a schedule in optimiser steps whose last epoch is partial, resumed to
exactly its steps). The ``slow`` sweep kills all eight stages at random moments (uniform in [0, T],
:data:`SEEDS`, the last one killed twice).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import write_params
from tests.killer import Outcome, digest_tree, hidden_temps, json_without, npz_equal, run_stage
from tests.test_pipeline import TINY_MODELS
from wsss.cli import app
from wsss.tuning import UNCLAIMED_GRACE_S

CAM = "cam_classifier-species"
TIMING_KEYS = ("seconds", "images_per_s", "train_seconds", "seconds_per_step", "train_images_per_s",
               "n_refined")
# Enough epochs / shards / masks that a kill usually lands between two saved units of work.
KILL_PARAMS = {
    **TINY_MODELS,
    "base": {"num_workers": 0},
    "train_classifier": {**TINY_MODELS["train_classifier"], "epochs": 3},
    "train_ccam": {**TINY_MODELS["train_ccam"], "epochs": 2},
    "make_cams": {**TINY_MODELS["make_cams"], "shard_size": 4},
    "pseudo": {"workers": 2},  # a process pool: the kill must take the workers down too
    "tune": {"trials": 3, "n_startup_trials": 1, "prune_chunks": 2, "refiners": ["crf", "grabcut", "none"]},
    "train_unet": {**TINY_MODELS["train_unet"], "steps": 7},  # 3 epochs of 2 steps + 1
}
runner = CliRunner()


@dataclass(frozen=True)
class Stage:
    """One stage under test: its command line, what it writes and how to compare two runs' outputs."""

    name: str
    args: tuple[str, ...]
    watch: tuple[str, ...]
    compare: Callable[[Path, Path], None]
    kill_event: Callable[[Path], bool] | None = None


# --------------------------------------------------------------------------------------------------
# comparisons


def _same_json(a: Path, b: Path) -> None:
    assert json_without(a, TIMING_KEYS) == json_without(b, TIMING_KEYS), f"{a} != {b}"


def compare_cams(ref: Path, got: Path, variant: str = CAM) -> None:
    rd, gd = ref / "cams" / variant, got / "cams" / variant
    shards = sorted(p.name for p in rd.glob("shard-*.npz"))
    assert shards and shards == sorted(p.name for p in gd.glob("shard-*.npz"))
    for name in shards:
        assert npz_equal(rd / name, gd / name), f"{name} differs after the kill"
    assert json.loads((rd / "_done.json").read_text()) == json.loads((gd / "_done.json").read_text())
    _same_json(ref / "reports" / "cams" / f"{variant}.json", got / "reports" / "cams" / f"{variant}.json")
    curve = Path("reports") / "cams" / "curves" / f"{variant}.csv"
    assert (ref / curve).read_bytes() == (got / curve).read_bytes()


def compare_pseudo(ref: Path, got: Path, variant: str = CAM) -> None:
    masks = digest_tree(ref / "masks" / variant)
    assert len([m for m in masks if m.endswith(".png")]) == 24
    assert digest_tree(got / "masks" / variant) == masks  # every PNG byte-identical, _done.json too
    _same_json(ref / "reports" / "pseudo" / f"{variant}.json", got / "reports" / "pseudo" / f"{variant}.json")


def compare_model(name: str) -> Callable[[Path, Path], None]:
    def compare(ref: Path, got: Path) -> None:
        rm = json.loads((ref / "models" / name / "meta.json").read_text())
        gm = json.loads((got / "models" / name / "meta.json").read_text())
        # state_sha256 covers every tensor's bytes: the resumed weights are bit-identical.
        assert gm == rm, f"{name}: meta differs (state_sha256 {gm.get('state_sha256')} vs {rm.get('state_sha256')})"
        _same_json(ref / "reports" / "training" / f"{name}.json", got / "reports" / "training" / f"{name}.json")
        from wsss.paths import Paths
        from wsss.training.checkpoint import load_model_state

        load_model_state(Paths(got).model_dir(name))  # loads, and matches its checksum
        assert not list((got / ".wsss" / "state").rglob("checkpoint.pt")), "checkpoint not cleared"

    return compare


def _finished_trials(root: Path, variant: str = CAM) -> int:
    """Finished (complete, pruned or failed) trials in the project's default study (0: none yet)."""
    import optuna

    from wsss.tuning import default_storage

    if not (root / "studies" / variant / "optuna.db").exists():
        return 0
    storage = default_storage(root / "studies" / variant)
    try:
        summaries = optuna.get_all_study_summaries(storage)
    except Exception:  # noqa: BLE001 - killed while creating the schema: nothing stored yet
        return 0
    return sum(
        sum(t.state.is_finished() for t in optuna.load_study(study_name=s.study_name, storage=storage).trials)
        for s in summaries
    )


def compare_eval(ref: Path, got: Path) -> None:
    """evaluate: the test-split scores equal (timing keys removed); nothing else in reports/eval/."""
    names = sorted(p.name for p in (ref / "reports" / "eval").iterdir())
    assert names == [f"{CAM}.json"] and names == sorted(p.name for p in (got / "reports" / "eval").iterdir())
    _same_json(ref / "reports" / "eval" / names[0], got / "reports" / "eval" / names[0])


def compare_report(ref: Path, got: Path) -> None:
    """report: report.md and every figure byte-identical."""
    assert (ref / "reports" / "report.md").read_bytes() == (got / "reports" / "report.md").read_bytes()
    figures = digest_tree(ref / "reports" / "figures")
    assert figures and digest_tree(got / "reports" / "figures") == figures


def _running_trials(root: Path, variant: str = CAM) -> int:
    """Trials in state RUNNING in the default study's SQLite file (0 when it cannot be read yet)."""
    import sqlite3

    db = root / "studies" / variant / "optuna.db"
    if not db.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.05)) as con:
            return con.execute("SELECT COUNT(*) FROM trials WHERE state = 'RUNNING'").fetchone()[0]
    except sqlite3.Error:  # schema not created yet, or locked by the writer this instant
        return 0


def compare_tuning(ref: Path, got: Path, variant: str = CAM) -> None:
    import optuna

    from wsss.tuning import default_storage, load_best_params

    del ref  # a resumed study is not a replay; see the module docstring
    best = load_best_params(got / "reports" / "crf" / f"{variant}.yaml")
    storage = default_storage(got / "studies" / variant)
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert complete and best.refiner == study.best_trial.params["refiner"]
    header = (got / "reports" / "crf" / f"{variant}.yaml").read_text().splitlines()[0]
    assert f"trial {study.best_trial.number}," in header


STAGES = {
    "train-classifier": Stage(
        "train-classifier", ("train-classifier", "--labels", "species"),
        ("models", "reports", ".wsss"), compare_model("classifier-species"),
        kill_event=lambda root: (root / ".wsss/state/train-classifier/species/checkpoint.pt").exists(),
    ),
    "train-ccam": Stage(
        "train-ccam", ("train-ccam", "--init", "classifier:species"),
        ("models", "reports", ".wsss"), compare_model("ccam-cls-species"),
        kill_event=lambda root: (root / ".wsss/state/train-ccam/ccam-cls-species/checkpoint.pt").exists(),
    ),
    "make-cams": Stage(
        "make-cams", ("make-cams", "--method", "cam", "--model", "classifier-species"),
        ("cams", "reports"), compare_cams,
        kill_event=lambda root: (root / "cams" / CAM / "shard-00000.npz").exists(),
    ),
    "tune-crf": Stage(
        "tune-crf", ("tune", "crf", "--method", CAM), ("reports", "studies"), compare_tuning,
    ),
    "make-pseudo": Stage(
        "make-pseudo", ("make-pseudo", "--method", CAM, "--no-tuned"), ("masks", "reports"), compare_pseudo,
        kill_event=lambda root: len(list((root / "masks" / CAM).glob("*.png"))) >= 6,
    ),
    "train-unet": Stage(
        "train-unet", ("train-unet", "--masks", CAM), ("models", "reports", ".wsss"), compare_model(f"unet-{CAM}"),
        kill_event=lambda root: (root / f".wsss/state/train-unet/unet-{CAM}/checkpoint.pt").exists(),
    ),
    "evaluate": Stage("evaluate", ("evaluate", "--model", f"unet-{CAM}"), ("reports",), compare_eval),
    "report": Stage(
        "report", ("report", "--no-register"), ("reports",), compare_report,
        kill_event=lambda root: any((root / "reports" / "figures").glob("*.png")),
    ),
}


# --------------------------------------------------------------------------------------------------
# fixtures


def _invoke(*args: str) -> None:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, f"wsss {' '.join(args)} failed:\n{result.output}\n{result.exception!r}"


def _build(root: Path, commands: list[list[str]]) -> Path:
    """Run ``commands`` in-process (imports are paid once) with one torch thread, like the subprocesses,
    so the base project's outputs are bit-identical to a subprocess's and serve as references."""
    import torch

    root.mkdir(parents=True)
    write_params(root, KILL_PARAMS)
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root.as_posix()}/mlruns/mlflow.db")
        torch.set_num_threads(1)
        try:
            for command in commands:
                _invoke(*command)
        finally:
            torch.set_num_threads(threads)
    return root


UPSTREAM = [["generate-synthetic"], ["prepare"], ["train-classifier", "--labels", "species"],
            ["make-cams", "--method", "cam", "--model", "classifier-species"],
            ["make-pseudo", "--method", CAM, "--no-tuned"], ["train-unet", "--masks", CAM],
            ["evaluate", "--model", f"unet-{CAM}"], ["report", "--no-register"]]


@pytest.fixture(scope="module")
def base_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared data, a species classifier, its CAMs and pseudo-masks, a U-Net, its test scores and the
    report: the inputs of every stage under test, and the reference outputs of the stages the default
    run kills."""
    return _build(tmp_path_factory.mktemp("kill") / "base", UPSTREAM)


def clone(base: Path, dest: Path, drop: tuple[str, ...] = ()) -> Path:
    """A copy of the base project with its own (fresh) MLflow store, minus the outputs in ``drop``."""
    shutil.copytree(base, dest, symlinks=True, ignore=shutil.ignore_patterns("mlruns"))
    (dest / "mlruns").mkdir()
    for rel in drop:
        target = dest / rel
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    return dest


def _outputs_of(stage: Stage) -> tuple[str, ...]:
    """What to delete from the base copy so the stage really runs (its outputs and its state)."""
    return {
        "train-classifier": ("models/classifier-species", "reports/training/classifier-species.json"),
        "make-cams": (f"cams/{CAM}", f"reports/cams/{CAM}.json", f"reports/cams/curves/{CAM}.csv"),
        "make-pseudo": (f"masks/{CAM}", f"reports/pseudo/{CAM}.json"),
        "train-unet": (f"models/unet-{CAM}", f"reports/training/unet-{CAM}.json"),
        "evaluate": ("reports/eval",),
        "report": ("reports/report.md", "reports/figures"),
    }.get(stage.name, ())


def _ok(outcome: Outcome) -> None:
    assert outcome.returncode == 0, outcome.describe()
    assert "Traceback" not in outcome.output, outcome.describe()


def kill_and_resume(base: Path, work: Path, stage: Stage, delays: list[float | None],
                    reference: Path) -> list[Outcome]:
    """Kill the stage at each of ``delays`` (None: at its event) in turn, then run it to the end."""
    victim = clone(base, work, _outputs_of(stage))
    outcomes = []
    for delay in delays:
        hit = run_stage(victim, stage.args, watch=stage.watch, kill_after=delay,
                        kill_when=stage.kill_event if delay is None else None)
        assert hit.killed or hit.returncode == 0, hit.describe()
        outcomes.append(hit)
    trials_before = _finished_trials(victim) if stage.name == "tune-crf" else 0
    orphans = _running_trials(victim) if stage.name == "tune-crf" else 0
    if orphans:  # the rerun fails a killed, still unclaimed trial only after its grace
        time.sleep(UNCLAIMED_GRACE_S)
    final = run_stage(victim, stage.args, watch=stage.watch)
    _ok(final)
    if stage.name == "tune-crf":  # no lost work: earlier trials kept, the killed one FAIL, this run's added
        assert _running_trials(victim) == 0
        assert _finished_trials(victim) == trials_before + orphans + KILL_PARAMS["tune"]["trials"]
    outcomes.append(final)
    for o in outcomes:
        assert not o.violations, "partial files seen:\n" + "\n".join(o.violations)
    leftovers = hidden_temps(victim / w for w in stage.watch)
    assert not leftovers, f"temporary files of killed writers left behind: {leftovers}"
    stage.compare(reference, victim)
    return outcomes


def _reference(base: Path, work: Path, stage: Stage) -> tuple[Path, Outcome]:
    ref = clone(base, work, _outputs_of(stage))
    outcome = run_stage(ref, stage.args, watch=stage.watch)
    _ok(outcome)
    assert not outcome.violations, outcome.violations
    return ref, outcome


# --------------------------------------------------------------------------------------------------
# default run: one kill per stage, at an event that guarantees partial progress


@pytest.mark.parametrize("name", ["make-cams", "make-pseudo", "train-classifier", "train-unet", "report"])
def test_killed_at_first_saved_unit_resumes_to_identical_outputs(
    base_project: Path, tmp_path: Path, name: str
) -> None:
    stage = STAGES[name]
    # The base project made these outputs uninterrupted: it is the reference.
    (hit, final) = kill_and_resume(base_project, tmp_path / "victim", stage, [None], base_project)
    assert hit.killed, f"{name} finished before its kill event:\n{hit.describe()}"
    if name == "train-classifier":
        assert "resuming classifier-species after epoch" in final.output
    if name == "train-unet":  # resumed mid-schedule, and still exactly the configured optimiser steps
        assert f"resuming unet-{CAM} after epoch" in final.output
        meta = json.loads((tmp_path / "victim" / "models" / f"unet-{CAM}" / "meta.json").read_text())
        assert meta["training"]["steps"] == KILL_PARAMS["train_unet"]["steps"]


def test_watcher_sees_partial_files(tmp_path: Path) -> None:
    """The harness itself: a truncated artefact and a visible temp file are reported."""
    from tests.killer import scan

    (tmp_path / "a.json").write_text('{"x": 1')
    (tmp_path / "b.npz").write_bytes(b"PK\x03\x04 truncated")
    (tmp_path / "c.png.tmp").write_bytes(b"")
    (tmp_path / ".c.png.123.abc.tmp").write_bytes(b"")  # hidden: a writer's temp file, allowed
    (tmp_path / "ok.json").write_text("{}")
    problems = scan([tmp_path])
    assert len(problems) == 3 and all(("a.json" in p or "b.npz" in p or "c.png.tmp" in p) for p in problems)


def _dead_pid() -> int:
    """The pid of a process that has already exited (a killed writer's, as far as the sweep can tell)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    return int(done.stdout)


def test_stale_temp_files_of_dead_writers_are_swept(tmp_path: Path) -> None:
    from wsss import io

    pid = _dead_pid()
    stale = tmp_path / f".model.pt.{pid}.abcd1234.tmp"
    live = tmp_path / f".model.pt.{__import__('os').getpid()}.efgh5678.tmp"
    other = tmp_path / ".notes.tmp"
    for p in (stale, live, other):
        p.write_bytes(b"x")
    io.write_json(tmp_path / "meta.json", {"a": 1})
    assert not stale.exists() and live.exists() and other.exists()
    assert json.loads((tmp_path / "meta.json").read_text()) == {"a": 1}


def test_temp_files_of_another_host_are_never_swept(tmp_path: Path) -> None:
    """Parts of a sharded run on several nodes share a folder: a pid from another host says nothing here."""
    from wsss import io

    pid = _dead_pid()
    ours = tmp_path / f".a.png.{pid}@{io._HOST_TAG}.abcd1234.tmp"
    theirs = tmp_path / f".a.png.{pid}@other-node-7.efgh5678.tmp"
    for p in (ours, theirs):
        p.write_bytes(b"x")
    io.write_json(tmp_path / "meta.json", {"a": 1})
    assert not ours.exists() and theirs.exists()
    written = io.atomic_path(tmp_path / "b.json")
    with written as tmp:
        assert f"@{io._HOST_TAG}." in tmp.name
        tmp.write_text("{}")


# --------------------------------------------------------------------------------------------------
# slow sweep: every stage, random kill moments


# Random kill seeds per stage (the last one killed twice); .ci/run sets WSSS_KILL_SEEDS to fit its budget.
SEEDS = tuple(range(int(os.environ.get("WSSS_KILL_SEEDS", "3"))))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STAGES))
def test_random_kills_resume_to_identical_outputs(base_project: Path, tmp_path: Path, name: str) -> None:
    stage = STAGES[name]
    ref, ref_run = _reference(base_project, tmp_path / "ref", stage)
    survived = 0
    for seed in SEEDS:
        rng = random.Random(f"{name}-{seed}")
        delays: list[float | None] = [rng.uniform(0, ref_run.seconds) for _ in range(2 if seed == SEEDS[-1] else 1)]
        outcomes = kill_and_resume(base_project, tmp_path / f"victim{seed}", stage, delays, ref)
        survived += sum(o.killed for o in outcomes)
    if not survived:  # every random moment fell after the end (a loaded machine runs the victim faster)
        outcomes = kill_and_resume(base_project, tmp_path / "victim-early", stage, [0.25 * ref_run.seconds], ref)
        survived += sum(o.killed for o in outcomes)
    print(f"KILLS {name}: {survived} kills survived, T={ref_run.seconds:.1f}s")
    assert survived >= 1, f"{name}: every run finished before its kill moment"


@pytest.mark.slow
def test_tune_crf_killed_mid_trial_resumes_clean(base_project: Path, tmp_path: Path) -> None:
    """Killed while a trial is RUNNING (seen in the study's database): the rerun marks it FAIL, keeps the
    finished trials, adds its own, and leaves no trial RUNNING (issue 17, defect 10)."""
    import optuna

    from wsss.tuning import default_storage

    stage = STAGES["tune-crf"]
    victim = clone(base_project, tmp_path / "victim")
    hit = run_stage(victim, stage.args, watch=stage.watch, kill_when=lambda root: _running_trials(root) > 0)
    assert hit.killed, f"tune crf finished before a trial was seen running:\n{hit.describe()}"
    assert _running_trials(victim) == 1  # the killed trial is left RUNNING by the dead process
    before = _finished_trials(victim)
    time.sleep(UNCLAIMED_GRACE_S)  # killed maybe before it claimed the trial: failed after this grace
    final = run_stage(victim, stage.args, watch=stage.watch)
    _ok(final)
    assert not hit.violations + final.violations
    assert _running_trials(victim) == 0
    storage = default_storage(victim / "studies" / CAM)
    (summary,) = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).trials
    states = [t.state for t in trials]
    assert states.count(optuna.trial.TrialState.FAIL) >= 1, states  # the killed one
    assert _finished_trials(victim) == before + 1 + KILL_PARAMS["tune"]["trials"]
    compare_tuning(victim, victim)


# --------------------------------------------------------------------------------------------------
# concurrency: two stages writing different outputs of one project at once


def test_two_make_cams_variants_in_parallel_processes(base_project: Path, tmp_path: Path) -> None:
    """Both finish, the cam variant equals the serial run bit for bit, and MLflow holds both runs.

    The project's MLflow database does not exist yet: both processes create it at once (the file lock
    in ``tracking._setup``).
    """
    import subprocess
    import sys

    from tests.killer import stage_env

    root = clone(base_project, tmp_path / "p", _outputs_of(STAGES["make-cams"]))
    assert not (root / "mlruns" / "mlflow.db").exists()
    commands = [["make-cams", "--method", "cam", "--model", "classifier-species"],
                ["make-cams", "--method", "ecs", "--model", "classifier-species"]]
    procs = [subprocess.Popen([sys.executable, "-m", "wsss", *c], cwd=root, env=stage_env(root),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in commands]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0 and "Traceback" not in out, out
    compare_cams(base_project, root)
    ecs = root / "cams" / "ecs_classifier-species"
    assert (ecs / "_done.json").exists() and len(list(ecs.glob("shard-*.npz"))) == 6

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root.as_posix()}/mlruns/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    got = sorted((r.data.tags["wsss.variant"], r.info.status) for r in runs if r.data.tags.get("wsss.stage") == "make-cams")
    assert got == [("cam_classifier-species", "FINISHED"), ("ecs_classifier-species", "FINISHED")]
