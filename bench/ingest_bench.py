"""Ingest benchmark (not a test): the ingest stage against the decode ceiling, measured in one run.

    .venv/bin/python bench/ingest_bench.py [--videos 256] [--repeats 3] [--videos-per-task 16]

Videos shaped like UCF-101's (320x240, 25 fps, 6 s, h264; ``evatok.synthetic``) become the tiny
recipe's clips (16 frames at 8 fps, 64x64). Three ways, interleaved (the order rotates each repeat):

- ceiling: a plain ``multiprocessing.Pool(2)`` running the project's own decoder
  (``evatok.video.decode_clips``, decord with in-decoder scaling) over the same files, one video a
  task; the clips are decoded and dropped (nothing written, nothing sent back but a count);
- ingest, isolated: ``run_ingest`` on a warm local Ray (2 CPUs), ``ingest.decode_isolation=true``
  (each video decoded in a killable child process of the task, the default), Parquet writes included;
- ingest, in-process: the same with ``ingest.decode_isolation=false``.

Ray starts once before the first measured run, and one small ingest warms its workers. Prints each
run, the best and the median of each way, and the ratios ceiling_time / ingest_time (clips/s of
ingest over the ceiling's; docs/ARCHITECTURE.md, "Decoding", asks >= 0.85). The load average is
printed: on a shared machine, read the ratios of runs made back to back, not the absolute times.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
for k, v in {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
             "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}.items():
    os.environ.setdefault(k, v)

CLIP = dict(clip_len=16, fps=8.0, size=64)


def _decode_one(path: str) -> int:
    from evatok.video import decode_clips

    return len(decode_clips(path, **CLIP)[0])


def ceiling(paths: list[str], procs: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    with get_context("fork").Pool(procs) as pool:
        n = sum(pool.imap_unordered(_decode_one, paths, chunksize=1))
    return time.perf_counter() - t0, n


def ingest(src: Path, out: Path, isolation: bool, videos_per_task: int) -> tuple[float, int]:
    from workflows.config import load_config
    from workflows.ingest import run_ingest

    cfg = load_config(None, [f"ingest.source={src}", f"ingest.output={out}", f"ingest.videos_per_task={videos_per_task}",
                             f"ingest.decode_isolation={str(isolation).lower()}", f"data.size={CLIP['size']}",
                             f"data.fps={CLIP['fps']}", f"data.clip_len={CLIP['clip_len']}"])
    t0 = time.perf_counter()
    s = run_ingest(cfg, quiet=True)
    dt = time.perf_counter() - t0
    if s.errors:
        raise RuntimeError(f"ingest errors: {s.errors}")
    return dt, s.clips


def load() -> str:
    return "load average " + " ".join(open("/proc/loadavg").read().split()[:3])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--videos", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--videos-per-task", type=int, default=16)
    p.add_argument("--procs", type=int, default=2, help="processes of the ceiling pool (= Ray CPUs)")
    p.add_argument("--seconds", type=float, default=6.0, help="video length")
    a = p.parse_args(argv)

    from evatok import synthetic

    work = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    try:
        src = work / "videos"
        t0 = time.perf_counter()
        synthetic.write_dataset(src, n=a.videos, seed=0, num_frames=int(round(25 * a.seconds)), height=240, width=320,
                                fps=25.0)
        (src / "manifest.csv").unlink()  # a plain folder of videos
        paths = sorted(str(p) for p in src.glob("*.mp4"))
        print(f"{len(paths)} videos 320x240, 25 fps, {a.seconds:g} s written in {time.perf_counter() - t0:.1f} s "
              f"({sum(os.path.getsize(p) for p in paths) / 1e6:.1f} MB)", flush=True)

        import ray

        ray.init(num_cpus=a.procs, include_dashboard=False, object_store_memory=300_000_000, log_to_driver=False)
        warm = work / "warm"
        warm.mkdir()
        for pth in paths[:4]:
            shutil.copy(pth, warm)
        ingest(warm, work / "warm-out", True, 2)  # starts Ray Data's workers

        ways = {
            f"ceiling: Pool({a.procs}) x decode_clips": lambda i: ceiling(paths, a.procs),
            "run_ingest, decode_isolation=true": lambda i: ingest(src, work / f"out-{i}", True, a.videos_per_task),
            "run_ingest, decode_isolation=false": lambda i: ingest(src, work / f"out-{i}", False, a.videos_per_task),
        }
        names = list(ways)
        times: dict[str, list[float]] = {k: [] for k in names}
        clips = {}
        print(f"videos_per_task={a.videos_per_task}, repeats={a.repeats}; {load()}", flush=True)
        run = 0
        for r in range(a.repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                dt, n = ways[name](run)
                shutil.rmtree(work / f"out-{run}", ignore_errors=True)
                run += 1
                times[name].append(dt)
                clips[name] = n
                print(f"  [{r}] {name:40s} {dt:6.2f} s  {n} clips  {n / dt:6.1f} clips/s; {load()}", flush=True)
        if len(set(clips.values())) != 1:
            raise RuntimeError(f"the ways disagree on the clip count: {clips}")
        ceil = names[0]
        print("\nbest (median) of each, and ceiling time / ingest time (>= 0.85 wanted):")
        for name in names:
            best, med = min(times[name]), statistics.median(times[name])
            ratio = "" if name == ceil else (f"   ratio best {min(times[ceil]) / best:.2f}, median "
                                             f"{statistics.median(times[ceil]) / med:.2f}")
            print(f"  {name:40s} {best:6.2f} s ({med:6.2f} s)  {clips[name] / best:6.1f} clips/s{ratio}")
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
