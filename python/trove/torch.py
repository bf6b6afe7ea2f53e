"""trove for PyTorch: a stored PEER layer as an nn.Module.

    import trove.torch as tt
    peer = tt.PEER.from_module(module, "peer.trove", quant="int4", host="8GiB")
    peer = tt.PEER.open("model.trove", layer="model.layers.19.mlp.peer", host="48GiB")
    y = peer(x)                     # x [..., D] fp32/bf16/fp16 -> y [..., D_out], x's dtype

Forward and backward are custom ops (`torch.ops.trove.peer_forward`, `peer_backward`,
registered with torch.library), so autograd reaches x and the router, and torch.compile sees
two opaque ops. The router (W_q, its bias, the sub-keys, the input norm's gamma) are ordinary
Parameters in trove's canonical arrangement (SPEC §2: W_q rows (head, half, j), keys
[hk, 2, n, dk]); any torch optimizer trains them. The expert tables stay in trove's records:
no [N, D] tensor ever exists in torch.

The C++ layer computes in fp32 on the CPU: other dtypes are converted on the way in and out,
any leading dimensions are flattened to tokens. Tensors cross into C++ without copies
(DLPack). A layer runs one batch at a time.
"""
import json
import os
import tempfile
import warnings
import weakref
from typing import List, Optional

import torch
from torch import Tensor, nn

from . import _core
from .background import engram_mix as _engram_mix

# The C++ layers by handle: custom ops take plain values, so a module passes its handle.
_LAYERS = {}
_NEXT_HANDLE = [0]
_ROUTER_NAMES = ("query_weight", "query_bias", "keys", "norm_weight")


def _register(entry):
    _NEXT_HANDLE[0] += 1
    _LAYERS[_NEXT_HANDLE[0]] = entry
    return _NEXT_HANDLE[0]


class _Entry:
    """A C++ layer, its config, and what its last forward cost."""

    def __init__(self, core, config):
        self.core = core
        self.config = config
        self.stats = None


def _f32(t):
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous()


def _sync_router(entry, params):
    """Copies the router into the C++ layer. Every call: a tensor changed through `.data`
    keeps its version counter, so no cheaper test is safe; the copy is the router's size
    (6 MiB at the background's shapes), small beside a batch's work."""
    qw, qb, keys, norm = (None if p is None else _f32(p) for p in params)
    entry.core.set_router(qw, qb, keys, norm)


def _tokens(x, dim, what):
    if x.shape[-1] != dim:
        raise ValueError(f"{what} has shape {tuple(x.shape)}; its last dimension must be the "
                         f"layer's D = {dim}")
    return _f32(x.reshape(-1, dim))


@torch.library.custom_op("trove::peer_forward", mutates_args=())
def peer_forward(x: Tensor, handle: int, query_weight: Tensor, query_bias: Optional[Tensor],
                 keys: Tensor, norm_weight: Optional[Tensor]) -> Tensor:
    """y [..., D_out] for x [..., D] through layer `handle` with the given router."""
    entry = _LAYERS[handle]
    c = entry.config
    _sync_router(entry, (query_weight, query_bias, keys, norm_weight))
    xt = _tokens(x, c["dim"], "x")
    y = torch.empty(xt.shape[0], c["dim_out"], dtype=torch.float32)
    entry.stats = entry.core.forward(xt, y)
    return y.reshape(*x.shape[:-1], c["dim_out"]).to(device=x.device, dtype=x.dtype)


@peer_forward.register_fake
def _(x, handle, query_weight, query_bias, keys, norm_weight):
    return x.new_empty(*x.shape[:-1], _LAYERS[handle].config["dim_out"])


@torch.library.custom_op("trove::peer_backward", mutates_args=())
def peer_backward(x: Tensor, dy: Tensor, handle: int, query_weight: Tensor,
                  query_bias: Optional[Tensor], keys: Tensor,
                  norm_weight: Optional[Tensor]) -> List[Tensor]:
    """[dx, d_query_weight, d_query_bias, d_keys, d_norm_weight] of sum(dy * y); the absent
    router tensors' gradients are empty. A layer opened for training also adds its expert rows'
    gradients to the pending step of its optimizer (inside trove)."""
    entry = _LAYERS[handle]
    c = entry.config
    _sync_router(entry, (query_weight, query_bias, keys, norm_weight))
    xt = _tokens(x, c["dim"], "x")
    dyt = _tokens(dy, c["dim_out"], "dy")
    dx = torch.empty_like(xt)
    grads = [torch.empty(p.shape, dtype=torch.float32) if p is not None else None
             for p in (query_weight, query_bias, keys, norm_weight)]
    entry.core.backward(xt, dyt, dx, *grads)
    out = [dx.reshape(x.shape).to(device=x.device, dtype=x.dtype)]
    for g, p in zip(grads, (query_weight, query_bias, keys, norm_weight)):
        out.append(x.new_empty(0) if p is None else g.to(device=p.device, dtype=p.dtype))
    return out


