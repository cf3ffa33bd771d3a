"""``evatok generate``: class-conditional samples of the AR model, and the generation metrics.

Plain functions, usable without Ray:

- ``sample(ar, tokenizer, labels, ...) -> Samples``: the AR model draws token sequences (CFG,
  temperature, top-k/top-p; structural logit masking), each is parsed back into 4 blocks of codes,
  and the final tokenizer decodes the well-formed ones into uint8 clips.
- ``write_samples(samples, out_uri, fps, class_names)``: one h264 mp4 per sample (``evatok.synthetic.
  write_mp4``), an image grid (``grid.png``: one row per sample, one column per block), and
  ``tokens.parquet`` (per sample: class, well-formed or not, assignment, counts, total tokens, codes).
- ``generation_metrics(ar, tokenizer, ...) -> dict``: numbers that can be measured here (no I3D
  weights): the well-formed rate, mean generated tokens, and with a classifier trained on the real
  clips (``evatok train classifier``, ``evatok/classifier.py``) its accuracy on the samples and the
  Frechet distance in its penultimate features; gFVD only when an I3D file is given. Every number
  comes with how it was measured under ``gen/protocol/...`` (samples, classes, frames, size, fps, the
  real clips and their digest, the feature network and its file's SHA-256, the sampling settings).
- ``run_generate(cfg)``: the command: all of the above, written under ``generate.output`` and logged
  to its own MLflow run (metrics, protocol tags, grid and tables as artifacts).

``evatok evaluate`` calls ``generation_metrics(ar_uri, tokenizer_uri, **metric_settings(cfg))`` for
each AR model it is pointed at; ``mlflow_split(d)`` separates the numbers from the protocol strings.
"""
from __future__ import annotations

import io
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

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
    import hashlib

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
            "samples_per_class": g.samples_per_class, "cfg_scale": g.cfg_scale, "temperature": g.temperature,
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


def sample(ar, tokenizer, labels, *, cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, seed: int = 0, batch_size: int = 16, device="cpu") -> Samples:
    """Class-conditional samples, ``batch_size`` at a time, from one generator seeded with ``seed``."""
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
    n, blocks = len(labels), layout.num_blocks
    ok = torch.zeros(n, dtype=torch.bool)
    counts = torch.zeros(n, blocks, dtype=torch.long)
    codes: list[torch.Tensor] = [torch.zeros(0, dtype=torch.long) for _ in range(n)]
    videos = np.zeros((n, tc.frames, tc.size, tc.size, 3), np.uint8)
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, n, batch_size):
            lab = labels[s:s + batch_size]
            seq = ar.generate(lab.to(device), cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                              top_p=top_p, generator=gen).cpu()
            good = []
            for j in range(len(lab)):  # parsed one by one, so one bad sample does not sink its batch
                try:
                    c, k = layout.parse_sequence(seq[j])
                except MalformedSequenceError:
                    continue
                i = s + j
                ok[i], counts[i], codes[i] = True, k[0], c[0]
                good.append(i)
            if good:
                padded = torch.nn.utils.rnn.pad_sequence([codes[i] for i in good], batch_first=True)
                video = tokenizer.decode(padded.to(device), counts[good].to(device))
                videos[good] = to_uint8(video)
    return Samples(labels, ok, counts, codes, videos, time.perf_counter() - t0,
                   {"cfg_scale": cfg_scale, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                    "seed": seed, "batch_size": batch_size})


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


def token_table(samples: Samples, class_names: list[str], files: list[str], space=None):
    """One row per sample: sample, class_id, class, well_formed, assignment (index in [0, 625) or -1),
    counts, total_tokens, codes, file (the mp4, "" where not well-formed)."""
    import pyarrow as pa

    assign = [-1] * len(files)
    if space is not None:
        for i in range(len(files)):
            if bool(samples.well_formed[i]):
                assign[i] = int(space.index(samples.counts[i]))
    return pa.table({
        "sample": pa.array(range(len(files)), pa.int32()),
        "class_id": pa.array(samples.labels.tolist(), pa.int32()),
        "class": pa.array([class_names[i] if 0 <= i < len(class_names) else str(i) for i in samples.labels.tolist()]),
        "well_formed": pa.array(samples.well_formed.tolist(), pa.bool_()),
        "assignment": pa.array(assign, pa.int32()),
        "counts": pa.array(samples.counts.tolist(), pa.list_(pa.int32())),
        "total_tokens": pa.array(samples.total_tokens.tolist(), pa.int32()),
        "codes": pa.array([c.tolist() for c in samples.codes], pa.list_(pa.int32())),
        "file": pa.array(files),
    })


