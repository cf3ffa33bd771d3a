"""The four recipes over the one loop: what is trained, on which inputs, with which loss.

A recipe builds the trainable module (and the discriminator, for tokenizers), turns a data batch
into model inputs (``prepare``), and gives the loss. The loop owns engines, optimizers, schedules,
checkpoints and logging.

- ``proxy``: the adaptive tokenizer on one uniformly random assignment per sample, drawn from the
  recipe's generators (checkpointed per rank); by default the samples of a step, on every rank, share
  their total length (``AssignmentSpace.sample``, ``train.equal_total_batches``): no batch computes
  padding, and no rank waits for another with a longer batch.
- ``router``: 625-way cross-entropy on curated labels; top-1/top-5 and reward percentile on held out clips.
- ``final``: the tokenizer trained from scratch on the assignments of a frozen router.
- ``ar``: sequences built from the final tokenizer's codes: read from a codes dataset (``evatok tokenize``,
  ``train.data`` = its ``codes/``), or, given clips, computed at every step under the frozen router's
  assignments (the path without a tokenize stage); class dropout for guidance.

Tokenizer recipes train ``TokenizerModule`` (tokenizer + the optional alignment projector) with
``TokenizerLoss``; the discriminators (PatchGAN + optional semantic heads) and the LeCam EMAs live in
``Discriminators``, trained by their own engine and optimizer.
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import torch
import torch.nn as nn

from evatok.assignment import AssignmentSpace
from workflows import storage
from workflows.config import Config


def load_frozen(uri: str, what: str, device) -> nn.Module:
    from evatok.export import load_model

    if not uri:
        raise ValueError(f"this recipe needs a trained {what}: set train.{what}")
    model = load_model(io.BytesIO(storage.read_bytes(uri)), map_location=device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def local_pretrained(uri: str | None, directory: bool = False) -> str | None:
    """A local path for a pretrained file or ``transformers`` checkpoint directory named by a URI: a local
    URI as it is, a remote one (``s3://``, ``gs://``) copied once per machine into a cache keyed by the
    URI and its listing (``$EVATOK_WEIGHTS_CACHE``, default ``~/.cache/evatok/weights``). The loaders
    (LPIPS, ``evatok.semantic``) read local files only, and say which file is missing."""
    import hashlib
    import os
    from pathlib import Path

    if not uri:
        return uri
    local = storage.local_path(uri)
    if local is not None:
        return str(local)
    files = storage.list_files(uri) if directory else [(uri, *storage.info(uri))]
    key = hashlib.sha256(repr((storage.canonical(uri), files)).encode()).hexdigest()[:16]
    root = Path(os.environ.get("EVATOK_WEIGHTS_CACHE", Path.home() / ".cache" / "evatok" / "weights")) / key
    base = storage.canonical(uri).rstrip("/")
    dest = root / (Path(base).name if not directory else "")
    if not (root / "_COMPLETE").exists():
        for f, _, _ in files:
            target = root / f[len(base):].lstrip("/") if directory else dest
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + f".{os.getpid()}.part")
            tmp.write_bytes(storage.read_bytes(f))
            os.replace(tmp, target)
        (root / "_COMPLETE").write_text(storage.redact(uri))
    return str(root if directory else dest)


def grid_image(x: torch.Tensor, y: torch.Tensor, n: int = 4) -> np.ndarray:
    """Rows: clips; columns: one frame per block of the input, then of the reconstruction. uint8 HxWx3."""
    x, y = x[:n].float().detach().cpu(), y[:n].float().detach().cpu()
    t = x.shape[2]
    idx = list(range(0, t, max(1, t // 4)))
    rows = [torch.cat([v[b, :, i] for v in (x, y) for i in idx], dim=2) for b in range(x.shape[0])]
    img = torch.cat(rows, dim=1).permute(1, 2, 0).add(0.5).clamp(0, 1).mul(255)
    return img.round().to(torch.uint8).numpy()


class Recipe:
    kind = ""                # evatok.export kind
    columns: list[str] = ["frames", "shape"]
    has_disc = False

    def __init__(self, cfg: Config, device, dtype=torch.float32, generator: torch.Generator | None = None):
        self.cfg, self.t, self.device, self.dtype = cfg, cfg.train, device, dtype
        self.generator = generator or torch.Generator().manual_seed(cfg.train.seed)
        # the same stream on every rank (same seed, one draw a micro-batch on each): what the ranks of a
        # data-parallel step must agree on, e.g. the proxy's total token count of a step. The loop seeds
        # the per-rank generators seed * 1000 + rank; this seed is none of those.
        self.shared_generator = torch.Generator().manual_seed(cfg.train.seed * 1000 - 1)

    def generators(self) -> list[torch.Generator]:
        """The recipe's random streams, checkpointed per rank: its own and the shared one."""
        return [self.generator, self.shared_generator]

    def video(self, batch) -> torch.Tensor:
        return batch["video"].to(self.device, self.dtype)

    def build_disc(self) -> nn.Module | None:
        return None

    def disc_loss(self, disc, inputs, aux, step):
        return None, {}

    def evaluate(self, model, batches) -> dict:
        return {}

    def sample_image(self, model, inputs) -> np.ndarray | None:
        """An image for MLflow, drawn by the plain exported ``model`` (fp32, rank 0 only)."""
        return None

    def upstream(self) -> dict[str, str]:
        """Lineage tags: the MLflow run ids of the frozen models this recipe reads."""
        return {}

    def export_module(self, model: nn.Module) -> nn.Module:
        return model


# ----------------------------------------------------------------------------- tokenizers
class TokenizerModule(nn.Module):
    """What the generator engine trains: the tokenizer and (optional) alignment projector."""

    def __init__(self, tokenizer: nn.Module, aligner: nn.Module | None):
        super().__init__()
        self.tokenizer, self.aligner = tokenizer, aligner

    def forward(self, x, counts):
        return self.tokenizer(x, counts)


class Discriminators(nn.Module):
    """What the discriminator engine trains: PatchGAN, optional semantic heads, and the LeCam EMAs."""

    def __init__(self, disc: nn.Module, semantic: nn.Module | None, objective: nn.Module):
        super().__init__()
        self.disc, self.semantic, self.objective = disc, semantic, objective


class TokenizerRecipe(Recipe):
    kind = "tokenizer"

    def __init__(self, cfg, device, dtype=torch.float32, generator=None):
        super().__init__(cfg, device, dtype, generator)
        from evatok import losses, tokenizer

        base = tokenizer.PRESETS[self.t.preset]()
        ds = self.t.deepspeed
        if self.t.codebook_restart > 0 and (ds.zero_stage != 0 or ds.precision != "fp32"):
            raise ValueError(f"train.codebook_restart={self.t.codebook_restart:g} edits the codebook in place, which "
                             f"an optimiser with its own master weights undoes: it needs train.deepspeed.zero_stage=0 "
                             f"and precision=fp32 (have {ds.zero_stage}, {ds.precision})")
        if self.t.codebook_restart < 0 or (self.t.entropy_tokens is not None and self.t.entropy_tokens < 0):
            raise ValueError("train.codebook_restart and train.entropy_tokens must be >= 0")
        self.tok_cfg = dataclasses.replace(
            base, frames=cfg.data.clip_len, size=cfg.data.size,
            codebook_size=self.t.codebook_size or base.codebook_size,
            entropy_tokens=base.entropy_tokens if self.t.entropy_tokens is None else self.t.entropy_tokens,
            restart_below=self.t.codebook_restart)
        self.space = AssignmentSpace(self.tok_cfg.counts, self.tok_cfg.num_blocks)
        self.loss_cfg = losses.LossConfig(
            disc_start=self.t.disc_start, disc="paper" if self.t.preset.startswith("paper") else "tiny",
            lpips_backbone=local_pretrained(self.t.lpips_backbone),
            align_encoder=local_pretrained(self.t.align_encoder, directory=True),
            semantic_disc_encoder=local_pretrained(self.t.semantic_disc_encoder, directory=True))
        self.has_disc = self.loss_cfg.disc_start >= 0
        self.lpips = losses.build_lpips(self.loss_cfg)
        if self.lpips is not None:
            self.lpips = self.lpips.to(device).eval()
        self._objective = losses.TokenizerLoss(self.loss_cfg)

    def build(self) -> nn.Module:
        from evatok import losses
        from evatok.tokenizer import AdaptiveTokenizer

        tok = AdaptiveTokenizer(self.tok_cfg)
        return TokenizerModule(tok, losses.build_aligner(self.loss_cfg, self.tok_cfg.dec_dim))

    def build_disc(self):
        if not self.has_disc:
            return None
        from evatok import losses
        from evatok.discriminator import build_discriminator

        disc = build_discriminator(self.loss_cfg.disc, patch=(self.tok_cfg.patch_t, self.tok_cfg.patch_s,
                                                              self.tok_cfg.patch_s))
        return Discriminators(disc, losses.build_semantic_disc(self.loss_cfg), self._objective)

    def assignments(self, video) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, batch) -> dict:
        video = self.video(batch)
        return {"video": video, "counts": self.assignments(video).to(self.device)}

    def _objective_of(self, disc):
        return disc.objective if disc is not None else self._objective

    def train_loss(self, model, inputs, step, disc=None):
        out = model(inputs["video"], inputs["counts"])
        mod = model.module if hasattr(model, "module") else model
        obj = self._objective_of(disc)
        loss, logs = obj(inputs["video"], out, step, disc=disc.disc if disc is not None else None,
                         semantic_disc=disc.semantic if disc is not None else None,
                         aligner=mod.aligner, lpips=self.lpips)
        vq = mod.tokenizer.quantizer
        if vq.restart_below > 0:
            logs["codebook_restarts"] = float(vq.restarts)  # codes moved so far by this worker
        return loss, logs, {"recon": out.recon}

    def disc_loss(self, disc, inputs, aux, step):
        obj = disc.objective
        if not obj.gan_active(step):
            return None, {}
        return obj.disc_loss(inputs["video"], aux["recon"], step, disc.disc, disc.semantic)

    @torch.no_grad()
    def eval_loss(self, model, inputs) -> float:
        """Reconstruction L1 on a fixed batch and fixed assignments (no GAN: it is non-stationary)."""
        out = model(inputs["video"], inputs["counts"])
        return float((out.recon.float() - inputs["video"].float()).abs().mean())

    @torch.no_grad()
    def sample_image(self, model, inputs):
        video = inputs["video"].float()
        return grid_image(video, model(video, inputs["counts"]).recon)

    @torch.no_grad()
    def evaluate(self, model, batches) -> dict:
        """The quality-cost curve on the held-out videos: PSNR/SSIM/MSE at every uniform count, beside
        the mean-colour and 8x/4x down/up-sampling baselines of the same clips (``evatok.evaluation``).
        At most ``train.val_clips`` clips, so the check costs seconds."""
        from evatok.evaluation import baselines, curve_metrics, uniform_curve

        clips, n = [], 0
        for inputs in batches:
            clips.append(inputs["video"].float())
            n += clips[-1].shape[0]
            if n >= self.t.val_clips:
                break
        if not clips:
            return {}
        clips = torch.cat(clips)[: self.t.val_clips]
        mod = model.module if hasattr(model, "module") else model
        tok = mod.tokenizer if hasattr(mod, "tokenizer") else mod
        out = curve_metrics(uniform_curve(tok, clips), baselines(clips.cpu()))
        out["val/clips"] = float(clips.shape[0])
        return out

    def export_module(self, model):
        return model.tokenizer


