"""``evatok compare``: runs from MLflow side by side, and their quality-cost curves in one picture.

A target is a run id, an experiment name, or a parent run (``evatok run``'s pipeline run). Each run
becomes one column; a run with child runs (a pipeline) is one column whose figures are its children's
metrics merged (a later child over an earlier one, the run's own metrics over both). An experiment
gives one column per top-level run in it (earlier comparisons, and runs with none of the figures,
excluded). No target: the runs of the
recipe's experiment (``mlflow.experiment``).

What is read (docs/compare.md lists the names, so stages can log them):

- curve points: ``eval/<mode>/mean_tokens`` with ``eval/<mode>/<quality>`` (``psnr``, ``ssim``, ``mse``,
  ``lpips``, ``rfvd``). ``<mode>`` is ``router``, ``labels``, ``uniform:<count>``, ``budget:<tokens>``,
  ``threshold:<t>``: the part before ``:`` names the curve, so ``uniform:8`` ... ``uniform:128`` are the
  points of the curve ``uniform``, and ``router`` is a curve of one point.
- router figures: ``eval/router/top1``, ``top5``, ``reward_percentile`` and
  ``eval/best_uniform/reward_percentile`` (else the router training run's ``val/top1`` ...).
- generation: ``gen/*`` (``workflows.generate.generation_metrics``; the evaluate stage logs them as
  ``gen/<AR model>/*``), with the classifier file's digest from the ``evatok.gen/protocol/feature_net_sha256`` tag.
- wall time: the run's own ``seconds`` metric (stage, pipeline and generate runs log it), else its end
  minus its start.

Computed here from the curve points: the uniform curve's quality at the router's mean tokens
(linear interpolation between its points) and the tokens the uniform curve needs to reach the
router's quality, hence "tokens saved at equal quality"; each curve's quality at the token counts of
the uniform points ("matched budgets"). A figure that cannot be read or computed shows "–".
"""
from __future__ import annotations

import csv
import io
import json
import re
import time
from dataclasses import dataclass, field

from workflows import storage
from workflows.config import Config

MISSING = "–"
QUALITY = ("psnr", "ssim", "mse", "lpips", "rfvd")
LOWER_IS_BETTER = {"mse", "lpips", "rfvd"}
RUN_ID = re.compile(r"^[0-9a-f]{32}$")

#: (row label, candidate metric names: the first present wins)
READ = [
    ("router top-1", ["eval/router/top1", "val/top1"]),
    ("router top-5", ["eval/router/top5", "val/top5"]),
    ("router reward percentile", ["eval/router/reward_percentile", "val/reward_percentile"]),
    ("best uniform reward percentile", ["eval/best_uniform/reward_percentile"]),
    ("gen: well-formed rate", ["gen/well_formed_rate"]),
    ("gen: mean tokens", ["gen/mean_tokens"]),
    ("gen: classifier accuracy", ["gen/classifier_acc"]),
    ("gen: Frechet (classifier features)", ["gen/frechet_classifier"]),
    ("gen: Frechet floor (real halves)", ["gen/frechet_classifier_real_halves"]),
    ("gen: FVD (I3D)", ["gen/fvd"]),
    ("gen: samples", ["gen/protocol/samples", "gen/samples"]),
]


class CompareError(ValueError):
    pass


@dataclass
class Entry:
    """One column: a run, with its children's metrics merged in."""
    name: str
    run_id: str
    experiment: str
    metrics: dict[str, float]
    tags: dict[str, str]
    runs: list[str]
    seconds: float | None = None
    named: bool = True          # given by its run id (else found in an experiment)


# ============================================================================ reading MLflow
def _children(client, run) -> list:
    runs = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'",
                              max_results=1000)
    return sorted(runs, key=lambda r: r.info.start_time or 0)


