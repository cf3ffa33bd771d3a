import pytest
import torch
import torch.nn.functional as F

from evatok.assignment import AssignmentSpace, best_assignment, estimate_stats
from evatok.metrics import LPIPS, frame_metrics
from evatok.search import _BlockTarget, score_assignments, score_assignments_bruteforce
from evatok.tokenizer import AdaptiveTokenizer, TokenizerConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The tiny preset's structure (4 blocks x 5 power-of-two counts, 4x4 grid a block) at 16x16 pixels, where
# 2 x 625 full passes and their SSIM are quick.
SMALL = dict(size=16, patch_s=4, counts=(1, 2, 4, 8, 16), enc_dim=32, dec_dim=32, enc_heads=2, dec_heads=2, codebook_size=256)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    m = AdaptiveTokenizer(TokenizerConfig(**SMALL)).eval()
    g = torch.Generator().manual_seed(1)
    low = torch.rand(3, 3, 4, 4, 4, generator=g)
    x = F.interpolate(low, size=(16, 16, 16), mode="trilinear") - 0.5
    return m, x


def test_tree_walk_equals_bruteforce(setup):
    m, x = setup
    tree = score_assignments(m, x[:2], batch_clips=2)
    brute = score_assignments_bruteforce(m, x[:2], batch_clips=1, max_rows=100)
    assert set(tree) == set(brute) == {"mse", "psnr", "ssim"}
    for name in tree:
        assert tree[name].shape == (2, 625)
        assert torch.allclose(tree[name], brute[name], atol=1e-4, rtol=1e-5), name
        assert torch.equal(tree[name].argmax(1), brute[name].argmax(1)) or name == "ssim"
    assert torch.equal(tree["mse"].argmin(1), brute["mse"].argmin(1))
    # the tables are not degenerate: assignments differ
    assert (tree["mse"].std(1) > 0).all()
    # labels: the reward argmax agrees with 625 full passes for every metric, at the default weights and
    # at weights where quality decides (w_l -> 0), i.e. for any relabel
    space = AssignmentSpace(m.config.counts)
    for name in ("mse", "psnr", "ssim"):
        st = estimate_stats(brute[name], space.totals, metric=name)
        for wq, wl in [(1.2, 0.8), (1.0, 0.1), (1.0, 0.01), (1.0, 0.0)]:
            assert torch.equal(best_assignment(tree[name], space.totals, st, wq, wl),
                               best_assignment(brute[name], space.totals, st, wq, wl)), (name, wl)
    # scoring the 25 leaves of a depth-2 node in one metric call (the CUDA default) changes nothing
    grouped = score_assignments(m, x[:2], batch_clips=2, group_leaves=True)
    for name in tree:
        assert torch.allclose(grouped[name], tree[name], atol=1e-6, rtol=1e-6), name


@pytest.mark.parametrize("path", ["gemm-shift", "gemm-product", "gemm-auto", "plain"])
@pytest.mark.parametrize("hw", [(32, 32), (20, 36), (9, 9), (12, 8)])  # window 11, 11, 9 and 7
def test_block_target_equals_frame_metrics(monkeypatch, path, hw):
    """The walk's metrics (target side computed once a block, SSIM in place, its horizontal blur as one
    banded GEMM on CPU and its vertical blur as shifted adds, as a batched banded product, or whichever
    measured faster; or both as shifted adds; LPIPS target features cached) equal
    ``evatok.metrics.frame_metrics`` on the same pairs, for square and other frames and shrunk windows."""
    from evatok import layers, search

    onednn = path != "plain"
    if onednn and not layers._ONEDNN_LINEAR:
        pytest.skip("this torch build has no oneDNN linear")
    monkeypatch.setattr(layers, "_ONEDNN_LINEAR", onednn and layers._ONEDNN_LINEAR)
    monkeypatch.setattr(search, "SSIM_COLUMNS", path.split("-")[-1] if onednn else "auto")
    monkeypatch.setattr(search, "_COLUMNS_BY_PRODUCT", {})
    g = torch.Generator().manual_seed(3)
    y = torch.rand(2, 3, 4, *hw, generator=g)  # [B, 3, t, H, W] in [0, 1]
    recon = y - 0.5 + 0.2 * torch.randn(5, 2, 3, 4, *hw, generator=g)  # [n, B, ...], some out of range
    lpips = None  # AlexNet's pooling needs frames of at least 32 pixels
    if min(hw) >= 32:
        lpips = LPIPS("alex", allow_random_backbone=True, max_batch=7)  # chunks that cut across nodes
    with torch.inference_mode():
        target = _BlockTarget(y, lpips)
        assert layers.onednn_applies(y, target.band) == onednn  # the path under test is the one taken
        got = target(recon)
        ref = frame_metrics(recon.flatten(0, 1).clamp(-0.5, 0.5) + 0.5, y.repeat(5, 1, 1, 1, 1), lpips=lpips)
    if path == "gemm-product":
        assert search._COLUMNS_BY_PRODUCT == {}  # a set way: nothing measured
    if path == "gemm-auto":  # measured once for each map shape met: the target's and the nodes'
        assert set(search._COLUMNS_BY_PRODUCT) == {(2, 3, 4, hw[0], target.band.shape[0]),
                                                   (5, 2, 3, 4, hw[0], target.band.shape[0])}
    assert set(got) == set(ref) == {"mse", "psnr", "ssim"} | ({"lpips_random_backbone"} if lpips else set())
    for name, v in ref.items():
        assert got[name].shape == (5, 2)
        assert torch.allclose(got[name], v.mean(-1).view(5, 2), atol=1e-6, rtol=1e-5), name


