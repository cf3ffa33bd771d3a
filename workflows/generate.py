"""``evatok generate``: class-conditional samples of the AR model, and the generation metrics.

Plain functions, usable without Ray:

- ``sample_batches(ar, tokenizer, labels, ...)`` (``sample`` joins them): the AR model draws token
  sequences (CFG, temperature, top-k/top-p; structural logit masking), each is parsed back into 4
  blocks of codes, and the final tokenizer decodes the well-formed ones into uint8 clips.
- ``SampleWriter`` / ``write_samples``: one h264 mp4 per sample (``evatok.synthetic.write_mp4``), an
  image grid (``grid.png``: the first sample of each class), and ``tokens.parquet`` (per sample: class,
  well-formed or not, assignment, counts, total tokens, codes).
- ``generation_metrics(ar, tokenizer, ...) -> dict``: numbers that can be measured here (no I3D
  weights): the well-formed rate, mean generated tokens, and with a classifier trained on the real
  clips (``evatok train classifier``, ``evatok/classifier.py``) its accuracy on the samples and the
  Frechet distance in its penultimate features; gFVD only when an I3D file is given. Every number
  comes with how it was measured under ``gen/protocol/...`` (samples, classes, frames, size, fps, the
  real clips and their digest, the feature network and its file's SHA-256, the sampling settings).
- ``run_generate(cfg)``: the command: all of the above, batch by batch (a batch is written and measured,
  then dropped: memory holds one batch of clips and the features, so 10k samples fit), under
  ``generate.output``, logged to its own MLflow run (metrics, protocol tags, grid and tables as artifacts).

``evatok evaluate`` calls ``generation_metrics(ar_uri, tokenizer_uri, **metric_settings(cfg))`` for
each AR model it is pointed at; ``mlflow_split(d)`` separates the numbers from the protocol strings.
"""
from __future__ import annotations

import hashlib
import io
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from workflows import storage
from workflows.config import Config

PROTOCOL = "gen/protocol/"


# ============================================================================ models and places
def load_with_digest(src, what: str):
    """(model, SHA-256 of its file) from a URI, or (model, "") for an already loaded module."""
    if isinstance(src, torch.nn.Module):
        return src.eval(), str(getattr(src, "export_sha256", ""))
    from evatok.export import load_model as _load

    if not src:
        raise FileNotFoundError(f"no {what} model given")
    if not storage.exists(src):
        raise FileNotFoundError(f"{what} model not found: {storage.redact(src)}")
    data = storage.read_bytes(src)
    model = _load(io.BytesIO(data))
    model.export_sha256 = hashlib.sha256(data).hexdigest()
    return model.eval(), model.export_sha256


def places(cfg: Config) -> dict[str, str]:
    """The URIs ``evatok generate`` reads and writes, defaults filled from ``work_dir``."""
    g, wd = cfg.generate, cfg.work_dir
    default_clf = storage.join(wd, "classifier", "classifier.pt")
    return {
        "ar": g.ar or storage.join(wd, "ar", "ar.pt"),
        "tokenizer": g.tokenizer or storage.join(wd, "final", "final.pt"),
        "output": g.output or storage.join(wd, "generate"),
        "classifier": g.classifier or (default_clf if storage.exists(default_clf) else ""),
        "real": g.real or cfg.train.data or cfg.ingest.output or storage.join(wd, "data"),
    }


def metric_settings(cfg: Config) -> dict:
    """Keyword arguments of ``generation_metrics`` from a recipe (``generate`` section)."""
    g = cfg.generate
    p = places(cfg)
    return {"classifier": p["classifier"] or None, "real": p["real"], "real_clips": g.real_clips, "i3d": g.i3d,
            "i3d_sha256": g.i3d_sha256, "samples_per_class": g.samples_per_class, "cfg_scale": g.cfg_scale, "temperature": g.temperature,
            "top_k": g.top_k, "top_p": g.top_p, "seed": g.seed, "batch_size": g.batch_size,
            "fps": mp4_fps(cfg)}


def mp4_fps(cfg: Config) -> float:
    return float(cfg.generate.fps or cfg.data.fps or 8.0)


