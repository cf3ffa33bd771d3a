"""Label benchmark (not a test): the search and the whole label stage, measured in one run.

    .venv/bin/python bench/label_bench.py [--preset tiny] [--search-clips 4] [--stage-clips 48]
                                          [--repeats 2] [--legacy-rev c6b8676] [--precision-check]
                                          [--videos-per-shard 4] [--only WORD ...] [--skip-search|--skip-stage]

1. Search, in this process, ``--threads`` torch threads (1 = what a label actor gets) and the label
   actor's allocator settings (``workflows.label.tune_allocator``) for both sides: the current prefix
   walk (``evatok.search.score_assignments``) and the walk as it was before issue 11 (a verbatim copy
   below, ``legacy_walk``), same random-init model, same clips (real synthetic mp4s decoded as
   ingest does), same batch size, run back to back with alternating order, ``--repeats`` times; medians.
   With ``--legacy-rev`` also that revision's whole walk (its ``evatok`` package imported beside the
   current one as ``evatok_legacy``: its search, tokenizer, layers, with the same weights), timed only:
   its model code may compute other reconstructions (the decoder seeding changed since c6b8676).
   Both are checked against 625 float32 full passes a clip (``score_assignments_bruteforce``, run
   once): max table difference, and the reward argmax agreement per metric at the default weights and
   at w_l in {0.1, 0.01, 0} (quality-dominated labels, the most sensitive). ``--precision-check`` adds
   the walk under bf16 autocast to show why reduced precision is not used.
2. Stage, each run in a fresh subprocess with its own local Ray (``num_cpus=2``), timing ``run_label``
   alone (Ray Data planning, actor start and model load, scoring, merge, stats, labels) on the same
   clips (``--stage-clips`` clips from synthetic videos, ingested by the plain shard function in shards
   of ``--videos-per-shard`` videos, 3 clips each, like the tiny recipe's equal shards) and the same
   saved proxy: 1 actor and 2 actors (``label.num_cpus_per_actor=1``: one torch thread each), and,
   with ``--legacy-rev``, the stage of that git revision (``git archive``, run with it first on
   PYTHONPATH) with 2 actors. Against the scorer alone: ``workflows.label.Scorer`` in a plain process
   at the same total threads (2), and two plain processes of 1 thread each scoring half the clips
   (``multiprocessing.Pool(2)``, the parallel ceiling), both at the niceness Ray gives its workers (15:
   on a shared machine a nice-0 baseline would win CPU from nice-15 actors, not be faster). Runs rotate
   order each repeat; medians. ``--only WORD ...`` keeps the runs whose name contains a word (``--only
   "2 actors"``: the current and the legacy stage with 2 actors). The issue's own setting, the tiny
   recipe's 192 clips in 4 shards: ``--stage-clips 192 --videos-per-shard 16``; at the default 48 clips
   the fixed cost of a stage (Ray Data's start, actor start and model load: ~2.7 s; merge, stats and
   labels: ~0.9 s) weighs 4x as much.

Prints clips/s of everything and the ratios: 2 actors / 1 actor (target >= 1.7), stage / scorer
alone (target >= 0.9), stage / 2-process ceiling, current stage / legacy stage (target >= 2).
Timings depend on the machine and on whatever else runs on it: the CPU and the load average are printed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
for k, v in {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
             "MLFLOW_DISABLE_TELEMETRY": "true", "DS_ACCELERATOR": "cpu", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}.items():
    os.environ.setdefault(k, v)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from evatok import synthetic, video  # noqa: E402
from evatok.assignment import AssignmentSpace, best_assignment, estimate_stats  # noqa: E402
from evatok.search import _mean_metrics, score_assignments, score_assignments_bruteforce  # noqa: E402
from evatok.tokenizer import PRESETS, AdaptiveTokenizer, PrefixState  # noqa: E402

WEIGHTS = [(1.2, 0.8), (1.0, 0.1), (1.0, 0.01), (1.0, 0.0)]


# ----------------------------------------------------------------------------- the walk before issue 11
@torch.inference_mode()
def legacy_walk(tokenizer: AdaptiveTokenizer, clips: torch.Tensor, lpips=None, batch_clips: int = 8):
    """``evatok.search.score_assignments`` as of c6b8676 (verbatim): metrics from ``frame_metrics`` on
    every node, target repeated per node, 5 blurred SSIM maps a node."""
    c = tokenizer.config
    nb, m, pt = c.num_blocks, len(c.counts), c.patch_t
    chunks = []
    for chunk in clips.split(batch_clips):
        b = chunk.shape[0]
        depth_tables: list[dict[str, torch.Tensor]] = [{} for _ in range(nb)]

        def visit(state: PrefixState, node: int) -> None:
            t = state.depth
            recon, _, children = tokenizer.prefix_step(state)
            target = chunk[:, :, t * pt:(t + 1) * pt].repeat(m, 1, 1, 1, 1)
            for name, v in _mean_metrics(recon.flatten(0, 1), target, lpips).items():
                table = depth_tables[t].setdefault(name, v.new_empty(b, m ** (t + 1)))
                table[:, node * m:(node + 1) * m] = v.view(m, b).t()
            if t + 1 < nb:
                for i, child in enumerate(children):
                    visit(child, node * m + i)

        visit(tokenizer.prefix_init(chunk), 0)
        chunks.append({name: sum(depth_tables[t][name].repeat_interleave(m ** (nb - 1 - t), 1)
                                 for t in range(nb)) / nb for name in depth_tables[0]})
    return {name: torch.cat([ch[name] for ch in chunks]) for name in chunks[0]}


# ----------------------------------------------------------------------------- helpers
def load_clips(n: int, size: int) -> torch.Tensor:
    """``n`` clips [N, 3, 16, size, size] in [-0.5, 0.5], one from each of ``n`` synthetic mp4s."""
    with tempfile.TemporaryDirectory() as d:
        synthetic.write_dataset(d, n=n, seed=1)
        clips = [video.decode_clips(str(p), clip_len=16, fps=8, size=size, max_clips=1)[1]
                 for p in sorted(Path(d).glob("*.mp4"))]
    return video.to_tensor(torch.from_numpy(np.concatenate(clips)))


def load() -> str:
    return "load average " + " ".join(open("/proc/loadavg").read().split()[:3])


def machine() -> str:
    """The CPU, as the ratios depend on it (oneDNN's GEMM is 2.2x MKL's on AMD EPYC, at par on Intel Xeon)."""
    info: dict[str, str] = {}
    try:
        for line in open("/proc/cpuinfo"):
            k, _, v = line.partition(":")
            info.setdefault(k.strip(), v.strip())
    except OSError:
        import platform

        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    return (f"{info.get('model name', '?')} ({info.get('vendor_id', '?')} family {info.get('cpu family', '?')} "
            f"model {info.get('model', '?')}), {os.cpu_count()} CPUs")


def agreement(tables: dict, ref: dict, space: AssignmentSpace) -> dict[str, list[int]]:
    """Per metric: clips whose reward argmax equals the reference's, at each of ``WEIGHTS``."""
    out = {}
    for name in ("mse", "psnr", "ssim"):
        st = estimate_stats(ref[name], space.totals, metric=name)
        out[name] = [int((best_assignment(tables[name], space.totals, st, wq, wl) ==
                          best_assignment(ref[name], space.totals, st, wq, wl)).sum()) for wq, wl in WEIGHTS]
    return out


