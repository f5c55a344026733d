"""Memory planner: per-device bytes for a model, precision, batch and parallel layout, before buying GPUs.

Closed forms, per device (P = parameters this device holds after tensor parallel; FSDP divides by the
data-parallel size; bytes per parameter follow what llamazoo's trainer keeps):

  fp32 training           weights 4, gradients 4, optimizer 8 (AdamW exp_avg + exp_avg_sq)
  bf16 training, DDP      weights 2 (bf16), gradients 2, optimizer 12 (fp32 master copy + AdamW states)
  bf16 training, FSDP2    weights 4 (fp32 shards; MixedPrecisionPolicy computes in bf16), gradients 4,
                          optimizer 8, plus the bf16 all-gather buffers of the layers in flight
  generation              weights only, plus the KV cache: 2 x layers x batch x length x KV heads/TP x head_dim
  LoRA (method lora)      the frozen base in the training dtype (no gradients, no optimizer states), adapters
                          r x (in + out) per adapted projection with gradients and AdamW (+ fp32 masters in bf16)
  QLoRA (method qlora)    the same, the decoder projections stored in NF4 (0.516 bytes per weight: 4-bit codes,
                          8-bit absmax per 64, fp32 scale per 256 blocks) plus one projection dequantized at a time

Activations are what autograd saves per token and layer in llamazoo's model (residual stream in fp32 by
default, RoPE copies of q and k, SDPA output, four MLP tensors), plus the LM head's fp32 log-softmax;
with activation checkpointing only each layer's input is kept and one layer is recomputed at a time.
The estimate is tested against a measured CPU step (tests/test_plan.py). Not counted: the CUDA context
and allocator fragmentation, which `headroom` reserves.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from llamazoo.model.llama import LlamaConfig

GiB = 1024**3
MODES = ("train", "generate")
DTYPE_BYTES = {"fp32": 4, "bf16": 2}


@dataclass
class Layout:
    """How the devices are used: tensor-parallel size x data-parallel size (DDP replicas or FSDP shards)."""

    tp: int = 1
    dp: int = 1
    data_parallel: str = "ddp"  # ddp | fsdp

    @property
    def devices(self) -> int:
        return self.tp * self.dp

    @property
    def shards(self) -> int:
        """How many ways FSDP splits weights, gradients and optimizer states."""
        return self.dp if self.data_parallel == "fsdp" else 1

    def describe(self) -> str:
        parts = [f"TP {self.tp}"] if self.tp > 1 else []
        if self.dp > 1:
            parts.append(f"{'FSDP' if self.data_parallel == 'fsdp' else 'DDP'} {self.dp}")
        return (" x ".join(parts) or "1 device") + (f" ({self.devices} devices)" if self.devices > 1 else "")


@dataclass
class Workload:
    mode: str = "train"  # train | generate
    dtype: str = "bf16"  # fp32 | bf16
    batch_size: int = 1  # per device (per data-parallel rank); for generation the whole batch
    seq_len: int = 2048  # training sequence length, or prompt + new tokens for generation
    activation_checkpointing: bool = False
    fp32_skip_add: bool = True  # the residual stream in fp32 (the Model Zoo's default)
    method: str = "full"  # full | lora | qlora (training.lora.rank > 0; qlora: base_quantization nf4)
    lora_rank: int = 16  # adapters on all seven decoder projections (training.lora.target_modules' default)


@dataclass
class MemoryPlan:
    """Bytes per device, by category, and whether they fit."""

    layout: Layout
    workload: Workload
    params_per_device: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    kv_cache: int
    fsdp_buffers: int
    device_bytes: int
    headroom: float
    rows: dict[str, int] = field(default_factory=dict)
    adapters: int = 0  # LoRA: the adapter weights (`weights` is then the frozen base)
    dequant_buffer: int = 0  # QLoRA: the projection being dequantized

    @property
    def total(self) -> int:
        return (self.weights + self.adapters + self.gradients + self.optimizer + self.activations + self.kv_cache
                + self.fsdp_buffers + self.dequant_buffer)

    @property
    def usable(self) -> int:
        return int(self.device_bytes * (1 - self.headroom))

    @property
    def fits(self) -> bool:
        return self.total <= self.usable


# -- parameter counts ---------------------------------------------------------------------------------
def layer_parameters(cfg: LlamaConfig, tp: int = 1) -> int:
    """Parameters of one decoder layer held by one tensor-parallel rank (norms replicated)."""
    h, q, kv, i = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, \
        cfg.intermediate_size
    attn = (h * q * 2 + h * kv * 2 + (q + 2 * kv) * cfg.attention_bias) // tp + h * cfg.attention_bias
    mlp = 3 * h * i // tp + (2 * i * cfg.mlp_bias) // tp + h * cfg.mlp_bias
    return attn + mlp + 2 * h


def embedding_parameters(cfg: LlamaConfig, tp: int = 1) -> int:
    """Embedding + LM head (once when tied) on one TP rank: vocab-sharded when the vocabulary divides."""
    per = cfg.vocab_size * cfg.hidden_size
    per = per // tp if cfg.vocab_size % tp == 0 else per
    return per * (1 if cfg.tie_word_embeddings else 2)


def parameters_per_device(cfg: LlamaConfig, layout: Layout) -> int:
    """After TP, divided by the FSDP shard count (rounded up, as torch.chunk does)."""
    p = cfg.num_hidden_layers * layer_parameters(cfg, layout.tp) + embedding_parameters(cfg, layout.tp) \
        + cfg.hidden_size
    return -(-p // layout.shards)


def projection_shapes(cfg: LlamaConfig, tp: int = 1) -> list[tuple[int, int]]:
    """(in, out) of the seven linear projections of one decoder layer on one TP rank."""
    h, q, kv, i = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, \
        cfg.intermediate_size
    return [(h, q // tp), (h, kv // tp), (h, kv // tp), (q // tp, h), (h, i // tp), (h, i // tp), (i // tp, h)]


def lora_parameters(cfg: LlamaConfig, rank: int, tp: int = 1) -> int:
    """Adapter parameters (lora_A: rank x in, lora_B: out x rank) on every projection of every layer."""
    return cfg.num_hidden_layers * sum(rank * (a + b) for a, b in projection_shapes(cfg, tp))


def nf4_bytes(n: int) -> int:
    """Bytes of n weights in llamazoo's NF4 (llamazoo.model.quant): codes, int8 block absmax, fp32 scales
    of 256 blocks and their mean."""
    blocks = -(-n // 64)
    return -(-n // 2) + blocks + 4 * -(-blocks // 256) + 4


# -- activations --------------------------------------------------------------------------------------
def layer_activation_bytes_per_token(cfg: LlamaConfig, w: Workload, tp: int = 1) -> float:
    """Bytes one decoder layer saves for backward, per token, on one TP rank."""
    s = DTYPE_BYTES[w.dtype]
    r = 4 if w.fp32_skip_add else s
    h = cfg.hidden_size
    q = cfg.num_attention_heads * cfg.head_dim / tp
    kv = cfg.num_key_value_heads * cfg.head_dim / tp
    i = cfg.intermediate_size / tp
    return (2 * h * r          # the two norms' inputs (the residual stream)
            + 4 * h * s        # each norm's normalized input and its output
            + s * (3 * q + 3 * kv + kv)  # q and k, rotate_half copies, rotated q/k; v
            + s * 2 * q        # attention output and its (B, T, H) copy for o_proj
            + 4 * cfg.num_attention_heads / tp  # softmax log-sum-exp
            + s * 4 * i)       # gate, silu(gate), up, product


def head_activation_bytes_per_token(cfg: LlamaConfig, w: Workload, tp: int = 1) -> float:
    """Embedding output, final norm, logits (fp32) and the loss's log-softmax, per token."""
    s = DTYPE_BYTES[w.dtype]
    r = 4 if w.fp32_skip_add else s
    h, v = cfg.hidden_size, cfg.vocab_size
    local_logits = (v / tp if tp > 1 and v % tp == 0 else 0) * s  # before the all-gather
    # The loss keeps the fp32 log-softmax; a bf16 model's logits are cast up from a bf16 copy.
    return 2 * h * r + 2 * h * s + v * 4 + (v * s if s != 4 else 0) + local_logits


