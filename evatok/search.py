"""Exhaustive assignment scoring for label curation: every clip x every assignment -> metric tables.

``score_assignments`` walks the prefix tree of the block-causal tokenizer: block t's reconstruction
depends only on counts 1..t, so the 5 + 25 + 125 + 625 nodes each evaluate one block against their
parent's cached keys/values, the 5 children of a parent together (``AdaptiveTokenizer.prefix_step``),
batched across clips, depth first so only one root-to-leaf path of caches is alive.
``score_assignments_bruteforce`` is the fair naive baseline and the reference: each assignment's full
pass, batched across clips and across assignments of equal total length (no padding), with the patch
embedding shared; it scores with ``evatok.metrics.frame_metrics`` directly.

Metrics compare the reconstruction clamped to [-0.5, 0.5] with the clip, both shifted to [0, 1], with
the definitions of ``evatok.metrics`` (per-frame MSE, PSNR and SSIM, and LPIPS when given). The node at
depth t records block t's metric (mean over its 4 frames); an assignment's clip metric is the mean of
its 4 block metrics, i.e. the mean over its 16 frames.

What the walk does to be fast (measured on the tiny preset, CPU; ``bench/label_bench.py``):
- The target side of every metric is computed once per clip block (``_BlockTarget``), not once per
  node: SSIM blurs 3 maps a node (x, x^2, x*y) instead of 5, with the same separable 'valid' Gaussian
  as ``evatok.metrics.ssim`` (shifted multiply-adds) and the formula in place. This took the metrics
  from ~35% of the walk to ~10% (3.5x cheaper a node, same values to 1e-7).
- Metrics run per ``prefix_step`` call (the 5 children of a parent x the batch's clips). Batching more
  nodes into one metric call was measured slower on CPU (25 nodes: 2.7x the time a node, the
  temporaries fall out of cache), so on CPU nodes are not grouped; on CUDA, where every op is a kernel
  launch, the leaves of a depth-2 node (25 nodes) are scored in one call (``group_leaves``).
- Nothing leaves the device inside the walk: tables are filled in place on the clips' device, and the
  caller copies the finished ``[N, 625]`` tables once.
- Attention without masks (``layers.Attention.split``): each attention of the 5 children attends to the
  shared cached past once (all children's queries, no mask) and to each child's own block-t keys
  separately (only the pairs the block-causal mask allows: 35% of the own part in the encoder's
  self-attention, 20% in the decoder's cross-attention), and the two are merged by their log-sum-exps
  (CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` returns them). The masked SDPA calls it
  replaced scored every [past | all children] pair at ~2x the cost a score (masked kernel); the decoder's
  self-attention had copied the past keys once per child. ~10% of the walk's CPU time (4 tiny clips, 1
  thread). Before that, 5D grouped inputs had taken SDPA's unfused math path: groups are passed 4D.
- Linear layers through oneDNN's float32 GEMM (``layers.Linear``): 36% of the walk's time was MKL's
  GEMM at ~105 GFLOP/s on the AMD EPYC CI machines, where oneDNN reaches ~240. Walk 1.3x faster
  (9.0-9.5 -> 6.8-7.4 s for 4 tiny clips, 1 thread; 1.87x the CPU time of c6b8676's walk). Table
  entries move by ~2e-6, or by ~2e-4 where a near-tied code choice falls the other way; the reward argmax
  still agrees with 625 full passes on every benchmark clip (and ``tests/test_search.py``).
- SSIM's horizontal blur pass as one oneDNN GEMM with the banded [W - 10, W] matrix of the 11 taps
  (``_BlockTarget._blur``), instead of 11 shifted multiply-adds over the whole map: 2.15 -> 1.04 ms a
  map of [5, 8, 3, 4, 64, 64] (AMD EPYC). Walk 6.12 -> 5.85 CPU s for 4 tiny clips, 1 thread (medians of
  6 alternating runs, 1.05x); table entries equal to the last bit on those clips; 1.98x the CPU time of
  c6b8676's walk (``bench/label_bench.py --legacy-rev c6b8676``).
- SSIM's vertical pass: shifted multiply-adds or one batched product with the banded [H - 10, H] matrix,
  whichever measures faster for a map shape, timed once per shape per process (``SSIM_COLUMNS``). The
  faster way depends on the CPU: on AMD EPYC the batched product measured slower (1.15 against 0.76 ms
  a map), on the Intel Xeon (Emerald Rapids) machines faster (both passes of a [240, 64, 64] map 4.67
  -> 2.50 ms; a node's metric call 23 -> 16 ms; walk 12.8 -> 11.9 CPU s for 4 tiny clips, 1 thread,
  medians of 6 alternating runs). Both ways sum the same 11 products a pixel (the band's zeros add exact
  zeros), perhaps in another order; the tables were equal to the last bit.
- The nearest-code search through oneDNN's GEMM in blocks sized to the codebook (``quantizer.nearest``,
  ``onednn_rows``): walk 6.21 -> 6.13 CPU s with the tiny preset's 1,024 codes (1.01x), 9.40 -> 8.26 and
  9.46 -> 8.03 s with the paper's 16,384 (1.14-1.18x); 4 clips, 1 thread, medians of 4 alternating runs;
  tables equal to the last bit on those clips.
- Measured, no gain: scoring the metrics child by child to keep temporaries in cache (5.91 vs 5.87 s);
  attention outputs kept in the kernels' [B, L, H, hd] memory order to save the regrouping copies (5.77
  vs 5.77 s); one permuted copy of the decoder's pixels instead of a copy a child plus a stack (5.88 vs
  5.81 s); GELU fused into the oneDNN GEMM (0.78 vs 0.79 ms a call); transparent huge pages for the heap
  (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` or ``THP_MEM_ALLOC_ENABLE=1``: within noise); more clips a
  batch (8 vs 4 clips: 19.0 vs 18.8 CPU s for 8 tiny clips, 1 thread; the GEMMs are already ~1000 rows).
- ``precision``: the model may run under autocast (``bf16``) for measurements; metrics stay float32.
  It is not used by the label stage: measured on the tiny preset (random init), bf16 made the model
  ~1.5x faster but moved table entries by up to 4e-4 MSE (near-tied codebook choices flip), and the
  reward argmax then disagreed with 625 float32 full passes: 1-3 of 8 clips at w_l in {0.1, 0.01, 0},
  and 1 of 4 other clips at the default weights (``bench/label_bench.py --precision-check``). On the
  Intel Xeon (Emerald Rapids) machines, whose cores have AMX, bf16 was not faster either (22.7 vs 22.3
  CPU s for 8 clips) and disagreed on up to 3 of 8 clips, at 10 of the 12 metric and weight pairs.
- ``torch.compile`` (per layer or the whole ``prefix_step``, dynamic shapes) was measured: no steady-
  state gain on CPU (10.5 vs 10.6 s a batch of 4) for 28-48 s of compile CPU time per process: not used.
"""
from __future__ import annotations

