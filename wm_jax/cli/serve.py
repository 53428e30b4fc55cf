"""`wm serve` (an HTTP API, concurrent sessions batched) and `wm play` (a page to steer a run)."""

from __future__ import annotations

import argparse

from wm_jax.serve import commands  # argparse only at import: the server's stack loads when run


def add_parser(sub: argparse._SubParsersAction) -> None:
    for name, fn, text in (
        ("serve", commands.run_serve, "HTTP API on 127.0.0.1: concurrent sessions batched into one rollout step"),
        ("play", commands.run_play, "a page on 127.0.0.1: steer a trained dynamics run with the keyboard"),
    ):
        parser = sub.add_parser(name, help=text)
        commands.add_arguments(parser, name)
        parser.set_defaults(fn=fn)
