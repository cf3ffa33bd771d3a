"""The training loop on real Ray (2 CPU workers) + real DeepSpeed: each recipe trains and its loss
falls on a fixed batch; a killed worker resumes from the last checkpoint in the same MLflow run with a
continuing step count; rerunning a finished run does not restart it; checkpoints on S3; exported
models load in plain ``evatok``. Few trainer runs, all marked slow."""
from __future__ import annotations

import io
import json

import pytest
import torch

from workflows import storage
from workflows.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.ray]

TINY = ["data.clip_len=16", "data.size=64", "train.num_workers=2", "train.batch_size=4", "train.log_every=1",
        "train.lr=0.001", "train.cpus_per_worker=0.5", "train.min_lr=0.0001", "mlflow.system_metrics=false"]


def _load_export(uri: str):
    from evatok.export import load_model  # plain evatok: weights_only=True

    return load_model(io.BytesIO(storage.read_bytes(uri)))


@pytest.fixture(scope="module")
def clips_dir(tmp_path_factory):
    from train_fixtures import write_clips

    root = tmp_path_factory.mktemp("clips")
    write_clips(str(root), n=16)
    return root


def test_router_resumes_after_worker_kill_on_s3_and_rerun_is_a_noop(ray_local, s3_bucket, mlflow_server,
                                                                     clips_dir, tmp_path, monkeypatch):
    import mlflow
    from train_fixtures import write_labels
    from workflows.train import run_training

    t = storage.read_table(str(clips_dir / "clips"), columns=["clip_id", "label"])
    labels = write_labels(str(tmp_path / "labels"), t.column("clip_id").to_pylist(), t.column("label").to_pylist())
    marker = tmp_path / "killed"
    monkeypatch.setenv("EVATOK_TEST_FAIL_ONCE", f"3:1:{marker}")
    cfg = load_config(None, TINY + [
        "name=resume", f"work_dir=s3://{s3_bucket}/runs", f"mlflow.tracking_uri={mlflow_server}",
        "train.model=router", "train.steps=6", "train.checkpoint_every=2", "train.max_failures=2",
        f"train.data={clips_dir}", f"train.labels={labels}", "train.val_every=4",
        "train.deepspeed.zero_stage=0"])
    res = run_training(cfg)
    assert marker.exists(), "the failure hook did not fire"
    assert res.steps == 6 and not res.skipped
    assert res.metrics["fixed_loss_end"] < res.metrics["fixed_loss_start"]
    assert {"val/top1", "val/top5", "val/reward_percentile"} <= set(res.metrics)
    # checkpoints and the export are on S3
    assert storage.list_files(f"s3://{s3_bucket}/runs/ray_results/resume-router")
    router = _load_export(res.export_uri)
    assert res.export_uri.startswith("s3://") and router.export_meta["mlflow_run_id"] == res.mlflow_run_id
    # one MLflow run; its step count continued after the restart (steps 1..6, no second run)
    client = mlflow.MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("evatok").experiment_id],
                              "tags.`evatok.run` = 'resume-router'")
    assert [r.info.run_id for r in runs] == [res.mlflow_run_id]
    # The history itself: each step exactly once (a restart from step 0, or the replay of step 3 after
    # the checkpoint of step 2, would log steps again); the resumed worker started at the checkpoint's
    # step and data position (step 2: epoch 0, 2 micro-batches of 2 clips per rank consumed of 4).
    history = client.get_metric_history(res.mlflow_run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
    resumed = json.loads(client.get_run(res.mlflow_run_id).data.tags["evatok.resumed_from"])
    assert resumed == {"step": 2, "epoch": 0, "micro_in_epoch": 2}
    assert client.get_run(res.mlflow_run_id).data.params["train.model"] == "router"
    # rerunning the same command finds the run done
    monkeypatch.delenv("EVATOK_TEST_FAIL_ONCE")
    again = run_training(cfg)
    assert again.skipped and again.export_uri == res.export_uri and again.mlflow_run_id == res.mlflow_run_id


def test_tokenizer_recipes_and_ar_train_and_export(ray_local, clips_dir, tmp_path):
    """proxy (ZeRO-2, GAN) -> router file -> final (ZeRO-2, bf16) -> AR (ZeRO-3, WSD)."""
    from evatok.export import save_model
    from evatok.router import PRESETS, Router
    from workflows.train import run_training

    base = TINY + [f"work_dir={tmp_path / 'runs'}", f"train.data={clips_dir}", "train.disc_start=0",
                   "train.checkpoint_every=100"]
    proxy = run_training(load_config(None, base + ["name=t", "train.model=proxy", "train.steps=6",
                                                   "train.deepspeed.zero_stage=2"]))
    assert proxy.metrics["fixed_loss_end"] < proxy.metrics["fixed_loss_start"]
    tok = _load_export(proxy.export_uri)
    assert type(tok).__name__ == "AdaptiveTokenizer"
    assert (tmp_path / "runs" / "mlflow.db").exists()  # default tracking: SQLite in the work dir

    torch.manual_seed(0)
    save_model(Router(PRESETS["tiny"]()), tmp_path / "router.pt", {"mlflow_run_id": "router-run"})
    final = run_training(load_config(None, base + [
        "name=t", "train.model=final", "train.steps=3", f"train.router={tmp_path / 'router.pt'}",
        "train.deepspeed.zero_stage=2", "train.deepspeed.precision=bf16"]))
    assert final.metrics["fixed_loss_end"] < final.metrics["fixed_loss_start"]
    final_tok = _load_export(final.export_uri)
    assert next(final_tok.parameters()).dtype == torch.float32

    ar = run_training(load_config(None, base + [
        "name=t", "train.model=ar", "train.steps=4", "train.schedule=wsd", f"train.router={tmp_path / 'router.pt'}",
        f"train.tokenizer={final.export_uri}", "train.deepspeed.zero_stage=3"]))
    assert ar.metrics["fixed_loss_end"] < ar.metrics["fixed_loss_start"]
    model = _load_export(ar.export_uri)
    assert type(model).__name__ == "ARModel" and model.export_meta["classes"]
