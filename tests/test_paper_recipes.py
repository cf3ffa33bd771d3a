"""The paper-scale recipes (issue 13): pretrained files named and checked before any Ray work, their
no-pretrained variants, the UCF+K600 codebook, epochs over videos, augmentation, frozen reward statistics,
labels named by the metric used, and the router's validation holding only held-out rewards."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from workflows import storage
from workflows.config import MissingPretrainedError, check_pretrained, load_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TOKENIZER_FILES = {"proxy": {"lpips_backbone", "align_encoder"},
                   "final": {"lpips_backbone", "align_encoder", "semantic_disc_encoder"},
                   "final-ucf-k600": {"lpips_backbone", "align_encoder", "semantic_disc_encoder"}}


# ----------------------------------------------------------------------------- pretrained files
@pytest.mark.parametrize("name", sorted(TOKENIZER_FILES))
def test_paper_tokenizer_recipes_name_every_pretrained_file(name):
    cfg = load_config(CONFIGS / f"paper-{name}.yaml")
    want = TOKENIZER_FILES[name]
    assert set(cfg.pretrained) == {f"train.{k}" for k in want}
    for key in ("lpips_backbone", "align_encoder", "semantic_disc_encoder"):
        value = getattr(cfg.train, key)
        assert bool(value) == (key in want), (key, value)   # named exactly when the recipe needs it
        assert not value or value.startswith("s3://")
    assert cfg.train.disc_start >= 0                        # the PatchGAN is on


def test_paper_label_recipe_needs_its_lpips_backbone():
    cfg = load_config(CONFIGS / "paper-label.yaml")
    assert cfg.pretrained == ["label.lpips_backbone"] and cfg.label.metric == "lpips" and cfg.label.lpips_backbone


@pytest.mark.parametrize("name", ["proxy", "final"])
def test_nopretrained_variants_are_separate_and_need_nothing(name):
    paper = load_config(CONFIGS / f"paper-{name}.yaml")
    bare = load_config(CONFIGS / f"paper-{name}-nopretrained.yaml")
    assert bare.pretrained == []
    assert bare.train.lpips_backbone is bare.train.align_encoder is bare.train.semantic_disc_encoder is None
    check_pretrained(bare)                                  # nothing to check, nothing missing
    # the same schedule otherwise, but its own run and outputs: never mistaken for the paper's model
    assert (bare.train.steps, bare.train.lr, bare.train.batch_size) == (paper.train.steps, paper.train.lr,
                                                                      paper.train.batch_size)
    assert bare.name != paper.name and bare.work_dir != paper.work_dir and bare.train.output != paper.train.output


def test_missing_pretrained_files_are_all_named_before_any_ray_work(tmp_path, monkeypatch):
    import ray

    import workflows.stage
    from workflows.cli import app

    def no_ray(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(workflows.stage, "ensure_ray", no_ray)
    monkeypatch.setattr(ray, "init", no_ray)
    ray_before = ray.is_initialized()  # an earlier test of the session may have started one
    vgg = tmp_path / "vgg16.pth"
    vgg.write_bytes(b"weights")                             # present: must not be named
    res = CliRunner().invoke(app, [
        "train", "final", "-c", str(CONFIGS / "paper-final.yaml"), f"work_dir={tmp_path / 'run'}",
        f"train.lpips_backbone={vgg}", f"train.align_encoder={tmp_path / 'vjepa2-missing'}",
        f"train.semantic_disc_encoder={tmp_path / 'videomae-missing'}"])
    assert res.exit_code == 2, res.output
    out = " ".join(res.output.split())
    assert "2 pretrained file(s) that are missing" in out
    assert "train.align_encoder=" in out and "vjepa2-missing" in out
    assert "train.semantic_disc_encoder=" in out and "videomae-missing" in out
    assert "lpips_backbone" not in out
    assert ray.is_initialized() == ray_before
    assert not (tmp_path / "run").exists()                  # nothing claimed, nothing written
    # an unset key is named too, and the label stage is checked the same way
    res = CliRunner().invoke(app, ["label", "-c", str(CONFIGS / "paper-label.yaml"), f"work_dir={tmp_path / 'run'}",
                                   "label.lpips_backbone=null"])
    assert res.exit_code == 2 and "label.lpips_backbone: not set" in " ".join(res.output.split())
    assert ray.is_initialized() == ray_before


def test_pretrained_files_checked_on_object_storage(s3_bucket, tmp_path):
    from workflows.train.recipes import local_pretrained

    b = f"s3://{s3_bucket}/weights"
    storage.write_bytes_atomic(f"{b}/vgg16.pth", b"vgg")
    storage.write_bytes_atomic(f"{b}/vjepa2/config.json", b"{}")
    storage.write_bytes_atomic(f"{b}/vjepa2/model.safetensors", b"w")
    storage.write_bytes_atomic(f"{b}/videomae/model.safetensors", b"w")   # no config.json: not a checkpoint
    over = [f"train.lpips_backbone={b}/vgg16.pth", f"train.align_encoder={b}/vjepa2",
            f"train.semantic_disc_encoder={b}/videomae"]
    with pytest.raises(MissingPretrainedError) as e:
        check_pretrained(load_config(CONFIGS / "paper-final.yaml", over))
    msg = str(e.value)
    assert "1 pretrained file(s)" in msg and "train.semantic_disc_encoder" in msg and "no config.json" in msg
    storage.write_bytes_atomic(f"{b}/videomae/config.json", b"{}")
    check_pretrained(load_config(CONFIGS / "paper-final.yaml", over))
    # the trainer's loaders read local files: remote ones are fetched once into a cache
    import os

    os.environ["EVATOK_WEIGHTS_CACHE"] = str(tmp_path / "cache")
    try:
        d = Path(local_pretrained(f"{b}/vjepa2", directory=True))
        f = Path(local_pretrained(f"{b}/vgg16.pth"))
    finally:
        del os.environ["EVATOK_WEIGHTS_CACHE"]
    assert sorted(p.name for p in d.iterdir() if not p.name.startswith("_")) == ["config.json", "model.safetensors"]
    assert f.read_bytes() == b"vgg" and f.name == "vgg16.pth"
    assert local_pretrained(str(tmp_path / "x.pth")) == str(tmp_path / "x.pth")   # local: as it is


# ----------------------------------------------------------------------------- UCF+K600, AR, schedules
def test_ucf_k600_tokenizer_has_8192_codes_and_feeds_the_ar_recipes():
    import torch

    from workflows.train.recipes import ProxyRecipe

    ucf = load_config(CONFIGS / "paper-final-ucf-k600.yaml")
    assert ucf.train.codebook_size == 8192 and ucf.data.fps is None
    for name in ("ar", "ar-gptb"):
        ar = load_config(CONFIGS / f"paper-{name}.yaml")
        assert ar.train.tokenizer == ucf.train.output and ar.train.router == ucf.train.router
    # the override reaches the model: a tiny tokenizer with 8192 codes instead of its preset's
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["train.model=proxy", "train.codebook_size=8192"])
    with torch.device("meta"):
        tok = ProxyRecipe(cfg, "meta").build().tokenizer
    assert tok.config.codebook_size == 8192


def test_ar_steps_count_epochs_over_videos():
    for name in ("ar", "ar-gptb"):
        t = load_config(CONFIGS / f"paper-{name}.yaml").train
        assert t.steps == math.ceil(3000 * 9537 / 128) and t.batch_size == 128 and t.schedule == "wsd"
        assert not t.prefix_counts
    k600 = load_config(CONFIGS / "paper-ar-k600.yaml")
    assert k600.train.steps == math.ceil(75 * 392_622 / 128) and list(k600.train.prefix_counts) == [512, 128]
    assert k600.train.tokenizer == load_config(CONFIGS / "paper-final-ucf-k600.yaml").train.output


def test_ar_recipes_sample_with_the_papers_guidance():
    """[P] constant CFG: 2.5 for GPT-B, 1.75 for the larger GPTs; gFVD on 10k UCF samples."""
    big, b = (load_config(CONFIGS / f"paper-{n}.yaml") for n in ("ar", "ar-gptb"))
    assert (big.train.preset, big.generate.cfg_scale) == ("GPT-633M", 1.75)
    assert (b.train.preset, b.generate.cfg_scale) == ("GPT-B", 2.5)
    for c in (big, b):
        assert c.generate.ar == c.train.output and c.generate.tokenizer == c.train.tokenizer
        assert 101 * c.generate.samples_per_class >= 10_000


@pytest.mark.parametrize("name", ["proxy", "final", "final-ucf-k600", "router", "ar", "ar-gptb", "ar-k600"])
def test_paper_recipes_warm_up_and_set_betas(name):
    t = load_config(CONFIGS / f"paper-{name}.yaml").train
    assert 0 < t.warmup_steps <= 0.06 * t.steps
    assert t.disc_betas == (0.5, 0.9) and t.betas == (0.9, 0.95)
    augment = name != "router"                              # labels belong to one exact clip
    assert t.hflip == t.random_window == augment


def test_random_window_recipes_read_longer_clips():
    pairs = {"proxy": "ingest", "final": "ingest", "final-ucf-k600": "ingest-ucf-k600", "ar": "ingest-ucf101",
             "ar-k600": "ingest-k600"}
    for train, ingest in pairs.items():
        tc, ic = load_config(CONFIGS / f"paper-{train}.yaml"), load_config(CONFIGS / f"paper-{ingest}.yaml")
        assert tc.train.data == ic.ingest.output and ic.data.clip_len > tc.data.clip_len == 16
    label, sub = load_config(CONFIGS / "paper-label.yaml"), load_config(CONFIGS / "paper-ingest-webvid-100k.yaml")
    assert label.label.clips == sub.ingest.output and sub.data.clip_len == 16


# ----------------------------------------------------------------------------- augmentation
def _batch(n=64, t=20, s=4):
    from workflows.clips import frames_to_column

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (n, t, s, s, 3), dtype=np.uint8)
    col = frames_to_column(frames, t, s)
    return frames, {"frames": np.array(col.to_pylist(), dtype=object), "shape": np.array([[t, s, s, 3]] * n)}


def test_collate_random_window_and_flip():
    import torch

    from workflows.train.data import Collate, to_video

    frames, batch = _batch()
    plain = Collate(clip_len=16)(batch)["video"]
    assert torch.equal(plain, to_video(frames[:, 2:18]))    # held out: the centre window, never flipped
    aug = Collate(clip_len=16, hflip=True, random_window=True, seed=1)(batch)["video"]
    starts, flips = set(), set()
    for i in range(len(frames)):
        hit = [(s, f) for s in range(5) for f in (False, True)
               if torch.equal(aug[i], to_video((frames[i:i + 1, s:s + 16, :, ::-1] if f else frames[i:i + 1, s:s + 16])
                                               .copy())[0])]
        assert len(hit) == 1, i                             # a window of the clip, mirrored or not
        starts.add(hit[0][0])
        flips.add(hit[0][1])
    assert starts == {0, 1, 2, 3, 4} and flips == {False, True}
    again = Collate(clip_len=16, hflip=True, random_window=True, seed=1)(batch)["video"]
    assert torch.equal(aug, again)                          # seeded
    with pytest.raises(Exception, match="fewer than data.clip_len"):
        Collate(clip_len=24)(batch)


# ----------------------------------------------------------------------------- router validation
def test_router_validation_keeps_only_held_out_rewards(tmp_path):
    from workflows.relabel import _scores_table, compute_stats, run_relabel
    from workflows.train.loop import val_rewards

    ids = [f"c{i}" for i in range(10)]
    rewards = np.random.default_rng(0).random((10, 625)).astype(np.float32)
    table = pa.table({"clip_id": ids, "assignment": [0] * 10,
                      "reward": pa.array(rewards.tolist(), pa.list_(pa.float32()))})
    held = {"c2", "c7"}
    got = val_rewards(str(tmp_path / "none"), table, held)
    assert sorted(got) == ["c2", "c7"]
    np.testing.assert_array_equal(got["c7"], rewards[7])
    # a label-stage output: recomputed from scores/, again for the held-out clips only
    out = str(tmp_path / "L")
    storage.write_parquet(_scores_table(ids, {"mse": rewards}), f"{out}/scores/shard-00000.parquet")
    storage.write_bytes_atomic(f"{out}/stats.json", json.dumps(compute_stats(out, 500, 0, (8, 16, 32, 64, 128))).encode())
    rel = run_relabel(load_config(None, [f"label.output={out}", "label.metric=mse"]), quiet=True)
    lt = storage.read_table(rel.labels)
    assert sorted(val_rewards(rel.labels, lt, held)) == ["c2", "c7"]
    assert val_rewards(str(tmp_path / "none"), table.drop(["reward"]), held) is None


# ----------------------------------------------------------------------------- label statistics, naming
def _scored_run(out: str, seed: int, metrics=("mse",), scale: float = 1.0):
    from workflows.relabel import _scores_table

    rng = np.random.default_rng(seed)
    tables = {m: (scale * rng.random((6, 625))).astype(np.float32) for m in metrics}
    storage.write_parquet(_scores_table([f"{seed}-{i}" for i in range(6)], tables), f"{out}/scores/shard-00000.parquet")
    return tables


def test_label_run_takes_frozen_stats_and_records_them(tmp_path):
    from workflows.relabel import LabelError, read_stats, run_relabel, write_stats

    counts = (8, 16, 32, 64, 128)
    webvid, ucf, own = (str(tmp_path / n) for n in ("webvid", "ucf", "own"))
    _scored_run(webvid, 0)
    _scored_run(ucf, 1, scale=3.0)                          # another dataset: another distortion scale
    _scored_run(own, 1, scale=3.0)
    cfg = lambda out, **kw: load_config(None, [f"label.output={out}", "label.metric=mse", "label.stats_samples=500",
                                               *[f"label.{k}={v}" for k, v in kw.items()]])
    base = write_stats(webvid, cfg(webvid).label, counts)
    assert "source" not in base
    frozen = write_stats(ucf, cfg(ucf, stats=webvid).label, counts)       # a prefix holding stats.json
    computed = write_stats(own, cfg(own).label, counts)
    assert frozen["metrics"] == base["metrics"] != computed["metrics"]
    assert frozen["source"]["uri"].endswith("webvid/stats.json") and len(frozen["source"]["sha256"]) == 64
    rel = run_relabel(cfg(ucf, stats=f"{webvid}/stats.json"), quiet=True)  # or the file itself
    info = storage.read_done(rel.labels)
    assert info["stats"] == base["metrics"]["mse"] and "webvid/stats.json" in info["stats_source"]
    assert "computed" in storage.read_done(run_relabel(cfg(own), quiet=True).labels)["stats_source"]
    with pytest.raises(LabelError, match="other statistics"):   # labels already on their own scale
        run_relabel(cfg(own, stats=webvid, w_q=1.4, w_l=0.6), quiet=True)
    with pytest.raises(LabelError, match="token counts"):
        write_stats(str(tmp_path / "x"), cfg(str(tmp_path / "x"), stats=webvid).label, (4, 8, 16, 32, 64))
    with pytest.raises(LabelError, match="no statistics"):
        read_stats(str(tmp_path / "nowhere"))


def test_relabel_names_labels_by_the_metric_actually_used(tmp_path):
    from workflows.relabel import compute_stats, labels_uri, run_relabel

    out = str(tmp_path / "L")
    _scored_run(out, 0, metrics=("mse", "lpips_random_backbone"))
    storage.write_bytes_atomic(f"{out}/stats.json",
                               json.dumps(compute_stats(out, 500, 0, (8, 16, 32, 64, 128))).encode())
    cfg = load_config(None, [f"label.output={out}", "label.metric=lpips"])
    rel = run_relabel(cfg, quiet=True)
    assert rel.metric == "lpips_random_backbone"
    assert rel.labels.endswith("/labels/lpips_random_backbone-wq1.2-wl0.8")
    assert storage.read_done(rel.labels)["metric"] == "lpips_random_backbone"
    assert labels_uri(cfg.label) == rel.labels              # where the router looks for them
    assert not storage.exists(f"{out}/labels/lpips-wq1.2-wl0.8")


# ----------------------------------------------------------------------------- K600 frame prediction
# Tiny models: 16 frames of 32x32 in 4 blocks of 4, counts {2, 4, 8, 16}; the prefix (16, 4) stands for the
# paper's (512, 128): the largest count, then the middle one.
PREFIX = (16, 4)


@pytest.fixture(scope="module")
def tiny_fp_models():
    import torch

    from evatok.ar import ARConfig, ARModel
    from evatok.router import Router, RouterConfig
    from evatok.tokenizer import AdaptiveTokenizer, TokenizerConfig

    torch.manual_seed(0)
    counts = (2, 4, 8, 16)
    tok = AdaptiveTokenizer(TokenizerConfig(size=32, counts=counts, enc_dim=32, dec_dim=32, enc_layers=1,
                                            dec_layers=1, enc_heads=2, dec_heads=2, codebook_size=64)).eval()
    router = Router(RouterConfig(image_size=32, patch_size=(4, 8, 8), dim=32, depth=1, heads=2, mlp_dim=64,
                                 counts=counts)).eval()
    ar = ARModel(ARConfig(codebook_size=64, counts=counts, dim=32, n_layers=2, n_heads=2)).eval()
    return tok, router, ar


def clips(n, seed):
    import torch

    return torch.rand(n, 3, 16, 32, 32, generator=torch.Generator().manual_seed(seed)) - 0.5


def test_frame_prediction_prefix_is_the_conditioning_frames_blocks(tiny_fp_models):
    """5 conditioning frames padded to the first 2 blocks (8 frames), their counts fixed: the prefix
    depends on those 5 frames only and holds exactly those blocks' tokens."""
    import torch

    from evatok.ar_sampling import frame_prediction_prefix

    tok, router, ar = tiny_fp_models
    a = clips(2, 0)
    b = a.clone()
    b[:, :, 5:] = clips(2, 1)[:, :, 5:]                     # other frames after the 5th
    pa_, ca = frame_prediction_prefix(tok, router, a, ar.layout, cond_frames=5, prefix_counts=PREFIX)
    pb, _ = frame_prediction_prefix(tok, router, b, ar.layout, cond_frames=5, prefix_counts=PREFIX)
    assert torch.equal(pa_, pb)
    assert ca[:, :2].tolist() == [list(PREFIX)] * 2
    L = ar.layout
    assert pa_.shape == (2, 2 + 16 + 4)
    assert (pa_[:, 0] == L.length_base + 3).all() and (pa_[:, 17] == L.length_base + 1).all()
    # the codes are the tokenizer's, of the 5 frames padded by repeating the last one
    padded = torch.cat([a[:, :, :5], a[:, :, 4:5].expand(-1, -1, 11, -1, -1)], 2)
    codes, _ = tok.encode(padded, ca)
    assert torch.equal(pa_[:, 1:17], codes[:, :16]) and torch.equal(pa_[:, 18:], codes[:, 16:20])
    with pytest.raises(ValueError, match="do not fit"):
        frame_prediction_prefix(tok, router, a, ar.layout, cond_frames=9, prefix_counts=PREFIX)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_respects_the_conditioning_prefix(tiny_fp_models, use_cache):
    import torch

    from evatok.ar_sampling import frame_prediction_prefix, generate

    tok, router, ar = tiny_fp_models
    prefix, _ = frame_prediction_prefix(tok, router, clips(4, 2), ar.layout, cond_frames=5, prefix_counts=PREFIX)
    seq = generate(ar, [-1] * 4, generator=torch.Generator().manual_seed(0), use_cache=use_cache, prefix=prefix)
    codes, counts = ar.layout.parse_sequence(seq)           # well-formed
    assert counts[:, :2].tolist() == [list(PREFIX)] * 4     # the first blocks' lengths ...
    for b in range(4):                                      # ... and tokens are the prefix's
        assert torch.equal(codes[b][:20], torch.cat([prefix[b, 1:17], prefix[b, 18:22]]))
    assert torch.equal(seq[:, 1:1 + prefix.shape[1]], prefix)
    free = generate(ar, [-1] * 4, generator=torch.Generator().manual_seed(0), use_cache=use_cache)
    assert ar.layout.parse_sequence(free)[1][:, :2].tolist() != [list(PREFIX)] * 4   # sampled when not forced


