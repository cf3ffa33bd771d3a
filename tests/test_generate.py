"""evatok generate: samples of the AR model, decoded by the tokenizer, written as mp4 + grid + token table;
the generation metrics and how each was measured."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from evatok.ar import ARConfig, ARModel
from evatok.classifier import ClassifierConfig, VideoClassifier
from evatok.export import save_model
from evatok.tokenizer import PRESETS as TOK_PRESETS
from evatok.tokenizer import AdaptiveTokenizer
from workflows import generate as G

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CLASSES = ["static", "fast_pan", "flicker"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A (random) tiny tokenizer and a small AR model over its codes, exported as files."""
    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    tok = AdaptiveTokenizer(TOK_PRESETS["tiny"]())
    tc = tok.config
    ar = ARModel(ARConfig(codebook_size=tc.codebook_size, counts=tc.counts, num_blocks=tc.num_blocks,
                          num_classes=len(CLASSES), dim=32, n_layers=2, n_heads=2))
    clf = VideoClassifier(ClassifierConfig(num_classes=len(CLASSES), frames=tc.frames, size=tc.size, width=8,
                                           depth=1, feature_dim=16))
    paths = {"tokenizer": d / "final.pt", "ar": d / "ar.pt", "classifier": d / "classifier.pt"}
    save_model(tok, paths["tokenizer"], {"mlflow_run_id": "tok-run"})
    save_model(ar, paths["ar"], {"mlflow_run_id": "ar-run", "classes": CLASSES})
    save_model(clf, paths["classifier"], {"mlflow_run_id": "clf-run", "classes": CLASSES})
    return {k: str(v) for k, v in paths.items()}


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _real(n_per_class=3, seed=100):
    from evatok import synthetic

    vids, names = [], []
    for i in range(n_per_class * len(CLASSES)):
        c = CLASSES[i % len(CLASSES)]
        vids.append(synthetic.make_video(c, seed=seed + i, num_frames=16, height=64, width=64))
        names.append(c)
    return np.stack(vids), names


def test_samples_are_written_as_mp4_that_the_project_reader_decodes(models, tmp_path):
    from evatok.assignment import AssignmentSpace
    from evatok.export import load_model
    from evatok.video import decode_clip, probe

    ar, tok = load_model(models["ar"]), load_model(models["tokenizer"])
    labels = G.class_labels(len(CLASSES), 2)
    s = G.sample(ar, tok, labels, cfg_scale=2.0, temperature=1.0, top_k=50, seed=3, batch_size=4)
    assert bool(s.well_formed.all())  # logit masking: every sample parses into 4 blocks
    assert s.videos.shape == (6, 16, 64, 64, 3) and s.videos.dtype == np.uint8
    assert set(s.counts.flatten().tolist()) <= set(tok.config.counts)
    # the decoded clip is what the tokenizer makes of the sampled codes (decoded as inference, like
    # sampling: with gradients on, linear layers take another GEMM whose rounding may move a pixel by 1)
    codes = torch.nn.utils.rnn.pad_sequence([s.codes[0]], batch_first=True)
    from evatok.video import to_uint8

    with torch.no_grad():
        assert np.array_equal(to_uint8(tok.decode(codes, s.counts[:1])), s.videos[:1])

    space = AssignmentSpace(tok.config.counts, tok.config.num_blocks)
    out = G.write_samples(s, str(tmp_path / "gen"), fps=8.0, class_names=CLASSES, space=space)
    assert len(out["files"]) == 6
    for i, f in enumerate(out["files"]):
        info = probe(f)
        assert (info.width, info.height) == (64, 64) and info.num_frames == 16 and abs(info.fps - 8.0) < 1e-6
        frames = decode_clip(f, clip_len=16, fps=None, size=64)
        assert frames.shape == (16, 64, 64, 3)
        # a random tokenizer decodes to pixel noise, which h264 + 4:2:0 chroma cannot keep pixel for pixel
        # (~35 levels off); 8x8 means survive (~1.5), and each frame lands at its own index
        pool = lambda v: v.astype(np.float32).reshape(16, 8, 8, 8, 8, 3).mean((2, 4))  # noqa: E731
        err = np.abs(pool(frames) - pool(s.videos[i])).mean()
        shifted = np.abs(pool(frames)[1:] - pool(s.videos[i])[:-1]).mean()
        assert err < 4.0 and err < shifted / 2, f"sample {i}: 8x8-mean error {err:.2f} (shifted: {shifted:.2f})"
    t = pq.read_table(out["tokens"]).to_pylist()
    assert [r["class"] for r in t] == [CLASSES[i] for i in labels.tolist()]
    for r, k, c in zip(t, s.counts.tolist(), s.codes):
        assert r["well_formed"] and r["counts"] == k and r["total_tokens"] == sum(k) == len(r["codes"])
        assert r["codes"] == c.tolist() and r["assignment"] == space.index(torch.tensor(k))
        assert r["file"].endswith(".mp4")
    from PIL import Image

    grid = Image.open(out["grid"])
    assert grid.size[1] > 3 * 64 and grid.size[0] > 4 * 64  # one row per class, 8 frames a row


