"""`wm bench train`: step time, tokens/s, TFLOP/s per device and MFU of a config's train step.

The step is compiled ahead of time for the configured mesh (XLA's memory analysis is
reported, and a config that does not fit the device stops here with exit 2), then run
on a synthetic batch already on the devices: random frames and actions of the config's
shapes, so the figure is the step's own speed, not the loader's (the loader's share is
`data_wait_fraction` in a real run's `metrics.jsonl`). The dynamics stage runs a randomly
initialised tokenizer (and latent action model, with `train.latent_actions_workdir`):
their encoders cost the same as trained ones'.

FLOPs are the analytic model FLOPs (`wm_jax.models.flops`); MFU divides the achieved
TFLOP/s per device by the device's peak (`wm_jax.telemetry.PEAK_TFLOPS`, or
`train.peak_tflops_per_device`). CPUs have no peak in the table, so no MFU is printed.

The matmul reference (`--matmul-reference N`, issue 20): a CPU has no peak in that table,
and its nominal peak (cores x clock x SIMD width) is not what XLA reaches anyway; XLA's own
N x N @ N x N matmul, in the config's activation dtype on the same device and cores, in the
same process right after the step, is the achievable ceiling to measure the step against.
`fraction_of_matmul` = the step's TFLOP/s per device / the matmul's (`matmul_tflops` and
`fraction_of_matmul` are null in the JSON without the flag, like `mfu` without a peak).
The comparison with the peer (Jasmine) uses its shapes, in the `peer_cpu` (tokenizer) and
`peer_cpu_dynamics` presets:
`wm bench train --config peer_cpu --matmul-reference 2048`.

Results file: a run without the flag appends to the `## train` table, whose columns are
unchanged; a run with it appends to its own `## train vs matmul` table (the same columns
plus `matmul TFLOP/s` and `step / matmul`). `results.append_row` never rewrites a header,
so adding columns to `## train` would leave its existing header short of its new rows.

Run: `wm bench train --config tiny_cpu [--set KEY=VALUE ...] [--steps 10] [--matmul-reference N]`.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from wm_jax import config as config_lib
from wm_jax import telemetry
from wm_jax.bench import results
from wm_jax.config import Config, ConfigError
from wm_jax.models.tokenizer import vocab_size
from wm_jax.presets import preset_path
from wm_jax.train import dry_run
from wm_jax.train.state import create_train_state
from wm_jax.train.step import batch_specs

COLUMNS = ["machine", "config", "params", "mesh", "dtype", "step s", "tokens/s", "TFLOP/s/device", "MFU", "command"]
# The `## train vs matmul` table of a run with --matmul-reference (see the module docstring).
MATMUL_COLUMNS = [*COLUMNS[:-1], "matmul TFLOP/s", "step / matmul", "command"]
MATMUL_REPEATS = 5


def synthetic_batch(cfg: Config, mesh: Any, rules: Any, seed: int = 0) -> dict[str, jax.Array]:
    """Every field the step reads (`batch_specs`), random where it carries content (frames
    uint8, actions and cached token ids int32, camera poses float32), valid and cut-free,
    created on the mesh."""
    specs = batch_specs(cfg, mesh, rules)
    keys = dict(zip(specs, jax.random.split(jax.random.key(seed), len(specs))))

    def field(name: str, spec: jax.ShapeDtypeStruct) -> jax.Array:
        if spec.dtype == jnp.uint8:
            return jax.random.randint(keys[name], spec.shape, 0, 256, jnp.int32).astype(jnp.uint8)
        if name == "action":
            return jax.random.randint(keys[name], spec.shape, 0, cfg.model.dynamics.num_actions, jnp.int32)
        if name == "codes":  # token ids, as a latent cache holds
            return jax.random.randint(keys[name], spec.shape, 0, vocab_size(cfg.model), jnp.int32)
        if spec.dtype == jnp.float32:
            return jax.random.normal(keys[name], spec.shape)
        return jnp.full(spec.shape, name.endswith("_valid"))

    make = lambda: {name: field(name, spec) for name, spec in specs.items()}
    return jax.jit(make, out_shardings={k: s.sharding for k, s in specs.items()})()


def matmul_tflops(n: int, dtype: str, repeats: int = MATMUL_REPEATS) -> float:
    """TFLOP/s of XLA's own matmul: `jnp.dot` under `jax.jit` of two random (n, n) arrays of
    `dtype` (result (n, n), `dtype`) on the first device, 2 n^3 FLOPs per product; one
    warm-up call (compiles), then the best of `repeats` timed calls."""
    if n < 1 or repeats < 1:
        raise ValueError(f"n and repeats must be >= 1; got {n}, {repeats}")
    device = jax.devices()[0]
    a, b = jax.device_put(jax.random.normal(jax.random.key(0), (2, n, n), jnp.dtype(dtype)), device)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, b))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(dot(a, b))
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def run(cfg: Config, steps: int = 10, warmup: int = 2, matmul_n: int = 0) -> dict[str, Any]:
    """Compiles, then times `steps` train steps after `warmup` untimed ones.

    Returns the plan of `dry_run.compile_report` plus step_s, tokens_per_s, frames_per_s,
    tflops_per_device, mfu (when the peak is known), peak device memory where the runtime
    reports it, and with `matmul_n` > 0 the matmul reference (`matmul_tflops` of an
    n x n product, `fraction_of_matmul`; both None otherwise). Raises ConfigError when the
    compiled step does not fit the device.
    """
    if steps < 1 or warmup < 0 or matmul_n < 0:
        raise ValueError(f"steps must be >= 1, warmup and matmul_n >= 0; got {steps}, {warmup}, {matmul_n}")
    t0 = time.perf_counter()
    step_fn, report, placement = dry_run.compile_step(cfg)
    telemetry.info(f"compiled the step in {time.perf_counter() - t0:.1f} s")
    if not dry_run.fits(report):
        raise ConfigError(f"the step does not fit the device:\n{dry_run.format_report(report)}")
    mesh, rules = placement.mesh, placement.rules
    state = create_train_state(cfg, mesh, rules, placement.state)
    frozen = {
        stage: create_train_state(cfg, mesh, rules, shardings, stage=stage).params
        for stage, shardings in placement.frozen_states.items()
    } or None
    batch = synthetic_batch(cfg, mesh, rules, cfg.seed)
    telemetry.info(f"initialised the state, {time.perf_counter() - t0:.1f} s since start")
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for _ in range(warmup):
            state, metrics = step_fn(state, batch, frozen)
        jax.block_until_ready(state)
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = step_fn(state, batch, frozen)
        jax.block_until_ready((state, metrics))
        step_s = (time.perf_counter() - start) / steps
    device = jax.devices()[0]
    peak = telemetry.peak_tflops(device.device_kind, cfg.model.dtype, cfg.train.peak_tflops_per_device)
    frames = cfg.data.batch_size * cfg.data.frames_per_clip
    result = {"bench": "train", **report, "dtype": cfg.model.dtype, "steps": steps, "step_s": step_s}
    result.update(
        telemetry.throughput(
            step_s, report["flops_per_step"], report["tokens_per_step"], frames, jax.device_count(), peak
        )
    )
    result["mfu"] = result.get("mfu")  # null in the JSON when the device's peak is unknown
    result["peak_tflops_per_device"] = peak
    result["loss"] = float(metrics["loss"])
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        result["peak_bytes_in_use"] = stats["peak_bytes_in_use"]
    # After the step's timing and memory figures, so neither includes the reference.
    reference = matmul_tflops(matmul_n, cfg.model.dtype) if matmul_n else None
    result["matmul_n"] = matmul_n or None
    result["matmul_tflops"] = reference
    result["fraction_of_matmul"] = None if reference is None else result["tflops_per_device"] / reference
    return result


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"train step, {result['stage']} stage, {result['devices']} x {result['device']}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    mfu = "n/a (no peak for this device)" if result["mfu"] is None else f"{100 * result['mfu']:.1f}%"
    for name, value in (
        ("parameters", f"{result['parameters']:,}"),
        ("mesh", str(result["mesh"])),
        ("step s", f"{result['step_s']:.4f}"),
        ("tokens/s", f"{result['tokens_per_s']:,.0f}"),
        ("frames/s", f"{result['frames_per_s']:,.1f}"),
        ("TFLOP/s per device", f"{result['tflops_per_device']:.2f}"),
        ("MFU", mfu),
        ("peak memory per device (XLA) GiB", f"{result.get('peak_bytes', 0) / dry_run.GIB:.2f}"),
    ):
        table.add_row(name, value)
    if result["matmul_tflops"] is not None:
        n = result["matmul_n"]
        table.add_row(f"XLA matmul {n}x{n} TFLOP/s", f"{result['matmul_tflops']:.3f}")
        table.add_row("step / matmul", f"{100 * result['fraction_of_matmul']:.1f}%")
    Console().print(table)


def results_row(args: argparse.Namespace, result: dict[str, Any]) -> tuple[str, list[str], list[str]]:
    """(section, columns, values) of this run in the results file: `train`, or with the
    matmul reference `train vs matmul` (its own table: see the module docstring)."""
    words = ["wm bench train --config", args.config, *(f"--set {s}" for s in args.set), f"--steps {args.steps}"]
    if args.matmul_reference:
        words.append(f"--matmul-reference {args.matmul_reference}")
    mesh = "x".join(str(v) for v in result["mesh"].values())
    values = [
        results.machine(result["device"]),
        args.config,
        f"{result['parameters'] / 1e6:.1f}M",
        mesh,
        result["dtype"],
        f"{result['step_s']:.4f}",
        f"{result['tokens_per_s']:,.0f}",
        f"{result['tflops_per_device']:.2f}",
        "n/a" if result["mfu"] is None else f"{100 * result['mfu']:.1f}%",
    ]
    if not args.matmul_reference:
        return "train", COLUMNS, [*values, f"`{' '.join(words)}`"]
    reference = [f"{result['matmul_tflops']:.3f}", f"{100 * result['fraction_of_matmul']:.1f}%"]
    return "train vs matmul", MATMUL_COLUMNS, [*values, *reference, f"`{' '.join(words)}`"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wm bench train", description=__doc__.splitlines()[0])
    results.add_config_flags(parser)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation (default 2)")
    parser.add_argument(
        "--matmul-reference",
        type=int,
        default=0,
        metavar="N",
        help="also time XLA's N x N matmul in the config's dtype on the same device and report "
        "the step's share of its TFLOP/s (e.g. 2048; default 0: off)",
    )
    results.add_flag(parser)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.matmul_reference < 0:
        parser.error("--steps must be >= 1, --warmup and --matmul-reference >= 0")
    cfg = config_lib.load(preset_path(args.config), args.set)
    result = run(cfg, args.steps, args.warmup, args.matmul_reference)
    print_table(result)
    results.append_row(*results_row(args, result), args.results)
    print(json.dumps(result), flush=True)  # must stay the last line of stdout
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
