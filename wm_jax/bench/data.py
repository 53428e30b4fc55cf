"""`wm bench data`: raw ArrayRecord reads vs the full loader vs what a train step consumes.

Three rates in clips/s (one clip = one window of `data.frames_per_clip` steps), measured
in one run on the same dataset:

- raw: the records of the loader's windows (in a shuffled order) read from the shards,
  one `loader.read_range` (a seek, then sequential reads) per window and shard, no
  decode: the bytes the loader reads, at the speed of the C++ reader alone, on one thread;
- loader: `make_loader` (read, decode, check, window, batch) with `--workers` grain worker
  processes and its prefetch, as `next(iter(loader))` delivers batches to the caller,
  of the fields `wm train` loads for the config (`loop.loaded_fields`);
- train: the train step of the config on a synthetic batch (`wm_jax.bench.train.run`):
  batch_size / step_s, the rate training consumes clips.

Raw and loader are measured `--repeats` times, interleaved (raw, loader, raw, ...) so
machine noise hits both alike; worker start-up (an element from each worker) and
`--warmup-batches` are excluded, as is compilation. The loader reads with several
processes, raw with one thread: with 2 workers on 2 free cores the loader can beat raw.
`loader_vs_raw` (target: >= 0.7 with 2 workers) is the median of the per-repeat
ratios; `loader_vs_train` above 1 means the loader keeps up with training.

Run: `wm bench data --config tiny_cpu [--data DIR | --episodes 64 --frames 64 --size S]
[--workers 2] [--clips 2048] [--repeats 3]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from data_pipelines import datasets, loader, writer
from wm_jax import config as config_lib
from wm_jax.bench import results
from wm_jax.bench import train as train_bench
from wm_jax.config import Config, ConfigError
from wm_jax.presets import preset_path
from wm_jax.train.loop import loaded_fields

COLUMNS = [
    "machine",
    "config",
    "data",
    "workers",
    "raw clips/s",
    "loader clips/s",
    "train clips/s",
    "loader/raw",
    "loader/train",
    "command",
]


def window_reads(
    manifest: dict, split: str, starts: np.ndarray, frames_per_clip: int
) -> list[list[tuple[int, int, int]]]:
    """Per window (first record index in `starts`, int64 [N]): its (shard, begin, end)
    record ranges, one per shard it spans."""
    ends = np.cumsum([s["records"] for s in manifest["splits"][split]["shards"]])
    return [loader.record_ranges(ends, first, frames_per_clip) for first in starts.tolist()]


def raw_rate(readers: list[ArrayRecordReader], reads: list[list[tuple[int, int, int]]]) -> float:
    """Clips/s of reading every window's records (bytes, no decode) on this thread."""
    start = time.perf_counter()
    for ranges in reads:
        for shard, begin, end in ranges:
            loader.read_range(readers[shard], begin, end)
    return len(reads) / (time.perf_counter() - start)


def loader_rate(data_dir: str | Path, cfg: Config, fields: list[str], workers: int, batches: int, warmup: int) -> float:
    """Clips/s of a fresh loader of `fields` (`workers` worker processes) over `batches`
    batches, after `warmup` batches or, if more, the batches of one element from each
    worker and one more (worker start-up: ~1.5 s each here)."""
    batch_loader = loader.make_loader(
        data_dir,
        split=cfg.data.split,
        frames_per_clip=cfg.data.frames_per_clip,
        batch_size=cfg.data.batch_size,
        seed=cfg.seed,
        window_stride=cfg.data.window_stride,
        worker_count=workers,
        shard_options=grain.sharding.NoSharding(),
        fields=fields,
    )
    it = iter(batch_loader)
    for _ in range(max(warmup, (workers + 1) * batch_loader.batches_per_element)):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * cfg.data.batch_size / (time.perf_counter() - start)
    del it  # stops the worker processes before the next measurement
    return rate


def train_rate(cfg: Config, steps: int) -> dict[str, Any]:
    """step_s, clips/s (batch_size / step_s) and device of the config's compiled train step."""
    timed = train_bench.run(cfg, steps=steps, warmup=2)
    return {
        "device": timed["device"],
        "train_step_s": timed["step_s"],
        "train_clips_per_s": cfg.data.batch_size / timed["step_s"],
    }


