"""`wm bench NAME ...`: hands the rest of the command line to the benchmark's own parser."""

from __future__ import annotations

import argparse
import importlib

BENCHES = ("checkpoint", "data", "loop", "rollout", "serve", "train", "watermark")


def cmd_bench(args: argparse.Namespace) -> int:
    return importlib.import_module(f"wm_jax.bench.{args.name}").main(args.rest)


def add_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks; the last line printed is a JSON object")
    bench.add_argument("name", choices=BENCHES)
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own flags (see wm bench NAME --help)")
    bench.set_defaults(fn=cmd_bench)
