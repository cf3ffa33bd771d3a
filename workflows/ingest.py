"""ingest: videos at any URI -> fixed 16-frame clips in Parquet shards (layout: ``workflows/clips.py``).

    summary = run_ingest(cfg)     # cfg.ingest.source / cfg.ingest.output / cfg.data

Sources: a directory or prefix of videos (label = first-level folder name, so a UCF-101 tree gives
its classes; ``ingest.split="trainlist01"`` keeps the videos of ``ucfTrainTestlist/trainlist01.txt``
found beside or inside the tree), or a manifest ``.csv``/``.parquet`` with a ``uri`` column and an
optional ``label`` column (relative URIs are relative to the manifest's folder).

How it runs (DESIGN.md "Decoding"): the driver lists/stats the inputs, sorts them by video id and cuts
the sorted list into shards of ``videos_per_task`` videos, so the shard -> videos map is stable across
reruns. One Ray Data ``map_batches`` call (``batch_size=1`` shard row) per shard reads its videos
through ``storage``, decodes every window of a video in one decord pass, and publishes the clips
and errors Parquet files, then the shard marker. Frames never travel through the object store; only a
small summary row per shard returns to the driver, which builds the summary without a shuffle. The
number of concurrent tasks (``max_concurrency``, with ``num_cpus_per_task``) is what caps reads.

Bad inputs (empty, not a video, corrupt, truncated, no video stream, too short, missing, unreadable)
become rows of ``errors/`` with their reason; they never fail the job and are never dropped.
"""
from __future__ import annotations

import csv
import io
import json
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from workflows import storage
from workflows.clips import (ERROR_SCHEMA, clip_id, clip_schema, data_key, digest, frames_to_column,
                             shard_name, video_id)
from workflows.stage import Progress, StageError, claim_output, done_shards, ensure_ray, mark_shard

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".flv")
MANIFEST_SUFFIXES = (".csv", ".parquet")


class IngestError(StageError):
    pass


@dataclass(frozen=True)
class VideoRef:
    video_id: str
    uri: str
    size: int
    etag: str | None
    label: str | None
    error: str | None = None      # a reason found while listing (missing, bad_uri): no read is tried
    message: str | None = None


@dataclass
class IngestSummary:
    output: str
    videos: int = 0
    clips: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    shards: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    seconds: float = 0.0

    @property
    def skipped(self) -> bool:
        """True when the run found every shard done and wrote nothing."""
        return self.shards_written == 0

    def __str__(self) -> str:
        errs = ", ".join(f"{k}={v}" for k, v in sorted(self.errors.items())) or "none"
        return (f"ingest: {self.videos} videos -> {self.clips} clips, errors: {errs}; shards "
                f"{self.shards_written} written, {self.shards_skipped} skipped ({self.seconds:.1f}s) "
                f"-> {storage.redact(self.output)}")


# ----------------------------------------------------------------------------- discovery (driver)
def _ref(uri: str, size: int, etag: str | None, label, error=None, message=None) -> VideoRef:
    label = None if label is None or str(label) == "" else str(label)
    return VideoRef(video_id(uri, size, etag), uri, size, etag, label, error, message)


def _stat_refs(entries: list[tuple[str, str | None]]) -> list[VideoRef]:
    """HEAD every (uri, label) in parallel; a missing/unreadable one becomes an error ref."""
    def one(e):
        uri, label = e
        try:
            size, etag = storage.info(uri)
            return _ref(uri, size, etag, label)
        except storage.StorageNotFound as ex:
            return _ref(uri, -1, None, label, "missing", str(ex))
        except storage.StorageError as ex:
            return _ref(uri, -1, None, label, "unreadable", str(ex))
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(one, entries))


def _read_manifest(uri: str) -> list[tuple[str, str | None]]:
    if uri.lower().endswith(".parquet"):
        rows = storage.read_table(uri).to_pylist()
    else:
        rows = list(csv.DictReader(io.StringIO(storage.read_bytes(uri).decode("utf-8-sig"))))
    if rows and "uri" not in rows[0] and "path" not in rows[0]:
        raise IngestError(f"manifest {storage.redact(uri)} needs a 'uri' column, has {sorted(rows[0])}")
    base = storage.canonical(uri).rsplit("/", 1)[0]
    return [(_resolve(base, str(r.get("uri") or r.get("path") or "").strip()), r.get("label")) for r in rows]


def _resolve(base: str, u: str) -> str:
    try:
        if "://" in u or u.startswith("/"):
            return storage.canonical(u)
        return storage.join(base, u)
    except storage.StorageError:  # '..', empty, unknown scheme
        return "bad-uri:" + u  # becomes an error row below


