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
_SECRET_KEY = re.compile(r"(?i)(secret|password|token|credential|access_key)")
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


def safe_params(flat: dict[str, Any]) -> dict[str, str]:
    """Flattened config -> MLflow params: secret-looking keys dropped, values redacted and capped."""
    from workflows import storage

    out = {}
    for k, v in flat.items():
        if _SECRET_KEY.search(k):
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
            else:
                run = mlflow.start_run(run_name=self.run_name, tags=tags, log_system_metrics=self.system_metrics)
            self.run_id = run.info.run_id
            return self.run_id
        except Exception as e:  # noqa: BLE001
            self._fail("start", e, fatal=True)
            return None

    def _find_existing(self, experiment_id: str) -> str | None:
        """A run of the same name not yet finished: it was started before the first checkpoint."""
        runs = self._mlflow.search_runs(
            [experiment_id], filter_string=f"tags.`evatok.run` = '{self.run_name}' and attributes.status != 'FINISHED'",
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