def legacy_package(rev: str, dest: Path):
    """The ``evatok`` package of git revision ``rev`` importable beside the current one, as
    ``evatok_legacy`` (its own tokenizer, layers, quantizer, metrics and search): its ``search`` module."""
    import importlib
    import re

    arch = subprocess.run(["git", "-C", str(REPO), "archive", rev, "evatok"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=arch.stdout, check=True)
    pkg = dest / "evatok_legacy"
    (dest / "evatok").rename(pkg)
    for f in pkg.glob("*.py"):
        f.write_text(re.sub(r"\b(from|import) evatok\b", r"\1 evatok_legacy", f.read_text()))
    sys.path.insert(0, str(dest))
    return importlib.import_module("evatok_legacy.search")


def search_section(a) -> None:
    from workflows.label import tune_allocator

    torch.set_num_threads(a.threads)
    tuned = tune_allocator()  # as in a label actor; one process, so both walks run with it
    torch.manual_seed(0)
    model = AdaptiveTokenizer(PRESETS[a.preset]()).eval()
    x = load_clips(a.search_clips, model.config.size)
    space = AssignmentSpace(model.config.counts, model.config.num_blocks)
    fns = {"current walk": lambda: score_assignments(model, x, batch_clips=a.batch),
           "legacy walk": lambda: legacy_walk(model, x, batch_clips=a.batch)}
    tmp = None
    if a.legacy_rev:  # the revision's whole walk: its search, tokenizer and layers, the same weights
        tmp = tempfile.TemporaryDirectory()
        old = legacy_package(a.legacy_rev, Path(tmp.name))
        oldtok = sys.modules["evatok_legacy.tokenizer"]
        old_model = oldtok.AdaptiveTokenizer(oldtok.PRESETS[a.preset]()).eval()
        old_model.load_state_dict(model.state_dict())  # its decoder seeding may differ: timing only
        fns[f"{a.legacy_rev} walk"] = lambda: old.score_assignments(old_model, x, batch_clips=a.batch)
    if a.precision_check:
        fns["current walk bf16"] = lambda: score_assignments(model, x, batch_clips=a.batch, precision="bf16")
    score_assignments(model, x[:1], batch_clips=1)  # warm-up (allocator, kernels)
    times = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    tables = {}
    names = list(fns)
    for r in range(a.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0, c0 = time.perf_counter(), time.process_time()
            tables[name] = fns[name]()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    t0 = time.perf_counter()
    ref = score_assignments_bruteforce(model, x, batch_clips=a.batch)
    t_brute = time.perf_counter() - t0
    print(f"\n== search: preset={a.preset} (random init) clips={a.search_clips} batch={a.batch} threads={a.threads} "
          f"repeats={a.repeats}, allocator tuned for both: {tuned}; {load()}")
    for k in names + ["625 full passes"]:
        wall = statistics.median(times[k]) if k in times else t_brute
        extra = (f"(wall runs {', '.join(f'{t:.2f}' for t in times[k])}; CPU s median {statistics.median(cpu[k]):.2f})"
                 if k in times else "(once)")
        print(f"  {k:18s} median {wall:7.2f} s -> {a.search_clips / wall:6.3f} clips/s  {extra}")
    w = {k: statistics.median(v) for k, v in times.items()}
    c = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"  current walk vs legacy walk: {w['legacy walk'] / w['current walk']:.2f}x wall, "
          f"{c['legacy walk'] / c['current walk']:.2f}x CPU time; vs 625 full passes {t_brute / w['current walk']:.2f}x")
    if a.legacy_rev:
        k = f"{a.legacy_rev} walk"
        print(f"  current walk vs {k} (its own model code): {w[k] / w['current walk']:.2f}x wall, "
              f"{c[k] / c['current walk']:.2f}x CPU time")
    header = "w_l=" + "/".join(f"{wl:g}" for _, wl in WEIGHTS)
    for k in names:
        if a.legacy_rev and k == f"{a.legacy_rev} walk":
            continue  # another model computation (the revision's tokenizer): not compared
        diff = max(float((tables[k][m] - ref[m]).abs().max()) for m in ref)
        agree = agreement(tables[k], ref, space)
        txt = "  ".join(f"{m} {'/'.join(str(v) for v in agree[m])}" for m in agree)
        full = all(v == a.search_clips for vs in agree.values() for v in vs)
        print(f"  {k:18s} vs 625 full passes: max |diff| {diff:.2e}; argmax agreement ({header}, of {a.search_clips}): "
              f"{txt} -> {'100%' if full else 'NOT 100%'}")


# ----------------------------------------------------------------------------- stage section
STAGE_RUN = r"""
import json, sys, time, ray
ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200_000_000, log_to_driver=False)
from workflows.config import load_config
from workflows.label import run_label
cfg = load_config(None, sys.argv[1:])
t0 = time.perf_counter()
s = run_label(cfg, quiet=True)
dt = time.perf_counter() - t0
import workflows.label as L
print("RESULT " + json.dumps({"seconds": dt, "clips": s.clips, "module": L.__file__}))
"""

SCORER_RUN = r"""
import json, sys, time
from multiprocessing import Pool

def part(args):
    proxy, uri, threads, batch, lo, hi = args
    from workflows import storage
    from workflows.label import Scorer
    scorer = Scorer(proxy, batch_size=batch, num_threads=threads)
    table = storage.read_table(uri, columns=["clip_id", "shape", "frames"])
    t0 = time.perf_counter()
    scorer.score(table.slice(lo, hi - lo))
    return time.perf_counter() - t0, hi - lo

if __name__ == "__main__":
    import os
    proxy, uri, procs, batch, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    os.nice(int(sys.argv[6]))  # the niceness Ray gives its workers (RAY_worker_niceness, 15): same priority
    t0 = time.perf_counter()
    if procs == 1:
        out = [part((proxy, uri, 2, batch, 0, n))]
    else:
        cuts = [n * i // procs for i in range(procs + 1)]
        with Pool(procs) as pool:
            out = pool.map(part, [(proxy, uri, 1, batch, cuts[i], cuts[i + 1]) for i in range(procs)])
    # the scoring span: the slowest process's scoring (model load and table read excluded)
    print("RESULT " + json.dumps({"seconds": max(s for s, _ in out), "clips": sum(c for _, c in out),
                                   "wall": time.perf_counter() - t0}))
"""


def _kill_session(sid: int) -> None:
    """SIGKILL what is left of the session ``sid`` (a timed-out run and the Ray it started)."""
    import signal

    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[3]) == sid:
                        os.kill(int(d), signal.SIGKILL)
            except (OSError, ValueError, IndexError):
                pass


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float) -> dict:
    """Run one measurement in its own session; a run past ``timeout`` is killed and reported as such."""
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_session(p.pid)
        p.communicate()
        return {"seconds": float("inf"), "timed_out": True}
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({p.returncode}):\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def legacy_proxy(proxy: Path, legacy: Path, dest: Path) -> None:
    """The proxy file for the legacy stage: the same weights, written with only the config fields the legacy
    revision's ``TokenizerConfig`` knows (fields added since, e.g. ``entropy_tokens``, would make its loader
    refuse the file). A dropped field must be at the value the legacy code implies (its default there), or
    the two stages would run different models; ``query_init`` is the known exception (the decoder seeding
    changed since c6b8676: the legacy model computes other reconstructions at the same cost)."""
    import ast
    import dataclasses

    from evatok.export import load_payload

    payload = load_payload(proxy)
    tree = ast.parse((legacy / "evatok" / "tokenizer.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TokenizerConfig")
    known = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    from evatok.tokenizer import TokenizerConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TokenizerConfig)}
    dropped = {k: v for k, v in payload["config"].items() if k not in known}
    changed = {k: v for k, v in dropped.items() if k != "query_init" and v != defaults.get(k)}
    if changed:  # a field away from its default: the legacy model could not be the same model
        raise SystemExit(f"legacy revision lacks config fields set away from their defaults: {changed}")
    payload["config"] = {k: v for k, v in payload["config"].items() if k in known}
    torch.save(payload, dest)
    print(f"  legacy proxy: same weights, config fields the legacy code lacks dropped: {sorted(dropped)}")


