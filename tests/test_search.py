import pytest
import torch
import torch.nn.functional as F

from evatok.assignment import AssignmentSpace
from evatok.metrics import frame_metrics
from evatok.search import score_assignments, score_assignments_bruteforce
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
