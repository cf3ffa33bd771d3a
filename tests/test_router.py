"""Router: shapes, constrained prediction vs brute force, preset sizes, a tiny training smoke test."""
from __future__ import annotations

import pytest
import torch

from evatok.assignment import AssignmentSpace
from evatok.router import PRESETS, NoFeasibleAssignmentError, Router, RouterConfig, constraint_mask, num_params

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def router():
    torch.manual_seed(0)
    return Router(PRESETS["tiny"]()).eval()


@pytest.fixture(scope="module")
def clips():
    torch.manual_seed(1)
    return torch.rand(6, 3, 16, 64, 64) - 0.5


@pytest.fixture(scope="module")
def logits(router, clips):
    with torch.no_grad():
        return router(clips)


def brute_force(logits, table, prefix=None, max_total=None):
    """Reference: walk every assignment in Python and keep the best feasible one."""
    out = []
    for row in logits.tolist():
        best, best_i = float("-inf"), None
        for i, counts in enumerate(table.tolist()):
            if prefix is not None and tuple(counts[:len(prefix)]) != tuple(prefix):
                continue
            if max_total is not None and sum(counts) > max_total:
                continue
            if row[i] > best:
                best, best_i = row[i], i
        out.append(best_i)
    return torch.tensor(out)


def test_forward_predict_topk(router, clips, logits):
    assert logits.shape == (6, 625)
    pred = router.predict(clips)
    assert pred.dtype == torch.long and torch.equal(pred, logits.argmax(-1))
    top = router.topk(clips, 5)
    assert top.indices.shape == top.probs.shape == (6, 5)
    assert torch.equal(top.indices[:, 0], pred)
    assert (top.probs[:, :-1] >= top.probs[:, 1:]).all()
    torch.testing.assert_close(top.probs, logits.softmax(-1).gather(1, top.indices))
    # indices -> counts agrees with the assignment space's own decoding
    space = AssignmentSpace((8, 16, 32, 64, 128))
    assert torch.equal(router.counts(pred), torch.stack([space.counts(int(i)) for i in pred]).reshape(6, 4))


@pytest.mark.parametrize("prefix,max_total", [((128, 8), None), ((16,), None), (None, 100),
                                              (None, 32), ((64, 32), 150), ((8, 8, 8, 8), None)])
def test_constrained_matches_bruteforce(router, clips, logits, prefix, max_total):
    got = router.predict_constrained(clips, prefix=prefix, max_total=max_total)
    assert torch.equal(got, brute_force(logits, router.space.table, prefix, max_total))
    counts = router.counts(got)
    if prefix is not None:
        assert (counts[:, :len(prefix)] == torch.tensor(prefix)).all()
    if max_total is not None:
        assert (counts.sum(-1) <= max_total).all()


def test_constraint_actually_binds(router, clips):
    # the unconstrained argmax violates a (128, 8) prefix for these clips, so the test above is not vacuous
    free = router.counts(router.predict(clips))
    assert not (free[:, :2] == torch.tensor([128, 8])).all(1).all()
    assert (free.sum(-1) > 100).any()


def test_infeasible_and_invalid_constraints(router, clips):
    with pytest.raises(NoFeasibleAssignmentError, match="no assignment"):
        router.predict_constrained(clips, max_total=31)  # the shortest assignment is 4 x 8 = 32
    with pytest.raises(NoFeasibleAssignmentError):
        router.predict_constrained(clips, prefix=(128, 128), max_total=256 + 15)
    with pytest.raises(ValueError, match="not candidates"):
        router.predict_constrained(clips, prefix=(100,))
    with pytest.raises(ValueError, match="longer"):
        constraint_mask(router.space, prefix=(8,) * 5)
    assert constraint_mask(router.space, prefix=(128, 8)).sum() == 25


def test_bad_input_shape(router):
    with pytest.raises(ValueError, match="expects"):
        router(torch.zeros(1, 3, 16, 32, 32))
    with pytest.raises(ValueError, match="k must be"):
        router.topk(torch.zeros(1, 3, 16, 64, 64), 0)


def test_paper_preset_size():
    cfg = PRESETS["paper"]()
    with torch.device("meta"):
        model = Router(cfg)
    n = num_params(model)
    assert abs(n - 19.9e6) / 19.9e6 < 0.05, n
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.image_size) == (384, 12, 6, 128)
    assert model.space.table.shape == (625, 4) and int(model.space.table.max()) == 512


def test_patchify_is_tubelet_raster():
    cfg = RouterConfig(image_size=32, patch_size=(4, 16, 16), dim=32, depth=1, heads=2, mlp_dim=64)
    r = Router(cfg)
    x = torch.arange(3 * 16 * 32 * 32, dtype=torch.float32).reshape(1, 3, 16, 32, 32)
    p = r.patchify(x)
    assert p.shape == (1, 4 * 2 * 2, 3 * 4 * 16 * 16)
    # tubelet (t=1, h=0, w=1) = frames 4..7, rows 0..15, cols 16..31
    torch.testing.assert_close(p[0, 1 * 4 + 0 * 2 + 1], x[0, :, 4:8, 0:16, 16:32].reshape(-1))


def test_tiny_router_learns_visible_property():
    """32 clips whose label (one of 4 assignments) is set by their brightness: CE must fall below
    half its start and the router must tell the clips apart (~7 s of CPU on an idle core)."""
    torch.manual_seed(0)
    n, classes = 32, torch.tensor([0, 156, 468, 624])
    level = torch.arange(n) % 4
    x = (torch.rand(n, 3, 16, 64, 64) - 0.5) * 0.3 + (level.float() / 3 - 0.5)[:, None, None, None, None] * 0.6
    y = classes[level]
    model = Router(PRESETS["tiny"]())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with torch.no_grad():
        first = model.loss(x, y).item()
    for _ in range(15):
        loss = model.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = model.loss(x, y).item()
    assert last < 0.5 * first, (first, last)
    assert (model.predict(x) == y).float().mean() >= 0.75


def test_export_round_trip(router, clips, logits, tmp_path):
    from evatok.export import load_model, save_model

    save_model(router, tmp_path / "router.pt")
    back = load_model(tmp_path / "router.pt").eval()
    assert back.config == router.config and back.config.patch_size == (4, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(back(clips), logits)
    assert torch.equal(back.predict_constrained(clips, prefix=(128, 8)),
                       router.predict_constrained(clips, prefix=(128, 8)))
