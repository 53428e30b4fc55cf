"""`wm bench rollout`: frames/s of the key/value-cached rollout engine beside the uncached
one, at several horizons, and of the diffusion sampler at K = 1, 2, 4 steps beside them,
in one run.

Both token engines generate the same tokens (`tests/inference/test_rollout.py`); the
uncached one reruns every frame the new one depends on at each step (with a temporal
window of W frames and L layers, the last L x (W - 1) + 1 frames), the cached one runs the
new frame once against its cache. Parameters are randomly initialised: speed does not
depend on what the weights learnt. Each horizon is run once untimed (compilation) and
then timed (`--repeats` times, the fastest kept).

The diffusion sampler (`objective: diffusion` over the continuous tokenizer bottleneck;
`wm_jax/inference/rollout.py`'s `diffusion_frames`, cached) is timed on the same model
otherwise (width, depth, heads, window, tokens per frame, controls, batch, horizons): each
frame takes K shortcut passes against the cache plus one that writes it there.

The figures: frames/s per engine and horizon, the speedup (cached / uncached frames/s)
at each horizon, the flatness of the cached engine (its time per frame at the longest
horizon ÷ at the shortest; ~1 means a frame costs the same at t = 16 and 256), and for
each K the diffusion sampler's frames/s ÷ the cached token engine's at the same horizon.

Run: `wm bench rollout [--config rollout_bench] [--horizons 16,64,256] [--diffusion-steps
1,2,4 | none] [--set KEY=VALUE ...]`. A diffusion config (`--set
model.dynamics.objective=diffusion --set model.tokenizer.bottleneck=continuous --set
model.dynamics.sampling_steps=K`) is timed by itself, as the "cached"/"uncached" engines.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
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

COLUMNS = [
    "machine",
    "config",
    "window",
    "layers",
    "horizon",
    "cached frames/s",
    "uncached frames/s",
    "speedup",
    "diffusion frames/s by K",
    "diffusion ÷ cached by K",
    "command",
]
DIFFUSION_STEPS = (1, 2, 4)  # the diffusion sampler's K, by default (a token config only)


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
    steps = {
        "action": rng.integers(0, cfg.model.dynamics.num_actions, (batch, frames)).astype(np.int32),
        "camera": camera,
    }
    return codes[:, :context], make_controls(steps), codes[:, context]


def init_params(cfg: Config) -> Any:
    """Randomly initialised parameters of cfg's dynamics model (its objective's). They do
    not depend on the clip length: the stage's example inputs initialise them."""
    return jax.jit(dynamics_model(cfg.model).init)(jax.random.key(cfg.seed), *DYNAMICS.example_inputs(cfg))["params"]


def time_rollout(
    cfg: Config, params: Any, horizon: int, cached: bool, batch: int, context: int, repeats: int = 1
) -> float:
    """Seconds for one rollout of `horizon` frames: the fastest of `repeats` timed runs,
    after an untimed one that compiles."""
    model = dynamics_model(cfg.model)
    context_codes, controls, reference = _inputs(cfg, batch, context, context + horizon, cfg.seed)
    jax.block_until_ready(rollout(model, params, context_codes, controls, horizon, reference, cached=cached))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(rollout(model, params, context_codes, controls, horizon, reference, cached=cached))
        best = min(best, time.perf_counter() - start)
    return best


def diffusion_config(cfg: Config, steps: int, max_steps: int | None = None) -> Config:
    """cfg with the diffusion objective over the continuous tokenizer bottleneck, sampling a
    frame in `steps` shortcut jumps (shortcut_max_steps: `max_steps`, default the larger of
    cfg's and `steps`); the transformer (width, depth, heads, window, controls) unchanged."""
    dc = cfg.model.dynamics
    max_steps = max(dc.shortcut_max_steps, steps) if max_steps is None else max_steps
    return config_lib.replace(
        cfg,
        [
            "model.dynamics.objective=diffusion",
            "model.tokenizer.bottleneck=continuous",
            f"model.dynamics.sampling_steps={steps}",
            f"model.dynamics.shortcut_max_steps={max_steps}",
            # the token objectives' settings that diffusion refuses, and their token cache
            "model.dynamics.cut_framing_shift=false",
            "model.dynamics.motion_weight=0",
            "data.latent_cache=",
        ],
    )


