"""Skipping by content (no Ray): relative URIs made absolute on the driver, content digests that see a
same-size change, the skip / resume / refuse / force protocol, the pipeline's default layout."""
from __future__ import annotations

import json
import os

import pytest

from workflows import fingerprint as F
from workflows import storage
from workflows.config import ConfigError, absolute_uris, load_config


# ----------------------------------------------------------------------------- relative URIs
def test_relative_uris_become_absolute_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("runs/tiny/proxy.pt") == str(tmp_path / "runs/tiny/proxy.pt")
    assert storage.absolute("file://runs/x") == str(tmp_path / "runs/x")
    assert storage.absolute("s3://bucket/runs/x") == "s3://bucket/runs/x"
    assert storage.absolute("") == ""
    cfg = absolute_uris(load_config(None, [
        "work_dir=runs/w", "train.output=runs/tiny/proxy.pt", "label.proxy=p.pt", "ingest.source=s3://b/videos",
        "train.router=~/r.pt", "mlflow.tracking_uri=sqlite:///m/mlflow.db"]))
    assert cfg.work_dir == str(tmp_path / "runs/w")
    assert cfg.train.output == str(tmp_path / "runs/tiny/proxy.pt")
    assert cfg.label.proxy == str(tmp_path / "p.pt")
    assert cfg.ingest.source == "s3://b/videos"
    assert cfg.train.router == os.path.expanduser("~/r.pt")
    assert cfg.mlflow.tracking_uri == f"sqlite:///{tmp_path}/m/mlflow.db"
    assert absolute_uris(cfg) == cfg  # idempotent


# ----------------------------------------------------------------------------- digests
def test_same_size_same_name_is_another_digest(tmp_path):
    """The old label fingerprint took (uri, size, etag): a retrained proxy of the same size at the same
    local path looked identical. Content digests do not."""
    p = tmp_path / "proxy.pt"
    p.write_bytes(b"a" * 1000)
    first = storage.sha256(str(p))
    p.write_bytes(b"b" * 1000)
    os.utime(p, ns=(1, 1))  # even a reset mtime must not hide it from a fresh process's view
    storage._SHA_CACHE.clear()
    assert storage.sha256(str(p)) != first


def test_dataset_digest_covers_data_files_only(tmp_path):
    d = tmp_path / "clips"
    d.mkdir()
    (d / "shard-00000.parquet").write_bytes(b"x" * 64)
    (d / "shard-00001.parquet").write_bytes(b"y" * 64)
    base = F.dataset_digest(str(d))
    (d / "_shards").mkdir()
    (d / "_shards" / "shard-00000.parquet").write_bytes(b"marker")
    (d / ".tmp-shard.parquet").write_bytes(b"partial")
    assert F.dataset_digest(str(d)) == base  # markers and temp files are not data
    (d / "shard-00001.parquet").write_bytes(b"z" * 64)  # same size, same name, other bytes
    storage._SHA_CACHE.clear()
    assert F.dataset_digest(str(d)) != base
    with pytest.raises(storage.StorageNotFound):
        F.dataset_digest(str(tmp_path / "nothing"))


# ----------------------------------------------------------------------------- the protocol
def _fp(steps=4, digest="d1", output="/o/model.pt"):
    return F.Fingerprint("train proxy", {"train.steps": steps}, {"data": {"uri": "/d", "digest": digest}}, output)


