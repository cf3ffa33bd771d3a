"""Resume never unpickles arbitrary objects (``workflows/train/checkpoint.py``), on real DeepSpeed engines.

One process, world size 1 (gloo on 127.0.0.1), engines built by the training loop's own ``_engine``
with ``deepspeed_config``: a checkpoint written by ``checkpoint.save`` restores exactly (weights,
optimizer moments, scheduler, loop state: the next step after resume equals the next step of the
original engine), and a checkpoint file with a planted pickle whose ``__reduce__`` would create a file
is refused with ``UnsafeCheckpointError`` before anything in it runs.
"""
from __future__ import annotations

import builtins
import os
import socket

import pytest
import torch

from workflows.config import load_config
from workflows.train import checkpoint as ckpt

# DeepSpeed engines built in-process patch torch globally (ZeRO-2 bf16 and ZeRO-3 leave wrappers behind that
# break, e.g., ``torch.jit.script(...).save`` in later test modules), so these tests run in a child pytest
# process of their own: ``test_in_a_child_process`` below starts it and is the one result the suite sees.
CHILD_ENV = "EVATOK_CHECKPOINT_SAFETY_CHILD"
IN_CHILD = os.environ.get(CHILD_ENV) == "1"

pytestmark = pytest.mark.usefixtures("one_torch_thread")
engine_test = pytest.mark.skipif(not IN_CHILD, reason="runs inside test_in_a_child_process")


@pytest.mark.skipif(IN_CHILD, reason="the child runs the engine tests themselves")
def test_in_a_child_process():
    import subprocess
    import sys

    env = {**os.environ, CHILD_ENV: "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" in proc.stdout, proc.stdout[-2000:]


@pytest.fixture(scope="module")
def world_of_one():
    """``torch.distributed`` (gloo) with one rank, as Ray Train would set it up for a 1-worker run."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    yield
    torch.distributed.destroy_process_group()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def make_engine(stage: int, precision: str, seed: int):
    from workflows.train.loop import _engine

    cfg = load_config(None, ["train.batch_size=2", f"train.deepspeed.zero_stage={stage}",
                             f"train.deepspeed.precision={precision}", "train.lr=0.01", "train.steps=10"])
    t = cfg.train
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    return _engine(model, t, 1, t.lr, t.betas, t.steps, t.schedule, t.min_lr)


def step(engine, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    dtype = next(engine.module.parameters()).dtype
    x = torch.randn(2, 8, generator=g).to(dtype)
    loss = engine(x).float().pow(2).mean()
    engine.backward(loss)
    engine.step()


def weights(engine, stage: int) -> dict[str, torch.Tensor]:
    from workflows.train.loop import full_fp32_state

    return full_fp32_state(engine.module, stage)


@engine_test
@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (2, "bf16"), (3, "fp32")])
def test_resume_restores_the_exact_training_state(world_of_one, tmp_path, stage, precision):
    a = make_engine(stage, precision, seed=0)
    for k in range(3):
        step(a, k)
    gen = torch.Generator().manual_seed(5)
    state = ckpt.LoopState(step=3, epoch=1, micro_in_epoch=2, samples=6, mlflow_run_id="run-1")
    ckpt.save(tmp_path, 0, state, a, generator=gen)
    expected_draw = torch.rand(3, generator=gen)

    b = make_engine(stage, precision, seed=1)  # other initial weights: the load must replace them
    gen_b = torch.Generator().manual_seed(99)
    assert ckpt.load(tmp_path, 0, b, generator=gen_b) == state
    assert torch.equal(torch.rand(3, generator=gen_b), expected_draw)
    wa, wb = weights(a, stage), weights(b, stage)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert b.get_lr() == a.get_lr()
    step(a, 10)
    step(b, 10)  # same optimizer moments and LR schedule -> the same update
    wa, wb = weights(a, stage), weights(b, stage)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


class PlantedCode:
    """What an attacker writes into a checkpoint: unpickling it would create ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


@engine_test
@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                    "rng_rank0.pt"])
def test_planted_pickle_in_a_checkpoint_is_refused_and_never_runs(world_of_one, tmp_path, victim):
    """Every file ``checkpoint.load`` reads (DeepSpeed's model states and ZeRO optimizer shard, our RNG
    file): a valid file with one extra pickled object is refused with a clear error, and the object's
    code does not run (the marker file it would create does not exist)."""
    a = make_engine(2, "fp32", seed=0)
    step(a, 0)
    d = tmp_path / "ckpt"
    ckpt.save(d, 0, ckpt.LoopState(step=1), a, generator=torch.Generator().manual_seed(1))
    path = d / ckpt.MODEL_TAG / victim if victim.endswith("states.pt") else d / victim
    content = ckpt.safe_torch_load(path)  # the legitimate file loads under the allow-list
    marker = tmp_path / "code-ran"
    content["extra"] = PlantedCode(marker)
    torch.save(content, path)

    b = make_engine(2, "fp32", seed=1)
    with pytest.raises(ckpt.UnsafeCheckpointError, match=rf"{victim}.*allow-list.*GLOBAL (builtins|io)\.open"):
        ckpt.load(d, 0, b, generator=torch.Generator())
    assert not marker.exists(), "the planted pickle ran"
    assert isinstance(b.checkpoint_engine, type(a.checkpoint_engine))  # DeepSpeed's engine is put back
