"""The adaptive-length 1D video tokenizer (EVATok proxy and final tokenizer): a block-causal Q-Former VQ model.

Video ``[B, 3, T, H, W]`` in [-0.5, 0.5] -> linear 3D patch embedding (4x8x8) + learned positions ->
per block t, k_t queries from a pooled pyramid of that block's embeddings -> Q-Former encoder (queries
self-attend, cross-attend to patch embeddings) -> VQ -> Q-Former decoder (a full 3D query grid per block
cross-attends to the 1D tokens) -> linear depatchify. Block t sees blocks <= t only, everywhere, so block
t's reconstruction depends on the counts of blocks 1..t only; the prefix interface (``prefix_init`` /
``prefix_step``) exploits that to evaluate the 5 children of a prefix against its cached keys/values.

Choices where the paper is silent ([I]):
- Queries: GigaTok's pyramid (global mean, then average-pool grids of 1, 2, 4, ... cells, rows <= cols).
  The pyramid for 2k tokens extends the one for k, so one pyramid of kmax tokens per block serves every
  count (a prefix of it). Pooled before position embeddings are added; then ``global_proj`` + learned
  position-in-block + block embeddings.
- The decoder's 1D token memory = ``post_quant(code)`` + position-in-block + block embeddings.
- Decoder 3D queries, a departure from the paper ("initialised from the first 1D token of their block"),
  ``query_init``: with first-token seeding the tiny decoder learned to read nothing but that token (its
  reconstructions were as good at 8 tokens a block as at 128, below a per-frame mean-colour predictor: the
  first-token path carries ~30x the gradient of any cross-attention path at init, and cross-attention
  never became the route). Default ``"finest"``: each patch's query starts from the token of the finest
  pyramid cell (among the block's k tokens) that covers it, + learned 3D positions; the coarser tokens
  are read through cross-attention. So the first decoder step already routes every token to where it
  came from, and quality rises with the count by construction (at 128 tokens a block the finest level is
  one token per patch). ``"cells"``: the sum of all covering cells' tokens (measured: rises less).
  ``"first"``: the paper's literal design, kept for comparison; files written before this option load
  as ``"first"`` (``evatok.export.LEGACY``).
- ``features`` is the output of decoder layer ``align_layer`` (1-based).
- Padded token slots (mixed assignments) carry code 0 and are masked out of every attention and loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from evatok.layers import KV, Linear, QFormerLayer
from evatok.quantizer import VectorQuantizer


QUERY_INITS = ("finest", "cells", "first")


@dataclass
class TokenizerConfig:
    frames: int = 16
    size: int = 64
    patch_t: int = 4
    patch_s: int = 8
    counts: tuple[int, ...] = (8, 16, 32, 64, 128)  # candidate token counts per block
    enc_dim: int = 128
    enc_layers: int = 2
    enc_heads: int = 4
    dec_dim: int = 128
    dec_layers: int = 2
    dec_heads: int = 4
    mlp_ratio: int = 4
    codebook_size: int = 1024
    code_dim: int = 8
    beta: float = 0.25
    entropy_temperature: float = 0.01
    entropy_tokens: int = 0  # 0: the entropy loss over every token; n: over n tokens drawn from the batch
    restart_below: float = 0.0  # > 0: dead-code restarts below this usage (relative to the mean); see quantizer
    align_layer: int = 1
    query_init: str = "finest"  # decoder 3D queries from: "finest" | "cells" | "first" (paper); see _seed

    def __post_init__(self):
        self.counts = tuple(int(c) for c in self.counts)
        if self.frames % self.patch_t or self.size % self.patch_s:
            raise ValueError(f"clip {self.frames}x{self.size}^2 not divisible by patch {self.patch_t}x{self.patch_s}^2")
        if any(c < 1 or c & (c - 1) for c in self.counts) or list(self.counts) != sorted(set(self.counts)):
            raise ValueError(f"counts must be increasing powers of two, got {self.counts}")
        if self.kmax > 2 * self.grid ** 2:
            raise ValueError(f"{self.kmax} tokens need a pyramid finer than the {self.grid}x{self.grid} grid")
        if self.query_init not in QUERY_INITS:
            raise ValueError(f"query_init must be one of {', '.join(QUERY_INITS)}, got {self.query_init!r}")
        if not 1 <= self.align_layer <= self.dec_layers:
            raise ValueError(f"align_layer must be in [1, {self.dec_layers}], got {self.align_layer}")

    num_blocks = property(lambda self: self.frames // self.patch_t)
    grid = property(lambda self: self.size // self.patch_s)  # h = w
    hw = property(lambda self: self.grid ** 2)  # patches (and 3D decoder queries) per block
    kmax = property(lambda self: max(self.counts))
    patch_dim = property(lambda self: 3 * self.patch_t * self.patch_s ** 2)


PRESETS = {
    "tiny": lambda: TokenizerConfig(),
    "paper-SB": lambda: TokenizerConfig(size=128, counts=(32, 64, 128, 256, 512), enc_dim=512, enc_layers=6,
                                        enc_heads=8, dec_dim=768, dec_layers=12, dec_heads=12,
                                        codebook_size=16384, align_layer=6),
}


class TokenizerOutput(NamedTuple):
    recon: torch.Tensor  # [B, 3, T, H, W]
    codes: torch.Tensor  # [B, Lmax]
    code_mask: torch.Tensor  # [B, Lmax] bool
    losses: dict  # codebook, commit (beta applied), entropy (raw)
    features: torch.Tensor  # [B, T_lat, h, w, dec_dim], decoder layer `align_layer`


class Layout(NamedTuple):
    """Where each of a row's Lmax token slots lives: block (num_blocks = padding), position in block."""
    block: torch.Tensor  # [B, L]
    pos: torch.Tensor  # [B, L]
    valid: torch.Tensor  # [B, L]
    starts: torch.Tensor  # [B, num_blocks] first slot of each block
    counts: torch.Tensor  # [B, num_blocks] tokens of each block


