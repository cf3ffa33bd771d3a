"""Fast tests of the training pieces without Ray: schedules, checkpoint state, data collation,
DeepSpeed config checks, every recipe's batch -> loss (falls on a fixed batch), paper-scale shapes."""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from workflows.config import ConfigError, load_config
from workflows.train import checkpoint as ckpt
from workflows.train.loop import deepspeed_config, micro_batch_size, worker_env
from workflows.train.schedules import lr_multiplier

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- schedules
def test_cosine_goes_from_peak_to_min_lr():
    m = [lr_multiplier(s, 100, "cosine", 1e-4, 1e-6) for s in range(101)]
    assert m[0] == pytest.approx(1.0)
    assert m[100] == pytest.approx(1e-2)  # 1e-6 / 1e-4
    assert m[50] == pytest.approx((1 + 1e-2) / 2)
    assert all(a >= b for a, b in zip(m, m[1:]))


def test_wsd_is_constant_for_80_percent_then_anneals_to_zero():
    m = [lr_multiplier(s, 100, "wsd", 6e-4, 0.0) for s in range(101)]
    assert m[:80] == [1.0] * 80
    assert m[90] == pytest.approx(0.5)
    assert m[100] == 0.0
    assert all(a >= b for a, b in zip(m, m[1:]))


def test_warmup_and_bad_schedule():
    assert lr_multiplier(0, 100, "cosine", warmup_steps=10) == pytest.approx(0.1)
    assert lr_multiplier(9, 100, "wsd", warmup_steps=10) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_multiplier(0, 10, "linear")


# ----------------------------------------------------------------------------- checkpoint state
def test_rng_state_round_trips_through_weights_only_file(tmp_path):
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(1); np.random.seed(1); random.seed(1)
    torch.save(ckpt.rng_state(g), tmp_path / "rng.pt")
    first = (torch.rand(3), np.random.rand(3), random.random(), torch.randint(625, (4,), generator=g))
    torch.manual_seed(99); np.random.seed(99); random.seed(99); g.manual_seed(99)
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), g)
    again = (torch.rand(3), np.random.rand(3), random.random(), torch.randint(625, (4,), generator=g))
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[2] == again[2] and torch.equal(first[3], again[3])
    # a recipe's two generators (its own, the one ranks share) round-trip in order; a file written with
    # one generator (before recipes had two) restores the first and leaves the second as it is
    g2 = torch.Generator().manual_seed(4)
    torch.save(ckpt.rng_state([g, g2]), tmp_path / "rng2.pt")
    want = (torch.rand(2, generator=g), torch.rand(2, generator=g2))
    g.manual_seed(0); g2.manual_seed(0)
    ckpt.set_rng_state(torch.load(tmp_path / "rng2.pt", weights_only=True), [g, g2])
    assert torch.equal(torch.rand(2, generator=g), want[0]) and torch.equal(torch.rand(2, generator=g2), want[1])
    old = torch.load(tmp_path / "rng.pt", weights_only=True)  # as written before: one "generator"
    old["generator"] = old.pop("generators")[0]
    g.manual_seed(99); g2.manual_seed(5)
    ckpt.set_rng_state(old, [g, g2])
    assert torch.equal(torch.randint(625, (4,), generator=g), first[3])
    assert torch.equal(torch.rand(2, generator=g2), torch.rand(2, generator=torch.Generator().manual_seed(5)))


def test_loop_state_json():
    s = ckpt.LoopState(step=7, epoch=1, micro_in_epoch=3, samples=56, mlflow_run_id="abc")
    assert ckpt.LoopState.from_json(s.to_json()) == s


# ----------------------------------------------------------------------------- config checks
def test_deepspeed_config_from_recipe():
    cfg = load_config(None, ["train.batch_size=8", "train.deepspeed.grad_accum=2", "train.deepspeed.zero_stage=2",
                             "train.deepspeed.precision=bf16"])
    ds = deepspeed_config(cfg.train, world=2)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"]
    with pytest.raises(ConfigError, match="divisible"):
        micro_batch_size(dataclasses.replace(cfg.train, batch_size=6), world=2)
    with pytest.raises(ConfigError, match="precision"):
        deepspeed_config(dataclasses.replace(cfg.train, deepspeed=dataclasses.replace(
            cfg.train.deepspeed, precision="fp16")), 2)


