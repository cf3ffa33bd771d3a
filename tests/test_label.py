"""label / relabel on real Ray, real mp4 clips (ingest output) and a real (random-init) proxy checkpoint.

The proxy is a micro AdaptiveTokenizer (32x32 clips, counts 1..16, one layer each side) rather than
the `tiny` preset: the plumbing is identical and a 625-assignment brute-force reference stays cheap on
2 shared cores.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from evatok.assignment import AssignmentSpace, RewardStats, best_assignment
from evatok.export import save_model
from evatok.search import score_assignments_bruteforce
from evatok.tokenizer import AdaptiveTokenizer, TokenizerConfig
from evatok.video import to_tensor
from workflows import storage
from workflows.clips import frames_from_table
from workflows.config import load_config
from workflows.ingest import run_ingest
from workflows.label import Scorer, merge_shard, run_label
from workflows.relabel import LabelError, labels_uri, reward_rows, run_relabel, scores_to_arrays
from workflows.label_units import finished_units, parquet_rows, plan_units, read_rows, unit_size

MICRO = dict(size=32, counts=(1, 2, 4, 8, 16), enc_dim=32, enc_layers=1, enc_heads=2, dec_dim=32,
             dec_layers=1, dec_heads=2, codebook_size=64, code_dim=4)


def make_proxy(uri: str, seed: int = 0) -> AdaptiveTokenizer:
    torch.manual_seed(seed)
    model = AdaptiveTokenizer(TokenizerConfig(**MICRO)).eval()
    import io

    buf = io.BytesIO()
    save_model(model, buf, meta={"note": "random init, plumbing tests"})
    storage.write_bytes_atomic(uri, buf.getvalue())
    return model


@pytest.fixture
def clips_dir(ray_local, tmp_path_factory, tiny_videos):
    """3 videos x 1 clip of 32x32, in 2 ingest shards."""
    out = tmp_path_factory.mktemp("ingest")
    srcs = tmp_path_factory.mktemp("src")
    for p in sorted(tiny_videos.glob("*.mp4"))[:3]:
        (srcs / p.name).write_bytes(p.read_bytes())
    cfg = load_config(None, [f"ingest.source={srcs}", f"ingest.output={out}", "ingest.videos_per_task=2",
                             "data.size=32", "data.fps=8", "data.max_clips_per_video=1"])
    s = run_ingest(cfg, quiet=True)
    assert s.clips == 3 and s.shards == 2
    return out


def label_cfg(clips, proxy, out, **kw):
    over = [f"label.clips={clips}", f"label.proxy={proxy}", f"label.output={out}", "label.metric=mse",
            "label.batch_size=2", "label.num_actors=2", "label.stats_samples=2000"]
    return load_config(None, over + [f"label.{k}={v}" for k, v in kw.items()])


def read_labels(uri: str):
    t = storage.read_table(uri).sort_by("clip_id")
    return t.column("clip_id").to_pylist(), t.column("assignment").to_pylist(), t.column("reward").to_numpy()


@pytest.mark.ray
@pytest.mark.slow
def test_label_equals_bruteforce_relabel_equals_fresh_run(ray_local, clips_dir, tmp_path):
    proxy = str(tmp_path / "proxy.pt")
    model = make_proxy(proxy)
    out_a, out_b = str(tmp_path / "A"), str(tmp_path / "B")
    with pytest.raises(LabelError, match="lpips_backbone"):
        run_label(label_cfg(clips_dir, proxy, out_a, metric="lpips"))

    sa = run_label(label_cfg(clips_dir, proxy, out_a), quiet=True)
    assert (sa.clips, sa.shards, sa.shards_written) == (3, 2, 2)
    clips = storage.read_table(str(clips_dir / "clips"))
    scores = storage.read_table(f"{out_a}/scores")
    assert sorted(scores.column("clip_id").to_pylist()) == sorted(clips.column("clip_id").to_pylist())

    # Reference: 625 independent full passes per clip; same tables, hence the same argmax labels.
    order = {c: i for i, c in enumerate(clips.column("clip_id").to_pylist())}
    x = to_tensor(torch.from_numpy(frames_from_table(clips)))
    ref = score_assignments_bruteforce(model, x, batch_clips=3)
    got = scores_to_arrays(scores)
    rows = [order[c] for c in scores.column("clip_id").to_pylist()]
    for name in ("mse", "psnr", "ssim"):
        np.testing.assert_allclose(got[name], ref[name].numpy()[rows], rtol=1e-4, atol=1e-5)
    stats = json.loads(storage.read_bytes(f"{out_a}/stats.json"))
    space = AssignmentSpace(MICRO["counts"])
    want = best_assignment(ref["mse"].numpy()[rows], space.totals.numpy(), RewardStats(**stats["metrics"]["mse"]), 1.2, 0.8)
    ids, assign, _ = read_labels(sa.labels)
    by_id = dict(zip(scores.column("clip_id").to_pylist(), want.tolist()))
    assert assign == [by_id[c] for c in ids]

    # Rerun: nothing written.
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "A").rglob("*")}
    again = run_label(label_cfg(clips_dir, proxy, out_a), quiet=True)
    assert again.skipped and again.clips == 3
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "A").rglob("*")} == before

    # relabel (other weights and metric) from scores alone == a fresh label run with those settings.
    other = dict(metric="psnr", w_q=2.0, w_l=0.3)
    rel = run_relabel(label_cfg(clips_dir, proxy, out_a, **other), quiet=True)
    assert rel.written and rel.labels == labels_uri(label_cfg(clips_dir, proxy, out_a, **other).label)
    assert not run_relabel(label_cfg(clips_dir, proxy, out_a, **other), quiet=True).written
    sb = run_label(label_cfg(clips_dir, proxy, out_b, num_actors=1, **other), quiet=True)
    a_ids, a_assign, a_r = read_labels(rel.labels)
    b_ids, b_assign, b_r = read_labels(sb.labels)
    assert a_ids == b_ids and a_assign == b_assign
    np.testing.assert_allclose(a_r, b_r, rtol=1e-6)


@pytest.mark.ray
@pytest.mark.slow
def test_label_survives_losing_the_node_that_runs_it(tmp_path, tiny_videos, monkeypatch, s3_server):
    """The node running the label actors dies while a unit is in flight there; the first run itself
    completes (no rerun, no catch-all) with every clip scored exactly once.

    - Provably on the victim: the actors need the custom resource ``label_node`` (``label.resources``),
      which only the victim node has until it is gone (then a replacement node with it joins, as a spot
      pool refills).
    - An event, not a timer: every unit call appends its pid to a file as it starts (the
      ``EVATOK_TEST_CRASH=0:<dir>`` hook, which never crashes with 0); the node is removed as soon as the
      first line appears, i.e. while that unit is being scored.
    - Shown by the counts: no unit had finished when the node went, and there were more unit calls
      than units (the interrupted one ran again on the replacement).
    - What survives it: Ray's actor restarts and task retries are spent within a second, long before the
      control plane declares the node dead (ActorUnavailableError); the stage then rescores the units it
      has not seen with a fresh actor pool (``label.pool_retries``). With ``label.pool_retries=0`` this
      test fails: the run raises ActorUnavailableError."""
    import ray
    from ray.cluster_utils import Cluster

    from workflows.ingest import discover, process_shard

    src, ing = tmp_path / "src", tmp_path / "ingest"
    src.mkdir()
    for p in sorted(tiny_videos.glob("*.mp4"))[:4]:
        (src / p.name).write_bytes(p.read_bytes())
    data = load_config(None, ["data.size=32", "data.fps=8", "data.max_clips_per_video=2"]).data
    for i, ref in enumerate(discover(str(src))):  # clips without Ray: 4 shards x 2 clips
        process_shard(i, [ref], str(ing), data)
    proxy = str(tmp_path / "proxy.pt")
    make_proxy(proxy)
    out = tmp_path / "L"
    cfg = label_cfg(ing, proxy, out, num_cpus_per_actor=0.5, batch_size=1, clips_per_task=1,
                    resources='{"label_node": 0.001}')
    units = 8

    if ray.is_initialized():
        ray.shutdown()
    attempts = tmp_path / "attempts"
    attempts.mkdir()
    monkeypatch.setenv("EVATOK_TEST_CRASH", f"0:{attempts}")  # inherited by the nodes started below
    node_args = {"num_cpus": 1, "object_store_memory": 120_000_000}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 120_000_000,
                                                           "include_dashboard": False})
    try:
        victim = cluster.add_node(**node_args, resources={"label_node": 1})
        cluster.add_node(**node_args)
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        cluster.wait_for_nodes()
        assert [n["NodeID"] for n in ray.nodes() if "label_node" in n["Resources"]] == [victim.node_id]

        seen: dict = {}
        result: dict = {}

        def label() -> None:  # the first run must complete: no rerun, no catch-all
            try:
                result["summary"] = run_label(cfg, quiet=True)
            except BaseException as e:  # noqa: BLE001 - handed to the test's thread, which fails on it
                result["error"] = e

        runner = threading.Thread(target=label, daemon=True)
        runner.start()
        # Ray starts and stops nodes from the main thread only: this thread watches for the event.
        calls_file = attempts / "label.attempts"
        deadline = time.monotonic() + 600
        while runner.is_alive() and time.monotonic() < deadline and not (
                calls_file.exists() and calls_file.read_text().strip()):
            time.sleep(0.02)
        if calls_file.exists() and calls_file.read_text().strip():
            seen["done"] = sum(len(finished_units(str(out), i)) for i in range(4))
            cluster.remove_node(victim, allow_graceful=False)
            seen["removed_at"] = time.monotonic()
            seen["calls"] = len(calls_file.read_text().split())
            cluster.add_node(**node_args, resources={"label_node": 1})
        runner.join(timeout=600)
        if "error" in result:
            raise result["error"]
        s = result["summary"]
        assert "removed_at" in seen, "the node was never removed"
        assert seen["done"] == 0 and seen["calls"] >= 1  # removed with a unit in flight, before any finished
        # the victim really went (the run may finish before the control plane marks it dead: wait for it)
        gone = lambda: not any(n["Alive"] for n in ray.nodes() if n["NodeID"] == victim.node_id)  # noqa: E731
        deadline = time.monotonic() + 120
        while not gone() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert gone(), "the victim node is still alive"
        calls = (attempts / "label.attempts").read_text().split()
        assert len(calls) > units, calls  # the interrupted unit was scored again
        assert set(calls) - set(calls[:seen["calls"]]), "no call after the removal: nothing ran on the new node"
    finally:
        ray.shutdown()
        cluster.shutdown()
    scores = storage.read_table(str(out / "scores"))
    clips = storage.read_table(str(ing / "clips"))
    ids = scores.column("clip_id").to_pylist()
    assert len(ids) == len(set(ids)) == clips.num_rows == s.clips == units
    assert sorted(ids) == sorted(clips.column("clip_id").to_pylist())
    assert sorted(storage.read_table(s.labels).column("clip_id").to_pylist()) == sorted(ids)


def test_relabel_from_scores_alone(tmp_path):
    """No model, no Ray: scores/ + stats.json -> labels equal to evatok.assignment's argmax."""
    from workflows.relabel import _scores_table, compute_stats

    out = str(tmp_path / "L")
    with pytest.raises(LabelError, match="stats.json"):
        run_relabel(label_cfg("x", "y", out), quiet=True)
    rng = np.random.default_rng(0)
    tables = {m: rng.random((5, 625)).astype(np.float32) for m in ("mse", "psnr", "ssim")}
    ids = [f"c{i}" for i in range(5)]
    storage.write_parquet(_scores_table(ids[:3], {m: v[:3] for m, v in tables.items()}), f"{out}/scores/shard-00000.parquet")
    storage.write_parquet(_scores_table(ids[3:], {m: v[3:] for m, v in tables.items()}), f"{out}/scores/shard-00001.parquet")
    counts = (8, 16, 32, 64, 128)
    stats = compute_stats(out, 3000, 0, counts)
    storage.write_bytes_atomic(f"{out}/stats.json", json.dumps(stats).encode())
    space = AssignmentSpace(counts)
    # streamed shard by shard, equal to estimate_stats over every clip at once
    from evatok.assignment import estimate_stats

    assert stats["clips"] == 5
    for m, v in tables.items():
        assert stats["metrics"][m] == estimate_stats(v, space.totals.numpy(), 3000, 0, metric=m).to_dict()
    for metric, wq, wl in [("mse", 1.2, 0.8), ("psnr", 2.0, 0.1)]:
        rel = run_relabel(label_cfg("x", "y", out, metric=metric, w_q=wq, w_l=wl), quiet=True)
        want = best_assignment(tables[metric], space.totals.numpy(), RewardStats(**stats["metrics"][metric]), wq, wl)
        got_ids, got, _ = read_labels(rel.labels)
        assert got_ids == ids and got == want.tolist() and rel.clips == 5
        lab = storage.read_table(rel.labels)
        assert lab.column("counts").to_pylist() == space.table[want].tolist()
    with pytest.raises(LabelError, match="lpips"):
        run_relabel(label_cfg("x", "y", out, metric="lpips"), quiet=True)
    # reward_rows streams the score shards too: every clip, or the ones asked for
    from evatok.assignment import reward

    rel = run_relabel(label_cfg("x", "y", out, metric="mse"), quiet=True)
    rows = reward_rows(rel.labels)
    want = reward(tables["mse"], space.totals.numpy(), RewardStats(**stats["metrics"]["mse"]), 1.2, 0.8)
    assert sorted(rows) == ids
    for i, c in enumerate(ids):
        np.testing.assert_allclose(rows[c], want[i], rtol=1e-6)
    assert sorted(reward_rows(rel.labels, {"c1", "c4", "nope"})) == ["c1", "c4"]


