#!/usr/bin/env python3
"""trove on the CPU against the background's PyTorch module, same weights, same tokens, one run.

The background's PEER layer (bench/torch_peer_baseline.py's BackgroundPeer: layout mikeybeez,
silu, relu gate) is built with seeded weights rounded once to bf16, so that every system below
computes with the same values. The script then
  1. times the PyTorch module's forward on the CPU in fp32 and in bf16 (torch's default threads,
     no_grad, best of --repeats after one warm-up pass);
  2. writes the weights as a mikeybeez safetensors checkpoint, packs it with `trove pack` into a
     store per record dtype (f32, bf16, int4 by default) and runs build/bench/peer_cpu_bench on
     each: the best forward pass and its stages, ExpertDot float and int8, each with fp32, bf16
     and int8 routing (RoutingPrecision), y's error against
     trove's oracle, and two ceilings measured in the same process: the streaming read
     bandwidth and the rate of reading the same number of whole records at random from a table
     of the layer's size (the expert stage's reads with nothing computed);
  3. checks that trove's f32 y is the PyTorch fp32 module's y (relative Frobenius error), and
     prints a markdown table and the goals of issue 14 beside the measured ratios.

  .venv/bin/python bench/cpu_vs_torch.py --experts 262144 --dim 2048
  .venv/bin/python bench/cpu_vs_torch.py --experts 1048576 --dim 1024 --dtypes bf16,int4

Needs torch (CPU is enough) and a build with build/trove and build/bench/peer_cpu_bench.
Memory: the fp32 module holds 2 * N * D * 4 bytes, a store as much again for f32 records.
"""
import argparse
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_peer_baseline import BackgroundPeer  # noqa: E402


def write_safetensors(path, tensors):
    """A minimal safetensors writer (header JSON, then the raw little-endian tensors)."""
    names = {torch.float32: "F32", torch.bfloat16: "BF16"}
    header, offset, blobs = {}, 0, []
    for name, t in tensors.items():
        t = t.contiguous()
        raw = (t.view(torch.uint8) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def read_safetensors_f32(path, name):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        start, end = header[name]["data_offsets"]
        f.seek(8 + n + start)
        data = bytearray(f.read(end - start))
    return torch.frombuffer(data, dtype=torch.float32).view(header[name]["shape"])


def time_torch(layer, x, repeats):
    with torch.no_grad():
        y = layer(x)
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            y = layer(x)
            best = min(best, time.perf_counter() - start)
    return best, y


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--experts", type=int, default=262144)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--dim-key", type=int, default=64)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtypes", default="f32,bf16,int4", help="trove record dtypes to run")
    p.add_argument("--build", default=os.path.join(os.path.dirname(__file__), "..", "build"))
    p.add_argument("--workdir", default=None,
                   help="where the checkpoint and stores go, kept (default: a temp dir, removed)")
    p.add_argument("--json", default=None, help="also write every figure here")
    a = p.parse_args()
    if a.workdir:
        os.makedirs(a.workdir, exist_ok=True)
        result = run(a, a.workdir)
    else:  # the checkpoint is 2-4 GB at the configs: nothing is left behind
        with tempfile.TemporaryDirectory(prefix="cpu_vs_torch-") as work:
            result = run(a, work)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    print_table(result)


def run(a, work):
    """Times both systems on the same weights and tokens in `work`; returns every figure."""
    trove = os.path.join(a.build, "trove")
    bench = os.path.join(a.build, "bench", "peer_cpu_bench")

    torch.manual_seed(1)
    layer = BackgroundPeer(a.dim, a.experts, a.heads, a.topk, a.dim_key)
    with torch.no_grad():  # the shared weights: bf16 values, held by each system exactly
        for param in layer.parameters():
            param.copy_(param.bfloat16().float())
    x = torch.randn(a.tokens, a.dim)
    ckpt, x_path = os.path.join(work, "peer.safetensors"), os.path.join(work, "x.safetensors")
    write_safetensors(ckpt, {f"peer.{k}": v.bfloat16() if v.dim() > 1 and k != "keys" else v
                             for k, v in layer.state_dict().items()})
    write_safetensors(x_path, {"x": x})

    result = {"experts": a.experts, "dim": a.dim, "heads": a.heads, "topk": a.topk,
              "dim_key": a.dim_key, "tokens": a.tokens, "torch_threads": torch.get_num_threads(),
              "torch": {}, "trove": {}}
    seconds, y_torch = time_torch(layer, x, a.repeats)
    result["torch"]["fp32"] = {"seconds": seconds, "tokens_per_second": a.tokens / seconds}
    layer = layer.bfloat16()
    seconds, _ = time_torch(layer, x.bfloat16(), a.repeats)
    result["torch"]["bf16"] = {"seconds": seconds, "tokens_per_second": a.tokens / seconds}
    del layer

    quant = {"f32": "f32", "bf16": "bf16", "int4": "int4", "int8": "int8"}
    for dtype in a.dtypes.split(","):
        store = os.path.join(work, f"peer_{dtype}.trove")
        subprocess.run([trove, "pack", ckpt, "-o", store, "--layout", "mikeybeez",
                        "--prefix", "peer", "--quant", quant[dtype], "--topk", str(a.topk)],
                       check=True, stdout=subprocess.DEVNULL)
        y_path = os.path.join(work, f"y_{dtype}.safetensors")
        out = subprocess.run([bench, store, "peer", x_path, "--repeats", str(a.repeats),
                              "--y-out", y_path], check=True, capture_output=True, text=True)
        r = json.loads(out.stdout)
        y = read_safetensors_f32(y_path, "y")
        r["y_rel_fro_vs_torch_fp32"] = float((y - y_torch).norm() / y_torch.norm())
        result["trove"][dtype] = r
        os.remove(store)
    return result


