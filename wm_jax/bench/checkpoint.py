"""`wm bench checkpoint`: how long a train step is blocked by an async vs a sync orbax save.

Both modes save the same state in one run, interleaved (sync, async, sync, async, ...) so
machine noise hits both alike. "Blocking" is the wall time of `manager.save(...)`, i.e. how
long the caller waits before it can run its next step; for async saves we also time until
`wait_until_finished()` returns (the total save time) to show the write really happened.
Target (issue): async blocking <= 10% of sync blocking for a state of >= 100 MB.

Run: `python -m wm_jax.bench.checkpoint --state-mb 128 --repeats 3`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from wm_jax.bench import results

MIB = 2**20
ROWS = 1024  # every matrix leaf is [ROWS, cols]
NUM_LAYERS = 4
MODES = ("sync", "async")
COLUMNS = ["machine", "state MB", "sync blocking s", "async blocking s", "ratio", "command"]


def make_state(state_mb: float, seed: int = 0) -> dict[str, jax.Array]:
    """A params + Adam-like optimizer state pytree of ~`state_mb` MiB of float32.

    Leaves: `{params,mu,nu}_layer{i}`: float32 [1024, cols] for i < 4, plus `step`: int32 [].
    `cols` is chosen so the 12 matrices total ~state_mb MiB (at least 1 column each).
    """
    bytes_per_col = 3 * NUM_LAYERS * ROWS * 4  # 3 copies (params, mu, nu) x layers x float32
    cols = max(1, round(state_mb * MIB / bytes_per_col))
    keys = jax.random.split(jax.random.key(seed), 3 * NUM_LAYERS)
    state: dict[str, jax.Array] = {}
    for n, (kind, layer) in enumerate((k, i) for k in ("params", "mu", "nu") for i in range(NUM_LAYERS)):
        leaf = jax.random.normal(keys[n], (ROWS, cols), jnp.float32)
        state[f"{kind}_layer{layer}"] = jnp.abs(leaf) if kind == "nu" else leaf  # nu >= 0, like Adam
    state["step"] = jnp.asarray(7, jnp.int32)
    # Materialise now so random generation never lands inside a timed save.
    return jax.block_until_ready(state)


def state_megabytes(state: dict[str, jax.Array]) -> float:
    """Total size of all leaves in MiB."""
    return sum(x.nbytes for x in jax.tree.leaves(state)) / MIB


def _new_manager(directory: str, use_async: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=use_async, max_to_keep=2)
    return ocp.CheckpointManager(directory, options=options)


def _save_args(state: dict[str, jax.Array]) -> ocp.args.Composite:
    return ocp.args.Composite(state=ocp.args.StandardSave(state))


def verify_restore(manager: ocp.CheckpointManager, step: int, state: dict[str, jax.Array]) -> None:
    """Restores `step` and raises RuntimeError unless a few leaves equal `state`'s.

    A benchmark of a save that did not really happen would be worthless.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    for name in ("params_layer0", f"nu_layer{NUM_LAYERS - 1}", "step"):
        if not np.array_equal(np.asarray(restored[name]), np.asarray(state[name])):
            raise RuntimeError(
                f"checkpoint {manager.directory}/{step}: restored leaf {name!r} differs from the saved state"
            )


def time_one_save(
    state: dict[str, jax.Array], use_async: bool, parent: str | None, *, verify: bool = False
) -> tuple[float, float]:
    """One save into a fresh manager and temp dir; returns (blocking_s, total_s).

    blocking_s: wall time of `manager.save` (the caller is stalled this long).
    total_s: until `wait_until_finished()` returns (== blocking_s up to noise for sync).
    The temp dir is removed afterwards, after an optional restore check.
    """
    directory = tempfile.mkdtemp(prefix="wm_bench_ckpt_", dir=parent)
    step = 1
    try:
        manager = _new_manager(directory, use_async)
        try:
            start = time.perf_counter()
            manager.save(step, args=_save_args(state))
            blocking = time.perf_counter() - start
            manager.wait_until_finished()
            total = time.perf_counter() - start
            if verify:
                verify_restore(manager, step, state)
        finally:
            manager.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return blocking, total


def run(state_mb: float = 128.0, repeats: int = 3, workdir: str | None = None) -> dict[str, Any]:
    """Times sync and async saves of the same ~state_mb MiB state, interleaved, median of `repeats`.

    Returns the figures as a JSON-able dict (see module docstring); `verified` is True once the
    last checkpoint of each mode was restored and matched the state.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    state = make_state(state_mb)
    # Untimed warm-up per mode: first-save costs (thread pools, handler registry, imports).
    for mode in MODES:
        time_one_save(state, mode == "async", workdir)
    times: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
    for r in range(repeats):
        for mode in MODES:  # interleaved so noise hits both modes alike
            times[mode].append(time_one_save(state, mode == "async", workdir, verify=r == repeats - 1))

    def median(mode: str, which: int) -> float:
        return statistics.median(t[which] for t in times[mode])

    sync_blocking, async_blocking = median("sync", 0), median("async", 0)
    device = jax.devices()[0]
    return {
        "bench": "checkpoint",
        "state_mb": round(state_megabytes(state), 2),
        "sync_blocking_s": sync_blocking,
        "async_blocking_s": async_blocking,
        "async_total_s": median("async", 1),
        "sync_total_s": median("sync", 1),
        "async_blocking_vs_sync": async_blocking / sync_blocking,
        "repeats": repeats,
        "verified": True,  # verify_restore raised otherwise
        "device": device.device_kind or device.platform,
    }


def print_table(result: dict[str, Any]) -> None:
    """Human summary: one row per mode with median blocking and total seconds."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"checkpoint save, {result['state_mb']:.1f} MiB state, median of {result['repeats']}")
    table.add_column("mode")
    table.add_column("blocking s", justify="right")
    table.add_column("total s", justify="right")
    table.add_row("sync", f"{result['sync_blocking_s']:.4f}", f"{result['sync_total_s']:.4f}")
    table.add_row("async", f"{result['async_blocking_s']:.4f}", f"{result['async_total_s']:.4f}")
    Console().print(table)
    Console().print(f"async blocking / sync blocking = {result['async_blocking_vs_sync']:.3f} (target <= 0.10)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wm bench checkpoint", description=__doc__.splitlines()[0])
    parser.add_argument("--state-mb", type=float, default=128.0, help="state size in MiB (default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="timed saves per mode (default 3)")
    parser.add_argument("--workdir", default=None, help="parent of the temp checkpoint dirs (default: system temp)")
    results.add_flag(parser)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.state_mb <= 0:
        parser.error("--repeats must be >= 1 and --state-mb > 0")
    result = run(args.state_mb, args.repeats, args.workdir)
    print_table(result)
    command = f"wm bench checkpoint --state-mb {args.state_mb:g} --repeats {args.repeats}"
    values = [
        results.machine(result["device"]),
        f"{result['state_mb']:.1f}",
        f"{result['sync_blocking_s']:.4f}",
        f"{result['async_blocking_s']:.4f}",
        f"{result['async_blocking_vs_sync']:.3f}",
        f"`{command}`",
    ]
    results.append_row("checkpoint", COLUMNS, values, args.results)
    print(json.dumps(result), flush=True)  # must stay the last line of stdout
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
