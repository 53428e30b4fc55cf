"""Video files (mp4, webm, mov, ...) ingested as episodes, with optional per-frame side files.

Each video is decoded as a stream (imageio's ffmpeg plugin: one frame in memory at a
time), every `stride`-th frame kept, centre-cropped to a square and area-resized to S×S.
A video gives one episode, or several of at most `frames` steps each; the train/val/test
split is by video (in the order given; a directory's videos sorted by name), so the
episodes of one video never straddle splits.

A side file `<video>.jsonl` (e.g. `clip.mp4.jsonl`) holds one JSON object per decoded
frame (before the stride), each key optional: `action` (int >= 0), `camera` (7 floats:
x, y, z, qw, qx, qy, qz), `shot_id` (int), `timecode` (seconds). `shot_id` and `timecode`
are in every row or in none. Rows and frames must match in number.

Records carry episode_id, t, frame, action + action_valid, camera + camera_valid,
shot_id, cut, timecode. Without a side file (or where a row lacks the key) action and
camera are unknown: 0 / zeros with `*_valid` False, which the dynamics model masks.
Without side-file shot ids, cuts are detected (`CutDetector` on 16×16 grey thumbnails);
shot_id counts shots from the start of the video. Without side-file timecodes, timecode
is the frame's time in the video; either way it counts from the episode's first frame.
The whole video is decoded however large `stride` is (ffmpeg's pipe has no seek).
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from data_pipelines import schema, writer
from data_pipelines.schema import DatasetError
from data_pipelines.sources.atari import resize_area

SOURCE_NAME = "video"
INPUT_UNIT = "videos"  # what make_dataset splits across train/val/test
GENERATOR_VERSION = "1.0"
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov")
SIDE_SUFFIX = ".jsonl"
SIDE_KEYS = ("action", "camera", "shot_id", "timecode")
DEFAULT_PARAMS = {"videos": (), "stride": 1, "cut_ratio": 3.0}
FIELDS = ("episode_id", "t", "frame", "action", "camera", "shot_id", "cut", "timecode")
LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601 grey
THUMB = 16  # side of the grey thumbnails cut detection compares: blind to detail and noise
CUT_WINDOW = 16  # recent scores whose median is the running level
CUT_FLOOR = 3.0  # grey levels: the level never counts as lower, so a still shot's noise is no cut
DECODE_ERRORS = (OSError, RuntimeError, ValueError)  # what imageio's ffmpeg plugin raises


def _ffmpeg_error(e: Exception) -> str:
    """The first and last lines of an imageio/ffmpeg error (its middle is ffmpeg's banner)."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
    return lines[0] if len(lines) == 1 else f"{lines[0]} … {lines[-1]}"


def _imageio():
    """imageio.v3, with its ffmpeg binary; DatasetError saying how to install it when missing."""
    try:
        import imageio.v3 as iio
        import imageio_ffmpeg  # noqa: F401  (the FFMPEG plugin's binary)
    except ImportError as e:
        raise DatasetError("the video source needs imageio-ffmpeg: pip install -e '.[video]'") from e
    return iio


def video_fps(path: Path) -> float:
    """Frames per second the container declares; DatasetError naming the file if it cannot
    be opened or declares none."""
    try:
        with _imageio().imopen(path, "r", plugin="FFMPEG") as reader:
            fps = reader.metadata().get("fps")
    except DECODE_ERRORS as e:
        raise DatasetError(f"cannot decode video {path}: {_ffmpeg_error(e)}") from e
    if not fps or not math.isfinite(fps):
        raise DatasetError(f"video {path} declares no frame rate")
    return float(fps)


def video_frames(path: Path) -> Iterator[np.ndarray]:
    """The decoded frames of `path`, uint8 [H, W, 3], streamed; DatasetError naming the
    file if it cannot be decoded or holds no frame."""
    count = 0
    try:
        with _imageio().imopen(path, "r", plugin="FFMPEG") as reader:
            for frame in reader.iter():
                count += 1
                yield frame[..., :3]
    except DECODE_ERRORS as e:
        raise DatasetError(f"cannot decode video {path} (after {count} frames): {_ffmpeg_error(e)}") from e
    if not count:
        raise DatasetError(f"video {path} holds no decodable frame")


def square_resize(frame: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] → uint8 [size, size, 3]: centre crop to min(H, W) square, then area resize."""
    h, w = frame.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return resize_area(frame[top : top + side, left : left + side], size)


def thumbnail(frame: np.ndarray) -> np.ndarray:
    """uint8 [S, S, 3] → float32 [min(S, THUMB)]² grey levels in [0, 255]."""
    return resize_area(frame, min(frame.shape[0], THUMB)).astype(np.float32) @ LUMA


def cut_score(previous: np.ndarray, current: np.ndarray) -> float:
    """Mean absolute grey-level difference of two thumbnails (0 .. 255)."""
    return float(np.mean(np.abs(current - previous)))


class CutDetector:
    """Online shot-cut test: frame t starts a new shot when its score s (`cut_score` of
    frames t-1, t) exceeds `ratio` × the running level, the median of the last `window`
    scores and s itself (at least `floor`). The median follows camera and subject motion
    yet ignores the odd large score (a cut, a flash); counting s in it means the first two
    scores of a stream, with nothing to compare to, are never cuts. Causal: it runs on a
    stream."""

    def __init__(self, ratio: float, window: int = CUT_WINDOW, floor: float = CUT_FLOOR):
        self.ratio, self.floor = ratio, floor
        self.recent: deque[float] = deque(maxlen=window)

    def __call__(self, score: float) -> bool:
        self.recent.append(score)
        return score > self.ratio * max(statistics.median(self.recent), self.floor)


def side_path(video: Path) -> Path:
    """Where a video's side file is: `<video>.jsonl`."""
    return video.with_name(video.name + SIDE_SUFFIX)


def _check_row(row: object, where: str) -> dict:
    """A side-file row, validated: {key: value} for the SIDE_KEYS it has (null: absent)."""
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
    unknown = sorted(set(row) - set(SIDE_KEYS))
    if unknown:
        raise DatasetError(f"{where}: unknown key(s) {unknown}; a row may have {list(SIDE_KEYS)}")
    row = {k: v for k, v in row.items() if v is not None}
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    is_num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if "action" in row and not (is_int(row["action"]) and row["action"] >= 0):
        raise DatasetError(f"{where}: 'action' must be an int >= 0, got {row['action']!r}")
    if "camera" in row and not (
        isinstance(row["camera"], list) and len(row["camera"]) == 7 and all(map(is_num, row["camera"]))
    ):
        raise DatasetError(f"{where}: 'camera' must be 7 numbers (x, y, z, qw, qx, qy, qz), got {row['camera']!r}")
    if "shot_id" in row and not is_int(row["shot_id"]):
        raise DatasetError(f"{where}: 'shot_id' must be an int, got {row['shot_id']!r}")
    if "timecode" in row and not is_num(row["timecode"]):
        raise DatasetError(f"{where}: 'timecode' must be a number (seconds), got {row['timecode']!r}")
    return row


def read_side_file(path: Path) -> list[dict]:
    """The validated rows of a side file (blank lines ignored); DatasetError naming the
    file and line of the first bad row."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{line_no}: not JSON: {e}") from e
            rows.append(_check_row(obj, f"{path}:{line_no}"))
    for key in ("shot_id", "timecode"):
        have = [key in row for row in rows]
        if any(have) and not all(have):
            raise DatasetError(
                f"side file {path}: '{key}' must be in every row or in none (row {have.index(False) + 1} lacks it)"
            )
    return rows


def find_videos(videos: Iterable[str | Path]) -> list[Path]:
    """Video files from paths and directories (a directory's VIDEO_SUFFIXES files, sorted
    by name); DatasetError for a missing path or no video at all."""
    found = []
    for item in map(Path, videos):
        if item.is_dir():
            found += sorted(p for p in item.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
        elif item.is_file():
            found.append(item)
        else:
            raise DatasetError(f"video {item} does not exist")
    if not found:
        raise DatasetError(f"no video files (suffixes {list(VIDEO_SUFFIXES)}) in {[str(v) for v in videos]}")
    return found


def check_params(videos: Iterable[str | Path], stride: int, cut_ratio: float) -> list[Path]:
    """Validates the source parameters; returns the video files."""
    if int(stride) != stride or stride < 1:
        raise DatasetError(f"stride must be an integer >= 1, got {stride}")
    if not cut_ratio > 1.0:
        raise DatasetError(f"cut_ratio must be > 1, got {cut_ratio}")
    return find_videos(videos)


def inputs(*, videos, stride: int, cut_ratio: float) -> list[Path]:
    """The video files, one per input the dataset splits across train/val/test."""
    return check_params(videos, stride, cut_ratio)


def describe(*, videos, stride: int, cut_ratio: float) -> dict:
    """Validates the parameters and side files (before any video is decoded); returns what
    the manifest's source params add: per video its path, size, sha256, frame rate and side
    file (path, sha256, rows, or None), and `num_actions` (1 + the largest side-file
    action; 0 without any: what `model.dynamics.num_actions` must cover)."""
    entries, num_actions = [], 0
    for path in check_params(videos, stride, cut_ratio):
        side = side_path(path)
        rows = read_side_file(side) if side.is_file() else None
        if rows:
            num_actions = max(num_actions, 1 + max((row.get("action", -1) for row in rows)))
        entries.append(
            {
                "path": str(path),
                "bytes": path.stat().st_size,
                "sha256": writer.sha256_file(path),
                "fps": video_fps(path),
                "side_file": None
                if rows is None
                else {"path": str(side), "sha256": writer.sha256_file(side), "rows": len(rows)},
            }
        )
    return {"videos": entries, "num_actions": num_actions}


def fps(*, videos, stride: int, **_) -> float:
    """Recorded steps per second: the first video's frame rate / stride (each video's own
    rate is in the manifest's source params)."""
    return video_fps(find_videos(videos)[0]) / stride


def record_spec(size: int, **_) -> schema.Spec:
    """The fields this source records: schema v1's `FIELDS` plus action_valid/camera_valid."""
    full = schema.field_spec(size, 0)
    return {**{name: full[name] for name in FIELDS}, "action_valid": ("bool", ()), "camera_valid": ("bool", ())}


def video_steps(path: Path, size: int, stride: int, cut_ratio: float) -> Iterator[dict[str, np.ndarray]]:
    """Per kept frame (every `stride`-th): the record fields but episode_id and t, with
    `timecode` in seconds from the video's start and `cut` true where a shot starts.
    DatasetError naming the side file if its rows and the video's frames differ in number."""
    side = side_path(path)
    rows = read_side_file(side) if side.is_file() else None
    rate = video_fps(path)
    detector, previous, shot_id, count = CutDetector(cut_ratio), None, -1, 0
    for i, frame in enumerate(video_frames(path)):
        count = i + 1
        if i % stride or (rows is not None and i >= len(rows)):
            continue  # past the side file's rows: decode on, to report the frame count
        row = rows[i] if rows is not None else {}
        image = square_resize(frame, size)
        thumb = thumbnail(image)
        if "shot_id" in row:
            cut = row["shot_id"] != shot_id
            shot_id = row["shot_id"]
        else:
            cut = previous is None or detector(cut_score(previous, thumb))
            shot_id += cut
        previous = thumb
        yield {
            "frame": image,
            "action": np.asarray(row.get("action", 0), np.int32),
            "action_valid": np.asarray("action" in row),
            "camera": np.asarray(row.get("camera", [0.0] * 7), np.float32),
            "camera_valid": np.asarray("camera" in row),
            "shot_id": np.asarray(shot_id, np.int32),
            "cut": np.asarray(cut),
            "timecode": np.asarray(row.get("timecode", i / rate), np.float64),
        }
    if rows is not None and count != len(rows):
        raise DatasetError(f"side file {side} has {len(rows)} rows but video {path} has {count} frames")


def _chunks(steps: Iterator[dict], length: int | None) -> Iterator[list[dict]]:
    """Consecutive lists of at most `length` steps (None or 0: one list of all)."""
    while chunk := list(itertools.islice(steps, length or None)):
        yield chunk


def input_episodes(
    video: Path, episode_ids: Iterator[int], num_frames: int | None, size: int, *, stride: int, cut_ratio: float, **_
) -> Iterator[list[dict[str, np.ndarray]]]:
    """The episodes of one video: records of at most `num_frames` steps (None: the whole
    video), each episode numbered with next(episode_ids). An episode's first step is a cut
    and its timecodes count from it."""
    for chunk in _chunks(video_steps(video, size, stride, cut_ratio), num_frames):
        episode_id, start = next(episode_ids), float(chunk[0]["timecode"])
        yield [
            {
                **step,
                "episode_id": np.asarray(episode_id, np.int64),
                "t": np.asarray(t, np.int32),
                "cut": np.asarray(bool(step["cut"]) or t == 0),
                "timecode": np.asarray(step["timecode"] - start, np.float32),
            }
            for t, step in enumerate(chunk)
        ]
