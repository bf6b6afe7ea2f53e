"""SPEC §2's PEER layer written plainly in torch (any dtype, differentiable): the oracle the
tests hold trove.torch.PEER to, on trove's canonical tensors."""
import torch
import torch.nn.functional as F


def rms_norm(x, gamma, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gamma


def route(config, xhat, qw, qb, keys):
    """(ids, scores) [T, h, k] and the per-half margins that decide them (for near-ties)."""
    h, dk, n = config["heads"], config["dim_key"], config["n_keys"]
    k, kp = config["topk"], config["topk_per_half"]
    q = xhat @ qw.t()
    if qb is not None:
        q = q + qb
    q = q.view(-1, h, 2, dk)
    kk = keys.expand(h, -1, -1, -1) if keys.shape[0] == 1 else keys  # [h, 2, n, dk]
    sub = torch.einsum("thcd,hcnd->thcn", q, kk)  # [T, h, 2, n]
    s0, i0 = sub[:, :, 0].topk(kp, dim=-1)
    s1, i1 = sub[:, :, 1].topk(kp, dim=-1)
    cand = (s0.unsqueeze(-1) + s1.unsqueeze(-2)).flatten(-2)
    cand_ids = (i0.unsqueeze(-1) * n + i1.unsqueeze(-2)).flatten(-2)
    order = cand.topk(min(k + 1, cand.shape[-1]), dim=-1)
    scores, pick = order.values[..., :k], order.indices[..., :k]
    ids = cand_ids.gather(-1, pick)
    # How close each head's selection came to changing: the smallest gap between consecutive
    # candidates around the cut, and between the k'-th and (k'+1)-th sub-scores of each half.
    gaps = [order.values[..., :-1] - order.values[..., 1:]] if order.values.shape[-1] > 1 else []
    for c in range(2):
        if kp < n:
            top = sub[:, :, c].topk(kp + 1, dim=-1).values
            gaps.append(top[..., :-1] - top[..., 1:])
    margin = torch.cat(gaps, -1).amin(-1) if gaps else torch.full(ids.shape[:2], float("inf"))
    return ids, scores, margin


def activation(name, z):
    return {"relu": F.relu, "silu": F.silu, "gelu": F.gelu,
            "gelu_tanh": lambda v: F.gelu(v, approximate="tanh")}[name](z)


def gate(name, scores):
    return {"softmax": lambda s: s.softmax(-1), "relu": F.relu, "sigmoid": torch.sigmoid}[name](
        scores)


def peer(config, x, qw, qb, keys, norm, down, up):
    """y [T, D_out] and (ids, margin) for x [T, D]; down [N, D], up [N, D_out]."""
    xhat = rms_norm(x, norm, config["norm_eps"]) if config["input_norm"] == "rms" else x
    ids, scores, margin = route(config, xhat, qw, qb, keys)
    u, v = down[ids], up[ids]  # [T, h, k, D]
    a = activation(config["activation"], torch.einsum("td,thkd->thk", xhat, u))
    y = torch.einsum("thk,thkd->td", a * gate(config["gate"], scores), v)
    return y, ids, margin
