"""MLflow tracking: an outage is a warning (fast), runs reopen by id or by run name, params are redacted."""
from __future__ import annotations

import socket
import time

import pytest

from workflows.tracking import Tracker, TrackingWarning, resolve_tracking_uri, safe_params


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens


def test_unreachable_server_is_a_warning_not_a_crash(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    tr = Tracker(f"http://127.0.0.1:{_dead_port()}", "evatok", "down", system_metrics=False)
    t0 = time.perf_counter()
    with pytest.warns(TrackingWarning, match="MLflow start failed"):
        assert tr.start() is None
    tr.log_params({"a": 1}); tr.log_metrics({"loss": 1.0}, step=1); tr.log_input("s3://b/x", "d"); tr.end()
    assert not tr.enabled and time.perf_counter() - t0 < 30


def test_run_reopens_by_id_and_by_name(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    a = Tracker(uri, "exp", "run-x", system_metrics=False)
    run_id = a.start()
    a.log_params({"train.lr": 1e-4, "s3.uri": "s3://user:hunter2@bucket/k", "aws_secret_access_key": "x"})
    a.log_metrics({"loss": 2.0}, step=1)
    a.log_input(str(tmp_path), name="clips", digest="abc123")
    a.end("KILLED")  # the process died (a real restart is a new process with the run left open)
    # a restart before the first checkpoint: no id known, found again by name
    b = Tracker(uri, "exp", "run-x", system_metrics=False)
    assert b.start() == run_id
    b.log_metrics({"loss": 1.0}, step=2)
    b.end()
    # a restart from a checkpoint: reopened by id even though the run finished
    c = Tracker(uri, "exp", "run-x", system_metrics=False)
    assert c.start(run_id) == run_id
    c.end()
    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2]
    assert "hunter2" not in run.data.params["s3.uri"] and "aws_secret_access_key" not in run.data.params
    assert run.inputs.dataset_inputs[0].dataset.digest == "abc123"


def test_non_zero_rank_never_talks_to_mlflow(tmp_path):
    tr = Tracker(f"sqlite:///{tmp_path}/x.db", "exp", "r", enabled=False)
    assert tr.start() is None
    assert not (tmp_path / "x.db").exists()


def test_default_uri_is_sqlite_in_work_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, str(tmp_path / "w")) == f"sqlite:///{tmp_path / 'w' / 'mlflow.db'}"
    assert resolve_tracking_uri("http://x:5000", str(tmp_path)) == "http://x:5000"
    assert safe_params({"a.password": "p", "b": None}) == {"b": ""}
    # secret-looking by word: a model URI or a count of tokens is a parameter, a token is not
    flat = {"train.tokenizer": "runs/final.pt", "train.entropy_tokens": 256, "tokenize.clips": "x",
            "x.hf_token": "t", "s3.aws_secret_access_key": "k", "y.access_key": "k", "z.api-key": "k",
            "db.Password": "p", "c.credentials": "c", "m.max_tokens": 9}
    assert sorted(safe_params(flat)) == ["m.max_tokens", "tokenize.clips", "train.entropy_tokens", "train.tokenizer"]
