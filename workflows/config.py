"""One typed configuration tree for every stage, loaded from YAML with ``key=value`` overrides.

The same recipe file drives the CLI, ``ray job submit`` and the tests::

    cfg = load_config("configs/tiny.yaml", ["label.batch_size=4", "proxy.steps=50"])

Each stage reads only its own section. Unknown keys are errors (a typo must not silently train
the wrong model), and overrides are parsed as YAML scalars (``true``, ``3``, ``1e-4``, ``[1, 2]``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml


@dataclass
class DataConfig:
    """What a clip is. Shared by ingest (decoding) and every model (shapes)."""
    clip_len: int = 16          # frames per clip: 4 blocks of 4 frames
    size: int = 64              # square frame side after short-side resize + centre crop
    fps: float | None = 8.0     # resample to this rate; None keeps the native rate
    stride_s: float | None = None  # seconds between clip starts; None = back-to-back clips
    max_clips_per_video: int | None = None


@dataclass
class IngestConfig:
    source: str = ""            # directory/prefix of videos, UCF-101 tree, or a manifest .csv/.parquet
    output: str = ""            # URI prefix under which clips/ and errors/ are written
    videos_per_task: int = 16   # rows per map_batches call: amortises task scheduling (see DESIGN)
    num_cpus_per_task: float = 1.0
    max_concurrency: int | None = None  # caps concurrent decode tasks so reads cannot flood the object store
    split: str | None = None    # UCF-101 official split list name (e.g. "trainlist01") when present
    max_retries: int = 3        # Ray retries of a shard task whose worker died (node lost, OOM kill);
                                # finite, so a poison shard fails the stage instead of retrying forever
    decode_isolation: bool = True  # decode each video in a killable child process (workflows/isolation.py)
    decode_timeout_s: float = 60.0  # per video: read + probe, and the base of the decode deadline
    decode_timeout_per_s: float = 1.0  # + this many seconds per second of video (decoding runs ~10-30x faster)
    resources: dict[str, float] = field(default_factory=dict)  # extra Ray resources per decode task,
                                # e.g. {evatok_decode: 0.001} pins decoding to the CPU pool (infra/README.md)
    synthetic_videos: int = 64  # `evatok run` with no source: this many synthetic class-labeled videos
    synthetic_seed: int = 0     # are written to work_dir/videos first and ingested from there


@dataclass
class LabelConfig:
    clips: str = ""             # URI of ingest output (clips/)
    proxy: str = ""             # URI of the exported proxy tokenizer
    output: str = ""            # URI prefix for scores/, stats and labels/
    batch_size: int = 4         # clips per search batch (the prefix walk runs this many clips together)
    clips_per_task: int = 8     # clips per work unit (rows of a clips shard): the grain of scheduling,
                                # progress and resume; every actor stays busy, even on a one-shard dataset
                                # (smaller units, not below batch_size, when there are too few clips for
                                # 4 units an actor: see workflows.label_units.unit_size)
    num_actors: int = 2
    num_cpus_per_actor: float = 1.0  # also the actor's torch thread count (floor, >= 1)
    use_gpu: bool = False
    gpus_per_actor: float = 1.0  # with use_gpu: a fraction (0.5, 0.25) packs that many actors on one GPU
    metric: str = "lpips"       # distortion used for labels: lpips | mse | psnr | ssim
    w_q: float = 1.2
    w_l: float = 0.8
    lpips_backbone: str | None = None  # path/URI of VGG16 ImageNet weights; None -> no LPIPS column
    lpips_net: str = "vgg"
    max_restarts: int = 3       # Ray restarts of a label actor whose process died; finite (Ray Data's default is -1)
    max_task_retries: int = 3   # Ray retries of a shard call on a restarted actor; finite
    pool_retries: int = 2       # fresh actor pools for the units still missing after a worker/node loss; finite
    resources: dict[str, float] = field(default_factory=dict)  # extra Ray resources per actor,
                                # e.g. {evatok_gpu: 0.001} pins label actors to the GPU pool (infra/README.md)
    stats_samples: int = 10_000  # random (clip, assignment) pairs for the normalisation statistics
    stats: str = ""             # frozen normalisation statistics from another run: its stats.json, or the label
                                # output prefix that holds one ("" -> computed from this run's scores). Label a
                                # second dataset (UCF) on the first one's (WebVid's) reward scale
    seed: int = 0


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    precision: str = "fp32"     # fp32 | bf16
    grad_accum: int = 1
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    """One model's training run. The same loop runs all four; ``model`` picks the recipe."""
    model: str = "proxy"        # proxy | router | final | ar | classifier (generation metrics)
    preset: str = "tiny"
    steps: int = 200
    batch_size: int = 8         # global batch (per step, across workers, before accumulation)
    lr: float = 1e-4
    min_lr: float = 1e-6
    warmup_steps: int = 0
    schedule: str = "cosine"    # cosine | wsd
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    disc_betas: tuple[float, float] = (0.5, 0.9)  # the discriminators' AdamW betas (LARP)
    num_workers: int = 2
    cpus_per_worker: float = 1.0  # < 1 on a small box leaves CPUs for Ray Data's read tasks,
                                  # which otherwise wait forever behind the training workers
    use_gpu: bool = False
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    max_failures: int = 2
    log_every: int = 10
    seed: int = 0
    data: str = ""              # URI of the training clips (an ingest output prefix or its clips/)
    cache_data_mb: int = 256    # training data up to this size is held in the object store across epochs
    labels: str = ""            # router: Parquet prefix with clip_id, assignment (+ optional reward list)
    val_data: str = ""          # router: held-out clips; "" -> clips whose id hashes to 0 mod val_every
    val_every: int = 8          # held-out split: router by clip id, tokenizers by video id (1 in val_every)
    val_clips: int = 64         # tokenizers: held-out clips for the quality-cost curve after training
    min_curve_gain_db: float = 0.0  # proxy: fail unless held-out PSNR rises at every count and by this much
    router: str = ""            # exported router (final tokenizer recipe)
    tokenizer: str = ""         # exported tokenizer (AR recipe: to decode samples)
    lpips_backbone: str | None = None
    align_encoder: str | None = None   # local `transformers` checkpoint dir (V-JEPA2 / VideoMAE)
    semantic_disc_encoder: str | None = None
    disc_start: int = 0         # step at which the adversarial loss starts; <0 disables the GAN
    disc_lr: float = 3e-5       # discriminator AdamW lr (LARP), constant after train.warmup_steps
    codebook_size: int | None = None  # tokenizers: overrides the preset's codebook (8192 for UCF+K600 [P])
    entropy_tokens: int | None = None  # tokenizers: the entropy loss on this many sampled tokens (None: the
                                # preset's; 0: every token). 256 keeps a 16,384-code book affordable on a CPU
    codebook_restart: float = 0.0  # tokenizers: dead-code restarts below this usage relative to the mean
                                # code (0 = off; ZeRO 0 in fp32 only; no measured gain on the tiny data,
                                # docs/quality-cost.md)
    equal_total_batches: bool = True  # proxy: the samples of a batch share their total token count (each
                                # still uniform over the 625 assignments; no padding: 1.19x the samples/s
                                # of the tiny proxy with 2 workers, docs/quality-cost.md)
    hflip: bool = False         # augmentation: random horizontal flip of each training clip
    random_window: bool = False  # augmentation: clips stored longer than data.clip_len give a random
                                # data.clip_len-frame window per sample (else the centre window)
    prefix_counts: tuple[int, ...] | None = None  # AR: the first blocks' counts fixed (K600 frame prediction
                                # [P]: (512, 128), the conditioning frames' blocks) via the router's
                                # constrained prediction
    output: str = ""            # where the exported model is written