@peer_backward.register_fake
def _(x, dy, handle, query_weight, query_bias, keys, norm_weight):
    out = [torch.empty_like(x)]
    for p in (query_weight, query_bias, keys, norm_weight):
        out.append(x.new_empty(0) if p is None else torch.empty_like(p))
    return out


def _setup_context(ctx, inputs, output):
    x, handle, qw, qb, keys, norm = inputs
    ctx.handle = handle
    ctx.save_for_backward(x, qw, qb, keys, norm)


def _backward(ctx, dy):
    x, qw, qb, keys, norm = ctx.saved_tensors
    dx, dqw, dqb, dkeys, dnorm = peer_backward(x, dy.contiguous(), ctx.handle, qw, qb, keys, norm)
    return (dx, None, dqw, dqb if qb is not None else None, dkeys,
            dnorm if norm is not None else None)


torch.library.register_autograd("trove::peer_forward", _backward, setup_context=_setup_context)


def _bytes_arg(v):
    if v is None:
        return ""
    if isinstance(v, int):
        return str(v)
    return str(v)


class PEER(nn.Module):
    """A stored PEER layer (SPEC §2) as a module: y = PEER(x), x [..., D] -> y [..., D_out].

    Make one with PEER.open (a layer of a .trove store) or PEER.from_module (packs a PEER-pytorch
    or background module into a store first). Attributes: `config` (the layer's PeerConfig as
    a dict), `store` (the store's path), `layer` (the layer's name), `record_dtype`, and
    `last_stats` (what the last forward cost: routing, leases, expert kernels, and the host
    tier's hits, misses, bytes read and stall time, as a dict).
    """

    def __init__(self, core, store, layer):
        super().__init__()
        config = json.loads(core.config_json())
        self._entry = _Entry(core, config)
        self._handle = _register(self._entry)
        weakref.finalize(self, _LAYERS.pop, self._handle, None)
        self.store, self.layer, self.config = str(store), layer, config
        self.record_dtype = core.record_dtype()
        router = core.router()
        h, dk, d = config["heads"], config["dim_key"], config["dim"]
        hk, n = (1 if config["shared_keys"] else h), config["n_keys"]
        shapes = {"query_weight": (h * 2 * dk, d), "query_bias": (h * 2 * dk,),
                  "keys": (hk, 2, n, dk), "norm_weight": (d,)}
        for name in _ROUTER_NAMES:
            if name in router:
                t = torch.from_numpy(router[name]).reshape(shapes[name]).clone()
                self.register_parameter(name, nn.Parameter(t))
            else:
                self.register_parameter(name, None)

    @classmethod
    def open(cls, store, layer=None, host=None, device="cpu", vram=None, policy="frequency",
             threads=0, verify=True, lookahead=0, batch=4096, routing_math="f32"):
        """Layer `layer` of the store at `store` (the only layer when None).

        host: a byte budget ("8GiB", "10%" is not accepted here) for a host tier over the store
        file (records read on demand, verified); None maps the whole table. device "cuda" runs
        the layer's kernels on the GPU (a build with CUDA), with `vram` a device tier's budget.
        lookahead: with it > 0, a forward of more than `batch` tokens runs in batches of `batch`
        tokens, the next `lookahead` ones routed and their missing records read from disk while
        one computes (within the host budget); the output is the same bit for bit.
        routing_math: the router's two products on the CPU in "f32", "bf16" or "int8" (per-row
        int8 operands, exact integer products: faster, and may swap experts whose scores are
        within about 1%; inference only). kernels/peer.h's RoutingPrecision says exactly what
        each computes.
        """
        store = os.fspath(store)
        if layer is None:
            names = [n for n in _core.store_layers(store) if not n.endswith(".train")]
            if len(names) != 1:
                raise ValueError(f"{store} holds layers {names}; name one with layer=")
            layer = names[0]
        backend = {"cpu": "cpu", "cuda": "cuda", "ref": "ref"}.get(str(device))
        if backend is None:
            raise ValueError(f"device {device!r}: trove runs layers on 'cpu' or 'cuda'")
        args = dict(host=_bytes_arg(host), policy=policy, backend=backend, vram=_bytes_arg(vram),
                    threads=threads, verify=verify, lookahead=lookahead, batch=batch,
                    routing_math=routing_math)
        peer = cls(_core.Layer(store, layer, **args), store, layer)
        peer._open_args = args
        return peer

    @classmethod
    def from_module(cls, module, path, quant="int4", host=None, layer="peer", device="cpu",
                    vram=None, threads=0, **overrides):
        """Packs `module` into a new store at `path` (replaced atomically) and opens it.

        Accepted modules: PEER-pytorch's PEER (layout `lucidrains`; its scoring, k, k',
        activation and norm are read from the module) and the background's PEER (layout
        `mikeybeez`: to_queries, keys, expert_down, expert_up; silu, relu gate, k = k' =
        module.topk). quant: int4, int8, bf16, f16 or f32 (f32 is lossless). `overrides`
        (topk, topk_per_half, activation, gate, input_norm, norm_eps) win over what the module
        says, as `trove pack`'s flags do.
        """
        layout, state, found = _describe_module(module)
        found.update(overrides)
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".trove-from-module-", suffix=".safetensors",
                                   dir=folder)
        os.close(fd)
        try:
            from safetensors.torch import save_file
            save_file({f"{layer}.{k}": v.detach().cpu().contiguous() for k, v in state.items()},
                      tmp)
            _core.pack([tmp], path, layout, [layer], [layer], quant, json.dumps(found),
                       threads=threads, command_line=f"trove.torch.PEER.from_module({layout})")
        finally:
            os.unlink(tmp)
        return cls.open(path, layer=layer, host=host, device=device, vram=vram, threads=threads)

    def _enable_training(self):
        """Reopens the layer over a trainer (train/table_trainer.h): from then on backward adds
        the expert rows' gradients to a pending step inside trove."""
        if not self._entry.core.training:
            self._entry.core = _core.Layer(self.store, self.layer, train=True, **self._open_args)

    def checkpoint(self):
        """Writes the expert tables trained since the last checkpoint, the training view, the
        accumulators and the router as the store's next generation (crash-safe: the old or the
        new generation). Returns what it wrote, as a dict."""
        if not self._entry.core.training:
            raise ValueError("checkpoint(): nothing trains this layer's experts (make an Int4SR "
                             "over it first)")
        _sync_router(self._entry, (self.query_weight, self.query_bias, self.keys,
                                   self.norm_weight))
        return json.loads(self._entry.core.checkpoint())

    def get_extra_state(self):
        core = self._entry.core
        return {"store": self.store, "layer": self.layer,
                "step": core.steps() if core.training else None}

    def set_extra_state(self, state):
        if state.get("layer") != self.layer:
            raise ValueError(f"state dict of layer {state.get('layer')!r} loaded into layer "
                             f"{self.layer!r}")
        core = self._entry.core
        step = core.steps() if core.training else None
        if state.get("step") is not None and step is not None and state["step"] != step:
            warnings.warn(f"the state dict was taken at step {state['step']}, the store "
                          f"{self.store} holds step {step}'s expert tables")

    @property
    def last_stats(self):
        s = self._entry.stats
        return None if s is None else json.loads(s)

    def router_parameters(self):
        """The router's Parameters (W_q, its bias, keys, norm), for a torch optimizer."""
        return [p for p in (self.query_weight, self.query_bias, self.keys, self.norm_weight)
                if p is not None]

    @torch.no_grad()
    def routing(self, x):
        """(ids, gates), each [..., h, k] (int64, fp32; best first per head), that x routes to."""
        entry, c = self._entry, self.config
        _sync_router(entry, (self.query_weight, self.query_bias, self.keys, self.norm_weight))
        xt = _tokens(x, c["dim"], "x")
        shape = (*x.shape[:-1], c["heads"], c["topk"])
        y = torch.empty(xt.shape[0], c["dim_out"], dtype=torch.float32)
        ids = torch.empty(shape, dtype=torch.int64)
        gates = torch.empty(shape, dtype=torch.float32)
        entry.stats = entry.core.forward(xt, y, ids, gates)
        return ids, gates

    def forward(self, x):
        return torch.ops.trove.peer_forward(x, self._handle, self.query_weight, self.query_bias,
                                            self.keys, self.norm_weight)

    def extra_repr(self):
        c = self.config
        return (f"store={self.store!r}, layer={self.layer!r}, {self.record_dtype}, "
                f"D={c['dim']}, D_out={c['dim_out']}, experts={c['n_keys'] ** 2}, "
                f"heads={c['heads']}, topk={c['topk']}, topk_per_half={c['topk_per_half']}, "
                f"{c['activation']}, gate={c['gate']}")


