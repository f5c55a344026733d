"""Prometheus text-format metrics for `GET /metrics`, without a client library: counters, gauges read at
scrape time, and histograms with fixed buckets. Updates come from the scheduler thread and the event
loop, so each metric takes a lock."""
from __future__ import annotations

import threading
from typing import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in sorted(labels.items()))
    return "{" + inner + "}"


class Counter:
    def __init__(self, name: str, help_text: str):
        self.name, self.help = name, help_text
        self.values: dict[tuple, float] = {}
        self.lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self.lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        return self.values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self.lock:
            items = sorted(self.values.items()) or [((), 0.0)]
        lines += [f"{self.name}{_labels(dict(k))} {_num(v)}" for k, v in items]
        return lines


class Gauge:
    def __init__(self, name: str, help_text: str, read: Callable[[], float]):
        self.name, self.help, self.read = name, help_text, read

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {_num(self.read())}"]


class Histogram:
    def __init__(self, name: str, help_text: str, buckets=LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help_text, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        with self.lock:
            self.counts[i] += 1
            self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self.lock:
            counts, total = list(self.counts), self.sum
        acc = 0
        for b, c in zip(self.buckets, counts):
            acc += c
            lines.append(f'{self.name}_bucket{{le="{b:g}"}} {acc}')
        acc += counts[-1]
        lines += [f'{self.name}_bucket{{le="+Inf"}} {acc}', f"{self.name}_sum {_num(total)}", f"{self.name}_count {acc}"]
        return lines


class Metrics:
    """The server's metrics; `gauges` are filled in by the server (queue depth, running sequences)."""

    def __init__(self) -> None:
        self.requests = Counter("llamazoo_requests_total", "HTTP requests by endpoint and status code")
        self.prompt_tokens = Counter("llamazoo_prompt_tokens_total", "prompt tokens of admitted sequences")
        self.cached_tokens = Counter("llamazoo_prompt_tokens_cached_total",
                                     "prompt tokens taken from the prefix cache instead of computed")
        self.generation_tokens = Counter("llamazoo_generation_tokens_total", "tokens generated")
        self.ttft = Histogram("llamazoo_time_to_first_token_seconds", "arrival to first token, per sequence")
        self.itl = Histogram("llamazoo_inter_token_latency_seconds", "time between a sequence's tokens")
        self.gauges: list[Gauge] = []

    def render(self) -> str:
        parts = [self.requests, self.prompt_tokens, self.cached_tokens, self.generation_tokens, *self.gauges,
                 self.ttft, self.itl]
        return "\n".join(line for m in parts for line in m.render()) + "\n"
