"""Does the tiny tokenizer buy better reconstructions with more tokens? Held-out PSNR/SSIM per uniform count,
beside the per-frame mean-colour and 8x / 4x down/up-sampling baselines of the same clips.

Two ways to use it (project venv, from the repo root):

    # an exported tokenizer (e.g. the tiny recipe's proxy) on the held-out videos of its training clips
    python bench/quality_cost.py --clips runs/tiny/data --model runs/tiny/proxy/proxy.pt

    # train tiny tokenizers here with a plain loop (the proxy recipe's loss: L1 + VQ + 0.02 entropy,
    # uniformly random assignments, AdamW, warm-up + cosine), one per decoder query initialisation
    python bench/quality_cost.py --clips runs/tiny/data --train 1200 --query-init finest,first
    # the paper's codebook size, trained longer (docs/quality-cost.md; --restart 0.03 adds dead-code restarts)
    python bench/quality_cost.py --clips runs/tiny/data --train 3000 --codebook 16384 --entropy-tokens 256

    # what the tokenizer's bits allow: per-patch k-means codes with the same bits a patch
    python bench/quality_cost.py --clips runs/tiny/data --bound

``--bound`` fits k-means codebooks of the preset's size to the training clips' patches (the tokenizer's
own 4x8x8 patches) and reconstructs the held-out patches from them: one code a patch (log2(codebook)
bits a patch, about what a block's finest tokens carry at the largest count) and a residual code of
kmax / patches-a-block stages (the bits of the largest count's every token, spent on the patches).
These are reference points, not proofs: a learned tokenizer can share bits between patches and blocks
and may beat them; one that reaches them uses its bits about as well as a per-patch vector quantiser.

The held-out split is the training loop's (``workflows.train.data.held_out``: videos whose id hashes into
the last 1/8), so ``--model`` numbers are measured on videos the model never saw. This is a benchmark, not
a test: it prints what it measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
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


def train(tr: torch.Tensor, steps: int, lr: float, batch: int, query_init: str, seed: int = 0,
          **quantizer) -> AdaptiveTokenizer:
    torch.manual_seed(seed)
    model = AdaptiveTokenizer(dataclasses.replace(PRESETS["tiny"](), query_init=query_init, **quantizer))
    t0 = time.perf_counter()
    log = lambda s, loss: print(f"  [{query_init}] step {s}/{steps} loss {loss:.4f} ({time.perf_counter() - t0:.0f} s)",  # noqa: E731
                                flush=True)
    return quick_train(model, tr, steps, lr, batch, seed, log=log)


def kmeans(x: torch.Tensor, k: int, iters: int = 12, seed: int = 0, chunk: int = 8192) -> torch.Tensor:
    """Lloyd's k-means of the rows of ``x`` (k of them drawn as the start), ``iters`` rounds -> [k, dim]."""
    g = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    for _ in range(iters):
        a = nearest(x, centres, chunk)
        sums = torch.zeros_like(centres).index_add_(0, a, x)
        n = torch.bincount(a, minlength=k)
        centres[n > 0] = sums[n > 0] / n[n > 0, None].to(x.dtype)
    return centres


def nearest(x: torch.Tensor, centres: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    return torch.cat([torch.cdist(x[i:i + chunk], centres).argmin(1) for i in range(0, x.shape[0], chunk)])


def patch_code_bound(tr: torch.Tensor, val: torch.Tensor, fit_patches: int = 50_000) -> dict[str, float]:
    """Held-out PSNR of per-patch residual k-means codes with the tiny preset's codebook size (see the
    module docstring): {"1 code a patch (10 bits)": dB, "2 codes a patch (20 bits)": dB}."""
    cfg = PRESETS["tiny"]()
    shaper = AdaptiveTokenizer(cfg)
    bits = round(math.log2(cfg.codebook_size))
    ptr = shaper.patchify(tr).reshape(-1, cfg.patch_dim)
    ptr = ptr[torch.randperm(ptr.shape[0], generator=torch.Generator().manual_seed(0))[:fit_patches]]
    pval = shaper.patchify(val).reshape(-1, cfg.patch_dim)
    out, rec = {}, torch.zeros_like(pval)
    for stage in range(max(1, cfg.kmax // cfg.hw)):
        centres = kmeans(ptr, cfg.codebook_size, seed=stage)
        ptr = ptr - centres[nearest(ptr, centres)]
        rec = rec + centres[nearest(pval - rec, centres)]
        y, r = val + 0.5, shaper.depatchify(rec.reshape(val.shape[0], cfg.num_blocks, cfg.grid, cfg.grid, -1))
        mse = ((r.clamp(-0.5, 0.5) + 0.5 - y) ** 2).mean()
        out[f"{stage + 1} code{'s' * bool(stage)} a patch ({(stage + 1) * bits} bits)"] = float(-10 * torch.log10(mse))
    return out


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
    ap.add_argument("--bound", action="store_true", help="per-patch k-means codes with the same bits (see above)")
    ap.add_argument("--codebook", type=int, default=0, help="--train: codebook size (0: the preset's 1,024)")
    ap.add_argument("--entropy-tokens", type=int, default=0, help="--train: entropy loss on this many sampled tokens")
    ap.add_argument("--restart", type=float, default=0.0, help="--train: dead-code restarts below this usage")
    ap.add_argument("--seed", type=int, default=0)
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
    if a.bound:
        t0 = time.perf_counter()
        bound = patch_code_bound(tr, val)
        print(f"\nper-patch k-means codes, {PRESETS['tiny']().codebook_size} codes a stage, fitted on training "
              f"patches ({time.perf_counter() - t0:.0f} s), held-out PSNR:")
        for name, db in bound.items():
            print(f"  {name:<28} {db:6.2f} dB")
        print(f"  (mean colour {base['mean_colour']['psnr']:.2f} dB; 4 dB above it: "
              f"{base['mean_colour']['psnr'] + 4:.2f} dB)")
    vq = dict(codebook_size=a.codebook or PRESETS["tiny"]().codebook_size, entropy_tokens=a.entropy_tokens,
              restart_below=a.restart)
    for qi in (a.query_init.split(",") if a.train else []):
        t0 = time.perf_counter()
        model = train(tr, a.train, a.lr, a.batch, qi, a.seed, **vq)
        report(f"trained here: query_init={qi}, {a.train} steps, lr {a.lr}, batch {a.batch}, seed {a.seed}, "
               f"{vq} ({time.perf_counter() - t0:.0f} s)", uniform_curve(model, val), base)


if __name__ == "__main__":
    main()