@dataclass
class TokenizeConfig:
    """``evatok tokenize``: each clip's assignment (``mode``) encoded by the final tokenizer into
    ``output/codes/`` (docs/evaluate.md). Empty URIs default to the pipeline's places under ``work_dir``."""
    clips: str = ""             # ingest output (or its clips/); "" -> work_dir/data
    tokenizer: str = ""         # exported final tokenizer; "" -> work_dir/final/final.pt
    router: str = ""            # exported router (modes router, budget:<tokens>); "" -> work_dir/router/router.pt
    labels: str = ""            # a labels/ prefix of the label stage (mode labels); "" -> the recipe's labels
    output: str = ""            # "" -> work_dir/codes (codes/, errors/, markers)
    mode: str = "router"        # router | uniform:<count> | labels | budget:<mean tokens per clip>
    calibration_clips: int = 512  # budget mode: lambda is fitted on up to this many clips of training videos
    val_every: int | None = None  # held-out videos (never calibration clips); None -> the final tokenizer's
                                # train.val_every
    batch_size: int = 8         # clips per encoder call (one assignment per call: no padding)
    num_actors: int = 2
    num_cpus_per_actor: float = 1.0  # also the actor's torch thread count (floor, >= 1)
    use_gpu: bool = False
    gpus_per_actor: float = 1.0
    max_restarts: int = 3       # finite Ray retries, as label
    max_task_retries: int = 3


