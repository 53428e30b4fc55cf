"""`wm generate` (a shot list into a watermarked video + signed sidecar) and `wm verify`."""

from __future__ import annotations

import argparse
import json
import sys

from wm_jax.config import RENDERS
from wm_jax.inference.generate import DEFAULT_MAX_MEMORY_GIB


def watermark_key(text: str) -> int:
    """--key: an int in [0, 2**64), decimal or 0x-prefixed hex."""
    try:
        key = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= key < 2**64:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64), got {key}")
    return key


def cmd_generate(args: argparse.Namespace) -> int:
    from wm_jax.inference.generate import generate

    paths = generate(
        args.workdir,
        args.script,
        args.out,
        seed=args.seed,
        data_dir=args.data,
        batch=args.batch,
        step=args.step,
        scale=args.scale,
        key=args.key,
        max_memory_gib=args.max_memory_gib,
        render=args.render,
    )
    for path in paths:
        print(f"wrote {path} (+ {path.name}.json); check it with: wm verify {path}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Prints wm_jax.inference.watermark.verify's dict as JSON, and on stderr what was verified or
    what failed; 0 when the watermark is detected and the signed sidecar matches the file,
    else 1 (the dict's "problems" say why, naming any edited field)."""
    from wm_jax.inference import watermark

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


def add_parser(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser(
        "generate", help="roll out a shot list (YAML script) into a watermarked video + sidecar manifest"
    )
    gen.add_argument("--workdir", required=True, help="dynamics run directory or inference bundle")
    gen.add_argument("--script", required=True, help="shot list YAML (README: Generating from a shot list)")
    gen.add_argument("--out", required=True, help="video file (.mp4); with --batch K: OUT_0.mp4 .. OUT_{K-1}.mp4")
    gen.add_argument("--seed", type=int, default=0, help="seeds random-policy shots without their own seed")
    gen.add_argument("--data", help="dataset for script sources without `data:` (default: the run's data.dir)")
    gen.add_argument("--batch", type=int, default=1, help="K independent samples of the script, rolled out together")
    gen.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    gen.add_argument(
        "--scale", type=int, help="integer upscaling of the frames (default: to a side of at least 128 px)"
    )
    gen.add_argument(
        "--key",
        type=watermark_key,
        help="watermark and signing key, decimal or 0x hex (default: the "
        "project's public key; use your own to make the sidecar's signature yours alone)",
    )
    gen.add_argument(
        "--max-memory-gib",
        type=float,
        default=DEFAULT_MAX_MEMORY_GIB,
        help="refuse a script whose video would need more memory than this (estimated before any "
        f"allocation; default {DEFAULT_MAX_MEMORY_GIB:g})",
    )
    gen.add_argument(
        "--render",
        choices=RENDERS,
        help="how generated frames become pixels: decode every frame, or carry the previous frame's "
        "pixels in each patch whose FSQ code did not change (default: the run's eval.render)",
    )
    gen.set_defaults(fn=cmd_generate)

    ver = sub.add_parser("verify", help="check a video's watermark and sidecar manifest; exit 0 only if both pass")
    ver.add_argument("video")
    ver.add_argument(
        "--key", type=watermark_key, help="watermark key, decimal or 0x hex (default: the project's public key)"
    )
    ver.set_defaults(fn=cmd_verify)