def time_token_engines(
    cfg: Config, horizons: list[int], batch: int, context: int, repeats: int
) -> list[dict[str, Any]]:
    """The cached and uncached engines of cfg's model at each horizon: one row each."""
    params = init_params(cfg)
    rows = []
    for h in horizons:
        cached_s = time_rollout(cfg, params, h, True, batch, context, repeats)
        uncached_s = time_rollout(cfg, params, h, False, batch, context, repeats)
        rows.append(
            {
                "horizon": h,
                "cached_s": cached_s,
                "uncached_s": uncached_s,
                "cached_frames_per_s": batch * h / cached_s,
                "uncached_frames_per_s": batch * h / uncached_s,
                "speedup": uncached_s / cached_s,
            }
        )
    return rows


def time_diffusion(
    cfg: Config, token_rows: list[dict[str, Any]], steps: Sequence[int], batch: int, context: int, repeats: int
) -> list[dict[str, Any]]:
    """The cached diffusion sampler on cfg's transformer at each K in `steps` and each
    horizon of `token_rows` (`time_token_engines`): one row per (horizon, K), with its
    frames/s ÷ the cached token engine's at that horizon. One set of parameters serves
    every K (shortcut_max_steps: the largest of cfg's and `steps`)."""
    max_steps = max(cfg.model.dynamics.shortcut_max_steps, *steps)
    configs = {k: diffusion_config(cfg, k, max_steps) for k in steps}
    params = init_params(configs[steps[0]])
    rows = []
    for token in token_rows:
        h = token["horizon"]
        for k in steps:
            seconds = time_rollout(configs[k], params, h, True, batch, context, repeats)
            rows.append(
                {
                    "horizon": h,
                    "steps": k,
                    "seconds": seconds,
                    "frames_per_s": batch * h / seconds,
                    "ratio_to_cached": token["cached_s"] / seconds,
                }
            )
    return rows


def run(
    cfg: Config,
    horizons: list[int],
    batch: int = 1,
    context: int = 1,
    diffusion_steps: Sequence[int] = (),
    repeats: int = 1,
) -> dict[str, Any]:
    """Times both engines at each horizon, and the diffusion sampler at each K in
    `diffusion_steps` (cfg must then be a token objective's); returns per-horizon rows,
    the diffusion rows and the summary ratios."""
    if not horizons or min(horizons) < 1 or batch < 1 or context < 1 or repeats < 1:
        raise ValueError(
            f"horizons, batch, context and repeats must be >= 1; got {horizons}, {batch}, {context}, {repeats}"
        )
    if diffusion_steps and cfg.model.dynamics.objective == "diffusion":
        raise ValueError("the diffusion sampler is compared with a token objective's engine; this config is diffusion")
    rows = time_token_engines(cfg, sorted(horizons), batch, context, repeats)
    diffusion = time_diffusion(cfg, rows, list(diffusion_steps), batch, context, repeats) if diffusion_steps else []
    first, last = rows[0], rows[-1]
    per_frame = lambda r: r["cached_s"] / r["horizon"]
    dc = cfg.model.dynamics
    return {
        "bench": "rollout",
        "device": jax.devices()[0].device_kind,
        "batch": batch,
        "context": context,
        "objective": dc.objective,
        "temporal_window": dc.temporal_window,
        "layers": dc.num_layers,
        "embed_dim": dc.embed_dim,
        "tokens_per_frame": num_tokens(cfg.model),
        "rows": rows,
        "diffusion": diffusion,
        f"speedup_at_{last['horizon']}": last["speedup"],
        f"flatness_{first['horizon']}_to_{last['horizon']}": per_frame(last) / per_frame(first),
        **{
            f"diffusion_k{r['steps']}_ratio_at_{last['horizon']}": r["ratio_to_cached"]
            for r in diffusion
            if r["horizon"] == last["horizon"]
        },
    }


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (
        f"rollout, window {result['temporal_window']}, {result['layers']} layers, width {result['embed_dim']}, "
        f"{result['tokens_per_frame']} tokens/frame, batch {result['batch']}, {result['device']}"
    )
    table = Table(title=f"{title}, {result['objective']}")
    for col in ("horizon", "cached frames/s", "uncached frames/s", "speedup", "cached ms/frame"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        table.add_row(
            str(r["horizon"]),
            f"{r['cached_frames_per_s']:,.1f}",
            f"{r['uncached_frames_per_s']:,.1f}",
            f"{r['speedup']:.1f}x",
            f"{1000 * r['cached_s'] / r['horizon']:.2f}",
        )
    Console().print(table)
    if not result["diffusion"]:
        return
    table = Table(title=f"{title}, diffusion sampler (cached; K passes + 1 cache write per frame)")
    for col in ("horizon", "K", "frames/s", "ms/frame", f"÷ {result['objective']} cached"):
        table.add_column(col, justify="right")
    for r in result["diffusion"]:
        table.add_row(
            str(r["horizon"]),
            str(r["steps"]),
            f"{r['frames_per_s']:,.1f}",
            f"{1000 * r['seconds'] / r['horizon']:.2f}",
            f"{r['ratio_to_cached']:.2f}",
        )
    Console().print(table)


def by_steps(diffusion: list[dict[str, Any]], horizon: int, key: str, fmt: str) -> str:
    """One results cell: the diffusion rows' `key` at `horizon`, "K1 x, K2 y, ..." ("–": none)."""
    cells = [f"K{r['steps']} {r[key]:{fmt}}" for r in diffusion if r["horizon"] == horizon]
    return ", ".join(cells) or "–"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="wm bench rollout", description=__doc__.splitlines()[0])
    results.add_config_flags(parser, "rollout_bench")
    parser.add_argument("--horizons", default="16,64,256", help="comma-separated horizons (default 16,64,256)")
    parser.add_argument("--batch", type=int, default=1, help="independent shots generated together (default 1)")
    parser.add_argument(
        "--diffusion-steps",
        default=None,
        metavar="K,K,..|none",
        help="the diffusion sampler's steps per frame to time beside a token config's engines "
        f"(default {','.join(map(str, DIFFUSION_STEPS))}; none: skip; a diffusion config: none)",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed runs per engine and horizon, the fastest kept (default 1)"
    )
    results.add_flag(parser)
    args = parser.parse_args(argv)
    try:
        args.horizon_list = [int(h) for h in args.horizons.split(",")]
        steps = args.diffusion_steps
        args.steps_list = [] if steps in ("none", "") else [int(k) for k in steps.split(",")] if steps else None
    except ValueError:
        parser.error(
            f"--horizons and --diffusion-steps must be comma-separated integers; got {args.horizons!r}, "
            f"{args.diffusion_steps!r}"
        )
    if min(args.horizon_list) < 1 or args.batch < 1 or args.repeats < 1:
        parser.error("--horizons, --batch and --repeats must be >= 1")
    if any(k < 1 or k & (k - 1) for k in args.steps_list or []):
        parser.error(f"--diffusion-steps must be powers of two; got {args.diffusion_steps!r}")
    return args


