"""Exhaustive assignment scoring for label curation: every clip x every assignment -> metric tables.

``score_assignments`` walks the prefix tree of the block-causal tokenizer: block t's reconstruction
depends only on counts 1..t, so the 5 + 25 + 125 + 625 nodes each evaluate one block against their
parent's cached keys/values, the 5 children of a parent together (their block-t queries concatenated,
a block-diagonal mask keeping them apart), batched across clips, depth first so only one root-to-leaf
path of caches is alive. ``score_assignments_bruteforce`` is the fair naive baseline and the reference:
each assignment's full pass, batched across clips and across assignments of equal total length (no
padding), with the patch embedding shared.

Metrics (``evatok.metrics.frame_metrics``) compare the reconstruction clamped to [-0.5, 0.5] with the
clip, both shifted to [0, 1]. The node at depth t records block t's metric (mean over its 4 frames); an
assignment's clip metric is the mean of its 4 block metrics, i.e. the mean over its 16 frames.
"""
from __future__ import annotations

import torch

from evatok.assignment import AssignmentSpace
from evatok.metrics import frame_metrics
from evatok.tokenizer import AdaptiveTokenizer, PrefixState


def _check_clips(tokenizer: AdaptiveTokenizer, clips: torch.Tensor) -> None:
    c = tokenizer.config
    if clips.dim() != 5 or tuple(clips.shape[1:]) != (3, c.frames, c.size, c.size):
        raise ValueError(f"clips must be [N, 3, {c.frames}, {c.size}, {c.size}], got {tuple(clips.shape)}")


def _mean_metrics(recon: torch.Tensor, target: torch.Tensor, lpips) -> dict[str, torch.Tensor]:
    """Mean over frames of each frame metric: ``[R, 3, T, H, W]`` pairs -> {name: [R]}."""
    m = frame_metrics(recon.clamp(-0.5, 0.5) + 0.5, target + 0.5, lpips=lpips)
    return {k: v.mean(-1) for k, v in m.items()}


@torch.inference_mode()
def score_assignments(tokenizer: AdaptiveTokenizer, clips: torch.Tensor, lpips=None,
                      batch_clips: int = 8) -> dict[str, torch.Tensor]:
    """Metric tables ``{name: [N, 625]}`` (mse, psnr, ssim[, lpips]) for clips ``[N, 3, T, H, W]`` in [-0.5, 0.5]."""
    _check_clips(tokenizer, clips)
    c = tokenizer.config
    nb, m, pt = c.num_blocks, len(c.counts), c.patch_t
    chunks = []
    for chunk in clips.split(batch_clips):
        b = chunk.shape[0]
        depth_tables: list[dict[str, torch.Tensor]] = [{} for _ in range(nb)]  # depth t -> {name: [B, m^(t+1)]}

        def visit(state: PrefixState, node: int) -> None:
            t = state.depth
            recon, _, children = tokenizer.prefix_step(state)  # [m, B, 3, pt, H, W]
            target = chunk[:, :, t * pt:(t + 1) * pt].repeat(m, 1, 1, 1, 1)
            for name, v in _mean_metrics(recon.flatten(0, 1), target, lpips).items():
                table = depth_tables[t].setdefault(name, v.new_empty(b, m ** (t + 1)))
                table[:, node * m:(node + 1) * m] = v.view(m, b).t()
            if t + 1 < nb:
                for i, child in enumerate(children):
                    visit(child, node * m + i)

        visit(tokenizer.prefix_init(chunk), 0)
        chunks.append({name: sum(depth_tables[t][name].repeat_interleave(m ** (nb - 1 - t), 1)
                                 for t in range(nb)) / nb for name in depth_tables[0]})
    return {name: torch.cat([ch[name] for ch in chunks]) for name in chunks[0]}


@torch.inference_mode()
def score_assignments_bruteforce(tokenizer: AdaptiveTokenizer, clips: torch.Tensor, lpips=None,
                                 batch_clips: int = 8, max_rows: int = 64) -> dict[str, torch.Tensor]:
    """Same tables as ``score_assignments`` from 625 full passes per clip (rows of at most ``max_rows``
    clip-assignment pairs, each batch of one total length)."""
    _check_clips(tokenizer, clips)
    c = tokenizer.config
    space = AssignmentSpace(c.counts, c.num_blocks)
    groups = [torch.nonzero(space.totals == tot).flatten() for tot in space.totals.unique()]
    chunks = []
    for chunk in clips.split(batch_clips):
        b = chunk.shape[0]
        patches, queries = tokenizer._embed(chunk)
        out: dict[str, torch.Tensor] = {}
        for group in groups:
            for sub in group.split(max(1, max_rows // b)):
                clip_idx = torch.arange(b).repeat(len(sub))  # row r: assignment sub[r // b], clip r % b
                counts = space.table[sub].repeat_interleave(b, 0).to(chunk.device)
                recon = tokenizer.reconstruct(None, counts, embedded=(patches[clip_idx], queries[clip_idx]))
                for name, v in _mean_metrics(recon, chunk[clip_idx], lpips).items():
                    table = out.setdefault(name, v.new_empty(b, space.size))
                    table[:, sub] = v.view(len(sub), b).t()
        chunks.append(out)
    return {name: torch.cat([ch[name] for ch in chunks]) for name in chunks[0]}