def test_decide_run_resume_skip_refuse_force(tmp_path):
    place = str(tmp_path / "rec")
    assert F.decide("proxy", _fp(), place).action == "run"
    F.write_claim(place, _fp(), ray_run="tiny-proxy")
    d = F.decide("proxy", _fp(), place)
    assert d.resume and d.claim["ray_run"] == "tiny-proxy"
    # an unfinished run with other settings is refused, naming the setting
    with pytest.raises(F.StaleOutputError, match=r"train.steps 4 -> 5.*--force"):
        F.decide("proxy", _fp(steps=5), place)
    out = tmp_path / "model.pt"
    out.write_bytes(b"model")
    fp = _fp(output=str(out))
    F.write_claim(place, fp)
    storage.mark_done(place, {"fingerprint": fp.to_json(),
                              "outputs": {"model": {**F.file_input(str(out)), "kind": "file"}}})
    assert F.decide("proxy", fp, place).skip
    # other data under the same name: refused with what changed, never reported done
    other = _fp(digest="d2", output=str(out))
    with pytest.raises(F.StaleOutputError, match="input data changed"):
        F.decide("proxy", other, place)
    d = F.decide("proxy", other, place, force=True)
    assert d.fresh and any("input data changed" in r for r in d.reasons)
    # the output itself was modified since: not done either
    out.write_bytes(b"tampered")
    storage._SHA_CACHE.clear()
    with pytest.raises(F.StaleOutputError, match="was modified"):
        F.decide("proxy", fp, place)
    # a record from before fingerprints: stale, not done
    storage.remove(storage.join(place, F.CLAIM))
    storage.mark_done(place, {"steps": 4})
    with pytest.raises(F.StaleOutputError, match="no fingerprint recorded"):
        F.decide("proxy", fp, place)


def test_stage_marker_without_our_record_resumes(tmp_path):
    """The stage published its own _DONE.json and the process died before ours: the claim decides."""
    place = str(tmp_path / "labels")
    F.write_claim(place, _fp())
    storage.mark_done(place, {"clips": 3})
    assert F.decide("label", _fp(), place).resume


def test_defaults_only_changes_nothing_in_the_fingerprint():
    """A setting at its default is left out: adding a new field (at a default that keeps the old
    behaviour) makes nothing stale; setting it does."""
    from workflows.config import LabelConfig

    lc = LabelConfig()
    assert F.section(lc, "label") == {}
    lc.w_q = 2.0
    assert F.section(lc, "label") == {"label.w_q": 2.0}


def test_label_fingerprint_sees_a_same_size_proxy(tmp_path):
    from train_fixtures import write_clips

    write_clips(str(tmp_path / "data"), n=2, size=32)
    proxy = tmp_path / "proxy.pt"
    proxy.write_bytes(b"\x00" * 4096)
    cfg = load_config(None, [f"label.clips={tmp_path / 'data'}", f"label.proxy={proxy}",
                             f"label.output={tmp_path / 'label'}", "label.metric=mse"])
    a = F.label_fingerprint(cfg)
    proxy.write_bytes(b"\x01" * 4096)
    storage._SHA_CACHE.clear()
    b = F.label_fingerprint(cfg)
    assert a.hash != b.hash and b.diff(a.to_json()) == [
        f"input proxy changed (digest {a.inputs['proxy']['digest'][:12]} -> {b.inputs['proxy']['digest'][:12]})"]


# ----------------------------------------------------------------------------- the layout
def test_plan_defaults_everything_under_work_dir(tmp_path, monkeypatch):
    from workflows.run import resolve

    monkeypatch.chdir(tmp_path)
    from conftest import REPO

    plan = resolve(REPO / "configs" / "tiny.yaml", ["work_dir=w", "router.output=elsewhere/r.pt", "proxy.steps=3"])
    w = str(tmp_path / "w")
    assert plan.synthetic and plan.base.ingest.source == f"{w}/videos/manifest.csv"
    assert plan.base.ingest.output == f"{w}/data"
    assert plan.base.label.proxy == f"{w}/proxy/proxy.pt" and plan.base.label.output == f"{w}/label"
    m = plan.models
    router_steps = load_config(REPO / "configs" / "tiny.yaml", ["train.model=router"]).train.steps
    assert m["proxy"].train.steps == 3 and m["router"].train.steps == router_steps  # sections stay per model
    assert m["router"].train.output == str(tmp_path / "elsewhere/r.pt")
    assert m["router"].train.labels == f"{w}/label/labels/{plan.base.label.metric}-wq{plan.base.label.w_q:g}-wl" \
                                       f"{plan.base.label.w_l:g}"
    assert m["final"].train.router == m["ar"].train.router == str(tmp_path / "elsewhere/r.pt")
    assert m["ar"].train.tokenizer == f"{w}/final/final.pt"
    assert all(c.train.data == f"{w}/data" for n, c in m.items() if n != "ar")
    assert m["ar"].train.data == f"{w}/codes/codes"  # the AR model trains on the tokenize stage's codes
    assert plan.base.evaluate.ar == f"{w}/ar/ar.pt"  # generation metrics of the pipeline's AR model
    assert resolve(None, ["work_dir=w", "evaluate.ar=none"]).base.evaluate.ar == ""  # or none at all
    # only the word itself: a model file that happens to be called none is still that file
    assert resolve(None, ["work_dir=w", "evaluate.ar=models/none"]).base.evaluate.ar == str(tmp_path / "models/none")
    with pytest.raises(ConfigError, match="per-model outputs"):
        resolve(None, ["work_dir=w", "train.output=one.pt"])
    with pytest.raises(ConfigError, match="both be exported"):
        resolve(None, ["work_dir=w", "proxy.output=one.pt", "ar.output=one.pt"])
    # `evatok train router ... train.output=r.pt`: the file of that model; the others keep theirs
    one = resolve(None, ["work_dir=w", "train.output=r.pt"], target="router").models
    assert one["router"].train.output == str(tmp_path / "r.pt") == one["final"].train.router
    assert one["proxy"].train.output == f"{w}/proxy/proxy.pt"