class ProxyRecipe(TokenizerRecipe):
    def assignments(self, video):
        return self.space.sample(video.shape[0], self.generator, equal_total=self.t.equal_total_batches,
                                 shared=self.shared_generator)


class FinalRecipe(TokenizerRecipe):
    def __init__(self, cfg, device, dtype=torch.float32, generator=None):
        super().__init__(cfg, device, dtype, generator)
        self.router = load_frozen(self.t.router, "router", device)
        if tuple(self.router.config.counts) != tuple(self.tok_cfg.counts):
            raise ValueError(f"router counts {self.router.config.counts} != tokenizer counts {self.tok_cfg.counts}")

    def assignments(self, video):
        return self.router.counts(self.router.predict(video.float()))

    def upstream(self):
        return {"upstream.router_run_id": str(self.router.export_meta.get("mlflow_run_id", ""))}


# ----------------------------------------------------------------------------- router
class RouterRecipe(Recipe):
    kind = "router"
    columns = ["clip_id", "frames", "shape"]

    def __init__(self, cfg, device, dtype=torch.float32, generator=None):
        super().__init__(cfg, device, dtype, generator)
        from evatok import router

        base = router.PRESETS[self.t.preset]()
        self.router_cfg = dataclasses.replace(base, image_size=cfg.data.size, num_frames=cfg.data.clip_len)

    def build(self):
        from evatok.router import Router

        return Router(self.router_cfg)

    def prepare(self, batch):
        out = {"video": self.video(batch), "target": batch["target"].to(self.device)}
        if "reward" in batch:
            out["reward"] = batch["reward"]
        return out

    def train_loss(self, model, inputs, step, disc=None):
        logits = model(inputs["video"]).float()
        loss = nn.functional.cross_entropy(logits, inputs["target"])
        return loss, {"ce": float(loss.detach())}, {}

    @torch.no_grad()
    def eval_loss(self, model, inputs):
        return float(nn.functional.cross_entropy(model(inputs["video"]).float(), inputs["target"]))

    @torch.no_grad()
    def evaluate(self, model, batches) -> dict:
        from evatok.assignment import reward_percentile

        n = top1 = top5 = 0
        rewards, chosen, targets = [], [], []
        for inputs in batches:
            logits = model(inputs["video"]).float()
            top = logits.topk(5, dim=-1).indices
            tgt = inputs["target"]
            top1 += int((top[:, 0] == tgt).sum())
            top5 += int((top == tgt[:, None]).any(-1).sum())
            n += len(tgt)
            targets.append(tgt.cpu())
            if "reward" in inputs:
                rewards.append(inputs["reward"].float().cpu())
                chosen.append(top[:, 0].cpu())
        if n == 0:
            return {}
        out = {"val/top1": top1 / n, "val/top5": top5 / n, "val/clips": float(n)}
        # What a constant answer scores on the same clips: a top-1 is only worth its margin over these.
        freq = torch.bincount(torch.cat(targets), minlength=625).float()
        out["val/majority_top1"] = float(freq.max() / n)
        out["val/majority_top5"] = float(freq.topk(5).values.sum() / n)
        out["val/distinct_labels"] = float((freq > 0).sum())
        if rewards:
            r = torch.cat(rewards)
            out["val/reward_percentile"] = reward_percentile(r, torch.cat(chosen))
            out["val/majority_reward_percentile"] = reward_percentile(r, int(freq.argmax()))
        return out


