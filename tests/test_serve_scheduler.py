"""The continuous-batching scheduler without HTTP: sequences batched with others (joining and leaving at
different steps, prompts prefilled in chunks) give exactly the tokens and logits they give alone, greedy
and seeded sampling; a cancelled sequence frees its row within one step; whole-chunk prompt prefixes are
reused without changing a token; the per-row sampler equals the one-row sampler."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from conftest import hf_tiny_model
from llamazoo.generation.engine import Engine, SlotCache
from llamazoo.generation.packed import BATCHED_HINT
from llamazoo.generation.sampling import SamplingParams, choose_tokens, choose_tokens_per_row
from llamazoo.io.hf import load_model
from llamazoo.serving.scheduler import Scheduler, Sequence

pytestmark = pytest.mark.usefixtures("one_thread")
CHUNK = 16


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_sched")
    hf_tiny_model(max_position_embeddings=256, num_key_value_heads=2).save_pretrained(out)
    return Engine(load_model(out), tokenizer=None)


@pytest.fixture(scope="module")
def serve_engine(tmp_path_factory):
    """The engine as `llamazoo serve` builds it: weights packed for batches."""
    out = tmp_path_factory.mktemp("tiny_serve")
    hf_tiny_model(max_position_embeddings=256, num_key_value_heads=2).save_pretrained(out)
    return Engine(load_model(out), tokenizer=None, pack_batch_hint=BATCHED_HINT)


@pytest.fixture(scope="module")
def serve_engine_bf16(tmp_path_factory):
    """The same in bf16 (the model zoo's default knobs: RMSNorm in bf16)."""
    out = tmp_path_factory.mktemp("tiny_serve_bf16")
    hf_tiny_model(max_position_embeddings=256, num_key_value_heads=2).save_pretrained(out)
    return Engine(load_model(out, dtype="bfloat16"), tokenizer=None, pack_batch_hint=BATCHED_HINT)


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths]


LENGTHS = (5, 17, 40, 3, 70, 9, 33, 12, 1, 48)


def make(i: int, p: list[int], **kw) -> Sequence:
    """Every third sequence samples (seeded); max_tokens differ."""
    params = SamplingParams(do_sample=True, temperature=0.8, top_k=20, top_p=0.9) if i % 3 == 2 else SamplingParams()
    return Sequence(p, max_tokens=6 + 3 * i, params=params, seed=100 + i, **kw)


def run_all(engine, seqs, admit_every=1, max_concurrent=4, cancel_at=None, max_steps=500):
    """Submits one sequence every `admit_every` steps; cancel_at: {step: sequence index}."""
    sched = Scheduler(engine, [], max_concurrent=max_concurrent, prefill_chunk=CHUNK, prefill_tokens=CHUNK)
    pending, step = list(seqs), 0
    while step < max_steps:
        if pending and step % admit_every == 0:
            sched.submit([pending.pop(0)])
        if cancel_at and step in cancel_at:
            sched.cancel(seqs[cancel_at[step]])
        busy = sched.step()
        step += 1
        if not busy and not pending:
            break
    assert step < max_steps
    return sched


def finish(sched: Scheduler, *seqs: Sequence) -> None:
    """Submits the sequences together and steps until the scheduler is idle."""
    sched.submit(list(seqs))
    while sched.step():
        pass


def test_batched_sequences_equal_their_solo_runs(engine):
    ps = prompts(LENGTHS)
    solo = []
    for i, p in enumerate(ps):
        s = make(i, p)
        run_all(engine, [s])
        solo.append(s.tokens)
        assert len(s.tokens) == 6 + 3 * i and s.finish_reason == "length"
    # greedy prompts of at most one chunk: the same tokens as the generation engine alone
    for i, p in enumerate(ps):
        if i % 3 != 2 and len(p) <= CHUNK:
            assert solo[i] == engine.generate_batch([p], 6 + 3 * i)[0].token_ids
    for admit_every, max_concurrent in ((1, 4), (3, 3), (1, 10)):
        seqs = [make(i, p) for i, p in enumerate(ps)]
        sched = run_all(engine, seqs, admit_every, max_concurrent)
        assert [s.tokens for s in seqs] == solo, (admit_every, max_concurrent)
        assert sched.running == [] and sched.decoding == 0 and all(r is None for r in sched.rows)
        assert sched.steps < sum(len(t) for t in solo)  # they did run together


