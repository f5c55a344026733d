"""Each sampling processor gives the distribution transformers' logits processor gives on the same logits."""
from __future__ import annotations

import pytest
import torch
from transformers.generation import logits_process as hf

from llamazoo.generation import sampling
from llamazoo.generation.sampling import SamplingParams, choose_tokens, process_logits

V = 300


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, V, generator=g) * 3
    x[1, :5] = 10.0  # ties at the top
    x[2] = x[2] * 0.01  # nearly flat
    x[3, 7] = 40.0  # one dominant token
    return x


@pytest.fixture
def history():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, V, (4, 12), generator=g)


def seen_of(ids: torch.Tensor) -> torch.Tensor:
    return torch.zeros(ids.shape[0], V, dtype=torch.bool).scatter_(1, ids, True)


def same_distribution(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(a), torch.isinf(b))  # the same tokens filtered
    torch.testing.assert_close(a.softmax(-1), b.softmax(-1), rtol=0, atol=1e-7)


@pytest.mark.parametrize("value", [0.3, 1.0, 1.7])
def test_temperature(logits, history, value):
    same_distribution(sampling.temperature(logits, value), hf.TemperatureLogitsWarper(value)(history, logits))


@pytest.mark.parametrize("k", [1, 5, 50, V, V + 10])
def test_top_k(logits, history, k):
    same_distribution(sampling.top_k(logits, k), hf.TopKLogitsWarper(k)(history, logits.clone()))


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p(logits, history, p):
    same_distribution(sampling.top_p(logits, p), hf.TopPLogitsWarper(p)(history, logits.clone()))


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 1.0])
def test_min_p(logits, history, p):
    same_distribution(sampling.min_p(logits, p), hf.MinPLogitsWarper(p)(history, logits.clone()))


@pytest.mark.parametrize("penalty", [0.8, 1.3, 2.0])
def test_repetition_penalty(logits, history, penalty):
    ours = sampling.repetition_penalty(logits, seen_of(history), penalty)
    ref = hf.RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_all_processors_in_transformers_order(logits, history):
    params = SamplingParams(do_sample=True, temperature=0.7, top_k=40, top_p=0.9, min_p=0.05,
                            repetition_penalty=1.2)
    chain = hf.LogitsProcessorList([hf.RepetitionPenaltyLogitsProcessor(1.2), hf.TemperatureLogitsWarper(0.7),
                                    hf.TopKLogitsWarper(40), hf.TopPLogitsWarper(0.9), hf.MinPLogitsWarper(0.05)])
    same_distribution(process_logits(logits, params, seen_of(history)), chain(history, logits.clone()))


def test_greedy_ignores_warpers_but_not_repetition_penalty(logits, history):
    params = SamplingParams(do_sample=False, temperature=0.1, top_k=3, repetition_penalty=1.5)
    ref = hf.RepetitionPenaltyLogitsProcessor(1.5)(history, logits.clone()).argmax(-1)
    assert torch.equal(choose_tokens(logits, params, seen=seen_of(history)), ref)


def test_top_k_1_is_greedy_and_seed_reproduces(logits):
    greedy = choose_tokens(logits, SamplingParams())
    top1 = choose_tokens(logits[[0, 2, 3]], SamplingParams(do_sample=True, top_k=1, temperature=2.0),
                         torch.Generator().manual_seed(3))
    assert torch.equal(top1, greedy[[0, 2, 3]])  # row 1 has a 5-way tie at the top: any of them is right
    draw = lambda seed: [choose_tokens(logits, SamplingParams(do_sample=True), torch.Generator().manual_seed(seed))
                         .tolist() for _ in range(3)]
    assert draw(5) == draw(5)


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0]]))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([choose_tokens(logits.expand(1000, 4), SamplingParams(do_sample=True), g)
                         for _ in range(10)]).flatten()
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.02)


@pytest.mark.parametrize("kw, word", [({"temperature": 0}, "temperature"), ({"top_p": 0}, "top_p"),
                                      ({"top_k": -1}, "top_k"), ({"min_p": 1.5}, "min_p"),
                                      ({"repetition_penalty": 0}, "repetition_penalty")])
def test_bad_parameters_are_named(kw, word):
    with pytest.raises(ValueError, match=word):
        SamplingParams(**kw)


def test_greedy_is_torch_argmax_on_ties_nan_inf_and_any_layout(logits):
    """`greedy` (numpy's argmax on CPU: ~15x faster than torch's at a 49152 vocabulary) picks what torch.argmax
    picks: the first of tied maxima, a NaN over everything, -inf rows, strided and bf16 logits."""
    x = torch.cat([logits, torch.full((1, V), float("-inf")), torch.ones(1, V), torch.zeros(1, V)])
    x[-2, 40:] = 2.0  # tied from 40 on
    x[-1, 17] = float("nan")
    x[-1, 200] = float("nan")
    for case in (x, x[:, ::3], x.t().contiguous().t(), x[1:2], x.bfloat16()):
        got = sampling.greedy(case)
        assert got.dtype == torch.int64 and torch.equal(got, case.argmax(-1)), case.shape
    assert sampling.greedy(x).tolist()[-3:] == [0, 40, 17]
