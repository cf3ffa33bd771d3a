"""The cluster files can start a working cluster: launcher YAMLs, KubeRay manifests, image, recipes.

No cloud and no container engine here, so each file is checked by what would reject it first:

- launcher files (``ray_cluster.yaml``, ``infra/ray_cluster_gcp.yaml``): Ray's own ``prepare_config``
  + ``validate_config`` (what ``ray up`` runs before it calls the cloud), then what Ray's schema
  leaves open (``node_config`` is provider-specific): an identity (instance profile / service
  account) on every node type, the pools the stages target, a node boot that installs nothing, every
  path a command uses either mounted or in the image;
- KubeRay manifests: the fields of KubeRay's v1 API types (``ray-operator/apis/ray/v1``, KubeRay 1.4)
  known by name, the fields the operator requires, autoscaling and retry semantics, GPU capacity
  for the paper recipes, RayJob's cluster equal to the RayCluster;
- the image: build context (.dockerignore), COPY sources, the requirements it installs (pinned,
  no test dependencies), pins equal to the tested environment;
- every recipe a cluster file names exists in ``configs/`` and loads.

A mistyped key fails (``test_a_mistyped_key_fails``), one case per check.
"""
from __future__ import annotations

import copy
import importlib.metadata
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from workflows.config import load_config

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = {"aws": REPO / "ray_cluster.yaml", "gcp": REPO / "infra" / "ray_cluster_gcp.yaml"}
RAYJOB = REPO / "infra" / "rayjob.yaml"
RAYCLUSTER = REPO / "infra" / "raycluster.yaml"
DOCKERFILE = REPO / "infra" / "Dockerfile"
CLUSTER_FILES = [*LAUNCHER.values(), RAYJOB, RAYCLUSTER, DOCKERFILE, REPO / "infra" / "README.md"]
LAUNCHER_PATHS = {"~/ray_bootstrap_config.yaml", "~/ray_bootstrap_key.pem"}  # written by `ray up` itself
INSTALLERS = re.compile(r"\b(pip3?|uv|conda|mamba|apt(-get)?|yum|dnf)\s+(install|add)\b")


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _ir():
    """``infra/image_requirements.py``, the script the Dockerfile runs, as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("image_requirements", REPO / "infra" / "image_requirements.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _requirements() -> dict[str, str]:
    """name -> spec ('' when unpinned) of requirements.txt."""
    ir = _ir()
    out = {}
    for raw in (REPO / "requirements.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*(.*)$", line)
            out[ir.normalize(m.group(1))] = m.group(3).strip()
    return out


# ----------------------------------------------------------------------------- the image
def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(ln for ln in DOCKERFILE.read_text().splitlines()
                                            if not ln.lstrip().startswith("#")))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln.strip() else "")
            for ln in text.splitlines() if ln.strip()]


def _stages() -> dict[str, list[tuple[str, str]]]:
    stages, name = {}, None
    for ins, args in _dockerfile():
        if ins == "FROM":
            name = args.split(" AS ")[-1].strip() if " AS " in args else args
            stages[name] = []
        elif name:
            stages[name].append((ins, args))
    return stages


def _image_workdir() -> str:
    return next(a for i, a in _stages()["runtime"] if i == "WORKDIR").strip()


def _dockerignored(rel: str, rules: list[str]) -> bool:
    """Docker's .dockerignore semantics: a rule matches a path or any of its parents; ``**`` spans
    directories; ``!`` re-includes; the last matching rule wins."""
    def rx(p: str) -> re.Pattern:
        out, i = "", 0
        while i < len(p):
            if p.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif p.startswith("**", i):
                out, i = out + ".*", i + 2
            elif p[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif p[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(p[i]), i + 1
        return re.compile(out + r"\Z")

    parts = rel.split("/")
    candidates = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    ignored = False
    for rule in rules:
        neg = rule.startswith("!")
        pat = rx(rule[1:] if neg else rule)
        if any(pat.match(c) for c in candidates):
            ignored = not neg
    return ignored


def _context_rules() -> list[str]:
    return [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]


def test_image_builds_on_the_pinned_ray_image_in_stages():
    froms = [a for i, a in _dockerfile() if i == "FROM"]
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", DOCKERFILE.read_text(), re.M))
    ray_pin = _requirements()["ray"]
    assert ray_pin == f"=={args['RAY_VERSION']}", "image and requirements.txt must pin the same Ray"
    assert {"rayproject/ray:${RAY_VERSION}-py311-cpu AS base-cpu", "rayproject/ray:${RAY_VERSION}-py311-gpu AS base-gpu",
            "base-${VARIANT} AS build", "base-${VARIANT} AS runtime"} <= set(froms)
    runtime = " ".join(a for _, a in _stages()["runtime"])
    assert "build-essential" not in runtime, "compilers stay in the build stage"
    assert "--mount=type=bind,from=build" in runtime  # wheels come from the build stage, no layer
    # The head's CPU image runs the training driver, whose env the loop forwards to GPU trainers: an
    # image-wide DS_ACCELERATOR=cpu would put DeepSpeed on the CPU accelerator on GPU nodes.
    envs = " ".join(a for i, a in _dockerfile() if i == "ENV")
    assert "DS_ACCELERATOR" not in envs.replace('IMAGE_DS_BUILD="DS_ACCELERATOR=cpu', "")


def test_image_copies_only_what_the_context_holds_and_the_context_holds_no_environment():
    rules = _context_rules()
    for ins, args in _dockerfile():
        if ins != "COPY" or "--from=" in args:
            continue
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        for src in words[:-1]:
            assert (REPO / src).exists(), f"COPY source {src} does not exist"
            assert not _dockerignored(src, rules), f"COPY source {src} is excluded by .dockerignore"
    for kept in ("workflows/cli.py", "evatok/__init__.py", "configs/paper-label.yaml", "pyproject.toml"):
        assert not _dockerignored(kept, rules), kept
    for gone in (".venv/bin/python", ".git/HEAD", "runs/x/y.parquet", "tests/test_submit.py", ".cache/x",
                 "workflows/__pycache__/cli.cpython-311.pyc", "configs/model.pt", "infra/rayjob.yaml", ".env"):
        assert _dockerignored(gone, rules), gone


def test_image_installs_the_pinned_requirements_without_test_dependencies():
    ir = _ir()

    lines = ir.image_requirements((REPO / "requirements.txt").read_text())
    names = {ir.normalize(re.split(r"[\[=]", ln)[0]) for ln in lines}
    req = _requirements()
    assert names == set(req) - ir.TEST_ONLY
    assert not names & {"moto", "pytest", "pytest-timeout"}
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+(\[[a-z,]+\])?==[A-Za-z0-9.+!-]+", ln) for ln in lines), lines
    for name, version in ir.PINS.items():  # the image's extra pins are what the tests run with
        assert req.get(name) == "", f"{name} is pinned in requirements.txt now: drop it from PINS"
        assert importlib.metadata.version(name) == version, f"PINS[{name!r}] != the tested {name}"
    # The Dockerfile's own pins agree with requirements.txt and the Makefile.
    text = DOCKERFILE.read_text()
    assert f"torch{req['torch']}" in text and f"deepspeed{req['deepspeed']}" in text
    lpips = re.search(r"lpips==[\d.]+", (REPO / "Makefile").read_text()).group(0)
    assert lpips in text
    # The script the Dockerfile runs works as a program too.
    r = subprocess.run([sys.executable, str(REPO / "infra" / "image_requirements.py"), str(REPO / "requirements.txt")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split() == lines


def test_image_requirements_refuses_an_unpinned_line():
    ir = _ir()

    assert ir.image_requirements("moto[server]==5.2.5\npytest\nav==18.1.0\n") == ["av==18.1.0"]
    with pytest.raises(ValueError, match="not pinned"):
        ir.image_requirements("numpy\n")
    with pytest.raises(ValueError, match="not pinned with =="):
        ir.image_requirements("numpy>=2\n")


# ----------------------------------------------------------------------------- launcher files
def _commands(cfg: dict) -> list[str]:
    cmds = []
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        cmds += cfg.get(key) or []
    for nt in cfg["available_node_types"].values():
        cmds += (nt.get("initialization_commands") or []) + (nt.get("worker_setup_commands") or [])
    return cmds


def _pools(cfg: dict, provider: str) -> dict[str, dict]:
    """Node type -> {spot, gpu, resources, image, identity} as the provider file says it."""
    out = {}
    for name, nt in cfg["available_node_types"].items():
        nc = nt["node_config"]
        if provider == "aws":
            spot = nc.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
            gpu = bool(re.match(r"(p\d|g\d)", nc["InstanceType"]))
            identity = (nc.get("IamInstanceProfile") or {}).get("Arn") or (nc.get("IamInstanceProfile") or {}).get("Name")
        else:
            sched = nc.get("scheduling") or {}
            assert isinstance(sched, dict), f"{name}: GCP scheduling must be a mapping (ray-project/ray#46248)"
            spot = sched.get("provisioningModel") == "SPOT" or sched.get("preemptible") is True
            gpu = bool(nc.get("guestAccelerators"))
            if gpu:
                assert sched.get("onHostMaintenance") == "TERMINATE", f"{name}: GPUs need onHostMaintenance TERMINATE"
            identity = ",".join(sa.get("email", "") for sa in nc.get("serviceAccounts") or [])
        image = (nt.get("docker") or {}).get("worker_image") or cfg["docker"]["image"]
        out[name] = {"spot": spot, "gpu": gpu, "resources": nt.get("resources", {}), "image": image,
                     "identity": identity}
    return out


def check_launcher(cfg: dict, provider: str) -> None:
    """Everything ``ray up`` checks before the cloud, plus what its schema leaves open."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))
    assert cfg["provider"]["type"] == provider
    pools = _pools(cfg, provider)
    head = cfg["head_node_type"]
    assert cfg["available_node_types"][head]["resources"].get("CPU") == 0, "the head must schedule no work"
    for name, p in pools.items():
        assert p["identity"], f"node type {name} has no {'IamInstanceProfile' if provider == 'aws' else 'serviceAccounts'}"
        assert "evatok" in p["image"] and p["image"].endswith("-gpu" if p["gpu"] else "-cpu"), (name, p["image"])
    decode = [n for n, p in pools.items() if "evatok_decode" in p["resources"]]
    gpus = [n for n, p in pools.items() if "evatok_gpu" in p["resources"]]
    assert decode and all(pools[n]["spot"] and not pools[n]["gpu"] for n in decode), "decode pool: spot CPU nodes"
    assert gpus and all(pools[n]["gpu"] for n in gpus), "evatok_gpu only on GPU nodes"
    cmds = _commands(cfg)
    assert not [c for c in cmds if INSTALLERS.search(c)], "a node boot must install nothing (the image has it)"
    assert not cfg.get("setup_commands") and not cfg.get("head_setup_commands") and not cfg.get("worker_setup_commands")
    mounted = set(cfg.get("file_mounts") or {})
    workdir = _image_workdir()
    for c in cmds:
        for path in re.findall(r"(?<![\w$])(~/[\w./-]+|/home/ray/[\w./-]+)", c):
            ok = (path in LAUNCHER_PATHS or any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounted)
                  or path.startswith(workdir.rstrip("/") + "/") or path == workdir)
            assert ok, f"command uses {path}, which is neither mounted (file_mounts) nor in the image"