def activation_bytes(cfg: LlamaConfig, w: Workload, tp: int = 1) -> int:
    tokens = w.batch_size * w.seq_len
    layer = layer_activation_bytes_per_token(cfg, w, tp)
    if w.mode == "generate":
        # Nothing is kept for backward: the peak is one layer's temporaries of the prompt plus its logits.
        s = DTYPE_BYTES[w.dtype]
        return int(tokens * (layer / 2 + cfg.vocab_size * (4 + s)))
    head = head_activation_bytes_per_token(cfg, w, tp)
    if w.method != "full":
        # Frozen projections keep nothing for their weights, but the adapters keep the same inputs (all seven
        # projections adapted), plus lora_A's output (rank values) for lora_B's gradient.
        layer += 7 * w.lora_rank * DTYPE_BYTES[w.dtype]
    if w.activation_checkpointing:
        # Layer inputs are kept. The peak is either the loss's backward (the head's tensors plus the fp32
        # logits' gradient) or one recomputed layer, which comes after the head's tensors are freed.
        r = 4 if w.fp32_skip_add else DTYPE_BYTES[w.dtype]
        head_backward = head + 4 * cfg.vocab_size
        return int(tokens * (cfg.num_hidden_layers * cfg.hidden_size * r + max(head_backward, layer)))
    return int(tokens * (cfg.num_hidden_layers * layer + head))


