"""Does the tiny tokenizer buy better reconstructions with more tokens? Held-out PSNR/SSIM per uniform count,
beside the per-frame mean-colour and 8x / 4x down/up-sampling baselines of the same clips.

Two ways to use it (project venv, from the repo root):

    # an exported tokenizer (e.g. the tiny recipe's proxy) on the held-out videos of its training clips
    python bench/quality_cost.py --clips runs/tiny/data --model runs/tiny/proxy/proxy.pt

    # train tiny tokenizers here with a plain loop (the proxy recipe's loss: L1 + VQ + 0.02 entropy,
    # uniformly random assignments, AdamW, warm-up + cosine), one per decoder query initialisation
    python bench/quality_cost.py --clips runs/tiny/data --train 1200 --query-init finest,first

The held-out split is the training loop's (``workflows.train.data.held_out``: videos whose id hashes into
the last 1/8), so ``--model`` numbers are measured on videos the model never saw. This is a benchmark, not
a test: it prints what it measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evatok.evaluation import baselines, quick_train, uniform_curve  # noqa: E402
from evatok.tokenizer import PRESETS, AdaptiveTokenizer  # noqa: E402
from workflows import storage  # noqa: E402
from workflows.clips import frames_from_table  # noqa: E402
from workflows.train.data import held_out, parquet_prefix, to_video  # noqa: E402


def load_split(uri: str, every: int):
    t = storage.read_table(parquet_prefix(uri), columns=["video_id", "frames", "shape"])
    vids = t.column("video_id").to_pylist()
    held = held_out(vids, every)
    x = to_video(frames_from_table(t))
    mask = torch.tensor([v in held for v in vids])
    return x[~mask], x[mask]


def train(tr: torch.Tensor, steps: int, lr: float, batch: int, query_init: str, seed: int = 0) -> AdaptiveTokenizer:
    torch.manual_seed(seed)
    model = AdaptiveTokenizer(dataclasses.replace(PRESETS["tiny"](), query_init=query_init))
    t0 = time.perf_counter()
    log = lambda s, loss: print(f"  [{query_init}] step {s}/{steps} loss {loss:.4f} ({time.perf_counter() - t0:.0f} s)",  # noqa: E731
                                flush=True)
    return quick_train(model, tr, steps, lr, batch, seed, log=log)


def report(name: str, curve: dict, base: dict) -> None:
    counts = sorted(curve)
    print(f"\n{name}")
    print("  tokens a block " + "".join(f"{k:>9d}" for k in counts) + "   gain 8->128")
    for m, unit in (("psnr", " dB"), ("ssim", "")):
        print(f"  {m.upper():<15}" + "".join(f"{curve[k][m]:9.3f}" for k in counts)
              + (f"   {curve[counts[-1]][m] - curve[counts[0]][m]:+.2f}{unit}" if m == "psnr" else ""))
    print("  baselines      " + ", ".join(f"{k} {v['psnr']:.2f} dB / {v['ssim']:.3f}" for k, v in base.items()))
    lo = min(curve[k]["psnr"] - base["mean_colour"]["psnr"] for k in counts)
    print(f"  margin over the mean-colour predictor at the worst count: {lo:+.2f} dB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", required=True, help="an ingest output (or its clips/) of the tiny data config")
    ap.add_argument("--model", help="an exported tokenizer to evaluate")
    ap.add_argument("--train", type=int, default=0, help="train tiny tokenizers for this many steps instead")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--query-init", default="finest", help="comma-separated: finest, cells, first")
    ap.add_argument("--val-every", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tr, val = load_split(a.clips, a.val_every)
    print(f"{tr.shape[0]} training clips, {val.shape[0]} held-out clips (by video)")
    base = baselines(val)
    if a.model:
        from evatok.export import load_model

        import io
        model = load_model(io.BytesIO(storage.read_bytes(a.model)), map_location="cpu").eval()
        report(f"{a.model} (query_init={model.config.query_init})", uniform_curve(model, val), base)
    for qi in (a.query_init.split(",") if a.train else []):
        t0 = time.perf_counter()
        model = train(tr, a.train, a.lr, a.batch, qi)
        report(f"trained here: query_init={qi}, {a.train} steps, lr {a.lr}, batch {a.batch} "
               f"({time.perf_counter() - t0:.0f} s)", uniform_curve(model, val), base)


if __name__ == "__main__":
    main()