_ACTIVATIONS = {nn.ReLU: "relu", nn.SiLU: "silu"}


def _activation_name(act):
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    for cls, name in _ACTIVATIONS.items():
        if isinstance(act, cls):
            return name
    raise ValueError(f"activation {type(act).__name__}: trove supports nn.ReLU, nn.GELU "
                     "(erf or tanh) and nn.SiLU")


def _describe_module(module):
    """(layout, tensors by name under the layout, config overrides) for a PEER module."""
    if hasattr(module, "weight_down_embed") and hasattr(module, "to_queries"):  # PEER-pytorch
        if getattr(module, "separate_embed_per_head", False):
            raise ValueError("PEER-pytorch module with separate_embed_per_head=True: trove's "
                             "layers share one expert table between heads (SPEC §2)")
        dropout = getattr(module, "dropout", None)
        if isinstance(dropout, nn.Dropout) and dropout.p > 0:
            warnings.warn(f"the module's dropout p={dropout.p} is not part of trove's layer "
                          "(it equals the module in eval mode)")
        softmax = isinstance(module.score_activation, nn.Softmax)
        if not softmax and not isinstance(module.score_activation, nn.ReLU):
            raise ValueError(f"score activation {type(module.score_activation).__name__}: "
                             "PEER-pytorch's are nn.Softmax and nn.ReLU")
        found = {"topk": int(module.num_experts_per_head_topk),
                 "topk_per_half": int(module.product_key_topk),
                 "gate": "softmax" if softmax else "relu",
                 "activation": _activation_name(module.activation)}
        return "lucidrains", dict(module.state_dict()), found
    if hasattr(module, "expert_down") and hasattr(module, "to_queries"):  # the background's
        found = {"activation": "silu", "gate": "relu"}
        topk = getattr(module, "topk", None)
        if topk is not None:
            found["topk"] = int(topk)
            found["topk_per_half"] = int(getattr(module, "topk_per_half", topk))
        state = {k: v for k, v in module.state_dict().items()
                 if k.split(".")[0] in ("to_queries", "keys", "expert_down", "expert_up")}
        return "mikeybeez", state, found
    raise ValueError(f"{type(module).__name__} is not a PEER module trove knows: expected "
                     "PEER-pytorch's PEER (weight_down_embed, weight_up_embed, to_queries, "
                     "keys) or the background's (to_queries, keys, expert_down, expert_up)")