# ============================================================================ sampling
@dataclass
class Samples:
    labels: torch.Tensor                 # [N] class ids the samples were conditioned on
    well_formed: torch.Tensor            # [N] bool: the sequence parsed into 4 (length, codes) blocks
    counts: torch.Tensor                 # [N, blocks] tokens per block (0 where not well-formed)
    codes: list[torch.Tensor]            # per sample, the concatenated block codes (empty if not well-formed)
    videos: np.ndarray                   # uint8 [N, T, H, W, 3] (zeros where not well-formed)
    seconds: float = 0.0                 # sampling + decoding time
    settings: dict = field(default_factory=dict)

    @property
    def total_tokens(self) -> torch.Tensor:
        return self.counts.sum(-1)

    @staticmethod
    def cat(parts: list["Samples"]) -> "Samples":
        return Samples(torch.cat([p.labels for p in parts]), torch.cat([p.well_formed for p in parts]),
                       torch.cat([p.counts for p in parts]), [c for p in parts for c in p.codes],
                       np.concatenate([p.videos for p in parts]), sum(p.seconds for p in parts),
                       dict(parts[0].settings) if parts else {})

    def chunks(self, size: int) -> Iterator["Samples"]:
        for s in range(0, len(self.labels), max(1, size)):
            e = s + size
            yield Samples(self.labels[s:e], self.well_formed[s:e], self.counts[s:e], self.codes[s:e],
                          self.videos[s:e], self.seconds * len(self.labels[s:e]) / max(1, len(self.labels)),
                          self.settings)


def sample_batches(ar, tokenizer, labels, *, cfg_scale: float = 1.0, temperature: float = 1.0,
                   top_k: int | None = None, top_p: float | None = None, seed: int = 0, batch_size: int = 16,
                   device="cpu") -> Iterator[Samples]:
    """Class-conditional samples, ``batch_size`` at a time (one ``Samples`` per batch, so memory stays
    bounded however many are drawn), from one generator seeded with ``seed``."""
    from evatok.ar import MalformedSequenceError
    from evatok.video import to_uint8

    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    ar, tokenizer = ar.to(device).eval(), tokenizer.to(device).eval()
    layout = ar.layout
    tc = tokenizer.config
    if tuple(tc.counts) != tuple(layout.counts) or tc.codebook_size != layout.codebook_size:
        raise ValueError(f"AR model (counts {list(layout.counts)}, codebook {layout.codebook_size}) does not match "
                         f"the tokenizer (counts {list(tc.counts)}, codebook {tc.codebook_size})")
    gen = torch.Generator().manual_seed(int(seed))
    settings = {"cfg_scale": cfg_scale, "temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed,
                "batch_size": batch_size}
    for s in range(0, len(labels), batch_size):
        t0 = time.perf_counter()
        lab = labels[s:s + batch_size]
        n = len(lab)
        ok = torch.zeros(n, dtype=torch.bool)
        counts = torch.zeros(n, layout.num_blocks, dtype=torch.long)
        codes: list[torch.Tensor] = [torch.zeros(0, dtype=torch.long) for _ in range(n)]
        videos = np.zeros((n, tc.frames, tc.size, tc.size, 3), np.uint8)
        with torch.no_grad():
            seq = ar.generate(lab.to(device), cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                              top_p=top_p, generator=gen).cpu()
            for j in range(n):  # parsed one by one, so one bad sample does not sink its batch
                try:
                    c, k = layout.parse_sequence(seq[j])
                except MalformedSequenceError:
                    continue
                ok[j], counts[j], codes[j] = True, k[0], c[0]
            good = ok.nonzero().flatten().tolist()
            if good:
                padded = torch.nn.utils.rnn.pad_sequence([codes[j] for j in good], batch_first=True)
                videos[good] = to_uint8(tokenizer.decode(padded.to(device), counts[good].to(device)))
        yield Samples(lab, ok, counts, codes, videos, time.perf_counter() - t0, settings)


def sample(ar, tokenizer, labels, **kwargs) -> Samples:
    """All samples at once (``sample_batches`` joined): for small numbers of samples."""
    return Samples.cat(list(sample_batches(ar, tokenizer, labels, **kwargs)))


def class_labels(num_classes: int, samples_per_class: int) -> torch.Tensor:
    """[0]*k + [1]*k + ...: every class equally often."""
    return torch.arange(num_classes).repeat_interleave(samples_per_class)


