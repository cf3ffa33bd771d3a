"""Reconstruction metrics: MSE / PSNR / SSIM / LPIPS per frame and per 4-frame block, FVD.

Inputs are videos ``[B, 3, T, H, W]`` (any leading dims for mse/psnr/ssim) in [0, 1]; model tensors
in [-0.5, 0.5] need ``+ 0.5`` first. A clip metric is the mean over frames, a block metric the mean
over its frames, so a clip metric is the mean of its block metrics.

The assignment search scores 625 assignments x many clips, so every frame metric runs batched over
all frames at once: no Python loop over frames; SSIM is a separable Gaussian convolution.

LPIPS (Zhang et al. 2018, v0.1) = the published linear calibration heads on a VGG16 or AlexNet
ImageNet backbone. The heads ship with the ``lpips`` package (installed --no-deps; we read its
files without importing it, because it imports torchvision). The backbone weights are torchvision's
``vgg16-397923af.pth`` / ``alexnet-owt-7be5be79.pth``: they cannot be downloaded here, so they are
loaded from a path given by the user, and the ``features`` stacks are written out below with
torchvision's layer indices so that file loads as is. A randomly initialised backbone is allowed only
with ``allow_random_backbone=True`` (tests of the plumbing), and is then reported under the name
``lpips_random_backbone``, never as ``lpips``.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

BACKBONE_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}
I3D_FILE = "i3d_torchscript.pt"


class MissingWeightsError(FileNotFoundError):
    """Weights a metric needs are not on disk; the message names the file and where it comes from."""


# ----------------------------------------------------------------------------- MSE / PSNR / SSIM
def _check(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.dim() < 4 or x.shape[-4] != 3:
        raise ValueError(f"expected two videos [..., 3, T, H, W] of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-frame mean squared error: [..., 3, T, H, W] -> [..., T]."""
    _check(x, y)
    return (x.float() - y.float()).square_().mean(dim=(-4, -2, -1))  # in place: one temporary, not two


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-frame PSNR in dB with data range 1 (mse clamped at 1e-10, so identical frames give 100 dB)."""
    return -10.0 * torch.log10(mse(x, y).clamp_min(1e-10))


def _gaussian(size: int, sigma: float) -> torch.Tensor:
    g = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(g ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-frame SSIM (Wang et al. 2004): Gaussian window 11 / sigma 1.5, data range 1, 'valid' windows
    (no padding), per channel, averaged over channels and positions. [..., 3, T, H, W] -> [..., T].

    Frames smaller than the window use the largest odd window that fits (sigma scaled with it).
    """
    _check(x, y)
    *lead, c, t, h, w = x.shape
    win = min(window, h - (h + 1) % 2, w - (w + 1) % 2)
    g = _gaussian(win, sigma * win / window).to(x.device)
    # all frames and channels as one batch of single-channel images, in chunks of ~4M pixels a map so
    # that 625 assignments x 16 frames do not need tens of GB of temporaries
    a = x.movedim(-4, -3).reshape(-1, 1, h, w)
    b = y.movedim(-4, -3).reshape(-1, 1, h, w)
    step = max(1, (1 << 22) // (h * w))
    out = torch.cat([_ssim_maps(a[i:i + step].float(), b[i:i + step].float(), g, k1, k2)
                     for i in range(0, a.shape[0], step)])
    return out.view(*lead, t, c).mean(-1)


def _blur_valid(m: torch.Tensor, taps: list[float]) -> torch.Tensor:
    """Separable 'valid' blur of [..., H, W] as shifted in-place multiply-adds: for single-channel maps
    this is ~6x faster on CPU than ``conv2d`` (whose kernels target many channels), with equal results."""
    n = len(taps)
    w = m.shape[-1] - n + 1
    rows = torch.mul(m[..., :, 0:w], taps[0])
    for k in range(1, n):
        rows.add_(m[..., :, k:k + w], alpha=taps[k])
    return _blur_columns(rows, taps)


def _blur_columns(rows: torch.Tensor, taps: list[float]) -> torch.Tensor:
    """The vertical half of ``_blur_valid``: [..., H, w] -> [..., H - len(taps) + 1, w]."""
    n = len(taps)
    h = rows.shape[-2] - n + 1
    out = torch.mul(rows[..., 0:h, :], taps[0])
    for k in range(1, n):
        out.add_(rows[..., k:k + h, :], alpha=taps[k])
    return out


def _ssim_maps(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor, k1: float, k2: float) -> torch.Tensor:
    """Mean SSIM of each single-channel image pair [N, 1, H, W] -> [N]; 5 maps blurred in one call."""
    maps = _blur_valid(torch.cat([a, b, a * a, b * b, a * b]), g.tolist())
    mu_a, mu_b, aa, bb, ab = maps.chunk(5)
    var_a, var_b, cov = aa - mu_a ** 2, bb - mu_b ** 2, ab - mu_a * mu_b
    c1, c2 = k1 ** 2, k2 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean(dim=(-3, -2, -1))


# ----------------------------------------------------------------------------- per-frame / per-block
def frame_metrics(x: torch.Tensor, y: torch.Tensor, lpips: "LPIPS | None" = None) -> dict[str, torch.Tensor]:
    """{"mse", "psnr", "ssim"[, lpips.metric_name]: Tensor[B, T]} for videos [B, 3, T, H, W] in [0, 1]."""
    e = mse(x, y)
    out = {"mse": e, "psnr": -10.0 * torch.log10(e.clamp_min(1e-10)), "ssim": ssim(x, y)}
    if lpips is not None:
        b, _, t, h, w = x.shape
        frames = lambda v: v.movedim(2, 1).reshape(b * t, 3, h, w)  # noqa: E731
        out[lpips.metric_name] = lpips(frames(x), frames(y)).view(b, t)
    return out


def block_metrics(x: torch.Tensor, y: torch.Tensor, block_frames: int = 4,
                  lpips: "LPIPS | None" = None) -> dict[str, torch.Tensor]:
    """Per-block metrics {name: Tensor[B, T // block_frames]}: the mean of the block's frame metrics."""
    t = x.shape[2]
    if t % block_frames:
        raise ValueError(f"{t} frames do not split into blocks of {block_frames}")
    return {k: v.view(v.shape[0], t // block_frames, block_frames).mean(-1)
            for k, v in frame_metrics(x, y, lpips).items()}


# ----------------------------------------------------------------------------- LPIPS
def _vgg16_features() -> nn.Sequential:
    """torchvision's vgg16().features, same indices (0 conv, 1 relu, ..., 30 pool)."""
    layers: list[nn.Module] = []
    c = 3
    for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
            c = v
    return nn.Sequential(*layers)


def _alexnet_features() -> nn.Sequential:
    """torchvision's alexnet().features, same indices (0 conv ... 12 pool)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
    )


# end index (exclusive) of each tapped slice in features, and its channel count (as in lpips.pretrained_networks)
_TAPS = {"vgg": ([4, 9, 16, 23, 30], [64, 128, 256, 512, 512]),
         "alex": ([2, 5, 8, 10, 12], [64, 192, 384, 256, 256])}


def default_heads_path(net: str) -> Path:
    """The lpips package's v0.1 calibration heads, found without importing lpips (it imports torchvision)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        raise MissingWeightsError(
            f"LPIPS calibration heads weights/v0.1/{net}.pth not found: install them with "
            "`pip install --no-deps lpips==0.1.4` or pass heads_path=")
    return Path(spec.origin).parent / "weights" / "v0.1" / f"{net}.pth"


class LPIPS(nn.Module):
    """LPIPS distance between image batches [N, 3, H, W] in [0, 1] -> [N]. Frozen, eval mode.

    ``backbone_path``: torchvision ImageNet weights for ``net`` (``vgg16-397923af.pth`` or
    ``alexnet-owt-7be5be79.pth``; keys ``features.N.*``, or a features-only state_dict ``N.*``).
    ``heads_path``: the v0.1 lin heads (default: from the installed lpips package).
    ``allow_random_backbone``: plumbing tests only; the result is named "lpips_random_backbone".
    ``max_batch``: frames per backbone call, bounding memory when scoring thousands of frames.
    """

    def __init__(self, net: str = "vgg", backbone_path: str | os.PathLike | None = None,
                 heads_path: str | os.PathLike | None = None, allow_random_backbone: bool = False,
                 max_batch: int = 256):
        super().__init__()
        if net not in _TAPS:
            raise ValueError(f"net must be one of {sorted(_TAPS)}, got {net!r}")
        self.net, self.max_batch = net, max_batch
        self.features = _vgg16_features() if net == "vgg" else _alexnet_features()
        self.taps, chans = _TAPS[net]
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in chans)
        # ScalingLayer of lpips: [-1, 1] input -> ImageNet-normalised
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

        if backbone_path is None or not Path(backbone_path).is_file():
            if not allow_random_backbone:
                where = f"{backbone_path} does not exist" if backbone_path else "no backbone_path given"
                raise MissingWeightsError(
                    f"LPIPS needs the ImageNet {net} backbone weights file {BACKBONE_FILES[net]} ({where}). "
                    "It cannot be downloaded here: copy torchvision's file to a local path and pass backbone_path=.")
            self.calibrated = False
        else:
            sd = torch.load(backbone_path, map_location="cpu", weights_only=True)
            sd = {k.removeprefix("features."): v for k, v in sd.items() if not k.startswith("classifier.")}
            self.features.load_state_dict(sd)
            self.calibrated = True
        heads = Path(heads_path) if heads_path is not None else default_heads_path(net)
        if not heads.is_file():
            raise MissingWeightsError(f"LPIPS calibration heads file {heads} not found "
                                      "(`pip install --no-deps lpips==0.1.4`, or pass heads_path=)")
        hd = torch.load(heads, map_location="cpu", weights_only=True)
        for i, lin in enumerate(self.lins):  # lpips stores Sequential(Dropout, Conv): key linI.model.1.weight
            lin.weight.data.copy_(hd[f"lin{i}.model.1.weight"])
        self.eval().requires_grad_(False)

    @property
    def metric_name(self) -> str:
        return "lpips" if self.calibrated else "lpips_random_backbone"

    def train(self, mode: bool = True):
        return super().train(False)  # always eval: a metric, never trained

    def _distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        h = (torch.cat([x, y]) * 2 - 1 - self.shift) / self.scale   # [0,1] -> [-1,1] -> scaled, both in one pass
        total = torch.zeros(n, device=x.device)
        start = 0
        for lin, end in zip(self.lins, self.taps):
            h = self.features[start:end](h)
            start = end
            f = h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)   # unit-normalise channels
            total = total + lin((f[:n] - f[n:]) ** 2).mean(dim=(1, 2, 3))
        return total

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS expects two image batches [N, 3, H, W], got {tuple(x.shape)}, {tuple(y.shape)}")
        parts = [self._distance(x[i:i + self.max_batch].float(), y[i:i + self.max_batch].float())
                 for i in range(0, x.shape[0], self.max_batch)]
        return torch.cat(parts) if parts else x.new_zeros(0)


