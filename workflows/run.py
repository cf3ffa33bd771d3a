"""``evatok run`` and ``evatok status``: the pipeline as a list of stages, each skipped by content.

    evatok run -c configs/tiny.yaml                 # videos -> clips -> proxy -> labels -> router -> final
                                                    #   -> codes -> AR -> classifier -> evaluation
    evatok run -c configs/tiny.yaml proxy.steps=50  # any key=value override; a changed stage is refused...
    evatok run -c configs/tiny.yaml --force         # ...unless --force: it and what depends on it rerun
    evatok status -c configs/tiny.yaml              # done / partial / missing / stale, outputs, MLflow runs

``PIPELINE`` is the chain, in order; a new stage is one more ``Stage`` subclass in that list (its
config, where it records itself, its fingerprint, what it runs). Every stage:

- reads its inputs from fixed places under ``work_dir`` unless a key says otherwise (``resolve``):
  ``videos/`` (synthetic, when there is no ``ingest.source``), ``data/``, ``proxy/``, ``label/``
  (labels in ``label/labels/<metric>-wq<w_q>-wl<w_l>``), ``router/``, ``final/``, ``codes/`` (the AR
  model's ``train.data`` defaults to ``codes/codes``), ``ar/``, ``eval/``;
- is fingerprinted (``workflows.fingerprint``): resolved config + content digests of its inputs. Same
  fingerprint, intact outputs: skipped, no Ray, no MLflow run. Interrupted: resumed. Made otherwise:
  refused with what changed, or with ``--force`` run afresh, so a changed stage reruns itself and
  (their inputs' digests having changed) the stages after it, and nothing else;
- is one MLflow run (``workflows.tracking.Lineage``): a child of the ``evatok run`` parent run, or a
  top-level run when a stage runs alone (``evatok ingest``/``label``/``train MODEL``); its inputs are
  logged with their digests and the run ids that produced them, its outputs as tags, trained models
  are registered (``evatok-<name>-<model>``), and its run id lands in its ``_DONE.json``.

Console: one line per stage (and a live progress bar on a terminal); Ray's own output goes to Ray's
log files unless ``verbose``.
"""
from __future__ import annotations

import copy
import logging
import os
import re
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

from workflows import fingerprint as F
from workflows import storage
from workflows.config import MODELS, NONE, Config, ConfigError, absolute_uris, load_config, to_dict
from workflows.stage import StageError


class StageFailed(RuntimeError):
    """A stage raised: ``stage`` names it, ``error`` is the original exception."""

    def __init__(self, stage: str, error: BaseException):
        super().__init__(f"{stage}: {error}")
        self.stage, self.error = stage, error


# ============================================================================ resolved configs
def default_export(work_dir: str, model: str) -> str:
    return storage.join(work_dir, model, f"{model}.pt")


@dataclass
class Plan:
    """Every stage's resolved config, from one recipe and its overrides (URIs absolute, defaults filled)."""
    recipe: str | None
    overrides: list[str]
    base: Config                     # ingest / label settings (and the parent run's config)
    models: dict[str, Config]        # per trained model: cfg.train resolved for it
    synthetic: bool                  # no ingest.source: synthetic videos under work_dir/videos

    @property
    def work_dir(self) -> str:
        return self.base.work_dir

    @property
    def videos_dir(self) -> str:
        return storage.join(self.work_dir, "videos")


def _explicit_outputs(recipe, overrides) -> tuple[str | None, dict[str, str | None]]:
    """(``train.output``, ``{model: <model>.output}``) as the recipe and the overrides set them."""
    import yaml

    tree: dict = {}
    if recipe is not None:
        tree = yaml.safe_load(open(recipe).read()) or {}
    shared = (tree.get("train") or {}).get("output") or None
    per = {m: ((tree.get(m) or {}).get("output") or None) for m in MODELS}
    for item in overrides:
        key, _, value = item.partition("=")
        key = key.strip()
        if key == "train.output":
            shared = value or None
        elif key.endswith(".output") and key.split(".")[0] in MODELS:
            per[key.split(".")[0]] = value or None
    return shared, per


