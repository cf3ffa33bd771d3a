"""Trust boundaries (issue 14): a TorchScript detector is loaded only with the digest the user gave, and
credentials inside ``mlflow.tracking_uri`` never reach Ray (the training loop's config, its runtime env)
or the logs."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch

from evatok.metrics import FVD, DigestMismatchError
from test_ray_metadata_secrets import ray_with_state_api  # noqa: F401 - a fixture: Ray with the state API


class TinyI3D(torch.nn.Module):
    """Stands in for i3d_torchscript.pt: the same call signature, mean-pooled features."""

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = True,
                return_features: bool = True) -> torch.Tensor:
        return x.mean(dim=(2, 3, 4)).repeat(1, 4)


@pytest.fixture
def i3d_file(tmp_path):
    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.save(torch.jit.script(TinyI3D()), str(path))
    return path


def test_i3d_loads_only_with_the_digest_given(i3d_file, monkeypatch):
    good = hashlib.sha256(i3d_file.read_bytes()).hexdigest()
    loads = []
    real_load = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: (loads.append(a[0]), real_load(*a, **k))[1])

    with pytest.raises(DigestMismatchError, match="not loaded"):
        FVD(i3d_file, sha256="0" * 64)
    assert loads == []  # the file was never handed to the TorchScript loader

    fvd = FVD(i3d_file, sha256=good.upper())
    assert len(loads) == 1
    v = torch.rand(3, 3, 4, 16, 16)
    assert fvd.features(v).shape == (3, 12) and np.isfinite(fvd(v, torch.rand(3, 3, 4, 16, 16)))

    i3d_file.write_bytes(i3d_file.read_bytes() + b"\0")  # swapped after the user checked it
    with pytest.raises(DigestMismatchError):
        FVD(i3d_file, sha256=good)
    assert len(loads) == 1


# ----------------------------------------------------------------------------- tracking URI credentials
def test_a_credentialed_tracking_uri_travels_by_name(monkeypatch):
    from workflows.tracking import TRACKING_URI_ENV, for_workers, worker_uri

    monkeypatch.delenv(TRACKING_URI_ENV, raising=False)
    full = "https://alice:pa55-in-uri@mlflow.example:5000/prefix"
    public, name = for_workers(full)
    assert (public, name) == ("https://mlflow.example:5000/prefix", TRACKING_URI_ENV)
    assert os.environ[TRACKING_URI_ENV] == full  # the driver's own environment, inherited by a local Ray
    assert worker_uri(public, name) == full
    monkeypatch.setenv(TRACKING_URI_ENV, "https://bob:x@other.example/")  # another server: not used
    assert worker_uri(public, name) == public
    assert for_workers("sqlite:////tmp/m.db") == ("sqlite:////tmp/m.db", None)


@pytest.mark.slow
@pytest.mark.ray
def test_tracking_uri_password_never_reaches_ray_or_logs(ray_with_state_api, mlflow_server, tmp_path, capfd):
    """A real router training run (Ray Train + DeepSpeed) with ``mlflow.tracking_uri`` holding
    ``user:password@`` for the real tracking server: it logs its run, and the password is in none of
    Ray's state listings (Train V2's run records hold ``train_loop_config``), Ray's log files, the
    run's storage folder or the console."""
    import glob

    import mlflow

    from train_fixtures import write_clips, write_labels
    from workflows import storage
    from workflows.config import load_config
    from workflows.train import run_training
    from test_ray_metadata_secrets import state_api_dump

    password = "trk-pa55w0rd-7d41"
    uri = mlflow_server.replace("http://", f"http://alice:{password}@")
    clips = write_clips(str(tmp_path / "train_clips"), n=8)
    t = storage.read_table(f"{clips}/clips", columns=["clip_id", "label"])
    labels = write_labels(str(tmp_path / "labels"), t.column("clip_id").to_pylist(), t.column("label").to_pylist())
    res = run_training(load_config(None, [
        "name=trk", f"work_dir={tmp_path / 'runs'}", "train.model=router", "train.steps=1",
        "train.num_workers=1", "train.batch_size=4", "train.cpus_per_worker=0.5", "train.val_every=4",
        f"train.data={clips}", f"train.labels={labels}", "mlflow.system_metrics=false",
        f"mlflow.tracking_uri={uri}"]))
    assert res.steps == 1 and res.mlflow_run_id
    assert mlflow.MlflowClient(mlflow_server).get_run(res.mlflow_run_id).data.tags["evatok.run"] == "trk-router"

    dump = state_api_dump(ray_with_state_api)
    assert "trk-router" in dump["train_runs"] and "tracking_uri" in dump["train_runs"]  # the config is in there
    leaks = [where for where, text in dump.items() if password in text]
    import ray

    logs = ray._private.worker._global_node.get_logs_dir_path()
    for path in glob.glob(f"{logs}/**/*", recursive=True) + glob.glob(f"{tmp_path / 'runs'}/**/*", recursive=True):
        if os.path.isfile(path) and not path.endswith(".db"):  # the SQLite store is MLflow's, not ours
            with open(path, "rb") as f:
                if password.encode() in f.read():
                    leaks.append(path)
    out = capfd.readouterr()
    leaks += [k for k, v in (("stdout", out.out), ("stderr", out.err)) if password in v]
    assert not leaks, leaks
