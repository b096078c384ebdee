"""Tracking failures: a dead server stops a command before any work; a server dying mid-run costs no work.

See the "Tracking failures" section of :mod:`wsss.tracking`. Every server here is on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import write_params
from tests.killer import run_stage, stage_env
from tests.test_pipeline import TINY_MODELS
from wsss.cli import app

runner = CliRunner()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(autouse=True)
def _tracking_on() -> None:
    from wsss import tracking

    tracking.reset_failure()


# --------------------------------------------------------------------------------------------------
# server down before the run


COMMANDS = [
    ["prepare"], ["validate"], ["train-classifier"], ["train-ccam"], ["make-cams", "--method", "cam",
    "--model", "classifier-species"], ["tune", "crf", "--method", "cam_classifier-species"],
    ["make-pseudo", "--method", "cam_classifier-species"], ["train-unet", "--masks", "gt"],
    ["evaluate", "--baselines"], ["report"], ["runs"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0] if c[0] != "tune" else "tune-crf")
def test_server_down_fails_fast_with_one_line(project: Path, monkeypatch: pytest.MonkeyPatch,
                                              command: list[str]) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    result = runner.invoke(app, command)
    seconds = time.monotonic() - start
    assert result.exit_code == 4, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and uri in lines[0] and "not reachable" in lines[0], result.output
    assert "Traceback" not in result.output
    # MLflow's own retries would take minutes; the bound is loose so a loaded 2-core CI machine passes.
    assert seconds < 30, f"took {seconds:.1f}s"
    # Before any work: nothing was written (not even the MLflow folder).
    assert sorted(p.name for p in project.iterdir()) == ["mlruns", "params.yaml"]


def test_server_down_subprocess_exits_4_within_seconds(project: Path) -> None:
    """The real command line: one line naming the URI, exit code 4, no traceback, in a few seconds."""
    (project / "data" / "raw" / "synthetic" / "oxford-iiit-pet").mkdir(parents=True)
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "wsss", "prepare"], cwd=project, capture_output=True, text=True,
                          env=stage_env(project, MLFLOW_TRACKING_URI=uri), timeout=120)
    seconds = time.monotonic() - start
    output = proc.stdout + proc.stderr
    assert proc.returncode == 4, output
    assert [ln for ln in output.splitlines() if ln.strip()] == [ln for ln in output.splitlines() if uri in ln]
    assert "Traceback" not in output
    assert seconds < 20, f"took {seconds:.1f}s (interpreter start included)"
    assert not (project / "data" / "prepared").exists()


def test_health_check_accepts_a_server_that_answers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A 4xx from /health (auth proxy, no such route) means a server is there; a 5xx means it is sick."""
    from wsss import tracking
    from wsss.errors import TrackingError
    from wsss.paths import Paths

    codes = iter([404, 503])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            self.send_response(next(codes))
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    try:
        with _serve(Handler) as uri:
            monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
            tracking.check_available(Paths(tmp_path))  # 404: fine
            tracking._checked.discard(uri)
            with pytest.raises(TrackingError, match="not healthy"):
                tracking.check_available(Paths(tmp_path))
    finally:
        tracking._checked.clear()


# --------------------------------------------------------------------------------------------------
# tracking failing after the run started (in-process: the store raises from some call on)


