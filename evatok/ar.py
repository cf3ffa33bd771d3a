"""The AR generator: a LLaMA-style decoder over adaptive-length video token sequences.

Sequence layout (one clip, EVATok Sec. 7 / LARP-style class conditioning)::

    [CLS_c] [LEN_k1] v v ... v (k1 tokens) [LEN_k2] v ... v (k2) [LEN_k3] ... [LEN_k4] v ... v (k4)

The length token comes *before* the block it describes, so the model chooses each block's budget
itself and no router is needed at sampling time. Length 1 + 4 + sum(k) <= 1 + 4 + 4 * max(counts).

Vocabulary layout (``SequenceLayout``, V = codebook size, m = number of candidate counts, C = classes)::

    [0, V)            visual tokens (the tokenizer's codebook ids)
    [V, V+m)          length tokens, LEN for counts[0] (fewest) .. counts[m-1]
    [V+m, V+m+C)      class tokens
    V+m+C             the null class (classifier-free guidance)

The output head only scores the first V+m ids (visual + length): class tokens are never targets.

Choices where the paper is silent ([I]):
- Tied embeddings: the head reads the first V+m rows of the token embedding. With SwiGLU hidden =
  8/3*dim rounded up to 256 (LLaMA's rule), 101 classes and a 16384 codebook this gives GPT-B 97.6M
  (-1.4% of 99M), GPT-327M 325.2M (-0.5%), GPT-633M 630.7M (-0.4%); untied heads would land near
  LARP's counts (110M/342M/652M) instead of the paper's.
- 1D RoPE over sequence positions (theta 10000), RMSNorm eps 1e-5, no biases, std-0.02 init.
- Padding is on the right with token id 0; causal attention means padding never influences real
  positions, and targets there are ignore_index (-100).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from evatok.ar_sampling import generate as _generate
from evatok.layers import Linear

IGNORE_INDEX = -100


@dataclass
class ARConfig:
    codebook_size: int = 1024
    counts: tuple[int, ...] = (8, 16, 32, 64, 128)
    num_blocks: int = 4
    num_classes: int = 8
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    multiple_of: int = 64  # SwiGLU hidden size = 8/3 * dim rounded up to this
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    class_dropout: float = 0.1
    tie_embeddings: bool = True

    def __post_init__(self):  # configs come back from YAML / export files with lists
        self.counts = tuple(int(c) for c in self.counts)

    @property
    def ffn_hidden(self) -> int:
        h = int(8 * self.dim / 3)
        return self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)


_PAPER = dict(codebook_size=16384, counts=(32, 64, 128, 256, 512), num_classes=101, multiple_of=256)
PRESETS = {
    "tiny": lambda: ARConfig(),
    "GPT-B": lambda: ARConfig(**_PAPER, dim=768, n_layers=12, n_heads=12),
    "GPT-327M": lambda: ARConfig(**_PAPER, dim=1024, n_layers=24, n_heads=16),
    "GPT-633M": lambda: ARConfig(**_PAPER, dim=1280, n_layers=30, n_heads=20),
}


class MalformedSequenceError(ValueError):
    """A token sequence that does not follow the class / (length, visual*) x blocks layout."""


@dataclass(frozen=True)
class SequenceLayout:
    codebook_size: int
    counts: tuple[int, ...]
    num_classes: int
    num_blocks: int = 4

    @property
    def length_base(self) -> int:
        return self.codebook_size

    @property
    def class_base(self) -> int:
        return self.codebook_size + len(self.counts)

    @property
    def null_token(self) -> int:
        return self.class_base + self.num_classes

    @property
    def vocab_size(self) -> int:  # embedding rows
        return self.null_token + 1

    @property
    def out_vocab(self) -> int:  # tokens the model can emit: visual + length
        return self.class_base

    @property
    def max_seq_len(self) -> int:
        return 1 + self.num_blocks + self.num_blocks * max(self.counts)

    def class_token(self, labels: torch.Tensor | None, batch: int | None = None) -> torch.Tensor:
        """Class token ids [B]; ``labels=None`` (or a label of -1) gives the null class."""
        if labels is None:
            return torch.full((batch,), self.null_token, dtype=torch.long)
        labels = torch.as_tensor(labels, dtype=torch.long)
        if ((labels < -1) | (labels >= self.num_classes)).any():
            raise ValueError(f"labels must be in [0, {self.num_classes}) or -1 (null), got {labels.tolist()}")
        return torch.where(labels < 0, self.null_token, labels + self.class_base)

    def levels(self, counts: torch.Tensor) -> torch.Tensor:
        """Token counts [..., blocks] -> candidate level ids; ValueError for a non-candidate count."""
        cand = torch.tensor(self.counts, device=counts.device)
        hit = counts.unsqueeze(-1) == cand
        if not hit.any(-1).all():
            raise ValueError(f"counts {counts.unique().tolist()} not all in candidates {list(self.counts)}")
        return hit.long().argmax(-1)

    def build_sequence(self, codes, counts: torch.Tensor, labels: torch.Tensor | None = None,
                       pad_to: int | None = None):
        """Batch variable-length clips into training sequences.

        codes: LongTensor [B, Lc] (each row the concatenated block codes, first sum(counts[b]) valid;
        the tokenizer's ``encode`` output) or a list of 1D LongTensors. counts: [B, num_blocks].
        labels: [B] class ids, or None for the null class.
        Returns (tokens [B, L], targets [B, L], mask [B, L]) with L = the longest sequence (or pad_to):
        targets[:, i] = tokens[:, i + 1], IGNORE_INDEX past each sequence's end; mask marks real tokens.
        """
        counts = torch.as_tensor(counts, dtype=torch.long).cpu()
        if counts.ndim != 2 or counts.shape[1] != self.num_blocks:
            raise ValueError(f"counts must be [B, {self.num_blocks}], got {list(counts.shape)}")
        level = self.levels(counts)
        if not torch.is_tensor(codes):
            codes = nn.utils.rnn.pad_sequence([torch.as_tensor(c, dtype=torch.long) for c in codes], batch_first=True)
        B, total = counts.shape[0], counts.sum(1)
        if codes.shape[0] != B or codes.shape[1] < int(total.max()):
            raise ValueError(f"codes {list(codes.shape)} too short for counts totals {total.tolist()}")
        lens = 1 + self.num_blocks + total
        L = int(lens.max()) if pad_to is None else int(pad_to)
        if L < int(lens.max()):
            raise ValueError(f"pad_to={pad_to} is shorter than the longest sequence {int(lens.max())}")
        tokens = torch.zeros(B, L, dtype=torch.long)
        tokens[:, 0] = self.class_token(None if labels is None else torch.as_tensor(labels).cpu(), B)
        # block t's length token sits after the class token, t earlier length tokens and their codes
        start = torch.cumsum(counts, 1) - counts  # codes before block t
        len_pos = 1 + torch.arange(self.num_blocks) + start
        tokens.scatter_(1, len_pos, self.length_base + level)
        j = torch.arange(codes.shape[1]).repeat(B, 1)
        valid = j < total[:, None]
        vis = codes.long().cpu()
        if ((vis < 0) | (vis >= self.codebook_size))[valid].any():
            raise ValueError(f"codes must be in [0, {self.codebook_size})")
        block = torch.searchsorted(torch.cumsum(counts, 1), j, right=True).clamp(max=self.num_blocks - 1)
        pos = (2 + block + j).clamp(max=L - 1)
        tokens[valid.nonzero(as_tuple=True)[0], pos[valid]] = vis[valid]
        mask = torch.arange(L)[None] < lens[:, None]
        targets = torch.full_like(tokens, IGNORE_INDEX)
        targets[:, :-1] = torch.where(mask[:, 1:], tokens[:, 1:], IGNORE_INDEX)
        return tokens, targets, mask

    def parse_sequence(self, tokens: torch.Tensor):
        """Inverse of build_sequence: tokens [B, L] (or [L]) -> (list of B code tensors, counts [B, blocks]).
        Anything after the last block is ignored (padding). Raises MalformedSequenceError."""
        tokens = torch.as_tensor(tokens).long().cpu()
        if tokens.ndim == 1:
            tokens = tokens[None]
        B, L = tokens.shape
        V, m = self.codebook_size, len(self.counts)
        cls = tokens[:, 0]
        bad = ((cls < self.class_base) | (cls > self.null_token)).nonzero()
        if len(bad):
            raise MalformedSequenceError(f"sample {int(bad[0])}: first token {int(cls[bad[0]])} is not a class token")
        is_vis = (tokens >= 0) & (tokens < V)
        n_vis = F.pad(torch.cumsum(is_vis.long(), 1), (1, 0))  # n_vis[:, i] = visual tokens before i
        cand = torch.tensor(self.counts)
        pos = torch.ones(B, dtype=torch.long)
        counts = torch.zeros(B, self.num_blocks, dtype=torch.long)
        rows = torch.arange(B)
        for t in range(self.num_blocks):
            tok = tokens[rows, pos.clamp(max=L - 1)]
            is_len = (pos < L) & (tok >= V) & (tok < V + m)
            if not is_len.all():
                b = int((~is_len).nonzero()[0])
                raise MalformedSequenceError(f"sample {b}: expected a length token for block {t + 1} at {int(pos[b])}")
            k = cand[tok - V]
            end = pos + 1 + k  # one past the block's last visual token
            ok = (end <= L) & (n_vis[rows, end.clamp(max=L)] - n_vis[rows, pos + 1] == k)
            if not ok.all():
                b = int((~ok).nonzero()[0])
                raise MalformedSequenceError(f"sample {b}: block {t + 1} should hold {int(k[b])} visual tokens")
            counts[:, t], pos = k, end
        codes = []
        for b in range(B):
            codes.append(tokens[b, :int(pos[b])][is_vis[b, :int(pos[b])]])
        return codes, counts


# --- the model ------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(head_dim: int, max_len: int, theta: float):
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ang = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
    return ang.cos(), ang.sin()  # [max_len, head_dim / 2]


def apply_rope(x, cos, sin):
    """Rotate [B, H, L, hd] by position tables [L, hd/2] (half-split pairing, as GPT-NeoX)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).type_as(x)