# ============================================================================ outputs
def grid_png(videos: np.ndarray, rows: list[int], columns: int = 8) -> bytes:
    """PNG bytes: one row per sample index in ``rows``, ``columns`` frames spread over the clip."""
    from PIL import Image

    if not rows:
        rows = [0]
    t = videos.shape[1]
    idx = np.linspace(0, t - 1, min(columns, t)).round().astype(int)
    pad = 2
    h, w = videos.shape[2], videos.shape[3]
    img = np.full((len(rows) * (h + pad) + pad, len(idx) * (w + pad) + pad, 3), 255, np.uint8)
    for r, i in enumerate(rows):
        for c, f in enumerate(idx):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            img[y:y + h, x:x + w] = videos[i, f]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


class SampleWriter:
    """Writes samples as they come: one mp4 per well-formed sample under ``out_uri/videos/``; at
    ``close()``, ``grid.png`` (the first sample of each class) and ``tokens.parquet`` (one row per sample:
    sample, class_id, class, well_formed, assignment (index in [0, 625) or -1), counts, total_tokens,
    codes, file). An earlier run's ``videos/`` is removed first, so no stale sample lingers."""

    def __init__(self, out_uri: str, fps: float, class_names: list[str], space=None):
        self.out, self.fps, self.names, self.space = out_uri, fps, class_names, space
        self.rows: list[dict] = []
        self.first: dict[int, np.ndarray] = {}
        self.files: list[str] = []
        videos = storage.join(out_uri, "videos")
        if storage.exists(videos):
            storage.remove(videos, recursive=True)

    def _name(self, cid: int) -> str:
        return self.names[cid] if 0 <= cid < len(self.names) else str(cid)

    def add(self, s: Samples) -> None:
        from evatok.synthetic import write_mp4

        with tempfile.TemporaryDirectory() as tmp:
            for j in range(len(s.labels)):
                i, cid, ok = len(self.rows), int(s.labels[j]), bool(s.well_formed[j])
                file = ""
                if ok:
                    name = f"sample-{i:05d}-{self._name(cid)}.mp4"
                    local = Path(tmp) / name
                    write_mp4(local, s.videos[j], fps=self.fps)
                    storage.write_bytes_atomic(storage.join(self.out, "videos", name), local.read_bytes())
                    file = f"videos/{name}"
                    self.files.append(storage.join(self.out, file))
                    self.first.setdefault(cid, s.videos[j].copy())
                self.rows.append({
                    "sample": i, "class_id": cid, "class": self._name(cid), "well_formed": ok,
                    "assignment": int(self.space.index(s.counts[j])) if ok and self.space is not None else -1,
                    "counts": s.counts[j].tolist(), "total_tokens": int(s.counts[j].sum()),
                    "codes": s.codes[j].tolist(), "file": file})

    def close(self) -> dict:
        import pyarrow as pa

        grid_uri = storage.join(self.out, "grid.png")
        if self.first:
            order = sorted(self.first)
            storage.write_bytes_atomic(grid_uri, grid_png(np.stack([self.first[c] for c in order]),
                                                          list(range(len(order)))))
        schema = pa.schema([("sample", pa.int32()), ("class_id", pa.int32()), ("class", pa.string()),
                            ("well_formed", pa.bool_()), ("assignment", pa.int32()), ("counts", pa.list_(pa.int32())),
                            ("total_tokens", pa.int32()), ("codes", pa.list_(pa.int32())), ("file", pa.string())])
        table_uri = storage.join(self.out, "tokens.parquet")
        storage.write_parquet(pa.Table.from_pylist(self.rows, schema=schema), table_uri)
        return {"videos": storage.join(self.out, "videos"), "grid": grid_uri if self.first else None,
                "tokens": table_uri, "files": self.files}


def write_samples(samples: Samples, out_uri: str, fps: float, class_names: list[str], space=None) -> dict:
    """mp4 files under ``out_uri/videos/``, ``grid.png``, ``tokens.parquet``; returns their URIs."""
    w = SampleWriter(out_uri, fps, class_names, space)
    w.add(samples)
    return w.close()