def test_worker_env_forwards_settings_by_name_never_credentials(monkeypatch):
    """The workers' runtime env is Ray metadata (dashboard, ``ray list actors --detail``): settings only."""
    settings = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_REGION": "eu-west-1", "AWS_PROFILE": "research",
                "MLFLOW_TRACKING_URI": "http://tracking:5000", "EVATOK_TEST_FAIL_ONCE": "3:1:/tmp/m"}
    secrets = {"AWS_SECRET_ACCESS_KEY": "s3cr3t-value", "AWS_SESSION_TOKEN": "session-token-value",
               "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE123", "MLFLOW_TRACKING_PASSWORD": "mlflow-pw-value",
               "MLFLOW_TRACKING_TOKEN": "mlflow-token-value", "MLFLOW_TRACKING_USERNAME": "alice",
               "EVATOK_DB_PASSWORD": "evatok-pw-value", "RAY_DATA_S3_SECRET": "ray-data-secret"}
    for k, v in {**settings, **secrets, "HOME_SECRET": "nope"}.items():
        monkeypatch.setenv(k, v)
    env = worker_env(use_gpu=False)
    assert env["DS_ACCELERATOR"] == "cpu"
    assert {k: env.get(k) for k in settings} == settings
    assert not set(secrets) & set(env) and "HOME_SECRET" not in env
    assert not set(secrets.values()) & set(env.values())
    # a URI that carries a password stays out too (a local worker inherits it from the raylet)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:pw-in-uri@tracking.example/")
    assert "MLFLOW_TRACKING_URI" not in worker_env(use_gpu=False)


# ----------------------------------------------------------------------------- data
def test_collate_decodes_frames_and_maps_labels(tmp_path):
    from train_fixtures import write_clips
    from workflows import storage
    from workflows.train.data import Collate, DataError

    write_clips(str(tmp_path), n=3)
    t = storage.read_table(str(tmp_path / "clips"))
    batch = {k: np.asarray(t.column(k).to_pylist(), dtype=object) for k in ("clip_id", "frames", "label")}
    batch["shape"] = np.asarray(t.column("shape").to_pylist())
    out = Collate(["fast_pan", "slow_pan", "static"], {c: i for i, c in enumerate(batch["clip_id"])})(batch)
    assert out["video"].shape == (3, 3, 16, 64, 64)
    assert -0.5 <= float(out["video"].min()) and float(out["video"].max()) <= 0.5
    assert out["class_id"].tolist() == [2, 1, 0] and out["target"].tolist() == [0, 1, 2]
    with pytest.raises(DataError, match="no label"):
        Collate(targets={})(batch)


# ----------------------------------------------------------------------------- recipes without Ray
def _train_steps(recipe, model, inputs, steps, disc=None):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    d_opt = torch.optim.AdamW(disc.parameters(), lr=1e-4) if disc is not None else None
    model.eval()
    before = recipe.eval_loss(model, inputs)
    model.train()
    for step in range(steps):
        loss, logs, aux = recipe.train_loss(model, inputs, step, disc)
        opt.zero_grad(); loss.backward(); opt.step()
        if disc is not None:
            d_loss, d_logs = recipe.disc_loss(disc, inputs, aux, step)
            if d_loss is not None:
                d_opt.zero_grad(); d_loss.backward(); d_opt.step()
                assert "d_loss" in d_logs
    model.eval()
    return before, recipe.eval_loss(model, inputs)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    from train_fixtures import write_clips
    from workflows import storage
    from workflows.train.data import Collate

    root = tmp_path_factory.mktemp("clips")
    write_clips(str(root), n=4)
    t = storage.read_table(str(root / "clips"))
    b = {k: np.asarray(t.column(k).to_pylist(), dtype=object) for k in ("clip_id", "frames", "label")}
    b["shape"] = np.asarray(t.column("shape").to_pylist())
    classes = sorted(set(b["label"]))
    return Collate(classes, {c: (i * 77) % 625 for i, c in enumerate(b["clip_id"])})(b), classes


@pytest.fixture(scope="module")
def frozen_models(tmp_path_factory):
    """Untrained tiny router + tokenizer exported as files (frozen inputs of final and AR)."""
    from evatok.export import save_model
    from evatok.router import PRESETS as RP, Router
    from evatok.tokenizer import PRESETS as TP, AdaptiveTokenizer

    root = tmp_path_factory.mktemp("frozen")
    torch.manual_seed(0)
    save_model(Router(RP["tiny"]()), root / "router.pt", {"mlflow_run_id": "r1"})
    save_model(AdaptiveTokenizer(TP["tiny"]()), root / "tok.pt", {"mlflow_run_id": "t1"})
    return root


@pytest.mark.parametrize("model", ["proxy", "router", "final", "ar"])
def test_recipe_loss_falls_on_a_fixed_batch(model, batch, frozen_models):
    from workflows.train.recipes import make_recipe

    data, classes = batch
    cfg = load_config(None, [f"train.model={model}", f"train.router={frozen_models / 'router.pt'}",
                             f"train.tokenizer={frozen_models / 'tok.pt'}", "train.disc_start=0"])
    torch.manual_seed(0)
    recipe = make_recipe(cfg, torch.device("cpu"), classes=classes)
    net, disc = recipe.build(), recipe.build_disc()
    assert (disc is not None) == (model in ("proxy", "final"))
    inputs = recipe.prepare(data)
    if model in ("proxy", "final"):
        assert inputs["counts"].shape == (4, 4)
    before, after = _train_steps(recipe, net, inputs, steps=4, disc=disc)
    assert after < before, (before, after)
    if model in ("final", "ar"):
        assert recipe.upstream()["upstream.router_run_id"] == "r1"


