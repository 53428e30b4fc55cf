"""`bench_serve`: aggregate frames/s and step latency of the session engine by session count.

For each count n an engine sized for n sessions (its batch: no padding rows) holds n
sessions. After warm-up steps (compilation), the counts take turns, `rounds` times, at
`steps` // `rounds` timed engine steps each (each step advances all n sessions by one
decoded frame; taking turns keeps a shared machine's changing load from favouring one
count). A row: sessions, aggregate frames/s (frames / time), p50 and p99 step latency (ms:
what each session waits per frame), and the speedup over the first row's frames/s. The
model is loaded once. `bench_http` measures the same through the HTTP API on 127.0.0.1
(`wm bench serve --http`): the batcher, JSON and PNG encoding and the clients included.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from wm_jax.serve.engine import Engine, Model, StepRequest, load_model


def _steps(engine: Engine, ids: list[str], count: int, rng: np.random.Generator) -> list[float]:
    """Seconds of each of `count` engine steps advancing every session in `ids` once."""
    latencies = []
    for _ in range(count):
        requests = [StepRequest(s, int(a)) for s, a in zip(ids, rng.integers(0, engine.num_actions, len(ids)))]
        start = time.perf_counter()
        frames = engine.step(requests)
        latencies.append(time.perf_counter() - start)
        bad = [f for f in frames if not hasattr(f, "image")]
        if bad:
            raise RuntimeError(f"bench step failed: {bad[0]}")
    return latencies


def bench_serve(
    workdir: str | Path | Model,
    sessions: tuple[int, ...] = (1, 4, 16),
    steps: int = 50,
    warmup: int = 3,
    rounds: int = 5,
) -> list[dict[str, Any]]:
    """Rows {"sessions", "frames_per_s", "frames_per_s_at_p50", "p50_ms", "p99_ms", "speedup"}
    (see the module doc; frames_per_s_at_p50 = sessions / p50 step time, which a shared
    machine's load spikes move less than the mean)."""
    model = workdir if isinstance(workdir, Model) else load_model(workdir)
    rng = np.random.default_rng(0)
    engines = {}
    for n in sessions:
        engine = Engine(model, max_sessions=n)
        ids = [engine.create(clip=i % engine.info()["clips"], seed=i)[0] for i in range(n)]
        _steps(engine, ids, warmup, rng)
        engines[n] = (engine, ids, [])
    for _ in range(rounds):
        for engine, ids, latencies in engines.values():
            latencies += _steps(engine, ids, max(1, steps // rounds), rng)
    rows = []
    for n, (_, _, latencies) in engines.items():
        timed = np.asarray(latencies)
        p50 = float(np.percentile(timed, 50))
        rows.append(
            {
                "sessions": n,
                "frames_per_s": round(n * len(timed) / float(timed.sum()), 1),
                "frames_per_s_at_p50": round(n / p50, 1),
                "p50_ms": round(p50 * 1e3, 2),
                "p99_ms": round(float(np.percentile(timed, 99)) * 1e3, 2),
            }
        )
    for row in rows:
        row["speedup"] = round(row["frames_per_s"] / rows[0]["frames_per_s"], 2)
    return rows


def bench_http(
    workdir: str | Path | Model, sessions: tuple[int, ...] = (1, 4, 16), steps: int = 50, warmup: int = 3
) -> list[dict[str, Any]]:
    """`bench_serve`'s rows measured through the HTTP API on 127.0.0.1: for each count n a
    server (`create_app`, an engine of n rows) and n clients in one event loop, each
    stepping its own session `steps` times in a row (PNG frames, as the page asks); the
    batcher gathers their requests. Latency is a request's, as the client sees it."""
    import asyncio

    import httpx

    from wm_jax.serve.app import BackgroundServer, create_app

    model = workdir if isinstance(workdir, Model) else load_model(workdir)
    model_actions = model.cfg.model.dynamics.num_actions

    async def play(http: Any, k: int, sid: str, count: int, latencies: list[float]) -> None:
        for t in range(count):
            start = time.perf_counter()
            reply = await http.post(f"/v1/sessions/{sid}/step", json={"action": (k + t) % model_actions})
            if reply.status_code != 200:
                raise RuntimeError(f"bench step failed: {reply.text}")
            latencies.append(time.perf_counter() - start)

    async def clients(url: str, n: int, clips: int, latencies: list[float]) -> float:
        """Seconds of the timed phase (after every session is created and warmed up)."""
        async with httpx.AsyncClient(base_url=url, timeout=300) as http:
            created = await asyncio.gather(*[http.post("/v1/sessions", json={"clip": k % clips}) for k in range(n)])
            sids = [reply.json()["session"] for reply in created]
            await asyncio.gather(*[play(http, k, sid, warmup, []) for k, sid in enumerate(sids)])
            start = time.perf_counter()
            await asyncio.gather(*[play(http, k, sid, steps, latencies) for k, sid in enumerate(sids)])
            return time.perf_counter() - start

    rows = []
    for n in sessions:
        engine = Engine(model, max_sessions=n)
        clips = engine.info()["clips"]
        with BackgroundServer(create_app(engine, max_queue=4 * n)) as server:
            latencies: list[float] = []
            wall = asyncio.run(clients(server.url, n, clips, latencies))
        timed = np.asarray(latencies)
        p50 = float(np.percentile(timed, 50))
        rows.append(
            {
                "sessions": n,
                "frames_per_s": round(n * steps / wall, 1),
                "frames_per_s_at_p50": round(n / p50, 1),
                "p50_ms": round(p50 * 1e3, 2),
                "p99_ms": round(float(np.percentile(timed, 99)) * 1e3, 2),
            }
        )
    for row in rows:
        row["speedup"] = round(row["frames_per_s"] / rows[0]["frames_per_s"], 2)
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| sessions | frames/s (all sessions) | frames/s at p50 | p50 step ms | p99 step ms | speedup |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['sessions']} | {r['frames_per_s']} | {r['frames_per_s_at_p50']} | {r['p50_ms']} | {r['p99_ms']} "
        f"| {r['speedup']}x |"
        for r in rows
    ]
    return "\n".join(lines)


COLUMNS = [
    "machine",
    "run",
    "via",
    "sessions",
    "frames/s (all sessions)",
    "frames/s at p50",
    "p50 step ms",
    "p99 step ms",
    "speedup",
    "command",
]


def main(argv: list[str] | None = None) -> int:
    """`wm bench serve --workdir RUN [--sessions 1,4,16] [--steps 50] [--results PATH]`:
    the table, rows appended to the results file, and the JSON line last."""
    import argparse
    import json

    import jax

    from wm_jax.bench import results

    parser = argparse.ArgumentParser(prog="wm bench serve", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a dynamics run directory or an inference bundle")
    parser.add_argument("--sessions", default="1,4,16", help="comma-separated session counts (default 1,4,16)")
    parser.add_argument("--steps", type=int, default=50, help="timed engine steps per session count (default 50)")
    parser.add_argument("--http", action="store_true", help="through the HTTP API on 127.0.0.1 (`bench_http`)")
    results.add_flag(parser)
    args = parser.parse_args(argv)
    try:
        sessions = tuple(int(n) for n in args.sessions.split(","))
    except ValueError:
        parser.error(f"--sessions must be comma-separated integers; got {args.sessions!r}")
    if min(sessions) < 1 or args.steps < 1:
        parser.error("--sessions and --steps must be >= 1")
    rows = (bench_http if args.http else bench_serve)(args.workdir, sessions, args.steps)
    print(format_rows(rows))
    device = jax.devices()[0].device_kind
    command = (
        f"`wm bench serve --workdir {args.workdir} --sessions {args.sessions} --steps {args.steps}"
        f"{' --http' if args.http else ''}`"
    )
    for r in rows:
        results.append_row(
            "serve",
            COLUMNS,
            [
                results.machine(device),
                str(args.workdir),
                "http" if args.http else "engine",
                str(r["sessions"]),
                f"{r['frames_per_s']:,.1f}",
                f"{r['frames_per_s_at_p50']:,.1f}",
                f"{r['p50_ms']:.2f}",
                f"{r['p99_ms']:.2f}",
                f"{r['speedup']:.2f}x",
                command,
            ],
            args.results,
        )
    print(
        json.dumps({"bench": "serve", "device": device, "via": "http" if args.http else "engine", "rows": rows}),
        flush=True,
    )  # must stay the last line
    return 0
