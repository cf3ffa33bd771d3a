"""What a training checkpoint holds besides the DeepSpeed shards, and how it is saved and restored.

One Ray checkpoint directory (every rank writes into its own temp dir, Ray merges them on upload):

- ``model/``: ``engine.save_checkpoint(tag="model")``: module, optimizer and LR-scheduler state
  (ZeRO shards ``zero_pp_rank_<r>_...`` from every rank).
- ``disc/``: the same for the discriminator's own engine (tokenizer recipes with a GAN).
- ``rng_rank<r>.pt``: each rank's RNG states (torch, numpy, python, the recipe's generators: its own,
  with which every rank draws different random assignments, and the one every rank shares), so every
  rank restores its own streams.
- ``loop_state.json`` (rank 0): step, data position (epoch, micro-batch within the epoch), samples
  seen and the MLflow run id, so a restart continues mid-epoch in the same MLflow run.
- ``files_rank<r>.json``: every file rank r wrote, with its size: a checkpoint on storage is complete
  when every rank's list is there and every listed file has its size (``latest_complete``).

Which checkpoint a restart resumes: the newer of Ray's own (``ray.train.get_checkpoint()``) and the
newest complete one on storage. Ray Train registers a checkpoint when the controller collects the
report; a worker that dies right after reporting (an OOM kill, a lost node) can take the report with
it, and Ray then restarts from an older checkpoint, or from step 0, although a complete newer one is
on storage (seen: a kill one step after the step-2 checkpoint restarted at step 0).

Resume never unpickles arbitrary objects. Whoever can write to the checkpoint prefix
(``work_dir/ray_results``) must not get code execution on the training nodes, so every file is
loaded with ``torch.load(weights_only=True)``:

- our own files: ``rng_rank<r>.pt`` (numpy's RNG state is stored as a tensor for that reason) and
  ``loop_state.json`` (plain JSON);
- DeepSpeed's files: DeepSpeed's own ``TorchCheckpointEngine.load`` calls ``torch.load(...,
  weights_only=False)``. During ``load`` we put a ``WeightsOnlyCheckpointEngine`` in its place on the
  engine (every DeepSpeed read on our resume path, the model states through the ``SDLoader`` and the
  ZeRO optimizer shards, goes through ``engine.checkpoint_engine.load``). It loads with
  ``weights_only=True`` and an explicit allow-list, ``DEEPSPEED_SAFE_GLOBALS``: the three DeepSpeed
  types that its ZeRO 0-3 fp32/bf16 files hold besides tensors and containers (checked with
  ``torch.serialization.get_unsafe_globals_in_checkpoint`` on files of every stage and precision this
  project allows). All three are plain data: an enum looked up by value and two classes rebuilt by
  setting ``__dict__``; none has a ``__setstate__`` or ``__reduce__`` that runs code.
  DeepSpeed's "universal checkpoint" loaders call ``torch.load`` directly; this project never enables
  them (``load_universal`` is not in ``deepspeed_config``), so they are never on the resume path.

A file that holds anything else raises ``UnsafeCheckpointError`` naming the file and the refused
global; nothing from it is executed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import pickle
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

STATE_FILE = "loop_state.json"
MANIFEST = "files_rank{rank}.json"
MODEL_TAG = "model"
DISC_TAG = "disc"

# The non-tensor, non-container types in DeepSpeed's checkpoint files (ZeRO 0-3, fp32/bf16):
# "module:qualname" strings, imported only when a checkpoint is loaded.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler:LossScaler",          # ZeRO optimizer shards: loss-scale state
    "deepspeed.runtime.zero.config:ZeroStageEnum",            # ZeRO optimizer shards: the stage
    "deepspeed.utils.tensor_fragment:fragment_address",       # ZeRO 1/2 shards: param slice mappings
)


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds a pickled object outside the weights-only allow-list: refused unread."""


@dataclass
class LoopState:
    step: int = 0              # optimizer steps done
    epoch: int = 0             # data epoch in progress
    micro_in_epoch: int = 0    # micro-batches of this epoch already consumed (per rank)
    samples: int = 0           # samples seen, all ranks together
    mlflow_run_id: str | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "LoopState":
        d = json.loads(text)
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


Generators = torch.Generator | Sequence[torch.Generator] | None


def _generators(generator) -> list[torch.Generator]:
    """One generator, a sequence of them (a recipe's own: ``Recipe.generators``) or None -> a list."""
    if generator is None:
        return []
    return [generator] if isinstance(generator, torch.Generator) else list(generator)


