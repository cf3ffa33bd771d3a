"""tokenize: every clip's assignment chosen (``tokenize.mode``) and encoded by the final tokenizer.

    summary = run_tokenize(cfg)     # Ray Data actor pool -> codes/ + errors/ under cfg.tokenize.output

Layout under ``cfg.tokenize.output`` (``OUT``)::

    OUT/_tokenize.json               claim: clips shards, tokenizer / router / labels digests, mode
    OUT/calibration.json             budget mode only: the frozen lambda and how it was fitted (written
                                     once, before any shard; a rerun reads it back, never refits)
    OUT/codes/shard-XXXXX.parquet    CODES_SCHEMA, one row per encoded clip (shard numbers = clips shards)
    OUT/errors/shard-XXXXX.parquet   clip_id, video_id, reason, message: clips that could not be encoded
                                     (``no_label``: labels mode and the clip has none; ``bad_shape``: the
                                     clip is not the tokenizer's frames x size)
    OUT/_shards/shard-XXXXX.json     shard marker, published after the shard's codes and errors
    OUT/_DONE.json                   the summary, last (mode, lambda, clips, mean tokens per clip)

Modes (``evatok.routing``): ``router`` (default), ``uniform:<count>``, ``labels`` (the label stage's
max-reward labels, the oracle), ``budget:<mean tokens>``: lambda is fitted once on the driver on up
to ``tokenize.calibration_clips`` clips of training videos (held-out videos, 1 in ``val_every`` by
video id as the tokenizers' split, are never calibration clips), then every clip is routed alone with it.

Encoding: the clips of a shard are grouped by assignment and encoded ``batch_size`` at a time with one
count vector per call (no padding), so a clip's codes do not depend on which clips share its shard.
The codes of a row decode with ``tokenizer.decode(codes[None], counts[None])`` to the tokenizer's own
reconstruction of the clip under that assignment.

Markers, resume, retries as the label stage: deterministic shard names, every object published whole
(``storage``), a shard whose marker exists is skipped by a rerun, a killed actor's shard is redone by
Ray's finite retries (``max_restarts`` / ``max_task_retries``).
"""
from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from workflows import storage
from workflows.clips import digest, frames_from_table, shard_index, shard_name
from workflows.stage import Progress, StageError, claim_output, done_shards, ensure_ray, mark_shard, maybe_crash

CODES_SCHEMA = pa.schema([
    ("clip_id", pa.string()),
    ("video_id", pa.string()),
    ("label", pa.string()),              # class label of the clip (null if unknown)
    ("assignment", pa.int32()),          # index in [0, 625) (ARCHITECTURE order)
    ("counts", pa.list_(pa.int32())),    # tokens per block [4]
    ("total_tokens", pa.int32()),
    ("codes", pa.list_(pa.int32())),     # total_tokens codebook ids, block 1's first
])
ERRORS_SCHEMA = pa.schema([("clip_id", pa.string()), ("video_id", pa.string()), ("reason", pa.string()),
                           ("message", pa.string())])
#: What ``train ar`` reads of a codes dataset.
CODE_COLUMNS = ["clip_id", "label", "counts", "codes"]


class TokenizeError(StageError):
    pass


@dataclass
class TokenizeSummary:
    output: str
    mode: str = ""
    clips: int = 0
    errors: int = 0
    shards: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    mean_tokens: float = 0.0
    lam: float | None = None
    seconds: float = 0.0

    def __str__(self) -> str:
        lam = f", lambda {self.lam:.6g}" if self.lam is not None else ""
        return (f"tokenize: {self.clips} clips encoded ({self.mode}{lam}), {self.errors} error rows, "
                f"{self.mean_tokens:.1f} tokens per clip on average, {self.shards} shards ({self.shards_written} "
                f"written, {self.shards_skipped} skipped) -> {storage.redact(self.output)} ({self.seconds:.1f}s)")


def codes_uri(out: str) -> str:
    """The Parquet folder ``train ar`` reads (``train.data``)."""
    return storage.join(out, "codes")


def load_model(uri: str, device="cpu"):
    from evatok.export import load_model as _load

    return _load(io.BytesIO(storage.read_bytes(uri)), map_location=device).eval()


