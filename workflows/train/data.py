"""Training data: Parquet clips (``workflows.clips`` schema) as Ray Data shards, turned into tensors.

The driver opens the dataset (``open_dataset``) and computes what every worker must agree on (rows,
class names, label lookup); each worker pulls its shard with ``get_dataset_shard`` +
``iter_torch_batches`` and a ``collate`` that decodes the fixed-size ``frames`` binary into
``float32 [B, 3, T, H, W]`` in ``[-0.5, 0.5]``.

Resume mid-epoch: ``micro_batches`` takes exactly ``per_epoch`` micro-batches from each epoch (the
same number on every rank, so collectives never wait on a rank that ran dry) and skips the first
``skip`` of the resumed epoch. [I] Ray's streaming split hands blocks to ranks dynamically, so a
resumed epoch skips the right *number* of samples per rank, not necessarily the identical rows.
"""
from __future__ import annotations

import zlib
from typing import Iterator

import numpy as np
import torch

from workflows import storage
from workflows.clips import digest, frames_from_batch


class DataError(ValueError):
    pass


def parquet_prefix(uri: str) -> str:
    """An ingest output prefix or its ``clips/`` directory, a tokenize output prefix or its ``codes/``
    directory (or any Parquet prefix). A stage's output prefix also holds its ``errors/`` rows, which are
    not training data."""
    if not uri:
        raise DataError("no training data configured (train.data is empty)")
    for name in ("clips", "codes"):
        sub = storage.join(uri, name)
        if storage.list_parquet(sub):
            return sub
    if storage.list_parquet(uri):
        return uri
    raise DataError(f"no Parquet clips under {storage.redact(uri)}")


def files_digest(uri: str) -> str:
    return digest(f"{u}|{s}|{e}" for u, s, e in storage.list_files(uri, (".parquet",)))


def held_out(ids, every: int) -> set[str]:
    """[I] The deterministic held-out split: every id whose CRC32 falls into the last 1/``every``
    (tokenizers split by video id, the router by clip id). ``every <= 0`` holds nothing out."""
    return {i for i in set(map(str, ids)) if every > 0 and zlib.crc32(i.encode()) % every == 0}


def is_codes(uri: str) -> bool:
    """Is the Parquet data at ``uri`` a codes dataset (``evatok tokenize``: a ``codes`` column)?"""
    import pyarrow.parquet as pq

    files = storage.list_parquet(uri)
    if not files:
        return False
    with storage.open_read(files[0]) as f:
        return "codes" in pq.read_schema(f).names


def dataset_columns(uri: str, columns: list[str] | None) -> list[str] | None:
    """The columns to read: a recipe asks for clip columns (``frames``); a codes dataset is read with
    its own (``workflows.tokenize.CODE_COLUMNS``: the AR recipe trains on them as they are)."""
    if columns and "frames" in columns and is_codes(uri):
        from workflows.tokenize import CODE_COLUMNS

        return list(CODE_COLUMNS)
    return columns


def codes_batch(batch: dict, class_index: dict[str, int]) -> dict[str, torch.Tensor]:
    """A numpy batch of a codes dataset -> ``codes`` LongTensor [B, Lmax] (right-padded with 0),
    ``counts`` [B, 4] and ``class_id`` [B] (-1: unknown class)."""
    codes = [torch.as_tensor(np.asarray(c, dtype=np.int64)) for c in batch["codes"]]
    out = {"codes": torch.nn.utils.rnn.pad_sequence(codes, batch_first=True),
           "counts": torch.as_tensor(np.stack([np.asarray(c, dtype=np.int64) for c in batch["counts"]]))}
    if class_index and "label" in batch:
        out["class_id"] = torch.tensor([class_index.get(str(x), -1) for x in batch["label"]], dtype=torch.long)
    return out


def open_dataset(uri: str, columns: list[str] | None = None, cache_bytes: int = 0):
    """The clips at ``uri`` as a Ray Dataset. A dataset whose files total at most ``cache_bytes`` is
    materialised once in the object store: every epoch would otherwise start a new streaming read,
    a cost that dominates when an epoch is only a few steps."""
    import ray.data

    columns = dataset_columns(uri, columns)
    fs, path = storage.to_pyarrow(uri)
    ds = ray.data.read_parquet(path, filesystem=fs, columns=columns, file_extensions=["parquet"])
    if cache_bytes and sum(size for _, size, _ in storage.list_files(uri, (".parquet",))) <= cache_bytes:
        ds = ds.materialize()
    return ds


