"""`llamazoo models`: the named configs and their exact parameter counts (meta device, no memory)."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    import json

    from llamazoo.model.registry import DESCRIPTIONS, NAMED_CONFIGS, count_parameters, named_config

    rows = []
    for name in NAMED_CONFIGS:
        cfg = named_config(name)
        rows.append(dict(name=name, parameters=count_parameters(cfg), layers=cfg.num_hidden_layers,
                         hidden=cfg.hidden_size, heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                         vocab=cfg.vocab_size, description=DESCRIPTIONS.get(name, "")))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<14} {'parameters':>16} {'layers':>6} {'hidden':>6} {'heads':>5} {'kv':>3} {'vocab':>7}  description")
    for r in rows:
        print(f"{r['name']:<14} {r['parameters']:>16,} {r['layers']:>6} {r['hidden']:>6} {r['heads']:>5} "
              f"{r['kv_heads']:>3} {r['vocab']:>7}  {r['description']}")
    print('\n"default" is the embedded SmolLM2-135M-Instruct (weights fetched and converted on first use).')
    return 0
