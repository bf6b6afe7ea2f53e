"""trove.torch.PEER against PEER-pytorch (PyPI), the background's module and SPEC §2's math.

Stores are packed with quant="f32" (lossless), so every difference is arithmetic: trove runs
fp32 kernels, the references run in double. Routing compares ids exactly except for heads
whose selection sits within `TIE` of changing (a near-tie that fp32 may order either way).
"""
import pytest
import torch
from PEER_pytorch import PEER as LucidrainsPEER
from torch import nn

import reference
import trove.torch as tt
from trove.background import BackgroundPeer

TIE = 1e-4  # score gap below which fp32 and double may pick different experts


def canonical(peer):
    return [None if p is None else p.detach().double()
            for p in (peer.query_weight, peer.query_bias, peer.keys, peer.norm_weight)]


def check_equal(peer, ref_y, ref_ids, margin, x):
    """y within 1e-5 relative (Frobenius) and ids identical on every head not near a tie."""
    ids, _ = peer.routing(x)
    y = peer(x).double()
    far = margin > TIE  # [T, h]
    assert far.float().mean() > 0.9, "the test's data has too many near-ties to say anything"
    assert torch.equal(ids[far], ref_ids[far])
    tokens = far.all(-1)
    err = (y[tokens] - ref_y[tokens]).norm() / ref_y[tokens].norm()
    assert err <= 1e-5, f"relative error {err:.3g}"
    assert ref_y[tokens].norm() > 0


def lucidrains_module(non_competing, seed):
    torch.manual_seed(seed)
    m = LucidrainsPEER(dim=48, heads=3, num_experts=256, num_experts_per_head=16, dim_key=8,
                       pre_rmsnorm=True, non_competing_scores=non_competing)
    with torch.no_grad():  # scores of order 1 so that relu gates are not mostly zero
        m.keys.normal_(0, 1.0)
        m.norm.gamma.normal_(0, 0.3)
    return m.eval()


@pytest.mark.parametrize("non_competing", [True, False], ids=["default-relu-top1", "softmax"])
def test_from_lucidrains_module_equals_it(tmp_path, non_competing):
    m = lucidrains_module(non_competing, seed=1)
    peer = tt.PEER.from_module(m, tmp_path / "l.trove", quant="f32")
    c = peer.config
    assert (c["gate"], c["topk"], c["topk_per_half"], c["activation"], c["input_norm"]) == (
        ("relu", 1, 16, "gelu", "rms") if non_competing else ("softmax", 16, 16, "gelu", "rms"))
    x = torch.randn(2, 100, 48)
    with torch.no_grad():
        ref_y = m.double()(x.double()).reshape(-1, 48)
    # The module's own ids, by its own tensors, through the SPEC math in double.
    _, ref_ids, margin = reference.peer(c, x.reshape(-1, 48).double(), *canonical(peer),
                                        m.weight_down_embed.weight.double(),
                                        m.weight_up_embed.weight.double())
    check_equal(peer, ref_y, ref_ids, margin, x.reshape(-1, 48))


def test_from_background_module_equals_it(tmp_path):
    torch.manual_seed(2)
    m = BackgroundPeer(dim=40, num_experts=144, heads=2, topk=4, dim_key=6)
    with torch.no_grad():
        m.keys.normal_(0, 1.0)
        m.expert_down.weight.normal_(0, 1.0)
    peer = tt.PEER.from_module(m, tmp_path / "b.trove", quant="f32")
    c = peer.config
    assert (c["gate"], c["activation"], c["topk"], c["topk_per_half"]) == ("relu", "silu", 4, 4)
    x = torch.randn(300, 40)
    with torch.no_grad():
        ref_y = m.double()(x.double())
    _, ref_ids, margin = reference.peer(c, x.double(), *canonical(peer),
                                        m.expert_down.weight.double(),
                                        m.expert_up.weight.double())
    check_equal(peer, ref_y, ref_ids, margin, x)


