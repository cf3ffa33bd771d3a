"""AR training step rate: codes read from a codes dataset (``evatok tokenize``) vs routing and encoding
every clip with the frozen router + tokenizer at every step (the path without a tokenize stage).

    python bench/ar_codes_bench.py [--steps 20] [--batch 8] [--threads 1]

One process, the AR recipe of ``workflows.train.recipes`` on the tiny presets (64x64 clips, counts
8..128), the same synthetic clips both ways; a step = collate (Ray Data's numpy batch -> tensors) +
``recipe.prepare`` + forward/backward + AdamW step, as the training loop runs it per micro-batch
(Ray Train / DeepSpeed overheads, the same for both, are left out). The router and tokenizer are
untrained: their cost does not depend on their weights. The codes are those the tokenize stage
writes for the same clips (``Encoder``, router mode), and both paths are checked to give the same
sequences before timing.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a Ray Train worker of 1 CPU has 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from evatok.export import save_model
    from evatok.router import PRESETS as RP, Router
    from evatok.tokenizer import PRESETS as TP, AdaptiveTokenizer
    from train_fixtures import write_clips
    from workflows import storage
    from workflows.config import load_config
    from workflows.tokenize import CODE_COLUMNS, Encoder
    from workflows.train.data import Collate
    from workflows.train.recipes import make_recipe

    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        for name, model in (("router.pt", Router(RP["tiny"]())), ("tok.pt", AdaptiveTokenizer(TP["tiny"]()))):
            buf = io.BytesIO()
            save_model(model, buf)
            storage.write_bytes_atomic(f"{d}/{name}", buf.getvalue())
        write_clips(f"{d}/data", n=args.batch, size=64)
        table = storage.read_table(f"{d}/data/clips")
        codes, _ = Encoder(f"{d}/tok.pt", "router", router=f"{d}/router.pt").encode_table(table)
        clip_batch = {k: np.asarray(table.column(k).to_pylist(), dtype=object) for k in ("clip_id", "frames", "label")}
        clip_batch["shape"] = np.asarray(table.column("shape").to_pylist())
        code_batch = {k: np.asarray(codes.column(k).to_pylist(), dtype=object) for k in CODE_COLUMNS}
        classes = sorted(set(table.column("label").to_pylist()))
        cfg = load_config(None, ["train.model=ar", "train.preset=tiny", f"train.tokenizer={d}/tok.pt",
                                 f"train.router={d}/router.pt"])
        collate = Collate(classes)
        recipe = make_recipe(cfg, torch.device("cpu"), classes=classes)
        a, b = recipe.prepare(collate(clip_batch)), recipe.prepare(collate(code_batch))
        assert torch.equal(a["codes"], b["codes"]) and torch.equal(a["counts"], b["counts"]), "paths disagree"
        print(f"batch {args.batch}, {float(b['counts'].sum(1).float().mean()):.0f} tokens per clip on average "
              f"(untrained router), {args.threads} torch thread(s)")

        # The two paths alternate step by step, so a shared machine's changing load hits both alike;
        # rates are from the median step time.
        paths = {"clips: route + encode every step": clip_batch, "codes: read as written": code_batch}
        nets, opts, times = {}, {}, {name: [] for name in paths}
        for name in paths:
            torch.manual_seed(0)
            nets[name] = recipe.build()
            opts[name] = torch.optim.AdamW(nets[name].parameters(), lr=1e-3)

        def step(name):
            t0 = time.perf_counter()
            inputs = recipe.prepare(collate(paths[name]))
            loss, _, _ = recipe.train_loss(nets[name], inputs, 0)
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
            return time.perf_counter() - t0

        for i in range(args.steps + 2):
            for name in paths:
                dt = step(name)
                if i >= 2:  # warm-up steps not counted
                    times[name].append(dt)
        rates = {}
        for name, ts in times.items():
            rates[name] = 1.0 / float(np.median(ts))
            print(f"{name:<36} {rates[name]:6.2f} steps/s ({rates[name] * args.batch:6.1f} samples/s; median step "
                  f"{1000 * np.median(ts):.0f} ms, min {1000 * min(ts):.0f} ms)", flush=True)
        before, after = rates.values()
        print(f"codes / clips: {after / before:.2f}x the step rate")

if __name__ == "__main__":
    main()
