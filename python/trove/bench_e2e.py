"""End-to-end benchmark: whole-model tokens/s of a TinyLlama-shaped model with PEER on decoder
layers 19 and 21 (hidden + PEER(hidden)), forward and training step, for

  torch       the background's PEER in plain PyTorch (trove.background.BackgroundPeer:
              nn.Embedding gathers + einsums; tables trained by AdamW with the rest)
  trove       trove.torch.PEER over int4 stores, all resident (the store mapped)
  trove-host  the same stores through a host tier of --host-frac of the tables' bytes
              (records read from disk on demand, O_DIRECT), SPEC §5
  trove-engram-host
              PEER all resident as in `trove`, the Engram tables through a host tier of
              --host-frac of their bytes: the cost of an Engram table beyond the host budget
  trove-engram-ahead
              trove-engram-host with look-ahead over batches: each Engram layer starts reading
              the next batch's rows as soon as it has looked up this batch's

Engram (issue 18): the background's LlamaEngram at decoder layers 1 and 5 (--engram-layers;
clamped to the model's depth), hidden = hidden + Engram(hidden, input_ids) before the layer,
as the background places it: n-gram orders 2..3, 8 heads, 256 per order (e = 32), conv K = 4,
--engram-vocab rows per table. torch runs trove.background.BackgroundEngram (nn.Embedding
tables, trained by AdamW with the rest); trove variants run trove.torch.Engram over a store of
--quant rows, prefetched from the batch's tokens before the model runs (tables not trained
by the trove variants yet: their row gradients are computed and dropped).

all in one run, each in its own child process so that each peak RSS is its own. Random
weights and tokens from --seed; nothing is downloaded. Also reported: the time inside the PEER
layers (forward, backward, their optimizer step) and peak memory (RSS; VRAM on a GPU).

  python -m trove.bench_e2e --scale 0.125 --batch 4 --seq 128 --json out.json
  python -m trove.bench_e2e --scale 1 --device cuda --batch 16 --seq 128   # the real shape

Scale: see trove.e2e.Shape.scaled. --batch takes a comma-separated list (a sweep; --plot
draws tokens/s against it). Stores go to --workdir (a temporary folder by default, removed).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = ("torch", "trove", "trove-host", "trove-engram-host", "trove-engram-ahead")


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m trove.bench_e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=0.125,
                   help="multiplies TinyLlama's width, MLP, layers, vocab, experts (default 0.125)")
    p.add_argument("--experts", type=int, default=None, help="override the expert count (n^2)")
    p.add_argument("--batch", default="4", help="sequences per batch; a list sweeps (4,8)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per measure")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"of {','.join(VARIANTS)}")
    p.add_argument("--quant", default="int4", help="trove's record format (int4 trains)")
    p.add_argument("--host-frac", type=float, default=0.25,
                   help="trove-host: the host tier's budget as a fraction of the tables' bytes")
    p.add_argument("--torch-dtype", choices=("fp32", "bf16"), default="fp32",
                   help="the torch peer's tables and einsums (the model itself runs in fp32)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch and for trove's kernels (0: their defaults)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--vram", default=None, help="trove's device tier budget (--device cuda)")
    p.add_argument("--no-train", action="store_true", help="forward only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where the stores go (default: a temp dir)")
    p.add_argument("--json", dest="json_out", default=None, help="write the report here (- = stdout)")
    p.add_argument("--plot", default=None, help="draw tokens/s per variant (and batch) to FILE")
    p.add_argument("--in-process", action="store_true",
                   help="measure every variant in this process, iteration by iteration in turn "
                        "(fairer ratios on a loaded machine; the peak RSS is then the "
                        "process's, not each variant's)")
    p.add_argument("--engram-layers", default="1,5",
                   help="decoder layers with Engram (comma-separated; '' for none)")
    p.add_argument("--engram-vocab", type=int, default=None,
                   help="rows per Engram table (default: 100000 x scale, at least 1024)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _sizes(args):
    from .e2e import Shape
    over = {} if args.experts is None else {"experts": args.experts}
    return Shape.scaled(args.scale, **over)


def _engram_layers(args, shape):
    want = [int(i) for i in args.engram_layers.split(",") if i.strip()]
    return tuple(sorted({min(i, shape.layers - 1) for i in want}))


def _engram_vocab(args):
    return args.engram_vocab or max(1024, round(100000 * args.scale))


def _make_engrams(variant, bg_engrams, layers, args, workdir, max_tokens):
    """The Engram modules of `variant`."""
    import trove.torch as tt
    if variant == "torch":
        return bg_engrams, {}
    engrams, info = [], {"engram_store_bytes": 0}
    for idx, bg in zip(layers, bg_engrams):
        path = os.path.join(workdir, f"{variant}-engram{idx}.trove")
        e = tt.Engram.from_module(bg, path, quant=args.quant, layer=f"model.layers.{idx}.engram",
                                  threads=max(1, args.threads))
        size = os.path.getsize(path)
        info["engram_store_bytes"] += size
        if variant in ("trove-host", "trove-engram-host", "trove-engram-ahead"):
            # --host-frac of the table, but at least what one batch's rows can need (every row
            # in its own record), which the tier must hold while the lookup runs.
            rec = e.config["row_bytes"] * e.config["rows_per_record"]
            need = int(e.tables * max_tokens * rec * 1.02) + 4 * rec
            budget = min(size, max(int(size * args.host_frac), need))
            info.setdefault("engram_host_budget_bytes", 0)
            info["engram_host_budget_bytes"] += budget
            e = tt.Engram.open(path, e.layer, host=budget, threads=max(1, args.threads))
        else:
            e.preload()  # all resident: every row in memory before the first batch
        engrams.append(e)
    return engrams, info


def _make_peers(variant, shape, bg_peers, args, workdir):
    """The PEER modules of `variant` and the table optimizer (None for torch)."""
    import torch

    import trove.torch as tt
    if variant in ("trove-engram-host", "trove-engram-ahead"):
        variant = "trove"
    if variant == "torch":
        if args.torch_dtype == "bf16":
            class Cast(torch.nn.Module):
                """The peer in bf16 inside the fp32 model."""

                def __init__(self, peer):
                    super().__init__()
                    self.peer = peer.to(torch.bfloat16)

                def forward(self, x):
                    return self.peer(x.to(torch.bfloat16)).to(x.dtype)

            return [Cast(p) for p in bg_peers], None, {}
        return bg_peers, None, {}
    peers, info = [], {"pack_s": 0.0, "store_bytes": 0}
    for i, (idx, bg) in enumerate(zip(shape.peer_layers, bg_peers)):
        path = os.path.join(workdir, f"{variant}-layer{idx}.trove")
        t0 = time.perf_counter()
        p = tt.PEER.from_module(bg, path, quant=args.quant, layer=f"model.layers.{idx}.peer",
                                device=args.device, threads=args.threads)
        info["pack_s"] += time.perf_counter() - t0
        size = os.path.getsize(path)
        info["store_bytes"] += size
        if variant == "trove-host":
            # The store is the expert table's records plus a router of a few MiB at most.
            budget = max(1, int(size * args.host_frac))
            info.setdefault("host_budget_bytes", 0)
            info["host_budget_bytes"] += budget
            p = tt.PEER.open(path, layer=p.layer, host=budget, device=args.device,
                             vram=args.vram, threads=args.threads)
        peers.append(p)
    opt = None
    if not args.no_train and args.quant == "int4":
        opt = tt.Int4SR(peers, lr=1e-2)
    return peers, opt, info


class _Variant:
    """One variant's model, PEER modules and optimizers, measured an iteration at a time."""

    def __init__(self, variant, args, shape, workdir):
        import torch

        from .background import BackgroundEngram
        from .e2e import PeerTimer, add_engrams, add_peers, build_model, rss_bytes
        self.name, self.args = variant, args
        self.device = torch.device(args.device)
        model, bg_peers = build_model(shape, args.seed)
        self.timer = PeerTimer(self.device)
        self.peers, self.table_opt, info = _make_peers(variant, shape, bg_peers, args, workdir)
        del bg_peers
        self.engram_layers = _engram_layers(args, shape)
        torch.manual_seed(args.seed + 7)
        bg_engrams = [BackgroundEngram(shape.hidden, layer_idx=i, vocab=_engram_vocab(args))
                      for i in self.engram_layers]
        max_tokens = max(int(b) for b in args.batch.split(",")) * args.seq
        self.engrams, einfo = _make_engrams(variant, bg_engrams, self.engram_layers, args,
                                            workdir, max_tokens)
        info.update(einfo)
        del bg_engrams
        self.engram_state = add_engrams(model, self.engrams, self.engram_layers)
        add_peers(model, self.peers, shape.peer_layers, self.timer)
        self.model = model.to(self.device)
        peer_params = [p for m in self.peers for p in m.parameters()]
        peer_params += [p for m in self.engrams for p in m.parameters()]
        ids_peer = {id(p) for p in peer_params}
        base_params = [p for p in model.parameters() if id(p) not in ids_peer]
        if not args.no_train:
            self.opt_base = torch.optim.AdamW(base_params, lr=1e-4)
            self.opt_peer = torch.optim.AdamW(peer_params, lr=1e-4)
        self.report = {"variant": variant, "rss_after_build_bytes": rss_bytes(), **info,
                       "torch_threads": torch.get_num_threads(), "by_batch": []}

    def sync(self):
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start_batch(self, ids, next_ids=None):
        """The batch's tokens are known: every Engram layer's rows are asked for now (and, for
        trove-engram-ahead, the next batch's once each layer has looked up this batch's)."""
        self.engram_state.start(ids)
        if self.name != "torch":
            for e in self.engrams:
                e.prefetch(ids)
                if next_ids is not None and self.name == "trove-engram-ahead":
                    e.prefetch_next(next_ids)

    def forward(self, ids, next_ids=None):
        """(seconds, seconds inside PEER) of one forward without autograd."""
        import torch
        self.model.eval()
        self.timer.reset()
        self.sync()
        t0 = time.perf_counter()
        self.start_batch(ids, next_ids)
        with torch.no_grad():
            self.model(ids)
        self.sync()
        return time.perf_counter() - t0, self.timer.forward_s

    def train_step(self, ids, next_ids=None):
        """(seconds, PEER forward, PEER backward, PEER optimizer seconds, loss) of one step."""
        self.model.train()
        t = self.timer
        t.reset()
        self.sync()
        t0 = time.perf_counter()
        self.start_batch(ids, next_ids)
        loss = self.model(ids, labels=ids).loss
        loss.backward()
        self.opt_base.step()
        t1 = t.now()
        self.opt_peer.step()
        if self.table_opt is not None:
            self.table_opt.step()
        t.optimizer_s += t.now() - t1
        self.opt_base.zero_grad(set_to_none=True)
        self.opt_peer.zero_grad(set_to_none=True)
        if self.table_opt is not None:
            self.table_opt.zero_grad()
        self.sync()
        return (time.perf_counter() - t0, t.forward_s, t.backward_s, t.optimizer_s,
                float(loss.detach()))


