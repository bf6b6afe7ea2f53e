"""Engram (issue 18): trove's reference BackgroundEngram against the background's hash rule,
written out element by element, and its module layout (the names from_module reads)."""
import json
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


# ---- trove.torch.Engram against BackgroundEngram ----------------------------------------------

import trove.torch as tt  # noqa: E402
from trove import _core  # noqa: E402
from trove.background import BackgroundPeer, engram_mix  # noqa: E402


def background(seed=0, dim=48, layer_idx=1, max_ngram=3, e=32, heads=4, vocab=1009, k=4):
    torch.manual_seed(seed)
    m = BackgroundEngram(dim, layer_idx=layer_idx, max_ngram=max_ngram, embed_dim_per_ngram=e,
                         heads=heads, vocab=vocab, kernel_size=k)
    with torch.no_grad():
        torch.nn.init.normal_(m.conv.weight, std=0.3)  # the background zero-inits it
        m.norm_k.weight.uniform_(0.5, 1.5)
        m.norm_q.weight.uniform_(0.5, 1.5)
        m.value_proj.weight.normal_(0, 0.2)
        m.key_proj.weight.normal_(0, 0.2)
        for emb in m.embeddings:
            emb.weight.normal_(0, 1.0)
    return m


def rel_err(a, b):
    return float(((a - b).norm() / b.norm()).detach())


@pytest.mark.parametrize("host", [None, "320KiB"])
@pytest.mark.parametrize("shape", [dict(), dict(max_ngram=4, e=24, heads=3, vocab=997, k=3),
                                   dict(max_ngram=2, e=8, heads=1, vocab=5, k=1, dim=7)])
def test_from_module_is_lossless_at_f32(tmp_path, host, shape):
    m = background(**shape)
    eng = tt.Engram.from_module(m, tmp_path / "e.trove", quant="f32", host=host)
    tokens = torch.randint(0, 32000, (3, 17))
    assert torch.equal(eng.hash(tokens), m.hash(tokens))
    assert torch.equal(eng.hash_mult, m.hash_mult)
    x = torch.randn(3, 17, m.dim)
    with torch.no_grad():
        want = m(x, tokens)
        got = eng(x, tokens)
        assert torch.equal(eng.lookup(tokens), m.lookup(tokens))
    assert rel_err(got, want) <= 1e-5
    if host is not None:
        assert eng.last_stats["misses"] + eng.last_stats["hits"] > 0


def test_row_gradients_equal_torchs_dense_gradient_on_the_touched_rows(tmp_path):
    m = background(seed=2)
    eng = tt.Engram.from_module(m, tmp_path / "e.trove", quant="f32")
    tokens = torch.randint(0, 50, (2, 23))  # few tokens: rows repeat, so sums matter
    x = torch.randn(2, 23, m.dim, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    w = torch.randn(2, 23, m.dim)
    (m(x, tokens) * w).sum().backward()
    (eng(x2, tokens) * w).sum().backward()
    assert rel_err(x2.grad, x.grad) <= 1e-5
    for name in ("value_proj", "key_proj", "norm_k", "norm_q", "conv"):
        a = getattr(eng, name).weight.grad
        b = getattr(m, name).weight.grad
        assert rel_err(a, b) <= 1e-5, name
    assert len(eng.row_grads) == len(m.embeddings)
    for k, emb in enumerate(m.embeddings):
        ids, grads = eng.row_grads[k]
        dense = emb.weight.grad
        touched = torch.nonzero(dense.abs().sum(-1)).flatten()
        assert torch.equal(ids, torch.unique(m.hash(tokens)[k]))
        assert set(touched.tolist()) <= set(ids.tolist())
        assert torch.allclose(grads, dense[ids], rtol=1e-5, atol=1e-6)


def test_gradcheck_of_the_dense_parts(tmp_path):
    m = background(seed=3, dim=6, e=4, heads=2, vocab=31, k=3)
    eng = tt.Engram.from_module(m, tmp_path / "e.trove", quant="f32")
    tokens = torch.randint(0, 100, (2, 5))
    rows = eng.lookup(tokens).detach().double().requires_grad_(True)
    x = torch.randn(2, 5, 6, dtype=torch.double, requires_grad=True)
    eng_d = eng.double()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in eng_d.named_parameters()}
    names = list(params)

    def f(x, rows, *ps):
        return torch.func.functional_call(_Mix(eng_d), dict(zip(names, ps)), (x, rows))

    assert torch.autograd.gradcheck(f, (x, rows, *params.values()), eps=1e-6, atol=1e-5)


class _Mix(torch.nn.Module):
    """engram_mix over an Engram's dense layers, as a module functional_call can rebind."""

    def __init__(self, eng):
        super().__init__()
        for n in ("value_proj", "key_proj", "norm_k", "norm_q", "conv"):
            setattr(self, n, getattr(eng, n))

    def forward(self, x, rows):
        return engram_mix(self, x, rows)


def test_prefetch_then_forward(tmp_path):
    m = background(seed=4, vocab=20011)  # int4 table 2.8 MB, over the host tier
    eng = tt.Engram.from_module(m, tmp_path / "e.trove", quant="int4", host="512KiB")
    tokens = torch.randint(0, 32000, (2, 31))
    x = torch.randn(2, 31, m.dim)
    with torch.no_grad():
        plain = eng(x, tokens)
        assert eng.last_stats["prefetched"] is False
        tt.prefetch_engram(torch.nn.Sequential(eng), tokens)
        again = eng(x, tokens)
        assert eng.last_stats["prefetched"] is True
        assert torch.equal(plain, again)
        # A prefetch of other tokens is dropped, not used.
        eng.prefetch(torch.randint(0, 32000, (2, 31)))
        third = eng(x, tokens)
        assert eng.last_stats["prefetched"] is False
        assert torch.equal(plain, third)
        # int4 rows: close to the module, not equal.
        assert 0 < rel_err(eng.lookup(tokens), m.lookup(tokens)) < 0.2