# ============================================================================ real clips
def iter_real_clips(uri: str, max_clips: int) -> Iterator[tuple[np.ndarray, list[str]]]:
    """The first ``max_clips`` labeled clips at ``uri`` in shard order, one shard at a time:
    (uint8 [n, T, H, W, 3], class names)."""
    import pyarrow.compute as pc

    from workflows.clips import frames_from_table
    from workflows.train.data import parquet_prefix

    n = 0
    for f in sorted(storage.list_parquet(parquet_prefix(uri))):
        if n >= max_clips:
            break
        t = storage.read_table(f, columns=["frames", "shape", "label"])
        t = t.filter(pc.is_valid(t.column("label")))
        if t.num_rows == 0:
            continue
        t = t.slice(0, max_clips - n)
        n += t.num_rows
        yield frames_from_table(t), [str(x) for x in t.column("label").to_pylist()]


def describe_real(uri: str) -> dict:
    """Where real clips come from: the prefix and the digest of all its files."""
    from workflows.train.data import files_digest, parquet_prefix

    prefix = parquet_prefix(uri)
    return {"uri": storage.redact(prefix), "digest": files_digest(prefix)}


def read_real_clips(uri: str, max_clips: int) -> tuple[np.ndarray, list[str], dict]:
    """``iter_real_clips`` joined: (uint8 [N, T, H, W, 3], class names, ``describe_real`` + clips)."""
    parts = list(iter_real_clips(uri, max_clips))
    if not parts:
        raise ValueError(f"no labeled clips under {storage.redact(uri)}")
    return (np.concatenate([p[0] for p in parts]), [c for p in parts for c in p[1]],
            {**describe_real(uri), "clips": sum(len(p[1]) for p in parts)})


