"""No credential reaches Ray's metadata: a real ingest (Ray Data tasks), label (Ray Data actor pool)
and training run (Ray Train V2 + DeepSpeed workers) with secrets in the driver's environment, then
every listing of Ray's state API (and the Train dashboard's run records) is searched for them.

Ray's state API is served by the dashboard, so this module runs its own local Ray with the dashboard
on (the session's shared Ray has none); it is shut down afterwards, and the next test that needs Ray
starts the shared one again. The secrets are in the environment *before* Ray starts, as on a real
driver: the raylet and so every worker inherit them, which is how a local run keeps working now that
the training loop no longer copies them into ``runtime_env``.
"""
from __future__ import annotations

import json
import os
import socket
import urllib.request

import pytest

from workflows import storage
from workflows.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.ray]

SECRETS = {
    "AWS_SESSION_TOKEN": "sess-token-4c1d9e2f77",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-password-88bb31",
    "MLFLOW_TRACKING_TOKEN": "mlflow-token-5e0a9c",
    "EVATOK_API_SECRET": "evatok-secret-99cc04",   # our own prefix: forwarded by name before the fix
    "RAY_DATA_SERVICE_PASSWORD": "raydata-pw-1f2e3d",  # a forwarded prefix with a *PASSWORD* name
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_with_state_api(s3_server):
    """A local Ray with the dashboard (state API) on, started with SECRETS in its environment."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    env = dict(SECRETS, RAY_TRAIN_ENABLE_STATE_TRACKING="1")  # Train V2 records its runs for the dashboard
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ctx = ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=_port(),
                   object_store_memory=300_000_000, log_to_driver=False, configure_logging=False)
    try:
        yield "http://" + ctx.dashboard_url
    finally:
        ray.shutdown()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def state_api_dump(address: str) -> dict[str, str]:
    """Every listing the state API offers, in full detail, plus Ray Train V2's run records (which hold
    each run's ``train_loop_config`` and ``worker_runtime_env``)."""
    from ray.util import state

    out = {}
    for name in ("list_actors", "list_tasks", "list_jobs", "list_workers", "list_nodes", "list_placement_groups",
                 "list_runtime_envs", "list_objects", "list_cluster_events"):
        kw = {"detail": True} if name != "list_cluster_events" else {}
        out[name] = repr(getattr(state, name)(address=address, limit=10_000, raise_on_missing_output=False, **kw))
    with urllib.request.urlopen(f"{address}/api/train/v2/runs/v1", timeout=30) as r:
        out["train_runs"] = json.dumps(json.loads(r.read()))
    return out


def test_no_secret_in_ray_state_after_ingest_label_and_training(ray_with_state_api, tiny_videos, tmp_path):
    from test_label import make_proxy
    from train_fixtures import write_clips, write_labels
    from workflows.ingest import run_ingest
    from workflows.label import run_label
    from workflows.train import run_training

    secrets = dict(SECRETS, AWS_SECRET_ACCESS_KEY=os.environ["AWS_SECRET_ACCESS_KEY"])
    src = tmp_path / "videos"
    src.mkdir()
    for p in sorted(tiny_videos.glob("*.mp4"))[:2]:
        (src / p.name).write_bytes(p.read_bytes())
    ingest = run_ingest(load_config(None, [
        f"ingest.source={src}", f"ingest.output={tmp_path / 'ingest'}", "data.size=32", "data.fps=8",
        "data.max_clips_per_video=1"]), quiet=True)
    assert ingest.clips == 2
    proxy = str(tmp_path / "proxy.pt")
    make_proxy(proxy)
    label = run_label(load_config(None, [
        f"label.clips={tmp_path / 'ingest'}", f"label.proxy={proxy}", f"label.output={tmp_path / 'label'}",
        "label.metric=mse", "label.num_actors=1", "label.stats_samples=200"]), quiet=True)
    assert label.clips == 2

    clips = write_clips(str(tmp_path / "train_clips"), n=12)
    t = storage.read_table(f"{clips}/clips", columns=["clip_id", "label"])
    labels = write_labels(str(tmp_path / "labels"), t.column("clip_id").to_pylist(), t.column("label").to_pylist())
    res = run_training(load_config(None, [
        "name=secrets", f"work_dir={tmp_path / 'runs'}", "train.model=router", "train.steps=1",
        "train.num_workers=1", "train.batch_size=4", "train.cpus_per_worker=0.5", "train.val_every=4",
        f"train.data={clips}", f"train.labels={labels}", "mlflow.system_metrics=false"]))
    assert res.steps == 1

    dump = state_api_dump(ray_with_state_api)
    # The listings did capture all three stages, and the training workers' runtime env is in them:
    # what the fix removes would be visible here.
    assert "MapBatches(_ingest_batch)" in dump["list_tasks"]
    assert "_LabelActor" in dump["list_actors"]
    assert "RayTrainWorker" in dump["list_actors"]
    assert "AWS_ENDPOINT_URL" in dump["list_actors"] and "TORCH_EXTENSIONS_DIR" in dump["list_actors"]
    assert "secrets-router" in dump["train_runs"] and "TORCH_EXTENSIONS_DIR" in dump["train_runs"]
    leaks = [(name, where) for name, value in secrets.items() for where, text in dump.items() if value in text]
    assert not leaks, f"secret values found in Ray's state: {leaks}"
