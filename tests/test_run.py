"""`evatok run` / `evatok status` as a user runs them: through the CLI in a subprocess, from a working
directory that is not the checkout, with relative paths.

Fast: one-line errors and exit codes, `status` on done / partial / missing / stale outputs, refusal of
an output made otherwise (no Ray). Slow: a training run with relative paths (the file lands where the
user's directory says; other data under the same name is refused, --force trains afresh), and the
whole pipeline at micro scale on a real local Ray, a real MLflow server and S3 (moto): every stage's
outputs, the lineage in MLflow, the driver SIGKILLed during labeling then `run` again (no duplicate or
missing rows), and a rerun that does no work.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from workflows import fingerprint as F
from workflows import storage

TINY = str(REPO / "configs" / "tiny.yaml")


def _labels_tag() -> str:
    """The labels folder the tiny recipe's reward weights name (``label.metric``-wq``w_q``-wl``w_l``)."""
    from workflows.config import load_config

    lc = load_config(TINY).label
    return f"{lc.metric}-wq{lc.w_q:g}-wl{lc.w_l:g}"


LABELS = _labels_tag()
MODELS = ("proxy", "router", "final", "ar", "classifier")
#: Micro scale: one 64x64 clip per video, one video per shard, 4 steps per model. A global batch of 2:
#: the held-out splits hash ids that include the bucket's (random) name, so which of the 6 clips are held
#: out changes from run to run; at a batch of 4, 3 held out of 6 (about 3% of runs) left the router
#: fewer training rows than one batch.
MICRO = ["data.max_clips_per_video=1", "ingest.videos_per_task=1", "train.batch_size=2",
         "train.min_curve_gain_db=0", "mlflow.system_metrics=false", "label.stats_samples=500",
         *[f"{m}.steps=4" for m in MODELS]]


