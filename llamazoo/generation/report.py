"""The latency report: the original Model Zoo's fields, per row and aggregate, computed from token counts.

Per row (times from the start of its batch): time to first token = the batch's prefill + first choice;
latency per token excluding the first = (total - first) / (n - 1); overall = total / n; total latency =
the row's time to its last token (the original multiplied by the batch size instead: not copied);
tokens/s are the inverses; prompt tokens/s = the row's prompt tokens / time to first token.
Aggregate: latencies are means over rows; throughputs are all tokens over all time (batches run one
after the other), so a batch of 8 shows 8 rows' tokens per step.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

from llamazoo.generation.engine import RowResult

FIELDS = (
    ("time_to_first_token_s", "Time to first token", "s"),
    ("latency_per_token_excl_first_ms", "Latency per token excluding the first", "ms"),
    ("latency_per_token_ms", "Latency per token overall", "ms"),
    ("total_latency_s", "Total latency", "s"),
    ("tokens_per_s_excl_first", "Tokens/second excluding the first", ""),
    ("tokens_per_s", "Tokens/second overall", ""),
    ("prompt_tokens_per_s", "Prompt tokens/second", ""),
)


def _div(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def row_metrics(r: RowResult) -> dict[str, Any]:
    n, ttft, total = r.num_tokens, r.time_to_first_token, r.total_time
    return {
        "prompt_tokens": len(r.prompt_ids),
        "generated_tokens": n,
        "stop_reason": r.stop_reason,
        "time_to_first_token_s": ttft,
        "latency_per_token_excl_first_ms": None if n < 2 else 1000 * (total - ttft) / (n - 1),
        "latency_per_token_ms": _div(1000 * total, n),
        "total_latency_s": total,
        "tokens_per_s_excl_first": None if n < 2 else _div(n - 1, total - ttft),
        "tokens_per_s": _div(n, total),
        "prompt_tokens_per_s": _div(len(r.prompt_ids), ttft),
    }


def aggregate_metrics(rows: Sequence[RowResult]) -> dict[str, Any]:
    batches: dict[int, list[RowResult]] = {}
    for r in rows:
        batches.setdefault(r.batch_id, []).append(r)
    wall = sum(max(r.total_time for r in b) for b in batches.values())
    prefill = sum(b[0].time_to_first_token for b in batches.values())
    decode = wall - prefill
    tokens = sum(r.num_tokens for r in rows)
    per_row = [row_metrics(r) for r in rows]

    def mean(key: str) -> float | None:
        vals = [m[key] for m in per_row if m[key] is not None]
        return sum(vals) / len(vals) if vals else None

    return {
        "prompts": len(rows),
        "batches": len(batches),
        "prompt_tokens": sum(len(r.prompt_ids) for r in rows),
        "generated_tokens": tokens,
        "time_to_first_token_s": mean("time_to_first_token_s"),
        "latency_per_token_excl_first_ms": mean("latency_per_token_excl_first_ms"),
        "latency_per_token_ms": mean("latency_per_token_ms"),
        "total_latency_s": wall,
        "tokens_per_s_excl_first": _div(tokens - len(rows), decode),
        "tokens_per_s": _div(tokens, wall),
        "prompt_tokens_per_s": _div(sum(len(r.prompt_ids) for r in rows), prefill),
    }


@dataclass
class Report:
    rows: Sequence[RowResult]
    header: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {**self.header, "aggregate": aggregate_metrics(self.rows),
                "rows": [row_metrics(r) for r in self.rows]}

    def format_text(self) -> str:
        agg = aggregate_metrics(self.rows)
        lines = ["Generation summary"]
        lines += [f"  {k}: {v if isinstance(v, str) else json.dumps(v)}" for k, v in self.header.items()]
        lines.append(f"  prompts: {agg['prompts']} in {agg['batches']} batch(es); prompt tokens: "
                     f"{agg['prompt_tokens']}; generated tokens: {agg['generated_tokens']}")
        lines.append("")
        if len(self.rows) > 1:
            cols = ["row", "prompt", "new", "stop", "ttft s", "ms/tok excl 1st", "ms/tok", "total s",
                    "tok/s excl 1st", "tok/s", "prompt tok/s"]
            table = [cols]
            for i, r in enumerate(self.rows):
                m = row_metrics(r)
                table.append([str(i), str(m["prompt_tokens"]), str(m["generated_tokens"]), m["stop_reason"]]
                             + [_fmt(m[k]) for k, _, _ in FIELDS])
            widths = [max(len(row[c]) for row in table) for c in range(len(cols))]
            lines += ["  " + "  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in table]
            lines.append("")
            lines.append("Aggregate (latencies: mean over rows; throughputs: all tokens / all time):")
        for key, label, unit in FIELDS:
            lines.append(f"{label}: {_fmt(agg[key])}{' ' + unit if unit else ''}")
        return "\n".join(lines) + "\n"


def _fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
