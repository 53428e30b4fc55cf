"""`wm bench rollout`: frames/s of the key/value-cached rollout engine beside the uncached
one, at several horizons, in one run.

Both engines generate the same tokens (`tests/test_rollout.py`); the uncached one
reruns every frame the new one depends on at each step (with a temporal window of W
frames and L layers, the last L x (W - 1) + 1 frames), the cached one runs the new frame
once against its cache. Parameters are randomly initialised: speed does not depend on
what the weights learnt. Each horizon is run once untimed (compilation) and then timed.

The figures: frames/s per engine and horizon, the speedup (cached / uncached frames/s)
at each horizon, and the flatness of the cached engine (its time per frame at the
longest horizon ÷ at the shortest; ~1 means a frame costs the same at t = 16 and 256).

Run: `wm bench rollout [--config rollout_bench] [--horizons 16,64,256] [--set KEY=VALUE ...]`.
A diffusion model (`--set model.dynamics.objective=diffusion --set
model.tokenizer.bottleneck=continuous --set model.dynamics.sampling_steps=K`) is timed
the same way, K jumps and one cache write per frame.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wm_jax import config as config_lib
from wm_jax.bench import results
from wm_jax.config import Config
from wm_jax.models.dynamics import make_controls
from wm_jax.models.tokenizer import has_codebook, indices_to_codes, latent_width, num_tokens, vocab_size
from wm_jax.presets import preset_path
from wm_jax.inference.rollout import rollout
from wm_jax.stages.dynamics import DYNAMICS, dynamics_model

COLUMNS = ["machine", "config", "window", "layers", "horizon", "cached frames/s", "uncached frames/s", "speedup", "command"]


def _inputs(cfg: Config, batch: int, context: int, frames: int, seed: int) -> tuple[Any, ...]:
    """Random context codes [B,C,N,L] (FSQ codes, or continuous latents in [-1, 1]),
    controls of `frames` - 1 steps, reference codes [B,N,L]."""
    rng = np.random.default_rng(seed)
    levels, n = cfg.model.tokenizer.fsq_levels, num_tokens(cfg.model)
    if has_codebook(cfg.model):
        codes = indices_to_codes(jnp.asarray(rng.integers(0, vocab_size(cfg.model), (batch, context + 1, n))), levels)
    else:
        codes = jnp.asarray(rng.uniform(-1, 1, (batch, context + 1, n, latent_width(cfg.model))), jnp.float32)
    camera = np.zeros((batch, frames, 7), np.float32)
    camera[..., :2] = np.cumsum(rng.integers(-1, 2, (batch, frames, 2)), axis=1)
    steps = {"action": rng.integers(0, cfg.model.dynamics.num_actions, (batch, frames)).astype(np.int32), "camera": camera}
    return codes[:, :context], make_controls(steps), codes[:, context]


def time_rollout(cfg: Config, params: Any, horizon: int, cached: bool, batch: int, context: int) -> float:
    """Seconds for one rollout of `horizon` frames (after an untimed one that compiles)."""
    model = dynamics_model(cfg.model)
    context_codes, controls, reference = _inputs(cfg, batch, context, context + horizon, cfg.seed)
    jax.block_until_ready(rollout(model, params, context_codes, controls, horizon, reference, cached=cached))
    start = time.perf_counter()
    jax.block_until_ready(rollout(model, params, context_codes, controls, horizon, reference, cached=cached))
    return time.perf_counter() - start


def run(cfg: Config, horizons: list[int], batch: int = 1, context: int = 1) -> dict[str, Any]:
    """Times both engines at each horizon; returns per-horizon rows and the summary ratios."""
    if not horizons or min(horizons) < 1 or batch < 1 or context < 1:
        raise ValueError(f"horizons, batch and context must be >= 1; got {horizons}, {batch}, {context}")
    # Parameters do not depend on the clip length: the stage's example inputs initialise them.
    params = jax.jit(dynamics_model(cfg.model).init)(jax.random.key(cfg.seed), *DYNAMICS.example_inputs(cfg))["params"]
    rows = []
    for h in sorted(horizons):
        cached_s = time_rollout(cfg, params, h, True, batch, context)
        uncached_s = time_rollout(cfg, params, h, False, batch, context)
        rows.append({"horizon": h, "cached_s": cached_s, "uncached_s": uncached_s,
                     "cached_frames_per_s": batch * h / cached_s, "uncached_frames_per_s": batch * h / uncached_s,
                     "speedup": uncached_s / cached_s})
    first, last = rows[0], rows[-1]
    per_frame = lambda r: r["cached_s"] / r["horizon"]
    dc = cfg.model.dynamics
    return {
        "bench": "rollout", "device": jax.devices()[0].device_kind, "batch": batch, "context": context,
        "temporal_window": dc.temporal_window, "layers": dc.num_layers, "embed_dim": dc.embed_dim,
        "tokens_per_frame": num_tokens(cfg.model), "rows": rows,
        f"speedup_at_{last['horizon']}": last["speedup"],
        f"flatness_{first['horizon']}_to_{last['horizon']}": per_frame(last) / per_frame(first),
    }


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"rollout, window {result['temporal_window']}, {result['layers']} layers, "
                        f"{result['tokens_per_frame']} tokens/frame, batch {result['batch']}, {result['device']}")
    for col in ("horizon", "cached frames/s", "uncached frames/s", "speedup", "cached ms/frame"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        table.add_row(str(r["horizon"]), f"{r['cached_frames_per_s']:,.1f}", f"{r['uncached_frames_per_s']:,.1f}",
                      f"{r['speedup']:.1f}x", f"{1000 * r['cached_s'] / r['horizon']:.2f}")
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wm bench rollout", description=__doc__.splitlines()[0])
    results.add_config_flags(parser, "rollout_bench")
    parser.add_argument("--horizons", default="16,64,256", help="comma-separated horizons (default 16,64,256)")
    parser.add_argument("--batch", type=int, default=1, help="independent shots generated together (default 1)")
    results.add_flag(parser)
    args = parser.parse_args(argv)
    try:
        horizons = [int(h) for h in args.horizons.split(",")]
    except ValueError:
        parser.error(f"--horizons must be comma-separated integers; got {args.horizons!r}")
    if min(horizons) < 1 or args.batch < 1:
        parser.error("--horizons and --batch must be >= 1")
    cfg = config_lib.load(preset_path(args.config), args.set)
    result = run(cfg, horizons, args.batch)
    print_table(result)
    command = " ".join(["wm bench rollout --config", args.config, *(f"--set {s}" for s in args.set), f"--horizons {args.horizons}"])
    for r in result["rows"]:
        results.append_row("rollout", COLUMNS, [
            results.machine(result["device"]), args.config, str(result["temporal_window"]), str(result["layers"]),
            str(r["horizon"]), f"{r['cached_frames_per_s']:,.1f}", f"{r['uncached_frames_per_s']:,.1f}",
            f"{r['speedup']:.1f}x", f"`{command}`"], args.results)
    print(json.dumps(result), flush=True)  # must stay the last line of stdout
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
