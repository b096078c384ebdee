"""Unit regressions for the defects the hostile-input matrix (tests/test_cli_fuzz.py) found after issue 17's
fixes: each raised a traceback, hung, or named nothing."""

from __future__ import annotations

import contextlib
import datetime
import socket
import sqlite3
from pathlib import Path

import pytest

from wsss.errors import ConfigError, DataError


def test_corrupt_json_is_one_data_error_naming_the_file(tmp_path: Path) -> None:
    from wsss.io import read_json

    for data in (b"{oops", b"\xff\xfe{}"):
        (tmp_path / "meta.json").write_bytes(data)
        with pytest.raises(DataError, match="meta.json") as info:
            read_json(tmp_path / "meta.json")
        assert isinstance(info.value, ValueError)  # callers that skip unreadable reports still do
        assert "\n" not in str(info.value)


def test_unreadable_mask_is_a_data_error_naming_it(tmp_path: Path) -> None:
    from wsss.data.datasets import load_mask

    (tmp_path / "m.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    with pytest.raises(DataError, match="m.png"):
        load_mask(tmp_path / "m.png")


@pytest.mark.parametrize("url", ["bogus://x", "mysql+nodriver://user:secret@127.0.0.1/db"])
def test_unusable_optuna_storage_url_is_a_config_error(url: str) -> None:
    from wsss.tuning import make_storage

    with pytest.raises(ConfigError, match="Optuna storage") as info:
        make_storage(url, shared=True)
    assert "secret" not in str(info.value)


def test_yaml_error_is_one_line(tmp_path: Path) -> None:
    from wsss.config import load_params

    (tmp_path / "params.yaml").write_text("base: [seed: 0\nprepare: {\n")
    with pytest.raises(ConfigError, match=r"params.yaml: not valid YAML: .* at line \d+, column \d+") as info:
        load_params(tmp_path / "params.yaml")
    assert "\n" not in str(info.value)


def test_tracking_store_that_is_a_folder_fails_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from tests.conftest import write_params
    from wsss.config import load_params
    from wsss.errors import TrackingError
    from wsss.paths import Paths
    from wsss.tracking import check_store

    write_params(tmp_path)
    (tmp_path / "mlruns" / "mlflow.db").mkdir(parents=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path.as_posix()}/mlruns/mlflow.db")
    start = time.monotonic()
    with pytest.raises(TrackingError, match="not a file"):
        check_store(Paths(tmp_path), load_params(tmp_path / "params.yaml"), writes=False)
    assert time.monotonic() - start < 10


def test_an_unclaimed_running_trial_is_failed_after_its_grace(tmp_path: Path) -> None:
    """A process killed between Optuna creating a trial and the objective claiming it left no pid."""
    import optuna

    from wsss.tuning import HOST_ATTR, UNCLAIMED_GRACE_S, claim_trial, fail_orphaned_trials

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}", direction="maximize")
    old, half, fresh, mine = study.ask(), study.ask(), study.ask(), study.ask()
    claim_trial(mine)  # this live process: never failed
    half.set_user_attr(HOST_ATTR, socket.gethostname())  # killed between claim_trial's two writes
    long_ago = datetime.datetime.now() - datetime.timedelta(seconds=UNCLAIMED_GRACE_S + 5)
    with contextlib.closing(sqlite3.connect(tmp_path / "o.db")) as con, con:
        for trial in (old, half):
            con.execute("UPDATE trials SET datetime_start = ? WHERE number = ?",
                        (long_ago.strftime("%Y-%m-%d %H:%M:%S.%f"), trial.number))
    assert fail_orphaned_trials(study) == [old.number, half.number]
    states = {t.number: t.state for t in study.trials}
    assert states[fresh.number] == states[mine.number] == optuna.trial.TrialState.RUNNING

