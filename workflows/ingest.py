"""ingest: videos at any URI -> fixed 16-frame clips in Parquet shards (layout: ``workflows/clips.py``).

    summary = run_ingest(cfg)     # cfg.ingest.source / cfg.ingest.output / cfg.data

Sources: a directory or prefix of videos (label = first-level folder name, so a UCF-101 tree gives
its classes; ``ingest.split="trainlist01"`` keeps the videos of ``ucfTrainTestlist/trainlist01.txt``
found beside or inside the tree), or a manifest ``.csv``/``.parquet`` with a ``uri`` column and an
optional ``label`` column (relative URIs are relative to the manifest's folder).

How it runs (docs/ARCHITECTURE.md, "Decoding"): the driver lists/stats the inputs, sorts them by video id and cuts
the sorted list into shards of ``videos_per_task`` videos, so the shard -> videos map is stable across
reruns. One Ray Data ``map_batches`` call (``batch_size=1`` shard row) per shard reads its videos
through ``storage``, decodes every window of a video in one decord pass, and publishes the clips
and errors Parquet files, then the shard marker. Frames never travel through the object store; only a
small summary row per shard returns to the driver, which builds the summary without a shuffle. The
number of concurrent tasks (``max_concurrency``, with ``num_cpus_per_task``) is what caps reads.
Each video is decoded in a child process of the task (``workflows.isolation``, on by default:
``ingest.decode_isolation``) with a deadline of ``decode_timeout_s + decode_timeout_per_s *
duration``: a decoder that hangs in native code or crashes becomes a ``timeout`` / ``decoder_crash``
row for that video, and the rest of its shard lands.

Bad inputs (empty, not a video, corrupt, truncated, no video stream, too short, too large, missing,
unreadable) become rows of ``errors/`` with their reason; they never fail the job and are never
dropped. Discovery turns odd listings into rows too: a file name that is not UTF-8 (``bad_uri``; the
row shows it with escapes), a split-list line that would escape the tree (``..``, ``\\``: ``unsafe_path``),
a symlinked file whose target lies outside the source tree or a symlinked folder (never followed:
``unsafe_path``; a link to a file inside the tree is read, a dangling one is ``missing``), and one
video listed with different labels (``conflicting_labels``; exact duplicates are listed once). Text
that is not UTF-8 (a Latin-1 manifest or split list) is refused with an ``IngestError`` that says
so: guessing its encoding would silently turn names into other names. Error rows are redacted
(``storage.redact``), their ``uri`` included: a URI with ``user:password@`` never reaches ``errors/``.

Retries: a shard task whose worker process dies (node lost, OOM kill) is retried at most
``ingest.max_retries`` times (Ray Data's default is -1, forever), then the stage fails. Storage
requests are retried with backoff by ``storage`` (botocore/s3fs/Arrow settings, then per operation);
a read or HEAD that still fails *transiently* (5xx, throttling, timeouts) is never recorded as a
fact: it fails the shard (no marker) or discovery, and the rerun resumes. Only permanent failures
(not found, access denied) become rows.
"""
from __future__ import annotations

import csv
import io
import json
import os
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pyarrow as pa

from workflows import storage
from workflows.clips import (ERROR_SCHEMA, clip_id, clip_schema, data_key, digest, frames_to_column,
                             shard_name, video_id)