def kv_cache_bytes(cfg: LlamaConfig, w: Workload, tp: int = 1) -> int:
    if w.mode != "generate":
        return 0
    heads = cfg.num_key_value_heads // tp
    return 2 * cfg.num_hidden_layers * w.batch_size * w.seq_len * heads * cfg.head_dim * DTYPE_BYTES[w.dtype]


# -- the plan -----------------------------------------------------------------------------------------
def bytes_per_parameter(w: Workload, layout: Layout) -> tuple[int, int, int]:
    """(weights, gradients, optimizer states) bytes per held parameter."""
    if w.mode == "generate":
        return DTYPE_BYTES[w.dtype], 0, 0
    if w.dtype == "fp32" or layout.data_parallel == "fsdp" and layout.dp > 1:
        return 4, 4, 8
    return 2, 2, 12


def plan_memory(cfg: LlamaConfig, w: Workload, layout: Layout, device_gib: float = 80.0,
                headroom: float = 0.1) -> MemoryPlan:
    """Per-device memory of a workload on a layout; `headroom` of the device is kept free."""
    if w.mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)} (got {w.mode!r})")
    if w.dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)} (got {w.dtype!r})")
    if w.method not in ("full", "lora", "qlora") or (w.method != "full" and w.mode != "train"):
        raise ValueError(f"method must be full, lora or qlora, and lora/qlora train (got {w.method!r}, {w.mode!r})")
    if layout.data_parallel not in ("ddp", "fsdp"):
        raise ValueError(f"data parallel must be ddp or fsdp (got {layout.data_parallel!r})")
    if w.batch_size < 1 or w.seq_len < 1 or layout.tp < 1 or layout.dp < 1:
        raise ValueError("batch size, sequence length, TP and DP sizes must be >= 1")
    from llamazoo.distributed.parallelize import check_tensor_parallel

    check_tensor_parallel(cfg, layout.tp)
    p = parameters_per_device(cfg, layout)
    bw, bg, bo = bytes_per_parameter(w, layout)
    fsdp_buffers = 0
    if layout.shards > 1 and w.mode == "train":
        s = DTYPE_BYTES[w.dtype]
        # Two layers gathered (the one computing and the one prefetched) and one layer's unsharded
        # gradients before their reduce-scatter; the root (embeddings, lm_head) stays gathered.
        fsdp_buffers = (3 * layer_parameters(cfg, layout.tp) + embedding_parameters(cfg, layout.tp)) * s
    if w.method != "full":
        return _lora_plan(cfg, w, layout, device_gib, headroom)
    return MemoryPlan(layout=layout, workload=w, params_per_device=p, weights=p * bw, gradients=p * bg,
                      optimizer=p * bo, activations=activation_bytes(cfg, w, layout.tp),
                      kv_cache=kv_cache_bytes(cfg, w, layout.tp), fsdp_buffers=fsdp_buffers,
                      device_bytes=int(device_gib * GiB), headroom=headroom)