def test_prefetch_next_reads_the_next_batch_after_this_lookup(tmp_path):
    m = background(seed=6, vocab=20011)
    eng = tt.Engram.from_module(m, tmp_path / "e.trove", quant="int4", host="512KiB")
    batches = [torch.randint(0, 32000, (2, 29)) for _ in range(3)]
    x = torch.randn(2, 29, m.dim)
    with torch.no_grad():
        plain = [eng(x, b) for b in batches]
        # Batch 0 with batch 1 queued: batch 1's rows are on their way once batch 0 looked up.
        tt.prefetch_engram(torch.nn.Sequential(eng), batches[0], batches[1])
        assert eng._pending is not None and eng._next is not None
        y0 = eng(x, batches[0])
        assert eng.last_stats["prefetched"] is True
        assert eng._next is None and torch.equal(eng._pending[0], batches[1])
        # The next batch's own prefetch finds its reads on the way and keeps them.
        tt.prefetch_engram(torch.nn.Sequential(eng), batches[1], batches[2])
        y1 = eng(x, batches[1])
        assert eng.last_stats["prefetched"] is True
        y2 = eng(x, batches[2])
        assert eng.last_stats["prefetched"] is True
        for got, want in zip((y0, y1, y2), plain):
            assert torch.equal(got, want)
        # Nothing pending: prefetch_next starts at once.
        eng.prefetch_next(batches[0])
        assert eng._pending is not None and eng._next is None


def test_pack_engram_beside_peer_and_bad_input(tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(5)
    peer = BackgroundPeer(48, 64, heads=2, topk=4, dim_key=16)
    eng = background(seed=5)
    state = {f"model.layers.19.mlp.peer.{k}": v for k, v in peer.state_dict().items()}
    state.update({f"model.layers.1.engram.{k}": v for k, v in eng.state_dict().items()})
    ckpt = tmp_path / "model.safetensors"
    save_file(state, str(ckpt))
    out = tmp_path / "model.trove"
    report = json.loads(_core.pack([str(ckpt)], str(out), "mikeybeez",
                                   ["model.layers.19.mlp.peer"], [], "int4", "{}",
                                   engram_prefixes=["model.layers.1.engram"]))
    assert [l["name"] for l in report["engram_layers"]] == ["model.layers.1.engram"]
    assert report["engram_layers"][0]["tables"] == 8
    assert _core.store_layers(str(out)) == ["model.layers.19.mlp.peer", "model.layers.1.engram"]
    e = tt.Engram.open(out, "model.layers.1.engram")
    assert e.config["layer_idx"] == 1 and e.config["dtype"] == "int4"
    p = tt.PEER.open(out, layer="model.layers.19.mlp.peer")
    assert p(torch.randn(3, 48)).shape == (3, 48)
    # An Engram layer is not a PEER layer, and says so.
    with pytest.raises(RuntimeError, match="Engram"):
        tt.PEER.open(out, layer="model.layers.1.engram")
    # Engram layers come only from the mikeybeez layout; a missing tensor is named.
    with pytest.raises(ValueError, match="mikeybeez"):
        _core.pack([str(ckpt)], str(tmp_path / "x.trove"), "trove", [], [], "int4", "{}",
                   engram_prefixes=["model.layers.1.engram"])
    with pytest.raises(KeyError, match="hash_mult"):
        _core.pack([str(ckpt)], str(tmp_path / "x.trove"), "mikeybeez", [], [], "int4", "{}",
                   engram_prefixes=["model.layers.19.mlp.peer"])
    assert not (tmp_path / "x.trove").exists()


def test_int4_training_lowers_the_loss_and_checkpoints(tmp_path):
    m = background(seed=6, dim=32, e=32, heads=2, vocab=211)
    path = tmp_path / "e.trove"
    eng = tt.Engram.from_module(m, path, quant="int4")
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 1000, (2, 20), generator=gen)
    before = eng.lookup(tokens).detach().clone()
    opt = tt.EngramInt4SR(eng, lr=0.05, seed=1)
    dense_opt = torch.optim.SGD(eng.parameters(), lr=0.0)  # the rows alone learn here
    x = torch.randn(2, 20, 32, generator=gen)
    target = torch.randn(2, 20, 32, generator=gen)
    losses = []
    for _ in range(25):
        loss = ((eng(x, tokens) - target) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        dense_opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * losses[0], losses
    assert opt.last_stats[0]["elements_changed"] > 0 and opt.last_stats[0]["step"] == 25
    trained = eng.lookup(tokens).detach().clone()
    generation = eng.checkpoint()
    assert generation == 1  # the first checkpoint rewrites the store with the state layer
    # A fresh reader sees the checkpoint's int4 rows: the training view rounded to int4.
    again = tt.Engram.open(path, "engram")
    stored = again.lookup(tokens)
    # (int4 keeps ~1/16 of the training view's resolution: a few percent apart.)
    assert rel_err(stored, trained) < 0.2
    assert rel_err(stored, trained) < rel_err(stored, before)
    with pytest.raises(ValueError, match="int4"):
        tt.EngramInt4SR(tt.Engram.from_module(m, tmp_path / "f.trove", quant="f32"))