def _entry(client, run, experiment: str) -> Entry:
    metrics: dict[str, float] = {}
    tags: dict[str, str] = {}
    kids = _children(client, run)
    for k in kids:  # later children over earlier ones, the run's own values over all
        metrics.update(k.data.metrics)
        tags.update(k.data.tags)
    metrics.update(run.data.metrics)
    tags.update(run.data.tags)
    seconds = run.data.metrics.get("seconds")  # what the run measured itself (stages, pipelines, generate)
    if seconds is None and run.info.end_time and run.info.start_time:
        seconds = (run.info.end_time - run.info.start_time) / 1000.0
    name = run.info.run_name or run.info.run_id[:8]
    return Entry(f"{name} ({run.info.run_id[:6]})", run.info.run_id, experiment, metrics, tags,
                 [run.info.run_id, *(k.info.run_id for k in kids)], seconds)


def resolve_targets(client, targets: list[str], default_experiment: str) -> list[Entry]:
    """Run ids, experiment names or parent run ids -> entries (in the order given; an experiment's runs
    oldest first)."""
    entries: list[Entry] = []
    for t in targets or [default_experiment]:
        run = None
        if RUN_ID.match(t):
            try:
                run = client.get_run(t)
            except Exception:  # noqa: BLE001 - not a run id here: maybe an experiment of that name
                run = None
        if run is not None:
            exp = client.get_experiment(run.info.experiment_id)
            entries.append(_entry(client, run, exp.name))
            continue
        exp = client.get_experiment_by_name(t)
        if exp is None:
            where = getattr(client, "_tracking_client", None)
            where = storage.redact(getattr(where, "tracking_uri", "")) if where is not None else ""
            raise CompareError(f"{t!r} is neither a run id nor an experiment" + (f" on {where}" if where else ""))
        runs = [r for r in client.search_runs([exp.experiment_id], max_results=5000)
                if "mlflow.parentRunId" not in r.data.tags and r.data.tags.get("evatok.stage") != "compare"]
        for r in sorted(runs, key=lambda r: r.info.start_time or 0):
            entries.append(_entry(client, r, exp.name))
            entries[-1].named = False
    seen, unique = set(), []
    for e in entries:
        if e.run_id not in seen:
            seen.add(e.run_id)
            unique.append(e)
    if not unique:
        raise CompareError(f"no runs to compare in {', '.join(targets or [default_experiment])}")
    return unique


# ============================================================================ curves and figures
def curves(metrics: dict[str, float], quality: str = "psnr") -> dict[str, list[tuple[float, float, str]]]:
    """``{curve: [(mean_tokens, quality, mode), ...]}`` sorted by tokens, from ``eval/<mode>/...`` metrics."""
    out: dict[str, list[tuple[float, float, str]]] = {}
    for key, tokens in metrics.items():
        if not (key.startswith("eval/") and key.endswith("/mean_tokens")):
            continue
        mode = key[len("eval/"):-len("/mean_tokens")]
        q = metrics.get(f"eval/{mode}/{quality}")
        if q is None or mode == "" or "/" in mode:
            continue
        out.setdefault(mode.split(":", 1)[0], []).append((float(tokens), float(q), mode))
    return {k: sorted(v) for k, v in sorted(out.items())}


def interp(points: list[tuple[float, float, str]], x: float) -> float | None:
    """The curve's quality at ``x`` tokens (linear between points; None outside their range)."""
    if not points:
        return None
    for (x0, y0, _), (x1, y1, _) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    for px, py, _ in points:  # a single point, or x at the last point
        if abs(px - x) < 1e-9:
            return py
    return None


def tokens_at(points: list[tuple[float, float, str]], y: float) -> float | None:
    """The fewest tokens at which the curve reaches quality ``y`` (first crossing; None if never)."""
    for (x0, y0, _), (x1, y1, _) in zip(points, points[1:]):
        lo, hi = min(y0, y1), max(y0, y1)
        if lo <= y <= hi:
            return x0 if y1 == y0 else x0 + (x1 - x0) * (y - y0) / (y1 - y0)
    if points and abs(points[0][1] - y) < 1e-12:
        return points[0][0]
    return None


