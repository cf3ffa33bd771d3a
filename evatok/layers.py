"""Q-Former building blocks with explicit key/value handling, so the same layer serves full passes
(boolean block-causal masks) and the prefix walk (cached keys/values of earlier blocks).

A layer (pre-norm, as GigaTok's DETR-style decoder layer): x += SelfAttn(LN(x)); x += CrossAttn(LN(x), LN(mem));
x += MLP(LN(x)). Keys/values are computed from the *normalised layer input*, which depends only on blocks <= t,
so block t's keys/values can be cached and reused by every later block.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

KV = tuple[torch.Tensor, torch.Tensor]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, H, L, hd]
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def kv_heads(self, x: torch.Tensor) -> KV:
        k, v = self.kv(x).chunk(2, dim=-1)
        return self._split(k), self._split(v)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``mask``: bool, True = may attend, broadcastable to [B, H, Lq, Lk]."""
        o = F.scaled_dot_product_attention(self._split(self.q(x)), k, v, attn_mask=mask)
        b, h, n, hd = o.shape
        return self.proj(o.transpose(1, 2).reshape(b, n, h * hd))


    def grouped(self, x: torch.Tensor, past: list[KV] | None, k: torch.Tensor, v: torch.Tensor, groups: int):
        """Self-attention of ``groups`` equal query groups (the prefix walk's children), each seeing the shared
        ``past`` keys plus its own group's keys: no mask and no wasted scores between groups. The shared past
        is expanded (a view) and copied once into the keys, one row per group."""
        q = self._split(self.q(x))
        b, h, n, hd = q.shape
        split = lambda t: t.reshape(b, h, groups, n // groups, hd)  # noqa: E731
        k, v = split(k), split(v)
        if past:
            pk = torch.cat([s[0] for s in past], 2)[:, :, None].expand(-1, -1, groups, -1, -1)
            pv = torch.cat([s[1] for s in past], 2)[:, :, None].expand(-1, -1, groups, -1, -1)
            k, v = torch.cat([pk, k], 3), torch.cat([pv, v], 3)
        # 4D [B*H, groups, Lq, hd]: the groups as SDPA's head dimension, so the CPU flash kernel runs (5D
        # inputs take the unfused math path: ~3.5x slower here, with a temporary of every score)
        flat = lambda t: t.reshape(b * h, groups, t.shape[-2], hd)  # noqa: E731
        o = F.scaled_dot_product_attention(flat(split(q)), flat(k), flat(v)).reshape(b, h, n, hd)
        return self.proj(o.transpose(1, 2).reshape(b, n, h * hd))


class MLP(nn.Sequential):
    def __init__(self, dim: int, ratio: int = 4):
        super().__init__(nn.Linear(dim, ratio * dim), nn.GELU(), nn.Linear(ratio * dim, dim))


class QFormerLayer(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1, self.self_attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.cross_attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm_mem = nn.LayerNorm(dim)
        self.norm3, self.mlp = nn.LayerNorm(dim), MLP(dim, mlp_ratio)

    def memory_kv(self, mem: torch.Tensor) -> KV:
        """Cross-attention keys/values of the memory (patch embeddings or 1D tokens) for this layer."""
        return self.cross_attn.kv_heads(self.norm_mem(mem))

    def forward(self, x: torch.Tensor, mem_kv: KV, self_mask, cross_mask, past: list[KV] | None = None,
                groups: int = 1):
        """Returns (x, own self-attn (k, v)). ``past``: cached self-attn (k, v) segments of earlier blocks,
        placed before x's own keys (masks are laid out [past | own]); concatenated in one copy.
        ``groups > 1``: x holds that many equal groups that see past + their own group (``self_mask`` unused)."""
        h = self.norm1(x)
        k, v = self.self_attn.kv_heads(h)
        own = (k, v)
        if groups > 1:
            x = x + self.self_attn.grouped(h, past, k, v, groups)
        else:
            if past:
                k, v = torch.cat([s[0] for s in past] + [k], 2), torch.cat([s[1] for s in past] + [v], 2)
            x = x + self.self_attn(h, k, v, self_mask)
        x = x + self.cross_attn(self.norm2(x), mem_kv[0], mem_kv[1], cross_mask)
        x = x + self.mlp(self.norm3(x))
        return x, own
