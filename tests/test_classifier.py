"""The small video classifier behind the generation metrics: shapes, export, that it learns the synthetic
classes, and that `evatok train classifier` trains it through the shared loop."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from evatok import synthetic
from evatok.classifier import PRESETS, ClassifierConfig, VideoClassifier
from evatok.video import to_tensor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _clips(classes, per_class, seed):
    vids, labels = [], []
    for i in range(per_class * len(classes)):
        c = i % len(classes)
        vids.append(synthetic.make_video(classes[c], seed=seed + i, num_frames=16, height=64, width=64))
        labels.append(c)
    return to_tensor(np.stack(vids)), torch.tensor(labels)


def test_shapes_presets_and_export_round_trip(tmp_path):
    from evatok.export import load_model, save_model

    for name, make in PRESETS.items():
        net = VideoClassifier(make())
        x = torch.rand(2, 3, 16, 64, 64) - 0.5
        assert net.features(x).shape == (2, net.config.feature_dim), name
        assert net(x).shape == (2, net.config.num_classes), name
    net = VideoClassifier(ClassifierConfig(num_classes=5)).eval()
    save_model(net, tmp_path / "c.pt", {"classes": list("abcde")})
    back = load_model(tmp_path / "c.pt")
    x = torch.rand(3, 3, 16, 64, 64) - 0.5
    assert type(back).__name__ == "VideoClassifier" and back.export_meta["classes"] == list("abcde")
    assert torch.equal(back.features(x), net.features(x))
    with pytest.raises(ValueError, match="expected videos"):
        net.features(torch.zeros(1, 16, 64, 64, 3))


def test_motion_channels_tell_a_still_from_a_moving_clip():
    """The frame differences reach the features: two clips with the same frames in another order differ."""
    torch.manual_seed(0)
    net = VideoClassifier(ClassifierConfig()).eval()
    x = torch.rand(1, 3, 16, 64, 64) - 0.5
    still = x[:, :, :1].expand(-1, -1, 16, -1, -1)
    assert not torch.allclose(net.features(x), net.features(x.flip(2)))
    assert not torch.allclose(net.features(still), net.features(x))


def test_it_learns_the_synthetic_classes_on_held_out_videos():
    """A plain loop, 150 steps: held-out accuracy far above chance (25%) on four classes."""
    torch.manual_seed(0)
    classes = ["static", "fast_pan", "flicker", "scene_cuts"]
    x, y = _clips(classes, 12, seed=0)
    xv, yv = _clips(classes, 6, seed=10_000)
    net = VideoClassifier(ClassifierConfig(num_classes=4))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(len(x), (8,), generator=g)
        loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    acc = float((net.predict(xv) == yv).float().mean())
    assert acc >= 0.6, f"held-out accuracy {acc:.2f}"


@pytest.mark.slow
@pytest.mark.ray
def test_train_classifier_command_uses_the_shared_loop(ray_local, tmp_path, monkeypatch):
    """`evatok train classifier`: Ray Train + DeepSpeed, export with its classes, held-out accuracy in MLflow,
    a done record, and a rerun that does nothing."""
    import mlflow
    from train_fixtures import write_clips
    from typer.testing import CliRunner

    from evatok.export import load_model
    from workflows import storage
    from workflows.cli import app

    monkeypatch.chdir(tmp_path)
    write_clips(str(tmp_path / "data"), n=32)
    db = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["train", "classifier", "name=t", f"work_dir={tmp_path}", f"train.data={tmp_path / 'data'}",
            f"mlflow.tracking_uri={db}", "mlflow.system_metrics=false", "classifier.steps=12",
            "classifier.batch_size=8", "classifier.num_workers=2", "classifier.cpus_per_worker=0.5",
            "classifier.lr=1e-3", "classifier.log_every=4", "classifier.checkpoint_every=100", "train.val_every=4"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    export = tmp_path / "classifier" / "classifier.pt"
    net = load_model(io.BytesIO(export.read_bytes()))
    assert type(net).__name__ == "VideoClassifier" and net.export_meta["classes"] == sorted(synthetic.CLASSES)
    done = storage.read_done(str(tmp_path / "train" / "t-classifier"))
    assert done["export_sha256"] == storage.sha256(str(export))
    m = done["metrics"]
    assert m["fixed_loss_end"] < m["fixed_loss_start"] and 0.0 <= m["val/acc"] <= 1.0 and m["val/clips"] > 0
    run = mlflow.MlflowClient(db).get_run(done["mlflow_run_id"])
    assert "val/acc" in run.data.metrics and run.data.tags["evatok.model"] == "classifier"
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "up to date" in again.output, again.output
