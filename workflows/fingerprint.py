"""Stage fingerprints: skip a stage by what it was made from, never by the name of where it lives.

A stage's fingerprint is its resolved config (the keys that change its output, input URIs included)
plus the content digest of every input:

- a dataset (Parquet prefix: clips, labels): ``dataset_digest``, one line per data file (path
  relative to the prefix + the object's etag on an object store, the SHA-256 of its bytes on a local
  disk, where there is no etag), hashed;
- a model file (proxy, router, tokenizer exports): ``storage.sha256`` of its bytes; never its size
  or etag, so a retrained model of the same size at the same path is a different input.

The protocol (``decide``), the same for every stage, with two files in the stage's record folder:
``_STAGE.json`` (the claim: written before any work, with the fingerprint) and ``_DONE.json``
(written last, with the fingerprint, the outputs and their digests, the MLflow run id):

- ``_DONE.json`` with the same fingerprint and outputs that still have their recorded digests: skip;
- a claim with the same fingerprint and no ``_DONE.json``: resume (the stage's own shard markers
  or checkpoints say what is left);
- nothing there: run;
- anything else (another fingerprint, outputs changed since, a record without a fingerprint): the
  output is *stale*. ``StaleOutputError`` names what changed, unless ``force``: then the stage starts
  afresh (``Decision.fresh``; each stage clears what it must, training picks a new Ray Train run name).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable

from workflows import storage
from workflows.stage import StageError

CLAIM = "_STAGE.json"
FORMAT = 1


class StaleOutputError(StageError):
    """The place a stage writes holds an output made from other settings or inputs."""


# ----------------------------------------------------------------------------- digests
def dataset_digest(uri: str, suffixes: tuple[str, ...] = (".parquet",)) -> str:
    """Content digest of the data files under a prefix (hidden and ``_``-prefixed files excluded)."""
    base = storage.canonical(uri).rstrip("/") + "/"
    lines = []
    for u, _size, etag in storage.list_files(uri, suffixes):
        rel = u[len(base):] if u.startswith(base) else u.rsplit("/", 1)[-1]
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        d = storage.sha256(u) if storage.local_path(u) is not None or not etag else f"etag:{etag}"
        lines.append(f"{rel}\t{d}")
    if not lines:
        raise storage.StorageNotFound(f"no data files ({', '.join(suffixes)}) under {storage.redact(uri)}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def dataset_input(uri: str, suffixes: tuple[str, ...] = (".parquet",)) -> dict:
    return {"uri": storage.canonical(uri), "digest": dataset_digest(uri, suffixes), "kind": "dataset"}


def file_input(uri: str) -> dict:
    return {"uri": storage.canonical(uri), "digest": storage.sha256(uri), "kind": "file"}


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in sorted(v.items())}
    if isinstance(v, str):
        return storage.redact(v)
    return v


@dataclass
class Fingerprint:
    stage: str
    config: dict[str, Any]                      # flat "section.key" -> value (redacted), non-defaults only
    inputs: dict[str, dict] = field(default_factory=dict)  # role -> {"uri", "digest", "kind"}
    output: str = ""                            # the main output URI (where the stage writes)

    def __post_init__(self):
        self.config = {k: _plain(v) for k, v in sorted(self.config.items())}

    @property
    def hash(self) -> str:
        body = {"format": FORMAT, "stage": self.stage, "config": self.config, "output": storage.redact(self.output),
                "inputs": {k: [storage.redact(v["uri"]), v["digest"]] for k, v in sorted(self.inputs.items())}}
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()

    @property
    def short(self) -> str:
        return self.hash[:10]

    def to_json(self) -> dict:
        return {"hash": self.hash, "stage": self.stage, "config": self.config, "output": storage.redact(self.output),
                "inputs": {k: {**v, "uri": storage.redact(v["uri"])} for k, v in self.inputs.items()}}

    def diff(self, old: dict | None) -> list[str]:
        """What differs from a recorded fingerprint, in words (``train.steps 4 -> 6``, ``input data changed``)."""
        if not old or "hash" not in old:
            return ["no fingerprint recorded (made by an older version or another tool)"]
        out = []
        oc = old.get("config", {})
        for k in sorted(set(oc) | set(self.config)):
            if oc.get(k, "<default>") != self.config.get(k, "<default>"):
                out.append(f"{k} {oc.get(k, '<default>')!r} -> {self.config.get(k, '<default>')!r}")
        oi = old.get("inputs", {})
        for k in sorted(set(oi) | set(self.inputs)):
            a, b = oi.get(k), self.inputs.get(k)
            if a is None or b is None:
                out.append(f"input {k} {'added' if a is None else 'removed'}")
            elif a.get("uri") != storage.redact(b["uri"]):
                out.append(f"input {k} moved {a.get('uri')} -> {storage.redact(b['uri'])}")
            elif a.get("digest") != b["digest"]:
                out.append(f"input {k} changed (digest {str(a.get('digest'))[:12]} -> {b['digest'][:12]})")
        if old.get("output") != storage.redact(self.output):
            out.append(f"output {old.get('output')} -> {storage.redact(self.output)}")
        if not out and old.get("hash") != self.hash:
            out.append("fingerprint format")
        return out


def section(obj: Any, prefix: str, exclude: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """A config section as flat ``prefix.key`` entries, minus ``exclude`` (top-level keys) and minus
    every entry at its default value: a setting added to the config later, at a default that keeps the
    old behaviour, then changes no fingerprint (and nothing goes stale by an upgrade alone)."""
    d = dataclasses.asdict(obj)
    default = dataclasses.asdict(type(obj)())
    out = {}
    for k, v in d.items():
        if k in exclude:
            continue
        if isinstance(v, dict) and k != "resources":
            for k2, v2 in v.items():
                if _plain(v2) != _plain((default.get(k) or {}).get(k2)):
                    out[f"{prefix}.{k}.{k2}"] = v2
        elif _plain(v) != _plain(default.get(k)):
            out[f"{prefix}.{k}"] = v
    return out


# ----------------------------------------------------------------------------- records
def read_json(uri: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(uri))
    except storage.StorageNotFound:
        return None


def read_record(place: str) -> dict | None:
    return storage.read_done(place)


def read_claim(place: str) -> dict | None:
    return read_json(storage.join(place, CLAIM))


class ConcurrentRunError(StageError):
    """Another run claimed (or took over) the same output place at the same time."""


# Claims this process holds: place -> owner token (a claim is checked against it before the record).
_HELD: dict[str, str] = {}
# The claim ``decide`` saw at a place: None (none there) or its owner token ("" for a claim without one).
_SEEN: dict[str, str | None] = {}
_UNSEEN = object()


def _owner() -> dict:
    import os
    import socket
    import time
    import uuid

    return {"token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "at": round(time.time(), 3)}


def _who(claim: dict | None) -> str:
    o = (claim or {}).get("owner") or {}
    return f"pid {o.get('pid', '?')} on {o.get('host', '?')}" if o else "another run"


def write_claim(place: str, fp: Fingerprint, **extra) -> dict:
    """Claim ``place`` for this run of the stage with fingerprint ``fp`` (after ``decide``); returns the claim.

    The claim holds the fingerprint, a ``claim_id`` (kept across resumes: the same interrupted work)
    and an ``owner`` token (new for every run that takes it). Exclusive where the store allows it:

    - nothing claimed yet: create-if-absent (local ``O_EXCL``-style link, S3 ``IfNoneMatch``); a
      concurrent run that got there first wins and this one raises ``ConcurrentRunError``;
    - a claim with our fingerprint (an interrupted run being resumed), or with another one (``decide``
      chose a fresh start): taken over by rewriting it with our owner token.

    A claim that appeared or changed owner since ``decide`` looked is a concurrent run's:
    ``ConcurrentRunError``, never a takeover. Either way the claim is read back: a store that ignores
    ``IfNoneMatch``, or a concurrent takeover, shows as another owner (``ConcurrentRunError``);
    ``check_claim`` (called by ``update_record`` and before training publishes its record) looks again
    before anything is published as done. What no claim can tell is whether the owner of an old claim
    is still alive: a second run that resumes a claim while its owner is still running takes it over,
    and the first is refused when it checks its claim (it records nothing)."""
    uri = storage.join(place, CLAIM)
    expected = _SEEN.pop(storage.canonical(place), _UNSEEN)
    old = read_json(uri)
    if old is not None and expected is not _UNSEEN and \
            ((old.get("owner") or {}).get("token") or "") != expected:
        raise ConcurrentRunError(f"{storage.redact(place)} was claimed by a concurrent run ({_who(old)}) after "
                                 f"this one looked; wait for it, then rerun (it resumes or skips)")
    owner = _owner()
    body = {"fingerprint": fp.to_json(), **extra, "owner": owner}
    same = old is not None and (old.get("fingerprint") or {}).get("hash") == fp.hash
    body["claim_id"] = old.get("claim_id") if same and old.get("claim_id") else owner["token"]
    data = json.dumps(body, sort_keys=True, default=str).encode()
    if old is None:
        if not storage.write_bytes_atomic(uri, data, exclusive=True) and \
                ((read_json(uri) or {}).get("owner") or {}).get("token") != owner["token"]:  # not our retried PUT
            raise ConcurrentRunError(f"{storage.redact(place)} was claimed by a concurrent run "
                                     f"({_who(read_json(uri))}); wait for it, then rerun (it resumes or skips)")
    else:
        storage.write_bytes_atomic(uri, data)
    _HELD[storage.canonical(place)] = owner["token"]
    check_claim(place, body)
    return body


def check_claim(place: str, claim: dict | None = None) -> None:
    """Raise ``ConcurrentRunError`` if the claim this process wrote on ``place`` (or ``claim``, as
    returned by ``write_claim``) is no longer there (a concurrent run overwrote it: a store without
    create-if-absent, or a concurrent resume)."""
    token = claim["owner"]["token"] if claim else _HELD.get(storage.canonical(place))
    if token is None:
        return
    now = read_claim(place)
    if ((now or {}).get("owner") or {}).get("token") != token:
        _HELD.pop(storage.canonical(place), None)
        raise ConcurrentRunError(f"{storage.redact(place)} was taken over by a concurrent run ({_who(now)}) "
                                 f"while this one ran: this run's output is not recorded")


def update_record(place: str, info: dict, claim: dict | None = None) -> dict:
    """Merge ``info`` into ``place/_DONE.json`` (which the stage itself may have written) and publish it,
    if this process's claim on ``place`` (or ``claim``) still holds (``check_claim``)."""
    check_claim(place, claim)
    rec = storage.read_done(place) or {}
    rec.update(info)
    storage.mark_done(place, rec)
    return rec


