"""evaluate: what adaptive length buys, on held-out videos: reconstruction quality against mean tokens
per clip for every way of choosing assignments, as a table, plots and MLflow metrics.

    result = run_evaluate(cfg, run_id=None)    # cfg.evaluate; writes under cfg.evaluate.output

Clips: the held-out split of the tokenizers, by video (``workflows.train.data.held_out`` over video
ids, 1 in ``val_every``: the final tokenizer never trained on these videos), at most ``max_clips`` of
them in clip id order. Methods (each one assignment per clip, ``evatok.routing``):

- ``uniform`` at every candidate count (the fixed-length baselines);
- ``router``: the router's argmax;
- ``budget`` at each of ``evaluate.budgets`` mean tokens per clip: one lambda per budget, fitted on up
  to ``calibration_clips`` clips of the *training* videos, frozen, then applied clip by clip; the row
  reports the achieved mean next to the target (``budget_error_pct``);
- ``labels``: the label stage's max-reward assignments (the oracle; when every held-out clip has one);
- ``best_uniform``: per clip the uniform assignment of highest reward (needs the label stage's scores);
- ``threshold`` at each threshold: the ElasticTok-style baseline (per block, the smallest count whose
  block MSE is under the threshold); by default 9 thresholds sweep the held-out block MSEs of the
  uniform reconstructions (their 5%..95% quantiles, every clip, block and count pooled).

Each (clip, assignment) pair is reconstructed once by the final tokenizer and scored with
``evatok.metrics`` (MSE, PSNR, SSIM on frames in [0, 1], the clip's value the mean over its frames;
LPIPS with ``lpips_backbone``; rFVD with ``i3d``, over the method's reconstructions against the
clips). With the label stage's scores, each row also has the reward percentile of its assignments
(``evatok.assignment.reward_percentile``) and the router row its top-1 / top-5 against the labels.
``psnr_vs_uniform_db``: the row's PSNR minus the uniform curve's at the same mean tokens (linear in
log tokens between uniform points); ``tokens_saved_pct``: how many fewer tokens than the uniform
curve needs for the row's PSNR.

Measurement protocol: every row carries, in its ``protocol.*`` columns and in the MLflow run's tags
(``evatok.eval.protocol.*``), the split (rule and digest of its clip ids), the data digest, clips,
videos, frames, size, fps, the model files' SHA-256, the label digest, and the feature networks
(LPIPS / I3D) with their files' SHA-256.

Outputs (``evaluate.output``): ``metrics.parquet`` + ``metrics.csv`` (one row per method and setting),
``assignments.parquet`` (per clip and method: assignment, tokens, metrics), ``quality_cost.png``,
``assignments.png`` (per-clip heatmaps), ``recon_grid.png``, ``protocol.json``, ``summary.json``; all
logged to the MLflow run ``run_id`` (artifacts under ``evaluate/``, metrics ``eval/<mode>/<metric>`` with
``<mode>`` = ``uniform:<count>``, ``router``, ``budget:<tokens>``, ``labels``, ``best_uniform``,
``threshold:<t>``: the names ``evatok compare`` reads).

Generation: with ``evaluate.ar`` (comma-separated exported AR models) and ``workflows.generate``
present, ``generation_metrics(ar, tokenizer, **metric_settings(cfg))`` is called for each and its
numbers logged as ``eval/gen/<ar name>/...`` (``generation.json``; ``ar_names``).
"""
from __future__ import annotations

import io
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from workflows import storage
from workflows.clips import digest, frames_from_table
from workflows.stage import StageError

PROTOCOL = "protocol."


class EvaluateError(StageError):
    pass


@dataclass
class EvaluateResult:
    output: str
    table: pa.Table
    metrics: dict[str, float]
    protocol: dict
    files: dict[str, str] = field(default_factory=dict)
    summary: str = ""
    seconds: float = 0.0


