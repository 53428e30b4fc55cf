"""`wm bench watermark`: detection rates of the output watermark, its false positives, and its cost.

Clips come from the procedural world (`data_pipelines.sources.procedural`): episodes
0..N-1 stand in for generated clips and are marked with the key; episodes N..2N-1 are
"real" clips, never marked. Figures, each a rate over N clips:

* detect_rate_marked: marked clips detected (target >= 0.99);
* false_positive_rate: real clips detected (target <= 0.01);
* detect_rate_after_mp4: marked clips detected after an mp4 round trip with imageio's
  defaults (libx264, crf 25, yuv420p, 10 fps; `--fps` to change), written and read back
  from disk (target >= 0.95);
* false_positive_rate_after_mp4, wrong_key_rate (marked clips tested with another key);
* psnr_db: mean PSNR of marked vs original frames (the house floor is 38 dB).

The threshold is `wm_jax.inference.watermark.THRESHOLD`; the scores' means and extremes are
reported too, so the margin on either side is visible.

With `--workdir RUN --script SHOTS.yaml`, the marked clips are generated ones: `wm
generate` renders the script `--clips` times in one batch (each sample its own random
actions), and its output mp4s are read back (already marked and encoded once: that is
`detect_rate_marked`; `detect_rate_after_mp4` re-encodes them once more). The real clips
are windows of the run's dataset (all splits) of the same length, upscaled as `wm
generate` upscales (nearest, to >= 128 px), never marked. No PSNR: the unmarked
generated frames are not kept.

Run: `wm bench watermark --clips 200 --size 64 --frames 16`, or
`wm bench watermark --workdir runs/demo/dynamics --script experiments/scripts/three_shots.yaml --clips 100`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from wm_jax.inference import watermark as wmk
from wm_jax.bench import results
from wm_jax.imaging import psnr

COLUMNS = [
    "machine",
    "clips",
    "frames",
    "size",
    "mp4 fps",
    "PSNR dB",
    "detected",
    "false pos.",
    "detected after mp4",
    "false pos. after mp4",
    "wrong key",
    "command",
]
MP4_FPS = 10.0  # imageio's default
TARGETS = {
    "detect_rate_marked": (">=", 0.99),
    "false_positive_rate": ("<=", 0.01),
    "detect_rate_after_mp4": (">=", 0.95),
}


def procedural_clip(episode: int, frames: int, size: int, seed: int = 0) -> np.ndarray:
    """One procedural episode's frames, uint8 [frames, size, size, 3]."""
    from data_pipelines.sources import procedural

    records = procedural.generate_episode(seed, episode, frames, size=size)
    return np.stack([r["frame"] for r in records])


def mp4_round_trip(frames: np.ndarray, directory: str, fps: float = MP4_FPS) -> np.ndarray:
    """Writes uint8 [T, H, W, 3] as mp4 at imageio-ffmpeg's default quality, reads it back.

    Frame rate matters: x264's constant-quality mode spends fewer bits per frame at higher
    fps, so the mark weakens (see the module docstring of wm_jax.inference.watermark).
    """
    import imageio.v2 as imageio

    fd, path = tempfile.mkstemp(suffix=".mp4", dir=directory)
    os.close(fd)
    try:
        # macro_block_size=1: no resize to a multiple of 16 (it would misalign the pattern).
        imageio.mimsave(path, list(frames), fps=fps, macro_block_size=1)
        reader = imageio.get_reader(path)
        try:
            return np.stack([np.asarray(f)[..., :3] for f in reader])
        finally:
            reader.close()
    finally:
        os.remove(path)


def read_video(path: str | Path) -> np.ndarray:
    """All frames of a video file, uint8 [T, H, W, 3]."""
    import imageio.v2 as imageio

    reader = imageio.get_reader(str(path))
    try:
        return np.stack([np.asarray(f)[..., :3] for f in reader])
    finally:
        reader.close()


