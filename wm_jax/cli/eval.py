"""`wm eval --workdir RUN` and `wm eval compare RUN_A RUN_B ...`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from wm_jax.cli.common import EXIT_USAGE, print_headline


def cmd_eval(args: argparse.Namespace) -> int:
    if args.runs:
        return cmd_eval_compare(args)
    if not args.workdir:
        print("error: wm eval needs --workdir RUN (or: wm eval compare RUN_A RUN_B ...)", file=sys.stderr)
        return EXIT_USAGE
    from wm_jax.eval.evaluate import evaluate

    result = evaluate(
        args.workdir,
        step=args.step,
        data_dir=args.data,
        out_dir=args.out,
        overrides=args.set,
        tokenizer_workdir=args.tokenizer_workdir,
    )
    out = Path(args.out) if args.out else Path(args.workdir) / "eval"
    if "latent_actions" in result:  # the probe's figures; its contingency table is in the report
        shown = {k: v for k, v in result["latent_actions"].items() if not isinstance(v, list)}
        print(json.dumps({"step": result["step"], "latent_actions": shown}, indent=2))
    else:
        print_headline(result)
    print(f"report: {out / 'report.md'}")
    return 0


def cmd_eval_compare(args: argparse.Namespace) -> int:
    from wm_jax.eval import compare

    if args.runs[0] != "compare" or len(args.runs) < 2:
        print(
            f"error: wm eval: unexpected arguments {args.runs}; to compare runs: wm eval compare RUN_A RUN_B ...",
            file=sys.stderr,
        )
        return EXIT_USAGE
    runs = args.runs[1:]
    table = compare.markdown_table(runs, compare.compare(runs))
    print(table, end="")
    if args.out:
        Path(args.out).write_text(table)
        print(f"wrote {args.out}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser(
        "eval",
        help="evaluate a run's checkpoint on held-out episodes; `wm eval compare RUN_A RUN_B ...` "
        "prints their metrics side by side",
    )
    ev.add_argument("runs", nargs="*", metavar="compare RUN", help="`compare` followed by run directories")
    ev.add_argument("--workdir")
    ev.add_argument("--step", type=int)
    ev.add_argument(
        "--data",
        help="dataset directory (default: the run's data.dir; give it for a run whose dataset is no longer there)",
    )
    ev.add_argument(
        "--tokenizer-workdir",
        metavar="DIR",
        help="the tokenizer run of a dynamics run (default: the "
        "run's train.tokenizer_workdir; give it for a run moved without its tokenizer run)",
    )
    ev.add_argument("--out", help="report directory (eval), or the markdown file written by compare")
    ev.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="eval.KEY=VALUE",
        help="override an eval key for this evaluation, e.g. eval.guidance=2 or eval.temperature=0.5",
    )
    ev.set_defaults(fn=cmd_eval)