def resolve(recipe, overrides=(), target: str | None = None) -> Plan:
    """Load the recipe once per model and fill every unset input/output from ``work_dir``.

    ``target``: the one model a ``train MODEL`` command trains; ``train.output`` then names its file
    (as in ``evatok train proxy train.output=runs/tiny/proxy.pt``). For the whole pipeline it would
    name one file for all four models: per-model keys (``proxy.output=...``) say where each goes."""
    from workflows.relabel import labels_uri

    overrides = [o for o in (overrides or [])]
    base = absolute_uris(load_config(recipe, overrides))
    wd = base.work_dir
    synthetic = not base.ingest.source
    if synthetic:
        base.ingest.source = storage.join(wd, "videos", "manifest.csv")
    base.ingest.output = base.ingest.output or storage.join(wd, "data")
    lc = base.label
    models = {m: absolute_uris(load_config(recipe, [*overrides, f"train.model={m}"])) for m in MODELS}
    shared, per = _explicit_outputs(recipe, overrides)
    if shared and target is None:
        raise ConfigError(f"train.output={shared!r} would name one file for every model; set per-model outputs "
                          f"(proxy.output=..., router.output=..., final.output=..., ar.output=...)")
    exports = {m: storage.absolute(per[m] or (shared if m == target else None) or default_export(wd, m))
               for m in MODELS}
    seen: dict[str, str] = {}
    for m, uri in exports.items():
        if uri in seen:
            raise ConfigError(f"{seen[uri]} and {m} would both be exported to {storage.redact(uri)}; "
                              f"set {seen[uri]}.output=... and {m}.output=... apart")
        seen[uri] = m
    lc.clips = lc.clips or base.ingest.output
    lc.proxy = lc.proxy or exports["proxy"]
    lc.output = lc.output or storage.join(wd, "label")
    labels = labels_uri(lc)
    for sec, place in ((base.tokenize, "codes"), (base.evaluate, "eval")):  # read the final tokenizer + router
        sec.clips, sec.output = sec.clips or base.ingest.output, sec.output or storage.join(wd, place)
        sec.tokenizer, sec.router = sec.tokenizer or exports["final"], sec.router or exports["router"]
        sec.labels = sec.labels or labels
        sec.val_every = models["final"].train.val_every if sec.val_every is None else sec.val_every
    # generation metrics once the AR model exists; evaluate.ar=none: none (an empty value is the default)
    ar = base.evaluate.ar
    base.evaluate.ar = "" if ar == NONE else ar or exports["ar"]
    base.evaluate.classifier = base.evaluate.classifier or exports["classifier"]  # their feature network
    from workflows.tokenize import codes_uri

    for m, c in models.items():
        c.ingest, c.label = copy.deepcopy(base.ingest), copy.deepcopy(lc)
        t = c.train
        t.data = t.data or (codes_uri(base.tokenize.output) if m == "ar" else base.ingest.output)
        t.output = exports[m]
        if m == "router":
            t.labels = t.labels or labels
        if m in ("final", "ar"):
            t.router = t.router or exports["router"]
        if m == "ar":
            t.tokenizer = t.tokenizer or exports["final"]
    return Plan(str(recipe) if recipe else None, overrides, base, models, synthetic)


# ============================================================================ stages
@dataclass
class Context:
    """What a stage's execution needs from the runner."""
    plan: Plan
    force: bool = False
    verbose: bool = False
    parent_run_id: str | None = None
    run_id: str | None = None        # the stage's own MLflow run (driver-side stages)
    decision: F.Decision | None = None
    fingerprint: F.Fingerprint | None = None


@dataclass
class Executed:
    summary: str
    outputs: dict[str, dict]
    metrics: dict[str, float] = field(default_factory=dict)
    mlflow_run_id: str | None = None   # a run made elsewhere (training: rank 0 of the Ray Train workers)
    record: dict = field(default_factory=dict)


class Stage:
    """One step of the pipeline. Subclasses define where it records itself, its fingerprint and its work."""
    name = ""
    title = ""
    unit = "shards"
    driver_run = True                  # the runner opens its MLflow run (training: the workers do)
    role_stage: dict[str, str] = {}    # input role -> the stage that produces it

    def config(self, plan: Plan) -> Config:
        return plan.base

    def place(self, cfg: Config) -> str:
        """Where ``_DONE.json`` and ``_STAGE.json`` live."""
        raise NotImplementedError

    def output(self, cfg: Config) -> str:
        return self.place(cfg)

    def beside_hint(self, cfg: Config) -> str:
        """How to keep a refused stale output and write a new one beside it ("" when the output's own
        place says it: a new output URI is a new place)."""
        return ""

    def prepare(self, cfg: Config, ctx: Context, say) -> None:
        """Side effects needed before fingerprinting (the synthetic videos)."""

    def fingerprint(self, cfg: Config, plan: Plan) -> F.Fingerprint:
        raise NotImplementedError

    def clear(self, cfg: Config) -> None:
        """``--force`` on a stale place: remove what a fresh run must not reuse."""

    def execute(self, cfg: Config, ctx: Context) -> Executed:
        raise NotImplementedError

    def progress(self, cfg: Config, fp: F.Fingerprint | None) -> tuple[int, int | None]:
        """(units done, units in all) of a started run, read from storage."""
        return 0, None

    def config_tree(self, cfg: Config) -> dict:
        return to_dict(cfg)


def _count(uri: str, suffix: str = ".json") -> int:
    try:
        return len(storage.list_files(uri, (suffix,)))
    except storage.StorageError:
        return 0


