"""Metrics against hand-computed values, LPIPS/FVD plumbing, and clear errors without weights."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evatok import metrics
from evatok.metrics import FVD, LPIPS, MissingWeightsError, block_metrics, frame_metrics, frechet_distance

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def const(v, b=1, t=2, h=16, w=16):
    return torch.full((b, 3, t, h, w), float(v))


# ----------------------------------------------------------------------------- MSE / PSNR / SSIM
def test_mse_psnr_known_values():
    x, y = const(0.2), const(0.3)
    assert torch.allclose(metrics.mse(x, y), torch.full((1, 2), 0.01), atol=1e-7)
    assert torch.allclose(metrics.psnr(x, y), torch.full((1, 2), 20.0), atol=1e-4)
    assert torch.allclose(metrics.psnr(x, x), torch.full((1, 2), 100.0))  # mse clamped at 1e-10
    # one frame differs in one channel on half the pixels by 0.5: mse = 0.25 / 6
    y = x.clone()
    y[0, 1, 1, :8] += 0.5
    assert torch.allclose(metrics.mse(x, y), torch.tensor([[0.0, 0.25 / 6]]), atol=1e-7)
    assert metrics.psnr(x, y)[0, 1].item() == pytest.approx(-10 * math.log10(0.25 / 6), rel=1e-5)


def test_ssim_constant_images_is_the_luminance_term():
    a, b = 0.2, 0.6
    c1 = 0.01 ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)  # variances 0: contrast-structure term is c2/c2
    s = metrics.ssim(const(a), const(b))
    assert torch.allclose(s, torch.full((1, 2), expected), atol=1e-5)
    x = torch.rand(2, 3, 3, 20, 24)
    assert torch.allclose(metrics.ssim(x, x), torch.ones(2, 3), atol=1e-5)


def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Plain-loop SSIM of one grey image pair (11x11 Gaussian, sigma 1.5, valid windows)."""
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5 ** 2))
    win = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    vals = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            pa, pb = a[i:i + 11, j:j + 11], b[i:i + 11, j:j + 11]
            ma, mb = (win * pa).sum(), (win * pb).sum()
            va, vb = (win * pa * pa).sum() - ma ** 2, (win * pb * pb).sum() - mb ** 2
            cov = (win * pa * pb).sum() - ma * mb
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_matches_a_loop_reference():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 2, 18, 20, dtype=torch.float64)
    y = (x + 0.15 * torch.randn_like(x)).clamp(0, 1)
    got = metrics.ssim(x, y)
    for t in range(2):
        ref = np.mean([_ssim_reference(x[0, c, t].numpy(), y[0, c, t].numpy()) for c in range(3)])
        assert got[0, t].item() == pytest.approx(ref, abs=1e-5)


def test_frame_and_block_metrics_contract():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16, 16)
    y = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    fm = frame_metrics(x, y)
    assert set(fm) == {"mse", "psnr", "ssim"} and all(v.shape == (2, 16) for v in fm.values())
    bm = block_metrics(x, y, block_frames=4)
    assert all(v.shape == (2, 4) for v in bm.values())
    for k in fm:
        assert torch.allclose(bm[k], fm[k].view(2, 4, 4).mean(-1))
        assert torch.allclose(bm[k].mean(1), fm[k].mean(1), atol=1e-5)  # clip metric = mean of blocks
    # a block that is reconstructed exactly scores best
    y2 = y.clone()
    y2[:, :, 4:8] = x[:, :, 4:8]
    b2 = block_metrics(x, y2)
    assert torch.all(b2["mse"][:, 1] == 0) and torch.all(b2["ssim"][:, 1] > b2["ssim"][:, 0])
    with pytest.raises(ValueError):
        block_metrics(x[:, :, :6], y[:, :, :6])
    with pytest.raises(ValueError):
        frame_metrics(x, y[:, :, :8])