def _lora_plan(cfg: LlamaConfig, w: Workload, layout: Layout, device_gib: float, headroom: float) -> MemoryPlan:
    """LoRA / QLoRA as llamazoo's LoRATrainer keeps them: the frozen base in the training dtype (QLoRA: its
    projections in NF4), adapters in the training dtype with gradients, AdamW states and, in bf16, fp32
    master copies. FSDP shards parameters: the adapters and a LoRA base, not QLoRA's NF4 buffers."""
    s, tp, shards = DTYPE_BYTES[w.dtype], layout.tp, layout.shards
    base = cfg.num_hidden_layers * layer_parameters(cfg, tp) + embedding_parameters(cfg, tp) + cfg.hidden_size
    base_bytes = base * s
    dequant = 0
    if w.method == "qlora":
        shapes = projection_shapes(cfg, tp)
        proj = cfg.num_hidden_layers * sum(a * b for a, b in shapes)
        base_bytes = -(-(base - proj) * s // shards) * shards \
            + shards * cfg.num_hidden_layers * sum(nf4_bytes(a * b) for a, b in shapes)
        # the largest projection dequantized: int32 byte indices, fp32 values, the result in the dtype
        dequant = max(a * b for a, b in shapes) * (2 + 4 + s)
    a = lora_parameters(cfg, w.lora_rank, tp)
    optimizer = 8 if w.dtype == "fp32" else 12
    return MemoryPlan(layout=layout, workload=w, params_per_device=-(-base // shards), weights=-(-base_bytes // shards),
                      adapters=-(-a * s // shards), gradients=-(-a * s // shards),
                      optimizer=-(-a * optimizer // shards), activations=activation_bytes(cfg, w, tp), kv_cache=0,
                      fsdp_buffers=0, dequant_buffer=dequant, device_bytes=int(device_gib * GiB), headroom=headroom)


def valid_tp_sizes(cfg: LlamaConfig, max_tp: int) -> list[int]:
    return [t for t in (1, 2, 4, 8, 16, 32, 64) if t <= max_tp and cfg.num_key_value_heads % t == 0
            and cfg.num_attention_heads % t == 0 and cfg.intermediate_size % t == 0]


def smallest_layout(cfg: LlamaConfig, w: Workload, device_gib: float = 80.0, headroom: float = 0.1,
                    max_tp: int = 8, max_devices: int = 1024) -> MemoryPlan | None:
    """The layout with the fewest devices that fits (ties: less TP, whose all-reduces cost most).

    Training considers TP (up to max_tp, one node) x FSDP; generation TP only (batch per replica); LoRA and
    QLoRA FSDP only (llamazoo's LoRA runs data parallel).
    """
    best: MemoryPlan | None = None
    for tp in valid_tp_sizes(cfg, max_tp if w.method == "full" else 1):
        dps = [1] if w.mode == "generate" else [d for d in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
                                                  if d * tp <= max_devices]
        for dp in dps:
            layout = Layout(tp=tp, dp=dp, data_parallel="fsdp" if dp > 1 else "ddp")
            p = plan_memory(cfg, w, layout, device_gib, headroom)
            if p.fits:
                if best is None or layout.devices < best.layout.devices:
                    best = p
                break  # more FSDP shards only add devices for this TP size
    return best


def format_plan(p: MemoryPlan, title: str) -> str:
    """The table `llamazoo plan` prints."""
    w, lay = p.workload, p.layout

    def g(n: int) -> str:
        return f"{n / GiB:9.2f} GiB"

    method = {"full": "", "lora": f"LoRA (rank {w.lora_rank}) ", "qlora": f"QLoRA (NF4 base, rank {w.lora_rank}) "}
    what = (f"{w.dtype} {method[w.method]}training, batch {w.batch_size} x {w.seq_len} per device"
            f"{', activation checkpointing' if w.activation_checkpointing else ''}" if w.mode == "train" else
            f"{w.dtype} generation, batch {w.batch_size}, {w.seq_len} tokens")
    lines = [f"{title}: {what}, {lay.describe()}",
             f"  parameters per device   {p.params_per_device / 1e9:9.3f} B"]
    rows = [("weights", p.weights), ("gradients", p.gradients), ("optimizer states", p.optimizer),
            ("activations", p.activations)]
    if w.method != "full":
        rows[:1] = [("base weights (frozen)", p.weights), ("adapters", p.adapters)]
        rows += [("dequantization buffer", p.dequant_buffer)] if p.dequant_buffer else []
    if p.fsdp_buffers:
        rows.append(("FSDP gather buffers", p.fsdp_buffers))
    if w.mode == "generate":
        rows.append(("KV cache", p.kv_cache))
    lines += [f"  {name:<22}{g(v)}" for name, v in rows if w.mode == "train" or name not in ("gradients",
                                                                                          "optimizer states")]
    lines.append(f"  {'total':<22}{g(p.total)}  of {p.device_bytes / GiB:.0f} GiB "
                 f"({p.usable / GiB:.1f} usable, {p.headroom:.0%} kept for CUDA context and fragmentation): "
                 + ("fits" if p.fits else "does NOT fit"))
    return "\n".join(lines)