class KVCache:
    """Preallocated keys/values per layer: [B, H, max_len, head_dim]. All rows share one position,
    because every sample gains exactly one token per step (padding after its end)."""

    def __init__(self, n_layers, batch, heads, max_len, head_dim, device, dtype):
        shape = (batch, heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]


class Attention(nn.Module):
    def __init__(self, c: ARConfig):
        super().__init__()
        self.heads, self.head_dim = c.n_heads, c.dim // c.n_heads
        self.wqkv = Linear(c.dim, 3 * c.dim, bias=False)
        self.wo = Linear(c.dim, c.dim, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None, layer: int, start: int):
        B, L, D = x.shape
        q, k, v = self.wqkv(x).view(B, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask, causal = None, L > 1
        if cache is not None:
            cache.k[layer][:, :, start:start + L] = k
            cache.v[layer][:, :, start:start + L] = v
            k, v = cache.k[layer][:, :, :start + L], cache.v[layer][:, :, :start + L]
            if start > 0 and L > 1:  # a chunk after a prefix: causal with an offset
                mask = torch.ones(L, start + L, dtype=torch.bool, device=x.device).tril(start)
                causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.wo(y.transpose(1, 2).reshape(B, L, D))


class SwiGLU(nn.Module):
    def __init__(self, c: ARConfig):
        super().__init__()
        self.w1 = Linear(c.dim, c.ffn_hidden, bias=False)  # gate
        self.w3 = Linear(c.dim, c.ffn_hidden, bias=False)  # up
        self.w2 = Linear(c.ffn_hidden, c.dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, c: ARConfig):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(c.dim, c.norm_eps), Attention(c)
        self.ffn_norm, self.ffn = RMSNorm(c.dim, c.norm_eps), SwiGLU(c)

    def forward(self, x, cos, sin, cache, layer, start):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer, start)
        return x + self.ffn(self.ffn_norm(x))


