"""`wm` command line: data, train, eval, export, bench, generate, verify, serve, play, demo, launch, sweep.

One module per command group, each with `add_parser(subparsers)` registering its
commands and their handlers (`fn`). No library module imports this package.

Exit codes (DESIGN.md §6): 0 ok; 2 bad usage, config or input (the message names the
key or file; a run directory another `wm train` holds); 3 numerics guard; 42 preempted
or interrupted (SIGTERM, SIGUSR1, Ctrl-C) after a successful save; 130 interrupted with
nothing to save; `wm verify` alone exits 1 when the video fails a check (watermark not
detected, or sidecar missing, mismatched or not signed by the key).
"""

from __future__ import annotations

import argparse
import sys
import warnings

# What parsing the command line needs (no JAX: `wm --help` and `wm launch` stay fast); each
# command imports the rest.
from wm_jax import huge_pages
from wm_jax.cli import bench, data, demo, eval, export, generate, launch, serve, sweep, train
from wm_jax.cli.common import EXIT_INTERRUPTED, EXIT_NUMERICS, EXIT_USAGE
from wm_jax.config import ConfigError

__all__ = ["EXIT_INTERRUPTED", "EXIT_NUMERICS", "EXIT_USAGE", "build_parser", "main", "run"]

# In `wm --help` order.
COMMAND_GROUPS = (data, train, eval, export, bench, generate, serve, demo, launch, sweep)

# A path that is not what a command needs (a file where a directory must be, no
# permission...): bad input, reported in one line naming the path. Other OSErrors (a full
# disk, an I/O error) keep their traceback.
PATH_ERRORS = (FileExistsError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wm", description="wm_jax: pretrain and evaluate video world models")
    sub = p.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.add_parser(sub)
    return p


def usage_errors() -> tuple[type[Exception], ...]:
    """Besides ConfigError and PATH_ERRORS, the errors a command reports in one line with
    exit 2 (bad data, a damaged or missing run, a run another `wm train` holds).

    `main` calls this only once a command has raised something else: the checkpoint module
    imports JAX, which a command that only checks a config (`wm launch`) never needs."""
    from data_pipelines.writer import DatasetError
    from wm_jax.checkpoint import CheckpointError
    from wm_jax.train.lock import RunLocked

    return DatasetError, CheckpointError, RunLocked


def run() -> None:
    """The `wm` program (console script and `python -m wm_jax.cli`): re-executed with huge
    pages for XLA:CPU's buffers where that is possible (`wm_jax.huge_pages`), then `main`."""
    huge_pages.reexec()
    sys.exit(main())


def main(argv: list[str] | None = None) -> int:
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax's per-restore notices drown the console
    # JAX warns at any fork of its process. The commands' forks are subprocess's fork+exec
    # (git for provenance, ffmpeg for videos): the child runs no Python before exec, so it
    # cannot deadlock. (A fork elsewhere, e.g. multiprocessing's, still warns.)
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning, module="subprocess")
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, *PATH_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)  # e.g. "[Errno 20] Not a directory: 'runs/x'"
        return EXIT_USAGE
    except KeyboardInterrupt:  # `wm train` saves on Ctrl-C once its loop runs; before that, nothing to save
        print(f"interrupted: wm {args.command} stopped (exit {EXIT_INTERRUPTED})", file=sys.stderr)
        return EXIT_INTERRUPTED
    except usage_errors() as e:  # an `except` expression is evaluated only when an exception reaches it
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
