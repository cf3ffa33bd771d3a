"""relabel and the reward side of labeling: statistics and argmax labels from scores/ alone (plain; no
model, no Ray). ``workflows.label`` writes the scores and then calls these.

    run_relabel(cfg)   # new weights or metric -> labels/<tag>/ from scores/ + stats.json

Statistics [I]: ``stats_samples`` uniformly random (clip, assignment) pairs over ALL scored clips
(``evatok.assignment.estimate_stats``, seed ``label.seed``), per metric; written once, after the last
score shard, and reused by every relabel so labels for any weights share one normalisation. With
``label.stats=URI`` (another run's ``stats.json``, or its label output prefix) they are that run's,
frozen: a second dataset (UCF) is then labeled on the first one's (WebVid's) reward scale. ``stats.json``
records its ``source`` (the URI and SHA-256 of the frozen file, or ``computed``), and so does every
labels/ ``_DONE.json`` (``stats_source``).

Labels are named by the metric actually used: ``label.metric=lpips`` over scores whose only LPIPS column
is ``lpips_random_backbone`` (an uncalibrated backbone) writes ``labels/lpips_random_backbone-...``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from workflows import storage
from workflows.clips import shard_index, shard_name
from workflows.stage import StageError

NUM_ASSIGNMENTS = 625


class LabelError(StageError):
    pass


@dataclass
class RelabelSummary:
    labels: str
    clips: int
    written: bool
    metric: str
    w_q: float
    w_l: float
    mean_tokens: float

    @property
    def skipped(self) -> bool:
        return not self.written


# ----------------------------------------------------------------------------- layout
def labels_uri(lc, metric: str | None = None) -> str:
    """Where the labels for ``metric`` / ``lc.w_q`` / ``lc.w_l`` live (training reads this). ``metric``:
    the one actually used; by default ``lc.metric``, or ``lpips_random_backbone`` when ``lc.metric`` is
    ``lpips`` and the run's ``stats.json`` only has that."""
    if metric is None:
        metric = lc.metric
        if metric == "lpips" and lc.output:
            try:
                have = json.loads(storage.read_bytes(storage.join(lc.output, "stats.json")))["metrics"]
            except (storage.StorageError, ValueError, KeyError, TypeError):
                have = {}
            metric = _metric_name(lc, sorted(have)) if have and metric not in have else metric
    return storage.join(lc.output, "labels", f"{metric}-wq{lc.w_q:g}-wl{lc.w_l:g}")


def read_stats(uri: str) -> dict:
    """Reward normalisation statistics from another run (``label.stats``): its ``stats.json``, or the
    label output prefix that holds one; ``source`` records which file (URI, SHA-256)."""
    import hashlib

    path = uri if uri.endswith(".json") else storage.join(uri, "stats.json")
    try:
        raw = storage.read_bytes(path)
    except storage.StorageNotFound:
        raise LabelError(f"label.stats={storage.redact(uri)}: no statistics at {storage.redact(path)}") from None
    stats = json.loads(raw)
    if not isinstance(stats, dict) or "metrics" not in stats or "counts" not in stats:
        raise LabelError(f"label.stats={storage.redact(uri)}: {storage.redact(path)} is not a label run's stats.json")
    stats["source"] = {"uri": storage.redact(storage.canonical(path)), "sha256": hashlib.sha256(raw).hexdigest()}
    return stats


def stats_source(stats: dict) -> str:
    src = stats.get("source")
    return f"{src['uri']} (sha256 {src['sha256'][:12]})" if isinstance(src, dict) else "computed from this run's scores"


def scores_to_arrays(table: pa.Table) -> dict[str, np.ndarray]:
    """A scores table -> ``{metric: float32 [N, 625]}``."""
    out = {}
    for name in table.column_names:
        if name == "clip_id":
            continue
        col = table.column(name).combine_chunks()
        out[name] = np.array(col.flatten().to_numpy(zero_copy_only=False)).reshape(len(col), -1)  # writable
    return out


def _scores_table(clip_ids: list[str], tables: dict[str, np.ndarray]) -> pa.Table:
    cols = {"clip_id": pa.array(clip_ids, pa.string())}
    for name in sorted(tables):
        v = np.ascontiguousarray(tables[name], dtype=np.float32)
        cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), NUM_ASSIGNMENTS)
    return pa.table(cols)