def test_run_steps_in_the_calling_thread_until_told(engine):
    """`llamazoo serve` decodes in the thread that loaded the model (Scheduler.run): a second thread of
    CPU kernels makes libgomp's workers sleep between parallel regions (15-25% slower steps)."""
    ps = prompts((8, 20, 12))
    solo = []
    for p in ps:
        s = Sequence(p, max_tokens=10)
        run_all(engine, [s])
        solo.append(s.tokens)
    seqs = [Sequence(p, max_tokens=10) for p in ps]
    sched = Scheduler(engine, [], max_concurrent=3, prefill_chunk=CHUNK)
    stepped_in: set[int] = set()
    sched.on_token = lambda seq, gap: stepped_in.add(threading.get_ident())
    sched.submit(seqs)
    sched.run(until=lambda: all(s.done for s in seqs))
    assert stepped_in == {threading.get_ident()} and [s.tokens for s in seqs] == solo
    # idle, it returns once told (waiting at most 0.25 s per check)
    t0 = time.monotonic()
    sched.run(until=lambda: time.monotonic() - t0 > 0.3)
    assert sched.running == [] and time.monotonic() - t0 < 5


def test_cancel_frees_the_row_within_one_step(engine):
    ps = prompts((8, 20, 12))
    seqs = [Sequence(p, max_tokens=40) for p in ps]
    sched = Scheduler(engine, [], max_concurrent=3, prefill_chunk=CHUNK)
    sched.submit(seqs)
    for _ in range(5):
        sched.step()
    assert len(sched.running) == 3
    n = len(seqs[1].tokens)
    sched.cancel(seqs[1])
    sched.step()
    assert seqs[1] not in sched.running and seqs[1].row == -1 and len(seqs[1].tokens) == n
    assert sched.decoding == 2 and sorted(s.row for s in sched.running) == [0, 1]
    cancelled_waiting = Sequence(ps[0], max_tokens=5)
    sched.submit([cancelled_waiting])
    sched.cancel(cancelled_waiting)
    while sched.step():
        pass
    assert cancelled_waiting.tokens == [] and all(len(s.tokens) == 40 for s in (seqs[0], seqs[2]))
    assert sched.rows == [None] * 3 and not sched.waiting


def test_whole_chunk_prefixes_are_reused_without_changing_tokens(engine):
    system = prompts((2 * CHUNK + 5,), seed=3)[0]
    a = system + prompts((7,), seed=4)[0]
    b = system + prompts((30,), seed=5)[0]
    cold = Sequence(b, max_tokens=12)
    run_all(engine, [cold])
    assert cold.cached_tokens == 0
    sched = Scheduler(engine, [], max_concurrent=2, prefill_chunk=CHUNK)
    first, second = Sequence(a, max_tokens=12), Sequence(b, max_tokens=12)
    finish(sched, first)
    finish(sched, second)
    assert second.cached_tokens == 2 * CHUNK  # the shared whole chunks; the 5 extra tokens are computed
    assert second.tokens == cold.tokens
    # a repeated prompt is reused whole (with its last token's logits), and gives the same tokens again
    again = Sequence(b, max_tokens=12)
    finish(sched, again)
    assert again.cached_tokens == len(b) and again.tokens == cold.tokens


