"""A real training run: a small TinyLlama-shaped model with PEER on its layers 19 and 21
(counted from the top, trove.e2e) trained on text that ships with Debian, twice from the same
initial weights, seed and batches:

  fp32   the background's PEER in plain PyTorch, expert tables fp32, trained by the same
         row-wise Adagrad as Int4SR's (kernels/train.h step 1: per touched row, G += mean g^2,
         w -= lr g / (sqrt(G) + 1e-8)) in fp32 (RowAdagrad below), so that the gap is int4 +
         stochastic rounding alone; --fp32-optimizer adagrad takes torch's elementwise one
  int4   trove.torch.PEER over int4 stores packed from the same initial module, tables trained
         in place by trove.torch.Int4SR (SPEC §7: row-wise Adagrad, stochastic rounding)

The rest of the model and the PEER routers train with AdamW in both runs. `--runs
none,fp32,int4` adds the same model without PEER (what the PEER layers buy at this size). Reports the
training loss per step, the validation loss every --eval-every steps and at the end, and the
int4 - fp32 gap of the final validation loss.

Text: the distinct files of /usr/share/common-licenses (base-files: on every Debian), or
--text FILES; each file's last --val-frac of characters is held out for validation. The
tokenizer is a byte-level BPE (the `tokenizers` package) trained here on the training part
only: a subword vocabulary keeps the model's embedding and head small while the text stays
English words, and nothing is downloaded.

  python -m trove.train_e2e --steps 300 --json run.json --plot loss.png
"""
import argparse
import glob
import json
import math
import os
import sys
import tempfile
import time


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m trove.train_e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", nargs="*", default=None,
                   help="text files (default: /usr/share/common-licenses/*)")
    p.add_argument("--val-frac", type=float, default=0.1)
    p.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary size")
    p.add_argument("--scale", type=float, default=0.0625, help="as trove.bench_e2e's")
    p.add_argument("--experts", type=int, default=16384,
                   help="experts per PEER layer (default 128^2, the background's)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW: the model and the routers")
    p.add_argument("--table-lr", type=float, default=1e-2, help="the expert tables' Adagrad")
    p.add_argument("--fp32-optimizer", choices=("rowwise", "adagrad"), default="rowwise",
                   help="the fp32 tables' optimizer: Int4SR's row-wise Adagrad or torch's")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--runs", default="fp32,int4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", dest="json_out", default=None, help="write the report here (- = stdout)")
    p.add_argument("--plot", default=None, help="draw the loss curves to FILE")
    return p.parse_args(argv)


class RowAdagrad:
    """Int4SR's row-wise Adagrad (kernels/train.h, step 1) on fp32 [N, D] tables: a row with
    a nonzero gradient is a touched row; G_row += mean(g^2); w -= lr * g / (sqrt(G) + eps)."""

    def __init__(self, params, lr, eps=1e-8):
        import torch
        self.params, self.lr, self.eps = list(params), lr, eps
        self.accum = [torch.zeros(p.shape[0]) for p in self.params]

    def step(self):
        import torch
        with torch.no_grad():
            for p, acc in zip(self.params, self.accum):
                if p.grad is None:
                    continue
                rows = p.grad.abs().sum(-1).nonzero().squeeze(-1)
                g = p.grad[rows]
                acc[rows] += g.double().square().mean(-1).float()
                p[rows] -= self.lr * g / (acc[rows].sqrt() + self.eps).unsqueeze(-1)

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def load_text(files, val_frac):
    """(train texts, validation texts): each file's tail of val_frac held out."""
    if not files:
        files = sorted(glob.glob("/usr/share/common-licenses/*"))
    seen, train, val = set(), [], []
    for f in files:
        real = os.path.realpath(f)
        if real in seen or not os.path.isfile(real):
            continue
        seen.add(real)
        with open(real, encoding="utf-8", errors="replace") as fh:
            t = fh.read()
        cut = int(len(t) * (1 - val_frac))
        train.append(t[:cut])
        val.append(t[cut:])
    if not train:
        raise SystemExit("train_e2e: no text files found (pass --text)")
    return train, val, sorted(seen)


def train_tokenizer(texts, vocab):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _stream(tok, texts):
    import torch
    ids = []
    for t in texts:
        ids.extend(tok.encode(t).ids)
    return torch.tensor(ids, dtype=torch.long)


