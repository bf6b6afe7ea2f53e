"""The background repository's PEER and Engram layers (SPEC §2, layout `mikeybeez`) in PyTorch.

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


# The background's Engram hash: the multipliers' seed and range, and the per-head offset.
ENGRAM_SEED = 10007
ENGRAM_MULT_RANGE = 2**31 // 200000
ENGRAM_HEAD_PRIME = 104729


def engram_multipliers(layer_idx, max_ngram):
    """The odd hash multipliers [max_ngram] (int64) the background draws for layer `layer_idx`:
    randint(1, 2^31 // 200000) * 2 + 1 from a generator seeded 10007 * (layer_idx + 1). A
    private generator, so the global RNG is left as it was."""
    g = torch.Generator().manual_seed(ENGRAM_SEED * (layer_idx + 1))
    return (torch.randint(1, ENGRAM_MULT_RANGE, (max_ngram,), generator=g) * 2 + 1).long()


def engram_hash(tokens, mult, max_ngram, heads, vocab):
    """Row ids [(max_ngram - 1) * heads, B, T] of tokens [B, T]: for order n = 2..max_ngram,
    h = XOR over i < n of token[t - i] * mult[i] (token 0 before the start), then per head
    (h + head * 104729) mod vocab. Table (n - 2) * heads + head reads row [..., b, t]."""
    tokens = tokens.long()
    b, t = tokens.shape
    out = []
    for n in range(2, max_ngram + 1):
        h = tokens * mult[0]
        for i in range(1, n):
            shifted = torch.zeros_like(tokens)
            if i < t:
                shifted[:, i:] = tokens[:, :t - i]
            h = h ^ (shifted * mult[i])
        for head in range(heads):
            out.append(torch.remainder(h + head * ENGRAM_HEAD_PRIME, vocab))
    return torch.stack(out)


def engram_mix(m, x, rows):
    """Engram's dense part: y [B, T, D] from x [B, T, D] and the looked-up rows [B, T, E],
    through m's key_proj, value_proj, norm_k, norm_q and conv (ordinary torch layers)."""
    d = x.shape[-1]
    g = (m.norm_k(m.key_proj(rows)) * m.norm_q(x)).sum(-1, keepdim=True)
    g = g / math.sqrt(d)
    g = g.abs().clamp(min=1e-8, max=100.0).sqrt() * g.sign()
    value = torch.sigmoid(g.clamp(-10, 10)) * m.value_proj(rows)
    conv = m.conv(value.transpose(1, 2))[:, :, :x.shape[1]].transpose(1, 2)
    return value + F.silu(conv)


class BackgroundEngram(nn.Module):
    """Engram as the background's LlamaEngram computes it; (x [B, T, D], tokens [B, T]) ->
    y [B, T, D].

    Hashed n-gram rows from (max_ngram - 1) * heads tables of [vocab, e] (e =
    embed_dim_per_ngram / heads), concatenated to [B, T, E]; key = key_proj(E),
    gate = sigmoid(clamp(sign(g) sqrt(clamp(|g|, 1e-8, 100)), -10, 10)) with
    g = sum(rmsnorm_k(key) * rmsnorm_q(x)) / sqrt(D); value = gate * value_proj(E);
    y = value + silu(depthwise causal conv(value))."""

    def __init__(self, dim, layer_idx=0, max_ngram=3, embed_dim_per_ngram=256, heads=8,
                 vocab=100000, kernel_size=4):
        super().__init__()
        if max_ngram < 2:
            raise ValueError(f"max_ngram {max_ngram} must be >= 2 (orders 2..max_ngram)")
        if embed_dim_per_ngram % heads:
            raise ValueError(f"embed_dim_per_ngram {embed_dim_per_ngram} is not a multiple of "
                             f"heads {heads}")
        self.dim, self.layer_idx, self.max_ngram = dim, layer_idx, max_ngram
        self.heads, self.vocab, self.kernel_size = heads, vocab, kernel_size
        self.embed_per_head = embed_dim_per_ngram // heads
        orders = max_ngram - 1
        self.embeddings = nn.ModuleList(
            nn.Embedding(vocab, self.embed_per_head) for _ in range(orders * heads))
        total = orders * embed_dim_per_ngram
        self.value_proj = nn.Linear(total, dim, bias=False)
        self.key_proj = nn.Linear(total, dim, bias=False)
        self.norm_k = nn.RMSNorm(dim, eps=1e-5)
        self.norm_q = nn.RMSNorm(dim, eps=1e-5)
        self.conv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size - 1, groups=dim,
                              bias=False)
        nn.init.zeros_(self.conv.weight)
        nn.init.normal_(self.value_proj.weight, std=0.01)
        nn.init.normal_(self.key_proj.weight, std=0.01)
        for emb in self.embeddings:
            nn.init.normal_(emb.weight, std=0.02)
        self.register_buffer("hash_mult", engram_multipliers(layer_idx, max_ngram))

    def hash(self, tokens):
        return engram_hash(tokens, self.hash_mult, self.max_ngram, self.heads, self.vocab)

    def lookup(self, tokens):
        """The concatenated rows [B, T, E] of tokens [B, T]."""
        ids = self.hash(tokens)
        return torch.cat([emb(ids[i]) for i, emb in enumerate(self.embeddings)], dim=-1)

    def mix(self, x, rows):
        return engram_mix(self, x, rows)

    def forward(self, x, tokens):
        return self.mix(x, self.lookup(tokens))