# ----------------------------------------------------------------------------- stats and labels (plain)
def compute_stats(out: str, n_samples: int, seed: int, counts) -> dict:
    """Per-metric normalisation statistics over all score shards (deterministic: shard order, seed).
    ``counts``: the proxy's candidate token counts (they define each assignment's length).

    Streaming, one score shard in memory at a time, with exactly ``evatok.assignment.estimate_stats``'s
    result over all shards concatenated: the same random (clip, assignment) pairs (drawn from the total
    clip count with the same generator calls), gathered shard by shard, then the same float64 moments."""
    import pyarrow.parquet as pq
    import torch

    from evatok.assignment import AssignmentSpace, RewardStats, _direction

    files = storage.list_parquet(storage.join(out, "scores"))
    sizes = []
    for uri in files:
        with storage.open_read(uri) as f:
            sizes.append(pq.ParquetFile(f).metadata.num_rows)
    n = sum(sizes)
    totals = AssignmentSpace(counts).totals
    g = torch.Generator().manual_seed(seed)  # as estimate_stats: clip indices, then assignment indices
    ci = torch.randint(n, (n_samples,), generator=g).numpy()
    ai = torch.randint(len(totals), (n_samples,), generator=g).numpy()
    samples: dict[str, np.ndarray] = {}
    start = 0
    for uri, size in zip(files, sizes):
        hit = np.nonzero((ci >= start) & (ci < start + size))[0]
        if len(hit):
            for name, v in scores_to_arrays(storage.read_table(uri)).items():
                samples.setdefault(name, np.zeros(n_samples, np.float32))[hit] = v[ci[hit] - start, ai[hit]]
        start += size
    ts = totals[torch.from_numpy(ai)].double()
    stats = {}
    for name, v in samples.items():
        ds = torch.from_numpy(v).double()
        stats[name] = RewardStats(mu_d=float(ds.mean()), sigma_d=float(ds.std().clamp_min(1e-12)),
                                  mu_L=float(ts.mean()), sigma_L=float(ts.std().clamp_min(1e-12)),
                                  higher_is_better=_direction(_base(name), None)).to_dict()
    return {"metrics": stats, "counts": list(counts), "clips": n, "samples": n_samples, "seed": seed}


def _base(metric: str) -> str:
    return "lpips" if metric.startswith("lpips") else metric


def label_table(scores: pa.Table, metric: str, stats: dict, w_q: float, w_l: float, space=None) -> pa.Table:
    """Per clip: the argmax assignment of the reward (index, counts), its total length, reward, distortion."""
    from evatok.assignment import AssignmentSpace, RewardStats, best_assignment, reward

    space = space or AssignmentSpace()
    if metric not in scores.column_names:
        raise LabelError(f"scores have no {metric!r} column (have {[c for c in scores.column_names if c != 'clip_id']})")
    d = scores_to_arrays(scores.select(["clip_id", metric]))[metric]
    st = RewardStats(**stats["metrics"][metric])
    totals = space.totals.numpy()
    idx = np.asarray(best_assignment(d, totals, st, w_q, w_l), dtype=np.int64).reshape(-1)
    r = np.asarray(reward(d, totals, st, w_q, w_l)).reshape(len(idx), -1)
    rows = np.arange(len(idx))
    return pa.table({
        "clip_id": scores.column("clip_id"),
        "assignment": pa.array(idx.astype(np.int32)),  # index in [0, 625) (ARCHITECTURE order)
        "counts": pa.array(space.table.numpy()[idx].astype(np.int32).tolist(), pa.list_(pa.int32())),
        "total_tokens": pa.array(totals[idx].astype(np.int32)),
        "reward": pa.array(r[rows, idx].astype(np.float64)),
        "distortion": pa.array(d[rows, idx].astype(np.float64)),
    })


