"""What the end-to-end benchmark and the training run share: a TinyLlama-shaped model from
transformers' LlamaConfig (random weights, nothing downloaded) with PEER layers added to
decoder layers' outputs, hidden = hidden + PEER(hidden), as the background's integration
does; a timer for the time spent inside those layers; peak memory.

Shapes: TinyLlama-1.1B (hidden 2048, MLP 5632, 22 layers, 32 heads of 64, 4 KV heads, vocab
32000) and the background's PEER (N = 802,816 = 896^2, h = 4, k = 8, dk = 64, silu, relu
gate, SPEC §2). `Shape.scaled(s)` multiplies the width, the MLP width, the layer count, the
vocabulary and the expert count by s (attention heads stay 64 wide); the PEER layers stay at
the same places counted from the top, the third-from-last and the last decoder layer (19 and
21 of 22), so a scaled model keeps at least 3 layers.
"""
import dataclasses
import math
import time

import torch
from torch import nn

from .background import BackgroundPeer


@dataclasses.dataclass
class Shape:
    hidden: int = 2048
    intermediate: int = 5632
    layers: int = 22
    heads: int = 32
    kv_heads: int = 4
    vocab: int = 32000
    experts: int = 802816
    peer_heads: int = 4
    peer_topk: int = 8
    peer_dim_key: int = 64

    @classmethod
    def scaled(cls, s, **overrides):
        """TinyLlama's shape with the sizes multiplied by s (see the module's docstring)."""
        if not 0 < s <= 1:
            raise ValueError(f"scale {s}: 0 < scale <= 1")
        full = cls()
        hidden = max(64, round(full.hidden * s / 64) * 64)
        heads = hidden // 64
        n_keys = max(4, round(math.isqrt(full.experts) * math.sqrt(s)))
        shape = cls(hidden=hidden,
                    intermediate=max(32, round(full.intermediate * s / 32) * 32),
                    layers=max(3, round(full.layers * s)), heads=heads,
                    kv_heads=max(1, heads * full.kv_heads // full.heads),
                    vocab=max(256, round(full.vocab * s)), experts=n_keys * n_keys)
        return dataclasses.replace(shape, **overrides)

    @property
    def peer_layers(self):
        """Where PEER goes: layers 19 and 21 of TinyLlama's 22, counted from the top."""
        return (self.layers - 3, self.layers - 1)

    def llama_config(self):
        from transformers import LlamaConfig
        return LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden,
                           intermediate_size=self.intermediate, num_hidden_layers=self.layers,
                           num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                           max_position_embeddings=2048, rms_norm_eps=1e-5,
                           tie_word_embeddings=False)

    def background_peer(self):
        return BackgroundPeer(self.hidden, self.experts, heads=self.peer_heads,
                              topk=self.peer_topk, dim_key=self.peer_dim_key)


class PeerTimer:
    """Wall time inside the PEER layers, forward and backward, summed over layers.

    Forward: around the module's call. Backward: from the moment autograd reaches the PEER
    output's gradient to the moment it hands the input's gradient on (two identity autograd
    functions mark the ends), so it holds the layer's backward kernels and, for a torch
    module, its embedding gradients. On a GPU each mark synchronizes the device."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.reset()

    def reset(self):
        self.forward_s = 0.0
        self.backward_s = 0.0
        self.optimizer_s = 0.0

    def now(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


class _Mark(torch.autograd.Function):
    """Identity; its backward notes when the gradient passes (`end` "out": PEER's backward
    starts, "in": it has finished)."""

    @staticmethod
    def forward(ctx, x, timer, end, state):
        ctx.timer, ctx.end, ctx.state = timer, end, state
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        t = ctx.timer.now()
        if ctx.end == "out":
            ctx.state["t"] = t
        else:
            ctx.timer.backward_s += t - ctx.state.pop("t", t)
        return g, None, None, None


class TimedPeer(nn.Module):
    """A PEER module whose forward and backward time goes to `timer`."""

    def __init__(self, peer, timer):
        super().__init__()
        self.peer = peer
        self.timer = timer

    def forward(self, x):
        state = {}
        if torch.is_grad_enabled() and x.requires_grad:
            x = _Mark.apply(x, self.timer, "in", state)
        t0 = self.timer.now()
        y = self.peer(x)
        self.timer.forward_s += self.timer.now() - t0
        if y.requires_grad:
            y = _Mark.apply(y, self.timer, "out", state)
        return y


def add_peers(model, peers, layers, timer):
    """Adds peers[i] to the output of decoder layer layers[i]: hidden + PEER(hidden). The
    PEER modules become submodules (`peer`) of their decoder layers, so model.parameters()
    holds their Parameters."""
    for idx, peer in zip(layers, peers):
        block = model.model.layers[idx]
        block.peer = TimedPeer(peer, timer)

        def hook(module, args, out):
            if isinstance(out, tuple):
                return (out[0] + module.peer(out[0]),) + tuple(out[1:])
            return out + module.peer(out)

        block.register_forward_hook(hook)
    return model


class EngramState:
    """The batch's token ids, for the Engram layers (they hash the input tokens), and the time
    spent inside them."""

    def __init__(self):
        self.ids = None
        self.forward_s = 0.0

    def start(self, ids):
        self.ids = ids


def add_engrams(model, engrams, layers):
    """Adds engrams[i] before decoder layer layers[i], as the background does:
    hidden = hidden + Engram(hidden, input_ids). Returns the EngramState whose start(ids) a
    caller calls with each batch's ids before the model runs."""
    state = EngramState()
    for idx, eng in zip(layers, engrams):
        block = model.model.layers[idx]
        block.engram = eng

        def hook(module, args, kwargs):
            t0 = time.perf_counter()
            if args:
                h = args[0]
                args = (h + module.engram(h, state.ids),) + tuple(args[1:])
            else:
                h = kwargs["hidden_states"]
                kwargs = {**kwargs, "hidden_states": h + module.engram(h, state.ids)}
            state.forward_s += time.perf_counter() - t0
            return args, kwargs

        block.register_forward_pre_hook(hook, with_kwargs=True)
    return state


def build_model(shape, seed):
    """(LlamaForCausalLM with random weights from `seed`, the background PEER modules for
    shape.peer_layers with weights from `seed` too); PEER not yet attached."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(shape.llama_config())
    peers = [shape.background_peer() for _ in shape.peer_layers]
    return model, peers


def rss_peak_bytes():
    """This process's peak resident set (VmHWM), bytes; 0 where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_rss_peak():
    """Restarts the peak (VmHWM) at the current RSS (Linux: "5" to /proc/self/clear_refs), so
    that what was freed before (a module packed and dropped) does not count; False where the
    kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_bytes():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def progress(iterable=None, **kw):
    """A tqdm bar on stderr (quiet when stderr is not a terminal and disable=None)."""
    from tqdm import tqdm
    kw.setdefault("disable", None)
    kw.setdefault("leave", False)
    return tqdm(iterable, **kw)
