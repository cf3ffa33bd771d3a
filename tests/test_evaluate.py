"""evaluate on a micro run: a briefly trained micro tokenizer (final and proxy), a random micro router,
labels made by the label stage's own scorer and relabel; the table, its protocol, the plots, MLflow."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evatok.evaluation import quick_train
from evatok.tokenizer import AdaptiveTokenizer, TokenizerConfig
from test_routing import MICRO_TOK, micro_router
from test_tokenize import _video, save
from train_fixtures import write_clips
from workflows import storage
from workflows.config import load_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    """24 clips (each its own video), final.pt (trained 100 steps), router.pt, label/ (scores, stats and
    labels of the held-out clips at val_every=3 and 4 others: the label stage's scorer and relabel)."""
    from workflows.label import Scorer
    from workflows.relabel import compute_stats, run_relabel
    from workflows.train.data import held_out

    root = tmp_path_factory.mktemp("run")
    data = write_clips(str(root / "data"), n=24, size=32)
    table = storage.read_table(data + "/clips")
    torch.manual_seed(0)
    tok = quick_train(AdaptiveTokenizer(TokenizerConfig(**MICRO_TOK)), _video(table), steps=100, lr=3e-3)
    save(tok, str(root / "final.pt"))
    save(micro_router(), str(root / "router.pt"))
    label = str(root / "label")
    held = held_out(table.column("video_id").to_pylist(), 3)
    scored = [i for i, v in enumerate(table.column("video_id").to_pylist()) if v in held] + [0, 1, 2, 3]
    scores = Scorer(str(root / "final.pt"), batch_size=8).score(table.take(sorted(set(scored))))
    storage.write_parquet(scores, label + "/scores/shard-00000.parquet")
    stats = compute_stats(label, 2000, 0, MICRO_TOK["counts"])
    storage.write_bytes_atomic(label + "/stats.json", json.dumps(stats).encode())
    rel = run_relabel(load_config(None, [f"label.output={label}", "label.metric=mse", "label.w_q=1.4",
                                         "label.w_l=0.6"]), quiet=True)
    return root, data, tok, rel.labels


def eval_cfg(root, data, labels, **kw):
    over = [f"work_dir={root}", f"evaluate.clips={data}", f"evaluate.tokenizer={root / 'final.pt'}",
            f"evaluate.router={root / 'router.pt'}", f"evaluate.labels={labels}", f"evaluate.output={root / 'eval'}",
            "evaluate.val_every=3", "evaluate.max_clips=8", "evaluate.budgets=[16,32]", "evaluate.grid_clips=2",
            "evaluate.calibration_clips=64"]
    return load_config(None, over + [f"evaluate.{k}={v}" for k, v in kw.items()])


def test_evaluate_table_plots_and_protocol(micro_run):
    """The table (every method, its protocol), re-measured numbers, the files (MLflow: the runner test)."""
    from workflows.evaluate import run_evaluate
    from workflows.train.data import held_out

    root, data, tok, labels = micro_run
    res = run_evaluate(eval_cfg(root, data, labels, max_clips=8), quiet=True)
    t = res.table.to_pylist()
    by = {(r["method"], r["setting"]): r for r in t}
    kinds = [r["method"] for r in t]
    assert kinds[:5] == ["uniform"] * 5 and {"router", "budget", "labels", "best_uniform", "threshold"} <= set(kinds)
    assert kinds.count("budget") == 2 and kinds.count("threshold") >= 3
    # the held-out split is by video, as the tokenizers': exactly the videos hashing to 0 mod 3, first 8 clips
    table = storage.read_table(data + "/clips")
    vids = table.column("video_id").to_pylist()
    held = held_out(vids, 3)
    want = sorted(c for c, v in zip(table.column("clip_id").to_pylist(), vids) if v in held)[:8]
    assert res.protocol["clips"] == len(want) == len(t[0:1]) * len(want)
    clip_rows = storage.read_table(res.files["assignments.parquet"]).to_pylist()
    assert sorted({r["clip_id"] for r in clip_rows}) == want
    # every row carries its protocol
    for r in t:
        assert r["protocol.clips"] == len(want) and r["protocol.frames"] == 16 and r["protocol.size"] == 32
        assert len(r["protocol.split_digest"]) == 64 and len(r["protocol.tokenizer_sha256"]) == 64
    # uniform rows: tokens = 4 x count, PSNR re-measured here by the tokenizer itself
    held_table = table.filter(np.isin(np.array(table.column("clip_id").to_pylist()), want))
    x = _video(held_table.take(np.argsort(held_table.column("clip_id").to_pylist())))
    with torch.no_grad():
        recon = tok.reconstruct(x, torch.tensor([8, 8, 8, 8])).clamp(-0.5, 0.5)
    mse = ((recon - x) ** 2).mean((1, 3, 4))  # [N, T]
    assert by[("uniform", "8")]["mean_tokens"] == 32
    assert abs(by[("uniform", "8")]["psnr"] - float((-10 * torch.log10(mse)).mean())) < 1e-3
    assert by[("uniform", "16")]["psnr"] > by[("uniform", "1")]["psnr"]   # the briefly trained curve rises
    # labels are the reward argmax: percentile 100; the router row has top-1 / top-5 and a percentile
    assert abs(by[("labels", "")]["reward_percentile"] - 100.0) < 1e-6
    assert by[("best_uniform", "")]["reward_percentile"] <= 100.0
    r = by[("router", "")]
    assert 0 <= r["top1"] <= r["top5"] <= 1 and 0 <= r["reward_percentile"] <= 100
    # budgets: lambda recorded, calibrated on training videos close to the target; more budget, more tokens
    b16, b32 = by[("budget", "16")], by[("budget", "32")]
    assert abs(b16["calibration_mean_tokens"] - 16) / 16 < 0.1 and b16["lambda"] > b32["lambda"]
    assert b16["mean_tokens"] <= b32["mean_tokens"]
    assert b16["budget_error_pct"] == pytest.approx(100 * (b16["mean_tokens"] - 16) / 16) and "budgets" in res.summary
    # thresholds: a looser threshold never costs more tokens
    th = sorted((r["threshold"], r["mean_tokens"]) for r in t if r["method"] == "threshold")
    assert all(a[1] >= b[1] for a, b in zip(th, th[1:]))
    # files: table in Parquet and CSV, three PNGs
    for name in ("metrics.parquet", "metrics.csv", "quality_cost.png", "assignments.png", "recon_grid.png",
                 "protocol.json", "summary.json"):
        assert storage.exists(str(root / "eval" / name)), name
    for name in ("quality_cost.png", "assignments.png", "recon_grid.png"):
        data_png = storage.read_bytes(str(root / "eval" / name))
        assert data_png.startswith(PNG) and len(data_png) > 5000, name
    csv = storage.read_bytes(str(root / "eval" / "metrics.csv")).decode().splitlines()
    assert csv[0].startswith("method,setting,mean_tokens") and len(csv) == len(t) + 1
    assert res.metrics["eval/uniform:8/psnr"] == by[("uniform", "8")]["psnr"] and "eval/router/top1" in res.metrics
    assert "router" in res.summary and "uniform at equal tokens" in res.summary


def test_threshold_defaults_and_uniform_interpolation():
    from workflows.evaluate import default_thresholds, interp_uniform, tokens_for

    th = default_thresholds(np.linspace(0.0, 1.0, 101), n=3)
    assert th == pytest.approx([0.95, 0.5, 0.05])
    curve = [(32.0, 20.0), (64.0, 22.0), (128.0, 26.0)]
    assert interp_uniform(curve, 64.0) == 22.0 and interp_uniform(curve, 90.5) == pytest.approx(24.0, abs=0.01)
    assert tokens_for(curve, 24.0) == pytest.approx(90.51, abs=0.01) and tokens_for(curve, 30.0) != tokens_for(curve, 30.0)


@pytest.mark.ray
@pytest.mark.slow
def test_tokenize_and_evaluate_stages_in_the_runner(ray_local, micro_run, tmp_path):
    """`evatok tokenize` / `evatok evaluate` as stages of the runner: fingerprinted, recorded with their MLflow
    runs (evaluate's artifacts on its run), skipped when rerun with the same inputs, refused when made otherwise."""
    import mlflow

    from workflows.fingerprint import StaleOutputError
    from workflows.run import Runner, resolve

    root, data, tok, labels = micro_run
    wd = tmp_path / "w"
    over = [f"work_dir={wd}", "name=micro", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "mlflow.experiment=micro", "data.size=32",
            *[f"{s}.{k}={v}" for s in ("tokenize", "evaluate") for k, v in (
                ("clips", data), ("tokenizer", root / "final.pt"), ("router", root / "router.pt"),
                ("labels", labels), ("val_every", 3))],
            "tokenize.mode=budget:24", "evaluate.max_clips=6", "evaluate.budgets=[24]", "evaluate.grid_clips=2",
            "tokenize.num_actors=1"]
    out = Runner(resolve(None, over), parent=False).run(["tokenize", "evaluate"])
    assert [o.action for o in out] == ["ran", "ran"], out
    rec_t, rec_e = storage.read_done(str(wd / "codes")), storage.read_done(str(wd / "eval"))
    assert rec_t["fingerprint"]["hash"] and rec_t["mode"] == "budget:24" and rec_t["lambda"] == rec_t["lam"]
    assert rec_e["fingerprint"]["inputs"]["labels"]["digest"] and rec_e["mlflow_run_id"]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(rec_e["mlflow_run_id"])
    table = storage.read_table(str(wd / "eval" / "metrics.parquet")).to_pylist()
    uni8 = next(r for r in table if (r["method"], r["setting"]) == ("uniform", "8"))
    assert run.data.tags["evatok.stage"] == "evaluate" and "eval/router/top1" in run.data.metrics
    assert run.data.metrics["eval/uniform:8/psnr"] == pytest.approx(uni8["psnr"])
    assert run.data.tags["evatok.eval.protocol.split_digest"] == uni8["protocol.split_digest"]
    assert {"evaluate/metrics.csv", "evaluate/metrics.parquet", "evaluate/quality_cost.png", "evaluate/assignments.png",
            "evaluate/recon_grid.png"} <= {a.path for a in client.list_artifacts(run.info.run_id, "evaluate")}
    # the AR model's default data is this stage's codes/
    assert resolve(None, over).models["ar"].train.data == str(wd / "codes" / "codes")
    again = Runner(resolve(None, over), parent=False).run(["tokenize", "evaluate"])
    assert [o.action for o in again] == ["skipped", "skipped"]
    with pytest.raises(StaleOutputError, match="tokenize.mode"):
        Runner(resolve(None, over[:-5] + ["tokenize.mode=router"] + over[-4:]), parent=False).run(["tokenize"])


class _Features(torch.nn.Module):
    """A stand-in feature network with the I3D TorchScript file's call signature (its real weights
    cannot be had here): per-channel means and spreads of the clip, 6 features."""

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = True,
                return_features: bool = True) -> torch.Tensor:
        return torch.cat([x.mean((2, 3, 4)), x.std((2, 3, 4))], 1)


