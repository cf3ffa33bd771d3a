"""tokenize: codes written per clip decode to the tokenizer's own reconstruction; every mode; error rows;
the Ray stage (budget mode, markers, resume) on a real local Ray, and ``train ar``'s reading of codes."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from evatok.export import save_model
from evatok.router import Router, RouterConfig
from evatok.tokenizer import AdaptiveTokenizer, TokenizerConfig
from evatok.video import to_tensor
from test_routing import COUNTS, MICRO_ROUTER, MICRO_TOK
from train_fixtures import write_clips
from workflows import storage
from workflows.clips import frames_from_table
from workflows.config import load_config
from workflows.tokenize import CODES_SCHEMA, Encoder, TokenizeError, codes_uri, run_tokenize

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def save(model, uri: str) -> str:
    buf = io.BytesIO()
    save_model(model, buf, meta={"note": "random init, tests"})
    storage.write_bytes_atomic(uri, buf.getvalue())
    return uri


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    tok = AdaptiveTokenizer(TokenizerConfig(**MICRO_TOK)).eval()
    router = Router(RouterConfig(**MICRO_ROUTER)).eval()
    return tok, router, save(tok, str(d / "final.pt")), save(router, str(d / "router.pt"))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Two clips shards of 32x32 synthetic clips (each clip its own video)."""
    root = tmp_path_factory.mktemp("data")
    write_clips(str(root / "a"), n=10, size=32, seed=0)
    write_clips(str(root / "b"), n=6, size=32, seed=1)
    out = root / "data" / "clips"
    out.mkdir(parents=True)
    (out / "shard-00000.parquet").write_bytes((root / "a" / "clips" / "shard-00000.parquet").read_bytes())
    (out / "shard-00001.parquet").write_bytes((root / "b" / "clips" / "shard-00000.parquet").read_bytes())
    return str(root / "data")


def _video(table):
    return to_tensor(torch.from_numpy(np.array(frames_from_table(table))))


def check_decodes(tok, clips_table: pa.Table, codes: pa.Table):
    """Every row's codes decode to tokenizer.reconstruct(clip, counts), and equal a solo encode."""
    by_id = {c: i for i, c in enumerate(clips_table.column("clip_id").to_pylist())}
    x = _video(clips_table)
    for row in codes.to_pylist():
        xi = x[by_id[row["clip_id"]]][None]
        counts = torch.tensor(row["counts"])[None]
        assert len(row["codes"]) == row["total_tokens"] == sum(row["counts"])
        with torch.no_grad():
            solo, _ = tok.encode(xi, counts)
            decoded = tok.decode(torch.tensor(row["codes"])[None], counts)
            recon = tok.reconstruct(xi, counts)
        assert solo[0].tolist() == row["codes"]
        assert torch.allclose(decoded, recon, atol=1e-5)


def test_encoder_every_mode(models, clips, tmp_path):
    tok, router, tok_uri, router_uri = models
    table = storage.read_table(clips + "/clips/shard-00000.parquet")
    x = _video(table)
    # router: the router's argmax per clip, codes decode to the reconstruction
    codes, errors = Encoder(tok_uri, "router", router=router_uri, batch_size=3).encode_table(table)
    assert codes.schema.remove_metadata() == CODES_SCHEMA and errors.num_rows == 0 and codes.num_rows == 10
    assert codes.column("assignment").to_pylist() == router.predict(x).tolist()
    assert codes.column("label").to_pylist() == table.column("label").to_pylist()
    check_decodes(tok, table, codes)
    # uniform:4: every block 4 tokens
    codes, _ = Encoder(tok_uri, "uniform:4").encode_table(table)
    assert all(c == [4, 4, 4, 4] for c in codes.column("counts").to_pylist())
    check_decodes(tok, table, codes)
    # budget: lambda 0 is the router, a high lambda the shortest assignment
    codes, _ = Encoder(tok_uri, "budget:20", router=router_uri, lam=0.0).encode_table(table)
    assert codes.column("assignment").to_pylist() == router.predict(x).tolist()
    codes, _ = Encoder(tok_uri, "budget:20", router=router_uri, lam=5.0).encode_table(table)
    assert set(codes.column("total_tokens").to_pylist()) == {4}
    # labels: the given assignments; a clip without one is an error row, not a failure
    ids = table.column("clip_id").to_pylist()
    labels = str(tmp_path / "labels")
    storage.write_parquet(pa.table({"clip_id": ids[1:], "assignment": pa.array([7 * i for i in range(9)], pa.int32())}),
                          labels + "/shard-00000.parquet")
    codes, errors = Encoder(tok_uri, "labels", labels=labels).encode_table(table)
    assert codes.column("clip_id").to_pylist() == ids[1:]
    assert codes.column("assignment").to_pylist() == [7 * i for i in range(9)]
    assert errors.column("reason").to_pylist() == ["no_label"] and errors.column("clip_id").to_pylist() == [ids[0]]
    check_decodes(tok, table, codes)
    with pytest.raises(TokenizeError, match="lambda"):
        Encoder(tok_uri, "budget:20", router=router_uri)
    with pytest.raises(TokenizeError, match="router"):
        Encoder(tok_uri, "router")


