"""Q-Former building blocks with explicit key/value handling, so the same layer serves full passes
(boolean block-causal masks) and the prefix walk (cached keys/values of earlier blocks, attended without
masks: ``Attention.split`` computes only the query/key pairs a block-causal mask would allow).

A layer (pre-norm, as GigaTok's DETR-style decoder layer): x += SelfAttn(LN(x)); x += CrossAttn(LN(x), LN(mem));
x += MLP(LN(x)). Keys/values are computed from the *normalised layer input*, which depends only on blocks <= t,
so block t's keys/values can be cached and reused by every later block.

The tokenizer's and AR model's linear layers, and the router's patch embedding and head, are ``Linear``:
``nn.Linear`` (same parameters, same state dict) whose forward, when no gradient is recorded, runs large
float32 products on the CPU through oneDNN's GEMM instead of MKL's. Measured on this project's AMD EPYC
CI machines (1 thread): 240 against 110 GFLOP/s at the tokenizer's shapes, and the label stage's walk
1.3x faster (``bench/label_bench.py``). On the Intel Xeon (Emerald Rapids) machines both run at about
the core's float32 peak (100-145 GFLOP/s; oneDNN 10% ahead at 128 inputs, MKL 15% at 512), so there it
neither gains nor costs. Results differ from MKL's only in summation order (at the
tokenizer's shapes: equal with 128 inputs, ~1e-6 relative with 512). oneDNN pays ~10 us a call to set
up, so small layers (under ``ONEDNN_MIN_WEIGHT`` weights: the quantiser's 8-dim projections and code
lookup) and calls of under ``ONEDNN_MIN_ROWS`` rows (the AR's per-token steps) keep MKL. The choice
depends on the layer and never on how many clips share a batch above that floor, and both GEMMs give
each row the same result at any row count (checked at the tokenizer's shapes), so a clip's codes and
label do not depend on its batch. Training (gradients on), other dtypes and devices use ``F.linear``.
``onednn_applies`` / ``onednn_linear`` serve two other products that pay at their sizes: the label walk's
SSIM blur (``search._BlockTarget``) and the nearest-code search (``quantizer.nearest``, also in training,
where it runs without gradient). ``EVATOK_ONEDNN_LINEAR=0`` turns all of them off.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

KV = tuple[torch.Tensor, torch.Tensor]

ONEDNN_MIN_WEIGHT = 1 << 14  # weights (in x out) below which the call's set-up outweighs the faster GEMM
ONEDNN_MIN_ROWS = 32
_ONEDNN_LINEAR = (os.environ.get("EVATOK_ONEDNN_LINEAR", "1") != "0" and torch.backends.mkldnn.is_available()
                  and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``onednn_linear(x, weight)`` can run: CPU float32, no gradient recorded, oneDNN present and
    not turned off. Says nothing about whether it pays (``linear`` adds the size rule)."""
    return (_ONEDNN_LINEAR and not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dtype == weight.dtype == torch.float32 and x.dim() >= 2)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` by oneDNN's float32 GEMM; only where ``onednn_applies``."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, through oneDNN's GEMM when no gradient is recorded, on CPU float32, for a layer and a
    call large enough (see the module doc)."""
    if (onednn_applies(x, weight) and weight.numel() >= ONEDNN_MIN_WEIGHT
            and x.numel() >= ONEDNN_MIN_ROWS * weight.shape[1]):
        return onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` whose inference forward on CPU float32 uses oneDNN's GEMM (see the module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def _cat_kv(segs: list[KV]) -> KV:
    """Cached (k, v) segments as one (k, v): a view when there is one segment, else one copy."""
    if len(segs) == 1:
        return segs[0]
    return torch.cat([s[0] for s in segs], 2), torch.cat([s[1] for s in segs], 2)


def attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> KV:
    """Unmasked attention ``[B, H, Lq, hd]`` and the log-sum-exp of each query's scaled scores ``[B, H, Lq]``.
    On CPU the fused flash kernel returns both (the public SDPA drops the log-sum-exp); elsewhere plain math."""
    if q.device.type == "cpu" and q.dtype == k.dtype == v.dtype:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    s = (q.float() * q.shape[-1] ** -0.5) @ k.float().transpose(-1, -2)
    lse = s.logsumexp(-1, keepdim=True)
    return (s.sub_(lse).exp_() @ v.float()).to(q.dtype), lse[..., 0]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q = Linear(dim, dim)
        self.kv = Linear(dim, 2 * dim)
        self.proj = Linear(dim, dim)

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

    def split(self, x: torch.Tensor, past: list[KV] | None, own: KV, q_sizes: list[int], k_sizes: list[int]):
        """Attention of query groups (the prefix walk's children; group i: ``q_sizes[i]`` rows of x) to the
        shared ``past`` keys plus their own group's keys (``k_sizes[i]`` rows of ``own``): the result of a
        block-diagonal masked call over [past | own], without scoring the masked-out pairs (65-80% of the
        own part) and without the masked kernel (~2x the cost a score on CPU). The past (once, all queries)
        and each group's own keys are attended separately and merged by their log-sum-exps: the softmax over
        the union is o = o_past + w * (o_own - o_past), w = sigmoid(lse_own - lse_past)."""
        q = self._split(self.q(x))
        b, h, n, hd = q.shape
        g = len(q_sizes)
        if len(set(q_sizes)) == 1 and len(set(k_sizes)) == 1:
            # equal groups (the decoder's 3D queries): one call, 4D [B*H, groups, L, hd], the groups as the
            # kernel's head dimension (5D inputs would take the unfused math path)
            flat = lambda t: t.reshape(b * h, g, t.shape[2] // g, hd)  # noqa: E731
            o, lse = attend_lse(flat(q), flat(own[0]), flat(own[1]))
            o, lse = o.reshape(b, h, n, hd), lse.reshape(b, h, n)
        else:
            outs, lses, qo, ko = [], [], 0, 0
            for nq, nk in zip(q_sizes, k_sizes):
                o, lse = attend_lse(q[:, :, qo:qo + nq], own[0][:, :, ko:ko + nk], own[1][:, :, ko:ko + nk])
                outs.append(o)
                lses.append(lse)
                qo, ko = qo + nq, ko + nk
            o, lse = torch.cat(outs, 2), torch.cat(lses, 2)
        if past:
            o_past, lse_past = attend_lse(q, *_cat_kv(past))
            w = torch.sigmoid(lse.sub_(lse_past)).to(o.dtype)
            o = o_past.lerp_(o, w[..., None])
        return self.proj(o.transpose(1, 2).reshape(b, n, h * hd))


class MLP(nn.Sequential):
    def __init__(self, dim: int, ratio: int = 4):
        super().__init__(Linear(dim, ratio * dim), nn.GELU(), Linear(ratio * dim, dim))


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

    def forward(self, x: torch.Tensor, mem_kv: KV, self_mask, cross_mask):
        """Full pass. Returns (x, own self-attn (k, v)); masks: bool, True = may attend."""
        h = self.norm1(x)
        k, v = self.self_attn.kv_heads(h)
        x = x + self.self_attn(h, k, v, self_mask)
        x = x + self.cross_attn(self.norm2(x), mem_kv[0], mem_kv[1], cross_mask)
        x = x + self.mlp(self.norm3(x))
        return x, (k, v)

    def step(self, x: torch.Tensor, past: list[KV], groups: tuple[list[int], list[int]], mem_kv: KV,
             mem_past: list[KV] | None = None, mem_groups: tuple[list[int], list[int]] | None = None):
        """Prefix walk: x holds the children of a node, in groups (``groups`` = (query rows, own key rows) of
        each child); a child attends to the cached ``past`` self-attn (k, v) segments of earlier blocks plus
        its own group's keys. Cross-attention: to all of ``mem_kv`` (no mask) when ``mem_groups`` is None,
        else like the self-attention (cached ``mem_past`` plus each child's own group of ``mem_kv``).
        Both attentions of a group see exactly what a full pass's block-causal mask allows it (``Attention.split``).
        Returns (x, own self-attn (k, v))."""
        h = self.norm1(x)
        k, v = self.self_attn.kv_heads(h)
        q_sizes, k_sizes = groups
        x = x + self.self_attn.split(h, past, (k, v), q_sizes, k_sizes)
        if mem_groups is None:
            x = x + self.cross_attn(self.norm2(x), mem_kv[0], mem_kv[1], None)
        else:
            x = x + self.cross_attn.split(self.norm2(x), mem_past, mem_kv, *mem_groups)
        x = x + self.mlp(self.norm3(x))
        return x, (k, v)