def lookup(values: dict, names: list[str], number: bool = True):
    """The first of ``names`` present; a ``gen/...`` name also matches ``gen/<AR model>/...`` (how the
    evaluate stage logs the generation metrics of each AR model it is given; the first in name order)."""
    for n in names:
        if n in values:
            return float(values[n]) if number else values[n]
    for n in names:
        head, sep, rest = n.partition("gen/")
        if sep and head in ("", "evatok."):
            hits = sorted(k for k in values if k.startswith(head + "gen/") and k.count("/") == n.count("/") + 1
                          and k.endswith("/" + rest))
            if hits:
                return float(values[hits[0]]) if number else values[hits[0]]
    return None


def figures(e: Entry, quality: str = "psnr", budgets: list[float] | None = None) -> dict[str, float | str | None]:
    """The key figures of one entry (row label -> value; None = missing)."""
    m = e.metrics
    cv = curves(m, quality)
    uni, router = cv.get("uniform", []), cv.get("router", [])
    rows: dict[str, float | str | None] = {"experiment": e.experiment, "wall time (s)": e.seconds}
    rt = router[0][0] if router else None
    rq = router[0][1] if router else None
    rows["router mean tokens"] = rt
    rows[f"router {quality}"] = rq
    uq = interp(uni, rt) if rt is not None else None
    rows[f"uniform {quality} at router tokens"] = uq
    rows[f"router - uniform {quality} (same tokens)"] = (rq - uq) if rq is not None and uq is not None else None
    ut = tokens_at(uni, rq) if rq is not None else None
    rows[f"uniform tokens at router {quality}"] = ut
    rows["tokens saved vs uniform (%)"] = 100.0 * (1 - rt / ut) if rt is not None and ut else None
    if "labels" in cv:
        rows["oracle (labels) mean tokens"], rows[f"oracle (labels) {quality}"] = cv["labels"][0][:2]
    for b in budgets or []:
        for name, pts in cv.items():
            if len(pts) > 1 or name == "uniform":
                rows[f"{name} {quality} @ {b:g} tokens"] = interp(pts, b)
    for label, names in READ:
        rows[label] = lookup(m, names)
    sha = lookup(e.tags, ["evatok.gen/protocol/feature_net_sha256"], number=False)
    rows["gen: classifier file"] = sha[:12] if sha else None
    return rows


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return MISSING
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
    return str(v)


# ============================================================================ outputs
@dataclass
class CompareResult:
    entries: list[Entry]
    rows: dict[str, list]                    # label -> one value per entry
    quality: str
    drawn: list[tuple[str, str, int]] = field(default_factory=list)  # (entry, curve, points) on the PNG
    left_out: list[str] = field(default_factory=list)  # runs of an experiment with none of the figures
    png: str | None = None
    csv: str | None = None
    mlflow_run_id: str | None = None

    def table(self):
        from rich.table import Table

        t = Table(title=f"evatok compare ({self.quality})")
        t.add_column("figure")
        for e in self.entries:
            t.add_column(e.name, justify="right")
        for label, values in self.rows.items():
            t.add_row(label, *(_fmt(v) for v in values))
        return t

    def csv_text(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["figure", *(e.run_id for e in self.entries)])
        w.writerow(["name", *(e.name for e in self.entries)])
        for label, values in self.rows.items():
            w.writerow([label, *("" if v is None else v for v in values)])
        return buf.getvalue()


