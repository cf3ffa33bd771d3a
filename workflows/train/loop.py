"""One training loop: Ray Train (V2) ``TorchTrainer`` runs ``train_worker`` on every worker, which
wraps the recipe's model in ``deepspeed.initialize`` (and the discriminator in its own engine).

Driver (``run_training``): make every URI absolute, resolve data, MLflow URI and storage; fingerprint
the run (``workflows.fingerprint.train_fingerprint``: resolved config + content digests of the data,
labels, router, tokenizer) and skip a run whose ``_DONE.json`` holds that fingerprint and whose export
still has its recorded SHA-256; refuse (``StaleOutputError``) a place that holds a run made otherwise,
unless ``force``, which starts a fresh Ray Train run named after the fingerprint (stale checkpoints are
never resumed); otherwise ``TorchTrainer(...).fit()`` with ``RunConfig(name, storage_path,
storage_filesystem, FailureConfig(max_failures))``, so a worker failure restarts from the last
reported checkpoint and rerunning the same command resumes the same run.

Worker: build -> (resume) -> steps -> checkpoint every ``checkpoint_every`` (every rank saves its
DeepSpeed shard and reports it) -> export (rank 0, through ``storage``). Rank 0 alone talks to MLflow.
Test hook: ``EVATOK_TEST_FAIL_ONCE=<step>:<rank>:<marker path>`` makes that rank ``os._exit(1)``
once after that step (the marker file records that it happened).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workflows import storage
from workflows.config import Config, ConfigError, flatten, to_dict
from workflows.train import checkpoint as ckpt
from workflows.train.schedules import lr_lambda

ENV_PREFIXES = ("MLFLOW_", "AWS_", "EVATOK_", "RAY_DATA_")
ENV_KEYS = ("TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR", "OMP_NUM_THREADS")
FAIL_ENV = "EVATOK_TEST_FAIL_ONCE"


@dataclass
class TrainResult:
    run_name: str
    model: str
    steps: int
    export_uri: str
    mlflow_run_id: str | None
    checkpoint_path: str | None = None
    skipped: bool = False           # already done: nothing trained
    metrics: dict = field(default_factory=dict)
    fingerprint: str = ""           # what the model was made from (workflows.fingerprint.train_fingerprint)
    export_sha256: str = ""         # content digest of the exported file
    seconds: float = 0.0


def run_name(cfg: Config) -> str:
    return f"{cfg.name}-{cfg.train.model}"


def export_uri(cfg: Config) -> str:
    return cfg.train.output or storage.join(cfg.work_dir, "models", f"{run_name(cfg)}.pt")


def done_uri(cfg: Config) -> str:
    return storage.join(cfg.work_dir, "train", run_name(cfg))


def micro_batch_size(t, world: int) -> int:
    per = world * t.deepspeed.grad_accum
    if t.batch_size % per:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by num_workers*grad_accum={per}")
    return t.batch_size // per


def deepspeed_config(t, world: int) -> dict:
    ds = t.deepspeed
    if ds.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.deepspeed.zero_stage must be 0-3, got {ds.zero_stage}")
    if ds.precision not in ("fp32", "bf16"):
        raise ConfigError(f"train.deepspeed.precision must be fp32 or bf16, got {ds.precision!r}")
    return {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size(t, world),
        "gradient_accumulation_steps": ds.grad_accum,
        "gradient_clipping": ds.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def worker_env(use_gpu: bool) -> dict[str, str]:
    """Settings the workers need from the driver's environment, by name; never a credential.

    ``worker_runtime_env`` lands in Ray's metadata (GCS, ``ray list actors --detail``, the dashboard),
    so only configuration goes there: endpoint URLs, region, tracking URI, profile *name*, test hooks.
    Credentials stay out (``storage.is_secret_env``: AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
    AWS_ACCESS_KEY_ID, MLFLOW_TRACKING_PASSWORD/TOKEN/USERNAME, anything named *SECRET*, *TOKEN*,
    *PASSWORD*, ...), and so does any value holding ``user:password@`` (an MLflow URI with basic auth).
    On a local Ray the workers still have them: the raylet is started by the driver and workers
    inherit its environment. On a cluster every node uses its own credentials (instance role,
    profile, or the environment its ``ray start`` was given)."""
    env = {k: v for k, v in os.environ.items()
           if (k.startswith(ENV_PREFIXES) or k in ENV_KEYS)
           and not storage.is_secret_env(k) and k != "MLFLOW_TRACKING_USERNAME" and not storage.has_userinfo(v)}
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    env.pop("OMP_NUM_THREADS", None)  # Ray sets it per worker from its CPU share
    return env


# ============================================================================ worker side
def _engine(model, t, world, lr, betas, steps, schedule, min_lr):
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, schedule, lr, min_lr, t.warmup_steps))
    engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                                 config=deepspeed_config(t, world))
    return engine


def _fmt_eta(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _maybe_fail(step: int, rank: int) -> None:
    spec = os.environ.get(FAIL_ENV)
    if not spec:
        return
    at, who, marker = spec.split(":", 2)
    if step == int(at) and rank == int(who) and not os.path.exists(marker):
        Path(marker).write_text(f"killed rank {rank} after step {step}\n")
        os._exit(1)


def train_worker(config: dict) -> dict:
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from workflows.tracking import Tracker, worker_uri
    from workflows.train.data import Collate, micro_batches
    from workflows.train.recipes import make_recipe

    cfg: Config = config["cfg"]
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if t.use_gpu else torch.device("cpu")
    dtype = torch.bfloat16 if t.deepspeed.precision == "bf16" else torch.float32
    torch.manual_seed(t.seed)  # identical initial weights on every rank
    gen = torch.Generator().manual_seed(t.seed * 1000 + rank)  # per-rank random assignments / dropout
    recipe = make_recipe(cfg, device, dtype, gen, classes=config["classes"])

    engine = _engine(recipe.build(), t, world, t.lr, t.betas, t.steps, t.schedule, t.min_lr)
    disc = recipe.build_disc()
    d_engine = _engine(disc, t, world, t.disc_lr, t.disc_betas, t.steps, "constant", t.disc_lr) if disc is not None else None

    state = ckpt.LoopState()
    # Resume from the newer of Ray's checkpoint and the newest complete one on storage (Ray can lose
    # the report of a checkpoint whose worker died right after it: workflows/train/checkpoint.py).
    ray_ckpt = ray.train.get_checkpoint()
    on_storage = ckpt.latest_complete(config["ckpt_root"], world) if config.get("ckpt_root") else None
    with contextlib.ExitStack() as stack:
        d = stack.enter_context(ray_ckpt.as_directory()) if ray_ckpt is not None else None
        ray_step = ckpt.state_of(d).step if d is not None and ckpt.state_of(d) is not None else -1
        if on_storage is not None and on_storage[1] > ray_step:
            d = ckpt.download(on_storage[0], stack.enter_context(tempfile.TemporaryDirectory()))
        if d is not None:
            state = ckpt.load(d, rank, engine, d_engine, recipe.generators())
    resumed = d is not None or None

    tracker = Tracker(worker_uri(config["tracking_uri"], config.get("tracking_env")), cfg.mlflow.experiment,
                      config["run_name"], enabled=rank == 0,
                      system_metrics=cfg.mlflow.system_metrics,
                      tags={"evatok.claim": config["claim_id"]} if config.get("claim_id") else None)
    if rank == 0:
        state.mlflow_run_id = tracker.start(state.mlflow_run_id)
        if resumed is not None:  # where this worker starts: the checkpoint's step and data position
            tracker.set_tags({"evatok.resumed_from": json.dumps(
                {"step": state.step, "epoch": state.epoch, "micro_in_epoch": state.micro_in_epoch})})
        if resumed is None:
            tracker.log_params(flatten(to_dict(cfg)))
            tracker.log_input(config["data_uri"], name=f"{t.model}-train", digest=config["data_digest"])
            tracker.set_tags({**config["upstream_tags"], **recipe.upstream(), "evatok.model": t.model})
        print(f"[{config['run_name']}] {'resuming at' if resumed else 'starting at'} step {state.step}/{t.steps} "
              f"(world {world}, zero {t.deepspeed.zero_stage}, {t.deepspeed.precision})", flush=True)

    micro = micro_batch_size(t, world)
    shard = ray.train.get_dataset_shard("train")
    data = micro_batches(shard, micro, config["per_epoch"], state.epoch, state.micro_in_epoch, t.seed,
                         Collate(config["classes"], config["targets"], cfg.data.clip_len, hflip=t.hflip,
                                 random_window=t.random_window, seed=t.seed * 1000 + rank))
    ga = t.deepspeed.grad_accum

    # A fixed batch (the first one this rank sees, fixed assignments) to show the loss falls.
    fixed = None
    metrics: dict = {}

    ckpt_s = 0.0  # checkpoint time, kept out of the throughput figure (its cost depends on checkpoint_every)

    def save_and_report(step_metrics: dict) -> None:
        nonlocal ckpt_s
        c0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            ckpt.save(tmp, rank, state, engine, d_engine, recipe.generators())
            ray.train.report({**step_metrics, "step": state.step}, checkpoint=Checkpoint.from_directory(tmp))
        if state.step > s0 + 1:
            ckpt_s += time.perf_counter() - c0

    t0, s0 = time.perf_counter(), state.step
    while state.step < t.steps:
        logs: dict = {}
        for _ in range(ga):
            epoch, i, batch = next(data)
            inputs = recipe.prepare(batch)
            if fixed is None:  # every rank evaluates (ZeRO-3 forwards are collective); rank 0 reports
                fixed = inputs
                engine.eval()
                metrics["fixed_loss_start"] = recipe.eval_loss(engine, fixed)
                engine.train()
            d_module = d_engine.module if d_engine is not None else None
            loss, logs, aux = recipe.train_loss(engine, inputs, state.step, d_module)
            engine.backward(loss)
            engine.step()
            if d_engine is not None:
                d_loss, d_logs = recipe.disc_loss(d_module, inputs, aux, state.step)
                if d_loss is not None:
                    d_engine.backward(d_loss)
                    d_engine.step()
                    logs.update(d_logs)
            state.epoch, state.micro_in_epoch = epoch, i + 1
        state.step += 1
        state.samples += t.batch_size
        if state.step == s0 + 1:  # throughput excludes the first step (graph warm-up, lazy init)
            t1 = time.perf_counter()
        logs["loss"] = float(loss.detach())
        logs["lr"] = engine.get_lr()[0]
        if rank == 0 and (state.step % t.log_every == 0 or state.step == t.steps):
            el = time.perf_counter() - t0
            sps = (state.step - s0) * t.batch_size / max(el, 1e-9)
            eta = (t.steps - state.step) * t.batch_size / max(sps, 1e-9)
            print(f"[{config['run_name']}] step {state.step}/{t.steps} loss {logs['loss']:.4f} "
                  f"{sps:.1f} samples/s eta {_fmt_eta(eta)}", flush=True)
            if state.step > tracker.logged_through:  # a resume replays the steps after its checkpoint (same
                # data, same RNG): the ones the interrupted attempt logged stay logged once
                tracker.log_metrics({**logs, "samples_per_s": sps, "epoch": state.epoch}, step=state.step)
        if state.step % t.checkpoint_every == 0 or state.step == t.steps:
            save_and_report({"loss": logs["loss"]})
        _maybe_fail(state.step, rank)

    # ---------------------------------------------------------------- end: eval, samples, export
    if state.step - s0 > 1:
        metrics["samples_per_s"] = (state.step - s0 - 1) * t.batch_size / (time.perf_counter() - t1 - ckpt_s)
        metrics["checkpoint_s"] = ckpt_s
    engine.eval()
    if fixed is None:  # resumed at the very end (a rerun of a finished run): nothing was trained
        inputs = recipe.prepare(next(data)[2])
    else:
        inputs = fixed
    metrics["fixed_loss_end"] = recipe.eval_loss(engine, inputs)
    if "val" in config["datasets"]:
        val_collate = Collate(config["classes"], config["targets"], cfg.data.clip_len)  # centre window, no flip
        val = ray.train.get_dataset_shard("val")
        batches = (recipe.prepare(b) for b in val.iter_torch_batches(batch_size=micro, collate_fn=val_collate))
        metrics.update(recipe.evaluate(engine, batches))
    export = None
    weights = full_fp32_state(recipe.export_module(engine.module), t.deepspeed.zero_stage)  # collective
    if rank == 0:
        tracker.log_metrics(metrics, step=state.step)
        # The plain evatok model, rebuilt from its config with the full fp32 weights: what is exported,
        # and what draws the sample images (an engine forward on rank 0 alone would hang under ZeRO-3).
        trained = recipe.export_module(engine.module)
        final_model = type(trained)(trained.config)
        final_model.load_state_dict(weights)
        image = recipe.sample_image(final_model.to(device).eval(), inputs)
        if image is not None:
            tracker.log_image(image, "samples", state.step)
        export = _export(final_model.cpu(), config, state, metrics)
        tracker.set_tags({"evatok.export": export, "evatok.checkpoint_step": str(state.step)})
        tracker.end()
    return {"mlflow_run_id": state.mlflow_run_id, "export_uri": export, "step": state.step, "metrics": metrics}


def full_fp32_state(module: torch.nn.Module, zero_stage: int) -> dict[str, torch.Tensor]:
    """The module's weights as full fp32 CPU tensors, on every rank (all ranks must call it).

    Trained parameters come from the optimizer's fp32 master copies where DeepSpeed keeps them (bf16
    training, ZeRO 1-3), not from the bf16 working copy; under ZeRO-3 the partitioned parameters are
    gathered first (``GatheredParameters`` and the fp32 gather are collectives)."""
    import contextlib

    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    params = dict(module.named_parameters())
    gather = deepspeed.zero.GatheredParameters(list(params.values())) if zero_stage == 3 else contextlib.nullcontext()
    with gather:
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    for name, p in params.items():
        if p.requires_grad and name in state:
            master = safe_get_full_fp32_param(p)
            if master is not None:
                state[name] = master.detach().cpu().clone()
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _export(model, config, state, metrics) -> str:
    """One plain file (``evatok.export``), fp32, written atomically through storage."""
    from evatok.export import save_model

    meta = {"mlflow_run_id": state.mlflow_run_id or "", "step": state.step, "run_name": config["run_name"],
            "data": storage.redact(config["data_uri"]), "data_digest": config["data_digest"],
            "classes": list(config["classes"] or []),
            **{k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}}
    buf = io.BytesIO()
    save_model(model, buf, meta)
    storage.write_bytes_atomic(config["export_uri"], buf.getvalue())
    return config["export_uri"]


# ============================================================================ driver side
def _upstream_tags(cfg: Config, parent_run_id: str | None = None) -> dict[str, str]:
    """Lineage: the MLflow run ids recorded in the done markers of the stages this run reads (an ingest
    output prefix, or its ``clips/`` folder; a labels prefix), and the parent run (``evatok run``)."""
    tags = {}
    for name, uri in (("data", cfg.train.data), ("labels", cfg.train.labels)):
        if not uri:
            continue
        info: dict = {}
        candidates = [uri]
        if storage.canonical(uri).rstrip("/").endswith("/clips"):
            candidates.append(storage.canonical(uri).rstrip("/")[: -len("/clips")])
        for c in candidates:
            try:
                info = storage.read_done(c) or {}
            except storage.StorageError:
                info = {}
            if info:
                break
        if info.get("mlflow_run_id"):
            tags[f"upstream.{name}_run_id"] = str(info["mlflow_run_id"])
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return tags


def val_rewards(labels: str, table, held: set[str]):
    """``clip_id -> float32[625]`` rewards of the held-out clips ``held`` only (None when the labels have
    none): what the router's validation measures its reward percentile against. Every labeled clip's
    rewards would be ~250 MB at 100k clips, shipped with the validation's map function."""
    import numpy as np
    import pyarrow as pa

    if "reward" in table.column_names and pa.types.is_list(table.schema.field("reward").type):
        ids = [str(c) for c in table.column("clip_id").to_pylist()]
        keep = [i for i, c in enumerate(ids) if c in held]
        col = table.column("reward").take(pa.array(keep, pa.int64())).to_pylist()
        return {ids[i]: np.asarray(r, np.float32) for i, r in zip(keep, col)}
    if (storage.read_done(labels) or {}).get("scores"):  # a label-stage output: rewards from scores/
        from workflows.relabel import reward_rows

        return reward_rows(labels, clip_ids=held)
    return None