def test_wrong_shape_is_an_error_row(models, tmp_path):
    tok, _, tok_uri, _ = models
    write_clips(str(tmp_path / "big"), n=2, size=64)
    table = storage.read_table(str(tmp_path / "big" / "clips"))
    codes, errors = Encoder(tok_uri, "uniform:2").encode_table(table)
    assert codes.num_rows == 0 and errors.column("reason").to_pylist() == ["bad_shape"] * 2


@pytest.mark.ray
def test_run_tokenize_budget_on_ray(ray_local, models, clips, tmp_path):
    """Real Ray actors: budget mode fits lambda on the training videos once (calibration.json), writes
    codes/ + errors/ + markers + _DONE.json; a rerun does nothing; the codes decode to reconstructions."""
    tok, router, tok_uri, router_uri = models
    out = str(tmp_path / "codes")
    cfg = load_config(None, [f"tokenize.clips={clips}", f"tokenize.tokenizer={tok_uri}", f"tokenize.router={router_uri}",
                             f"tokenize.output={out}", "tokenize.mode=budget:24", "tokenize.val_every=4",
                             "tokenize.batch_size=4", "tokenize.num_actors=2"])
    s = run_tokenize(cfg, quiet=True)
    assert (s.clips, s.errors, s.shards, s.shards_written) == (16, 0, 2, 2)
    cal = json.loads(storage.read_bytes(out + "/calibration.json"))
    assert cal["target"] == 24.0 and cal["lam"] == s.lam and 0 < cal["clips"] < 16  # held-out videos excluded
    done = storage.read_done(out)
    assert done["mode"] == "budget:24" and done["calibration"]["lam"] == s.lam
    assert sorted(storage.list_parquet(codes_uri(out)))[-1].endswith("codes/shard-00001.parquet")
    codes = storage.read_table(codes_uri(out))
    assert codes.num_rows == 16 and abs(s.mean_tokens - float(np.mean(codes.column("total_tokens")))) < 1e-9
    table = storage.read_table(clips + "/clips")
    check_decodes(tok, table, codes)
    # the same lambda routes each clip as in the stage
    from evatok import routing

    lp = routing.router_log_probs(router, _video(table))
    want = dict(zip(table.column("clip_id").to_pylist(), routing.budget_choice(lp, router.space.totals, s.lam).tolist()))
    assert all(want[c] == a for c, a in zip(codes.column("clip_id").to_pylist(), codes.column("assignment").to_pylist()))
    again = run_tokenize(cfg, quiet=True)
    assert again.shards_written == 0 and again.shards_skipped == 2 and again.lam == s.lam and again.clips == 16


def _numpy_batch(table: pa.Table, columns) -> dict:
    return {k: np.asarray(table.column(k).to_pylist(), dtype=object) for k in columns}


