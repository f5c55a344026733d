"""CPU inference weights: q/k/v and gate/up fused into one matrix each, and every linear weight reordered
once into oneDNN's blocked layout, so that a decode step is a few large matrix-vector products.

Why: at batch 1 a decode step is bound by reading the weights. Stock bf16 `F.linear` on CPU re-lays out
the weight on every call (slow), fp32 `F.linear` reads a plain weight at ~half the speed of the blocked
one at real sizes (4096 x 22016: 40 vs 23 ms on one AVX2 core), and separate q/k/v and gate/up calls
multiply per-call overhead. bf16 results are bit-identical to `F.linear`; fp32 results differ in
summation order (~1e-6 relative).

Weights are held once (in_place=True, the default): each group's packed tensor is built from the plain
weights, then the plain ones are released (a large group in pieces, see PIECE_BYTES); the parameters keep
their names, shapes, dtype and device but hold no memory (a zero-stride placeholder). `unpack` rebuilds the plain weights from the packed ones
(oneDNN's reorder back to plain, exact), and `state_dict()` of a packed model unpacks it first, so saving
and training see the real weights. A tied lm_head (= the embedding, which lookups need plain) stays plain.
in_place=False keeps the plain weights beside the packed ones (twice the memory), for the compiled decode
step, which reads the plain weights.

Packing sets the `packed` attribute of linear layers and the `fused_qkv` / `fused_gate_up` hooks that
`llamazoo.model.llama` uses in eager mode; `unpack` removes them. A model with int8 / int4 layers
(llamazoo.model.quantize) gets their fused form instead (one kernel call for q/k/v, one for gate/up), and
bf16 weights on a CPU without oneDNN bf16 kernels the same through llamazoo's C kernel (`KernelLinear`: the
weights as they are, nothing packed); fp32 weights packed for decoding (batch_hint up to BATCHED_HINT:
generate, serve) take that kernel for every projection and the LM head instead of oneDNN's layout. Where the
C kernels run, one-token steps go further: `StackedDecode` runs every decoder layer of a step in one C call
(cpu_decode.c), for bf16, fp32 and int8 / int4 models alike.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from llamazoo.io.mapped import discard_pages, release_pages, trim_heap
from llamazoo.kernels import cpu as cpu_kernels
from llamazoo.model.llama import _slow_bf16_gemm, linear
from llamazoo.model.quantize import FusedWeightOnly, WeightOnlyLinear, fuse_quantized

PACKABLE = (torch.float32, torch.bfloat16)

# oneDNN's weight layout depends on the batch it is packed for. Measured (fp32, 2 threads, AVX2 EPYC, ms per
# matmul at 1 / 2 / 8 / 32 / 128 rows): SmolLM2's gate/up 3072x576 packed for 1 row 0.30 / 0.55 / 0.88 /
# 1.47 / 4.05, for 32 rows 0.32 / 0.33 / 0.47 / 0.96 / 3.11; Llama-2-7b's down 4096x11008 for 1 row
# 6.4 / 11.2 / 15.6 / 29.8 / 111, for 128 rows 6.5 / 6.6 / 9.9 / 22.0 / 75; but 7b's gate/up 22016x4096 at
# one row 8.6 ms packed for 1 row, 12.2-12.8 for 32-128. So: 1 row for batch-1 decode, BATCHED_HINT for
# batched decoding (serve, generate batches), SCORING_HINT for whole sequences (eval).
BATCHED_HINT = 32
SCORING_HINT = 128


def _available() -> bool:
    return hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and torch.backends.mkldnn.is_available()


def _placeholder(p: torch.Tensor) -> torch.Tensor:
    """A tensor of p's shape, dtype and device that holds no memory (all zeros, zero strides)."""
    return torch.zeros((), dtype=p.dtype, device=p.device).expand(p.shape)


# In place, a group larger than a piece is packed in pieces of rows (within one member each), and each
# piece's plain rows are given back as soon as it is packed, so the transient is one piece, not the group
# twice: weights converted at load (a bf16 folder run in fp32) are not a file mapping whose pages come back
# on their own. Measured on a 214 MB model loaded from bf16 as fp32: peak 1.25x the weights + KV cache with
# whole groups, 1.06x with 8 MB pieces. A piece is 1/16 of the linear weights, between 8 and 64 MB: one
# oneDNN call each (~24 us), against ~2 ms to stream 64 MB.
PIECE_BYTES = 64 << 20
MIN_PIECE_BYTES = 8 << 20


