"""Loss weights and article attention, exactly as the format doc / the original trainer define them."""
from __future__ import annotations

import numpy as np
import torch
from train_helpers import EOS, article, pack, pad_row

from llamazoo.data.masks import (IGNORE_INDEX, article_attention_mask, article_segments, batch_inputs,
                                 labels_and_target_types, loss_weights)
from llamazoo.io.hf import random_model
from llamazoo.model.registry import named_config
from llamazoo.training.trainer import Batch


def reference_segments(target_types: list[int]) -> list[int]:
    """The original trainer's walk, written as a plain loop (an independent reference)."""
    seg = [0] * len(target_types)
    n, start = 0, 0
    for i, t in enumerate(target_types):
        if start is not None and t in (2, 3):
            n += 1
            for j in range(start, i + 1 if t == 3 else i):
                seg[j] = n
            start = None
        elif start is None and t not in (2, 3):
            start = i + 1
    return seg


def test_segments_match_the_original_walk_on_random_rows():
    rng = np.random.default_rng(0)
    for _ in range(200):
        L = int(rng.integers(2, 40))
        types = rng.choice([0, 1, 3, 2], size=L, p=[0.3, 0.4, 0.2, 0.1])
        tt = labels_and_target_types(torch.zeros(1, L, dtype=torch.long), torch.tensor(types)[None])[1]
        seg, _ = article_segments(tt)
        ref = reference_segments(tt[0].tolist())
        # same partition (numbering may differ where the original counts an empty segment)
        ours, theirs = seg[0].tolist(), ref
        assert [a == 0 for a in ours] == [b == 0 for b in theirs]
        for i in range(L):
            for j in range(L):
                assert (ours[i] == ours[j] != 0) == (theirs[i] == theirs[j] != 0)


def test_doc_example_mask_and_weights():
    # [art1, art1, SEP, art2, art2, SEP]: the original's docstring example.
    types = torch.tensor([[0, 1, 3, 0, 1, 3]])
    _, tt = labels_and_target_types(torch.arange(6)[None], types)
    assert tt.tolist() == [[1, 3, 0, 1, 3, 2]]
    mask = article_attention_mask(article_segments(tt)[0])[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0],
                    [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0]]
    w = loss_weights(tt, prompt_loss_weight=0.5)
    # the position after a separator target (input SEP -> art2's prompt token) and the padding target get 0
    assert w.tolist() == [[1.0, 1.0, 0.0, 1.0, 1.0, 0.0]]
    w0 = loss_weights(torch.tensor([[0, 0, 1, 3, 2]]), prompt_loss_weight=0.25)
    assert w0.tolist() == [[0.25, 0.25, 1.0, 1.0, 0.0]]


def per_token_losses(model, ids, types, **kw) -> torch.Tensor:
    b = batch_inputs(torch.tensor(ids), torch.tensor(types), **kw)
    logits = model(b["input_ids"], position_ids=b.get("position_ids"), attention_mask=b.get("attention_mask"))
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), reduction="none",
                                             ignore_index=IGNORE_INDEX).view(len(ids), -1), b["weights"]


def test_packed_row_equals_separate_rows():
    torch.manual_seed(0)
    model = random_model(named_config("tiny-gqa"), seed=0).eval()
    rng = np.random.default_rng(1)
    a, b = article(rng, 3, 7), article(rng, 4, 6)
    L = 32
    packed = pack([a, b], L)
    assert len(packed) == 1
    sep_a, sep_b = pad_row(*a, L), pad_row(*b, L)
    for reset in (False, True):
        with torch.no_grad():
            lp, wp = per_token_losses(model, [packed[0][0]], [packed[0][1]], reset_position_ids=reset)
            ls, ws = per_token_losses(model, [sep_a[0], sep_b[0]], [sep_a[1], sep_b[1]], reset_position_ids=reset)
        na, nb = len(a[0]), len(b[0])
        # article A's positions, then B's (B starts after A's separator position, which has weight 0)
        assert wp[0, na - 1] == 0  # input = A's EOS, target = B's first token
        torch.testing.assert_close(wp[0, :na - 1], ws[0, :na - 1])
        torch.testing.assert_close(wp[0, na:na + nb - 1], ws[1, :nb - 1])
        torch.testing.assert_close(lp[0, :na - 1], ls[0, :na - 1], atol=1e-5, rtol=0)
        torch.testing.assert_close(lp[0, na:na + nb - 1], ls[1, :nb - 1], atol=1e-5, rtol=0)
        assert wp.sum() == ws.sum()


def weighted_loss(model, ids, types, **kw) -> float:
    with torch.no_grad():
        lp, w = per_token_losses(model, ids, types, **kw)
    return float((lp.nan_to_num() * w).sum() / w.sum())