class IngestStage(Stage):
    name, title = "ingest", "videos -> clips"

    def place(self, cfg):
        return storage.canonical(cfg.ingest.output)

    def output(self, cfg):
        return storage.join(cfg.ingest.output, "clips")

    def prepare(self, cfg, ctx, say):
        if not ctx.plan.synthetic:
            return
        ic, where = cfg.ingest, ctx.plan.videos_dir
        want = {"videos": ic.synthetic_videos, "seed": ic.synthetic_seed}
        have = storage.read_done(where) or {}
        if {k: have.get(k) for k in want} == want and storage.exists(cfg.ingest.source):
            return
        from workflows.datasets import write_synthetic

        t0 = time.perf_counter()
        write_synthetic(where, n=ic.synthetic_videos, seed=ic.synthetic_seed)
        storage.mark_done(where, want)
        say(f"wrote {ic.synthetic_videos} synthetic class-labeled videos (no ingest.source) -> "
            f"{storage.redact(where)} ({time.perf_counter() - t0:.1f}s)")

    def fingerprint(self, cfg, plan):
        return F.ingest_fingerprint(cfg)

    def clear(self, cfg):
        out = self.place(cfg)
        for part in ("_DONE.json", "_ingest.json", F.CLAIM):
            storage.remove(storage.join(out, part))
        for part in ("_shards", "clips", "errors"):
            storage.remove(storage.join(out, part), recursive=True)

    def execute(self, cfg, ctx):
        from workflows.ingest import run_ingest

        s = run_ingest(cfg, quiet=not ctx.verbose)
        if not s.clips:
            raise StageError(f"ingest made no clips from {s.videos} videos (errors: {s.errors or 'none'}); "
                             f"see {storage.redact(storage.join(s.output, 'errors'))}")
        outputs = {"clips": F.dataset_input(self.output(cfg))}
        errs = sum(s.errors.values())
        return Executed(f"{s.videos} videos -> {s.clips} clips, {errs} error rows; "
                        f"{s.shards_written} shards written, {s.shards_skipped} already there", outputs,
                        {"videos": s.videos, "clips": s.clips, "error_rows": errs, "shards": s.shards})

    def progress(self, cfg, fp):
        total = None
        if fp is not None:
            n = fp.inputs["videos"].get("count", 0)
            total = -(-n // max(1, cfg.ingest.videos_per_task))
        return _count(storage.join(cfg.ingest.output, "_shards")), total

    def config_tree(self, cfg):
        d = to_dict(cfg)
        return {"name": d["name"], "work_dir": d["work_dir"], "data": d["data"], "ingest": d["ingest"]}


class LabelStage(Stage):
    name, title = "label", "score 625 assignments, labels"
    role_stage = {"clips": "ingest", "proxy": "proxy"}

    def place(self, cfg):
        from workflows.relabel import labels_uri

        return labels_uri(cfg.label)

    def fingerprint(self, cfg, plan):
        return F.label_fingerprint(cfg)

    def clear(self, cfg):
        from workflows.label_units import UNITS

        out = storage.canonical(cfg.label.output)
        for part in ("_DONE.json", "_label.json", "stats.json"):
            storage.remove(storage.join(out, part))
        # UNITS: work units of unfinished shards, scored by the previous proxy/clips; a rerun would
        # otherwise take them as already scored
        for part in ("_shards", "scores", "labels", UNITS):
            storage.remove(storage.join(out, part), recursive=True)

    def execute(self, cfg, ctx):
        from workflows.label import run_label

        s = run_label(cfg, quiet=not ctx.verbose)
        outputs = {"labels": F.dataset_input(s.labels)}
        info = storage.read_done(s.labels) or {}
        metrics = {"clips": s.clips, "shards": s.shards}
        if "mean_tokens" in info:
            metrics["mean_tokens"] = info["mean_tokens"]
        return Executed(f"{s.clips} clips x 625 assignments in {s.shards} shards ({s.shards_written} scored now, "
                        f"{s.shards_skipped} already there); labels {s.metric} w_q={s.w_q:g} w_l={s.w_l:g}",
                        outputs, metrics, record={"scores_output": storage.canonical(cfg.label.output)})

    REWARD_KEYS = ("label.metric", "label.w_q", "label.w_l")

    def adopt(self, cfg, plan) -> bool:
        """After ``evatok relabel``: record the new labels with this stage's fingerprint when the scores
        they come from belong to the same clips, proxy and scoring settings (another labels folder of
        this output records them), so ``run`` takes them as done instead of refusing them."""
        place = self.place(cfg)
        rec = F.read_record(place)
        if rec is None or rec.get("fingerprint"):
            return False
        fp = self.fingerprint(cfg, plan)
        strip = lambda c: {k: v for k, v in (c or {}).items() if k not in self.REWARD_KEYS}  # noqa: E731
        for u, _, _ in storage.list_files(storage.join(cfg.label.output, "labels"), (".json",)):
            if not u.endswith("/_DONE.json") or storage.canonical(u) == storage.join(place, "_DONE.json"):
                continue
            other = (F.read_json(u) or {}).get("fingerprint") or {}
            same_inputs = {k: v.get("digest") for k, v in (other.get("inputs") or {}).items()} == \
                {k: v["digest"] for k, v in fp.inputs.items()}
            if same_inputs and strip(other.get("config")) == strip(fp.config):
                F.update_record(place, {"stage": "label", "fingerprint": fp.to_json(),
                                        "outputs": {"labels": F.dataset_input(place)}, "relabeled_from": u,
                                        "finished_at": time.time()})
                return True
        return False

    def progress(self, cfg, fp):
        from workflows.label import clips_prefix

        total = None
        try:
            total = len(storage.list_parquet(clips_prefix(cfg.label.clips)))
        except storage.StorageError:
            pass
        return _count(storage.join(cfg.label.output, "_shards")), total

    def config_tree(self, cfg):
        d = to_dict(cfg)
        return {"name": d["name"], "work_dir": d["work_dir"], "data": d["data"], "label": d["label"]}


class TrainStage(Stage):
    unit = "steps"
    driver_run = False

    def __init__(self, model: str):
        self.name = self.model = model
        self.title = {"proxy": "proxy tokenizer", "router": "router", "final": "final tokenizer",
                      "ar": "AR generator", "classifier": "video classifier (generation metrics)"}[model]
        self.role_stage = {"data": "ingest", "val_data": "ingest", **{
            "proxy": {}, "router": {"labels": "label"}, "final": {"router": "router"},
            "ar": {"data": "tokenize", "router": "router", "tokenizer": "final"}, "classifier": {}}[model]}

    def config(self, plan):
        return plan.models[self.model]

    def place(self, cfg):
        from workflows.train.loop import done_uri

        return done_uri(cfg)

    def output(self, cfg):
        return cfg.train.output

    def beside_hint(self, cfg):
        # A training run's record lives under its run name, not beside its model file: a second model
        # of one kind (other data, another train.output) needs a run name of its own.
        return (f"or train beside it under another run name (name={cfg.name}-2 ...; this one's record is "
                f"{storage.redact(self.place(cfg))})")

    def fingerprint(self, cfg, plan):
        return F.train_fingerprint(cfg)

    def execute(self, cfg, ctx):
        from workflows.train import run_training

        r = run_training(cfg, force=ctx.force, parent_run_id=ctx.parent_run_id, fingerprint=ctx.fingerprint,
                         quiet=not ctx.verbose)
        outputs = {"model": {"uri": r.export_uri, "digest": r.export_sha256, "kind": "file"}}
        metrics = {k: v for k, v in r.metrics.items() if isinstance(v, (int, float))}
        loss = metrics.get("fixed_loss_end")
        return Executed(f"{r.steps} steps" + (f", fixed-batch loss {metrics.get('fixed_loss_start', 0):.4f} -> "
                                              f"{loss:.4f}" if loss is not None else "") + f" (Ray Train run {r.run_name})",
                        outputs, metrics, mlflow_run_id=r.mlflow_run_id)

    def progress(self, cfg, fp):
        import json

        claim = F.read_claim(self.place(cfg)) or {}
        ray_run = claim.get("ray_run")
        if not ray_run:
            return 0, cfg.train.steps
        states = [u for u, _, _ in storage.list_files(storage.join(cfg.work_dir, "ray_results", ray_run), (".json",))
                  if u.endswith("/loop_state.json")]
        step = 0
        for u in states[-2:]:
            try:
                step = max(step, int(json.loads(storage.read_bytes(u)).get("step", 0)))
            except (storage.StorageError, ValueError):
                pass
        return step, cfg.train.steps


class TokenizeStage(Stage):
    """Every clip's assignment (``tokenize.mode``) encoded by the final tokenizer: ``codes/`` for ``train ar``."""
    name, title = "tokenize", "assignments -> codes"
    role_stage = {"clips": "ingest", "tokenizer": "final", "router": "router", "labels": "label"}

    def place(self, cfg):
        return storage.canonical(cfg.tokenize.output)

    def output(self, cfg):
        from workflows.tokenize import codes_uri

        return codes_uri(cfg.tokenize.output)

    def fingerprint(self, cfg, plan):
        from workflows.tokenize import stage_fingerprint

        return stage_fingerprint(cfg)

    def clear(self, cfg):
        from workflows.tokenize import clear

        clear(self.place(cfg))

    def execute(self, cfg, ctx):
        from workflows.tokenize import run_tokenize

        s = run_tokenize(cfg, quiet=not ctx.verbose)
        metrics = {"clips": s.clips, "error_rows": s.errors, "mean_tokens": s.mean_tokens, "shards": s.shards}
        if s.lam is not None:
            metrics["lambda"] = s.lam
        return Executed(f"{s.clips} clips encoded ({s.mode}), {s.mean_tokens:.1f} tokens per clip, {s.errors} error rows",
                        {"codes": F.dataset_input(self.output(cfg))}, metrics, record={"mode": s.mode, "lambda": s.lam})

    def progress(self, cfg, fp):
        from workflows.label import clips_prefix

        try:
            total = len(storage.list_parquet(clips_prefix(cfg.tokenize.clips)))
        except storage.StorageError:
            total = None
        return _count(storage.join(cfg.tokenize.output, "_shards")), total

    def config_tree(self, cfg):
        d = to_dict(cfg)
        return {k: d[k] for k in ("name", "work_dir", "data", "tokenize")}


class EvaluateStage(Stage):
    """Held-out reconstruction quality against mean tokens (``workflows.evaluate``): table, plots, MLflow."""
    name, title = "evaluate", "quality against tokens, held out"
    unit = "files"
    role_stage = {"clips": "ingest", "tokenizer": "final", "router": "router", "labels": "label", "ar": "ar",
                  "classifier": "classifier"}

    def place(self, cfg):
        return storage.canonical(cfg.evaluate.output)

    def fingerprint(self, cfg, plan):
        from workflows.evaluate import stage_fingerprint

        return stage_fingerprint(cfg)

    def clear(self, cfg):
        from workflows.evaluate import clear

        clear(self.place(cfg))

    def execute(self, cfg, ctx):
        from workflows.evaluate import run_evaluate

        r = run_evaluate(cfg, run_id=ctx.run_id)
        head = {k.split("/", 1)[1]: v for k, v in r.metrics.items()
                if k.startswith(("eval/router/", "eval/labels/")) and k.endswith(("/psnr", "/mean_tokens"))}
        return Executed(r.summary, {"metrics": F.file_input(r.files["metrics.parquet"])},
                        {"clips": r.protocol["clips"], **head})

    def config_tree(self, cfg):
        d = to_dict(cfg)
        return {k: d[k] for k in ("name", "work_dir", "data", "evaluate", "generate")}


#: The chain, in order. A new stage joins by being added to this list.
PIPELINE: list[Stage] = [IngestStage(), TrainStage("proxy"), LabelStage(), TrainStage("router"),
                         TrainStage("final"), TokenizeStage(), TrainStage("ar"), TrainStage("classifier"),
                         EvaluateStage()]


def stage_names() -> list[str]:
    return [s.name for s in PIPELINE]


def get_stage(name: str) -> Stage:
    for s in PIPELINE:
        if s.name == name:
            return s
    raise ConfigError(f"unknown stage {name!r}; stages: {', '.join(stage_names())}")


# ============================================================================ console
class Display:
    """One line per stage; on a terminal also a live bar (units, rate, ETA) fed by polling storage."""

    def __init__(self, console=None, verbose: bool = False):
        from rich.console import Console

        self.console = console or Console(highlight=False)
        self.verbose = verbose

    def say(self, text: str, style: str | None = None) -> None:
        self.console.print(text, style=style, soft_wrap=True, markup=False)

    def running(self, stage: Stage, cfg: Config, fp: F.Fingerprint | None):
        return _Live(self, stage, cfg, fp)


class _Live:
    def __init__(self, display: Display, stage: Stage, cfg: Config, fp):
        self.d, self.stage, self.cfg, self.fp = display, stage, cfg, fp
        self._stop = threading.Event()
        self.progress = None

    def __enter__(self):
        if not self.d.console.is_terminal:
            self.d.say(f"{self.stage.name:<7} running: {self.stage.title} ...")
            return self
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn(self.stage.unit), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=self.d.console, transient=True, redirect_stdout=True, redirect_stderr=False)
        self.progress.start()
        self.task = self.progress.add_task(f"{self.stage.name:<7} {self.stage.title}", total=None)
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(1.0):
            try:
                done, total = self.stage.progress(self.cfg, self.fp)
                self.progress.update(self.task, completed=done, total=total)
            except Exception:  # noqa: BLE001 - a display must never fail a stage
                pass

    def __exit__(self, *exc):
        self._stop.set()
        if self.progress is not None:
            self.progress.stop()
        return False


