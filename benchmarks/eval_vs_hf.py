"""`lm_eval` on the llamazoo backend next to lm_eval's own `hf` backend: one local multiple-choice task,
same model, same batch size, same process.

The task is written here (a few hundred generated questions with 4 answers each, in a jsonl file read by
a task YAML through `dataset_path: json`), so nothing is downloaded. Both models are built first; the
timed part is `lm_eval.simple_evaluate` (tokenizing, scoring, metrics). Each backend scores every question
once, in chunks that alternate between the two (llamazoo first in even chunks, hf first in odd ones), so
that a change in the load of a shared machine falls on both. Prints both times, the ratio, whether
accuracies agree, the largest log-likelihood difference, and the load average.

    python benchmarks/eval_vs_hf.py [--samples 300] [--batch-size 8] [--dtype float32] [--threads N]
                                    [--model default]

Numbers on a shared machine move with other load: the ratio comes from one run of each.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SUBJECTS = ("the old river", "a quiet village", "the morning market", "my neighbour's garden", "the tall tower",
            "a distant island", "the school library", "our small kitchen", "the harbour bridge", "a green valley")
VERBS = ("carries", "opens", "follows", "builds", "watches", "paints", "repairs", "remembers", "crosses", "visits")
OBJECTS = ("a heavy letter", "the golden lantern", "an orchard of apples", "the painting by the window",
           "a recipe for bread", "the signal at the station", "a long journey north", "the music of the evening",
           "a careful answer", "the story of the forest", "seven wooden tables", "the last train home")


def write_task(folder: Path, samples: int, seed: int = 0) -> str:
    """A multiple-choice task over generated jsonl: a 2-4 sentence story, a question, four endings."""
    rng = random.Random(seed)
    data = folder / "mc.jsonl"
    with data.open("w") as f:
        for _ in range(samples):
            story = " ".join(f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."
                             for _ in range(rng.randint(2, 4)))
            endings = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}" for _ in range(4)]
            f.write(json.dumps({"ctx": story + " Then", "endings": endings, "label": rng.randrange(4)}) + "\n")
    (folder / "mc.yaml").write_text(
        "task: bench_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{ctx}}"\ndoc_to_choice: "{{endings}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return "bench_mc"


def metrics(samples: list[dict]) -> dict[str, float]:
    return {k: sum(float(x[k]) for x in samples) / len(samples) for k in ("acc", "acc_norm")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=50, help="questions per alternating chunk")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--model", default="default", help="a HF folder or 'default' (SmolLM2-135M-Instruct)")
    args = ap.parse_args()

    import torch
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from llamazoo.evaluation.harness import LlamazooLM
    from llamazoo.io.default import resolve_checkpoint

    folder = str(resolve_checkpoint(args.model))
    with tempfile.TemporaryDirectory() as tmp:
        task = write_task(Path(tmp), args.samples)
        manager = TaskManager(include_path=tmp, include_defaults=False)
        ours = LlamazooLM(pretrained=folder, dtype=args.dtype, device="cpu", batch_size=args.batch_size)
        hf = HFLM(pretrained=folder, dtype=args.dtype, device="cpu", batch_size=args.batch_size)
        if args.threads:
            torch.set_num_threads(args.threads)
        for lm in (ours, hf):  # warm-up (first calls, caches)
            lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=4, verbosity="ERROR")
        seconds = {"llamazoo": 0.0, "hf": 0.0}
        samples: dict[str, list[dict]] = {"llamazoo": [], "hf": []}
        for k, start in enumerate(range(0, args.samples, args.chunk)):
            ids = list(range(start, min(start + args.chunk, args.samples)))
            pair = [("llamazoo", ours), ("hf", hf)]
            for name, lm in (pair if k % 2 == 0 else pair[::-1]):
                t = time.perf_counter()
                res = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, samples={task: ids},
                                              log_samples=True, verbosity="ERROR")
                seconds[name] += time.perf_counter() - t
                samples[name] += res["samples"][task]
        load = os.getloadavg()
        requests = sum(len(x["resps"]) for x in samples["hf"])
        print(f"model {folder} ({args.dtype}), {args.samples} questions x 4 answers = {requests} requests, "
              f"batch size {args.batch_size}, torch threads {torch.get_num_threads()}")
        for name in ("llamazoo", "hf"):
            m = metrics(samples[name])
            print(f"  {name:9s} {seconds[name]:8.2f} s  {requests / seconds[name]:7.1f} requests/s  "
                  f"acc {m['acc']:.4f}  acc_norm {m['acc_norm']:.4f}")
        a, b = (sorted(samples[n], key=lambda x: x["doc_id"]) for n in ("llamazoo", "hf"))
        worst = max(abs(float(x[0][0]) - float(y[0][0])) / max(1.0, abs(float(y[0][0])))
                    for sa, sb in zip(a, b) for x, y in zip(sa["resps"], sb["resps"]))
        same = all(sa["acc"] == sb["acc"] and sa["acc_norm"] == sb["acc_norm"] for sa, sb in zip(a, b))
        print(f"  speed-up llamazoo / hf: {seconds['hf'] / seconds['llamazoo']:.2f}x; per-question accuracies "
              f"identical: {same}; largest relative log-likelihood difference {worst:.2e}")
        print(f"  load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
