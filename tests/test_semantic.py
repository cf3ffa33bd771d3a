"""Frozen encoders under bf16 and at the clip's size (tiny random VideoMAE / V-JEPA2 checkpoints, no downloads)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from evatok.semantic import VJEPA2_IMAGE_SIZE, Aligner, SemanticDiscriminator, load_frozen_encoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny(kind: str):
    """VideoMAE: 8 frames, 32 px, tubelet 2, patch 8 (4x4x4 tokens). V-JEPA2: a checkpoint crop size
    (256) that is not the clips' 128, as the released V-JEPA2-L; patch 32, tubelet 2."""
    if kind == "videomae":
        return transformers.VideoMAEModel(transformers.VideoMAEConfig(
            image_size=32, patch_size=8, num_frames=8, tubelet_size=2, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=64))
    return transformers.VJEPA2Model(transformers.VJEPA2Config(
        crop_size=256, patch_size=32, tubelet_size=2, frames_per_clip=8, hidden_size=48, num_hidden_layers=2,
        num_attention_heads=4, mlp_ratio=2.0, pred_hidden_size=24, pred_num_hidden_layers=1,
        pred_num_attention_heads=4, pred_num_mask_tokens=2))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny randomly initialised save_pretrained directories, one per supported encoder kind."""
    out = {}
    for kind in ("videomae", "vjepa2"):
        torch.manual_seed(0)
        out[kind] = tmp_path_factory.mktemp(kind)
        _tiny(kind).save_pretrained(out[kind])
    return out


@pytest.fixture(scope="module")
def videomae_dir(checkpoints):
    return checkpoints["videomae"]


@pytest.fixture(scope="module")
def vjepa2_dir(checkpoints):
    return checkpoints["vjepa2"]


def video(b=2, t=8, s=32, seed=0):
    return torch.rand(b, 3, t, s, s, generator=torch.Generator().manual_seed(seed)) - 0.5


@pytest.mark.parametrize("kind", ["videomae", "vjepa2"])
def test_frozen_encoder_runs_in_bf16(kind, checkpoints):
    """DeepSpeed's bf16 engine casts every module, the frozen encoder too; the loop hands it float32 video."""
    enc = load_frozen_encoder(checkpoints[kind])
    x = video(s=enc.image_size)
    ref = enc(x).float()
    enc = enc.bfloat16()
    out = enc(x)                                   # float32 input, bf16 weights
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert torch.isfinite(out.float()).all()
    cos = torch.nn.functional.cosine_similarity(out.float(), ref, dim=-1)
    assert cos.min() > 0.95                        # the same features, at bf16 precision
    hs = enc(x, hidden_states=True)
    assert len(hs) == enc.num_layers + 1 and all(h.dtype == torch.bfloat16 for h in hs)


@pytest.mark.parametrize("kind", ["videomae", "vjepa2"])
def test_semantic_discriminator_in_bf16_passes_gradients(kind, checkpoints):
    torch.manual_seed(0)
    disc = SemanticDiscriminator(checkpoints[kind], channels=8).bfloat16()
    x = video(s=disc.encoder.image_size).requires_grad_(True)   # float32, as the generator's output
    logits = disc(x)
    assert logits.dtype == torch.bfloat16 and logits.shape[:2] == (2, len(disc.layers))
    logits.float().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0      # the generator gets a signal through bf16
    assert all(p.grad is None for p in disc.encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.heads.parameters())


def test_semantic_heads_in_fp32_on_a_bf16_encoder(videomae_dir):
    """Heads and encoder in different dtypes (a bf16 copy of the encoder shared with fp32 heads)."""
    disc = SemanticDiscriminator(videomae_dir, channels=8)
    disc.encoder.bfloat16()
    assert disc(video()).dtype == torch.float32


@pytest.mark.parametrize("kind", ["videomae", "vjepa2"])
def test_aligner_in_bf16(kind, checkpoints):
    torch.manual_seed(0)
    al = Aligner(checkpoints[kind], dec_dim=16).bfloat16()
    s = al.encoder.image_size
    feats = torch.randn(2, 4, 4, 4, 16, dtype=torch.bfloat16, requires_grad=True)  # bf16 decoder features
    loss = al(video(s=s), feats)
    assert loss.dtype == torch.bfloat16 and torch.isfinite(loss.float())
    loss.float().backward()
    assert feats.grad is not None and al.projector[0].weight.grad is not None


def test_vjepa2_runs_at_the_clip_size_not_its_checkpoint_crop(vjepa2_dir):
    enc = load_frozen_encoder(vjepa2_dir)
    assert enc.image_size == VJEPA2_IMAGE_SIZE == 128
    assert enc.model.config.crop_size == 128        # the RoPE grid follows the input size
    assert enc.grid(16) == (8, 4, 4)                # 16 frames / tubelet 2, 128 / patch 32
    x = video(b=1, t=16, s=128)
    assert enc(x).shape == (1, 8 * 4 * 4, 48)
    # the same weights at another size: 256 px is 4x the tokens
    big = load_frozen_encoder(vjepa2_dir, image_size=256)
    assert big.model.config.crop_size == 256 and big.grid(16) == (8, 8, 8)
    assert torch.equal(big.model.encoder.layer[0].attention.query.weight,
                       enc.model.encoder.layer[0].attention.query.weight)


def test_vjepa2_positions_follow_the_grid(vjepa2_dir):
    """At 128 px a 4x4 grid per frame: every token must get its own (t, h, w) position. A model left at
    the checkpoint's crop (grid 8) would read token 4 as (0, 0, 4) instead of (0, 1, 0)."""
    enc = load_frozen_encoder(vjepa2_dir)
    attn = enc.model.encoder.layer[0].attention
    t, h, w = attn.get_position_ids(torch.zeros(1, 8 * 4 * 4, 48))
    assert (int(t[4]), int(h[4]), int(w[4])) == (0, 1, 0)
    assert (int(t[16]), int(h[16]), int(w[16])) == (1, 0, 0)
    assert int(h.max()) == int(w.max()) == 3


def test_videomae_refuses_another_size(videomae_dir):
    with pytest.raises(ValueError, match="32 px"):
        load_frozen_encoder(videomae_dir, image_size=64)