# ----------------------------------------------------------------------------- Frechet distance / FVD
def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) in float64 of features [N, D] (rows are samples)."""
    f = np.asarray(feats.detach().cpu() if isinstance(feats, torch.Tensor) else feats, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), in float64.

    tr((S1 S2)^1/2) = sum of sqrt(eigenvalues of S1^1/2 S2 S1^1/2), a symmetric PSD matrix, so
    symmetric eigendecompositions suffice (no complex sqrtm; tiny negative eigenvalues are clipped).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} {mu2.shape}, sigma {s1.shape} {s2.shape}")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


class DigestMismatchError(ValueError):
    """A file's SHA-256 is not the one the user said it must have; it was not loaded."""


class FVD:
    """Frechet Video Distance with the TorchScript I3D detector used by StyleGAN-V / cd-fvd
    (``i3d_torchscript.pt``), called as ``model(x, rescale=False, resize=True, return_features=True)``
    on [B, 3, T, 224, 224] in [-1, 1]. Videos given here are [B, 3, T, H, W] in [0, 1].

    Trust: a TorchScript file is a program (``torch.jit.load`` runs the code it holds, and the loader
    itself parses untrusted bytes), so ``i3d_path`` is *trusted input*: only a file from a source you
    trust, at a path only you can write. Give ``sha256`` (the digest its publisher lists) to have the
    file's bytes checked first: a different file raises
    ``DigestMismatchError`` and is never loaded. The bytes checked are the bytes loaded (the file is
    read once, into memory).
    """

    def __init__(self, i3d_path: str | os.PathLike, device: str | torch.device = "cpu", batch_size: int = 16,
                 sha256: str | None = None):
        if i3d_path is None or not Path(i3d_path).is_file():
            raise MissingWeightsError(
                f"FVD needs the TorchScript I3D detector {I3D_FILE} ({i3d_path} does not exist); "
                "it cannot be downloaded here: copy it to a local path and pass i3d_path=.")
        self.device, self.batch_size = torch.device(device), batch_size
        if sha256 is None:
            self.model = torch.jit.load(str(i3d_path), map_location=self.device).eval()
            return
        import hashlib
        import io

        data = Path(i3d_path).read_bytes()  # one read: no swap between the check and the load
        got, want = hashlib.sha256(data).hexdigest(), str(sha256).strip().lower()
        if got != want:
            raise DigestMismatchError(f"{i3d_path}: SHA-256 {got} is not the expected {want}; not loaded "
                                      f"(a TorchScript file is code: load only the file you checked)")
        self.model = torch.jit.load(io.BytesIO(data), map_location=self.device).eval()

    @torch.no_grad()
    def features(self, videos: torch.Tensor) -> np.ndarray:
        """I3D features [B, D] (float64) of videos [B, 3, T, H, W] in [0, 1]."""
        if videos.dim() != 5 or videos.shape[1] != 3:
            raise ValueError(f"expected videos [B, 3, T, H, W], got {tuple(videos.shape)}")
        out = []
        for i in range(0, videos.shape[0], self.batch_size):
            v = videos[i:i + self.batch_size].to(self.device, torch.float32) * 2 - 1
            if v.shape[-2:] != (224, 224):
                v = F.interpolate(v, size=(v.shape[2], 224, 224), mode="trilinear", align_corners=False)
            out.append(self.model(v, rescale=False, resize=True, return_features=True).double().cpu())
        return torch.cat(out).numpy()

    def __call__(self, real: torch.Tensor, fake: torch.Tensor) -> float:
        """FVD between two sets of videos (each [B, 3, T, H, W] in [0, 1], B >= 2)."""
        return frechet_distance(*feature_stats(self.features(real)), *feature_stats(self.features(fake)))
