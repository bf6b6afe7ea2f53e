"""The background repository's PEER layer (SPEC §2, layout `mikeybeez`) in plain PyTorch.

What a user runs instead of trove: queries from one Linear whose rows are (head, half, dk),
product-key sub-scores against keys [h, n, 2, dk], top-k' per half, the k'^2 merge and the
final top-k per head, a relu gate, then nn.Embedding gathers of the down and up rows and
einsums with a silu activation. One expert table is shared by the heads. It is the reference
`trove.torch.PEER.from_module` packs and equals, and the peer of the end-to-end benchmark.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


class BackgroundPeer(nn.Module):
    """PEER as the background's LlamaPEER computes it; x [..., D] -> y [..., D]."""

    def __init__(self, dim, num_experts, heads=4, topk=8, dim_key=64, topk_per_half=None):
        super().__init__()
        n_keys = math.isqrt(num_experts)
        if n_keys * n_keys != num_experts:
            raise ValueError(f"num_experts {num_experts} is not a square (N = n_keys^2)")
        self.dim, self.heads, self.topk, self.dim_key = dim, heads, topk, dim_key
        self.topk_per_half = topk if topk_per_half is None else topk_per_half
        self.n_keys = n_keys
        self.to_queries = nn.Linear(dim, heads * 2 * dim_key, bias=False)
        self.keys = nn.Parameter(torch.randn(heads, n_keys, 2, dim_key) * 0.02)
        self.expert_down = nn.Embedding(num_experts, dim)
        self.expert_up = nn.Embedding(num_experts, dim)
        nn.init.normal_(self.expert_down.weight, std=0.02)
        nn.init.normal_(self.expert_up.weight, std=0.02)

    def route(self, x):
        """(ids, scores) [T, h, k] for x [T, D], best first per head."""
        t = x.shape[0]
        q = self.to_queries(x).view(t, self.heads, 2, self.dim_key)
        sim = torch.einsum("thpd,hnpd->thpn", q, self.keys)  # [T, h, 2, n]
        s0, i0 = sim[:, :, 0].topk(self.topk_per_half, dim=-1)
        s1, i1 = sim[:, :, 1].topk(self.topk_per_half, dim=-1)
        scores = (s0.unsqueeze(-1) + s1.unsqueeze(-2)).flatten(-2)  # [T, h, k'^2]
        ids = (i0.unsqueeze(-1) * self.n_keys + i1.unsqueeze(-2)).flatten(-2)
        scores, pick = scores.topk(self.topk, dim=-1)
        return ids.gather(-1, pick), scores

    def forward(self, x):
        lead = x.shape[:-1]
        x = x.reshape(-1, self.dim)
        ids, scores = self.route(x)
        down = self.expert_down(ids)  # [T, h, k, D]
        up = self.expert_up(ids)
        hidden = F.silu(torch.einsum("td,thkd->thk", x, down)) * F.relu(scores)
        return torch.einsum("thk,thkd->td", hidden, up).reshape(*lead, -1)