# ----------------------------------------------------------------------------- clips and models
def held_out_split(clips: str, val_every: int, max_clips: int) -> tuple[pa.Table, dict]:
    """The held-out clips (videos with ``crc32(video_id) % val_every == 0``, the first ``max_clips`` by
    clip id) and how they were chosen."""
    from workflows.label import clips_prefix
    from workflows.tokenize import select_clips
    from workflows.train.data import files_digest, held_out

    prefix = clips_prefix(clips)
    ids = storage.read_table(prefix, columns=["clip_id", "video_id"])
    held = held_out(ids.column("video_id").to_pylist(), val_every)
    chosen = sorted(str(c) for c, v in zip(ids.column("clip_id").to_pylist(), ids.column("video_id").to_pylist())
                    if str(v) in held)[:max_clips]
    split = f"held-out videos (crc32(video_id) % {val_every} == 0), first {max_clips} clips by clip id"
    if not chosen:  # too few videos for a held-out one: measured anyway, and the protocol says on what
        chosen = sorted(str(c) for c in ids.column("clip_id").to_pylist())[:max_clips]
        split = (f"ALL clips, NOT held out: no video id hashes into 1 in {val_every} (too few videos), "
                 f"first {max_clips} clips by clip id")
        print(f"[evaluate] warning: no held-out video at val_every={val_every}; measuring on training clips",
              flush=True)
    keep = set(chosen)
    table = select_clips(clips, lambda c, v: c in keep, None,
                         columns=("clip_id", "video_id", "label", "fps", "shape", "frames"))
    order = np.argsort(np.array(table.column("clip_id").to_pylist()))
    table = table.take(pa.array(order))
    fps = sorted({float(f) for f in table.column("fps").to_pylist() if f is not None and f == f})
    protocol = {"split": split, "split_digest": digest(chosen), "data": storage.redact(prefix), "data_digest": files_digest(prefix),
                "clips": len(chosen), "videos": len(set(table.column("video_id").to_pylist())),
                "frames": int(table.column("shape")[0].as_py()[0]), "size": int(table.column("shape")[0].as_py()[1]),
                "fps": ",".join(f"{f:g}" for f in fps) if fps else "native"}
    return table, protocol


def _local(uri: str) -> str:
    """A local path for a weights file (remote ones copied to a temporary file once)."""
    local = storage.local_path(uri)
    if local is not None:
        return str(local)
    fd, tmp = tempfile.mkstemp(suffix=os.path.splitext(uri)[1] or ".bin")
    with os.fdopen(fd, "wb") as f:
        f.write(storage.read_bytes(uri))
    return tmp


# ----------------------------------------------------------------------------- scoring
class Reconstructions:
    """Every (clip, assignment) pair reconstructed once, with its per-frame metrics (and, for the clips
    in ``keep_video``, or all when ``keep_all``, the uint8 reconstruction)."""

    def __init__(self, tokenizer, x: torch.Tensor, batch_size: int = 8, lpips=None, keep_video=(),
                 keep_all: bool = False):
        self.tok, self.x, self.batch_size, self.lpips = tokenizer, x, batch_size, lpips
        self.keep_video, self.keep_all = set(keep_video), keep_all
        self.frames: dict[tuple[int, int], dict[str, np.ndarray]] = {}  # (clip, a) -> {metric: [T]}
        self.videos: dict[tuple[int, int], np.ndarray] = {}

    @torch.no_grad()
    def add(self, choice: torch.Tensor) -> None:
        """Reconstruct the pairs (i, choice[i]) not seen yet, grouped by assignment (one count vector a call)."""
        from evatok.assignment import AssignmentSpace
        from evatok.metrics import frame_metrics
        from evatok.video import to_uint8

        c = self.tok.config
        space = AssignmentSpace(c.counts, c.num_blocks)
        p = next(self.tok.parameters())
        todo: dict[int, list[int]] = {}
        for i, a in enumerate(choice.tolist()):
            if (i, a) not in self.frames:
                todo.setdefault(a, []).append(i)
        for a, rows in sorted(todo.items()):
            counts = space.counts(a).to(p.device)
            for s in range(0, len(rows), self.batch_size):
                part = rows[s:s + self.batch_size]
                x = self.x[part].to(p.device, p.dtype)
                recon = self.tok.reconstruct(x, counts).float().clamp(-0.5, 0.5)
                m = frame_metrics(recon + 0.5, x.float() + 0.5, lpips=self.lpips)
                for j, i in enumerate(part):
                    self.frames[(i, a)] = {k: v[j].cpu().numpy().astype(np.float64) for k, v in m.items()}
                    if self.keep_all or i in self.keep_video:
                        self.videos[(i, a)] = to_uint8(recon[j].cpu())

    def clip_metrics(self, choice: torch.Tensor) -> dict[str, np.ndarray]:
        """{metric: [N]} (mean over frames) of the pairs (i, choice[i])."""
        rows = [self.frames[(i, a)] for i, a in enumerate(choice.tolist())]
        return {k: np.array([r[k].mean() for r in rows]) for k in rows[0]}

    def block_mse(self, choice: torch.Tensor, block_frames: int) -> np.ndarray:
        """[N, blocks] MSE of each block (mean over its frames)."""
        return np.stack([self.frames[(i, a)]["mse"].reshape(-1, block_frames).mean(1)
                         for i, a in enumerate(choice.tolist())])