# ----------------------------------------------------------------------------- AR
class ARRecipe(Recipe):
    kind = "ar"
    columns = ["frames", "shape", "label"]

    def __init__(self, cfg, device, dtype=torch.float32, generator=None, classes: list[str] | None = None):
        super().__init__(cfg, device, dtype, generator)
        from evatok import ar

        self.tokenizer = load_frozen(self.t.tokenizer, "tokenizer", device)  # decodes the sample images
        self._router = None  # loaded on first use: a codes dataset needs no router
        tc = self.tokenizer.config
        base = ar.PRESETS[self.t.preset]()
        self.ar_cfg = dataclasses.replace(base, codebook_size=tc.codebook_size, counts=tuple(tc.counts),
                                          num_blocks=tc.num_blocks,
                                          num_classes=len(classes) if classes else base.num_classes)

    def build(self):
        from evatok.ar import ARModel

        return ARModel(self.ar_cfg)

    @property
    def router(self) -> nn.Module:
        if self._router is None:
            self._router = load_frozen(self.t.router, "router", self.device)
        return self._router

    @torch.no_grad()
    def prepare(self, batch):
        labels = batch.get("class_id")
        labels = None if labels is None else labels.cpu()
        if "codes" in batch:  # a codes dataset (evatok tokenize): the codes as written, no model runs
            fixed = list(self.t.prefix_counts or [])
            if fixed and batch["counts"][:, :len(fixed)].tolist() != [fixed] * len(batch["counts"]):
                raise ValueError(f"train.prefix_counts={fixed}: the codes dataset's first blocks have other counts; "
                                 "train on clips (route-and-encode) or tokenize with that prefix")
            return {"codes": batch["codes"], "counts": batch["counts"], "labels": labels}
        video = batch["video"].to(self.device)  # clips: route and encode every clip at every step
        if self.t.prefix_counts:  # frame prediction: the conditioning blocks' counts are fixed [P]
            counts = self.router.counts(self.router.predict_constrained(video, prefix=self.t.prefix_counts))
        else:
            counts = self.router.counts(self.router.predict(video))
        codes, _ = self.tokenizer.encode(video, counts)
        return {"codes": codes.cpu(), "counts": counts.cpu(), "labels": labels}

    def _sequences(self, model, inputs, dropout: bool):
        mod = model.module if hasattr(model, "module") else model
        tokens, targets, _ = mod.layout.build_sequence(inputs["codes"], inputs["counts"], inputs["labels"])
        if dropout:
            tokens = mod.drop_class(tokens, generator=self.generator)
        return tokens.to(self.device), targets.to(self.device)

    def train_loss(self, model, inputs, step, disc=None):
        tokens, targets = self._sequences(model, inputs, dropout=True)
        _, loss = model(tokens, targets)
        return loss, {"ce": float(loss.detach())}, {}

    @torch.no_grad()
    def eval_loss(self, model, inputs):
        tokens, targets = self._sequences(model, inputs, dropout=False)
        return float(model(tokens, targets)[1])

    @torch.no_grad()
    def sample_image(self, model, inputs):
        labels = torch.arange(min(2, self.ar_cfg.num_classes))
        g = torch.Generator().manual_seed(0)
        seq = model.generate(labels, cfg_scale=1.0, generator=g)
        seq = seq[0] if isinstance(seq, tuple) else seq
        codes, counts = model.layout.parse_sequence(seq.cpu())
        codes = nn.utils.rnn.pad_sequence([c.long() for c in codes], batch_first=True).to(self.device)
        video = self.tokenizer.decode(codes, counts.to(self.device))
        return grid_image(video, video)

    def upstream(self):
        tags = {"upstream.tokenizer_run_id": str(self.tokenizer.export_meta.get("mlflow_run_id", ""))}
        if self.t.router:
            tags["upstream.router_run_id"] = str(self.router.export_meta.get("mlflow_run_id", ""))
        return tags