MODE_LABELS = {"float": "", "int8": " (int8 dot)", "bf16_routing": " (bf16 routing)",
               "int8_bf16_routing": " (int8 dot, bf16 routing)",
               "int8_routing": " (int8 routing)",
               "int8_int8_routing": " (int8 dot, int8 routing)"}


def print_table(r):
    t = r["torch"]
    print(f"N = {r['experts']}, D = {r['dim']}, h = {r['heads']}, k = {r['topk']}, "
          f"dk = {r['dim_key']}, {r['tokens']} tokens; torch threads {r['torch_threads']}")
    print()
    print("| system | tokens/s | route ms | experts ms | route share | expert GB/s | "
          "of stream read | of random record read | y rel. err. vs oracle | vs torch fp32 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in ("fp32", "bf16"):
        print(f"| PyTorch {name} | {t[name]['tokens_per_second']:.0f} | | | | | | | | |")
    for dtype, v in r["trove"].items():
        bw = v["stream_read_bytes_per_second"]
        rec = v["record_read_bytes_per_second"]
        for mode, m in v["modes"].items():
            label = f"trove {dtype}" + MODE_LABELS[mode]
            print(f"| {label} | {m['tokens_per_second']:.0f} | {1e3 * m['route_seconds']:.1f} | "
                  f"{1e3 * m['expert_seconds']:.1f} | {m['route_share']:.2f} | "
                  f"{m['expert_bytes_per_second'] / 1e9:.2f} | "
                  f"{m['expert_bytes_per_second'] / bw:.2f} (of {bw / 1e9:.1f} GB/s) | "
                  f"{m['expert_bytes_per_second'] / rec:.2f} (of {rec / 1e9:.1f} GB/s) | "
                  f"{m['y_rel_fro_vs_oracle']:.2e} | "
                  f"{v['y_rel_fro_vs_torch_fp32']:.2e} |")
    print()
    print("bf16 and int8 routing (RoutingPrecision::kBf16, kInt8) against fp32 routing, same run:")
    print()
    print("| system | routing | route ms fp32 | route ms | route speed-up | "
          "selected experts kept | y rel. err. vs fp32 routing |")
    print("|---|---|---|---|---|---|---|")
    for dtype, v in r["trove"].items():
        f = v["modes"]["float"]
        for name in ("bf16", "int8"):
            b = v["modes"].get(f"{name}_routing")
            if b is None:
                continue
            print(f"| trove {dtype} | {name} | {1e3 * f['route_seconds']:.1f} | "
                  f"{1e3 * b['route_seconds']:.1f} | "
                  f"{f['route_seconds'] / b['route_seconds']:.2f} | "
                  f"{b['routing_agreement_vs_f32']:.4f} | {b['y_rel_fro_vs_f32_routing']:.2e} |")
    print()
    goals = []
    if "int4" in r["trove"]:
        m = r["trove"]["int4"]["modes"]
        best = max(m.values(), key=lambda v: v["tokens_per_second"])
        goals.append(("int4 routing share < 1/3, fastest mode", best["route_share"]))
        bw = r["trove"]["int4"]["stream_read_bytes_per_second"]
        goals.append(("int4 / PyTorch bf16 >= 2",
                      best["tokens_per_second"] / t["bf16"]["tokens_per_second"]))
        goals.append(("int4 routing share < 1/3", m["float"]["route_share"]))
        if "int8_routing" in m:
            goals.append(("int4 routing share < 1/3, int8 routing",
                          m["int8_routing"]["route_share"]))
        goals.append(("int4 expert stage / stream read >= 0.7",
                      m["float"]["expert_bytes_per_second"] / bw))
        rec = r["trove"]["int4"]["record_read_bytes_per_second"]
        goals.append(("(random record read / stream read: the stage's ceiling)", rec / bw))
    if "f32" in r["trove"]:
        f = r["trove"]["f32"]["modes"]["float"]
        goals.append(("f32 / PyTorch fp32 >= 1.5",
                      f["tokens_per_second"] / t["fp32"]["tokens_per_second"]))
    for name, value in goals:
        print(f"- {name}: {value:.2f}")


if __name__ == "__main__":
    main()
