"""Are the labels informative? From a label stage's scores/ alone (no model), for each metric and a sweep of
reward weights (w_q + w_l = 2, as the paper sweeps them): how many distinct assignments the labels use,
the share of the most common one, the mean label length per class, and the majority-label baseline the
router's top-1 has to beat.

    python bench/label_spread.py --label runs/tiny/label --clips runs/tiny/data

A label set where one assignment takes most clips, or whose static clips get as many tokens as the
fast-motion ones, cannot teach a router anything: its perfect top-1 would be a constant.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evatok.assignment import AssignmentSpace, RewardStats, best_assignment  # noqa: E402
from workflows import storage  # noqa: E402
from workflows.train.data import parquet_prefix  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--label", required=True, help="the label stage's output prefix (scores/, stats.json)")
    ap.add_argument("--clips", required=True, help="the ingest output the labels were made from (for classes)")
    ap.add_argument("--metrics", default="mse,psnr,ssim")
    ap.add_argument("--wq", default="0.8,1.0,1.2,1.4,1.6")
    a = ap.parse_args()
    stats = json.loads(storage.read_bytes(storage.join(a.label, "stats.json")))
    counts = stats.get("counts") or [8, 16, 32, 64, 128]
    space = AssignmentSpace(counts, 4)
    totals = space.totals.numpy()
    scores = storage.read_table(storage.join(a.label, "scores"))
    clips = storage.read_table(parquet_prefix(a.clips), columns=["clip_id", "label"])
    cls = dict(zip(clips.column("clip_id").to_pylist(), clips.column("label").to_pylist()))
    ids = scores.column("clip_id").to_pylist()
    classes = [cls.get(i) for i in ids]
    print(f"{len(ids)} clips, {len(set(classes))} classes")
    for metric in a.metrics.split(","):
        if metric not in scores.column_names or metric not in stats["metrics"]:
            continue
        d = np.stack(scores.column(metric).to_numpy(zero_copy_only=False)).astype(np.float64)
        st = RewardStats(**stats["metrics"][metric])
        spread = d.max(1) - d.min(1)
        print(f"\n{metric}: per clip, best - worst of the 625 = {spread.mean():.4g} on average "
              f"(normalised: {spread.mean() / st.sigma_d:.2f} sigma)")
        for wq in (float(x) for x in a.wq.split(",")):
            lab = best_assignment(d, totals, st, wq, 2.0 - wq)
            c = Counter(lab.tolist())
            top, n = c.most_common(1)[0]
            per = defaultdict(list)
            for k, lbl in zip(classes, lab):
                per[k].append(totals[lbl])
            by_cls = " ".join(f"{k}:{np.mean(v):.0f}" for k, v in sorted(per.items(), key=lambda kv: np.mean(kv[1])))
            print(f"  w_q {wq:.1f} w_l {2 - wq:.1f}: {len(c):3d} distinct, top {tuple(space.table[top].tolist())} "
                  f"{n / len(lab):.0%} (majority-label top-1 baseline), mean tokens {totals[lab].mean():.0f}; "
                  f"by class: {by_cls}")


if __name__ == "__main__":
    main()