def plot(entries: list[Entry], quality: str = "psnr") -> tuple[bytes, list[tuple[str, str, int]]]:
    """One PNG: every entry's curves (x mean tokens per clip, y quality); entries by colour, curves by
    marker. Returns (PNG bytes, what was drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    markers = {"uniform": "o", "router": "*", "labels": "D", "budget": "s", "threshold": "^"}
    drawn = []
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, e in enumerate(entries):
        c = colours[i % len(colours)]
        for name, pts in curves(e.metrics, quality).items():
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            style = "-" if name == "uniform" else "--"
            ax.plot(xs, ys, style if len(pts) > 1 else "", marker=markers.get(name, "x"), color=c,
                    markersize=10 if len(pts) == 1 else 5, label=f"{e.name}: {name}")
            drawn.append((e.name, name, len(pts)))
    ax.set_xlabel("mean tokens per clip")
    ax.set_ylabel(quality + (" (lower is better)" if quality in LOWER_IS_BETTER else ""))
    ax.set_title("quality-cost curves")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, f"no eval/<mode>/mean_tokens + {quality} metrics", ha="center", transform=ax.transAxes)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue(), drawn


def compare(client, targets: list[str], default_experiment: str, quality: str = "psnr") -> CompareResult:
    """Read and tabulate (no writing)."""
    if quality not in QUALITY:
        raise CompareError(f"unknown quality metric {quality!r}; choose from {', '.join(QUALITY)}")
    entries = resolve_targets(client, targets, default_experiment)
    budgets: list[float] = []
    for e in entries:  # matched budgets: the token counts of the first uniform curve found
        uni = curves(e.metrics, quality).get("uniform")
        if uni:
            budgets = [p[0] for p in uni]
            break
    per = [figures(e, quality, budgets) for e in entries]
    # runs found in an experiment with none of the figures (ingest, a training run alone) add only dashes
    empty = [not e.named and all(v is None for k, v in f.items() if k not in ("experiment", "wall time (s)"))
             for e, f in zip(entries, per)]
    left_out = []
    if not all(empty):
        left_out = [e.name for e, x in zip(entries, empty) if x]
        entries, per = [e for e, x in zip(entries, empty) if not x], [f for f, x in zip(per, empty) if not x]
    labels: list[str] = []
    for f in per:
        labels += [k for k in f if k not in labels]
    rows = {k: [f.get(k) for f in per] for k in labels}
    rows = {k: v for k, v in rows.items() if " @ " not in k or any(x is not None for x in v)}
    return CompareResult(entries, rows, quality, left_out=left_out)


def run_compare(cfg: Config, targets: list[str], out: str | None = None, metric: str = "psnr") -> CompareResult:
    """``evatok compare``: read, tabulate, draw; ``out``: write compare.csv / curves.png there; log the
    comparison as its own MLflow run in the recipe's experiment (tag ``evatok.stage=compare``)."""
    import tempfile
    from pathlib import Path

    from workflows.tracking import Lineage, resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri, cfg.work_dir)
    lin = Lineage(uri, cfg.mlflow.experiment, cfg.work_dir, quiet=True)
    result = compare(lin.client(), targets, cfg.mlflow.experiment, metric)
    png, result.drawn = plot(result.entries, metric)
    text = result.csv_text()
    summary = {"targets": targets or [cfg.mlflow.experiment], "quality": metric,
               "runs": [{"name": e.name, "run_id": e.run_id, "experiment": e.experiment, "merged": e.runs}
                        for e in result.entries],
               "rows": result.rows, "drawn": result.drawn, "left_out": result.left_out}
    if out:
        result.png, result.csv = storage.join(out, "curves.png"), storage.join(out, "compare.csv")
        storage.write_bytes_atomic(result.png, png)
        storage.write_bytes_atomic(result.csv, text.encode())
        storage.write_bytes_atomic(storage.join(out, "compare.json"), json.dumps(summary, indent=2, default=str).encode())
    lin.ensure_experiment()
    run_id = lin.start(f"{cfg.name}-compare-{time.strftime('%Y%m%d-%H%M%S')}", tags={
        "evatok.stage": "compare", "evatok.compare.runs": ",".join(e.run_id for e in result.entries),
        "evatok.compare.quality": metric})
    if run_id:
        def artifacts():
            with tempfile.TemporaryDirectory() as tmp:
                for name, data in (("curves.png", png), ("compare.csv", text.encode()),
                                   ("compare.json", json.dumps(summary, indent=2, default=str).encode())):
                    (Path(tmp) / name).write_bytes(data)
                    lin.client().log_artifact(run_id, str(Path(tmp) / name), "compare")
        lin._do("log_artifacts", artifacts)
        lin.log_metrics(run_id, {"runs_compared": len(result.entries), "curves_drawn": len(result.drawn)})
        lin.end(run_id)
    result.mlflow_run_id = run_id
    return result