def outputs_changed(record: dict) -> list[str]:
    """Recorded outputs whose current digest differs (or that are gone)."""
    changed = []
    for name, o in (record.get("outputs") or {}).items():
        try:
            now = file_input(o["uri"]) if o.get("kind") == "file" else dataset_input(o["uri"])
            if now["digest"] != o.get("digest"):
                changed.append(f"output {name} at {storage.redact(o['uri'])} was modified")
        except storage.StorageNotFound:
            changed.append(f"output {name} at {storage.redact(o['uri'])} is missing")
    return changed


@dataclass
class Decision:
    action: str                  # skip | resume | run | fresh
    record: dict | None = None
    claim: dict | None = None
    reasons: list[str] = field(default_factory=list)   # why it is stale (fresh runs)

    skip = property(lambda self: self.action == "skip")
    resume = property(lambda self: self.action == "resume")
    fresh = property(lambda self: self.action == "fresh")


def decide(label: str, fp: Fingerprint, place: str, force: bool = False,
           check_outputs: Callable[[dict], list[str]] = outputs_changed) -> Decision:
    """What to do at ``place`` for a stage with fingerprint ``fp`` (see the module doc)."""
    record, claim = read_record(place), read_claim(place)
    _SEEN[storage.canonical(place)] = None if claim is None else ((claim.get("owner") or {}).get("token") or "")
    reasons: list[str] = []
    old = (record or {}).get("fingerprint")
    if old:
        if old.get("hash") == fp.hash:
            reasons = check_outputs(record)
            if not reasons:
                return Decision("skip", record, claim)
        else:
            reasons = fp.diff(old)
    elif claim is not None:
        # No finished record of ours (none at all, or the stage's own marker was published and the
        # process died before ours): the claim says which fingerprint the unfinished work belongs to.
        cfp = claim.get("fingerprint")
        if cfp and cfp.get("hash") == fp.hash:
            return Decision("resume", record, claim)
        reasons = [f"an unfinished run with other settings is there: {', '.join(fp.diff(cfp))}"]
    elif record is not None:
        reasons = fp.diff(None)
    else:
        return Decision("run", record, claim)
    if not force:
        raise StaleOutputError(f"{label}: {storage.redact(fp.output)} holds an output made otherwise "
                               f"({'; '.join(reasons)}); rerun with --force to replace it")
    return Decision("fresh", record, claim, reasons)


