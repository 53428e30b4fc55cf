"""Invisible, keyed watermark for generated video + a provenance sidecar next to each file.

Scheme (spread spectrum in square cells of the luminance):

* **Pattern.** A key selects a pseudo-random sign s[i, j] in {-1, +1} for every cell of the
  frame: 4x4 pixels, or 2x2 when a side is under 64 px (`cell_size`). Bits come from
  BLAKE2b in counter mode, so the pattern is the same on every machine and NumPy version.
  The same pattern marks every frame of a clip.
* **Embed.** Each cell gets `strength` grey levels added (s=+1) or removed (s=-1) on all of
  R, G and B alike: the luminance moves by +-strength, the chroma not at all (yuv420p video
  subsamples chroma 2x, so it would waste the budget). No pixel changes by more than
  `strength`, so PSNR >= 20*log10(255/strength): 38.6 dB at the default 3. Cells, not
  single pixels, because H.264 at imageio-ffmpeg's default quality (crf 25) erases fine
  noise; a 4x4 cell is one H.264 transform block, where the mark is a DC offset it keeps.
* **Detect (blind).** Per frame, the luminance is averaged per cell, and each cell is
  predicted from its neighbours along the direction where they agree most (vertical or
  horizontal pair, as in edge-directed interpolation). Procedural and world-model video is
  mostly flat regions and edges, so the residual of a marked frame is mostly the pattern.
  Each cell votes sign(residual) per frame; votes are summed over frames (the pattern is
  static, the content moves), centred, and correlated with the key's signs:

      score = <V - mean(V), s> / ||V - mean(V)||

* **Threshold and false positives.** For a video not marked with this key, V depends on the
  content only and the key's signs are independent fair coins, so `score` is a Rademacher
  sum with weights of unit norm, and Hoeffding's inequality bounds its tail whatever the
  content: P(score >= t) <= exp(-t^2 / 2). THRESHOLD = 5 puts that at 3.7e-6 per clip and
  key. (The bound is over keys; for one fixed key, content that shares structure from clip
  to clip shifts the null mean slightly: -0.4 to +0.4 over procedural clips, standard
  deviation 0.7-1.0, largest score of any 200-clip run 2.9, far under 5.)
* **Measured** (`wm bench watermark`, 200 procedural clips of 16 frames unless noted; mp4 =
  imageio defaults, libx264 crf 25): 64x64 scores ~12 marked, ~11 after mp4 at 10 fps and
  ~9 at 30 fps, all 200 detected; 128x128 (50 clips) and 256x256 (20 clips) score ~27 and
  ~55, unchanged by mp4 at 30 fps.
  32x32 (2x2 cells) scores ~13 marked but only ~7 after mp4 with 32 frames (98.5%
  detected) and ~5.6 with 16 frames (73%): at that size crf 25 keeps too little detail,
  and less still at higher frame rates, where x264 spends fewer bits per frame.

The watermark is a presence bit, not a payload, and is not meant to resist deliberate
removal (blur, crop, resize or stronger compression weaken it); the sidecar's sha256 is
what proves a file unchanged, and its HMAC signature (`wm_jax.signature`, keyed by the
watermark key) what proves the sidecar's provenance unedited. DEFAULT_KEY is the
project's public key: it makes outputs recognisable as wm_jax's, and is not a secret. Use
your own key (any 64-bit int) to mark and sign outputs only you can recognise; sidecars
record only its `key_id` fingerprint.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import operator
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines.writer import sha256_file as file_sha256  # one file-hash helper for datasets and videos
from wm_jax import signature

SCHEME = "wm_jax-ss-cells-v1"
DEFAULT_KEY = 0x776D5F6A61785F31  # b"wm_jax_1" as an int; public, documented, not a secret
STRENGTH = 3  # grey levels per pixel: PSNR >= 38.59 dB
MAX_STRENGTH = 16
# Pixels per side of one pattern cell: 4 (one H.264 4x4 transform block, which keeps the mark
# as a DC offset) where the frame has room for enough cells, else 2; see `cell_size`.
CELL = 4
SMALL_CELL = 2
SMALL_FRAME = 64  # frames with a side below this use SMALL_CELL
THRESHOLD = 5.0  # false-positive probability <= exp(-THRESHOLD**2 / 2) = 3.7e-6 per clip
MIN_SIZE = 16  # pixels; smaller frames have under 64 cells, too few for a reliable score
LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # BT.601, as in yuv420p video
MANIFEST_FORMAT = "wm_jax.video_manifest"
MANIFEST_VERSION = 2  # 2: signed (`signature`)
_PATTERN_DOMAIN = b"wm_jax.watermark.pattern.v1"
_KEY_ID_DOMAIN = b"wm_jax.watermark.key_id.v1"
_READ_CHUNK = 64  # frames decoded at a time by `verify`


# ---------------------------------------------------------------------------- checks


def check_key(key: Any) -> int:
    """The key as a Python int in [0, 2**64); ValueError/TypeError otherwise."""
    if isinstance(key, bool):
        raise TypeError("watermark key must be an integer, got a bool")
    try:
        key = operator.index(key)
    except TypeError:
        raise TypeError(f"watermark key must be an integer, got {type(key).__name__}") from None
    if not 0 <= key < 2**64:
        raise ValueError(f"watermark key must be in [0, 2**64), got {key}")
    return key


def check_frames(frames: Any) -> np.ndarray:
    """`frames` as uint8 [T, H, W, 3] with T >= 1 and H, W >= MIN_SIZE; ValueError otherwise."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got dtype {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3] (RGB), got shape {frames.shape}")
    t, h, w, _ = frames.shape
    if t < 1:
        raise ValueError("frames must hold at least one frame, got T=0")
    if h < MIN_SIZE or w < MIN_SIZE:
        raise ValueError(f"frames must be at least {MIN_SIZE}x{MIN_SIZE} pixels, got {h}x{w}")
    return frames


