"""Continuous batching: sequences join and leave a running batch between two decode steps.

One scheduler thread owns the model. Each `step`:
1. drops cancelled sequences (a client that went away frees its row here, within one step);
2. admits waiting sequences while rows are free (at most max_concurrent run at once);
3. prefills: at most `prefill_tokens` prompt tokens in all (at least one chunk) while sequences are
   decoding, all admitted prompts when none is, in chunks that start at multiples of prefill_chunk, so
   a long prompt is spread over several steps instead of stalling the running streams; one chunk of
   every prompt the budget reaches in one forward pass (`SlotCache.prefill_rows`) where the model's
   kernels give each row the same numbers that way (`SlotCache.batched_prefill`), else one by one;
4. decodes every sequence whose prompt is in, one token each, in one batched step over the KV cache
   (`SlotCache`: a row per sequence, each at its own length), then samples per row (own parameters,
   own seeded generator);
5. retires finished sequences.

Exactness: a sequence gives the tokens it gives alone. Decode rows are independent (see SlotCache), and
prompt prefixes are reused only in whole chunks: a chunk's keys/values depend only on the tokens up to
its end, so a reused chunk holds what computing it again would give. Prompts of at most one chunk are
computed as `llamazoo generate` computes them.

Prefix reuse: a row keeps the prompt it last held after its sequence ends; a new sequence starts from
the longest whole-chunk common prefix found in any row (copied into its own row if needed), e.g. a
shared system prompt or the earlier turns of a chat. A prompt some row holds whole (a repeated request,
a retried one, `n` > 1 arriving again) is not computed at all: the row also keeps the logits its last
prompt token gave, so the first token is chosen from them and the sequence decodes at once.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from llamazoo.generation.engine import SlotCache, _RowState
from llamazoo.generation.sampling import SamplingParams, choose_tokens_per_row

log = logging.getLogger("llamazoo.serve")

# An idle server that gets a request waits until no other has come for GATHER_QUIET_S (at most GATHER_MAX_S)
# before its first step: clients that start together reach it a few ms apart (32 streaming clients: 31 more
# within 21 ms of the first), and without the wait the first one's prefill runs alone while the others queue
# behind it and then behind the decode budget (SmolLM2 fp32, 32 clients: passes of 1, 22 and 9 prompts).
GATHER_QUIET_S = 0.008
GATHER_MAX_S = 0.05


class QueueFull(Exception):
    """More sequences are waiting than serve.max_queue allows."""


@dataclass
class Event:
    """What a sequence produced in one step: text that is final now (may be empty while a possible stop
    string or an incomplete character is held back), the token, and at the end `finish_reason`."""

    text: str = ""
    token_id: int | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # stop | length | error (then `error` says why)
    error: str | None = None


@dataclass(eq=False)
class Sequence:
    """One completion (one of a request's `n` choices)."""

    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the k most likely
    ignore_eos: bool = False  # run to max_tokens (benchmarks)
    on_event: Callable[[Event], None] = lambda e: None
    # state, written by the scheduler thread
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    cancelled: bool = False
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None
    row: int = -1
    prefilled: int = 0
    matched: bool = False

    def __post_init__(self) -> None:
        self.generator: torch.Generator | None = None
        self.seen: torch.Tensor | None = None
        self.state: _RowState | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def cache_length(self) -> int:
        """Slots of its row in use: the prompt and every token fed back."""
        return self.prefilled + max(0, len(self.tokens) - 1)


class Scheduler:
    """Runs sequences on an `Engine` with continuous batching; `start` runs `step` in a thread."""

    def __init__(self, engine, eos_ids, max_concurrent: int = 8, max_queue: int = 64,
                 prefill_chunk: int = 128, max_seq_length: int | None = None, prefill_tokens: int = 512,
                 on_token: Callable[[Sequence, float], None] | None = None, log_every_s: float = 10.0,
                 batch_invariant: bool = True, slot_cache: Callable[..., SlotCache] = SlotCache):
        self.engine = engine
        self.tok = engine.tok
        self.eos = set(int(e) for e in eos_ids)
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.chunk = prefill_chunk
        self.prefill_tokens = max(prefill_tokens, prefill_chunk)
        self.max_seq_length = max_seq_length or engine.max_seq_length
        self.on_token = on_token  # metrics hook: (sequence, seconds since its previous token or arrival)
        # slot_cache: SlotCache or a subclass (tensor-parallel serving mirrors every call to the other ranks)
        self.slots = slot_cache(engine, max(max_concurrent, 2), self.max_seq_length, batch_invariant=batch_invariant)
        n = self.slots.rows
        self.rows: list[Sequence | None] = [None] * n  # physical row -> its sequence
        self.row_ids: list[list[int]] = [[] for _ in range(n)]  # prompt tokens whose K/V the row holds
        self.row_logits: list[torch.Tensor | None] = [None] * n  # the last one's logits, when row_ids is whole
        self.row_used = [0.0] * n
        self.decoding = 0  # rows 0..decoding-1 hold the sequences that decode
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # admission order
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._last_submit = 0.0
        self.steps = 0
        self.generated = 0  # tokens, all sequences
        self.log_every_s = log_every_s

    # -- from other threads ------------------------------------------------------------------------
    def submit(self, seqs: list[Sequence]) -> None:
        """Queues a request's sequences (all or none)."""
        with self._cond:
            if self._closing:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) + len(seqs) > self.max_queue + max(0, self.max_concurrent - len(self.running)):
                raise QueueFull(f"{len(self.waiting)} sequences are waiting (serve.max_queue={self.max_queue})")
            self.waiting.extend(seqs)
            self._last_submit = time.perf_counter()
            self._cond.notify()

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True
        with self._cond:
            self._cond.notify()

    def stats(self) -> dict[str, int]:
        return {"running": len(self.running), "waiting": len(self.waiting), "rows": self.slots.rows,
                "cache_slots": self.slots.length, "cache_bytes": self.slots.bytes()}

    def start(self) -> None:
        """Runs the steps in a new thread (tests, notebooks). `llamazoo serve` calls `run` instead."""
        self._thread = threading.Thread(target=self._loop, name="llamazoo-scheduler", daemon=True)
        self._thread.start()

    def run(self, until: Callable[[], bool]) -> None:
        """Runs the steps in this thread until `until()` is true (checked at least every 0.25 s).

        Why the thread that loaded the model: the CPU kernels' OpenMP runtime (libgomp) keeps a worker
        pool per thread that ran parallel work; with a second pool more workers exist than cores, and
        libgomp then puts idle workers to sleep at once instead of spinning, so every one of the hundreds
        of parallel regions in a decode step pays a futex wake-up (measured: 25,000 context switches
        instead of 400 over 60 steps, a step 15-25% slower)."""
        self._loop(until)

    def stop(self, timeout: float = 10.0) -> None:
        """Ends the thread; sequences still queued or running end with finish_reason=error."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        for seq in list(self.running) + list(self.waiting):
            self._fail(seq, "the server shut down")
        self.running, self.waiting = [], collections.deque()

    def _loop(self, until: Callable[[], bool] | None = None) -> None:
        last_t, last_n = time.perf_counter(), 0
        while until is None or not until():
            now = time.perf_counter()
            if now - last_t >= self.log_every_s:
                if self.generated > last_n or self.running or self.waiting:
                    log.info("running %d, waiting %d, %.1f tokens/s, KV cache %d tokens x %d rows",
                             len(self.running), len(self.waiting), (self.generated - last_n) / (now - last_t),
                             self.slots.length, self.slots.rows)
                last_t, last_n = now, self.generated
            with self._cond:
                while not self._closing and not self.waiting and not self.running:
                    if until is not None and until():
                        return
                    self._cond.wait(None if until is None else 0.25)
                    last_t, last_n = time.perf_counter(), self.generated
                if self._closing:
                    return
                if not self.running:
                    self._gather()
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - one bad step must not end the server
                log.exception("scheduler step failed")
                for seq in self.running:
                    self._fail(seq, f"internal error: {type(e).__name__}: {e}")
                self.running, self.rows = [], [None] * self.slots.rows
                self.row_ids = [[] for _ in range(self.slots.rows)]
                self.row_logits = [None] * self.slots.rows
                self.decoding = 0

    def _gather(self) -> None:
        """With self._cond held, at an idle start: waits for the rest of a burst of requests (see GATHER_QUIET_S)."""
        until = time.perf_counter() + GATHER_MAX_S
        while not self._closing and len(self.waiting) < self.max_concurrent:
            now = time.perf_counter()
            left = min(self._last_submit + GATHER_QUIET_S, until) - now
            if left <= 0:
                return
            self._cond.wait(left)

    # -- the step ------------------------------------------------------------------------------------
    def step(self) -> bool:
        """One round of drop / admit / prefill / decode / retire; False when there was nothing to do."""
        with self._cond:
            for seq in [s for s in self.waiting if s.cancelled]:
                self.waiting.remove(seq)
            while self.waiting and len(self.running) < self.max_concurrent:
                self._admit(self.waiting.popleft())
        for seq in [s for s in self.running if s.cancelled]:
            self._retire(seq)
        if not self.running:
            return False
        self.steps += 1
        self._prefill()
        self._retire_done()  # the decode step runs over rows 0..decoding-1: all of them must go on
        self._decode()
        self._retire_done()
        return True

    def _retire_done(self) -> None:
        for seq in [s for s in self.running if s.done or s.cancelled]:
            self._retire(seq)

    def _admit(self, seq: Sequence) -> None:
        free = [r for r in range(self.decoding, self.slots.rows) if self.rows[r] is None]
        # the free row whose cached prompt serves this one best, else the least recently used
        row = max(free, key=lambda r: (self._whole(r, seq.prompt_ids), self._usable(self.row_ids[r], seq.prompt_ids),
                                       -self.row_used[r]))
        seq.row = row
        self.rows[row] = seq
        self.running.append(seq)
        if seq.params.do_sample:
            seq.generator = torch.Generator(device=self.engine.device)
            if seq.seed is not None:
                seq.generator.manual_seed(seq.seed)
            else:
                seq.generator.seed()
        if seq.params.repetition_penalty != 1.0:
            seq.seen = torch.zeros(self.engine.model.config.vocab_size, dtype=torch.bool,
                                   device=self.engine.device)
            seq.seen[torch.tensor(seq.prompt_ids, device=self.engine.device)] = True
        seq.state = _RowState(self.tok, seq.prompt_ids, seq.stop) if self.tok is not None else None

    def _usable(self, cached: list[int], prompt: list[int]) -> int:
        """Prompt tokens a row holding `cached` can provide: whole chunks, leaving one token to compute."""
        n, limit = 0, min(len(cached), len(prompt) - 1)
        while n < limit and cached[n] == prompt[n]:
            n += 1
        return n // self.chunk * self.chunk

    def _whole(self, r: int, prompt: list[int]) -> bool:
        """Whether row r holds all of `prompt` and the logits of its last token."""
        return self.row_logits[r] is not None and self.row_ids[r] == prompt

    def _reuse_whole_prompt(self, seq: Sequence) -> None:
        """A prompt that a row holds whole: its cache slots copied (if another row's), its first token chosen
        from the stored logits; the sequence joins the decoding rows without computing anything."""
        src = next((r for r in [seq.row, *range(self.slots.rows)] if self._whole(r, seq.prompt_ids)), None)
        if src is None:
            return
        P, logits = len(seq.prompt_ids), self.row_logits[src]
        self.slots.copy_prefix(src, seq.row, P)
        seq.matched = True
        seq.prefilled = seq.cached_tokens = P
        self.row_ids[seq.row], self.row_logits[seq.row] = list(seq.prompt_ids), logits
        self._move(seq.row, self.decoding)
        self.decoding += 1
        self._emit([seq], logits[None])

    def _prefill(self) -> None:
        # while streams are decoding, a bounded prefill per step keeps their tokens flowing; with none
        # decoding nobody waits, so every admitted prompt is prefilled now (a burst gets its first tokens
        # together)
        budget = self.prefill_tokens if self.decoding else sum(len(s.prompt_ids) for s in self.running)
        for seq in [s for s in self.running if not s.matched and s.prefilled < len(s.prompt_ids)]:
            self._reuse_whole_prompt(seq)  # (a burst stays one: the budget is the one it had before)
        todo = [s for s in self.running if s.prefilled < len(s.prompt_ids)]
        while budget > 0 and todo:
            batch, budget = self._next_chunks(todo, budget)
            if self.slots.batched_prefill:
                self._prefill_together(batch)
            else:
                for seq, end in batch:
                    self._prefill_together([(seq, end)])
            todo = [s for s in todo if s.prefilled < len(s.prompt_ids)]

    def _next_chunks(self, todo: list[Sequence], budget: int) -> tuple[list[tuple[Sequence, int]], int]:
        """One chunk (sequence, end) for each sequence the budget reaches, in admission order. A sequence
        whose prompt shares a whole chunk with a chunk of this round waits for the next round, where it
        reuses that chunk instead of computing it again (e.g. requests with one system prompt)."""
        batch: list[tuple[Sequence, int]] = []
        for seq in todo:
            if budget <= 0:
                break
            P = len(seq.prompt_ids)
            if not seq.matched:  # take the best cached prefix now (an earlier sequence may have just made it)
                best = max(range(self.slots.rows), key=lambda r: (self._usable(self.row_ids[r], seq.prompt_ids),
                                                                  r == seq.row))
                n = self._usable(self.row_ids[best], seq.prompt_ids)
                coming = max((self._usable(o.prompt_ids[:end], seq.prompt_ids) for o, end in batch), default=0)
                if coming > n:
                    continue
                seq.matched = True
                self.slots.copy_prefix(best, seq.row, n)
                seq.prefilled = seq.cached_tokens = n
                self.row_ids[seq.row], self.row_logits[seq.row] = seq.prompt_ids[:n], None
            end = min(P, (seq.prefilled // self.chunk + 1) * self.chunk)
            batch.append((seq, end))
            budget -= end - seq.prefilled
        return batch, budget

    def _prefill_together(self, batch: list[tuple[Sequence, int]]) -> None:
        """Prefills one chunk of each sequence in one `prefill_rows` call. The rows must be consecutive:
        they are moved to the rows after the decoding ones, the sequences whose prompt this chunk ends
        first (they then join the decoding rows where they are), each group by chunk length (fewer passes)."""
        batch = sorted(batch, key=lambda b: (b[1] < len(b[0].prompt_ids), b[1] - b[0].prefilled))
        for i, (seq, _) in enumerate(batch):
            self._move(seq.row, self.decoding + i)
        logits = self.slots.prefill_rows(self.decoding, [(seq.prompt_ids[seq.prefilled:end], seq.prefilled)
                                                         for seq, end in batch])
        done = []
        for seq, end in batch:
            seq.prefilled = end
            self.row_ids[seq.row], self.row_logits[seq.row] = seq.prompt_ids[:end], None
            if end == len(seq.prompt_ids):
                done.append(seq)
        for i, seq in enumerate(done):  # sorted first: logits row i is done[i]'s
            self.row_logits[seq.row] = logits[i].clone()
        self.decoding += len(done)
        if done:
            self._emit(done, logits[:len(done)])

    def _decode(self) -> None:
        seqs = self.rows[:self.decoding]
        if not seqs:
            return
        logits = self.slots.decode([s.tokens[-1] for s in seqs], [s.cache_length for s in seqs])
        self._emit(seqs, logits)

    def _emit(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Chooses each sequence's next token from its logits row and tells its listener."""
        nxt = choose_tokens_per_row(logits, [s.params for s in seqs], [s.generator for s in seqs],
                                    [s.seen for s in seqs]).tolist()
        logp = None
        if any(s.logprobs is not None for s in seqs):
            logp = torch.log_softmax(logits.float(), -1)
        now = time.perf_counter()
        for b, (seq, tok) in enumerate(zip(seqs, nxt)):
            gap = now - (seq.last_token_at or seq.arrival)
            if seq.first_token_at is None:
                seq.first_token_at = now
            seq.last_token_at = now
            seq.tokens.append(tok)
            self.generated += 1
            if seq.seen is not None:
                seq.seen[tok] = True
            ev = Event(token_id=tok)
            if seq.logprobs is not None and logp is not None:
                ev.logprob = float(logp[b, tok])
                if seq.logprobs:
                    top = torch.topk(logp[b], seq.logprobs)
                    ev.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist()))
            reason, hit = None, False
            st = seq.state
            if tok in self.eos and not seq.ignore_eos:
                reason = "stop"
            elif st is not None:
                ev.text, hit = st.add_text(st.detok.push(tok))
                if hit:
                    reason = "stop"
            if reason is None and (len(seq.tokens) >= seq.max_tokens or
                                   seq.cache_length + 1 >= self.max_seq_length):
                reason = "length"
            if reason is not None:
                if st is not None and not hit:
                    ev.text += st.finish()  # what was held back (no stop string completed)
                seq.finish_reason = ev.finish_reason = reason
            if st is not None:
                seq.text = st.text
            if self.on_token is not None:
                self.on_token(seq, gap)
            self._send(seq, ev)

    def _send(self, seq: Sequence, ev: Event) -> None:
        try:
            seq.on_event(ev)
        except Exception:  # noqa: BLE001 - a listener's failure is that request's problem only
            log.exception("a sequence listener failed; cancelling it")
            seq.cancelled = True

    def _fail(self, seq: Sequence, why: str) -> None:
        if not seq.done:
            seq.finish_reason = "error"
            self._send(seq, Event(finish_reason="error", error=why))

    # -- rows ----------------------------------------------------------------------------------------
    def _content(self, r: int) -> int:
        seq = self.rows[r]
        return max(len(self.row_ids[r]), seq.cache_length if seq is not None else 0)

    def _move(self, a: int, b: int) -> None:
        """Swaps rows a and b: cache contents, sequences and cached prompts."""
        if a == b:
            return
        self.slots.swap(a, b, max(self._content(a), self._content(b)))
        self.rows[a], self.rows[b] = self.rows[b], self.rows[a]
        self.row_ids[a], self.row_ids[b] = self.row_ids[b], self.row_ids[a]
        self.row_logits[a], self.row_logits[b] = self.row_logits[b], self.row_logits[a]
        self.row_used[a], self.row_used[b] = self.row_used[b], self.row_used[a]
        for r in (a, b):
            if self.rows[r] is not None:
                self.rows[r].row = r

    def _retire(self, seq: Sequence) -> None:
        """Frees the sequence's row (it keeps the prompt for reuse); decoding rows stay 0..decoding-1."""
        r = seq.row
        self.running.remove(seq)
        if r < self.decoding:
            self._move(r, self.decoding - 1)
            self.decoding -= 1
            r = self.decoding
        self.rows[r] = None
        self.row_used[r] = time.perf_counter()
        if seq.prefilled < len(seq.prompt_ids):  # cut short in its prefill: only whole chunks are kept
            self.row_ids[r] = self.row_ids[r][:seq.prefilled // self.chunk * self.chunk]
            self.row_logits[r] = None
        seq.row = -1