# ----------------------------------------------------------------------------- LPIPS
def test_lpips_without_backbone_is_a_clear_error(tmp_path):
    with pytest.raises(MissingWeightsError, match="vgg16-397923af.pth"):
        LPIPS("vgg")
    with pytest.raises(MissingWeightsError, match="alexnet-owt-7be5be79.pth"):
        LPIPS("alex", backbone_path=tmp_path / "missing.pth")
    with pytest.raises(MissingWeightsError, match="nope.pth"):
        LPIPS("alex", heads_path=tmp_path / "nope.pth", allow_random_backbone=True)


# torchvision's layout: conv layers of vgg16().features / alexnet().features (index, out, in, kernel)
VGG16_CONVS = [(0, 64, 3), (2, 64, 64), (5, 128, 64), (7, 128, 128), (10, 256, 128), (12, 256, 256),
               (14, 256, 256), (17, 512, 256), (19, 512, 512), (21, 512, 512), (24, 512, 512),
               (26, 512, 512), (28, 512, 512)]
ALEX_CONVS = [(0, 64, 3, 11), (3, 192, 64, 5), (6, 384, 192, 3), (8, 256, 384, 3), (10, 256, 256, 3)]


def test_backbones_have_torchvision_state_dict_layout():
    vgg = LPIPS("vgg", allow_random_backbone=True).features.state_dict()
    assert {k: tuple(v.shape) for k, v in vgg.items() if k.endswith("weight")} == {
        f"{i}.weight": (o, c, 3, 3) for i, o, c in VGG16_CONVS}
    alex = LPIPS("alex", allow_random_backbone=True).features.state_dict()
    assert {k: tuple(v.shape) for k, v in alex.items() if k.endswith("weight")} == {
        f"{i}.weight": (o, c, k, k) for i, o, c, k in ALEX_CONVS}


def test_lpips_loads_a_torchvision_style_file_and_package_heads(tmp_path):
    torch.manual_seed(0)
    ref = LPIPS("alex", allow_random_backbone=True)
    sd = {f"features.{k}": v.clone() for k, v in ref.features.state_dict().items()}
    sd["classifier.1.weight"] = torch.zeros(4096, 9216)[:2]  # a full-model file also has the classifier
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(sd, path)
    m = LPIPS("alex", backbone_path=path)
    assert m.calibrated and m.metric_name == "lpips"
    assert torch.equal(m.features[3].weight, sd["features.3.weight"])
    heads = torch.load(metrics.default_heads_path("alex"), map_location="cpu", weights_only=True)
    assert torch.equal(m.lins[2].weight, heads["lin2.model.1.weight"])
    x = torch.rand(3, 3, 32, 32)
    assert torch.allclose(m(x, x.flip(0)), ref(x, x.flip(0)))  # same weights, same distance


@pytest.mark.parametrize("net,size", [("vgg", 16), ("alex", 32)])  # small frames: VGG16 on 2 shared cores
def test_lpips_plumbing_with_random_backbone(net, size):
    torch.manual_seed(0)
    m = LPIPS(net, allow_random_backbone=True, max_batch=3)
    assert not m.calibrated and m.metric_name == "lpips_random_backbone"
    x = torch.rand(2, 3, 4, size, size)
    y = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    fm = frame_metrics(x, y, lpips=m)
    assert "lpips" not in fm and fm["lpips_random_backbone"].shape == (2, 4)  # never reported as LPIPS
    assert torch.all(fm["lpips_random_backbone"] > 0)
    bm = block_metrics(x[:1], y[:1], lpips=m)["lpips_random_backbone"]
    assert bm.shape == (1, 1) and torch.allclose(bm[0, 0], fm["lpips_random_backbone"][0].mean(), atol=1e-6)
    # batched over frames == frame by frame; identical frames score 0; a bigger distortion scores higher
    frames = lambda v: v.movedim(2, 1).reshape(8, 3, size, size)  # noqa: E731
    one = torch.stack([m(frames(x)[i:i + 1], frames(y)[i:i + 1])[0] for i in (0, 5)])
    assert torch.allclose(one, fm["lpips_random_backbone"].flatten()[[0, 5]], atol=1e-5)
    xf = frames(x)[:2]
    assert torch.allclose(m(xf, xf), torch.zeros(2), atol=1e-6)
    far = (xf + 0.5 * torch.randn_like(xf)).clamp(0, 1)
    assert torch.all(m(xf, far) > fm["lpips_random_backbone"].flatten()[:2])


