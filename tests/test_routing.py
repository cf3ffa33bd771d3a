"""evatok.routing: assignment modes, budget-targeted routing (held-out hit rate, per-clip determinism) and
the ElasticTok-style threshold baseline, on real (random-init) routers and tokenizers and synthetic clips."""
from __future__ import annotations

import pytest
import torch

from evatok import routing, synthetic
from evatok.assignment import AssignmentSpace
from evatok.router import Router, RouterConfig
from evatok.tokenizer import AdaptiveTokenizer, TokenizerConfig
from evatok.video import to_tensor

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COUNTS = (1, 2, 4, 8, 16)
MICRO_TOK = dict(size=32, counts=COUNTS, enc_dim=32, enc_layers=1, enc_heads=2, dec_dim=32, dec_layers=1,
                 dec_heads=2, codebook_size=64, code_dim=4)
MICRO_ROUTER = dict(image_size=32, patch_size=(4, 16, 16), dim=32, depth=1, heads=2, mlp_dim=64, counts=COUNTS)


def micro_router(seed: int = 0) -> Router:
    torch.manual_seed(seed)
    return Router(RouterConfig(**MICRO_ROUTER)).eval()


def micro_clips(n: int, start: int = 0) -> torch.Tensor:
    """``n`` synthetic clips, one video each (seeds start..start+n), classes round-robin, model range."""
    return torch.stack([to_tensor(torch.from_numpy(synthetic.make_video(
        synthetic.CLASSES[i % 8], seed=i, num_frames=16, height=32, width=32))) for i in range(start, start + n)])


def test_parse_mode():
    assert routing.parse_mode("router") == routing.Mode("router")
    assert routing.parse_mode("labels").kind == "labels"
    assert routing.parse_mode("uniform:4", COUNTS) == routing.Mode("uniform", 4.0)
    assert str(routing.parse_mode("budget:200.5")) == "budget:200.5"
    assert str(routing.parse_mode("budget:20", COUNTS)) == "budget:20"
    for bad in ("routerx", "router:3", "uniform:3", "uniform:x", "budget:-1", "budget:65", "budget:3"):
        with pytest.raises(routing.RoutingError):
            routing.parse_mode(bad, COUNTS)


def test_each_mode_chooses_what_it_says():
    space = AssignmentSpace(COUNTS)
    router = micro_router()
    clips = micro_clips(12)
    lp = routing.router_log_probs(router, clips, batch_size=5)
    assert lp.shape == (12, 625) and torch.allclose(lp.exp().sum(-1), torch.ones(12, dtype=torch.float64))
    # router: the router's own argmax
    assert torch.equal(routing.choose(routing.Mode("router"), space, log_probs=lp), router.predict(clips))
    # uniform: the same count in every block
    u = routing.choose(routing.parse_mode("uniform:4", COUNTS), space, n=12)
    assert (space.counts(u) == 4).all()
    # labels: exactly the given labels
    labels = torch.arange(12) * 37 % 625
    assert torch.equal(routing.choose(routing.Mode("labels"), space, labels=labels), labels)
    with pytest.raises(routing.RoutingError):
        routing.choose(routing.Mode("labels"), space)
    # budget: lam = 0 is the router; a large lam the shortest assignment, a very negative one the longest
    b = routing.Mode("budget", 20.0)
    assert torch.equal(routing.choose(b, space, log_probs=lp, lam=0.0), lp.argmax(-1))
    assert (space.totals[routing.choose(b, space, log_probs=lp, lam=10.0)] == 4).all()
    assert (space.totals[routing.choose(b, space, log_probs=lp, lam=-10.0)] == 64).all()
    with pytest.raises(routing.RoutingError):
        routing.choose(b, space, log_probs=lp)