def _prepare_data(cfg: Config):
    """Datasets for the trainer plus what every worker must agree on."""
    from workflows.train import data as D
    from workflows.train.recipes import RECIPES

    t = cfg.train
    uri = D.parquet_prefix(t.data)
    recipe_cls = RECIPES.get(t.model)
    if recipe_cls is None:
        raise ConfigError(f"unknown train.model {t.model!r}; choose from {sorted(RECIPES)}")
    columns = list(recipe_cls.columns)
    classes, targets, lt = None, None, None
    if t.model in ("ar", "classifier"):
        labels = storage.read_table(uri, columns=["label"]).column("label")
        classes = sorted({str(x) for x in labels.to_pylist() if x is not None})
    if t.model == "router":
        if not t.labels:
            raise ConfigError("the router recipe needs train.labels (a Parquet prefix with clip_id, assignment)")
        lt = storage.read_table(t.labels)
        if "clip_id" not in lt.column_names or "assignment" not in lt.column_names:
            raise ConfigError(f"labels at {storage.redact(t.labels)} need columns clip_id and assignment; "
                              f"found {lt.column_names}")
        targets = dict(zip(lt.column("clip_id").to_pylist(), (int(a) for a in lt.column("assignment").to_pylist())))
    ds = D.open_dataset(uri, columns, cache_bytes=t.cache_data_mb * 2**20)
    datasets = {"train": ds}
    if t.model in ("proxy", "final", "classifier") and t.val_every > 0:
        # [I] held out by video, never by clip (clips of one video look alike): every video whose id hashes
        # into the last 1/val_every. The quality-cost curve is measured on these after training.
        vids = set(storage.read_table(uri, columns=["video_id"]).column("video_id").to_pylist())
        held = D.held_out(vids, t.val_every)
        if held and len(held) < len(vids):
            src = D.open_dataset(uri, columns + ["video_id"], cache_bytes=t.cache_data_mb * 2**20)
            ds = src.filter(lambda r, _h=held: r["video_id"] not in _h)
            datasets = {"train": ds, "val": src.filter(lambda r, _h=held: r["video_id"] in _h)}
    if t.model == "router":
        ds = ds.filter(lambda r, _k=set(targets): r["clip_id"] in _k)
        if t.val_data:
            val_uri = D.parquet_prefix(t.val_data)
            val = D.open_dataset(val_uri, columns)
            held = {str(c) for c in storage.read_table(val_uri, columns=["clip_id"]).column("clip_id").to_pylist()}
        else:  # [I] deterministic held-out split: every clip whose id hashes into the last 1/val_every
            held = D.held_out(targets, t.val_every)
            val = ds.filter(lambda r, _h=held: r["clip_id"] in _h)
            ds = ds.filter(lambda r, _h=held: r["clip_id"] not in _h)
        rewards = val_rewards(t.labels, lt, held)  # the held-out clips' only: they travel with the map function
        if rewards is not None:
            def add_reward(b, _r=rewards):
                import numpy as np
                b["reward"] = np.stack([np.asarray(_r[str(c)], dtype=np.float32) for c in b["clip_id"]])
                return b
            val = val.map_batches(add_reward, batch_format="numpy")
        datasets = {"train": ds, "val": val}
    rows = ds.count()
    world = t.num_workers
    per_epoch = rows // (world * micro_batch_size(t, world))
    if per_epoch < 1:  # fail on the driver, before workers start (and retry) in vain
        raise ConfigError(f"{rows} training rows at {storage.redact(uri)} are fewer than one global batch "
                          f"({world} workers x {micro_batch_size(t, world)})")
    return datasets, uri, D.files_digest(uri), rows, per_epoch, classes, targets