def test_proxy_draws_mixed_random_assignments(batch):
    from workflows.train.recipes import make_recipe

    cfg = load_config(None, ["train.model=proxy"])
    recipe = make_recipe(cfg, torch.device("cpu"))
    draws = [recipe.assignments(batch[0]["video"]) for _ in range(20)]
    idx = torch.stack([recipe.space.index(d) for d in draws])
    assert len(idx.unique()) > 20  # mixed within and across batches
    assert all(len(d.sum(1).unique()) == 1 for d in draws)  # train.equal_total_batches: no padding
    # two data-parallel ranks (own generators seeded per rank, as the loop does) agree on each step's
    # total, so neither waits for a longer batch, and still permute differently
    ranks = [make_recipe(cfg, torch.device("cpu"), generator=torch.Generator().manual_seed(r)) for r in (0, 1)]
    steps = [[rk.assignments(batch[0]["video"]) for rk in ranks] for _ in range(20)]
    assert all(len(torch.cat(step).sum(1).unique()) == 1 for step in steps)
    assert any(not torch.equal(a, b) for a, b in steps)
    off = make_recipe(load_config(None, ["train.model=proxy", "train.equal_total_batches=false"]), torch.device("cpu"))
    totals = [len(off.assignments(batch[0]["video"]).sum(1).unique()) for _ in range(20)]
    assert max(totals) > 1


def test_codebook_restarts_only_where_the_codebook_can_be_edited_in_place():
    """train.codebook_restart / train.entropy_tokens reach the tokenizer's config; restarts are refused
    under an optimiser with its own master weights (ZeRO > 0, mixed precision), which would undo them."""
    from workflows.train.recipes import make_recipe

    cfg = load_config(None, ["train.model=proxy", "train.codebook_size=4096", "train.entropy_tokens=256",
                             "train.codebook_restart=0.03"])
    recipe = make_recipe(cfg, torch.device("cpu"))
    c = recipe.tok_cfg
    assert (c.codebook_size, c.entropy_tokens, c.restart_below) == (4096, 256, 0.03)
    assert recipe.build().tokenizer.quantizer.restart_below == 0.03
    assert make_recipe(load_config(None, ["train.model=proxy"]), torch.device("cpu")).tok_cfg.restart_below == 0
    for bad in (["train.deepspeed.zero_stage=2"], ["train.deepspeed.precision=bf16"]):
        with pytest.raises(ValueError, match="codebook_restart"):
            make_recipe(load_config(None, ["train.model=proxy", "train.codebook_restart=0.03", *bad]),
                        torch.device("cpu"))


def test_router_evaluate_reports_top_k_and_percentile():
    from workflows.train.recipes import RouterRecipe

    cfg = load_config(None, ["train.model=router"])
    recipe = RouterRecipe(cfg, torch.device("cpu"))

    class Fixed(torch.nn.Module):  # a "router" whose logits we choose, to check the arithmetic
        def forward(self, x):
            logits = torch.zeros(x.shape[0], 625)
            logits[0, 3] = 1.0; logits[1, 9] = 1.0
            return logits

    reward = torch.zeros(2, 625); reward[0, 3] = 1.0; reward[1, 5] = 1.0
    out = recipe.evaluate(Fixed(), [{"video": torch.zeros(2, 3, 16, 64, 64), "target": torch.tensor([3, 5]),
                                     "reward": reward}])
    assert out["val/top1"] == 0.5 and out["val/top5"] == 0.5
    assert out["val/reward_percentile"] == pytest.approx(50.0)
    # the constant baselines beside it: targets 3 and 5 are each half the clips
    assert out["val/majority_top1"] == 0.5 and out["val/majority_top5"] == 1.0 and out["val/distinct_labels"] == 2
    assert out["val/majority_reward_percentile"] == pytest.approx(50.0)


# ----------------------------------------------------------------------------- paper-scale recipes
@pytest.mark.parametrize("name", ["proxy", "router", "final", "ar"])
def test_paper_configs_build_on_meta_device(name):
    from workflows.train.recipes import RECIPES

    cfg = load_config(REPO / "configs" / f"paper-{name}.yaml")
    t = cfg.train
    assert t.use_gpu and t.deepspeed.precision == "bf16" and t.deepspeed.zero_stage == 2 and t.batch_size == 128
    assert t.model == name and (t.schedule == "wsd") == (name == "ar")
    deepspeed_config(t, t.num_workers)
    with torch.device("meta"):
        if name == "router":
            from evatok.router import Router
            model = Router(RECIPES["router"](cfg, "meta").router_cfg)
            expect = 19.9e6
        elif name == "ar":
            from evatok.ar import PRESETS, ARModel
            model = ARModel(dataclasses.replace(PRESETS[t.preset](), num_classes=101))
            expect = 633e6
        else:
            from evatok.tokenizer import PRESETS, AdaptiveTokenizer
            tc = dataclasses.replace(PRESETS[t.preset](), frames=cfg.data.clip_len, size=cfg.data.size)
            model = AdaptiveTokenizer(tc)
            expect = 145e6
            assert tc.counts == (32, 64, 128, 256, 512) and tc.num_blocks == 4 and tc.grid == 16
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - expect) / expect < 0.15, n