def test_any_leading_dims_and_half_dtypes(tmp_path):
    torch.manual_seed(3)
    peer = tt.PEER.from_module(BackgroundPeer(dim=32, num_experts=64, heads=2, topk=3,
                                              dim_key=4), tmp_path / "d.trove", quant="int8")
    x = torch.randn(2, 3, 5, 32)
    y = peer(x)
    assert y.shape == (2, 3, 5, 32) and y.dtype == torch.float32
    assert torch.equal(y.reshape(-1, 32), peer(x.reshape(-1, 32)))
    for dtype in (torch.bfloat16, torch.float16):
        xd = x.to(dtype)
        yd = peer(xd)
        assert yd.dtype == dtype and yd.shape == y.shape
        # The kernels see x rounded to the dtype, and the output is rounded to it once.
        assert torch.equal(yd, peer(xd.float()).to(dtype))
    assert peer(torch.empty(0, 32)).shape == (0, 32)
    stats = peer.last_stats
    assert stats["tokens"] == 0


def test_wrong_width_is_an_error_naming_d(tmp_path):
    peer = tt.PEER.from_module(BackgroundPeer(dim=32, num_experts=64, heads=1, topk=2,
                                              dim_key=4), tmp_path / "e.trove", quant="int4")
    with pytest.raises(ValueError, match="D = 32"):
        peer(torch.randn(4, 31))
    with pytest.raises(ValueError, match="non-finite|nan"):
        peer(torch.full((2, 32), float("nan")))


def test_unknown_module_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="not a PEER module"):
        tt.PEER.from_module(nn.Linear(4, 4), tmp_path / "x.trove")


def test_host_tier_gives_the_same_output_and_reports_hits(tmp_path):
    torch.manual_seed(4)
    m = BackgroundPeer(dim=64, num_experts=1024, heads=2, topk=4, dim_key=8)
    resident = tt.PEER.from_module(m, tmp_path / "h.trove", quant="int4")
    tiered = tt.PEER.open(tmp_path / "h.trove", host="200KiB")
    x = torch.randn(64, 64)
    assert torch.equal(resident(x), tiered(x))
    first = tiered.last_stats["host"]
    assert first["misses"] > 0 and first["bytes_read"] > 0
    tiered(x)
    assert tiered.last_stats["host"]["hits"] > 0


def test_lookahead_gives_the_batches_outputs_bit_for_bit_and_reads_ahead(tmp_path):
    torch.manual_seed(6)
    m = BackgroundPeer(dim=64, num_experts=1024, heads=2, topk=4, dim_key=8)
    resident = tt.PEER.from_module(m, tmp_path / "l.trove", quant="int4")
    x = torch.randn(100, 64)
    # The same batches of 16 tokens (the last short) without look-ahead.
    want = torch.cat([resident(x[i:i + 16]) for i in range(0, 100, 16)])
    want_ids = torch.cat([resident.routing(x[i:i + 16])[0] for i in range(0, 100, 16)])
    for depth in (1, 3):
        ahead = tt.PEER.open(tmp_path / "l.trove", host="200KiB", lookahead=depth, batch=16)
        assert torch.equal(ahead(x), want)
        host = ahead.last_stats["host"]
        assert ahead.last_stats["tokens"] == 100
        assert host["prefetched"] > 0
        assert host["hits"] >= host["prefetched"]
        assert torch.equal(ahead.routing(x)[0], want_ids)
    with pytest.raises(ValueError, match="lookahead"):
        tt.PEER.open(tmp_path / "l.trove", host="200KiB", lookahead=-1)


