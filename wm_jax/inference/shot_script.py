"""The shot-list language of `wm generate` and `wm serve`'s `/v1/generate`: a YAML script
parsed into typed shots (`parse_script`, `load_script`), each error naming the script's
line (`yaml.compose` keeps each node's position); its shots resolved into one control plan
(`resolve_shots`: per frame an action, a camera pose integrated from the moves, the cuts);
its start and reference frames read from a dataset or images (`read_source`).
The language itself is described in `wm_jax.inference.generate`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from wm_jax.config import ConfigError

DEFAULT_POSE = (0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0)  # camera at the origin, identity rotation
POSE_DIM = 7  # x, y, z, qw, qx, qy, qz
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
                raise ScriptError(
                    f"line {key.start_mark.line + 1}: {_dotted(sub)}: duplicate key '{key.value}' "
                    f"(first given on line {out[sub]})"
                )
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
            raise c.error(
                path + (image_key,), f"must be {'a file name' if image_key == 'image' else 'a list of file names'}"
            )
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
        path,
        data=data,
        split=split,
        episode=c.integer(value.get("episode", 0), path + ("episode",), 0, "an episode index"),
        t=c.integer(value.get("t", 0), path + ("t",), 0, "a step index"),
        frames=None
        if value.get("frames") is None
        else c.integer(value["frames"], path + ("frames",), 1, "a frame count"),
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


def _camera_start(
    c: Checker, camera: dict, cp: Where, i: int, cut: bool
) -> tuple[tuple[float, ...] | None, int | None, tuple[float, ...]]:
    """(absolute start pose, earlier shot whose first pose it starts from, offset) of a cut
    shot i's first frame, from `start`: (None, None, ()) when not given."""
    if "start" not in camera:
        return None, None, ()
    sp = cp + ("start",)
    if not cut:
        raise c.error(
            sp, "a camera start needs `cut: true` (without a cut the camera continues from the previous frame)"
        )
    s = camera["start"]
    if not isinstance(s, dict):
        return (
            c.vector(s, sp, (2, 3, POSE_DIM), "start [x, y], [x, y, z] or a pose [x, y, z, qw, qx, qy, qz]"),
            None,
            (),
        )
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


def _shot_actions(
    c: Checker, value: dict, path: Where, duration: int | None
) -> tuple[tuple[int, ...] | None, int | None, int | None]:
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
    return Shot(
        number=i + 1,
        path=path,
        name=name,
        duration=duration,
        timecodes=timecodes,
        cut=cut,
        move=move,
        start=start,
        start_shot=start_shot,
        start_offset=start_offset,
        poses=poses,
        actions=ids,
        repeat=repeat,
        seed=seed,
    )


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
    return Script(
        text=text,
        name=name,
        directory=Path(directory),
        checker=c,
        fps=fps,
        temperature=temperature,
        start=start,
        reference=reference,
        default_reference=default_reference,
        shots=tuple(_shot(c, s, i) for i, s in enumerate(shots)),
    )


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


def shot_duration(script: Script, shot: Shot, fps: float) -> int:
    if shot.duration is not None:
        return shot.duration
    start_s, end_s = shot.timecodes
    frames = round(end_s * fps) - round(start_s * fps)
    if frames < 1:
        raise script.checker.error(shot.path + ("timecodes",), f"{start_s}-{end_s} s is under one frame at {fps:g} fps")
    return frames


def shot_poses(script: Script, shot: Shot, d: int, prev: np.ndarray, first_pose: dict[int, np.ndarray]) -> np.ndarray:
    """float64 [d, POSE_DIM]: the camera pose of each of `shot`'s `d` frames: its listed
    poses, or its move integrated from `prev` (the pose before it; at a cut, from its start:
    another shot's first pose in `first_pose`, absolute values, an offset)."""
    if shot.poses is not None:
        if len(shot.poses) != d:
            raise script.checker.error(
                shot.path + ("camera", "poses"), f"has {len(shot.poses)} poses for a shot of {d} frames (one per frame)"
            )
        return np.asarray(shot.poses, np.float64)
    move = np.zeros(POSE_DIM)
    move[:3] = shot.move
    if not shot.cut:
        return prev + np.arange(1, d + 1)[:, None] * move
    # A cut: the shot's first frame is its start; the move follows.
    base = (first_pose[shot.start_shot] if shot.start_shot is not None else prev).copy()
    if shot.start is not None:
        base[: len(shot.start)] = shot.start
    base[: len(shot.start_offset)] += shot.start_offset
    return base + np.arange(d)[:, None] * move