def test_sampling_is_reproducible_and_depends_on_the_seed(models):
    from evatok.export import load_model

    ar, tok = load_model(models["ar"]), load_model(models["tokenizer"])
    labels = torch.tensor([0, 1])
    a = G.sample(ar, tok, labels, seed=1, batch_size=2)
    b = G.sample(ar, tok, labels, seed=1, batch_size=2)
    c = G.sample(ar, tok, labels, seed=2, batch_size=2)
    assert torch.equal(a.counts, b.counts) and all(torch.equal(x, y) for x, y in zip(a.codes, b.codes))
    assert not all(torch.equal(x, y) for x, y in zip(a.codes, c.codes))


def test_generation_metrics_carry_their_protocol(models):
    real, names = _real()
    m = G.generation_metrics(models["ar"], models["tokenizer"], classifier=models["classifier"], real_videos=real,
                             real_labels=names, real_info={"uri": "mem://real", "digest": "abc", "clips": len(real)},
                             samples_per_class=2, cfg_scale=1.5, seed=0, batch_size=6, fps=8.0)
    assert m["gen/samples"] == 6 and m["gen/well_formed_rate"] == 1.0
    assert 4 * 8 <= m["gen/mean_tokens"] <= 4 * 128
    assert 0.0 <= m["gen/classifier_acc"] <= 1.0 and 0.0 <= m["gen/classifier_acc_real"] <= 1.0
    assert m["gen/frechet_classifier"] >= 0.0 and m["gen/frechet_classifier_real_halves"] >= 0.0
    p = G.PROTOCOL
    assert m[p + "feature_net_sha256"] == _sha(models["classifier"])
    assert m[p + "ar_sha256"] == _sha(models["ar"]) and m[p + "tokenizer_sha256"] == _sha(models["tokenizer"])
    assert (m[p + "samples"], m[p + "classes"], m[p + "frames"], m[p + "size"], m[p + "fps"]) == (6, 3, 16, 64, 8.0)
    assert (m[p + "real_clips"], m[p + "real_digest"], m[p + "cfg_scale"]) == (9, "abc", 1.5)
    assert m[p + "feature_net_run_id"] == "clf-run" and m[p + "ar_run_id"] == "ar-run"
    assert "gen/fvd" not in m  # no I3D given: no FVD, and nothing else under its name
    nums, tags = G.mlflow_split(m)
    assert tags[p + "feature_net_sha256"] == m[p + "feature_net_sha256"] and "gen/mean_tokens" in nums


def test_frechet_in_classifier_features_separates_real_from_unlike(models):
    """Real vs itself is ~0; real vs other videos of the same classes is small; vs noise is large."""
    from evatok.export import load_model

    net = load_model(models["classifier"])
    real, _ = _real(4, seed=0)
    other, _ = _real(4, seed=500)
    noise = np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8)
    f_real = G._features(net, real)[0]
    assert G._frechet(f_real, f_real) < 1e-6
    assert G._frechet(f_real, G._features(net, other)[0]) < G._frechet(f_real, G._features(net, noise)[0])


def test_fvd_only_with_an_i3d_file_and_with_its_digest(models, tmp_path):
    """An I3D stand-in with the TorchScript detector's call signature: FVD is computed through it and
    reported with the file's SHA-256."""

    class FakeI3D(torch.nn.Module):
        def forward(self, x: torch.Tensor, rescale: bool, resize: bool, return_features: bool) -> torch.Tensor:
            return torch.cat([x.mean(dim=(2, 3, 4)), x.std(dim=(2, 3, 4))], 1)

    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.script(FakeI3D()).save(str(path))
    real, names = _real()
    m = G.generation_metrics(models["ar"], models["tokenizer"], real_videos=real, real_labels=names,
                             i3d=str(path), samples_per_class=1, batch_size=3)
    assert m["gen/fvd"] >= 0.0 and m[G.PROTOCOL + "i3d_sha256"] == _sha(path)
    assert "gen/classifier_acc" not in m  # no classifier given
    from evatok.metrics import DigestMismatchError

    with pytest.raises(DigestMismatchError):  # a digest that does not match: refused before loading
        G.generation_metrics(models["ar"], models["tokenizer"], real_videos=real, real_labels=names,
                             i3d=str(path), i3d_sha256="0" * 64, samples_per_class=1, batch_size=3)
    m = G.generation_metrics(models["ar"], models["tokenizer"], real_videos=real, real_labels=names,
                             i3d=str(path), i3d_sha256=_sha(path), samples_per_class=1, batch_size=3)
    assert m["gen/fvd"] >= 0.0


def test_a_classifier_of_another_clip_shape_is_refused(models, tmp_path):
    clf = VideoClassifier(ClassifierConfig(num_classes=3, frames=16, size=32, width=8, depth=1, feature_dim=8))
    real, names = _real(1)
    with pytest.raises(ValueError, match="trained on 16x32x32"):
        G.generation_metrics(models["ar"], models["tokenizer"], classifier=clf, real_videos=real, real_labels=names,
                             samples_per_class=1, batch_size=3)


