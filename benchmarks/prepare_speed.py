"""Speed and memory of `llamazoo prepare` on a >= 100 MB jsonl built from ../shared/data/gdp-examples.

Prints MB/s, tokens/s and peak RSS (this process plus its workers) of a full run with 2 workers and the
GPT-2 tokenizer, then the peak RSS of the --shuffle=large_file stage on the same input with a memory budget
several times smaller than the input. Not a test; run by hand:
    python benchmarks/prepare_speed.py [--mb 100] [--workers 2] [--budget_mb 25]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil

SHARED = Path(os.environ.get("LLAMAZOO_SHARED", Path(__file__).resolve().parents[2] / "shared"))
EXAMPLES = ["pretraining.jsonl", "generative_tuning.jsonl", "dialogue.jsonl", "metaICL.jsonl",
            "pipeline_test.jsonl", "data_prep_test.jsonl", "category.jsonl"]


class PeakRSS:
    """Samples the summed memory of this process and its children every 20 ms.

    PSS (proportional set size) is summed, so pages that forked workers share with the parent count once.
    """

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me] + me.children(recursive=True):
                try:
                    total += p.memory_full_info().pss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.05)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def build_input(path: Path, mb: float) -> None:
    lines = []
    for name in EXAMPLES:
        lines += (SHARED / "data" / "gdp-examples" / name).read_bytes().splitlines(keepends=True)
    block = b"".join(line if line.endswith(b"\n") else line + b"\n" for line in lines)
    with open(path, "wb") as f:
        while f.tell() < mb * 2**20:
            f.write(block)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mb", type=float, default=100.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--budget_mb", type=float, default=25.0)
    ap.add_argument("--max_seq_length", type=int, default=2048)
    args = ap.parse_args()

    from llamazoo.data.inputs import Origins
    from llamazoo.data.pipeline import PrepareOptions, prepare
    from llamazoo.data.splits import SplitWriters, deal_large_file, split_layout

    tmp = Path(tempfile.mkdtemp(prefix="llamazoo-bench-"))
    try:
        src = tmp / "input.jsonl"
        build_input(src, args.mb)
        size_mb = src.stat().st_size / 2**20
        opts = PrepareOptions(input_path=str(src), output_path=str(tmp / "out"),
                              pretrained_tokenizer=str(SHARED / "tokenizers" / "gpt2"),
                              max_seq_length=args.max_seq_length, num_workers=args.workers,
                              num_training_splits=8, progress=False)
        base = psutil.Process().memory_full_info().pss
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            res = prepare(opts, out=lambda s: None)
            dt = time.perf_counter() - t0
        tokens = res.train.input_tokens + res.dev.input_tokens
        print(f"input {size_mb:.1f} MB, {res.train.articles} lines, {tokens:,} tokens, {args.workers} workers")
        print(f"prepare: {dt:.1f} s  {size_mb / dt:.2f} MB/s  {tokens / dt:,.0f} tokens/s  "
              f"peak memory (PSS) {rss.peak / 2**20:.0f} MB (process + workers; {base / 2**20:.0f} MB before)")
        shutil.rmtree(tmp / "out")

        work = tmp / "shuffle"
        layout = split_layout(8, 0, 0)
        writers = SplitWriters(layout, ".jsonl", work / "splits", work / "test", work)
        before = psutil.Process().memory_full_info().pss
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            deal_large_file([src], Origins([src]), writers, len(layout), 0, int(args.budget_mb * 2**20), work)
            writers.close()
            dt = time.perf_counter() - t0
        grow = (rss.peak - before) / 2**20
        print(f"large_file shuffle: {dt:.1f} s, budget {args.budget_mb:.0f} MB for {size_mb:.0f} MB of input, "
              f"peak memory growth {grow:.1f} MB -> {'within' if grow <= args.budget_mb else 'OVER'} budget")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
