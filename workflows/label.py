"""label / relabel: every clip x every assignment scored by the proxy tokenizer, then reward argmax labels.

    run_label(cfg)     # Ray Data actor pool: scores/ + stats.json + labels/<tag>/
    run_relabel(cfg)   # new weights or metric -> labels/<tag>/ from scores/ alone (no model, no Ray)

Layout under ``cfg.label.output`` (schemas in ``workflows/clips.py``)::

    _label.json                         fingerprint: clips shards (name, size, etag), proxy (uri, size, etag)
    _units/shard-XXXXX/rows-AAAAAAAA-BBBBBBBB.parquet
                                        one work unit's scores (rows [A, B) of clips shard XXXXX), while
                                        the shard is open; deleted once the shard is published
    scores/shard-XXXXX.parquet          clip_id + one float32[625] per metric (mse, psnr, ssim[, lpips]),
                                        rows in the clips shard's order
    _shards/shard-XXXXX.json            score shard markers (published last; ``pids``: the worker process
                                        that scored each unit)
    stats.json                          per metric RewardStats (mu/sigma of distortion and of length)
    labels/<metric>-wq<w_q>-wl<w_l>/    shard-XXXXX.parquet: clip_id, assignment, counts, total_tokens, reward,
                                        distortion; _DONE.json last
    _DONE.json                          the stage summary, last

Work units: the driver reads the clips shards' row counts (Parquet footers) and cuts every unfinished
shard into units of ``label.clips_per_task`` rows (fewer when the stage is too small to give every actor
several units, ``workflows.label_units.unit_size``: actors take whole units, so their sizes decide when
the last one ends);
all units go to one Ray Data actor pool (one unit in flight per actor), so every actor is busy until
the last unit and a one-shard dataset uses all of them.
An actor reads only its rows (the row groups that hold them), scores them ``batch_size`` clips at a
time with the prefix-tree walk (``evatok.search.score_assignments``) and publishes the unit atomically
under its deterministic key. When a shard's last unit arrives, the driver concatenates its units into
``scores/shard-XXXXX.parquet``, publishes the marker and deletes the units. A worker that dies
mid-unit publishes nothing for it; Ray retries the unit, and the deterministic key means a retry can
only write the same object, so every clip appears exactly once. A rerun skips shards whose marker
exists and, inside unfinished shards, units already published: at most one unit per actor is lost to a
kill. Retries are finite: an actor whose process dies is restarted at most ``label.max_restarts`` times
and a unit call is retried at most ``label.max_task_retries`` times (Ray Data's defaults are -1,
forever, which lets one poison unit hold the stage); then the stage fails with Ray's error.

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

import io
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from workflows import storage
from workflows.clips import digest, frames_from_table, shard_index, shard_name
from workflows.label_units import (UNITS, covers_rows, finished_units, parquet_rows, pick_units, plan_units,
                                   read_rows, unit_size, unit_uri)
from workflows.stage import (Progress, StageError, claim_output, done_shards, ensure_ray, mark_shard,
                             maybe_crash)

NUM_ASSIGNMENTS = 625
UNIT_META = b"evatok.label.unit"  # Parquet schema metadata of a unit: its info (counts, seconds, pid)
PROGRESS_EVERY_S = 5.0  # at most one unit progress line this often (shard lines always)


class LabelError(StageError):
    pass


@dataclass
class LabelSummary:
    output: str
    labels: str = ""
    clips: int = 0
    shards: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    units: int = 0              # work units this run had to score (finished shards and units excluded)
    units_written: int = 0
    units_skipped: int = 0      # units of unfinished shards that an earlier run had already published
    metric: str = ""
    w_q: float = 0.0
    w_l: float = 0.0
    seconds: float = 0.0

    @property
    def skipped(self) -> bool:
        return self.shards_written == 0 and self.units_written == 0

    def __str__(self) -> str:
        return (f"label: {self.clips} clips scored x {NUM_ASSIGNMENTS} assignments in {self.shards} shards "
                f"({self.shards_written} written, {self.shards_skipped} skipped; {self.units_written} work units "
                f"scored, {self.units_skipped} resumed); labels {self.metric} "
                f"w_q={self.w_q:g} w_l={self.w_l:g} -> {storage.redact(self.labels)} ({self.seconds:.1f}s)")


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
def clips_prefix(uri: str) -> str:
    """Accept an ingest output prefix or its ``clips/`` folder."""
    sub = storage.join(uri, "clips")
    return sub if storage.list_parquet(sub) else storage.canonical(uri)


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


def merge_shard(out: str, shard: int, n_rows: int) -> dict | None:
    """Publish ``scores/shard-XXXXX.parquet`` (rows in clips-shard order) and its marker from the
    shard's finished units, then delete them; None while some rows are not scored yet."""
    done = finished_units(out, shard)
    picked = ([(0, 0)] if (0, 0) in done else []) if n_rows == 0 else pick_units(done)
    if not picked or not covers_rows(picked, n_rows):
        return None
    tables, meta = [], []
    for a, b in picked:
        t = storage.read_table(unit_uri(out, shard, a, b))
        meta.append(json.loads((t.schema.metadata or {}).get(UNIT_META, b"{}")))
        tables.append(t.replace_schema_metadata(None))
    table = pa.concat_tables(tables)
    if table.num_rows != n_rows:
        raise LabelError(f"units of shard {shard} hold {table.num_rows} rows, the clips shard {n_rows}")
    storage.write_parquet(table, storage.join(out, "scores", shard_name(shard)))
    info = {"shard": shard, "clips": n_rows, "counts": meta[0].get("counts"), "units": len(picked),
            "seconds": round(sum(m.get("seconds", 0.0) for m in meta), 3),
            "pids": [m.get("pid") for m in meta]}  # which worker process scored each unit, in row order
    mark_shard(out, shard, info)
    storage.remove(storage.join(out, UNITS, f"shard-{shard:05d}"), recursive=True)
    return info


