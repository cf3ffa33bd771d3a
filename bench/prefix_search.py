"""Micro-benchmark: the prefix-tree walk (``score_assignments``) vs the best naive search
(``score_assignments_bruteforce``: 625 full passes batched across clips and equal-length assignments).

The model is the ``tiny`` preset at random initialisation (timing and agreement do not depend on training).
Both searches run interleaved in one process, ``--repeats`` times; the medians are reported.

    python bench/prefix_search.py [--clips 2] [--batch-clips 2] [--repeats 3] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from evatok.search import score_assignments, score_assignments_bruteforce
from evatok.tokenizer import PRESETS, AdaptiveTokenizer


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--clips", type=int, default=2)
    ap.add_argument("--batch-clips", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AdaptiveTokenizer(PRESETS[args.preset]()).eval()  # random init
    c = model.config
    low = torch.rand(args.clips, 3, 4, c.size // 8, c.size // 8)
    clips = F.interpolate(low, size=(c.frames, c.size, c.size), mode="trilinear") - 0.5
    score_assignments(model, clips[:1], batch_clips=1)  # warm-up (allocator, kernels)
    t_tree, t_brute, c_tree, c_brute = [], [], [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        tree = score_assignments(model, clips, batch_clips=args.batch_clips)
        t1, c1 = time.perf_counter(), time.process_time()
        brute = score_assignments_bruteforce(model, clips, batch_clips=args.batch_clips)
        t2, c2 = time.perf_counter(), time.process_time()
        t_tree.append(t1 - t0)
        t_brute.append(t2 - t1)
        c_tree.append(c1 - c0)
        c_brute.append(c2 - c1)
    mt, mb = statistics.median(t_tree), statistics.median(t_brute)
    ct, cb = statistics.median(c_tree), statistics.median(c_brute)
    print(f"preset={args.preset} (random init) clips={args.clips} batch_clips={args.batch_clips} "
          f"threads={torch.get_num_threads()} repeats={args.repeats}")
    print(f"625 full passes (brute force): median {mb:.2f} s  runs {[round(t, 2) for t in t_brute]}")
    print(f"prefix-tree walk             : median {mt:.2f} s  runs {[round(t, 2) for t in t_tree]}")
    print(f"speed-up (brute / tree)      : {mb / mt:.2f}x wall; {cb / ct:.2f}x CPU time "
          f"(process CPU s: brute {cb:.1f}, tree {ct:.1f}; CPU time is the steadier figure on a shared machine)")
    for name in tree:
        diff = float((tree[name] - brute[name]).abs().max())
        agree = float((tree[name].argmax(1) == brute[name].argmax(1)).float().mean())
        print(f"  {name:5s} max |tree - brute| = {diff:.3g}   argmax agreement = {agree:.0%}")


if __name__ == "__main__":
    main()
