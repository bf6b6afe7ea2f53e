"""Engram (issue 18): trove's reference BackgroundEngram against the background's hash rule,
written out element by element, and its module layout (the names from_module reads)."""
import math

import pytest
import torch
import torch.nn.functional as F

from trove.background import BackgroundEngram, engram_hash, engram_multipliers


def hash_one(tokens, b, t, n, head, mult, vocab):
    """The hash of one n-gram, one position at a time in Python ints."""
    h = int(tokens[b, t]) * int(mult[0])
    for i in range(1, n):
        prev = int(tokens[b, t - i]) if t - i >= 0 else 0
        h ^= prev * int(mult[i])
    return (h + head * 104729) % vocab


@pytest.mark.parametrize("layer_idx", [0, 1, 5, 30])
def test_multipliers_as_the_background_seeds_them(layer_idx):
    state = torch.get_rng_state()
    torch.manual_seed(10007 * (layer_idx + 1))
    want = torch.randint(1, 2**31 // 200000, (4,)) * 2 + 1
    torch.set_rng_state(state)
    got = engram_multipliers(layer_idx, 4)
    assert torch.equal(got, want)
    assert bool((got % 2 == 1).all())
    # The global generator is untouched.
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("max_ngram,heads,vocab,b,t", [(3, 8, 100000, 2, 9), (2, 1, 7, 1, 1),
                                                       (4, 3, 1009, 3, 5), (3, 2, 97, 1, 2)])
def test_hash_element_by_element(max_ngram, heads, vocab, b, t):
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 32000, (b, t), generator=g)
    mult = engram_multipliers(3, max_ngram)
    ids = engram_hash(tokens, mult, max_ngram, heads, vocab)
    assert ids.shape == ((max_ngram - 1) * heads, b, t)
    for n in range(2, max_ngram + 1):
        for head in range(heads):
            table = (n - 2) * heads + head
            for bb in range(b):
                for tt in range(t):
                    assert int(ids[table, bb, tt]) == hash_one(tokens, bb, tt, n, head, mult,
                                                               vocab)


def test_module_layout():
    m = BackgroundEngram(48, layer_idx=1, max_ngram=3, embed_dim_per_ngram=32, heads=4,
                         vocab=101, kernel_size=4)
    names = set(m.state_dict())
    want = {f"embeddings.{i}.weight" for i in range(8)}
    want |= {"value_proj.weight", "key_proj.weight", "norm_k.weight", "norm_q.weight",
             "conv.weight", "hash_mult"}
    assert names == want
    assert m.embeddings[0].weight.shape == (101, 8)
    assert m.value_proj.weight.shape == (48, 64)
    assert m.conv.weight.shape == (48, 1, 4)


def test_forward_matches_the_math_in_double():
    torch.manual_seed(0)
    d, e, heads, vocab = 24, 16, 2, 53
    m = BackgroundEngram(d, layer_idx=5, max_ngram=3, embed_dim_per_ngram=e, heads=heads,
                         vocab=vocab, kernel_size=3).double()
    torch.nn.init.normal_(m.conv.weight, std=0.3)
    x = torch.randn(2, 7, d, dtype=torch.double)
    tokens = torch.randint(0, 1000, (2, 7))
    y = m(x, tokens)
    # Plainly: rows per position, gate per position, conv as a sum over the window.
    rows = torch.zeros(2, 7, 2 * e, dtype=torch.double)
    for b in range(2):
        for t in range(7):
            parts = []
            for n in (2, 3):
                for head in range(heads):
                    r = hash_one(tokens, b, t, n, head, m.hash_mult, vocab)
                    parts.append(m.embeddings[(n - 2) * heads + head].weight[r])
            rows[b, t] = torch.cat(parts)
    key, value = rows @ m.key_proj.weight.t(), rows @ m.value_proj.weight.t()

    def rms(v, w):
        return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    g = (rms(key, m.norm_k.weight) * rms(x, m.norm_q.weight)).sum(-1, keepdim=True) / math.sqrt(d)
    g = torch.sign(g) * g.abs().clamp(1e-8, 100).sqrt()
    v = torch.sigmoid(g.clamp(-10, 10)) * value
    w = m.conv.weight[:, 0, :]  # [D, K]; tap K-1 is the current position
    conv = torch.zeros_like(v)
    for t in range(7):
        for j in range(3):
            s = t - (2 - j)
            if s >= 0:
                conv[:, t] += w[:, j] * v[:, s]
    want = v + F.silu(conv)
    assert torch.allclose(y, want, rtol=1e-12, atol=1e-12)
