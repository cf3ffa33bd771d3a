"""Sampling from the AR generator with structural logit masking, CFG, and a KV cache.

Every sample is well-formed by construction: at a length position only the m length tokens are
allowed; for the next k positions only visual tokens; after block 4 the sample is finished and its
remaining positions are padding (token 0). Samples in a batch advance one token per step each, so
they share a position (and the KV cache index) while being in different phases; the phase lives
in per-sample tensors (``remaining``, ``blocks``, ``finished``), never in a Python loop over samples.

Randomness: one ``torch.rand`` of shape [B, 1] per step (inverse-CDF), drawn whether or not a
sample is finished, so cached and uncached sampling consume the generator identically and give
the same tokens for the same seed.

CFG ([P]: constant scale): the batch is doubled, conditional half then null-class half, and the
guided logits ``u + s * (c - u)`` are computed before masking, temperature, top-k and top-p.
"""
from __future__ import annotations

import torch

NEG_INF = float("-inf")


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering; removed entries become -inf."""
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if top_p is not None and top_p < 1.0:
        srt, idx = logits.sort(dim=-1, descending=True)
        probs = srt.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keeps the most probable token always
        logits = logits.scatter(-1, idx, srt.masked_fill(drop, NEG_INF))
    return logits


def sample_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of logits [B, V] (-inf = forbidden); temperature 0 = greedy.

    Inverse-CDF sampling with one uniform per row (cheaper than Gumbel-max, which needs B*V
    uniforms and two logs). A forbidden token has zero mass, so its CDF equals its predecessor's
    and ``searchsorted(right=True)`` can never land on it; the draw is kept below the total mass.
    The uniform is drawn even for greedy decoding so the generator advances identically."""
    # drawn on the generator's own device, so a CPU generator drives CUDA sampling reproducibly
    gen_device = generator.device if generator is not None else logits.device
    u = torch.rand(logits.shape[0], 1, generator=generator, device=gen_device).to(logits.device)
    logits = filter_logits(logits, temperature, top_k, top_p)
    if temperature <= 0:
        return logits.argmax(-1)
    cdf = (logits - logits.amax(-1, keepdim=True)).exp().cumsum(-1)
    total = cdf[:, -1:]
    x = torch.minimum(u * total, total * (1 - 1e-6))
    return torch.searchsorted(cdf, x, right=True).squeeze(-1)


def structure_mask(layout, remaining: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
    """BoolTensor [B, V+m] of allowed tokens: length tokens where a block starts, visual otherwise
    (finished samples get visual-only too; their token is overwritten with padding)."""
    is_len_tok = torch.arange(layout.out_vocab, device=remaining.device) >= layout.length_base
    want_len = (remaining == 0) & ~finished
    return is_len_tok[None] == want_len[:, None]


@torch.no_grad()
def generate(model, labels, cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, generator: torch.Generator | None = None,
             use_cache: bool = True) -> torch.Tensor:
    """Sample class-conditional sequences. labels: [B] class ids (-1 = null/unconditional).

    Returns tokens LongTensor [B, L] (class token first, padded with 0 after each sample's end;
    L <= layout.max_seq_len). Use ``model.layout.parse_sequence`` to split them into codes + counts.
    """
    layout = model.layout
    device = model.tok_emb.weight.device
    cls = layout.class_token(torch.as_tensor(labels).cpu()).to(device)
    B, V = cls.shape[0], layout.codebook_size
    guided = cfg_scale != 1.0
    first = torch.cat([cls, torch.full_like(cls, layout.null_token)]) if guided else cls
    max_len = layout.max_seq_len
    seq = torch.zeros(B, max_len, dtype=torch.long, device=device)
    seq[:, 0] = cls
    cand = torch.tensor(layout.counts, device=device)
    remaining = torch.zeros(B, dtype=torch.long, device=device)
    blocks = torch.zeros(B, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    cache = model.new_cache(first.shape[0], max_len) if use_cache else None
    was_training = model.training
    model.eval()
    x, pos = first[:, None], 0
    try:
        while pos < max_len - 1:
            if use_cache:
                logits, _ = model(x, cache=cache, start_pos=pos)
            else:  # recompute the whole prefix (the reference the cache must match)
                prefix = seq[:, :pos + 1]
                if guided:
                    prefix = torch.cat([prefix, prefix]).clone()
                    prefix[:, 0] = first
                logits, _ = model(prefix)
            logits = logits[:, -1].float()
            if guided:
                cond, uncond = logits.chunk(2)
                logits = uncond + cfg_scale * (cond - uncond)
            logits = logits.masked_fill(~structure_mask(layout, remaining, finished), NEG_INF)
            tok = sample_token(logits, temperature, top_k, top_p, generator)
            tok = torch.where(finished, 0, tok)
            pos += 1
            seq[:, pos] = tok
            # advance each sample's phase
            active = ~finished
            is_len = active & (tok >= layout.length_base)
            level = (tok - layout.length_base).clamp(0, len(layout.counts) - 1)
            remaining = torch.where(is_len, cand[level], remaining - (active & ~is_len).long())
            blocks = blocks + is_len.long()
            finished = finished | (active & ~is_len & (remaining == 0) & (blocks == layout.num_blocks))
            if bool(finished.all()):
                break
            x = torch.cat([tok, tok])[:, None] if guided else tok[:, None]
    finally:
        model.train(was_training)
    return seq[:, :pos + 1]