def generated_and_real(
    workdir: str | Path, script: str | Path, clips: int, seed: int, directory: str
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`clips` videos of `wm generate` (marked, mp4) read back, uint8 [T, H, W, 3] each, and
    `clips` real windows of T frames of the run's dataset, upscaled the same way."""
    from wm_jax.eval.clips import held_out_clips
    from wm_jax.inference.generate import default_scale, generate
    from wm_jax.run import load_run_config

    generated = [
        read_video(p) for p in generate(workdir, script, Path(directory) / "generated.mp4", seed=seed, batch=clips)
    ]
    cfg = load_run_config(workdir)
    frames, scale = generated[0].shape[0], default_scale(cfg.model.image_size)
    real: list[np.ndarray] = []
    for split in ("test", "val", "train"):  # never marked: any split will do
        if len(real) < clips:
            windows = held_out_clips(cfg.data.dir, cfg, frames, split=split, num_clips=clips - len(real))["frame"]
            real += [w.repeat(scale, axis=1).repeat(scale, axis=2) for w in windows]
    if len(real) < clips:
        raise ValueError(
            f"the dataset {cfg.data.dir} has only {len(real)} windows of {frames} frames; ask fewer --clips"
        )
    return generated, real


def run_generated(
    workdir: str | Path,
    script: str | Path,
    clips: int = 100,
    key: int = wmk.DEFAULT_KEY,
    seed: int = 0,
    fps: float = MP4_FPS,
) -> dict[str, Any]:
    """The figures of `run` on clips generated by RUN from SHOTS.yaml (module docstring)."""
    scores: dict[str, list[float]] = {k: [] for k in ("marked", "real", "marked_mp4", "real_mp4", "wrong_key")}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="wm_bench_watermark_") as tmp:
        generated, real = generated_and_real(workdir, script, clips, seed, tmp)
        for i, (marked, clip) in enumerate(zip(generated, real)):
            score_pair(scores, marked, clip, key, i, tmp, fps)
    t, h, w, _ = generated[0].shape
    return {
        **rates(scores),
        "psnr_db": None,
        "psnr_db_min": None,
        "clips": clips,
        "frames": t,
        "frame_size": h,
        "strength": wmk.STRENGTH,
        "cell": wmk.cell_size(h, w),
        "mp4_fps": fps,
        "threshold": wmk.THRESHOLD,
        "generated_by": {"workdir": str(workdir), "script": str(script), "seed": seed},
        "seconds": time.perf_counter() - start,
    }


def score_pair(
    scores: dict[str, list[float]], marked: np.ndarray, real: np.ndarray, key: int, i: int, directory: str, fps: float
) -> None:
    """Appends the detection scores of clip pair i (uint8 [T, H, W, 3] each) to `scores`:
    marked and real as they are and after an mp4 round trip, and marked under a wrong key."""
    votes = wmk.cell_votes(marked)
    scores["marked"].append(wmk.score_votes(votes, key))
    # A different wrong key per clip: one fixed pair of keys would be a single sample.
    scores["wrong_key"].append(wmk.score_votes(votes, (wmk.check_key(key) + 1 + i) % 2**64))
    scores["real"].append(wmk.detect(real, key)[0])
    scores["marked_mp4"].append(wmk.detect(mp4_round_trip(marked, directory, fps), key)[0])
    scores["real_mp4"].append(wmk.detect(mp4_round_trip(real, directory, fps), key)[0])


def rates(scores: dict[str, list[float]]) -> dict[str, Any]:
    """Detection rates (share of scores >= the threshold) and score statistics per kind of clip."""
    rate = lambda name: float(np.mean(np.asarray(scores[name]) >= wmk.THRESHOLD))
    return {
        "bench": "watermark",
        "detect_rate_marked": rate("marked"),
        "false_positive_rate": rate("real"),
        "detect_rate_after_mp4": rate("marked_mp4"),
        "false_positive_rate_after_mp4": rate("real_mp4"),
        "wrong_key_rate": rate("wrong_key"),
        "scores": {
            name: {"mean": float(np.mean(v)), "std": float(np.std(v)), "min": float(np.min(v)), "max": float(np.max(v))}
            for name, v in scores.items()
        },
    }


def run(
    clips: int = 200,
    frames: int = 16,
    size: int = 64,
    key: int = wmk.DEFAULT_KEY,
    strength: int = wmk.STRENGTH,
    seed: int = 0,
    fps: float = MP4_FPS,
) -> dict[str, Any]:
    """Marks, detects and re-encodes `clips` marked and `clips` real clips; returns the figures."""
    if clips < 1 or frames < 1:
        raise ValueError(f"clips and frames must be >= 1, got {clips}, {frames}")
    scores: dict[str, list[float]] = {k: [] for k in ("marked", "real", "marked_mp4", "real_mp4", "wrong_key")}
    psnrs = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="wm_bench_watermark_") as tmp:
        for i in range(clips):
            clip = procedural_clip(i, frames, size, seed)
            real = procedural_clip(clips + i, frames, size, seed)  # another world, never marked
            marked = wmk.embed(clip, key, strength)
            psnrs.append(psnr(clip, marked, axes=None))
            score_pair(scores, marked, real, key, i, tmp, fps)
    return {
        **rates(scores),
        "psnr_db": float(np.mean(psnrs)),
        "psnr_db_min": float(np.min(psnrs)),
        "clips": clips,
        "frames": frames,
        "frame_size": size,
        "strength": strength,
        "cell": wmk.cell_size(size, size),
        "mp4_fps": fps,
        "threshold": wmk.THRESHOLD,
        "seconds": time.perf_counter() - start,
    }