def reward_rows(labels: str, clip_ids: set[str] | None = None) -> dict[str, np.ndarray]:
    """clip_id -> the 625 rewards behind a labels/ prefix (its weights, metric and statistics),
    recomputed from scores/: what the router's reward percentile is measured against."""
    from evatok.assignment import AssignmentSpace, RewardStats, reward

    info = storage.read_done(labels)
    if info is None or "scores" not in info:
        raise LabelError(f"{storage.redact(labels)} is not a finished labels/ prefix (no _DONE.json with scores)")
    metric = info["metric"]
    totals, st = AssignmentSpace(info["counts"]).totals.numpy(), RewardStats(**info["stats"])
    out = {}
    for uri in storage.list_parquet(info["scores"]):  # one score shard in memory at a time
        table = storage.read_table(uri, columns=["clip_id", metric])
        ids = [str(c) for c in table.column("clip_id").to_pylist()]
        keep = [i for i, c in enumerate(ids) if clip_ids is None or c in clip_ids]
        if not keep:
            continue
        d = scores_to_arrays(table)[metric][keep]
        r = np.asarray(reward(d, totals, st, info["w_q"], info["w_l"]), dtype=np.float32)
        out.update((ids[i], r[j]) for j, i in enumerate(keep))
    return out


def _metric_name(lc, available: list[str]) -> str:
    if lc.metric in available:
        return lc.metric
    if lc.metric == "lpips" and "lpips_random_backbone" in available:
        return "lpips_random_backbone"
    raise LabelError(f"label.metric={lc.metric!r} is not among the recorded metrics {available}"
                     + ("; LPIPS needs label.lpips_backbone" if lc.metric == "lpips" else ""))


def run_relabel(cfg, quiet: bool = False) -> RelabelSummary:
    """Labels for ``cfg.label.metric/w_q/w_l`` from scores/ and stats.json alone (no model, no Ray)."""
    from evatok.assignment import AssignmentSpace

    lc = cfg.label
    out = storage.canonical(lc.output)
    stats_uri = storage.join(out, "stats.json")
    if not storage.exists(stats_uri):
        raise LabelError(f"no stats.json under {storage.redact(out)}: run `label` first (scores are incomplete)")
    stats = json.loads(storage.read_bytes(stats_uri))
    if lc.stats:
        frozen = read_stats(lc.stats)
        if frozen["metrics"] != stats["metrics"] or list(frozen["counts"]) != list(stats["counts"]):
            raise LabelError(f"label.stats={storage.redact(lc.stats)}: the labels under {storage.redact(out)} are on "
                             f"other statistics ({stats_source(stats)}); label into a fresh label.output")
    metric = _metric_name(lc, sorted(stats["metrics"]))
    dest = labels_uri(lc, metric)  # named by the metric actually used
    prev = storage.read_done(dest)
    if prev is not None:
        return RelabelSummary(dest, prev["clips"], False, metric, lc.w_q, lc.w_l, prev["mean_tokens"])
    n, tokens = 0, 0.0
    for uri in storage.list_parquet(storage.join(out, "scores")):
        labels = label_table(storage.read_table(uri, columns=["clip_id", metric]), metric, stats, lc.w_q, lc.w_l,
                             AssignmentSpace(stats["counts"]))
        storage.write_parquet(labels, storage.join(dest, shard_name(shard_index(uri))))
        n += labels.num_rows
        tokens += float(np.sum(labels.column("total_tokens").to_numpy()))
    info = {"clips": n, "metric": metric, "w_q": lc.w_q, "w_l": lc.w_l, "stats": stats["metrics"][metric],
            "stats_source": stats_source(stats),
            "counts": stats["counts"], "scores": storage.join(out, "scores"), "mean_tokens": tokens / max(n, 1)}
    storage.mark_done(dest, info)
    if not quiet:
        print(f"[relabel] {n} clips, {metric} w_q={lc.w_q:g} w_l={lc.w_l:g}: mean {info['mean_tokens']:.1f} "
              f"tokens/clip, statistics {info['stats_source']} -> {storage.redact(dest)}", flush=True)
    return RelabelSummary(dest, n, True, metric, lc.w_q, lc.w_l, info["mean_tokens"])


def write_stats(out: str, lc, counts) -> dict:
    """Write the run's ``stats.json`` once its scores are complete: computed from its scores, or with
    ``lc.stats`` another run's frozen statistics (this run's rewards then on that run's scale)."""
    if lc.stats:
        stats = read_stats(lc.stats)
        if tuple(stats["counts"]) != tuple(counts):
            raise LabelError(f"label.stats={storage.redact(lc.stats)} is for token counts {stats['counts']}, "
                             f"this proxy's are {list(counts)}")
    else:
        stats = compute_stats(out, lc.stats_samples, lc.seed, counts)
    storage.write_bytes_atomic(storage.join(out, "stats.json"), json.dumps(stats, sort_keys=True).encode())
    return stats
