"""Can a clip's label be predicted from its content? Router baselines from the label stage's scores.

    python bench/label_predictability.py --label runs/study/label --clips runs/study/data [--router R] [--val-every 8]

A router can only beat a constant where the labels depend on something it sees. This measures how much
of the reward a rule gets **without training a router**, on the held-out videos of the tokenizers'
split (one in ``--val-every`` by video id), each rule fitted on the other videos' clips:

- a **constant**: the most common label, and the assignment of highest mean reward;
- the clip's **class** known exactly (the ingest ``label`` column; synthetic videos have one): per
  class, the most common label and the assignment of highest mean reward. No router can know more
  about a synthetic clip's kind than its class;
- **k nearest neighbours on content features** (per block: mean absolute spatial gradient and temporal
  difference; the clip's pixel std; standardised): the assignment of highest mean reward over the k
  nearest training clips, k in 10, 30, 100;
- with ``--router``, the **router** itself (its argmax) on the same clips;
- the per-clip **best uniform assignment**, an oracle (chosen with the clip's rewards in hand), as
  ``evaluate`` reports it; and the labels themselves (100).

Each is printed as the paper's reward percentile (``evatok.assignment.reward_percentile``) and top-1
agreement with the labels, and per class the labels' mean tokens, distinct labels and the most common
one's share. If knowing the class or the content does no better than a constant, the labels' spread
is not the content's: it is the proxy's. A benchmark script: it prints what it measured, asserts nothing.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evatok.assignment import AssignmentSpace, RewardStats, reward, reward_percentile  # noqa: E402
from workflows import storage  # noqa: E402
from workflows.clips import frames_from_table  # noqa: E402
from workflows.relabel import scores_to_arrays  # noqa: E402
from workflows.train.data import held_out, parquet_prefix  # noqa: E402


def content_features(frames: np.ndarray, num_blocks: int) -> np.ndarray:
    """``[N, T, H, W, 3]`` uint8 -> ``[N, 2 * num_blocks + 1]``: per block the mean absolute spatial
    gradient and the mean absolute frame difference (into the block), and the clip's pixel std."""
    x = frames.astype(np.float32) / 255.0
    n, t = x.shape[:2]
    grad = (np.abs(np.diff(x, axis=2)).mean((2, 3, 4)) + np.abs(np.diff(x, axis=3)).mean((2, 3, 4)))  # [N, T]
    diff = np.concatenate([np.zeros((n, 1)), np.abs(np.diff(x, axis=1)).mean((2, 3, 4))], 1)  # [N, T]
    diff[:, 0] = diff[:, 1]  # the first frame has no predecessor: use the next difference
    per = t // num_blocks
    blocks = lambda a: a.reshape(n, num_blocks, per).mean(2)  # noqa: E731
    return np.concatenate([blocks(grad), blocks(diff), x.reshape(n, -1).std(1, keepdims=True)], 1)


def load(label: str, clips: str, metric: str):
    meta = storage.read_table(parquet_prefix(clips), columns=["clip_id", "video_id", "label"])
    row = {c: i for i, c in enumerate(map(str, meta.column("clip_id").to_pylist()))}
    ids, tables = [], []
    for uri in storage.list_parquet(storage.join(label, "scores")):
        t = storage.read_table(uri, columns=["clip_id", metric])
        ids += list(map(str, t.column("clip_id").to_pylist()))
        tables.append(scores_to_arrays(t)[metric])
    order = [row[c] for c in ids]
    return ids, np.concatenate(tables), meta.take(order)