from workflows.stage import (Progress, StageError, check_output, claim_output, done_shards, ensure_ray,
                             mark_shard, maybe_crash)

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
def _printable(text: str) -> str:
    """``text`` if it is valid UTF-8, else with its undecodable bytes as escapes (``\\udcff``)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _ref(uri: str, size: int, etag: str | None, label, error=None, message=None) -> VideoRef:
    label = None if label is None or str(label) == "" else str(label)
    shown = _printable(uri)
    if shown != uri or (label is not None and _printable(label) != label):
        # A local file name that is not UTF-8: ids, Parquet and JSON all need valid text.
        uri, label = shown, label and _printable(label)
        error = error or "bad_uri"
        message = message or "file name is not valid UTF-8 (undecodable bytes shown as \\udcXX); rename it"
    return VideoRef(video_id(uri, size, etag), uri, size, etag, label, error, message)


def _text(uri: str, what: str) -> str:
    """A UTF-8 text file (BOM allowed), or a clear refusal."""
    data = storage.read_bytes(uri)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise IngestError(f"{what} {storage.redact(uri)} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                          f"{e.start}); re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _stat_refs(entries: list[tuple[str, str | None]]) -> list[VideoRef]:
    """HEAD every (uri, label) in parallel; a missing/unreadable one becomes an error ref. A transient
    failure (still failing after the storage retries) is raised instead: a video's id and the
    stage's fingerprint never depend on a HEAD that happened to fail."""
    def one(e):
        uri, label = e
        try:
            size, etag = storage.info(uri)
            return _ref(uri, size, etag, label)
        except storage.StorageNotFound as ex:
            return _ref(uri, -1, None, label, "missing", str(ex))
        except storage.TransientStorageError:
            raise
        except storage.StorageError as ex:  # permanent: access denied, a folder, ...
            return _ref(uri, -1, None, label, "unreadable", str(ex))
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(one, entries))


def _read_manifest(uri: str) -> list[tuple[str, str | None]]:
    if uri.lower().endswith(".parquet"):
        rows = storage.read_table(uri).to_pylist()
    else:
        rows = list(csv.DictReader(io.StringIO(_text(uri, "manifest"))))
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
            lines = _text(uri, "split list").splitlines()
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
        links = {u: rest for u, *rest in storage.local_symlinks(source)}
        by_rel = {}
        for uri, size, etag in files:
            rel = uri[len(prefix):] if uri.startswith(prefix) else uri.rsplit("/", 1)[-1]
            label = rel.split("/", 1)[0] if "/" in rel else None
            by_rel[rel] = _listed_ref(uri, size, etag, label, links.get(uri))
        for uri, (target, is_dir, inside) in links.items():  # linked folders: list_files never enters them
            if is_dir and uri.startswith(prefix):
                by_rel.setdefault(uri[len(prefix):], _listed_ref(uri, -1, None, None, (target, is_dir, inside)))
        if split:
            refs = []
            for rel in _split_list(source, split):
                if rel in by_rel:
                    refs.append(by_rel[rel])
                    continue
                label = rel.split("/", 1)[0] if "/" in rel else None
                try:
                    uri = storage.join(source, rel)
                except storage.UnsafePathError:
                    refs.append(_ref(prefix + rel, -1, None, label, "unsafe_path",
                                     f"line {rel!r} of {split} would leave the source tree"))
                    continue
                refs.append(_ref(uri, -1, None, label, "missing", f"listed in {split} but not found"))
        else:
            refs = list(by_rel.values())
    return sorted(_dedupe(refs), key=lambda r: r.video_id)


def _listed_ref(uri: str, size: int, etag: str | None, label, link) -> VideoRef:
    """A listed local entry; ``link`` is ``(target, is_dir, inside)`` if it is a symlink.
    Only a link to a file inside the source tree is followed (read like the file it names)."""
    if link is None:
        return _ref(uri, size, etag, label)
    target, is_dir, inside = link
    if target is None:
        return _ref(uri, -1, None, label, "missing", "dangling symlink")
    if not inside:
        return _ref(uri, -1, None, label, "unsafe_path", "symlink to a path outside the source tree; not followed")
    if is_dir:
        return _ref(uri, -1, None, label, "unsafe_path", "symlinked folder; not followed (its videos are "
                                                          "listed under the folder it names)")
    size, etag = storage.info(target)
    return _ref(uri, size, etag, label)


def _dedupe(refs: list[VideoRef]) -> list[VideoRef]:
    """One ref per video id. Exact duplicates (the same object listed twice with one label) keep the
    first; the same object listed with different labels becomes a ``conflicting_labels`` error row
    (choosing one label would silently train on a wrong one)."""
    groups: dict[str, list[VideoRef]] = {}
    for r in refs:
        groups.setdefault(r.video_id, []).append(r)
    out = []
    for rs in groups.values():
        labels = sorted({r.label for r in rs}, key=lambda x: (x is not None, x or ""))
        if len(labels) > 1 and rs[0].error is None:
            out.append(replace(rs[0], label=None, error="conflicting_labels",
                               message=f"listed {len(rs)} times with different labels {labels}"))
        else:
            out.append(rs[0])
    return out


