"""``evatok submit``: the plan (paths, tracking, secrets) on its own, then real jobs on a real Ray head.

The head is what a cluster's head runs: ``ray start --head`` in a subprocess, with the dashboard (the
job server lives there), on loopback (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, auth off: stack notes
§3), all ports chosen free, its own short temp dir, and a custom resource ``evatok_decode`` as the
launcher's CPU pool advertises it. The head's environment is the "cluster's own environment": it has
``EVATOK_CLUSTER_PROBE`` and no AWS variable; the submitting shell has the secret.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from workflows import submit as sub
from workflows.cli import _stage_commands, app
from workflows.config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
STAGES = ["ingest", "label", "relabel", "train"]
SECRET = "sekrit-XYZ-0123456789"


def _plan(words, local=True, **kw):
    return sub.plan(TINY, words, stage_commands=STAGES, local_cluster=local, env=kw.pop("env", {}), **kw)


# ----------------------------------------------------------------------------- the plan (no Ray)
def test_stage_commands_are_the_cli_commands_that_take_a_recipe():
    names = _stage_commands()
    assert {"ingest", "label", "relabel", "train"} <= set(names)
    assert "submit" not in names and "synth" not in names and "config" not in names


def test_words_split_into_stages_with_arguments_and_overrides():
    stages, overrides = sub.parse_args(["ingest", "train", "proxy", "a.b=1", "label"], STAGES)
    assert stages == [["ingest"], ["train", "proxy"], ["label"]] and overrides == ["a.b=1"]
    with pytest.raises(sub.SubmitError, match="unknown stage 'ingset'"):
        sub.parse_args(["ingset"], STAGES)
    with pytest.raises(sub.SubmitError, match="at least one stage"):
        sub.parse_args(["a=1"], STAGES)


def test_stage_resources_are_checked_when_the_recipe_loads():
    from workflows.config import ConfigError

    cfg = load_config(TINY, ["ingest.resources={evatok_decode: 0.001}", "label.resources.evatok_gpu=1"])
    assert cfg.ingest.resources == {"evatok_decode": 0.001} and cfg.label.resources == {"evatok_gpu": 1.0}
    for bad in ("ingest.resources=3", "ingest.resources={evatok_decode: -1}", "label.resources={gpu: lots}"):
        with pytest.raises(ConfigError, match="resources"):
            load_config(TINY, [bad])


def test_path_fields_exist_in_the_config_tree():
    cfg = load_config()
    for name in (*sub.PATH_FIELDS, *sub.OUTPUT_FIELDS):
        sub._get(cfg, name)  # AttributeError if a field was renamed
    assert set(sub.OUTPUT_FIELDS) <= set(sub.PATH_FIELDS)


def test_local_cluster_makes_relative_paths_absolute_against_the_submitting_cwd(tmp_path):
    p = _plan(["ingest", "ingest.source=vids/manifest.csv", "ingest.output=file://out/data",
               "mlflow.tracking_uri=sqlite:///m.db"], cwd=tmp_path)
    cmd = p.entrypoint
    assert cmd.startswith("evatok ingest -c configs/tiny.yaml ")
    assert f"ingest.source={tmp_path}/vids/manifest.csv" in cmd
    assert f"ingest.output={tmp_path}/out/data" in cmd
    assert f"work_dir={tmp_path}/runs/tiny" in cmd  # from the recipe (relative there)
    assert f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db" in cmd
    assert "ingest.source=vids/" not in cmd and cmd.count("ingest.source=") == 1  # rewritten in place
    assert p.runtime_env == {"working_dir": str(REPO), "excludes": sub.EXCLUDES}
    assert {"runs/", ".venv/", ".cache/", ".git/", "*.pt", "__pycache__/"} <= set(sub.EXCLUDES)
    assert p.metadata["evatok.cluster"] == "local" and p.submission_id.startswith("evatok-tiny-ingest-")


def test_stages_chain_and_env_names_become_a_shell_check_not_values():
    p = _plan(["ingest", "train", "proxy", "train.steps=3", "work_dir=s3://b/w"], env_names=["AWS_PROFILE"],
              env={"AWS_PROFILE": "prod-profile"})
    first, *commands = p.entrypoint.split(" && ")
    assert first.startswith(': "${AWS_PROFILE:?') and "prod-profile" not in p.entrypoint
    assert commands[0].startswith("evatok ingest -c configs/tiny.yaml train.steps=3 work_dir=s3://b/w")
    assert commands[1].startswith("evatok train proxy -c configs/tiny.yaml")
    assert "env_vars" not in p.runtime_env and p.metadata["evatok.env_names"] == "AWS_PROFILE"
    with pytest.raises(sub.SubmitError, match="not a variable name"):
        _plan(["ingest"], env_names=["AWS_PROFILE=prod"])


REMOTE_OK = ["work_dir=s3://b/w", "mlflow.tracking_uri=http://mlflow.internal:5000"]


@pytest.mark.parametrize("words, env_names, match", [
    (["ingest", "mlflow.tracking_uri=http://m:5000"], [], r"work_dir='runs/tiny' is a local path"),
    (["ingest", *REMOTE_OK, "ingest.output=/data/out"], [], r"ingest.output='/data/out' is a local path"),
    (["ingest", *REMOTE_OK, "ingest.source=vids"], [], r"relative local path"),
    (["ingest", "work_dir=s3://b/w"], [], r"no MLflow tracking URI"),
    (["ingest", "work_dir=s3://b/w", "mlflow.tracking_uri=sqlite:////x/m.db"], [], r"one node's disk"),
    (["ingest", "work_dir=s3://b/w", "mlflow.tracking_uri=https://u:pw@m.example"], [], r"carries credentials"),
])
def test_remote_cluster_refuses_what_would_fail_or_be_lost(words, env_names, match):
    with pytest.raises(sub.SubmitError, match=match):
        _plan(words, local=False, env_names=env_names)


def test_remote_cluster_accepts_object_storage_and_a_tracking_uri_by_name(tmp_path):
    p = _plan(["ingest", "work_dir=s3://b/w"], local=False, env_names=["MLFLOW_TRACKING_URI"])
    assert "work_dir=s3://b/w" in p.entrypoint and p.metadata["evatok.cluster"] == "remote"
    p = _plan(["label", *REMOTE_OK, "label.lpips_backbone=/opt/weights/vgg16.pth"], local=False)
    assert any("must exist on every node" in w for w in p.warnings)
    p = _plan(["ingest", "mlflow.tracking_uri=http://m:5000"], local=False, allow_local_paths=True)
    assert "work_dir=runs/tiny" not in p.entrypoint  # not rewritten: the shared mount decides
    with pytest.raises(sub.SubmitError, match="no MLflow tracking URI"):  # a shared mount needs tracking too
        _plan(["ingest"], local=False, allow_local_paths=True)
    _plan(["ingest", "work_dir=s3://b/w", "mlflow.tracking_uri=databricks"], local=False)
    with pytest.raises(sub.SubmitError, match="outside the working dir"):
        outside = tmp_path / "r.yaml"
        outside.write_text(TINY.read_text())
        sub.plan(outside, ["ingest", *REMOTE_OK], stage_commands=STAGES, local_cluster=False, env={})


def test_this_host_is_loopback_or_a_local_interface():
    assert sub._is_this_host("127.0.0.1") and sub._is_this_host("127.0.0.2")  # all of 127/8 is loopback
    assert not sub._is_this_host("192.0.2.1")  # TEST-NET-1: documentation only, never assigned
    assert not sub._is_this_host("head.example")


def test_a_secret_value_in_the_submission_is_refused_by_name():
    env = {"AWS_SECRET_ACCESS_KEY": SECRET, "TOKENIZERS_PARALLELISM": "falsefalse"}
    assert set(sub.secret_values(env)) == {"AWS_SECRET_ACCESS_KEY"}
    with pytest.raises(sub.SubmitError, match=r"\$AWS_SECRET_ACCESS_KEY") as e:
        _plan(["ingest", f"ingest.source=s3://b/{SECRET}/v"], env=env)
    assert SECRET not in str(e.value)


def test_cli_errors_are_one_line_and_exit_2(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    runner = CliRunner()
    r = runner.invoke(app, ["submit", "-c", str(TINY), "ingest"])
    assert r.exit_code == 2 and "no cluster address" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["submit", "-c", str(TINY), "ingest", "ingest.nope=1", "--address", "http://127.0.0.1:1"])
    assert r.exit_code == 2 and "unknown key" in r.output  # the recipe is checked before any connection
    r = runner.invoke(app, ["submit", "ingest", "--address", "http://127.0.0.1:1"])
    assert r.exit_code == 2 and "-c/--config RECIPE is required" in r.output
    r = runner.invoke(app, ["submit", "--status", "x", "--address", "http://127.0.0.1:1"])
    assert r.exit_code == 2 and "cannot reach a Ray job server" in r.output
    assert len(r.output.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- a real head on loopback
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_tree(proc: subprocess.Popen, marker: str) -> None:
    """Stop the head we started: SIGTERM ``ray start --block``, then SIGKILL its process group and any
    process still naming our private temp dir (all started by this fixture; killed by id)."""
    import psutil

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=2)  # a graceful `ray start --block` exit can take 30 s: not worth waiting for
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(marker in c for c in (p.info["cmdline"] or [])):
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def _head_env() -> dict:
    """The cluster's own environment: the project's venv on PATH (as the image has it), no AWS_* or
    other secret, and one variable of its own."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "RAY_ADDRESS", "MLFLOW_TRACKING")) and k not in sub.secret_values()}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="disabled",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true",
               DS_ACCELERATOR="cpu", RAY_DATA_DISABLE_PROGRESS_BARS="1", EVATOK_CLUSTER_PROBE="from-the-cluster")
    return env