def default_thresholds(block_mse: np.ndarray, n: int = 9) -> list[float]:
    """``n`` thresholds sweeping the block errors of the uniform reconstructions (every clip, block and
    count pooled): their quantiles from 5% to 95%, descending (distinct values only)."""
    v = np.asarray(block_mse, dtype=np.float64).ravel()
    q = np.quantile(v, np.linspace(0.95, 0.05, n)) if len(v) else np.zeros(0)
    return [float(t) for t in dict.fromkeys(q.tolist())]


def interp_uniform(uniform: list[tuple[float, float]], tokens: float) -> float:
    """The uniform curve's value at ``tokens`` (points (tokens, value), linear in log tokens; clamped)."""
    pts = sorted(uniform)
    xs, ys = np.log([p[0] for p in pts]), [p[1] for p in pts]
    return float(np.interp(math.log(tokens), xs, ys))


def tokens_for(uniform: list[tuple[float, float]], value: float) -> float:
    """Tokens the uniform curve needs to reach ``value`` (it must rise with tokens); NaN outside it."""
    pts = sorted(uniform)
    ys = [p[1] for p in pts]
    if not all(b > a for a, b in zip(ys, ys[1:])) or not ys[0] <= value <= ys[-1]:
        return float("nan")
    return float(math.exp(np.interp(value, ys, np.log([p[0] for p in pts]))))


def _name(method: str, setting: str) -> str:
    """The mode's name, spelled as the assignment modes (``uniform:8``, ``budget:200``, ``threshold:0.01``)."""
    return f"{method}:{setting}" if setting else method