def _split_list(source: str, split: str) -> list[str]:
    name = split if split.endswith(".txt") else f"{split}.txt"
    parent = source.rstrip("/").rsplit("/", 1)[0]
    for base in (source, parent):
        uri = storage.join(base, "ucfTrainTestlist", name)
        if storage.exists(uri):
            lines = storage.read_bytes(uri).decode().splitlines()
            return [ln.split()[0] for ln in lines if ln.strip()]
    raise IngestError(f"split list ucfTrainTestlist/{name} not found in or beside {storage.redact(source)}")


def discover(source: str, split: str | None = None) -> list[VideoRef]:
    """Every input video as a ``VideoRef``, sorted by video id (the shard order)."""
    if not source:
        raise IngestError("ingest.source is empty")
    source = storage.canonical(source)
    if source.lower().endswith(MANIFEST_SUFFIXES):
        if not storage.exists(source):
            raise IngestError(f"manifest {storage.redact(source)} does not exist")
        entries = _read_manifest(source)
        refs = [_ref(u, -1, None, lab, "bad_uri", f"unsafe or unsupported uri {u[8:]!r}")
                if u.startswith("bad-uri:") else None for u, lab in entries]
        todo = [(u, lab) for (u, lab), r in zip(entries, refs) if r is None]
        stats = iter(_stat_refs(todo))
        refs = [r if r is not None else next(stats) for r in refs]
    else:
        files = storage.list_files(source, VIDEO_SUFFIXES)
        if not files:
            raise IngestError(f"no videos ({', '.join(VIDEO_SUFFIXES)}) under {storage.redact(source)}")
        prefix = source.rstrip("/") + "/"
        by_rel = {}
        for uri, size, etag in files:
            rel = uri[len(prefix):] if uri.startswith(prefix) else uri.rsplit("/", 1)[-1]
            label = rel.split("/", 1)[0] if "/" in rel else None
            by_rel[rel] = _ref(uri, size, etag, label)
        if split:
            refs = []
            for rel in _split_list(source, split):
                if rel in by_rel:
                    refs.append(by_rel[rel])
                else:
                    uri = storage.join(source, rel)
                    refs.append(_ref(uri, -1, None, rel.split("/", 1)[0] if "/" in rel else None,
                                     "missing", f"listed in {split} but not found"))
        else:
            refs = list(by_rel.values())
    unique = {r.video_id: r for r in reversed(refs)}  # duplicates (same object twice): keep the first
    return sorted(unique.values(), key=lambda r: r.video_id)


# ----------------------------------------------------------------------------- one shard (worker)
def _reason(e: Exception) -> str:
    from evatok.video import VideoError

    if isinstance(e, VideoError):
        return e.reason
    if isinstance(e, (storage.StorageNotFound, FileNotFoundError)):
        return "missing"
    if isinstance(e, (storage.StorageError, OSError)):
        return "unreadable"
    return "decode_failed"


def decode_video(ref: VideoRef, data_cfg) -> tuple[list, np.ndarray]:
    """(windows, uint8 [N, T, H, W, 3]) for one video; raises VideoError / StorageError."""
    from evatok.video import decode_clips

    local = storage.local_path(ref.uri)
    src = str(local) if local is not None else storage.read_bytes(ref.uri)
    return decode_clips(src, clip_len=data_cfg.clip_len, fps=data_cfg.fps, size=data_cfg.size,
                        stride=data_cfg.stride_s, max_clips=data_cfg.max_clips_per_video)