def test_a_malformed_prefix_is_refused(tiny_fp_models):
    import torch

    from evatok.ar_sampling import generate, prefix_tokens

    tok, router, ar = tiny_fp_models
    L = ar.layout
    with pytest.raises(ValueError, match="structure"):       # a visual token where a length token must be
        generate(ar, [-1], prefix=torch.tensor([[5, 6]]))
    with pytest.raises(ValueError, match="structure"):       # a class token is never emitted
        generate(ar, [-1], prefix=torch.tensor([[L.class_base]]))
    with pytest.raises(ValueError, match="same counts"):
        prefix_tokens(L, torch.zeros(2, 64, dtype=torch.long), torch.tensor([[8, 8, 8, 8], [16, 8, 8, 8]]), 2)
    ok = prefix_tokens(L, torch.arange(16)[None], torch.tensor([[8, 8, 8, 8]]), 2)
    assert ok.tolist() == [[L.length_base + 2] + list(range(8)) + [L.length_base + 2] + list(range(8, 16))]


def test_ar_recipe_routes_frame_prediction_clips_with_the_fixed_prefix(tiny_fp_models, tmp_path):
    """train.prefix_counts: every training sequence's first blocks have the conditioning counts."""
    import io

    import torch

    from evatok.export import save_model
    from workflows.train.recipes import ARRecipe

    tok, router, ar = tiny_fp_models
    for name, model in (("tok", tok), ("router", router)):
        buf = io.BytesIO()
        save_model(model, buf, {})
        storage.write_bytes_atomic(str(tmp_path / f"{name}.pt"), buf.getvalue())
    over = ["train.model=ar", f"train.tokenizer={tmp_path / 'tok.pt'}", f"train.router={tmp_path / 'router.pt'}",
            "data.size=32"]
    batch = {"video": clips(6, 3)}
    free = ARRecipe(load_config(None, over), "cpu", classes=["a"]).prepare(batch)
    fixed = ARRecipe(load_config(None, over + [f"train.prefix_counts={list(PREFIX)}"]), "cpu", classes=["a"]).prepare(batch)
    assert fixed["counts"][:, :2].tolist() == [list(PREFIX)] * 6
    assert free["counts"][:, :2].tolist() != [list(PREFIX)] * 6     # the router alone picks others
    # the sequence it trains on starts with the conditioning blocks' tokens, as generation forces them
    from evatok.ar_sampling import prefix_tokens

    tokens, _, _ = ar.layout.build_sequence(fixed["codes"], fixed["counts"])
    assert torch.equal(tokens[:, 1:23], prefix_tokens(ar.layout, fixed["codes"], fixed["counts"], 2))
    # a codes dataset (evatok tokenize) is taken as written: one made without the prefix is refused
    recipe = ARRecipe(load_config(None, over + [f"train.prefix_counts={list(PREFIX)}"]), "cpu", classes=["a"])
    assert recipe.prepare({"codes": fixed["codes"], "counts": fixed["counts"]})["counts"] is fixed["counts"]
    with pytest.raises(ValueError, match="other counts"):
        recipe.prepare({"codes": free["codes"], "counts": free["counts"]})


