"""The tokenizer's training objective: one function of the batch.

L_total = l1 * |x - x^|  + perceptual * LPIPS  + codebook/commit/entropy (from the quantizer)
          + adv * L_G(PatchGAN) [+ semantic_adv * L_G(VideoMAE heads)] + align * L_align            (EVATok [P])
and, for the discriminators (their own optimizer, owned by the training loop):
L_D = BCE(D(x), 1 - s) + BCE(D(x^), 0) + lecam * R_LeCam.

Choices where the paper is silent ([I]):
- GAN losses are LARP's non-saturating pair. LARP's `ns_smooth` draws random soft targets on *both*
  sides; we use classic one-sided smoothing (Salimans et al. 2016): the real target is the constant
  1 - label_smoothing, fakes stay 0 (deterministic, so it is testable by hand). Off (0.0) by default.
- LeCam (Tseng et al. 2021) as in its official code: per-logit relu(D(x) - ema_fake)^2 + relu(ema_real - D(x^))^2,
  EMAs of the mean logits with LARP's decay 0.999, starting at 0, updated *after* the penalty is taken.
- The adversarial weight is fixed (LARP: 0.3) or, with `adaptive_adv`, VQGAN's
  ||grad_last L_rec|| / ||grad_last L_G|| (clamped to [0, 1e4]) times `adv`; that needs the decoder's last layer.
- The semantic discriminator's generator term has its own weight (`semantic_adv`, default 0.3 like the
  PatchGAN's) and its own LeCam state; both discriminators are trained when both are given.
- The quantizer already applies beta = 0.25 to "commit", so `commit` here defaults to 1.0.
- Optional parts are on exactly when configured: `lpips_backbone`, `align_encoder`, `semantic_disc_encoder`.
  A configured part whose module is not passed in raises; a part passed in while unconfigured is used.
  The PatchGAN is on unless disc_start < 0 and starts at step disc_start.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .metrics import MissingWeightsError


@dataclass
class LossConfig:
    l1: float = 1.0
    perceptual: float = 1.0
    codebook: float = 1.0
    commit: float = 1.0          # the quantizer already multiplies by beta = 0.25
    entropy: float = 0.02        # gamma [P]
    adv: float = 0.3             # LARP's disc weight
    adaptive_adv: bool = False
    semantic_adv: float = 0.3
    align: float = 0.7           # lambda [P]
    lecam: float = 0.001         # LARP
    lecam_decay: float = 0.999
    label_smoothing: float = 0.0  # one-sided: real target 1 - s
    disc_start: int = 0          # step at which the GAN starts; < 0: no GAN at all
    disc: str = "tiny"           # discriminator.PRESETS name
    lpips_net: str = "vgg"
    lpips_backbone: str | None = None
    lpips_heads: str | None = None
    align_encoder: str | None = None
    align_hidden: int | None = None
    semantic_disc_encoder: str | None = None
    semantic_layers: tuple[int, ...] | None = None


# ----------------------------------------------------------------------------- GAN losses
def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    """Mean BCE-with-logits against a constant target: y*softplus(-l) + (1-y)*softplus(l)."""
    return (target * F.softplus(-logits) + (1.0 - target) * F.softplus(logits)).mean()


def g_adv_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: -log sigmoid(D(x^)) = softplus(-D(x^)), mean over all logits."""
    return F.softplus(-logits_fake).mean()