def run_one(kind, args, shape, train_ids, val_ids, workdir, bar_pos=0):
    """Trains one model; returns {"train_loss": [...], "val": [[step, loss], ...], ...}."""
    import torch

    from .e2e import PeerTimer, add_peers, build_model, progress
    model, bg = build_model(shape, args.seed)
    timer = PeerTimer("cpu")
    table_opt, table_params = None, []
    if kind == "none":
        peers = []
    elif kind == "fp32":
        peers = bg
        table_params = [p for m in peers for n, p in m.named_parameters() if "expert_" in n]
    elif kind == "int4":
        import trove.torch as tt
        peers = [tt.PEER.from_module(m, os.path.join(workdir, f"layer{i}.trove"), quant="int4",
                                     layer=f"model.layers.{i}.peer", threads=args.threads)
                 for i, m in zip(shape.peer_layers, bg)]
        table_opt = tt.Int4SR(peers, lr=args.table_lr)
    else:
        raise SystemExit(f"run {kind!r}: fp32, int4 or none")
    add_peers(model, peers, shape.peer_layers, timer)
    tids = {id(p) for p in table_params}
    dense = [p for p in model.parameters() if id(p) not in tids]
    opt = torch.optim.AdamW(dense, lr=args.lr, weight_decay=0.0)
    topt = None
    if table_params:
        topt = (RowAdagrad(table_params, args.table_lr) if args.fp32_optimizer == "rowwise"
                else torch.optim.Adagrad(table_params, lr=args.table_lr))

    gen = torch.Generator().manual_seed(args.seed + 1)
    n_val = min(args.eval_batches * args.batch, (len(val_ids) - 1) // args.seq)
    val = val_ids[: n_val * args.seq].view(n_val, args.seq)

    def evaluate():
        model.eval()
        with torch.no_grad():
            losses = [model(v, labels=v).loss.item() for v in val.split(args.batch)]
        model.train()
        return sum(losses) / len(losses)

    out = {"train_loss": [], "val": [], "seconds": 0.0}
    t0 = time.perf_counter()
    bar = progress(range(1, args.steps + 1), desc=kind, unit="step", position=bar_pos)
    out["val"].append([0, evaluate()])
    model.train()
    for step in bar:
        starts = torch.randint(0, len(train_ids) - args.seq, (args.batch,), generator=gen)
        ids = torch.stack([train_ids[s:s + args.seq] for s in starts.tolist()])
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if topt is not None:
            topt.step()
            topt.zero_grad(set_to_none=True)
        if table_opt is not None:
            table_opt.step()
            table_opt.zero_grad()
        out["train_loss"].append(loss.item())
        if not math.isfinite(out["train_loss"][-1]):
            raise SystemExit(f"train_e2e: {kind} diverged at step {step}")
        if step % args.eval_every == 0 or step == args.steps:
            out["val"].append([step, evaluate()])
            bar.set_postfix(val=f"{out['val'][-1][1]:.3f}")
    out["seconds"] = time.perf_counter() - t0
    out["final_val_loss"] = out["val"][-1][1]
    if table_opt is not None:
        out["int4sr_last_stats"] = table_opt.last_stats
    return out


def plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (kind, r) in enumerate(report["runs"].items()):
        color = f"C{i}"
        tl = r["train_loss"]
        w = max(1, len(tl) // 30)
        smooth = [sum(tl[max(0, j - w + 1):j + 1]) / len(tl[max(0, j - w + 1):j + 1])
                  for j in range(len(tl))]
        ax.plot(range(1, len(tl) + 1), smooth, color=color, alpha=0.5,
                label=f"{kind} train (mean of {w})")
        vs, vl = zip(*r["val"])
        ax.plot(vs, vl, color=color, marker="o", label=f"{kind} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    gap = report.get("gap")
    title = "trove.train_e2e: PEER tables fp32 (torch) vs int4 + SR (trove)"
    if gap is not None:
        title += f"\nfinal validation gap int4 - fp32 = {gap:+.4f}"
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    import dataclasses

    import torch

    from .bench_e2e import _machine
    from .e2e import Shape
    if args.threads:
        torch.set_num_threads(args.threads)
    train_txt, val_txt, files = load_text(args.text, args.val_frac)
    tok = train_tokenizer(train_txt, args.vocab)
    train_ids, val_ids = _stream(tok, train_txt), _stream(tok, val_txt)
    shape = Shape.scaled(args.scale, vocab=tok.get_vocab_size(), experts=args.experts)
    report = {"command": "python -m trove.train_e2e " + " ".join(argv), "args": vars(args),
              "machine": _machine(), "files": files,
              "tokens": {"train": len(train_ids), "validation": len(val_ids),
                         "vocab": tok.get_vocab_size()},
              "shape": {**dataclasses.asdict(shape), "peer_layers": list(shape.peer_layers)},
              "runs": {}}
    print(f"train_e2e: {len(files)} files, {len(train_ids):,} training and {len(val_ids):,} "
          f"validation tokens (BPE vocab {tok.get_vocab_size()}); model hidden {shape.hidden}, "
          f"{shape.layers} layers, PEER on {list(shape.peer_layers)} with N = {shape.experts:,}; "
          f"{args.steps} steps of {args.batch} x {args.seq} tokens "
          f"({args.steps * args.batch * args.seq / max(1, len(train_ids)):.1f} epochs)",
          file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="trove-train-e2e-") as workdir:
        for kind in [k for k in args.runs.split(",") if k]:
            report["runs"][kind] = run_one(kind, args, shape, train_ids, val_ids, workdir)
    runs = report["runs"]
    lines = ["| run | final validation loss | perplexity | final train loss (mean of last 20) "
             "| seconds |", "|---|---|---|---|---|"]
    for kind, r in runs.items():
        tl = r["train_loss"][-20:]
        lines.append(f"| {kind} | {r['final_val_loss']:.4f} | {math.exp(r['final_val_loss']):.2f} "
                     f"| {sum(tl) / len(tl):.4f} | {r['seconds']:.0f} |")
    if "fp32" in runs and "int4" in runs:
        gap = runs["int4"]["final_val_loss"] - runs["fp32"]["final_val_loss"]
        report["gap"] = gap
        report["gap_relative"] = gap / runs["fp32"]["final_val_loss"]
        lines.append(f"\nvalidation loss gap int4 - fp32: {gap:+.4f} nats/token "
                     f"({100 * report['gap_relative']:+.2f}%), validation at step 0: "
                     f"{runs['fp32']['val'][0][1]:.4f} / {runs['int4']['val'][0][1]:.4f}")
    print("\n".join(lines))
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