def test_claim_and_record_are_plain_json(tmp_path):
    place = str(tmp_path / "p")
    F.write_claim(place, _fp(), ray_run="r")
    claim = json.loads((tmp_path / "p" / F.CLAIM).read_text())
    assert claim["ray_run"] == "r" and claim["fingerprint"]["hash"] == _fp().hash
    rec = F.update_record(place, {"a": 1})
    assert rec == {"a": 1} and F.update_record(place, {"b": 2}) == {"a": 1, "b": 2}


def test_relabel_output_is_adopted_by_the_pipeline(tmp_path, monkeypatch):
    """`evatok relabel` for other weights, from scores the label stage made: `run` then finds those
    labels done (same clips, proxy and scoring settings), instead of refusing them."""
    import numpy as np
    from typer.testing import CliRunner

    from conftest import REPO
    from train_fixtures import write_clips
    from workflows.cli import app
    from workflows.relabel import _scores_table, compute_stats
    from workflows.run import LabelStage, resolve

    monkeypatch.chdir(tmp_path)
    write_clips(str(tmp_path / "w" / "data"), n=3)
    (tmp_path / "w" / "proxy").mkdir(parents=True)
    (tmp_path / "w" / "proxy" / "proxy.pt").write_bytes(b"proxy bytes")
    ids = storage.read_table(str(tmp_path / "w" / "data" / "clips")).column("clip_id").to_pylist()
    rng = np.random.default_rng(0)
    out = str(tmp_path / "w" / "label")
    storage.write_parquet(_scores_table(ids, {m: rng.random((3, 625)).astype(np.float32) for m in ("mse", "psnr")}),
                          f"{out}/scores/shard-00000.parquet")
    storage.write_bytes_atomic(f"{out}/stats.json", json.dumps(compute_stats(out, 500, 0, (8, 16, 32, 64, 128))).encode())
    recipe, base = REPO / "configs" / "tiny.yaml", ["work_dir=w"]
    stage = LabelStage()
    plan = resolve(recipe, base)
    cfg = stage.config(plan)
    from workflows.relabel import run_relabel

    run_relabel(cfg, quiet=True)  # what the label stage wrote for the recipe's weights, with its record:
    fp = stage.fingerprint(cfg, plan)
    F.update_record(stage.place(cfg), {"fingerprint": fp.to_json(), "outputs": {"labels": F.dataset_input(stage.place(cfg))}})
    r = CliRunner().invoke(app, ["relabel", "-c", str(recipe), *base, "label.w_q=2.0"])
    assert r.exit_code == 0, r.output
    plan2 = resolve(recipe, base + ["label.w_q=2.0"])
    cfg2 = stage.config(plan2)
    assert stage.place(cfg2).endswith(f"labels/mse-wq2-wl{cfg2.label.w_l:g}")
    assert F.decide("label", stage.fingerprint(cfg2, plan2), stage.place(cfg2)).skip


