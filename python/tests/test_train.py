"""trove.torch.Int4SR: SPEC §7 on the experts a step touched, against plain torch on the
unquantized layer, gradient accumulation, checkpoints as store generations, state dicts."""
import gc
import pytest
import torch

import reference
import trove
import trove.torch as tt
from trove.background import BackgroundPeer

D, N, H, K, DK = 32, 64, 2, 3, 4


def make(tmp_path, name="s.trove", seed=7):
    torch.manual_seed(seed)
    m = BackgroundPeer(dim=D, num_experts=N, heads=H, topk=K, dim_key=DK)
    with torch.no_grad():
        m.keys.normal_(0, 1.0)
        m.expert_down.weight.normal_(0, 1.0)
        m.expert_up.weight.normal_(0, 1.0)
    return tt.PEER.from_module(m, tmp_path / name, quant="int4")


def rows(peer, ids=None):
    ids = torch.arange(N) if ids is None else ids
    down, up = torch.empty(len(ids), D), torch.empty(len(ids), D)
    peer._entry.core.training_rows(ids, down, up)
    return down, up


def lsb(w):
    """One 8-bit training LSB, d/16, per element: d = (largest magnitude of its group of 32)/8
    (SPEC §3's Q4_0 rule, the scale stays put while nothing saturates)."""
    g = w.reshape(w.shape[0], -1, 32).abs().amax(-1, keepdim=True) / 8 / 16
    return g.expand(-1, -1, 32).reshape(w.shape)


def test_one_step_equals_sgd_on_the_unquantized_layer(tmp_path):
    peer = make(tmp_path)
    opt = tt.Int4SR(peer, lr=1e-3, optimizer="sgd")
    down0, up0 = rows(peer)
    # The same layer in plain torch: the int4 tables dequantized, the same router.
    qw, keys = peer.query_weight.detach(), peer.keys.detach()
    down = down0.clone().requires_grad_()
    up = up0.clone().requires_grad_()
    x = torch.randn(40, D)
    dy = torch.randn(40, D)
    y_ref, _, margin = reference.peer(peer.config, x, qw, None, keys, None, down, up)
    assert margin.min() > 1e-4
    y = peer(x)
    assert (y - y_ref).norm() / y_ref.norm() < 1e-5
    (y * dy).sum().backward()
    (y_ref * dy).sum().backward()

    opt.step()
    down1, up1 = rows(peer)
    for w0, w1, g in [(down0, down1, down.grad), (up0, up1, up.grad)]:
        touched = g.abs().sum(-1) > 0
        assert touched.sum() > 0 and (~touched).sum() > 0
        assert torch.equal(w1[~touched], w0[~touched])
        # Stochastic rounding lands on one of the two codes around the exact SGD value; a value
        # past the codes' range [-128, 127] (Q4_0 puts each group's largest weight on its edge)
        # is clamped there (saturation tolerance 64, no rescale at this rate).
        step = lsb(w0)
        want = torch.maximum(torch.minimum(w0 - 1e-3 * g, 128 * step), -128 * step)
        assert ((w1 - want).abs() <= step * 1.0001).all()
        assert (w1[touched] != w0[touched]).any()
    assert opt.last_stats[0]["experts"] == int((down.grad.abs().sum(-1) > 0).sum())
    assert opt.last_stats[0]["rescales"] == 0


def test_micro_batches_accumulate_like_one_batch(tmp_path):
    a, b = make(tmp_path, "a.trove"), make(tmp_path, "b.trove")
    oa, ob = tt.Int4SR(a, lr=1e-2), tt.Int4SR(b, lr=1e-2)
    x = torch.randn(64, D)
    a(x).square().sum().backward()
    for part in x.split(16):
        b(part).square().sum().backward()
    assert a._entry.core.pending_experts() == b._entry.core.pending_experts() > 0
    oa.step()
    ob.step()
    (da, ua), (db, ub) = rows(a), rows(b)
    # Sums in another order may move a stochastic rounding by one code, no more.
    assert ((da - db).abs() <= lsb(da) * 1.0001).all() and ((ua - ub).abs() <= lsb(ua) * 1.0001).all()
    assert (da != db).float().mean() < 0.01
    oa.zero_grad()
    assert a._entry.core.pending_experts() == 0


def test_checkpoints_are_generations_and_reopen_as_trained(tmp_path):
    peer = make(tmp_path)
    opt = tt.Int4SR(peer, lr=1e-2)
    router_opt = torch.optim.Adam(peer.router_parameters(), lr=1e-2)
    x = torch.randn(32, D)
    for _ in range(2):
        peer(x).square().mean().backward()
        opt.step()
        router_opt.step()
        opt.zero_grad()
        router_opt.zero_grad()
    first = peer.checkpoint()
    assert first["whole_rewrite"] and first["step"] == 2 and first["records"] > 0
    assert "peer.train" in trove.store_layers(tmp_path / "s.trove")
    with torch.no_grad():
        y = peer(x)
        reopened = tt.PEER.open(tmp_path / "s.trove", layer="peer")
        assert torch.equal(reopened(x), y)  # tables and router as trained

    peer(x).square().mean().backward()
    opt.step()
    second = peer.checkpoint()
    assert not second["whole_rewrite"] and second["step"] == 3
    with torch.no_grad():
        again = tt.PEER.open(tmp_path / "s.trove", layer="peer")
        assert torch.equal(again(x), peer(x))

    # State dicts: the router and the store's step; the optimizer's step must match its store.
    state, ostate = peer.state_dict(), opt.state_dict()
    assert state["_extra_state"]["step"] == 3 and ostate["steps"] == [3]
    with torch.no_grad():
        y = peer(x)
    # One writer per store: a second trainer is refused while the first lives, then allowed.
    with pytest.raises(RuntimeError, match="busy"):
        tt.Int4SR(tt.PEER.open(tmp_path / "s.trove", layer="peer"), lr=1.0)
    del opt, router_opt, peer
    gc.collect()
    fresh = tt.PEER.open(tmp_path / "s.trove", layer="peer")
    with torch.no_grad():
        fresh.query_weight.zero_()
    fresh.load_state_dict(state)
    fresh_opt = tt.Int4SR(fresh, lr=1.0)
    fresh_opt.load_state_dict(ostate)
    assert fresh_opt.lr == 1e-2
    with torch.no_grad():
        assert torch.equal(fresh(x), y)
    ostate["steps"] = [5]
    with pytest.raises(ValueError, match="steps"):
        fresh_opt.load_state_dict(ostate)


def test_int4sr_refuses_tables_that_are_not_int4(tmp_path):
    torch.manual_seed(1)
    peer = tt.PEER.from_module(BackgroundPeer(dim=D, num_experts=N, heads=H, topk=K, dim_key=DK),
                               tmp_path / "f.trove", quant="f32")
    with pytest.raises(ValueError, match="int4"):
        tt.Int4SR(peer)
    with pytest.raises(ValueError, match="checkpoint"):
        peer.checkpoint()
