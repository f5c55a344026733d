"""Counts kept while preparing a dataset: the metadata.yaml values and the metrics table users read.

The token counts are the original's (metadata.yaml keeps exactly its keys). The turn counts are ours: a
turn is a prompt/completion pair with prompt tokens (with --apply_chat_template every pair, the template
writes a prompt), and it counts as dropped when none of its prompt tokens is written. So every turn read
is in the output or in a dropped count: the number of prompt spans written is
turns - turns_dropped_from_packing - turns_dropped_from_all_prompt.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

METADATA_KEYS = ("input_tokens", "output_tokens", "prompt_tokens", "completion_tokens", "padding_tokens",
                 "sequences", "articles", "tokens_dropped_from_packing", "tokens_dropped_from_all_prompt")


@dataclass
class Metrics:
    """Token and row counts of one split (or a sum of splits). Separator tokens count as completion."""

    input_tokens: int = 0          # tokens made from the input, before packing
    output_tokens: int = 0         # tokens in the written rows (rows * max_seq_length)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    padding_tokens: int = 0
    sequences: int = 0
    articles: int = 0              # input lines read (bad lines skipped with --ignore_input_format_error excluded)
    tokens_dropped_from_packing: int = 0
    tokens_dropped_from_all_prompt: int = 0   # also the tokens of pairs left out for an empty completion
    turns: int = 0                 # pairs with prompt tokens read (not in metadata.yaml)
    turns_dropped_from_packing: int = 0       # all prompt tokens cut by the overflow rule (drop, truncate_*)
    turns_dropped_from_all_prompt: int = 0    # all prompt tokens in dropped rows, or left out for an empty completion

    def __iadd__(self, other: "Metrics") -> "Metrics":
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @staticmethod
    def _ratio(a: float, b: float) -> float:
        return a / b if b else 0.0

    def rows(self) -> list[tuple[str, str]]:
        """The metrics table: name, value (percentages of input or output tokens)."""
        pct = lambda a, b: f"{100 * self._ratio(a, b):.2f}%"  # noqa: E731
        used = self.prompt_tokens + self.completion_tokens
        return [
            ("Sequences", f"{self.sequences}"),
            ("Articles", f"{self.articles}"),
            ("Dataset Tokens", f"{self.output_tokens}"),
            ("Prompt Tokens", f"{self.prompt_tokens}"),
            ("Completion Tokens", f"{self.completion_tokens}"),
            ("Padding Tokens", f"{self.padding_tokens}"),
            ("Average Prompt Length", f"{self._ratio(self.prompt_tokens, self.articles):.2f}"),
            ("Average Completion Length", f"{self._ratio(self.completion_tokens, self.articles):.2f}"),
            ("Data Utilization", pct(used, self.input_tokens)),
            ("Dropped From Packing", pct(self.tokens_dropped_from_packing, self.input_tokens)),
            ("Dropped From All Prompt", pct(self.tokens_dropped_from_all_prompt, self.input_tokens)),
            ("Turns", f"{self.turns}"),
            ("Turns Dropped From Packing", f"{self.turns_dropped_from_packing}"),
            ("Turns Dropped From All Prompt", f"{self.turns_dropped_from_all_prompt}"),
            ("Sequence Utilization", pct(used, self.output_tokens)),
            ("Sequence Completion Utilization", pct(self.completion_tokens, self.output_tokens)),
        ]

    def table(self, title: str = "") -> str:
        rows = self.rows()
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        line = f"+-{'-' * w0}-+-{'-' * w1}-+"
        out = [line]
        if title:
            out += [f"| {title:<{w0 + w1 + 3}} |", line]
        out += [f"| {a:<{w0}} | {b:>{w1}} |" for a, b in rows]
        out.append(line)
        return "\n".join(out)