def to_video(frames: np.ndarray) -> torch.Tensor:
    """uint8 [B, T, H, W, 3] -> float32 [B, 3, T, H, W] in [-0.5, 0.5] (the model convention)."""
    return torch.from_numpy(np.array(frames, copy=True)).permute(0, 4, 1, 2, 3).float().div_(255.0).sub_(0.5)


def temporal_window(frames: np.ndarray, clip_len: int | None, rng: np.random.Generator | None) -> np.ndarray:
    """uint8 [B, T, H, W, 3] -> [B, clip_len, ...]: a random window per clip (``rng``), else the centre one.
    Clips stored with exactly ``clip_len`` frames (or ``clip_len`` None) come back as they are."""
    t = frames.shape[1]
    if clip_len is None or t == clip_len:
        return frames
    if t < clip_len:
        raise DataError(f"clips hold {t} frames, fewer than data.clip_len={clip_len}")
    if rng is None:
        s = (t - clip_len) // 2
        return frames[:, s:s + clip_len]
    starts = rng.integers(0, t - clip_len + 1, size=frames.shape[0])
    return np.stack([f[s:s + clip_len] for f, s in zip(frames, starts)])


class Collate:
    """numpy batch from Ray Data -> dict of tensors. Picklable (it travels to the workers).

    Augmentation (training batches only; held-out batches get neither): ``random_window`` takes a random
    ``clip_len``-frame window of clips stored longer (an ingest with a larger ``data.clip_len``; without
    it such clips give their centre window), ``hflip`` mirrors each clip with probability 1/2. ``seed``:
    the augmentation's own generator (per rank)."""

    def __init__(self, classes: list[str] | None = None, targets: dict[str, int] | None = None,
                 clip_len: int | None = None, hflip: bool = False, random_window: bool = False, seed: int = 0):
        self.class_index = {c: i for i, c in enumerate(classes or [])}
        self.targets = targets
        self.clip_len, self.hflip, self.random_window = clip_len, hflip, random_window
        self.rng = np.random.default_rng(seed) if (hflip or random_window) else None

    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        if "codes" in batch:  # a codes dataset: no frames
            return codes_batch(batch, self.class_index)
        frames = temporal_window(frames_from_batch(batch), self.clip_len, self.rng if self.random_window else None)
        if self.hflip:
            flip = self.rng.random(frames.shape[0]) < 0.5
            if flip.any():
                frames = frames.copy()
                frames[flip] = frames[flip][:, :, :, ::-1]
        out = {"video": to_video(frames)}
        if self.class_index and "label" in batch:
            out["class_id"] = torch.tensor([self.class_index.get(str(x), -1) for x in batch["label"]], dtype=torch.long)
        if "reward" in batch:  # router validation: the 625 rewards of each clip
            out["reward"] = torch.as_tensor(np.stack([np.asarray(r, np.float32) for r in batch["reward"]]))
        if self.targets is not None:
            missing = [c for c in batch["clip_id"] if str(c) not in self.targets]
            if missing:
                raise DataError(f"{len(missing)} clips have no label (e.g. {missing[0]}); relabel or filter the data")
            out["target"] = torch.tensor([self.targets[str(c)] for c in batch["clip_id"]], dtype=torch.long)
        return out


def micro_batches(shard, micro_bs: int, per_epoch: int, start_epoch: int, skip: int, seed: int,
                  collate, shuffle_buffer: int = 64) -> Iterator[tuple[int, int, dict]]:
    """Endless ``(epoch, index_in_epoch, batch)``; every epoch is read to its end (never abandoned
    half-way, which a streaming split would not like) but only its first ``per_epoch`` are used."""
    if per_epoch < 1:
        raise DataError(f"too few rows for one micro-batch of {micro_bs} per worker")
    epoch = start_epoch
    while True:
        it = shard.iter_torch_batches(batch_size=micro_bs, drop_last=True, collate_fn=collate,
                                      local_shuffle_buffer_size=shuffle_buffer or None,
                                      local_shuffle_seed=seed + epoch if shuffle_buffer else None)
        n = 0
        for i, batch in enumerate(it):
            n = i + 1
            if skip <= i < per_epoch:
                yield epoch, i, batch
        if n < per_epoch:
            raise DataError(f"epoch {epoch}: this rank got {n} micro-batches, expected {per_epoch}")
        skip = 0
        epoch += 1