def _run_variants(names, args, workdir):
    """Measures `names` in this process, iteration by iteration in turn (so that a machine's
    changing load falls on all of them alike); returns their reports. With one variant the
    peak RSS is its own, with several it is the process's."""
    import torch

    from .e2e import progress, reset_rss_peak, rss_peak_bytes
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = _sizes(args)
    variants = [_Variant(v, args, shape, workdir) for v in names]
    # The peak of building (the torch modules every variant starts from, packing them) is
    # reported apart: from here on the peak is the measured work's.
    build_peak = rss_peak_bytes()
    peak_reset = reset_rss_peak()
    device = variants[0].device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    gen = torch.Generator().manual_seed(args.seed + 1)
    batches = [int(b) for b in args.batch.split(",")]
    n_it = args.warmup + args.iters
    bar = progress(total=len(batches) * n_it * len(variants) * (1 if args.no_train else 2),
                   desc=",".join(names), unit="it")
    for b in batches:
        # A fresh batch for every iteration, the same for every variant: a repeated batch
        # would route to the same experts and leave the host tier nothing to read.
        fwd_ids = [torch.randint(0, shape.vocab, (b, args.seq), generator=gen).to(device)
                   for _ in range(n_it)]
        train_ids = [torch.randint(0, shape.vocab, (b, args.seq), generator=gen).to(device)
                     for _ in range(n_it)]
        tokens = b * args.seq
        fwd = {v.name: [] for v in variants}
        for v in variants:
            v.engram_state.forward_s = 0.0
        for it in range(n_it):
            for v in variants:
                r = v.forward(fwd_ids[it], fwd_ids[it + 1] if it + 1 < n_it else None)
                if it >= args.warmup:
                    fwd[v.name].append(r)
                bar.update()
        rows = {}
        for v in variants:
            f, pf = zip(*fwd[v.name])
            row = {"batch": b, "seq": args.seq, "tokens": tokens,
                   "forward_s": statistics.median(f), "forward_peer_s": statistics.median(pf)}
            row["forward_tokens_per_s"] = tokens / row["forward_s"]
            row["forward_engram_s"] = v.engram_state.forward_s / max(1, n_it)
            if v.name != "torch":
                row["last_peer_stats"] = v.peers[0].last_stats
                if v.engrams:
                    row["last_engram_stats"] = v.engrams[0].last_stats
            row["rss_peak_forward_bytes"] = rss_peak_bytes()
            rows[v.name] = row
        if not args.no_train:
            steps = {v.name: [] for v in variants}
            for it in range(n_it):
                for v in variants:
                    r = v.train_step(train_ids[it],
                                     train_ids[it + 1] if it + 1 < n_it else None)
                    if it >= args.warmup:
                        steps[v.name].append(r)
                    bar.update()
            for v in variants:
                s, pfw, pbw, popt, loss = zip(*steps[v.name])
                row = rows[v.name]
                row["train_step_s"] = statistics.median(s)
                row["train_tokens_per_s"] = tokens / row["train_step_s"]
                row["train_peer_forward_s"] = statistics.median(pfw)
                row["train_peer_backward_s"] = statistics.median(pbw)
                row["train_peer_optimizer_s"] = statistics.median(popt)
                row["loss"] = loss[-1]
        for v in variants:
            v.report["by_batch"].append(rows[v.name])
    bar.close()
    reports = []
    for v in variants:
        r = v.report
        r["rss_peak_bytes"] = rss_peak_bytes()
        r["rss_peak_build_bytes"] = build_peak
        r["rss_peak_excludes_build"] = peak_reset
        r["rss_is_the_process_peak_of_all_variants"] = len(variants) > 1
        if device.type == "cuda":
            r["vram_peak_bytes"] = torch.cuda.max_memory_allocated(device)
        r["torch_table_bytes"] = sum(p.numel() * p.element_size() for m in v.peers
                                     for n, p in m.named_parameters() if "expert_" in n)
        r["torch_engram_table_bytes"] = sum(
            p.numel() * p.element_size() for m in v.engrams
            for n, p in m.named_parameters() if "embeddings" in n)
        r["engram_layers"] = list(v.engram_layers)
        reports.append(r)
    return reports