def test_generate_command_writes_samples_and_logs_a_run(models, tmp_path, monkeypatch):
    import mlflow
    from typer.testing import CliRunner

    from workflows.cli import app

    monkeypatch.chdir(tmp_path)
    db = f"sqlite:///{tmp_path}/mlflow.db"
    real, names = _real(2)
    import pyarrow as pa

    from workflows import storage

    storage.write_parquet(pa.table({
        "label": names, "shape": [list(real.shape[1:])] * len(real),
        "frames": pa.array([v.tobytes() for v in real], pa.binary(int(np.prod(real.shape[1:]))))}),
        str(tmp_path / "data" / "clips" / "shard-00000.parquet"))
    r = CliRunner().invoke(app, ["generate", f"work_dir={tmp_path}", f"mlflow.tracking_uri={db}", "mlflow.experiment=gen",
                                 f"generate.ar={models['ar']}", f"generate.tokenizer={models['tokenizer']}",
                                 f"generate.classifier={models['classifier']}", "generate.samples_per_class=1",
                                 "generate.batch_size=3"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "generate"
    assert len(list((out / "videos").glob("*.mp4"))) == 3 and (out / "grid.png").is_file()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"]["gen/well_formed_rate"] == 1.0 and saved["classes"] == CLASSES
    assert saved["metrics"][G.PROTOCOL + "real_clips"] == len(real)
    client = mlflow.MlflowClient(db)
    run = client.search_runs([client.get_experiment_by_name("gen").experiment_id])[0]
    assert run.data.tags["evatok.stage"] == "generate"
    assert run.data.metrics["gen/well_formed_rate"] == 1.0 and "gen/frechet_classifier" in run.data.metrics
    assert run.data.metrics["seconds"] > 0
    assert run.data.tags[f"evatok.{G.PROTOCOL}feature_net_sha256"] == _sha(models["classifier"])
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "generate")}
    assert {"generate/grid.png", "generate/tokens.parquet", "generate/metrics.json"} <= arts


def test_a_sample_that_is_not_well_formed_is_counted_but_not_measured(models, tmp_path):
    """The rate is measured, not assumed: a sample marked not well-formed lowers it, gets no mp4, an
    assignment of -1 in the table, and stays out of the token and classifier figures."""
    from evatok.assignment import AssignmentSpace
    from evatok.export import load_model

    ar, tok = load_model(models["ar"]), load_model(models["tokenizer"])
    s = G.sample(ar, tok, G.class_labels(len(CLASSES), 2), seed=5, batch_size=6)
    kept = s.total_tokens[1:].float().mean()
    s.well_formed[0] = False
    s.counts[0] = 0
    s.codes[0] = torch.zeros(0, dtype=torch.long)
    real, names = _real(1)
    m = G.generation_metrics(ar, tok, classifier=models["classifier"], real_videos=real, real_labels=names, samples=s)
    assert m["gen/well_formed_rate"] == pytest.approx(5 / 6) and m["gen/mean_tokens"] == pytest.approx(float(kept))
    assert m[G.PROTOCOL + "well_formed"] == 5 and m[G.PROTOCOL + "classifier_acc_samples"] == 5
    out = G.write_samples(s, str(tmp_path / "g"), 8.0, CLASSES, AssignmentSpace(tok.config.counts, 4))
    rows = pq.read_table(out["tokens"]).to_pylist()
    assert len(out["files"]) == 5 and rows[0]["assignment"] == -1 and rows[0]["file"] == "" and not rows[0]["well_formed"]
    again = G.write_samples(G.Samples(s.labels[:2], s.well_formed[:2], s.counts[:2], s.codes[:2], s.videos[:2]),
                            str(tmp_path / "g"), 8.0, CLASSES)
    assert len(list((tmp_path / "g" / "videos").iterdir())) == len(again["files"]) == 1  # no stale files


def test_metrics_stream_batch_by_batch_and_match_the_samples_drawn_at_once(models):
    """generation_metrics draws and measures one batch at a time (on_batch sees each batch, then it is
    dropped); the figures equal those of the same samples drawn at once and measured afterwards."""
    from evatok.export import load_model

    ar, tok = load_model(models["ar"]), load_model(models["tokenizer"])
    real, names = _real(2)
    seen = []
    kw = dict(classifier=models["classifier"], real_videos=real, real_labels=names, seed=4, batch_size=4)
    streamed = G.generation_metrics(ar, tok, samples_per_class=2, on_batch=lambda s: seen.append(len(s.labels)), **kw)
    assert seen == [4, 2]
    at_once = G.sample(ar, tok, G.class_labels(len(CLASSES), 2), seed=4, batch_size=4)
    measured = G.generation_metrics(ar, tok, samples=at_once, **kw)
    for k in ("gen/mean_tokens", "gen/classifier_acc", "gen/frechet_classifier", "gen/well_formed_rate"):
        assert streamed[k] == pytest.approx(measured[k]), k
