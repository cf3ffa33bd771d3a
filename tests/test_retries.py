"""Retries are finite and configured: a shard whose process keeps dying (a poison video that segfaults
the decoder, an OOM kill) fails the stage after ``ingest.max_retries`` / ``label.max_restarts`` +
``label.max_task_retries`` instead of being retried forever (Ray Data's defaults are -1).

The crash is real: ``workflows.stage.maybe_crash`` ``os._exit``s the Ray worker running the shard on
its first ``CRASHES`` attempts and counts every attempt in a file. It reads ``EVATOK_TEST_CRASH`` from
the worker's own environment, so this module starts its own local Ray with that variable set (the
session's shared Ray is shut down first and started again by the next test that needs it). With
infinite retries the 5th attempt would succeed and the stage would finish: these tests would fail.
"""
from __future__ import annotations

import os

import pytest

from workflows.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.ray]

CRASHES = 4  # more than any limit the tests configure, fewer than "forever"


@pytest.fixture
def crashing_ray(tmp_path, s3_server):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    attempts = tmp_path / "attempts"
    attempts.mkdir()
    old = os.environ.get("EVATOK_TEST_CRASH")
    os.environ["EVATOK_TEST_CRASH"] = f"{CRASHES}:{attempts}"
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200_000_000, log_to_driver=False,
             configure_logging=False)
    try:
        yield attempts
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("EVATOK_TEST_CRASH", None)
        else:
            os.environ["EVATOK_TEST_CRASH"] = old


def attempts(folder, stage: str) -> int:
    path = folder / f"{stage}.attempts"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_ingest_and_label_give_up_after_the_configured_retries(crashing_ray, tmp_path, tiny_videos):
    from test_label import make_proxy
    from workflows.ingest import discover, process_shard, run_ingest
    from workflows.label import run_label

    src = tmp_path / "videos"
    src.mkdir()
    (src / "v.mp4").write_bytes(sorted(tiny_videos.glob("*.mp4"))[0].read_bytes())
    base = [f"ingest.source={src}", "data.size=32", "data.fps=8", "data.max_clips_per_video=1"]
    with pytest.raises(Exception, match="(?i)crash|died|exit|unexpected"):
        run_ingest(load_config(None, base + [f"ingest.output={tmp_path / 'out'}", "ingest.max_retries=1"]),
                   quiet=True)
    assert attempts(crashing_ray, "ingest") == 2  # the first try + max_retries=1, then the stage failed
    assert not (tmp_path / "out" / "_shards").exists()

    clips = tmp_path / "clips"  # label's input, made without Ray (the plain shard function)
    cfg = load_config(None, base + [f"ingest.output={clips}"])
    process_shard(0, discover(str(src)), str(clips), cfg.data)
    proxy = str(tmp_path / "proxy.pt")
    make_proxy(proxy)
    with pytest.raises(Exception, match="(?i)crash|died|exit|unexpected"):
        run_label(load_config(None, [
            f"label.clips={clips}", f"label.proxy={proxy}", f"label.output={tmp_path / 'label'}",
            "label.metric=mse", "label.num_actors=1", "label.max_restarts=1", "label.max_task_retries=1",
            "label.pool_retries=1"]),
            quiet=True)
    # per actor pool the first try + one retry on the restarted actor; then one fresh pool (pool_retries=1)
    assert 2 < attempts(crashing_ray, "label") <= 4


def test_retry_limits_must_be_finite(tmp_path):
    from workflows.ingest import IngestError, run_ingest
    from workflows.label import run_label
    from workflows.relabel import LabelError

    with pytest.raises(IngestError, match="max_retries must be >= 0"):
        run_ingest(load_config(None, [f"ingest.source={tmp_path}", f"ingest.output={tmp_path / 'o'}",
                                      "ingest.max_retries=-1"]))
    with pytest.raises(LabelError, match="must be >= 0"):
        run_label(load_config(None, ["label.clips=x", "label.proxy=y", f"label.output={tmp_path / 'l'}",
                                     "label.max_restarts=-1"]))
    with pytest.raises(LabelError, match="must be >= 0"):
        run_label(load_config(None, ["label.clips=x", "label.proxy=y", f"label.output={tmp_path / 'l'}",
                                     "label.pool_retries=-1"]))
    defaults = load_config(None, [])
    assert (defaults.ingest.max_retries, defaults.label.max_restarts, defaults.label.max_task_retries,
            defaults.label.pool_retries) == (3, 3, 3, 2)