def _machine():
    import platform

    import torch
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "gpu": gpu,
            "python": platform.python_version(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def _gib(b):
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def format_table(report):
    """The human table: one row per (batch, variant), ratios against torch at the same batch."""
    lines = []
    s = report["shape"]
    lines.append(f"model: hidden {s['hidden']}, {s['layers']} layers, vocab {s['vocab']}; PEER on "
                 f"layers {s['peer_layers']}: N = {s['experts']:,}, h = {s['peer_heads']}, "
                 f"k = {s['peer_topk']}, dk = {s['peer_dim_key']}")
    if s.get("engram_layers"):
        lines.append(f"Engram on layers {s['engram_layers']}: {s['engram_vocab']:,} rows per table")
    hdr = ("| batch x seq | variant | fwd tok/s | vs torch | train tok/s | vs torch | PEER fwd ms "
           "| PEER train fwd+bwd+opt ms | Engram fwd ms | peak RSS |")
    lines += [hdr, "|---" * (hdr.count("|") - 1) + "|"]
    by = {r["variant"]: r for r in report["variants"]}
    nb = len(next(iter(by.values()))["by_batch"])
    for i in range(nb):
        base = by.get("torch", {}).get("by_batch", [None] * nb)[i]
        for v, r in by.items():
            row = r["by_batch"][i]
            f = row["forward_tokens_per_s"]
            fr = f"{f / base['forward_tokens_per_s']:.2f}x" if base else "-"
            if "train_tokens_per_s" in row:
                t = row["train_tokens_per_s"]
                tr = f"{t / base['train_tokens_per_s']:.2f}x" if base and "train_tokens_per_s" in base else "-"
                pt = (f"{row['train_peer_forward_s'] * 1e3:.0f}+{row['train_peer_backward_s'] * 1e3:.0f}"
                      f"+{row['train_peer_optimizer_s'] * 1e3:.0f}")
                ts = f"{t:,.0f}"
            else:
                ts, tr, pt = "-", "-", "-"
            lines.append(f"| {row['batch']} x {row['seq']} | {v} | {f:,.0f} | {fr} | {ts} | {tr} | "
                         f"{row['forward_peer_s'] * 1e3:.0f} | {pt} | "
                         f"{row.get('forward_engram_s', 0) * 1e3:.0f} | {_gib(r['rss_peak_bytes'])}"
                         f"{' (process)' if r.get('rss_is_the_process_peak_of_all_variants') else ''} |")
    for v, r in by.items():
        extra = []
        if r.get("torch_table_bytes"):
            extra.append(f"tables in torch {_gib(r['torch_table_bytes'])}")
        if r.get("store_bytes"):
            extra.append(f"stores {_gib(r['store_bytes'])} (pack {r['pack_s']:.1f} s)")
        if r.get("host_budget_bytes"):
            extra.append(f"host tier budget {_gib(r['host_budget_bytes'])}")
        if r.get("engram_store_bytes"):
            extra.append(f"Engram stores {_gib(r['engram_store_bytes'])}")
        if r.get("engram_host_budget_bytes"):
            extra.append(f"Engram host tier budget {_gib(r['engram_host_budget_bytes'])}")
        if "vram_peak_bytes" in r:
            extra.append(f"peak VRAM (torch allocator) {_gib(r['vram_peak_bytes'])}")
        extra.append(f"RSS after build {_gib(r['rss_after_build_bytes'])}")
        if r.get("rss_peak_excludes_build"):
            extra.append(f"peak while building and packing {_gib(r['rss_peak_build_bytes'])} "
                         "(not in the table's peak)")
        lines.append(f"{v}: " + ", ".join(extra))
    return "\n".join(lines)


def plot(report, path):
    """Tokens/s per variant: bars at one batch size, lines over a sweep."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in [(axes[0], "forward_tokens_per_s", "forward"),
                           (axes[1], "train_tokens_per_s", "training step")]:
        for i, r in enumerate(report["variants"]):
            rows = [row for row in r["by_batch"] if key in row]
            if not rows:
                continue
            xs = [row["tokens"] for row in rows]
            ys = [row[key] for row in rows]
            if len(rows) == 1:
                ax.bar(i, ys[0], label=r["variant"])
            else:
                ax.plot(xs, ys, marker="o", label=r["variant"])
        if len(report["variants"][0]["by_batch"]) > 1:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens per batch")
        else:
            ax.set_xticks([])
        ax.set_ylabel("tokens/s")
        ax.set_title(title)
        ax.legend()
    m = report["machine"]
    fig.suptitle(f"trove.bench_e2e, scale {report['args']['scale']} — {m['cpu'] or m['gpu']}, "
                 f"{m['cores']} cores", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.child:
        print(json.dumps(_run_variants([args.child], args, args.workdir)[0]))
        return 0
    import dataclasses
    shape = _sizes(args)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"variant {v!r}: one of {', '.join(VARIANTS)}")
    tmp = None
    workdir = args.workdir
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="trove-bench-e2e-")
        workdir = tmp.name
    os.makedirs(workdir, exist_ok=True)
    report = {"command": "python -m trove.bench_e2e " + " ".join(sys.argv[1:] if argv is None else argv),
              "args": vars(args), "machine": _machine(),
              "shape": {**dataclasses.asdict(shape), "peer_layers": list(shape.peer_layers),
                        "engram_layers": list(_engram_layers(args, shape)),
                        "engram_vocab": _engram_vocab(args)},
              "variants": []}
    try:
        if args.in_process:
            report["variants"] = _run_variants(variants, args, workdir)
        for v in [] if args.in_process else variants:
            cmd = [sys.executable, "-m", "trove.bench_e2e", *(sys.argv[1:] if argv is None else argv),
                   "--child", v, "--workdir", workdir]
            print(f"bench_e2e: {v} ...", file=sys.stderr, flush=True)
            out = subprocess.run(cmd, stdout=subprocess.PIPE, check=False, text=True)
            if out.returncode != 0:
                raise SystemExit(f"bench_e2e: variant {v} failed (exit {out.returncode})")
            report["variants"].append(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        if tmp is not None:
            tmp.cleanup()
    report["args"]["workdir"] = args.workdir
    print(format_table(report))
    if args.json_out == "-":
        print(json.dumps(report, indent=1))
    elif args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot:
        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
