"""The router: a ViT-S-like 625-way classifier that picks a clip's token assignment (EVATok stage 3).

Input: a clip ``float32 [B, 3, 16, H, W]`` in ``[-0.5, 0.5]``. Output: logits over the 625 joint
assignments (one class per whole assignment, not per block), in the index order of
``evatok.assignment`` (``index = sum_t level_t * 5 ** (3 - t)``, block 1 most significant).

Architecture: linear 3D tubelet embedding, learned position embedding, a [CLS] token, a pre-norm
transformer encoder (GELU MLP), a final LayerNorm and a linear head on the [CLS] feature.

Choices where the paper is silent ([I]):
- ``paper`` preset: ViT-S width/depth/heads (384 wide, 12 layers, 6 heads) on 4x16x16 tubelets
  (4x8x8 = 256 tokens at 16x128x128, so the router stays cheap next to the tokenizer). A 4x MLP
  would give 22.8M parameters; the paper reports 19.9M, so the MLP hidden size is 1216 (3.17x),
  which lands at 19.86M (-0.2%). Depth, width and heads stay exactly ViT-S. (The tokenizer's own
  4x8x8 tubelets, 1024 tokens, would give 19.27M with the same blocks: set ``patch_size``.)
- ``tiny`` preset: 64x64 clips, 4x16x16 tubelets (64 tokens), 96 wide, 2 layers.
- Constrained prediction is an argmax over the logits restricted to the assignments that satisfy the
  constraint (softmax is monotone, so this is the highest-probability feasible assignment).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from evatok.assignment import AssignmentSpace
from evatok.layers import Linear


@dataclass
class RouterConfig:
    image_size: int = 64
    num_frames: int = 16
    patch_size: tuple[int, int, int] = (4, 16, 16)  # (t, h, w) tubelet
    dim: int = 96
    depth: int = 2
    heads: int = 4
    mlp_dim: int = 384
    dropout: float = 0.0
    counts: tuple[int, ...] = (8, 16, 32, 64, 128)  # candidate token counts per block
    num_blocks: int = 4

    def __post_init__(self):  # configs come back from YAML / export files with lists
        self.patch_size = tuple(int(p) for p in self.patch_size)
        self.counts = tuple(int(c) for c in self.counts)

    @property
    def num_classes(self) -> int:
        return len(self.counts) ** self.num_blocks

    @property
    def grid(self) -> tuple[int, int, int]:
        pt, ph, pw = self.patch_size
        if self.num_frames % pt or self.image_size % ph or self.image_size % pw:
            raise ValueError(f"clip {self.num_frames}x{self.image_size}x{self.image_size} is not "
                             f"divisible by patch {self.patch_size}")
        return self.num_frames // pt, self.image_size // ph, self.image_size // pw


PRESETS = {
    "tiny": lambda: RouterConfig(),
    "paper": lambda: RouterConfig(image_size=128, patch_size=(4, 16, 16), dim=384, depth=12, heads=6,
                                  mlp_dim=1216, counts=(32, 64, 128, 256, 512)),
}


class NoFeasibleAssignmentError(ValueError):
    """A constraint (prefix / max_total) that no assignment in the space satisfies."""


class TopK(NamedTuple):
    probs: torch.Tensor    # [B, k] softmax probabilities, descending
    indices: torch.Tensor  # [B, k] assignment indices


def constraint_mask(space: AssignmentSpace, prefix: Sequence[int] | None = None,
                    max_total: int | None = None) -> torch.Tensor:
    """BoolTensor [space.size]: which assignments have the given first block counts and total <= max_total."""
    table = space.table
    ok = torch.ones(table.shape[0], dtype=torch.bool, device=table.device)
    if prefix is not None:
        prefix = [int(c) for c in prefix]
        if len(prefix) > table.shape[1]:
            raise ValueError(f"prefix {prefix} is longer than the {table.shape[1]} blocks")
        allowed = set(int(c) for c in table[:, 0].unique())
        bad = [c for c in prefix if c not in allowed]
        if bad:
            raise ValueError(f"prefix counts {bad} are not candidates {sorted(allowed)}")
        for t, c in enumerate(prefix):
            ok &= table[:, t] == c
    if max_total is not None:
        ok &= table.sum(-1) <= int(max_total)
    if not bool(ok.any()):
        raise NoFeasibleAssignmentError(
            f"no assignment satisfies prefix={prefix} max_total={max_total} "
            f"(totals range {int(table.sum(-1).min())}..{int(table.sum(-1).max())})")
    return ok


class Router(nn.Module):
    def __init__(self, config: RouterConfig):
        super().__init__()
        self.config = config
        with torch.device("cpu"):  # a lookup table, not a parameter: real even when built on meta
            self.space = AssignmentSpace(config.counts, num_blocks=config.num_blocks)
        gt, gh, gw = config.grid
        pt, ph, pw = config.patch_size
        self.patch_embed = Linear(3 * pt * ph * pw, config.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + gt * gh * gw, config.dim))
        layer = nn.TransformerEncoderLayer(config.dim, config.heads, config.mlp_dim, config.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        # enable_nested_tensor is incompatible with norm_first and only warns; turn it off.
        self.blocks = nn.TransformerEncoder(layer, config.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.dim)
        self.head = Linear(config.dim, config.num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] -> [B, N, 3*pt*ph*pw] tubelets in (t, h, w) raster order."""
        c = self.config
        if x.ndim != 5 or x.shape[1] != 3 or tuple(x.shape[2:]) != (c.num_frames, c.image_size, c.image_size):
            raise ValueError(f"router expects [B, 3, {c.num_frames}, {c.image_size}, {c.image_size}], "
                             f"got {list(x.shape)}")
        B = x.shape[0]
        (gt, gh, gw), (pt, ph, pw) = c.grid, c.patch_size
        x = x.reshape(B, 3, gt, pt, gh, ph, gw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return x.reshape(B, gt * gh * gw, 3 * pt * ph * pw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, 625] over assignments."""
        h = self.patch_embed(self.patchify(x))
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + self.pos_embed
        h = self.norm(self.blocks(h))
        return self.head(h[:, 0])

    def loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against curated argmax-reward assignment indices [B]."""
        return F.cross_entropy(self(x), labels)

    # --- inference -------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """LongTensor [B]: the argmax assignment index of each clip."""
        return self(x).argmax(-1)

    @torch.no_grad()
    def topk(self, x: torch.Tensor, k: int) -> TopK:
        """The k most probable assignments per clip (probs and indices, [B, k], descending)."""
        if not 1 <= k <= self.config.num_classes:
            raise ValueError(f"k must be in [1, {self.config.num_classes}], got {k}")
        probs, idx = self(x).softmax(-1).topk(k, dim=-1)
        return TopK(probs, idx)

    @torch.no_grad()
    def predict_constrained(self, x: torch.Tensor, prefix: Sequence[int] | None = None,
                            max_total: int | None = None) -> torch.Tensor:
        """LongTensor [B]: the most probable assignment whose first blocks equal ``prefix`` (counts,
        e.g. (512, 128) for K600 frame prediction) and whose total length is <= ``max_total``.
        Raises NoFeasibleAssignmentError when the constraint admits no assignment."""
        logits = self(x)
        ok = constraint_mask(self.space, prefix, max_total).to(logits.device)
        return logits.masked_fill(~ok, float("-inf")).argmax(-1)

    def counts(self, indices: torch.Tensor) -> torch.Tensor:
        """Assignment indices [...] -> token counts LongTensor [..., num_blocks]."""
        return self.space.table.to(indices.device)[indices]


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
