"""Generation engine: prefill, then one token per step with the model's static KV cache.

Batching: prompts of one batch are left-padded to the longest. Row b with pad p_b has its prompt in cache
slots p_b..P-1 and its positions counted from 0 at its first real token, and every attention mask hides
slots < p_b, so each row computes what it would compute alone. Finished rows keep stepping (the batch
shape is static) but their tokens are discarded. Logits are fp32 before any processing.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from llamazoo.generation.packed import decode_stack_fits, pack_for_inference, unpack
from llamazoo.generation.sampling import SamplingParams, choose_tokens
from llamazoo.io.mapped import trim_heap
from llamazoo.kernels import cpu as cpu_kernels
from llamazoo.model.llama import UPCAST_MIN_TOKENS, attention_width

log = logging.getLogger("llamazoo.generate")

# tokens of context kept before the new ones when detokenizing, so SentencePiece's leading space and
# byte-fallback sequences decode as they would in the whole text
DETOK_CONTEXT = 6


class StreamDecoder:
    """Incremental detokenization: returns only complete characters, with the spaces the full decode has."""

    def __init__(self, tokenizer, context_ids: Sequence[int] = ()):
        self.tok = tokenizer
        self.ids: list[int] = list(context_ids[-DETOK_CONTEXT:])
        self.prefix = 0
        self.read = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is held back (an incomplete character at the very end)."""
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):]


