"""What the sharded Ray Data stages (ingest, label) share: fingerprints, shard markers, Ray start, logs.

A stage's output prefix is claimed by a fingerprint file written before any shard (``_<stage>.json``):
a rerun with the same inputs and config resumes; a rerun with different ones fails clearly instead of
mixing two datasets under one prefix. A shard is done when its marker ``_shards/shard-XXXXX.json``
exists; markers are published after the shard's data objects, so a killed task leaves either
nothing or complete objects that the retry overwrites with identical content.
"""
from __future__ import annotations

import json
import os
import sys
import time

from workflows import storage
from workflows.clips import shard_index, shard_name


class StageError(RuntimeError):
    """A stage cannot run as configured (bad source, output owned by another run, ...)."""


def claim_output(out: str, stage: str, fingerprint: dict) -> bool:
    """Write ``out/_<stage>.json`` or check the existing one. Returns True if it already existed.

    Create-if-absent where the store allows it (local ``O_EXCL``-style link, S3 ``IfNoneMatch``): of
    two concurrent runs with different fingerprints one creates it and the other is refused. Runs with
    the same fingerprint share the prefix safely (every object they write has the same bytes). On a
    store that ignores ``IfNoneMatch`` both writes "succeed": the claim is read back, and checked
    again before the stage publishes ``_DONE.json`` (``check_output``), so a lost race is refused."""
    uri = storage.join(out, f"_{stage}.json")
    data = json.dumps(fingerprint, sort_keys=True, default=str).encode()
    existed = not storage.write_bytes_atomic(uri, data, exclusive=True)
    check_output(out, stage, fingerprint)
    return existed


def check_output(out: str, stage: str, fingerprint: dict) -> None:
    """Raise ``StageError`` unless ``out/_<stage>.json`` holds ``fingerprint``."""
    uri = storage.join(out, f"_{stage}.json")
    want = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
    try:
        old = json.loads(storage.read_bytes(uri))
    except storage.StorageNotFound:
        raise StageError(f"{storage.redact(out)}: the {stage} claim disappeared while this run held it") from None
    if old != want:
        diff = sorted(k for k in set(old) | set(want) if old.get(k) != want.get(k))
        raise StageError(
            f"{storage.redact(out)} already holds a {stage} output made from other inputs or settings "
            f"(differs in: {', '.join(diff)}); use a new output prefix or delete the old one")


def done_shards(out: str) -> dict[int, dict]:
    """Shard index -> its marker info, for every finished shard under ``out`` (one listing)."""
    done = {}
    for uri, _, _ in storage.list_files(storage.join(out, "_shards"), (".json",)):
        done[shard_index(uri)] = json.loads(storage.read_bytes(uri))
    return done


def mark_shard(out: str, i: int, info: dict) -> None:
    storage.write_bytes_atomic(storage.join(out, "_shards", shard_name(i, "json")),
                               json.dumps(info, sort_keys=True).encode())


CRASH_ENV = "EVATOK_TEST_CRASH"


def maybe_crash(stage: str) -> None:
    """Test hook for the retry limits: ``EVATOK_TEST_CRASH=<times>:<dir>`` makes the process that runs
    a shard of any stage die abruptly (``os._exit``, as an OOM kill or a segfault would) on that
    stage's first ``times`` attempts; every attempt appends a line to ``<dir>/<stage>.attempts``. It is
    read from the worker's own environment, which only a test that starts Ray with it sets."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    times, folder = spec.split(":", 1)
    path = os.path.join(folder, f"{stage}.attempts")
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    with open(path) as f:
        attempts = sum(1 for _ in f)
    if attempts <= int(times):
        os._exit(1)


def ensure_ray():
    """Connect to the running cluster (``RAY_ADDRESS``) or start a local Ray, once."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)
    return ray


def quiet_data_context(ray) -> None:
    """The Ray Data settings every stage runs with: progress bars only on a terminal, and actor tasks
    retried when their actor's node went away mid-call (``ActorUnavailableError``: "the task may or may
    not have been executed"). Ray does not retry those by itself, even with ``max_task_retries``. Our
    units are idempotent (outputs are deterministic and published whole), so running one again is
    safe; the count stays finite (``label.max_task_retries``). Not enough for a lost node: the retries
    are spent before Ray declares the node dead and restarts the actor elsewhere (see the xfail in
    ``tests/test_label.py``)."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty() and os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS") != "1"
    retry = ctx.actor_task_retry_on_errors
    if retry is not True:
        retry = list(retry or [])
        for err in (ray.exceptions.ActorUnavailableError,):
            if err not in retry:
                retry.append(err)
        ctx.actor_task_retry_on_errors = retry


class Progress:
    """One line per finished shard (rich-free: it lands in Ray job logs and CI output alike)."""

    def __init__(self, stage: str, total: int, quiet: bool = False):
        self.stage, self.total, self.done, self.quiet = stage, total, 0, quiet
        self.t0 = time.perf_counter()

    def shard(self, text: str) -> None:
        self.done += 1
        if not self.quiet:
            el = time.perf_counter() - self.t0
            print(f"[{self.stage}] {self.done}/{self.total} shards ({el:.1f}s): {text}", flush=True)

    def line(self, text: str) -> None:
        if not self.quiet:
            print(f"[{self.stage}] {text}", flush=True)