@dataclass
class EvaluateConfig:
    """``evatok evaluate``: reconstruction quality against mean tokens per clip on held-out videos, for
    uniform, router, budget, label (oracle) and threshold assignments (docs/evaluate.md)."""
    clips: str = ""             # ingest output (or its clips/); "" -> work_dir/data
    tokenizer: str = ""         # "" -> work_dir/final/final.pt
    router: str = ""            # "" -> work_dir/router/router.pt
    labels: str = ""            # labels/ prefix (oracle, top-1/top-5, reward percentiles); "" -> the recipe's labels
    output: str = ""            # "" -> work_dir/eval
    val_every: int | None = None  # held-out split by video id; None -> the final tokenizer's train.val_every
    max_clips: int = 64         # at most this many held-out clips (in clip id order)
    calibration_clips: int = 512  # budgets: lambda fitted on up to this many clips of training videos
    budgets: tuple[float, ...] = ()  # mean tokens per clip for the router at a budget; () -> the totals
                                # of the inner uniform assignments (uniform comparisons at equal tokens)
    thresholds: tuple[float, ...] = ()  # block-MSE thresholds of the threshold baseline; () -> 9, the
                                # 5%..95% quantiles of the uniform reconstructions' held-out block MSEs
    batch_size: int = 8
    grid_clips: int = 4         # clips shown in the reconstruction grid
    lpips_backbone: str | None = None  # VGG16/AlexNet ImageNet weights file: adds LPIPS
    lpips_net: str = "vgg"
    i3d: str | None = None      # TorchScript I3D file: adds rFVD (a TorchScript file is code: trusted input)
    i3d_sha256: str | None = None  # its publisher's SHA-256: the file is checked before it is loaded
    ar: str = ""                # exported AR model(s), comma-separated: their generation metrics
                                # (workflows.generate.generation_metrics); "" -> work_dir/ar/ar.pt; "none": none
    classifier: str = ""        # the feature network of the generation metrics ("" -> generate's)


@dataclass
class GenerateConfig:
    """``evatok generate``: class-conditional samples of the AR model and the generation metrics
    (docs/generate.md). Empty URIs default to the pipeline's places under ``work_dir``."""
    ar: str = ""                # exported AR model; "" -> work_dir/ar/ar.pt
    tokenizer: str = ""         # the final tokenizer that decodes the codes; "" -> work_dir/final/final.pt
    output: str = ""            # "" -> work_dir/generate
    samples_per_class: int = 4
    batch_size: int = 16        # samples drawn together (one generator for the run: results depend on it)
    cfg_scale: float = 2.5      # constant classifier-free guidance ([P]: 2.5 for GPT-B, 1.75 for larger)
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    fps: float | None = None    # frame rate of the mp4 files; None -> data.fps (8 when that is None)
    classifier: str = ""        # feature network (`evatok train classifier`); "" -> work_dir/classifier/classifier.pt if present
    real: str = ""              # real clips the features are compared with; "" -> train.data, else work_dir/data
    real_clips: int = 256       # at most this many real clips (the first, in shard order)
    i3d: str | None = None      # TorchScript I3D file (i3d_torchscript.pt): adds gFVD
    i3d_sha256: str | None = None  # its publisher's SHA-256: the file is checked before it is loaded
    threads: int = 1            # torch CPU threads (no GPU): sampling is many tiny steps; measured on the tiny
                                # recipe, 1 thread drew 4.6 samples/s, 2 threads 0.30 (2 busy cores); 0 = torch's default


