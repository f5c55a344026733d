"""`llamazoo inspect-data PATH`: check a packed HDF5 dataset (a folder or one .hdf5) by eye."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a dataset folder (from `llamazoo prepare`) or one .hdf5 file")
    p.add_argument("--rows", type=int, default=2, help="rows to decode per file (default: %(default)s)")
    p.add_argument("--start", type=int, default=0, help="first row to decode (default: %(default)s)")
    p.add_argument("--files", type=int, default=1, help="files whose rows are decoded (default: %(default)s)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder for decoding (default: the dataset's tokenizer/ folder)")
    p.add_argument("--no_color", action="store_true", help="mark spans with brackets only, no colors")


def run(args: argparse.Namespace) -> int:
    import sys

    from llamazoo.data.inspect import inspect_dataset

    color = not args.no_color and sys.stdout.isatty()
    print(inspect_dataset(args.path, rows=args.rows, start=args.start, files=args.files,
                          tokenizer=args.tokenizer, color=color))
    return 0
