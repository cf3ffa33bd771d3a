"""evatok compare: runs read from a real MLflow server, side by side, curves overlaid in one PNG."""
from __future__ import annotations

import csv
import io

import pytest

from workflows import compare as C

# Two made-up evaluations, logged under the metric names evaluate writes (docs/compare.md).
# Uniform curve A: 32 tokens -> 20 dB, 64 -> 24, 128 -> 27, 256 -> 29; router at 100 tokens, 27 dB.
UNI_A = {8: (32, 20.0), 16: (64, 24.0), 32: (128, 27.0), 64: (256, 29.0)}
UNI_B = {8: (32, 19.0), 16: (64, 23.0), 32: (128, 26.5), 64: (256, 28.0)}


def _eval_metrics(uni, router_tokens, router_psnr, extra=None):
    m = {}
    for k, (tok, psnr) in uni.items():
        m[f"eval/uniform:{k}/mean_tokens"] = tok
        m[f"eval/uniform:{k}/psnr"] = psnr
    m["eval/router/mean_tokens"] = router_tokens
    m["eval/router/psnr"] = router_psnr
    m.update(extra or {})
    return m


def test_curve_math_by_hand():
    m = _eval_metrics(UNI_A, 100, 27.0, {"eval/budget:50/mean_tokens": 50, "eval/budget:50/psnr": 23.5,
                                          "eval/budget:200/mean_tokens": 200, "eval/budget:200/psnr": 28.8})
    cv = C.curves(m, "psnr")
    assert list(cv) == ["budget", "router", "uniform"] and [p[2] for p in cv["uniform"]][0] == "uniform:8"
    assert C.interp(cv["uniform"], 100) == pytest.approx(24 + 3 * 36 / 64)      # 25.6875
    assert C.tokens_at(cv["uniform"], 27.0) == pytest.approx(128)
    assert C.interp(cv["uniform"], 300) is None and C.tokens_at(cv["uniform"], 35.0) is None
    e = C.Entry("a", "0" * 32, "x", m, {}, ["0" * 32], 12.0)
    f = C.figures(e, "psnr", budgets=[64, 128])
    assert f["router - uniform psnr (same tokens)"] == pytest.approx(27.0 - 25.6875)
    assert f["tokens saved vs uniform (%)"] == pytest.approx(100 * (1 - 100 / 128))
    assert f["budget psnr @ 128 tokens"] == pytest.approx(23.5 + 5.3 * 78 / 150)
    assert f["router top-1"] is None and f["gen: mean tokens"] is None  # missing, shown as "–"
    # the evaluate stage's spelling: gen/<AR model>/<metric>, the first AR model in name order
    e.metrics.update({"gen/ar-b/mean_tokens": 300.0, "gen/ar-a/mean_tokens": 200.0, "gen/ar-a/protocol/samples": 32})
    f = C.figures(e, "psnr")
    assert f["gen: mean tokens"] == 200.0 and f["gen: samples"] == 32