@dataclass
class MlflowConfig:
    tracking_uri: str | None = None  # None -> $MLFLOW_TRACKING_URI, else sqlite in the work dir
    experiment: str = "evatok"
    system_metrics: bool = True


@dataclass
class Config:
    name: str = "evatok"        # run name: same name + same storage -> resume, not restart
    work_dir: str = "runs"      # URI root for stage outputs and Ray Train storage
    data: DataConfig = field(default_factory=DataConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    # Dotted keys of the pretrained files this recipe cannot run without (``train.lpips_backbone``, ...):
    # every command that runs stages refuses to start, before any Ray work, naming each one that is
    # unset or missing (``check_pretrained``). The paper recipes list theirs.
    pretrained: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- loading
class ConfigError(ValueError):
    pass


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if origin is list:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        return list(value)
    if origin is dict:
        # Ray resource maps ({name: amount}): names are strings, amounts non-negative numbers.
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        for k, v in value.items():
            if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"{where}: expected {{name: amount >= 0}}, got {k!r}: {v!r}")
        return {k: float(v) for k, v in value.items()}
    args = [a for a in get_args(tp) if a is not type(None)]
    if value is None:
        if type(None) in get_args(tp):
            return None
        raise ConfigError(f"{where}: may not be null")
    if tp is float or float in args:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and str not in args:
            # YAML 1.1 reads "1e-4" (no dot) as a string; a float field must still take it.
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp in (int, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, data: dict, where: str = "") -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in {where or 'config'}; known: {sorted(names)}")
    obj = cls()
    for k, v in data.items():
        setattr(obj, k, _coerce(hints[k], v, f"{where}.{k}" if where else k))
    return obj


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
    node[keys[-1]] = value


#: Models with their own training settings in a top-level section of that name (see ``load_config``).
MODELS = ("proxy", "router", "final", "ar", "classifier")


