#!/usr/bin/env python3
"""Cross-checks trove against code it shares nothing with.

Writes a mikeybeez-layout checkpoint with the Hugging Face `safetensors` library, packs it
with `trove pack` as int4, int8 and f32, unpacks it with `trove unpack`, loads the result with
`safetensors` again, and compares with an independent numpy implementation of SPEC §3
(group 32, fp16 scales, round half to even, ggml's Q4_0 scale rule). Everything must be bit
identical; the keys must come back transposed to [h, 2, n, dk].

Needs numpy and safetensors (pip); exits 77 (ctest's skip code) when they are missing.
Usage: numpy_cross_check.py PATH/TO/trove
"""
import os
import subprocess
import sys
import tempfile

try:
    import numpy as np
    from safetensors.numpy import load_file, save_file
except ImportError as e:  # optional dependencies
    print(f"skipped: {e}; pip install numpy safetensors to run this check")
    sys.exit(77)


def pad_groups(x):
    n = x.shape[-1]
    groups = -(-n // 32)
    xp = np.zeros(x.shape[:-1] + (groups * 32,), np.float32)
    xp[..., :n] = x
    return xp.reshape(x.shape[:-1] + (groups, 32)), n


def dequant(groups, scale, qmax, qmin, n):
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(scale[..., None] == 0, 0,
                     np.clip(np.rint(groups / scale[..., None]), qmin, qmax))
    y = (q.astype(np.float32) * scale[..., None]).reshape(groups.shape[:-2] + (-1,))
    return y[..., :n]


def int4_roundtrip(x):
    g, n = pad_groups(x)
    first_max = np.argmax(np.abs(g), axis=-1)  # the first element of largest magnitude
    m = np.take_along_axis(g, first_max[..., None], -1)[..., 0]
    scale = (m / np.float32(-8)).astype(np.float16).astype(np.float32)
    return dequant(g, scale, 7, -8, n)


def int8_roundtrip(x):
    g, n = pad_groups(x)
    scale = (np.abs(g).max(-1) / np.float32(127)).astype(np.float16).astype(np.float32)
    return dequant(g, scale, 127, -127, n)


def main():
    trove = sys.argv[1]
    rng = np.random.default_rng(0)
    h, n, dk, d, d_out = 4, 12, 8, 100, 70
    t = {
        "p.to_queries.weight": rng.standard_normal((h * 2 * dk, d)).astype(np.float32),
        "p.keys": rng.standard_normal((h, n, 2, dk)).astype(np.float32),
        "p.expert_down.weight": rng.standard_normal((n * n, d)).astype(np.float32),
        "p.expert_up.weight": (rng.standard_normal((n * n, d_out)) * 3).astype(np.float32),
    }
    t["p.expert_down.weight"][3, :32] = 0  # an all-zero group
    t["p.expert_up.weight"][5, 7] = 1e-9   # a tiny value beside large ones
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "hf.safetensors")
        save_file(t, src)
        for quant, oracle in [("int4", int4_roundtrip), ("int8", int8_roundtrip),
                              ("f32", lambda x: x)]:
            store = os.path.join(tmp, f"{quant}.trove")
            back = os.path.join(tmp, f"{quant}.safetensors")
            subprocess.run([trove, "pack", src, "-o", store, "--layout", "mikeybeez",
                            "--prefix", "p", "--quant", quant, "-q"], check=True)
            subprocess.run([trove, "unpack", store, "-o", back, "-q"], check=True)
            b = load_file(back)
            checks = {
                "down": np.array_equal(oracle(t["p.expert_down.weight"]), b["p.down"]),
                "up": np.array_equal(oracle(t["p.expert_up.weight"]), b["p.up"]),
                "keys": np.array_equal(t["p.keys"].transpose(0, 2, 1, 3), b["p.keys"]),
                "query": np.array_equal(t["p.to_queries.weight"], b["p.query.weight"]),
            }
            for name, ok in checks.items():
                print(f"{quant:5s} {name:6s} {'identical' if ok else 'DIFFERENT'}")
                failures += not ok
    print(f"{12 - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
