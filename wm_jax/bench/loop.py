"""`wm bench loop`: what the training loop costs on top of its step, and how fast it restarts.

Two figures, measured side by side in one run on a small procedural dataset it writes:

- **loop overhead**: `wm train`'s steady-state seconds per step (the log windows after the
  first, which holds compilation; no checkpoint falls inside them) beside the bare
  compiled step on a batch already on the devices (`wm bench train`), alternated
  `--repeats` times; the ratio of the medians is the loop's own cost (loader, host
  transfer, guards, logging). Target: <= 1.05.
- **time to first step**: a cold `wm train` (fresh process, empty compilation cache)
  beside a restart from its checkpoint (fresh process, the run's compilation cache
  warm), and the same restart with the cache off; each process reports
  `time_to_first_step_s` in its `train_summary.json`.

Run: `wm bench loop --config tiny_cpu [--set KEY=VALUE ...] [--window 20] [--repeats 3]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax

from data_pipelines.datasets import make_dataset
from wm_jax import config as config_lib
from wm_jax import telemetry
from wm_jax.bench import results
from wm_jax.bench import train as train_bench
from wm_jax.config import Config
from wm_jax.presets import preset_path
from wm_jax.stages import STAGES, get_stage
from wm_jax.train.loop import train

COLUMNS = [
    "machine",
    "config",
    "loop s/step",
    "bare step s",
    "loop / bare",
    "first step cold s",
    "first step restart s",
    "restart no cache s",
    "cold / restart",
    "command",
]


def prepare(cfg: Config, work: Path) -> list[str]:
    """Writes a procedural dataset under `work`, and a run trained one step of each stage
    cfg's stage reads frozen (e.g. the tokenizer of a dynamics run); returns the overrides
    that point cfg at them."""
    data = work / "data"
    frames = max(24, 2 * cfg.data.frames_per_clip)
    make_dataset("procedural", str(data), episodes=24, frames=frames, size=cfg.model.image_size, seed=cfg.seed)
    overrides = [f"data.dir={data}"]
    for name in get_stage(cfg.train.stage).frozen_stages(cfg):
        frozen = config_lib.replace(
            cfg, overrides + [f"train.stage={name}", "train.steps=1", "train.log_every_steps=1"]
        )
        train(frozen, work / name)
        overrides.append(f"{STAGES[name].workdir_key}={work / name}")
    return overrides


def loop_step_s(cfg: Config, workdir: Path, window: int) -> float:
    """Median seconds per step of `train`'s log windows after the first (3 windows, no
    checkpoint inside them, the compilation cache off so the first window holds it)."""
    cfg = config_lib.replace(
        cfg,
        [
            f"train.steps={3 * window}",
            f"train.log_every_steps={window}",
            f"checkpoint.every_steps={10 * window}",
            "train.compile_cache_dir=none",
        ],
    )
    train(cfg, workdir)
    rows = telemetry.read_metrics(workdir / "metrics.jsonl")
    return statistics.median(r["step_s"] for r in rows if r["step"] > window)


# A restart as a preemption leaves it: the same config (train.steps included, which the
# compiled step depends on through its schedule), resumed in a fresh process to `stop_at`.
_TRAIN_TO = """
import sys
from wm_jax import config as config_lib
from wm_jax.train.loop import train
train(config_lib.load(sys.argv[1], sys.argv[4:]), sys.argv[2], stop_at=int(sys.argv[3]))
"""


def first_step_s(config: str, overrides: list[str], workdir: Path, stop_at: int, cache: str) -> float:
    """`train` in a fresh process up to step `stop_at` (resuming whatever `workdir` holds)
    with the compilation cache `cache` ("auto" or "none"); returns its time_to_first_step_s."""
    sets = [*overrides, "train.steps=100", f"train.compile_cache_dir={cache}"]
    cmd = [sys.executable, "-c", _TRAIN_TO, config, str(workdir), str(stop_at), *sets]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return float(json.loads((workdir / "train_summary.json").read_text())["time_to_first_step_s"])


def run(config: str, overrides: list[str], window: int = 20, repeats: int = 3) -> dict[str, Any]:
    """Both figures (module docstring) for the config `config` (a preset name or path) with
    `overrides`; returns them as a dict."""
    cfg = config_lib.load(preset_path(config), overrides)
    with tempfile.TemporaryDirectory(prefix="wm_bench_loop_") as tmp:
        work = Path(tmp)
        overrides = [*overrides, *prepare(cfg, work)]
        cfg = config_lib.load(preset_path(config), overrides)
        loop, bare = [], []
        for i in range(repeats):  # alternated, so drift in the machine's speed hits both
            loop.append(loop_step_s(cfg, work / f"loop{i}", window))
            bare.append(train_bench.run(cfg, steps=2 * window, warmup=2)["step_s"])
        run_dir, cfg_path = work / "restart", str(preset_path(config))
        cold = first_step_s(cfg_path, overrides, run_dir, 2, "auto")
        restart = first_step_s(cfg_path, overrides, run_dir, 4, "auto")
        uncached = first_step_s(cfg_path, overrides, run_dir, 6, "none")
    loop_s, bare_s = statistics.median(loop), statistics.median(bare)
    return {
        "bench": "loop",
        "config": config,
        "device": jax.devices()[0].device_kind,
        "stage": cfg.train.stage,
        "loop_step_s": loop_s,
        "bare_step_s": bare_s,
        "loop_over_bare": loop_s / bare_s,
        "loop_step_s_runs": loop,
        "bare_step_s_runs": bare,
        "first_step_cold_s": cold,
        "first_step_restart_s": restart,
        "first_step_restart_uncached_s": uncached,
        "cold_over_restart": cold / restart,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wm bench loop", description=__doc__.splitlines()[0])
    results.add_config_flags(parser)
    parser.add_argument("--window", type=int, default=20, help="steps per log window (3 windows per loop run)")
    parser.add_argument("--repeats", type=int, default=3, help="loop and bare-step measurements, alternated")
    results.add_flag(parser)
    args = parser.parse_args(argv)
    if args.window < 2 or args.repeats < 1:
        parser.error("--window must be >= 2 and --repeats >= 1")
    r = run(args.config, args.set, args.window, args.repeats)
    command = " ".join(
        [
            "wm bench loop --config",
            args.config,
            *(f"--set {s}" for s in args.set),
            f"--window {args.window} --repeats {args.repeats}",
        ]
    )
    values = [
        results.machine(r["device"]),
        args.config,
        f"{r['loop_step_s']:.4f}",
        f"{r['bare_step_s']:.4f}",
        f"{r['loop_over_bare']:.3f}",
        f"{r['first_step_cold_s']:.1f}",
        f"{r['first_step_restart_s']:.1f}",
        f"{r['first_step_restart_uncached_s']:.1f}",
        f"{r['cold_over_restart']:.2f}",
        f"`{command}`",
    ]
    print("\n".join(f"{c}: {v}" for c, v in zip(COLUMNS, values)))
    results.append_row("loop", COLUMNS, values, args.results)
    print(json.dumps(r), flush=True)  # must stay the last line of stdout
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