@pytest.mark.parametrize("provider", ["aws", "gcp"])
def test_launcher_file_is_valid_for_ray_and_starts_a_working_cluster(provider):
    check_launcher(_load(LAUNCHER[provider]), provider)


def _rename(d: dict, path: str, new: str) -> None:
    *parents, last = path.split(".")
    for k in parents:
        d = d[k]
    d[new] = d.pop(last)


# (file, mutation, error text): every check above catches one typo or regression.
MISTAKES = [
    ("aws", lambda c: _rename(c, "idle_timeout_minutes", "idle_timout_minutes"), "idle_timout_minutes"),
    ("aws", lambda c: _rename(c, "available_node_types.gpu.max_workers", "max_worker"), "max_worker"),
    ("aws", lambda c: _rename(c, "available_node_types.gpu.docker.worker_image", "worker_imge"), "worker_imge"),
    ("aws", lambda c: _rename(c, "available_node_types.cpu_decode.node_config.IamInstanceProfile",
                              "IamInstanceProfle"), "has no IamInstanceProfile"),
    ("aws", lambda c: c["available_node_types"]["cpu_decode"]["node_config"].pop("InstanceMarketOptions"),
     "decode pool: spot CPU nodes"),
    ("aws", lambda c: c["available_node_types"]["head"]["resources"].pop("CPU"), "schedule no work"),
    ("aws", lambda c: c.update(setup_commands=["pip install -e ~/evatok"]), "install nothing"),
    ("aws", lambda c: c.update(head_start_ray_commands=["ray start --head --autoscaling-config=~/evatok/x.yaml"]),
     "neither mounted"),
    ("gcp", lambda c: _rename(c, "available_node_types.gpu.node_config.serviceAccounts", "serviceAccount"),
     "has no serviceAccounts"),
    ("gcp", lambda c: c["available_node_types"]["gpu"]["node_config"].update(scheduling=[{"onHostMaintenance": "TERMINATE"}]),
     "must be a mapping"),
    ("gcp", lambda c: _rename(c, "available_node_types.cpu_decode.resources", "resource"), "resources"),
]


