"""The on-storage schemas of ingest and label outputs, and the helpers that read them back.

Layout under an ingest output prefix ``OUT``::

    OUT/_ingest.json                 fingerprint: data config, shard size, digest of the sorted video ids
    OUT/clips/shard-00000.parquet    CLIP_SCHEMA, one row per clip
    OUT/errors/shard-00000.parquet   ERROR_SCHEMA, one row per video that yielded no clips
    OUT/_shards/shard-00000.json     per-shard counts; published LAST, so "marker exists" == "shard done"
    OUT/_DONE.json                   the stage summary, published after every shard

``frames`` is a fixed-size binary of ``T*H*W*3`` uint8 bytes (row-major ``[T, H, W, 3]``) with the
shape in ``shape``: any Parquet reader (plain pyarrow, Ray Data, pandas) reads it, with no tensor
extension type to register. ``frames_from_table`` / ``frames_from_batch`` turn it back into
``uint8 [N, T, H, W, 3]`` without a copy per row.

Label outputs under ``LABEL_OUT``: ``scores/shard-XXXXX.parquet`` (SCORE_SCHEMA: ``clip_id`` + one
625-long float32 list per metric, shard numbers follow the clips shards), ``stats.json`` and
``labels/<metric>-wq<w_q>-wl<w_l>/shard-XXXXX.parquet`` (LABEL_SCHEMA).
"""
from __future__ import annotations

import hashlib
import uuid

import numpy as np
import pyarrow as pa

ID_NAMESPACE = uuid.UUID("6f1d1c5e-6a0b-5b53-9b43-8a2d0c1e7e11")  # fixed: ids are stable forever

ERROR_SCHEMA = pa.schema([
    ("video_id", pa.string()),
    ("uri", pa.string()),
    ("reason", pa.string()),
    ("message", pa.string()),
])


def clip_schema(clip_len: int, size: int) -> pa.Schema:
    return pa.schema([
        ("clip_id", pa.string()),
        ("video_id", pa.string()),
        ("source_uri", pa.string()),
        ("window", pa.int32()),          # window index within the video
        ("start_s", pa.float64()),       # time of the first frame
        ("fps", pa.float64()),           # sampling rate of the clip's frames
        ("label", pa.string()),          # class label (manifest / class folder), null if unknown
        ("shape", pa.list_(pa.int32())),  # [T, H, W, 3]
        ("frames", pa.binary(clip_len * size * size * 3)),
    ])


def video_id(uri: str, size: int, etag: str | None) -> str:
    """Deterministic id of a source object: the canonical URI plus its size and etag."""
    return uuid.uuid5(ID_NAMESPACE, f"{uri}\n{size}\n{etag or ''}").hex


def clip_id(vid: str, window: int, data_key: str) -> str:
    """Deterministic id of a clip: its video, window and the data config (``data_key``)."""
    return uuid.uuid5(ID_NAMESPACE, f"{vid}\n{window}\n{data_key}").hex


def data_key(clip_len: int, size: int, fps: float | None, stride_s: float | None,
             max_clips: int | None) -> str:
    return f"clip_len={clip_len},size={size},fps={fps},stride_s={stride_s},max_clips={max_clips}"


def digest(items) -> str:
    h = hashlib.sha256()
    for x in items:
        h.update(str(x).encode())
        h.update(b"\n")
    return h.hexdigest()


def shard_name(i: int, ext: str = "parquet") -> str:
    return f"shard-{i:05d}.{ext}"


def shard_index(name: str) -> int:
    """``.../shard-00012.parquet`` -> 12."""
    base = name.rsplit("/", 1)[-1]
    return int(base.split("-", 1)[1].split(".", 1)[0])


def frames_to_column(frames: np.ndarray, clip_len: int, size: int) -> pa.Array:
    """uint8 ``[N, T, H, W, 3]`` -> fixed-size binary array (one value per clip)."""
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    n = frames.shape[0]
    width = clip_len * size * size * 3
    if frames.size != n * width:
        raise ValueError(f"frames {frames.shape} do not match clip_len={clip_len}, size={size}")
    buf = pa.py_buffer(frames.reshape(-1))
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, buf])


def frames_from_table(table: pa.Table) -> np.ndarray:
    """The ``frames`` column of a clips table -> uint8 ``[N, T, H, W, 3]``."""
    if table.num_rows == 0:
        return np.zeros((0, 0, 0, 0, 3), np.uint8)
    col = table.column("frames").combine_chunks()
    shape = tuple(table.column("shape")[0].as_py())
    width = col.type.byte_width
    data = np.frombuffer(col.buffers()[1], dtype=np.uint8, count=(col.offset + len(col)) * width)
    return data[col.offset * width:].reshape((len(col),) + shape)


def frames_from_batch(batch) -> np.ndarray:
    """A Ray Data numpy batch (``{"frames": array of bytes, "shape": ...}``) or a pyarrow table ->
    uint8 ``[N, T, H, W, 3]``."""
    if isinstance(batch, pa.Table):
        return frames_from_table(batch)
    frames = batch["frames"]
    n = len(frames)
    if n == 0:
        return np.zeros((0, 0, 0, 0, 3), np.uint8)
    shape = tuple(int(s) for s in np.asarray(batch["shape"][0]).tolist())
    return np.frombuffer(b"".join(bytes(f) for f in frames), dtype=np.uint8).reshape((n,) + shape)
