"""`wm` command line: data, train, eval, export, generate, verify, bench, demo.

Exit codes (DESIGN.md §6): 0 ok; 2 bad usage, config or input (the message names the
key or file; a run directory another `wm train` holds); 3 numerics guard; 42 preempted
or interrupted (SIGTERM, SIGUSR1, Ctrl-C) after a successful save; 130 interrupted with
nothing to save; `wm verify` alone exits 1 when the video fails a check (watermark not
detected, or sidecar missing, mismatched or not signed by the key).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# What parsing the command line needs (no JAX: `wm --help` and `wm launch` stay fast); each
# command imports the rest.
from wm_jax import config as config_lib
from wm_jax import launch, sweep
from wm_jax.config import ConfigError
from wm_jax.generate import DEFAULT_MAX_MEMORY_GIB
from wm_jax.presets import preset_path

EXIT_USAGE = 2
EXIT_NUMERICS = 3


def cmd_data_make(args: argparse.Namespace) -> int:
    from data_pipelines.datasets import make_dataset

    # Only the source flags given are passed: the source's defaults fill in the rest, and
    # a flag the source does not take is refused by name.
    names = ("game", "policy", "frameskip", "sticky_prob", "videos", "stride", "cut_ratio", "num_objects",
             "episodes", "frames", "version", "action_persistence")
    given = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    manifest = make_dataset(
        args.source, args.out, size=args.size, seed=args.seed, val_fraction=args.val_fraction,
        test_fraction=args.test_fraction, **given
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
    summary = {"out": args.out, "records": records, "tokens_per_frame": manifest["tokens_per_frame"],
               "cache_bytes": stored_bytes(args.out), "frame_bytes": frames * size * size * 3,
               "seconds": round(seconds, 2), "frames_per_s": round(frames / seconds, 1)}
    ratio = summary["frame_bytes"] / max(summary["cache_bytes"], 1)
    print(f"wrote {args.out}: {frames} frames as {manifest['tokens_per_frame']} tokens each, "
          f"{summary['cache_bytes']} bytes ({ratio:.0f}x smaller than the frames) in {seconds:.1f} s")
    print(json.dumps(summary))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
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
        print(f"process {joined['process_index']} of {joined['process_count']} joined ({joined['mode']})", file=sys.stderr)
    try:
        train(cfg, args.workdir)
    except Preempted:
        return EXIT_PREEMPTED
    except FloatingPointError as e:
        print(f"error: numerics guard: {e}", file=sys.stderr)
        return EXIT_NUMERICS
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.runs:
        return cmd_eval_compare(args)
    if not args.workdir:
        print("error: wm eval needs --workdir RUN (or: wm eval compare RUN_A RUN_B ...)", file=sys.stderr)
        return EXIT_USAGE
    from wm_jax.eval.evaluate import evaluate

    result = evaluate(args.workdir, step=args.step, data_dir=args.data, out_dir=args.out, overrides=args.set)
    out = Path(args.out) if args.out else Path(args.workdir) / "eval"
    if "latent_actions" in result:  # the probe's figures; its contingency table is in the report
        shown = {k: v for k, v in result["latent_actions"].items() if not isinstance(v, list)}
        print(json.dumps({"step": result["step"], "latent_actions": shown}, indent=2))
    else:
        print_headline(result)
    print(f"report: {out / 'report.md'}")
    return 0


def print_headline(result: dict) -> None:
    """The evaluation's headline figures (`evaluate.headline`) as a two-column table."""
    from wm_jax.eval.evaluate import headline

    rows = [("step", str(result["step"])), *headline(result)]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


def cmd_eval_compare(args: argparse.Namespace) -> int:
    from wm_jax.eval import compare

    if args.runs[0] != "compare" or len(args.runs) < 2:
        print(f"error: wm eval: unexpected arguments {args.runs}; to compare runs: wm eval compare RUN_A RUN_B ...",
              file=sys.stderr)
        return EXIT_USAGE
    runs = args.runs[1:]
    table = compare.markdown_table(runs, compare.compare(runs))
    print(table, end="")
    if args.out:
        Path(args.out).write_text(table)
        print(f"wrote {args.out}")
    return 0