class Int4SR:
    """SPEC §7's update of trove PEER modules' expert tables, in place, on the experts the
    backward passes since the last step touched:

        opt = tt.Int4SR(peer, lr=1e-2)        # also a list of PEER modules
        loss.backward(); opt.step(); opt.zero_grad(); peer.checkpoint()

    Each weight is an 8-bit training code b at scale d/16 inside trove (int4 value plus an
    accumulator nibble), moved by stochastic rounding of 16 * delta / d with a hash of (seed,
    step, expert, element), so a run is reproducible; row-wise Adagrad (one fp32 per row) or
    SGD; groups saturating by at most `saturation_tolerance` codes are clamped, beyond it the
    group's scale doubles (kernels/train.h). Gradients of several backward passes add up until
    step() (micro-batches), as torch's .grad does. The routers are ordinary Parameters: train
    them with any torch optimizer.
    """

    def __init__(self, peers, lr=1e-2, saturation_tolerance=64, optimizer="adagrad"):
        self.peers = [peers] if isinstance(peers, PEER) else list(peers)
        if not self.peers or not all(isinstance(p, PEER) for p in self.peers):
            raise ValueError("Int4SR trains trove.torch.PEER modules; got "
                             f"{[type(p).__name__ for p in self.peers]}")
        if not 0 <= saturation_tolerance <= 128:
            raise ValueError(f"saturation_tolerance {saturation_tolerance}: 0..128 codes")
        if optimizer not in ("adagrad", "sgd"):
            raise ValueError(f"optimizer {optimizer!r}: 'adagrad' or 'sgd'")
        for p in self.peers:
            if p.record_dtype != "int4":
                raise ValueError(f"layer {p.layer} of {p.store} holds {p.record_dtype} records; "
                                 "Int4SR trains int4 tables (pack with quant='int4')")
            p._enable_training()
        self.lr, self.saturation_tolerance, self.optimizer = lr, saturation_tolerance, optimizer
        self.last_stats = None

    def step(self):
        self.last_stats = [json.loads(p._entry.core.step(self.lr, self.saturation_tolerance,
                                                          self.optimizer))
                           for p in self.peers]

    def zero_grad(self, set_to_none=True):
        for p in self.peers:
            p._entry.core.zero_grad()

    def state_dict(self):
        return {"lr": self.lr, "saturation_tolerance": self.saturation_tolerance,
                "optimizer": self.optimizer,
                "steps": [p._entry.core.steps() for p in self.peers]}

    def load_state_dict(self, state):
        steps = [p._entry.core.steps() for p in self.peers]
        if state["steps"] != steps:
            raise ValueError(f"the optimizer state is at steps {state['steps']}, the stores at "
                             f"{steps}: load it with the stores it was checkpointed with")
        self.lr = state["lr"]
        self.saturation_tolerance = state["saturation_tolerance"]
        self.optimizer = state["optimizer"]


