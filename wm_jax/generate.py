"""`wm generate`: a watermarked video from a shot list, rolled out by a dynamics run.

    wm generate --workdir RUN --script SHOTS.yaml --out OUT.mp4 [--seed N] [--data DIR] [--batch K]

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
(`decode_stream`). The video (context frames, reconstructed, then every shot) is written
with `watermark.write_marked_video`; its sidecar `OUT.mp4.json` carries the checkpoint
hashes, the resolved config, the script, seed, time, frame count, fps and shot
boundaries. `wm verify OUT.mp4` checks both.

Every script error names the script's line (`yaml.compose` keeps each node's position).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import hashlib
import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from wm_jax.config import ConfigError

DEFAULT_FPS = 10.0
DEFAULT_POSE = (0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0)  # camera at the origin, identity rotation
POSE_DIM = 7  # x, y, z, qw, qx, qy, qz
MIN_SIDE = 128  # default output upscaling: the smallest whole factor reaching this side
DEFAULT_MAX_MEMORY_GIB = 16.0  # `--max-memory-gib`: what a script's video may take, estimated before any allocation
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi")

TOP_KEYS = ("fps", "start", "reference", "shots", "temperature")
START_KEYS = ("data", "split", "episode", "t", "frames", "images")
REFERENCE_KEYS = ("data", "split", "episode", "image")
SHOT_KEYS = ("name", "duration", "timecodes", "cut", "camera", "actions")
CAMERA_KEYS = ("pan", "tilt", "dolly", "poses", "start")
CAMERA_START_KEYS = ("shot", "offset")
ACTION_KEYS = ("policy", "seed", "repeat")
POLICIES = ("random",)


class ScriptError(ConfigError):
    """A shot script that cannot be used; the message names the script's line."""


# ---------------------------------------------------------------------------- parsing

Where = tuple  # a path into the script: keys and list indices