class FlatCurveError(RuntimeError):
    """The proxy's held-out quality does not rise with its token count: it cannot rank assignments."""


def curve_from_metrics(metrics: dict) -> dict[int, dict[str, float]]:
    """``{count: {"psnr", ...}}`` from the flat ``val/psnr_k<count>`` metrics of a tokenizer run."""
    curve: dict[int, dict[str, float]] = {}
    for key, v in metrics.items():
        if key.startswith("val/") and "_k" in key and not key.startswith("val/baseline"):
            m, _, k = key[4:].rpartition("_k")
            if k.isdigit():
                curve.setdefault(int(k), {})[m] = float(v)
    return curve


def _check_curve(cfg: Config, metrics: dict) -> None:
    """The method's precondition, enforced: a proxy whose held-out PSNR does not rise at every count, and
    by ``train.min_curve_gain_db`` overall, fails the stage (no done marker) instead of producing labels
    that are all the shortest assignment. The curve is printed either way."""
    curve = curve_from_metrics(metrics)
    if not curve:
        return
    from evatok.evaluation import check_curve

    ok, line = check_curve(curve, cfg.train.min_curve_gain_db)
    base = {k[len("val/baseline_"):-len("_psnr")]: v for k, v in metrics.items()
            if k.startswith("val/baseline_") and k.endswith("_psnr")}
    print(f"[{run_name(cfg)}] held-out quality-cost: {line}; baselines "
          + ", ".join(f"{k} {v:.2f} dB" for k, v in base.items()), flush=True)
    if cfg.train.model == "proxy" and cfg.train.min_curve_gain_db > 0 and not ok:
        raise FlatCurveError(f"the proxy cannot rank assignments: {line}. Train longer or on more data "
                             f"(proxy.steps, more videos); train.min_curve_gain_db=0 accepts it anyway")


