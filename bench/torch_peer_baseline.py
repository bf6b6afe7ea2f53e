#!/usr/bin/env python3
"""What a user runs instead of trove: the background's PEER forward in plain PyTorch.

The background repository's LlamaPEER (SPEC §2, layout `mikeybeez`): queries, product-key
sub-scores, top-k per half, the k'^2 merge, a relu gate, then nn.Embedding gathers of the
down and up rows and einsums, silu activation, all in bf16 on one device. This script times
its forward over one batch of gaussian tokens with CUDA events (the mean of --iters after
--warmup) and prints one JSON object per expert count, so that a GPU session can put the
figure beside `trove bench --device cuda` in the same run:

  python3 bench/torch_peer_baseline.py --experts 262144,1048576 --batch 2048 > torch.json
"""
import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F


class BackgroundPeer(torch.nn.Module):
    """The background's PEER layer, forward only (down/up as embeddings, shared by heads)."""

    def __init__(self, dim, experts, heads, topk, dim_key):
        super().__init__()
        self.heads, self.topk, self.dim_key = heads, topk, dim_key
        self.n_keys = math.isqrt(experts)
        assert self.n_keys * self.n_keys == experts, f"--experts {experts} is not a square"
        self.to_queries = torch.nn.Linear(dim, heads * 2 * dim_key, bias=False)
        self.keys = torch.nn.Parameter(torch.randn(heads, self.n_keys, 2, dim_key) * 0.02)
        self.expert_down = torch.nn.Embedding(experts, dim)
        self.expert_up = torch.nn.Embedding(experts, dim)
        torch.nn.init.normal_(self.expert_down.weight, std=0.02)
        torch.nn.init.normal_(self.expert_up.weight, std=0.02)

    def forward(self, x):  # x [T, D]
        t = x.shape[0]
        q = self.to_queries(x).view(t, self.heads, 2, self.dim_key)
        sim = torch.einsum("thpd,hnpd->thpn", q, self.keys)  # [T, h, 2, n]
        s0, i0 = sim[:, :, 0].topk(self.topk, dim=-1)
        s1, i1 = sim[:, :, 1].topk(self.topk, dim=-1)
        scores = (s0.unsqueeze(-1) + s1.unsqueeze(-2)).flatten(-2)  # [T, h, k*k]
        ids = (i0.unsqueeze(-1) * self.n_keys + i1.unsqueeze(-2)).flatten(-2)
        scores, pick = scores.topk(self.topk, dim=-1)
        ids = ids.gather(-1, pick)  # [T, h, k]
        down = self.expert_down(ids)  # [T, h, k, D]
        up = self.expert_up(ids)
        hidden = F.silu(torch.einsum("td,thkd->thk", x, down)) * F.relu(scores)
        return torch.einsum("thk,thkd->td", hidden, up)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--experts", default="262144,1048576", help="comma-separated square counts")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--dim-key", type=int, default=64)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("torch_peer_baseline: no CUDA device (this baseline times the GPU module)")
    torch.manual_seed(1)
    for experts in (int(e) for e in a.experts.split(",")):
        with torch.device("cuda"):  # built on the device: a CPU init of 2 x N x D takes minutes
            layer = BackgroundPeer(a.dim, experts, a.heads, a.topk, a.dim_key).bfloat16()
        x = torch.randn(a.batch, a.dim, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            for _ in range(a.warmup):
                layer(x)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(a.iters):
                layer(x)
            end.record()
            torch.cuda.synchronize()
        ms = start.elapsed_time(end) / a.iters
        print(json.dumps({"system": "torch bf16 gather+einsum (background LlamaPEER forward)",
                          "torch": torch.__version__, "device": torch.cuda.get_device_name(),
                          "experts": experts, "batch": a.batch, "dim": a.dim, "heads": a.heads,
                          "topk": a.topk, "dim_key": a.dim_key, "ms_per_batch": ms,
                          "tokens_per_second": a.batch / ms * 1e3}), flush=True)
        del layer
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
