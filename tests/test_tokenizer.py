import math

import pytest
import torch
import torch.nn.functional as F

from evatok.assignment import AssignmentSpace
from evatok.quantizer import VectorQuantizer
from evatok.tokenizer import PRESETS, AdaptiveTokenizer, TokenizerConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A small model with the tiny preset's structure (4 blocks, 5 power-of-two counts, full pyramid) for the
# tests that need hundreds of passes: 16x16 frames, 4x4x4 patches -> 4x4 grid a block, counts 1..16.
SMALL = dict(size=16, patch_s=4, counts=(1, 2, 4, 8, 16), enc_dim=32, dec_dim=32, enc_heads=2, dec_heads=2, codebook_size=256)


def model(**kw) -> AdaptiveTokenizer:
    torch.manual_seed(0)
    return AdaptiveTokenizer(TokenizerConfig(**kw)).eval()


def clips(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Random smooth clips in [-0.5, 0.5]: low-resolution noise upsampled in space and time."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, max(2, size // 8), max(2, size // 8), generator=g)
    return F.interpolate(low, size=(16, size, size), mode="trilinear", align_corners=False) - 0.5


def test_shapes_and_outputs():
    m = model()
    x = clips(2, 64)
    out = m(x, [8, 16, 32, 128])
    assert out.recon.shape == x.shape and out.codes.shape == (2, 184) and out.code_mask.all()
    assert out.features.shape == (2, 4, 8, 8, 128)
    assert set(out.losses) == {"codebook", "commit", "entropy"}
    assert all(torch.isfinite(v) for v in out.losses.values())
    assert int(out.codes.max()) < 1024
    with pytest.raises(ValueError, match="among"):
        m(x, [8, 16, 24, 128])
    with pytest.raises(ValueError, match="expected video"):
        m(x[:, :, :8], [8, 8, 8, 8])


def test_block_causality():
    m = model()
    x = clips(1, 64)
    y = x.clone()
    y[:, :, 8:12] = clips(1, 64, seed=5)[:, :, 8:12]  # block 3's frames
    counts = [32, 16, 64, 8]
    with torch.no_grad():
        (cx, _), (cy, _) = m.encode(x, counts), m.encode(y, counts)
        rx, ry = m.decode(cx, counts), m.decode(cy, counts)
    assert torch.equal(cx[:, :48], cy[:, :48])  # blocks 1-2: 32 + 16 codes
    assert not torch.equal(cx[:, 48:112], cy[:, 48:112])  # block 3 did change
    assert torch.allclose(rx[:, :, :8], ry[:, :, :8], atol=1e-6)
    assert (rx[:, :, 8:12] - ry[:, :, 8:12]).abs().max() > 1e-3


def test_mixed_assignment_batch_equals_per_sample():
    m = model()
    x = clips(3, 64)
    counts = torch.tensor([[8, 128, 16, 8], [64, 64, 64, 64], [128, 8, 32, 16]])
    with torch.no_grad():
        codes, mask = m.encode(x, counts)
        recon = m.decode(codes, counts)
        out = m(x, counts)
        assert mask.sum(1).tolist() == counts.sum(1).tolist() and codes.shape[1] == 256
        for i in range(3):
            ci, _ = m.encode(x[i:i + 1], counts[i])
            n = int(counts[i].sum())
            assert torch.equal(codes[i, :n], ci[0]) and (codes[i, n:] == 0).all()
            ri = m.decode(ci, counts[i])
            assert torch.allclose(recon[i:i + 1], ri, atol=1e-5)
            assert torch.allclose(out.recon[i:i + 1], ri, atol=1e-5)


def test_pyramid_query_counts_and_values():
    m = model()
    c = m.config
    emb = torch.randn(2, c.num_blocks, c.grid, c.grid, 5)
    pyr = m.pyramid(emb)
    assert pyr.shape == (2, 4, 128, 5)
    for n, k in enumerate(c.counts, start=3):  # k = 2^n: global + grids of 1, 2, ..., 2^(n-1) cells
        assert 1 + sum(2 ** j for j in range(n)) == k
    g = emb[0, 1]  # one block's 8x8 grid
    assert torch.allclose(pyr[0, 1, 0], g.mean((0, 1)), atol=1e-6)  # global mean
    assert torch.allclose(pyr[0, 1, 1], g.mean((0, 1)), atol=1e-6)  # 1x1 grid
    assert torch.allclose(pyr[0, 1, 2], g[:, :4].mean((0, 1)), atol=1e-6)  # 1x2 grid, left half
    assert torch.allclose(pyr[0, 1, 4], g[:4, :4].mean((0, 1)), atol=1e-6)  # 2x2 grid, top-left
    assert torch.allclose(pyr[0, 1, 64:], g.reshape(64, 5), atol=1e-6)  # finest level = the grid
    with torch.no_grad():
        for k in c.counts:
            codes, mask = m.encode(clips(1, 64), [k] * 4)
            assert codes.shape == (1, 4 * k) and int(mask.sum()) == 4 * k


def test_prefix_interface_equals_full_passes_all_625():
    m = model(**SMALL)
    x = clips(1, 16)
    space = AssignmentSpace(m.config.counts)
    leaf_codes, leaf_recon = {}, {}
    with torch.inference_mode():
        def walk(state, codes, recons):
            r, cs, kids = m.prefix_step(state)
            for i, kid in enumerate(kids):
                if kid.depth == 4:
                    leaf_codes[kid.counts] = torch.cat(codes + [cs[i]], 1)
                    leaf_recon[kid.counts] = torch.cat(recons + [r[i]], 2)
                    assert torch.equal(torch.cat(kid.codes, 1), leaf_codes[kid.counts])
                else:
                    walk(kid, codes + [cs[i]], recons + [r[i]])
        walk(m.prefix_init(x), [], [])
        assert len(leaf_recon) == 625
        counts = space.table
        codes, mask = m.encode(x.expand(625, -1, -1, -1, -1), counts)
        recon = m.decode(codes, counts)
    worst = 0.0
    for i, a in enumerate(map(tuple, counts.tolist())):
        n = sum(a)
        assert torch.equal(codes[i, :n], leaf_codes[a][0]), a
        worst = max(worst, float((recon[i] - leaf_recon[a][0]).abs().max()))
    assert worst < 1e-5


def test_prefix_interface_tiny_preset_sample():
    m = model()
    x = clips(2, 64)
    with torch.inference_mode():
        s = m.prefix_init(x)
        path, recons = [], []
        for level in (4, 0, 2, 3):
            r, cs, kids = m.prefix_step(s)
            path.append(m.config.counts[level])
            recons.append(r[level])
            s = kids[level]
        full = m.decode(m.encode(x, path)[0], path)
    assert torch.equal(torch.cat(s.codes, 1), m.encode(x, path)[0])
    assert (torch.cat(recons, 2) - full).abs().max() < 1e-5


def test_paper_sb_parameter_count():
    with torch.device("meta"):
        m = AdaptiveTokenizer(PRESETS["paper-SB"]())
    n = sum(p.numel() for p in m.parameters())
    assert abs(n - 145e6) / 145e6 < 0.05, n
    c = m.config
    assert (c.size, c.counts, c.codebook_size, c.hw) == (128, (32, 64, 128, 256, 512), 16384, 256)


def test_quantizer_losses_and_straight_through():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, codebook_size=64, code_dim=8)
    x = torch.randn(2, 5, 16, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    q, codes, losses = vq(x, mask)
    z = F.normalize(vq.proj(x), dim=-1)
    cb = F.normalize(vq.embedding.weight, dim=-1)
    assert torch.equal(codes, torch.cdist(z, cb.expand(2, -1, -1)).argmin(-1))  # nearest code
    assert torch.allclose(q, cb[codes], atol=1e-6)
    zv, qv = z[mask], cb[codes][mask]
    assert torch.allclose(losses["commit"], 0.25 * ((zv - qv) ** 2).mean(), atol=1e-6)
    assert torch.allclose(losses["codebook"], ((zv - qv) ** 2).mean(), atol=1e-6)
    p = torch.softmax(zv @ cb.t() / 0.01, -1)
    ent = lambda d: -(d * d.clamp_min(1e-12).log()).sum(-1)  # noqa: E731
    assert torch.allclose(losses["entropy"], ent(p).mean() - ent(p.mean(0)), atol=1e-5)
    q.sum().backward()  # straight-through: the gradient reaches the input
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_quantizer_entropy_on_a_token_subsample():
    """``entropy_tokens``: the entropy terms on that many valid tokens drawn from the batch (padding never),
    the full batch when it has no more; the other losses still over every token."""
    torch.manual_seed(0)
    full = VectorQuantizer(16, codebook_size=64, code_dim=8)
    sub = VectorQuantizer(16, codebook_size=64, code_dim=8, entropy_tokens=6)
    sub.load_state_dict(full.state_dict())
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    _, _, lf = full(x, mask)
    torch.manual_seed(1)
    _, _, ls = sub(x, mask)
    assert torch.allclose(lf["commit"], ls["commit"]) and torch.allclose(lf["codebook"], ls["codebook"])
    z = F.normalize(full.proj(x), dim=-1)[mask]
    torch.manual_seed(1)
    pick = torch.randperm(8)[:6]  # the same draw: 6 of the 8 valid tokens
    p = torch.softmax(z[pick] @ full.codebook().t() / 0.01, -1)
    ent = lambda d: -(d * d.clamp_min(1e-12).log()).sum(-1)  # noqa: E731
    assert torch.allclose(ls["entropy"], ent(p).mean() - ent(p.mean(0)), atol=1e-5)
    assert not torch.allclose(ls["entropy"], lf["entropy"])
    big = VectorQuantizer(16, codebook_size=64, code_dim=8, entropy_tokens=100)
    big.load_state_dict(full.state_dict())
    assert torch.allclose(big(x, mask)[2]["entropy"], lf["entropy"])  # fewer tokens than n: all of them


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("codes", [16384, 1024])
@pytest.mark.parametrize("rows", [1, 63, 65, 127, 128, 129, 1000, 1100])
def test_nearest_code_search_in_row_blocks_equals_one_product(monkeypatch, rows, codes, onednn):
    """``quantizer.nearest`` scores rows in blocks (of ``onednn_rows(K)`` through oneDNN on CPU float32,
    of ``NEAREST_ROWS`` with the plain product): the codes equal one full product's argmax at any row
    count, also across block edges, for 16,384 and 1,024-code books."""
    from evatok import layers
    from evatok.quantizer import NEAREST_ROWS, nearest, onednn_rows

    if onednn and not layers._ONEDNN_LINEAR:
        pytest.skip("this torch build has no oneDNN linear")
    monkeypatch.setattr(layers, "_ONEDNN_LINEAR", onednn and layers._ONEDNN_LINEAR)
    g = torch.Generator().manual_seed(rows)
    z = F.normalize(torch.randn(rows, 8, generator=g), dim=-1)
    cb = F.normalize(torch.randn(codes, 8, generator=g), dim=-1)
    with torch.no_grad():
        assert layers.onednn_applies(z, cb) == onednn
        full = layers.onednn_linear(z, cb) if onednn else z @ cb.t()
    assert torch.equal(nearest(z, cb), full.argmax(-1))
    assert torch.equal(nearest(z.reshape(1, rows, 8), cb), nearest(z, cb)[None])  # leading dims kept
    block = onednn_rows(codes) if onednn else NEAREST_ROWS
    if rows > block:  # a row's code does not depend on the rows around it
        assert torch.equal(nearest(z[block - 1:], cb), nearest(z, cb)[block - 1:])
    zg = z.clone().requires_grad_(True)
    assert not nearest(zg, cb).requires_grad


def _restart_quantizer(restart_below: float, seed: int = 0) -> VectorQuantizer:
    torch.manual_seed(seed)
    return VectorQuantizer(16, codebook_size=64, code_dim=8, restart_below=restart_below).train()


def test_dead_codes_move_onto_encoder_outputs_after_the_step():
    """Restarts: inputs that reach only a few codes leave the others unused; their usage average falls
    below ``restart_below`` and they move onto the batch's encoder outputs, before the next forward only
    (the step that chose them computes its losses with the codebook it used). Off (0) nothing moves."""
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 3, 16, generator=g) * 0.1 + 1.0 for _ in range(60)]  # one tight cluster of inputs
    on, off = _restart_quantizer(0.7), _restart_quantizer(0.0)
    assert not hasattr(off, "usage") and "usage" in on.state_dict()  # saved with the model when on
    start = on.embedding.weight.detach().clone()
    moved_at = None
    for i, x in enumerate(xs):
        queued, before = on._pending is not None, on.embedding.weight.detach().clone()
        on(x)
        off(x)
        # a forward that finds no queued move leaves the codebook as it was, also when it queues one
        assert queued or torch.equal(on.embedding.weight, before)
        if on._pending is not None and moved_at is None:
            moved_at, dead = i, on._pending[0]
    assert moved_at is not None, "no code fell below restart_below"
    assert on.restarts >= len(dead) > 0
    w = on.embedding.weight.detach()
    z = F.normalize(on.proj(xs[moved_at]), dim=-1).detach().reshape(-1, 8)
    # every moved code sits on one of that batch's encoder outputs (1% noise), and is now reachable
    assert (torch.cdist(w[dead], z).min(-1).values < 0.1).all()
    assert not torch.allclose(w[dead], start[dead])
    assert torch.equal(off.embedding.weight, _restart_quantizer(0.0).embedding.weight)  # off: nothing moved
    assert off.restarts == 0
    on.eval()
    on(xs[0])  # eval forwards neither count usage nor move codes
    assert on._pending is None or on.restarts >= len(dead)