def piece_bytes(model: nn.Module) -> int:
    return min(PIECE_BYTES, max(MIN_PIECE_BYTES, linear_bytes(model) // 16))


class PackedLinear:
    """y = x W^T + b with W prepacked for oneDNN; optionally split into several outputs.

    `members` are the nn.Linear layers whose weights W stacks (rows in order); with `in_place` their
    parameters hold placeholders while packed, and `restore` gives them their weights back. W is packed
    as one matrix (one call: q/k/v or gate/up fused), or in place and above PIECE_BYTES, in row pieces
    whose outputs are concatenated (each output is the same dot product either way: the same numbers)."""

    def __init__(self, members: Sequence[nn.Linear], in_place: bool, batch_hint: int = 1,
                 piece: int = PIECE_BYTES):
        self.members = list(members)
        self.in_place = in_place
        # a weight whose memory nothing else holds (not a state_dict kept by the caller, say) may lose its
        # pages while it is packed; others only lose pages that a file mapping gives back again
        sole = in_place and all(_sole_owner(m.weight) for m in self.members)
        ws = [m.weight.detach() for m in self.members]
        total = sum(w.numel() * w.element_size() for w in ws)
        if not in_place or total <= piece:
            plain = ws[0] if len(ws) == 1 else torch.cat(ws)
            self.pieces = [torch.ops.mkldnn._reorder_linear_weight(plain, batch_hint)]
            del plain
        else:
            self.pieces = []
            for w in ws:
                rows = max(64, piece // (w.shape[1] * w.element_size()) // 64 * 64)
                for start in range(0, w.shape[0], rows):
                    part = w[start:start + rows]
                    self.pieces.append(torch.ops.mkldnn._reorder_linear_weight(part, batch_hint))
                    if sole:  # never read again: the parameters get placeholders below
                        discard_pages(part)
                    else:
                        release_pages([part])
        if in_place:
            old = [m.weight.data for m in self.members]
            for m in self.members:
                m.weight.data = _placeholder(m.weight)
            release_pages(old)  # weights mmapped from a file: their pages go now, not with the whole file
        del ws
        bias = _cat_bias(self.members)
        sizes = [p.size(0) for p in self.pieces]
        self.biases = [None] * len(sizes) if bias is None else list(bias.split(sizes))
        self.split = [m.out_features for m in self.members] if len(self.members) > 1 else None

    def __call__(self, x: torch.Tensor):
        if len(self.pieces) == 1:
            y = torch.ops.mkldnn._linear_pointwise(x, self.pieces[0], self.biases[0], "none", [], "")
        else:
            y = torch.cat([torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
                           for w, b in zip(self.pieces, self.biases)], dim=-1)
        return y.split(self.split, dim=-1) if self.split else y

    @torch.no_grad()
    def restore(self) -> None:
        """Gives the members their plain weights back (from the packed tensors: exact). Piece by piece into
        fresh tensors, each piece freed once copied: the new pages become resident as the old ones go."""
        if not self.in_place:
            return
        plains = [torch.empty(m.weight.shape, dtype=m.weight.dtype, device=m.weight.device) for m in self.members]
        at = 0  # the next row of the members' concatenation
        for i in range(len(self.pieces)):
            dense = self.pieces[i].to_dense()
            self.pieces[i] = None
            first = 0  # member j holds rows [first, first + its rows) of the concatenation
            for plain in plains:
                lo, hi = max(at, first), min(at + dense.shape[0], first + plain.shape[0])
                if lo < hi:
                    plain[lo - first:hi - first] = dense[lo - at:hi - at]
                first += plain.shape[0]
            at += dense.shape[0]
            del dense
            trim_heap()  # the freed piece goes back to the system even if it lay in the heap
        for m, plain in zip(self.members, plains):
            m.weight.data = plain
        self.pieces = []
        self.in_place = False


class KernelLinear:
    """Linear layers through llamazoo's C kernel (`MultiLinear`) on their weights as they are (nothing copied
    or packed), for every call without autograd: decode steps and prompts (the kernel's panel path).
    Several members (q/k/v, gate/up) run in one call and come back as a tuple (`fused_qkv`, `fused_gate_up`);
    one member is a layer's `packed` and gives a tensor. Autograd and any other case take the layer's
    usual path. Each output is the number the member's own kernel call gives, whatever the batch or the
    prompt length. Used for bf16 weights where oneDNN has no bf16 kernels (AVX2), and for fp32 generate and
    serve, where the kernel beats oneDNN's packed weights at a few rows and torch's GEMM at prompts (2
    threads, fp32, ms at 16 / 32 / 128 rows: Llama-2-7b's gate 11008 x 4096, F.linear 62 / 75 / 170, its
    weight-first product (W x^T)^T 29 / 39 / 101, the kernel 15 / 25 / 89; SmolLM2 prompts of 7 x 24
    tokens in one pass 423-488 -> 372-416 ms)."""

    def __init__(self, members: Sequence[nn.Linear]):
        self.members = list(members)
        self.weights = [m.weight for m in self.members]
        self.kernel = cpu_kernels.MultiLinear([w.detach() for w in self.weights])
        self.split = [m.out_features for m in self.members]

    @staticmethod
    def fits(members: Sequence[nn.Module], dtype: torch.dtype) -> bool:
        def one(m: nn.Module) -> bool:
            w = m.weight
            return (type(m) is nn.Linear and m.bias is None and w.dtype == dtype and w.device.type == "cpu"
                    and type(w) is nn.Parameter and w.is_contiguous() and w.shape[1] % 8 == 0
                    and (dtype == torch.float32 or _slow_bf16_gemm(w)))
        return (cpu_kernels.available() and all(one(m) for m in members)
                and len({m.in_features for m in members}) == 1)

    def _plain(self, x: torch.Tensor):
        if len(self.members) > 1:
            return tuple(linear(x, m) for m in self.members)
        m = self.members[0]
        return F.linear(x, m.weight, m.bias)

    def __call__(self, x: torch.Tensor):
        if (torch.is_grad_enabled() or x.dtype not in (torch.float32, self.kernel.dtype)
                or any(m.weight is not w for m, w in zip(self.members, self.weights))):
            return self._plain(x)
        y = self.kernel(x, out_dtype=x.dtype)
        return y.split(self.split, dim=-1) if len(self.members) > 1 else y


def install_kernels(model: nn.Module, dtype: torch.dtype, singles: bool) -> bool:
    """KernelLinear q/k/v and gate/up (and with `singles` o_proj, down_proj and the LM head, tied or not:
    nothing is copied) where they fit; returns whether any was installed."""
    done = False
    for owner, attr, group in _groups(model, tied_head=True):
        if not singles and attr == "packed":
            continue
        if owner.__dict__.get(attr) is None and KernelLinear.fits(group, dtype):
            setattr(owner, attr, KernelLinear(group))
            done = True
    return done


class StackedDecode:
    """A model's one-token eager steps through llamazoo's decode-stack kernel (`cpu_kernels.DecoderStack`: every
    layer in one call; the ~90 torch ops per layer around the matmuls, ~16 ms of a 28 ms SmolLM2 bf16 step,
    become microseconds), installed as the model's `decode_stack`. It reads the weights as they are; a step where any was replaced since (or a cache the
    kernel cannot read) returns None and the model runs its layers as usual."""

    def __init__(self, model: nn.Module, stack: cpu_kernels.DecoderStack, held: list[tuple[nn.Module, str, object]]):
        self.attns = [layer.self_attn for layer in model.model.layers]
        self.stack = stack
        # held: (module, attribute, tensor) the kernel reads; each step checks them in the dict nn.Module keeps
        # them in (getattr through nn.Module.__getattr__ for ~270 tensors (SmolLM2) cost 1.3 ms of a 21 ms step)
        self._slots = [(self._home(mod, attr), attr, t) for mod, attr, t in held]

    @staticmethod
    def _home(mod: nn.Module, attr: str) -> dict:
        for d in (mod.__dict__, mod._parameters, mod._buffers):
            if attr in d:
                return d
        raise AttributeError(f"{type(mod).__name__} has no {attr}")

    def __call__(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                 cache_pos: torch.Tensor, logits: bool = False) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(h after the layers [B, 1, D], with `logits` the fp32 logits [B, V] of the final norm and head where
        the stack has them, else None), or None where the stack does not apply to this step."""
        B, _, D = h.shape
        for home, attr, t in self._slots:
            if home.get(attr) is not t:
                return None
        caches = []
        for attn in self.attns:  # through the modules' dicts: nn.Module.__getattr__ costs ~1.5 us a lookup
            c = attn._modules.get("kv_cache")
            if c is None:
                return None
            k, v = c._buffers["k"], c._buffers["v"]
            if k.dtype != self.stack.dtype or not k.is_contiguous() or not v.is_contiguous():
                return None
            caches.append((k, v))
        W = mask.shape[-1]
        if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1 or mask.shape[0] not in (1, B):
            return None
        slot = cache_pos.reshape(-1)
        if slot.numel() not in (1, B):
            return None
        hd = self.stack.head_dim
        logits = logits and self.stack.vocab > 0
        h, y = self.stack(h.reshape(B, D).contiguous(), caches, slot.expand(B), mask.reshape(-1, W).expand(B, W),
                          cos.reshape(-1, hd).expand(B, hd), sin.reshape(-1, hd).expand(B, hd), logits=logits)
        return h.view(B, 1, D), y


def _projection(mods: Sequence[nn.Module], fused: object, dtype: torch.dtype,
                held: list) -> cpu_kernels.Projection | None:
    """The decode stack's view of q/k/v, gate/up or one layer: plain bf16 / fp32 weights (any number), or int8 /
    int4 layers with llamazoo's kernels (several only as their fused matrix); None where it cannot run them."""
    if all(type(m) is nn.Linear for m in mods):
        if not all(m.bias is None and type(m.weight) is nn.Parameter and m.weight.dtype == dtype
                   and m.weight.device.type == "cpu" and m.weight.is_contiguous() and m.in_features % 8 == 0
                   and not hasattr(m.weight, "placements") for m in mods):
            return None
        held += [(m, "weight", m.weight) for m in mods]
        return cpu_kernels.Projection("fp32" if dtype == torch.float32 else "bf16", [m.weight.detach() for m in mods])
    if not all(isinstance(m, WeightOnlyLinear) and m.kernel in ("lz8", "lz4") and m.bias is None
               and m.compute_dtype == dtype for m in mods):
        return None
    kind = "int8" if mods[0].kernel == "lz8" else "int4"
    if len(mods) == 1:
        m = mods[0]
        held.append((m, "weight_q", m.weight_q))
        return cpu_kernels.Projection(kind, [m.weight_q], m._scale, m.group_size)
    if not isinstance(fused, FusedWeightOnly) or fused.bias is not None:
        return None
    held += [(m, "weight_q", m.weight_q) for m in mods]
    return cpu_kernels.Projection(kind, [fused.codes], fused.scale, fused.group_size)


def decode_stack_fits(model: nn.Module) -> bool:
    """Whether `install_decode_stack` can run this model's decode steps: every layer's weights plain bf16 or
    fp32 without biases (or llamazoo's int8 / int4 layers, q/k/v and gate/up fused); an fp32 residual stream
    (fp32 weights, or fp32_skip_add); CPU kernels built."""
    return _stack_specs(model) is not None


def _stack_specs(model: nn.Module) -> tuple[list[dict], list] | None:
    dtype = model.lm_head.weight.dtype
    if (not cpu_kernels.available() or dtype not in (torch.float32, torch.bfloat16)
            or (dtype == torch.bfloat16 and not model.opts.fp32_skip_add)):
        return None
    head_dim = model.model.layers[0].self_attn.head_dim
    if head_dim % 2 or head_dim > 1024:
        return None
    layers, held = [], []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if any(n.weight.dtype != dtype or n.eps != norms[0].eps for n in norms):
            return None
        spec = {"attn_norm": norms[0].weight.detach(), "mlp_norm": norms[1].weight.detach(),
                "qkv": _projection([a.q_proj, a.k_proj, a.v_proj], a.fused_qkv, dtype, held),
                "o": _projection([a.o_proj], None, dtype, held),
                "gate_up": _projection([m.gate_proj, m.up_proj], m.fused_gate_up, dtype, held),
                "down": _projection([m.down_proj], None, dtype, held)}
        if any(v is None for v in spec.values()):
            return None
        held += [(n, "weight", n.weight) for n in norms]
        layers.append(spec)
    return layers, held


def _head_spec(model: nn.Module, held: list) -> tuple[torch.Tensor, cpu_kernels.Projection] | None:
    """The final norm and the LM head as the decode stack runs them after the layers (None: the model runs
    them, e.g. a LoRA head or another eps)."""
    norm, eps = model.model.norm, model.model.layers[0].input_layernorm.eps
    if norm.weight.dtype != model.lm_head.weight.dtype or norm.eps != eps:
        return None
    mine: list = []
    head = _projection([model.lm_head], None, norm.weight.dtype, mine)
    if head is None:
        return None
    held += mine + [(norm, "weight", norm.weight)]
    return norm.weight.detach(), head


def install_decode_stack(model: nn.Module) -> bool:
    """Sets the model's `decode_stack` (StackedDecode) where `decode_stack_fits`; returns whether it did."""
    specs = _stack_specs(model)
    if specs is None:
        return False
    layers, held = specs
    final_norm, head = _head_spec(model, held) or (None, None)
    dtype = model.lm_head.weight.dtype
    a = model.model.layers[0].self_attn
    try:
        stack = cpu_kernels.DecoderStack(
            layers, heads=a.q_proj.out_features // a.head_dim, kv_heads=a.k_proj.out_features // a.head_dim,
            head_dim=a.head_dim, dtype=dtype, eps=model.model.layers[0].input_layernorm.eps,
            fp32_ln=model.opts.fp32_ln, mixedp_attn=model.opts.mixedp_attn, final_norm=final_norm, head=head)
    except ValueError:
        return False
    model.decode_stack = StackedDecode(model, stack, held)
    return True


def _sole_owner(t: torch.Tensor) -> bool:
    """Whether t is the only tensor using its memory (a fresh tensor's storage use count, or less)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None or t.device.type != "cpu":
        return False
    fresh = torch.empty(1)
    mine, theirs = t.untyped_storage(), fresh.untyped_storage()  # both held while counted: one use each
    return count(mine._cdata) <= count(theirs._cdata)


def _cat_bias(mods: Sequence[nn.Linear]) -> torch.Tensor | None:
    if all(m.bias is None for m in mods):
        return None
    if len(mods) == 1:
        return mods[0].bias.detach()
    return torch.cat([m.bias.detach() if m.bias is not None else torch.zeros(m.out_features, dtype=m.weight.dtype)
                      for m in mods])


def linear_bytes(model: nn.Module) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Linear))


def _groups(model: nn.Module, tied_head: bool = False) -> list[tuple[nn.Module, str, list[nn.Module]]]:
    """(owner, attribute, layers) of every group packed into one matrix (a tied LM head only if asked)."""
    out = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        out += [(a, "fused_qkv", [a.q_proj, a.k_proj, a.v_proj]), (m, "fused_gate_up", [m.gate_proj, m.up_proj]),
                (a.o_proj, "packed", [a.o_proj]), (m.down_proj, "packed", [m.down_proj])]
    if tied_head or model.lm_head.weight is not model.model.embed_tokens.weight:  # oneDNN: a tied head stays plain
        out.append((model.lm_head, "packed", [model.lm_head]))
    return out


def can_pack(model: nn.Module, in_place: bool = True) -> str | None:
    """None when packing applies, else why not."""
    w = model.lm_head.weight
    layers = [lin for _, _, group in _groups(model) for lin in group]
    if any(type(lin) is not nn.Linear for lin in layers):  # packing would take a base weight alone
        return ("the model has unmerged LoRA adapters or quantized layers (packing takes plain nn.Linear "
                "weights; llamazoo.model.lora.merge_lora merges adapters)")
    if not _available():
        return "this torch build has no oneDNN linear ops"
    if w.device.type != "cpu":
        return "weights are not on the CPU"
    if w.dtype not in PACKABLE:
        return f"dtype {w.dtype} is not packed (float32 and bfloat16 are)"
    if w.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this CPU has no oneDNN bfloat16 kernels (they need AVX512BW/VL/DQ or AVX-NE-CONVERT)"
    if any(type(p) is not torch.nn.Parameter and type(p) is not torch.Tensor for p in model.parameters()):
        return "weights are sharded tensors"
    try:
        import psutil

        group_bytes = [sum(lin.weight.numel() * lin.weight.element_size() for lin in g) for _, _, g in _groups(model)]
        # in place: one group's plain concatenation and its packed copy at a time; else a whole second copy
        need = 2 * max(group_bytes) if in_place else sum(group_bytes)
        if psutil.virtual_memory().available < need + (1 << 30):
            return "not enough free memory to pack the weights"
    except ImportError:
        pass
    return None


def _in_place(model: nn.Module) -> bool:
    return any(isinstance(p, PackedLinear) and p.in_place
               for mod in model.modules() for p in (mod.__dict__.get(a) for a in ("packed", "fused_qkv", "fused_gate_up")))


def _unpack_before_state_dict(model: nn.Module, *args, **kwargs) -> None:
    unpack(model)


@torch.no_grad()
def pack_for_inference(model: nn.Module, in_place: bool = True, batch_hint: int = 1,
                       tied_head_copy: bool = False) -> bool:
    """Installs packed, fused projections on a LlamaForCausalLM; returns False (and changes nothing)
    when `can_pack` says no. in_place=True releases the plain weights (see the module docstring).

    batch_hint: the rows per matmul the blocked layout is chosen for (see BATCHED_HINT); a model already
    packed keeps its layout. tied_head_copy: a tied LM head gets a packed copy beside the embedding (which
    lookups need plain): the head's bytes twice, for a head matmul ~2x as fast at batched decoding."""
    if getattr(model, "packed_for_inference", False):
        if in_place or not _in_place(model):
            return True
        unpack(model)  # plain weights wanted beside the packed ones
    if any(isinstance(m, WeightOnlyLinear) for m in model.modules()):
        done = fuse_quantized(model, release_pages)  # int8 / int4 layers: their kernels, q/k/v and gate/up fused
        if done:
            install_decode_stack(model)
        return done
    if any(type(lin) is not nn.Linear for _, _, group in _groups(model) for lin in group):
        return False  # unmerged adapters (can_pack says so): every path here takes the base weights alone
    dtype = model.lm_head.weight.dtype
    if dtype == torch.float32 and batch_hint <= BATCHED_HINT and in_place and install_kernels(model, dtype, True):
        # fp32 decoding: llamazoo's C kernels on the plain weights, every layer in one call (install_decode_stack)
        install_decode_stack(model)
        _mark_installed(model)
        return True
    if can_pack(model, in_place) is not None:
        # bf16 where oneDNN has no bf16 kernels: q/k/v and gate/up fused through llamazoo's C kernel instead
        # (single layers take it in llamazoo.model.llama.linear)
        if dtype == torch.bfloat16 and install_kernels(model, dtype, False):
            install_decode_stack(model)
            _mark_installed(model)
            return True
        return False
    # largest first: while a group is packed its plain and packed bytes are both resident, and packing the
    # big ones (the LM head) before the rest is resident keeps the peak near the weights' size
    piece = piece_bytes(model)
    for owner, attr, group in sorted(_groups(model), key=lambda g: -sum(m.weight.numel() for m in g[2])):
        setattr(owner, attr, PackedLinear(group, in_place, batch_hint, piece))
    head = model.lm_head
    if tied_head_copy and head.weight is model.model.embed_tokens.weight and type(head) is nn.Linear:
        head.packed = PackedLinear([head], in_place=False, batch_hint=batch_hint)
    model.packed_for_inference = True
    if in_place and not hasattr(model, "_unpack_hook"):
        model._unpack_hook = model.register_state_dict_pre_hook(_unpack_before_state_dict)
    return True


def _mark_installed(model: nn.Module) -> None:
    model.packed_for_inference = True
    if not hasattr(model, "_unpack_hook"):  # state_dict() and training see plain modules again
        model._unpack_hook = model.register_state_dict_pre_hook(_unpack_before_state_dict)


@torch.no_grad()
def unpack(model: nn.Module) -> None:
    """Back to the plain modules and weights (e.g. before training or saving the weights again)."""
    for mod in model.modules():
        for attr in ("packed", "fused_qkv", "fused_gate_up"):
            p = mod.__dict__.get(attr)
            if isinstance(p, PackedLinear):
                p.restore()
            if isinstance(p, (PackedLinear, FusedWeightOnly, KernelLinear)):
                if attr == "packed":
                    del mod.packed
                else:
                    setattr(mod, attr, None)
    model.__dict__.pop("decode_stack", None)
    model.packed_for_inference = False
    hook = model.__dict__.pop("_unpack_hook", None)
    if hook is not None:
        hook.remove()
