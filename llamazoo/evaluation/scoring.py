"""Log-probabilities of token continuations, one forward pass per context: the core of `llamazoo eval`.

A `Group` is one context and the continuations scored after it: the answers of a multiple-choice
question, or a perplexity window split into the tokens that are only context and the tokens it scores.
All continuations of a group share one row behind the context,

    row = context + cont_1[:-1] + cont_2[:-1] + ...

each continuation at the positions that follow the context and under an attention mask that shows it the
context and its own earlier tokens only, so every continuation computes what `context + continuation`
computes alone while the context runs once. Groups with one continuation are plain causal rows (no mask:
SDPA's causal path; right padding is never seen by real positions). The LM head runs only on the
positions that predict a scored token, in fp32 chunks, so no [batch, length, vocab] tensor is ever made.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from llamazoo.model.llama import linear

HEAD_CHUNK_ELEMENTS = 1 << 24  # fp32 logits per LM-head chunk (64 MiB)


@dataclass
class Group:
    """A context (at least one token) and the continuations (at least one token each) to score after it."""

    context: Sequence[int]
    continuations: list[Sequence[int]] = field(default_factory=list)

    @property
    def row_length(self) -> int:
        return len(self.context) + sum(len(c) - 1 for c in self.continuations)


@dataclass
class Score:
    """One continuation: the sum of its tokens' log-probabilities, and whether greedy decoding from the
    context gives exactly its tokens."""

    logprob: float
    greedy: bool


def plan_batches(groups: Sequence[Group], batch_size: int) -> Iterator[list[int]]:
    """Group indices per forward pass, longest row first (the largest batch comes first, and rows of a
    batch have similar lengths). A batch's padded size (rows x its longest row) stays within
    `batch_size` x its longest request (context + continuation - 1 tokens): the tensor lm_eval's hf
    backend runs for `batch_size` requests, here holding more of them where they share contexts. With one
    continuation per group (perplexity windows, rolling windows) that is `batch_size` rows. A group is
    never split, so a group longer than the budget is a batch of its own."""
    order = sorted(range(len(groups)), key=lambda i: -groups[i].row_length)
    batch: list[int] = []
    width = longest = 0
    for i in order:
        g = groups[i]
        request = len(g.context) + max(len(c) for c in g.continuations) - 1
        if batch and (len(batch) + 1) * width > batch_size * max(longest, request):
            yield batch
            batch = []
        if not batch:
            width, longest = g.row_length, request
        batch.append(i)
        longest = max(longest, request)
    if batch:
        yield batch


def _pack(group: Group) -> tuple[list[int], list[int], list[int], list[tuple[int, int, int]]]:
    """(row tokens, positions, branch ids: 0 context / k continuation k, and (row index, target token,
    continuation) for every scored token)."""
    ctx = list(group.context)
    if not ctx:
        raise ValueError("a scored continuation needs at least one context token")
    ids, pos, branch = list(ctx), list(range(len(ctx))), [0] * len(ctx)
    targets: list[tuple[int, int, int]] = []
    for k, cont in enumerate(group.continuations):
        cont = list(cont)
        if not cont:
            raise ValueError("an empty continuation cannot be scored")
        prev = len(ctx) - 1  # the row index whose output predicts the next token of this continuation
        for j, tok in enumerate(cont):
            targets.append((prev, tok, k))
            if j < len(cont) - 1:
                ids.append(tok)
                pos.append(len(ctx) + j)
                branch.append(k + 1)
                prev = len(ids) - 1
    return ids, pos, branch, targets


def head_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor,
                  chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) (fp32) and argmax == target, from final hidden states [N, H]."""
    head = model.lm_head
    chunk = chunk or max(1, HEAD_CHUNK_ELEMENTS // head.weight.shape[0])
    lp = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    greedy = torch.empty(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    for s in range(0, hidden.shape[0], chunk):
        logits = linear(hidden[s:s + chunk].to(head.weight.dtype), head).float()
        t = targets[s:s + chunk, None]
        lp[s:s + chunk] = (logits.gather(1, t) - torch.logsumexp(logits, dim=-1, keepdim=True)).squeeze(1)
        greedy[s:s + chunk] = logits.argmax(dim=-1) == t.squeeze(1)
    return lp, greedy


@torch.inference_mode()
def score_groups(model, groups: Sequence[Group], batch_size: int,
                 on_batch: Callable[[int], None] | None = None) -> list[list[Score]]:
    """Scores of every continuation of every group, in the given order. on_batch(n) after each forward
    pass with the number of continuations it scored (progress)."""
    if model.cache_len:  # a KV cache left by generation would turn the forward into a cache step
        model.clear_cache()
    device = model.lm_head.weight.device
    out: list[list[Score | None]] = [[None] * len(g.continuations) for g in groups]
    for batch in plan_batches(groups, batch_size):
        packed = [_pack(groups[i]) for i in batch]
        B, T = len(batch), max(len(p[0]) for p in packed)
        ids = torch.zeros(B, T, dtype=torch.long)
        pos = torch.zeros(B, T, dtype=torch.long)
        branch = torch.full((B, T), -1, dtype=torch.long)  # -1: padding, seen by nothing real
        flat, tokens, owners = [], [], []
        for b, (row, p, br, targets) in enumerate(packed):
            ids[b, :len(row)] = torch.tensor(row)
            pos[b, :len(row)] = torch.tensor(p)
            branch[b, :len(row)] = torch.tensor(br)
            for idx, tok, k in targets:
                flat.append(b * T + idx)
                tokens.append(tok)
                owners.append((batch[b], k))
        tree = any(len(groups[i].continuations) > 1 for i in batch)
        mask = None
        if tree:
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            visible = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
            mask = (causal & visible)[:, None].to(device)
        hidden = model(ids.to(device), position_ids=pos.to(device) if tree else None, attention_mask=mask,
                       return_hidden=True)
        h = hidden.flatten(0, 1).index_select(0, torch.tensor(flat, device=device))
        lp, greedy = head_logprobs(model, h, torch.tensor(tokens, device=device))
        sums: dict[tuple[int, int], list] = {}
        for (g, k), v, ok in zip(owners, lp.double().tolist(), greedy.tolist()):
            acc = sums.setdefault((g, k), [0.0, True])
            acc[0] += v
            acc[1] = acc[1] and ok
        for (g, k), (v, ok) in sums.items():
            out[g][k] = Score(v, ok)
        if on_batch is not None:
            on_batch(len(sums))
    return out  # type: ignore[return-value]
