"""Small training fixtures shared by the train tests: synthetic clips written with the ingest schema."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from evatok import synthetic
from workflows import clips, storage


def write_clips(uri: str, n: int = 16, clip_len: int = 16, size: int = 64, seed: int = 0) -> str:
    """``n`` clips (classes round-robin) as one Parquet shard under ``uri/clips``; returns ``uri``."""
    labels = [synthetic.CLASSES[i % 8] for i in range(n)]
    frames = np.stack([synthetic.make_video(lab, seed=seed + i, num_frames=clip_len, height=size, width=size)
                       for i, lab in enumerate(labels)])
    ids = [f"{i:04x}{seed:04x}" + "0" * 24 for i in range(n)]
    table = pa.table({
        "clip_id": ids, "video_id": ids, "source_uri": [f"synthetic://{i}" for i in range(n)],
        "window": pa.array([0] * n, pa.int32()), "start_s": [0.0] * n, "fps": [8.0] * n, "label": labels,
        "shape": pa.array([[clip_len, size, size, 3]] * n, pa.list_(pa.int32())),
        "frames": clips.frames_to_column(frames, clip_len, size),
    }, schema=clips.clip_schema(clip_len, size))
    storage.write_parquet(table, storage.join(uri, "clips", "shard-00000.parquet"))
    return uri


def write_labels(uri: str, clip_ids: list[str], labels: list[str], with_reward: bool = True) -> str:
    """Router labels: each class gets its own assignment (so a router can learn them), plus a
    625-long reward row per clip that peaks at that assignment."""
    assign = [(synthetic.CLASSES.index(lab) * 77) % 625 for lab in labels]
    cols = {"clip_id": clip_ids, "assignment": pa.array(assign, pa.int64())}
    if with_reward:
        rng = np.random.default_rng(0)
        rewards = rng.normal(size=(len(assign), 625)).astype(np.float32)
        rewards[np.arange(len(assign)), assign] = 5.0
        cols["reward"] = [r.tolist() for r in rewards]
    storage.write_parquet(pa.table(cols), storage.join(uri, "shard-00000.parquet"))
    return uri