def read_features(clips: str, ids: list[str], num_blocks: int, router=None, held=None):
    """Standardised content features of every clip of ``ids``, and with ``router`` its argmax for the
    clips where ``held`` is true (``[N]``, -1 elsewhere)."""
    import torch

    from evatok import routing
    from evatok.video import to_tensor

    want = {c: i for i, c in enumerate(ids)}
    out = np.zeros((len(ids), 2 * num_blocks + 1))
    routed = np.full(len(ids), -1)
    for uri in storage.list_parquet(parquet_prefix(clips)):
        t = storage.read_table(uri)
        keep = [i for i, c in enumerate(map(str, t.column("clip_id").to_pylist())) if c in want]
        if keep:
            t = t.take(keep)
            rows = [want[c] for c in map(str, t.column("clip_id").to_pylist())]
            frames = frames_from_table(t)
            out[rows] = content_features(frames, num_blocks)
            if router is not None:
                sel = [j for j, r in enumerate(rows) if held[r]]
                if sel:
                    lp = routing.router_log_probs(router, to_tensor(torch.from_numpy(np.array(frames[sel]))), 16)
                    routed[[rows[j] for j in sel]] = lp.argmax(-1).numpy()
    return (out - out.mean(0)) / (out.std(0) + 1e-9), routed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--label", required=True, help="the label stage's output prefix (scores/, stats.json)")
    ap.add_argument("--clips", required=True, help="the ingest output the labels were made from")
    ap.add_argument("--val-every", type=int, default=8)
    ap.add_argument("--metric", default="mse")
    ap.add_argument("--w-q", type=float, default=1.4)
    ap.add_argument("--w-l", type=float, default=0.6)
    ap.add_argument("--router", default="", help="a router file: also its own choices on the same clips")
    a = ap.parse_args()
    stats = json.loads(storage.read_bytes(storage.join(a.label, "stats.json")))
    space = AssignmentSpace(stats["counts"])
    ids, dist, meta = load(a.label, a.clips, a.metric)
    totals = space.totals.numpy()
    r = np.asarray(reward(dist.astype(np.float64), totals, RewardStats(**stats["metrics"][a.metric]), a.w_q, a.w_l))
    lab = r.argmax(1)
    cls = np.array([str(x) for x in meta.column("label").to_pylist()])
    vids = [str(v) for v in meta.column("video_id").to_pylist()]
    held_ids = held_out(vids, a.val_every)
    h = np.array([v in held_ids for v in vids])
    tr = ~h
    print(f"{len(ids)} labeled clips; held out: {h.sum()} clips of {len(held_ids)} videos (crc32(video_id) % "
          f"{a.val_every} == 0); rules fitted on the other {tr.sum()}; reward {a.metric} w_q {a.w_q:g} w_l {a.w_l:g}")
    rh, lh = r[h], lab[h]

    def show(name: str, pick) -> None:
        pick = np.array(np.broadcast_to(np.asarray(pick), lh.shape))
        print(f"  {name:58s} percentile {reward_percentile(rh, pick):5.1f}   top-1 {(pick == lh).mean():.3f}")

    show("labels (per clip, the maximum)", lh)
    uni = space.uniform_indices().numpy()
    show("best uniform (per clip, an oracle)", uni[rh[:, uni].argmax(1)])
    show("constant: the most common label", collections.Counter(lab[tr]).most_common(1)[0][0])
    show("constant: the highest mean reward", r[tr].mean(0).argmax())
    classes = sorted(set(cls))
    if len(classes) > 1:
        common = {c: collections.Counter(lab[tr & (cls == c)]).most_common(1)[0][0] for c in classes}
        best = {c: r[tr & (cls == c)].mean(0).argmax() for c in classes}
        show("class known: its most common label", [common[c] for c in cls[h]])
        show("class known: its highest mean reward", [best[c] for c in cls[h]])
    router = None
    if a.router:
        from workflows.tokenize import load_model

        router = load_model(a.router)
    feats, routed = read_features(a.clips, ids, space.num_blocks, router, h)
    if router is not None:
        show(f"the router ({Path(a.router).name})", routed[h])
    d = ((feats[h][:, None, :] - feats[tr][None]) ** 2).sum(-1)  # [held, train]
    near = np.argsort(d, 1)
    for k in (10, 30, 100):
        show(f"{k} nearest clips on content features: highest mean reward",
             [r[tr][near[i, :k]].mean(0).argmax() for i in range(len(near))])
    if len(classes) > 1:
        print("\nlabels per class (all clips): mean tokens, distinct labels, the most common label's share")
        for c in sorted(classes, key=lambda c: totals[lab[cls == c]].mean()):
            m = cls == c
            top = collections.Counter(lab[m]).most_common(1)[0][1] / m.sum()
            print(f"  {c:14s} {m.sum():5d} clips  {totals[lab[m]].mean():6.1f} tokens  {len(set(lab[m])):4d} "
                  f"distinct  {top:.2f}")


if __name__ == "__main__":
    main()