import contextlib
import time

import torch

from evatok.assignment import AssignmentSpace
from evatok.layers import onednn_applies, onednn_linear
from evatok.metrics import _blur_columns, _blur_valid, _gaussian, frame_metrics
from evatok.tokenizer import AdaptiveTokenizer

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _check_clips(tokenizer: AdaptiveTokenizer, clips: torch.Tensor) -> None:
    c = tokenizer.config
    if clips.dim() != 5 or tuple(clips.shape[1:]) != (3, c.frames, c.size, c.size):
        raise ValueError(f"clips must be [N, 3, {c.frames}, {c.size}, {c.size}], got {tuple(clips.shape)}")


def autocast(precision: str, device: torch.device | str):
    """The context the model runs in for ``precision`` (fp32: none)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def _mean_metrics(recon: torch.Tensor, target: torch.Tensor, lpips) -> dict[str, torch.Tensor]:
    """Mean over frames of each frame metric: ``[R, 3, T, H, W]`` pairs -> {name: [R]} (reference path)."""
    m = frame_metrics(recon.clamp(-0.5, 0.5) + 0.5, target + 0.5, lpips=lpips)
    return {k: v.mean(-1) for k, v in m.items()}


# How ``_BlockTarget`` runs SSIM's vertical blur pass on CPU float32: "auto" (time both ways once per map
# shape in this process and keep the faster), "product" (one batched product with the banded matrix) or
# "shift" (shifted multiply-adds). Both sum the same 11 products a pixel (the band's zeros add exact zeros).
SSIM_COLUMNS = "auto"
_COLUMNS_BY_PRODUCT: dict[tuple, bool] = {}  # map shape -> whether "auto" chose the product


def _band(n: int, taps: list[float], device) -> torch.Tensor:
    """The banded ``[n - len(taps) + 1, n]`` matrix whose row i holds the taps at columns i..i+len-1: the
    'valid' blur along a dimension of size n as one product."""
    band = torch.zeros(n - len(taps) + 1, n, device=device)
    t = torch.tensor(taps, device=device)
    for i in range(band.shape[0]):
        band[i, i:i + len(taps)] = t
    return band


def _best_time(fn, runs: int = 3) -> float:
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


class _BlockTarget:
    """One block of a batch of clips ``[B, 3, t, H, W]`` in [0, 1], with every target-side term of the
    metrics computed once: scoring a node's reconstructions against it needs only the node's side.
    Same definitions as ``evatok.metrics.frame_metrics`` (SSIM: Gaussian window 11 / sigma 1.5 or the
    largest odd window that fits, 'valid', per channel, then the mean over channels)."""

    def __init__(self, y: torch.Tensor, lpips=None, window: int = 11, sigma: float = 1.5,
                 k1: float = 0.01, k2: float = 0.03):
        self.y, self.lpips = y.float(), lpips
        h, w = y.shape[-2:]
        win = min(window, h - (h + 1) % 2, w - (w + 1) % 2)
        self.taps = _gaussian(win, sigma * win / window).tolist()  # Python floats: no device reads later
        # the horizontal pass as one product with the banded [w - win + 1, w] matrix of the taps; the
        # vertical pass, where it measures faster, as a batched product with the [h - win + 1, h] one
        self.band, self.vband = _band(w, self.taps, y.device), _band(h, self.taps, y.device)
        self.c1, self.c2 = k1 ** 2, k2 ** 2
        mu = self._blur(self.y)
        mu2 = mu * mu
        self.mu = mu
        self.b1 = mu2 + self.c1  # mu_y^2 + c1
        self.b2 = self._blur(self.y * self.y).sub_(mu2).add_(self.c2)  # var_y + c2
        self.y_feats = None if lpips is None else _lpips_features(lpips, _frames(self.y[None]))

    def _blur(self, m: torch.Tensor) -> torch.Tensor:
        """``evatok.metrics._blur_valid`` of [..., H, W] (contiguous); on CPU float32 the horizontal pass is
        one oneDNN GEMM with the banded tap matrix instead of ``win`` shifted multiply-adds, and the
        vertical pass is shifted multiply-adds or one batched product (``SSIM_COLUMNS``)."""
        if not onednn_applies(m, self.band):
            return _blur_valid(m, self.taps)
        rows = onednn_linear(m.reshape(-1, m.shape[-1]), self.band).view(*m.shape[:-1], self.band.shape[0])
        if self._columns_by_product(rows):
            return self._columns_product(rows)
        return _blur_columns(rows, self.taps)

    def _columns_product(self, rows: torch.Tensor) -> torch.Tensor:
        out = torch.matmul(self.vband, rows.view(-1, *rows.shape[-2:]))
        return out.view(*rows.shape[:-2], *out.shape[-2:])

    def _columns_by_product(self, rows: torch.Tensor) -> bool:
        if SSIM_COLUMNS != "auto":
            return SSIM_COLUMNS == "product"
        key = tuple(rows.shape)
        if key not in _COLUMNS_BY_PRODUCT:  # measured once per shape: the faster way depends on the CPU
            shift, product = (lambda: _blur_columns(rows, self.taps)), (lambda: self._columns_product(rows))
            shift(), product()
            _COLUMNS_BY_PRODUCT[key] = _best_time(product) < _best_time(shift)
        return _COLUMNS_BY_PRODUCT[key]

    def __call__(self, recon: torch.Tensor) -> dict[str, torch.Tensor]:
        """Reconstructions ``[n, B, 3, t, H, W]`` (any float dtype) -> {name: [n, B]}, the mean over frames."""
        x = recon.float().clamp(-0.5, 0.5).add_(0.5)
        e = (x - self.y).square_().mean((-4, -2, -1))  # [n, B, t] per-frame MSE
        mx = self._blur(x)
        sxx = self._blur(x * x)
        sxy = self._blur(x * self.y)
        cross = mx * self.mu
        a1 = cross.mul(2).add_(self.c1)  # 2 mu_x mu_y + c1
        a2 = sxy.sub_(cross).mul_(2).add_(self.c2)  # 2 cov + c2
        mx2 = mx.square_()
        b2 = sxx.sub_(mx2).add_(self.b2)  # var_x + var_y + c2
        b1 = mx2.add_(self.b1)  # mu_x^2 + mu_y^2 + c1
        s = a1.mul_(a2).div_(b1.mul_(b2)).mean((-2, -1)).mean(-2)  # [n, B, t]
        out = {"mse": e.mean(-1), "psnr": (-10.0 * torch.log10(e.clamp_min(1e-10))).mean(-1), "ssim": s.mean(-1)}
        if self.lpips is not None:
            n, b, _, t = x.shape[:4]
            out[self.lpips.metric_name] = _lpips_distance(self.lpips, _frames(x), self.y_feats).view(n, b, t).mean(-1)
        return out


def _frames(v: torch.Tensor) -> torch.Tensor:
    """``[n, B, 3, t, H, W]`` -> frames ``[n*B*t, 3, H, W]`` (node-major, then clip, then frame)."""
    return v.movedim(-3, -4).reshape(-1, 3, v.shape[-2], v.shape[-1])


def _lpips_features(lp, img: torch.Tensor) -> list[torch.Tensor]:
    """The unit-normalised backbone features at each LPIPS tap of images ``[N, 3, H, W]`` in [0, 1]: the
    one-sided half of ``evatok.metrics.LPIPS._distance``, so the target's half is computed once a block."""
    h = (img.float() * 2 - 1 - lp.shift) / lp.scale
    feats, start = [], 0
    for end in lp.taps:
        h = lp.features[start:end](h)
        start = end
        feats.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
    return feats