def meets_targets(result: dict[str, Any]) -> dict[str, bool]:
    """Whether each issue target (TARGETS) is met."""
    return {
        name: (result[name] >= bound if op == ">=" else result[name] <= bound) for name, (op, bound) in TARGETS.items()
    }


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    kind = "generated " if "generated_by" in result else ""
    title = f"watermark: {result['clips']} {kind}clips x {result['frames']} frames, {result['frame_size']}px"
    table = Table(title=title)
    for col in ("clips", "rate", "target", "mean", "std", "min", "max"):
        table.add_column(col, justify="left" if col == "clips" else "right")
    ok = meets_targets(result)
    rows = (
        ("marked", "marked", "detect_rate_marked"),
        ("real", "real", "false_positive_rate"),
        ("marked+mp4", "marked_mp4", "detect_rate_after_mp4"),
        ("real+mp4", "real_mp4", "false_positive_rate_after_mp4"),
        ("wrong key", "wrong_key", "wrong_key_rate"),
    )
    for label, name, figure in rows:
        s = result["scores"][name]
        target = ""
        if figure in TARGETS:
            op, bound = TARGETS[figure]
            target = f"{op}{bound:g} " + ("ok" if ok[figure] else "MISSED")
        table.add_row(
            label,
            f"{result[figure]:.3f}",
            target,
            f"{s['mean']:.2f}",
            f"{s['std']:.2f}",
            f"{s['min']:.2f}",
            f"{s['max']:.2f}",
        )
    console = Console()
    console.print(table)
    console.print(
        f"mean/std/min/max: detection score per clip; detected when >= {result['threshold']:g}. "
        f"Strength {result['strength']}, {result['cell']}px cells, mp4 at {result['mp4_fps']:g} fps."
    )
    if result["psnr_db"] is not None:
        console.print(
            f"PSNR marked vs original: mean {result['psnr_db']:.2f} dB, min {result['psnr_db_min']:.2f} dB (floor 38)"
        )
    console.print(f"{result['seconds']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wm bench watermark", description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=200, help="marked clips, and as many real ones (default 200)")
    parser.add_argument("--frames", type=int, default=16, help="frames per clip (default 16)")
    parser.add_argument("--size", type=int, default=64, help="frame side in pixels (default 64)")
    parser.add_argument("--strength", type=int, default=wmk.STRENGTH, help=f"grey levels (default {wmk.STRENGTH})")
    parser.add_argument(
        "--key", type=lambda s: int(s, 0), default=wmk.DEFAULT_KEY, help="watermark key (default: the project's)"
    )
    parser.add_argument(
        "--fps", type=float, default=MP4_FPS, help=f"frame rate of the mp4 (default {MP4_FPS}, imageio's)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="procedural world seed, or wm generate's with --workdir (default 0)"
    )
    parser.add_argument("--workdir", default=None, help="a dynamics run: mark clips it generates (with --script)")
    parser.add_argument("--script", default=None, help="shot list for --workdir (wm generate's YAML)")
    results.add_flag(parser)
    args = parser.parse_args(argv)
    if (args.workdir is None) != (args.script is None):
        parser.error("--workdir and --script go together")
    if args.workdir and args.strength != wmk.STRENGTH:
        parser.error("--strength: wm generate marks at the default strength")
    if args.clips < 1 or args.frames < 1:
        parser.error("--clips and --frames must be >= 1")
    if args.size < wmk.MIN_SIZE or args.size % 2:
        parser.error(f"--size must be even (H.264 needs it) and >= {wmk.MIN_SIZE}")
    if not 1 <= args.strength <= wmk.MAX_STRENGTH:
        parser.error(f"--strength must be in [1, {wmk.MAX_STRENGTH}]")
    if args.fps <= 0:
        parser.error("--fps must be > 0")
    if not 0 <= args.key < 2**64:
        parser.error("--key must be in [0, 2**64)")
    if args.workdir:
        result = run_generated(args.workdir, args.script, args.clips, args.key, args.seed, args.fps)
        command = f"wm bench watermark --workdir {args.workdir} --script {args.script} --clips {args.clips}"
    else:
        result = run(args.clips, args.frames, args.size, args.key, args.strength, args.seed, args.fps)
        command = f"wm bench watermark --clips {args.clips} --frames {args.frames} --size {args.size}"
    print_table(result)
    for flag, value, default in (
        ("--strength", args.strength, wmk.STRENGTH),
        ("--key", args.key, wmk.DEFAULT_KEY),
        ("--seed", args.seed, 0),
        ("--fps", args.fps, MP4_FPS),
    ):
        if value != default:
            command += f" {flag} {value:g}" if isinstance(value, float) else f" {flag} {value}"
    values = [
        results.machine("cpu"),
        str(args.clips),
        str(result["frames"]),
        str(result["frame_size"]),
        f"{args.fps:g}",
        "–" if result["psnr_db"] is None else f"{result['psnr_db']:.2f}",
        f"{result['detect_rate_marked']:.3f}",
        f"{result['false_positive_rate']:.3f}",
        f"{result['detect_rate_after_mp4']:.3f}",
        f"{result['false_positive_rate_after_mp4']:.3f}",
        f"{result['wrong_key_rate']:.3f}",
        f"`{command}`",
    ]
    results.append_row("watermark", COLUMNS, values, args.results)
    print(json.dumps(result), flush=True)  # must stay the last line of stdout
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