# ----------------------------------------------------------------------------- per-stage fingerprints
#: Training settings that change how a run goes, not what it produces.
TRAIN_RUNTIME = frozenset({"checkpoint_every", "keep_checkpoints", "max_failures", "log_every", "cache_data_mb",
                           "cpus_per_worker", "min_curve_gain_db", "val_clips", "output"})
#: Training fields that are inputs (fingerprinted by content, per model below).
TRAIN_INPUTS = frozenset({"data", "labels", "val_data", "router", "tokenizer"})
#: Tokenizer-only settings (proxy, final): not part of a router's or AR model's fingerprint.
TOKENIZER_ONLY = frozenset({"lpips_backbone", "align_encoder", "semantic_disc_encoder", "disc_start", "disc_lr"})


def train_fingerprint(cfg) -> Fingerprint:
    """What a training run's model depends on: its resolved train section, the data section, and the
    content of the data (and labels / router / tokenizer it reads)."""
    from workflows.config import ConfigError
    from workflows.train.data import parquet_prefix
    from workflows.train.loop import export_uri

    t = cfg.train
    exclude = set(TRAIN_RUNTIME | TRAIN_INPUTS)
    if t.model in ("router", "ar"):
        exclude |= TOKENIZER_ONLY
    conf = {**section(t, "train", exclude), **section(cfg.data, "data")}
    inputs = {"data": dataset_input(parquet_prefix(t.data))}
    if t.model == "router":
        if not t.labels:
            raise ConfigError("the router recipe needs train.labels (a Parquet prefix with clip_id, assignment)")
        inputs["labels"] = dataset_input(t.labels)
        if t.val_data:
            inputs["val_data"] = dataset_input(parquet_prefix(t.val_data))
    for need, models in (("router", ("final", "ar")), ("tokenizer", ("ar",))):
        if t.model in models:
            uri = getattr(t, need)
            if not uri:
                raise ConfigError(f"train {t.model} needs train.{need} (an exported {need})")
            inputs[need] = file_input(uri)
    return Fingerprint(f"train {t.model}", conf, inputs, export_uri(cfg))