# ============================================================================ the runner
@dataclass
class Outcome:
    stage: str
    action: str                      # skipped | ran
    seconds: float
    output: str
    mlflow_run_id: str | None
    summary: str = ""


def _quiet_ray(verbose: bool) -> None:
    """Keep Ray's own output in Ray's log files (``-v`` shows it): no worker lines on the driver, no
    Ray Data progress bars or per-dataset INFO lines (they stay in ``ray-data.log``), Ray Train's print
    patch off (it logs every worker line a second time), no deprecation chatter."""
    # Ray Train's print patch sends every worker line to its logger as well as to stdout: each line
    # would reach a -v console twice. Off in every mode.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if verbose:
        return
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    for name in ("ray", "ray.train", "ray.tune", "ray.air", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import sys

    if "ray.data" in sys.modules:  # its console handler only; the file handler keeps everything
        for h in logging.getLogger("ray.data").handlers:
            if not isinstance(h, logging.FileHandler) and "File" not in type(h).__name__:
                h.setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"ray\.")  # warnings raised inside Ray's own code
    try:
        from ray.util.annotations import RayDeprecationWarning

        warnings.filterwarnings("ignore", category=RayDeprecationWarning)  # ... and about our calls
    except ImportError:
        pass


def start_ray(verbose: bool = False):
    """Connect to ``RAY_ADDRESS`` or start a local Ray, with Ray's console output off unless ``verbose``."""
    import ray

    _quiet_ray(verbose)
    if not ray.is_initialized():
        # No runtime_env here: inside a submitted job it would replace the job's own (its working_dir).
        # A local Ray's workers inherit this process's environment (the variables set above).
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=verbose,
                 logging_level=logging.INFO if verbose else logging.WARNING)
    from workflows.stage import quiet_data_context

    quiet_data_context(ray)
    _quiet_ray(verbose)  # ray.init and ray.data configure their loggers again
    return ray