def test_a_second_model_of_one_kind_is_told_how_to_train_beside_the_first(tmp_path, monkeypatch):
    """A training run's record lives under its run name (work_dir/train/<name>-<model>), not beside its
    model file: training a second proxy on other data into another file is refused (it would replace the
    first's record), and the refusal says how to keep both (another run name), which then runs."""
    from conftest import REPO
    from train_fixtures import write_clips
    from workflows.run import Runner, TrainStage, resolve

    monkeypatch.chdir(tmp_path)
    write_clips(str(tmp_path / "w" / "data"), n=2)
    write_clips(str(tmp_path / "other"), n=2, seed=7)
    first = resolve(REPO / "configs" / "tiny.yaml", ["work_dir=w"], target="proxy")
    stage = TrainStage("proxy")
    cfg = stage.config(first)
    F.write_claim(stage.place(cfg), F.train_fingerprint(cfg), ray_run="tiny-proxy")  # the first, unfinished
    second = resolve(REPO / "configs" / "tiny.yaml", ["work_dir=w", "train.data=other", "train.output=p2.pt"],
                     target="proxy")
    with pytest.raises(F.StaleOutputError, match=r"name=tiny-2 .*w/train/tiny-proxy"):
        Runner(second, parent=False).run_stage(stage)
    beside = resolve(REPO / "configs" / "tiny.yaml", ["name=tiny-2", "work_dir=w", "train.data=other",
                                                       "train.output=p2.pt"], target="proxy")
    bcfg = stage.config(beside)
    assert F.decide("train proxy", F.train_fingerprint(bcfg), stage.place(bcfg)).action == "run"


def test_training_data_may_be_a_stage_output_prefix(tmp_path):
    """`train.data=runs/x/codes-u16` (a tokenize output: codes/ and errors/) reads codes/, not the error
    rows beside them; an ingest output reads clips/."""
    import pyarrow as pa

    from workflows.train.data import parquet_prefix

    for sub in ("codes", "errors"):
        storage.write_parquet(pa.table({"clip_id": ["a"]}), str(tmp_path / "t" / sub / "shard-00000.parquet"))
    storage.write_parquet(pa.table({"clip_id": ["a"]}), str(tmp_path / "i" / "clips" / "shard-00000.parquet"))
    assert parquet_prefix(str(tmp_path / "t")) == str(tmp_path / "t" / "codes")
    assert parquet_prefix(str(tmp_path / "i")) == str(tmp_path / "i" / "clips")
    assert parquet_prefix(str(tmp_path / "t" / "codes")) == str(tmp_path / "t" / "codes")


def test_unrecorded_checkpoints_are_never_resumed(tmp_path):
    """With no record of a training run, checkpoints already under ray_results/<name> (the record was
    deleted, or another work_dir shares ray_results) are of unknown inputs: the run starts fresh under
    <name>-<fingerprint> instead of resuming them (which returned the old model with no step trained)."""
    from types import SimpleNamespace

    from workflows.train.loop import ray_run_name

    rr = str(tmp_path / "ray_results")
    none = SimpleNamespace(resume=False, fresh=False, claim=None)
    assert ray_run_name("study-ar", "abc123", none, rr) == "study-ar"  # nothing there: the plain name
    (tmp_path / "ray_results" / "study-ar" / "checkpoint_000001").mkdir(parents=True)
    (tmp_path / "ray_results" / "study-ar" / "checkpoint_000001" / "loop_state.json").write_text("{}")
    assert ray_run_name("study-ar", "abc123", none, rr) == "study-ar-abc123"
    # a resume continues the run its claim names; a run made otherwise always starts fresh
    assert ray_run_name("study-ar", "abc123", SimpleNamespace(resume=True, fresh=False, claim={"ray_run": "study-ar"}),
                        rr) == "study-ar"
    assert ray_run_name("x", "abc123", SimpleNamespace(resume=False, fresh=True, claim=None), rr) == "x-abc123"