# ----------------------------------------------------------------------------- one shard (worker)
def _reason(e: Exception) -> str:
    from evatok.video import VideoError
    from workflows.isolation import CallTimeout, ChildCrashed

    if isinstance(e, (VideoError, CallTimeout, ChildCrashed)):
        return e.reason
    if isinstance(e, (storage.StorageNotFound, FileNotFoundError)):
        return "missing"
    if isinstance(e, (storage.StorageError, OSError)):
        return "unreadable"
    return "decode_failed"


def decode_video(ref: VideoRef, data_cfg, on_probe=None) -> tuple[list, np.ndarray]:
    """(windows, uint8 [N, T, H, W, 3]) for one video; raises VideoError / StorageError.

    ``on_probe(duration_s)``, when given, is called once the video is probed, before decoding."""
    from evatok.video import decode_clips, probe

    local = storage.local_path(ref.uri)
    src = str(local) if local is not None else storage.read_bytes(ref.uri)
    if on_probe is not None:
        on_probe(probe(src).duration_s)
    return decode_clips(src, clip_len=data_cfg.clip_len, fps=data_cfg.fps, size=data_cfg.size,
                        stride=data_cfg.stride_s, max_clips=data_cfg.max_clips_per_video)


# ----------------------------------------------------------------------------- decode isolation
# Decoding runs in a child process (``workflows.isolation``) so that a decoder that hangs in native
# code holding the GIL, or segfaults, costs one error row (``timeout`` / ``decoder_crash``) instead of
# the shard's task (which Ray would retry with the same poison video). The deadline is
# ``timeout_s + timeout_per_s * duration``: reading and probing get ``timeout_s`` alone; once the
# video's duration is known the decode gets the scaled budget. One child per Ray worker process,
# reused across videos and shards (replaced after a timeout or a crash).
DECODE_TEST_FAULT_ENV = "EVATOK_TEST_DECODE_FAULT"  # test hook: "hang:<uri part>,crash:<uri part>"
_DECODER: dict = {}


def _test_fault(spec: str | None, uri: str) -> None:
    """Test hook, in the decode child: a native hang holding the GIL, or a segfault, for matching URIs."""
    for item in (spec or "").split(","):
        kind, _, part = item.partition(":")
        if part and part in uri:
            import ctypes

            if kind == "hang":
                ctypes.PyDLL(None).sleep(3600)  # C code that keeps the GIL, like a stuck decoder
            elif kind == "crash":
                ctypes.string_at(0)  # SIGSEGV


def _decode_in_child(ref: dict, data_cfg: dict, limits: dict, budget) -> tuple[list, np.ndarray]:
    """The decode child's function: read, probe, set the duration-scaled deadline, decode."""
    from workflows.config import DataConfig

    def scaled(duration_s: float) -> None:
        budget(limits["timeout_s"] + limits["timeout_per_s"] * max(0.0, duration_s))
        _test_fault(limits.get("fault"), ref["uri"])

    return decode_video(VideoRef(**ref), DataConfig(**data_cfg), on_probe=scaled)


def _decode(ref: VideoRef, data_cfg, limits: dict | None) -> tuple[list, np.ndarray]:
    """``decode_video`` in the isolated child (``limits["isolate"]``), or in this process."""
    if not limits or not limits.get("isolate", True):
        return decode_video(ref, data_cfg)
    from workflows.isolation import ChildWorker

    worker, key = _DECODER.get("worker"), storage._env_key()
    if worker is not None and _DECODER.get("key") != key:  # the child reads storage with the env it was
        worker.close()                                       # started with: a new endpoint needs a new child
        worker = None
    if worker is None:
        worker = _DECODER["worker"] = ChildWorker("workflows.ingest:_decode_in_child")
        _DECODER["key"] = key
    limits = dict(limits, fault=os.environ.get(DECODE_TEST_FAULT_ENV))
    return worker.call((asdict(ref), asdict(data_cfg), limits), timeout_s=limits["timeout_s"])


