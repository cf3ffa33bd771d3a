"""Max-reward assignments against uniform ones at matched mean budgets, from the label stage's scores.

    python bench/label_frontier.py --label runs/study/label --clips runs/study/data [--val-every 8]

The label stage scores all 625 assignments of every clip with the proxy tokenizer (``scores/``), so the
quality of any assignment rule can be read off without running a model. On the **held-out videos** of
the tokenizers' split (one in ``--val-every`` by video id, as ``train`` and ``evaluate`` hold out), this
prints:

- the uniform curve: mean PSNR (per clip, mean over frames; then mean over clips) of the five uniform
  assignments, at 32..512 tokens a clip on the tiny preset;
- for reward weights w_q = 0.2 .. 1.9 (w_l = 2 - w_q; the paper trains routers for 0.8 .. 1.6), each
  clip's max-reward assignment: the mean tokens per clip, the mean PSNR, and the uniform curve's PSNR
  at the same mean tokens (linear between its two neighbouring points, as ``evatok evaluate`` and
  ``evatok compare`` interpolate), and the difference.

This is the paper's first finding (max-reward assignments beat uniform ones at every matched budget)
measured on the proxy that made the labels. The reward's statistics are the label run's own
(``stats.json``). It is a benchmark script: it prints what it measured and asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evatok.assignment import AssignmentSpace, RewardStats, best_assignment  # noqa: E402
from workflows import storage  # noqa: E402
from workflows.compare import interp  # noqa: E402  (the curve interpolation evaluate and compare use)
from workflows.relabel import scores_to_arrays  # noqa: E402
from workflows.train.data import held_out, parquet_prefix  # noqa: E402


def held_out_scores(label: str, clips: str, every: int, metrics=("mse", "psnr")) -> dict[str, np.ndarray]:
    vids = storage.read_table(parquet_prefix(clips), columns=["clip_id", "video_id"])
    video_of = dict(zip(map(str, vids.column("clip_id").to_pylist()), vids.column("video_id").to_pylist()))
    held = held_out(list(video_of.values()), every)
    parts: dict[str, list[np.ndarray]] = {m: [] for m in metrics}
    for uri in storage.list_parquet(storage.join(label, "scores")):
        t = storage.read_table(uri, columns=["clip_id", *metrics])
        keep = [i for i, c in enumerate(map(str, t.column("clip_id").to_pylist())) if video_of.get(c) in held]
        arrays = scores_to_arrays(t)
        for m in metrics:
            parts[m].append(arrays[m][keep])
    return {m: np.concatenate(p) for m, p in parts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--label", required=True, help="the label stage's output prefix (scores/, stats.json)")
    ap.add_argument("--clips", required=True, help="the ingest output the labels were made from")
    ap.add_argument("--val-every", type=int, default=8)
    ap.add_argument("--metric", default="mse", help="the reward's metric (mse, psnr, ssim, lpips)")
    ap.add_argument("--weights", default="0.2,0.4,0.6,0.8,1.0,1.2,1.4,1.6,1.8,1.9", help="w_q values; w_l = 2 - w_q")
    a = ap.parse_args()
    stats = json.loads(storage.read_bytes(storage.join(a.label, "stats.json")))
    space = AssignmentSpace(stats["counts"])
    metrics = tuple(dict.fromkeys([a.metric, "psnr"]))
    s = held_out_scores(a.label, a.clips, a.val_every, metrics)
    n = len(s["psnr"])
    totals = space.totals.numpy().astype(float)
    curve = [(float(totals[i]), float(s["psnr"][:, i].mean()), "") for i in space.uniform_indices().tolist()]
    print(f"{n} held-out clips (videos with crc32(video_id) % {a.val_every} == 0), proxy scores from "
          f"{storage.redact(a.label)}; reward metric {a.metric}")
    print("uniform: " + ", ".join(f"{x:.0f} tokens {y:.2f} dB" for x, y, _ in curve))
    st = RewardStats(**stats["metrics"][a.metric])
    print(f"\n{'w_q/w_l':>9} {'mean tokens':>12} {'labels dB':>10} {'uniform dB':>11} {'difference':>11} "
          f"{'distinct':>9} {'top share':>10}")
    for w_q in (float(w) for w in a.weights.split(",")):
        idx = np.asarray(best_assignment(s[a.metric], totals, st, w_q, 2.0 - w_q)).reshape(-1)
        tokens = float(totals[idx].mean())
        got = float(s["psnr"][np.arange(n), idx].mean())
        ref = interp(curve, tokens)
        ref = float("nan") if ref is None else ref
        share = np.bincount(idx, minlength=space.size).max() / n
        print(f"{w_q:4.1f}/{2 - w_q:3.1f} {tokens:12.1f} {got:10.2f} {ref:11.2f} {got - ref:+11.2f} "
              f"{len(set(idx.tolist())):9d} {share:10.0%}")


if __name__ == "__main__":
    main()
