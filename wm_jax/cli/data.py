"""`wm data make | inspect | cache`."""

from __future__ import annotations

import argparse
import json
import sys
import time


def cmd_data_make(args: argparse.Namespace) -> int:
    from data_pipelines.datasets import make_dataset

    # Only the source flags given are passed: the source's defaults fill in the rest, and
    # a flag the source does not take is refused by name.
    names = (
        "game",
        "policy",
        "frameskip",
        "sticky_prob",
        "videos",
        "stride",
        "cut_ratio",
        "num_objects",
        "episodes",
        "frames",
        "version",
        "action_persistence",
    )
    given = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    manifest = make_dataset(
        args.source,
        args.out,
        size=args.size,
        seed=args.seed,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        **given,
    )
    counts = {split: len(info["episodes"]) for split, info in manifest["splits"].items()}
    print(f"wrote {args.out}: episodes per split {counts}, content hash {manifest['content_hash'][:16]}…")
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from data_pipelines.datasets import dataset_stats

    stats = dataset_stats(args.dir)
    print(json.dumps(stats, indent=2))
    return 0


def cmd_data_cache(args: argparse.Namespace) -> int:
    from data_pipelines.latent_cache import stored_bytes
    from data_pipelines.writer import read_manifest
    from wm_jax.latent_cache import build_cache

    def log(msg: str) -> None:  # stderr: stdout ends with the JSON line
        print(msg, file=sys.stderr)

    shown = [time.perf_counter()]

    def progress(split: str, done: int, total: int) -> None:
        if time.perf_counter() - shown[0] >= 30:  # a line every 30 s at most
            shown[0] = time.perf_counter()
            log(f"{split}: {done}/{total} records")

    t0 = time.perf_counter()
    manifest = build_cache(args.data, args.tokenizer, args.out, batch_size=args.batch_size, log=log, progress=progress)
    seconds = time.perf_counter() - t0
    records = {split: entry["records"] for split, entry in manifest["splits"].items()}
    size = read_manifest(args.data)["frame_size"]
    frames = sum(records.values())
    summary = {
        "out": args.out,
        "records": records,
        "tokens_per_frame": manifest["tokens_per_frame"],
        "cache_bytes": stored_bytes(args.out),
        "frame_bytes": frames * size * size * 3,
        "seconds": round(seconds, 2),
        "frames_per_s": round(frames / seconds, 1),
    }
    ratio = summary["frame_bytes"] / max(summary["cache_bytes"], 1)
    # Old manifests (no kind) hold ids.
    values = f" of {manifest['latent_dim']} floats" if manifest.get("kind") == "latents" else ""
    print(
        f"wrote {args.out}: {frames} frames as {manifest['tokens_per_frame']} tokens{values} each, "
        f"{summary['cache_bytes']} bytes ({ratio:.0f}x smaller than the frames) in {seconds:.1f} s"
    )
    print(json.dumps(summary))
    return 0


def add_make_parser(data: argparse._SubParsersAction) -> None:
    make = data.add_parser("make", help="write a dataset (ArrayRecord shards + manifest)")
    make.add_argument("--source", required=True, choices=["procedural", "atari", "video", "mujoco"])
    make.add_argument("--out", required=True)
    make.add_argument("--episodes", type=int, help="episodes to generate (default 64; not for video)")
    make.add_argument("--frames", type=int, help="steps per episode, at most (default 64; video: whole videos)")
    make.add_argument("--size", type=int, default=64)
    make.add_argument("--seed", type=int, default=0)
    make.add_argument(
        "--val-fraction", type=float, default=0.1, help="share of episodes (video: of videos) held out for val"
    )
    make.add_argument(
        "--test-fraction", type=float, default=0.1, help="share of episodes (video: of videos) held out for test"
    )
    make.add_argument("--game", help="atari: ALE game name, e.g. Pong, Breakout, MontezumaRevenge (default Pong)")
    make.add_argument(
        "--policy", choices=["random", "sticky"], help="atari: random actions, or sticky-random (default)"
    )
    make.add_argument("--frameskip", type=int, help="atari: emulator frames each action is held for (default 4)")
    make.add_argument(
        "--sticky-prob",
        type=float,
        help="atari, sticky policy: probability of repeating the previous action (default 0.25)",
    )
    make.add_argument(
        "--videos",
        nargs="+",
        metavar="PATH",
        help="video: files and/or directories of .mp4/.webm/.mov "
        "(a side file PATH.jsonl, if present, gives per-frame action/camera/shot_id/timecode)",
    )
    make.add_argument("--stride", type=int, help="video: keep every STRIDE-th frame (default 1)")
    make.add_argument(
        "--cut-ratio",
        type=float,
        help="video without side-file shot ids: a frame difference this many "
        "times the running median is a cut (default 3)",
    )
    make.add_argument("--num-objects", type=int, help="mujoco: objects in each episode's scene (default 5)")
    make.add_argument(
        "--version",
        type=int,
        help="procedural: world version, 3 (commanded camera, independent "
        "actions; default) or 2 (camera follows the agent)",
    )
    make.add_argument(
        "--action-persistence",
        type=float,
        help="procedural: probability that the random policy "
        "repeats its previous action (default 0.2 in v3, 0.75 in v2)",
    )
    make.set_defaults(fn=cmd_data_make)


def add_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="make, inspect or cache datasets").add_subparsers(
        dest="data_command", required=True
    )
    add_make_parser(data)
    inspect = data.add_parser("inspect", help="verify hashes and print statistics")
    inspect.add_argument("dir")
    inspect.set_defaults(fn=cmd_data_inspect)
    cache = data.add_parser(
        "cache",
        help="encode a dataset once with a trained tokenizer into its token ids, or latents of a "
        "continuous bottleneck (resumable)",
    )
    cache.add_argument("--data", required=True, help="dataset directory (wm data make)")
    cache.add_argument("--tokenizer", required=True, help="tokenizer run directory or bundle")
    cache.add_argument("--out", required=True, help="cache directory; an unfinished one is resumed")
    cache.add_argument("--batch-size", type=int, default=32, help="windows of data.frames_per_clip frames per encode")
    cache.set_defaults(fn=cmd_data_cache)