def read_label_map(labels: str) -> dict[str, int]:
    """clip_id -> label assignment index, from a labels/ prefix."""
    t = storage.read_table(labels, columns=["clip_id", "assignment"])
    return dict(zip((str(c) for c in t.column("clip_id").to_pylist()), (int(a) for a in t.column("assignment").to_pylist())))


def select_clips(clips: str, keep, limit: int | None = None,
                 columns: tuple[str, ...] = ("clip_id", "video_id", "label", "shape", "frames")) -> pa.Table:
    """Rows of a clips dataset (shard order, then row order) whose ``keep(clip_id, video_id)`` is true,
    at most ``limit``; reads one shard at a time and stops when it has enough."""
    from workflows.label import clips_prefix

    parts, n = [], 0
    for uri in storage.list_parquet(clips_prefix(clips)):
        t = storage.read_table(uri, columns=list(columns))
        ids, vids = t.column("clip_id").to_pylist(), t.column("video_id").to_pylist()
        mask = [bool(keep(str(c), str(v))) for c, v in zip(ids, vids)]
        t = t.filter(pa.array(mask, pa.bool_()))
        if limit is not None:
            t = t.slice(0, max(0, limit - n))
        if t.num_rows:
            parts.append(t)
            n += t.num_rows
        if limit is not None and n >= limit:
            break
    if not parts:
        return pa.table({c: pa.array([], pa.string()) for c in ("clip_id", "video_id")})
    return pa.concat_tables(parts)


def calibration_split(clips: str, val_every: int, limit: int) -> pa.Table:
    """Up to ``limit`` clips of the training videos (every video except the held-out 1 in ``val_every``,
    ``workflows.train.data.held_out``, by video id): a deterministic random sample of them, the ``limit``
    clips whose SHA-256 of ``"calibration:" + clip_id`` is smallest, read in shard order.

    Not the first ``limit`` clips in shard order: shards follow the input's order, which need not be
    random (measured on the study's 3,000 clips: lambda fitted on the first 512 gave 63.8 tokens a clip
    there and 76.6 on all clips; on random samples of 512, 70-78). The salt keeps the sample independent
    of the CRC32 splits by video and by clip id."""
    import hashlib

    from workflows.label import clips_prefix
    from workflows.train.data import held_out

    ids = storage.read_table(clips_prefix(clips), columns=["clip_id", "video_id"])
    cids, vids = list(map(str, ids.column("clip_id").to_pylist())), list(map(str, ids.column("video_id").to_pylist()))
    held = held_out(vids, val_every)
    key = lambda c: hashlib.sha256(f"calibration:{c}".encode()).digest()  # noqa: E731
    chosen = set(sorted((c for c, v in zip(cids, vids) if v not in held), key=key)[:max(0, limit)])
    return select_clips(clips, lambda c, v: c in chosen, limit)


def calibrate(router, clips_table: pa.Table, target: float, batch_size: int = 16):
    """``evatok.routing.calibrate_lambda`` on the router's log-probs of the clips of ``clips_table``."""
    import torch

    from evatok import routing
    from evatok.video import to_tensor

    if clips_table.num_rows == 0:
        raise TokenizeError("no calibration clips (every video is held out?); lower val_every or add videos")
    x = to_tensor(torch.from_numpy(np.array(frames_from_table(clips_table))))
    lp = routing.router_log_probs(router, x, batch_size)
    return routing.calibrate_lambda(lp, router.space.totals, target)