def stage_section(a) -> None:
    from evatok.export import save_model
    from workflows.config import load_config
    from workflows.ingest import discover, process_shard

    work = Path(tempfile.mkdtemp(prefix="label-bench-"))
    try:
        n_videos = -(-a.stage_clips // 3)
        synthetic.write_dataset(work / "videos", n=n_videos, seed=2)
        cfg = load_config(None, [f"data.size={PRESETS[a.preset]().size}"])
        refs = discover(str(work / "videos"))
        for i in range(0, len(refs), a.videos_per_shard):
            process_shard(i // a.videos_per_shard, refs[i:i + a.videos_per_shard], str(work / "ingest"), cfg.data)
        clips_uri = str(work / "ingest" / "clips")
        from workflows import storage

        n_clips = storage.read_table(clips_uri, columns=["clip_id"]).num_rows
        shards = len(storage.list_parquet(clips_uri))
        torch.manual_seed(0)
        save_model(AdaptiveTokenizer(PRESETS[a.preset]()).eval(), str(work / "proxy.pt"), meta={"note": "bench"})
        legacy = None
        if a.legacy_rev:
            legacy = work / "legacy"
            legacy.mkdir()
            arch = subprocess.run(["git", "-C", str(REPO), "archive", a.legacy_rev], capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", str(legacy)], input=arch.stdout, check=True)
            legacy_proxy(work / "proxy.pt", legacy, work / "proxy-legacy.pt")
        env = dict(os.environ, PYTHONPATH=str(REPO))
        base = [f"label.clips={work / 'ingest'}", f"label.proxy={work / 'proxy.pt'}", "label.metric=mse",
                f"label.batch_size={a.batch}", "label.num_cpus_per_actor=1", "label.stats_samples=2000"]
        stage = [sys.executable, "-c", STAGE_RUN, *base]
        scorer = [sys.executable, "-c", SCORER_RUN, str(work / "proxy.pt"), clips_uri]
        units = f"label.clips_per_task={a.clips_per_task}"
        nice = os.environ.get("RAY_worker_niceness", "15")  # Ray starts its workers at this niceness
        runs = {
            "stage, 1 actor": lambda o: _run([*stage, f"label.output={o}", "label.num_actors=1", units],
                                             REPO, env, a.run_timeout),
            "stage, 2 actors": lambda o: _run([*stage, f"label.output={o}", "label.num_actors=2", units],
                                              REPO, env, a.run_timeout),
            "scorer alone, 2 processes x 1 thread": lambda o: _run([*scorer, "2", str(a.batch), str(n_clips), nice],
                                                                   REPO, env, a.run_timeout),
        }
        if not a.no_1x2:  # two OpenMP threads in one process: on a busy machine they spin-wait on each other
            runs["scorer alone, 1 process x 2 threads"] = lambda o: _run([*scorer, "1", str(a.batch), str(n_clips), nice],
                                                                         REPO, env, a.run_timeout)
        if legacy is not None:  # the old code first on the path: its own label.py, search.py, config.py
            lenv = dict(os.environ, PYTHONPATH=str(legacy))
            lstage = [*stage[:-len(base)], *base[:1], f"label.proxy={work / 'proxy-legacy.pt'}", *base[2:]]
            runs[f"legacy stage ({a.legacy_rev}), 2 actors"] = lambda o: _run(
                [*lstage, f"label.output={o}", "label.num_actors=2"], legacy, lenv, a.run_timeout)
        names = [k for k in runs if not a.only or any(w in k for w in a.only)]
        secs = {k: [] for k in names}
        print(f"\n== stage: {n_clips} clips in {shards} shards, preset={a.preset} (random init), batch={a.batch}, "
              f"clips_per_task={a.clips_per_task}, repeats={a.repeats}; {load()}", flush=True)
        for r in range(a.repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                out = work / f"out-{len(sum(secs.values(), []))}"
                res = runs[name](out)
                if "module" in res and legacy is not None and "legacy" in name:
                    assert str(legacy) in res["module"], res  # the legacy stage really ran the old code
                assert res.get("timed_out") or res["clips"] == n_clips, res
                secs[name].append(res["seconds"])
                shutil.rmtree(out, ignore_errors=True)
                print(f"  [{r}] {name}: {res['seconds']:.1f} s ({n_clips / res['seconds']:.3f} clips/s); {load()}",
                      flush=True)
        cps = {k: n_clips / statistics.median(v) for k, v in secs.items()}
        print(f"\n== stage results (medians of {a.repeats}; clips/s):")
        for k in names:
            print(f"  {k:40s} {cps[k]:7.3f} clips/s  (runs: {', '.join(f'{s:.1f}' for s in secs[k])} s)")
        s2 = cps.get("stage, 2 actors")
        if s2 and "stage, 1 actor" in cps:
            print(f"  2 actors / 1 actor                        {s2 / cps['stage, 1 actor']:.2f}x   (target >= 1.7)")
        if s2 and "scorer alone, 1 process x 2 threads" in cps:
            print(f"  stage (2 actors) / scorer alone 1x2 thr   "
                  f"{s2 / cps['scorer alone, 1 process x 2 threads']:.2f}    (target >= 0.9)")
        if s2 and "scorer alone, 2 processes x 1 thread" in cps:
            print(f"  stage (2 actors) / 2 plain processes      {s2 / cps['scorer alone, 2 processes x 1 thread']:.2f}"
                  f"    (target >= 0.9; the stricter baseline: same processes and threads as the 2 actors)")
        if s2 and legacy is not None and f"legacy stage ({a.legacy_rev}), 2 actors" in cps:
            print(f"  stage / legacy stage ({a.legacy_rev})        "
                  f"{s2 / cps[f'legacy stage ({a.legacy_rev}), 2 actors']:.2f}x   (target >= 2)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--search-clips", type=int, default=4)
    p.add_argument("--stage-clips", type=int, default=48)
    p.add_argument("--videos-per-shard", type=int, default=4, help="ingest shard size (3 clips a video)")
    p.add_argument("--batch", type=int, default=4, help="clips per search batch (label.batch_size), both sides")
    p.add_argument("--clips-per-task", type=int, default=8, help="label.clips_per_task of the stage runs")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the search section")
    p.add_argument("--legacy-rev", default="", help="git revision whose label stage to run as the baseline")
    p.add_argument("--precision-check", action="store_true", help="also time and check the walk under bf16")
    p.add_argument("--run-timeout", type=float, default=3600, help="seconds before a stage/scorer run is killed")
    p.add_argument("--no-1x2", action="store_true", help="skip the scorer in one process with 2 threads "
                   "(on a loaded machine its two OpenMP threads spin-wait and it can take 10-100x longer)")
    p.add_argument("--only", nargs="+", default=[], metavar="WORD",
                   help="stage runs whose name contains one of these words (e.g. '2 actors' legacy); default all")
    p.add_argument("--skip-search", action="store_true")
    p.add_argument("--skip-stage", action="store_true")
    a = p.parse_args(argv)
    print(f"machine: {machine()}", flush=True)
    if not a.skip_search:
        search_section(a)
    if not a.skip_stage:
        stage_section(a)


if __name__ == "__main__":
    main()