@pytest.mark.parametrize("provider, mutate, error", MISTAKES, ids=[f"{p}-{e[:24]}" for p, _, e in MISTAKES])
def test_a_mistyped_key_fails(provider, mutate, error):
    cfg = _load(LAUNCHER[provider])
    mutate(cfg)
    with pytest.raises(Exception, match=re.escape(error)):
        check_launcher(cfg, provider)


# ----------------------------------------------------------------------------- KubeRay
# Field names of KubeRay's v1 API types (ray-project/kuberay ray-operator/apis/ray/v1, 1.4).
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
               "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
               "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule"}
RAYCLUSTER_SPEC = {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions",
                   "headServiceAnnotations", "suspend"}
HEAD_GROUP = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams", "template",
                "scaleStrategy"}
AUTOSCALER_OPTIONS = {"resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts", "securityContext",
                      "idleTimeoutSeconds", "upscalingMode"}


def _known(d: dict, known: set, where: str) -> None:
    unknown = set(d) - known
    assert not unknown, f"unknown field(s) {sorted(unknown)} in {where}"


def _group_resources(group: dict) -> dict:
    raw = group["rayStartParams"].get("resources")
    return json.loads(json.loads(raw)) if raw else {}


def check_cluster_spec(spec: dict, where: str) -> None:
    _known(spec, RAYCLUSTER_SPEC, where)
    assert spec["rayVersion"] == _requirements()["ray"].lstrip("=")
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}: min/maxReplicas need enableInTreeAutoscaling"
    _known(spec.get("autoscalerOptions", {}), AUTOSCALER_OPTIONS, f"{where}.autoscalerOptions")
    head = spec["headGroupSpec"]
    _known(head, HEAD_GROUP, f"{where}.headGroupSpec")
    assert head["rayStartParams"].get("num-cpus") == "0", f"{where}: the head must schedule no work"
    groups = [("headGroupSpec", head)]
    for g in spec["workerGroupSpecs"]:
        _known(g, WORKER_GROUP, f"{where}.workerGroupSpecs[{g.get('groupName')}]")
        for req in ("groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"):
            assert req in g, f"{where}: worker group misses required {req}"
        assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"]
        groups.append((g["groupName"], g))
    for name, g in groups:
        pod = g["template"]["spec"]
        assert pod.get("serviceAccountName"), f"{where}.{name}: no serviceAccountName (storage access by identity)"
        c = pod["containers"][0]
        gpus = int(c["resources"].get("limits", {}).get("nvidia.com/gpu", 0))
        assert "evatok" in c["image"] and c["image"].endswith("-gpu" if gpus else "-cpu"), (name, c["image"])
        assert {"cpu", "memory"} <= set(c["resources"]["limits"]), f"{where}.{name}: limits are what Ray detects"
    res = {g["groupName"]: _group_resources(g) for g in spec["workerGroupSpecs"]}
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))]
    assert any("evatok_decode" in r for r in res.values()) and all("evatok_gpu" in _group_resources(g) for g in gpu_groups)
    capacity = sum(g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
                   for g in gpu_groups)
    need = max(load_config(p).train.num_workers for p in (REPO / "configs").glob("paper-*.yaml")
               if load_config(p).train.use_gpu)
    need = max(need, max(load_config(p).label.num_actors for p in (REPO / "configs").glob("paper-*.yaml")
                         if load_config(p).label.use_gpu))
    assert capacity >= need, f"{where}: GPU groups top out at {capacity} GPUs, paper recipes ask {need}"


