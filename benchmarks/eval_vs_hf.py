"""`lm_eval` on the llamazoo backend next to lm_eval's own `hf` backend: one local multiple-choice task,
same model, same batch size, same process.

The task is written here (a few hundred generated questions with 4 answers each, in a jsonl file read by
a task YAML through `dataset_path: json`), so nothing is downloaded. Both models are built first; the
timed part is `lm_eval.simple_evaluate` on the task (tokenizing, scoring, metrics). Prints both times,
the ratio, whether accuracies agree, the largest log-likelihood difference, and the load average.

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


def per_sample(results: dict, task: str) -> list[list[float]]:
    return [[float(r[0][0]) for r in s["resps"]] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
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
        runs = {}
        for name, lm in (("llamazoo", ours), ("hf", hf)):
            lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=4, verbosity="ERROR")
            t = time.perf_counter()
            res = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, log_samples=True,
                                          verbosity="ERROR")
            runs[name] = (time.perf_counter() - t, res)
        requests = sum(len(s["resps"]) for s in runs["hf"][1]["samples"][task])
        load = os.getloadavg()
        print(f"model {folder} ({args.dtype}), {args.samples} questions x 4 answers = {requests} requests, "
              f"batch size {args.batch_size}, torch threads {torch.get_num_threads()}")
        for name, (secs, res) in runs.items():
            r = res["results"][task]
            print(f"  {name:9s} {secs:8.2f} s  {requests / secs:7.1f} requests/s  acc {r['acc,none']:.4f}  "
                  f"acc_norm {r['acc_norm,none']:.4f}")
        a, b = per_sample(runs["llamazoo"][1], task), per_sample(runs["hf"][1], task)
        worst = max(abs(x - y) / max(1.0, abs(y)) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
        same_acc = all(runs["llamazoo"][1]["results"][task][k] == runs["hf"][1]["results"][task][k]
                       for k in ("acc,none", "acc_norm,none"))
        print(f"  speed-up llamazoo / hf: {runs['hf'][0] / runs['llamazoo'][0]:.2f}x; accuracies identical: "
              f"{same_acc}; largest relative log-likelihood difference {worst:.2e}")
        print(f"  load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
