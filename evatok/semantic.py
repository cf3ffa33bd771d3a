"""Frozen `transformers` video encoders: REPA-style alignment and a semantic discriminator.

EVATok's final recipe aligns an intermediate decoder layer to frozen V-JEPA2-L features (lambda 0.7) and,
optionally, adds a frozen VideoMAE-B discriminator with trainable 1D-conv heads on multi-layer features [P].

- `load_frozen_encoder(path)`: a local `save_pretrained` directory (VideoMAE or V-JEPA2), loaded with
  `AutoModel.from_pretrained(path, local_files_only=True)`, frozen and locked in eval mode. Its
  preprocessing (resize to the encoder's frame count / image size, normalise with the checkpoint's
  mean/std from its processor config, else ImageNet stats) is part of the module, and differentiable, so
  the semantic discriminator passes gradients to the generator through it. The preprocessed input is
  cast to the encoder's weight dtype, so an encoder cast to bf16 (DeepSpeed's bf16 engine casts every
  module it wraps, frozen ones included) runs on the float32 video the loop hands it.
- V-JEPA2 runs at `VJEPA2_IMAGE_SIZE` = 128 px by default (the clip size of every EVATok recipe), not at
  its checkpoint's crop size (256: a 4x larger token grid). Its attention is RoPE with the token grid
  read from `config.crop_size`, so the size is set in the loaded config (`crop_size=image_size`), not
  only in the resize: feeding 128 px to a model configured for 256 would give every token the wrong
  (t, h, w) position. VideoMAE keeps its checkpoint size (its position table is fixed).
- `Aligner`: L_align = -mean_n cos(phi(f_dec^n), f_sem^n).
  The paper's text (as extracted) applies phi = "MLP + depatchify" to the *semantic* features. We put the
  trainable MLP on the *tokenizer* side instead (REPA's convention): a trainable map applied to a frozen
  target can collapse (phi can make the target easy to match, e.g. nearly constant, and the cosine loss is
  then met without the decoder learning anything). The projected decoder grid [T_lat, h, w] is resampled
  to the encoder's token grid: average pooling on axes where the decoder is finer, nearest repeat where it
  is coarser (paper scale: decoder 4x16x16 -> V-JEPA2 at 128px 8x8x8).
- `SemanticDiscriminator`: per tapped layer a 1D-conv head over the token sequence -> a logit per token.
  [I] Heads follow StyleGAN-T's DINO discriminator (1x1 conv, a residual k=3 conv block, 1x1 conv to a
  logit); default taps are 4 evenly spaced layers (3, 6, 9, 12 for a 12-layer VideoMAE-B).

The frozen weights are excluded from `state_dict()` (a checkpoint holds only what trains; loading keeps
the frozen weights already in memory), since they come from the configured checkpoint directory.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .metrics import MissingWeightsError  # one error type for every missing-weights case

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SUPPORTED = ("videomae", "vjepa2")
VJEPA2_IMAGE_SIZE = 128  # EVATok's clips are 16x128x128: V-JEPA2-L (16 px patches, tubelet 2) -> 8x8x8 tokens
_PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json")


def check_checkpoint_dir(path: str | Path | None, what: str) -> Path:
    """The directory of a `save_pretrained` checkpoint, or a MissingWeightsError that says what is wrong."""
    if path is None or str(path) == "":
        raise MissingWeightsError(f"{what}: no checkpoint directory configured")
    p = Path(path)
    if not p.exists():
        raise MissingWeightsError(f"{what}: checkpoint directory {p} does not exist")
    if not p.is_dir():
        raise MissingWeightsError(f"{what}: {p} is not a directory (expected a transformers save_pretrained dir)")
    if not (p / "config.json").is_file():
        raise MissingWeightsError(f"{what}: {p} has no config.json (expected a transformers save_pretrained dir)")
    if not (any(p.glob("*.safetensors")) or any(p.glob("pytorch_model*.bin"))):
        raise MissingWeightsError(f"{what}: {p} has config.json but no weights (*.safetensors or pytorch_model*.bin)")
    return p


def _pair(v) -> int:
    return int(v[0]) if isinstance(v, (list, tuple)) else int(v)


class FrozenVideoEncoder(nn.Module):
    """Video [B, 3, T, H, W] in [-0.5, 0.5] -> tokens [B, N, width] (or all hidden states)."""

    def __init__(self, model: nn.Module, mean, std, image_size: int, num_frames: int | None,
                 tubelet: int, patch: int):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.kind = model.config.model_type
        self.width = int(model.config.hidden_size)
        self.num_layers = int(model.config.num_hidden_layers)
        self.image_size, self.num_frames, self.tubelet, self.patch = image_size, num_frames, tubelet, patch
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1, 1), persistent=False)
        self.register_state_dict_post_hook(_drop_frozen)
        self.register_load_state_dict_pre_hook(_keep_frozen)

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # frozen: dropout / drop-path stay off whatever the caller does
        return self

    def frames(self, t: int) -> int:
        return self.num_frames or t  # V-JEPA2 (RoPE) takes any frame count; VideoMAE needs its own

    def grid(self, t: int) -> tuple[int, int, int]:
        """The encoder's token grid (t, h, w) for a clip of t frames."""
        g = self.image_size // self.patch
        return self.frames(t) // self.tubelet, g, g

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != 3:
            raise ValueError(f"expected video [B, 3, T, H, W], got {tuple(x.shape)}")
        size = (self.frames(x.shape[2]), self.image_size, self.image_size)
        x = x.float() + 0.5                                    # model range -> [0, 1]
        if tuple(x.shape[2:]) != size:
            x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
        x = (x - self.mean) / self.std
        return x.permute(0, 2, 1, 3, 4).contiguous()           # transformers wants [B, T, C, H, W]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def forward(self, x: torch.Tensor, hidden_states: bool = False):
        px = self.preprocess(x).to(self.dtype)  # VideoMAE's patch embedding does not cast to its weights
        if self.kind == "vjepa2":
            out = self.model(pixel_values_videos=px, skip_predictor=True, output_hidden_states=hidden_states)
        else:
            out = self.model(pixel_values=px, output_hidden_states=hidden_states)
        return tuple(out.hidden_states) if hidden_states else out.last_hidden_state


