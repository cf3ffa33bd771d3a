"""Losses, the PatchGAN discriminator and the frozen-encoder parts (tiny random VideoMAE checkpoints)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import transformers

from evatok.discriminator import PRESETS, build_discriminator
from evatok.losses import (LeCamEMA, LossConfig, TokenizerLoss, adaptive_weight, build_aligner, build_lpips,
                           build_semantic_disc, d_loss, g_adv_loss)
from evatok.metrics import LPIPS, MissingWeightsError
from evatok.semantic import Aligner, SemanticDiscriminator, load_frozen_encoder, resample_grid
from evatok.synthetic import CLASSES, make_video
from evatok.tokenizer import TokenizerOutput

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sp(v: float) -> float:  # softplus by hand
    return math.log1p(math.exp(v))


def output(recon, losses=None, features=None) -> TokenizerOutput:
    b = recon.shape[0]
    return TokenizerOutput(recon, torch.zeros(b, 1, dtype=torch.long), torch.ones(b, 1, dtype=torch.bool),
                           losses or {}, features)


@pytest.fixture(scope="module")
def videomae_dir(tmp_path_factory):
    """A tiny randomly initialised VideoMAE (8 frames, 32 px, tubelet 2, patch 8 -> 4x4x4 tokens)."""
    torch.manual_seed(0)
    cfg = transformers.VideoMAEConfig(image_size=32, patch_size=8, num_frames=8, tubelet_size=2, hidden_size=32,
                                      num_hidden_layers=4, num_attention_heads=4, intermediate_size=64)
    d = tmp_path_factory.mktemp("videomae")
    transformers.VideoMAEModel(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def encoder(videomae_dir):
    return load_frozen_encoder(videomae_dir)


# ----------------------------------------------------------------------------- loss terms by hand
def test_l1_and_quantizer_terms_exact():
    x = torch.zeros(2, 3, 4, 8, 8)
    recon = torch.full_like(x, 0.25)
    recon[0, 0, 0, 0, 0] = -0.75  # |.| = 0.75 at one of 2*3*4*8*8 = 1536 elements
    losses = {"codebook": torch.tensor(0.5), "commit": torch.tensor(0.2), "entropy": torch.tensor(1.0)}
    total, logs = TokenizerLoss(LossConfig(disc_start=-1))(x, output(recon, losses), step=0)
    l1 = (1535 * 0.25 + 0.75) / 1536
    assert logs["l1"] == pytest.approx(l1, abs=1e-7)
    assert total.item() == pytest.approx(l1 + 0.5 + 0.2 + 0.02 * 1.0, abs=1e-6)
    assert set(logs) == {"l1", "codebook", "commit", "entropy", "total"}  # perceptual/adv/align off
    with pytest.raises(KeyError, match="unknown quantizer loss 'vq'"):
        TokenizerLoss(LossConfig(disc_start=-1))(x, output(recon, {"vq": torch.tensor(1.0)}), step=0)


def test_non_saturating_losses_by_hand():
    lr, lf = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    loss, logs = d_loss(lr, lf)
    real = (sp(-2.0) + sp(1.0)) / 2
    fake = (sp(0.5) + sp(-3.0)) / 2
    assert loss.item() == pytest.approx(real + fake, rel=1e-6)
    assert logs["d_real"] == pytest.approx(real, rel=1e-6) and logs["d_fake"] == pytest.approx(fake, rel=1e-6)
    # one-sided smoothing: real target 0.9, fake target stays 0
    loss_s, _ = d_loss(lr, lf, label_smoothing=0.1)
    real_s = (0.9 * sp(-2.0) + 0.1 * sp(2.0) + 0.9 * sp(1.0) + 0.1 * sp(-1.0)) / 2
    assert loss_s.item() == pytest.approx(real_s + fake, rel=1e-6)
    assert g_adv_loss(lf).item() == pytest.approx((sp(-0.5) + sp(3.0)) / 2, rel=1e-6)


def test_lecam_ema_update_and_penalty_by_hand():
    lecam = LeCamEMA(decay=0.9)
    lr, lf = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 0.5])
    # EMAs start at 0: relu(lr - 0)^2 -> (1 + 9)/2; relu(0 - lf)^2 -> (1 + 0)/2
    assert lecam.penalty(lr, lf).item() == pytest.approx(5.5)
    loss, logs = d_loss(lr, lf, lecam=lecam, lecam_weight=0.001)
    bce = (sp(-1.0) + sp(-3.0)) / 2 + (sp(-1.0) + sp(0.5)) / 2
    assert loss.item() == pytest.approx(bce + 0.001 * 5.5, rel=1e-6) and logs["lecam"] == pytest.approx(5.5)
    # updated after the penalty: ema = 0.9 * 0 + 0.1 * mean
    assert lecam.ema_real.item() == pytest.approx(0.2) and lecam.ema_fake.item() == pytest.approx(-0.025)
    # next penalty uses the new EMAs: relu(lr + 0.025)^2, relu(0.2 - lf)^2
    want = (1.025 ** 2 + 3.025 ** 2) / 2 + (1.2 ** 2 + 0.0) / 2
    assert lecam.penalty(lr, lf).item() == pytest.approx(want, rel=1e-6)
    # the state is in buffers, so it checkpoints with the loss module
    loss_fn = TokenizerLoss()
    loss_fn.lecam.load_state_dict(lecam.state_dict())
    fresh = TokenizerLoss()
    fresh.load_state_dict(loss_fn.state_dict())
    assert fresh.lecam.ema_fake.item() == pytest.approx(-0.025)


def test_adaptive_weight_by_hand():
    w = torch.nn.Parameter(torch.ones(4))
    rec, g = (2 * w).sum(), (3 * w).sum()  # grads: all 2, all 3 -> norms 4 and 6
    assert adaptive_weight(rec, g, w).item() == pytest.approx(4 / (6 + 1e-4), rel=1e-6)


# ----------------------------------------------------------------------------- discriminator
def test_discriminator_tiny_shapes_and_errors():
    torch.manual_seed(0)
    disc = build_discriminator("tiny")
    x = torch.rand(2, 3, 16, 64, 64) - 0.5
    logits = disc(x)
    assert logits.shape == (2, 4, 8, 8)
    logits.mean().backward()
    assert all(p.grad is not None for p in disc.parameters())
    assert disc(torch.rand(1, 3, 8, 32, 48) - 0.5).shape == (1, 2, 4, 6)  # any size the patch divides
    with pytest.raises(ValueError, match="not divisible by the patch"):
        disc(torch.zeros(1, 3, 16, 60, 64))
    with pytest.raises(KeyError, match="unknown discriminator preset"):
        build_discriminator("huge")


def test_discriminator_paper_param_count_on_meta():
    with torch.device("meta"):
        disc = build_discriminator("paper")
    d, f, L = 512, 2048, 12
    per_layer = (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 4 * d  # attn, mlp, 2 norms
    want = L * per_layer + (3 * 4 * 8 * 8 * d + d) + 2 * d + (d + 1)                    # + embed, norm, head
    assert sum(p.numel() for p in disc.parameters()) == want == 38_223_873
    assert PRESETS["paper"].hidden == 512 and PRESETS["paper"].heads == 8


def real_clips(n: int, seed: int = 0, frames: int = 8, size: int = 32) -> torch.Tensor:
    """Synthetic videos as model tensors [n, 3, frames, size, size] in [-0.5, 0.5]."""
    clips = np.stack([make_video(CLASSES[i % len(CLASSES)], seed=seed + i, num_frames=frames, height=size, width=size)
                      for i in range(n)])
    return torch.from_numpy(clips).float().permute(0, 4, 1, 2, 3) / 255.0 - 0.5


def test_discriminator_learns_real_vs_fake():
    torch.manual_seed(0)
    disc = build_discriminator("tiny")
    opt = torch.optim.Adam(disc.parameters(), lr=1e-3, betas=(0.5, 0.9))
    lecam = LeCamEMA()
    real = real_clips(8)
    losses = []
    for step in range(30):
        fake = torch.rand_like(real) - 0.5  # per-pixel noise: obviously fake
        loss, _ = d_loss(disc(real), disc(fake), label_smoothing=0.1, lecam=lecam, lecam_weight=0.001)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[:3]) > 1.0 and np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses
    with torch.no_grad():  # and it separates held-out clips
        assert disc(real_clips(4, seed=100)).mean() > disc(torch.rand(4, 3, 8, 32, 32) - 0.5).mean()


# ----------------------------------------------------------------------------- frozen encoders
def test_encoder_loader_errors(tmp_path, videomae_dir):
    with pytest.raises(MissingWeightsError, match="no checkpoint directory configured"):
        load_frozen_encoder(None)
    with pytest.raises(MissingWeightsError, match="does not exist"):
        load_frozen_encoder(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(MissingWeightsError, match="is not a directory"):
        load_frozen_encoder(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingWeightsError, match="no config.json"):
        load_frozen_encoder(tmp_path / "empty")
    (tmp_path / "cfg_only").mkdir()
    (tmp_path / "cfg_only" / "config.json").write_text((videomae_dir / "config.json").read_text())
    with pytest.raises(MissingWeightsError, match="no weights"):
        load_frozen_encoder(tmp_path / "cfg_only")
    bert = tmp_path / "bert"
    transformers.BertModel(transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=8, vocab_size=10)).save_pretrained(bert)
    with pytest.raises(ValueError, match="'bert' model; supported"):
        load_frozen_encoder(bert)


def test_loss_config_errors(tmp_path):
    x = torch.zeros(1, 3, 4, 8, 8)
    out = output(x.clone())
    for field, match in [("lpips_backbone", "perceptual loss"), ("align_encoder", "alignment loss"),
                         ("semantic_disc_encoder", "semantic discriminator")]:
        cfg = LossConfig(disc_start=-1, **{field: str(tmp_path / "w")})
        with pytest.raises(MissingWeightsError, match=f"{match}: LossConfig.{field} is set"):
            TokenizerLoss(cfg)(x, out, step=0)
    with pytest.raises(MissingWeightsError, match="vgg16"):
        build_lpips(LossConfig(lpips_backbone=str(tmp_path / "vgg16.pth")))
    with pytest.raises(MissingWeightsError, match="does not exist"):
        build_aligner(LossConfig(align_encoder=str(tmp_path / "vjepa2")), dec_dim=16)
    with pytest.raises(MissingWeightsError, match="semantic discriminator encoder"):
        build_semantic_disc(LossConfig(semantic_disc_encoder=str(tmp_path / "videomae")))
    assert build_lpips(LossConfig()) is None and build_aligner(LossConfig(), 16) is None
    assert build_semantic_disc(LossConfig()) is None
    loss_fn = TokenizerLoss(LossConfig(disc_start=5))
    with pytest.raises(ValueError, match="no discriminator was passed"):
        loss_fn(x, out, step=5)
    with pytest.raises(RuntimeError, match="not active at step 4"):
        loss_fn.disc_loss(x, x, step=4, disc=build_discriminator("tiny"))


def test_encoder_preprocessing_and_state(encoder, videomae_dir):
    assert encoder.grid(16) == (4, 4, 4) and not encoder.model.training
    x = torch.rand(2, 3, 16, 64, 64) - 0.5           # resized to 8 x 32 x 32 inside
    assert encoder(x).shape == (2, 64, 32)
    assert len(encoder(x, hidden_states=True)) == 5  # embeddings + 4 layers
    encoder.train()
    assert not encoder.model.training                # frozen encoder stays in eval
    assert torch.allclose(encoder.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))  # no processor: ImageNet
    proc = videomae_dir / "preprocessor_config.json"
    proc.write_text('{"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}')
    try:
        assert load_frozen_encoder(videomae_dir).std.flatten().tolist() == [0.5, 0.5, 0.5]
    finally:
        proc.unlink()


def test_resample_grid():
    f = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 1, 2, 4, 4)
    g = resample_grid(f, (4, 2, 2))   # time repeats (nearest), space averages 2x2
    assert g.shape == (1, 1, 4, 2, 2)
    assert g[0, 0, 0, 0, 0].item() == pytest.approx((0 + 1 + 4 + 5) / 4)
    assert torch.equal(g[0, 0, 0], g[0, 0, 1]) and torch.equal(g[0, 0, 2], g[0, 0, 3])


def test_alignment_gradients(encoder):
    torch.manual_seed(0)
    aligner = Aligner(encoder, dec_dim=24)
    x = torch.rand(2, 3, 16, 64, 64) - 0.5
    feats = torch.randn(2, 4, 8, 8, 24, requires_grad=True)   # decoder grid 4x8x8 -> encoder 4x4x4
    recon = x.clone().requires_grad_(True)
    total, logs = TokenizerLoss(LossConfig(disc_start=-1, align_encoder="set"))(
        x, output(recon, features=feats), step=0, aligner=aligner)
    assert -1.0 <= logs["align"] <= 1.0
    assert total.item() == pytest.approx(logs["l1"] + 0.7 * logs["align"], abs=1e-6)
    total.backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in aligner.projector.parameters())
    assert all(p.grad is None for p in encoder.parameters())
    assert set(aligner.state_dict()) == {k for k, _ in aligner.projector.named_parameters(prefix="projector")}
    assert sum(1 for _ in aligner.trainable_parameters()) == 6
    with pytest.raises(ValueError, match="alignment needs decoder features"):
        aligner(x, None)


def test_semantic_discriminator_gradients(encoder):
    torch.manual_seed(0)
    sem = SemanticDiscriminator(encoder)
    assert sem.layers == (1, 2, 3, 4)
    disc = build_discriminator("tiny")
    x = torch.rand(2, 3, 16, 64, 64) - 0.5
    recon = (x + 0.1 * torch.randn_like(x)).requires_grad_(True)
    cfg = LossConfig(semantic_disc_encoder="set", disc_start=0)
    loss_fn = TokenizerLoss(cfg)
    # generator step: gradient reaches the reconstruction through the frozen encoder; heads/disc get none
    total, logs = loss_fn(x, output(recon), step=0, disc=disc, semantic_disc=sem)
    assert {"g_adv", "g_semantic", "adv_weight"} <= set(logs)
    total.backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0
    assert all(p.grad is None for p in [*sem.parameters(), *disc.parameters()])
    assert all(p.requires_grad for p in sem.heads.parameters())  # restored after the generator step
    # discriminator step: heads and PatchGAN learn, the frozen encoder does not
    d, dlogs = loss_fn.disc_loss(x, recon, step=0, disc=disc, semantic_disc=sem)
    d.backward()
    assert all(p.grad is not None for p in sem.heads.parameters())
    assert all(p.grad is not None for p in disc.parameters())
    assert all(p.grad is None for p in encoder.parameters())
    assert {"d_loss", "semantic_d_loss", "semantic_lecam", "d_total"} <= set(dlogs)
    assert loss_fn.lecam_semantic.ema_real.item() != 0.0
    assert sem(x).shape == (2, 4, 64)
    assert not any(k.startswith("encoder.model.") for k in sem.state_dict())
    fresh = SemanticDiscriminator(encoder)
    fresh.load_state_dict(sem.state_dict())                   # strict: frozen weights are kept, not required
    assert torch.equal(fresh.heads[0].out.weight, sem.heads[0].out.weight)
    with pytest.raises(ValueError, match="out of range"):
        SemanticDiscriminator(encoder, layers=(0, 5))


def test_perceptual_term_with_lpips_module():
    # plumbing only: a randomly initialised backbone with the real lin heads (no ImageNet weights offline)
    torch.manual_seed(0)
    lpips = LPIPS("alex", allow_random_backbone=True)
    x = torch.rand(1, 3, 2, 32, 32) - 0.5
    recon = (x + 0.2 * torch.randn_like(x)).clamp(-0.5, 0.5).requires_grad_(True)
    total, logs = TokenizerLoss(LossConfig(disc_start=-1, lpips_net="alex", lpips_backbone="set"))(
        x, output(recon), step=0, lpips=lpips)
    per_frame = [lpips(x[:, :, t] + 0.5, recon[:, :, t].detach() + 0.5) for t in range(2)]
    assert logs["perceptual"] == pytest.approx(torch.cat(per_frame).mean().item(), rel=1e-5)
    total.backward()
    assert recon.grad.abs().sum() > 0


def test_one_training_step_with_the_tiny_tokenizer(encoder):
    """The whole objective on a real tiny AdaptiveTokenizer: G step (adaptive adv weight) then D step."""
    from evatok.tokenizer import PRESETS as TOK_PRESETS, AdaptiveTokenizer
    torch.manual_seed(0)
    tok = AdaptiveTokenizer(TOK_PRESETS["tiny"]())
    cfg = LossConfig(adaptive_adv=True, align_encoder="set", semantic_disc_encoder="set")
    loss_fn = TokenizerLoss(cfg)
    disc, sem = build_discriminator(cfg.disc), SemanticDiscriminator(encoder)
    aligner = Aligner(encoder, dec_dim=tok.config.dec_dim)
    x = real_clips(2, seed=7, frames=16, size=64)
    out = tok(x, torch.tensor([[8, 16, 32, 64], [128, 8, 8, 8]]))
    total, logs = loss_fn(x, out, step=0, disc=disc, semantic_disc=sem, aligner=aligner,
                          last_layer=tok.to_pixels.weight)
    assert {"l1", "codebook", "commit", "entropy", "align", "g_adv", "g_semantic", "adv_weight"} <= set(logs)
    assert logs["adv_weight"] > 0 and math.isfinite(logs["total"])
    total.backward()
    assert tok.to_pixels.weight.grad.abs().sum() > 0 and tok.patch_embed.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in aligner.projector.parameters())
    assert all(p.grad is None for p in [*disc.parameters(), *sem.heads.parameters(), *encoder.parameters()])
    d, dlogs = loss_fn.disc_loss(x, out.recon, step=0, disc=disc, semantic_disc=sem)
    d.backward()
    assert math.isfinite(dlogs["d_total"]) and all(p.grad is not None for p in disc.parameters())