@pytest.mark.parametrize("which", ["engine", "serve_engine_bf16"])
def test_a_prompt_held_whole_is_not_computed_again(which, request, monkeypatch):
    """A repeated prompt (greedy, or sampled with the same seed) skips the prefill: the first token comes
    from the logits its row kept, from its own row or copied from another one that is still decoding, and
    the tokens are those of the first run; a prompt one token longer or shorter is computed (fp32, and bf16
    as serve runs it)."""
    engine = request.getfixturevalue(which)
    p = prompts((23,), seed=7)[0]
    sampled = SamplingParams(do_sample=True, temperature=0.9, top_k=30)
    sched = Scheduler(engine, [], max_concurrent=3, prefill_chunk=CHUNK)
    first, first_s = Sequence(p, max_tokens=10), Sequence(p, max_tokens=10, params=sampled, seed=5)
    finish(sched, first)
    finish(sched, first_s)
    calls = []
    real = sched.slots.prefill_rows
    monkeypatch.setattr(sched.slots, "prefill_rows", lambda *a: calls.append(a) or real(*a))
    again, again_s = Sequence(p, max_tokens=10), Sequence(p, max_tokens=10, params=sampled, seed=5)
    longer, shorter = Sequence(p + [9], max_tokens=10), Sequence(p[:-1], max_tokens=10)
    sched.submit([again])
    sched.step()  # `again` decodes in its row; the next one copies it from there
    finish(sched, again_s)
    assert calls == []
    assert again.tokens == first.tokens and again_s.tokens == first_s.tokens
    assert again.cached_tokens == again_s.cached_tokens == len(p)
    finish(sched, longer, shorter)
    assert len(calls) >= 1 and longer.cached_tokens < len(p) + 1 and shorter.cached_tokens < len(p) - 1
    solo = [Sequence(q, max_tokens=10) for q in (p + [9], p[:-1])]
    run_all(engine, solo)
    assert [longer.tokens, shorter.tokens] == [s.tokens for s in solo]


def test_a_burst_with_a_prompt_held_whole_is_still_prefilled_in_one_step(engine):
    """An idle scheduler prefills all of a burst before decoding (first tokens together); a prompt of the
    burst that some row holds whole starts decoding at once, and must not shrink the others' budget to the
    bounded one of a busy step (the rest would wait a decode step, or several)."""
    p = prompts((12,), seed=9)[0]
    sched = Scheduler(engine, [], max_concurrent=4, prefill_chunk=CHUNK, prefill_tokens=CHUNK)
    finish(sched, Sequence(p, max_tokens=3))
    burst = [Sequence(p, max_tokens=5)] + [Sequence(q, max_tokens=5) for q in prompts((10, 11, 9), seed=10)]
    sched.submit(burst)
    sched.step()
    assert [len(s.tokens) for s in burst] == [2, 2, 2, 2]  # first tokens, then one decode step of all


def test_eos_and_context_end_sequences(engine):
    p = prompts((10,), seed=7)[0]
    free = Sequence(p, max_tokens=30)
    run_all(engine, [free])
    eos = free.tokens[4]
    sched = Scheduler(engine, [eos], max_concurrent=2, prefill_chunk=CHUNK)
    s = Sequence(p, max_tokens=30)
    finish(sched, s)
    assert s.tokens == free.tokens[:free.tokens.index(eos) + 1] and s.finish_reason == "stop"
    sched = Scheduler(engine, [], max_concurrent=2, prefill_chunk=CHUNK, max_seq_length=16)
    s = Sequence(p, max_tokens=30)
    finish(sched, s)
    assert len(s.tokens) == 6 and s.finish_reason == "length"  # 10 prompt + 6 = the 16-token context


def test_slot_cache_decode_logits_are_batch_invariant(engine):
    """Rows at different lengths decoding together give bit-identical logits to each row alone."""
    ps = prompts((3, 30, 11, 50))
    slots = SlotCache(engine, 4, 256)
    first = [slots.prefill(r, p, 0) for r, p in enumerate(ps)]
    toks = [int(f.argmax()) for f in first]
    together = slots.decode(toks, [len(p) for p in ps])
    for r, p in enumerate(ps):
        alone = SlotCache(engine, 4, 256)
        assert torch.equal(alone.prefill(0, p, 0), first[r])
        assert torch.equal(alone.decode([toks[r]], [len(p)])[0], together[r])


