"""``evatok submit``: run stages on a Ray cluster through its job server (Ray's Job Submission SDK).

    evatok submit -c configs/paper-ingest.yaml ingest --env-name MLFLOW_TRACKING_URI
    evatok submit -c configs/paper-proxy.yaml train proxy train.steps=1000
    evatok submit --status JOB_ID | --logs JOB_ID | --stop JOB_ID

What a submission is (``plan``):

- **Address**: ``--address`` or ``RAY_ADDRESS``: the head's job server (``http://HEAD:8265``; through
  ``ray dashboard CLUSTER.yaml`` or ``kubectl port-forward`` that is ``http://127.0.0.1:8265``).
- **Code**: the job's ``working_dir`` is this checkout (``runs/``, ``.venv/``, ``.cache/``, ``.git/``,
  ``*.pt``, caches and local MLflow stores excluded). Ray puts it first on the job's ``PYTHONPATH``,
  so the uploaded code is what runs; the image (``infra/Dockerfile``) provides ``evatok`` and every
  dependency, so nothing is installed when a job starts.
- **Entrypoint**: ``evatok STAGE ... -c RECIPE key=value ...``, one command per stage joined by
  ``&&`` (``evatok submit -c R ingest label`` runs ingest, then label, in one job). A stage is any
  ``evatok`` command that takes a recipe (``ingest``, ``label``, ``relabel``, ``train MODEL``, and
  whatever later commands do the same); words after a stage are its arguments (``train proxy``);
  ``key=value`` words are overrides given to every stage. The recipe is loaded here first, so a
  typo fails on this machine, not after the upload.
- **Environment variables by name only** (``--env-name NAME``, repeatable): the job needs ``NAME``
  and the cluster's own environment provides it (instance profile, container env, a Kubernetes
  Secret as env). The entrypoint starts with the POSIX check ``: "${NAME:?...}"``, so a missing
  variable fails the job at once with its name; the name is recorded in the job's metadata. Values
  never leave this machine: nothing goes into ``runtime_env.env_vars``, and before submitting,
  the entrypoint, runtime env and metadata are searched for the value of every secret-looking
  variable of this shell (a ``_``-separated part of its name is ``SECRET``, ``TOKEN``, ``PASSWORD``,
  ``KEY``, ...: ``SECRET_PARTS``); a hit refuses the submission. Ray workers inherit their node's
  environment, so this is all a stage needs.

Where the job runs decides what a path means (``cluster_is_local``: the nodes' IPs, asked from the
cluster, are all addresses of this machine; the address alone would misjudge an SSH tunnel):

- **This machine's cluster**: relative local paths of the recipe and overrides (``work_dir``, stage
  inputs and outputs, a relative ``sqlite:///`` tracking URI) are made absolute here, against the
  current directory, and passed as overrides; otherwise they would resolve inside the job's
  unpacked working_dir copy and vanish with the Ray session.
- **A remote cluster**: a local ``work_dir`` or stage output is refused (exit 2: a node's disk is
  not this machine's, and is lost with the node), relative local inputs are refused, absolute
  local inputs are allowed with a warning (a file baked into the image or on a shared mount),
  ``--allow-local-paths`` lifts these for clusters that mount one shared filesystem everywhere. An
  MLflow tracking URI is required: ``mlflow.tracking_uri`` in the recipe/overrides (not a SQLite or
  ``file:`` store, unless ``--allow-local-paths`` and an absolute path on the shared mount), or
  ``--env-name MLFLOW_TRACKING_URI`` when the nodes define it. There is no fallback
  store "under work_dir on object storage": MLflow 3 cannot keep its tracking store on S3/GCS
  (SQLite needs a local file, the file store is deprecated), so without a server the runs would go to
  a SQLite file on the driver's node and vanish with it. Credentials inside a URI (``user:pw@``)
  are refused because the entrypoint is visible in ``ray job list``.

Exit codes: ``0`` the job SUCCEEDED (or a ``--status/--logs/--stop`` query worked, or ``--no-wait``
submitted); ``1`` the job FAILED or was STOPPED; ``2`` nothing was submitted (bad recipe, refused
path, cluster unreachable, unknown job id); ``130`` interrupted while following (the job goes on).
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import re
import secrets
import shlex
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, TextIO

from workflows import storage
from workflows.config import Config, ConfigError, load_config

#: Never uploaded with the working dir: outputs, environments, caches, weights, local MLflow stores.
EXCLUDES = ["runs/", ".venv/", ".cache/", ".git/", "*.pt", "__pycache__/", ".pytest_cache/",
            "mlruns/", "mlflow.db", "*.egg-info/"]
#: Config fields that hold a path or URI (made absolute for a local cluster, checked for a remote one).
PATH_FIELDS = ("work_dir", "ingest.source", "ingest.output", "label.clips", "label.proxy", "label.output",
               "label.lpips_backbone", "train.data", "train.labels", "train.val_data", "train.router",
               "train.tokenizer", "train.lpips_backbone", "train.align_encoder", "train.semantic_disc_encoder",
               "train.output")
#: Of those, what a stage writes: it must outlive the node that writes it.
OUTPUT_FIELDS = ("work_dir", "ingest.output", "label.output", "train.output")
#: A shell variable is secret when a ``_``-separated part of its name is one of these (``AWS_SECRET_ACCESS_KEY``,
#: ``MLFLOW_TRACKING_PASSWORD``, ``HF_TOKEN``...; not ``TOKENIZERS_PARALLELISM``): its value may appear nowhere.
SECRET_PARTS = {"SECRET", "TOKEN", "PASSWORD", "PASSWD", "CREDENTIAL", "CREDENTIALS", "KEY", "APIKEY", "PRIVATE"}
TERMINAL = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1}
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_USERINFO = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/@\s]+@")


class SubmitError(RuntimeError):
    """Nothing was submitted; the message is one line meant for the user (exit 2)."""


@dataclass
class Plan:
    """Everything ``submit_job`` is given, built without touching the cluster."""
    entrypoint: str
    runtime_env: dict
    metadata: dict[str, str]
    submission_id: str
    stages: list[list[str]]
    overrides: list[str]
    warnings: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- arguments
def parse_args(words: Iterable[str], stage_commands: Iterable[str]) -> tuple[list[list[str]], list[str]]:
    """``["ingest", "train", "proxy", "a.b=1"]`` -> ``([["ingest"], ["train", "proxy"]], ["a.b=1"])``.

    A word naming a stage command starts a stage, ``key=value`` words are overrides (for every
    stage), any other word is an argument of the stage before it."""
    commands = set(stage_commands)
    stages: list[list[str]] = []
    overrides: list[str] = []
    for w in words:
        if "=" in w:
            overrides.append(w)
        elif w in commands:
            stages.append([w])
        elif stages:
            stages[-1].append(w)
        else:
            raise SubmitError(f"unknown stage {w!r}; stages: {', '.join(sorted(commands))}")
    if not stages:
        raise SubmitError(f"name at least one stage to run ({', '.join(sorted(commands))})")
    return stages, overrides


def _get(cfg: Config, dotted: str):
    node = cfg
    for k in dotted.split("."):
        node = getattr(node, k)
    return node


def _local_raw(uri: str) -> str | None:
    """The path part of a local URI as written (``file://x`` -> ``x``), None for a remote URI."""
    if storage.split_uri(uri)[0] != "file":
        return None
    return uri[len("file://"):] if uri.startswith("file://") else uri


def _is_relative(uri: str) -> bool:
    raw = _local_raw(uri)
    return raw is not None and not os.path.isabs(os.path.expanduser(raw))


def _node_local_store(uri: str) -> bool:
    """A tracking URI that names a file on the driver's disk (SQLite, ``file:``, a bare path)."""
    return uri.startswith(("sqlite:", "file:")) or (":" not in uri and uri != "databricks")


def _sqlite_relative(uri: str) -> bool:
    return uri.startswith("sqlite:///") and not uri.startswith("sqlite:////")


def secret_values(env: dict[str, str] | None = None) -> dict[str, str]:
    """Name -> value of every secret-looking variable of this shell (values of 6+ characters)."""
    env = os.environ if env is None else env
    return {k: v for k, v in env.items() if SECRET_PARTS & set(k.upper().split("_")) and len(v) >= 6}


def repo_root() -> Path:
    """The checkout this module runs from (the default working dir), else the current directory."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").exists() else Path.cwd()


# ----------------------------------------------------------------------------- the plan
def plan(recipe: str | Path, words: Iterable[str], *, stage_commands: Iterable[str], local_cluster: bool,
         env_names: Iterable[str] = (), working_dir: str | Path | None = None,
         allow_local_paths: bool = False, cwd: str | Path | None = None,
         env: dict[str, str] | None = None) -> Plan:
    """Check the recipe for where it will run and build the job (entrypoint, runtime env, metadata).

    Raises ``SubmitError`` (one line) for anything that would fail or lose data on the cluster."""
    stages, overrides = parse_args(words, stage_commands)
    env_names = list(dict.fromkeys(env_names))
    for name in env_names:
        if not _ENV_NAME.match(name):
            raise SubmitError(f"--env-name {name!r} is not a variable name (give NAME, never NAME=value)")
    recipe = Path(recipe)
    try:
        cfg = load_config(recipe, overrides)
    except ConfigError as e:
        raise SubmitError(f"config error: {e}") from None
    cwd = Path(cwd or Path.cwd())
    wd = Path(working_dir or repo_root()).resolve()
    if not (wd / "workflows" / "cli.py").exists():
        raise SubmitError(f"working dir {wd} is not an evatok checkout (no workflows/cli.py); pass --working-dir")
    where = "this machine's cluster" if local_cluster else "a remote cluster"
    warnings: list[str] = []
    resolved: dict[str, str] = {}  # field -> absolute value (local cluster)

    for name in (*PATH_FIELDS, "mlflow.tracking_uri"):
        value = _get(cfg, name)
        if isinstance(value, str) and _USERINFO.match(value):
            raise SubmitError(f"{name} carries credentials (user:password@): the entrypoint is visible in "
                              "`ray job list`; let the nodes' environment provide them (--env-name)")

    if local_cluster:
        for name in PATH_FIELDS:
            value = _get(cfg, name)
            if value and _is_relative(value):
                resolved[name] = str((cwd / os.path.expanduser(_local_raw(value))).resolve())
        uri = cfg.mlflow.tracking_uri
        if uri and _sqlite_relative(uri):
            resolved["mlflow.tracking_uri"] = f"sqlite:///{(cwd / uri[len('sqlite:///'):]).resolve()}"
    elif not allow_local_paths:
        for name in PATH_FIELDS:
            value = _get(cfg, name)
            if not value or _local_raw(value) is None:
                continue
            if name in OUTPUT_FIELDS:
                raise SubmitError(
                    f"{name}={value!r} is a local path but the job runs on {where}: a node's disk is not this "
                    "machine's and is lost with the node; use s3:// or gs:// (or --allow-local-paths when every "
                    "node mounts one shared filesystem at that path)")
            if _is_relative(value):
                raise SubmitError(f"{name}={value!r} is a relative local path: on {where} it would mean a path "
                                  "inside the job's copy of the working dir; use s3://, gs:// or an absolute path")
            warnings.append(f"{name}={value} is a local path: it must exist on every node (baked into the "
                            "image or on a shared mount)")
    if not local_cluster:
        uri = cfg.mlflow.tracking_uri
        if uri is None and "MLFLOW_TRACKING_URI" not in env_names:
            shell = os.environ if env is None else env
            hint = (" (this shell has MLFLOW_TRACKING_URI: pass mlflow.tracking_uri=$MLFLOW_TRACKING_URI to use it)"
                    if shell.get("MLFLOW_TRACKING_URI") else "")
            raise SubmitError("no MLflow tracking URI for a remote cluster: runs would go to a SQLite file on the "
                              "driver's node and vanish with it; set mlflow.tracking_uri=http(s)://SERVER or pass "
                              "--env-name MLFLOW_TRACKING_URI when the nodes define it" + hint)
        if uri is not None and _node_local_store(uri) and (
                not allow_local_paths or _sqlite_relative(uri) or not uri.startswith(("sqlite:", "file:"))):
            raise SubmitError(f"mlflow.tracking_uri={uri!r} is a store on one node's disk; on {where} use a "
                              "tracking server (http(s)://...)")

    try:
        rel = recipe.resolve().relative_to(wd).as_posix()
    except ValueError:
        if not local_cluster:
            raise SubmitError(f"recipe {recipe} is outside the working dir {wd} that is uploaded; "
                              "put it under configs/ (or pass --working-dir)") from None
        rel = str(recipe.resolve())

    # An override whose path was made absolute is rewritten in place; recipe values are appended.
    keys = [o.split("=", 1)[0].strip() for o in overrides]
    all_overrides = [f"{k}={resolved[k]}" if k in resolved else o for k, o in zip(keys, overrides)]
    all_overrides += [f"{k}={v}" for k, v in resolved.items() if k not in keys]
    checks = [f': "${{{n}:?is not set on the cluster nodes (evatok submit --env-name passes names, never values)}}"'
              for n in env_names]
    commands = [shlex.join(["evatok", *stage, "-c", rel, *all_overrides]) for stage in stages]
    entrypoint = " && ".join(checks + commands)
    runtime_env = {"working_dir": str(wd), "excludes": list(EXCLUDES)}
    metadata = {"evatok.recipe": rel, "evatok.stages": "; ".join(" ".join(s) for s in stages),
                "evatok.env_names": ",".join(env_names), "evatok.cluster": "local" if local_cluster else "remote"}
    slug = lambda s: re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")[:40] or "x"  # noqa: E731
    submission_id = (f"evatok-{slug(cfg.name)}-{slug('-'.join(stages[0]))}-"
                     f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}")
    p = Plan(entrypoint, runtime_env, metadata, submission_id, stages, all_overrides, warnings)
    check_no_secrets(p, env)
    return p


def check_no_secrets(p: Plan, env: dict[str, str] | None = None) -> None:
    """Refuse a plan in which the value of any secret-looking shell variable appears."""
    blob = json.dumps([p.entrypoint, p.runtime_env, p.metadata, p.submission_id])
    for name, value in secret_values(env).items():
        if value in blob:
            raise SubmitError(f"the value of ${name} appears in the job's entrypoint or metadata; secrets stay on "
                              f"this machine: let the cluster provide it and pass --env-name {name}")


# ----------------------------------------------------------------------------- the cluster
def _is_this_host(ip: str) -> bool:
    try:
        if ipaddress.ip_address(ip).is_loopback:
            return True
    except ValueError:
        return False
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))  # only an address of one of this machine's interfaces can be bound
        return True
    except OSError:
        return False


def cluster_is_local(address: str, wait_s: float = 15.0) -> bool:
    """True when every alive node of the cluster is this machine (loopback or one of its addresses).

    A head that has just started lists no node for a few seconds: the list is asked again for up to
    ``wait_s``. When the nodes cannot be listed, the answer is False: a remote cluster's stricter
    rules apply."""
    from ray.util.state import list_nodes

    deadline = time.monotonic() + wait_s
    while True:
        try:
            nodes = list_nodes(address=address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
        except Exception:  # noqa: BLE001 - unknown means remote
            nodes = []
        ips = {n.node_ip for n in nodes}
        if ips or time.monotonic() > deadline:
            return bool(ips) and all(_is_this_host(ip) for ip in ips)
        time.sleep(0.5)


def resolve_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    return address


def connect(address: str | None):
    """A ``JobSubmissionClient`` for the job server at ``address`` (or ``RAY_ADDRESS``)."""
    address = resolve_address(address)
    try:
        from ray.job_submission import JobSubmissionClient

        logging.getLogger("ray").setLevel(logging.ERROR)  # working-dir packaging chatter; failures raise
        return JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - ConnectionError, RuntimeError, ValueError...
        raise SubmitError(f"cannot reach a Ray job server at {storage.redact(address)}: "
                          f"{type(e).__name__}: {storage.redact(str(e)).splitlines()[0] if str(e) else ''}") from None


def _call(what: str, fn: Callable, *args):
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001
        msg = storage.redact(str(e)).strip().splitlines()
        raise SubmitError(f"{what} failed: {msg[-1] if msg else type(e).__name__}") from None


def _status_name(s) -> str:
    """``JobStatus.SUCCEEDED`` (an enum) or ``"SUCCEEDED"`` -> ``"SUCCEEDED"``."""
    return str(getattr(s, "value", s)).split(".")[-1]


def wait_terminal(client, job_id: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = _status_name(_call("get_job_status", client.get_job_status, job_id))
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def follow(client, job_id: str, out: TextIO) -> str:
    """Stream the job's logs to ``out`` until it ends; return its final status."""
    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as e:  # the log socket closed early: the status below still tells the outcome
        print(f"[submit] log stream ended early ({storage.redact(str(e)).splitlines()[0]}); waiting for the job",
              file=sys.stderr, flush=True)
        return wait_terminal(client, job_id, timeout=10 ** 9)
    return wait_terminal(client, job_id)


# ----------------------------------------------------------------------------- commands
def submit(recipe: str | Path, words: list[str], *, address: str | None, stage_commands: Iterable[str],
           env_names: Iterable[str] = (), working_dir: str | Path | None = None,
           allow_local_paths: bool = False, wait: bool = True, out: TextIO | None = None) -> int:
    """Plan, submit, follow: the ``evatok submit -c RECIPE STAGE...`` command. Returns the exit code."""
    out = out or sys.stdout
    stages, overrides = parse_args(words, stage_commands)  # a bad recipe fails before any connection
    try:
        load_config(recipe, overrides)
    except ConfigError as e:
        raise SubmitError(f"config error: {e}") from None
    client = connect(address)
    url = client.get_address()
    local = cluster_is_local(url)
    p = plan(recipe, words, stage_commands=stage_commands, local_cluster=local, env_names=env_names,
             working_dir=working_dir, allow_local_paths=allow_local_paths)
    for w in p.warnings:
        print(f"[submit] warning: {w}", file=sys.stderr, flush=True)
    job_id = _call("submit_job", lambda: client.submit_job(
        entrypoint=p.entrypoint, runtime_env=p.runtime_env, metadata=p.metadata, submission_id=p.submission_id))
    print(f"[submit] job {job_id} submitted to {url} ({'a cluster on this machine' if local else 'a remote cluster'}): "
          f"{p.metadata['evatok.stages']}", file=sys.stderr, flush=True)
    if not wait:
        print(job_id, file=out, flush=True)
        print(f"[submit] follow: evatok submit --address {url} --logs {job_id}", file=sys.stderr, flush=True)
        return 0
    try:
        status = follow(client, job_id, out)
    except KeyboardInterrupt:
        print(f"\n[submit] detached; job {job_id} keeps running (evatok submit --address {url} --stop {job_id})",
              file=sys.stderr, flush=True)
        return 130
    print(f"[submit] job {job_id} {status}", file=sys.stderr, flush=True)
    return TERMINAL.get(status, 1)


def status(job_id: str, address: str | None, out: TextIO | None = None) -> int:
    """Print ``JOB_ID STATUS`` (and the job's message, entrypoint and start/end times)."""
    out = out or sys.stdout
    client = connect(address)
    info = _call("get_job_info", client.get_job_info, job_id)
    st = _status_name(info.status)
    print(f"{job_id} {st}", file=out)
    if info.message:
        print(f"  message: {info.message}", file=out)
    print(f"  entrypoint: {info.entrypoint}", file=out)
    for k in ("start_time", "end_time"):
        v = getattr(info, k, None)
        if v:
            print(f"  {k}: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(v / 1000))}", file=out)
    out.flush()
    return 0


def logs(job_id: str, address: str | None, out: TextIO | None = None) -> int:
    """Print the job's logs so far; follow them while it runs."""
    out = out or sys.stdout
    client = connect(address)
    st = _status_name(_call("get_job_status", client.get_job_status, job_id))
    if st in TERMINAL:
        out.write(_call("get_job_logs", client.get_job_logs, job_id))
        out.flush()
        return 0
    try:
        follow(client, job_id, out)
    except KeyboardInterrupt:
        return 130
    return 0


def stop(job_id: str, address: str | None) -> int:
    client = connect(address)
    stopped = _call("stop_job", client.stop_job, job_id)
    print(f"[submit] {'stop requested for' if stopped else 'nothing to stop:'} job {job_id}"
          + ("" if stopped else " has already ended"), file=sys.stderr, flush=True)
    return 0