@pytest.fixture
def prepared(project: Path) -> Path:
    write_params(project, {**TINY_MODELS, "train_unet": {**TINY_MODELS["train_unet"], "steps": 6}})
    for command in (["generate-synthetic"], ["prepare"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 0, result.output
    return project


def _break_mlflow_after(monkeypatch: pytest.MonkeyPatch, n_ok: int) -> list[str]:
    """Make every MLflow logging call fail (as with a dead server) after ``n_ok`` successful ones."""
    import mlflow
    from mlflow.exceptions import MlflowException

    calls: list[str] = []
    names = ("log_metrics", "log_metric", "log_params", "log_image", "log_artifact", "log_text", "set_tag",
             "end_run", "start_run", "log_artifacts")
    originals = {n: getattr(mlflow, n) for n in names}
    started = {"run": False}

    def wrap(name: str):  # noqa: ANN202
        def call(*args: object, **kwargs: object) -> object:
            if name == "start_run" and not started["run"]:
                started["run"] = True  # the stage's own run starts fine
                return originals[name](*args, **kwargs)
            calls.append(name)
            if len(calls) > n_ok:
                raise MlflowException("API request to http://127.0.0.1:1/api/2.0/mlflow/runs/log-batch failed "
                                      "with exception ConnectionError([Errno 111] Connection refused) [/simulated]")
            return originals[name](*args, **kwargs)

        return call

    for n in names:
        monkeypatch.setattr(mlflow, n, wrap(n))
    import mlflow.pyfunc

    # the U-Net is logged as a pyfunc (wsss.serving.export)
    monkeypatch.setattr(mlflow.pyfunc, "log_model", lambda *a, **k: (_ for _ in ()).throw(
        MlflowException("simulated: server gone")))
    return calls


@pytest.mark.parametrize("n_ok", [0, 3])
def test_tracking_error_mid_run_keeps_every_output(prepared: Path, monkeypatch: pytest.MonkeyPatch,
                                                  n_ok: int) -> None:
    import mlflow

    from wsss import tracking

    calls = _break_mlflow_after(monkeypatch, n_ok)
    result = runner.invoke(app, ["train-unet", "--masks", "gt"])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    assert "Traceback" not in result.output
    assert result.output.count("MLflow tracking at") == 1, result.output  # warned once
    assert "going on without tracking" in result.output
    assert "[Errno 111] Connection refused) [/simulated]" in " ".join(result.output.split())  # not eaten as markup
    assert tracking.tracking_failed() is not None
    for f in ("model.pt", "meta.json"):
        assert (prepared / "models" / "unet-gt" / f).is_file()
    assert (prepared / "reports" / "training" / "unet-gt.json").is_file()
    assert not (prepared / ".wsss" / "state" / "train-unet" / "unet-gt" / "checkpoint.pt").exists()
    assert mlflow.active_run() is None  # nothing left dangling in this process
    assert len(calls) == n_ok + 1  # after the first failure, no call waits on the dead store again


def test_a_real_error_still_fails_the_run_when_tracking_also_failed(
    prepared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tracking errors never hide the stage's own error."""
    import mlflow

    _break_mlflow_after(monkeypatch, 0)

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the stage's own bug")

    import wsss.training.trainer as trainer

    monkeypatch.setattr(trainer, "save_model", boom)
    result = runner.invoke(app, ["train-unet", "--masks", "gt"])
    assert result.exit_code != 0
    assert isinstance(result.exception, RuntimeError) and "own bug" in str(result.exception)
    assert mlflow.active_run() is None


# --------------------------------------------------------------------------------------------------
# a real server, killed mid-run


def _start_server(tmp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    db = tmp / "server" / "mlflow.db"
    db.parent.mkdir(parents=True)
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", f"sqlite:///{db}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=db.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    import urllib.request

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc, uri
        except OSError:
            time.sleep(0.5)
    _kill(proc)
    raise TimeoutError("mlflow server did not come up within 120 s")


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.mark.slow
def test_server_killed_mid_run_the_stage_finishes_and_keeps_its_outputs(prepared: Path) -> None:
    server, uri = _start_server(prepared.parent)
    state = prepared / ".wsss" / "state" / "train-unet" / "unet-gt" / "checkpoint.pt"
    killed = {"at": None}

    def kill_server_after_first_epoch(root: Path) -> bool:
        if killed["at"] is None and state.exists():
            _kill(server)
            killed["at"] = time.monotonic()
        return False  # never kill the stage itself

    try:
        outcome = run_stage(prepared, ["train-unet", "--masks", "gt"], watch=["models", "reports"],
                            kill_when=kill_server_after_first_epoch,
                            env=stage_env(prepared, MLFLOW_TRACKING_URI=uri), timeout=400)
    finally:
        if server.poll() is None:
            _kill(server)
    assert killed["at"] is not None, "the stage finished before the server could be killed"
    assert outcome.returncode == 0, outcome.describe()
    assert "Traceback" not in outcome.output
    assert outcome.output.count("MLflow tracking at") == 1, outcome.output
    assert (prepared / "models" / "unet-gt" / "model.pt").is_file()
    assert (prepared / "reports" / "training" / "unet-gt.json").is_file()
    assert not outcome.violations

    # The server's store holds the run up to the failure: params and the first epoch's metrics.
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{prepared.parent / 'server' / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name != "Default"]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.tags["wsss.stage"] == "train-unet" and run.info.status == "RUNNING"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")][:1] == [0]


# --------------------------------------------------------------------------------------------------
# a new SQLite store created by several processes at once


SETUP_SCRIPT = """
import os, sys, time
from pathlib import Path
from wsss import tracking
from wsss.config import load_params
from wsss.paths import Paths
Path(sys.argv[1]).touch()  # ready: imports done
deadline = time.monotonic() + 120
while not Path("go").exists() and time.monotonic() < deadline:
    time.sleep(0.001)
print(tracking._setup(Paths(), load_params("params.yaml")))
"""


def test_new_sqlite_store_created_by_three_processes_at_once(project: Path) -> None:
    """Without the lock in tracking._setup, two of them crash in MLflow's schema migration."""
    env = stage_env(project)
    assert not (project / "mlruns" / "mlflow.db").exists()
    procs = [subprocess.Popen([sys.executable, "-c", SETUP_SCRIPT, f"ready{i}"], cwd=project, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(3)]
    deadline = time.monotonic() + 120
    while not all((project / f"ready{i}").exists() for i in range(3)) and time.monotonic() < deadline:
        time.sleep(0.01)
    (project / "go").touch()  # all three start creating the store at the same moment
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out
    ids = {out.strip().splitlines()[-1] for out in outputs}
    assert len(ids) == 1  # one experiment, found or created by each


# --------------------------------------------------------------------------------------------------
# A killed process cannot end its runs: the next run of the same stage and variant closes them.


def test_runs_of_a_killed_process_are_closed_by_the_next_run(project: Path) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from wsss import tracking
    from wsss.config import load_params
    from wsss.paths import Paths

    params, paths = load_params(project / "params.yaml"), Paths(project)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a PID that no longer exists (reused within the test only by extreme bad luck)
    with tracking.stage_run("tune-crf", "cam_x", params, paths) as parent:
        exp = parent.info.experiment_id
        with mlflow.start_run(experiment_id=exp, run_name="trial-0", nested=True,
                              tags={"wsss.stage": "tune-crf", "wsss.variant": "cam_x"}) as child:
            pass
    client = MlflowClient()
    host = socket.gethostname()
    # Rewind both to what a SIGKILL leaves behind: RUNNING, tagged with a process that is gone.
    for run_id in (parent.info.run_id, child.info.run_id):
        client.update_run(run_id, status="RUNNING")
    client.set_tag(parent.info.run_id, "wsss.pid", str(dead.pid))
    live = client.create_run(exp, tags={"wsss.stage": "tune-crf", "wsss.variant": "cam_x",
                                        "wsss.host": host, "wsss.pid": str(os.getpid())})
    other_variant = client.create_run(exp, tags={"wsss.stage": "tune-crf", "wsss.variant": "cam_y",
                                                 "wsss.host": host, "wsss.pid": str(dead.pid)})

    with tracking.stage_run("tune-crf", "cam_x", params, paths) as new:
        assert client.get_run(new.info.run_id).data.tags["wsss.pid"] == str(os.getpid())
    status = {r: client.get_run(r).info.status for r in
              (parent.info.run_id, child.info.run_id, live.info.run_id, other_variant.info.run_id)}
    assert status == {parent.info.run_id: "KILLED", child.info.run_id: "KILLED",
                      live.info.run_id: "RUNNING", other_variant.info.run_id: "RUNNING"}


# --------------------------------------------------------------------------------------------------
# a store that opens but cannot be used: the one line gives the real cause


READONLY = "attempt to write a readonly database"
AUTOFLUSH = ("raised as a result of Query-invoked autoflush; consider using a session.no_autoflush block if this "
             "flush is occurring prematurely")


def _autoflush_error(chained: bool) -> BaseException:
    """A read-only SQLite store's error as MLflow raises it: SQLAlchemy wraps sqlite3's error (``orig``) and puts
    its autoflush note first; MLflow re-raises that as an ``MlflowException`` (with or without ``from``)."""
    import sqlite3

    from mlflow.exceptions import MlflowException
    from sqlalchemy import exc as sa_exc

    wrapped = sa_exc.OperationalError("UPDATE runs SET status=? WHERE runs.run_uuid = ?", ("RUNNING", "x"),
                                      sqlite3.OperationalError(READONLY))
    wrapped.add_detail(AUTOFLUSH)
    assert str(wrapped).splitlines()[0].startswith("(raised as a result of Query-invoked autoflush")
    try:
        try:
            raise wrapped
        except sa_exc.SQLAlchemyError as exc:
            if chained:
                raise MlflowException(str(exc)) from exc
            raise MlflowException(str(exc)) from None
    except MlflowException as top:
        return top


@pytest.mark.parametrize("chained", [True, False], ids=["chained", "message-only"])
def test_the_reason_of_a_readonly_store_is_the_real_cause_not_the_autoflush_note(chained: bool) -> None:
    from wsss import tracking

    reason = tracking._reason(_autoflush_error(chained))
    assert READONLY in reason and "autoflush" not in reason and "SQL" not in reason, reason
    assert "\n" not in reason


def test_the_reason_of_a_refused_connection_is_still_short() -> None:
    import urllib.error

    from wsss import tracking

    refused = urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))
    assert tracking._reason(refused) == "connection refused"


def _chattr(path: Path, flag: str) -> bool:
    try:
        return subprocess.run(["chattr", flag, str(path)], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def test_a_readonly_store_fails_in_one_line_with_the_real_cause(project: Path) -> None:
    """End to end with an immutable store file (``chattr +i``: file modes do not stop root, who runs CI)."""
    code = ("from pathlib import Path\nfrom wsss import tracking\nfrom wsss.config import load_params\n"
            "from wsss.errors import TrackingError\nfrom wsss.paths import Paths\n"
            "params, paths = load_params('params.yaml'), Paths(Path.cwd())\n"
            "try:\n    with tracking.stage_run('prepare', 'default', params, paths):\n        pass\n"
            "except TrackingError as exc:\n    print(exc)\n    raise SystemExit(4)\n")
    first = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True,
                           env=stage_env(project), timeout=120)
    assert first.returncode == 0, first.stdout + first.stderr
    db = project / "mlruns" / "mlflow.db"
    if not _chattr(db, "+i"):
        pytest.skip("chattr +i is not available here (the unit test of the reason covers the message)")
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True,
                              env=stage_env(project), timeout=120)
    finally:
        _chattr(db, "-i")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 4, output
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert len(lines) == 1 and READONLY in lines[0] and str(db) in lines[0], output
    assert "Traceback" not in output and "[SQL:" not in output


# --------------------------------------------------------------------------------------------------
# a store that cannot be used, found before the stage touches its outputs (exit 4 "before the stage started")


STAGE_COMMANDS = [["prepare"], ["validate"], ["evaluate", "--baselines"]]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project where prepare, validate and evaluate --baselines have written their outputs."""
    root = tmp_path_factory.mktemp("finished")
    write_params(root)
    (root / "mlruns").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root.as_posix()}/mlruns/mlflow.db")
        for command in (["generate-synthetic"], *STAGE_COMMANDS):
            result = runner.invoke(app, command)
            assert result.exit_code == 0, result.output
    return root


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def _api_failing_server() -> Iterator[str]:
    """A server on 127.0.0.1 whose ``/health`` answers 200 and whose every API call fails with HTTP 500."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            ok = self.path.split("?")[0] == "/health"
            body = b"OK" if ok else b'{"error_code": "INTERNAL_ERROR", "message": "simulated"}'
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            self.send_response(200 if ok else 500)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PATCH = do_DELETE = _answer  # noqa: N815 - the stdlib's names

        def log_message(self, *args: object) -> None:
            pass

    with _serve(Handler) as uri:
        yield uri


@contextlib.contextmanager
def _serve(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """``http://127.0.0.1:<port>`` of a threaded server running ``handler``, shut down and joined on exit."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextlib.contextmanager
def _broken_store(kind: str, tmp: Path, store: Path) -> Iterator[str]:
    """The tracking URI of a store that opens or answers, but cannot be used (``store``: a good SQLite store)."""
    if kind == "readonly-sqlite":  # a copy of the good store, readable (its experiment and runs are found)
        db = tmp / "readonly" / "mlflow.db"
        db.parent.mkdir()
        shutil.copy2(store, db)
        if not _chattr(db, "+i"):
            pytest.skip("chattr +i is not available here")
        try:
            yield f"sqlite:///{db.as_posix()}"
        finally:
            _chattr(db, "-i")
    elif kind == "corrupt-sqlite":
        db = tmp / "corrupt" / "mlflow.db"
        db.parent.mkdir()
        db.write_bytes(b"this is not an SQLite database\n" * 64)
        yield f"sqlite:///{db.as_posix()}"
    elif kind == "unknown-scheme":
        yield "nosuchscheme://tracking.example/store"
    else:
        with _api_failing_server() as uri:
            yield uri


@pytest.mark.parametrize("kind", ["corrupt-sqlite", "readonly-sqlite", "unknown-scheme", "api-500"])
@pytest.mark.parametrize("command", STAGE_COMMANDS, ids=lambda c: c[0])
def test_unusable_store_exits_4_before_the_stage_touches_its_outputs(
    finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str], kind: str
) -> None:
    """Issue 17, defect 5: the store is used once for real before any work, not only when the stage logs."""
    from wsss import tracking

    monkeypatch.chdir(finished)
    before = _snapshot(finished)
    with _broken_store(kind, tmp_path, finished / "mlruns" / "mlflow.db") as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        start = time.monotonic()
        try:
            result = runner.invoke(app, command)
        finally:
            tracking._checked.discard(uri)
        seconds = time.monotonic() - start
    assert result.exit_code == 4, f"{result.output}\n{result.exception!r}"
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and uri in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output
    assert seconds < 60, f"took {seconds:.1f}s"
    after = _snapshot(finished)
    assert after.keys() == before.keys(), sorted(after.keys() ^ before.keys())  # nothing new, nothing removed
    changed = [name for name in before if after[name] != before[name]]
    assert not changed, changed  # byte-identical, same mtime