def assert_each_row_as_alone(engine, slots, ps, more, together, together2):
    """Row r's logits from two prefill rounds (ps[r] from slot 0, then more[r] after it) and its cache slots
    are bit for bit those of the row prefilled alone."""
    for r, (p, m) in enumerate(zip(ps, more)):
        alone = SlotCache(engine, 2, 256)
        assert torch.equal(alone.prefill(0, p, 0), together[r]), r
        assert torch.equal(alone.prefill(0, m, len(p)), together2[r]), r
        n = len(p) + len(m)
        for big, small in zip(slots.full, alone.full):
            assert torch.equal(big.k[r, :, :n], small.k[0, :, :n]) and torch.equal(big.v[r, :, :n], small.v[0, :, :n])


@pytest.mark.parametrize("which", ["serve_engine", "serve_engine_bf16"])
def test_prefill_rows_equal_each_row_alone(which, request):
    """Rows prefilled in one pass (different lengths, from slot 0 and after a prefix, chunks below and
    above UPCAST_MIN_TOKENS) give bit-identical logits and caches to each row prefilled alone."""
    serve_engine = request.getfixturevalue(which)
    slots = SlotCache(serve_engine, 6, 256)
    # fp32 and bf16 on CPU: the probe finds every kernel row-invariant (bf16 RMSNorm: see model.llama.RMSNorm)
    assert slots.batched_prefill
    ps = prompts((1, 5, 20, 11, 40, 2), seed=21)
    more = prompts((3, 1, 17, 2, 9, 30), seed=22)
    together = slots.prefill_rows(0, [(p, 0) for p in ps])
    together2 = slots.prefill_rows(0, [(m, len(p)) for p, m in zip(ps, more)])
    assert_each_row_as_alone(serve_engine, slots, ps, more, together, together2)
    with pytest.raises(ValueError, match="at least one token"):
        slots.prefill_rows(0, [(ps[0], 0), ([], 3)])


@pytest.mark.parametrize("which", ["serve_engine", "serve_engine_bf16"])
def test_packed_prefill_of_long_chunks_equals_each_row_alone(which, request, monkeypatch):
    """Chunks of UPCAST_MIN_TOKENS tokens or more run packed (one row, no padding), from slot 0 and after a
    prefix: bit-identical logits and caches to each row alone, in one pass."""
    serve_engine = request.getfixturevalue(which)
    slots = SlotCache(serve_engine, 4, 256)
    ps = prompts((20, 33, 16, 47), seed=31)
    more = prompts((17, 40, 25, 16), seed=32)
    calls = []
    real = serve_engine.model.forward
    monkeypatch.setattr(serve_engine.model, "forward", lambda ids, **kw: calls.append(tuple(ids.shape)) or real(ids, **kw))
    together = slots.prefill_rows(0, [(p, 0) for p in ps])
    together2 = slots.prefill_rows(0, [(m, len(p)) for p, m in zip(ps, more)])
    assert calls == [(1, sum(map(len, ps))), (1, sum(map(len, more)))]  # one packed pass each
    monkeypatch.undo()
    assert_each_row_as_alone(serve_engine, slots, ps, more, together, together2)