# The demo dataset: enough episodes that held-out clips are unseen worlds, small enough
# to write in seconds.
DEMO_EPISODES = 96
DEMO_FRAMES = 64


def cmd_export(args: argparse.Namespace) -> int:
    from wm_jax.export import export_bundle

    info = export_bundle(args.workdir, args.out, args.step)
    print(f"wrote {args.out}: {info['stage']} parameters at step {info['step']}" + (" + its tokenizer" if "tokenizer" in info else ""))
    return 0


def run_demo(out: str | Path, config: str = "tiny_cpu", overrides: list[str] = ()) -> dict:
    """data → tokenizer → dynamics → eval with the presets `config` and `config`_dynamics;
    returns the eval metrics."""
    from data_pipelines.datasets import make_dataset
    from wm_jax import telemetry
    from wm_jax.eval.evaluate import evaluate
    from wm_jax.train.loop import train

    out = Path(out)
    tok_cfg = config_lib.load(preset_path(config), overrides)
    data_dir = Path(tok_cfg.data.dir) if tok_cfg.data.dir else out / "data"
    t0 = time.time()
    if not (data_dir / "manifest.json").exists():
        telemetry.info(f"[1/4] procedural dataset → {data_dir}")
        make_dataset(
            "procedural", str(data_dir), episodes=DEMO_EPISODES, frames=DEMO_FRAMES,
            size=tok_cfg.model.image_size, seed=tok_cfg.seed,
        )
    tok_cfg = config_lib.replace(tok_cfg, [f"data.dir={data_dir}"])
    telemetry.info(f"[2/4] tokenizer → {out / 'tokenizer'}")
    train(tok_cfg, out / "tokenizer")
    dyn_overrides = list(overrides) + [f"data.dir={data_dir}", f"train.tokenizer_workdir={out / 'tokenizer'}"]
    dyn_cfg = config_lib.load(preset_path(f"{config}_dynamics"), dyn_overrides)
    telemetry.info(f"[3/4] dynamics → {out / 'dynamics'}")
    train(dyn_cfg, out / "dynamics")
    telemetry.info(f"[4/4] eval → {out / 'dynamics' / 'eval'}")
    result = evaluate(out / "dynamics")
    telemetry.info(f"demo finished in {time.time() - t0:.0f} s")
    return result


def cmd_demo(args: argparse.Namespace) -> int:
    result = run_demo(args.out, args.config, args.set)
    report = Path(args.out) / "dynamics" / "eval" / "report.md"
    print_headline(result)
    print(f"report: {report}")
    return 0


def _watermark_key(text: str) -> int:
    """--key: an int in [0, 2**64), decimal or 0x-prefixed hex."""
    try:
        key = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= key < 2**64:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64), got {key}")
    return key


def cmd_verify(args: argparse.Namespace) -> int:
    """Prints wm_jax.watermark.verify's dict as JSON, and on stderr what was verified or
    what failed; 0 when the watermark is detected and the signed sidecar matches the file,
    else 1 (the dict's "problems" say why, naming any edited field)."""
    from wm_jax import watermark

    result = watermark.verify(args.video, watermark.DEFAULT_KEY if args.key is None else args.key)
    ok = result["watermark_detected"] and result["manifest_ok"]
    if ok:
        print(f"verified {args.video}: watermark score {result['watermark_score']}, signed sidecar:", file=sys.stderr)
        for name, value in result["verified"].items():
            print(f"  {name}: {value}", file=sys.stderr)
    else:
        print(f"NOT verified {args.video}:", *(f"  {p}" for p in result["problems"]), sep="\n", file=sys.stderr)
    print(json.dumps(result, indent=2))
    return 0 if ok else 1


