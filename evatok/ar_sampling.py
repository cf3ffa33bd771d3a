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

Prefix conditioning (K600 frame prediction [P]): ``prefix`` tokens (``prefix_tokens``: the length token
and codes of each of the first blocks) are forced after the class token, one position at a time, so
the model reads them as it would its own samples (and the KV cache holds them); the uniform of each
forced step is still drawn, so the generator advances as in unconditioned sampling. A prefix must be
well-formed (the structure mask is checked at every forced position). ``frame_prediction_prefix``
makes it from the conditioning frames: the first ``cond_frames`` frames padded to the prefix blocks'
frames by repeating the last one ([I]: the paper says "padded", not how), block counts fixed to
(512, 128) through ``Router.predict_constrained``, encoded by the (block-causal) tokenizer.
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


def prefix_tokens(layout, codes: torch.Tensor, counts: torch.Tensor, blocks: int) -> torch.Tensor:
    """The sequence tokens of the first ``blocks`` blocks (each: its length token, then its codes), as
    they follow the class token: LongTensor [B, blocks + sum(counts[0, :blocks])]. codes: [B, Lc] (the
    tokenizer's ``encode`` layout, block after block); every row must share those blocks' counts."""
    counts = torch.as_tensor(counts, dtype=torch.long).cpu()
    codes = torch.as_tensor(codes, dtype=torch.long).cpu()
    head = counts[:, :blocks]
    if not 0 < blocks <= layout.num_blocks or bool((head != head[:1]).any()):
        raise ValueError(f"a prefix of {blocks} blocks needs the same counts in every row, got {head.tolist()}")
    level = layout.levels(head[0])
    parts, start = [], 0
    for t in range(blocks):
        k = int(head[0, t])
        parts.append(torch.full((codes.shape[0], 1), layout.length_base + int(level[t]), dtype=torch.long))
        parts.append(codes[:, start:start + k])
        start += k
    if codes.shape[1] < start or bool(((codes[:, :start] < 0) | (codes[:, :start] >= layout.codebook_size)).any()):
        raise ValueError(f"codes {list(codes.shape)} do not hold {start} valid prefix codes")
    return torch.cat(parts, 1)


@torch.no_grad()
def frame_prediction_prefix(tokenizer, router, frames: torch.Tensor, layout, cond_frames: int = 5,
                            prefix_counts=(512, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """K600 frame prediction's conditioning [P]: (prefix tokens [B, P], counts [B, blocks]).

    frames: [B, 3, T', H, W] with T' >= ``cond_frames`` (only those are read). They are padded to a whole
    clip by repeating the last conditioning frame [I] (the first len(prefix_counts) blocks thus hold the
    conditioning frames padded to 8 at paper scale; what follows cannot reach them: the tokenizer is
    block-causal), routed under the fixed first-block counts (``Router.predict_constrained``), encoded,
    and the first blocks' tokens returned."""
    c = tokenizer.config
    per_block = c.frames // c.num_blocks
    if cond_frames > per_block * len(prefix_counts):
        raise ValueError(f"{cond_frames} conditioning frames do not fit the {len(prefix_counts)} prefix blocks "
                         f"({per_block} frames each)")
    cond = frames[:, :, :cond_frames]
    if cond.shape[2] != cond_frames:
        raise ValueError(f"need {cond_frames} conditioning frames, got {frames.shape[2]}")
    clip = torch.cat([cond, cond[:, :, -1:].expand(-1, -1, c.frames - cond_frames, -1, -1)], 2)
    counts = router.counts(router.predict_constrained(clip, prefix=tuple(prefix_counts)))
    codes, _ = tokenizer.encode(clip, counts)
    return prefix_tokens(layout, codes, counts, len(prefix_counts)), counts


@torch.no_grad()
def generate(model, labels, cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, generator: torch.Generator | None = None,
             use_cache: bool = True, prefix: torch.Tensor | None = None) -> torch.Tensor:
    """Sample class-conditional sequences. labels: [B] class ids (-1 = null/unconditional).
    ``prefix``: LongTensor [B, P] of tokens forced after the class token (``prefix_tokens``; K600
    frame prediction's conditioning blocks); the rest is sampled.

    Returns tokens LongTensor [B, L] (class token first, padded with 0 after each sample's end;
    L <= layout.max_seq_len). Use ``model.layout.parse_sequence`` to split them into codes + counts.
    """
    layout = model.layout
    device = model.tok_emb.weight.device
    cls = layout.class_token(torch.as_tensor(labels).cpu()).to(device)
    B, V = cls.shape[0], layout.codebook_size
    forced, P = None, 0
    if prefix is not None:
        forced = torch.as_tensor(prefix, dtype=torch.long).to(device)
        if forced.ndim != 2 or forced.shape[0] != B or forced.shape[1] >= layout.max_seq_len:
            raise ValueError(f"prefix must be [{B}, P < {layout.max_seq_len}], got {list(forced.shape)}")
        P = forced.shape[1]
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
            allowed = structure_mask(layout, remaining, finished)
            logits = logits.masked_fill(~allowed, NEG_INF)
            tok = sample_token(logits, temperature, top_k, top_p, generator)
            if pos < P:  # a forced prefix token: it must be one the structure allows here
                tok = forced[:, pos]
                inside = (tok >= 0) & (tok < allowed.shape[1])
                if not bool((inside & allowed.gather(1, tok.clamp(0, allowed.shape[1] - 1)[:, None])[:, 0]).all()):
                    raise ValueError(f"prefix token at position {pos + 1} breaks the sequence structure "
                                     "(build it with prefix_tokens)")
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