@pytest.fixture(scope="module")
def ray_head():
    """``ray start --head --block`` with the job server, on 127.0.0.1; yields the job server URL."""
    import importlib.util

    if importlib.util.find_spec("aiohttp_cors") is None:  # the dashboard (job server) dependencies
        pytest.fail("the job server needs ray[default]: requirements.txt must pin ray[default,train,data]==2.60.0")
    tmp = tempfile.mkdtemp(prefix="evr", dir="/tmp")  # short: Ray's socket paths live under it
    ports = {k: _free_port() for k in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                       "dashboard-agent-grpc-port", "metrics-export-port",
                                       "runtime-env-agent-port", "ray-client-server-port")}
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus", "2",
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--temp-dir", tmp,
           "--disable-usage-stats", "--object-store-memory", "200000000",
           "--resources", json.dumps({"evatok_decode": 1}), *[f"--{k}={v}" for k, v in ports.items()]]
    log = open(Path(tmp) / "head.log", "wb")
    proc = subprocess.Popen(cmd, env=_head_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/jobs/", timeout=2) as r:  # the job server answers
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("ray head did not start:\n" + (Path(tmp) / "head.log").read_text()[-3000:])
            time.sleep(0.3)
        yield url
    finally:
        _kill_tree(proc, tmp)
        log.close()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def _evatok(*args, cwd, env_extra=None, timeout=240) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess, from a shell that holds a secret."""
    env = dict(os.environ, AWS_SECRET_ACCESS_KEY=SECRET, AWS_ACCESS_KEY_ID="AKIAEXAMPLEKEYID", **(env_extra or {}))
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([str(Path(sys.executable).parent / "evatok"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _job_id(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("[submit] job ") and " submitted to " in ln]
    assert lines, f"no job was submitted:\n{stderr[-2000:]}"
    return lines[0].split()[2]


@pytest.fixture(scope="module")
def ingest_job(ray_head, tmp_path_factory):
    """``evatok synth`` here, then ``evatok submit ... ingest`` of its 8 videos with relative paths."""
    work = tmp_path_factory.mktemp("submit")
    r = _evatok("synth", "vids", "--n", "8", cwd=work)
    assert r.returncode == 0, r.stderr
    t0 = time.perf_counter()
    r = _evatok("submit", "-c", str(TINY), "ingest", "--address", ray_head, "--env-name", "EVATOK_CLUSTER_PROBE",
                "ingest.source=vids/manifest.csv", "ingest.output=out/data", "ingest.videos_per_task=4",
                "ingest.resources={evatok_decode: 0.001}", cwd=work)
    return r, work, time.perf_counter() - t0


@pytest.mark.slow
@pytest.mark.ray
def test_submitted_ingest_succeeds_streams_logs_and_writes_outputs(ingest_job):
    r, work, seconds = ingest_job
    assert r.returncode == 0, f"stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    out = work / "out" / "data"  # relative on the submitting side, made absolute before submission
    assert (out / "_DONE.json").exists()
    done = json.loads((out / "_DONE.json").read_text())
    assert done["videos"] == 8 and done["clips"] > 0 and done["shards"] == 2
    assert len(list((out / "clips").glob("*.parquet"))) == 2
    assert "8 videos ->" in r.stdout and "2 shards written" in r.stdout  # the stage's own line, streamed
    assert "SUCCEEDED" in r.stderr
    print(f"submit of ingest (8 videos): {seconds:.1f}s")


@pytest.mark.slow
@pytest.mark.ray
def test_status_and_logs_of_the_job(ingest_job, ray_head):
    r, work, _ = ingest_job
    job = _job_id(r.stderr)
    s = _evatok("submit", "--status", job, "--address", ray_head, cwd=work)
    assert s.returncode == 0 and s.stdout.startswith(f"{job} SUCCEEDED"), s.stdout + s.stderr
    lg = _evatok("submit", "--logs", job, "--address", ray_head, cwd=work)
    assert lg.returncode == 0 and "8 videos ->" in lg.stdout


@pytest.mark.slow
@pytest.mark.ray
def test_no_secret_crosses_and_stage_resources_reach_ray(ingest_job, ray_head):
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_tasks

    r, _, _ = ingest_job
    job = _job_id(r.stderr)
    client = JobSubmissionClient(ray_head)
    info = client.get_job_info(job)
    dumped = json.dumps([info.model_dump() if hasattr(info, "model_dump") else info.dict(),
                         [j.model_dump() if hasattr(j, "model_dump") else j.dict() for j in client.list_jobs()]],
                        default=str)
    assert SECRET not in dumped and "AKIAEXAMPLEKEYID" not in dumped
    assert info.metadata["evatok.env_names"] == "EVATOK_CLUSTER_PROBE"
    assert "env_vars" not in (info.runtime_env or {})
    assert set(info.runtime_env["excludes"]) >= {"runs/", ".venv/", ".git/", "*.pt"}
    tasks = [t for t in list_tasks(address=ray_head, detail=True, limit=10_000, raise_on_missing_output=False)
             if "_ingest_batch" in t.name]
    assert tasks and all(t.required_resources.get("evatok_decode") == pytest.approx(0.001) for t in tasks)


@pytest.mark.slow
@pytest.mark.ray
def test_a_variable_missing_on_the_cluster_fails_the_job_with_its_name(ray_head, tmp_path):
    r = _evatok("submit", "-c", str(TINY), "ingest", "--address", ray_head, "-e", "EVATOK_NOT_ON_CLUSTER",
                "ingest.source=nowhere", "ingest.output=out", cwd=tmp_path,
                env_extra={"EVATOK_NOT_ON_CLUSTER": "set-only-on-the-submitting-side"})
    assert r.returncode == 1, r.stdout + r.stderr
    assert "EVATOK_NOT_ON_CLUSTER: is not set on the cluster nodes" in r.stdout
    assert "FAILED" in r.stderr
    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient(ray_head).get_job_info(_job_id(r.stderr))
    assert "set-only-on-the-submitting-side" not in json.dumps(info.model_dump(), default=str)


@pytest.mark.slow
@pytest.mark.ray
def test_stopping_a_job_ends_the_waiting_submitter_with_exit_1(ray_head, ingest_job, tmp_path):
    from ray.job_submission import JobSubmissionClient

    _, work, _ = ingest_job
    out = tmp_path / "slow-out"  # one video per task, one task at a time: runs long enough to be stopped
    env = dict(os.environ, AWS_SECRET_ACCESS_KEY=SECRET)
    waiting = subprocess.Popen(
        [str(Path(sys.executable).parent / "evatok"), "submit", "-c", str(TINY), "ingest", "--address", ray_head,
         f"ingest.source={work}/vids/manifest.csv", f"ingest.output={out}", "ingest.videos_per_task=1",
         "ingest.max_concurrency=1"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client = JobSubmissionClient(ray_head)
        deadline = time.time() + 60
        job = None
        while job is None and time.time() < deadline:
            job = next((j.submission_id for j in client.list_jobs() if str(out) in j.entrypoint), None)
            time.sleep(0.3)
        assert job, "the job did not appear"
        s = _evatok("submit", "--stop", job, "--address", ray_head, cwd=tmp_path)
        assert s.returncode == 0 and "stop requested" in s.stderr, s.stderr
        stdout, stderr = waiting.communicate(timeout=120)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 1, stderr
    assert f"job {job} STOPPED" in stderr
    assert str(client.get_job_status(job).value) == "STOPPED"
