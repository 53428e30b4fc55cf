"""`wm generate`: a watermarked video from a shot list, rolled out by a dynamics run.

    wm generate --workdir RUN --script SHOTS.yaml --out OUT.mp4 [--seed N] [--data DIR] [--batch K]
                [--render decode|carry]

RUN is a dynamics-stage run directory or an inference bundle (`wm export`); its tokenizer
is the run's `train.tokenizer_workdir` (the bundle's own). The script:

    fps: 10                                   # optional: default the dataset's, else 10
    start: {data: DIR, split: test, episode: 0, t: 0, frames: 4}   # or {images: [a.png, ...]}
    reference: {data: DIR, split: test, episode: 0}                # or {image: ref.png}, or null
    shots:
      - duration: 10                          # or timecodes: [start_s, end_s]
        camera: {pan: [1, 0]}                 # px/step; tilt: v (y), dolly: v (z), or poses: [[7], ...]
        actions: [4, 4, 1, ...]               # or {policy: random, seed: 3}, or {repeat: 2}
      - cut: true                             # a new shot: scene context resets, identities kept
        duration: 8
        camera: {start: [x, y], pan: [0, 1]}  # or start: {shot: 1}, {offset: [dx, dy]}

One control sequence is built for the whole script (per frame: action, camera pose
integrated from the moves, a cut at each `cut: true` shot's first frame), the identity
bank's reference frame is encoded once, and the cached rollout (`rollout_frames`) is
decoded in chunks of the tokenizer's clip length as frames are dispatched
(`decode_stream`). With the "carry" render (`--render carry`, default the run's
`eval.render`; FSQ tokenizers only) each generated patch whose code did not change keeps
the previous frame's pixels, from the real last context frame on, as `wm eval` renders
(`carry_unchanged`). The video (context frames, reconstructed, then every shot) is written
with `watermark.write_marked_video`; its sidecar `OUT.mp4.json` carries the checkpoint
hashes, the resolved config, the script, seed, render, time, frame count, fps and shot
boundaries. `wm verify OUT.mp4` checks both.

Every script error names the script's line (`yaml.compose` keeps each node's position).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import itertools
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from wm_jax.config import ConfigError
from wm_jax.inference.shot_script import (
    DEFAULT_POSE,
    POSE_DIM,
    Plan,
    Script,
    load_script,
    read_source,
    resolve_shots,
    shot_duration,
)

DEFAULT_FPS = 10.0
MIN_SIDE = 128  # default output upscaling: the smallest whole factor reaching this side
DEFAULT_MAX_MEMORY_GIB = 16.0  # `--max-memory-gib`: what a script's video may take, estimated before any allocation
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi")

# ---------------------------------------------------------------------------- provenance


def params_sha256(directory: Path) -> str:
    """sha256 over the sha256 of every file (`checkpoint.file_digests`) of a parameter
    directory: a checkpoint step's `state` item, or a bundle's `params/`."""
    from wm_jax import checkpoint as ckpt

    digests = ckpt.file_digests(directory)
    if not digests:
        raise ckpt.CheckpointError(f"no parameter files under {directory}")
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def checkpoint_info(workdir: Path, step: int) -> dict[str, Any]:
    """Where a run's (or bundle's) parameters at `step` are, and their hash."""
    from wm_jax import checkpoint as ckpt
    from wm_jax.run import is_bundle

    directory = workdir / "params" if is_bundle(workdir) else ckpt.checkpoint_dir(workdir) / str(step) / "state"
    return {
        "workdir": str(workdir.resolve()),
        "bundle": is_bundle(workdir),
        "step": int(step),
        "checkpoint": str(directory.resolve()),
        "sha256": params_sha256(directory),
    }


def frame_bytes(cfg: Any, scale: int, render: str = "decode") -> int:
    """Estimated bytes one generated frame of one sample holds until its video is written:
    its token codes, its slot of the temporal key/value cache (none with a temporal
    window), the decoded frame twice (the list of chunks and their concatenation; three
    times with the "carry" render, whose output is a copy), the upscaled frame four times
    (`repeat`'s intermediate, the result, the watermark's int16 copy) and its controls. An
    upper estimate: the sum, as if nothing were freed."""
    from wm_jax.models.tokenizer import num_tokens

    dc, side = cfg.model.dynamics, cfg.model.image_size
    tokens = num_tokens(cfg.model)
    kv_cache = 0 if dc.temporal_window else tokens * dc.embed_dim * 2 * dc.num_layers * 4
    codes = tokens * len(cfg.model.tokenizer.fsq_levels) * 4
    decoded = (3 if render == "carry" else 2) * side * side * 3
    return codes + kv_cache + decoded + 4 * (side * scale) ** 2 * 3 + 256


def check_budget(script: Script, *, fps: float, context: int, samples: int, per_frame: int, max_gib: float) -> int:
    """The video's frame count (context + shots) when its estimated memory (`frame_bytes`
    each, per sample) fits in `max_gib` GiB; else a ScriptError at the first shot past it,
    raised before anything of that size is allocated."""
    frames = context
    for shot in script.shots:
        frames += shot_duration(script, shot, fps)
        need = frames * samples * per_frame
        if need > max_gib * 2**30:
            where = shot.path + (("duration",) if shot.duration is not None else ("timecodes",))
            raise script.checker.error(
                where,
                f"the video would reach {frames} frames x {samples} sample(s) here, "
                f"about {need / 2**30:,.1f} GiB ({per_frame / 2**10:,.0f} KiB per frame), past "
                f"the limit of {max_gib:g} GiB (--max-memory-gib); shorten the shots, lower "
                "--scale or --batch, or raise the limit",
            )
    return frames


def output_paths(out: Path, samples: int) -> list[Path]:
    """OUT.mp4 for one sample; OUT_0.mp4 .. OUT_{K-1}.mp4 for K."""
    if samples == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{k}{out.suffix}") for k in range(samples)]


def default_scale(size: int) -> int:
    """Smallest whole upscaling that makes a side >= MIN_SIDE (and even, for H.264)."""
    scale = max(1, math.ceil(MIN_SIDE / size))
    return scale + 1 if (size * scale) % 2 else scale


# ---------------------------------------------------------------------------- generate


def _check_arguments(out: Path, *, batch: int, seed: int, scale: int | None, max_memory_gib: float) -> None:
    """ConfigError naming the first bad `wm generate` option."""
    if batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {batch}")
    if seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {seed}")
    if scale is not None and scale < 1:
        raise ConfigError(f"--scale must be >= 1, got {scale}")
    if out.suffix.lower() not in VIDEO_SUFFIXES:
        raise ConfigError(
            f"--out {out}: write a video file ({', '.join(VIDEO_SUFFIXES)}); GIF palettes erase the watermark"
        )
    if not max_memory_gib > 0:
        raise ConfigError(f"--max-memory-gib must be > 0, got {max_memory_gib}")


def _world_model_config(workdir: Path) -> Any:
    """The config of the run (or bundle) at `workdir`: CheckpointError naming it when it is
    not a run, ConfigError when its stage does not roll frames out."""
    from wm_jax.run import load_run_config
    from wm_jax.stages import Role, get_stage, names_with

    cfg = load_run_config(workdir)
    if get_stage(cfg.train.stage).role is not Role.WORLD_MODEL:
        world_models = names_with(Role.WORLD_MODEL)
        raise ConfigError(
            f"{workdir} is a '{cfg.train.stage}' run; wm generate needs a {world_models} run "
            f"(train.stage: {world_models})"
        )
    return cfg


def check_render(cfg: Any, render: str | None, run: str | Path) -> str:
    """`render` (None: the run's `eval.render`), checked: ConfigError naming --render for
    an unknown one, or for "carry" on `run` without FSQ codes (continuous latents never
    repeat exactly). Shared with the serving engine."""
    from wm_jax.config import RENDERS

    render = cfg.eval.render if render is None else render
    if render not in RENDERS:
        raise ConfigError(f"--render must be one of {', '.join(RENDERS)}; got {render!r}")
    if render == "carry" and cfg.model.tokenizer.bottleneck != "fsq":
        raise ConfigError(
            f"--render carry needs FSQ codes, and {run} has a '{cfg.model.tokenizer.bottleneck}' "
            "tokenizer (continuous latents never repeat exactly); use --render decode"
        )
    return render


def _free_output_paths(out: Path, samples: int) -> list[Path]:
    """`output_paths`; ConfigError when a video or its sidecar is already there."""
    from wm_jax.inference import watermark

    paths = output_paths(out, samples)
    existing = [p for p in paths if p.exists() or watermark.sidecar_path(p).exists()]
    if existing:
        raise ConfigError(f"--out: {existing[0]} (or its sidecar) already exists; choose a new --out or remove it")
    return paths


def _read_reference(
    script: Script, cfg: Any, start: dict[str, Any], data_dir: str | None
) -> tuple[np.ndarray | None, dict | None]:
    """(uint8 [S, S, 3] reference frame for the identity bank, what was read) from the
    script's `reference`, else the start episode's; (None, None) without one or a bank."""
    from wm_jax import telemetry

    reference, info = None, None
    if script.reference is not None:
        ref = read_source(
            script,
            script.reference,
            default_data=data_dir or cfg.data.dir,
            default_split=cfg.eval.split,
            default_frames=1,
            size=cfg.model.image_size,
            frames_needed=False,
        )
        if script.reference.images:
            reference = ref["frame"][0]
        elif "reference" in ref:
            reference = ref["reference"][0]
        else:
            raise script.checker.error(script.reference.path, f"dataset {ref['info']['data']} has no `reference` field")
        info = ref["info"]
    elif script.default_reference and "reference" in start:
        reference, info = start["reference"][0], {**start["info"], "frames": 1, "default": "the start episode's"}
    if reference is not None and not cfg.model.dynamics.use_identity_bank:
        telemetry.info("the model has no identity bank (model.dynamics.use_identity_bank: false): reference unused")
        return None, None
    return reference, info


def _control_steps(start: dict[str, Any], plan: Plan, samples: int) -> dict[str, np.ndarray]:
    """The record fields of the whole video's F = C + D frames, for `make_controls`: the
    context's own steps (unknown for image files), then the plan's. action int32 [K, F],
    action_valid bool [K, F], camera float32 [K, F, 7], camera_valid and cut bool [K, F]."""
    ctx = start["frame"].shape[0]
    f = ctx + int(plan.action.shape[1])
    action = np.zeros((samples, f), np.int32)
    action_valid = np.ones((samples, f), bool)
    if "action" in start and np.ndim(start["action"]) == 1:
        action[:, : ctx - 1] = start["action"][: ctx - 1]
        if "action_valid" in start:
            action_valid[:, : ctx - 1] = start["action_valid"][: ctx - 1]
    else:  # image files (or continuous actions): the context's actions are unknown
        action_valid[:, : ctx - 1] = False
    action[:, ctx - 1 : f - 1] = plan.action
    camera = np.zeros((f, POSE_DIM), np.float32)
    camera_valid = np.ones(f, bool)
    camera[:ctx] = start["camera"] if "camera" in start else DEFAULT_POSE
    if "camera" not in start:
        camera_valid[:ctx] = False
    elif "camera_valid" in start:
        camera_valid[:ctx] = start["camera_valid"]
    camera[ctx:] = plan.poses
    cut = np.zeros(f, bool)
    if "cut" in start:
        cut[:ctx] = start["cut"]
    cut[ctx:] = plan.cut
    tile = lambda a: np.broadcast_to(a, (samples,) + a.shape)
    return {
        "action": action,
        "action_valid": action_valid,
        "camera": tile(camera),
        "camera_valid": tile(camera_valid),
        "cut": tile(cut),
    }


@dataclasses.dataclass(frozen=True)
class _Models:
    """A dynamics run and its tokenizer, restored for `wm generate`."""

    cfg: Any  # the dynamics run's config
    dyn_params: Any
    step: int
    tok_dir: Path  # where the tokenizer was restored from
    tok_params: Any
    tok_step: int
    chunk: int  # frames the tokenizer encodes at a time (its data.frames_per_clip)


def _restore_models(workdir: Path, cfg: Any, step: int | None) -> _Models:
    """The dynamics run's parameters at `step` (None: the newest) and its tokenizer's, on
    the devices here; ConfigError when the tokenizer does not fit the run."""
    from wm_jax import sharding
    from wm_jax.config import MeshConfig
    from wm_jax.run import restore_params, tokenizer_source

    mesh = sharding.make_mesh(MeshConfig())
    rules = sharding.logical_rules(cfg.mesh)
    dyn_params, _, step = restore_params(workdir, mesh, rules, step)
    tok_dir = tokenizer_source(workdir, cfg)
    tok_params, tok_cfg, tok_step = restore_params(tok_dir, mesh, rules)
    if tok_cfg.model.tokenizer != cfg.model.tokenizer or tok_cfg.model.image_size != cfg.model.image_size:
        raise ConfigError(
            f"the tokenizer run {tok_dir} does not match the dynamics run's model.tokenizer/model.image_size"
        )
    return _Models(cfg, dyn_params, step, tok_dir, tok_params, tok_step, tok_cfg.data.frames_per_clip)


def _encode_inputs(models: _Models, context: np.ndarray, reference: np.ndarray | None, samples: int) -> tuple[Any, Any]:
    """(context codes float32 [K, C, N, L] of the uint8 [C, S, S, 3] context frames, the
    identity bank's reference codes [K, N, L] or None), the same for each of K samples."""
    import jax.numpy as jnp

    from wm_jax import telemetry
    from wm_jax.models.tokenizer import VideoTokenizer
    from wm_jax.inference.rollout import encode_frames

    tokenizer = VideoTokenizer(models.cfg.model)
    context_codes, _ = encode_frames(tokenizer, models.tok_params, context[None], models.chunk)
    context_codes = jnp.broadcast_to(context_codes, (samples,) + context_codes.shape[1:])
    reference_codes = None
    if reference is not None:  # encoded once, for every shot and sample
        reference_codes = encode_frames(tokenizer, models.tok_params, reference[None, None], models.chunk)[0][:, 0]
        reference_codes = jnp.broadcast_to(reference_codes, (samples,) + reference_codes.shape[1:])
    elif models.cfg.model.dynamics.use_identity_bank:
        telemetry.info("no reference frame: the identity bank is empty (masked)")
    return context_codes, reference_codes


def _roll_out(
    models: _Models,
    context_codes: Any,
    steps: dict[str, np.ndarray],
    reference_codes: Any,
    *,
    frames: int,
    seed: int,
    temperature: float,
    last: np.ndarray | None = None,
) -> np.ndarray:
    """uint8 video [K, C+frames, S, S, 3]: the context codes [K, C, N, L] decoded, then
    `frames` sampled frames under the controls of `steps` (`_control_steps`), decoded or,
    given `last` (uint8 [S, S, 3], the real last context frame), rendered by carrying the
    patches whose codes did not change from it on (`carry_unchanged`, as `wm eval`)."""
    import jax

    from wm_jax.models.dynamics import DynamicsModel, make_controls
    from wm_jax.models.tokenizer import VideoTokenizer
    from wm_jax.inference.rollout import carry_unchanged, decode_stream, rollout_frames

    cfg, tokenizer = models.cfg, VideoTokenizer(models.cfg.model)
    stream = itertools.chain(
        (context_codes[:, i] for i in range(context_codes.shape[1])),
        rollout_frames(
            DynamicsModel(cfg.model),
            models.dyn_params,
            context_codes,
            make_controls(steps),
            frames,
            reference_codes,
            None,
            cached=True,
            key=jax.random.key(seed),
            temperature=temperature,
        ),
    )
    codes: list[Any] = []  # each frame's codes [K, N, L], kept as they stream to the decoder
    if last is not None:
        stream = _kept(stream, codes)
    video = np.concatenate(list(decode_stream(tokenizer, models.tok_params, stream, models.chunk)), axis=1)
    if last is not None:
        ctx = context_codes.shape[1]
        carried = np.stack([np.asarray(c) for c in codes[ctx - 1 :]], axis=1)  # [K, 1 + frames, N, L]
        last = np.broadcast_to(last, video[:, ctx - 1].shape)
        video[:, ctx:] = carry_unchanged(video[:, ctx:], carried, last, cfg.model.tokenizer.patch_size)
    return video


def _kept(items: Iterator[Any], into: list[Any]) -> Iterator[Any]:
    """`items`, each appended to `into` as it passes."""
    for item in items:
        into.append(item)
        yield item


def _video_info(
    workdir: Path,
    script_path: str | Path,
    script: Script,
    models: _Models,
    start: dict[str, Any],
    plan: Plan,
    reference_info: dict | None,
    *,
    seed: int,
    fps: float,
    scale: int,
    render: str,
) -> dict[str, Any]:
    """The sidecar's fields every sample shares: model, config, script, sampling (and the
    render), frames, the start and reference read and the shots' boundaries (frame indices
    of the video)."""
    from wm_jax import config as config_lib

    ctx, size = start["frame"].shape[0], models.cfg.model.image_size
    model = checkpoint_info(workdir, models.step)
    model["tokenizer"] = checkpoint_info(models.tok_dir, models.tok_step)
    boundaries = [
        {
            **s,
            "first_frame": ctx + s["first_frame"],
            "last_frame": ctx + s["first_frame"] + s["frames"] - 1,
            "start_s": (ctx + s["first_frame"]) / fps,
            "end_s": (ctx + s["first_frame"] + s["frames"]) / fps,
        }
        for s in plan.shots
    ]
    return {
        "generator": "wm generate",
        "model": model,
        "checkpoint_sha256": model["sha256"],
        "config": config_lib.to_dict(models.cfg),
        "script": {
            "path": str(Path(script_path).resolve()),
            "sha256": hashlib.sha256(script.text.encode()).hexdigest(),
            "text": script.text,
        },
        "seed": seed,
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "frames": ctx + int(plan.action.shape[1]),
        "fps": fps,
        "context_frames": ctx,
        "frame_size": [size * scale, size * scale],
        "scale": scale,
        "temperature": script.temperature,
        "render": render,
        "start": start["info"],
        "reference": reference_info,
        "shots": boundaries,
        "samples": int(plan.action.shape[0]),
    }


def _write_videos(
    video: np.ndarray, paths: list[Path], common: dict[str, Any], plan: Plan, *, fps: float, key: int
) -> None:
    """Writes sample k of the uint8 video [K, F, H, W, 3] to paths[k], watermarked with
    `key`, and its sidecar: `common` plus the sample's index and its shots' actions."""
    from wm_jax import telemetry

    from wm_jax.inference import watermark

    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for k, path in enumerate(paths):
        actions = [plan.action[k, s["first_frame"] : s["first_frame"] + s["frames"]].tolist() for s in plan.shots]
        info = {**common, "sample": k, "shots": [{**b, "actions": a} for b, a in zip(common["shots"], actions)]}
        watermark.write_marked_video(video[k], path, info, key=key, fps=fps)
        telemetry.info(f"wrote {path} ({video.shape[1]} frames, {fps:g} fps) + {watermark.sidecar_path(path).name}")


def generate(
    workdir: str | Path,
    script_path: str | Path,
    out: str | Path,
    *,
    seed: int = 0,
    data_dir: str | None = None,
    batch: int = 1,
    step: int | None = None,
    scale: int | None = None,
    key: int | None = None,
    max_memory_gib: float = DEFAULT_MAX_MEMORY_GIB,
    render: str | None = None,
) -> list[Path]:
    """Rolls out the script with RUN's dynamics model; writes the watermarked video(s) and
    their sidecars, marked and signed with `key` (default: the public DEFAULT_KEY), and
    returns the video paths (see the module docstring). `render` ("decode" | "carry"; None:
    the run's `eval.render`) picks how generated frames become pixels. Refuses an existing
    output and a script whose video would need more than `max_memory_gib` (`check_budget`)."""
    from wm_jax import telemetry

    from wm_jax.inference import watermark

    workdir, out = Path(workdir), Path(out)
    _check_arguments(out, batch=batch, seed=seed, scale=scale, max_memory_gib=max_memory_gib)
    mark_key = watermark.DEFAULT_KEY if key is None else watermark.check_key(key)
    script = load_script(script_path)
    cfg = _world_model_config(workdir)
    render = check_render(cfg, render, workdir)

    # What the script asks of the data, checked before any model is loaded.
    start = read_source(
        script,
        script.start,
        default_data=data_dir or cfg.data.dir,
        default_split=cfg.eval.split,
        default_frames=cfg.eval.context_frames,
        size=cfg.model.image_size,
    )
    fps = script.fps or start["fps"] or DEFAULT_FPS
    ctx = start["frame"].shape[0]
    scale = scale or default_scale(cfg.model.image_size)
    check_budget(
        script, fps=fps, context=ctx, samples=batch, per_frame=frame_bytes(cfg, scale, render), max_gib=max_memory_gib
    )
    paths = _free_output_paths(out, batch)  # (after the budget: `batch` is bounded now)
    last_pose = start["camera"][-1] if "camera" in start else DEFAULT_POSE
    plan = resolve_shots(
        script, fps=fps, num_actions=cfg.model.dynamics.num_actions, last_pose=last_pose, seed=seed, samples=batch
    )
    reference, reference_info = _read_reference(script, cfg, start, data_dir)

    models = _restore_models(workdir, cfg, step)
    context_codes, reference_codes = _encode_inputs(models, start["frame"], reference, batch)
    total = int(plan.action.shape[1])
    telemetry.info(
        f"generating {batch} x {ctx + total} frames ({ctx} context + {total} in {len(plan.shots)} shots) at {fps:g} fps"
    )
    steps = _control_steps(start, plan, batch)
    last = start["frame"][-1] if render == "carry" else None  # the real frame the carry render starts from
    video = _roll_out(
        models,
        context_codes,
        steps,
        reference_codes,
        frames=total,
        seed=seed,
        temperature=script.temperature,
        last=last,
    )  # [K, F, S, S, 3]
    if scale > 1:
        video = video.repeat(scale, axis=2).repeat(scale, axis=3)
    sampling = {"seed": seed, "fps": fps, "scale": scale, "render": render}
    common = _video_info(workdir, script_path, script, models, start, plan, reference_info, **sampling)
    _write_videos(video, paths, common, plan, fps=fps, key=mark_key)
    return paths