class Runner:
    """Runs (or reports on) stages of one ``Plan``."""

    def __init__(self, plan: Plan, *, force: bool = False, verbose: bool = False, display: Display | None = None,
                 parent: bool = True):
        from workflows.tracking import Lineage, resolve_tracking_uri

        _quiet_ray(verbose)
        self.plan = plan
        self.force = force
        self.verbose = verbose
        self.display = display or Display(verbose=verbose)
        self.parent = parent
        cfg = plan.base
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri, cfg.work_dir)
        self.lineage = Lineage(self.tracking_uri, cfg.mlflow.experiment, cfg.work_dir, quiet=not verbose)
        self.parent_run_id: str | None = None
        self._ray = False

    # ------------------------------------------------------------------ helpers
    def _parent(self) -> str | None:
        if not self.parent:
            return None
        if self.parent_run_id is None and self.lineage.enabled:
            self.lineage.ensure_experiment()
            self.parent_run_id = self.lineage.start(f"{self.plan.base.name}-pipeline", tags={
                "evatok.stage": "pipeline", "evatok.recipe": str(self.plan.recipe or ""),
                "evatok.overrides": " ".join(self.plan.overrides)})
            self.lineage.log_config(self.parent_run_id, to_dict(self.plan.base))
        return self.parent_run_id

    def _ensure_ray(self) -> None:
        if not self._ray:
            start_ray(self.verbose)
            self._ray = True

    def producer(self, stage: Stage, role: str, digest: str) -> tuple[str | None, str | None]:
        """(stage name, MLflow run id) that produced an input with this digest, from its record."""
        src = stage.role_stage.get(role)
        if not src:
            return None, None
        try:
            up = get_stage(src)
            rec = F.read_record(up.place(up.config(self.plan))) or {}
        except (ConfigError, storage.StorageError):
            return src, None
        if any(o.get("digest") == digest for o in (rec.get("outputs") or {}).values()):
            return src, rec.get("mlflow_run_id")
        return src, None

    def lineage_inputs(self, stage: Stage, fp: F.Fingerprint) -> dict[str, dict]:
        out = {}
        for role, inp in fp.inputs.items():
            src, run_id = self.producer(stage, role, inp["digest"])
            out[role] = {**inp, "producer_stage": src or "", "producer_run_id": run_id or ""}
        return out

    # ------------------------------------------------------------------ run
    def run(self, names: list[str] | None = None) -> list[Outcome]:
        stages = [get_stage(n) for n in names] if names else list(PIPELINE)
        outcomes: list[Outcome] = []
        t0 = time.perf_counter()
        status = "FINISHED"
        try:
            for stage in stages:
                outcomes.append(self.run_stage(stage))
        except BaseException as e:
            status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
            raise
        finally:
            if self.parent_run_id:
                ran = [o.stage for o in outcomes if o.action == "ran"]
                self.lineage.set_tags(self.parent_run_id, {
                    "evatok.stages_ran": ",".join(ran),
                    "evatok.stages_skipped": ",".join(o.stage for o in outcomes if o.action == "skipped")})
                self.lineage.log_metrics(self.parent_run_id, {"seconds": time.perf_counter() - t0})
                self.lineage.end(self.parent_run_id, status)
        return outcomes

    def run_stage(self, stage: Stage) -> Outcome:
        cfg = stage.config(self.plan)
        ctx = Context(self.plan, force=self.force, verbose=self.verbose)
        say = lambda text: self.display.say(f"{stage.name:<7} {text}")  # noqa: E731
        try:
            stage.prepare(cfg, ctx, say)
            fp = stage.fingerprint(cfg, self.plan)
            try:
                decision = F.decide(stage.name, fp, stage.place(cfg), force=self.force)
            except F.StaleOutputError as e:
                hint = stage.beside_hint(cfg)
                raise (F.StaleOutputError(f"{e}, {hint}") if hint else e) from None
        except (ConfigError, F.StaleOutputError):
            raise
        except Exception as e:  # noqa: BLE001
            raise StageFailed(stage.name, e) from e
        if decision.skip:
            rec = decision.record
            say(f"up to date ({fp.short}) -> {storage.redact(stage.output(cfg))}"
                + (f"  [mlflow {rec.get('mlflow_run_id')}]" if rec.get("mlflow_run_id") else ""))
            return Outcome(stage.name, "skipped", 0.0, stage.output(cfg), rec.get("mlflow_run_id"), "up to date")
        ctx.decision, ctx.fingerprint = decision, fp
        t0 = time.perf_counter()
        run_id = None
        try:
            if decision.fresh:
                say(f"replacing a stale output ({'; '.join(decision.reasons)})")
                stage.clear(cfg)
            elif decision.resume:
                say("resuming an interrupted run")
            ctx.parent_run_id = self._parent()
            self._ensure_ray()
            inputs = self.lineage_inputs(stage, fp)
            if stage.driver_run:
                if self.parent_run_id is None:
                    self.lineage.ensure_experiment()
                run_id = self.lineage.start(f"{cfg.name}-{stage.name}", ctx.parent_run_id, tags={
                    "evatok.stage": stage.name, "evatok.fingerprint": fp.hash})
                ctx.run_id = run_id
                self.lineage.log_config(run_id, stage.config_tree(cfg))
                self.lineage.log_inputs(run_id, inputs)
                F.write_claim(stage.place(cfg), fp)
            else:
                self.lineage.ensure_experiment()
            with self.display.running(stage, cfg, fp):
                ex = stage.execute(cfg, ctx)
            seconds = time.perf_counter() - t0
            if stage.driver_run:
                self.lineage.log_outputs(run_id, ex.outputs)
                self.lineage.log_metrics(run_id, {**ex.metrics, "seconds": seconds})
                self.lineage.end(run_id)
                F.update_record(stage.place(cfg), {
                    **ex.record, "stage": stage.name, "fingerprint": fp.to_json(), "outputs": ex.outputs,
                    "mlflow_run_id": run_id, "seconds": round(seconds, 3), "finished_at": time.time()})
            else:
                run_id = ex.mlflow_run_id
                self.lineage.set_tags(run_id, {"evatok.stage": stage.name, "evatok.fingerprint": fp.hash,
                                               "evatok.code_version": self.lineage.code_version,
                                               "mlflow.source.git.commit": self.lineage.code_version.split("+")[0]})
                self.lineage.log_config(run_id, stage.config_tree(cfg), params=False)
                self.lineage.log_inputs(run_id, inputs)
                self.lineage.log_outputs(run_id, ex.outputs)
                model = ex.outputs["model"]
                version = self.lineage.register(f"evatok-{cfg.name}-{stage.name}", model["uri"], model["digest"],
                                                run_id, {"evatok.fingerprint": fp.hash})
                F.update_record(stage.place(cfg), {"stage": stage.name, "registered_model":
                                                   f"evatok-{cfg.name}-{stage.name}" if version else None,
                                                   "model_version": version})
        except BaseException as e:
            if stage.driver_run and run_id:
                self.lineage.end(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            if isinstance(e, (ConfigError, F.StaleOutputError, KeyboardInterrupt)):
                raise
            raise StageFailed(stage.name, e) from e
        say(f"done in {_fmt_s(seconds)}: {ex.summary} -> {storage.redact(stage.output(cfg))}"
            + (f"  [mlflow {run_id}]" if run_id else ""))
        return Outcome(stage.name, "ran", seconds, stage.output(cfg), run_id, ex.summary)

    # ------------------------------------------------------------------ status
    def status(self) -> list[dict]:
        rows: list[dict] = []
        states: dict[str, str] = {}
        for stage in PIPELINE:
            cfg = stage.config(self.plan)
            place = stage.place(cfg)
            row = {"stage": stage.name, "output": stage.output(cfg), "state": "missing", "detail": "",
                   "mlflow_run_id": None, "seconds": None}
            try:
                rec, claim = F.read_record(place), F.read_claim(place)
            except storage.StorageError as e:
                row.update(state="unknown", detail=str(e)[:120])
                rows.append(row)
                states[stage.name] = "unknown"
                continue
            fp = None
            try:
                fp = stage.fingerprint(cfg, self.plan)
            except Exception as e:  # noqa: BLE001 - inputs not there (yet)
                why = storage.redact(str(e).split("\n", 1)[0])[:100]
            ups = [s for s in stage.role_stage.values() if s in states and states[s] != "done"]
            if rec and rec.get("fingerprint"):
                row.update(mlflow_run_id=rec.get("mlflow_run_id"), seconds=rec.get("seconds"))
            if fp is not None and rec and (rec.get("fingerprint") or {}).get("hash") == fp.hash:
                changed = F.outputs_changed(rec)
                if changed:
                    row.update(state="stale", detail="; ".join(changed))
                elif ups:
                    row.update(state="stale", detail=f"upstream {', '.join(sorted(set(ups)))} not done")
                else:
                    row.update(state="done", detail=f"fingerprint {fp.short}")
            elif rec and rec.get("fingerprint"):
                if fp is None:
                    row.update(state="stale", detail=f"inputs: {why}")
                else:
                    row.update(state="stale", detail="; ".join(fp.diff(rec["fingerprint"]))[:200])
            else:
                done, total = 0, None
                try:
                    done, total = stage.progress(cfg, fp)
                except Exception:  # noqa: BLE001
                    pass
                if claim or done:
                    cfp = (claim or {}).get("fingerprint") or {}
                    if fp is not None and cfp and cfp.get("hash") != fp.hash:
                        row.update(state="stale", detail="unfinished run with other settings: "
                                   + "; ".join(fp.diff(cfp))[:160])
                    else:
                        row.update(state="partial", detail=f"{done}/{total if total is not None else '?'} {stage.unit}")
                elif fp is None:
                    row.update(state="missing", detail=f"waiting for {', '.join(sorted(set(ups)))}" if ups else why)
            states[stage.name] = row["state"]
            rows.append(row)
        return rows


def _fmt_s(s: float) -> str:
    s = float(s)
    return f"{s:.1f}s" if s < 60 else f"{int(s // 60)}m{int(s % 60):02d}s"


def mlflow_hint(tracking_uri: str) -> str:
    if tracking_uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {tracking_uri}"
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {storage.redact(tracking_uri)}"
    return f"mlflow ui --backend-store-uri {storage.redact(tracking_uri)}"


def status_table(rows: list[dict], title: str = "evatok pipeline"):
    from rich.table import Table

    style = {"done": "green", "partial": "yellow", "stale": "red", "missing": "dim", "unknown": "red"}
    table = Table(title=title)
    for col in ("stage", "state", "detail", "output", "MLflow run", "duration"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["stage"], f"[{style.get(r['state'], '')}]{r['state']}[/]", r["detail"] or "",
                      storage.redact(r["output"]), r["mlflow_run_id"] or "",
                      _fmt_s(r["seconds"]) if r["seconds"] is not None else "")
    return table


def root_cause(e: BaseException) -> BaseException:
    """The exception behind Ray's wrappers (task errors, Ray Train worker-group errors) and ``raise ... from``."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        nxt = None
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict) and failures:
            nxt = next(iter(failures.values()))
        elif isinstance(getattr(e, "cause", None), BaseException):
            nxt = e.cause
        elif isinstance(e, StageFailed):
            nxt = e.error
        elif e.__cause__ is not None:
            nxt = e.__cause__
        if nxt is None or not isinstance(nxt, BaseException):
            break
        e = nxt
    return e


_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Failure|Interrupt|Exit))(?:: (.*))?$")
_WRAPPERS = ("UserCodeException", "RayTaskError", "RayActorError", "WorkerGroupError", "TrainingFailedError")


def _traceback_root(text: str) -> str | None:
    """``Type: message`` of the first exception in a traceback text (Ray ships worker errors as text: in
    a chained traceback the first exception listed is the root cause), skipping Ray's wrappers."""
    for ln in text.splitlines():
        m = _EXC_LINE.match(ln.rstrip())
        if m and not m.group(1).rsplit(".", 1)[-1].startswith(_WRAPPERS):
            return f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(2) or ''}".rstrip(": ")
    return None


def one_line(e: BaseException) -> str:
    """``Type: first line of the message`` of the root cause (redacted), for the console."""
    cause = root_cause(e)
    text = str(cause)
    found = _traceback_root(text) if "Traceback (most recent call last)" in text else None
    if found is None:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        name = type(cause).__name__
        if name.startswith(("RayTaskError", "RayActorError")):
            name = "RayError"
        found = f"{name}: {lines[0]}" if lines else name
    return storage.redact(found)[:600]