def process_shard(i: int, refs: list[VideoRef], out: str, data_cfg) -> dict:
    """Decode one shard's videos and publish clips/, errors/ and the shard marker. Plain Python."""
    t0 = time.perf_counter()
    dkey = data_key(data_cfg.clip_len, data_cfg.size, data_cfg.fps, data_cfg.stride_s,
                    data_cfg.max_clips_per_video)
    cols = {k: [] for k in ("clip_id", "video_id", "source_uri", "window", "start_s", "fps", "label", "shape")}
    frames, errors = [], []
    for ref in refs:
        if ref.error:
            errors.append({"video_id": ref.video_id, "uri": ref.uri, "reason": ref.error,
                           "message": storage.redact(ref.message or "")})
            continue
        try:
            windows, clips = decode_video(ref, data_cfg)
        except Exception as e:  # noqa: BLE001 - every failure becomes an error row, by design
            msg = str(e) if _reason(e) != "decode_failed" else traceback.format_exc(limit=3)
            errors.append({"video_id": ref.video_id, "uri": ref.uri, "reason": _reason(e),
                           "message": storage.redact(msg)[:2000]})
            continue
        fps = data_cfg.fps
        for w in windows:
            cols["clip_id"].append(clip_id(ref.video_id, w.index, dkey))
            cols["video_id"].append(ref.video_id)
            cols["source_uri"].append(ref.uri)
            cols["window"].append(w.index)
            cols["start_s"].append(float(w.start_s))
            cols["fps"].append(float(fps) if fps else float("nan"))
            cols["label"].append(ref.label)
            cols["shape"].append(list(clips.shape[1:]))
        frames.append(clips)
    schema = clip_schema(data_cfg.clip_len, data_cfg.size)
    allf = np.concatenate(frames) if frames else np.zeros((0, data_cfg.clip_len, data_cfg.size,
                                                           data_cfg.size, 3), np.uint8)
    arrays = [pa.array(cols[f.name], type=f.type) for f in schema if f.name != "frames"]
    arrays.append(frames_to_column(allf, data_cfg.clip_len, data_cfg.size))
    storage.write_parquet(pa.Table.from_arrays(arrays, schema=schema), storage.join(out, "clips", shard_name(i)))
    storage.write_parquet(pa.Table.from_pylist(errors, schema=ERROR_SCHEMA),
                          storage.join(out, "errors", shard_name(i)))
    counts: dict[str, int] = {}
    for e in errors:
        counts[e["reason"]] = counts.get(e["reason"], 0) + 1
    info = {"shard": i, "videos": len(refs), "clips": int(allf.shape[0]), "errors": counts,
            "seconds": round(time.perf_counter() - t0, 3)}
    mark_shard(out, i, info)
    return info


def _ingest_batch(batch: dict, out: str, data_cfg: dict) -> dict:
    """Ray Data UDF: one shard row in, one summary row out."""
    from workflows.config import DataConfig

    dc = DataConfig(**data_cfg)
    infos = [process_shard(int(i), [VideoRef(**r) for r in json.loads(v)], out, dc)
             for i, v in zip(batch["shard"], batch["videos"])]
    return {"info": np.array([json.dumps(x) for x in infos], dtype=object)}


# ----------------------------------------------------------------------------- driver
def run_ingest(cfg, quiet: bool = False) -> IngestSummary:
    """Discover, shard, decode on Ray Data, publish; resume whatever a previous run left undone."""
    t0 = time.perf_counter()
    ic, dc = cfg.ingest, cfg.data
    if not ic.output:
        raise IngestError("ingest.output is empty")
    if ic.videos_per_task < 1:
        raise IngestError("ingest.videos_per_task must be >= 1")
    out = storage.canonical(ic.output)
    refs = discover(ic.source, ic.split)
    shards = [refs[k:k + ic.videos_per_task] for k in range(0, len(refs), ic.videos_per_task)]
    fingerprint = {"format": 1, "source": storage.redact(storage.canonical(ic.source)), "split": ic.split,
                   "data": asdict(dc), "videos_per_task": ic.videos_per_task, "num_shards": len(shards),
                   "videos": digest(r.video_id for r in refs)}
    progress = Progress("ingest", len(shards), quiet)
    claim_output(out, "ingest", fingerprint)
    done = done_shards(out)
    todo = [i for i in range(len(shards)) if i not in done]
    summary = IngestSummary(out, shards=len(shards), shards_skipped=len(shards) - len(todo))
    progress.line(f"{len(refs)} videos in {len(shards)} shards; {len(todo)} to do, {len(done)} already done")
    progress.done = len(shards) - len(todo)
    infos = [done[i] for i in range(len(shards)) if i in done]
    if todo:
        ray = ensure_ray()
        from workflows.stage import quiet_data_context

        quiet_data_context(ray)
        items = [{"shard": i, "videos": json.dumps([asdict(r) for r in shards[i]])} for i in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(_ingest_batch, batch_size=1, batch_format="numpy",
                            fn_kwargs={"out": out, "data_cfg": asdict(dc)},
                            num_cpus=ic.num_cpus_per_task, concurrency=ic.max_concurrency)
        for row in ds.iter_rows():
            info = json.loads(row["info"])
            infos.append(info)
            summary.shards_written += 1
            progress.shard(f"shard {info['shard']}: {info['videos']} videos, {info['clips']} clips, "
                           f"{sum(info['errors'].values())} errors ({info['seconds']:.1f}s)")
    for info in infos:
        summary.videos += info["videos"]
        summary.clips += info["clips"]
        for k, v in info["errors"].items():
            summary.errors[k] = summary.errors.get(k, 0) + v
    summary.seconds = time.perf_counter() - t0
    if summary.shards_written or not storage.is_done(out):
        storage.mark_done(out, {k: v for k, v in asdict(summary).items() if k != "seconds"})
    progress.line(str(summary))
    return summary