# ----------------------------------------------------------------------------- encoding (plain class)
class Encoder:
    """Loads the tokenizer (and the router or the labels the mode needs) once; encodes clips tables.
    No Ray: the actor wraps it."""

    def __init__(self, tokenizer: str, mode: str, router: str = "", labels: str = "", lam: float | None = None,
                 batch_size: int = 8, use_gpu: bool = False, num_threads: int | None = None):
        import torch

        from evatok import routing
        from evatok.assignment import AssignmentSpace

        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = "cuda" if use_gpu else "cpu"
        self.tokenizer = load_model(tokenizer, self.device)
        c = self.tokenizer.config
        self.space = AssignmentSpace(c.counts, c.num_blocks)
        self.mode = routing.parse_mode(mode, c.counts, c.num_blocks)
        self.batch_size = max(1, int(batch_size))
        self.router = self.labels = None
        self.lam = lam
        if self.mode.needs_router:
            if not router:
                raise TokenizeError(f"mode {self.mode} needs tokenize.router")
            self.router = load_model(router, self.device)
            if tuple(self.router.config.counts) != tuple(c.counts):
                raise TokenizeError(f"router counts {self.router.config.counts} != tokenizer counts {c.counts}")
        if self.mode.kind == "budget" and lam is None:
            raise TokenizeError("budget mode needs its calibrated lambda")
        if self.mode.kind == "labels":
            if not labels:
                raise TokenizeError("mode labels needs tokenize.labels (a labels/ prefix of the label stage)")
            self.labels = read_label_map(labels)

    def assignments(self, x, clip_ids: list[str]):
        """Assignment index per clip (LongTensor [N]); -1 where a clip has no label (labels mode)."""
        import torch

        from evatok import routing

        if self.mode.kind == "labels":
            return torch.tensor([self.labels.get(c, -1) for c in clip_ids], dtype=torch.long)
        lp = routing.router_log_probs(self.router, x, self.batch_size) if self.router is not None else None
        return routing.choose(self.mode, self.space, log_probs=lp, lam=self.lam, n=len(clip_ids))

    def encode_table(self, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        """A clips table -> (codes table, errors table)."""
        import torch

        from evatok.video import to_tensor

        c = self.tokenizer.config
        ids = [str(v) for v in table.column("clip_id").to_pylist()]
        vids = [str(v) for v in table.column("video_id").to_pylist()]
        labels = table.column("label").to_pylist() if "label" in table.column_names else [None] * len(ids)
        errors = []
        shapes = table.column("shape").to_pylist() if ids else []
        ok = [i for i, s in enumerate(shapes) if list(s) == [c.frames, c.size, c.size, 3]]
        for i in sorted(set(range(len(ids))) - set(ok)):
            errors.append((ids[i], vids[i], "bad_shape", f"clip shape {shapes[i]} is not the tokenizer's "
                                                         f"[{c.frames}, {c.size}, {c.size}, 3]"))
        rows: dict[int, tuple[int, list[int]]] = {}
        if ok:
            frames = frames_from_table(table.take(pa.array(ok, pa.int64())))
            x = to_tensor(torch.from_numpy(np.array(frames)))
            with torch.no_grad():
                idx = self.assignments(x.to(self.device), [ids[i] for i in ok])
            for j, i in enumerate(ok):
                if int(idx[j]) < 0:
                    errors.append((ids[i], vids[i], "no_label", "the labels have no row for this clip"))
            for a in sorted({int(v) for v in idx.tolist() if v >= 0}):
                members = [j for j in range(len(ok)) if int(idx[j]) == a]
                counts = self.space.counts(a).to(self.device)
                for s in range(0, len(members), self.batch_size):
                    part = members[s:s + self.batch_size]
                    with torch.no_grad():
                        codes, mask = self.tokenizer.encode(x[part].to(self.device), counts)
                    total = int(counts.sum())
                    for j, row in zip(part, codes[:, :total].cpu().tolist()):
                        rows[ok[j]] = (a, row)
        order = sorted(rows)
        table_out = pa.table({
            "clip_id": [ids[i] for i in order], "video_id": [vids[i] for i in order],
            "label": pa.array([labels[i] for i in order], pa.string()),
            "assignment": pa.array([rows[i][0] for i in order], pa.int32()),
            "counts": pa.array([self.space.counts(rows[i][0]).tolist() for i in order], pa.list_(pa.int32())),
            "total_tokens": pa.array([len(rows[i][1]) for i in order], pa.int32()),
            "codes": pa.array([rows[i][1] for i in order], pa.list_(pa.int32())),
        }, schema=CODES_SCHEMA).replace_schema_metadata({"evatok.mode": str(self.mode)})
        errs = pa.table({k: [e[n] for e in errors] for n, k in enumerate(ERRORS_SCHEMA.names)}, schema=ERRORS_SCHEMA)
        return table_out, errs

    def encode_shard(self, shard: int, clips_uri: str, out: str) -> dict:
        """Encode one clips shard; publish codes/, errors/, then the shard marker."""
        t0 = time.perf_counter()
        table = storage.read_table(clips_uri, columns=["clip_id", "video_id", "label", "shape", "frames"])
        codes, errors = self.encode_table(table)
        storage.write_parquet(codes, storage.join(out, "codes", shard_name(shard)))
        storage.write_parquet(errors, storage.join(out, "errors", shard_name(shard)))
        info = {"shard": shard, "clips": codes.num_rows, "errors": errors.num_rows,
                "tokens": int(np.sum(codes.column("total_tokens").to_numpy())) if codes.num_rows else 0,
                "seconds": round(time.perf_counter() - t0, 3)}
        mark_shard(out, shard, info)
        return info


class _TokenizeActor:
    """Ray Data callable class: one model load per actor, one clips shard per call."""

    def __init__(self, out: str, **encoder_kw):
        self.out = out
        self.encoder = Encoder(**encoder_kw)

    def __call__(self, batch: dict) -> dict:
        maybe_crash("tokenize")
        infos = [self.encoder.encode_shard(int(i), str(u), self.out) for i, u in zip(batch["shard"], batch["uri"])]
        return {"info": np.array([json.dumps(x) for x in infos], dtype=object)}


# ----------------------------------------------------------------------------- driver
def _calibration(tc, out: str, mode, val_every: int, quiet: bool):
    """The frozen budget of this output: read back, or fitted now and written once."""
    from evatok.routing import Calibration

    uri = storage.join(out, "calibration.json")
    if storage.exists(uri):
        cal = Calibration.from_dict(json.loads(storage.read_bytes(uri)))
        if cal.target != float(mode.value):
            raise TokenizeError(f"{storage.redact(uri)} holds a budget of {cal.target:g}, not {mode.value:g}")
        return cal
    router = load_model(tc.router)
    calib = calibration_split(tc.clips, val_every, tc.calibration_clips)
    cal = calibrate(router, calib, float(mode.value), tc.batch_size)
    storage.write_bytes_atomic(uri, json.dumps({**cal.to_dict(), "router": storage.redact(tc.router),
                                                "router_sha256": storage.sha256(tc.router),
                                                "val_every": val_every}, sort_keys=True).encode())
    if not quiet:
        print(f"[tokenize] budget {cal.target:g} tokens per clip: lambda {cal.lam:.6g} fitted on {cal.clips} "
              f"clips of training videos (their mean {cal.achieved:.2f})", flush=True)
    return cal


def run_tokenize(cfg, quiet: bool = False) -> TokenizeSummary:
    """Choose and encode every clip on a Ray Data actor pool (``tokenize.num_actors``), one clips shard
    per call; shards whose marker exists are skipped."""
    from ray.data import ActorPoolStrategy

    from evatok import routing
    from workflows.label import clips_prefix

    t0 = time.perf_counter()
    tc = cfg.tokenize
    if not (tc.clips and tc.tokenizer and tc.output):
        raise TokenizeError("tokenize.clips, tokenize.tokenizer and tokenize.output must all be set")
    val_every = cfg.train.val_every if tc.val_every is None else tc.val_every
    if tc.max_restarts < 0 or tc.max_task_retries < 0 or tc.num_actors < 1 or tc.batch_size < 1:
        raise TokenizeError("tokenize.max_restarts/max_task_retries must be >= 0, num_actors/batch_size >= 1")
    tok = load_model(tc.tokenizer)
    tcfg = tok.config
    try:
        mode = routing.parse_mode(tc.mode, tcfg.counts, tcfg.num_blocks)
    except routing.RoutingError as e:
        raise TokenizeError(f"tokenize.mode: {e}") from None
    del tok
    if mode.needs_router and not tc.router:
        raise TokenizeError(f"tokenize.mode={mode} needs tokenize.router")
    if mode.kind == "labels" and not tc.labels:
        raise TokenizeError("tokenize.mode=labels needs tokenize.labels")
    out = storage.canonical(tc.output)
    src = clips_prefix(tc.clips)
    shards = {shard_index(u): (u, s, e) for u, s, e in storage.list_files(src, (".parquet",))}
    if not shards:
        raise TokenizeError(f"no clips shards under {storage.redact(tc.clips)}")
    claim_output(out, "tokenize", {
        "format": 1, "mode": str(mode), "clips": digest(f"{i}:{s}:{e}" for i, (_, s, e) in sorted(shards.items())),
        "tokenizer": storage.sha256(tc.tokenizer), "router": storage.sha256(tc.router) if mode.needs_router else None,
        "labels": digest(f"{u}:{s}:{e}" for u, s, e in storage.list_files(tc.labels, (".parquet",)))
        if mode.kind == "labels" else None,
        "calibration": [tc.calibration_clips, val_every] if mode.kind == "budget" else None})
    cal = _calibration(tc, out, mode, val_every, quiet) if mode.kind == "budget" else None
    done = done_shards(out)
    todo = sorted(i for i in shards if i not in done)
    summary = TokenizeSummary(out, str(mode), shards=len(shards), shards_skipped=len(shards) - len(todo),
                              lam=cal.lam if cal else None)
    infos = [done[i] for i in shards if i in done]
    progress = Progress("tokenize", len(todo), quiet)
    progress.line(f"{len(shards)} clips shards ({summary.shards_skipped} already encoded), mode {mode}")
    if todo:
        ray = ensure_ray()
        from workflows.stage import quiet_data_context

        quiet_data_context(ray)
        items = [{"shard": i, "uri": shards[i][0]} for i in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _TokenizeActor, batch_size=1, batch_format="numpy",
            fn_constructor_kwargs=dict(out=out, tokenizer=storage.canonical(tc.tokenizer), mode=str(mode),
                                       router=storage.canonical(tc.router) if mode.needs_router else "",
                                       labels=storage.canonical(tc.labels) if mode.kind == "labels" else "",
                                       lam=cal.lam if cal else None, batch_size=tc.batch_size, use_gpu=tc.use_gpu,
                                       num_threads=max(1, int(tc.num_cpus_per_actor))),
            compute=ActorPoolStrategy(size=min(tc.num_actors, len(items)), max_tasks_in_flight_per_actor=1),
            num_cpus=tc.num_cpus_per_actor, num_gpus=tc.gpus_per_actor if tc.use_gpu else 0,
            max_restarts=tc.max_restarts, max_task_retries=tc.max_task_retries)
        for row in ds.iter_rows():
            info = json.loads(row["info"])
            infos.append(info)
            summary.shards_written += 1
            progress.shard(f"shard {info['shard']}: {info['clips']} clips, {info['errors']} errors "
                           f"({info['seconds']:.1f}s)")
    summary.clips = sum(x["clips"] for x in infos)
    summary.errors = sum(x["errors"] for x in infos)
    summary.mean_tokens = sum(x["tokens"] for x in infos) / max(1, summary.clips)
    summary.seconds = time.perf_counter() - t0
    if summary.shards_written or not storage.is_done(out):
        storage.mark_done(out, {**{k: v for k, v in asdict(summary).items() if k != "seconds"},
                                "codes": codes_uri(out), "calibration": cal.to_dict() if cal else None})
    progress.line(str(summary))
    return summary


# ----------------------------------------------------------------------------- pipeline stage helpers
#: Settings that change how the stage runs, not what it writes.
RUNTIME = frozenset({"clips", "tokenizer", "router", "labels", "output", "batch_size", "num_actors",
                     "num_cpus_per_actor", "use_gpu", "gpus_per_actor", "max_restarts", "max_task_retries"})


def stage_fingerprint(cfg):
    """What the codes depend on: the mode and its settings, the clips' content, the tokenizer's bytes,
    and the router's (router, budget) or the labels' (labels) content."""
    from evatok.routing import parse_mode
    from workflows import fingerprint as F
    from workflows.label import clips_prefix

    tc = cfg.tokenize
    mode = parse_mode(tc.mode)
    conf = F.section(tc, "tokenize", RUNTIME | ({"calibration_clips", "val_every"} if mode.kind != "budget" else set()))
    inputs = {"clips": F.dataset_input(clips_prefix(tc.clips)), "tokenizer": F.file_input(tc.tokenizer)}
    if mode.needs_router:
        inputs["router"] = F.file_input(tc.router)
    if mode.kind == "labels":
        inputs["labels"] = F.dataset_input(tc.labels)
    return F.Fingerprint("tokenize", conf, inputs, codes_uri(tc.output))


def clear(out: str) -> None:
    """``--force``: remove everything a fresh run must not reuse (the frozen lambda included)."""
    from workflows.fingerprint import CLAIM

    for part in ("_DONE.json", "_tokenize.json", "calibration.json", CLAIM):
        storage.remove(storage.join(out, part))
    for part in ("_shards", "codes", "errors"):
        storage.remove(storage.join(out, part), recursive=True)