@dataclass
class PrefixState:
    """Cached state of a prefix (counts of blocks 1..depth) for a batch of clips. Caches are per layer
    lists of per-block (k, v) segments ``[B, H, n, hd]``, concatenated only when a step reads them, so a
    child shares its parent's tensors (no copy)."""
    depth: int
    counts: tuple[int, ...]
    shared: dict  # per clip, shared by every node: "queries", "enc_mem"
    enc: list = field(default_factory=list)  # [layer][block] -> KV, encoder self-attention
    dec: list = field(default_factory=list)  # [layer][block] -> KV, decoder self-attention (3D queries)
    tok: list = field(default_factory=list)  # [layer][block] -> KV, decoder cross-attention (1D tokens)
    codes: list = field(default_factory=list)  # [block] -> [B, k]


def pyramid_cover(kmax: int, grid: int) -> torch.Tensor:
    """``[grid*grid, kmax]`` 0/1: entry (p, j) is 1 when pyramid cell j (the global mean, then the 1x1, 1x2,
    2x2, 2x4, ... grids, in ``AdaptiveTokenizer.pyramid``'s order) covers patch p (row-major). The first
    k columns are the cover of k tokens, since the pyramid of k tokens is a prefix of the one of kmax."""
    cols = [torch.ones(grid * grid)]
    r = torch.arange(grid).repeat_interleave(grid)
    c = torch.arange(grid).repeat(grid)
    for j in range(int(math.log2(kmax))):
        rows, cls = 2 ** (j // 2), 2 ** (j - j // 2)
        cell = (r * rows // grid) * cls + (c * cls // grid)
        cols.append(F.one_hot(cell, rows * cls).float())
    return torch.cat([x.reshape(grid * grid, -1) for x in cols], 1)


class AdaptiveTokenizer(nn.Module):
    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = c = config
        nb, hw = c.num_blocks, c.hw
        self.patch_embed = Linear(c.patch_dim, c.enc_dim)
        self.patch_pos = nn.Parameter(torch.zeros(nb * hw, c.enc_dim))
        self.global_proj = Linear(c.enc_dim, c.enc_dim)
        self.query_pos = nn.Parameter(torch.zeros(c.kmax, c.enc_dim))
        self.enc_block = nn.Parameter(torch.zeros(nb, c.enc_dim))
        self.encoder = nn.ModuleList(QFormerLayer(c.enc_dim, c.enc_heads, c.mlp_ratio) for _ in range(c.enc_layers))
        self.enc_norm = nn.LayerNorm(c.enc_dim)
        self.quantizer = VectorQuantizer(c.enc_dim, c.codebook_size, c.code_dim, c.beta, c.entropy_temperature,
                                         c.entropy_tokens, c.restart_below)
        self.post_quant = Linear(c.code_dim, c.dec_dim)
        self.token_pos = nn.Parameter(torch.zeros(c.kmax, c.dec_dim))
        self.dec_block = nn.Parameter(torch.zeros(nb, c.dec_dim))
        self.dec_pos = nn.Parameter(torch.zeros(nb * hw, c.dec_dim))
        self.decoder = nn.ModuleList(QFormerLayer(c.dec_dim, c.dec_heads, c.mlp_ratio) for _ in range(c.dec_layers))
        self.dec_norm = nn.LayerNorm(c.dec_dim)
        self.to_pixels = Linear(c.dec_dim, c.patch_dim)
        self.register_buffer("patch_block", torch.arange(nb * hw) // hw, persistent=False)
        full = pyramid_cover(c.kmax, c.grid)
        cover = torch.zeros(len(c.counts), hw, c.kmax)
        for i, k in enumerate(c.counts):
            lo = k // 2 if c.query_init == "finest" else 0
            hi = 1 if c.query_init == "first" else k
            cover[i, :, lo:hi] = full[:, lo:hi]
        # [n_counts, hw, kmax]: which of a block's tokens seed which 3D query, for each candidate count
        self.register_buffer("cover", cover, persistent=False)
        self.register_buffer("count_index", torch.full((c.kmax + 1,), -1, dtype=torch.long), persistent=False)
        self.count_index[list(c.counts)] = torch.arange(len(c.counts))
        self.apply(self._init)
        for p in (self.patch_pos, self.query_pos, self.enc_block, self.token_pos, self.dec_block, self.dec_pos):
            nn.init.normal_(p, std=0.02)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    # ------------------------------------------------------------ patches and queries
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        if x.dim() != 5 or tuple(x.shape[1:]) != (3, c.frames, c.size, c.size):
            raise ValueError(f"expected video [B, 3, {c.frames}, {c.size}, {c.size}], got {tuple(x.shape)}")
        b, g, pt, ps = x.shape[0], c.grid, c.patch_t, c.patch_s
        x = x.reshape(b, 3, c.num_blocks, pt, g, ps, g, ps).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return x.reshape(b, c.num_blocks, g, g, c.patch_dim)

    def depatchify(self, p: torch.Tensor) -> torch.Tensor:
        """``[B, n, g, g, patch_dim]`` -> ``[B, 3, n * patch_t, H, W]``."""
        c = self.config
        b, n, g, ps = p.shape[0], p.shape[1], c.grid, c.patch_s
        p = p.reshape(b, n, g, g, 3, c.patch_t, ps, ps).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return p.reshape(b, 3, n * c.patch_t, c.size, c.size)

    def pyramid(self, emb: torch.Tensor) -> torch.Tensor:
        """Block patch embeddings ``[B, nb, g, g, D]`` -> pooled pyramid ``[B, nb, kmax, D]``."""
        b, nb, g, _, d = emb.shape
        grid = emb.reshape(b * nb, g, g, d).permute(0, 3, 1, 2)
        levels = [grid.mean((2, 3))[..., None]]  # global mean
        for j in range(int(math.log2(self.config.kmax))):
            rows, cols = 2 ** (j // 2), 2 ** (j - j // 2)
            levels.append(F.adaptive_avg_pool2d(grid, (rows, cols)).flatten(2))
        return torch.cat(levels, 2).transpose(1, 2).reshape(b, nb, -1, d)

    def _embed(self, x: torch.Tensor):
        """-> patch embeddings ``[B, nb*hw, D]`` and every block's kmax queries ``[B, nb, kmax, D]``."""
        c = self.config
        emb = self.patch_embed(self.patchify(x))
        q = self.global_proj(self.pyramid(emb)) + self.query_pos + self.enc_block[:, None]
        return emb.reshape(emb.shape[0], -1, c.enc_dim) + self.patch_pos, q

    # ------------------------------------------------------------ full passes (any mix of assignments)
    def _counts(self, counts, batch: int, device) -> torch.Tensor:
        c = self.config
        counts = torch.as_tensor(counts, dtype=torch.long, device=device)
        if counts.dim() == 1:
            counts = counts.expand(batch, -1)
        if counts.shape != (batch, c.num_blocks):
            raise ValueError(f"counts must be [{c.num_blocks}] or [{batch}, {c.num_blocks}], got {tuple(counts.shape)}")
        if not bool(torch.isin(counts, torch.tensor(c.counts, device=device)).all()):
            raise ValueError(f"token counts must be among {c.counts}, got {sorted(set(counts.flatten().tolist()))}")
        return counts

    def layout(self, counts: torch.Tensor) -> Layout:
        nb = self.config.num_blocks
        ends = counts.cumsum(-1)
        starts = ends - counts
        slot = torch.arange(int(ends[:, -1].max()), device=counts.device).expand(counts.shape[0], -1)
        block = torch.searchsorted(ends, slot.contiguous(), right=True)
        pos = (slot - starts.gather(1, block.clamp(max=nb - 1))).clamp(0, self.config.kmax - 1)
        return Layout(block, pos, block < nb, starts, counts)

    def _encode(self, x, counts, with_losses: bool, embedded=None):
        patches, queries = self._embed(x) if embedded is None else embedded
        counts = self._counts(counts, patches.shape[0], patches.device)
        lay = self.layout(counts)
        nb, kmax = self.config.num_blocks, self.config.kmax
        flat = (lay.block.clamp(max=nb - 1) * kmax + lay.pos)[..., None].expand(-1, -1, queries.shape[-1])
        h = queries.flatten(1, 2).gather(1, flat)
        qb = lay.block[:, :, None]  # padding slots have block nb: they see everything and nobody sees them
        self_mask = (lay.valid[:, None, :] & (lay.block[:, None, :] <= qb))[:, None]
        cross_mask = (self.patch_block[None, None, :] <= qb)[:, None]
        for layer in self.encoder:
            h, _ = layer(h, layer.memory_kv(patches), self_mask, cross_mask)
        h = self.enc_norm(h)
        if with_losses:
            q, codes, losses = self.quantizer(h, lay.valid)
        else:
            _, codes, q = self.quantizer.quantize(h)
            losses = {}
        return q, codes.masked_fill(~lay.valid, 0), counts, lay, losses

    def _decode(self, q, lay: Layout, align_layer: int | None = None):
        c = self.config
        nb, hw = c.num_blocks, c.hw
        bc = lay.block.clamp(max=nb - 1)
        tokens = self.post_quant(q) + self.token_pos[lay.pos] + self.dec_block[bc]
        h = self._seed(tokens, lay) + self.dec_pos
        qb = self.patch_block[None, :, None]
        self_mask = self.patch_block[None, :] <= self.patch_block[:, None]
        cross_mask = (lay.valid[:, None, :] & (lay.block[:, None, :] <= qb))[:, None]
        feats = None
        for i, layer in enumerate(self.decoder, 1):
            h, _ = layer(h, layer.memory_kv(tokens), self_mask, cross_mask)
            if i == align_layer:
                feats = h.reshape(h.shape[0], nb, c.grid, c.grid, c.dec_dim)
        pix = self.to_pixels(self.dec_norm(h)).reshape(h.shape[0], nb, c.grid, c.grid, c.patch_dim)
        return self.depatchify(pix), feats

    def _seed(self, tokens: torch.Tensor, lay: Layout) -> torch.Tensor:
        """Initial 3D queries ``[B, nb*hw, D]``: each patch's query is the sum of the block's tokens that
        ``cover`` assigns it for the block's count: the finest covering cell's token (``"finest"``), every
        covering cell's (``"cells"``) or the block's first token (``"first"``)."""
        c = self.config
        b, nb, kmax = tokens.shape[0], c.num_blocks, c.kmax
        slot = torch.where(lay.valid, lay.block * kmax + lay.pos, nb * kmax)  # padding -> a dropped slot
        per_block = tokens.new_zeros(b, nb * kmax + 1, tokens.shape[-1])
        per_block.scatter_(1, slot[..., None].expand(-1, -1, tokens.shape[-1]), tokens)
        per_block = per_block[:, :-1].reshape(b, nb, kmax, -1)
        cover = self.cover.to(tokens.dtype)[self.count_index[lay.counts]]  # [B, nb, hw, kmax]
        return torch.einsum("btpj,btjd->btpd", cover, per_block).reshape(b, nb * c.hw, -1)

    def forward(self, x: torch.Tensor, counts) -> TokenizerOutput:
        """Training pass. ``counts``: ``[4]`` for the whole batch or ``[B, 4]`` per sample (mixed is fine)."""
        q, codes, _, lay, losses = self._encode(x, counts, with_losses=True)
        recon, feats = self._decode(q, lay, self.config.align_layer)
        return TokenizerOutput(recon, codes, lay.valid, losses, feats)

    def encode(self, x: torch.Tensor, counts) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (codes ``[B, Lmax]`` with block t's k_t codes after block t-1's, padding 0; mask ``[B, Lmax]``)."""
        _, codes, _, lay, _ = self._encode(x, counts, with_losses=False)
        return codes, lay.valid

    def reconstruct(self, x: torch.Tensor | None, counts, embedded=None) -> torch.Tensor:
        """decode(encode(x)) in one call; ``embedded``: rows of ``_embed(clips)`` computed beforehand (shared
        by many assignments of the same clips), in which case ``x`` may be None."""
        q, _, _, lay, _ = self._encode(x, counts, with_losses=False, embedded=embedded)
        return self._decode(q, lay)[0]

    def decode(self, codes: torch.Tensor, counts) -> torch.Tensor:
        counts = self._counts(counts, codes.shape[0], codes.device)
        lay = self.layout(counts)
        if codes.shape[1] < lay.block.shape[1]:
            raise ValueError(f"codes have {codes.shape[1]} slots, counts need {lay.block.shape[1]}")
        codes = codes[:, : lay.block.shape[1]].masked_fill(~lay.valid, 0)
        return self._decode(self.quantizer.lookup(codes), lay)[0]

    # ------------------------------------------------------------ prefix interface (label search)
    def prefix_init(self, x: torch.Tensor) -> PrefixState:
        """Root of the prefix tree for clips ``x``: patch embeddings, queries and the encoder's
        cross-attention keys/values of the patches, computed once and shared by every node."""
        patches, queries = self._embed(x)
        shared = {"queries": queries, "enc_mem": [layer.memory_kv(patches) for layer in self.encoder]}
        return PrefixState(0, (), shared, [[] for _ in self.encoder], [[] for _ in self.decoder],
                           [[] for _ in self.decoder], [])

    def prefix_step(self, state: PrefixState, counts=None):
        """Evaluate block ``t = state.depth + 1`` for each candidate count (or the given subset), all children
        together against the parent's cache, read once: every attention of a child sees the cached keys of
        blocks < t (attended once for all children) plus its own block-t keys (attended per child, only the
        pairs a full pass's block-causal mask allows), merged by log-sum-exp (``layers.Attention.split``).
        No masks, no wasted scores. Equals full passes up to float rounding.

        Returns (recon ``[n, B, 3, patch_t, H, W]`` of block t, codes: list of n ``[B, k]``, children: n states).
        """
        c = self.config
        counts = tuple(c.counts if counts is None else counts)
        t, hw, dev = state.depth, c.hw, self.patch_block.device
        if t >= c.num_blocks:
            raise ValueError(f"prefix {state.counts} is already complete")
        if not set(counts) <= set(c.counts):
            raise ValueError(f"token counts must be among {c.counts}, got {counts}")
        offs = [0]
        for k in counts:
            offs.append(offs[-1] + k)
        idx = torch.cat([torch.arange(k, device=dev) for k in counts])
        n, sizes = len(counts), list(counts)
        # encoder: all children's block-t queries at once; child i's k_i queries see the cached past and
        # their own k_i keys (Attention.split), and the patches of blocks <= t
        h = state.shared["queries"][:, t, idx]
        enc_own = []
        for li, layer in enumerate(self.encoder):
            mem = tuple(m[:, :, : (t + 1) * hw] for m in state.shared["enc_mem"][li])
            h, kv = layer.step(h, state.enc[li], (sizes, sizes), mem)
            enc_own.append(kv)
        _, codes, q = self.quantizer.quantize(self.enc_norm(h))
        # decoder: 1D token memory of block t, then all children's 3D queries at once (child i: hw queries
        # that see the cached past of both attentions, the hw own 3D keys and its own k_i tokens)
        tokens = self.post_quant(q) + self.token_pos[idx] + self.dec_block[t]
        cover = self.cover.to(tokens.dtype)
        seeds = [torch.einsum("pj,bjd->bpd", cover[self.count_index[k], :, :k], tokens[:, offs[i]:offs[i + 1]])
                 for i, k in enumerate(counts)]
        h = torch.cat(seeds, 1) + self.dec_pos[t * hw:(t + 1) * hw].repeat(n, 1)
        dec_own, tok_own = [], []
        for li, layer in enumerate(self.decoder):
            tkv = layer.memory_kv(tokens)
            h, kv = layer.step(h, state.dec[li], ([hw] * n, [hw] * n), tkv, state.tok[li], ([hw] * n, sizes))
            dec_own.append(kv)
            tok_own.append(tkv)
        pix = self.to_pixels(self.dec_norm(h)).reshape(-1, n, 1, c.grid, c.grid, c.patch_dim)
        recon = torch.stack([self.depatchify(pix[:, i]) for i in range(n)])
        children = []
        for i, k in enumerate(counts):
            s_tok, s3 = slice(offs[i], offs[i + 1]), slice(i * hw, (i + 1) * hw)
            sl = lambda kv, s: (kv[0][:, :, s], kv[1][:, :, s])  # noqa: E731  views, no copies
            children.append(PrefixState(
                t + 1, state.counts + (k,), state.shared,
                [segs + [sl(kv, s_tok)] for segs, kv in zip(state.enc, enc_own)],
                [segs + [sl(kv, s3)] for segs, kv in zip(state.dec, dec_own)],
                [segs + [sl(kv, s_tok)] for segs, kv in zip(state.tok, tok_own)],
                state.codes + [codes[:, s_tok]]))
        return recon, [codes[:, offs[i]:offs[i + 1]] for i in range(n)], children