@dataclass
class RowResult:
    """One prompt's completion. Times are seconds from the start of its batch."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    stop_reason: str = "length"  # eos | stop | length | interrupted
    time_to_first_token: float = 0.0
    total_time: float = 0.0
    batch_id: int = 0  # which batch of the run the row was in

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class _RowState:
    """Per-row bookkeeping during a batch: detokenizer, stop-string search, streaming hold-back."""

    def __init__(self, tokenizer, prompt_ids: list[int], stop: Sequence[str]):
        self.detok = StreamDecoder(tokenizer, prompt_ids)
        self.stop = [s for s in stop if s]
        self.text = ""
        self.emitted = 0  # characters of text already streamed
        self.done = False

    def add_text(self, piece: str) -> tuple[str, bool]:
        """Appends decoded text; returns (text safe to stream now, whether a stop string ended the row)."""
        if not piece:
            return "", False
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return self._emit(len(self.text)), True
        # hold back a tail that could be the beginning of a stop string
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:n]):
                    hold = n
                    break
        return self._emit(len(self.text) - hold), False

    def _emit(self, upto: int) -> str:
        out = self.text[self.emitted:upto]
        self.emitted = max(self.emitted, upto)
        return out

    def finish(self) -> str:
        """At the end of the row: the held-back tail (no stop string completed)."""
        piece, stopped = self.add_text(self.detok.flush())
        return piece + (self._emit(len(self.text)) if not stopped else "")


StreamFn = Callable[[int, str], None]


# generation.compile=auto (the default): compile the batch-1 decode step where it was measured to pay, and
# keep the weights once (no packed copies: the compiled step reads the plain ones). Measured on 2 cores of
# an AVX2 EPYC, 40-token prompt, 128 new tokens, decode tok/s eager -> compiled: SmolLM2-135M (14 MB of fp32
# weights per layer) fp32 17-23 -> 39-43, bf16 24-31 -> 50; a 2048-hidden model (TinyLlama's shapes,
# 200 MB per fp32 layer) fp32 26.9 -> 26.1, bf16 35.9 -> 38.4; Llama-2-7b's shapes fp32 13.3 -> 13.7, bf16
# 16.6 -> 19.6 (bf16 in torch's `F.linear`). With llamazoo.kernels.cpu's bf16 kernel in the eager step:
# SmolLM2 bf16 32 -> 55, TinyLlama's shapes 55 -> 42, Llama-2-7b's 34 -> 21. So: layers of small matrices
# (per-call costs dominate the eager step), not large ones, where the packed fp32 / C bf16 kernels already
# stream the weights at memory speed and an unpacked prompt is slower (7b shapes, 16 tokens: 182 -> 318
# ms); and large bf16 ones only on a CPU without bf16 GEMM kernels where llamazoo's cannot be built. A compile costs ~7-10 s the first time and ~2.5 s from
# inductor's on-disk cache, ~20 ms saved per SmolLM2 token: it pays from a few hundred tokens.
AUTO_COMPILE_MIN_TOKENS = 256
AUTO_COMPILE_MAX_LAYER_BYTES = 32 << 20


def auto_compile(model: nn.Module, batch: int, decode_tokens: int) -> tuple[bool, str]:
    """Whether generation.compile=auto compiles the decode step of this run, and why (for the report).
    decode_tokens: the tokens the run may decode at batch 1 (prompts x max_new_tokens)."""
    w = model.lm_head.weight
    if w.device.type != "cpu" or hasattr(w, "placements"):
        return False, "measured on one CPU process only"
    if batch != 1:
        return False, "batch > 1: the packed GEMMs of the eager step are faster"
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    projections = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    if any(type(m) is not nn.Linear for m in [*projections, model.lm_head]):
        return False, "quantized or adapter layers: not measured"
    if w.dtype not in (torch.float32, torch.bfloat16):
        return False, f"{w.dtype}: not measured"
    if decode_stack_fits(model):
        # measured, SmolLM2 batch 1, decode tok/s compiled -> decode stack: fp32 41 -> 55, bf16 41 -> 79
        return False, "llamazoo's decode-stack kernel (every layer of a step in one call) is faster than a compiled step"
    layer_bytes = sum(m.weight.numel() * m.weight.element_size() for m in projections)
    # bf16 on a CPU without bf16 GEMM kernels: eager reads large layers at memory speed only through
    # llamazoo.kernels.cpu (measured, bf16, batch 1, eager -> compiled tok/s: TinyLlama's shapes 55 -> 42,
    # Llama-2-7b's 34 -> 21 with it; without it compiling wins at every size, 16.6 -> 19.6 at 7b shapes)
    slow_bf16 = (w.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported()
                 and not cpu_kernels.available())
    if layer_bytes > AUTO_COMPILE_MAX_LAYER_BYTES and not slow_bf16:
        return False, f"{layer_bytes / 2**20:.1f} MB per layer: the eager kernels already read them at memory speed"
    if decode_tokens < AUTO_COMPILE_MIN_TOKENS:
        return False, f"{decode_tokens} tokens to decode, under {AUTO_COMPILE_MIN_TOKENS}: a compile would not pay"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:
        return False, "no C++ compiler found (torch.compile needs one on CPU)"
    return True, f"batch 1, {decode_tokens} tokens to decode"


def _run_layer(layer, h, cos, sin, mask, cache_pos):
    """One decoder layer, as the unit torch.compile sees: the layer is an argument, so every layer of a
    model (same shapes) runs the same compiled graph, with cheaper guards than compiling each module."""
    return layer(h, cos, sin, mask, cache_pos)


class Engine:
    """Runs batches of token-id prompts through a `LlamaForCausalLM` with a static KV cache.

    pack=True (default) installs fused, prepacked CPU projections on the model for the eager steps (bf16:
    the same numbers; fp32: summation order differs slightly), in place of the plain weights, so they are
    held once (the model's state_dict() unpacks them again); with compile=True the plain weights stay
    too (twice the memory), as the compiled step reads them.
    compile=True compiles the one-token decode step with torch.compile, one decoder layer at a time
    (all layers share one graph, so a compile takes seconds, not minutes, and inductor's on-disk cache
    serves the next process) plus the LM head. Prefill stays eager. The compiled step sees the whole
    cache (full-width masks) and is compiled for each cache length, which therefore grows in powers of
    two (eager engines round to a multiple of `cache_multiple`). compile_fallback=True (what
    generation.compile=auto asks for): a compile that fails warns once and the run goes on eager, rather
    than failing a run whose user never asked for a compile.
    """

    def __init__(self, model, tokenizer, compile: bool = False, cache_multiple: int = 64,
                 max_seq_length: int | None = None, pack: bool = True, pack_batch_hint: int = 1,
                 pack_tied_head: bool = False, compile_fallback: bool = False):
        self.model = model
        # CPU: fused, prepacked projections (see packed.py); False where it does not apply
        self.packed = pack and pack_for_inference(model, in_place=not compile, batch_hint=pack_batch_hint,
                                                  tied_head_copy=pack_tied_head)
        if compile and not self.packed:
            unpack(model)  # weights another engine packed in place: the compiled step reads plain ones
        self.tok = tokenizer
        self.device = model.lm_head.weight.device
        self.compile = compile
        self.compile_fallback = compile_fallback
        self.cache_multiple = cache_multiple
        self.max_seq_length = max_seq_length or model.config.max_position_embeddings
        self._cache_shape: tuple[int, int] | None = None
        # token ids whose keys/values fill slots 0..n-1 of a batch-1 cache (for reuse_prefix)
        self._cached_ids: list[int] = []
        if compile:
            self._compiled_layer = torch.compile(_run_layer, fullgraph=True)
            self._compiled_logits = torch.compile(self._logits, fullgraph=True)

    def uses_compiled_step(self, batch: int) -> bool:
        """Whether decode runs compiled for this batch size. On CPU only batch 1 does: there a step is
        bound by reading the weights and the fused multiply-reduce wins; at batch > 1 the packed oneDNN
        GEMMs of the eager step beat inductor's code (measured: fp32 b8 131 vs 90-107 tok/s)."""
        return self.compile and (batch == 1 or self.device.type != "cpu")

    # -- model calls ------------------------------------------------------------------------------
    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits of the last position only [B,V] from the final hidden states."""
        return self.model.head_logits(h[:, -1])

    def _eager_step(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, cache_pos: torch.Tensor):
        """Runs the model on new tokens (prefill or decode) and returns fp32 logits [B,V] of the last one."""
        return self.model(ids, position_ids=pos, attention_mask=mask, cache_pos=cache_pos, last_logits=True)

    def _compiled_step(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, cache_pos: torch.Tensor):
        if not self.compile:  # the compile failed earlier in this batch (compile_fallback)
            return self._eager_step(ids, pos, mask, cache_pos)
        try:
            h = self.model(ids, position_ids=pos, attention_mask=mask, cache_pos=cache_pos, return_hidden=True,
                           run_layer=self._compiled_layer)
            return self._compiled_logits(h)
        except Exception as e:  # inductor needs a working C++ compiler on CPU; say so in one line
            if type(e).__module__.startswith("torch._inductor") or "CppCompileError" in type(e).__name__:
                first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
                if self.compile_fallback:
                    log.warning("generation.compile=auto: torch.compile could not build the decode step (%s: %s); "
                                "decoding eagerly", type(e).__name__, first)
                    self.compile = False
                    return self._eager_step(ids, pos, mask, cache_pos)
                raise RuntimeError(f"generation.compile: torch.compile could not build the decode step "
                                   f"({type(e).__name__}: {first}); it needs a "
                                   f"C++ compiler on CPU. Run with generation.compile=false.") from e
            raise

    def _ensure_cache(self, batch: int, length: int) -> int:
        m = self.cache_multiple
        if self.compile:
            # the compiled step's graph is specialized to the cache length (the cache is a module attribute,
            # static to dynamo): powers of two, so that a growing chat compiles a few lengths, not one per
            # turn (3 turns of SmolLM2 chat: 384, 704, 1024 slots, a compile each), and runs of other
            # lengths hit inductor's disk cache; the step attends over at most twice the slots it needs
            rounded = max(m, 1 << (length - 1).bit_length())
        else:
            rounded = -(-length // m) * m
        length = min(rounded, max(length, self.max_seq_length))
        if self._cache_shape and self.model.cache_len:
            b, have = self._cache_shape
            # keep a cache that is big enough: no reallocation, no recompile; eager steps read only the
            # slots in use (narrow masks), so a larger cache costs memory, not time
            if b == batch and length <= have:
                return have
        n = len(self._cached_ids) if self._cache_shape == (batch, self.model.cache_len) else 0
        old = [(layer.self_attn.kv_cache.k, layer.self_attn.kv_cache.v) for layer in self.model.model.layers] if n else []
        if not old and self.device.type == "cpu":
            # the previous cache's blocks lie in glibc's heap between long-lived tensors: hand them back
            # before the new cache is touched, or both count in the peak (SmolLM2 int4, batch 8: +10 MB)
            self.model.clear_cache()
            trim_heap()
        self.model.setup_cache(batch, length)
        self._cache_shape = (batch, length)
        for layer, (k, v) in zip(self.model.model.layers, old):  # a growing conversation keeps its prefix
            layer.self_attn.kv_cache.k[:, :, :n] = k[:, :, :n]
            layer.self_attn.kv_cache.v[:, :, :n] = v[:, :, :n]
        if not old:
            self._cached_ids = []
        return length

    def warmup(self, batch: int, prompt_len: int, max_new_tokens: int) -> float:
        """Compiles (or warms) the decode step for this batch shape; returns the seconds it took."""
        t0 = time.perf_counter()
        S = self._ensure_cache(batch, prompt_len + max_new_tokens)
        dev = self.device
        with torch.inference_mode():
            for _ in range(2):
                ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
                pos = torch.zeros(batch, 1, dtype=torch.long, device=dev)
                mask = torch.ones(batch, 1, 1, S, dtype=torch.bool, device=dev)
                step = self._compiled_step if self.uses_compiled_step(batch) else self._eager_step
                step(ids, pos, mask, torch.zeros(1, dtype=torch.long, device=dev))
        return time.perf_counter() - t0

    # -- generation -------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate_batch(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                       params: SamplingParams | None = None, eos_ids: Sequence[int] = (),
                       stop: Sequence[str] = (), generator: torch.Generator | None = None,
                       on_text: StreamFn | None = None, catch_interrupt: bool = False,
                       reuse_prefix: bool = False) -> list[RowResult]:
        """Generates for one batch. on_text(row, text) receives each row's text as it becomes final.

        reuse_prefix (batch 1, e.g. chat turns): the longest common prefix of this prompt and the tokens
        already in the KV cache from the previous call is not computed again; prefill runs on the rest.
        """
        params = params or SamplingParams()
        B = len(prompts)
        lens = [len(p) for p in prompts]
        if B == 0 or min(lens) == 0:
            raise ValueError("every prompt needs at least one token")
        P = max(lens)
        if P + max_new_tokens > self.max_seq_length:
            raise ValueError(f"prompt of {P} tokens + max_new_tokens {max_new_tokens} exceeds "
                             f"max_seq_length {self.max_seq_length}")
        dev = self.device
        pad_id = self.tok.pad_token_id if self.tok is not None and self.tok.pad_token_id is not None else 0
        ids = torch.full((B, P), pad_id, dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, P - len(p):] = torch.tensor(list(p), dtype=torch.long)
        ids = ids.to(dev)
        pad = torch.tensor([P - n for n in lens], device=dev)
        S = self._ensure_cache(B, P + max_new_tokens)
        reused = 0
        if reuse_prefix and B == 1:
            limit = min(len(self._cached_ids), P - 1)  # at least one prompt token is computed, for its logits
            while reused < limit and self._cached_ids[reused] == prompts[0][reused]:
                reused += 1
        self._cached_ids = []  # until this batch ends normally
        slots = torch.arange(S, device=dev)
        valid = slots[None, :] >= pad[:, None]  # [B,S]: the row's own slots
        eos = set(int(e) for e in eos_ids)
        seen = None
        if params.repetition_penalty != 1.0:
            V = self.model.config.vocab_size
            seen = torch.zeros(B, V, dtype=torch.bool, device=dev)
            seen.scatter_(1, ids, True)
            for b in range(B):  # a pad token is not part of the row
                if pad[b] and pad_id not in prompts[b]:
                    seen[b, pad_id] = False

        rows = [RowResult(list(p)) for p in prompts]
        states = [_RowState(self.tok, list(p), stop) if self.tok is not None else None for p in prompts]
        compiled = self.uses_compiled_step(B)
        t0 = time.perf_counter()
        try:
            cache_pos = torch.arange(reused, P, device=dev)
            pos = (cache_pos[None, :] - pad[:, None]).clamp(min=0)
            # masks cover only the slots written so far (the model then reads just those); the compiled
            # decode step gets full-width masks so that its shapes never change
            mask = None  # no padding: plain causal, SDPA's fastest path
            if reused or bool((pad > 0).any()):
                mask = (valid[:, None, :P] & (slots[None, None, :P] <= cache_pos[None, :, None]))[:, None]
            logits = self._eager_step(ids[:, reused:], pos, mask, cache_pos)
            lens_t = torch.tensor(lens, device=dev)
            for step in range(max_new_tokens):
                nxt = choose_tokens(logits, params, generator, seen)
                tokens = nxt.tolist()
                now = time.perf_counter() - t0
                for b, tok_id in enumerate(tokens):
                    row, st = rows[b], states[b]
                    if row.total_time or (st is not None and st.done):
                        continue
                    if step == 0:
                        row.time_to_first_token = now
                    row.token_ids.append(tok_id)
                    ended = None
                    if tok_id in eos:
                        ended = "eos"
                    elif st is not None:
                        piece, hit = st.add_text(st.detok.push(tok_id))
                        if piece and on_text:
                            on_text(b, piece)
                        if hit:
                            ended = "stop"
                    if ended is None and step == max_new_tokens - 1:
                        ended = "length"
                    if ended:
                        self._finish_row(row, st, ended, now, b, on_text)
                if all(r.total_time for r in rows) or step == max_new_tokens - 1:
                    break
                if seen is not None:
                    seen.scatter_(1, nxt[:, None], True)
                cur = P + step
                cache_pos = torch.tensor([cur], device=dev)
                pos = (lens_t + step)[:, None]
                if compiled:
                    mask = (valid & (slots <= cur)[None, :])[:, None, None, :]
                    logits = self._compiled_step(nxt[:, None], pos, mask, cache_pos)
                else:
                    w = attention_width(cur + 1, S)
                    mask = (valid[:, :w] & (slots[:w] <= cur)[None, :])[:, None, None, :]
                    logits = self._eager_step(nxt[:, None], pos, mask, cache_pos)
            if B == 1:  # the prompt and every token fed back (all but the last) now fill the first slots
                self._cached_ids = list(prompts[0]) + rows[0].token_ids[:-1]
        except KeyboardInterrupt:
            if not catch_interrupt:
                raise
            now = time.perf_counter() - t0
            for b, row in enumerate(rows):
                if not row.total_time:
                    self._finish_row(row, states[b], "interrupted", now, b, on_text)
        return rows

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int = 1,
                 params: SamplingParams | None = None, eos_ids: Sequence[int] = (), stop: Sequence[str] = (),
                 seed: int | None = None, on_text: StreamFn | None = None,
                 on_row_done: Callable[[int, RowResult], None] | None = None,
                 on_row_start: Callable[[int], None] | None = None) -> list[RowResult]:
        """All prompts, in order, in batches of batch_size (the last may be smaller); on_text gets the
        prompt's index in `prompts`. One seeded generator for the whole run, so a seed fixes the text."""
        generator = torch.Generator(device=self.device)
        if seed is not None:
            generator.manual_seed(seed)
        results: list[RowResult] = []
        for batch_id, start in enumerate(range(0, len(prompts), batch_size)):
            chunk = prompts[start:start + batch_size]
            stream = (lambda b, text, s=start: on_text(s + b, text)) if on_text else None
            if on_row_start:
                for i in range(len(chunk)):
                    on_row_start(start + i)
            rows = self.generate_batch(chunk, max_new_tokens, params, eos_ids, stop, generator, stream)
            for i, r in enumerate(rows):
                r.batch_id = batch_id
                if on_row_done:
                    on_row_done(start + i, r)
            results += rows
        return results

    @staticmethod
    def _finish_row(row: RowResult, st: _RowState | None, reason: str, now: float, b: int,
                    on_text: StreamFn | None) -> None:
        row.stop_reason = reason
        row.total_time = max(now, 1e-9)
        if st is not None:
            if reason != "stop":
                piece = st.finish()
                if piece and on_text:
                    on_text(b, piece)
            st.done = True
            row.text = st.text


class SlotCache:
    """A KV cache with one row per sequence, for continuous batching (`llamazoo serve`).

    Each row holds one sequence from slot 0 on, at its own length; nothing is padded. `prefill_rows` runs
    prompt tokens of consecutive rows in one pass (`prefill`: one row); each row's attention is the call
    it makes alone, and with no earlier slots that is what `Engine.generate_batch` runs on that prompt;
    `batched_prefill` says whether several rows may share a pass. `decode` runs one new token
    for rows 0..n-1 together, each at its own position, over views of those rows (no copies), so the
    caller keeps the decoding rows first (`swap` moves rows). Rows beyond the decoding ones keep
    whatever they held, which the caller may reuse as a cached prompt prefix (`copy_prefix`).

    The cache length grows on demand (`reserve`, doubling up to max_seq_length), so memory follows the
    longest sequence, not the model's context. Batch invariance: masked slots get zero weight in the
    attention, so a row's numbers do not depend on the other rows, except where the matmul kernel for
    one row differs from the kernel for several (oneDNN fp32: matrix-vector vs matrix-matrix); then
    `min_rows` is 2 and a lone decoding row is paired with a scratch one (see `probe_min_rows`); that
    costs time at one sequence (up to ~2x for fp32 on CPU), so batch_invariant=False skips it.
    """

    def __init__(self, engine: "Engine", rows: int, max_seq_length: int, initial_length: int = 256,
                 batch_invariant: bool = True):
        self.engine = engine
        self.model = engine.model
        self.rows = rows
        self.max_seq_length = max_seq_length
        self.length = 0
        self.full: list = []
        self._views: dict[tuple[int, int], list] = {}
        engine._cache_shape, engine._cached_ids = None, []  # generate_batch sets up its own cache again
        self.reserve(min(initial_length, max_seq_length))
        self.min_rows = 1
        if batch_invariant:
            self.min_rows = self.probe_min_rows()
        # whether callers may prefill several rows in one pass (else one row per `prefill_rows` call)
        self.batched_prefill = not batch_invariant or self.probe_batched_prefill()

    # -- memory (every method runs in inference mode: a cache made there may only change there) --------
    @torch.inference_mode()
    def reserve(self, length: int) -> None:
        """Makes every row at least `length` slots long (doubling; existing slots are kept)."""
        if length <= self.length:
            return
        if length > self.max_seq_length:
            raise ValueError(f"{length} cache slots asked for; max_seq_length is {self.max_seq_length}")
        new = self.length or length
        while new < length:
            new *= 2
        new = min(new, self.max_seq_length)
        old = self.full
        self.model.setup_cache(self.rows, new)
        self.full = [layer.self_attn.kv_cache for layer in self.model.model.layers]
        for cache, prev in zip(self.full, old):
            cache.k[:, :, :self.length] = prev.k
            cache.v[:, :, :self.length] = prev.v
        self.length = new
        self._views = {}

    def bytes(self) -> int:
        return sum(c.k.numel() * c.k.element_size() * 2 for c in self.full)

    def _use_rows(self, start: int, stop: int) -> None:
        views = self._views.get((start, stop))
        if views is None:
            views = self._views[(start, stop)] = [c.rows(start, stop) for c in self.full]
        for layer, view in zip(self.model.model.layers, views):
            layer.self_attn.kv_cache = view

    # -- row moves -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def swap(self, a: int, b: int, n: int) -> None:
        """Exchanges the first n slots of rows a and b."""
        if a == b or n <= 0:
            return
        for c in self.full:
            for t in (c.k, c.v):
                tmp = t[a, :, :n].clone()
                t[a, :, :n] = t[b, :, :n]
                t[b, :, :n] = tmp

    @torch.inference_mode()
    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Copies the first n slots of row src into row dst."""
        if src == dst or n <= 0:
            return
        for c in self.full:
            c.k[dst, :, :n] = c.k[src, :, :n]
            c.v[dst, :, :n] = c.v[src, :, :n]

    # -- model calls ---------------------------------------------------------------------------------
    def prefill(self, row: int, ids: Sequence[int], start: int) -> torch.Tensor:
        """Runs tokens `ids` at positions start.. of `row` (slots before start already filled); returns
        fp32 logits [V] of the last one (a batch of one for `prefill_rows`)."""
        return self.prefill_rows(row, [(ids, start)])[0]

    @torch.inference_mode()
    def prefill_rows(self, first: int, chunks: Sequence[tuple[Sequence[int], int]]) -> torch.Tensor:
        """Prefills rows first, first+1, ... together: row first+i gets tokens chunks[i][0] at positions
        chunks[i][1].. (its slots before that already filled); returns fp32 logits [n,V] of each row's last
        token. Consecutive chunks share a forward pass, so the weights are read once and the GEMMs run at
        more rows (32 prompts of 24 tokens, SmolLM2 fp32: 1.5 s instead of 3.1 one by one); attention runs
        per row, with the shapes the row has alone (`span_attention`). Chunks of UPCAST_MIN_TOKENS or more
        are packed one after the other in one row (no padding: 32 prompts of 20-25 tokens, 716 tokens, ran
        800 padded rows); shorter ones are right-padded to the longest, and such a pass ends where padding
        would exceed half its tokens. A pass also ends where the chunk length crosses UPCAST_MIN_TOKENS
        (without llamazoo's C kernels, prompts take another matmul path from there), so callers that sort chunks by length get few passes. A padded token writes a slot past its row's chunk, which the row's next
        token overwrites before anything reads it. Equal to one row at a time where the model's kernels
        are row-invariant: `probe_batched_prefill` checks."""
        lens = [len(ids) for ids, _ in chunks]
        if not chunks or min(lens) == 0:
            raise ValueError("prefill_rows: every chunk needs at least one token")
        out, a = [], 0
        for b in range(1, len(chunks) + 1):
            if b < len(chunks):
                top = max(lens[a:b + 1])
                long = lens[a] >= UPCAST_MIN_TOKENS  # packed passes have no padding
                same_kind = (lens[b] >= UPCAST_MIN_TOKENS) == long
                if same_kind and (long or top * (b + 1 - a) <= 1.5 * sum(lens[a:b + 1])):
                    continue
            out.append(self._prefill_pass(first + a, chunks[a:b]))
            a = b
        return torch.cat(out)

    def _prefill_pass(self, first: int, chunks: Sequence[tuple[Sequence[int], int]]) -> torch.Tensor:
        lens = [len(ids) for ids, _ in chunks]
        n, T = len(chunks), max(lens)
        starts = [start for _, start in chunks]
        self.reserve(max(starts) + T + 1)
        dev = self.engine.device
        self._use_rows(first, first + n)
        spans = list(zip(starts, lens))
        if n > 1 and min(lens) >= UPCAST_MIN_TOKENS:
            # packed: the chunks one after the other in one row, no padding (each chunk's matmul rows are the
            # prompt-sized kind it gets alone; shorter chunks keep the padded layout below, where they are too)
            x = torch.tensor([t for ids, _ in chunks for t in ids], dtype=torch.long)[None]
            pos = torch.cat([torch.arange(s, s + m) for s, m in spans])[None].to(dev)
            h = self.model(x.to(dev), position_ids=pos, cache_pos=pos, return_hidden=True, spans=spans)
            ends = torch.tensor(lens).cumsum(0) - 1
            return self.engine._logits(h[0, ends.to(dev)][:, None])
        x = torch.zeros(n, T, dtype=torch.long)
        for i, (ids, _) in enumerate(chunks):
            x[i, :lens[i]] = torch.tensor(list(ids), dtype=torch.long)
        cache_pos = (torch.tensor(starts)[:, None] + torch.arange(T)[None, :]).to(dev)
        h = self.model(x.to(dev), position_ids=cache_pos, cache_pos=cache_pos, return_hidden=True, spans=spans)
        last = h[torch.arange(n, device=dev), torch.tensor(lens, device=dev) - 1]
        return self.engine._logits(last[:, None])

    @torch.inference_mode()
    def decode(self, tokens: Sequence[int], lengths: Sequence[int]) -> torch.Tensor:
        """One step for rows 0..n-1: row b gets tokens[b] at position lengths[b] (its slots so far);
        returns fp32 logits [n,V]."""
        n = len(tokens)
        top = max(lengths)
        self.reserve(top + 1)
        pad = max(0, self.min_rows - n)
        if n + pad > self.rows:
            raise ValueError(f"{n} rows decoding, the cache has {self.rows}")
        dev = self.engine.device
        # a scratch row (when pairing a lone row) writes into its row's last slot, which no prompt uses
        toks = list(tokens) + [0] * pad
        pos = list(lengths) + [self.length - 1] * pad
        self._use_rows(0, n + pad)
        cache_pos = torch.tensor(pos, dtype=torch.long, device=dev)[:, None]
        slots = torch.arange(attention_width(top + 1, self.length), device=dev)
        mask = (slots[None, :] <= cache_pos)[:, None, None, :]
        x = torch.tensor(toks, dtype=torch.long, device=dev)[:, None]
        return self.engine._eager_step(x, cache_pos, mask, cache_pos)[:n]

    def probe_batched_prefill(self) -> bool:
        """Whether `prefill_rows` gives every row bit for bit what `prefill` gives it alone, on prompts of
        several lengths (below and above UPCAST_MIN_TOKENS) from slot 0 and after a prefix. fp32 on CPU:
        yes (oneDNN's packed GEMM and the per-row reductions do not depend on the row count); bf16 with
        RMSNorm in bf16: no (its reduction order follows the shape). Writes the first slots of rows 0-2."""
        if self.rows < 3:
            return False
        vocab = self.model.config.vocab_size
        token = iter(range(10**9))
        def ids(n: int) -> list[int]:
            return [(next(token) * 7919 + 11) % (vocab - 1) + 1 for _ in range(n)]
        for lens, more in (([5, 11, 3], [2, 1, 4]), ([16, 19], [17, 16])):  # ~150 tokens in all: cheap at 7B too
            prompts = [ids(n) for n in lens]
            rounds = [[(p, 0) for p in prompts], [(ids(m), len(p)) for p, m in zip(prompts, more)]]
            for chunks in rounds:
                alone = [self.prefill(r, c, start) for r, (c, start) in enumerate(chunks)]
                together = self.prefill_rows(0, chunks)
                if not all(torch.equal(a, t) for a, t in zip(alone, together)):
                    return False
        return True

    def probe_min_rows(self) -> int:
        """2 when one decoding row gives other numbers than the same row among several (see the class
        docstring), else 1. Writes slot 0 of rows 0 and 1."""
        if self.rows < 2:
            return 1
        one = self.decode([1], [0])
        two = self.decode([1, 1], [0, 0])
        return 1 if torch.equal(one[0], two[0]) else 2
