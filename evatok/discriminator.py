"""LARP-style transformer PatchGAN discriminator for video.

EVATok uses "a transformer PatchGAN discriminator as in LARP" [P]. LARP's discriminator
(github.com/hywang66/LARP, models/loss.py) is a ViT over 4x8x8 tubelet patches with fixed 3D sin-cos
position embeddings; it reads one real/fake logit off a [CLS] token. The issue for this repo asks for
the PatchGAN reading instead: a logit per tubelet patch ([B, t, h, w]), which gives the generator a
spatially and temporally local signal. That is the one deliberate departure from LARP here.

Paper scale (LARP's reproduction config): hidden 512, 8 heads, 12 layers on 16x128x128 clips.
The loss functions (non-saturating, LeCam) live in losses.py; the training loop owns the optimizer
(LARP: Adam lr 3e-5 for the discriminator, betas (0.5, 0.9)).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn


@dataclass
class DiscriminatorConfig:
    hidden: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    patch: tuple[int, int, int] = (4, 8, 8)   # (t, h, w) tubelet, as the tokenizer's patchify
    in_channels: int = 3


PRESETS: dict[str, DiscriminatorConfig] = {
    "tiny": DiscriminatorConfig(hidden=64, heads=4, layers=2),
    "paper": DiscriminatorConfig(hidden=512, heads=8, layers=12),
}


def sincos_3d(grid: tuple[int, int, int], dim: int, device=None) -> torch.Tensor:
    """Fixed 3D sin-cos position embedding [t*h*w, dim] (as LARP): dim split over t, h, w axes.

    Fixed rather than learned so the discriminator accepts any clip size that the patch divides."""
    # each axis gets an even share of channels; the remainder (if any) is zero-padded
    per_axis = (dim // 3) // 2 * 2
    axes = []
    for n in grid:
        pos = torch.arange(n, dtype=torch.float32, device=device)
        k = per_axis // 2
        omega = 1.0 / 10000 ** (torch.arange(k, dtype=torch.float32, device=device) / max(k, 1))
        ang = pos[:, None] * omega[None, :]
        axes.append(torch.cat([ang.sin(), ang.cos()], dim=1))          # [n, per_axis]
    t, h, w = grid
    emb = torch.cat([
        axes[0][:, None, None, :].expand(t, h, w, per_axis),
        axes[1][None, :, None, :].expand(t, h, w, per_axis),
        axes[2][None, None, :, :].expand(t, h, w, per_axis),
    ], dim=-1).reshape(t * h * w, 3 * per_axis)
    return nn.functional.pad(emb, (0, dim - 3 * per_axis))


class PatchDiscriminator(nn.Module):
    """Video [B, C, T, H, W] (model range [-0.5, 0.5]) -> per-patch logits [B, T/pt, H/ph, W/pw]."""

    def __init__(self, cfg: DiscriminatorConfig):
        super().__init__()
        if cfg.hidden % cfg.heads:
            raise ValueError(f"hidden {cfg.hidden} is not divisible by heads {cfg.heads}")
        self.cfg = cfg
        # a linear tubelet embedding, written as a strided conv (kernel == stride == patch)
        self.embed = nn.Conv3d(cfg.in_channels, cfg.hidden, kernel_size=cfg.patch, stride=cfg.patch)
        layer = nn.TransformerEncoderLayer(
            cfg.hidden, cfg.heads, int(cfg.hidden * cfg.mlp_ratio), dropout=0.0,
            activation="gelu", batch_first=True, norm_first=True)  # pre-norm, as LARP/ViT
        self.blocks = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.hidden, eps=1e-6)
        self.head = nn.Linear(cfg.hidden, 1)
        self._init()

    def _init(self):
        # xavier for linears and the patch projection (LARP's init); zero biases
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.embed.weight
        if w.device.type != "meta":
            nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
            nn.init.zeros_(self.embed.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"expected video [B, {self.cfg.in_channels}, T, H, W], got {tuple(x.shape)}")
        pt, ph, pw = self.cfg.patch
        if x.shape[2] % pt or x.shape[3] % ph or x.shape[4] % pw:
            raise ValueError(f"video {tuple(x.shape[2:])} is not divisible by the patch {self.cfg.patch}")
        z = self.embed(x)                                        # [B, D, t, h, w]
        b, d, t, h, w = z.shape
        z = z.flatten(2).transpose(1, 2)                         # [B, N, D]
        z = z + sincos_3d((t, h, w), d, device=z.device).to(z.dtype)
        z = self.norm(self.blocks(z))
        return self.head(z).view(b, t, h, w)


def build_discriminator(cfg: DiscriminatorConfig | str = "tiny", **overrides) -> PatchDiscriminator:
    """A discriminator from a preset name or a config; keyword overrides replace config fields."""
    if isinstance(cfg, str):
        if cfg not in PRESETS:
            raise KeyError(f"unknown discriminator preset {cfg!r}; choose from {sorted(PRESETS)}")
        cfg = PRESETS[cfg]
    return PatchDiscriminator(replace(cfg, **overrides))