def test_budget_hits_target_on_held_out_clips_and_is_per_clip():
    """lam is fitted on 1000 calibration clips and frozen; on 1000 other clips (other videos) the mean
    tokens per clip lands within 2% of B, for budgets across the range; a clip routed alone chooses
    what it chooses inside a batch."""
    space = AssignmentSpace(COUNTS)
    router = micro_router()
    calib, held = micro_clips(1000), micro_clips(1000, start=1000)
    lp_cal = routing.router_log_probs(router, calib, batch_size=250)
    lp_held = routing.router_log_probs(router, held, batch_size=250)
    router_mean = routing.mean_tokens(lp_held.argmax(-1), space.totals)
    for target in (10.0, 20.0, 30.0, 40.0):
        cal = routing.calibrate_lambda(lp_cal, space.totals, target)
        assert abs(cal.achieved - target) / target < 0.01, cal
        assert cal.lam_interval[0] < cal.lam < cal.lam_interval[1]
        got = routing.mean_tokens(routing.budget_choice(lp_held, space.totals, cal.lam), space.totals)
        print(f"B={target:g}: lam={cal.lam:.5f} calibration mean {cal.achieved:.3f}, held-out mean {got:.3f} "
              f"({100 * (got - target) / target:+.2f}%), router alone {router_mean:.2f}")
        assert abs(got - target) / target <= 0.02, (target, got)
        # more tokens asked for -> lam falls (it is a price per token)
        if target > 10.0:
            assert cal.lam < prev_lam
        prev_lam = cal.lam
        # per clip: routed alone (batch of 1) and in a batch of 250 -> the same choice, clip by clip
        alone = torch.cat([routing.router_log_probs(router, held[i:i + 1]) for i in range(0, 200)])
        assert torch.equal(routing.budget_choice(alone, space.totals, cal.lam),
                           routing.budget_choice(lp_held[:200], space.totals, cal.lam))
    # a calibration dict round-trips (it is recorded with outputs)
    assert routing.Calibration.from_dict(cal.to_dict()) == cal
    with pytest.raises(routing.RoutingError, match="outside"):
        routing.calibrate_lambda(lp_cal, space.totals, 70.0)


def test_threshold_walk_hand_made_case():
    """Three levels, three blocks; errors depend on the prefix as a block-causal tokenizer's would."""
    table = {
        (): [0.30, 0.10, 0.01],
        (1,): [0.50, 0.20, 0.05],      # after level 1 in block 1
        (2,): [0.04, 0.02, 0.01],
        (1, 2): [0.19, 0.18, 0.17],
        (1, 1): [0.02, 0.01, 0.00],
        (2, 0): [0.30, 0.03, 0.02],
        (2, 2): [0.01, 0.01, 0.01],
        (0,): [0.60, 0.40, 0.20],
        (0, 2): [0.90, 0.80, 0.70],
    }
    seen = []

    def errors(prefix):
        seen.append(prefix)
        return table[prefix]

    assert routing.threshold_walk(errors, 3, 0.10) == (1, 2, 2)   # 0.10 <= .10; .05 only at level 2; none -> last
    assert seen == [(), (1,), (1, 2)]
    assert routing.threshold_walk(errors, 3, 0.045) == (2, 0, 1)  # .01; .04; .03
    assert routing.threshold_walk(errors, 3, 0.35) == (0, 2, 2)   # .30; .20 at the last level; none -> last
    assert routing.pick_level([0.3, 0.2], 0.0) == 1               # nothing under: the most tokens
    assert routing.pick_level([0.3, 0.2], 0.3) == 0               # at the threshold counts as under


def test_threshold_assignments_on_a_tokenizer():
    """Real tokenizer: an infinite threshold gives the shortest assignment, a negative one the longest;
    for a middle threshold every chosen block's error (re-measured by a full reconstruction of the
    chosen assignment) is under it unless the block took the most tokens, and one count fewer would
    have been over it."""
    torch.manual_seed(0)
    tok = AdaptiveTokenizer(TokenizerConfig(**MICRO_TOK)).eval()
    space = AssignmentSpace(COUNTS)
    clips = micro_clips(3)
    errs = routing.BlockErrors(tok, clips[:1])
    mid = sorted(errs(()))[2]
    out = routing.threshold_assignments(tok, clips, [float("inf"), mid, -1.0])
    assert (space.totals[out[0]] == 4).all() and (space.totals[out[2]] == 64).all()
    with torch.no_grad():
        for i in range(3):
            counts = space.counts(out[1, i])
            recon = tok.reconstruct(clips[i:i + 1], counts[None]).clamp(-0.5, 0.5)
            block = ((recon - clips[i:i + 1]) ** 2).reshape(1, 3, 4, 4, 32, 32).mean((0, 1, 3, 4, 5))
            walk = routing.BlockErrors(tok, clips[i:i + 1])
            levels = space.levels[out[1, i]].tolist()
            for t in range(4):
                e = walk(tuple(levels[:t]))
                assert abs(e[levels[t]] - float(block[t])) < 1e-4   # the walk measures what decoding gives
                if levels[t] < 4:
                    assert e[levels[t]] <= mid
                if levels[t] > 0:
                    assert e[levels[t] - 1] > mid
