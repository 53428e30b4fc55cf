"""`wm export`: a run's checkpoint as an inference bundle."""

from __future__ import annotations

import argparse


def cmd_export(args: argparse.Namespace) -> int:
    from wm_jax.export import export_bundle

    info = export_bundle(args.workdir, args.out, args.step)
    print(
        f"wrote {args.out}: {info['stage']} parameters at step {info['step']}"
        + (" + its tokenizer" if "tokenizer" in info else "")
    )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    exp = sub.add_parser("export", help="write an inference bundle (parameters + config + manifest)")
    exp.add_argument("--workdir", required=True)
    exp.add_argument("--step", type=int)
    exp.add_argument("--out", required=True)
    exp.set_defaults(fn=cmd_export)
