"""`wm serve` and `wm play`: argparse in, exit code out (the CLI registers these).

    wm serve --workdir RUN|BUNDLE [--port 8000] [--host 127.0.0.1] [--token T] [--max-sessions 16]
             [--render decode|carry] ...
    wm play  --workdir RUN|BUNDLE [--port 8765] [--no-browser] ...   # the same server, page first

Exit codes: 0 stopped (Ctrl-C); 2 bad usage, config or run, or a port that cannot be bound.
"""

from __future__ import annotations

import argparse
import sys

from wm_jax.config import RENDERS

DEFAULT_PORTS = {"serve": 8000, "play": 8765}


def add_arguments(parser: argparse.ArgumentParser, command: str = "serve") -> None:
    """The options of `wm serve` (command "serve") or `wm play` ("play")."""
    parser.add_argument("--workdir", required=True, help="a dynamics run directory or an inference bundle")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORTS[command])
    parser.add_argument("--token", default=None, help="require `Authorization: Bearer TOKEN` on every /v1 request")
    parser.add_argument(
        "--max-sessions",
        type=int,
        default=16 if command == "serve" else 4,
        help="sessions held at once: the engine's batch (429 past it)",
    )
    parser.add_argument("--max-queue", type=int, default=64, help="step requests waiting at most (429 past it)")
    parser.add_argument("--gather-ms", type=float, default=4.0, help="how long a step waits for other sessions' steps")
    parser.add_argument("--idle-timeout", type=float, default=300.0, help="seconds before an idle session expires")
    parser.add_argument(
        "--window",
        type=int,
        default=None,
        help="cache slots per session (default: model.dynamics.temporal_window, else the training "
        "clip length - 1); longer sessions slide",
    )
    parser.add_argument("--context-frames", type=int, default=None, help="default: the run's eval.context_frames")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (deterministic)")
    parser.add_argument(
        "--render",
        choices=RENDERS,
        default=None,
        help="how generated frames become pixels: decode every frame, or carry the shown pixels of "
        "each patch whose FSQ code did not change (default: the run's eval.render)",
    )
    parser.add_argument("--data", default=None, help="dataset directory (default: the run's data.dir)")
    parser.add_argument("--record-dir", default=None, help="where recordings/ goes (default: the run's directory)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20)
    parser.add_argument(
        "--max-memory-gib",
        type=float,
        default=2.0,
        help="POST /v1/generate refuses a script whose video would need more memory than this "
        "(estimated before any allocation, as `wm generate --max-memory-gib`)",
    )
    if command == "play":
        parser.add_argument("--no-browser", action="store_true", help="print the page's address, do not open it")


def _serve(args: argparse.Namespace, open_page: bool) -> int:
    from wm_jax import checkpoint as ckpt
    from wm_jax.config import ConfigError
    from wm_jax.serve.app import create_app
    from wm_jax.serve.engine import Engine, EngineError

    try:
        import uvicorn
    except ImportError:
        print("error: `wm serve` needs starlette and uvicorn: pip install starlette uvicorn", file=sys.stderr)
        return 2
    for name in ("max_sessions", "max_queue", "max_body_bytes"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if not args.max_memory_gib > 0:
        print(f"error: --max-memory-gib must be > 0, got {args.max_memory_gib}", file=sys.stderr)
        return 2
    try:
        engine = Engine(
            args.workdir,
            max_sessions=args.max_sessions,
            window=args.window,
            context_frames=args.context_frames,
            temperature=args.temperature,
            render=args.render,
            idle_timeout_s=args.idle_timeout,
            data_dir=args.data,
        )
    except (ConfigError, ckpt.CheckpointError, EngineError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    app = create_app(
        engine,
        token=args.token,
        max_queue=args.max_queue,
        gather_s=args.gather_ms / 1000,
        max_body_bytes=args.max_body_bytes,
        record_dir=args.record_dir,
        generate_max_gib=args.max_memory_gib,
    )
    url = f"http://{args.host}:{args.port}/" + (f"#token={args.token}" if args.token else "")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.token:
        print(f"warning: serving on {args.host} without --token: anyone who can reach it can use it", file=sys.stderr)
    print(
        f"wm {'play' if open_page else 'serve'}: {engine.info()['sessions']}/{args.max_sessions} sessions, "
        f"window {engine.window} frames; open {url}",
        flush=True,
    )
    if open_page:
        import webbrowser

        webbrowser.open(url)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"))
    try:
        server.run()
    except SystemExit as e:  # uvicorn exits when it cannot bind the port
        print(f"error: could not serve on {args.host}:{args.port}", file=sys.stderr)
        return 2 if e.code else 0
    return 0


def run_serve(args: argparse.Namespace) -> int:
    return _serve(args, open_page=False)


def run_play(args: argparse.Namespace) -> int:
    return _serve(args, open_page=not args.no_browser)


def main(argv: list[str] | None = None) -> int:
    """`python -m wm_jax.serve {serve,play,bench} ...` (until the `wm` CLI registers the
    commands); `bench` takes `wm bench serve`'s flags (wm_jax/serve/bench.py)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from wm_jax.serve.bench import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m wm_jax.serve", epilog="also: bench --workdir RUN [...]")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, run in (("serve", run_serve), ("play", run_play)):
        sub = commands.add_parser(name)
        add_arguments(sub, name)
        sub.set_defaults(run=run)
    args = parser.parse_args(argv)
    return args.run(args)
