"""MLflow tracking for the workflows: rank 0 only, run continuity, an outage is a warning.

``Tracker`` wraps the fluent MLflow API so that

- only the process that was told it is rank 0 talks to MLflow (every other rank gets a disabled
  tracker whose calls do nothing);
- a run is reopened by id (``start(run_id=...)``: the id travels in the training checkpoint), or,
  before the first checkpoint exists, found again by the ``evatok.run`` tag, so a restarted or
  re-launched run keeps logging into the same MLflow run;
- any tracking failure (server down, DNS, a param conflict) logs one warning and training goes on.
  The first failure to *start* disables the tracker for the rest of the process; later failures are
  counted and, after ``MAX_FAILURES`` in a row, disable it too (so a dead server cannot add a
  request timeout to every step). HTTP retries are kept short for the same reason.
- params are the flattened recipe with credentials redacted (``storage.redact``) and secret-looking
  keys dropped; never an environment variable.

Default tracking URI (``resolve_tracking_uri``): ``MlflowConfig.tracking_uri``, else
``$MLFLOW_TRACKING_URI``, else ``sqlite:///<work_dir>/mlflow.db`` when the work dir is local, else a
SQLite file in the current directory (a warning says so: a cluster should set a server).
"""
from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_FAILURES = 3
# Secret-looking config keys, word by word ("hf_token", "aws_secret_access_key", "db.password"), so that
# "entropy_tokens" or "train.tokenizer" (a model's URI: lineage) are not mistaken for one.
_SECRET_WORDS = {"secret", "secrets", "password", "passwd", "token", "credential", "credentials", "apikey"}
_SECRET_PAIRS = {("access", "key"), ("api", "key"), ("private", "key")}


def _secret_key(key) -> bool:
    words = [w for w in re.split(r"[^a-z0-9]+", str(key).lower()) if w]
    return bool(_SECRET_WORDS.intersection(words)) or any(p in _SECRET_PAIRS for p in zip(words, words[1:]))


_PARAM_MAX = 6000  # MLflow 3's param value limit
# A dead server must cost seconds, not MLflow's default minutes of retries. setdefault: a user's
# explicit settings win.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                  "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


class TrackingWarning(UserWarning):
    pass


def resolve_tracking_uri(configured: str | None, work_dir: str) -> str:
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    from workflows import storage

    local = storage.local_path(work_dir)
    if local is None:
        warnings.warn(f"work_dir {storage.redact(work_dir)} is remote and no MLflow tracking URI is set: "
                      "tracking to ./mlflow.db on the rank-0 node", TrackingWarning, stacklevel=2)
        local = Path.cwd()
    local = local.resolve()
    local.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{local / 'mlflow.db'}"


# ----------------------------------------------------------------------------- URIs for Ray workers
#: The variable a worker reads a credentialed tracking URI from (by name: the value never travels).
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
_USERINFO = re.compile(r"(?i)^([a-z][a-z0-9+.-]*://)[^/\s?#]*@")


def for_workers(uri: str) -> tuple[str, str | None]:
    """``(uri to hand to Ray, env var name or None)`` for a resolved tracking URI.

    ``train_loop_config`` and runtime envs are Ray metadata (GCS, the dashboard, ``ray list``), so a URI
    with ``user:password@`` must not go there. It is handed over without its userinfo plus the *name*
    of the variable that holds the whole URI (``MLFLOW_TRACKING_URI``), which the driver sets in its own
    process environment; a local Ray's workers inherit it (its raylet is started by the driver), a
    cluster's nodes must be given it (``evatok submit --env-name MLFLOW_TRACKING_URI``) or MLflow's
    ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` (``worker_uri``)."""
    from workflows import storage

    if not uri or not storage.has_userinfo(uri):
        return uri, None
    if os.environ.get(TRACKING_URI_ENV) != uri:
        os.environ[TRACKING_URI_ENV] = uri  # the driver's own environment: never Ray metadata
    return _USERINFO.sub(r"\1", uri), TRACKING_URI_ENV