def ray_run_name(name: str, short: str, decision, ray_results: str) -> str:
    """The Ray Train run (and its checkpoint folder under ``ray_results``) a training run uses.

    A resume continues the run its claim names. A run whose record says it was made otherwise starts
    fresh under ``<name>-<fingerprint>``, so the stale run's checkpoints are never resumed. With no
    record at all, ``<name>``, unless checkpoints are already there: with the record gone (deleted,
    or another work_dir sharing ``ray_results``) nothing says what they were made from, and resuming
    them would return a model of other inputs with no step trained; then ``<name>-<fingerprint>``."""
    from workflows import storage

    if decision.resume:
        return decision.claim.get("ray_run", name)
    if decision.fresh:
        return f"{name}-{short}"
    try:
        taken = bool(ckpt.checkpoint_dirs(storage.join(ray_results, name)))
    except storage.StorageError:
        taken = False
    return f"{name}-{short}" if taken else name


def run_training(cfg: Config, *, force: bool = False, parent_run_id: str | None = None,
                 fingerprint=None, quiet: bool = False) -> TrainResult:
    """Train ``cfg.train.model`` with the shared loop. Skip a finished run made from the same config and
    inputs; resume an interrupted one; refuse one made otherwise unless ``force`` (a fresh run).
    ``parent_run_id``: the MLflow run this one nests under (``evatok run``); ``fingerprint``: the one
    the caller already computed; ``quiet``: no skip/replace lines (the caller reports them)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from workflows import fingerprint as F
    from workflows.config import absolute_uris
    from workflows.stage import ensure_ray
    import dataclasses

    from workflows.tracking import for_workers, resolve_tracking_uri

    t0 = time.perf_counter()
    cfg = absolute_uris(cfg)  # before anything reaches a worker, whose working directory is not ours
    t = cfg.train
    name = run_name(cfg)
    place = done_uri(cfg)
    fp = fingerprint or F.train_fingerprint(cfg)
    decision = F.decide(f"train {t.model}", fp, place, force=force)
    if decision.skip:
        done = decision.record
        if not quiet:
            print(f"[{name}] already finished with this config and these inputs: "
                  f"{storage.redact(done.get('export_uri'))} (nothing to do)", flush=True)
        return TrainResult(done.get("ray_run", name), t.model, int(done["steps"]), done["export_uri"],
                           done.get("mlflow_run_id"), done.get("checkpoint_path"), skipped=True,
                           metrics=done.get("metrics", {}), fingerprint=fp.hash,
                           export_sha256=done.get("export_sha256", ""), seconds=float(done.get("seconds", 0.0)))
    ray_results = storage.join(cfg.work_dir, "ray_results")
    ray_run = ray_run_name(name, fp.short, decision, ray_results)
    if decision.fresh and not quiet:
        print(f"[{name}] replacing a run made otherwise ({'; '.join(decision.reasons)}): fresh run {ray_run}",
              flush=True)
    elif ray_run != name and not decision.resume and not quiet:
        print(f"[{name}] {storage.redact(storage.join(ray_results, name))} holds checkpoints of "
              f"a run with no record here (made from what, unknown): not resumed; fresh run {ray_run}", flush=True)
    micro_batch_size(t, t.num_workers)
    deepspeed_config(t, t.num_workers)
    if t.schedule not in ("cosine", "wsd", "constant"):
        raise ConfigError(f"train.schedule must be cosine, wsd or constant, got {t.schedule!r}")
    if decision.fresh:  # the old record goes first: from now on the claim says what this place holds
        storage.remove(storage.join(place, storage.DONE_MARKER))
    claim = F.write_claim(place, fp, ray_run=ray_run)  # exclusive: a concurrent run of this name fails here
    # Before Ray starts: a credentialed tracking URI goes into this process's environment (which a local
    # raylet and its workers inherit), and only its public part and the variable's name into Ray.
    tracking_uri, tracking_env = for_workers(resolve_tracking_uri(cfg.mlflow.tracking_uri, cfg.work_dir))
    public_cfg = dataclasses.replace(cfg, mlflow=dataclasses.replace(
        cfg.mlflow, tracking_uri=for_workers(cfg.mlflow.tracking_uri)[0] if cfg.mlflow.tracking_uri else None))
    ray = ensure_ray()
    import ray.train

    datasets, uri, digest, rows, per_epoch, classes, targets = _prepare_data(cfg)
    fs, path = storage.to_pyarrow(ray_results)
    loop_config = {  # Ray metadata: no credential (a tracking URI's user:password@ travels by env var name)
        "cfg": public_cfg, "run_name": ray_run, "tracking_uri": tracking_uri, "tracking_env": tracking_env,
        "data_uri": uri, "data_digest": fp.inputs["data"]["digest"], "rows": rows, "per_epoch": per_epoch,
        "classes": classes, "targets": targets, "datasets": sorted(datasets), "export_uri": export_uri(cfg),
        "upstream_tags": _upstream_tags(cfg, parent_run_id),
        "claim_id": claim["claim_id"],  # scopes the MLflow run this one may reopen (a resume: the same claim)
        "ckpt_root": storage.join(ray_results, ray_run),  # where this run's checkpoints land
    }
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        run_config=RunConfig(
            name=ray_run, storage_path=path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            worker_runtime_env={"env_vars": worker_env(t.use_gpu)},
        ),
    )
    result = trainer.fit()
    out = result.return_value or {}
    ckpt_path = result.checkpoint.path if result.checkpoint is not None else None
    res = TrainResult(ray_run, t.model, int(out.get("step", t.steps)), out.get("export_uri") or export_uri(cfg),
                      out.get("mlflow_run_id"), ckpt_path, metrics=out.get("metrics", {}), fingerprint=fp.hash)
    _check_curve(cfg, res.metrics)
    res.export_sha256 = storage.sha256(res.export_uri)
    res.seconds = time.perf_counter() - t0
    F.check_claim(place)  # a concurrent takeover of this place: do not record this run as its output
    storage.mark_done(place, {"steps": res.steps, "export_uri": res.export_uri, "export_sha256": res.export_sha256,
                              "mlflow_run_id": res.mlflow_run_id, "checkpoint_path": ckpt_path,
                              "metrics": res.metrics, "ray_run": ray_run, "fingerprint": fp.to_json(),
                              "outputs": {"model": {"uri": res.export_uri, "digest": res.export_sha256,
                                                    "kind": "file"}},
                              "seconds": round(res.seconds, 3), "finished_at": time.time()})
    return res