def _merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``, recursively for nested mappings (``deepspeed``)."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a recipe YAML (optional) and apply ``a.b=value`` overrides on top.

    Per-model training settings: the top-level sections ``proxy``, ``router``, ``final`` and ``ar`` take
    the same keys as ``train`` (``steps``, ``lr``, ``disc_start``, ``deepspeed``, ...), for that model only.
    The model being trained (``train.model``) sees, from lowest to highest precedence: the defaults, the
    recipe's ``train`` keys, the recipe's ``<model>`` section, then command-line overrides
    (``train.steps=10`` and ``proxy.steps=10`` alike). The resolved ``cfg.train`` is flat: what that
    model trains with. Every model's section is checked (unknown keys, types) whichever model trains.
    """
    tree: dict = {}
    if path is not None:
        text = Path(path).read_text()
        tree = yaml.safe_load(text) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        parsed.append((key.strip(), yaml.safe_load(raw) if raw != "" else ""))
    train = tree.get("train", {})
    if not isinstance(train, dict):
        raise ConfigError(f"train: expected a mapping, got {train!r}")
    sections = {m: tree.pop(m, None) or {} for m in MODELS}
    for key, value in parsed:
        if key.split(".")[0] in MODELS and "." in key:
            m, rest = key.split(".", 1)
            _set_path(sections[m], rest, value)
    model = next((v for k, v in reversed(parsed) if k == "train.model"), train.get("model", TrainConfig.model))
    for m, sec in sections.items():
        if not isinstance(sec, dict):
            raise ConfigError(f"{m}: expected a mapping of train settings, got {sec!r}")
        if "model" in sec:
            raise ConfigError(f"{m}.model: the model is chosen by the command (evatok train MODEL), not in its section")
        _build(TrainConfig, sec, m)  # every model's section is checked
    tree["train"] = _merge(train, sections.get(model, {}))
    for key, value in parsed:
        m, _, rest = key.partition(".")
        if m in MODELS:
            if not rest:
                raise ConfigError(f"override {key!r}: {m!r} is a section; set {m}.KEY=VALUE")
            if m != model:
                continue
            key = f"train.{rest}"
        _set_path(tree, key, value)
    return _build(Config, tree)


#: Every field that holds a URI (path, file://, s3://, gs://). Relative local paths among them are made
#: absolute on the driver (``absolute_uris``) before a config travels to Ray workers.
URI_FIELDS = ("work_dir", "ingest.source", "ingest.output", "label.clips", "label.proxy", "label.output",
              "label.lpips_backbone", "label.stats", "train.data", "train.labels", "train.val_data", "train.router",
              "train.tokenizer", "train.lpips_backbone", "train.align_encoder", "train.semantic_disc_encoder",
              "train.output", "generate.ar", "generate.tokenizer", "generate.output", "generate.classifier",
              "generate.real", "generate.i3d")
URI_FIELDS += ("tokenize.clips", "tokenize.tokenizer", "tokenize.router", "tokenize.labels", "tokenize.output",
               "evaluate.clips", "evaluate.tokenizer", "evaluate.router", "evaluate.labels", "evaluate.output",
               "evaluate.lpips_backbone", "evaluate.i3d", "evaluate.ar", "evaluate.classifier")


#: A URI field set to this means "none wanted" (``evaluate.ar=none``), where an empty value means the
#: default; it is never made a path, so a file called ``none`` in the working directory cannot be meant.
NONE = "none"


def absolute_uris(cfg: Config) -> Config:
    """A copy of ``cfg`` whose relative local URIs (``URI_FIELDS``, and a ``sqlite:///relative.db``
    tracking URI) are absolute against the current working directory.

    Call it on the driver: a Ray worker's working directory is not the user's (Ray Train runs a worker
    in the run's artifacts folder), so ``train.output=runs/tiny/proxy.pt`` resolved there lands inside
    Ray's session directory. Remote URIs are unchanged; applying it twice changes nothing."""
    import copy
    import os

    from workflows import storage

    out = copy.deepcopy(cfg)
    for dotted in URI_FIELDS:
        section, _, key = dotted.rpartition(".")
        node = getattr(out, section) if section else out
        value = getattr(node, key)
        if isinstance(value, str) and value and value != NONE:
            setattr(node, key, storage.absolute(value))
    uri = out.mlflow.tracking_uri
    if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        out.mlflow.tracking_uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    return out


class MissingPretrainedError(ConfigError):
    """A recipe's pretrained files (``Config.pretrained``) are unset or missing; names every one."""


#: Pretrained entries that are ``transformers`` checkpoint directories: present when their config.json is.
CHECKPOINT_DIRS = ("align_encoder", "semantic_disc_encoder")


def check_pretrained(cfgs: Config | list[Config], recipe: str | None = None) -> None:
    """Every file named by ``Config.pretrained`` of each config exists (through ``workflows.storage``:
    local paths, ``s3://``, ``gs://``); else one ``MissingPretrainedError`` listing each missing one.
    Call it before any Ray work. Several configs: the same recipe resolved per model (``evatok run``)."""
    from workflows import storage

    missing: dict[str, str] = {}
    for cfg in cfgs if isinstance(cfgs, list) else [cfgs]:
        for dotted in cfg.pretrained:
            section, _, key = dotted.rpartition(".")
            node = cfg
            try:
                for part in filter(None, section.split(".")):
                    node = getattr(node, part)
                value = getattr(node, key)
            except AttributeError:
                raise ConfigError(f"pretrained: {dotted!r} is not a key of the config tree") from None
            if dotted in missing:
                continue
            if not value:
                missing[dotted] = f"{dotted}: not set"
                continue
            probe = storage.join(value, "config.json") if key in CHECKPOINT_DIRS else value
            try:
                ok = storage.exists(probe)
            except storage.StorageError as e:
                missing[dotted] = f"{dotted}={storage.redact(value)}: cannot be checked ({e})"
                continue
            if not ok:
                what = "no config.json (a transformers save_pretrained dir)" if key in CHECKPOINT_DIRS else "not found"
                missing[dotted] = f"{dotted}={storage.redact(value)}: {what}"
    if missing:
        where = f"the recipe {recipe}" if recipe else "this recipe"
        raise MissingPretrainedError(
            f"{where} needs {len(missing)} pretrained file(s) that are missing: " + "; ".join(missing.values())
            + ". Upload them and set the keys (nothing is downloaded), or run the recipe's -nopretrained variant")


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (for MLflow params, checkpoints and YAML dumps)."""
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``: MLflow params are flat."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
