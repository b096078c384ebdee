"""tune-crf: validation-only objective, valid search space, nested MLflow runs, resume, shared storage."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from tests.test_make_pseudo import SPLITS, VARIANT, build_project
from wsss.config import REFINERS, PseudoConfig, load_params, params_from_dict, to_dict
from wsss.data.manifest import load_manifest
from wsss.tuning import (
    RECTANGLE_PRIOR_TRIAL,
    Objective,
    build_objective_data,
    chunk_ends,
    default_storage,
    load_best_params,
    suggest_pseudo,
)

# Serial refinement, few trials and a cheap refiner mix: these run on a shared 2-core machine.
PARAMS = {
    "pseudo": {"workers": 1},
    "tune": {"trials": 3, "n_startup_trials": 2, "prune_chunks": 2, "refiners": ["crf", "grabcut", "none"]},
}
VAL_IDS = sorted(f"val_{k:02d}" for k in range(SPLITS["val"]))


def _runs(filter_string: str = "") -> object:
    import mlflow

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    return mlflow.search_runs(search_all_experiments=True, filter_string=filter_string)


def _parents_and_children() -> tuple[list[str], dict[str, object]]:
    runs = _runs()
    parents = runs[runs["tags.mlflow.runName"].str.startswith("tune-crf:")]["run_id"].tolist()
    children = {p: _runs(f"tags.mlflow.parentRunId = '{p}'") for p in parents}
    return parents, children


def test_objective_reads_and_scores_validation_images_only(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wsss.tuning as tuning

    paths = build_project(project, PARAMS)
    read: list[str] = []
    read_rgb, read_mask = tuning.read_rgb, tuning.read_mask
    monkeypatch.setattr(tuning, "read_rgb", lambda p: read.append(Path(p).stem) or read_rgb(p))
    monkeypatch.setattr(tuning, "read_mask", lambda p: read.append(Path(p).stem) or read_mask(p))
    df = load_manifest(paths.manifest)

    data = build_objective_data(df, paths.prepared, paths.cams_dir(VARIANT), seed=3)
    # The shards hold train and test maps too, and the manifest a val background image: none is used.
    assert sorted(data.ids) == VAL_IDS
    assert sorted(set(read)) == VAL_IDS
    assert [g.shape for g in data.gts] == [m.shape for m in data.maps]

    capped = build_objective_data(df, paths.prepared, paths.cams_dir(VARIANT), max_images=3, seed=3)
    assert len(capped) == 3 and set(capped.ids) <= set(VAL_IDS)
    assert capped.ids == data.ids[:3]  # the cap takes a prefix of the same seeded order

    # The objective scores exactly these images: a fixed plain-threshold trial equals a direct computation.
    from wsss.evaluation import SegMeter

    objective = Objective(data, PseudoConfig(), ["none"], prune_chunks=3, workers=1)
    value = objective(optuna.trial.FixedTrial({"refiner": "none", "threshold": 0.5}))
    meter = SegMeter()
    for m, gt in zip(data.maps, data.gts, strict=True):
        meter.add(m >= np.float32(0.5), gt)
    assert value == pytest.approx(meter.result().iou_mean)


@pytest.mark.parametrize("confident", [False, True])
def test_search_space_is_always_valid_and_replayable(confident: bool) -> None:
    base = PseudoConfig(confident=confident)
    sampled: dict[int, PseudoConfig] = {}

    def objective(trial: optuna.Trial) -> float:
        cfg = suggest_pseudo(trial, base, REFINERS)
        params_from_dict({"pseudo": to_dict(cfg)})  # the strict loader's range and order checks
        sampled[trial.number] = cfg
        return 0.0

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(objective, n_trials=40)
    assert {c.refiner for c in sampled.values()} == set(REFINERS)
    for trial in study.trials:  # a stored trial rebuilds the configuration it scored
        assert suggest_pseudo(trial, base, REFINERS) == sampled[trial.number]
        # No dead dimensions: the plain threshold is searched only where the refiner reads it.
        cfg = sampled[trial.number]
        uses_threshold = not confident and (
            cfg.refiner in ("none", "crf") or (cfg.refiner == "grabcut+crf" and cfg.crf.unary == "soft"))
        assert ("threshold" in trial.params) == uses_threshold, (cfg.refiner, cfg.crf.unary, trial.params)


def test_chunk_ends() -> None:
    assert chunk_ends(8, 3) == [3, 5, 8]
    assert chunk_ends(2, 4) == [1, 2]
    assert chunk_ends(5, 1) == [5]


def test_study_nested_runs_best_params_and_resume(project: Path) -> None:
    from wsss.stages import tune_crf

    paths = build_project(project, PARAMS)
    params = load_params(project / "params.yaml")
    first = tune_crf.run(params, paths, VARIANT)

    parents, children = _parents_and_children()
    assert len(parents) == 1
    kids = children[parents[0]]
    assert len(kids) == 3
    assert sorted(kids["tags.optuna.trial"].astype(int)) == [0, 1, 2]
    expected_status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}
    for _, run in kids.iterrows():
        assert run["status"] == expected_status[run["tags.optuna.state"]]
        assert isinstance(run["params.trial.refiner"], str)

    dest = paths.crf_params(VARIANT)
    best = load_best_params(dest)
    assert params_from_dict(yaml.safe_load(dest.read_text())).pseudo == best
    study = optuna.load_study(study_name=first["study"], storage=default_storage(paths.study_dir(VARIANT)))
    assert best.refiner == study.best_trial.params["refiner"]
    assert first["best_value"] == study.best_value

    second = tune_crf.run(params, paths, VARIANT)
    assert second["study"] == first["study"]
    study = optuna.load_study(study_name=first["study"], storage=default_storage(paths.study_dir(VARIANT)))
    assert len(study.trials) == 6
    assert second["best_value"] == max(t.value for t in study.trials if t.value is not None and
                                       t.state == optuna.trial.TrialState.COMPLETE)
    # A new study first scores the rectangle prior it must beat; a resumed one does not enqueue it again.
    assert study.trials[0].params == RECTANGLE_PRIOR_TRIAL
    assert sum(t.params == RECTANGLE_PRIOR_TRIAL for t in study.trials) == 1
    # The resumed run continues the random stream instead of replaying the first trials.
    assert study.trials[1].params != study.trials[4].params
    parents, children = _parents_and_children()
    assert len(parents) == 2 and sorted(len(c) for c in children.values()) == [3, 3]


def test_child_runs_record_pruned_and_failed_states(project: Path) -> None:
    import mlflow

    from wsss.stages.tune_crf import _logged_objective

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    exp = mlflow.create_experiment("states")
    outcomes = iter(["complete", "prune", "fail"])

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        outcome = next(outcomes)
        if outcome == "prune":
            raise optuna.TrialPruned()
        if outcome == "fail":
            raise RuntimeError("boom")
        return x

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with mlflow.start_run(experiment_id=exp) as parent:
        study = optuna.create_study(direction="maximize")
        study.optimize(_logged_objective(objective, exp, VARIANT, "s"), n_trials=3, catch=(RuntimeError,))
    kids = _runs(f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    got = {r["tags.optuna.trial"]: (r["status"], r["tags.optuna.state"]) for _, r in kids.iterrows()}
    assert got == {"0": ("FINISHED", "COMPLETE"), "1": ("KILLED", "PRUNED"), "2": ("FAILED", "FAIL")}
    assert kids["params.trial.x"].notna().all()  # even pruned and failed trials record what they tried


def test_two_workers_share_one_sqlite_study(project: Path) -> None:
    paths = build_project(project, PARAMS)
    url = f"sqlite:///{(project / 'shared' / 'optuna.db').resolve().as_posix()}"
    (project / "shared").mkdir()
    # Neither the MLflow database nor the Optuna one exists yet: the workers create both at once
    # (tracking._setup holds a file lock around MLflow's first-time schema creation).
    assert not (project / "mlruns" / "mlflow.db").exists()
    cmd = [sys.executable, "-c", "from wsss.cli import app; app()", "tune", "crf", "--method", VARIANT,
           "--trials", "2", "--storage", url, "--study", "shared"]
    procs = [subprocess.Popen(cmd, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out

    study = optuna.load_study(study_name="shared", storage=url)
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in study.trials)
    parents, children = _parents_and_children()
    assert len(parents) == 2
    logged = sorted(int(n) for c in children.values() for n in c["tags.optuna.trial"])
    assert logged == [0, 1, 2, 3]  # every trial exactly once, under the worker that ran it
    assert load_best_params(paths.crf_params(VARIANT)).refiner in PARAMS["tune"]["refiners"]


def test_seed_trials_only_where_the_rectangle_prior_fits() -> None:
    from wsss.tuning import seed_trials

    assert seed_trials(PseudoConfig(), ("crf", "grabcut")) == [RECTANGLE_PRIOR_TRIAL]
    assert seed_trials(PseudoConfig(), ("crf", "none")) == []
    assert seed_trials(PseudoConfig(confident=True), ("grabcut",)) == []
    # The seeded trial rebuilds into a valid configuration with the baseline's border band.
    cfg = suggest_pseudo(optuna.trial.FixedTrial(RECTANGLE_PRIOR_TRIAL), PseudoConfig(), ("crf", "grabcut"))
    params_from_dict({"pseudo": to_dict(cfg)})
    assert cfg.refiner == "grabcut" and cfg.grabcut.border == 0.075 and cfg.grabcut.bg_threshold == 0.0


def test_a_killed_runs_trial_is_marked_fail_by_the_next_run(project: Path) -> None:
    import socket

    from wsss.stages import tune_crf

    paths = build_project(project, PARAMS)
    params = load_params(project / "params.yaml")
    first = tune_crf.run(params, paths, VARIANT, trials=2)
    url = default_storage(paths.study_dir(VARIANT))
    storage = optuna.storages.RDBStorage(url)
    study_id = storage.get_study_id_from_name(first["study"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()

    def running_trial(pid: int, host: str = socket.gethostname()) -> int:
        """A RUNNING trial as a `tune crf` process leaves it when it is killed mid-trial."""
        trial_id = storage.create_new_trial(study_id)
        storage.set_trial_user_attr(trial_id, "wsss.host", host)
        storage.set_trial_user_attr(trial_id, "wsss.pid", str(pid))
        return storage.get_trial_number_from_id(trial_id)

    killed = running_trial(dead.pid)
    alive = running_trial(os.getpid())  # a live process's trial is left alone
    elsewhere = running_trial(dead.pid, host="another-host")  # can't tell from here (the heartbeat can)

    second = tune_crf.run(params, paths, VARIANT, trials=2)
    study = optuna.load_study(study_name=first["study"], storage=url)
    state = {t.number: t.state for t in study.trials}
    assert state[killed] == optuna.trial.TrialState.FAIL
    assert state[alive] == state[elsewhere] == optuna.trial.TrialState.RUNNING
    assert len(study.trials) == 2 + 3 + 2 and second["trials_this_run"] == 2
    assert second["trials_fail"] == 1
    assert second["trials_complete"] + second["trials_pruned"] == 4
    ours = [t for t in study.trials if t.number not in (killed, alive, elsewhere)]
    assert all(t.user_attrs["wsss.host"] == socket.gethostname() and t.user_attrs["wsss.pid"] == str(os.getpid())
               for t in ours)  # every trial names its process, so a later run can judge it


def test_shared_storage_has_heartbeat_and_constant_liar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    import wsss.tuning as tuning

    url = f"sqlite:///{(tmp_path / 'shared.db').as_posix()}"
    assert tuning.make_storage(url).heartbeat_interval is None  # the default per-variant SQLite file
    assert tuning.make_storage(url, shared=True).heartbeat_interval == tuning.HEARTBEAT_S
    study = tuning.create_study("s", tuning.make_storage(url, shared=True), seed=0, n_startup_trials=1)
    assert study.sampler._constant_liar  # workers do not all sample the point another one is running

    # A trial whose heartbeat stopped (a worker killed on another host) is failed after the grace period.
    monkeypatch.setattr(tuning, "GRACE_S", 1)
    storage = tuning.make_storage(url, shared=True)
    study = optuna.load_study(study_name="s", storage=storage)
    trial_id = storage.create_new_trial(study._study_id)
    storage.record_heartbeat(trial_id)
    assert tuning.fail_orphaned_trials(study) == []
    time.sleep(2.5)
    assert tuning.fail_orphaned_trials(study) == [0]
    assert study.trials[0].state == optuna.trial.TrialState.FAIL


@pytest.mark.parametrize(("tune", "ok"), [
    ({"storage": ""}, True),
    ({"storage": "postgresql+psycopg://u:pw@db.internal:5432/optuna"}, True),
    ({"storage": "sqlite:////abs/optuna.db"}, True),
    ({"storage": "db.internal/optuna"}, False),  # not a URL
    ({"pruner": "wilcoxon", "wilcoxon_p": 0.05}, True),
    ({"pruner": "hyperband"}, False),
    ({"wilcoxon_p": 1.5}, False),
])
def test_tune_storage_and_pruner_are_validated(tune: dict, ok: bool) -> None:
    from wsss.errors import ConfigError

    if ok:
        assert params_from_dict({"tune": tune}).tune.storage == tune.get("storage", "")
    else:
        with pytest.raises(ConfigError, match="tune") as err:
            params_from_dict({"tune": tune}, "params.yaml")
        assert "pw" not in str(err.value)


def test_storage_errors_are_one_line_with_the_password_masked() -> None:
    import socket

    from wsss.errors import ConfigError, TrackingError
    from wsss.tuning import check_storage, redact, storage_url

    assert redact("postgresql+psycopg://u:pw@h:5/d") == "postgresql+psycopg://u:***@h:5/d"
    assert redact("postgresql+psycopg://u@h/d") == "postgresql+psycopg://u@h/d"
    assert storage_url("postgresql://u@h/d") == storage_url("postgres://u@h/d") == "postgresql+psycopg://u@h/d"
    with pytest.raises(ConfigError, match="unknown database dialect"):
        check_storage("nosuchdb://u:pw@h/d")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pytest.importorskip("psycopg")  # the `postgres` extra
    with pytest.raises(TrackingError) as err:
        check_storage(f"postgresql+psycopg://wsss:topsecret@127.0.0.1:{port}/optuna")
    msg = str(err.value)
    assert f"wsss:***@127.0.0.1:{port}/optuna: cannot connect" in msg
    assert "topsecret" not in msg and "\n" not in msg


def test_tune_storage_param_is_used_and_the_cli_overrides_it(project: Path) -> None:
    from typer.testing import CliRunner

    from wsss.cli import app
    from wsss.io import read_json

    paths = build_project(project, {**PARAMS, "tune": {**PARAMS["tune"], "trials": 1,
                                                       "storage": f"sqlite:///{project}/from-params.db"}})
    other = project / "from-cli.db"
    for args, db in (([], project / "from-params.db"), (["--storage", f"sqlite:///{other}"], other)):
        result = CliRunner().invoke(app, ["tune", "crf", "--method", VARIANT, *args])
        assert result.exit_code == 0, result.output
        summary = read_json(paths.study_dir(VARIANT) / "study.json")
        assert summary["storage"] == f"sqlite:///{db}" and summary["trials_this_run"] == 1
        assert len(optuna.load_study(study_name=summary["study"], storage=f"sqlite:///{db}").trials) == 1
    assert not (paths.study_dir(VARIANT) / "optuna.db").exists()
    result = CliRunner().invoke(app, ["tune", "crf", "--method", VARIANT, "--storage", "nosuchdb://x/y"])
    assert result.exit_code == 2 and "Optuna storage nosuchdb://x/y: unknown database dialect" in result.output


@pytest.mark.parametrize("pruner", ["median", "wilcoxon"])
def test_pruner_wiring_reports_what_the_pruner_compares(project: Path, pruner: str) -> None:
    from wsss.tuning import create_study, study_name

    paths = build_project(project, PARAMS)
    data = build_objective_data(load_manifest(paths.manifest), paths.prepared, paths.cams_dir(VARIANT))
    study = create_study("s", None, seed=0, n_startup_trials=1, pruner=pruner, wilcoxon_p=0.1)
    expected = {"median": optuna.pruners.MedianPruner, "wilcoxon": optuna.pruners.WilcoxonPruner}[pruner]
    assert isinstance(study.pruner, expected)
    objective = Objective(data, PseudoConfig(), ["none"], prune_chunks=2, workers=1, per_image=pruner == "wilcoxon")
    good, bad = {"refiner": "none", "threshold": 0.5}, {"refiner": "none", "threshold": 0.95}
    for p in (good, good, bad):
        study.enqueue_trial(p)
    study.optimize(objective, n_trials=3)
    first, _, worst = study.trials
    # median: the running mean after each of the 2 chunks; wilcoxon: each image's IoU at its index.
    steps = list(range(len(data))) if pruner == "wilcoxon" else [0, 1]
    assert sorted(first.intermediate_values) == steps
    if pruner == "wilcoxon":
        from wsss.evaluation import SegMeter

        meter = SegMeter()
        per_image = [meter.add(m >= np.float32(0.5), g) for m, g in zip(data.maps, data.gts, strict=True)]
        assert [first.intermediate_values[i] for i in steps] == pytest.approx(per_image)
    # An almost empty mask is worse on every image: pruned after the first half (a paired test on 4 images
    # reaches p = 1/16 < 0.1; the median of 2 earlier trials is theirs).
    assert worst.state == optuna.trial.TrialState.PRUNED
    assert len(worst.intermediate_values) == (len(data) // 2 if pruner == "wilcoxon" else 1)
    # The two pruners store different intermediate values, so they never share a study.
    names = {study_name(VARIANT, data, PseudoConfig(), ["none"], p) for p in ("median", "wilcoxon")}
    assert len(names) == 2