def write_samples(samples: Samples, out_uri: str, fps: float, class_names: list[str], space=None) -> dict:
    """mp4 files under ``out_uri/videos/``, ``grid.png``, ``tokens.parquet``; returns their URIs."""
    from evatok.synthetic import write_mp4

    files = []
    videos = storage.join(out_uri, "videos")
    if storage.exists(videos):  # samples of an earlier run (maybe more of them) must not linger
        storage.remove(videos, recursive=True)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(len(samples.labels)):
            if not bool(samples.well_formed[i]):
                files.append("")
                continue
            cid = int(samples.labels[i])
            name = f"sample-{i:05d}-{class_names[cid] if 0 <= cid < len(class_names) else cid}.mp4"
            local = Path(tmp) / name
            write_mp4(local, samples.videos[i], fps=fps)
            storage.write_bytes_atomic(storage.join(out_uri, "videos", name), local.read_bytes())
            files.append(f"videos/{name}")
    first = {}
    for i in range(len(samples.labels)):  # the first well-formed sample of each class, in class order
        if bool(samples.well_formed[i]):
            first.setdefault(int(samples.labels[i]), i)
    grid = grid_png(samples.videos, [first[c] for c in sorted(first)])
    grid_uri = storage.join(out_uri, "grid.png")
    storage.write_bytes_atomic(grid_uri, grid)
    table_uri = storage.join(out_uri, "tokens.parquet")
    storage.write_parquet(token_table(samples, class_names, files, space), table_uri)
    return {"videos": storage.join(out_uri, "videos"), "grid": grid_uri, "tokens": table_uri,
            "files": [storage.join(out_uri, f) for f in files if f]}


# ============================================================================ real clips
def read_real_clips(uri: str, max_clips: int) -> tuple[np.ndarray, list[str], dict]:
    """The first ``max_clips`` labeled clips at ``uri`` (in shard order): uint8 [N, T, H, W, 3],
    their class names, and where they came from (``uri``, digest of all the files, clips used)."""
    import pyarrow.compute as pc

    from workflows.clips import frames_from_table
    from workflows.train.data import files_digest, parquet_prefix

    prefix = parquet_prefix(uri)
    frames, labels = [], []
    n = 0
    for f in sorted(storage.list_parquet(prefix)):
        t = storage.read_table(f, columns=["frames", "shape", "label"])
        t = t.filter(pc.is_valid(t.column("label")))
        if t.num_rows == 0:
            continue
        t = t.slice(0, max_clips - n)
        frames.append(frames_from_table(t))
        labels += [str(x) for x in t.column("label").to_pylist()]
        n += t.num_rows
        if n >= max_clips:
            break
    if not frames:
        raise ValueError(f"no labeled clips under {storage.redact(prefix)}")
    return np.concatenate(frames), labels, {"uri": storage.redact(prefix), "digest": files_digest(prefix),
                                            "clips": n}


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
    return torch.cat(feats), torch.cat(preds)