def rng_state(generator: Generators = None) -> dict:
    gens = _generators(generator)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_rest": [int(pos), int(has_gauss), float(cached)],
        "python": [py[0], list(py[1]), py[2]],
        "generators": [g.get_state() for g in gens],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict, generator: Generators = None) -> None:
    """Restore what ``rng_state`` saved; the generators in the order given there (a file written before
    recipes had more than one holds it under ``"generator"``: that one is restored, the others are left
    as seeded)."""
    torch.set_rng_state(state["torch"])
    pos, has_gauss, cached = state["numpy_rest"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    if "generators" in state:
        saved = state["generators"]
    else:
        saved = [state["generator"]] if state["generator"].numel() else []
    for g, st in zip(_generators(generator), saved):
        g.set_state(st)
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _safe_globals() -> list:
    import importlib

    out = []
    for spec in DEEPSPEED_SAFE_GLOBALS:
        module, name = spec.split(":")
        out.append(getattr(importlib.import_module(module), name))
    return out


def safe_torch_load(path, map_location=None):
    """``torch.load(path, weights_only=True)`` with ``DEEPSPEED_SAFE_GLOBALS`` allowed (for this call
    only); a refused global becomes ``UnsafeCheckpointError``."""
    with torch.serialization.safe_globals(_safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            m = re.search(r"WeightsUnpickler error: ([^\n]*?)(?: Please use|$)", str(e), re.M)
            why = m.group(1).strip() if m else str(e).splitlines()[0]
            raise UnsafeCheckpointError(
                f"refusing to load checkpoint file {path}: it holds a pickled object outside the "
                f"weights-only allow-list ({why}); the file was not trusted and nothing in it ran") from None


class WeightsOnlyCheckpointEngine:
    """DeepSpeed's checkpoint engine with ``load`` replaced by ``safe_torch_load``; every other
    method (``save``, ``create``, ``commit``, ...) is the wrapped engine's."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def load(self, path, map_location=None):
        return safe_torch_load(path, map_location=map_location)


@contextlib.contextmanager
def weights_only_loading(engine):
    """While inside, ``engine.load_checkpoint`` reads files through ``WeightsOnlyCheckpointEngine``."""
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(inner)
    try:
        yield
    finally:
        engine.checkpoint_engine = inner


def save(directory: str | Path, rank: int, state: LoopState, engine, disc_engine=None,
         generator: Generators = None) -> None:
    """Collective (every rank): DeepSpeed saves with barriers inside."""
    d = Path(directory)
    engine.save_checkpoint(str(d), tag=MODEL_TAG, client_state={"step": state.step})
    if disc_engine is not None:
        disc_engine.save_checkpoint(str(d), tag=DISC_TAG)
    torch.save(rng_state(generator), d / f"rng_rank{rank}.pt")
    if rank == 0:
        (d / STATE_FILE).write_text(state.to_json())
    files = {str(p.relative_to(d)): p.stat().st_size for p in sorted(d.rglob("*")) if p.is_file()}
    (d / MANIFEST.format(rank=rank)).write_text(json.dumps(files, sort_keys=True))


def checkpoint_dirs(root: str) -> dict[str, dict[str, int]]:
    """The ``checkpoint_*`` folders under a Ray Train run's storage folder ``root``: {folder: {path in
    it: size}}, complete or not (a missing ``root`` has none)."""
    from workflows import storage

    base = storage.canonical(root).rstrip("/") + "/"
    dirs: dict[str, dict[str, int]] = {}
    for uri, size, _ in storage.list_files(root):
        rel = uri[len(base):] if uri.startswith(base) else None
        if rel and rel.startswith("checkpoint_") and "/" in rel:
            name, path = rel.split("/", 1)
            dirs.setdefault(name, {})[path] = size
    return dirs


def latest_complete(root: str, world: int) -> tuple[str, int] | None:
    """``(uri, step)`` of the newest checkpoint under a Ray Train run's storage folder ``root`` that is
    complete for ``world`` ranks (every ``files_rank<r>.json``, and every file it lists with its size),
    or None. Every rank computes the same answer from the same listing."""
    from workflows import storage

    best = None
    for name, files in checkpoint_dirs(root).items():
        try:
            lists = [json.loads(storage.read_bytes(storage.join(root, name, MANIFEST.format(rank=r))))
                     for r in range(world)] if all(MANIFEST.format(rank=r) in files for r in range(world)) else None
            if not lists or STATE_FILE not in files or any(files.get(p) != n for fl in lists for p, n in fl.items()):
                continue
            step = LoopState.from_json(storage.read_bytes(storage.join(root, name, STATE_FILE)).decode()).step
        except (storage.StorageError, ValueError, KeyError, TypeError, AttributeError):
            continue  # unreadable or partial: not a candidate
        if best is None or (step, name) > (best[1], best[0]):
            best = (name, step)
    return (storage.join(root, best[0]), best[1]) if best else None


def download(uri: str, directory: str | Path) -> Path:
    """Copy a checkpoint folder from storage into a local directory (for ``load``)."""
    from workflows import storage

    d = Path(directory)
    base = storage.canonical(uri).rstrip("/") + "/"
    for f, _, _ in storage.list_files(uri):
        target = d / f[len(base):]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage.read_bytes(f))
    return d


def state_of(directory: str | Path) -> LoopState | None:
    p = Path(directory) / STATE_FILE
    return LoopState.from_json(p.read_text()) if p.exists() else None


def load(directory: str | Path, rank: int, engine, disc_engine=None,
         generator: Generators = None) -> LoopState:
    """Collective: restore module/optimizer/scheduler (both engines), this rank's RNG, and the loop state."""
    d = Path(directory)
    if not (d / STATE_FILE).exists():
        raise FileNotFoundError(f"{d} is not an evatok training checkpoint (no {STATE_FILE})")
    state = LoopState.from_json((d / STATE_FILE).read_text())
    with weights_only_loading(engine):
        path, _ = engine.load_checkpoint(str(d), tag=MODEL_TAG)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no '{MODEL_TAG}' checkpoint in {d}")
    if disc_engine is not None and (d / DISC_TAG).exists():
        with weights_only_loading(disc_engine):
            disc_engine.load_checkpoint(str(d), tag=DISC_TAG)
    rng_file = d / f"rng_rank{rank}.pt"
    if rng_file.exists():  # absent if the world size changed: keep the fresh seed for this rank
        set_rng_state(safe_torch_load(rng_file), generator)
    return state
