"""Shared fixtures: real services started by the tests themselves, on loopback only.

- ``s3_server``: moto's S3 API server (a real HTTP server) on 127.0.0.1, session-wide. The standard
  AWS_* variables point s3fs / pyarrow at it, exactly as a user's environment would.
- ``s3_bucket``: a fresh bucket on that server for one test.
- ``ray_local``: a real local Ray (2 CPUs, small object store), shared by the session.
- ``ray_cluster``: a ``ray.cluster_utils.Cluster`` with a 0-CPU head and two 1-CPU worker nodes.
- ``mlflow_server``: a real ``mlflow server`` (SQLite backend, local artifact root).
- ``tiny_videos``: a small synthetic dataset (real h264 mp4 files + manifest.csv).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Set before anything imports ray/mlflow/deepspeed, and inherited by every Ray worker.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keeps Ray on 127.0.0.1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RAY_OBJECT_STORE = 300_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _isolate_mlflow_uri():
    """``mlflow.set_tracking_uri`` also exports MLFLOW_TRACKING_URI: keep one test's server or SQLite
    file from becoming the next test's default."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of small models (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    on a busy 2-core box two OpenMP threads spin-wait on each other, 7-20x slower than one."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- S3 (moto server mode)
@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-do-not-log",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A new, empty bucket; returns its name. Created through boto3 against the real server."""
    import boto3

    name = f"evatok-test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


# ---------------------------------------------------------------- Ray
def _ray_init():
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=RAY_OBJECT_STORE,
            log_to_driver=True,  # worker output lands in pytest's captured output of a failing test
            configure_logging=False,
        )
    return ray


@pytest.fixture
def ray_local(s3_server):
    """A real local Ray. Depends on the S3 server so workers inherit its AWS_* environment."""
    ray = _ray_init()
    yield ray


@pytest.fixture(scope="session", autouse=True)
def _ray_shutdown_at_end():
    yield
    import sys as _sys

    if "ray" in _sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


@pytest.fixture
def ray_cluster(s3_server):
    """A real multi-node Ray: a 0-CPU head and two 1-CPU worker nodes, for fault tests."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "object_store_memory": 120_000_000, "include_dashboard": False},
    )
    workers = [cluster.add_node(num_cpus=1, object_store_memory=120_000_000) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    cluster.wait_for_nodes()
    cluster.worker_nodes_list = workers
    yield cluster
    ray.shutdown()
    cluster.shutdown()


# ---------------------------------------------------------------- MLflow
@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real tracking server on 127.0.0.1 with a SQLite backend; yields its URI."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination", str(root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        stdout=open(root / "server.log", "wb"), stderr=subprocess.STDOUT, env=env,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{uri}/health", timeout=1).status == 200:
                break
        except OSError:
            time.sleep(0.5)
        if proc.poll() is not None:
            raise RuntimeError((root / "server.log").read_text()[-2000:])
    else:
        proc.terminate()
        raise RuntimeError("mlflow server did not become healthy in 90 s")
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


# ---------------------------------------------------------------- data
@pytest.fixture(scope="session")
def tiny_videos(tmp_path_factory) -> Path:
    """Directory with 8 synthetic class-labeled mp4s (one per class) and manifest.csv."""
    from evatok import synthetic

    out = tmp_path_factory.mktemp("videos")
    synthetic.write_dataset(out, n=8, seed=0)
    return out