def decode_limits(ic) -> dict:
    """The isolation settings of an ``IngestConfig``."""
    return {"isolate": ic.decode_isolation, "timeout_s": ic.decode_timeout_s, "timeout_per_s": ic.decode_timeout_per_s}


def process_shard(i: int, refs: list[VideoRef], out: str, data_cfg, limits: dict | None = None) -> dict:
    """Decode one shard's videos and publish clips/, errors/ and the shard marker. Plain Python.

    ``limits``: ``decode_limits(cfg.ingest)``; None uses the ``IngestConfig`` defaults (isolated)."""
    from workflows.config import IngestConfig

    limits = decode_limits(IngestConfig()) if limits is None else limits
    t0 = time.perf_counter()
    dkey = data_key(data_cfg.clip_len, data_cfg.size, data_cfg.fps, data_cfg.stride_s,
                    data_cfg.max_clips_per_video)
    cols = {k: [] for k in ("clip_id", "video_id", "source_uri", "window", "start_s", "fps", "label", "shape")}
    frames, errors = [], []
    for ref in refs:
        if ref.error:
            errors.append({"video_id": ref.video_id, "uri": storage.redact(ref.uri), "reason": ref.error,
                           "message": storage.redact(ref.message or "")})
            continue
        try:
            windows, clips = _decode(ref, data_cfg, limits)
        except storage.TransientStorageError as e:
            # Not a fact about the video: fail the shard (no marker, nothing recorded); Ray's task
            # retries (ingest.max_retries) or the next run redo it.
            raise IngestError(f"shard {i}: a read kept failing transiently, the shard is left undone: {e}") from None
        except Exception as e:  # noqa: BLE001 - every failure becomes an error row, by design
            msg = str(e) if _reason(e) != "decode_failed" else (
                getattr(e, "child_traceback", None) or traceback.format_exc(limit=3))
            errors.append({"video_id": ref.video_id, "uri": storage.redact(ref.uri), "reason": _reason(e),
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


def _ingest_batch(batch: dict, out: str, data_cfg: dict, limits: dict | None = None) -> dict:
    """Ray Data UDF: one shard row in, one summary row out."""
    from workflows.config import DataConfig

    dc = DataConfig(**data_cfg)
    maybe_crash("ingest")
    infos = [process_shard(int(i), [VideoRef(**r) for r in json.loads(v)], out, dc, limits)
             for i, v in zip(batch["shard"], batch["videos"])]
    return {"info": np.array([json.dumps(x) for x in infos], dtype=object)}


# ----------------------------------------------------------------------------- driver
def run_ingest(cfg, quiet: bool = False) -> IngestSummary:
    """Discover, shard, decode on Ray Data, publish; resume whatever a previous run left undone."""
    from workflows.config import absolute_uris

    t0 = time.perf_counter()
    cfg = absolute_uris(cfg)  # relative paths mean the caller's directory, not a Ray worker's
    ic, dc = cfg.ingest, cfg.data
    if not ic.output:
        raise IngestError("ingest.output is empty")
    if ic.videos_per_task < 1:
        raise IngestError("ingest.videos_per_task must be >= 1")
    if ic.max_retries < 0:
        raise IngestError("ingest.max_retries must be >= 0: retries are finite (-1 would retry a poison shard forever)")
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
                            fn_kwargs={"out": out, "data_cfg": asdict(dc), "limits": decode_limits(ic)},
                            num_cpus=ic.num_cpus_per_task, concurrency=ic.max_concurrency,
                            max_retries=ic.max_retries,
                            **({"resources": dict(ic.resources)} if ic.resources else {}))
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
    check_output(out, "ingest", fingerprint)  # a concurrent run with other settings took the prefix: refuse
    if summary.shards_written or not storage.is_done(out):
        storage.mark_done(out, {k: v for k, v in asdict(summary).items() if k != "seconds"})
    progress.line(str(summary))
    return summary
