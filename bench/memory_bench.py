"""Memory benchmark (not a test): peak RSS of the ingest and label workers as the input grows 10x.

    .venv/bin/python bench/memory_bench.py [--videos 4] [--seconds 6] [--proxy tiny|micro]

Four inputs, UCF-101-shaped synthetic videos (320x240, 25 fps, h264): a set of ``--videos`` videos of
``--seconds`` s; a set 10x larger (10x the videos); one video of ``--seconds`` s; one video 10x longer.
Each goes through the real stages on a fresh local Ray (2 CPUs): ``run_ingest`` (the tiny recipe's
clips, ``ingest.videos_per_task=16``, decode isolation on) then ``run_label`` (a random-init proxy,
2 actors, ``label.clips_per_task=8``). While a stage runs, every Ray worker process (``ray::...``
titles, Ray's own system actors excluded) that has run the stage's function (``_ingest_batch``,
``_LabelActor``; not an idle worker left from the previous stage) is sampled every 0.1 s with its child
processes (the decode child of ingest's isolation): the peak of worker + children RSS is that stage's
worker peak, printed with the worker's anon / file / shmem split at that moment.
Prints the peaks and the growth of the 10x inputs over the 1x ones (target: < 20%).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
for k, v in {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
             "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}.items():
    os.environ.setdefault(k, v)

SYSTEM = ("_StatsActor", "Dashboard", "RuntimeEnv", "AutoscalingRequester", "SplitCoordinator", "JobSupervisor")
MICRO = dict(size=64, counts=(1, 2, 4, 8, 16), enc_dim=32, enc_layers=1, enc_heads=2, dec_dim=32, dec_layers=1,
             dec_heads=2, codebook_size=64, code_dim=4)


def rss_parts(pid: int) -> dict[str, int]:
    """``/proc/PID/status`` RssAnon / RssFile / RssShmem in bytes (private heap, mapped files such as
    shared libraries, and shared memory such as Ray's object store mapped into the worker)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                k, v = line.split(":")
                out[k[3:].lower()] = int(v.split()[0]) * 1024
    return out


class WorkerPeak:
    """Samples the RSS of the stage's Ray worker processes (+ their children) in a thread; ``peak`` in
    bytes, and ``parts`` the anon / file / shmem split of the worker (without children) at that peak.
    ``match``: a worker counts once its title has contained this (``_ingest_batch``, ``_LabelActor``),
    for as long as it lives: an idle worker left over from the previous stage (``ray::IDLE``, with its
    decode child) is not the label actor's memory."""

    def __init__(self, match: str, interval: float = 0.1):
        self.match, self.interval, self.peak, self.workers, self.parts = match, interval, 0, set(), {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            for p in psutil.process_iter(["pid", "cmdline"]):
                try:
                    title = " ".join(p.info["cmdline"] or [])
                    if not title.startswith("ray::") or any(s in title for s in SYSTEM):
                        continue
                    if self.match in title:
                        self.workers.add(p.info["pid"])
                    if p.info["pid"] not in self.workers:
                        continue
                    rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                    parts = rss_parts(p.info["pid"]) if rss > self.peak else None
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
                    continue
                if parts is not None:
                    self.peak, self.parts = rss, parts
            self._stop.wait(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def measure(src: Path, work: Path, proxy: str, name: str) -> dict:
    import ray

    from workflows.config import load_config
    from workflows.ingest import run_ingest
    from workflows.label import run_label

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=300_000_000, log_to_driver=False)
    try:
        out, lab = work / f"{name}-ingest", work / f"{name}-label"
        cfg = load_config(None, [f"ingest.source={src}", f"ingest.output={out}", "ingest.videos_per_task=16",
                                 f"label.clips={out}", f"label.proxy={proxy}", f"label.output={lab}",
                                 "label.metric=mse", "label.num_actors=2", "label.batch_size=4",
                                 "label.clips_per_task=8", "label.stats_samples=2000"])
        t0 = time.perf_counter()
        with WorkerPeak("_ingest_batch") as ing:
            s = run_ingest(cfg, quiet=True)
        t1 = time.perf_counter()
        with WorkerPeak("_LabelActor") as lbl:
            run_label(cfg, quiet=True)
        t2 = time.perf_counter()
        return {"clips": s.clips, "ingest": ing.peak, "label": lbl.peak, "ingest_s": t1 - t0, "label_s": t2 - t1,
                "ingest_parts": ing.parts, "label_parts": lbl.parts}
    finally:
        ray.shutdown()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--videos", type=int, default=4)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--proxy", choices=("tiny", "micro"), default="tiny",
                   help="label model: the tiny preset, or a 1-layer micro model (quick runs; same plumbing)")
    a = p.parse_args(argv)

    import torch

    from evatok import synthetic
    from evatok.export import save_model
    from evatok.tokenizer import PRESETS, AdaptiveTokenizer, TokenizerConfig

    work = Path(tempfile.mkdtemp(prefix="memory-bench-"))
    try:
        torch.manual_seed(0)
        model = AdaptiveTokenizer(PRESETS["tiny"]() if a.proxy == "tiny" else TokenizerConfig(**MICRO)).eval()
        proxy = str(work / "proxy.pt")
        save_model(model, proxy)
        frames = int(round(25 * a.seconds))
        video = dict(height=240, width=320, fps=25.0)
        inputs = {
            f"{a.videos} videos x {a.seconds:g} s": dict(n=a.videos, num_frames=frames),
            f"{10 * a.videos} videos x {a.seconds:g} s": dict(n=10 * a.videos, num_frames=frames),
            f"1 video x {a.seconds:g} s": dict(n=1, num_frames=frames),
            f"1 video x {10 * a.seconds:g} s": dict(n=1, num_frames=10 * frames),
        }
        res = {}
        for i, (name, kw) in enumerate(inputs.items()):
            src = work / f"videos-{i}"
            synthetic.write_dataset(src, seed=i, **kw, **video)
            (src / "manifest.csv").unlink()
            res[name] = measure(src, work, proxy, f"run{i}")
            r = res[name]
            print(f"{name:24s} {r['clips']:5d} clips  ingest worker peak {r['ingest'] / 2**20:7.1f} MiB "
                  f"({r['ingest_s']:.1f} s)  label worker peak {r['label'] / 2**20:7.1f} MiB ({r['label_s']:.1f} s)",
                  flush=True)
            for stage in ("ingest", "label"):
                print(f"    {stage} worker at its peak: " + ", ".join(
                    f"{k} {v / 2**20:.1f} MiB" for k, v in r[f"{stage}_parts"].items()), flush=True)
        names = list(inputs)
        print(f"\ngrowth of the peak for 10x the input (target < 20%), proxy={a.proxy}:")
        for small, big in [(names[0], names[1]), (names[2], names[3])]:
            for stage in ("ingest", "label"):
                g = res[big][stage] / res[small][stage] - 1
                print(f"  {stage:6s} {small} -> {big}: {res[small][stage] / 2**20:.1f} -> "
                      f"{res[big][stage] / 2**20:.1f} MiB ({g:+.1%})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