def test_evaluate_lpips_and_rfvd_columns_when_weights_are_given(micro_run, tmp_path):
    """LPIPS (a random AlexNet saved as torchvision's file, the package's heads) and rFVD (a TorchScript
    network with I3D's signature): their columns, and the protocol names each file's SHA-256."""
    from evatok.metrics import LPIPS
    from workflows.evaluate import run_evaluate

    root, data, tok, labels = micro_run
    torch.manual_seed(0)
    alex = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save({f"features.{k}": v for k, v in LPIPS("alex", allow_random_backbone=True).features.state_dict().items()},
               alex)
    i3d = tmp_path / "i3d_torchscript.pt"
    torch.jit.script(_Features()).save(str(i3d))
    cfg = eval_cfg(root, data, labels, max_clips=4, budgets="[24]", thresholds="[0.02]", lpips_net="alex",
                   lpips_backbone=alex, i3d=i3d, i3d_sha256=storage.sha256(str(i3d)), output=tmp_path / "eval")
    res = run_evaluate(cfg, quiet=True)
    rows = res.table.to_pylist()
    assert all(r["lpips"] > 0 and r["rfvd"] >= 0 for r in rows)
    assert rows[0]["protocol.lpips_sha256"] == storage.sha256(str(alex))
    assert rows[0]["protocol.i3d_sha256"] == storage.sha256(str(i3d)) and "alex" in rows[0]["protocol.lpips_net"]
    # measured per method: the methods' reconstructions differ, so do their distances
    assert len({round(r["lpips"], 9) for r in rows}) > 1 and len({round(r["rfvd"], 12) for r in rows}) > 1
    assert "checked" in rows[0]["protocol.rfvd_net"]
    from evatok.metrics import DigestMismatchError  # a TorchScript file is code: another file is never loaded

    with pytest.raises(DigestMismatchError):
        run_evaluate(eval_cfg(root, data, labels, max_clips=2, i3d=i3d, i3d_sha256="0" * 64,
                              output=tmp_path / "eval2"), quiet=True)


def test_ar_models_that_share_a_file_name_keep_their_own_metrics():
    """Two AR models both called ar.pt (the pipeline's and one trained on uniform codes) must not log
    under one name, where the second's numbers would replace the first's."""
    from workflows.evaluate import ar_names

    assert ar_names(["/w/ar/ar.pt"]) == ["ar"]
    assert ar_names(["/w/ar/ar.pt", "/w/ar-u16/ar.pt", "/w/x/other.pt"]) == ["ar-ar", "ar-u16-ar", "other"]
    assert ar_names(["/a/ar/ar.pt", "/b/ar/ar.pt"]) == ["ar-ar-1", "ar-ar-2"]
    assert len(set(ar_names(["s3://b/r/ar/ar.pt", "s3://b/r/ar2/ar.pt"]))) == 2
