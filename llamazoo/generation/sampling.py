"""The one sampling module: logits processors and token choice, on fp32 logits.

Each processor gives the same result as the transformers logits processor of the same name (tested on
fixed logits), and they run in transformers' order: repetition penalty (greedy too), then, only when
sampling, temperature, top-k, top-p, min-p. Filtered tokens get -inf.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

NEG_INF = float("-inf")


@dataclass
class SamplingParams:
    """Off values: temperature 1, top_k 0, top_p 1, min_p 0, repetition_penalty 1."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (got {self.temperature}); use do_sample=false for greedy")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Makes tokens already in the row (seen: bool [B,V]) less likely: positive logits divided, negative
    multiplied, so the penalty always pushes away from them."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def temperature(logits: torch.Tensor, t: float) -> torch.Tensor:
    return logits / t


def top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keeps the k largest logits (and any tied with the k-th)."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keeps the smallest set of most likely tokens whose probability reaches p (at least one token).

    Works from the least likely end: a token goes when the cumulative mass of it and everything less
    likely stays within 1 - p.
    """
    ascending, order = torch.sort(logits, dim=-1)
    mass_below = ascending.softmax(-1).cumsum(-1)
    drop_sorted = mass_below <= 1 - p
    drop_sorted[..., -1] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def min_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Drops tokens whose probability is below p times the top token's probability (keeps the top one)."""
    probs = logits.softmax(-1)
    drop = probs < p * probs.amax(-1, keepdim=True)
    drop.scatter_(-1, probs.argmax(-1, keepdim=True), False)
    return logits.masked_fill(drop, NEG_INF)


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """All active processors in transformers' order; logits [B,V] fp32."""
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = repetition_penalty(logits, seen, params.repetition_penalty)
    if not params.do_sample:
        return logits
    if params.temperature != 1.0:
        logits = temperature(logits, params.temperature)
    if params.top_k > 0:
        logits = top_k(logits, params.top_k)
    if params.top_p < 1.0:
        logits = top_p(logits, params.top_p)
    if params.min_p > 0.0:
        logits = min_p(logits, params.min_p)
    return logits


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """argmax per row [B] (int64) of logits [B,V]: the first of equal maxima, a NaN above everything, as
    torch.argmax. On CPU through numpy, whose argmax is vectorized: torch's takes ~67 us for one row of
    SmolLM2's 49152 logits and ~270 us for 8 rows (2 threads, AVX2 EPYC), numpy's ~4 us a row, out of a
    ~20 ms decode step."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2:
        return torch.from_numpy(logits.detach().numpy().argmax(-1).astype("int64", copy=False))
    return logits.argmax(-1)


def choose_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
                  seen: torch.Tensor | None = None) -> torch.Tensor:
    """Next token per row [B] (int64): argmax when greedy, else a draw from the processed distribution."""
    logits = process_logits(logits.float(), params, seen)
    if not params.do_sample:
        return greedy(logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def choose_tokens_per_row(logits: torch.Tensor, params: Sequence[SamplingParams],
                          generators: Sequence[torch.Generator | None],
                          seen: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """Next token per row [B] when every row has its own parameters, random generator and seen tokens
    (seen[b]: bool [V] or None), e.g. a server's requests decoded together. Row b gets exactly the token
    `choose_tokens(logits[b:b+1], params[b], generators[b], seen[b][None])` gives it alone, so a seeded
    request draws the same tokens whatever it is batched with. Plain greedy rows share one argmax."""
    out = greedy(logits.float())
    for b, p in enumerate(params):
        s = seen[b] if seen is not None else None
        if p.do_sample or (p.repetition_penalty != 1.0 and s is not None):
            out[b] = choose_tokens(logits[b:b + 1], p, generators[b], None if s is None else s[None])[0]
    return out
