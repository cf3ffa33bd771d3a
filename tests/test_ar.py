"""AR generator: sequence layout round trip, well-formed sampling, KV cache == no cache, sizes, smoke training."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from evatok.ar import IGNORE_INDEX, PRESETS, ARConfig, ARModel, MalformedSequenceError, num_params
from evatok.ar_sampling import filter_logits

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = PRESETS["tiny"]()


def small(**kw) -> ARConfig:
    """The tiny preset's layout (codebook 1024, counts 8..128, 8 classes) on a narrower, shallower net:
    the sampling tests exercise the layout and the masking, and the width only costs time."""
    net = dict(dim=32, n_layers=1, n_heads=2, multiple_of=32)
    return dataclasses.replace(TINY, **{**net, **kw})


def random_batch(layout, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, len(layout.counts), (B, layout.num_blocks), generator=g)
    counts = torch.tensor(layout.counts)[levels]
    codes = [torch.randint(0, layout.codebook_size, (int(c.sum()),), generator=g) for c in counts]
    labels = torch.randint(0, layout.num_classes, (B,), generator=g)
    return codes, counts, labels


# --- layout ---------------------------------------------------------------------------------
def test_vocab_layout():
    lay = ARModel(small()).layout
    assert (lay.length_base, lay.class_base, lay.null_token, lay.vocab_size, lay.out_vocab) == \
        (1024, 1029, 1037, 1038, 1029)
    assert lay.max_seq_len == 1 + 4 + 4 * 128
    assert lay.class_token(torch.tensor([0, 7, -1])).tolist() == [1029, 1036, 1037]
    with pytest.raises(ValueError, match="labels"):
        lay.class_token(torch.tensor([8]))


def test_build_parse_round_trip_mixed_lengths():
    lay = ARModel(small()).layout
    codes, counts, labels = random_batch(lay, 7)
    counts[0] = torch.tensor([8, 8, 8, 8])  # shortest possible next to (likely) long ones
    codes[0] = codes[0][:32]
    counts[1] = torch.tensor([128, 8, 64, 16])
    codes[1] = torch.randint(0, 1024, (216,))
    tokens, targets, mask = lay.build_sequence(codes, counts, labels)
    lens = 1 + 4 + counts.sum(1)
    assert tokens.shape == (7, int(lens.max())) and torch.equal(mask.sum(1), lens)
    # layout of one sequence, spelled out: class, LEN_128, 128 codes, LEN_8, 8 codes, ...
    t1 = tokens[1]
    assert t1[0] == lay.class_base + labels[1] and t1[1] == lay.length_base + 4
    assert torch.equal(t1[2:130], codes[1][:128]) and t1[130] == lay.length_base + 0
    # targets are the next token, ignored past the end
    assert torch.equal(targets[:, :-1][mask[:, 1:]], tokens[:, 1:][mask[:, 1:]])
    assert (targets[:, :-1][~mask[:, 1:]] == IGNORE_INDEX).all()
    assert (targets[torch.arange(7), lens - 1] == IGNORE_INDEX).all()
    # parse inverts build
    got_codes, got_counts = lay.parse_sequence(tokens)
    assert torch.equal(got_counts, counts)
    assert all(torch.equal(a, b) for a, b in zip(got_codes, codes))
    # a padded [B, Lc] code tensor (the tokenizer's encode output) gives the same sequences
    padded = torch.nn.utils.rnn.pad_sequence(codes, batch_first=True, padding_value=5)
    tokens2, targets2, _ = lay.build_sequence(padded, counts, labels, pad_to=lay.max_seq_len)
    assert tokens2.shape[1] == lay.max_seq_len
    assert torch.equal(tokens2[:, :tokens.shape[1]], tokens) and torch.equal(targets2[:, :targets.shape[1] - 1],
                                                                                targets[:, :-1])


def test_build_rejects_bad_input():
    lay = ARModel(small()).layout
    with pytest.raises(ValueError, match="not all in candidates"):
        lay.build_sequence([torch.zeros(40, dtype=torch.long)], torch.tensor([[8, 8, 8, 16 - 1]]), None)
    with pytest.raises(ValueError, match="codes must be in"):
        lay.build_sequence([torch.full((32,), 1024)], torch.tensor([[8, 8, 8, 8]]), None)
    with pytest.raises(ValueError, match="too short"):
        lay.build_sequence([torch.zeros(31, dtype=torch.long)], torch.tensor([[8, 8, 8, 8]]), None)


def test_parse_rejects_malformed():
    lay = ARModel(small()).layout
    codes, counts, labels = random_batch(lay, 1, seed=3)
    tokens, _, mask = lay.build_sequence(codes, counts, labels)
    good = tokens[0]
    bad_cls = good.clone(); bad_cls[0] = 5
    bad_len = good.clone(); bad_len[1] = 7  # a visual token where block 1's length should be
    short = good[: int(mask.sum()) - 1]  # truncated last block
    vis_as_len = good.clone(); vis_as_len[3] = lay.length_base  # a length token inside block 1
    for seq, msg in [(bad_cls, "class"), (bad_len, "length token"), (short, "visual tokens"), (vis_as_len, "visual")]:
        with pytest.raises(MalformedSequenceError, match=msg):
            lay.parse_sequence(seq)


# --- sampling -------------------------------------------------------------------------------
def test_500_random_samples_are_well_formed():
    torch.manual_seed(0)
    model = ARModel(small())
    lay = model.layout
    labels = torch.arange(500) % lay.num_classes
    tokens = model.generate(labels, generator=torch.Generator().manual_seed(0))
    assert tokens.shape[0] == 500 and tokens.shape[1] <= lay.max_seq_len
    codes, counts = lay.parse_sequence(tokens)  # raises if any sample is malformed
    assert torch.isin(counts, torch.tensor(lay.counts)).all()
    assert [len(c) for c in codes] == counts.sum(1).tolist()
    assert torch.equal(tokens[:, 0], labels + lay.class_base)
    # the batch really mixed phases: every candidate count occurs in every block position
    for t in range(4):
        assert set(counts[:, t].tolist()) == set(lay.counts)


def test_kv_cache_equals_no_cache():
    torch.manual_seed(1)
    model = ARModel(small(codebook_size=64, counts=(1, 2, 4, 8, 16), dim=64, n_layers=2, n_heads=4))
    labels = torch.tensor([0, 3, -1, 7])
    kw = dict(cfg_scale=2.5, temperature=1.3, top_k=40, top_p=0.95)
    a = model.generate(labels, generator=torch.Generator().manual_seed(7), use_cache=True, **kw)
    b = model.generate(labels, generator=torch.Generator().manual_seed(7), use_cache=False, **kw)
    assert torch.equal(a, b)
    c = model.generate(labels, generator=torch.Generator().manual_seed(8), use_cache=True, **kw)
    assert not torch.equal(a, c)  # the seed matters, so equality above is not an accident
    model.layout.parse_sequence(a)


def test_cached_forward_matches_full_forward():
    torch.manual_seed(2)
    model = ARModel(small(n_layers=2)).eval()
    codes, counts, labels = random_batch(model.layout, 3, seed=1)
    tokens, _, _ = model.layout.build_sequence(codes, counts, labels)
    tokens = tokens[:, :40]
    with torch.no_grad():
        full, _ = model(tokens)
        cache = model.new_cache(3)
        head, _ = model(tokens[:, :10], cache=cache, start_pos=0)  # prefill
        chunk, _ = model(tokens[:, 10:13], cache=cache, start_pos=10)  # a chunk after a prefix
        steps = [model(tokens[:, i:i + 1], cache=cache, start_pos=i)[0] for i in range(13, 40)]
    torch.testing.assert_close(torch.cat([head, chunk, *steps], 1), full, atol=1e-5, rtol=1e-4)


def test_greedy_and_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, float("-inf")], [0.0, 0.0, 5.0, 4.9]])
    k1 = filter_logits(logits, top_k=1)
    assert torch.isfinite(k1).sum(1).tolist() == [1, 1]
    # row 0 probs (.665, .245, .09): the top token covers 0.6; row 1: 5.0 has .52 < 0.6, so 4.9 stays too
    p = filter_logits(logits, top_p=0.6)
    assert torch.isfinite(p).sum(1).tolist() == [1, 2]
    torch.manual_seed(0)
    model = ARModel(small())
    a = model.generate(torch.tensor([1, 2]), temperature=0.0)
    b = model.generate(torch.tensor([1, 2]), temperature=0.0)
    assert torch.equal(a, b)
    model.layout.parse_sequence(a)


def test_padding_does_not_change_real_positions():
    torch.manual_seed(3)
    model = ARModel(small()).eval()
    codes, counts, labels = random_batch(model.layout, 2, seed=4)
    tokens, targets, mask = model.layout.build_sequence(codes, counts, labels)
    n0 = int(mask[0].sum())
    with torch.no_grad():
        batched, _ = model(tokens)
        alone, _ = model(tokens[:1, :n0])
    torch.testing.assert_close(batched[:1, :n0], alone, atol=1e-5, rtol=1e-4)


def test_class_dropout():
    model = ARModel(small())
    tokens, _, _ = model.layout.build_sequence(*random_batch(model.layout, 64)[:2], torch.zeros(64, dtype=torch.long))
    assert (model.drop_class(tokens, p=1.0)[:, 0] == model.layout.null_token).all()
    assert torch.equal(model.drop_class(tokens, p=0.0), tokens)
    out = model.drop_class(tokens, generator=torch.Generator().manual_seed(0))  # config default 0.1
    dropped = (out[:, 0] == model.layout.null_token).sum()
    assert 0 < dropped < 20 and torch.equal(out[:, 1:], tokens[:, 1:])


@pytest.mark.parametrize("name,target", [("GPT-B", 99e6), ("GPT-327M", 327e6), ("GPT-633M", 633e6)])
def test_paper_preset_sizes(name, target):
    with torch.device("meta"):
        model = ARModel(PRESETS[name]())
    n = num_params(model)
    assert abs(n - target) / target < 0.05, n
    assert model.layout.max_seq_len == 1 + 4 + 4 * 512 and model.config.codebook_size == 16384


# --- smoke training ---------------------------------------------------------------------------
def test_tiny_ar_fits_fixed_sequences_and_generates_them():
    """Train the tiny preset on 2 fixed sequences (one per class); the loss must fall below half its
    start, and greedy sampling with each class label must then reproduce that class's sequence."""
    torch.manual_seed(0)
    model = ARModel(TINY)
    lay = model.layout
    counts = torch.tensor([[16, 8, 8, 8], [8, 16, 8, 16]])
    codes = [torch.randint(0, lay.codebook_size, (int(c.sum()),)) for c in counts]
    tokens, targets, _ = lay.build_sequence(codes, counts, torch.tensor([0, 1]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(120):
        _, loss = model(tokens, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    out = model.generate(torch.tensor([0, 1]), temperature=0.0)
    got_codes, got_counts = lay.parse_sequence(out)
    assert torch.equal(got_counts, counts)
    assert all(torch.equal(a, b) for a, b in zip(got_codes, codes))


def test_export_round_trip(tmp_path):
    """Configs come back from export files as lists; the reloaded model must sample identically."""
    from evatok.export import load_model, save_model

    torch.manual_seed(5)
    model = ARModel(small(counts=[8, 16, 32, 64, 128]))
    save_model(model, tmp_path / "ar.pt")
    back = load_model(tmp_path / "ar.pt")
    assert back.config.counts == (8, 16, 32, 64, 128) and back.layout == model.layout
    a = model.generate(torch.tensor([1, 2]), generator=torch.Generator().manual_seed(0))
    b = back.generate(torch.tensor([1, 2]), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
