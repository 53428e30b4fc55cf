"""`wm train`: one stage, single- or multi-process; `--dry-run` compiles and reports only."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator

from wm_jax import config as config_lib
from wm_jax.cli.common import EXIT_INTERRUPTED, EXIT_NUMERICS, EXIT_USAGE
from wm_jax.presets import preset_path


@contextlib.contextmanager
def ctrl_c_ends_at_once() -> Iterator[None]:
    """Outside the training loop (which takes SIGINT over to save, then exit 42) Ctrl-C ends
    `wm train` at once, in one line, exit 130: there is nothing to save. Not by a
    KeyboardInterrupt: one raised inside a gc callback is swallowed (the run went on), and
    interpreter shutdown while XLA compiles on other threads can crash."""
    if threading.current_thread() is not threading.main_thread():  # signal.signal works only there
        yield
        return

    def abort(signum: int, frame: object) -> None:
        print(
            f"interrupted: wm train stopped outside the training loop, nothing to save (exit {EXIT_INTERRUPTED}); "
            "rerun to resume",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_INTERRUPTED)

    previous = signal.signal(signal.SIGINT, abort)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def cmd_train(args: argparse.Namespace) -> int:
    with ctrl_c_ends_at_once():
        return _train_command(args)


def _train_command(args: argparse.Namespace) -> int:
    from wm_jax.train.loop import EXIT_PREEMPTED, Preempted, train

    cfg = config_lib.load(preset_path(args.config), args.set)
    if args.dry_run:
        from wm_jax.train import dry_run

        report = dry_run.compile_report(cfg)
        print(dry_run.format_report(report))
        print(json.dumps(report))
        return 0 if dry_run.fits(report) else EXIT_USAGE

    from wm_jax import distributed

    # Flags first, then WM_* variables (set by `wm launch`), then a detected cluster.
    joined = distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    if joined["mode"] != "single":
        print(
            f"process {joined['process_index']} of {joined['process_count']} joined ({joined['mode']})", file=sys.stderr
        )
    try:
        train(cfg, args.workdir)
    except Preempted:
        return EXIT_PREEMPTED
    except FloatingPointError as e:
        print(f"error: numerics guard: {e}", file=sys.stderr)
        return EXIT_NUMERICS
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train a stage; resumes if the workdir has checkpoints")
    train.add_argument("--config", required=True, help="YAML file or preset name (wm_jax/presets)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    train.add_argument("--workdir", required=True)
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="compile the step for the mesh and print parameters, FLOPs and per-device memory; no training",
    )
    train.add_argument(
        "--coordinator", help="host:port of process 0, to join a multi-process run (else $WM_COORDINATOR)"
    )
    train.add_argument("--num-processes", type=int, help="processes in the run (else $WM_NUM_PROCESSES)")
    train.add_argument("--process-id", type=int, help="this process's index (else $WM_PROCESS_ID)")
    train.set_defaults(fn=cmd_train)