def _frechet(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    from evatok.metrics import feature_stats, frechet_distance

    return frechet_distance(*feature_stats(a), *feature_stats(b))


def generation_metrics(ar, tokenizer, *, classifier=None, real: str | None = None, real_videos: np.ndarray | None = None,
                       real_labels: list[str] | None = None, real_info: dict | None = None, real_clips: int = 256,
                       i3d: str | None = None, samples_per_class: int = 4, cfg_scale: float = 1.0,
                       temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                       batch_size: int = 16, fps: float = 8.0, device="cpu", samples: Samples | None = None) -> dict:
    """Generation metrics of one AR model, each with how it was measured.

    ``ar``, ``tokenizer``, ``classifier``: URIs of exported models or loaded modules. Real clips come from
    ``real`` (a clips URI; the first ``real_clips``) or ``real_videos`` (uint8 [N, T, H, W, 3]) with their
    class names ``real_labels``. ``samples``: reuse samples already drawn (``evatok generate``), else
    ``samples_per_class`` per class are drawn here with the sampling settings.

    Returns a flat dict: numbers ``gen/<metric>`` (``well_formed_rate``, ``mean_tokens``, ``std_tokens``,
    ``samples``, ``classifier_acc``, ``classifier_acc_real``, ``frechet_classifier``,
    ``frechet_classifier_real_halves``, ``fvd``; the classifier/FVD ones only when their network is
    given) and the protocol ``gen/protocol/<key>`` (numbers and strings). No classifier and no I3D:
    only the token figures; a metric never silently uses another feature network.
    """
    ar, ar_sha = load_with_digest(ar, "AR")
    tokenizer, tok_sha = load_with_digest(tokenizer, "tokenizer")
    class_names = [str(c) for c in (getattr(ar, "export_meta", {}) or {}).get("classes", [])] \
        or [str(i) for i in range(ar.config.num_classes)]
    if samples is None:
        samples = sample(ar, tokenizer, class_labels(ar.config.num_classes, samples_per_class), cfg_scale=cfg_scale,
                         temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, batch_size=batch_size,
                         device=device)
    ok = samples.well_formed
    n = len(ok)
    tokens = samples.total_tokens[ok].float()
    out: dict = {
        "gen/samples": float(n), "gen/well_formed_rate": float(ok.float().mean()) if n else float("nan"),
        "gen/mean_tokens": float(tokens.mean()) if len(tokens) else float("nan"),
        "gen/std_tokens": float(tokens.std()) if len(tokens) > 1 else 0.0,
        "gen/samples_per_s": n / samples.seconds if samples.seconds > 0 else float("nan"),
    }
    tc = tokenizer.config
    p = PROTOCOL
    out.update({
        p + "samples": float(n), p + "well_formed": float(ok.sum()), p + "classes": float(len(set(samples.labels.tolist()))),
        p + "frames": float(tc.frames), p + "size": float(tc.size), p + "fps": float(fps),
        p + "cfg_scale": float(samples.settings.get("cfg_scale", cfg_scale)),
        p + "temperature": float(samples.settings.get("temperature", temperature)),
        p + "top_k": str(samples.settings.get("top_k", top_k)), p + "top_p": str(samples.settings.get("top_p", top_p)),
        p + "seed": float(samples.settings.get("seed", seed)),
        p + "batch_size": float(samples.settings.get("batch_size", batch_size)),
        p + "ar_sha256": ar_sha, p + "tokenizer_sha256": tok_sha,
        p + "ar_run_id": str((getattr(ar, "export_meta", {}) or {}).get("mlflow_run_id", "")),
    })
    gen_videos = samples.videos[ok.numpy()]
    gen_names = [class_names[i] for i in samples.labels[ok].tolist()]
    if classifier is None and not i3d:
        return out
    if real_videos is None:
        if not real:
            raise ValueError("feature metrics need real clips: give real= (a clips URI) or real_videos=")
        real_videos, real_labels, real_info = read_real_clips(real, real_clips)
    info = real_info or {"uri": "(in memory)", "digest": "", "clips": len(real_videos)}
    out.update({p + "real_uri": str(info.get("uri", "")), p + "real_digest": str(info.get("digest", "")),
                p + "real_clips": float(len(real_videos))})
    if real_videos.shape[1:] != gen_videos.shape[1:] and len(gen_videos):
        raise ValueError(f"real clips {list(real_videos.shape[1:])} and samples {list(gen_videos.shape[1:])} "
                         "differ in shape: the features would not compare like with like")
    if classifier is not None:
        net, clf_sha = load_with_digest(classifier, "classifier")
        cc = net.config
        if (cc.frames, cc.size) != (tc.frames, tc.size):
            raise ValueError(f"the classifier was trained on {cc.frames}x{cc.size}x{cc.size} clips, the samples are "
                             f"{tc.frames}x{tc.size}x{tc.size}")
        clf_classes = [str(c) for c in (getattr(net, "export_meta", {}) or {}).get("classes", [])] or class_names
        index = {c: i for i, c in enumerate(clf_classes)}
        out.update({p + "feature_net": f"evatok.classifier (width {cc.width}, depth {cc.depth})",
                    p + "feature_net_sha256": clf_sha, p + "feature_dim": float(cc.feature_dim),
                    p + "feature_net_run_id": str((getattr(net, "export_meta", {}) or {}).get("mlflow_run_id", ""))})
        real_f, real_pred = _features(net, real_videos, device=device)
        known = [i for i, c in enumerate(real_labels or []) if c in index]
        if known:
            tgt = torch.tensor([index[real_labels[i]] for i in known])
            out["gen/classifier_acc_real"] = float((real_pred[known] == tgt).float().mean())
        if len(real_f) >= 4:  # the floor: two halves of the real clips (every other clip)
            out["gen/frechet_classifier_real_halves"] = _frechet(real_f[0::2], real_f[1::2])
        if len(gen_videos):
            gen_f, gen_pred = _features(net, gen_videos, device=device)
            known = [i for i, c in enumerate(gen_names) if c in index]
            out[p + "classifier_acc_samples"] = float(len(known))
            if known:
                tgt = torch.tensor([index[gen_names[i]] for i in known])
                out["gen/classifier_acc"] = float((gen_pred[known] == tgt).float().mean())
            if len(gen_f) >= 2 and len(real_f) >= 2:
                out["gen/frechet_classifier"] = _frechet(real_f, gen_f)
    if i3d:
        from evatok.metrics import FVD

        local = storage.local_path(i3d)
        fvd = FVD(str(local) if local is not None else i3d, device=device)
        out[p + "i3d_sha256"] = storage.sha256(i3d)
        if len(gen_videos) >= 2:
            to01 = lambda v: torch.from_numpy(np.ascontiguousarray(v)).permute(0, 4, 1, 2, 3).float() / 255.0  # noqa: E731
            out["gen/fvd"] = _frechet(fvd.features(to01(real_videos)), fvd.features(to01(gen_videos)))
    return out


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
    grid: str
    tokens: str
    mlflow_run_id: str | None = None
    seconds: float = 0.0


def run_generate(cfg: Config, *, parent_run_id: str | None = None) -> GenerateResult:
    """``evatok generate``: sample, decode, write mp4 files + grid + token table, measure, log to MLflow."""
    from evatok.assignment import AssignmentSpace
    from workflows.tracking import Lineage, resolve_tracking_uri

    t0 = time.perf_counter()
    g = cfg.generate
    p = places(cfg)
    ar, ar_sha = load_with_digest(p["ar"], "AR")
    tokenizer, tok_sha = load_with_digest(p["tokenizer"], "tokenizer")
    class_names = [str(c) for c in (getattr(ar, "export_meta", {}) or {}).get("classes", [])] or [str(i) for i in range(ar.config.num_classes)]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    samples = sample(ar, tokenizer, class_labels(ar.config.num_classes, g.samples_per_class), cfg_scale=g.cfg_scale,
                     temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, seed=g.seed, batch_size=g.batch_size,
                     device=device)
    space = AssignmentSpace(tokenizer.config.counts, tokenizer.config.num_blocks)
    written = write_samples(samples, p["output"], mp4_fps(cfg), class_names, space)
    settings = metric_settings(cfg)
    if settings["classifier"] is None:
        print("generate: no classifier (evatok train classifier, or generate.classifier=...): "
              "reporting the token figures only", flush=True)
    metrics = generation_metrics(ar, tokenizer, samples=samples, device=device, **settings)
    summary = {"ar": storage.redact(p["ar"]), "tokenizer": storage.redact(p["tokenizer"]),
               "classes": class_names, "metrics": metrics}
    storage.write_bytes_atomic(storage.join(p["output"], "metrics.json"),
                               json.dumps(summary, indent=2, default=str).encode())
    run_id = _log(cfg, p, written, metrics, ar_sha, tok_sha, parent_run_id, resolve_tracking_uri, Lineage)
    return GenerateResult(p["output"], len(samples.labels), int(samples.well_formed.sum()), metrics,
                          written["files"], written["grid"], written["tokens"], run_id, time.perf_counter() - t0)


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
                local = Path(tmp) / uri.rstrip("/").rsplit("/", 1)[-1]
                local.write_bytes(storage.read_bytes(uri))
                lin.client().log_artifact(run_id, str(local), "generate")
    lin._do("log_artifacts", artifacts)
    lin.end(run_id)
    return run_id


# ============================================================================ training the classifier
def classifier_stage():
    """The ``train classifier`` stage: the shared training stage for the classifier model (not part of
    ``evatok run``'s chain unless appended to ``workflows.run.PIPELINE``)."""
    from workflows.run import TrainStage

    class ClassifierStage(TrainStage):
        def __init__(self):
            self.name = self.model = "classifier"
            self.title = "video classifier (generation metrics)"
            self.role_stage = {"data": "ingest", "val_data": "ingest"}

    return ClassifierStage()