# ----------------------------------------------------------------------------- through the real loop
@pytest.mark.slow
@pytest.mark.ray
def test_augmented_tokenizer_and_router_validation_train_for_real(ray_local, tmp_path):
    """Ray Train + DeepSpeed: a proxy on 20-frame clips with random 16-frame windows, flips and the GAN
    (its own betas); a router whose held-out reward percentile comes from the held-out rewards only."""
    from train_fixtures import write_clips, write_labels

    from workflows.train import run_training

    tiny = ["data.clip_len=16", "data.size=64", "train.num_workers=2", "train.batch_size=4", "train.lr=0.001",
            "train.cpus_per_worker=0.5", "mlflow.system_metrics=false", "train.checkpoint_every=100",
            f"work_dir={tmp_path / 'runs'}", "name=aug"]
    long_clips = write_clips(str(tmp_path / "long"), n=16, clip_len=20)
    proxy = run_training(load_config(None, tiny + [
        "train.model=proxy", "train.steps=3", f"train.data={long_clips}", "train.hflip=true",
        "train.random_window=true", "train.disc_start=0", "train.disc_betas=[0.5, 0.99]", "train.warmup_steps=2"]))
    assert proxy.steps == 3 and proxy.metrics["val/clips"] > 0    # held out: centre windows of 16 frames
    clips = write_clips(str(tmp_path / "short"), n=16)
    t = storage.read_table(f"{clips}/clips", columns=["clip_id", "label"])
    labels = write_labels(str(tmp_path / "labels"), t.column("clip_id").to_pylist(), t.column("label").to_pylist())
    router = run_training(load_config(None, tiny + [
        "train.model=router", "train.steps=2", f"train.data={clips}", f"train.labels={labels}", "train.val_every=4"]))
    assert "val/reward_percentile" in router.metrics and router.metrics["val/clips"] < 16