def worker_uri(uri: str, env_name: str | None) -> str:
    """The worker side of ``for_workers``: the whole URI from ``env_name`` when it names the same
    server, else the URI as given (MLflow then takes MLFLOW_TRACKING_USERNAME/PASSWORD if set)."""
    full = os.environ.get(env_name or "") if env_name else None
    if full and _USERINFO.sub(r"\1", full) == uri:
        return full
    return uri


def safe_params(flat: dict[str, Any]) -> dict[str, str]:
    """Flattened config -> MLflow params: secret-looking keys dropped, values redacted and capped."""
    from workflows import storage

    out = {}
    for k, v in flat.items():
        if _secret_key(k):
            continue
        out[k] = storage.redact("" if v is None else v)[:_PARAM_MAX]
    return out


class Tracker:
    """One MLflow run seen from one process. ``enabled=False`` (non-zero ranks) makes every call a no-op."""

    def __init__(self, tracking_uri: str | None, experiment: str, run_name: str, *, enabled: bool = True,
                 system_metrics: bool = True, tags: dict[str, str] | None = None):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.enabled = bool(enabled and tracking_uri)
        self.system_metrics = system_metrics
        self.tags = dict(tags or {})
        self.run_id: str | None = None
        self.logged_through = 0  # a reopened run: the last step its "loss" history already has
        self._failures = 0
        self._mlflow = None

    # ------------------------------------------------------------------ failure handling
    def _fail(self, what: str, e: Exception, fatal: bool = False) -> None:
        from workflows import storage

        self._failures += 1
        msg = storage.redact(f"MLflow {what} failed ({type(e).__name__}: {e}); training continues")
        warnings.warn(msg[:500], TrackingWarning, stacklevel=3)
        log.warning(msg[:500])
        if fatal or self._failures >= MAX_FAILURES:
            self.enabled = False

    def _call(self, what: str, fn, *args, **kwargs):
        """``fn`` is an mlflow attribute name or a callable; nothing happens unless the run is open."""
        if not self.enabled or self._mlflow is None or self.run_id is None:
            return None
        try:
            out = (getattr(self._mlflow, fn) if isinstance(fn, str) else fn)(*args, **kwargs)
            self._failures = 0
            return out
        except Exception as e:  # noqa: BLE001  (an outage must never kill training)
            self._fail(what, e)
            return None

    # ------------------------------------------------------------------ lifecycle
    def start(self, run_id: str | None = None) -> str | None:
        """Open (or reopen) the run; returns its id, or None when tracking is off or unreachable."""
        if not self.enabled:
            return None
        for k, v in _HTTP_DEFAULTS.items():
            os.environ.setdefault(k, v)
        try:
            import mlflow

            self._mlflow = mlflow
            mlflow.set_tracking_uri(self.tracking_uri)
            exp = mlflow.set_experiment(self.experiment)
            if run_id is None:
                run_id = self._find_existing(exp.experiment_id)
            tags = {"evatok.run": self.run_name, **self.tags}
            if run_id is not None:
                run = mlflow.start_run(run_id=run_id, log_system_metrics=self.system_metrics)
                try:
                    history = mlflow.MlflowClient().get_metric_history(run_id, "loss")
                    self.logged_through = max((m.step for m in history), default=0)
                except Exception as e:  # noqa: BLE001 - a step may be logged twice; training goes on
                    self._fail("metric history", e)
            else:
                run = mlflow.start_run(run_name=self.run_name, tags=tags, log_system_metrics=self.system_metrics)
            self.run_id = run.info.run_id
            return self.run_id
        except Exception as e:  # noqa: BLE001
            self._fail("start", e, fatal=True)
            return None

    def _find_existing(self, experiment_id: str) -> str | None:
        """A run of the same name not yet finished: it was started before the first checkpoint. With an
        ``evatok.claim`` tag (the stage claim's id, kept across resumes) only a run of that claim: never
        someone else's RUNNING run of the same name on a shared tracking server."""
        flt = f"tags.`evatok.run` = '{self.run_name}' and attributes.status != 'FINISHED'"
        if self.tags.get("evatok.claim"):
            flt += f" and tags.`evatok.claim` = '{self.tags['evatok.claim']}'"
        runs = self._mlflow.search_runs(
            [experiment_id], filter_string=flt,
            max_results=1, order_by=["attributes.start_time DESC"], output_format="list")
        return runs[0].info.run_id if runs else None

    def end(self, status: str = "FINISHED") -> None:
        if self._mlflow is not None and self.run_id is not None:
            try:
                self._mlflow.end_run(status=status)
            except Exception as e:  # noqa: BLE001
                self._fail("end_run", e)

    # ------------------------------------------------------------------ logging
    def log_params(self, flat: dict[str, Any]) -> None:
        params = safe_params(flat)
        items = sorted(params.items())
        for i in range(0, len(items), 90):  # MLflow accepts 100 params per batch
            self._call("log_params", "log_params", dict(items[i:i + 90]))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v}
        if clean:
            self._call("log_metrics", "log_metrics", clean, step=step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from workflows import storage

        if tags:
            self._call("set_tags", "set_tags", {k: storage.redact(v) for k, v in tags.items()})

    def log_image(self, image, name: str, step: int) -> None:
        """``image``: uint8 [H, W, 3]; stored as ``samples/<name>_<step>.png``."""
        self._call("log_image", "log_image", image, artifact_file=f"samples/{name}_{step:07d}.png")

    def log_dict(self, d: dict, artifact_file: str) -> None:
        self._call("log_dict", "log_dict", d, artifact_file)

    def log_input(self, source: str, name: str, digest: str | None = None, context: str = "training") -> None:
        """Lineage: record a dataset by its URI and our own content digest, without loading it."""
        if not source:
            return

        def _do():
            from mlflow.data.dataset_source_registry import resolve_dataset_source
            from mlflow.data.meta_dataset import MetaDataset
            from workflows import storage

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                src = resolve_dataset_source(storage.redact(source))
            ds = MetaDataset(src, name=name, digest=(digest or "")[:36] or None)
            self._mlflow.log_input(ds, context=context)

        self._call("log_input", _do)


# ============================================================================ driver side: stage runs
def code_version() -> str:
    """The git commit of the checkout this package runs from (``+dirty`` with local changes), else the
    installed package version."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if sha:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version

        return f"evatok {version('evatok')}"
    except Exception:  # noqa: BLE001
        return "unknown"


def redacted_config(tree: dict) -> dict:
    """A config tree with credentials redacted and secret-looking keys dropped (for MLflow artifacts)."""
    from workflows import storage

    out: dict = {}
    for k, v in tree.items():
        if _secret_key(k):
            continue
        if isinstance(v, dict):
            out[k] = redacted_config(v)
        elif isinstance(v, str):
            out[k] = storage.redact(v)
        elif isinstance(v, (list, tuple)):
            out[k] = [storage.redact(x) if isinstance(x, str) else x for x in v]
        else:
            out[k] = v
    return out


class Lineage:
    """MLflow bookkeeping of pipeline stages, from the driver (``MlflowClient``, no fluent state).

    Runs: one parent per ``evatok run``, one child per stage (``mlflow.parentRunId``); a stage run
    alone is top level. Each run gets the resolved config (redacted; params + ``resolved_config.json``),
    the code version, one ``log_input`` per input (URI, content digest, producing run id as input
    tags), its outputs (tags + ``outputs.json``). Trained models are registered (``register``).
    Like ``Tracker``, a failing tracking server costs a warning, never the stage; the first failure
    to reach it disables this object."""

    def __init__(self, tracking_uri: str | None, experiment: str, work_dir: str | None = None,
                 quiet: bool = False):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.work_dir = work_dir
        self.quiet = quiet  # MLflow's INFO lines (database migrations) off the console
        self.enabled = bool(tracking_uri)
        self._client = None
        self._exp_id: str | None = None
        self.code_version = code_version()

    # ------------------------------------------------------------------ plumbing
    def _fail(self, what: str, e: Exception, fatal: bool = False) -> None:
        from workflows import storage

        msg = storage.redact(f"MLflow {what} failed ({type(e).__name__}: {e}); the pipeline continues")[:500]
        warnings.warn(msg, TrackingWarning, stacklevel=3)
        log.warning(msg)
        if fatal:
            self.enabled = False

    def client(self):
        if self._client is None:
            for k, v in _HTTP_DEFAULTS.items():
                os.environ.setdefault(k, v)
            import mlflow

            if self.quiet:
                logging.getLogger("mlflow").setLevel(logging.WARNING)
            self._client = mlflow.MlflowClient(self.tracking_uri, self.tracking_uri)
        return self._client

    def experiment_id(self) -> str:
        if self._exp_id is None:
            c = self.client()
            exp = c.get_experiment_by_name(self.experiment)
            if exp is None:
                location = None
                if (self.tracking_uri or "").startswith("sqlite:") and self.work_dir:
                    from workflows import storage

                    local = storage.local_path(self.work_dir)
                    if local is not None:  # else MLflow's default: ./mlruns of whichever process creates it
                        location = (local.resolve() / "mlartifacts").as_uri()
                try:
                    self._exp_id = c.create_experiment(self.experiment, artifact_location=location)
                except Exception:  # noqa: BLE001 - created meanwhile (a worker's Tracker)
                    self._exp_id = c.get_experiment_by_name(self.experiment).experiment_id
            else:
                self._exp_id = exp.experiment_id
        return self._exp_id

    def ensure_experiment(self) -> None:
        """Create the experiment (with artifacts under ``work_dir`` for a SQLite store) before any
        Ray worker's ``Tracker`` would create it with an artifact root in its own working directory."""
        if not self.enabled:
            return
        try:
            self.experiment_id()
        except Exception as e:  # noqa: BLE001
            self._fail("experiment", e, fatal=True)

    def _do(self, what: str, fn, *args, **kwargs):
        if not self.enabled:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            self._fail(what, e)
            return None

    # ------------------------------------------------------------------ runs
    def start(self, run_name: str, parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> str | None:
        if not self.enabled:
            return None
        try:
            all_tags = {"evatok.run": run_name, "evatok.code_version": self.code_version,
                        "mlflow.source.git.commit": self.code_version.split("+")[0], **(tags or {})}
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run = self.client().create_run(self.experiment_id(), run_name=run_name, tags=all_tags)
            return run.info.run_id
        except Exception as e:  # noqa: BLE001
            self._fail("start", e, fatal=True)
            return None

    def end(self, run_id: str | None, status: str = "FINISHED") -> None:
        if run_id:
            self._do("end_run", lambda: self.client().set_terminated(run_id, status))

    def set_tags(self, run_id: str | None, tags: dict[str, Any]) -> None:
        from workflows import storage

        if run_id and tags:
            def _do():
                for k, v in tags.items():
                    self.client().set_tag(run_id, k, storage.redact("" if v is None else v)[:5000])
            self._do("set_tags", _do)

    def log_metrics(self, run_id: str | None, metrics: dict[str, Any], step: int = 0) -> None:
        clean = {k: float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}
        if run_id and clean:
            def _do():
                import time as _time

                from mlflow.entities import Metric

                now = int(_time.time() * 1000)
                self.client().log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in clean.items()])
            self._do("log_metrics", _do)

    def log_config(self, run_id: str | None, tree: dict, params: bool = True) -> None:
        """The resolved config: params (flat, redacted) and ``resolved_config.json`` (redacted)."""
        if not run_id:
            return
        from workflows.config import flatten

        clean = redacted_config(tree)

        def _do():
            from mlflow.entities import Param

            c = self.client()
            if params:
                items = sorted(safe_params(flatten(clean)).items())
                existing = c.get_run(run_id).data.params
                items = [(k, v) for k, v in items if k not in existing]  # params are write-once
                for i in range(0, len(items), 90):
                    c.log_batch(run_id, params=[Param(k, v) for k, v in items[i:i + 90]])
            c.log_dict(run_id, clean, "resolved_config.json")
        self._do("log_config", _do)

    def log_inputs(self, run_id: str | None, inputs: dict[str, dict]) -> None:
        """``{role: {"uri", "digest", "producer_run_id"?, "producer_stage"?}}`` -> one dataset input
        each: name = role, digest = the content digest (36 characters: MLflow's limit; the whole
        digest is the input tag ``evatok.digest``), source = the URI."""
        if not run_id or not inputs:
            return
        from workflows import storage

        def _do():
            from mlflow.data.dataset_source_registry import resolve_dataset_source
            from mlflow.data.meta_dataset import MetaDataset
            from mlflow.entities import DatasetInput, InputTag

            items = []
            for role, inp in sorted(inputs.items()):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    src = resolve_dataset_source(storage.redact(inp["uri"]))
                ds = MetaDataset(src, name=role, digest=str(inp["digest"])[:36])
                tags = {"mlflow.data.context": role, "evatok.uri": storage.redact(inp["uri"]),
                        "evatok.digest": str(inp["digest"]), "evatok.kind": str(inp.get("kind", ""))}
                for key in ("producer_run_id", "producer_stage"):
                    if inp.get(key):
                        tags[f"evatok.{key}"] = str(inp[key])
                items.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag(k, v) for k, v in tags.items()]))
            self.client().log_inputs(run_id, datasets=items)
        self._do("log_inputs", _do)

    def log_outputs(self, run_id: str | None, outputs: dict[str, dict]) -> None:
        """``{name: {"uri", "digest"}}`` -> tags ``evatok.output.<name>[.digest]`` and ``outputs.json``."""
        if not run_id or not outputs:
            return
        from workflows import storage

        tags = {}
        for name, o in outputs.items():
            tags[f"evatok.output.{name}"] = storage.redact(o["uri"])
            tags[f"evatok.output.{name}.digest"] = str(o.get("digest", ""))
        self.set_tags(run_id, tags)
        self._do("log_outputs", lambda: self.client().log_dict(
            run_id, {k: {**v, "uri": storage.redact(v["uri"])} for k, v in outputs.items()}, "outputs.json"))

    def register(self, model_name: str, uri: str, digest: str, run_id: str | None,
                 tags: dict[str, str] | None = None) -> str | None:
        """A new version of registered model ``model_name`` whose source is the export ``uri`` (its
        SHA-256 in the version's tags). A tracking server refuses a local-path source outside the
        run's artifacts; then the source is ``runs:/<run_id>/export`` (an ``export.json`` naming the
        file and digest) and the tags still give the URI. Returns the version number."""
        if not self.enabled:
            return None
        from workflows import storage

        vtags = {"evatok.uri": storage.redact(uri), "evatok.sha256": digest, **(tags or {})}

        def _do():
            from mlflow.exceptions import MlflowException

            c = self.client()
            try:
                c.create_registered_model(model_name, description="evatok exports of one model kind and recipe")
            except MlflowException as e:
                if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code) and "already exists" not in str(e):
                    raise
            try:
                mv = c.create_model_version(model_name, source=storage.redact(uri), run_id=run_id, tags=vtags,
                                            await_creation_for=0)
            except MlflowException:
                if not run_id:
                    raise
                c.log_dict(run_id, {"uri": storage.redact(uri), "sha256": digest}, "export/export.json")
                mv = c.create_model_version(model_name, source=f"runs:/{run_id}/export", run_id=run_id,
                                            tags=vtags, await_creation_for=0)
            return str(mv.version)
        return self._do("register", _do)
