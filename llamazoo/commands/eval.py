"""`llamazoo eval`: perplexity of text or prepared data, and lm-evaluation-harness tasks.

    llamazoo eval perplexity [--config FILE] eval.input=FILE_OR_FOLDER [section.key=value ...]
    llamazoo eval harness --tasks T1,T2 [--limit N] [--include_path DIR] [section.key=value ...]
    llamazoo eval lm_eval --model llamazoo --model_args pretrained=PATH,dtype=float32 --tasks ...

`lm_eval` (imported only by the last two) is lm_eval's own command line with the `llamazoo` model
registered: lm_eval 0.4 finds no models outside its own source tree, so its plain `lm_eval` command
cannot know this one.
"""
from __future__ import annotations

import argparse


class _Parser(argparse.ArgumentParser):
    """A subcommand parser; with `pass_through` it keeps every argument, options included, for lm_eval."""

    pass_through = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if not self.pass_through:
            return super().parse_known_args(args, namespace)
        namespace = namespace if namespace is not None else argparse.Namespace()
        namespace.lm_eval_args = list(args or [])
        return namespace, []


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from llamazoo.cli import add_config_arguments
    from llamazoo.config import EvalConfig

    sub = parser.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND", required=True, parser_class=_Parser)
    p = sub.add_parser("perplexity", help="mean NLL per token and perplexity of .txt/.jsonl text or prepared HDF5 data")
    add_config_arguments(p, EvalConfig, "checkpoint/model/eval",
                         "eval.input=held_out.jsonl eval.max_seq_length=1024 eval.stride=512 eval.output=ppl.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    h = sub.add_parser("harness", help="lm-evaluation-harness tasks on the llamazoo backend")
    add_config_arguments(h, EvalConfig, "checkpoint/model/eval",
                         "checkpoint.model_name_or_path=path/to/hf-folder model.dtype=bfloat16 eval.batch_size=16")
    h.add_argument("--tasks", required=True, help="comma-separated task (or group) names")
    h.add_argument("--limit", type=float, default=None, help="at most N documents per task (a fraction if < 1)")
    h.add_argument("--num_fewshot", type=int, default=None)
    h.add_argument("--include_path", default=None, help="folder of extra task YAMLs (e.g. over local data)")
    h.add_argument("--apply_chat_template", action="store_true", help="format prompts with the chat template")
    h.add_argument("--fewshot_as_multiturn", action="store_true")
    h.add_argument("--system_instruction", default=None)
    h.add_argument("--gen_kwargs", default=None, help="e.g. max_gen_toks=64,temperature=0")
    h.add_argument("--log_samples", action="store_true", help="keep per-sample results in eval.output")
    h.add_argument("--seed", type=int, default=0, help="seed of lm_eval's few-shot sampling and numpy/torch")

    sub.add_parser("lm_eval", help="lm_eval's own command line (all its flags) with --model llamazoo available",
                   add_help=False).pass_through = True


def _harness():
    """llamazoo.evaluation.harness, or one clear error when lm_eval is not installed."""
    from llamazoo.cli import UserError

    try:
        import llamazoo.evaluation.harness as harness
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "lm_eval":
            raise
        raise UserError("this needs lm-evaluation-harness: pip install 'lm-eval==0.4.13' "
                        "(or the package's extra: pip install 'llamazoo[eval]')") from None
    return harness


def run(args: argparse.Namespace) -> int:
    from llamazoo.config import EvalConfig, load_config

    if args.eval_command == "lm_eval":
        return _harness().run_lm_eval_cli(args.lm_eval_args)
    cfg = load_config(EvalConfig, args.config, args.overrides)
    if args.eval_command == "perplexity":
        from llamazoo.evaluation.perplexity import run_perplexity

        run_perplexity(cfg, progress=not args.no_progress)
        return 0
    run_harness = _harness().run_harness

    run_harness(cfg, tasks=args.tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                include_path=args.include_path, apply_chat_template=args.apply_chat_template,
                fewshot_as_multiturn=args.fewshot_as_multiturn, system_instruction=args.system_instruction,
                gen_kwargs=args.gen_kwargs, log_samples=args.log_samples, seed=args.seed)
    return 0