def command_line(args: argparse.Namespace) -> str:
    """The command as run (its non-default options), for the results file."""
    extra = [f"--batch {args.batch}"] if args.batch != 1 else []
    extra += [f"--diffusion-steps {args.diffusion_steps}"] if args.diffusion_steps is not None else []
    extra += [f"--repeats {args.repeats}"] if args.repeats != 1 else []
    return " ".join(
        [
            "wm bench rollout --config",
            args.config,
            *(f"--set {s}" for s in args.set),
            f"--horizons {args.horizons}",
            *extra,
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = config_lib.load(preset_path(args.config), args.set)
    steps = args.steps_list
    if steps is None:
        steps = [] if cfg.model.dynamics.objective == "diffusion" else list(DIFFUSION_STEPS)
    elif steps and cfg.model.dynamics.objective == "diffusion":
        raise SystemExit(
            "wm bench rollout: --diffusion-steps compares the diffusion sampler with a token "
            "objective's engine; this config is already diffusion (time it alone, without the flag)"
        )
    result = run(cfg, args.horizon_list, args.batch, diffusion_steps=steps, repeats=args.repeats)
    print_table(result)
    command, diffusion = command_line(args), result["diffusion"]
    for r in result["rows"]:
        results.append_row(
            "rollout",
            COLUMNS,
            [
                results.machine(result["device"]),
                args.config,
                str(result["temporal_window"]),
                str(result["layers"]),
                str(r["horizon"]),
                f"{r['cached_frames_per_s']:,.1f}",
                f"{r['uncached_frames_per_s']:,.1f}",
                f"{r['speedup']:.1f}x",
                by_steps(diffusion, r["horizon"], "frames_per_s", ",.1f"),
                by_steps(diffusion, r["horizon"], "ratio_to_cached", ".2f"),
                f"`{command}`",
            ],
            args.results,
        )
    print(json.dumps(result), flush=True)  # must stay the last line of stdout
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