# ----------------------------------------------------------------------------- classifier
class ClassifierRecipe(Recipe):
    """The small video classifier behind the generation metrics (``evatok.classifier``): cross-entropy
    on the clips' class labels; held-out accuracy (by video) beside the majority-class baseline."""
    kind = "classifier"
    columns = ["frames", "shape", "label"]

    def __init__(self, cfg, device, dtype=torch.float32, generator=None, classes: list[str] | None = None):
        super().__init__(cfg, device, dtype, generator)
        from evatok import classifier

        if not classes:
            raise ValueError("the classifier recipe needs class-labeled clips (a non-empty label column)")
        if self.t.preset not in classifier.PRESETS:
            raise ValueError(f"classifier preset {self.t.preset!r} unknown; choose from {sorted(classifier.PRESETS)} "
                             f"(classifier.preset=...)")
        base = classifier.PRESETS[self.t.preset]()
        self.clf_cfg = dataclasses.replace(base, num_classes=len(classes), frames=cfg.data.clip_len,
                                           size=cfg.data.size)

    def build(self):
        from evatok.classifier import VideoClassifier

        return VideoClassifier(self.clf_cfg)

    def prepare(self, batch):
        return {"video": self.video(batch), "target": batch["class_id"].to(self.device)}

    def train_loss(self, model, inputs, step, disc=None):
        logits = model(inputs["video"]).float()
        loss = nn.functional.cross_entropy(logits, inputs["target"], ignore_index=-1)
        acc = (logits.argmax(-1) == inputs["target"]).float().mean()
        return loss, {"ce": float(loss.detach()), "train_acc": float(acc)}, {}

    @torch.no_grad()
    def eval_loss(self, model, inputs):
        return float(nn.functional.cross_entropy(model(inputs["video"]).float(), inputs["target"], ignore_index=-1))

    @torch.no_grad()
    def evaluate(self, model, batches) -> dict:
        n = hit = 0
        targets = []
        for inputs in batches:
            tgt = inputs["target"]
            hit += int((model(inputs["video"]).float().argmax(-1) == tgt).sum())
            n += len(tgt)
            targets.append(tgt.cpu())
        if n == 0:
            return {}
        freq = torch.bincount(torch.cat(targets).clamp_min(0))
        return {"val/acc": hit / n, "val/majority_acc": float(freq.max() / n), "val/clips": float(n)}


RECIPES = {"proxy": ProxyRecipe, "router": RouterRecipe, "final": FinalRecipe, "ar": ARRecipe,
           "classifier": ClassifierRecipe}


def make_recipe(cfg: Config, device, dtype=torch.float32, generator=None, classes=None) -> Recipe:
    if cfg.train.model not in RECIPES:
        raise ValueError(f"unknown train.model {cfg.train.model!r}; choose from {sorted(RECIPES)}")
    cls = RECIPES[cfg.train.model]
    if cls in (ARRecipe, ClassifierRecipe):
        return cls(cfg, device, dtype, generator, classes=classes)
    return cls(cfg, device, dtype, generator)