def test_prompt_loss_weight_zero_ignores_prompts_and_padding_never_counts():
    model = random_model(named_config("tiny"), seed=0).eval()
    rng = np.random.default_rng(2)
    ids, types = pad_row(*article(rng, 5, 6), 24)
    base = weighted_loss(model, [ids], [types], prompt_loss_weight=0.0)
    b = batch_inputs(torch.tensor([ids]), torch.tensor([types]), prompt_loss_weight=0.0)
    tt = labels_and_target_types(torch.tensor([ids]), torch.tensor([types]))[1]
    assert (b["weights"][tt == 0] == 0).all() and (b["labels"][tt == 0] == IGNORE_INDEX).all()
    assert (b["weights"][tt == 1] == 1).all()
    # padding: any pad token ids give the same loss, with or without article attention
    for attn in (True, False):
        ref = weighted_loss(model, [ids], [types], prompt_loss_weight=0.0, article_attention=attn)
        other = list(ids)
        for i, t in enumerate(types):
            if t == 2:
                other[i] = int(rng.integers(3, 512))
        assert weighted_loss(model, [other], [types], prompt_loss_weight=0.0, article_attention=attn) == ref
    assert abs(base - weighted_loss(model, [ids], [types], prompt_loss_weight=0.0)) == 0
    # prompt_loss_weight=1 counts the prompt targets too: a different number
    assert weighted_loss(model, [ids], [types], prompt_loss_weight=1.0) != base


def test_trainer_loss_path_equals_full_logits_path():
    """The trainer's head-on-weighted-positions-only loss equals a plain full-logits cross entropy."""
    from llamazoo.training.trainer import loss_sums, make_batch

    model = random_model(named_config("tiny"), seed=0)
    rng = np.random.default_rng(3)
    rows = pack([article(rng, 3, 5) for _ in range(6)], 24)
    ids, types = torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])

    class T:
        prompt_loss_weight, article_attention, reset_position_ids = 0.3, True, False

    batch = make_batch(ids, types, T, torch.device("cpu"))
    assert isinstance(batch, Batch)
    s1, w1 = loss_sums(model, batch)
    s2, w2 = loss_sums(model, batch, full_logits=True)
    torch.testing.assert_close(s1, s2, atol=1e-4, rtol=1e-6)
    assert w1 == w2 and EOS == 2
    # trimming all-padding trailing columns changes nothing
    wide = torch.nn.functional.pad(ids, (0, 40)), torch.nn.functional.pad(types, (0, 40), value=2)
    full = batch_inputs(*wide, prompt_loss_weight=0.3)
    untrimmed = Batch(full["input_ids"], full["labels"], full["weights"], full["attention_mask"], None, len(ids))
    trimmed = make_batch(*wide, T, torch.device("cpu"))
    assert trimmed.input_ids.shape[1] == 32 and untrimmed.input_ids.shape[1] == 64
    s3, w3 = loss_sums(model, untrimmed)
    s4, w4 = loss_sums(model, trimmed)
    torch.testing.assert_close(s3, s4, atol=1e-5, rtol=1e-6)
    assert w3 == w4 == w1


def test_single_article_rows_use_the_causal_fast_path_with_the_same_loss():
    from llamazoo.data.masks import article_attention_mask, article_segments, single_article_rows
    from llamazoo.training.trainer import loss_sums

    model = random_model(named_config("tiny"), seed=0)
    rng = np.random.default_rng(4)
    rows = [pad_row(*article(rng, 3, int(n)), 24) for n in (5, 9, 20)]
    ids, types = torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])
    b = batch_inputs(ids, types)
    assert "attention_mask" not in b
    seg, start = article_segments(labels_and_target_types(ids, types)[1])
    explicit = Batch(b["input_ids"], b["labels"], b["weights"], article_attention_mask(seg), None, 3)
    fast = Batch(b["input_ids"], b["labels"], b["weights"], None, None, 3)
    torch.testing.assert_close(loss_sums(model, explicit)[0], loss_sums(model, fast)[0], atol=1e-5, rtol=1e-6)
    two = pack([article(rng, 2, 4), article(rng, 2, 4)], 24)
    t2 = torch.tensor([two[0][1]])
    assert not single_article_rows(*article_segments(labels_and_target_types(t2, t2)[1]))
    assert "attention_mask" in batch_inputs(torch.tensor([two[0][0]]), t2)


def test_fused_head_cross_entropy_matches_autograd():
    from llamazoo.training.loss import weighted_linear_cross_entropy

    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        h = torch.randn(37, 16, dtype=dtype, requires_grad=True)
        weight = torch.randn(50, 16, dtype=dtype, requires_grad=True)
        labels, w = torch.randint(0, 50, (37,)), torch.rand(37)
        fused = weighted_linear_cross_entropy(h, weight, labels, w, chunk=8)
        (2 * fused).backward()
        gh, gw = h.grad.clone(), weight.grad.clone()
        h.grad = weight.grad = None
        ref = (torch.nn.functional.cross_entropy((h @ weight.t()).float(), labels, reduction="none") * w).sum()
        (2 * ref).backward()
        torch.testing.assert_close(fused, ref, atol=tol, rtol=tol)
        torch.testing.assert_close(gh, h.grad, atol=tol, rtol=tol)
        torch.testing.assert_close(gw, weight.grad, atol=tol, rtol=tol)
        with torch.no_grad():
            torch.testing.assert_close(weighted_linear_cross_entropy(h, weight, labels, w, chunk=8), ref.detach(),
                                       atol=tol, rtol=tol)