# ---- Engram (issue 18) ------------------------------------------------------------------------

class _EngramLookup(torch.autograd.Function):
    """rows [B, T, E] of the hashed ids through the C++ table; backward hands the segment-summed
    row gradients per table to the module (trove's tables are no torch tensors, so no dense
    table gradient is ever formed) and returns nothing for the anchor."""

    @staticmethod
    def forward(ctx, anchor, module, ids, b, t):
        out = torch.empty(b * t, module.concat_dim, dtype=torch.float32)
        if module._trainer is not None:
            # Training: the rows as the trainer holds them (the int8 training view).
            module._trainer.lookup(ids, b * t, out)
        else:
            module.last_stats = json.loads(module._core.lookup(ids, b * t, out))
        ctx.module, ctx.ids, ctx.n = module, ids, b * t
        return out.view(b, t, module.concat_dim)

    @staticmethod
    def backward(ctx, dy):
        m = ctx.module
        dy = dy.detach().to(torch.float32).contiguous().view(ctx.n, m.concat_dim)
        m.row_grads = [tuple(torch.from_numpy(a) for a in m._core.row_grads(ctx.ids, ctx.n, dy, k))
                       for k in range(m.tables)]
        if m._trainer is not None:
            for k, (ids, grads) in enumerate(m.row_grads):
                m._trainer.add_row_grads(k, ids, grads.contiguous())
        return None, None, None, None, None


