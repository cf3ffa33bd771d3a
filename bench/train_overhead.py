"""Benchmark (not a test): overhead of Ray Train + DeepSpeed over a plain PyTorch loop.

Same model (the tiny proxy tokenizer recipe, GAN off so both loops do the same work), same batch
size, same number of threads, same steps, in one run:

- plain: one process, ``torch.set_num_threads(THREADS)``, AdamW + LambdaLR, batches decoded from the
  same Parquet clips with the same collate (read once into memory);
- ray:   ``run_training`` with ONE Ray Train worker (``num_cpus`` = THREADS, so OMP_NUM_THREADS
  matches), DeepSpeed ZeRO-0 fp32, Ray Data shard iteration, checkpoint only at the end.

Like with like: 1 Ray worker vs 1 plain process, same threads. The first step of each is excluded
(warm-up). Prints samples/s of both and the overhead ``1 - ray/plain`` (target <= 15 %).

    .venv/bin/python bench/train_overhead.py [--steps 30] [--batch 4] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))


def plain(cfg, steps: int, threads: int) -> float:
    import numpy as np
    import torch

    from workflows import storage
    from workflows.train.data import Collate, parquet_prefix
    from workflows.train.recipes import make_recipe
    from workflows.train.schedules import lr_lambda

    torch.set_num_threads(threads)
    t = cfg.train
    table = storage.read_table(parquet_prefix(t.data))
    cols = {k: np.asarray(table.column(k).to_pylist(), dtype=object) for k in ("frames",)}
    cols["shape"] = np.asarray(table.column("shape").to_pylist())
    collate = Collate()
    n = table.num_rows // t.batch_size
    # raw rows in memory (the plain loop's best case: no storage reads); collated per step, as Ray does
    raw = [{k: v[i * t.batch_size:(i + 1) * t.batch_size] for k, v in cols.items()} for i in range(n)]
    torch.manual_seed(t.seed)
    recipe = make_recipe(cfg, torch.device("cpu"))
    model = recipe.build()
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t.steps, t.schedule, t.lr, t.min_lr))
    for step in range(steps):
        if step == 1:
            t1 = time.perf_counter()
        inputs = recipe.prepare(collate(raw[step % n]))
        loss, _, _ = recipe.train_loss(model, inputs, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.deepspeed.grad_clip)
        opt.step()
        sched.step()
    return (steps - 1) * t.batch_size / (time.perf_counter() - t1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clips", type=int, default=128, help="dataset size (clips)")
    args = ap.parse_args()

    import ray

    from train_fixtures import write_clips
    from workflows.config import load_config
    from workflows.train import run_training

    with tempfile.TemporaryDirectory() as tmp:
        # enough clips that an epoch is many steps: Ray Data starts a streaming read per epoch, a cost
        # that real (large) datasets amortise and a 16-clip toy set would turn into the whole story
        write_clips(tmp + "/data", n=max(args.clips, 4 * args.batch))
        cfg = load_config(None, [
            "name=bench", f"work_dir={tmp}/runs", f"train.data={tmp}/data", "train.model=proxy",
            f"train.steps={args.steps}", f"train.batch_size={args.batch}", "train.num_workers=1",
            f"train.cpus_per_worker={args.threads}", "train.disc_start=-1", f"train.checkpoint_every={args.steps}", f"train.log_every={args.steps}",
            "train.deepspeed.zero_stage=0", "mlflow.system_metrics=false"])
        # Ray is up before either loop runs, so both share the box with its idle daemons. One CPU more
        # than the worker's share, so Ray Data's read tasks are never starved by the worker.
        ray.init(num_cpus=args.threads + 1, include_dashboard=False, object_store_memory=200_000_000,
                 log_to_driver=False)
        sps_plain = plain(cfg, args.steps, args.threads)
        res = run_training(cfg)
        sps_ray = res.metrics["samples_per_s"]
        ray.shutdown()
    print(f"tiny proxy tokenizer, batch {args.batch}, {args.steps} steps, {args.threads} thread(s); "
          f"1 Ray Train worker + DeepSpeed ZeRO-0 vs 1 plain process")
    print(f"plain PyTorch : {sps_plain:8.2f} samples/s")
    print(f"Ray+DeepSpeed : {sps_ray:8.2f} samples/s")
    print(f"ratio ray/plain = {sps_ray / sps_plain:.3f}  overhead = {100 * (1 - sps_ray / sps_plain):.1f} % (target <= 15 %)")


if __name__ == "__main__":
    main()