@pytest.mark.slow
@pytest.mark.ray
def test_bf16_tokenizer_with_every_pretrained_part_trains(ray_local, tmp_path):
    """The paper's precision with the paper's losses: DeepSpeed bf16 (ZeRO-2) casts the frozen V-JEPA2 of
    the alignment loss and the frozen VideoMAE of the semantic discriminator; both must run on it (tiny
    random checkpoints; LPIPS needs real ImageNet weights, so it is left out here)."""
    import torch
    from test_semantic import _tiny
    from train_fixtures import write_clips

    from workflows.train import run_training

    dirs = {}
    for kind in ("videomae", "vjepa2"):
        torch.manual_seed(0)
        dirs[kind] = tmp_path / kind
        _tiny(kind).save_pretrained(dirs[kind])
    data = write_clips(str(tmp_path / "clips"), n=8)
    res = run_training(load_config(None, [
        "data.clip_len=16", "data.size=64", "train.num_workers=2", "train.batch_size=4", "train.lr=0.001",
        "train.cpus_per_worker=0.5", "mlflow.system_metrics=false", "train.checkpoint_every=100",
        f"work_dir={tmp_path / 'runs'}", "name=bf16", "train.model=proxy", "train.steps=2", f"train.data={data}",
        "train.disc_start=0", "train.deepspeed.zero_stage=2", "train.deepspeed.precision=bf16",
        f"train.align_encoder={dirs['vjepa2']}", f"train.semantic_disc_encoder={dirs['videomae']}",
        "pretrained=[train.align_encoder, train.semantic_disc_encoder]"]))
    assert res.steps == 2 and math.isfinite(res.metrics["fixed_loss_end"])