def check_rayjob(doc: dict) -> None:
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob" and doc["metadata"]["name"]
    spec = doc["spec"]
    _known(spec, RAYJOB_SPEC, "RayJob.spec")
    _known(spec.get("submitterConfig", {}), {"backoffLimit"}, "RayJob.spec.submitterConfig")
    assert spec.get("backoffLimit", 0) >= 1, "spec.backoffLimit retries the job on a fresh cluster"
    assert spec.get("shutdownAfterJobFinishes") is True
    assert spec["entrypoint"].startswith("evatok "), "the entrypoint must run evatok (the image has it)"
    check_cluster_spec(spec["rayClusterSpec"], "RayJob.spec.rayClusterSpec")


def test_rayjob_has_the_required_fields_and_real_retry_semantics():
    check_rayjob(_load(RAYJOB))


def test_raycluster_has_the_required_fields_and_matches_the_rayjob_cluster():
    doc = _load(RAYCLUSTER)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster" and doc["metadata"]["name"]
    check_cluster_spec(doc["spec"], "RayCluster.spec")
    assert doc["spec"] == _load(RAYJOB)["spec"]["rayClusterSpec"], "rayjob.yaml and raycluster.yaml drifted apart"


KUBE_MISTAKES = [
    (lambda d: _rename(d, "spec.backoffLimit", "backofLimit"), "unknown field(s) ['backofLimit']"),
    (lambda d: d["spec"].pop("backoffLimit"), "spec.backoffLimit retries"),
    (lambda d: d["spec"]["rayClusterSpec"].pop("enableInTreeAutoscaling"), "need enableInTreeAutoscaling"),
    (lambda d: _rename(d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0], "maxReplicas", "maxReplica"),
     "unknown field(s) ['maxReplica']"),
    (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][1].update(maxReplicas=1), "paper recipes ask"),
    (lambda d: d["spec"].update(entrypoint="python train.py"), "must run evatok"),
]