def _check_strength(strength: Any) -> int:
    if isinstance(strength, bool) or not isinstance(strength, (int, np.integer)):
        raise TypeError(f"strength must be an integer number of grey levels, got {strength!r}")
    if not 1 <= strength <= MAX_STRENGTH:
        raise ValueError(f"strength must be in [1, {MAX_STRENGTH}] grey levels, got {strength}")
    return int(strength)


# ---------------------------------------------------------------------------- pattern


def key_id(key: int) -> str:
    """A 16-hex-digit fingerprint of `key` for sidecars (names the key without storing it)."""
    digest = hashlib.blake2b(_KEY_ID_DOMAIN + check_key(key).to_bytes(8, "little"), digest_size=8)
    return digest.hexdigest()


def pattern(key: int, cells_h: int, cells_w: int) -> np.ndarray:
    """The key's signs, float32 [cells_h, cells_w] of -1/+1.

    Bits are BLAKE2b(domain | key | cells_h | cells_w | counter) in counter mode: portable
    and fixed forever, unlike NumPy's Generator streams. Each frame size has its own pattern.
    """
    key = check_key(key)
    n = cells_h * cells_w
    header = _PATTERN_DOMAIN + key.to_bytes(8, "little") + cells_h.to_bytes(4, "little") + cells_w.to_bytes(4, "little")
    blocks = [hashlib.blake2b(header + i.to_bytes(8, "little"), digest_size=64).digest() for i in range(-(-n // 512))]
    bits = np.unpackbits(np.frombuffer(b"".join(blocks), np.uint8))[:n]
    return (2.0 * bits - 1.0).astype(np.float32).reshape(cells_h, cells_w)


def cell_size(h: int, w: int) -> int:
    """Side in pixels of the pattern's cells for H x W frames: CELL, or SMALL_CELL below 64.

    4x4 cells survive H.264 far better (at 64x64, 30 fps, crf 25: score ~9 vs ~6 for 2x2),
    but a 32x32 frame has only 64 of them, too few to pass the threshold even unencoded.
    """
    return SMALL_CELL if min(h, w) < SMALL_FRAME else CELL


def _cells_shape(h: int, w: int) -> tuple[int, int]:
    # Rows/columns past the last whole cell are left unmarked and ignored by the detector.
    c = cell_size(h, w)
    return h // c, w // c


# ---------------------------------------------------------------------------- embed


def embed(frames: Any, key: int = DEFAULT_KEY, strength: int = STRENGTH) -> np.ndarray:
    """Marks a clip: uint8 [T, H, W, 3] -> uint8 [T, H, W, 3] (a new array).

    Adds +-`strength` grey levels to R, G and B of each cell (`cell_size`), with the key's sign;
    values are clipped to [0, 255], so no pixel moves by more than `strength`.
    """
    frames = check_frames(frames)
    strength = _check_strength(strength)
    _, h, w, _ = frames.shape
    c, (ch, cw) = cell_size(h, w), _cells_shape(h, w)
    delta = np.zeros((h, w), np.int16)
    cell_delta = (strength * pattern(key, ch, cw)).astype(np.int16)
    delta[: ch * c, : cw * c] = np.repeat(np.repeat(cell_delta, c, axis=0), c, axis=1)
    marked = frames.astype(np.int16) + delta[None, :, :, None]
    return np.clip(marked, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------- detect


def cell_luma(frames: np.ndarray) -> np.ndarray:
    """Mean luminance per cell: uint8 [T, H, W, 3] -> float32 [T, H//c, W//c], c = cell_size(H, W)."""
    t, h, w, _ = frames.shape
    c, (ch, cw) = cell_size(h, w), _cells_shape(h, w)
    y = frames[:, : ch * c, : cw * c].astype(np.float32) @ LUMA
    return y.reshape(t, ch, c, cw, c).mean(axis=(2, 4))


def cell_residual(m: np.ndarray) -> np.ndarray:
    """Each cell minus its edge-directed prediction: float32 [T, h, w] -> [T, h, w].

    The prediction is the mean of the vertical or the horizontal neighbour pair, whichever
    pair agrees more (both pairs' mean on a tie), so flat areas and straight edges predict
    well and the residual is mostly the watermark. Borders use mirrored neighbours.
    """
    pad = np.pad(m, ((0, 0), (1, 1), (1, 1)), mode="reflect")
    up, down = pad[:, :-2, 1:-1], pad[:, 2:, 1:-1]
    left, right = pad[:, 1:-1, :-2], pad[:, 1:-1, 2:]
    dv, dh = np.abs(up - down), np.abs(left - right)
    vert, horiz = (up + down) / 2, (left + right) / 2
    pred = np.where(dv < dh, vert, np.where(dh < dv, horiz, (vert + horiz) / 2))
    return m - pred


def cell_votes(frames: Any) -> np.ndarray:
    """Per-cell votes of a clip, summed over frames: uint8 [T, H, W, 3] -> int32 [H//c, W//c].

    Each frame gives each cell a vote sign(residual) in {-1, 0, +1}. Signs, not residuals,
    so that a few strong host edges cannot outweigh many weak watermark cells. Votes do not
    depend on the key: one pass serves any number of keys, and votes of chunks of a long
    video add up.
    """
    frames = check_frames(frames)
    return np.sign(cell_residual(cell_luma(frames))).sum(axis=0).astype(np.int32)


def score_votes(votes: np.ndarray, key: int) -> float:
    """Normalised correlation of centred votes int [h, w] with the key's pattern [h, w].

    Under "not marked with this key" it is at most sub-Gaussian with unit variance
    (Hoeffding): P(score >= t) <= exp(-t**2 / 2). 0.0 when the votes are constant.
    """
    votes = np.asarray(votes, np.float64)
    if votes.ndim != 2:
        raise ValueError(f"votes must be a 2-D cell map, got shape {votes.shape}")
    # Centring removes any bias shared by all cells, which would otherwise correlate with
    # the key's fixed imbalance of + and - signs; still content-only, so the bound holds.
    centred = votes - votes.mean()
    norm = float(np.linalg.norm(centred))
    if norm == 0.0:
        return 0.0
    return float(np.sum(centred * pattern(key, *votes.shape)) / norm)


def false_positive_bound(score: float) -> float:
    """Hoeffding bound on P(score >= `score`) for a clip not marked with the key."""
    return 1.0 if score <= 0 else math.exp(-score * score / 2)


def detect(frames: Any, key: int = DEFAULT_KEY, threshold: float = THRESHOLD) -> tuple[float, bool]:
    """(score, detected) for a clip uint8 [T, H, W, 3]: detected = score >= threshold."""
    score = score_votes(cell_votes(frames), key)
    return score, score >= threshold


# ---------------------------------------------------------------------------- sidecar


def sidecar_path(video_path: str | Path) -> Path:
    """`VIDEO.json` beside `VIDEO` (e.g. out.mp4 -> out.mp4.json: a .gif and an .mp4 of one
    clip keep separate sidecars)."""
    video_path = Path(video_path)
    return video_path.with_name(video_path.name + ".json")


def write_manifest(
    video_path: str | Path, info: dict[str, Any], key: int = DEFAULT_KEY, strength: int = STRENGTH
) -> Path:
    """Writes the sidecar of a finished video file and returns its path.

    The sidecar holds the video's sha256 and size, the watermark's scheme and key id (never
    the key), a UTC time, `info` under "provenance" (whatever the caller knows: checkpoint
    hash and step, config, script, seed...) and a signature of all that under `key`
    (`signature.sign`). `info` must be JSON-serialisable. The write is atomic (temp file,
    then rename), so a reader never sees half a sidecar.
    """
    video_path = Path(video_path)
    if not video_path.is_file():
        raise FileNotFoundError(f"no video file at {video_path}")
    if not isinstance(info, dict):
        raise TypeError(f"info must be a dict, got {type(info).__name__}")
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "video": video_path.name,
        "sha256": file_sha256(video_path),
        "bytes": video_path.stat().st_size,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "watermark": {
            "scheme": SCHEME,
            "key_id": key_id(key),
            "strength": _check_strength(strength),
            "threshold": THRESHOLD,
        },
        "provenance": info,
    }
    try:
        json.dumps(manifest, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"info for {video_path.name} is not JSON-serialisable: {e}") from None
    manifest["signature"] = signature.sign(manifest, check_key(key))
    text = json.dumps(manifest, indent=2)
    out = sidecar_path(video_path)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def write_marked_video(
    frames: Any,
    video_path: str | Path,
    info: dict[str, Any],
    *,
    key: int = DEFAULT_KEY,
    strength: int = STRENGTH,
    fps: float = 10,
) -> Path:
    """Marks uint8 [T, H, W, 3] frames, writes them with imageio (format from the suffix;
    .mp4/.mov/.mkv/.avi need imageio-ffmpeg) and writes the sidecar; returns its path."""
    import imageio.v2 as imageio

    marked = embed(frames, key, strength)
    video_path = Path(video_path)
    suffix = video_path.suffix.lower()
    if suffix == ".gif":
        # A GIF's 256-colour palette destroys the mark; say so rather than write a dud.
        raise ValueError(f"{video_path}: GIF palettes erase the watermark; write .mp4 instead")
    kwargs: dict[str, Any] = {"fps": fps}
    if suffix in (".mp4", ".mov", ".mkv", ".avi"):
        _, h, w, _ = marked.shape
        if h % 2 or w % 2:
            raise ValueError(f"{video_path}: H.264 (yuv420p) needs even frame sides, got {h}x{w}")
        # imageio would otherwise resize to a multiple of 16, which misaligns the pattern.
        kwargs["macro_block_size"] = 1
    imageio.mimsave(video_path, list(marked), **kwargs)
    return write_manifest(video_path, info, key, strength)


def read_votes(video_path: str | Path) -> tuple[np.ndarray, int]:
    """Cell votes int32 [H//c, W//c] of every frame of a video file, and its frame count.

    Decodes in chunks of 64 frames, so long videos need not fit in memory.
    """
    import imageio.v2 as imageio

    votes, count, chunk = None, 0, []

    def flush() -> None:
        nonlocal votes
        frames = np.stack(chunk)[..., :3]  # drop alpha, if the reader gives RGBA
        v = cell_votes(np.ascontiguousarray(frames))
        if votes is not None and v.shape != votes.shape:
            raise ValueError(f"{video_path}: frame size changes within the video")
        votes = v if votes is None else votes + v
        chunk.clear()

    reader = imageio.get_reader(str(video_path))
    try:
        for frame in reader:
            frame = np.asarray(frame)
            if frame.ndim == 2:  # greyscale
                frame = np.repeat(frame[..., None], 3, axis=-1)
            chunk.append(frame.astype(np.uint8, copy=False))
            count += 1
            if len(chunk) == _READ_CHUNK:
                flush()
        if chunk:
            flush()
    finally:
        reader.close()
    if votes is None:
        raise ValueError(f"{video_path}: no frames could be decoded")
    return votes, count


def _check_sidecar(video_path: Path, key: int, problems: list[str]) -> dict | None:
    """Appends what is wrong with `video_path`'s sidecar to `problems`; the sidecar when nothing is."""
    side = sidecar_path(video_path)
    if not side.is_file():
        problems.append(f"no sidecar manifest {side.name} beside the video")
        return None
    try:
        manifest = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append(f"sidecar {side.name} is not readable JSON: {e}")
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        problems.append(f"sidecar {side.name} is not a {MANIFEST_FORMAT} file")
        return None
    before = len(problems)
    actual = file_sha256(video_path)
    if manifest.get("sha256") != actual:
        problems.append(
            f"video sha256 {actual[:16]}… differs from the sidecar's "
            f"{str(manifest.get('sha256'))[:16]}…: the file was changed or replaced"
        )
    mark = manifest.get("watermark")
    recorded = mark.get("key_id") if isinstance(mark, dict) else None
    if recorded != key_id(key):
        problems.append(f"sidecar names watermark key id {recorded}, but the key given has id {key_id(key)}")
    problems += [f"sidecar {side.name}: {p}" for p in signature.problems(manifest, key)]
    provenance = manifest.get("provenance")
    script = provenance.get("script") if isinstance(provenance, dict) else None
    if isinstance(script, dict) and "text" in script:
        digest = hashlib.sha256(str(script["text"]).encode()).hexdigest()
        if script.get("sha256") != digest:
            problems.append(
                f"sidecar {side.name}: field 'provenance.script.sha256' is not the sha256 of "
                f"provenance.script.text ({digest[:16]}…)"
            )
    return manifest if len(problems) == before else None


def provenance_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a verified sidecar vouches for, short enough for a console: the video's hash,
    the signing key's id and the provenance's plain values; a nested value (config, shots...)
    as the sha256 of its canonical JSON, but the model's step and the script's path and
    hash as themselves."""
    provenance = manifest.get("provenance") if isinstance(manifest.get("provenance"), dict) else {}
    summary: dict[str, Any] = {
        "video_sha256": manifest["sha256"],
        "created": manifest.get("created"),
        "signed_with_key_id": manifest["watermark"]["key_id"],
    }
    for name, value in provenance.items():
        nested = isinstance(value, (dict, list))
        summary[name] = "sha256:" + hashlib.sha256(signature.canonical(value)).hexdigest() if nested else value
    model, script = provenance.get("model"), provenance.get("script")
    if isinstance(model, dict):
        summary["model_step"] = model.get("step")
    if isinstance(script, dict):
        summary["script"], summary["script_sha256"] = script.get("path"), script.get("sha256")
    return summary


def verify(video_path: str | Path, key: int = DEFAULT_KEY) -> dict[str, Any]:
    """Checks a video file against its sidecar and for the watermark of `key`.

    Returns {"video", "key_id", "frames", "watermark_score", "watermark_detected",
    "threshold", "manifest_ok", "problems"}, and "verified" (`provenance_summary`) when the
    sidecar passes: the video's hash, the key id, a signature under `key` matching every
    field, and a script hash matching the script's text. Nothing about the file raises: a
    missing or unreadable video or sidecar, a hash or key mismatch, an edited field (named)
    is a line in "problems".
    Detection reads the decoded frames, so it also works on a re-encoded copy (whose
    manifest check then fails, as it should).
    """
    key = check_key(key)
    video_path = Path(video_path)
    result: dict[str, Any] = {
        "video": str(video_path),
        "key_id": key_id(key),
        "frames": 0,
        "watermark_score": 0.0,
        "watermark_detected": False,
        "threshold": THRESHOLD,
        "manifest_ok": False,
        "problems": [],
    }
    problems: list[str] = result["problems"]
    if not video_path.is_file():
        problems.append(f"no video file at {video_path}")
        return result
    manifest = _check_sidecar(video_path, key, problems)
    result["manifest_ok"] = manifest is not None
    if manifest is not None:
        result["verified"] = provenance_summary(manifest)
    try:
        votes, result["frames"] = read_votes(video_path)
    except Exception as e:  # any decoder failure is a finding about the file, not a crash
        problems.append(f"could not decode the video: {type(e).__name__}: {e}")
        return result
    score = score_votes(votes, key)
    result["watermark_score"] = round(score, 4)
    result["watermark_detected"] = score >= THRESHOLD
    if not result["watermark_detected"]:
        problems.append(f"watermark not detected: score {score:.2f} < threshold {THRESHOLD}")
    return result