# ----------------------------------------------------------------------------- plots
def plot_quality_cost(rows: list[dict], path: str, metrics: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"uniform": ("o-", "tab:gray"), "router": ("*", "tab:red"), "budget": ("s-", "tab:orange"),
              "labels": ("D", "tab:green"), "best_uniform": ("^", "tab:purple"), "threshold": ("x--", "tab:blue")}
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for method, (style, color) in styles.items():
            pts = sorted((r["mean_tokens"], r[m]) for r in rows if r["method"] == method and r.get(m) == r.get(m))
            if not pts:
                continue
            ms = 12 if style in ("*", "D", "^") else 6
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, label=method, markersize=ms)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("mean tokens per clip")
        ax.set_ylabel(m)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("held-out reconstruction quality against tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_assignments(panels: dict[str, np.ndarray], path: str, counts) -> None:
    """Heatmaps: one panel per method, rows = clips, columns = blocks, colour = log2 tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = next(iter(panels.values())).shape[0]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels) + 1, max(3, 0.12 * n + 1.5)), squeeze=False)
    im = None
    for ax, (name, c) in zip(axes[0], panels.items()):
        im = ax.imshow(np.log2(c), aspect="auto", cmap="viridis", vmin=math.log2(min(counts)),
                       vmax=math.log2(max(counts)), interpolation="nearest")
        ax.set_title(f"{name}\n{c.sum(1).mean():.0f} tok/clip", fontsize=8)
        ax.set_xticks(range(c.shape[1]), [f"b{t + 1}" for t in range(c.shape[1])], fontsize=7)
        ax.set_yticks([])
    axes[0][0].set_ylabel("held-out clips")
    cb = fig.colorbar(im, ax=axes[0].tolist(), ticks=[math.log2(k) for k in counts])
    cb.ax.set_yticklabels([str(k) for k in counts])
    cb.set_label("tokens in the block")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_grid(x: np.ndarray, rows: list[tuple[str, list[np.ndarray | None]]], path: str, block_frames: int) -> None:
    """Rows: the clips, then each method's reconstructions; one column per shown clip, one frame per block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def strip(v):  # uint8 [T, H, W, 3] -> [H, blocks*W, 3], the first frame of each block
        return np.concatenate(list(v[::block_frames]), axis=1)

    all_rows = [("original", list(x))] + rows
    fig, axes = plt.subplots(len(all_rows), len(x), figsize=(3 * len(x), 1.0 * len(all_rows) + 0.5), squeeze=False)
    for r, (name, vids) in enumerate(all_rows):
        for c, v in enumerate(vids):
            ax = axes[r][c]
            if v is not None:
                ax.imshow(strip(v))
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- generation hook
def ar_models(ec) -> list[str]:
    """The AR model files of ``evaluate.ar`` (comma-separated) that exist (``evatok run`` names the
    pipeline's AR export before it is trained)."""
    return [u for u in (storage.absolute(x.strip()) for x in (ec.ar or "").split(",") if x.strip())
            if storage.exists(u)]


def ar_names(uris: list[str]) -> list[str]:
    """The name each AR model's metrics are logged under (``gen/<name>/...``): its file name without
    ``.pt``; where two files share that name (``ar/ar.pt`` and ``ar-uniform/ar.pt``), its folder's name
    and file name joined by ``-`` (``ar-ar``, ``ar-uniform-ar``), and a number where even that repeats."""
    parts = [u.rstrip("/").rsplit("/", 2)[-2:] for u in uris]
    stems = [p[-1].removesuffix(".pt") for p in parts]
    names = [s if stems.count(s) == 1 else f"{p[0]}-{s}" if len(p) == 2 else s for p, s in zip(parts, stems)]
    return [n if names.count(n) == 1 else f"{n}-{i + 1}" for i, n in enumerate(names)]


def classifier_file(ec) -> str:
    """``evaluate.classifier`` if that file exists, else "" (``evatok run`` names the pipeline's classifier
    export before it is trained; a stage run alone may have none)."""
    return ec.classifier if ec.classifier and storage.exists(ec.classifier) else ""


def generation(cfg, tokenizer_uri: str) -> dict[str, float | str]:
    """``workflows.generate.generation_metrics`` for every AR model of ``ar_models``; empty when there is
    none or that module is not there."""
    ars = ar_models(cfg.evaluate)
    if not ars:
        return {}
    try:
        from workflows.generate import generation_metrics, metric_settings
    except ImportError:
        print("[evaluate] evaluate.ar is set but workflows.generate is not there: no generation metrics", flush=True)
        return {}
    settings = metric_settings(cfg)
    classifier = classifier_file(cfg.evaluate)
    if classifier:
        settings["classifier"] = classifier
    elif cfg.evaluate.classifier:
        print(f"[evaluate] no classifier at {storage.redact(cfg.evaluate.classifier)}: generation metrics without "
              f"classifier accuracy and Frechet distance (evatok train classifier makes one)", flush=True)
    out: dict = {}
    for uri, name in zip(ars, ar_names(ars)):
        try:
            found = generation_metrics(uri, tokenizer_uri, **settings)
        except Exception as e:  # noqa: BLE001 - the reconstruction results stand without it; say why
            print(f"[evaluate] generation metrics of {storage.redact(uri)} failed: {type(e).__name__}: {e}", flush=True)
            out[f"gen/{name}/error"] = storage.redact(f"{type(e).__name__}: {e}")[:500]
            continue
        for k, v in found.items():
            out[f"gen/{name}/{k.removeprefix('gen/')}"] = v
    return out


# ----------------------------------------------------------------------------- the stage
def run_evaluate(cfg, run_id: str | None = None, quiet: bool = False) -> EvaluateResult:
    """Evaluate the final tokenizer + router on held-out videos; write the table and plots under
    ``evaluate.output``; log them to the MLflow run ``run_id`` (if any)."""
    from evatok import routing
    from evatok.assignment import AssignmentSpace, reward_percentile
    from evatok.video import to_tensor
    from workflows.tokenize import calibration_split, load_model, read_label_map

    t0 = time.perf_counter()
    ec = cfg.evaluate
    if not (ec.clips and ec.tokenizer and ec.output):
        raise EvaluateError("evaluate.clips, evaluate.tokenizer and evaluate.output must all be set")
    val_every = cfg.train.val_every if ec.val_every is None else ec.val_every
    out = storage.canonical(ec.output)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = load_model(ec.tokenizer, device)
    c = tok.config
    space = AssignmentSpace(c.counts, c.num_blocks)
    totals = space.totals
    router = load_model(ec.router, device) if ec.router else None
    if router is not None and tuple(router.config.counts) != tuple(c.counts):
        raise EvaluateError(f"router counts {router.config.counts} != tokenizer counts {c.counts}")

    table, protocol = held_out_split(ec.clips, val_every, ec.max_clips)
    ids = [str(v) for v in table.column("clip_id").to_pylist()]
    if [protocol["frames"], protocol["size"]] != [c.frames, c.size]:
        raise EvaluateError(f"clips are {protocol['frames']}x{protocol['size']}, the tokenizer's {c.frames}x{c.size}")
    x = to_tensor(torch.from_numpy(np.array(frames_from_table(table))))
    n = len(ids)
    protocol.update({"tokenizer": storage.redact(ec.tokenizer), "tokenizer_sha256": storage.sha256(ec.tokenizer),
                     "router": storage.redact(ec.router) if router is not None else "",
                     "router_sha256": storage.sha256(ec.router) if router is not None else "",
                     "metrics": "mse/psnr/ssim per frame on [0,1] RGB, clip = mean over frames (evatok.metrics)",
                     "lpips_net": "", "lpips_sha256": "", "i3d_sha256": "", "labels": "", "labels_digest": ""})

    lpips = fvd = None
    if ec.lpips_backbone:
        from evatok.metrics import LPIPS

        lpips = LPIPS(ec.lpips_net, backbone_path=_local(ec.lpips_backbone)).to(device)
        protocol.update({"lpips_net": f"{ec.lpips_net} (ImageNet backbone, lpips v0.1 heads)",
                         "lpips_sha256": storage.sha256(ec.lpips_backbone)})
    if ec.i3d:
        from evatok.metrics import FVD

        fvd = FVD(_local(ec.i3d), device=device, sha256=ec.i3d_sha256)  # checked before loading when given
        protocol.update({"i3d_sha256": storage.sha256(ec.i3d), "rfvd_net": "I3D TorchScript (i3d_torchscript.pt)"
                         + (", SHA-256 checked before loading" if ec.i3d_sha256 else "")})

    # labels and rewards (label stage output): oracle, top-1/top-5, reward percentiles
    labels = rewards = None
    if ec.labels:
        lm = read_label_map(ec.labels)
        if all(i in lm for i in ids):
            labels = torch.tensor([lm[i] for i in ids])
        protocol.update({"labels": storage.redact(ec.labels),
                         "labels_digest": digest(f"{u}:{s}:{e}" for u, s, e in storage.list_files(ec.labels, (".parquet",)))})
        if (storage.read_done(ec.labels) or {}).get("scores"):
            from workflows.relabel import reward_rows

            rr = reward_rows(ec.labels, set(ids))
            if all(i in rr for i in ids):
                rewards = torch.as_tensor(np.stack([rr[i] for i in ids])).double()
                info = storage.read_done(ec.labels)
                protocol["reward"] = f"{info.get('metric')} w_q={info.get('w_q')} w_l={info.get('w_l')} (proxy scores)"

    # assignments of every method
    methods: list[tuple[str, str, torch.Tensor, dict]] = []  # (method, setting, choice [N], extra columns)
    for k in c.counts:
        methods.append(("uniform", f"{k}", routing.uniform_choice(space, k, n), {}))
    calibrations = {}
    if router is not None:
        lp = routing.router_log_probs(router, x.to(device), ec.batch_size)
        extra = {}
        if labels is not None:
            top = lp.topk(5, -1).indices
            extra = {"top1": float((top[:, 0] == labels).float().mean()),
                     "top5": float((top == labels[:, None]).any(-1).float().mean())}
        methods.append(("router", "", lp.argmax(-1), extra))
        budgets = [float(b) for b in ec.budgets] or [float(k * c.num_blocks) for k in c.counts[1:-1]]
        calib = calibration_split(ec.clips, val_every, ec.calibration_clips)
        if calib.num_rows:
            lp_cal = routing.router_log_probs(router, to_tensor(torch.from_numpy(np.array(frames_from_table(calib))))
                                              .to(device), ec.batch_size)
            protocol["calibration"] = (f"{calib.num_rows} clips of training videos (not held out), "
                                       f"digest {digest(sorted(calib.column('clip_id').to_pylist()))}")
            for b in budgets:
                cal = routing.calibrate_lambda(lp_cal, totals, b)
                calibrations[f"{b:g}"] = cal.to_dict()
                methods.append(("budget", f"{b:g}", routing.budget_choice(lp, totals, cal.lam),
                                {"budget": b, "lambda": cal.lam, "calibration_mean_tokens": cal.achieved}))
    if labels is not None:
        methods.append(("labels", "", labels, {}))
    if rewards is not None:
        uni = space.uniform_indices()
        methods.append(("best_uniform", "", uni[rewards[:, uni].argmax(-1)], {}))

    grid_ids = list(range(min(ec.grid_clips, n)))
    rec = Reconstructions(tok, x, ec.batch_size, lpips, keep_video=grid_ids, keep_all=fvd is not None)
    for _, _, choice, _ in methods:
        rec.add(choice)
    # threshold baseline: thresholds from the uniform block errors unless given
    thresholds = [float(t) for t in ec.thresholds] or default_thresholds(
        np.stack([rec.block_mse(m[2], c.patch_t) for m in methods if m[0] == "uniform"]))
    th = routing.threshold_assignments(tok, x.to(device), thresholds)
    for j, thr in enumerate(thresholds):
        methods.append(("threshold", f"{thr:.4g}", th[j], {"threshold": thr}))
        rec.add(th[j])

    # the table
    real_stats = None
    if fvd is not None and n >= 2:
        from evatok.metrics import feature_stats, frechet_distance

        real_stats = feature_stats(fvd.features((x + 0.5).clamp(0, 1)))
    rows, per_clip = [], []
    for method, setting, choice, extra in methods:
        m = rec.clip_metrics(choice)
        row = {"method": method, "setting": setting, "mean_tokens": float(totals[choice].double().mean()),
               **{k: float(v.mean()) for k, v in m.items()}}
        if real_stats is not None:  # the method's reconstructions against the clips, in I3D features
            fake = torch.stack([torch.from_numpy(rec.videos[(i, a)]) for i, a in enumerate(choice.tolist())])
            fake_stats = feature_stats(fvd.features(fake.permute(0, 4, 1, 2, 3).float() / 255.0))
            row["rfvd"] = frechet_distance(*real_stats, *fake_stats)
        if rewards is not None:
            row["reward_percentile"] = reward_percentile(rewards, choice)
        row.update(extra)
        if method == "budget":  # the achieved mean on held-out clips against the target
            row["budget_error_pct"] = 100.0 * (row["mean_tokens"] - row["budget"]) / row["budget"]
        rows.append(row)
        for i, a in enumerate(choice.tolist()):
            per_clip.append({"clip_id": ids[i], "method": method, "setting": setting, "assignment": a,
                             "counts": space.counts(a).tolist(), "total_tokens": int(totals[a]),
                             **{k: float(v[i]) for k, v in m.items()}})
    uniform_pts = {k: [(r["mean_tokens"], r[k]) for r in rows if r["method"] == "uniform"] for k in ("psnr",)}
    for r in rows:
        r["psnr_vs_uniform_db"] = r["psnr"] - interp_uniform(uniform_pts["psnr"], r["mean_tokens"])
        need = tokens_for(uniform_pts["psnr"], r["psnr"])
        r["tokens_saved_pct"] = 100.0 * (1.0 - r["mean_tokens"] / need) if need == need else float("nan")
    lead = ["method", "setting", "mean_tokens"]
    columns = lead + sorted({k for r in rows for k in r} - set(lead))
    for r in rows:
        r.update({PROTOCOL + k: (v if isinstance(v, (int, float)) else str(v)) for k, v in protocol.items()})
    cols = columns + [PROTOCOL + k for k in protocol]
    metrics_table = pa.Table.from_pylist([{k: r.get(k, float("nan") if k not in ("method", "setting") else "")
                                           for k in cols} for r in rows])

    # files
    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        def put(name: str, data: bytes) -> None:
            storage.write_bytes_atomic(storage.join(out, name), data)
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
            files[name] = storage.join(out, name)

        def parquet_bytes(t: pa.Table) -> bytes:
            import pyarrow.parquet as pq

            buf = io.BytesIO()
            pq.write_table(t, buf)
            return buf.getvalue()

        put("metrics.parquet", parquet_bytes(metrics_table))
        put("metrics.csv", metrics_table.to_pandas().to_csv(index=False).encode())
        put("assignments.parquet", parquet_bytes(pa.Table.from_pylist(per_clip)))
        plot_metrics = ["psnr", "ssim"] + [k for k in ("lpips", "lpips_random_backbone", "rfvd") if k in columns]
        for name, fn in (("quality_cost.png", lambda p: plot_quality_cost(rows, p, plot_metrics)),
                         ("assignments.png", lambda p: plot_assignments(
                             {_name(mm, s): space.counts(ch).numpy() for mm, s, ch, _ in methods
                              if mm in ("router", "labels", "best_uniform")
                              or (mm == "budget" and s == methods_mid(methods, "budget"))
                              or (mm == "threshold" and s == methods_mid(methods, "threshold"))}
                             or {"uniform": space.counts(methods[0][2]).numpy()}, p, c.counts)),
                         ("recon_grid.png", lambda p: plot_grid(
                             np.array(frames_from_table(table))[grid_ids],
                             [(f"{_name(mm, s)} ({int(totals[ch[grid_ids]].double().mean())} tok)",
                               [rec.videos.get((i, int(ch[i]))) for i in grid_ids])
                              for mm, s, ch, _ in methods if mm in ("router", "labels")
                              or (mm == "uniform" and s == methods_mid(methods, "uniform"))
                              or (mm == "budget" and s == methods_mid(methods, "budget"))], p, c.patch_t))):
            path = os.path.join(tmp, name)
            fn(path)
            with open(path, "rb") as f:
                put(name, f.read())
        gen = generation(cfg, storage.canonical(ec.tokenizer))
        if gen:
            put("generation.json", json.dumps(gen, indent=2, default=str).encode())
        put("protocol.json", json.dumps({**protocol, "calibrations": calibrations}, indent=2, default=str).encode())

        flat: dict[str, float] = {}
        for r in rows:
            for k, v in r.items():
                if k not in ("method", "setting") and not k.startswith(PROTOCOL) and isinstance(v, (int, float)) \
                        and v == v:
                    flat[f"eval/{_name(r['method'], r['setting'])}/{k}"] = float(v)
        flat.update({k: float(v) for k, v in gen.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        flat.update({f"eval/protocol/{k}": float(v) for k, v in protocol.items() if isinstance(v, (int, float))})
        summary = comparison(rows)
        put("summary.json", json.dumps({"summary": summary, "rows": rows}, indent=2, default=str).encode())
        if run_id:
            _log_mlflow(cfg, run_id, tmp, flat, protocol, gen)
    text = format_table(rows)
    if not quiet:
        print(text, flush=True)
        print(f"[evaluate] {summary}", flush=True)
    return EvaluateResult(out, metrics_table, flat, protocol, files, summary, time.perf_counter() - t0)


def methods_mid(methods, kind: str) -> str:
    """The setting in the middle of a method's sweep (for plots that show one of them)."""
    s = [m[1] for m in methods if m[0] == kind]
    return s[len(s) // 2] if s else ""


def comparison(rows: list[dict]) -> str:
    """One line: the router (and the oracle) against the uniform curve at matched mean tokens."""
    parts = []
    for r in rows:
        if r["method"] in ("router", "labels"):
            saved = r["tokens_saved_pct"]
            parts.append(f"{r['method']}: {r['mean_tokens']:.1f} tokens/clip, PSNR {r['psnr']:.2f} dB "
                         f"({r['psnr_vs_uniform_db']:+.2f} dB vs uniform at equal tokens"
                         + (f"; {saved:+.1f}% tokens vs uniform at equal PSNR" if saved == saved else "") + ")")
    budgets = [r for r in rows if r["method"] == "budget"]
    if budgets:
        parts.append("budgets (held out): " + ", ".join(f"{r['budget']:g} -> {r['mean_tokens']:.1f} "
                                                         f"({r['budget_error_pct']:+.1f}%)" for r in budgets))
    best = [r for r in rows if r["method"] == "best_uniform"]
    if best and "reward_percentile" in best[0]:
        router = [r for r in rows if r["method"] == "router"]
        parts.append("reward percentile: router "
                     + (f"{router[0]['reward_percentile']:.1f}" if router else "-")
                     + f", best uniform {best[0]['reward_percentile']:.1f}")
    return "; ".join(parts) or "uniform curve only (no router)"


def format_table(rows: list[dict]) -> str:
    cols = ["mean_tokens", "psnr", "ssim", "mse"] + [k for k in ("lpips", "lpips_random_backbone", "rfvd",
                                                                 "reward_percentile", "psnr_vs_uniform_db",
                                                                 "tokens_saved_pct") if any(k in r for r in rows)]
    head = f"{'method':<24}" + "".join(f"{k[:12]:>13}" for k in cols)
    lines = [head, "-" * len(head)]
    for r in rows:
        vals = "".join(f"{r.get(k, float('nan')):>13.4g}" for k in cols)
        lines.append(f"{_name(r['method'], r['setting'])[:24]:<24}{vals}")
    return "\n".join(lines)


def _log_mlflow(cfg, run_id: str, folder: str, metrics: dict, protocol: dict, gen: dict) -> None:
    """Metrics, artifacts (every file written) and the protocol as tags, on the stage's MLflow run."""
    from workflows.tracking import Lineage, resolve_tracking_uri

    lin = Lineage(resolve_tracking_uri(cfg.mlflow.tracking_uri, cfg.work_dir), cfg.mlflow.experiment, cfg.work_dir,
                  quiet=True)
    lin.log_metrics(run_id, metrics)
    lin.set_tags(run_id, {f"evatok.eval.protocol.{k}": v for k, v in protocol.items()})
    gen_tags = {f"evatok.eval.{k}": v for k, v in gen.items() if not isinstance(v, (int, float))}
    lin.set_tags(run_id, gen_tags)
    lin._do("log_artifacts", lambda: lin.client().log_artifacts(run_id, folder, "evaluate"))


# ----------------------------------------------------------------------------- pipeline stage helpers
RUNTIME = frozenset({"clips", "tokenizer", "router", "labels", "output", "batch_size", "lpips_backbone", "i3d",
                     "i3d_sha256", "ar", "classifier"})
FILES = ("metrics.parquet", "metrics.csv", "assignments.parquet", "quality_cost.png", "assignments.png",
         "recon_grid.png", "protocol.json", "summary.json", "generation.json")


def stage_fingerprint(cfg):
    """The evaluation settings, the clips' content and the bytes of every model and weights file it
    reads (the labels' content when given; the generation settings when an AR model is)."""
    from workflows import fingerprint as F
    from workflows.label import clips_prefix

    ec = cfg.evaluate
    conf = F.section(ec, "evaluate", RUNTIME)
    inputs = {"clips": F.dataset_input(clips_prefix(ec.clips)), "tokenizer": F.file_input(ec.tokenizer)}
    for role in ("router", "lpips_backbone", "i3d"):
        if getattr(ec, role):
            inputs[role] = F.file_input(getattr(ec, role))
    if ec.labels:
        inputs["labels"] = F.dataset_input(ec.labels)
    ars = ar_models(ec)
    for i, uri in enumerate(ars):
        inputs["ar" if i == 0 else f"ar{i + 1}"] = F.file_input(uri)
    if ars:
        conf.update(F.section(cfg.generate, "generate", {"ar", "tokenizer", "output", "real", "i3d"}))
        classifier = classifier_file(ec)
        if classifier:
            inputs["classifier"] = F.file_input(classifier)
    return F.Fingerprint("evaluate", conf, inputs, storage.canonical(ec.output))


def clear(out: str) -> None:
    from workflows.fingerprint import CLAIM

    for name in (*FILES, "_DONE.json", CLAIM):
        storage.remove(storage.join(out, name))