@pytest.mark.parametrize("mutate, error", KUBE_MISTAKES, ids=[e[:28] for _, e in KUBE_MISTAKES])
def test_a_mistyped_rayjob_fails(mutate, error):
    doc = _load(RAYJOB)
    mutate(doc)
    with pytest.raises(AssertionError, match=re.escape(error)):
        check_rayjob(doc)


# ----------------------------------------------------------------------------- recipes and secrets
def _recipe_in_repo(path: str) -> Path:
    """A recipe path as a cluster file writes it (relative to the checkout, or inside the image's
    WORKDIR, which holds configs/) -> the file in this checkout."""
    workdir = _image_workdir().rstrip("/") + "/"
    return REPO / (path[len(workdir):] if path.startswith(workdir) else path)


def test_every_recipe_a_cluster_file_names_exists_and_loads():
    from workflows.cli import _stage_commands

    stages = set(_stage_commands())
    entry = _load(RAYJOB)["spec"]["entrypoint"]
    for part in entry.split("&&"):
        words = shlex.split(part)
        assert words[0] == "evatok" and words[1] in stages, part
        recipe = _recipe_in_repo(words[words.index("-c") + 1])
        assert recipe.parent == REPO / "configs" and recipe.exists(), recipe
        load_config(recipe, [w for w in words if "=" in w])
    named = set()
    for f in CLUSTER_FILES + [REPO / "configs" / n for n in ("paper-ingest.yaml", "paper-label.yaml")]:
        named |= set(re.findall(r"configs/[\w.-]+\.yaml", f.read_text()))
    assert {"configs/paper-label.yaml", "configs/paper-ingest.yaml"} <= named
    for rel in sorted(named):
        assert (REPO / rel).exists(), f"{rel} is named in a cluster file but does not exist"
        load_config(REPO / rel)