# ----------------------------------------------------------------------------- scoring (plain class)
def tune_allocator() -> bool:
    """Keep freed memory in this process's heap (glibc ``mallopt``): allocations under 32 MB come from
    the heap instead of fresh ``mmap`` pages, and the heap is not trimmed below 1 GB. The walk allocates
    and frees thousands of MB-sized temporaries; with glibc's defaults each one came back as new pages
    to fault in and zero (~1M minor page faults a batch of 4 tiny clips), which cost ~12% of the walk
    (measured: 11.4-12.2 s -> 10.0-10.4 s CPU, faults 1M -> 2-18k). Values are unchanged. Peak RSS is
    the same high-water mark; the process keeps it instead of returning it between batches. Returns
    False where there is no glibc (nothing changed)."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20) & mallopt(m_trim_threshold, 1 << 30)
                & mallopt(m_top_pad, 64 << 20))


class Scorer:
    """Loads the proxy (and LPIPS) once; scores clips tables. No Ray: the actor wraps it."""

    def __init__(self, proxy: str, batch_size: int = 4, use_gpu: bool = False,
                 lpips_backbone: str | None = None, lpips_net: str = "vgg", num_threads: int | None = None):
        import torch

        from evatok.export import load_model

        if num_threads:
            torch.set_num_threads(num_threads)
        self.allocator_tuned = tune_allocator()
        self.device = "cuda" if use_gpu else "cpu"
        self.model = load_model(io.BytesIO(storage.read_bytes(proxy)), map_location=self.device).eval()
        self.batch_size = max(1, int(batch_size))
        self.lpips = None
        if lpips_backbone:
            from evatok.metrics import LPIPS

            local = storage.local_path(lpips_backbone)
            if local is None:  # remote weights: fetch once per actor
                fd, tmp = tempfile.mkstemp(suffix=".pth")
                with os.fdopen(fd, "wb") as f:
                    f.write(storage.read_bytes(lpips_backbone))
                local = tmp
            self.lpips = LPIPS(lpips_net, backbone_path=str(local)).to(self.device)

    def score(self, clips_table: pa.Table) -> pa.Table:
        """Scores of a clips table, ``batch_size`` clips at a time: only one batch is on the device, as
        float32, at any moment; the tables come back to the host once a batch."""
        import torch

        from evatok.search import score_assignments
        from evatok.video import to_tensor

        ids = clips_table.column("clip_id").to_pylist()
        if not ids:
            names = ["mse", "psnr", "ssim"] + ([self.lpips.metric_name] if self.lpips is not None else [])
            return _scores_table([], {n: np.zeros((0, NUM_ASSIGNMENTS), np.float32) for n in names})
        frames = frames_from_table(clips_table)  # uint8 [N, T, H, W, 3], a view of the Arrow buffer
        parts: dict[str, list[np.ndarray]] = {}
        for k in range(0, len(ids), self.batch_size):
            x = to_tensor(torch.from_numpy(frames[k:k + self.batch_size]).to(self.device))
            tables = score_assignments(self.model, x, lpips=self.lpips, batch_clips=self.batch_size)
            for name, v in tables.items():
                parts.setdefault(name, []).append(v.float().cpu().numpy())
        return _scores_table(ids, {k: np.concatenate(v) for k, v in parts.items()})

    def score_unit(self, shard: int, clips_uri: str, start: int, stop: int, out: str) -> dict:
        """Score rows ``[start, stop)`` of a clips shard and publish them under their unit key."""
        t0 = time.perf_counter()
        table = read_rows(clips_uri, start, stop, columns=["clip_id", "shape", "frames"])
        scores = self.score(table)
        info = {"shard": shard, "start": start, "stop": stop, "clips": scores.num_rows,
                "counts": list(self.model.config.counts), "pid": os.getpid(),
                "seconds": round(time.perf_counter() - t0, 3)}
        scores = scores.replace_schema_metadata({UNIT_META: json.dumps(info)})
        storage.write_parquet(scores, unit_uri(out, shard, start, stop))
        return info


class _LabelActor:
    """Ray Data callable class: one model load per actor, one work unit (rows of a clips shard) per call."""

    def __init__(self, out: str, **scorer_kw):
        self.out = out
        self.scorer = Scorer(**scorer_kw)

    def __call__(self, batch: dict) -> dict:
        maybe_crash("label")
        infos = [self.scorer.score_unit(int(i), str(u), int(a), int(b), self.out)
                 for i, u, a, b in zip(batch["shard"], batch["uri"], batch["start"], batch["stop"])]
        return {"info": np.array([json.dumps(x) for x in infos], dtype=object)}


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


# ----------------------------------------------------------------------------- driver
#: Ray errors of a worker or node that went away (a spot node reclaimed, an OOM kill): the units it held are
#: rescored by a fresh actor pool, ``label.pool_retries`` times at most. Matched by name along the cause
#: chain, since Ray Data re-raises them wrapped.
_LOST = {"ActorDiedError", "ActorUnavailableError", "RayActorError", "NodeDiedError", "WorkerCrashedError",
         "OwnerDiedError", "ObjectLostError", "ObjectReconstructionFailedError", "LocalRayletDiedError"}


def _lost_worker(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if any(c.__name__ in _LOST for c in type(e).__mro__):
            return True
        e = e.__cause__ or e.__context__
    return False


def run_label(cfg, quiet: bool = False) -> LabelSummary:
    """Score every clip with the proxy on a Ray Data actor pool, then stats.json and labels.

    Work units are ``label.clips_per_task`` rows of a clips shard; all of them go to one pool of
    ``label.num_actors`` actors, so every actor is busy until the last unit, whatever the shard sizes.
    The driver merges a shard's units into ``scores/shard-XXXXX.parquet`` as soon as the last of them
    arrives, so finished shards are published (and progress is reported) while the rest run."""
    from concurrent.futures import ThreadPoolExecutor

    from ray.data import ActorPoolStrategy

    t0 = time.perf_counter()
    lc = cfg.label
    if not (lc.clips and lc.proxy and lc.output):
        raise LabelError("label.clips, label.proxy and label.output must all be set")
    if lc.max_restarts < 0 or lc.max_task_retries < 0 or lc.pool_retries < 0:
        raise LabelError("label.max_restarts, label.max_task_retries and label.pool_retries must be >= 0: retries "
                         "are finite (-1 would restart an actor that a poison shard kills forever)")
    if lc.clips_per_task < 1 or lc.batch_size < 1 or lc.num_actors < 1:
        raise LabelError("label.clips_per_task, label.batch_size and label.num_actors must be >= 1")
    if lc.metric == "lpips" and not lc.lpips_backbone:
        raise LabelError("label.metric=lpips needs label.lpips_backbone (VGG16 ImageNet weights); "
                         "or choose label.metric=mse|psnr|ssim")
    out = storage.canonical(lc.output)
    src = clips_prefix(lc.clips)
    shards = {shard_index(u): (u, s, e) for u, s, e in storage.list_files(src, (".parquet",))}
    if not shards:
        raise LabelError(f"no clips shards under {storage.redact(lc.clips)}")
    psize, petag = storage.info(lc.proxy)
    claim_output(out, "label", {
        "format": 1, "clips": digest(f"{i}:{s}:{e}" for i, (_, s, e) in sorted(shards.items())),
        "proxy": [storage.redact(storage.canonical(lc.proxy)), psize, petag],
        "lpips": [lc.lpips_backbone and storage.redact(lc.lpips_backbone), lc.lpips_net]})
    done = done_shards(out)
    open_shards = sorted(i for i in shards if i not in done)
    with ThreadPoolExecutor(16) as pool:  # footers and unit listings of the unfinished shards
        rows = dict(zip(open_shards, pool.map(lambda i: parquet_rows(shards[i][0]), open_shards)))
        finished = dict(zip(open_shards, pool.map(lambda i: finished_units(out, i), open_shards)))
    summary = LabelSummary(out, shards=len(shards), shards_skipped=len(done))
    infos = [done[i] for i in shards if i in done]
    pending: dict[int, set] = {}
    items = []
    def sizes(u: int) -> list[int]:  # the clips of each unit still to score, in units of at most u
        return [b - a for i in open_shards for a, b in plan_units(rows[i], finished[i], u)]

    per_task = unit_size(sum(sizes(lc.clips_per_task)), lc.clips_per_task, lc.batch_size, lc.num_actors, sizes)
    for i in open_shards:
        todo = plan_units(rows[i], finished[i], per_task)
        summary.units_skipped += len(pick_units(finished[i])) + ((0, 0) in finished[i])
        if not todo:  # every unit was published by an earlier run that stopped before merging
            info = merge_shard(out, i, rows[i])
            if info is None:
                raise LabelError(f"shard {i}: finished units do not cover its {rows[i]} rows")
            infos.append(info)
            summary.shards_written += 1
            continue
        pending[i] = set(todo)
        items += [{"shard": i, "uri": shards[i][0], "start": a, "stop": b} for a, b in todo]
    summary.units = len(items)
    clips_todo = sum(b - a for x in items for a, b in [(x["start"], x["stop"])])
    progress = Progress("label", len(items), quiet)
    progress.line(f"{len(shards)} clips shards ({len(done)} already scored); {len(items)} work units of <= "
                  f"{per_task} clips ({clips_todo} clips) to score, {summary.units_skipped} already scored")
    scored, shown = 0, 0.0

    def score(items: list[dict]) -> None:
        """One actor pool over ``items``; publishes each shard as its last unit lands."""
        nonlocal scored, shown
        ray = ensure_ray()
        from workflows.stage import quiet_data_context

        quiet_data_context(ray)
        n_actors = min(lc.num_actors, len(items))
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(
            _LabelActor, batch_size=1, batch_format="numpy",
            fn_constructor_kwargs=dict(out=out, proxy=storage.canonical(lc.proxy), batch_size=lc.batch_size,
                                       use_gpu=lc.use_gpu, lpips_backbone=lc.lpips_backbone,
                                       lpips_net=lc.lpips_net, num_threads=max(1, int(lc.num_cpus_per_actor))),
            # one unit in flight per actor: a unit queued behind a busy actor would idle the others at the end
            compute=ActorPoolStrategy(size=n_actors, max_tasks_in_flight_per_actor=1),
            num_cpus=lc.num_cpus_per_actor, num_gpus=lc.gpus_per_actor if lc.use_gpu else 0,
            max_restarts=lc.max_restarts, max_task_retries=lc.max_task_retries,
            **({"resources": dict(lc.resources)} if lc.resources else {}))
        for row in ds.iter_rows():
            u = json.loads(row["info"])
            i = u["shard"]
            summary.units_written += 1
            scored += u["clips"]
            el = time.perf_counter() - progress.t0
            if el - shown >= PROGRESS_EVERY_S or summary.units_written == summary.units:  # every few s
                shown = el
                progress.line(f"{summary.units_written}/{summary.units} units, {scored}/{clips_todo} clips "
                              f"({el:.1f}s, {scored / max(el, 1e-9):.2f} clips/s): last shard {i} rows "
                              f"{u['start']}-{u['stop']} ({u['seconds']:.1f}s, pid {u['pid']})")
            pending[i].discard((u["start"], u["stop"]))
            if not pending[i]:
                info = merge_shard(out, i, rows[i])
                if info is None:
                    raise LabelError(f"shard {i}: its units do not cover its {rows[i]} rows")
                infos.append(info)
                summary.shards_written += 1
                progress.line(f"shard {i}: {info['clips']} clips in {info['units']} units published")

    attempt = 0
    while items:
        try:
            score(items)
            break
        except Exception as e:  # noqa: BLE001 - only a lost worker or node is retried; the rest re-raises
            if not _lost_worker(e) or attempt >= lc.pool_retries:
                raise
            attempt += 1
            # the units whose rows the driver has not seen; one that landed unseen is rescored to the
            # same deterministic name (exactly once by key)
            items = [x for x in items if (x["start"], x["stop"]) in pending.get(x["shard"], ())]
            progress.line(f"a label worker or its node was lost ({type(e).__name__}); a fresh pool rescores "
                          f"the {len(items)} units not yet scored (retry {attempt}/{lc.pool_retries})")
            time.sleep(min(30.0, 2.0 * attempt))  # room for the control plane to replace the node
    summary.clips = sum(x["clips"] for x in infos)
    if not storage.exists(storage.join(out, "stats.json")):
        counts = {tuple(x["counts"]) for x in infos if x["clips"]}
        if len(counts) != 1:
            raise LabelError(f"score shards disagree on the proxy's token counts: {sorted(counts)}")
        write_stats(out, lc, counts.pop())
    rel = run_relabel(cfg, quiet=quiet)
    summary.labels, summary.metric, summary.w_q, summary.w_l = rel.labels, rel.metric, rel.w_q, rel.w_l
    summary.seconds = time.perf_counter() - t0
    if summary.shards_written or not storage.is_done(out):
        storage.mark_done(out, {k: v for k, v in asdict(summary).items() if k != "seconds"})
    progress.line(str(summary))
    return summary