def _line_map(node: yaml.Node, path: Where, out: dict[Where, int]) -> None:
    """Line (1-based) of every key and list item under `node`: a mapping key's line is
    where the key is written, a list item's where the item starts."""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = path + (key.value,)
            if sub in out:  # safe_load would keep the last one silently
                raise ScriptError(f"line {key.start_mark.line + 1}: {_dotted(sub)}: duplicate key '{key.value}' "
                                  f"(first given on line {out[sub]})")
            out[sub] = key.start_mark.line + 1
            _line_map(value, sub, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[path + (i,)] = item.start_mark.line + 1
            _line_map(item, path + (i,), out)


def _dotted(path: Where) -> str:
    text = ""
    for p in path:
        text += f"[{p}]" if isinstance(p, int) else (f".{p}" if text else str(p))
    return text or "the script"


@dataclasses.dataclass(frozen=True)
class Checker:
    """Turns problems at a path of the script into ScriptErrors naming its line."""

    name: str
    lines: dict

    def line(self, path: Where) -> int:
        while path and path not in self.lines:
            path = path[:-1]
        return self.lines.get(path, 1)

    def error(self, path: Where, message: str) -> ScriptError:
        return ScriptError(f"{self.name} line {self.line(path)}: {_dotted(path)}: {message}")

    def mapping(self, value: Any, path: Where, allowed: tuple[str, ...]) -> dict:
        if not isinstance(value, dict):
            raise self.error(path, f"must be a mapping with keys {list(allowed)}, got {value!r}")
        for key in value:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.0)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise self.error(path + (key,), f"unknown key '{key}'{hint}; valid keys: {list(allowed)}")
        return value

    def number(self, value: Any, path: Where, positive: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.error(path, f"must be a number, got {value!r}")
        if positive and value <= 0:
            raise self.error(path, f"must be > 0, got {value!r}")
        return float(value)

    def integer(self, value: Any, path: Where, low: int | None = None, what: str = "an integer") -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(path, f"must be {what}, got {value!r}")
        if low is not None and value < low:
            raise self.error(path, f"must be {what} >= {low}, got {value}")
        return value

    def vector(self, value: Any, path: Where, lengths: tuple[int, ...], what: str) -> tuple[float, ...]:
        if not isinstance(value, (list, tuple)) or len(value) not in lengths:
            n = " or ".join(map(str, lengths))
            got = f"{len(value)} values" if isinstance(value, (list, tuple)) else repr(value)
            raise self.error(path, f"{what} must be a list of {n} numbers, got {got}")
        return tuple(self.number(v, path + (i,)) for i, v in enumerate(value))


@dataclasses.dataclass(frozen=True)
class Source:
    """Frames from a dataset episode or image files (`start` / `reference`)."""

    path: Where  # where in the script (for errors)
    data: str | None = None
    split: str | None = None
    episode: int = 0
    t: int = 0
    frames: int | None = None
    images: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Shot:
    number: int  # 1-based
    path: Where
    name: str
    duration: int | None
    timecodes: tuple[float, float] | None
    cut: bool
    move: tuple[float, float, float]  # camera x, y, z per frame
    start: tuple[float, ...] | None  # absolute pose (2, 3 or 7 values) of a cut shot's first frame
    start_shot: int | None  # ... or the first pose of this earlier shot (1-based),
    start_offset: tuple[float, ...]  # ... plus this offset (from the previous frame without a shot)
    poses: tuple[tuple[float, ...], ...] | None
    actions: tuple[int, ...] | None  # explicit ids, or
    repeat: int | None  # one id held, or
    seed: int | None  # the random policy's seed (None: from --seed and the shot number)


@dataclasses.dataclass(frozen=True)
class Script:
    text: str
    name: str
    directory: Path
    checker: Checker
    fps: float | None
    temperature: float
    start: Source
    reference: Source | None  # None: no reference; `default_reference`: the start episode's
    default_reference: bool
    shots: tuple[Shot, ...]


def _source(c: Checker, value: Any, path: Where, allowed: tuple[str, ...], image_key: str) -> Source:
    value = c.mapping({} if value is None and path == ("start",) else value, path, allowed)
    if image_key in value:
        clash = [k for k in ("data", "split", "episode", "t") if k in value]
        if clash:
            raise c.error(path + (clash[0],), f"'{clash[0]}' is for dataset frames; '{image_key}' gives image files")
        images = value[image_key]
        if image_key == "image":
            images = [images]
        if not isinstance(images, list) or not images or not all(isinstance(p, str) for p in images):
            raise c.error(path + (image_key,), f"must be {'a file name' if image_key == 'image' else 'a list of file names'}")
        frames = value.get("frames")
        if frames is not None and c.integer(frames, path + ("frames",), 1) != len(images):
            raise c.error(path + ("frames",), f"is {frames} but {len(images)} images are listed")
        return Source(path, images=tuple(images), frames=len(images))
    data = value.get("data")
    if data is not None and not isinstance(data, str):
        raise c.error(path + ("data",), f"must be a dataset directory, got {data!r}")
    split = value.get("split")
    if split is not None and not isinstance(split, str):
        raise c.error(path + ("split",), f"must be a split name, got {split!r}")
    return Source(
        path, data=data, split=split,
        episode=c.integer(value.get("episode", 0), path + ("episode",), 0, "an episode index"),
        t=c.integer(value.get("t", 0), path + ("t",), 0, "a step index"),
        frames=None if value.get("frames") is None else c.integer(value["frames"], path + ("frames",), 1, "a frame count"),
    )


def _shot_length(c: Checker, value: dict, path: Where, i: int) -> tuple[int | None, tuple[float, float] | None]:
    """(duration in frames, timecodes (start_s, end_s)) of shot i: exactly one is given."""
    if ("duration" in value) == ("timecodes" in value):
        which = "both 'duration' and 'timecodes'" if "duration" in value else "no duration"
        raise c.error(path, f"shot {i + 1} has {which}: give `duration: FRAMES` or `timecodes: [start_s, end_s]`")
    if "duration" in value:
        return c.integer(value["duration"], path + ("duration",), 1, "a number of frames"), None
    start_s, end_s = c.vector(value["timecodes"], path + ("timecodes",), (2,), "timecodes")
    if end_s <= start_s:
        raise c.error(path + ("timecodes",), f"end {end_s} s must be after start {start_s} s")
    return None, (start_s, end_s)


def _camera_move(c: Checker, camera: dict, cp: Where) -> tuple[float, float, float]:
    """The camera's x, y, z move per frame from `pan`, `tilt` and `dolly`."""
    move = [0.0, 0.0, 0.0]
    if "pan" in camera:
        dx, dy = c.vector(camera["pan"], cp + ("pan",), (2,), "pan [x, y] px/step")
        move[0] += dx
        move[1] += dy
    if "tilt" in camera:
        move[1] += c.number(camera["tilt"], cp + ("tilt",))
    if "dolly" in camera:
        move[2] += c.number(camera["dolly"], cp + ("dolly",))
    return tuple(move)


def _camera_poses(c: Checker, camera: dict, cp: Where, duration: int | None) -> tuple[tuple[float, ...], ...] | None:
    """Every frame's pose [x, y, z, qw, qx, qy, qz] from `poses` (None when not given)."""
    if "poses" not in camera:
        return None
    clash = [k for k in camera if k != "poses"]
    if clash:
        raise c.error(cp + (clash[0],), f"'{clash[0]}' cannot be combined with 'poses' (poses give every frame's pose)")
    if not isinstance(camera["poses"], list) or not camera["poses"]:
        raise c.error(cp + ("poses",), "must be a list of poses [x, y, z, qw, qx, qy, qz], one per frame")
    poses = tuple(c.vector(p, cp + ("poses", j), (POSE_DIM,), f"pose {j + 1}") for j, p in enumerate(camera["poses"]))
    if duration is not None and len(poses) != duration:
        raise c.error(cp + ("poses",), f"has {len(poses)} poses for a shot of {duration} frames (one per frame)")
    return poses


def _camera_start(c: Checker, camera: dict, cp: Where, i: int,
                  cut: bool) -> tuple[tuple[float, ...] | None, int | None, tuple[float, ...]]:
    """(absolute start pose, earlier shot whose first pose it starts from, offset) of a cut
    shot i's first frame, from `start`: (None, None, ()) when not given."""
    if "start" not in camera:
        return None, None, ()
    sp = cp + ("start",)
    if not cut:
        raise c.error(sp, "a camera start needs `cut: true` (without a cut the camera continues from the previous frame)")
    s = camera["start"]
    if not isinstance(s, dict):
        return c.vector(s, sp, (2, 3, POSE_DIM), "start [x, y], [x, y, z] or a pose [x, y, z, qw, qx, qy, qz]"), None, ()
    s = c.mapping(s, sp, CAMERA_START_KEYS)
    if not s:
        raise c.error(sp, f"give 'shot' and/or 'offset' (keys {list(CAMERA_START_KEYS)})")
    start_shot, start_offset = None, ()
    if "shot" in s:
        start_shot = c.integer(s["shot"], sp + ("shot",), 1, "a shot number")
        if start_shot > i:
            raise c.error(sp + ("shot",), f"must name an earlier shot (1..{i}), got {start_shot}")
    if "offset" in s:
        start_offset = c.vector(s["offset"], sp + ("offset",), (2, 3), "offset [dx, dy(, dz)]")
    return None, start_shot, start_offset


def _shot_actions(c: Checker, value: dict, path: Where,
                  duration: int | None) -> tuple[tuple[int, ...] | None, int | None, int | None]:
    """(explicit action ids, one id held, the random policy's seed) of a shot; the random
    policy (all None) when `actions` is not given."""
    ap = path + ("actions",)
    actions = value.get("actions", {"policy": "random"})
    if isinstance(actions, list):
        ids = tuple(c.integer(a, ap + (j,), 0, "an action id") for j, a in enumerate(actions))
        if duration is not None and len(ids) != duration:
            raise c.error(ap, f"has {len(ids)} actions for a shot of {duration} frames (one per frame)")
        return ids, None, None
    actions = c.mapping(actions, ap, ACTION_KEYS)
    if ("repeat" in actions) == ("policy" in actions):
        raise c.error(ap, "give a list of action ids, {policy: random, seed: N} or {repeat: ID}")
    if "repeat" in actions:
        if "seed" in actions:
            raise c.error(ap + ("seed",), "a seed is for {policy: random}")
        return None, c.integer(actions["repeat"], ap + ("repeat",), 0, "an action id"), None
    if actions["policy"] not in POLICIES:
        close = difflib.get_close_matches(str(actions["policy"]), POLICIES, n=1, cutoff=0.0)
        raise c.error(ap + ("policy",), f"unknown policy {actions['policy']!r} (did you mean '{close[0]}'?)")
    return None, None, c.integer(actions["seed"], ap + ("seed",), 0, "a seed") if "seed" in actions else None


def _shot(c: Checker, value: Any, i: int) -> Shot:
    """Shot i (0-based) of the script's `shots`, checked."""
    path = ("shots", i)
    value = c.mapping(value, path, SHOT_KEYS)
    duration, timecodes = _shot_length(c, value, path, i)
    cut = value.get("cut", False)
    if not isinstance(cut, bool):
        raise c.error(path + ("cut",), f"must be true or false, got {cut!r}")
    name = value.get("name", f"shot {i + 1}")
    if not isinstance(name, str):
        raise c.error(path + ("name",), f"must be a string, got {name!r}")
    cp = path + ("camera",)
    camera = c.mapping(value.get("camera") or {}, cp, CAMERA_KEYS)
    move = _camera_move(c, camera, cp)
    poses = _camera_poses(c, camera, cp, duration)
    start, start_shot, start_offset = _camera_start(c, camera, cp, i, cut)
    ids, repeat, seed = _shot_actions(c, value, path, duration)
    return Shot(number=i + 1, path=path, name=name, duration=duration, timecodes=timecodes, cut=cut, move=move,
                start=start, start_shot=start_shot, start_offset=start_offset, poses=poses, actions=ids, repeat=repeat,
                seed=seed)


def parse_script(text: str, name: str = "script", directory: str | Path = ".") -> Script:
    """Validates a shot script (YAML text) -> Script; ScriptError naming the line otherwise.

    What needs the model or the data (action ids against `num_actions`, timecodes against
    the fps, datasets and episodes) is checked by `resolve_shots` / `read_source`."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ScriptError(f"{name}{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    lines: dict[Where, int] = {}
    if root is not None:
        try:
            _line_map(root, (), lines)
        except ScriptError as e:
            raise ScriptError(f"{name} {e}") from None
    c = Checker(name, lines)
    value = c.mapping(value, (), TOP_KEYS)
    if "shots" not in value:
        raise c.error((), "the script has no 'shots' list")
    shots = value["shots"]
    if not isinstance(shots, list) or not shots:
        raise c.error(("shots",), "must be a non-empty list of shots")
    fps = None if value.get("fps") is None else c.number(value["fps"], ("fps",), positive=True)
    temperature = c.number(value.get("temperature", 0.0), ("temperature",))
    if temperature < 0:
        raise c.error(("temperature",), f"must be >= 0, got {temperature}")
    start = _source(c, value.get("start"), ("start",), START_KEYS, "images")
    default_reference = "reference" not in value
    reference = None
    if value.get("reference") is not None:
        reference = _source(c, value["reference"], ("reference",), REFERENCE_KEYS, "image")
    return Script(text=text, name=name, directory=Path(directory), checker=c, fps=fps, temperature=temperature,
                  start=start, reference=reference, default_reference=default_reference,
                  shots=tuple(_shot(c, s, i) for i, s in enumerate(shots)))


def load_script(path: str | Path) -> Script:
    path = Path(path)
    if not path.is_file():
        raise ScriptError(f"script {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ScriptError(f"script {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    return parse_script(text, path.name, path.parent)


# ---------------------------------------------------------------------------- controls


@dataclasses.dataclass(frozen=True)
class Plan:
    """The script's part of the control sequence, for K samples.

    action int32 [K, D] (action d takes the frame before the shot's frame d to it), poses
    float32 [D, 7] and cut bool [D] of the D = sum of durations generated frames; shots:
    their boundaries (frame indices counted from the first generated frame)."""

    action: np.ndarray
    poses: np.ndarray
    cut: np.ndarray
    shots: list[dict]


def _duration(script: Script, shot: Shot, fps: float) -> int:
    if shot.duration is not None:
        return shot.duration
    start_s, end_s = shot.timecodes
    frames = round(end_s * fps) - round(start_s * fps)
    if frames < 1:
        raise script.checker.error(shot.path + ("timecodes",), f"{start_s}-{end_s} s is under one frame at {fps:g} fps")
    return frames


def resolve_shots(script: Script, *, fps: float, num_actions: int, last_pose: Any = DEFAULT_POSE, seed: int = 0,
                  samples: int = 1) -> Plan:
    """Durations (timecodes at `fps`), camera poses integrated from the moves starting after
    `last_pose` (the last context frame's), action ids checked against `num_actions` and
    drawn for each of `samples` samples (a random policy draws from (seed, sample), its
    seed defaulting to (`seed`, shot number)), cut flags."""
    c = script.checker
    prev = np.asarray(last_pose, np.float64)
    actions, poses, cuts, shots = [], [], [], []
    first_pose: dict[int, np.ndarray] = {}
    frame = 0
    for shot in script.shots:
        d = _duration(script, shot, fps)
        if shot.poses is not None:
            if len(shot.poses) != d:
                raise c.error(shot.path + ("camera", "poses"), f"has {len(shot.poses)} poses for a shot of {d} frames (one per frame)")
            shot_poses = np.asarray(shot.poses, np.float64)
        else:
            move = np.zeros(POSE_DIM)
            move[:3] = shot.move
            if shot.cut:  # the shot's first frame is its start; the move follows
                base = prev.copy()
                if shot.start_shot is not None:
                    base = first_pose[shot.start_shot].copy()
                if shot.start is not None:
                    base[: len(shot.start)] = shot.start
                base[: len(shot.start_offset)] += shot.start_offset
                steps = np.arange(d)
            else:
                base, steps = prev, np.arange(1, d + 1)
            shot_poses = base + steps[:, None] * move
        first_pose[shot.number] = shot_poses[0]
        prev = shot_poses[-1]

        ap = shot.path + ("actions",)
        if shot.actions is not None:
            if len(shot.actions) != d:
                raise c.error(ap, f"has {len(shot.actions)} actions for a shot of {d} frames (one per frame)")
            bad = [j for j, a in enumerate(shot.actions) if a >= num_actions]
            if bad:
                raise c.error(ap + (bad[0],), f"action id {shot.actions[bad[0]]} is not valid: the model has "
                              f"num_actions={num_actions} (ids 0..{num_actions - 1})")
            acts = np.broadcast_to(np.asarray(shot.actions, np.int32), (samples, d))
        elif shot.repeat is not None:
            if shot.repeat >= num_actions:
                raise c.error(ap + ("repeat",), f"action id {shot.repeat} is not valid: the model has "
                              f"num_actions={num_actions} (ids 0..{num_actions - 1})")
            acts = np.full((samples, d), shot.repeat, np.int32)
        else:
            base_seed = [shot.seed] if shot.seed is not None else [seed, shot.number]
            acts = np.stack([np.random.default_rng(base_seed + [k]).integers(0, num_actions, d) for k in range(samples)])
        actions.append(acts.astype(np.int32))
        poses.append(shot_poses)
        cut = np.zeros(d, bool)
        cut[0] = shot.cut
        cuts.append(cut)
        shots.append({"shot": shot.number, "name": shot.name, "first_frame": frame, "frames": d, "cut": shot.cut,
                      "line": c.line(shot.path), "camera_start": [float(v) for v in shot_poses[0]],
                      "camera_end": [float(v) for v in shot_poses[-1]]})
        frame += d
    return Plan(action=np.concatenate(actions, axis=1), poses=np.concatenate(poses).astype(np.float32),
                cut=np.concatenate(cuts), shots=shots)


# ---------------------------------------------------------------------------- frames


def _read_image(c: Checker, path: Where, file: Path, size: int) -> np.ndarray:
    import imageio.v2 as imageio

    if not file.is_file():
        raise c.error(path, f"image file {file} does not exist")
    try:
        image = np.asarray(imageio.imread(file))
    except Exception as e:  # noqa: BLE001 — imageio raises many types for unreadable files
        raise c.error(path, f"cannot read image {file}: {e}") from None
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    image = image[..., :3]
    if image.shape != (size, size, 3) or image.dtype != np.uint8:
        raise c.error(path, f"image {file} is {image.shape} {image.dtype}; the model needs uint8 {size}x{size} RGB")
    return image


def read_source(script: Script, source: Source, *, default_data: str | None, default_split: str,
                default_frames: int, size: int, frames_needed: bool = True) -> dict[str, Any]:
    """A `start`/`reference` source's records: {"frame": uint8 [F, S, S, 3], and from a
    dataset every field of those steps ("action", "camera", "cut", "reference", ...),
    "info": what was read (for the manifest), "fps": the dataset's (or None)}."""
    c = script.checker
    if source.images:
        files = [script.directory / f for f in source.images]
        key = "images" if source.path == ("start",) else "image"
        paths = [source.path + (key, i) for i in range(len(files))] if key == "images" else [source.path + (key,)]
        frames = np.stack([_read_image(c, p, f, size) for p, f in zip(paths, files)])
        return {"frame": frames, "info": {"images": [str(f) for f in files]}, "fps": None}

    from data_pipelines import writer
    from data_pipelines.schema import DatasetError

    data = source.data or default_data
    if not data:
        raise c.error(source.path, "no dataset: give `data: DIR` here or --data DIR (the run's data.dir is empty)")
    where = source.path + ("data",) if source.data else source.path
    try:
        manifest = writer.read_manifest(data)
    except DatasetError as e:
        raise c.error(where, str(e)) from None
    if manifest["frame_size"] != size:
        raise c.error(where, f"dataset {data} has {manifest['frame_size']}x{manifest['frame_size']} frames; "
                      f"the model needs {size}x{size}")
    split = source.split or default_split
    if split not in manifest["splits"]:
        raise c.error(source.path + ("split",) if source.split else source.path,
                      f"dataset {data} has no split '{split}'; it has {sorted(manifest['splits'])}")
    episodes = manifest["splits"][split]["episodes"]
    if source.episode >= len(episodes):
        raise c.error(source.path + ("episode",), f"split '{split}' of {data} has {len(episodes)} episodes "
                      f"(indices 0..{len(episodes) - 1}); episode {source.episode} does not exist")
    entry = episodes[source.episode]
    frames = (source.frames or default_frames) if frames_needed else 1
    if source.t + frames > entry["length"]:
        at = next((source.path + (k,) for k in ("t", "frames") if source.path + (k,) in c.lines), source.path)
        raise c.error(at, f"episode {source.episode} of split '{split}' has {entry['length']} steps; "
                      f"steps {source.t}..{source.t + frames - 1} do not fit")
    try:
        records = writer.read_episode(data, manifest, entry["episode_id"])
    except DatasetError as e:
        raise c.error(where, str(e)) from None
    window = {k: v[source.t : source.t + frames] for k, v in records.items()}
    window["info"] = {"data": str(data), "dataset_hash": manifest.get("content_hash"), "split": split,
                      "episode": source.episode, "episode_id": int(entry["episode_id"]), "t": source.t,
                      "frames": frames}
    window["fps"] = manifest.get("fps")
    return window


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
    return {"workdir": str(workdir.resolve()), "bundle": is_bundle(workdir), "step": int(step),
            "checkpoint": str(directory.resolve()), "sha256": params_sha256(directory)}


def frame_bytes(cfg: Any, scale: int) -> int:
    """Estimated bytes one generated frame of one sample holds until its video is written:
    its token codes, its slot of the temporal key/value cache (none with a temporal
    window), the decoded frame twice (the list of chunks and their concatenation), the
    upscaled frame four times (`repeat`'s intermediate, the result, the watermark's int16
    copy) and its controls. An upper estimate: the sum, as if nothing were freed."""
    from wm_jax.models.tokenizer import num_tokens

    dc, side = cfg.model.dynamics, cfg.model.image_size
    tokens = num_tokens(cfg.model)
    kv_cache = 0 if dc.temporal_window else tokens * dc.embed_dim * 2 * dc.num_layers * 4
    codes = tokens * len(cfg.model.tokenizer.fsq_levels) * 4
    return codes + kv_cache + 2 * side * side * 3 + 4 * (side * scale) ** 2 * 3 + 256


def check_budget(script: Script, *, fps: float, context: int, samples: int, per_frame: int, max_gib: float) -> int:
    """The video's frame count (context + shots) when its estimated memory (`frame_bytes`
    each, per sample) fits in `max_gib` GiB; else a ScriptError at the first shot past it,
    raised before anything of that size is allocated."""
    frames = context
    for shot in script.shots:
        frames += _duration(script, shot, fps)
        need = frames * samples * per_frame
        if need > max_gib * 2**30:
            where = shot.path + (("duration",) if shot.duration is not None else ("timecodes",))
            raise script.checker.error(where, f"the video would reach {frames} frames x {samples} sample(s) here, "
                                       f"about {need / 2**30:,.1f} GiB ({per_frame / 2**10:,.0f} KiB per frame), past "
                                       f"the limit of {max_gib:g} GiB (--max-memory-gib); shorten the shots, lower "
                                       "--scale or --batch, or raise the limit")
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
        raise ConfigError(f"--out {out}: write a video file ({', '.join(VIDEO_SUFFIXES)}); GIF palettes erase the watermark")
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
        raise ConfigError(f"{workdir} is a '{cfg.train.stage}' run; wm generate needs a {world_models} run "
                          f"(train.stage: {world_models})")
    return cfg


def _free_output_paths(out: Path, samples: int) -> list[Path]:
    """`output_paths`; ConfigError when a video or its sidecar is already there."""
    from wm_jax import watermark

    paths = output_paths(out, samples)
    existing = [p for p in paths if p.exists() or watermark.sidecar_path(p).exists()]
    if existing:
        raise ConfigError(f"--out: {existing[0]} (or its sidecar) already exists; choose a new --out or remove it")
    return paths


def _read_reference(script: Script, cfg: Any, start: dict[str, Any],
                    data_dir: str | None) -> tuple[np.ndarray | None, dict | None]:
    """(uint8 [S, S, 3] reference frame for the identity bank, what was read) from the
    script's `reference`, else the start episode's; (None, None) without one or a bank."""
    from wm_jax import telemetry

    reference, info = None, None
    if script.reference is not None:
        ref = read_source(script, script.reference, default_data=data_dir or cfg.data.dir, default_split=cfg.eval.split,
                          default_frames=1, size=cfg.model.image_size, frames_needed=False)
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
    return {"action": action, "action_valid": action_valid, "camera": tile(camera), "camera_valid": tile(camera_valid),
            "cut": tile(cut)}


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
        raise ConfigError(f"the tokenizer run {tok_dir} does not match the dynamics run's "
                          "model.tokenizer/model.image_size")
    return _Models(cfg, dyn_params, step, tok_dir, tok_params, tok_step, tok_cfg.data.frames_per_clip)


def _encode_inputs(models: _Models, context: np.ndarray, reference: np.ndarray | None, samples: int) -> tuple[Any, Any]:
    """(context codes float32 [K, C, N, L] of the uint8 [C, S, S, 3] context frames, the
    identity bank's reference codes [K, N, L] or None), the same for each of K samples."""
    import jax.numpy as jnp

    from wm_jax import telemetry
    from wm_jax.models.tokenizer import VideoTokenizer
    from wm_jax.rollout import encode_frames

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


def _roll_out(models: _Models, context_codes: Any, steps: dict[str, np.ndarray], reference_codes: Any, *, frames: int,
              seed: int, temperature: float) -> np.ndarray:
    """uint8 video [K, C+frames, S, S, 3]: the context codes [K, C, N, L] decoded, then
    `frames` sampled frames under the controls of `steps` (`_control_steps`), decoded."""
    import jax

    from wm_jax.models.dynamics import DynamicsModel, make_controls
    from wm_jax.models.tokenizer import VideoTokenizer
    from wm_jax.rollout import decode_stream, rollout_frames

    cfg, tokenizer = models.cfg, VideoTokenizer(models.cfg.model)
    stream = itertools.chain(
        (context_codes[:, i] for i in range(context_codes.shape[1])),
        rollout_frames(DynamicsModel(cfg.model), models.dyn_params, context_codes, make_controls(steps), frames,
                       reference_codes, None, cached=True, key=jax.random.key(seed), temperature=temperature),
    )
    return np.concatenate(list(decode_stream(tokenizer, models.tok_params, stream, models.chunk)), axis=1)


def _video_info(workdir: Path, script_path: str | Path, script: Script, models: _Models, start: dict[str, Any],
                plan: Plan, reference_info: dict | None, *, seed: int, fps: float, scale: int) -> dict[str, Any]:
    """The sidecar's fields every sample shares: model, config, script, sampling, frames,
    the start and reference read and the shots' boundaries (frame indices of the video)."""
    from wm_jax import config as config_lib

    ctx, size = start["frame"].shape[0], models.cfg.model.image_size
    model = checkpoint_info(workdir, models.step)
    model["tokenizer"] = checkpoint_info(models.tok_dir, models.tok_step)
    boundaries = [{**s, "first_frame": ctx + s["first_frame"], "last_frame": ctx + s["first_frame"] + s["frames"] - 1,
                   "start_s": (ctx + s["first_frame"]) / fps, "end_s": (ctx + s["first_frame"] + s["frames"]) / fps}
                  for s in plan.shots]
    return {
        "generator": "wm generate",
        "model": model,
        "checkpoint_sha256": model["sha256"],
        "config": config_lib.to_dict(models.cfg),
        "script": {"path": str(Path(script_path).resolve()), "sha256": hashlib.sha256(script.text.encode()).hexdigest(),
                   "text": script.text},
        "seed": seed,
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "frames": ctx + int(plan.action.shape[1]),
        "fps": fps,
        "context_frames": ctx,
        "frame_size": [size * scale, size * scale],
        "scale": scale,
        "temperature": script.temperature,
        "start": start["info"],
        "reference": reference_info,
        "shots": boundaries,
        "samples": int(plan.action.shape[0]),
    }


def _write_videos(video: np.ndarray, paths: list[Path], common: dict[str, Any], plan: Plan, *, fps: float,
                  key: int) -> None:
    """Writes sample k of the uint8 video [K, F, H, W, 3] to paths[k], watermarked with
    `key`, and its sidecar: `common` plus the sample's index and its shots' actions."""
    from wm_jax import telemetry, watermark

    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for k, path in enumerate(paths):
        actions = [plan.action[k, s["first_frame"] : s["first_frame"] + s["frames"]].tolist() for s in plan.shots]
        info = {**common, "sample": k, "shots": [{**b, "actions": a} for b, a in zip(common["shots"], actions)]}
        watermark.write_marked_video(video[k], path, info, key=key, fps=fps)
        telemetry.info(f"wrote {path} ({video.shape[1]} frames, {fps:g} fps) + {watermark.sidecar_path(path).name}")


def generate(workdir: str | Path, script_path: str | Path, out: str | Path, *, seed: int = 0,
             data_dir: str | None = None, batch: int = 1, step: int | None = None,
             scale: int | None = None, key: int | None = None,
             max_memory_gib: float = DEFAULT_MAX_MEMORY_GIB) -> list[Path]:
    """Rolls out the script with RUN's dynamics model; writes the watermarked video(s) and
    their sidecars, marked and signed with `key` (default: the public DEFAULT_KEY), and
    returns the video paths (see the module docstring). Refuses an existing output and a
    script whose video would need more than `max_memory_gib` (`check_budget`)."""
    from wm_jax import telemetry, watermark

    workdir, out = Path(workdir), Path(out)
    _check_arguments(out, batch=batch, seed=seed, scale=scale, max_memory_gib=max_memory_gib)
    mark_key = watermark.DEFAULT_KEY if key is None else watermark.check_key(key)
    script = load_script(script_path)
    cfg = _world_model_config(workdir)

    # What the script asks of the data, checked before any model is loaded.
    start = read_source(script, script.start, default_data=data_dir or cfg.data.dir, default_split=cfg.eval.split,
                        default_frames=cfg.eval.context_frames, size=cfg.model.image_size)
    fps = script.fps or start["fps"] or DEFAULT_FPS
    ctx = start["frame"].shape[0]
    scale = scale or default_scale(cfg.model.image_size)
    check_budget(script, fps=fps, context=ctx, samples=batch, per_frame=frame_bytes(cfg, scale), max_gib=max_memory_gib)
    paths = _free_output_paths(out, batch)  # (after the budget: `batch` is bounded now)
    last_pose = start["camera"][-1] if "camera" in start else DEFAULT_POSE
    plan = resolve_shots(script, fps=fps, num_actions=cfg.model.dynamics.num_actions, last_pose=last_pose, seed=seed,
                         samples=batch)
    reference, reference_info = _read_reference(script, cfg, start, data_dir)

    models = _restore_models(workdir, cfg, step)
    context_codes, reference_codes = _encode_inputs(models, start["frame"], reference, batch)
    total = int(plan.action.shape[1])
    telemetry.info(f"generating {batch} x {ctx + total} frames ({ctx} context + {total} in {len(plan.shots)} shots) "
                   f"at {fps:g} fps")
    steps = _control_steps(start, plan, batch)
    video = _roll_out(models, context_codes, steps, reference_codes, frames=total, seed=seed,
                      temperature=script.temperature)  # [K, F, S, S, 3]
    if scale > 1:
        video = video.repeat(scale, axis=2).repeat(scale, axis=3)
    common = _video_info(workdir, script_path, script, models, start, plan, reference_info, seed=seed, fps=fps,
                        scale=scale)
    _write_videos(video, paths, common, plan, fps=fps, key=mark_key)
    return paths