def label_fingerprint(cfg) -> Fingerprint:
    """Scores and labels: the scoring settings, the reward settings, the clips and the proxy's bytes."""
    from workflows.label import clips_prefix
    from workflows.relabel import labels_uri

    lc = cfg.label
    conf = section(lc, "label", {"clips", "proxy", "output", "batch_size", "clips_per_task", "num_actors",
                                 "num_cpus_per_actor", "use_gpu", "gpus_per_actor", "max_restarts",
                                 "max_task_retries", "resources"})
    inputs = {"clips": dataset_input(clips_prefix(lc.clips)), "proxy": file_input(lc.proxy)}
    return Fingerprint("label", conf, inputs, labels_uri(lc))


def ingest_fingerprint(cfg, refs=None) -> Fingerprint:
    """Clips: the source's videos (etag on object stores, SHA-256 on local disks), the clip settings
    and the shard size (shard -> videos map)."""
    from workflows.ingest import discover

    ic = cfg.ingest
    refs = discover(ic.source, ic.split) if refs is None else refs
    h = hashlib.sha256()
    for r in refs:
        if r.error is None and r.size >= 0 and not r.etag and storage.local_path(r.uri) is not None:
            d = storage.sha256(r.uri)
        else:
            d = r.etag or r.error or ""
        h.update(f"{r.uri}\t{r.size}\t{d}\t{r.label}\n".encode())
    conf = {**section(ic, "ingest", {"output", "num_cpus_per_task", "max_concurrency", "max_retries",
                                     "decode_isolation", "decode_timeout_s", "decode_timeout_per_s", "resources",
                                     "synthetic_videos", "synthetic_seed"}),
            **section(cfg.data, "data")}
    inputs = {"videos": {"uri": storage.canonical(ic.source), "digest": h.hexdigest(), "kind": "videos",
                         "count": len(refs)}}
    return Fingerprint("ingest", conf, inputs, storage.canonical(ic.output))