class LeCamEMA(nn.Module):
    """EMAs of the discriminator's mean real/fake logits, as buffers so they checkpoint."""

    def __init__(self, decay: float = 0.999):
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    def penalty(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        return (F.relu(logits_real - self.ema_fake).pow(2).mean()
                + F.relu(self.ema_real - logits_fake).pow(2).mean())

    @torch.no_grad()
    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        self.ema_real.mul_(self.decay).add_(logits_real.detach().float().mean(), alpha=1 - self.decay)
        self.ema_fake.mul_(self.decay).add_(logits_fake.detach().float().mean(), alpha=1 - self.decay)


def d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, label_smoothing: float = 0.0,
           lecam: LeCamEMA | None = None, lecam_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Non-saturating discriminator loss (+ LeCam); returns (loss, named floats)."""
    real, fake = _bce(logits_real, 1.0 - label_smoothing), _bce(logits_fake, 0.0)
    loss = real + fake
    logs = {"d_real": real.item(), "d_fake": fake.item(),
            "logits_real": logits_real.detach().mean().item(), "logits_fake": logits_fake.detach().mean().item()}
    if lecam is not None and lecam_weight > 0:
        reg = lecam.penalty(logits_real, logits_fake)
        lecam.update(logits_real, logits_fake)
        loss = loss + lecam_weight * reg
        logs["lecam"] = reg.item()
    logs["d_loss"] = loss.item()
    return loss, logs


@contextmanager
def frozen(module: nn.Module):
    """Run a module without building gradients for its parameters (the generator step's discriminator)."""
    ps = [p for p in module.parameters() if p.requires_grad]
    for p in ps:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p in ps:
            p.requires_grad_(True)


def adaptive_weight(rec: torch.Tensor, g: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """VQGAN's balance: ||d rec / d last|| / ||d g / d last||, clamped to [0, 1e4], no gradient."""
    gr = torch.autograd.grad(rec, last_layer, retain_graph=True)[0]
    gg = torch.autograd.grad(g, last_layer, retain_graph=True)[0]
    return (gr.norm() / (gg.norm() + 1e-4)).clamp(0.0, 1e4).detach()


# ----------------------------------------------------------------------------- builders
def build_lpips(cfg: LossConfig):
    """The perceptual module (frozen, eval) if configured, else None; a missing file raises MissingWeightsError."""
    if cfg.lpips_backbone is None:
        return None
    from .metrics import LPIPS
    return LPIPS(cfg.lpips_net, cfg.lpips_backbone, cfg.lpips_heads)


def build_aligner(cfg: LossConfig, dec_dim: int):
    if cfg.align_encoder is None:
        return None
    from .semantic import Aligner
    return Aligner(cfg.align_encoder, dec_dim, cfg.align_hidden)


def build_semantic_disc(cfg: LossConfig):
    if cfg.semantic_disc_encoder is None:
        return None
    from .semantic import SemanticDiscriminator
    return SemanticDiscriminator(cfg.semantic_disc_encoder, cfg.semantic_layers)


# ----------------------------------------------------------------------------- the objective
class TokenizerLoss(nn.Module):
    """Generator objective (`forward`) and discriminator objective (`disc_loss`) for one batch.

    Holds no trainable parameters, only the LeCam EMAs (checkpoint its state_dict with the discriminators)."""

    QUANTIZER_TERMS = ("codebook", "commit", "entropy")

    def __init__(self, cfg: LossConfig | None = None):
        super().__init__()
        self.cfg = cfg or LossConfig()
        self.lecam = LeCamEMA(self.cfg.lecam_decay)
        self.lecam_semantic = LeCamEMA(self.cfg.lecam_decay)

    def gan_active(self, step: int) -> bool:
        return 0 <= self.cfg.disc_start <= step

    def forward(self, x: torch.Tensor, out, step: int, disc: nn.Module | None = None,
                semantic_disc: nn.Module | None = None, aligner: nn.Module | None = None,
                lpips: nn.Module | None = None, last_layer: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
        """x: video [B,3,T,H,W] in [-0.5,0.5]; out: TokenizerOutput. Returns (total, {term: float})."""
        cfg, recon = self.cfg, out.recon
        _require(lpips, cfg.lpips_backbone, "perceptual loss", "lpips_backbone", "build_lpips(cfg)")
        _require(aligner, cfg.align_encoder, "alignment loss", "align_encoder", "build_aligner(cfg, dec_dim)")
        _require(semantic_disc, cfg.semantic_disc_encoder, "semantic discriminator", "semantic_disc_encoder",
                 "build_semantic_disc(cfg)")
        terms: dict[str, torch.Tensor] = {}
        terms["l1"] = (recon - x).abs().mean()
        rec = cfg.l1 * terms["l1"]
        if lpips is not None:
            terms["perceptual"] = lpips(_frames(x) + 0.5, _frames(recon) + 0.5).mean()  # LPIPS reads [0, 1] frames
            rec = rec + cfg.perceptual * terms["perceptual"]
        total = rec
        weights = {"codebook": cfg.codebook, "commit": cfg.commit, "entropy": cfg.entropy}
        for name, value in out.losses.items():
            if name not in weights:
                raise KeyError(f"unknown quantizer loss {name!r}; TokenizerLoss knows {self.QUANTIZER_TERMS}")
            terms[name] = value
            total = total + weights[name] * value
        if aligner is not None:
            terms["align"] = aligner(x, out.features)
            total = total + cfg.align * terms["align"]
        if self.gan_active(step):
            if disc is None:
                raise ValueError(f"the GAN is on from step {cfg.disc_start} (LossConfig.disc_start) but no "
                                 "discriminator was passed; build one with build_discriminator(cfg.disc)")
            with frozen(disc):
                terms["g_adv"] = g_adv_loss(disc(recon))
            if cfg.adaptive_adv:
                if last_layer is None:
                    raise ValueError("adaptive_adv needs last_layer (the decoder's output projection weight)")
                w = cfg.adv * adaptive_weight(rec, terms["g_adv"], last_layer)
            else:
                w = recon.new_tensor(cfg.adv)
            terms["adv_weight"] = w
            total = total + w * terms["g_adv"]
            if semantic_disc is not None:
                with frozen(semantic_disc):
                    terms["g_semantic"] = g_adv_loss(semantic_disc(recon))
                total = total + cfg.semantic_adv * terms["g_semantic"]
        terms["total"] = total
        return total, {k: float(v.detach()) for k, v in terms.items()}

    def disc_loss(self, x: torch.Tensor, recon: torch.Tensor, step: int, disc: nn.Module,
                  semantic_disc: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The discriminators' loss on real x and detached recon; call only when gan_active(step)."""
        if not self.gan_active(step):
            raise RuntimeError(f"the GAN is not active at step {step} (disc_start={self.cfg.disc_start}); "
                               "check TokenizerLoss.gan_active(step) first")
        recon = recon.detach()
        cfg = self.cfg
        loss, logs = d_loss(disc(x), disc(recon), cfg.label_smoothing, self.lecam, cfg.lecam)
        if semantic_disc is not None:
            sem, sem_logs = d_loss(semantic_disc(x), semantic_disc(recon), cfg.label_smoothing,
                                   self.lecam_semantic, cfg.lecam)
            loss = loss + sem
            logs.update({f"semantic_{k}": v for k, v in sem_logs.items()})
        logs["d_total"] = float(loss.detach())
        return loss, logs


def _require(module, configured, what: str, field: str, builder: str) -> None:
    if configured is not None and module is None:
        raise MissingWeightsError(f"{what}: LossConfig.{field} is set to {configured!r} but no module was passed to "
                                  f"TokenizerLoss; build it with {builder}")


def _frames(v: torch.Tensor) -> torch.Tensor:
    """Video [B, 3, T, H, W] -> frames [B*T, 3, H, W] (LPIPS is per frame)."""
    return v.transpose(1, 2).flatten(0, 1)