def test_ar_recipe_reads_codes_as_it_would_encode_clips(models, clips):
    """The AR recipe's inputs from a codes dataset (router mode) equal what it computes from the clips with
    the same router and tokenizer; with codes it needs no router at all."""
    from workflows.tokenize import CODE_COLUMNS
    from workflows.train.data import Collate
    from workflows.train.recipes import make_recipe

    tok, router, tok_uri, router_uri = models
    table = storage.read_table(clips + "/clips/shard-00000.parquet")
    codes, _ = Encoder(tok_uri, "router", router=router_uri).encode_table(table)
    classes = sorted(set(table.column("label").to_pylist()))
    clip_batch = _numpy_batch(table, ["clip_id", "frames", "label"])
    clip_batch["shape"] = np.asarray(table.column("shape").to_pylist())
    collate = Collate(classes)
    cfg = load_config(None, ["train.model=ar", f"train.tokenizer={tok_uri}", f"train.router={router_uri}"])
    recipe = make_recipe(cfg, torch.device("cpu"), classes=classes)
    a = recipe.prepare(collate(clip_batch))
    b = recipe.prepare(collate(_numpy_batch(codes, CODE_COLUMNS)))
    assert torch.equal(a["counts"], b["counts"]) and torch.equal(a["labels"], b["labels"])
    assert a["codes"].shape == b["codes"].shape and torch.equal(a["codes"], b["codes"])
    net = recipe.build()
    loss, logs, _ = recipe.train_loss(net, b, 0)
    assert torch.isfinite(loss)
    no_router = make_recipe(load_config(None, ["train.model=ar", f"train.tokenizer={tok_uri}"]), torch.device("cpu"),
                            classes=classes)
    assert torch.equal(no_router.prepare(collate(_numpy_batch(codes, CODE_COLUMNS)))["codes"], b["codes"])
    assert "upstream.router_run_id" not in no_router.upstream()
    with pytest.raises(ValueError, match="router"):
        no_router.prepare(collate(clip_batch))


@pytest.mark.ray
@pytest.mark.slow
def test_train_ar_on_codes_with_ray_train(ray_local, models, clips, tmp_path):
    """``train ar`` with train.data = a tokenize output's codes/: Ray Train + DeepSpeed reads the codes."""
    from workflows.train import run_training

    tok, router, tok_uri, router_uri = models
    out = str(tmp_path / "codes")
    run_tokenize(load_config(None, [f"tokenize.clips={clips}", f"tokenize.tokenizer={tok_uri}",
                                    f"tokenize.router={router_uri}", f"tokenize.output={out}", "tokenize.num_actors=1"]),
                 quiet=True)
    res = run_training(load_config(None, [
        f"work_dir={tmp_path / 'runs'}", "name=t", "train.model=ar", "train.steps=3", f"train.data={codes_uri(out)}",
        f"train.tokenizer={tok_uri}", f"train.router={router_uri}", "train.batch_size=4", "train.cpus_per_worker=0.5",
        "train.checkpoint_every=100", "data.size=32"]))
    assert res.steps == 3 and res.metrics["fixed_loss_end"] < res.metrics["fixed_loss_start"]


def test_calibration_split_is_a_hash_sample_not_the_first_shard(clips):
    """Budget calibration clips are a deterministic random sample of the training videos' clips (the
    smallest salted SHA-256 of the clip id), read from every shard, not the first N in shard order (a
    biased sample whenever shards follow the input's order: the study's lambda missed its budget by 20%)."""
    import hashlib

    from workflows.tokenize import calibration_split
    from workflows.train.data import held_out

    ids = storage.read_table(clips + "/clips", columns=["clip_id", "video_id"])
    cids, vids = ids.column("clip_id").to_pylist(), ids.column("video_id").to_pylist()
    held = held_out(vids, 4)
    train = [c for c, v in zip(cids, vids) if v not in held]
    key = lambda c: hashlib.sha256(f"calibration:{c}".encode()).digest()  # noqa: E731
    got = calibration_split(clips, 4, 5).column("clip_id").to_pylist()
    assert len(got) == 5 and not {v for c, v in zip(cids, vids) if c in got} & held
    assert set(got) == set(sorted(train, key=key)[:5])
    assert got != train[:5]  # this sample differs from the first five in shard order
    assert calibration_split(clips, 4, 5).column("clip_id").to_pylist() == got  # deterministic
    assert calibration_split(clips, 4, 100).num_rows == len(train)
