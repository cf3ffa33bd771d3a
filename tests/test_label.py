"""label / relabel on real Ray, real mp4 clips (ingest output) and a real (random-init) proxy checkpoint.

The proxy is a micro AdaptiveTokenizer (32x32 clips, counts 1..16, one layer each side) rather than
the `tiny` preset: the plumbing is identical and a 625-assignment brute-force reference stays cheap on
2 shared cores.
"""
from __future__ import annotations

import json
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
from workflows.label import (LabelError, labels_uri, run_label, run_relabel, scores_to_arrays)

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
def test_label_survives_worker_node_loss(ray_cluster, tmp_path, tiny_videos):
    """A worker node dies mid-run: the run (or its rerun) scores every clip exactly once."""
    ray = pytest.importorskip("ray")
    src, ing = tmp_path / "src", tmp_path / "ingest"
    src.mkdir()
    for p in sorted(tiny_videos.glob("*.mp4"))[:4]:
        (src / p.name).write_bytes(p.read_bytes())
    run_ingest(load_config(None, [f"ingest.source={src}", f"ingest.output={ing}", "ingest.videos_per_task=1",
                                  "data.size=32", "data.fps=8", "data.max_clips_per_video=1"]), quiet=True)
    proxy = str(tmp_path / "proxy.pt")
    make_proxy(proxy)
    cfg = label_cfg(ing, proxy, tmp_path / "L", num_cpus_per_actor=0.5, batch_size=1)
    victim = ray_cluster.worker_nodes_list[0]
    killer = threading.Timer(6.0, lambda: ray_cluster.remove_node(victim, allow_graceful=False))
    killer.start()
    try:
        s = run_label(cfg, quiet=True)
    except Exception:  # noqa: BLE001 - the contract allows the rerun to finish the job
        killer.join()
        s = run_label(cfg, quiet=True)
    killer.join()
    assert not any(n["Alive"] and n["NodeManagerAddress"] == victim.address.split(":")[0] and
                   n["NodeID"] == victim.unique_id for n in ray.nodes())
    scores = storage.read_table(str(tmp_path / "L" / "scores"))
    clips = storage.read_table(str(ing / "clips"))
    ids = scores.column("clip_id").to_pylist()
    assert len(ids) == len(set(ids)) == clips.num_rows == s.clips == 4
    assert sorted(ids) == sorted(clips.column("clip_id").to_pylist())
    labels = storage.read_table(s.labels).column("clip_id").to_pylist()
    assert sorted(labels) == sorted(ids)
    assert sorted(p.name for p in (tmp_path / "L" / "scores").iterdir()) == [f"shard-{i:05d}.parquet" for i in range(4)]


def test_relabel_from_scores_alone(tmp_path):
    """No model, no Ray: scores/ + stats.json -> labels equal to evatok.assignment's argmax."""
    from workflows.label import _scores_table, compute_stats

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
    for metric, wq, wl in [("mse", 1.2, 0.8), ("psnr", 2.0, 0.1)]:
        rel = run_relabel(label_cfg("x", "y", out, metric=metric, w_q=wq, w_l=wl), quiet=True)
        want = best_assignment(tables[metric], space.totals.numpy(), RewardStats(**stats["metrics"][metric]), wq, wl)
        got_ids, got, _ = read_labels(rel.labels)
        assert got_ids == ids and got == want.tolist() and rel.clips == 5
        lab = storage.read_table(rel.labels)
        assert lab.column("counts").to_pylist() == space.table[want].tolist()
    with pytest.raises(LabelError, match="lpips"):
        run_relabel(label_cfg("x", "y", out, metric="lpips"), quiet=True)
