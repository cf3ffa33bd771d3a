"""Label search benchmark: prefix-tree walk vs 625 independent full passes, same process, interleaved.

    python bench/label_bench.py --clips 4 --repeats 3 [--preset tiny] [--threads 2]

Both searches score the same clips (real synthetic mp4s, decoded as the ingest stage does) with the
same random-init proxy; each repeat runs prefix then brute force back to back (order alternating),
and the medians are reported. It prints clips/s for each, the speed ratio and the argmax agreement
under the default reward (w_q=1.2, w_l=0.8, MSE, statistics from the brute-force table). Not a test:
timings depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from evatok import synthetic, video
from evatok.assignment import AssignmentSpace, best_assignment, estimate_stats
from evatok.search import score_assignments, score_assignments_bruteforce
from evatok.tokenizer import PRESETS, AdaptiveTokenizer


def load_clips(n: int, size: int) -> torch.Tensor:
    with tempfile.TemporaryDirectory() as d:
        synthetic.write_dataset(d, n=n, seed=1)
        clips = [video.decode_clips(str(p), clip_len=16, fps=8, size=size, max_clips=1)[1]
                 for p in sorted(Path(d).glob("*.mp4"))]
    return video.to_tensor(torch.from_numpy(np.concatenate(clips)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--clips", type=int, default=4)
    p.add_argument("--batch", type=int, default=4, help="clips per batch (both searches)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = AdaptiveTokenizer(PRESETS[a.preset]()).eval()
    x = load_clips(a.clips, model.config.size)
    space = AssignmentSpace(model.config.counts, model.config.num_blocks)
    times = {"prefix": [], "bruteforce": []}
    fns = {"prefix": score_assignments, "bruteforce": score_assignments_bruteforce}
    tables = {}
    for r in range(a.repeats):
        for name in (("prefix", "bruteforce") if r % 2 == 0 else ("bruteforce", "prefix")):
            t0 = time.perf_counter()
            tables[name] = fns[name](model, x, batch_clips=a.batch)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    stats = estimate_stats(tables["bruteforce"]["mse"], space.totals, metric="mse")
    best = {k: best_assignment(t["mse"], space.totals, stats) for k, t in tables.items()}
    agree = float((best["prefix"] == best["bruteforce"]).float().mean()) * 100
    maxdiff = max(float((tables["prefix"][m] - tables["bruteforce"][m]).abs().max()) for m in tables["prefix"])
    print(f"preset={a.preset} clips={a.clips} batch={a.batch} threads={a.threads} repeats={a.repeats}")
    for k in ("prefix", "bruteforce"):
        print(f"  {k:10s} median {med[k]:8.2f} s  -> {a.clips / med[k]:7.3f} clips/s   (runs: "
              + ", ".join(f"{t:.2f}" for t in times[k]) + ")")
    print(f"  speedup {med['bruteforce'] / med['prefix']:.2f}x   argmax agreement {agree:.1f}%   "
          f"max |table diff| {maxdiff:.2e}")


if __name__ == "__main__":
    main()