def shot_actions(script: Script, shot: Shot, d: int, num_actions: int, seed: int, samples: int) -> np.ndarray:
    """int32 [samples, d]: `shot`'s listed or repeated action ids (checked against
    `num_actions`), or a random policy's draws from (seed, sample), its seed defaulting to
    (`seed`, shot number)."""
    c, ap = script.checker, shot.path + ("actions",)
    invalid = lambda a: (
        f"action id {a} is not valid: the model has num_actions={num_actions} (ids 0..{num_actions - 1})"
    )
    if shot.actions is not None:
        if len(shot.actions) != d:
            raise c.error(ap, f"has {len(shot.actions)} actions for a shot of {d} frames (one per frame)")
        bad = [j for j, a in enumerate(shot.actions) if a >= num_actions]
        if bad:
            raise c.error(ap + (bad[0],), invalid(shot.actions[bad[0]]))
        return np.broadcast_to(np.asarray(shot.actions, np.int32), (samples, d))
    if shot.repeat is not None:
        if shot.repeat >= num_actions:
            raise c.error(ap + ("repeat",), invalid(shot.repeat))
        return np.full((samples, d), shot.repeat, np.int32)
    base_seed = [shot.seed] if shot.seed is not None else [seed, shot.number]
    return np.stack([np.random.default_rng(base_seed + [k]).integers(0, num_actions, d) for k in range(samples)])


def resolve_shots(
    script: Script, *, fps: float, num_actions: int, last_pose: Any = DEFAULT_POSE, seed: int = 0, samples: int = 1
) -> Plan:
    """Durations (timecodes at `fps`), camera poses integrated from the moves starting after
    `last_pose` (the last context frame's), action ids checked against `num_actions` and
    drawn for each of `samples` samples (`shot_actions`), cut flags."""
    prev = np.asarray(last_pose, np.float64)
    actions, poses, cuts, shots = [], [], [], []
    first_pose: dict[int, np.ndarray] = {}
    frame = 0
    for shot in script.shots:
        d = shot_duration(script, shot, fps)
        poses.append(shot_poses(script, shot, d, prev, first_pose))
        first_pose[shot.number], prev = poses[-1][0], poses[-1][-1]
        actions.append(shot_actions(script, shot, d, num_actions, seed, samples).astype(np.int32))
        cut = np.zeros(d, bool)
        cut[0] = shot.cut
        cuts.append(cut)
        shots.append(
            {
                "shot": shot.number,
                "name": shot.name,
                "first_frame": frame,
                "frames": d,
                "cut": shot.cut,
                "line": script.checker.line(shot.path),
                "camera_start": [float(v) for v in poses[-1][0]],
                "camera_end": [float(v) for v in poses[-1][-1]],
            }
        )
        frame += d
    return Plan(
        action=np.concatenate(actions, axis=1),
        poses=np.concatenate(poses).astype(np.float32),
        cut=np.concatenate(cuts),
        shots=shots,
    )


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


def read_source(
    script: Script,
    source: Source,
    *,
    default_data: str | None,
    default_split: str,
    default_frames: int,
    size: int,
    frames_needed: bool = True,
) -> dict[str, Any]:
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
        raise c.error(
            where,
            f"dataset {data} has {manifest['frame_size']}x{manifest['frame_size']} frames; "
            f"the model needs {size}x{size}",
        )
    split = source.split or default_split
    if split not in manifest["splits"]:
        raise c.error(
            source.path + ("split",) if source.split else source.path,
            f"dataset {data} has no split '{split}'; it has {sorted(manifest['splits'])}",
        )
    episodes = manifest["splits"][split]["episodes"]
    if source.episode >= len(episodes):
        raise c.error(
            source.path + ("episode",),
            f"split '{split}' of {data} has {len(episodes)} episodes "
            f"(indices 0..{len(episodes) - 1}); episode {source.episode} does not exist",
        )
    entry = episodes[source.episode]
    frames = (source.frames or default_frames) if frames_needed else 1
    if source.t + frames > entry["length"]:
        at = next((source.path + (k,) for k in ("t", "frames") if source.path + (k,) in c.lines), source.path)
        raise c.error(
            at,
            f"episode {source.episode} of split '{split}' has {entry['length']} steps; "
            f"steps {source.t}..{source.t + frames - 1} do not fit",
        )
    try:
        records = writer.read_episode(data, manifest, entry["episode_id"])
    except DatasetError as e:
        raise c.error(where, str(e)) from None
    window = {k: v[source.t : source.t + frames] for k, v in records.items()}
    window["info"] = {
        "data": str(data),
        "dataset_hash": manifest.get("content_hash"),
        "split": split,
        "episode": source.episode,
        "episode_id": int(entry["episode_id"]),
        "t": source.t,
        "frames": frames,
    }
    window["fps"] = manifest.get("fps")
    return window
