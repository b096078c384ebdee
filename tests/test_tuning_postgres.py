"""Distributed tuning against a real PostgreSQL server (slow; `.ci/run` installs Debian's `postgresql`).

Two `wsss tune crf` workers in two copies of a project (as on two machines) share one study: one takes the
storage from params.yaml's `tune.storage` (as `dvc repro` does), the other from `--storage`. Every trial
must be found exactly once, in Optuna and in MLflow.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml

from tests.pg_server import PgServer, pg_bin, running_server
from tests.test_make_pseudo import VARIANT, build_project
from wsss.io import read_json
from wsss.tuning import load_best_params

pytestmark = pytest.mark.slow

TRIALS = 4  # per worker
PARAMS = {
    "pseudo": {"workers": 1},
    "tune": {"trials": TRIALS, "n_startup_trials": 2, "prune_chunks": 2, "refiners": ["crf", "grabcut", "none"]},
}


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    bin_dir = pg_bin()
    if bin_dir is None or not (bin_dir / "pg_ctl").exists():
        pytest.skip("PostgreSQL server binaries not found (Debian: apt-get install postgresql, or set PG_BIN)")
    with running_server(bin_dir) as server:
        yield server


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from wsss.cli import app; app()", *args]


def _set_storage(root: Path, url: str) -> None:
    path = root / "params.yaml"
    data = yaml.safe_load(path.read_text())
    data["tune"]["storage"] = url
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_two_workers_on_two_copies_share_one_postgres_study(project: Path, pg: PgServer) -> None:
    import mlflow

    a, b = project / "machine-a", project / "machine-b"
    build_project(a, PARAMS)
    shutil.copytree(a, b)
    # Worker A: tune.storage, the way `dvc repro` runs it, with the password outside params.yaml (libpq
    # reads PGPASSWORD, or ~/.pgpass). Worker B: --storage with the password and no driver named, which
    # overrides a tune.storage with a wrong one (were it used, B would exit 4).
    _set_storage(a, pg.url(password=""))
    _set_storage(b, pg.url(password="decoy-pw"))
    bare = pg.url().replace("postgresql+psycopg://", "postgresql://")
    procs = [
        subprocess.Popen(_cli("tune", "crf", "--method", VARIANT), cwd=a, env={**os.environ, "PGPASSWORD": pg.password},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
        subprocess.Popen(_cli("tune", "crf", "--method", VARIANT, "--storage", bare), cwd=b,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
    ]
    # Both workers are alive at once (each takes seconds to import). Their MLflow runs need not overlap:
    # a tiny study can finish before the other worker has started its run (seen in CI), so only the
    # shared study's bookkeeping below is asserted, not an interleaving of their trials.
    assert all(p.poll() is None for p in procs)
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out
        assert pg.password not in out

    # One study: both copies derived the same default name from the same data, machine-independently.
    summaries = optuna.get_all_study_summaries(storage=pg.url())
    assert len(summaries) == 1
    name = summaries[0].study_name
    study = optuna.load_study(study_name=name, storage=pg.url())
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(2 * TRIALS))
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    assert all(t.state in finished for t in trials), [t.state for t in trials]
    pids = {str(p.pid) for p in procs}
    by_pid = {pid: sorted(t.number for t in trials if t.user_attrs["wsss.pid"] == pid) for pid in pids}
    assert sorted(len(v) for v in by_pid.values()) == [TRIALS, TRIALS]

    # MLflow (one store both workers log to): a parent per worker, a nested run per trial, no duplicate.
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(search_all_experiments=True)
    parents = runs[runs["tags.mlflow.runName"].str.startswith("tune-crf:")]
    assert len(parents) == 2 and set(parents["tags.optuna.study"]) == {name}
    assert f"{pg.user}:***@" in " ".join(parents["params.tune.storage"])  # B's params.yaml value, masked
    assert not runs.astype(str).apply(lambda col: col.str.contains("decoy-pw|" + pg.password)).any().any()
    assert sorted(parents["tags.optuna.storage"]) == sorted(
        [f"postgresql+psycopg://{pg.user}@127.0.0.1:{pg.port}/{pg.database}",  # as given, no password
         f"postgresql://{pg.user}:***@127.0.0.1:{pg.port}/{pg.database}"])
    logged: list[int] = []
    for _, parent in parents.iterrows():
        kids = runs[runs["tags.mlflow.parentRunId"] == parent["run_id"]]
        numbers = sorted(kids["tags.optuna.trial"].astype(int))
        assert numbers == by_pid[parent["tags.wsss.pid"]]  # each trial under the worker that ran it
        expected = {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}
        assert all(r["status"] == expected[r["tags.optuna.state"]] for _, r in kids.iterrows())
        logged += numbers
    assert sorted(logged) == list(range(2 * TRIALS))

    # Each copy wrote its best params and study.json; the one that finished last saw every trial.
    reports = [read_json(root / "studies" / VARIANT / "study.json") for root in (a, b)]
    assert all(r["study"] == name and pg.password not in r["storage"] for r in reports)
    assert max(r["best_value"] for r in reports) == pytest.approx(study.best_value)
    assert max(r["trials_complete"] + r["trials_pruned"] for r in reports) == 2 * TRIALS
    for root in (a, b):
        assert load_best_params(root / "reports" / "crf" / f"{VARIANT}.yaml").refiner in PARAMS["tune"]["refiners"]
        assert not (root / "studies" / VARIANT / "optuna.db").exists()  # nothing went to the SQLite default


@pytest.mark.parametrize("case", ["password", "database"])
def test_refused_login_or_database_is_one_line_exit_4(project: Path, pg: PgServer, case: str) -> None:
    from typer.testing import CliRunner

    from wsss.cli import app

    build_project(project, PARAMS)
    url = pg.url(password="wrong-pw") if case == "password" else pg.url(database="no_such_db")
    result = CliRunner().invoke(app, ["tune", "crf", "--method", VARIANT, "--storage", url])
    text = result.output.strip()
    assert result.exit_code == 4, text
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    assert f"{pg.user}:***@127.0.0.1:{pg.port}" in text and "wrong-pw" not in text
    assert ("password authentication failed" if case == "password" else "no_such_db") in text
    assert not (project / "reports" / "crf").exists()