def test_paper_stage_recipes_target_the_pools_and_write_to_object_storage():
    ingest = load_config(REPO / "configs" / "paper-ingest.yaml")
    ucf = load_config(REPO / "configs" / "paper-ingest-ucf101.yaml")
    label = load_config(REPO / "configs" / "paper-label.yaml")
    assert ingest.ingest.resources == {"evatok_decode": 0.001} == ucf.ingest.resources
    assert label.label.use_gpu and label.label.resources == {"evatok_gpu": 0.001}
    assert ucf.ingest.split == "trainlist01" and ingest.ingest.source.endswith(".csv")
    for cfg in (ingest, ucf, label):
        for uri in (cfg.work_dir, cfg.ingest.output, cfg.label.output):
            assert not uri or uri.startswith("s3://"), uri
    # The chain: ingest writes what proxy training and labeling read; labeling what the router reads.
    assert load_config(REPO / "configs" / "paper-proxy.yaml").train.data == ingest.ingest.output
    assert load_config(REPO / "configs" / "paper-ar.yaml").train.data == ucf.ingest.output
    assert load_config(REPO / "configs" / "paper-router.yaml").train.labels.startswith(label.label.output + "/labels/")


SECRETS = [re.compile(p) for p in (
    r"AKIA[0-9A-Z]{16}", r"ASIA[0-9A-Z]{16}", r"-----BEGIN [A-Z ]*PRIVATE KEY-----", r"\"private_key\"\s*:",
    r"(?i)(aws_secret_access_key|aws_session_token|password|passwd|api[_-]?key|token)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{8,}",
    r"ghp_[A-Za-z0-9]{30,}", r"://[^/\s:@]+:[^/\s@]+@")]


@pytest.mark.parametrize("path", CLUSTER_FILES + [REPO / ".dockerignore"], ids=lambda p: p.name)
def test_cluster_files_hold_no_secret(path):
    text = path.read_text()
    hits = [p.pattern for p in SECRETS if p.search(text)]
    assert not hits, f"{path.name} matches secret pattern(s) {hits}"


def test_the_secret_patterns_catch_secrets():
    for leak in ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG", "AKIAIOSFODNN7EXAMPLE", "password: hunter2hunter2",
                 "uri: https://user:pw@mlflow.example", "-----BEGIN RSA PRIVATE KEY-----"):
        assert any(p.search(leak) for p in SECRETS), leak
    for fine in ("RAY_AUTH_MODE: disabled", "envFrom: [{secretRef: {name: evatok-mlflow}}]",
                 "IamInstanceProfile: {Arn: arn:aws:iam::ACCOUNT_ID:instance-profile/evatok-ray-worker}"):
        assert not any(p.search(fine) for p in SECRETS), fine