def evatok(*args: str, cwd: Path, env: dict | None = None, timeout: float = 600, check: int | None = None):
    """Run the installed CLI in a subprocess; returns the CompletedProcess (stdout+stderr in .out)."""
    exe = Path(sys.executable).with_name("evatok")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "workflows.cli"]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **(env or {})}
    p = subprocess.run(cmd + list(args), cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    p.out = p.stdout + p.stderr
    if check is not None:
        assert p.returncode == check, p.out[-4000:]
    return p


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    d = tmp_path / "user"
    d.mkdir()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return d


# ============================================================================ fast: errors, status
def test_config_error_is_one_line_and_exit_2(user_dir):
    p = evatok("run", "-c", TINY, "nope.key=1", cwd=user_dir, check=2)
    assert "config error" in p.stderr and "unknown key" in p.stderr
    assert "Traceback" not in p.out and len(p.stderr.strip().splitlines()) == 1


def test_stage_failure_is_one_line_exit_1_and_debug_shows_the_traceback(user_dir):
    args = ["run", "-c", TINY, "work_dir=w", "ingest.source=missing/manifest.csv"]
    p = evatok(*args, cwd=user_dir, check=1)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.out
    # the relative source was resolved against the user's directory, on the driver
    assert lines[0].startswith("stage ingest failed: IngestError: manifest ") and \
        f"{user_dir}/missing/manifest.csv does not exist" in lines[0]
    assert "Traceback" not in p.out and "--debug" in lines[0]
    d = evatok(*args, "--debug", cwd=user_dir, check=1)
    assert "Traceback (most recent call last)" in d.stderr


@pytest.fixture
def ingest_setup(tiny_videos, user_dir):
    """A plan whose source is 8 local videos (2 shards of 4) and its ingest stage, in ``user_dir/w``."""
    from workflows.run import IngestStage, resolve

    over = [f"ingest.source={tiny_videos / 'manifest.csv'}", "work_dir=w", "ingest.videos_per_task=4"]
    cwd = os.getcwd()
    os.chdir(user_dir)
    try:
        plan = resolve(TINY, over)
    finally:
        os.chdir(cwd)
    return plan, IngestStage(), over


def _status(over, cwd) -> dict[str, dict]:
    p = evatok("status", "-c", TINY, *over, cwd=cwd, check=0)
    rows: dict[str, dict] = {}
    last = None
    for ln in p.stdout.splitlines():
        cells = [c.strip() for c in ln.split("│")[1:-1]]
        if len(cells) >= 6 and cells[0] in ("ingest", *MODELS, "label"):
            last = rows[cells[0]] = {"state": cells[1], "detail": cells[2], "line": ln}
        elif len(cells) >= 6 and cells[0] == "" and last is not None:  # a wrapped cell continues
            last["detail"] = (last["detail"] + " " + cells[2]).strip()
            last["line"] += "\n" + ln
    assert set(rows) == {"ingest", "proxy", "label", *MODELS}, p.stdout
    return rows


def test_status_missing_partial_done_stale_and_refusal(ingest_setup, user_dir):
    plan, stage, over = ingest_setup
    cfg = stage.config(plan)
    place = stage.place(cfg)
    assert place == str(user_dir / "w" / "data")
    rows = _status(over, user_dir)
    assert rows["ingest"]["state"] == "missing" and rows["proxy"]["state"] == "missing"
    assert "waiting for ingest" in rows["proxy"]["detail"]

    # partial: an interrupted run with this fingerprint and one of two shards done
    fp = stage.fingerprint(cfg, plan)
    F.write_claim(place, fp)
    storage.write_bytes_atomic(storage.join(place, "_shards", "shard-00000.json"), b"{}")
    rows = _status(over, user_dir)
    assert rows["ingest"]["state"] == "partial" and rows["ingest"]["detail"].startswith("1/2 shards")

    # done: outputs with their recorded digests
    from train_fixtures import write_clips

    write_clips(place, n=4)
    storage.mark_done(place, {"fingerprint": fp.to_json(), "outputs": {"clips": F.dataset_input(stage.output(cfg))},
                              "mlflow_run_id": "run-123", "seconds": 12.5})
    rows = _status(over, user_dir)
    assert rows["ingest"]["state"] == "done" and "run-123" in rows["ingest"]["line"] and "12.5s" in rows["ingest"]["line"]
    assert rows["proxy"]["state"] == "missing"

    # stale: the same place with another setting -> status names it, `run` refuses (exit 2, no Ray)
    other = over[:-1] + ["ingest.videos_per_task=2"]
    rows = _status(other, user_dir)
    assert rows["ingest"]["state"] == "stale" and "ingest.videos_per_task" in rows["ingest"]["detail"]
    p = evatok("ingest", "-c", TINY, *other, cwd=user_dir, check=2)
    assert "refused" in p.stderr and "ingest.videos_per_task 4 -> 2" in p.stderr and "--force" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1

    # the outputs were modified behind the record's back: stale, not done
    (Path(place) / "clips" / "shard-00000.parquet").write_bytes(b"not the same clips")
    rows = _status(over, user_dir)
    assert rows["ingest"]["state"] == "stale" and "was modified" in rows["ingest"]["detail"]


def test_failure_one_line_unwraps_ray_worker_tracebacks():
    from workflows.run import one_line

    text = ("ray::MapWorker(MapBatches(_LabelActor)).submit() (pid=1, ip=127.0.0.1)\n"
            "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
            "    raise ValueError('proxy counts (8, 16) do not match')\n"
            "ValueError: proxy counts (8, 16) do not match\n\n"
            "The above exception was the direct cause of the following exception:\n\n"
            "Traceback (most recent call last):\n  File \"y.py\", line 2, in g\n"
            "ray.data.exceptions.UserCodeException: UDF failed to process a data block.")

    class UserCodeException(Exception):
        pass
    assert one_line(UserCodeException(text)) == "ValueError: proxy counts (8, 16) do not match"
    assert one_line(RuntimeError("one\ntwo")) == "RuntimeError: one"


# ============================================================================ slow: training, relative paths
@pytest.mark.slow
@pytest.mark.ray
def test_train_relative_output_lands_in_the_users_directory_and_data_is_fingerprinted(user_dir):
    """README step 3 as a user runs it: `train.output=runs/tiny/proxy.pt` is written under the user's
    directory (not inside a Ray worker's). Other clips under the same path and name are refused, never
    reported done; --force trains afresh under a new Ray Train run name."""
    from train_fixtures import write_clips

    write_clips(str(user_dir / "data"), n=8)
    args = ["train", "proxy", "-c", TINY, "work_dir=runs/w", "train.data=data", "train.output=runs/tiny/proxy.pt",
            "train.batch_size=4", "proxy.steps=2", "train.min_curve_gain_db=0", "mlflow.system_metrics=false"]
    t0 = time.perf_counter()
    p = evatok(*args, cwd=user_dir, check=0)
    export = user_dir / "runs" / "tiny" / "proxy.pt"
    assert export.exists(), p.out
    rec = json.loads((user_dir / "runs" / "w" / "train" / "tiny-proxy" / "_DONE.json").read_text())
    assert rec["export_uri"] == str(export) and rec["export_sha256"] == storage.sha256(str(export))
    assert rec["ray_run"] == "tiny-proxy" and rec["mlflow_run_id"] and rec["model_version"] == "1"
    assert (user_dir / "runs" / "w" / "mlflow.db").exists()  # default tracking store in the work dir
    assert "proxy   done in" in p.stdout
    first = time.perf_counter() - t0

    again = evatok(*args, cwd=user_dir, check=0)
    assert "up to date" in again.stdout and export.stat().st_mtime_ns == os.stat(export).st_mtime_ns

    write_clips(str(user_dir / "data"), n=8, seed=1)  # other clips, same files, same run name
    refused = evatok(*args, cwd=user_dir, check=2)
    assert "input data changed" in refused.stderr and "--force" in refused.stderr
    assert "up to date" not in refused.out
    old = storage.sha256(str(export))
    forced = evatok(*args, "--force", cwd=user_dir, check=0)
    rec2 = json.loads((user_dir / "runs" / "w" / "train" / "tiny-proxy" / "_DONE.json").read_text())
    assert rec2["ray_run"].startswith("tiny-proxy-") and rec2["ray_run"] != rec["ray_run"]
    assert rec2["fingerprint"]["hash"] != rec["fingerprint"]["hash"] and rec2["model_version"] == "2"
    storage._SHA_CACHE.clear()
    assert storage.sha256(str(export)) == rec2["export_sha256"] != old
    print(f"first train {first:.1f}s; rerun, refusal, forced run: {forced.returncode}")


# ============================================================================ slow: the whole pipeline
def _wait_for(pred, timeout: float, proc=None, every: float = 0.3) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(every)
    return False


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.s3
def test_pipeline_end_to_end_on_s3_with_lineage_kill_and_rerun(user_dir, s3_bucket, mlflow_server):
    import mlflow

    from evatok import synthetic

    synthetic.write_dataset(user_dir / "videos", n=6, seed=0)  # the user's own videos, a relative path
    (user_dir / "recipe.yaml").write_text(Path(TINY).read_text())
    wd = f"s3://{s3_bucket}/tiny"
    args = ["run", "-c", "recipe.yaml", f"work_dir={wd}", "ingest.source=videos/manifest.csv", *MICRO]
    env = {"MLFLOW_TRACKING_URI": mlflow_server}
    exe = Path(sys.executable).with_name("evatok")
    t0 = time.perf_counter()

    # 1) the driver is SIGKILLed while the label stage scores (after its first shard is published)
    log = open(user_dir / "run1.log", "w")
    proc = subprocess.Popen([str(exe), *args], cwd=user_dir, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **env}, start_new_session=True)
    try:
        marks = lambda: storage.list_files(f"{wd}/label/_shards", (".json",))  # noqa: E731
        assert _wait_for(lambda: len(marks()) >= 1, 300, proc), (user_dir / "run1.log").read_text()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        try:  # Ray's processes die with their driver; anything of this session left is ours to stop
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
    assert proc.returncode == -signal.SIGKILL
    partial = len(marks())
    assert 1 <= partial < 6, f"{partial} label shards when killed"
    assert not storage.exists(f"{wd}/label/labels/{LABELS}/_DONE.json")
    t_kill = time.perf_counter() - t0

    # 2) run again: up-to-date stages skipped, labeling resumed, the rest trained
    p = evatok(*args, cwd=user_dir, env=env, check=0)
    out = p.stdout
    assert "ingest  up to date" in out and "proxy   up to date" in out and "label   resuming" in out, out
    for stage in ("label", "router", "final", "ar"):
        assert f"{stage:<7} done in" in out, out
    assert "Traceback" not in p.out and "PlacementGroupCleaner" not in p.out and "(RayTrainWorker" not in p.out
    t_second = time.perf_counter() - t0 - t_kill

    # every clip scored and labeled exactly once
    clips = storage.read_table(f"{wd}/data/clips", columns=["clip_id"]).column("clip_id").to_pylist()
    scores = storage.read_table(f"{wd}/label/scores", columns=["clip_id"]).column("clip_id").to_pylist()
    labels = storage.read_table(f"{wd}/label/labels/{LABELS}", columns=["clip_id"]).column("clip_id").to_pylist()
    assert len(clips) == 6 and sorted(scores) == sorted(labels) == sorted(clips)

    # each stage's record: fingerprint, outputs with digests, MLflow run id
    recs = {"ingest": storage.read_done(f"{wd}/data"),
            "label": storage.read_done(f"{wd}/label/labels/{LABELS}"),
            **{m: storage.read_done(f"{wd}/train/tiny-{m}") for m in MODELS},
            "tokenize": storage.read_done(f"{wd}/codes"), "evaluate": storage.read_done(f"{wd}/eval")}
    for name, rec in recs.items():
        assert rec and rec["fingerprint"]["hash"] and rec["mlflow_run_id"], (name, rec)
    for m in MODELS:
        uri = f"{wd}/{m}/{m}.pt"
        assert recs[m]["export_uri"] == uri and recs[m]["outputs"]["model"]["digest"] == storage.sha256(uri)
    assert recs["ingest"]["outputs"]["clips"]["digest"] == F.dataset_digest(f"{wd}/data/clips")

    # lineage: each run's inputs name its parent stages' outputs, with matching digests and run ids
    client = mlflow.MlflowClient(mlflow_server)
    produced = {(o["uri"], o["digest"]): (name, rec["mlflow_run_id"])
                for name, rec in recs.items() for o in rec["outputs"].values()}
    expect = {"ingest": {"videos"}, "proxy": {"data"}, "label": {"clips", "proxy"}, "router": {"data", "labels"},
              "final": {"data", "router"}, "ar": {"data", "router", "tokenizer"},
              "tokenize": {"clips", "tokenizer", "router"}, "classifier": {"data"},
              "evaluate": {"clips", "tokenizer", "router", "labels", "ar", "classifier"}}
    parents = set()
    for name, rec in recs.items():
        run = client.get_run(rec["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["evatok.stage"] == name
        assert run.data.tags.get("evatok.code_version") and "resolved_config.json" in [
            a.path for a in client.list_artifacts(run.info.run_id)]
        parents.add(run.data.tags["mlflow.parentRunId"])
        got = {}
        for di in run.inputs.dataset_inputs:
            tags = {t.key: t.value for t in di.tags}
            if "evatok.digest" in tags:
                got[di.dataset.name] = tags
        assert set(got) == expect[name], (name, got)
        for role, tags in got.items():
            if role == "videos":
                continue
            key = (tags["evatok.uri"], tags["evatok.digest"])
            assert key in produced, (name, role, key)
            assert tags["evatok.producer_stage"] == produced[key][0]
            assert tags["evatok.producer_run_id"] == produced[key][1]
    for pid in parents:  # the parents are pipeline runs (the killed one and the one that finished)
        assert client.get_run(pid).data.tags["evatok.stage"] == "pipeline"
    assert len(parents) == 2
    # registered models: one per kind and recipe; the version points at the export and its digest
    for m in MODELS:
        v = client.get_model_version(f"evatok-tiny-{m}", recs[m]["model_version"])
        assert v.source == f"{wd}/{m}/{m}.pt" and v.tags["evatok.sha256"] == recs[m]["export_sha256"]
        assert v.run_id == recs[m]["mlflow_run_id"]

    # 3) rerun: no work (no Ray, no new MLflow runs), and status says every stage is done
    exp = client.get_experiment_by_name("evatok-tiny")
    n_runs = len(client.search_runs([exp.experiment_id], max_results=1000))
    t1 = time.perf_counter()
    p = evatok(*args, cwd=user_dir, env=env, check=0)
    t_rerun = time.perf_counter() - t1
    assert "nothing to do" in p.stdout and "done in" not in p.stdout, p.out
    assert len(client.search_runs([exp.experiment_id], max_results=1000)) == n_runs
    st = evatok("status", "-c", "recipe.yaml", *args[3:], cwd=user_dir, env=env, check=0)
    assert st.stdout.count(" done ") >= 6 and "stale" not in st.stdout and "partial" not in st.stdout, st.stdout
    print(f"\nkilled run {t_kill:.0f}s, completing run {t_second:.0f}s, rerun {t_rerun:.1f}s")
