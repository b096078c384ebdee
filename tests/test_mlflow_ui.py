"""The documented ``mlflow ui`` command serves wsss runs: start it on localhost, query its REST API, stop it.

Slow (the server takes several seconds to start), so it is out of the default run: ``make test-all``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from wsss import tracking
from wsss.config import load_params
from wsss.paths import Paths

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def test_mlflow_ui_serves_stage_runs_with_their_tags(project: Path) -> None:
    params, paths = load_params(project / "params.yaml"), Paths(project)
    paths.manifest.parent.mkdir(parents=True)
    pd.DataFrame({"id": ["a", "b"], "split": ["train", "test"]}).to_parquet(paths.manifest)
    with tracking.stage_run("make-cams", "cam_classifier-species", params, paths):
        tracking.log_metrics({"val_iou_mean": 0.42})

    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow_bin), "ui", "--backend-store-uri", "sqlite:///mlruns/mlflow.db", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, "mlflow ui exited before serving"
            assert time.monotonic() < deadline, "mlflow ui did not answer /health within 90 s"
            time.sleep(0.5)

        experiments = _post(f"{base}/api/2.0/mlflow/experiments/search", {"max_results": 50})["experiments"]
        ours = [e for e in experiments if e["name"].startswith("wsss-")]
        ids = [e["experiment_id"] for e in ours]
        assert ids, experiments
        # The kind the UI reads to open on the runs table (model training), not on the GenAI overview.
        assert all({t["key"]: t["value"] for t in e.get("tags", [])}.get("mlflow.experimentKind")
                   == "custom_model_development" for e in ours), ours
        runs = _post(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": ids, "max_results": 10})["runs"]
        tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
        assert any(t.get("wsss.stage") == "make-cams" and t.get("wsss.variant") == "cam_classifier-species"
                   and "git_commit" in t and "data_hash" in t for t in tags), tags
        metrics = {m["key"]: m["value"] for r in runs for m in r["data"].get("metrics", [])}
        assert metrics.get("val_iou_mean") == pytest.approx(0.42)
        datasets = [d["dataset"] for r in runs for d in r.get("inputs", {}).get("dataset_inputs", [])]
        assert [d["name"] for d in datasets] == ["synthetic-prepared"], datasets
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its worker, by the PID we started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode is not None