def test_lpips_passes_gradients_to_inputs_only():
    m = LPIPS("alex", allow_random_backbone=True)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    m(x, torch.rand(2, 3, 32, 32)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in m.parameters())
    m.train()
    assert not m.training


# ----------------------------------------------------------------------------- Frechet distance / FVD
def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    sigma = a @ a.T + 0.1 * np.eye(6)
    mu = rng.normal(size=6)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    shift = rng.normal(size=6)
    assert frechet_distance(mu, sigma, mu + shift, sigma) == pytest.approx((shift ** 2).sum(), rel=1e-8)
    # 1-D: (m1-m2)^2 + (s1-s2)^2 for standard deviations s1, s2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)
    # commuting (diagonal) covariances: sum of (sqrt(a) - sqrt(b))^2
    d1, d2 = rng.uniform(0.1, 2, 6), rng.uniform(0.1, 2, 6)
    assert frechet_distance(mu, np.diag(d1), mu, np.diag(d2)) == pytest.approx(((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum())


def test_frechet_distance_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    f1, f2 = rng.normal(size=(40, 8)), rng.normal(loc=0.3, scale=1.5, size=(50, 8))
    (m1, s1), (m2, s2) = metrics.feature_stats(f1), metrics.feature_stats(f2)
    ref = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-7)
    # rank-deficient covariances (fewer samples than dims) stay finite and non-negative
    (m3, s3), (m4, s4) = metrics.feature_stats(f1[:3]), metrics.feature_stats(f2[:3])
    assert np.isfinite(frechet_distance(m3, s3, m4, s4)) and frechet_distance(m3, s3, m4, s4) >= -1e-9


class _I3DStandIn(torch.nn.Module):
    """Test fixture with the TorchScript I3D call signature; checks the input contract it is given."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(6, 5)

    def forward(self, x: torch.Tensor, rescale: bool = True, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        assert x.shape[1] == 3 and x.shape[-1] == 224 and x.shape[-2] == 224
        assert not rescale and return_features
        assert float(x.min()) >= -1.0001 and float(x.max()) <= 1.0001
        stats = torch.cat([x.mean(dim=(2, 3, 4)), x.std(dim=(2, 3, 4))], dim=1)
        return self.proj(stats)


@pytest.fixture
def i3d_path(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.script(_I3DStandIn()).save(str(path))
    return path


def test_fvd_plumbing_with_a_scripted_stand_in(i3d_path):
    torch.manual_seed(0)
    fvd = FVD(i3d_path, batch_size=3)
    real = torch.rand(7, 3, 4, 16, 16)
    fake = (real * 0.5 + 0.4).clamp(0, 1)
    fr, ff = fvd.features(real), fvd.features(fake)
    assert fr.shape == (7, 5) and fr.dtype == np.float64
    assert abs(frechet_distance(*metrics.feature_stats(fr), *metrics.feature_stats(fr))) < 1e-6
    expected = frechet_distance(*metrics.feature_stats(fr), *metrics.feature_stats(ff))
    assert fvd(real, fake) == pytest.approx(expected) and expected > 0


def test_fvd_missing_detector_is_a_clear_error(tmp_path):
    with pytest.raises(MissingWeightsError, match="i3d_torchscript.pt"):
        FVD(tmp_path / "nowhere" / "i3d_torchscript.pt")