def test_table_entries_are_clip_metrics(setup):
    m, x = setup
    tree = score_assignments(m, x, batch_clips=2)  # 3 clips in chunks of 2 + 1
    space = AssignmentSpace(m.config.counts)
    for i in (0, 313, 624):
        counts = space.counts(i)
        with torch.no_grad():
            recon = m.decode(m.encode(x, counts)[0], counts)
        fm = frame_metrics(recon.clamp(-0.5, 0.5) + 0.5, x + 0.5)
        for name in ("mse", "psnr", "ssim"):
            assert torch.allclose(tree[name][:, i], fm[name].mean(1), atol=1e-4, rtol=1e-5)


def test_search_rejects_wrong_clip_shape(setup):
    m, x = setup
    with pytest.raises(ValueError, match="clips must be"):
        score_assignments(m, x[:, :, :8])


def test_walk_leaves_no_reference_cycles(setup):
    """The walk's temporaries are freed by reference counting when it returns: nothing is left for the
    cyclic GC, which runs rarely in a long-lived worker (a recursive closure kept every batch's targets
    and clips alive until a full collection: the label actor's RSS grew with the clips it had scored)."""
    import gc

    m, x = setup
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        gc.set_debug(gc.DEBUG_SAVEALL)
        score_assignments(m, x[:2], batch_clips=1)
        score_assignments(m, x[:1], batch_clips=1, group_leaves=True)
        gc.collect()
        left = list(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was:
            gc.enable()
    assert not [o for o in left if isinstance(o, torch.Tensor)], "the walk left tensors in reference cycles"
    # Only the walk's own objects: other code (a library's background thread, an earlier test's leftovers
    # becoming unreachable meanwhile) may drop cyclic garbage of its own while the collector is off.
    ours = [o for o in left if str(getattr(o, "__module__", "") or type(o).__module__).startswith("evatok")]
    assert not ours, sorted({type(o).__name__ for o in ours})


def _ops(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def test_linear_uses_onednn_only_for_large_inference_products(monkeypatch):
    from evatok import layers

    if not layers._ONEDNN_LINEAR:
        pytest.skip("this torch build has no oneDNN linear")
    torch.manual_seed(0)
    lin = layers.Linear(128, 512)
    x = torch.randn(2, 320, 128, requires_grad=True)
    with torch.no_grad():
        assert "mkldnn::_linear_pointwise" in _ops(lambda: lin(x))
        assert torch.allclose(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)
        assert "mkldnn::_linear_pointwise" not in _ops(lambda: lin(x[:, :4]))  # AR-step sized: MKL
        assert "mkldnn::_linear_pointwise" not in _ops(lambda: lin.bfloat16()(x.bfloat16()))  # other dtypes
        lin.float()
    ops = _ops(lambda: lin(x).sum().backward())  # training: the autograd path, gradients flow
    assert "mkldnn::_linear_pointwise" not in ops and x.grad is not None and lin.weight.grad is not None
    monkeypatch.setattr(layers, "_ONEDNN_LINEAR", False)
    with torch.no_grad():
        assert "mkldnn::_linear_pointwise" not in _ops(lambda: lin(x))


def test_onednn_walk_argmax_equals_625_plain_full_passes(monkeypatch):
    """The label stage's walk at the tiny preset's widths (128; where oneDNN's GEMM is taken), on 32x32
    clips (a 4x4 grid, counts 2..32) so 625 full passes stay quick, against 625 full passes with oneDNN
    off (MKL): same tables to float rounding, same reward argmax for every metric at the default weights
    and where quality decides."""
    from evatok import layers

    if not layers._ONEDNN_LINEAR:
        pytest.skip("this torch build has no oneDNN linear")
    torch.manual_seed(0)
    m = AdaptiveTokenizer(TokenizerConfig(size=32, counts=(2, 4, 8, 16, 32))).eval()
    g = torch.Generator().manual_seed(2)
    x = F.interpolate(torch.rand(2, 3, 4, 8, 8, generator=g), size=(16, 32, 32), mode="trilinear") - 0.5
    with torch.inference_mode():  # a step of the walk takes oneDNN's GEMM at these widths
        assert "mkldnn::_linear_pointwise" in _ops(lambda: m.prefix_step(m.prefix_init(x[:1])))
    tree = score_assignments(m, x[:1], batch_clips=1)
    # a clip's tables do not depend on the batch it is scored in (the GEMM is chosen by layer, not batch)
    pair = score_assignments(m, x, batch_clips=2)
    assert all(torch.equal(pair[name][:1], tree[name]) for name in tree)
    monkeypatch.setattr(layers, "_ONEDNN_LINEAR", False)
    brute = score_assignments_bruteforce(m, x[:1], batch_clips=1)
    space = AssignmentSpace(m.config.counts)
    for name in ("mse", "psnr", "ssim"):
        assert torch.allclose(tree[name], brute[name], atol=1e-4, rtol=1e-5), name
        st = estimate_stats(brute[name], space.totals, metric=name)
        for wq, wl in [(1.4, 0.6), (1.2, 0.8), (1.0, 0.1), (1.0, 0.01), (1.0, 0.0)]:
            assert torch.equal(best_assignment(tree[name], space.totals, st, wq, wl),
                               best_assignment(brute[name], space.totals, st, wq, wl)), (name, wl)