def _restart_rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    vq = _restart_quantizer(0.7)  # the same initial codebook on every rank
    g = torch.Generator().manual_seed(100 + rank)  # but each rank its own batches
    for _ in range(60):
        vq(torch.randn(2, 3, 16, generator=g) * 0.1 + 1.0 + rank)
    vq(torch.randn(2, 3, 16, generator=g))  # applies the last pending move
    torch.save({"w": vq.embedding.weight.detach(), "usage": vq.usage, "restarts": vq.restarts}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_restarts_keep_every_rank_codebook_equal(tmp_path):
    """Under torch.distributed the usage counts are summed and the moved codes broadcast from rank 0:
    two ranks with different batches end with the same codebook (without the broadcast they differ)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_restart_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert a["restarts"] == b["restarts"] > 0
    assert torch.equal(a["usage"], b["usage"])
    assert torch.equal(a["w"], b["w"])


def test_training_smoke_reconstruction_drops():
    """Tiny preset, plain AdamW, 4 fixed smooth clips, random assignments: the reconstruction MSE falls well
    below its start, and below the clips' own variance (so it learned more than each clip's mean colour)."""
    torch.manual_seed(0)
    m = AdaptiveTokenizer(PRESETS["tiny"]()).train()
    g = torch.Generator().manual_seed(11)
    x = F.interpolate(torch.rand(4, 3, 2, 2, 2, generator=g), size=(16, 64, 64), mode="trilinear") - 0.5
    variance = float(((x - x.mean((2, 3, 4), keepdim=True)) ** 2).mean())
    space = AssignmentSpace(m.config.counts)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        out = m(x, space.table[torch.randint(625, (4,), generator=g)])
        rec = F.mse_loss(out.recon, x)
        loss = rec + out.losses["codebook"] + out.losses["commit"] + 0.02 * out.losses["entropy"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(rec.item())
    start, end = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert math.isfinite(end) and end < 0.5 * start and end < variance, (start, end, variance)


def test_files_written_before_query_init_load_as_first_token_seeding():
    """An export without ``query_init`` (written before it existed) keeps the decoder it was trained with."""
    import io

    from evatok.export import load_model, save_model, to_payload

    m = model(**SMALL, query_init="first")
    payload = to_payload(m)
    del payload["config"]["query_init"]
    buf = io.BytesIO()
    torch.save(payload, buf)
    buf.seek(0)
    back = load_model(buf)
    assert back.config.query_init == "first"
    x = clips(1, 16)
    assert torch.allclose(back.reconstruct(x, [2, 4, 8, 16]), m.reconstruct(x, [2, 4, 8, 16]), atol=1e-6)
    buf = io.BytesIO()
    save_model(model(**SMALL), buf)
    buf.seek(0)
    assert load_model(buf).config.query_init == TokenizerConfig().query_init


@pytest.mark.parametrize("q_sizes,k_sizes", [([1, 2, 4, 8], [1, 2, 4, 8]), ([4, 4, 4], [1, 2, 4]), ([3, 3], [3, 3])])
@pytest.mark.parametrize("past_len", [0, 5])
def test_split_attention_equals_block_diagonal_masked_attention(q_sizes, k_sizes, past_len):
    """Attention.split (past once + each group's own keys, merged by log-sum-exp) = one masked call over
    [past | own] where query group i sees the past and key group i."""
    from evatok.layers import Attention

    torch.manual_seed(0)
    att = Attention(16, 2).eval()
    x = torch.randn(2, sum(q_sizes), 16)
    own = att.kv_heads(torch.randn(2, sum(k_sizes), 16))
    past = [att.kv_heads(torch.randn(2, n, 16)) for n in ((2, past_len - 2) if past_len else ())]
    gid = lambda sizes: torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))  # noqa: E731
    mask = torch.cat([torch.ones(sum(q_sizes), past_len, dtype=torch.bool),
                      gid(q_sizes)[:, None] == gid(k_sizes)[None, :]], 1)
    k = torch.cat([s[0] for s in past] + [own[0]], 2)
    v = torch.cat([s[1] for s in past] + [own[1]], 2)
    with torch.inference_mode():
        assert torch.allclose(att.split(x, past, own, q_sizes, k_sizes), att(x, k, v, mask), atol=1e-6)
