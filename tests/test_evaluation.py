"""The quality-cost check: baselines, the curve check, and that the decoder reads its tokens."""
import pytest
import torch
import torch.nn.functional as F

from evatok.evaluation import baselines, check_curve, curve_metrics, down_up, mean_colour, uniform_curve
from evatok.tokenizer import AdaptiveTokenizer, TokenizerConfig, pyramid_cover

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def smooth_clips(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, 4, generator=g)
    return F.interpolate(low, size=(16, size, size), mode="trilinear", align_corners=False) - 0.5


def test_baselines_on_known_clips():
    flat = torch.rand(2, 3, 16, 1, 1).expand(-1, -1, -1, 32, 32) - 0.5   # one colour a frame
    assert torch.allclose(mean_colour(flat), flat, atol=1e-6)
    b = baselines(flat.contiguous())
    assert b["mean_colour"]["psnr"] > 60 and b["down_up_x8"]["psnr"] > 60
    x = smooth_clips(3)
    b = baselines(x)
    # finer sampling is better, and each baseline is an actual reconstruction of the same clips
    assert b["mean_colour"]["psnr"] < b["down_up_x8"]["psnr"] < b["down_up_x4"]["psnr"]
    assert down_up(x, 4).shape == x.shape


def test_check_curve_names_the_failing_step():
    rising = {8: {"psnr": 18.0}, 16: {"psnr": 19.0}, 32: {"psnr": 20.5}, 64: {"psnr": 21.5}, 128: {"psnr": 22.5}}
    ok, line = check_curve(rising, min_gain_db=4.0)
    assert ok and "4.50 dB" in line
    ok, line = check_curve(rising, min_gain_db=5.0)
    assert not ok and "below 5.0" in line
    dip = {**rising, 64: {"psnr": 20.4}}
    ok, line = check_curve(dip, min_gain_db=1.0)
    assert not ok and "from 32 to 64" in line
    m = curve_metrics(rising, {"mean_colour": {"psnr": 19.2}})
    assert m["val/psnr_k8"] == 18.0 and m["val/curve_gain_db"] == pytest.approx(4.5)
    assert m["val/baseline_mean_colour_psnr"] == 19.2


def test_pyramid_cover_matches_the_pooling():
    """Column j of the cover is exactly the set of patches that pyramid cell j averages."""
    cfg = TokenizerConfig()
    m = AdaptiveTokenizer(cfg)
    g, kmax = cfg.grid, cfg.kmax
    cover = pyramid_cover(kmax, g)
    assert cover.shape == (g * g, kmax) and bool((cover.sum(1) == 1 + torch.log2(torch.tensor(kmax))).all())
    emb = torch.randn(1, 1, g, g, 5)
    pooled = m.pyramid(emb)[0, 0]                                  # [kmax, 5]
    by_cover = (cover.t() @ emb.reshape(g * g, 5)) / cover.sum(0)[:, None]
    assert torch.allclose(pooled, by_cover, atol=1e-5)


@pytest.mark.parametrize("query_init, reads", [("cells", True), ("finest", True), ("first", False)])
def test_decoder_reads_the_tokens_of_each_patch_cell(query_init, reads):
    """At initialisation already, a patch's reconstruction depends on the token of its own finest pyramid
    cell (cell-seeded 3D queries), not only on the block's first token. The paper-literal "first" seeding
    is the design that let the decoder ignore every token but the first; this test fails for it."""
    torch.manual_seed(0)
    cfg = TokenizerConfig(query_init=query_init)
    m = AdaptiveTokenizer(cfg).eval()
    x = smooth_clips(1, 64)
    counts = torch.full((1, 4), cfg.kmax)
    codes, _ = m.encode(x, counts)
    base = m.decode(codes, counts)
    g, kmax = cfg.grid, cfg.kmax
    slot = kmax // 2 + 5                     # finest level (8x8), cell 5 = patch (row 0, col 5) of block 0
    codes2 = codes.clone()
    codes2[0, slot] = (codes2[0, slot] + 1 + cfg.codebook_size // 2) % cfg.codebook_size
    diff = (m.decode(codes2, counts) - base).abs()[0, :, :4]        # block 0: frames 0-3
    ps = cfg.patch_s
    own = diff[:, :, 0:ps, 5 * ps:6 * ps].mean()
    others = diff.mean()
    if reads:
        assert own > 5 * others, (float(own), float(others))
    else:
        assert own < 2 * others, (float(own), float(others))


def test_uniform_curve_of_an_untrained_model_is_measured():
    torch.manual_seed(0)
    m = AdaptiveTokenizer(TokenizerConfig(size=32, counts=(2, 4, 8, 16, 32), enc_dim=32, dec_dim=32,
                                          enc_heads=2, dec_heads=2, codebook_size=64))
    curve = uniform_curve(m, smooth_clips(3), batch_size=2)
    assert sorted(curve) == [2, 4, 8, 16, 32]
    assert all(set(v) == {"psnr", "ssim", "mse"} for v in curve.values())
    assert m.training  # mode restored


def test_uniform_curve_of_a_bf16_model():
    torch.manual_seed(0)
    m = AdaptiveTokenizer(TokenizerConfig(size=32, counts=(2, 4, 8, 16, 32), enc_dim=32, dec_dim=32,
                                          enc_heads=2, dec_heads=2, codebook_size=64)).to(torch.bfloat16)
    curve = uniform_curve(m, smooth_clips(2), batch_size=2)
    assert all(v["psnr"] == v["psnr"] for v in curve.values())  # finite, no dtype error