def test_an_idle_scheduler_gathers_a_burst_into_one_pass(serve_engine, monkeypatch):
    """Requests that reach an idle server a few ms apart are prefilled together (serve's clients start
    together but arrive one by one): the first step waits until none has come for GATHER_QUIET_S (stretched
    here, so that the test does not depend on thread timing)."""
    import llamazoo.serving.scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "GATHER_QUIET_S", 0.3)
    monkeypatch.setattr(scheduler_module, "GATHER_MAX_S", 5.0)
    passes = []
    real = SlotCache._prefill_pass
    monkeypatch.setattr(SlotCache, "_prefill_pass", lambda self, first, chunks: passes.append(len(chunks))
                        or real(self, first, chunks))
    sched = Scheduler(serve_engine, [], max_concurrent=4, prefill_chunk=CHUNK)
    passes.clear()
    seqs = [make(0, p) for p in prompts((5, 9, 7), seed=41)]

    def arrive():
        for s in seqs:
            sched.submit([s])
            time.sleep(0.05)

    sender = threading.Thread(target=arrive)
    sender.start()
    sched.run(until=lambda: all(s.done for s in seqs))
    sender.join()
    assert passes == [3]


def burst(engine, ps, monkeypatch):
    """Each prompt's solo tokens, then all prompts submitted at once: (their tokens, their sequences, the
    number of prompts in each prefill pass of the burst, the scheduler)."""
    solo = []
    for i, p in enumerate(ps):
        s = make(i, p)
        run_all(engine, [s])
        solo.append(s.tokens)
    passes = []
    real = SlotCache._prefill_pass
    monkeypatch.setattr(SlotCache, "_prefill_pass", lambda self, first, chunks: passes.append(len(chunks))
                        or real(self, first, chunks))
    sched = Scheduler(engine, [], max_concurrent=len(ps), prefill_chunk=CHUNK)
    passes.clear()  # the start-up probes'
    seqs = [make(i, p) for i, p in enumerate(ps)]
    sched.submit(seqs)
    while sched.step():
        pass
    assert [s.tokens for s in seqs] == solo
    return seqs, passes, sched


