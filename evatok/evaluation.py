"""Quality against cost: a tokenizer's held-out reconstruction quality at each uniform token count, the
trivial baselines it must beat, and the check that more tokens buy better reconstructions.

The method's precondition is a rising quality-cost curve: if the proxy's reconstructions do not get
clearly better as tokens grow, the reward is decided by length alone and every label is the shortest
assignment. ``check_curve`` turns that into a pass/fail with a reason; the training recipes log the
curve after every tokenizer training and the proxy stage fails on a flat one.

    curve = uniform_curve(model, clips)            # {count: {"psnr", "ssim", "mse"}}
    base = baselines(clips)                        # {"mean_colour", "down_up_x8", "down_up_x4"}: same metrics
    ok, why = check_curve(curve, min_gain_db=4.0)

Clips are ``[N, 3, T, H, W]`` in [-0.5, 0.5] (the model convention); metrics are means over clips of
per-clip means over frames (``evatok.metrics``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from evatok.metrics import mse, psnr, ssim


def _scores(recon: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-clip PSNR / SSIM / MSE of ``recon`` against ``x`` (both model range)."""
    r, y = recon.float().clamp(-0.5, 0.5) + 0.5, x.float() + 0.5
    return {"psnr": psnr(r, y).mean(-1), "ssim": ssim(r, y).mean(-1), "mse": mse(r, y).mean(-1)}


def _mean(parts: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    return {k: float(torch.cat([p[k] for p in parts]).mean()) for k in parts[0]}


@torch.no_grad()
def uniform_curve(model, clips: torch.Tensor, batch_size: int = 16) -> dict[int, dict[str, float]]:
    """Held-out quality of ``model`` (an ``AdaptiveTokenizer``) at every uniform assignment: the same
    count in every block. Returns ``{count per block: {"psnr", "ssim", "mse"}}``, counts ascending."""
    cfg = model.config
    was_training = model.training
    model.eval()
    p = next(model.parameters())
    dev, dtype = p.device, p.dtype   # a bf16 model is fed bf16 clips; the metrics are computed in fp32
    out = {}
    for k in cfg.counts:
        parts = []
        for i in range(0, clips.shape[0], batch_size):
            x = clips[i:i + batch_size].to(dev, dtype)
            counts = torch.full((x.shape[0], cfg.num_blocks), k, dtype=torch.long, device=dev)
            parts.append({n: v.cpu() for n, v in _scores(model.reconstruct(x, counts), x).items()})
        out[k] = _mean(parts)
    model.train(was_training)
    return out


def mean_colour(x: torch.Tensor) -> torch.Tensor:
    """Every frame replaced by its own mean colour (3 values a frame)."""
    return x.mean((-2, -1), keepdim=True).expand_as(x)


def down_up(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Area down-sampling of every frame by ``factor``, bilinear up-sampling back."""
    b, c, t, h, w = x.shape
    fr = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    fr = F.interpolate(F.interpolate(fr, scale_factor=1 / factor, mode="area"), size=(h, w), mode="bilinear",
                       align_corners=False)
    return fr.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)


@torch.no_grad()
def baselines(clips: torch.Tensor, batch_size: int = 64) -> dict[str, dict[str, float]]:
    """The trivial reconstructions a tokenizer must be compared with, on the same clips: per-frame mean
    colour, and 8x / 4x area down-sampling with bilinear up-sampling."""
    fns = {"mean_colour": mean_colour, "down_up_x8": lambda v: down_up(v, 8), "down_up_x4": lambda v: down_up(v, 4)}
    out = {}
    for name, fn in fns.items():
        parts = [_scores(fn(clips[i:i + batch_size].float()), clips[i:i + batch_size])
                 for i in range(0, clips.shape[0], batch_size)]
        out[name] = _mean(parts)
    return out


def check_curve(curve: dict[int, dict[str, float]], min_gain_db: float, min_step_db: float = 0.0) -> tuple[bool, str]:
    """Does quality rise with tokens? PSNR must rise by more than ``min_step_db`` at every step of the
    count and by at least ``min_gain_db`` from the fewest to the most tokens. Returns (ok, a one-line
    account naming the failing step, or the curve)."""
    counts = sorted(curve)
    p = [curve[k]["psnr"] for k in counts]
    line = " ".join(f"{k}:{v:.2f}" for k, v in zip(counts, p))
    for a, b, pa, pb in zip(counts, counts[1:], p, p[1:]):
        if pb - pa <= min_step_db:
            return False, f"PSNR does not rise from {a} to {b} tokens a block ({pa:.2f} -> {pb:.2f} dB; curve {line})"
    gain = p[-1] - p[0]
    if gain < min_gain_db:
        return False, f"PSNR gains {gain:.2f} dB from {counts[0]} to {counts[-1]} tokens a block, below {min_gain_db} (curve {line})"
    return True, f"PSNR gains {gain:.2f} dB from {counts[0]} to {counts[-1]} tokens a block (curve {line})"


def curve_metrics(curve: dict[int, dict[str, float]], base: dict[str, dict[str, float]] | None = None,
                  prefix: str = "val/") -> dict[str, float]:
    """Flat metric names for logging: ``val/psnr_k8``, ..., ``val/baseline_down_up_x8_psnr``, ``val/curve_gain_db``."""
    out = {f"{prefix}{m}_k{k}": v for k, d in curve.items() for m, v in d.items()}
    counts = sorted(curve)
    out[f"{prefix}curve_gain_db"] = curve[counts[-1]]["psnr"] - curve[counts[0]]["psnr"]
    for name, d in (base or {}).items():
        out.update({f"{prefix}baseline_{name}_{m}": v for m, v in d.items()})
    return out


def quick_train(model, clips: torch.Tensor, steps: int, lr: float = 2e-3, batch_size: int = 8, seed: int = 0,
                entropy: float = 0.02, log=None):
    """A short plain-PyTorch training of ``model`` (an ``AdaptiveTokenizer``) the way the proxy recipe trains
    it, for checks and benchmarks (the pipeline itself trains through ``workflows.train``): one uniformly
    random assignment per sample (the samples of a batch share their total: ``AssignmentSpace.sample``),
    L1 + codebook + commitment + ``entropy`` x entropy loss, no GAN, AdamW (betas 0.9/0.95, weight decay
    1e-4), linear warm-up over 4% of the steps then cosine to 1% of ``lr``.
    Deterministic in ``seed``. Returns the model in eval mode."""
    from evatok.assignment import AssignmentSpace

    cfg = model.config
    space = AssignmentSpace(cfg.counts, cfg.num_blocks)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=1e-4)
    warm = max(1, steps // 25)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, clips.shape[0], (batch_size,), generator=g)
        x = clips[idx]
        out = model(x, space.sample(batch_size, g))
        loss = ((out.recon - x).abs().mean() + out.losses["codebook"] + out.losses["commit"]
                + entropy * out.losses["entropy"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log is not None and (step + 1) % max(1, steps // 4) == 0:
            log(step + 1, float(loss))
    return model.eval()