def test_compare_finds_two_runs_on_a_server_and_draws_both_curves(mlflow_server, tmp_path):
    import mlflow
    from PIL import Image
    from typer.testing import CliRunner

    from workflows.cli import app
    from workflows.config import load_config

    client = mlflow.MlflowClient(mlflow_server)
    exp = client.create_experiment(f"cmp-{tmp_path.name}")
    name = client.get_experiment(exp).name
    # run A: a pipeline parent whose evaluate and generate children hold the figures
    parent = client.create_run(exp, run_name="pipeline-a").info.run_id
    ev = client.create_run(exp, run_name="a-evaluate", tags={"mlflow.parentRunId": parent}).info.run_id
    for k, v in _eval_metrics(UNI_A, 100, 27.0, {"eval/router/top1": 0.25,
                                                  "eval/router/reward_percentile": 93.0}).items():
        client.log_metric(ev, k, v)
    gen = client.create_run(exp, run_name="a-generate", tags={"mlflow.parentRunId": parent,
                                                            "evatok.gen/protocol/feature_net_sha256": "ab" * 32})
    client.log_metric(gen.info.run_id, "gen/mean_tokens", 212.0)
    client.log_metric(gen.info.run_id, "gen/well_formed_rate", 1.0)
    for r in (ev, gen.info.run_id, parent):
        client.set_terminated(r)
    # run B: one standalone run, no generation figures
    b = client.create_run(exp, run_name="eval-b").info.run_id
    for k, v in _eval_metrics(UNI_B, 150, 27.0, {"seconds": 42.0}).items():
        client.log_metric(b, k, v)
    client.set_terminated(b)
    # run C: a training run alone, none of the figures: left out of an experiment's columns
    c = client.create_run(exp, run_name="train-only").info.run_id
    client.log_metric(c, "loss", 0.5)
    client.set_terminated(c)

    cfg = load_config(None, [f"mlflow.tracking_uri={mlflow_server}", f"mlflow.experiment={name}",
                             f"work_dir={tmp_path}"])
    out = tmp_path / "cmp"
    r = C.run_compare(cfg, [], out=str(out))  # no target: the recipe's experiment
    assert [e.run_id for e in r.entries] == [parent, b]  # top-level runs only, children merged
    assert set(r.entries[0].runs) == {parent, ev, gen.info.run_id}
    rows = r.rows
    assert rows["router mean tokens"] == [100.0, 150.0]
    assert rows["tokens saved vs uniform (%)"][0] == pytest.approx(100 * (1 - 100 / 128))
    # B: the uniform curve reaches 27 dB between 128 (26.5) and 256 (28.0) tokens: 128 + 128/3
    assert rows["uniform tokens at router psnr"][1] == pytest.approx(128 + 128 / 3)
    assert rows["gen: mean tokens"] == [212.0, None] and rows["router top-1"] == [0.25, None]
    assert rows["gen: classifier file"] == ["ab" * 6, None]
    assert rows["wall time (s)"][0] >= 0 and rows["wall time (s)"][1] == 42.0  # its own measure, else end - start
    assert {(d[0], d[1], d[2]) for d in r.drawn} == {(r.entries[0].name, "uniform", 4), (r.entries[0].name, "router", 1),
                                                    (r.entries[1].name, "uniform", 4), (r.entries[1].name, "router", 1)}
    img = Image.open(out / "curves.png")
    assert img.size == (800, 500) and len(img.convert("RGB").getcolors(1 << 16) or []) > 10
    table = list(csv.reader(io.StringIO((out / "compare.csv").read_text())))
    assert table[0] == ["figure", parent, b]
    missing = [row for row in table if row[0] == "gen: mean tokens"][0]
    assert missing[1] == "212.0" and missing[2] == ""
    # the comparison is its own run, with its artifacts, and a later comparison does not compare it
    run = client.get_run(r.mlflow_run_id)
    assert run.data.tags["evatok.stage"] == "compare" and run.data.tags["evatok.compare.runs"] == f"{parent},{b}"
    assert {a.path for a in client.list_artifacts(r.mlflow_run_id, "compare")} == {
        "compare/curves.png", "compare/compare.csv", "compare/compare.json"}
    assert r.left_out == [f"train-only ({c[:6]})"]
    again = C.run_compare(cfg, [name])
    assert [e.run_id for e in again.entries] == [parent, b]
    named = C.compare(client, [c], name)  # named by its id, it is shown
    assert [e.run_id for e in named.entries] == [c] and named.rows["router mean tokens"] == [None]

    # explicit run ids, through the command line; the missing figures print as "–"
    res = CliRunner().invoke(app, ["compare", b, parent, f"mlflow.tracking_uri={mlflow_server}",
                                   f"mlflow.experiment={name}", f"work_dir={tmp_path}", "--out", str(tmp_path / "c2")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "c2" / "curves.png").is_file()
    assert list(csv.reader(open(tmp_path / "c2" / "compare.csv")))[0] == ["figure", b, parent]


def test_unknown_target_is_an_error(mlflow_server, tmp_path):
    import mlflow

    client = mlflow.MlflowClient(mlflow_server)
    with pytest.raises(C.CompareError, match="neither a run id nor an experiment"):
        C.compare(client, ["no-such-experiment"], "x")
    with pytest.raises(C.CompareError, match="unknown quality metric"):
        C.compare(client, [], "x", quality="fid")
