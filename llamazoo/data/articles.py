"""One input line -> packing units of (token ids, token types, category ids).

This is where generative_data_prep's per-line rules live (../shared/docs/hdf5-format.md): the space rule,
prompt prefix/postfix, prompt and completion encoded separately, the tokenizer's own EOS removed and BOS
removed from a completion that follows a prompt, one EOS of type 1 after each pair, the article's last
token typed 3, and the packing / attention boundaries. Lines are handled in batches so one call of the
Rust tokenizer encodes every text of many lines, which is where the speed over the original comes from.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

PROMPT, COMPLETION, PADDING, SEP = 0, 1, 2, 3
BOUNDARIES = ("jsonl", "prompt_completion_pair")
CATEGORY_KEY = "category"


class InputFormatError(ValueError):
    """A line that is not valid input; `where` is "file:line"."""

    def __init__(self, where: str, reason: str, line: str = ""):
        super().__init__(f"{where}: {reason}")
        self.where, self.reason, self.line = where, reason, line

    def __reduce__(self):  # errors cross process boundaries
        return (InputFormatError, (self.where, self.reason, self.line))


@dataclass
class ArticleOptions:
    """The flags that decide how a line becomes tokens (names as on the command line)."""

    prompt_keyword: str = "prompt"
    completion_keyword: str = "completion"
    disable_space_separator: bool = False
    keep_prompt_only_sequences: bool = False
    prompt_prefix: Optional[str] = None
    prompt_postfix: Optional[str] = None
    packing_boundary: str = "jsonl"
    attention_boundary: str = "jsonl"
    apply_chat_template: bool = False
    category_to_id: Optional[dict[str, int]] = None


@dataclass
class Unit:
    """One packing unit: a whole line, or one pair with packing_boundary=prompt_completion_pair.

    A turn is a prompt/completion pair with prompt tokens (with a chat template: every pair); its
    prompt is one run of type-0 tokens. `turns` counts those in the unit; `skipped_turns` and
    `skipped_tokens` count the pairs with an empty completion that the prompt-only rule left out
    (without --keep_prompt_only_sequences) and the tokens they would have had, so the metrics report them.
    """

    ids: list[int] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    cats: list[int] = field(default_factory=list)
    turns: int = 0
    skipped_turns: int = 0
    skipped_tokens: int = 0

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class _Pair:
    prompt: str          # "" when there is no prompt text to encode
    completion: str      # "" when there is no completion text to encode
    category: int
    chat: bool = False   # texts come from a chat template: encode without added special tokens
    skipped: bool = False  # an empty completion left out by the prompt-only rule: encoded only to be counted


class ChatSplitter:
    """Renders pairs through a chat template and cuts the text back into prompt and completion spans.

    The whole conversation is rendered once, so text a template adds only on the first turn (BOS, a
    system block) appears once, in the first prompt. A completion is the assistant's text plus the
    template's end-of-turn marker; everything between two completions (the next user turn and the
    assistant header) is prompt; text after the last completion (a dangling generation prompt) is dropped.
    """

    def __init__(self, hf: Any):
        if not getattr(hf, "chat_template", None):
            raise ValueError("--apply_chat_template: the tokenizer has no chat_template")
        self.hf = hf
        self.end_of_turn = self._probe_end_of_turn()
        self._pieces: dict[int, list[str]] = {}

    def render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _probe_end_of_turn(self) -> str:
        x1, y1, x2, y2 = "QqXone7", "QqYone7", "QqXtwo7", "QqYtwo7"
        conv = self.render([{"role": "user", "content": x1}, {"role": "assistant", "content": y1},
                            {"role": "user", "content": x2}, {"role": "assistant", "content": y2}], False)
        first = self.render([{"role": "user", "content": x1}], True)
        between = conv[conv.index(y1) + len(y1):conv.index(x2)]  # end-of-turn + next user opener
        opener = first[:first.index(x1)]
        bos = getattr(self.hf, "bos_token", None)
        if bos and opener.startswith(bos):
            opener = opener[len(bos):]
        n = 0
        while n < min(len(between), len(opener)) and between[-1 - n] == opener[-1 - n]:
            n += 1
        marker = between[:len(between) - n]
        if not marker:  # the first turn has a block that ends like a turn: fall back to the shared prefix
            after_user = conv[conv.index(x1) + len(x1):conv.index(y1)]
            while n < len(between) and n < len(after_user) and between[n] == after_user[n]:
                n += 1
            marker = between[:n] if n < len(between) else ""
        return marker

    def _template_pieces(self, n_messages: int) -> list[str]:
        """The template's own text before each message's content (headers, end-of-turn markers, BOS, a
        system block), found by rendering placeholders; cached per conversation length."""
        pieces = self._pieces.get(n_messages)
        if pieces is None:
            marks = [f"QqM{i}sg7" for i in range(n_messages)]
            roles = ["user", "assistant"] * (n_messages // 2)
            skeleton = self.render([{"role": r, "content": m} for r, m in zip(roles, marks)], False)
            pieces, cursor = [], 0
            for m in marks:
                pos = skeleton.find(m, cursor)
                if pos < 0:
                    raise ValueError("--apply_chat_template: the chat template does not render every message, "
                                     "so its text cannot be split into prompts and completions")
                pieces.append(skeleton[cursor:pos])
                cursor = pos + len(m)
            self._pieces[n_messages] = pieces
        return pieces

    def split(self, prompts: list[str], completions: list[str], where: str) -> list[tuple[str, str]]:
        """(prompt text, completion text) of each turn, cut from the rendered conversation.

        Contents are located by position (the template's pieces between them), never by searching, so an
        empty message or a short completion that also occurs in a header ("a", "user") lands where it is.
        An empty completion becomes the end-of-turn marker alone, as in the original.
        """
        messages: list[dict[str, str]] = []
        for p, c in zip(prompts, completions):
            messages += [{"role": "user", "content": p}, {"role": "assistant", "content": c}]
        text = self.render(messages, False)
        spans, cursor = [], 0
        for i, (m, piece) in enumerate(zip(messages, self._template_pieces(len(messages)))):
            start = cursor + len(piece)
            content = m["content"]
            if not text.startswith(piece, cursor):
                raise InputFormatError(where, f"the chat template renders message {i + 1} differently from "
                                              "the others, so it cannot be split into prompt and completion")
            if not text.startswith(content, start):
                content = content.strip()  # templates that trim the contents
                if not text.startswith(content, start):
                    raise InputFormatError(where, f"the chat template changes the text of message {i + 1}, "
                                                  "so it cannot be split into prompt and completion")
            spans.append((start, start + len(content)))
            cursor = start + len(content)
        out, cursor = [], 0
        for k in range(len(prompts)):
            a_start, a_end = spans[2 * k + 1]
            end = a_end + len(self.end_of_turn) if text.startswith(self.end_of_turn, a_end) else a_end
            out.append((text[cursor:a_start], text[a_start:end]))
            cursor = end
        return out


class ArticleBuilder:
    """Turns batches of lines into packing units with one batched tokenizer call per batch."""

    def __init__(self, hf: Any, options: ArticleOptions):
        if options.packing_boundary not in BOUNDARIES:
            raise ValueError(f"--packing_boundary must be one of {', '.join(BOUNDARIES)}, "
                             f"got {options.packing_boundary!r}")
        if options.attention_boundary not in BOUNDARIES:
            raise ValueError(f"--attention_boundary must be one of {', '.join(BOUNDARIES)}, "
                             f"got {options.attention_boundary!r}")
        self.hf = hf
        self.backend = hf.backend_tokenizer
        self.opt = options
        self.eos = hf.eos_token_id
        self.bos = hf.bos_token_id
        if self.eos is None:
            raise ValueError("the tokenizer has no EOS token, which every packed article ends with")
        if options.apply_chat_template and (options.prompt_prefix or options.prompt_postfix):
            raise ValueError("--prompt_prefix/--prompt_postfix cannot be combined with --apply_chat_template: "
                             "the chat template writes the text around each prompt")
        self.chat = ChatSplitter(hf) if options.apply_chat_template else None

    # -- parsing ------------------------------------------------------------------------------
    def _pairs_of_jsonl(self, line: str, where: str) -> list[_Pair]:
        opt = self.opt
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputFormatError(where, f"not valid JSON ({e.msg} at column {e.colno})", line) from None
        items = [obj] if isinstance(obj, dict) else obj
        if not isinstance(items, list) or not all(isinstance(x, dict) for x in items):
            raise InputFormatError(where, "expected a JSON object or a list of objects with "
                                          f"{opt.prompt_keyword!r} and {opt.completion_keyword!r}", line)
        raw: list[tuple[str, str, int]] = []
        for item in items:
            if opt.completion_keyword not in item:
                raise InputFormatError(where, f"no {opt.completion_keyword!r} key (--completion_keyword)", line)
            prompt = item.get(opt.prompt_keyword)
            completion = item[opt.completion_keyword]
            prompt = "" if prompt is None else prompt
            completion = "" if completion is None else completion
            if not isinstance(prompt, str) or not isinstance(completion, str):
                raise InputFormatError(where, f"{opt.prompt_keyword!r} and {opt.completion_keyword!r} "
                                              "must be strings", line)
            category = -1
            if opt.category_to_id is not None and CATEGORY_KEY in item:
                name = item[CATEGORY_KEY]
                if not isinstance(name, str) or name not in opt.category_to_id:
                    raise InputFormatError(where, f"category {name!r} is not in --categories_path "
                                                  f"({', '.join(opt.category_to_id)})", line)
                category = opt.category_to_id[name]
            raw.append((prompt, completion, category))
        if self.chat is not None:
            if not raw:
                return []
            # every turn is kept: an empty completion still has the template's end-of-turn marker
            texts = self.chat.split([r[0] for r in raw], [r[1] for r in raw], where)
            return [_Pair(p, c, r[2], True) for (p, c), r in zip(texts, raw)]
        pairs = []
        for prompt, completion, category in raw:
            skipped = not completion and not opt.keep_prompt_only_sequences
            if not opt.disable_space_separator:
                if prompt:
                    prompt = prompt.rstrip(" ")
                if completion:
                    completion = " " + completion.lstrip(" ")
            if prompt:
                prompt = (opt.prompt_prefix or "") + prompt + (opt.prompt_postfix or "")
            pairs.append(_Pair(prompt, completion, category, skipped=skipped))
        return pairs

    # -- tokens ------------------------------------------------------------------------------
    def _pair_tokens(self, pair: _Pair, p_ids: list[int], c_ids: list[int]) -> Unit:
        eos, bos = self.eos, self.bos
        if p_ids and p_ids[-1] == eos:
            p_ids = p_ids[:-1]
        if pair.prompt and c_ids and bos is not None and c_ids[0] == bos:
            c_ids = c_ids[1:]
        if c_ids and c_ids[-1] == eos:
            c_ids = c_ids[:-1]
        ids = p_ids + c_ids
        if not ids:
            return Unit()
        ids.append(eos)
        types = [PROMPT] * len(p_ids) + [COMPLETION] * (len(c_ids) + 1)
        return Unit(ids, types, [pair.category] * len(ids), turns=1 if p_ids else 0)

    def build(self, lines: Sequence[str], wheres: Sequence[str], kind: str,
              errors: Optional[list[InputFormatError]] = None) -> tuple[list[list[Unit]], int]:
        """Units for each line (in order) and the number of tokens made before packing.

        With `errors` given, bad lines are appended there and give no units; otherwise the first raises.
        """
        parsed: list[Optional[list[Any]]] = []
        texts: list[str] = []
        chat_texts: list[str] = []
        for line, where in zip(lines, wheres):
            if kind == "txt":
                parsed.append([line])
                texts.append(line)
                continue
            try:
                pairs = self._pairs_of_jsonl(line, where)
            except InputFormatError as e:
                if errors is None:
                    raise
                errors.append(e)
                parsed.append(None)
                continue
            parsed.append(pairs)
            for p in pairs:
                bucket = chat_texts if p.chat else texts
                if p.prompt:
                    bucket.append(p.prompt)
                if p.completion:
                    bucket.append(p.completion)
        enc = [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=True)] if texts else []
        chat_enc = ([e.ids for e in self.backend.encode_batch(chat_texts, add_special_tokens=False)]
                    if chat_texts else [])
        it, chat_it = iter(enc), iter(chat_enc)
        out: list[list[Unit]] = []
        n_tokens = 0
        pcp_pack = self.opt.packing_boundary == "prompt_completion_pair"
        pcp_attn = self.opt.attention_boundary == "prompt_completion_pair"
        for pairs in parsed:
            if pairs is None:
                out.append([])
                continue
            if kind == "txt":
                u = self._pair_tokens(_Pair("", pairs[0], -1), [], next(it))
                if u.ids:
                    u.types[-1] = SEP
                n_tokens += len(u)
                out.append([u])
                continue
            units: list[Unit] = []
            cur = Unit()
            for i, p in enumerate(pairs):
                src = chat_it if p.chat else it
                p_ids = next(src) if p.prompt else []
                c_ids = next(src) if p.completion else []
                u = self._pair_tokens(p, p_ids, c_ids)
                n_tokens += len(u)
                if p.skipped:  # left out (and no packing boundary), but counted as dropped
                    cur.skipped_turns += u.turns
                    cur.skipped_tokens += len(u)
                    continue
                cur.ids += u.ids
                cur.types += u.types
                cur.cats += u.cats
                cur.turns += u.turns
                if pcp_attn and cur.ids:
                    cur.types[-1] = SEP
                if pcp_pack and i != len(pairs) - 1:
                    units.append(cur)
                    cur = Unit()
            if cur.ids:
                cur.types[-1] = SEP
            units.append(cur)
            out.append(units)
        return out, n_tokens
