"""Token types -> labels, loss weights, article-attention segments and position ids.

The rules are those of the Model Zoo trainer reading generative_data_prep's HDF5 rows
(../shared/docs/hdf5-format.md, "Reading it for training"). Token types: 0 prompt, 1 completion,
2 padding, 3 article separator (an article's final EOS).

Everything works on the *target* types (token types shifted left by one, the last position padded
with type 2), because what a position is trained on is the token it must predict.

Segments follow the original trainer exactly: the row opens with a segment at position 0; a segment
closes at a separator target (that position included) or at a padding target (excluded); after a
close, the first position with a non-boundary target (the one whose *input* is the separator EOS and
whose target is the next article's first token) stays outside every segment, and the next segment
opens right after it. So the separator EOS is never visible to the next article, and a packed row of
two articles computes exactly what the two articles compute in rows of their own.
"""
from __future__ import annotations

import torch

PROMPT, COMPLETION, PADDING, SEPARATOR = 0, 1, 2, 3
IGNORE_INDEX = -100


def shift_left(x: torch.Tensor, fill: int) -> torch.Tensor:
    """x[:, 1:] with `fill` appended: the targets of each position."""
    return torch.cat([x[:, 1:], x.new_full((x.shape[0], 1), fill)], dim=1)


def labels_and_target_types(input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (the next token; -100 where the target is padding) and the target types."""
    target_types = shift_left(token_type_ids, PADDING)
    labels = shift_left(input_ids, IGNORE_INDEX)
    labels = labels.masked_fill(target_types == PADDING, IGNORE_INDEX)
    return labels, target_types


def loss_weights(target_types: torch.Tensor, prompt_loss_weight: float = 1.0) -> torch.Tensor:
    """Per-position loss weight (fp32): 0 for padding targets and for the position right after a
    separator target (the next article's first token cannot be predicted from the previous article),
    `prompt_loss_weight` for prompt targets, 1 for completion and separator targets."""
    w = torch.ones(target_types.shape, dtype=torch.float32, device=target_types.device)
    w = torch.where(target_types == PROMPT, torch.full_like(w, float(prompt_loss_weight)), w)
    w = w.masked_fill(target_types == PADDING, 0.0)
    after_sep = torch.zeros_like(target_types, dtype=torch.bool)
    after_sep[:, 1:] = target_types[:, :-1] == SEPARATOR
    return w.masked_fill(after_sep, 0.0)


def article_segments(target_types: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(segment ids [B,T], 0 = in no segment; segment start flags [B,T]) from the target types.

    Vectorized form of the original's walk: position i is "open" when it is the first position or
    position i-1 had a non-boundary target; it is in a segment when open and its own target is not
    padding; a segment starts at an open position whose predecessor was not open.
    """
    boundary = (target_types == SEPARATOR) | (target_types == PADDING)
    open_ = torch.ones_like(boundary)
    open_[:, 1:] = ~boundary[:, :-1]
    start = open_.clone()
    start[:, 1:] &= ~open_[:, :-1]
    in_seg = open_ & (target_types != PADDING)
    seg = torch.cumsum(start.to(torch.int32), dim=1) * in_seg
    return seg, start


def article_attention_mask(seg: torch.Tensor) -> torch.Tensor:
    """Boolean [B,1,T,T]: i may attend to j iff seg[i] == seg[j] != 0 and j <= i."""
    T = seg.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
    return (same & causal)[:, None]


def single_article_rows(seg: torch.Tensor, start: torch.Tensor) -> bool:
    """True when every row holds one segment from position 0 followed only by positions outside any
    segment. Article attention then equals plain causal attention for every position with a loss
    weight (the trailing ones attend only backwards, nothing attends to them, and their weight is 0),
    so the model can take its is_causal fast path: the common case of `single::` packed fine-tuning."""
    in_seg = seg != 0
    return not bool(start[:, 1:].any()) and bool((in_seg[:, 1:] <= in_seg[:, :-1]).all())


def article_position_ids(start: torch.Tensor) -> torch.Tensor:
    """Position ids restarting at 0 at each segment start (positions outside segments keep counting;
    nothing attends to them and their loss weight is 0)."""
    B, T = start.shape
    idx = torch.arange(T, device=start.device).expand(B, T)
    last_start = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - last_start


def batch_inputs(input_ids: torch.Tensor, token_type_ids: torch.Tensor, prompt_loss_weight: float = 1.0,
                 article_attention: bool = True, reset_position_ids: bool = False) -> dict[str, torch.Tensor]:
    """Everything a training step needs from one batch of HDF5 rows.

    Returns input_ids, labels (-100 where ignored), weights (fp32), attention_mask (bool [B,1,T,T] or
    absent when plain causal attention computes the same) and position_ids (absent unless reset per article).
    """
    input_ids = input_ids.long()
    token_type_ids = token_type_ids.long()
    labels, target_types = labels_and_target_types(input_ids, token_type_ids)
    weights = loss_weights(target_types, prompt_loss_weight)
    labels = labels.masked_fill(weights == 0, IGNORE_INDEX)
    out = {"input_ids": input_ids, "labels": labels, "weights": weights}
    if article_attention or reset_position_ids:
        seg, start = article_segments(target_types)
        if article_attention and not single_article_rows(seg, start):
            out["attention_mask"] = article_attention_mask(seg)
        if reset_position_ids:
            out["position_ids"] = article_position_ids(start)
    return out