class Engram(nn.Module):
    """A stored Engram layer (the background's LlamaEngram) as an nn.Module.

        eng = tt.Engram.from_module(llama_engram, "engram.trove", quant="f32", host="1GiB")
        y = eng(x, input_ids)          # x [B, T, D], input_ids [B, T] -> y [B, T, D]

    The (max_ngram - 1) * heads embedding tables are trove's: rows in the store, read through
    its tiers (all resident, or a host budget over the file), dequantized by trove's kernels.
    value_proj, key_proj, norm_k, norm_q and conv stay ordinary torch layers (Parameters any
    optimizer trains). Backward gives the dense layers and x their gradients through torch,
    and leaves the tables' gradients as `row_grads`: per table, (unique row ids, summed
    gradients [U, e]), the only rows a step touches.

    prefetch(input_ids) begins reading a batch's rows as soon as its tokens are known (they
    depend on nothing else); the forward with the same tokens then finishes the reads.
    prefetch_next(input_ids) looks one batch ahead: the next batch's reads begin as soon as this
    layer has looked up the current batch's rows, so they overlap the rest of this batch's
    forward and backward (outputs are the same bits either way).
    """

    def __init__(self, core, store, layer):
        super().__init__()
        self._core, self.store, self.layer = core, store, layer
        c = json.loads(core.config_json())
        self.config = c
        self.dim, self.max_ngram, self.heads = c["hidden"], c["max_ngram"], c["heads"]
        self.vocab, self.embed_per_head = c["vocab"], c["embed_per_head"]
        self.tables = (self.max_ngram - 1) * self.heads
        self.concat_dim = self.tables * self.embed_per_head
        k = c["kernel_size"]
        self.value_proj = nn.Linear(self.concat_dim, self.dim, bias=False)
        self.key_proj = nn.Linear(self.concat_dim, self.dim, bias=False)
        self.norm_k = nn.RMSNorm(self.dim, eps=c["norm_eps"])
        self.norm_q = nn.RMSNorm(self.dim, eps=c["norm_eps"])
        self.conv = nn.Conv1d(self.dim, self.dim, k, padding=k - 1, groups=self.dim, bias=False)
        with torch.no_grad():
            for name, mod in (("value_proj", self.value_proj), ("key_proj", self.key_proj),
                              ("norm_k", self.norm_k), ("norm_q", self.norm_q),
                              ("conv", self.conv)):
                w = torch.tensor(core.dense(f"{name}.weight"), dtype=torch.float32)
                mod.weight.copy_(w.view_as(mod.weight))
        self.register_buffer("hash_mult", torch.tensor(c["hash_mult"], dtype=torch.long))
        self._anchor = torch.empty(0, requires_grad=True)
        self._trainer = None
        self._pending = None
        self._next = None
        self.row_grads = None
        self.last_stats = None

    @classmethod
    def open(cls, store, layer, host=None, policy="frequency", threads=1, verify=True):
        """Opens Engram layer `layer` of `store`; host: a byte budget ("8GiB") for the host tier
        over the file, else every record read once (verified) and kept."""
        core = _core.EngramTable(os.fspath(store), layer, _bytes_arg(host), policy, threads,
                                 verify)
        return cls(core, os.fspath(store), layer)

    @classmethod
    def from_module(cls, module, path, quant="int4", host=None, layer="engram", threads=1):
        """Packs the background's LlamaEngram (or trove.background.BackgroundEngram) into a new
        store at `path` (replaced atomically) and opens it. quant: int4, int8, bf16, f16 or f32
        (f32 is lossless)."""
        state = module.state_dict()
        need = {"value_proj.weight", "key_proj.weight", "norm_k.weight", "norm_q.weight",
                "conv.weight", "hash_mult", "embeddings.0.weight"}
        missing = sorted(need - set(state))
        if missing:
            raise ValueError(f"{type(module).__name__} is not an Engram module of the background's "
                             f"layout: its state dict lacks {missing}")
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".trove-from-module-", suffix=".safetensors",
                                   dir=folder)
        os.close(fd)
        try:
            from safetensors.torch import save_file
            save_file({f"{layer}.{k}": v.detach().cpu().contiguous() for k, v in state.items()},
                      tmp)
            _core.pack([tmp], path, "mikeybeez", [], [], quant, "{}", threads=threads,
                       command_line="trove.torch.Engram.from_module(mikeybeez)",
                       engram_prefixes=[layer], engram_names=[layer])
        finally:
            os.unlink(tmp)
        return cls.open(path, layer, host=host, threads=threads)

    def _enable_training(self, seed, optimizer, saturation_tolerance, table_id):
        if self._trainer is None:
            if self.config["dtype"] != "int4":
                raise ValueError(f"layer {self.layer} of {self.store} holds "
                                 f"{self.config['dtype']} rows; EngramInt4SR trains int4 rows "
                                 "(pack with quant='int4')")
            self._trainer = _core.EngramTrainer(self.store, self.layer, seed, optimizer,
                                                saturation_tolerance, table_id)

    def checkpoint(self):
        """Writes the rows trained since the last checkpoint as the store's next generation,
        crash-safe, and returns it: the served int4 rows, and in the state layer "<layer>.train"
        the training view's finer codes, the Adagrad accumulators, the step and the seed, so a
        trainer opened on the store later resumes exactly (runtime/engram/engram_trainer.h). The
        first checkpoint adds the state layer by rewriting the store (generation 1)."""
        if self._trainer is None:
            raise ValueError("checkpoint(): nothing trains this Engram layer's rows (make an "
                             "EngramInt4SR over it first)")
        return self._trainer.checkpoint()

    def preload(self):
        """Reads the whole table once (opened without a host budget: all resident from then
        on)."""
        self._core.preload()

    def hash(self, tokens):
        """Row ids [tables, B, T] (int64) of tokens [B, T], by trove's kernel."""
        tokens = tokens.detach().to(device="cpu", dtype=torch.long).contiguous()
        b, t = tokens.shape
        ids = torch.empty(self.tables, b, t, dtype=torch.long)
        self._core.hash(tokens, b, t, ids)
        return ids

    def prefetch(self, tokens):
        """Begins reading the rows of tokens [B, T]; the forward over the same tokens finishes.
        A prefetch of other tokens is dropped; one of the same tokens already on its way
        continues."""
        if self._pending_ids(tokens) is not None:
            return
        ids = self.hash(tokens)
        self._core.prefetch(ids, ids.shape[1] * ids.shape[2])
        self._pending = (tokens.detach().cpu().clone(), ids)

    def _pending_ids(self, tokens):
        """The hashed ids of the pending prefetch when it is of `tokens`, else None."""
        if self._pending is None:
            return None
        old, ids = self._pending
        return ids if old.shape == tokens.shape and torch.equal(old, tokens.detach().cpu()) else None

    def prefetch_next(self, tokens):
        """Queues the rows of the batch after the one being computed, tokens [B, T]: their reads
        begin once this layer has looked up the current batch's rows (at once if no batch is
        pending). Look-ahead of one batch; the host tier needs room for one batch's rows."""
        if self._pending is None:
            self.prefetch(tokens)
        else:
            self._next = tokens.detach().cpu().clone()

    def lookup(self, tokens):
        """The concatenated rows [B, T, E] of tokens [B, T] (fp32, CPU)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens have shape {tuple(tokens.shape)}; expected [B, T]")
        b, t = tokens.shape
        ids = self._pending_ids(tokens)
        self._pending = None
        if ids is None:
            ids = self.hash(tokens)
        rows = _EngramLookup.apply(self._anchor, self, ids, b, t)
        if self._next is not None:
            nxt, self._next = self._next, None
            self.prefetch(nxt)
        return rows

    def forward(self, x, tokens):
        if x.dim() != 3 or x.shape[:2] != tokens.shape or x.shape[-1] != self.dim:
            raise ValueError(f"x {tuple(x.shape)} and tokens {tuple(tokens.shape)}: expected "
                             f"[B, T, {self.dim}] and [B, T]")
        rows = self.lookup(tokens).to(device=x.device, dtype=x.dtype)
        return _engram_mix(self, x, rows)

    def extra_repr(self):
        c = self.config
        return (f"store={self.store!r}, layer={self.layer!r}, D={self.dim}, "
                f"orders=2..{self.max_ngram}, heads={self.heads}, vocab={self.vocab}, "
                f"e={self.embed_per_head}, rows={c['dtype']}, {c['source']}")


def prefetch_engram(model, input_ids, next_input_ids=None):
    """Begins reading every Engram layer's rows of `input_ids` [B, T] (call as soon as a batch's
    tokens are known, before the layers in front of the Engram layers run). With
    `next_input_ids`, each layer also reads the next batch's rows as soon as it has looked up
    this batch's (Engram.prefetch_next)."""
    for m in model.modules():
        if isinstance(m, Engram):
            m.prefetch(input_ids)
            if next_input_ids is not None:
                m.prefetch_next(next_input_ids)


class EngramInt4SR:
    """Trains the int4 rows of trove.torch.Engram modules (SPEC §7: stochastic rounding,
    row-wise Adagrad or SGD) on the rows the last backward touched; the dense layers go to any
    torch optimizer. step() applies the pending row gradients, zero_grad() drops them."""

    def __init__(self, engrams, lr=1e-2, optimizer="adagrad", seed=0, saturation_tolerance=0):
        self.engrams = [engrams] if isinstance(engrams, Engram) else list(engrams)
        if not self.engrams or not all(isinstance(e, Engram) for e in self.engrams):
            raise ValueError("EngramInt4SR trains trove.torch.Engram modules; got "
                             f"{[type(e).__name__ for e in self.engrams]}")
        if optimizer not in ("adagrad", "sgd"):
            raise ValueError(f"optimizer {optimizer!r}: 'adagrad' or 'sgd'")
        for i, e in enumerate(self.engrams):
            e._enable_training(seed, optimizer, saturation_tolerance, i)
        self.lr = lr
        self.last_stats = None

    def step(self):
        self.last_stats = [json.loads(e._trainer.step(self.lr)) for e in self.engrams]

    def zero_grad(self, set_to_none=True):
        for e in self.engrams:
            e._trainer.zero_grad()
