"""Vector quantiser with an L2-normalised low-dimensional codebook (GigaTok / ViT-VQGAN style).

Choice of code dimension: 8 by default, as GigaTok S-B (the paper's stated basis). Looking up codes in a
low-dimensional, L2-normalised space (nearest = highest cosine similarity) is the ViT-VQGAN finding that keeps
large codebooks (16384) well used; the encoder width is projected down to it and the decoder projects back up.

Losses (returned per call, averaged over the valid tokens only):
  codebook = ||sg[z] - q||^2,  commit = beta * ||z - sg[q]||^2 (beta applied here, default 0.25),
  entropy  = mean_i H(p_i) - H(mean_i p_i) with p_i = softmax(<z_i, c> / temperature) (MAGVIT-v2), raw: the
             training recipe applies its weight (gamma = 0.02). Minimising it makes each token confident and
             the batch use the whole codebook.
             [I] With ``entropy_tokens`` > 0 both entropy terms are estimated on that many valid tokens drawn
             at random (without replacement) from the batch: the softmax over the codebook is the cost of a
             large codebook on a CPU (1,600 tokens x 16,384 codes a tiny batch = 3.5x the step time of 1,024
             codes); a uniform subsample is an unbiased estimate of the per-token term and a consistent one of
             the batch term. 0 = every token (the paper's behaviour, where a GPU makes it cheap).
The straight-through estimator passes the decoder's gradient to the encoder: z + (q - z).detach().

Dead-code restarts [I] (``restart_below`` > 0; off by default; not in the paper, which is silent on codebook
upkeep): as in SoundStream and Jukebox, each code's usage is an exponential moving average (decay
``USAGE_DECAY``) of its share of the batch's valid tokens, relative to the mean share (1.0 = used as often as
the average code). In training, a code whose usage falls below ``restart_below`` is moved onto a random
valid encoder output of the batch (plus 1% noise) and its usage reset to 1; the move is applied at the start
of the next training forward, after the optimiser step, so the step's own backward sees the codebook it used.
With the entropy loss on a subsample (``entropy_tokens``) a large codebook otherwise keeps codes that no
token ever reaches. Measured on the tiny recipe's data (16,384 codes, 256 entropy tokens, restart_below
0.03, ``docs/quality-cost.md``), restarts make no difference beyond run-to-run noise: held-out PSNR from
8 to 128 tokens a block +4.18 dB at 3,000 steps against +4.24 without them (+3.05 with 1,024 codes), and
+2.27 to +3.08 against +2.38 at 600 steps. Kept as an option for codebooks that collapse. Under
``torch.distributed`` the counts are summed over ranks and the moved codes come from rank 0's batch
(broadcast), so every rank's codebook stays the same. The usage averages are saved with the model; a move
still queued when a checkpoint is written is not (the code is found again later).
The codebook is edited in place: an optimiser that keeps its own master copy of the weights (DeepSpeed
ZeRO 1-3, mixed precision) would undo it, so the training workflow allows restarts with ZeRO 0 in float32
only.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from evatok.layers import Linear, onednn_applies, onednn_linear


#: tokens a block of the nearest-code search where the product is ``z @ cb.t()`` (not CPU float32, or oneDNN
#: off): the [rows, codebook] similarity block of 128 rows x 16,384 codes (8 MB) stays in cache between the
#: product and the argmax; the whole [1,600 x 16,384] matrix of a tiny training batch (105 MB) did not
#: (measured with MKL, 2 threads: 44.5 -> 17.7 ms a batch; 64 rows 34.9, 256 rows 19.8)
NEAREST_ROWS = 128
USAGE_DECAY = 0.99  # dead-code restarts: decay of each code's usage average (~100 steps)


def onednn_rows(codes: int) -> int:
    """Rows a block of the nearest-code search on CPU float32, where the product is oneDNN's GEMM: a
    [rows, codes] block of ~4 MB (64-1,024 rows). Measured, 1 thread, 992 rows of one walk step: 1,024
    codes 0.80 ms in one block of 1,024 rows (0.94 in blocks of 128; MKL's 1.24); 16,384 codes 12.1 ms
    in blocks of 64 (16.2 in blocks of 128; MKL's 21.5). At 2 threads and 1,600 rows (a training batch):
    0.69 against 1.09 ms for 1,024 codes, 9.6-10.5 against 15.6 ms for 16,384."""
    return min(1024, max(64, (1 << 20) // codes))


def nearest(z: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code of every row of ``z [..., d]`` among unit vectors ``cb [K, d]`` (nearest
    in L2 == highest cosine), without gradient (the argmax has none) and in blocks of rows: on CPU float32
    through oneDNN's GEMM in blocks of ``onednn_rows(K)`` (as ``layers.linear``; ``EVATOK_ONEDNN_LINEAR=0``
    turns it off), elsewhere ``z @ cb.t()`` in blocks of ``NEAREST_ROWS``. Each row's similarities are the
    same products as in one product of that kind over all rows (row-independent GEMM; checked in
    ``tests/test_tokenizer.py``), so the codes do not depend on the rows around them or their number."""
    with torch.no_grad():
        flat, cb = z.detach().reshape(-1, z.shape[-1]), cb.detach()
        out = torch.empty(flat.shape[0], dtype=torch.long, device=z.device)
        dnn, cbt = onednn_applies(flat, cb), cb.t()
        rows = onednn_rows(cb.shape[0]) if dnn else NEAREST_ROWS
        for i in range(0, flat.shape[0], rows):
            block = flat[i:i + rows]
            torch.argmax(onednn_linear(block, cb) if dnn else block @ cbt, -1, out=out[i:i + rows])
        return out.reshape(z.shape[:-1])


class VectorQuantizer(nn.Module):
    def __init__(self, in_dim: int, codebook_size: int = 1024, code_dim: int = 8, beta: float = 0.25,
                 entropy_temperature: float = 0.01, entropy_tokens: int = 0, restart_below: float = 0.0):
        super().__init__()
        self.codebook_size, self.code_dim = codebook_size, code_dim
        self.beta, self.entropy_temperature, self.entropy_tokens = beta, entropy_temperature, entropy_tokens
        self.restart_below = float(restart_below)
        self.proj = Linear(in_dim, code_dim)  # down to the lookup space
        self.embedding = nn.Embedding(codebook_size, code_dim)
        nn.init.normal_(self.embedding.weight)
        self.restarts = 0  # codes moved so far (this process)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.restart_below > 0:  # saved with the model, so a resumed run continues the same averages
            self.register_buffer("usage", torch.ones(codebook_size))

    def codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight, dim=-1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Code indices ``[...]`` -> normalised code vectors ``[..., code_dim]``."""
        return F.embedding(codes, self.codebook())

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inference path: ``x [..., in_dim]`` -> (normalised z, codes, q), no losses."""
        z = F.normalize(self.proj(x), dim=-1)
        cb = self.codebook()
        codes = nearest(z, cb)
        return z, codes, F.embedding(codes, cb)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        """``x [B, L, in_dim]``, ``mask [B, L]`` (True = real token) -> (q_st, codes, losses)."""
        if self.training and self._pending is not None:
            self._apply_restarts()
        z, codes, q = self.quantize(x)
        if mask is None:
            mask = torch.ones(z.shape[:-1], dtype=torch.bool, device=z.device)
        w = mask.to(z.dtype)
        n = w.sum().clamp_min(1.0)
        cb_loss = (((q - z.detach()) ** 2).sum(-1) * w).sum() / (n * self.code_dim)
        commit = (((z - q.detach()) ** 2).sum(-1) * w).sum() / (n * self.code_dim)
        zv = z[mask]  # [n, code_dim], valid tokens only
        if 0 < self.entropy_tokens < zv.shape[0]:
            zv = zv[torch.randperm(zv.shape[0], device=zv.device)[: self.entropy_tokens]]
        p = torch.softmax(zv @ self.codebook().t() / self.entropy_temperature, dim=-1)
        per_sample = -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()
        avg = p.mean(0)
        batch = -(avg * torch.log(avg.clamp_min(1e-12))).sum()
        q_st = z + (q - z).detach()
        if self.training and self.restart_below > 0:
            self._track_usage(z, codes, mask)
        return q_st, codes, {"codebook": cb_loss, "commit": self.beta * commit, "entropy": per_sample - batch}

    # ------------------------------------------------------------------ dead-code restarts
    @torch.no_grad()
    def _track_usage(self, z: torch.Tensor, codes: torch.Tensor, mask: torch.Tensor) -> None:
        """Update the usage averages with this batch's codes; queue the codes that fell below
        ``restart_below`` to move onto random valid encoder outputs (applied before the next forward)."""
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        valid = codes[mask]
        counts = torch.bincount(valid, minlength=self.codebook_size).float()
        n = torch.tensor([float(valid.numel())], device=counts.device)
        if distributed:
            dist.all_reduce(counts)
            dist.all_reduce(n)
        if n.item() == 0:
            return
        self.usage.mul_(USAGE_DECAY).add_(counts * ((1 - USAGE_DECAY) * self.codebook_size / n))
        dead = torch.nonzero(self.usage < self.restart_below).flatten()
        if dead.numel() == 0:
            return
        zv = z.detach()[mask]
        pick = torch.randint(0, max(1, zv.shape[0]), (dead.numel(),), device=zv.device)
        new = zv[pick] + 0.01 * torch.randn(dead.numel(), self.code_dim, device=zv.device, dtype=zv.dtype)
        if distributed:  # every rank moves the same codes to rank 0's choice
            dist.broadcast(new, src=0)
        self.usage[dead] = 1.0
        self._pending = (dead, new.to(self.embedding.weight.dtype))

    @torch.no_grad()
    def _apply_restarts(self) -> None:
        dead, new = self._pending
        self.embedding.weight[dead] = new
        self.restarts += dead.numel()
        self._pending = None