# ============================================================================ metrics
@torch.no_grad()
def _features(net, videos: np.ndarray, batch: int = 32, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D], predicted class [N]) of uint8 clips, on the CPU."""
    from evatok.video import to_tensor

    net = net.to(device).eval()
    feats, preds = [], []
    for i in range(0, len(videos), batch):
        f = net.features(to_tensor(videos[i:i + batch]).to(device))
        feats.append(f.cpu())
        preds.append(net.head(f).argmax(-1).cpu())
    if not feats:
        return torch.zeros(0, net.config.feature_dim), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(preds)


def _frechet(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    from evatok.metrics import feature_stats, frechet_distance

    return frechet_distance(*feature_stats(a), *feature_stats(b))


def _to01(videos: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(videos)).permute(0, 4, 1, 2, 3).float() / 255.0


class Measure:
    """Accumulates, batch by batch, what the generation metrics need: token counts and well-formedness of
    the samples, and (given the networks) classifier features / predictions and I3D features of real and
    generated clips. Only features are kept, never the clips."""

    def __init__(self, class_names: list[str], classifier=None, clf_classes: list[str] | None = None, fvd=None,
                 device="cpu"):
        self.names, self.net, self.fvd, self.device = class_names, classifier, fvd, device
        self.index = {c: i for i, c in enumerate(clf_classes or class_names)}
        self.ok: list[torch.Tensor] = []
        self.tokens: list[torch.Tensor] = []
        self.seconds = 0.0
        self.feats = {"real": [], "gen": []}
        self.i3d = {"real": [], "gen": []}
        self.hits = {"real": [0, 0], "gen": [0, 0]}  # [correct, counted]

    def _add(self, kind: str, videos: np.ndarray, names: list[str]) -> None:
        if not len(videos):
            return
        if self.net is not None:
            f, pred = _features(self.net, videos, device=self.device)
            self.feats[kind].append(f)
            known = [i for i, c in enumerate(names) if c in self.index]
            if known:
                tgt = torch.tensor([self.index[names[i]] for i in known])
                self.hits[kind][0] += int((pred[known] == tgt).sum())
                self.hits[kind][1] += len(known)
        if self.fvd is not None:
            self.i3d[kind].append(torch.from_numpy(self.fvd.features(_to01(videos))))

    def add_real(self, videos: np.ndarray, names: list[str]) -> None:
        self._add("real", videos, names)

    def add_generated(self, s: Samples) -> None:
        self.ok.append(s.well_formed)
        self.tokens.append(s.total_tokens[s.well_formed].float())
        self.seconds += s.seconds
        keep = s.well_formed.numpy()
        self._add("gen", s.videos[keep], [self.names[i] for i in s.labels[s.well_formed].tolist()])

    def metrics(self) -> dict:
        ok = torch.cat(self.ok) if self.ok else torch.zeros(0, dtype=torch.bool)
        tokens = torch.cat(self.tokens) if self.tokens else torch.zeros(0)
        n = len(ok)
        out = {"gen/samples": float(n), "gen/well_formed_rate": float(ok.float().mean()) if n else float("nan"),
               "gen/mean_tokens": float(tokens.mean()) if len(tokens) else float("nan"),
               "gen/std_tokens": float(tokens.std()) if len(tokens) > 1 else 0.0,
               "gen/samples_per_s": n / self.seconds if self.seconds > 0 else float("nan"),
               PROTOCOL + "samples": float(n), PROTOCOL + "well_formed": float(ok.sum())}
        real = torch.cat(self.feats["real"]) if self.feats["real"] else None
        gen = torch.cat(self.feats["gen"]) if self.feats["gen"] else None
        if self.net is not None:
            out[PROTOCOL + "classifier_acc_samples"] = float(self.hits["gen"][1])
            for kind, key in (("real", "gen/classifier_acc_real"), ("gen", "gen/classifier_acc")):
                if self.hits[kind][1]:
                    out[key] = self.hits[kind][0] / self.hits[kind][1]
            if real is not None and len(real) >= 4:  # the floor: two halves of the real clips (every other clip)
                out["gen/frechet_classifier_real_halves"] = _frechet(real[0::2], real[1::2])
            if real is not None and gen is not None and len(real) >= 2 and len(gen) >= 2:
                out["gen/frechet_classifier"] = _frechet(real, gen)
        if self.fvd is not None and len(self.i3d["real"]) and len(self.i3d["gen"]):
            r, g = torch.cat(self.i3d["real"]), torch.cat(self.i3d["gen"])
            if len(r) >= 2 and len(g) >= 2:
                out["gen/fvd"] = _frechet(r.numpy(), g.numpy())
        return out


def generation_metrics(ar, tokenizer, *, classifier=None, real: str | None = None, real_videos: np.ndarray | None = None,
                       real_labels: list[str] | None = None, real_info: dict | None = None, real_clips: int = 256,
                       i3d: str | None = None, i3d_sha256: str | None = None, samples_per_class: int = 4,
                       cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                       batch_size: int = 16, fps: float = 8.0, device="cpu", samples: Samples | None = None,
                       on_batch: Callable[[Samples], None] | None = None) -> dict:
    """Generation metrics of one AR model, each with how it was measured.

    ``ar``, ``tokenizer``, ``classifier``: URIs of exported models or loaded modules. Real clips come from
    ``real`` (a clips URI; the first ``real_clips``, read one shard at a time) or ``real_videos`` (uint8
    [N, T, H, W, 3]) with their class names ``real_labels``. ``samples``: measure samples already drawn;
    else ``samples_per_class`` per class are drawn here, ``batch_size`` at a time, with the sampling
    settings, and each batch is handed to ``on_batch`` (``evatok generate`` writes it) before it is
    dropped: memory holds one batch of clips and the features, however many samples there are.

    Returns a flat dict: numbers ``gen/<metric>`` (``well_formed_rate``, ``mean_tokens``, ``std_tokens``,
    ``samples``, ``samples_per_s``; with a classifier ``classifier_acc``, ``classifier_acc_real``,
    ``frechet_classifier``, ``frechet_classifier_real_halves``; with I3D ``fvd``) and the protocol
    ``gen/protocol/<key>`` (numbers and strings). No classifier and no I3D: only the token figures; a
    metric never silently uses another feature network.
    """
    from evatok.metrics import FVD

    ar, ar_sha = load_with_digest(ar, "AR")
    tokenizer, tok_sha = load_with_digest(tokenizer, "tokenizer")
    meta = getattr(ar, "export_meta", {}) or {}
    class_names = [str(c) for c in meta.get("classes", [])] or [str(i) for i in range(ar.config.num_classes)]
    tc = tokenizer.config
    p = PROTOCOL
    out: dict = {p + "frames": float(tc.frames), p + "size": float(tc.size), p + "fps": float(fps),
                 p + "ar_sha256": ar_sha, p + "tokenizer_sha256": tok_sha, p + "ar_run_id": str(meta.get("mlflow_run_id", ""))}
    net, clf_classes = None, None
    if classifier is not None:
        net, clf_sha = load_with_digest(classifier, "classifier")
        cc = net.config
        if (cc.frames, cc.size) != (tc.frames, tc.size):
            raise ValueError(f"the classifier was trained on {cc.frames}x{cc.size}x{cc.size} clips, the samples are "
                             f"{tc.frames}x{tc.size}x{tc.size}")
        clf_meta = getattr(net, "export_meta", {}) or {}
        clf_classes = [str(c) for c in clf_meta.get("classes", [])] or None
        out.update({p + "feature_net": f"evatok.classifier (width {cc.width}, depth {cc.depth})",
                    p + "feature_net_sha256": clf_sha, p + "feature_dim": float(cc.feature_dim),
                    p + "feature_net_run_id": str(clf_meta.get("mlflow_run_id", ""))})
    fvd = None
    if i3d:
        local = storage.local_path(i3d)
        fvd = FVD(str(local) if local is not None else i3d, device=device, sha256=i3d_sha256)  # checked first
        out[p + "i3d_sha256"] = storage.sha256(i3d)
    measure = Measure(class_names, net, clf_classes, fvd, device)
    if net is not None or fvd is not None:
        shape = (tc.frames, tc.size, tc.size, 3)
        if real_videos is not None:
            chunks = [(real_videos[i:i + 64], (real_labels or [])[i:i + 64]) for i in range(0, len(real_videos), 64)]
            info = real_info or {"uri": "(in memory)", "digest": ""}
        elif real:
            chunks, info = iter_real_clips(real, real_clips), describe_real(real)
        else:
            raise ValueError("feature metrics need real clips: give real= (a clips URI) or real_videos=")
        n_real = 0
        for videos, names in chunks:
            if videos.shape[1:] != shape:
                raise ValueError(f"real clips {list(videos.shape[1:])} and samples {list(shape)} differ in shape: "
                                 "the features would not compare like with like")
            measure.add_real(videos, names)
            n_real += len(videos)
        out.update({p + "real_uri": str(info.get("uri", "")), p + "real_digest": str(info.get("digest", "")),
                    p + "real_clips": float(n_real)})
    if samples is not None:
        batches, settings = samples.chunks(batch_size), samples.settings
    else:
        settings = {"cfg_scale": cfg_scale, "temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed,
                    "batch_size": batch_size}
        batches = sample_batches(ar, tokenizer, class_labels(ar.config.num_classes, samples_per_class),
                                 device=device, **settings)
    classes = set()
    for s in batches:
        if on_batch is not None:
            on_batch(s)
        measure.add_generated(s)
        classes |= set(s.labels.tolist())
    out.update(measure.metrics())
    out.update({p + "classes": float(len(classes)), p + "cfg_scale": float(settings.get("cfg_scale", cfg_scale)),
                p + "temperature": float(settings.get("temperature", temperature)),
                p + "top_k": str(settings.get("top_k", top_k)), p + "top_p": str(settings.get("top_p", top_p)),
                p + "seed": float(settings.get("seed", seed)),
                p + "batch_size": float(settings.get("batch_size", batch_size))})
    return dict(sorted(out.items(), key=lambda kv: (kv[0].startswith(p), kv[0])))


def mlflow_split(metrics: dict) -> tuple[dict[str, float], dict[str, str]]:
    """(numbers for ``log_metrics``, strings for tags) of a ``generation_metrics`` dict."""
    nums = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tags = {k: str(v) for k, v in metrics.items() if k not in nums}
    return nums, tags


# ============================================================================ the command
@dataclass
class GenerateResult:
    output: str
    samples: int
    well_formed: int
    metrics: dict
    files: list[str]
    grid: str | None
    tokens: str
    mlflow_run_id: str | None = None
    seconds: float = 0.0


def run_generate(cfg: Config, *, parent_run_id: str | None = None) -> GenerateResult:
    """``evatok generate``: sample and decode batch by batch, write mp4 files + grid + token table, measure,
    log to MLflow."""
    from evatok.assignment import AssignmentSpace
    from workflows.tracking import Lineage, resolve_tracking_uri

    t0 = time.perf_counter()
    p = places(cfg)
    ar, ar_sha = load_with_digest(p["ar"], "AR")
    tokenizer, tok_sha = load_with_digest(p["tokenizer"], "tokenizer")
    class_names = [str(c) for c in (getattr(ar, "export_meta", {}) or {}).get("classes", [])] \
        or [str(i) for i in range(ar.config.num_classes)]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    writer = SampleWriter(p["output"], mp4_fps(cfg), class_names,
                          AssignmentSpace(tokenizer.config.counts, tokenizer.config.num_blocks))
    settings = metric_settings(cfg)
    if settings["classifier"] is None:
        print("generate: no classifier (evatok train classifier, or generate.classifier=...): "
              "reporting the token figures only", flush=True)
    threads = torch.get_num_threads()
    if device == "cpu" and cfg.generate.threads > 0:
        torch.set_num_threads(cfg.generate.threads)
    try:
        metrics = generation_metrics(ar, tokenizer, device=device, on_batch=writer.add, **settings)
    finally:
        torch.set_num_threads(threads)
    written = writer.close()
    summary = {"ar": storage.redact(p["ar"]), "tokenizer": storage.redact(p["tokenizer"]),
               "classes": class_names, "metrics": metrics}
    storage.write_bytes_atomic(storage.join(p["output"], "metrics.json"),
                               json.dumps(summary, indent=2, default=str).encode())
    seconds = time.perf_counter() - t0
    run_id = _log(cfg, p, written, {**metrics, "seconds": seconds}, ar_sha, tok_sha, parent_run_id,
                  resolve_tracking_uri, Lineage)
    return GenerateResult(p["output"], int(metrics["gen/samples"]), int(metrics[PROTOCOL + "well_formed"]), metrics,
                          written["files"], written["grid"], written["tokens"], run_id, seconds)


def _log(cfg, p, written, metrics, ar_sha, tok_sha, parent_run_id, resolve_tracking_uri, Lineage) -> str | None:
    lin = Lineage(resolve_tracking_uri(cfg.mlflow.tracking_uri, cfg.work_dir), cfg.mlflow.experiment, cfg.work_dir,
                  quiet=True)
    lin.ensure_experiment()
    run_id = lin.start(f"{cfg.name}-generate", parent_run_id, tags={"evatok.stage": "generate"})
    if not run_id:
        return None
    from workflows.config import to_dict

    d = to_dict(cfg)
    lin.log_config(run_id, {k: d[k] for k in ("name", "work_dir", "data", "generate")})
    inputs = {"ar": {"uri": p["ar"], "digest": ar_sha, "kind": "file"},
              "tokenizer": {"uri": p["tokenizer"], "digest": tok_sha, "kind": "file"}}
    if metrics.get(PROTOCOL + "feature_net_sha256"):
        inputs["classifier"] = {"uri": p["classifier"], "digest": metrics[PROTOCOL + "feature_net_sha256"],
                                "kind": "file"}
    lin.log_inputs(run_id, inputs)
    nums, tags = mlflow_split(metrics)
    lin.log_metrics(run_id, nums)
    lin.set_tags(run_id, {f"evatok.{k}": v for k, v in tags.items()})
    lin.log_outputs(run_id, {"samples": {"uri": p["output"], "digest": storage.sha256(written["tokens"])}})

    def artifacts():
        with tempfile.TemporaryDirectory() as tmp:
            for uri in (written["grid"], written["tokens"], storage.join(p["output"], "metrics.json")):
                if not uri:
                    continue
                local = Path(tmp) / uri.rstrip("/").rsplit("/", 1)[-1]
                local.write_bytes(storage.read_bytes(uri))
                lin.client().log_artifact(run_id, str(local), "generate")
    lin._do("log_artifacts", artifacts)
    lin.end(run_id)
    return run_id


# ============================================================================ training the classifier
def classifier_stage():
    """The ``train classifier`` stage: the pipeline's training stage for the classifier model (``evatok run``
    trains it after the AR model, so ``evaluate`` reports classifier accuracy and Frechet distance)."""
    from workflows.run import TrainStage

    return TrainStage("classifier")