def cmd_generate(args: argparse.Namespace) -> int:
    from wm_jax.generate import generate

    paths = generate(args.workdir, args.script, args.out, seed=args.seed, data_dir=args.data, batch=args.batch,
                     step=args.step, scale=args.scale, key=args.key, max_memory_gib=args.max_memory_gib)
    for path in paths:
        print(f"wrote {path} (+ {path.name}.json); check it with: wm verify {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    return importlib.import_module(f"benchmarks.{args.name}").main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wm", description="wm_jax: pretrain and evaluate video world models")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="make, inspect or cache datasets").add_subparsers(dest="data_command", required=True)
    make = data.add_parser("make", help="write a dataset (ArrayRecord shards + manifest)")
    make.add_argument("--source", required=True, choices=["procedural", "atari", "video", "mujoco"])
    make.add_argument("--out", required=True)
    make.add_argument("--episodes", type=int, help="episodes to generate (default 64; not for video)")
    make.add_argument("--frames", type=int, help="steps per episode, at most (default 64; video: whole videos)")
    make.add_argument("--size", type=int, default=64)
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--val-fraction", type=float, default=0.1, help="share of episodes (video: of videos) held out for val")
    make.add_argument("--test-fraction", type=float, default=0.1, help="share of episodes (video: of videos) held out for test")
    make.add_argument("--game", help="atari: ALE game name, e.g. Pong, Breakout, MontezumaRevenge (default Pong)")
    make.add_argument("--policy", choices=["random", "sticky"], help="atari: random actions, or sticky-random (default)")
    make.add_argument("--frameskip", type=int, help="atari: emulator frames each action is held for (default 4)")
    make.add_argument("--sticky-prob", type=float, help="atari, sticky policy: probability of repeating the previous action (default 0.25)")
    make.add_argument("--videos", nargs="+", metavar="PATH", help="video: files and/or directories of .mp4/.webm/.mov "
                      "(a side file PATH.jsonl, if present, gives per-frame action/camera/shot_id/timecode)")
    make.add_argument("--stride", type=int, help="video: keep every STRIDE-th frame (default 1)")
    make.add_argument("--cut-ratio", type=float, help="video without side-file shot ids: a frame difference this many "
                      "times the running median is a cut (default 3)")
    make.add_argument("--num-objects", type=int, help="mujoco: objects in each episode's scene (default 5)")
    make.add_argument("--version", type=int, help="procedural: world version, 3 (commanded camera, independent "
                      "actions; default) or 2 (camera follows the agent)")
    make.add_argument("--action-persistence", type=float, help="procedural: probability that the random policy "
                      "repeats its previous action (default 0.2 in v3, 0.75 in v2)")
    make.set_defaults(fn=cmd_data_make)
    inspect = data.add_parser("inspect", help="verify hashes and print statistics")
    inspect.add_argument("dir")
    inspect.set_defaults(fn=cmd_data_inspect)
    cache = data.add_parser("cache", help="encode a dataset once with a trained tokenizer into token ids (resumable)")
    cache.add_argument("--data", required=True, help="dataset directory (wm data make)")
    cache.add_argument("--tokenizer", required=True, help="tokenizer run directory or bundle")
    cache.add_argument("--out", required=True, help="cache directory; an unfinished one is resumed")
    cache.add_argument("--batch-size", type=int, default=32, help="windows of data.frames_per_clip frames per encode")
    cache.set_defaults(fn=cmd_data_cache)

    train = sub.add_parser("train", help="train a stage; resumes if the workdir has checkpoints")
    train.add_argument("--config", required=True, help="YAML file or preset name (wm_jax/presets)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    train.add_argument("--workdir", required=True)
    train.add_argument("--dry-run", action="store_true",
                       help="compile the step for the mesh and print parameters, FLOPs and per-device memory; no training")
    train.add_argument("--coordinator", help="host:port of process 0, to join a multi-process run (else $WM_COORDINATOR)")
    train.add_argument("--num-processes", type=int, help="processes in the run (else $WM_NUM_PROCESSES)")
    train.add_argument("--process-id", type=int, help="this process's index (else $WM_PROCESS_ID)")
    train.set_defaults(fn=cmd_train)

    ev = sub.add_parser(
        "eval", help="evaluate a run's checkpoint on held-out episodes; `wm eval compare RUN_A RUN_B ...` "
        "prints their metrics side by side",
    )
    ev.add_argument("runs", nargs="*", metavar="compare RUN", help="`compare` followed by run directories")
    ev.add_argument("--workdir")
    ev.add_argument("--step", type=int)
    ev.add_argument("--data", help="dataset directory (default: the run's data.dir; give it for a run whose dataset "
                    "is no longer there)")
    ev.add_argument("--out", help="report directory (eval), or the markdown file written by compare")
    ev.add_argument("--set", action="append", default=[], metavar="eval.KEY=VALUE",
                    help="override an eval key for this evaluation, e.g. eval.guidance=2 or eval.temperature=0.5")
    ev.set_defaults(fn=cmd_eval)

    exp = sub.add_parser("export", help="write an inference bundle (parameters + config + manifest)")
    exp.add_argument("--workdir", required=True)
    exp.add_argument("--step", type=int)
    exp.add_argument("--out", required=True)
    exp.set_defaults(fn=cmd_export)

    bench = sub.add_parser("bench", help="benchmarks; the last line printed is a JSON object")
    bench.add_argument("name", choices=["checkpoint", "data", "rollout", "train", "watermark"])
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own flags (see wm bench NAME --help)")
    bench.set_defaults(fn=cmd_bench)

    gen = sub.add_parser("generate", help="roll out a shot list (YAML script) into a watermarked video + sidecar manifest")
    gen.add_argument("--workdir", required=True, help="dynamics run directory or inference bundle")
    gen.add_argument("--script", required=True, help="shot list YAML (README: Generating from a shot list)")
    gen.add_argument("--out", required=True, help="video file (.mp4); with --batch K: OUT_0.mp4 .. OUT_{K-1}.mp4")
    gen.add_argument("--seed", type=int, default=0, help="seeds random-policy shots without their own seed")
    gen.add_argument("--data", help="dataset for script sources without `data:` (default: the run's data.dir)")
    gen.add_argument("--batch", type=int, default=1, help="K independent samples of the script, rolled out together")
    gen.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    gen.add_argument("--scale", type=int, help="integer upscaling of the frames (default: to a side of at least 128 px)")
    gen.add_argument("--key", type=_watermark_key, help="watermark and signing key, decimal or 0x hex (default: the "
                     "project's public key; use your own to make the sidecar's signature yours alone)")
    gen.add_argument("--max-memory-gib", type=float, default=DEFAULT_MAX_MEMORY_GIB,
                     help="refuse a script whose video would need more memory than this (estimated before any "
                     f"allocation; default {DEFAULT_MAX_MEMORY_GIB:g})")
    gen.set_defaults(fn=cmd_generate)

    ver = sub.add_parser("verify", help="check a video's watermark and sidecar manifest; exit 0 only if both pass")
    ver.add_argument("video")
    ver.add_argument("--key", type=_watermark_key, help="watermark key, decimal or 0x hex (default: the project's public key)")
    ver.set_defaults(fn=cmd_verify)

    demo = sub.add_parser("demo", help="data → tokenizer → dynamics → eval on CPU")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--config", default="tiny_cpu")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    demo.set_defaults(fn=cmd_demo)
    launch.add_parser(sub)  # wm launch {local,slurm,k8s,tpu-vm}
    sweep.add_parser(sub)  # wm sweep SPEC | report SPEC | run-one SPEC --index I
    return p


# A path that is not what a command needs (a file where a directory must be, no
# permission...): bad input, reported in one line naming the path. Other OSErrors (a full
# disk, an I/O error) keep their traceback.
PATH_ERRORS = (FileExistsError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process ended by Ctrl-C


def main(argv: list[str] | None = None) -> int:
    from data_pipelines.writer import DatasetError
    from wm_jax.checkpoint import CheckpointError
    from wm_jax.train.lock import RunLocked

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax's per-restore notices drown the console
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, DatasetError, CheckpointError, RunLocked) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except PATH_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)  # e.g. "[Errno 20] Not a directory: 'runs/x'"
        return EXIT_USAGE
    except KeyboardInterrupt:  # `wm train` saves on Ctrl-C once its loop runs; before that, nothing to save
        print(f"interrupted: wm {args.command} stopped (exit {EXIT_INTERRUPTED})", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