# ----------------------------------------------------------------------------- work units
def one_shard_clips(tmp_path, tiny_videos, n_videos: int = 8):
    """``n_videos`` x 3 clips of 32x32 in ONE ingest shard."""
    src, ing = tmp_path / "src", tmp_path / "ingest"
    src.mkdir()
    for p in sorted(tiny_videos.glob("*.mp4"))[:n_videos]:
        (src / p.name).write_bytes(p.read_bytes())
    s = run_ingest(load_config(None, [f"ingest.source={src}", f"ingest.output={ing}", "ingest.videos_per_task=64",
                                      "data.size=32", "data.fps=8"]), quiet=True)
    assert s.shards == 1 and s.clips == 3 * n_videos
    return ing


def test_units_plan_resume_and_merge(tmp_path):
    """No Ray: units of a shard scored in any order and any grain, a stop in between, the merge equals
    scoring the whole shard at once, in row order; reads touch only the rows asked for."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from workflows.clips import clip_schema, frames_to_column

    rng = np.random.default_rng(0)
    n = 7
    frames = rng.integers(0, 256, (n, 16, 32, 32, 3), dtype=np.uint8)
    schema = clip_schema(16, 32)
    cols = {"clip_id": [f"c{i}" for i in range(n)], "video_id": ["v"] * n, "source_uri": ["u"] * n,
            "window": list(range(n)), "start_s": [0.0] * n, "fps": [8.0] * n, "label": [None] * n,
            "shape": [[16, 32, 32, 3]] * n}
    arrays = [pa.array(cols[f.name], f.type) for f in schema if f.name != "frames"] + [frames_to_column(frames, 16, 32)]
    clips = str(tmp_path / "clips" / "shard-00000.parquet")
    (tmp_path / "clips").mkdir()
    pq.write_table(pa.Table.from_arrays(arrays, schema=schema), clips, row_group_size=3)  # 3 row groups
    assert parquet_rows(clips) == n
    assert read_rows(clips, 2, 5, ["clip_id"]).column("clip_id").to_pylist() == ["c2", "c3", "c4"]
    assert read_rows(clips, 7, 7, ["clip_id"]).num_rows == 0
    np.testing.assert_array_equal(frames_from_table(read_rows(clips, 5, 7)), frames[5:7])

    proxy = str(tmp_path / "proxy.pt")
    make_proxy(proxy)
    scorer = Scorer(proxy, batch_size=2, num_threads=1)
    out = str(tmp_path / "L")
    assert plan_units(n, [], 3) == [(0, 3), (3, 6), (6, 7)]
    for a, b in [(0, 3), (6, 7)]:  # the run "dies" after two of its three units
        info = scorer.score_unit(0, clips, a, b, out)
        assert (info["clips"], info["pid"]) == (b - a, os.getpid())
    assert finished_units(out, 0) == [(0, 3), (6, 7)]
    assert merge_shard(out, 0, n) is None  # rows 3..6 are missing: nothing is published
    todo = plan_units(n, finished_units(out, 0), 2)  # a rerun with another grain fills only the gap
    assert todo == [(3, 5), (5, 6)]
    for a, b in todo:
        scorer.score_unit(0, clips, a, b, out)
    info = merge_shard(out, 0, n)
    assert info["clips"] == n and info["units"] == 4 and info["pids"] == [os.getpid()] * 4
    got = storage.read_table(f"{out}/scores/shard-00000.parquet")
    assert got.column("clip_id").to_pylist() == cols["clip_id"]
    want = scorer.score(storage.read_table(clips))
    for name in ("mse", "psnr", "ssim"):
        np.testing.assert_allclose(scores_to_arrays(got)[name], scores_to_arrays(want)[name], rtol=1e-6)
    assert not (tmp_path / "L" / "_units" / "shard-00000").exists()
    assert json.loads((tmp_path / "L" / "_shards" / "shard-00000.json").read_text())["clips"] == n
    # units left by another grain may overlap: only a non-overlapping set counts, the gaps are planned
    assert plan_units(10, [(0, 3), (2, 5), (5, 7)], 4) == [(3, 5), (7, 10)]
    assert plan_units(0, [], 8) == [(0, 0)] and plan_units(0, [(0, 0)], 8) == []


def test_unit_size_balances_the_actors():
    # 24 clips, 2 actors, units of 8: 3 units, one actor would score 16 clips and the other 8
    assert unit_size(24, 8, 4, 2) == 6  # 4 units, 12 clips an actor
    assert unit_size(12, 8, 4, 2) == 6  # 2 units, not 3 of 4 (8 + 4)
    assert unit_size(48, 8, 4, 2) == 8  # 6 units, 3 an actor: the recipe's grain already balances
    assert unit_size(10_000, 8, 4, 2) == 8
    assert unit_size(5, 8, 4, 2) == 4  # never below one search batch ...
    assert unit_size(6, 2, 4, 2) == 2  # ... unless the recipe's unit is smaller still
    assert unit_size(0, 8, 4, 2) == 8 and unit_size(3, 1, 1, 8) == 1
    # the shards cut units too: 2 shards of 12 clips in units of 8 are 8, 4, 8, 4: 12 clips an actor
    sizes = lambda u: [b - a for n in (12, 12) for a, b in plan_units(n, [], u)]  # noqa: E731
    assert unit_size(24, 8, 4, 2, sizes=sizes) == 8 and sizes(8) == [8, 4, 8, 4]
    # 3 shards of 8: 3 units of 8 would leave 16 on one actor; units of 4 give 12 each
    sizes = lambda u: [b - a for n in (8, 8, 8) for a, b in plan_units(n, [], u)]  # noqa: E731
    assert unit_size(24, 8, 4, 2, sizes=sizes) == 4


def test_run_reset_clears_units(tmp_path):
    """`evatok run`'s reset of the label stage (``--force`` or a stale output) removes the work units of
    unfinished shards too: a rerun with another proxy would otherwise take them as scored."""
    from workflows.label_units import unit_uri
    from workflows.run import LabelStage

    out = str(tmp_path / "L")
    for uri in (unit_uri(out, 0, 0, 8), f"{out}/scores/shard-00001.parquet", f"{out}/_shards/shard-00001.json",
                f"{out}/stats.json"):
        storage.write_bytes_atomic(uri, b"x")
    assert finished_units(out, 0) == [(0, 8)]
    LabelStage().clear(load_config(None, [f"label.output={out}"]))
    assert finished_units(out, 0) == []
    assert [f for _, _, fs in os.walk(out) for f in fs] == []  # nothing of the old output is left


@pytest.mark.ray
@pytest.mark.slow
def test_one_shard_keeps_every_actor_busy(ray_local, tmp_path, tiny_videos):
    """A dataset of ONE shard is cut into work units that both actors score (by process id)."""
    ing = one_shard_clips(tmp_path, tiny_videos)
    proxy = str(tmp_path / "proxy.pt")
    make_proxy(proxy)
    s = run_label(label_cfg(ing, proxy, tmp_path / "L", clips_per_task=2, batch_size=2, num_actors=2), quiet=True)
    assert (s.shards, s.shards_written, s.units, s.units_written, s.clips) == (1, 1, 12, 12, 24)
    marker = json.loads((tmp_path / "L" / "_shards" / "shard-00000.json").read_text())
    assert marker["units"] == 12 and len(marker["pids"]) == 12
    assert len(set(marker["pids"])) == 2, marker["pids"]  # both actors scored units of the one shard
    ids = storage.read_table(str(tmp_path / "L" / "scores")).column("clip_id").to_pylist()
    assert ids == storage.read_table(str(ing / "clips")).column("clip_id").to_pylist()  # shard row order


_KILL_DRIVER = """
import sys, ray
from workflows.config import load_config
from workflows.label import run_label
ray.init(num_cpus=1, include_dashboard=False, object_store_memory=100_000_000, log_to_driver=False)
run_label(load_config(None, sys.argv[1:]), quiet=True)
"""


def _kill_session(sid: int) -> None:
    """SIGKILL every process of the session ``sid`` (the driver we started and the Ray it started)."""
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:  # fields after "(comm)": state ppid pgrp session ...
                try:
                    os.kill(int(d), signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.mark.ray
@pytest.mark.slow
def test_label_resumes_mid_shard_after_kill(ray_local, tmp_path, tiny_videos):
    """The whole job (driver, its Ray, the actor) is SIGKILLed in the middle of a shard; a rerun keeps
    the units published before the kill, scores only the rest, and every clip appears exactly once."""
    ing = one_shard_clips(tmp_path, tiny_videos)
    proxy = str(tmp_path / "proxy.pt")
    make_proxy(proxy)
    out = tmp_path / "L"
    over = [f"label.clips={ing}", f"label.proxy={proxy}", f"label.output={out}", "label.metric=mse",
            "label.batch_size=1", "label.num_actors=1", "label.clips_per_task=1", "label.stats_samples=2000"]
    child = subprocess.Popen([sys.executable, "-c", _KILL_DRIVER, *over], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while len(finished_units(str(out), 0)) < 2:
            assert child.poll() is None, "the first run ended before it could be killed"
            assert time.time() < deadline, "no unit was published in 180 s"
            time.sleep(0.05)
    finally:
        _kill_session(child.pid)
        child.wait(timeout=60)
    assert not (out / "_shards" / "shard-00000.json").exists()  # killed mid-shard
    kept = finished_units(str(out), 0)
    assert 2 <= len(kept) < 24
    s = run_label(load_config(None, over[:-2] + ["label.clips_per_task=5", "label.stats_samples=2000"]), quiet=True)
    assert s.units_skipped == len(kept) and s.units_written == s.units > 0
    assert s.shards_written == 1 and s.clips == 24
    scores = storage.read_table(str(out / "scores"))
    ids = scores.column("clip_id").to_pylist()
    assert ids == storage.read_table(str(ing / "clips")).column("clip_id").to_pylist()  # none missing, none twice
    assert sorted(storage.read_table(s.labels).column("clip_id").to_pylist()) == sorted(ids)
    assert not (out / "_units" / "shard-00000").exists()
