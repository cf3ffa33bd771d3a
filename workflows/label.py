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

Statistics and labels (``stats.json``, ``labels/``) are ``workflows.relabel``'s: plain code over scores/.
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
from workflows.relabel import (NUM_ASSIGNMENTS, LabelError, _scores_table, run_relabel,
                              write_stats)
from workflows.stage import Progress, claim_output, done_shards, ensure_ray, mark_shard, maybe_crash

UNIT_META = b"evatok.label.unit"  # Parquet schema metadata of a unit: its info (counts, seconds, pid)
PROGRESS_EVERY_S = 5.0  # at most one unit progress line this often (shard lines always)


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


# ----------------------------------------------------------------------------- layout
def clips_prefix(uri: str) -> str:
    """Accept an ingest output prefix or its ``clips/`` folder."""
    sub = storage.join(uri, "clips")
    return sub if storage.list_parquet(sub) else storage.canonical(uri)


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