def run(
    data_dir: str | Path,
    cfg: Config,
    *,
    workers: int = 2,
    clips: int = 2048,
    repeats: int = 3,
    warmup_batches: int = 8,
    train_steps: int = 10,
) -> dict[str, Any]:
    """The three rates (raw and loader per repeat), their ratios and what was measured."""
    manifest = writer.read_manifest(data_dir)
    if manifest["frame_size"] != cfg.model.image_size:
        raise ConfigError(
            f"dataset {data_dir} has {manifest['frame_size']}x{manifest['frame_size']} frames but "
            f"'model.image_size' is {cfg.model.image_size}: pass --set model.image_size="
            f"{manifest['frame_size']} (or a matching dataset)"
        )
    t, b = cfg.data.frames_per_clip, cfg.data.batch_size
    episodes = manifest["splits"][cfg.data.split]["episodes"]
    starts = loader.window_starts(episodes, t, cfg.data.window_stride)
    batches = max(1, clips // b)
    order = np.random.default_rng(cfg.seed).choice(len(starts), batches * b, replace=batches * b > len(starts))
    reads = window_reads(manifest, cfg.data.split, starts[order], t)
    readers = [
        ArrayRecordReader(p, loader.READER_OPTIONS) for p in writer.shard_paths(data_dir, manifest, cfg.data.split)
    ]
    raw_rate(readers, reads[: warmup_batches * b])  # opens the files, warms the page cache
    fields = loaded_fields(cfg, manifest["fields"])
    raw, loaded = [], []
    for _ in range(repeats):
        raw.append(raw_rate(readers, reads))
        loaded.append(loader_rate(data_dir, cfg, fields, workers, batches, warmup_batches))
    for r in readers:
        r.close()
    ratios = [lo / ra for lo, ra in zip(loaded, raw)]
    result = {
        "bench": "data",
        "data_dir": str(data_dir),
        "content_hash": manifest["content_hash"],
        "split": cfg.data.split,
        "windows": len(starts),
        "frames_per_clip": t,
        "batch_size": b,
        "clips": batches * b,
        "repeats": repeats,
        "workers": workers,
        "fields": fields,
        "raw_clips_per_s": raw,
        "loader_clips_per_s": loaded,
        "loader_vs_raw": statistics.median(ratios),
        "loader_vs_raw_range": [min(ratios), max(ratios)],
    }
    result.update(train_rate(cfg, train_steps))
    result["loader_vs_train"] = statistics.median(loaded) / result["train_clips_per_s"]
    return result


def _span(values: list[float]) -> str:
    """'median (min–max)' of per-repeat rates."""
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}–{max(values):,.0f})"


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"data loading, {result['clips']} clips of {result['frames_per_clip']} steps x "
        f"{result['repeats']} repeats, {result['workers']} workers"
    )
    table.add_column("figure")
    table.add_column("value", justify="right")
    low, high = result["loader_vs_raw_range"]
    for name, value in (
        ("raw ArrayRecord reads, clips/s", _span(result["raw_clips_per_s"])),
        ("loader, clips/s", _span(result["loader_clips_per_s"])),
        ("train step consumes, clips/s", f"{result['train_clips_per_s']:,.1f}"),
        ("loader / raw", f"{result['loader_vs_raw']:.2f} ({low:.2f}–{high:.2f})"),
        ("loader / train", f"{result['loader_vs_train']:.1f}"),
    ):
        table.add_row(name, value)
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wm bench data", description=__doc__.splitlines()[0])
    results.add_config_flags(parser, "tiny_cpu")
    parser.add_argument("--data", default=None, help="dataset directory (default: a procedural one in a temp dir)")
    parser.add_argument("--episodes", type=int, default=64, help="episodes of the procedural dataset (default 64)")
    parser.add_argument("--frames", type=int, default=64, help="steps per procedural episode (default 64)")
    parser.add_argument("--size", type=int, default=None, help="procedural frame size (default: model.image_size)")
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes (default 2)")
    parser.add_argument("--clips", type=int, default=2048, help="clips timed per repeat (default 2048)")
    parser.add_argument("--repeats", type=int, default=3, help="raw/loader measurements each (default 3)")
    parser.add_argument("--warmup-batches", type=int, default=8, help="untimed batches per loader (default 8)")
    parser.add_argument("--train-steps", type=int, default=10, help="timed train steps (default 10)")
    results.add_flag(parser)
    args = parser.parse_args(argv)
    if (
        min(args.clips, args.repeats, args.train_steps, args.episodes, args.frames) < 1
        or min(args.workers, args.warmup_batches) < 0
    ):
        parser.error(
            "--clips, --repeats, --train-steps, --episodes and --frames must be >= 1; "
            "--workers and --warmup-batches >= 0"
        )
    cfg = config_lib.load(preset_path(args.config), args.set)
    with tempfile.TemporaryDirectory(prefix="wm-bench-data-") as tmp:
        data_dir, data_name = args.data, Path(args.data or "").name
        if data_dir is None:
            size = args.size or cfg.model.image_size
            data_dir, data_name = Path(tmp) / "procedural", f"procedural {args.episodes}x{args.frames}x{size}"
            datasets.make_dataset(
                "procedural", data_dir, episodes=args.episodes, frames=args.frames, size=size, seed=cfg.seed
            )
        result = run(
            data_dir,
            cfg,
            workers=args.workers,
            clips=args.clips,
            repeats=args.repeats,
            warmup_batches=args.warmup_batches,
            train_steps=args.train_steps,
        )
    print_table(result)
    data_args = [f"--data {args.data}"] if args.data else [f"--episodes {args.episodes} --frames {args.frames}"]
    data_args += [f"--size {args.size}"] if args.size and not args.data else []
    command = " ".join(
        [
            "wm bench data --config",
            args.config,
            *(f"--set {s}" for s in args.set),
            *data_args,
            f"--workers {args.workers} --clips {args.clips} --repeats {args.repeats}",
        ]
    )
    low, high = result["loader_vs_raw_range"]
    values = [
        results.machine(result["device"]),
        args.config,
        data_name,
        str(args.workers),
        _span(result["raw_clips_per_s"]),
        _span(result["loader_clips_per_s"]),
        f"{result['train_clips_per_s']:,.1f}",
        f"{result['loader_vs_raw']:.2f} ({low:.2f}–{high:.2f})",
        f"{result['loader_vs_train']:.1f}",
        f"`{command}`",
    ]
    results.append_row("data", COLUMNS, values, args.results)
    print(json.dumps(result), flush=True)  # must stay the last line of stdout
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