def _lpips_distance(lp, x: torch.Tensor, y_feats: list[torch.Tensor]) -> torch.Tensor:
    """LPIPS of frames ``x`` ``[n*F, 3, H, W]`` against the ``F`` cached target frames (repeated for every
    node), in chunks of ``lp.max_batch`` frames: equals ``lp(x, y.repeat(n))``."""
    f = y_feats[0].shape[0]
    out = []
    for s in range(0, x.shape[0], lp.max_batch):
        xs = x[s:s + lp.max_batch]
        idx = torch.arange(s, s + xs.shape[0], device=x.device) % f  # target frame of each row
        total = 0
        for lin, fx, fy in zip(lp.lins, _lpips_features(lp, xs), y_feats):
            total = total + lin((fx - fy[idx]) ** 2).mean(dim=(1, 2, 3))
        out.append(total)
    return torch.cat(out)


@torch.inference_mode()
def score_assignments(tokenizer: AdaptiveTokenizer, clips: torch.Tensor, lpips=None,
                      batch_clips: int = 8, precision: str = "fp32",
                      group_leaves: bool | None = None) -> dict[str, torch.Tensor]:
    """Metric tables ``{name: [N, 625]}`` (mse, psnr, ssim[, lpips]) for clips ``[N, 3, T, H, W]`` in
    [-0.5, 0.5], on the clips' device, float32. ``precision``: the model's autocast dtype (see module doc);
    ``group_leaves``: score the 25 leaves under a depth-2 node in one metric call (default: on CUDA)."""
    _check_clips(tokenizer, clips)
    c = tokenizer.config
    nb, m, pt = c.num_blocks, len(c.counts), c.patch_t
    group = clips.device.type == "cuda" if group_leaves is None else group_leaves
    chunks = []
    for chunk in clips.split(batch_clips):
        b = chunk.shape[0]
        targets = [_BlockTarget(chunk[:, :, t * pt:(t + 1) * pt] + 0.5, lpips) for t in range(nb)]
        tables: list[dict[str, torch.Tensor]] = [{} for _ in range(nb)]  # depth t -> {name: [B, m^(t+1)]}

        def record(t: int, first: int, recon: torch.Tensor) -> None:  # recon [k*m, B, ...] of nodes first..
            for name, v in targets[t](recon).items():
                table = tables[t].get(name)
                if table is None:
                    table = tables[t][name] = v.new_empty(b, m ** (t + 1))
                table[:, first * m:first * m + v.shape[0]] = v.t()

        # Depth first with an explicit stack, so only one root-to-leaf path of caches (and the pending
        # siblings) is alive. Not a recursive closure: a nested function that calls itself is a reference
        # cycle (function -> closure cell -> function) that keeps the batch's targets, tables and clips
        # alive until Python's cyclic GC happens to run, which in a Ray worker (many long-lived objects,
        # rare full collections) let the label actor's heap grow ~25 MB a work unit.
        with autocast(precision, chunk.device):
            stack = [(tokenizer.prefix_init(chunk), 0)]
        while stack:
            state, node = stack.pop()
            t = state.depth
            with autocast(precision, chunk.device):
                recon, _, children = tokenizer.prefix_step(state)  # [m, B, 3, pt, H, W]
            del state
            record(t, node, recon)
            if group and t == nb - 2:  # the m*m leaves below this node, scored together
                with autocast(precision, chunk.device):
                    leaves = [tokenizer.prefix_step(child)[0] for child in children]
                record(t + 1, node * m, torch.cat(leaves))
            elif t + 1 < nb:
                stack += [(child, node * m + i) for i, child in reversed(list(enumerate(children)))]
        chunks.append({name: sum(tables[t][name].repeat_interleave(m ** (nb - 1 - t), 1)
                                 for t in range(nb)) / nb for name in tables[0]})
    return {name: torch.cat([ch[name] for ch in chunks]) for name in chunks[0]}


@torch.inference_mode()
def score_assignments_bruteforce(tokenizer: AdaptiveTokenizer, clips: torch.Tensor, lpips=None,
                                 batch_clips: int = 8, max_rows: int = 64) -> dict[str, torch.Tensor]:
    """Same tables as ``score_assignments`` from 625 full passes per clip (rows of at most ``max_rows``
    clip-assignment pairs, each batch of one total length), in float32, scored with ``frame_metrics``."""
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