def test_a_burst_is_prefilled_in_few_passes_with_solo_tokens(serve_engine, monkeypatch):
    """Sequences arriving together are prefilled in shared passes (not one pass each), sequences sharing a
    whole-chunk prefix reuse it from the first one's row, and every sequence gives its solo tokens."""
    system = prompts((CHUNK,), seed=30)[0]
    ps = prompts(LENGTHS, seed=31) + [system + q for q in prompts((4, 9, 2), seed=32)]
    seqs, passes, _ = burst(serve_engine, ps, monkeypatch)
    chunks = sum(-(-len(p) // CHUNK) for p in ps) - 2  # two of the three share the system prompt's chunk
    assert sum(passes) == chunks and len(passes) <= chunks // 2, passes
    assert [s.cached_tokens for s in seqs[-3:]] == [0, CHUNK, CHUNK]


def test_without_row_invariant_kernels_prompts_are_prefilled_one_per_pass(serve_engine, monkeypatch):
    """Where the start-up probe finds that rows prefilled together get other numbers than alone, every
    pass holds one prompt, and sequences still give their solo tokens."""
    monkeypatch.setattr(SlotCache, "probe_batched_prefill", lambda self: False)
    ps = prompts((5, 17, 40, 3), seed=41)
    _, passes, sched = burst(serve_engine, ps, monkeypatch)
    assert not sched.slots.batched_prefill
    assert passes == [1] * sum(-(-len(p) // CHUNK) for p in ps)


def test_per_row_sampling_equals_one_row_sampling():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    params = [SamplingParams(), SamplingParams(do_sample=True, temperature=0.7, top_k=10),
              SamplingParams(repetition_penalty=1.3), SamplingParams(do_sample=True, top_p=0.8, min_p=0.05)]
    seen = [None, None, torch.zeros(50, dtype=torch.bool), None]
    seen[2][logits[2].argmax()] = True
    gens = [None, torch.Generator().manual_seed(1), None, torch.Generator().manual_seed(2)]
    got = choose_tokens_per_row(logits, params, gens, seen)
    refs = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    want = [choose_tokens(logits[0:1], params[0]), choose_tokens(logits[1:2], params[1], refs[0]),
            choose_tokens(logits[2:3], params[2], None, seen[2][None]), choose_tokens(logits[3:4], params[3], refs[1])]
    assert got.tolist() == [int(w) for w in want]
    assert got[2] != logits[2].argmax()  # the penalty did act


def test_slot_cache_grows_and_moves_rows(engine):
    """A cache grown inside a step keeps its rows, and rows can be swapped and copied afterwards."""
    p, q = prompts((40, 9), seed=11)
    slots = SlotCache(engine, 3, 256, initial_length=32)
    a = slots.prefill(0, p, 0)  # 40 tokens: the cache doubles to 64 slots
    b = slots.prefill(1, q, 0)
    assert slots.length == 64
    toks = [int(a.argmax()), int(b.argmax())]
    ref = slots.decode(toks, [40, 9])
    slots.reserve(200)
    assert slots.length == 256
    slots.swap(0, 1, 41)
    slots.copy_prefix(0, 2, 10)
    swapped = slots.decode(toks[::-1], [9, 40])
    assert torch.equal(swapped[0], ref[1]) and torch.equal(swapped[1], ref[0])


def test_random_traffic_equals_solo_runs(tmp_path):
    """Random arrivals, prompt lengths (some sharing a prefix), max_tokens past the cache's first 256 slots
    (it grows while others run), greedy/sampled/penalized rows, EOS, cancellations: every sequence that
    was not cancelled gives its solo tokens, and the scheduler ends idle."""
    import random

    hf_tiny_model(max_position_embeddings=600, num_key_value_heads=2).save_pretrained(tmp_path)
    engine = Engine(load_model(tmp_path), tokenizer=None)
    rng = random.Random(0)
    shared = [rng.randrange(3, 256) for _ in range(48)]

    def make_seq(i: int) -> Sequence:
        r = random.Random(i)
        p = shared[:r.choice([0, 16, 40])] + [r.randrange(3, 256) for _ in range(r.choice([1, 17, 60, 150]))]
        params = (SamplingParams(do_sample=True, temperature=0.9, top_k=30) if i % 3 == 0 else
                  SamplingParams(repetition_penalty=1.2 if i % 4 == 1 else 1.0))
        return Sequence(p, max_tokens=r.choice([1, 4, 30, 280]), params=params, seed=i, logprobs=2 if i % 5 == 0 else None)

    probe = Sequence(shared, max_tokens=8)
    run_all(engine, [probe])
    eos = probe.tokens[5]  # a token greedy rows do produce

    def scheduler(**kw) -> Scheduler:
        return Scheduler(engine, [eos], prefill_chunk=16, max_seq_length=600, **kw)

    n = 14
    solo = []
    for i in range(n):
        s, q = scheduler(max_concurrent=2), make_seq(i)
        s.submit([q])
        while s.step():
            pass
        solo.append((q.tokens, q.finish_reason))
    assert {r for _, r in solo} == {"stop", "length"} and max(len(t) for t, _ in solo) > 256 - 150
    sched = scheduler(max_concurrent=5, prefill_tokens=48)
    seqs = [make_seq(i) for i in range(n)]
    pending, to_cancel = list(range(n)), {2, 9}
    rng.shuffle(pending)
    for _ in range(3000):
        for _ in range(rng.choice([0, 0, 1, 3])):
            if pending:
                sched.submit([seqs[pending.pop()]])
        for i in to_cancel:
            if len(seqs[i].tokens) > 2 and not seqs[i].done and not seqs[i].cancelled:
                sched.cancel(seqs[i])
        if not sched.step() and not pending:
            break
    assert sched.slots.length == 512  # grew while sequences ran
    assert [(s.tokens, s.finish_reason) for i, s in enumerate(seqs) if not s.cancelled] == \
        [r for i, r in enumerate(solo) if not seqs[i].cancelled]
    assert sum(s.cached_tokens for s in seqs) > 0
    assert sched.rows == [None] * sched.slots.rows and sched.decoding == 0 and not sched.running