def _drop_frozen(module, state_dict, prefix, local_metadata):
    for k in [k for k in state_dict if k.startswith(prefix + "model.")]:
        del state_dict[k]


def _keep_frozen(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    for k, v in module.model.state_dict().items():
        state_dict.setdefault(prefix + "model." + k, v)


def load_frozen_encoder(path: str | Path | None, what: str = "video encoder",
                        image_size: int | None = None) -> FrozenVideoEncoder:
    """Load a VideoMAE / V-JEPA2 `save_pretrained` directory as a frozen, eval-mode encoder.

    `image_size`: the encoder's input side. V-JEPA2 defaults to `VJEPA2_IMAGE_SIZE` (128, the clips'
    size) and is loaded with `crop_size=image_size` (its RoPE grid); VideoMAE defaults to its
    checkpoint's `image_size` and refuses another one (a fixed position table)."""
    p = check_checkpoint_dir(path, what)
    try:
        from transformers import AutoConfig, AutoModel
    except ImportError as e:  # optional dependency of evatok
        raise ImportError(f"{what}: loading {p} needs `transformers` (pip install transformers==5.24.0)") from e
    cfg = AutoConfig.from_pretrained(p, local_files_only=True)
    if cfg.model_type not in SUPPORTED:
        raise ValueError(f"{what}: {p} holds a {cfg.model_type!r} model; supported: {SUPPORTED}")
    if cfg.model_type == "vjepa2":
        size, frames = int(image_size or VJEPA2_IMAGE_SIZE), None
        if size % _pair(cfg.patch_size):
            raise ValueError(f"{what}: image_size {size} is not a multiple of the patch size {_pair(cfg.patch_size)}")
        model = AutoModel.from_pretrained(p, local_files_only=True, crop_size=size)  # the RoPE grid follows it
    else:
        size, frames = _pair(cfg.image_size), cfg.num_frames
        if image_size is not None and int(image_size) != size:
            raise ValueError(f"{what}: VideoMAE at {p} takes {size} px (fixed position table), not {image_size}")
        model = AutoModel.from_pretrained(p, local_files_only=True)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    for name in _PROCESSOR_FILES:
        if (p / name).is_file():
            proc = json.loads((p / name).read_text())
            mean, std = proc.get("image_mean", mean), proc.get("image_std", std)
            break
    return FrozenVideoEncoder(model, mean, std, size, frames, int(cfg.tubelet_size), _pair(cfg.patch_size))


def _as_encoder(encoder: FrozenVideoEncoder | str | Path | None, what: str) -> FrozenVideoEncoder:
    return encoder if isinstance(encoder, FrozenVideoEncoder) else load_frozen_encoder(encoder, what)


def resample_grid(f: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """[B, C, t, h, w] -> [B, C, *size]: average-pool axes that shrink, nearest-repeat axes that grow."""
    pooled = tuple(min(a, b) for a, b in zip(f.shape[2:], size))
    if pooled != tuple(f.shape[2:]):
        f = F.adaptive_avg_pool3d(f, pooled)
    if pooled != tuple(size):
        f = F.interpolate(f, size=size, mode="nearest")
    return f


class Aligner(nn.Module):
    """REPA-style alignment of decoder features [B, T_lat, h, w, dec_dim] to a frozen encoder's tokens."""

    def __init__(self, encoder: FrozenVideoEncoder | str | Path | None, dec_dim: int, hidden: int | None = None):
        super().__init__()
        self.encoder = _as_encoder(encoder, "alignment encoder (LossConfig.align_encoder)")
        w = self.encoder.width
        hidden = hidden or max(w, dec_dim)
        # REPA's projector: a 3-layer SiLU MLP, trainable, on the tokenizer side
        self.projector = nn.Sequential(nn.Linear(dec_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                       nn.Linear(hidden, w))

    def trainable_parameters(self):
        return self.projector.parameters()

    def forward(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        if features is None or features.dim() != 5:
            got = None if features is None else tuple(features.shape)
            raise ValueError(f"alignment needs decoder features [B, T_lat, h, w, dec_dim], got {got}")
        with torch.no_grad():
            target = self.encoder(x)                                       # [B, N, width]
        gt, gh, gw = self.encoder.grid(x.shape[2])
        if target.shape[1] != gt * gh * gw:
            raise ValueError(f"encoder gave {target.shape[1]} tokens, expected grid {gt}x{gh}x{gw}")
        z = self.projector(features).permute(0, 4, 1, 2, 3)                # [B, width, T_lat, h, w]
        z = resample_grid(z, (gt, gh, gw)).flatten(2).transpose(1, 2)      # [B, N, width], (t, h, w) order
        return -F.cosine_similarity(z, target.to(z.dtype), dim=-1).mean()


class ConvHead(nn.Module):
    """Token sequence [B, N, D] -> a logit per token [B, N] (1D convs along the sequence)."""

    def __init__(self, dim: int, channels: int):
        super().__init__()
        self.inp = nn.Conv1d(dim, channels, 1)
        self.block = nn.Sequential(nn.Conv1d(channels, channels, 3, padding=1), nn.GroupNorm(1, channels),
                                   nn.LeakyReLU(0.2))
        self.out = nn.Conv1d(channels, 1, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = F.leaky_relu(self.inp(h.transpose(1, 2)), 0.2)
        z = z + self.block(z)
        return self.out(z).squeeze(1)


class SemanticDiscriminator(nn.Module):
    """Frozen encoder + trainable heads on tapped layers: video -> logits [B, n_layers, N]."""

    def __init__(self, encoder: FrozenVideoEncoder | str | Path | None, layers: tuple[int, ...] | None = None,
                 channels: int = 128):
        super().__init__()
        self.encoder = _as_encoder(encoder, "semantic discriminator encoder (LossConfig.semantic_disc_encoder)")
        n = self.encoder.num_layers
        if layers is None:  # evenly spaced, always including the last layer
            layers = tuple(sorted({max(1, round(n * (i + 1) / 4)) for i in range(4)}))
        bad = [i for i in layers if not 1 <= i <= n]
        if bad:
            raise ValueError(f"tapped layers {bad} out of range 1..{n} (hidden_states[0] is the embedding)")
        self.layers = tuple(layers)
        self.heads = nn.ModuleList(ConvHead(self.encoder.width, channels) for _ in self.layers)

    def trainable_parameters(self):
        return self.heads.parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hs = self.encoder(x, hidden_states=True)  # gradients flow to x (frozen weights get none)
        dt = self.heads[0].inp.weight.dtype  # the heads may train in another dtype than the frozen encoder
        return torch.stack([head(hs[i].to(dt)) for head, i in zip(self.heads, self.layers)], dim=1)
