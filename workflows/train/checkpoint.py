"""What a training checkpoint holds besides the DeepSpeed shards, and how it is saved and restored.

One Ray checkpoint directory (every rank writes into its own temp dir, Ray merges them on upload):

- ``model/``: ``engine.save_checkpoint(tag="model")``: module, optimizer and LR-scheduler state
  (ZeRO shards ``zero_pp_rank_<r>_...`` from every rank).
- ``disc/``: the same for the discriminator's own engine (tokenizer recipes with a GAN).
- ``rng_rank<r>.pt``: each rank's RNG states (torch, numpy, python, the recipe's generator):
  every rank draws different random assignments, so every rank restores its own stream.
- ``loop_state.json`` (rank 0): step, data position (epoch, micro-batch within the epoch), samples
  seen and the MLflow run id, so a restart continues mid-epoch in the same MLflow run.

Files are loaded with ``weights_only=True``; numpy's RNG state is stored as a tensor for that reason.
"""
from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "loop_state.json"
MODEL_TAG = "model"
DISC_TAG = "disc"


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


def rng_state(generator: torch.Generator | None = None) -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_rest": [int(pos), int(has_gauss), float(cached)],
        "python": [py[0], list(py[1]), py[2]],
        "generator": generator.get_state() if generator is not None else torch.empty(0, dtype=torch.uint8),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss, cached = state["numpy_rest"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    if generator is not None and state["generator"].numel():
        generator.set_state(state["generator"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(directory: str | Path, rank: int, state: LoopState, engine, disc_engine=None,
         generator: torch.Generator | None = None) -> None:
    """Collective (every rank): DeepSpeed saves with barriers inside."""
    d = Path(directory)
    engine.save_checkpoint(str(d), tag=MODEL_TAG, client_state={"step": state.step})
    if disc_engine is not None:
        disc_engine.save_checkpoint(str(d), tag=DISC_TAG)
    torch.save(rng_state(generator), d / f"rng_rank{rank}.pt")
    if rank == 0:
        (d / STATE_FILE).write_text(state.to_json())


def load(directory: str | Path, rank: int, engine, disc_engine=None,
         generator: torch.Generator | None = None) -> LoopState:
    """Collective: restore module/optimizer/scheduler (both engines), this rank's RNG, and the loop state."""
    d = Path(directory)
    if not (d / STATE_FILE).exists():
        raise FileNotFoundError(f"{d} is not an evatok training checkpoint (no {STATE_FILE})")
    state = LoopState.from_json((d / STATE_FILE).read_text())
    path, _ = engine.load_checkpoint(str(d), tag=MODEL_TAG)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no '{MODEL_TAG}' checkpoint in {d}")
    if disc_engine is not None and (d / DISC_TAG).exists():
        disc_engine.load_checkpoint(str(d), tag=DISC_TAG)
    rng_file = d / f"rng_rank{rank}.pt"
    if rng_file.exists():  # absent if the world size changed: keep the fresh seed for this rank
        set_rng_state(torch.load(rng_file, weights_only=True), generator)
    return state