class ARModel(nn.Module):
    def __init__(self, config: ARConfig):
        super().__init__()
        if config.dim % config.n_heads or (config.dim // config.n_heads) % 2:
            raise ValueError(f"dim {config.dim} must split into {config.n_heads} heads of even size")
        self.config = config
        self.layout = SequenceLayout(config.codebook_size, tuple(config.counts), config.num_classes, config.num_blocks)
        self.tok_emb = nn.Embedding(self.layout.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.head = None if config.tie_embeddings else Linear(config.dim, self.layout.out_vocab, bias=False)
        cos, sin = rope_tables(config.dim // config.n_heads, self.layout.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, start_pos: int = 0):
        """tokens [B, L] -> (logits [B, L, V+m] float32, mean CE over non-ignored targets or None)."""
        L = tokens.shape[1]
        if start_pos + L > self.layout.max_seq_len:
            raise ValueError(f"sequence of {start_pos + L} exceeds max_seq_len {self.layout.max_seq_len}")
        cos, sin = self.rope_cos[start_pos:start_pos + L], self.rope_sin[start_pos:start_pos + L]
        x = self.tok_emb(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, start_pos)
        x = self.norm(x)
        w = self.tok_emb.weight[: self.layout.out_vocab] if self.head is None else self.head.weight
        logits = F.linear(x, w).float()
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        return logits, loss

    def drop_class(self, tokens: torch.Tensor, p: float | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """Classifier-free-guidance training: replace each sequence's class token (position 0) by the
        null class with probability p (config.class_dropout by default). Returns a new tensor."""
        p = self.config.class_dropout if p is None else p
        drop = torch.rand(tokens.shape[0], generator=generator, device=tokens.device) < p
        out = tokens.clone()
        out[:, 0] = torch.where(drop, self.layout.null_token, tokens[:, 0])
        return out

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        p = self.tok_emb.weight
        c = self.config
        return KVCache(c.n_layers, batch, c.n_heads, max_len or self.layout.max_seq_len,
                       c.dim // c.n_heads, p.device, p.dtype)

    def generate(self, labels, cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None, use_cache: bool = True):
        """Sample well-formed sequences [B, L]; see ``evatok.ar_sampling.generate``."""
        return _generate(self, labels, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                        top_p=top_p, generator=generator, use_cache=use_cache)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