def test_routing_math_int8_keeps_most_experts_and_is_refused_for_training(tmp_path):
    torch.manual_seed(7)
    m = BackgroundPeer(dim=128, num_experts=4096, heads=2, topk=4, dim_key=16)
    f32 = tt.PEER.from_module(m, tmp_path / "r.trove", quant="int8")
    int8 = tt.PEER.open(tmp_path / "r.trove", routing_math="int8")
    x = torch.randn(200, 128)
    ids32, ids8 = f32.routing(x)[0], int8.routing(x)[0]
    assert not torch.equal(ids32, ids8)  # the products are quantized: some scores move
    kept = sum(len(set(a.tolist()) & set(b.tolist()))
               for a, b in zip(ids32.reshape(-1, 4), ids8.reshape(-1, 4)))
    assert kept > 0.8 * ids32.numel()
    assert torch.equal(int8(x), tt.PEER.open(tmp_path / "r.trove", routing_math="int8",
                                             threads=1)(x))
    with pytest.raises(ValueError, match="routing_math='fp8'"):
        tt.PEER.open(tmp_path / "r.trove", routing_math="fp8")
    with pytest.raises(ValueError, match="training"):
        tt.PEER.open(tmp_path / "r.trove", routing_math="int8")._enable_training()
    xg = x[:8].clone().requires_grad_(True)
    with pytest.raises(ValueError, match="backward through a layer opened with routing_math"):
        int8(xg).sum().backward()


# ---- gradients ------------------------------------------------------------------------------

def smooth_layer(tmp_path):
    """A layer whose every expert is selected (k = N), so the output is smooth in x and the
    router: softmax gate, gelu, rms-norm, a query bias via the trove layout."""
    torch.manual_seed(5)
    m = LucidrainsPEER(dim=12, heads=2, num_experts=9, num_experts_per_head=9, dim_key=3,
                       pre_rmsnorm=True, non_competing_scores=False, product_key_topk=3)
    with torch.no_grad():
        m.keys.normal_(0, 0.5)
        m.norm.gamma.normal_(0, 0.3)
    return tt.PEER.from_module(m, tmp_path / "g.trove", quant="f32")


def test_gradcheck_in_double_for_x_and_router(tmp_path):
    peer = smooth_layer(tmp_path)
    h = peer._handle
    x = torch.randn(5, 12, dtype=torch.double, requires_grad=True)
    qw, keys, norm = (p.detach().double().requires_grad_() for p in
                      (peer.query_weight, peer.keys, peer.norm_weight))

    def f(x, qw, keys, norm):
        return torch.ops.trove.peer_forward(x, h, qw, None, keys, norm)

    # The kernels are fp32: finite differences need a step well above fp32's resolution, and
    # tolerances at its scale (a wrong formula is off by O(1)).
    assert torch.autograd.gradcheck(f, (x, qw, keys, norm), eps=1e-3, atol=2e-3, rtol=2e-3)


def test_gradients_equal_autograd_of_the_reference(tmp_path):
    torch.manual_seed(6)
    m = lucidrains_module(non_competing=False, seed=6)
    peer = tt.PEER.from_module(m, tmp_path / "r.trove", quant="f32")
    x = torch.randn(80, 48, requires_grad=True)
    xr = x.detach().double().requires_grad_()
    params = [p.detach().double().requires_grad_() for p in
              (peer.query_weight, peer.keys, peer.norm_weight)]
    y, _, margin = reference.peer(peer.config, xr, params[0], None, params[1], params[2],
                                  m.weight_down_embed.weight.double(),
                                  m.weight_up_embed.weight.double())
    # Tokens near a tie may route differently in fp32: they get no gradient on either side.
    far = (margin > TIE).all(-1)
    assert far.float().mean() > 0.8
    dy = torch.randn(80, 48) * far.unsqueeze(-1)
    (peer(x) * dy).sum().backward()
    (y * dy.double()).sum().backward()
    for got, want in [(x.grad, xr.grad), (peer.query_weight.grad, params[0].grad),
                      (peer.keys.grad, params[1].grad), (peer.norm_weight.grad, params[2].grad)]:
        err = (got.double() - want).norm() / want.norm()
        assert err < 1e-5, f"relative error {err:.3g}"


def test_no_grad_and_torch_compile(tmp_path):
    peer = smooth_layer(tmp_path)
    x = torch.randn(3, 4, 12)
    with torch.no_grad():
        y = peer(x)
    assert not y.requires_grad
    compiled = torch.compile(peer, backend="aot_eager", fullgraph=True)
    xc = x.clone().requires_grad_()
    yc = compiled(xc)
    assert torch.allclose(yc, y)
    yc.sum().backward()
    xe = x.clone().requires_grad_()
    peer(xe).sum().backward()
    assert torch.allclose(xc.grad, xe.grad)
