"""`llamazoo prepare` (generative_data_prep's `pipeline`) and `llamazoo data_prep` (its single-file mode).

Same flag names and meanings as generative_data_prep, so switching is a change of the command's name:
    llamazoo prepare   --input_path data.jsonl --output_path out/ --pretrained_tokenizer tok/ ...
    llamazoo data_prep --input_path data.jsonl --output_path out.hdf5 --pretrained_tokenizer tok/ ...
New: --seed (shuffles are reproducible) and --shuffle_memory_mb (the memory budget of --shuffle=large_file).
"""
from __future__ import annotations

import argparse

from llamazoo.data.packing import PACKING_CHOICES



def add_arguments(p: argparse.ArgumentParser) -> None:
    single = p.prog.split()[-1] == "data_prep"
    p.add_argument("--input_path", "--input_file_path", dest="input_path", required=True,
                   help="a .jsonl or .txt file" + ("" if single else ", or a folder of them"))
    p.add_argument("--output_path", required=True,
                   help="the .hdf5 file to write" if single else "the output folder (written atomically)")
    p.add_argument("--pretrained_tokenizer", default="default",
                   help="a tokenizer or checkpoint folder, or a llamazoo model name (default: %(default)s)")
    p.add_argument("--max_seq_length", type=int, default=2048, help="tokens per row (default: %(default)s)")
    p.add_argument("--input_packing_config", default="full", choices=PACKING_CHOICES,
                   help="how articles are packed into rows (default: %(default)s)")
    p.add_argument("--packing_boundary", default="jsonl", choices=("jsonl", "prompt_completion_pair"),
                   help="the packing unit: a whole line or one prompt/completion pair (default: %(default)s)")
    p.add_argument("--attention_boundary", default="jsonl", choices=("jsonl", "prompt_completion_pair"),
                   help="which EOS tokens are article separators (type 3) (default: %(default)s)")
    p.add_argument("--prompt_keyword", default="prompt", help="the prompt key in jsonl lines")
    p.add_argument("--completion_keyword", default="completion", help="the completion key in jsonl lines")
    p.add_argument("--apply_chat_template", action="store_true",
                   help="render pairs through the tokenizer's chat template as user/assistant turns")
    p.add_argument("--prompt_prefix", default=None, help="text put before every non-empty prompt")
    p.add_argument("--prompt_postfix", default=None, help="text put after every non-empty prompt")
    p.add_argument("--disable_space_separator", action="store_true",
                   help="do not strip the prompt's trailing spaces and start the completion with one space")
    p.add_argument("--keep_prompt_only_sequences", action="store_true",
                   help="keep pairs with an empty completion and rows without completion tokens")
    p.add_argument("--categories_path", default=None,
                   help="a .json list of category names; lines' `category` values become category_ids")
    p.add_argument("--ignore_input_format_error", action="store_true",
                   help="skip bad lines (listed in json_load_failed_lines.log) instead of stopping")
    p.add_argument("--overwrite_output_path", action="store_true", help="replace an existing output")
    p.add_argument("--no_progress", "--silent", dest="progress", action="store_false", default=None,
                   help="no progress bar (by default shown on a terminal)")
    if single:
        p.set_defaults(single_file=True)
        return
    p.set_defaults(single_file=False)
    p.add_argument("--shuffle", default="False", choices=("False", "on_RAM", "large_file"),
                   help="False: line i goes to split i %% n; on_RAM: shuffle in memory; large_file: shuffle "
                        "an input larger than memory in two passes (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle (default: %(default)s)")
    p.add_argument("--shuffle_memory_mb", type=float, default=None,
                   help="memory budget of --shuffle=large_file (default: a quarter of the free memory)")
    p.add_argument("--num_training_splits", type=int, default=None,
                   help="train files (default: 32 under 10 GB of input, 128 under 100 GB, else 256)")
    p.add_argument("--dev_ratio", type=float, default=None, help="share of the splits that are dev files")
    p.add_argument("--test_ratio", type=float, default=None, help="share of the splits kept as test text")
    p.add_argument("--num_dev_splits", type=int, default=None, help="dev files (with all three counts)")
    p.add_argument("--num_test_splits", type=int, default=None, help="test files (with all three counts)")
    p.add_argument("--do_not_balance_hdf5", action="store_true",
                   help="do not even out the row counts of the train (and dev) files")
    p.add_argument("--keep_split_jsonls", action="store_true", help="keep the split text files in splits/")
    p.add_argument("--num_workers", type=int, default=None, help="tokenizing processes (default: all cores)")


def run(args: argparse.Namespace) -> int:
    from llamazoo.data.pipeline import PrepareOptions, prepare, prepare_single_file

    keys = PrepareOptions.__dataclass_fields__.keys()
    opts = PrepareOptions(**{k: v for k, v in vars(args).items() if k in keys})
    if args.single_file:
        prepare_single_file(opts)
        print(f"wrote {opts.output_path}")
        return 0
    result = prepare(opts)
    if result.failed_lines:
        print(f"skipped {result.failed_lines} bad lines, listed in {result.output_path}/json_load_failed_lines.log")
    print(f"wrote {result.output_path}")
    return 0
