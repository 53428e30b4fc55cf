"""The batched session engine behind `wm serve` and `wm play`.

Each session owns one row of a fixed batch of S rows: its own temporal key/value cache (a
ring of W slots), position, shot (segment), camera pose and input frame. `Engine.step`
advances every requested session by one frame in one jitted call: `rollout.cached_token_step`
vmapped over the rows, so rows at different positions and ring slots share one compiled
program, and rows without a request keep their state (the padding of the fixed batch).
Each new frame is then decoded alone against a key/value cache of the tokenizer decoder
holding the earlier frames of its time chunk (`VideoTokenizer.decode_step`): the decoder is causal in
time, so the frame is what `rollout.decode_codes` (and so `wm generate`) gives for the
whole video, at the cost of one frame. With the "carry" render (`render`, default the
run's `eval.render`) a row's patches whose codes did not change keep the pixels its
session showed last (first the real last context frame), as `wm eval` renders
(`rollout.carry_patches`).

Sliding window: W is the model's `temporal_window`, else the clip length it was trained
on minus one (what it has seen as context). Past W frames the ring overwrites a session's
oldest slot: the model sees the last W frames, exactly as a model with `temporal_window: W`
would, and a step costs the same at frame 10 and at frame 10,000. Temporal positions are
rotary (relative), so they may grow without limit.

The token objectives are served (`SERVED_OBJECTIVES`): "causal", one pass per frame, and
"maskgit", K = `maskgit_steps` passes per frame (the first commits the frame to the cache),
greedy or with a fixed temperature, without classifier-free guidance. "diffusion" is not:
it samples continuous latents with its own sampler (`rollout.diffusion_frames`).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import functools
import hashlib
import io
import math
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wm_jax.config import ConfigError, to_dict
from wm_jax.inference.generate import DEFAULT_FPS, check_render, checkpoint_info, default_scale
from wm_jax.inference.shot_script import DEFAULT_POSE
from wm_jax.models.dynamics import CAMERA_DIM, Controls, DynamicsModel, make_controls
from wm_jax.models.tokenizer import VideoTokenizer, init_decoder_caches, num_tokens
from wm_jax.inference.rollout import (
    Sampling,
    cached_step,
    cached_token_step,
    carry_patches,
    decode_codes,
    encode_frames,
    identity_memory,
    init_caches,
)
from wm_jax.stages.base import float_to_frames


class EngineError(Exception):
    """A request the engine refuses; `status` is the HTTP status that says why."""

    status = 400


class RequestError(EngineError):
    status = 400


class SessionNotFound(EngineError):
    status = 404


class CapacityError(EngineError):
    status = 429


MAX_IMAGE_SIDE = 4096  # px; checked from the header, before anything is decoded
IMAGE_FORMATS = ("PNG", "JPEG")  # the only decoders an upload reaches


def read_image(data: bytes, size: int) -> np.ndarray:
    """A PNG or JPEG file's bytes -> uint8 [size, size, 3] RGB: turned upright by its EXIF
    orientation (as a phone's photo is shown), alpha dropped, grey made RGB, the centre
    square cropped and resized (Lanczos). RequestError saying what is wrong."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not isinstance(data, (bytes, bytearray)):
        raise RequestError(f"the image must be a PNG or JPEG file's bytes, got {type(data).__name__}")
    if not data:
        raise RequestError("the image is empty (0 bytes)")
    try:  # opening reads the header only: the size is checked before the pixels are decoded
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise RequestError("the image is not a PNG or JPEG file") from None
    except Exception as e:  # noqa: BLE001 — PIL raises many types for a file it cannot read
        raise RequestError(f"the image's header cannot be read ({type(e).__name__}: {e})") from None
    w, h = image.size
    if not (0 < w <= MAX_IMAGE_SIDE and 0 < h <= MAX_IMAGE_SIDE):
        raise RequestError(f"the image is {w}x{h} px; each side must be 1..{MAX_IMAGE_SIDE} px")
    kind = image.format
    try:
        image = ImageOps.exif_transpose(image)  # a 90-degree turn swaps the sides
        if image.mode.startswith("I"):  # 16-bit grey: PIL's RGB conversion would clip it, not scale it
            image = Image.fromarray((np.asarray(image, np.int64) >> 8).clip(0, 255).astype(np.uint8))
        w, h = image.size
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
        square = image.convert("RGB").crop(box)
        return np.asarray(square.resize((size, size), Image.LANCZOS), np.uint8)
    except Exception as e:  # noqa: BLE001 — a truncated or corrupt file fails here, while decoding
        raise RequestError(f"the {kind} image cannot be decoded ({type(e).__name__}: {e})") from None


@dataclasses.dataclass(frozen=True)
class StepRequest:
    """One frame for one session: the action id, the camera move (x, y, z per step; at a
    cut, the new shot's framing jump) and whether the new frame starts a new shot."""

    session: str
    action: int = 0
    move: tuple[float, float, float] = (0.0, 0.0, 0.0)
    cut: bool = False


@dataclasses.dataclass(frozen=True)
class Frame:
    """A decoded frame: uint8 [H, W, 3], the `index`-th of its session (context included)."""

    session: str
    index: int
    image: np.ndarray


@dataclasses.dataclass
class Session:
    id: str
    row: int
    clip: int | None  # None: the context is an uploaded image
    seed: int
    frame: int  # index (and rotary position) of its newest frame: the next step's input
    segment: int  # shot of the newest frame
    pose: np.ndarray  # float64 [7] camera pose of the newest frame
    pose_valid: bool
    last_used: float
    history: collections.deque  # the newest frames shown, for `record`
    shown: np.ndarray  # uint8 [H, W, 3]: the frame shown last (the real last context frame at first), for carry
    steps: collections.deque  # the controls given, for the recording's provenance
    context: dict  # where the context frames came from


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(4,))
def _advance(
    dynamics: DynamicsModel,
    sampling: Sampling | None,
    params: Any,
    inputs: jax.Array,
    state: Any,
    controls: Controls,
    positions: jax.Array,
    memory: Any,
    keys: Any,
    active: jax.Array,
) -> tuple[jax.Array, Any]:
    """One frame for every row: inputs float [S, N, L] (each row's input frame), state
    (per layer {"key", "value": [S, N', heads, W, K]}, slot positions int32 [S, W], slot
    segments int32 [S, 1, W]), controls of [S, 1, 1, ...], positions int32 [S], memory
    ([S, 1, M, D], bool [S, 1]) or (None, None), keys uint32 [S, 2] key data (threefry) or None,
    active bool [S] -> (inputs: each active row's next frame codes, the others' unchanged;
    state: the active rows' input frames written). sampling None: context frames, whose
    next frame is not wanted: one greedy pass writes each (a MaskGIT frame's all-masked
    pass, not its K passes).

    An idle row (active False) is given its own next position (`Engine._next_places`): its
    caches get a throwaway write at the slot its next step overwrites before reading it, so
    only the slots' bookkeeping is selected per row, never a copy of every row's caches."""

    def row(code, st, ctrl, pos, mem, key):
        key = None if key is None else jax.random.wrap_key_data(key)
        args = (dynamics, params, code[None, None], ctrl, pos, st, *mem, key)
        nxt, st = cached_step(*args, Sampling()) if sampling is None else cached_token_step(*args, sampling)
        return nxt[0], st

    nxt, (caches, slot_positions, slot_segments) = jax.vmap(row)(inputs, state, controls, positions, memory, keys)
    keep = lambda n, o: jnp.where(active.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)
    return keep(nxt, inputs), (caches, keep(slot_positions, state[1]), keep(slot_segments, state[2]))


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(2,))
def _show(
    tokenizer: VideoTokenizer, params: Any, caches: Any, codes: jax.Array, index: jax.Array
) -> tuple[Any, jax.Array]:
    """Each row's new frame decoded (`VideoTokenizer.decode_step` vmapped over rows): caches per layer
    {"key", "value": [S, N, heads, T, K]}, codes [S, N, L] of frames at chunk index int32
    [S] -> (caches with each row's frame written at its index, uint8 frames [S, H, W, 3]).
    An idle row's index is its next one (`Engine._next_places`): a throwaway write that its
    next frame overwrites before reading, as in `_advance`."""

    def row(code, cache, j):
        frame, cache = tokenizer.apply({"params": params}, code[None], j, cache, method=VideoTokenizer.decode_step)
        return frame[0], cache

    frames, new = jax.vmap(row)(codes, caches, index)
    return new, float_to_frames(frames)


@functools.partial(jax.jit, donate_argnums=(0,))
def _reset_row(state: Any, row: jax.Array) -> Any:
    """state with row `row` emptied: caches zero, every slot free (position -1), segment 0."""
    caches, slot_pos, slot_seg = state
    caches = jax.tree.map(lambda c: c.at[row].set(0), caches)
    return caches, slot_pos.at[row].set(-1), slot_seg.at[row].set(0)


def _batched_controls(batch: int, rows: dict[int, dict[str, Any]]) -> Controls:
    """Controls of one position for `batch` rows ([S, 1, 1, ...], vmapped to [1, 1, ...]):
    rows maps a row to its {"action", "action_mask", "camera" [7], "camera_mask",
    "next_cut", "segment"}; other rows get zeros (they are not written)."""
    arrays = {
        "action": np.zeros((batch, 1, 1), np.int32),
        "action_mask": np.zeros((batch, 1, 1), bool),
        "camera": np.zeros((batch, 1, 1, CAMERA_DIM), np.float32),
        "camera_mask": np.zeros((batch, 1, 1), bool),
        "next_cut": np.zeros((batch, 1, 1), bool),
        "segment": np.zeros((batch, 1, 1), np.int32),
    }
    for r, values in rows.items():
        for name, value in values.items():
            arrays[name][r, 0, 0] = value
    return Controls(**arrays)  # numpy leaves: the jitted step takes them in one transfer


@dataclasses.dataclass(frozen=True)
class Model:
    """What a dynamics run (or bundle) serves with: configs, modules and parameters."""

    workdir: Path
    cfg: Any
    step: int
    dynamics: DynamicsModel
    params: Any
    tokenizer: VideoTokenizer
    tok_params: Any
    tok_dir: Path
    tok_step: int
    chunk: int  # frames per tokenizer time chunk


def load_model(workdir: str | Path) -> Model:
    """A dynamics run's or bundle's model and tokenizer, loaded once (as `wm generate` does)."""
    from wm_jax import sharding
    from wm_jax.config import MeshConfig
    from wm_jax.run import load_run_config, restore_params, tokenizer_source
    from wm_jax.stages import Role, get_stage, names_with

    workdir = Path(workdir)
    cfg = load_run_config(workdir)
    if get_stage(cfg.train.stage).role is not Role.WORLD_MODEL:
        raise ConfigError(f"{workdir} is a '{cfg.train.stage}' run; serving needs a {names_with(Role.WORLD_MODEL)} run")
    check_objective(cfg, workdir)
    mesh, rules = sharding.make_mesh(MeshConfig()), sharding.logical_rules(cfg.mesh)
    params, _, step = restore_params(workdir, mesh, rules)
    tok_dir = tokenizer_source(workdir, cfg)
    tok_params, tok_cfg, tok_step = restore_params(tok_dir, mesh, rules)
    if tok_cfg.model.tokenizer != cfg.model.tokenizer or tok_cfg.model.image_size != cfg.model.image_size:
        raise ConfigError(
            f"the tokenizer run {tok_dir} does not match the dynamics run's model.tokenizer/model.image_size"
        )
    return Model(
        workdir,
        cfg,
        step,
        DynamicsModel(cfg.model),
        params,
        VideoTokenizer(cfg.model),
        tok_params,
        tok_dir,
        tok_step,
        tok_cfg.data.frames_per_clip,
    )


SERVED_OBJECTIVES = ("causal", "maskgit")  # the token objectives: `rollout.cached_token_step`


def check_objective(cfg: Any, workdir: str | Path, top_k: int = 0) -> None:
    """ConfigError unless the run's dynamics objective is served, with these sampling options."""
    objective = cfg.model.dynamics.objective
    if objective not in SERVED_OBJECTIVES:
        raise ConfigError(
            f"{workdir}: model.dynamics.objective is '{objective}'; the serving engine runs the "
            f"token objectives {SERVED_OBJECTIVES} only ('diffusion' samples continuous latents "
            "with its own sampler: use `wm generate`)"
        )
    if objective == "maskgit" and top_k:
        raise ConfigError(
            f"{workdir}: top_k={top_k} is for the 'causal' objective; 'maskgit' samples only through "
            "its temperature (Gumbel noise on the unmasking order)"
        )


def default_window(cfg: Any) -> int:
    """Cache slots per session: the model's temporal window, else its training clip's context."""
    return cfg.model.dynamics.temporal_window or max(1, cfg.data.frames_per_clip - 1)


def _integer(value: Any, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise RequestError(f"'{name}' must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        raise RequestError(f"'{name}' must be in {low}..{'' if high is None else high}, got {value}")
    return int(value)


class Engine:
    """Up to `max_sessions` sessions of one model, stepped together (see the module doc).

    Thread-safe: every method holds one lock, so a server may call it from a worker
    thread while its event loop reads `info`. `clock` (seconds) times idle expiry."""

    def __init__(
        self,
        model: Model | str | Path,
        *,
        max_sessions: int = 16,
        window: int | None = None,
        context_frames: int | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        idle_timeout_s: float = 300.0,
        record_frames: int = 3000,
        data_dir: str | None = None,
        split: str | None = None,
        render: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.model = model if isinstance(model, Model) else load_model(model)
        cfg = self.model.cfg
        self.max_sessions = _integer(max_sessions, "max_sessions", 1)
        self.window = _integer(window if window is not None else default_window(cfg), "window", 1)
        self.context_frames = _integer(context_frames or cfg.eval.context_frames, "context_frames", 1)
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ConfigError(f"temperature must be >= 0, got {temperature}")
        check_objective(cfg, self.model.workdir, top_k)
        self.sampling = Sampling(float(temperature), int(top_k))
        self.render = check_render(cfg, render, self.model.workdir)
        self.idle_timeout_s, self.record_frames, self.clock = float(idle_timeout_s), int(record_frames), clock
        self.data_dir, self.split = data_dir or cfg.data.dir, split or cfg.eval.split
        self.num_actions, self.image_size = cfg.model.dynamics.num_actions, cfg.model.image_size
        self._manifest = self._read_manifest()
        self._episodes = self._manifest["splits"][self.split]["episodes"]
        s, n, levels = self.max_sessions, num_tokens(cfg.model), len(cfg.model.tokenizer.fsq_levels)
        caches = [
            {k: v.reshape((s, -1) + v.shape[1:]) for k, v in layer.items()}
            for layer in init_caches(cfg.model, s, self.window)
        ]
        self._state = (caches, jnp.full((s, self.window), -1, jnp.int32), jnp.zeros((s, 1, self.window), jnp.int32))
        self._inputs = jnp.zeros((s, n, levels), jnp.float32)
        self._decoder = [
            {k: v.reshape((s, -1) + v.shape[1:]) for k, v in layer.items()}
            for layer in init_decoder_caches(cfg.model, s, self.model.chunk)
        ]
        self._memory: tuple[Any, Any] = (None, None)
        if cfg.model.dynamics.use_identity_bank:
            m = identity_memory(self.model.dynamics, self.model.params, None, None, 1, n, levels)
            self._memory = (jnp.zeros((s,) + m[0].shape, m[0].dtype), jnp.zeros((s, 1), bool))
        key_shape = jax.random.key_data(jax.random.key(0)).shape
        self._keys = jnp.zeros((s,) + key_shape, jnp.uint32) if self.sampling.temperature else None
        self._sessions: dict[str, Session] = {}
        self._free = list(range(s - 1, -1, -1))
        self._lock = threading.Lock()
        self._provenance: dict[str, Any] | None = None
        self._counts = {"engine_steps": 0, "frames_generated": 0}  # batching at a glance: frames / steps

    def _read_manifest(self) -> dict:
        """The dataset's manifest, checked: it has the split, and frames of the model's size."""
        from data_pipelines import writer

        manifest = writer.read_manifest(self.data_dir)
        if self.split not in manifest["splits"]:
            raise ConfigError(
                f"dataset {self.data_dir} has no split '{self.split}'; it has {sorted(manifest['splits'])}"
            )
        if manifest["frame_size"] != self.image_size:
            raise ConfigError(
                f"dataset {self.data_dir} has {manifest['frame_size']}px frames; the model needs {self.image_size}px"
            )
        return manifest

    def info(self) -> dict[str, Any]:
        """What a client needs to know: capacity, the model's controls and frame size."""
        with self._lock:
            active, counts = len(self._sessions), dict(self._counts)
        return {
            **counts,
            "sessions": active,
            "max_sessions": self.max_sessions,
            "window": self.window,
            "context_frames": self.context_frames,
            "num_actions": self.num_actions,
            "image_size": self.image_size,
            "clips": len(self._episodes),
            "split": self.split,
            "step": self.model.step,
            "temperature": self.sampling.temperature,
            "render": self.render,
            "identity_bank": self._memory[0] is not None,
            "idle_timeout_s": self.idle_timeout_s,
        }

    @property
    def active_sessions(self) -> int:
        """The number of live sessions (read without the lock: a hint for batching)."""
        return len(self._sessions)

    # ------------------------------------------------------------------ sessions

    def create(
        self, clip: int | None = None, seed: int = 0, image: bytes | None = None, reference: bytes | None = None
    ) -> tuple[str, np.ndarray]:
        """A new session whose context is the first `context_frames` frames of episode `clip`
        (default 0) of the dataset's test split, or, given `image` (a PNG or JPEG file's
        bytes), that image held still (`_still`), sampling (temperature > 0) from `seed` ->
        (its id, its context frames decoded, uint8 [C, H, W, 3]: the last is the next step's
        input). `reference` (a PNG or JPEG file's bytes; a model with an identity bank only)
        replaces the episode's reference frame in the bank: the entities to keep through
        cuts (`_reference`). CapacityError when every row is taken (after expiring
        idle sessions)."""
        if clip is not None and image is not None:
            raise RequestError("give 'clip' (a test episode) or 'image' (an uploaded picture), not both")
        if reference is not None and self._memory[0] is None:
            raise RequestError(
                "'reference' fills the identity bank, and this model has none (model.dynamics.use_identity_bank: false)"
            )
        if image is None:
            clip = _integer(0 if clip is None else clip, "clip", 0, len(self._episodes) - 1)
        seed = _integer(seed, "seed", 0, 2**31 - 1)
        # Uploads are decoded before the lock is taken.
        still = None if image is None else self._still(image)
        uploaded = None if reference is None else self._reference(reference)
        with self._lock:
            self._expire()
            if not self._free:
                raise CapacityError(
                    f"all {self.max_sessions} sessions are in use: delete one, or wait for an idle "
                    f"one to expire ({self.idle_timeout_s:g} s)"
                )
            fields, context = still or self._context(clip)
            if uploaded is not None:
                fields, context = {**fields, "reference": uploaded[0]}, {**context, **uploaded[1]}
            row = self._free.pop()
            try:
                frames = self._prefill(row, fields, seed)
            except BaseException:
                self._free.append(row)
                raise
            c = self.context_frames
            camera = "camera" in fields
            session = Session(
                id=secrets.token_hex(8),
                row=row,
                clip=clip,
                seed=seed,
                frame=c - 1,
                segment=int(np.sum(fields["cut"][1:c])) if "cut" in fields else 0,
                pose=np.asarray(fields["camera"][c - 1] if camera else DEFAULT_POSE, np.float64),
                pose_valid=bool(fields["camera_valid"][c - 1]) if "camera_valid" in fields else camera,
                last_used=self.clock(),
                history=collections.deque(frames, maxlen=self.record_frames),
                shown=fields["frame"][c - 1],
                steps=collections.deque(maxlen=self.record_frames),
                context=context,
            )
            self._sessions[session.id] = session
            return session.id, frames

    def _context(self, clip: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The first `context_frames` steps of test episode `clip`: its fields [C, ...] and provenance."""
        from data_pipelines import writer

        entry = self._episodes[clip]
        if entry["length"] < self.context_frames:
            raise RequestError(f"clip {clip} has {entry['length']} frames; a session needs {self.context_frames}")
        records = writer.read_episode(self.data_dir, self._manifest, entry["episode_id"])
        fields = {k: v[: self.context_frames] for k, v in records.items()}
        info = {
            "data": str(self.data_dir),
            "dataset_hash": self._manifest.get("content_hash"),
            "split": self.split,
            "episode": clip,
            "episode_id": int(entry["episode_id"]),
            "t": 0,
            "frames": self.context_frames,
        }
        return fields, info

    def _still(self, data: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """An uploaded image as a context: {"frame": uint8 [C, S, S, 3], the image C times}
        and its provenance (its sha256). No other field, so as for `wm generate`'s image
        files the context's actions (id 0) and camera (DEFAULT_POSE) are masked as
        unknown, without cuts; the session's first step sets its camera."""
        frame = read_image(data, self.image_size)
        fields = {"frame": np.repeat(frame[None], self.context_frames, axis=0)}
        info = {
            "image_sha256": hashlib.sha256(data).hexdigest(),
            "image_bytes": len(data),
            "frames": self.context_frames,
        }
        return fields, info

    def _reference(self, data: bytes) -> tuple[np.ndarray, dict[str, Any]]:
        """An uploaded reference frame: uint8 [1, S, S, 3] (as a record's `reference`, one
        frame) and its provenance (its sha256)."""
        frame = read_image(data, self.image_size)
        return frame[None], {"reference_sha256": hashlib.sha256(data).hexdigest(), "reference_bytes": len(data)}

    def _prefill(self, row: int, fields: dict[str, np.ndarray], seed: int) -> np.ndarray:
        """Row `row` emptied, then given the context: its frames' codes written into the
        cache (C - 1 engine steps of this row alone), the last one as the next input and
        its time chunk as the decoder's -> the context frames decoded, uint8 [C, H, W, 3]."""
        m, c, s = self.model, self.context_frames, self.max_sessions
        codes, _ = encode_frames(m.tokenizer, m.tok_params, fields["frame"][None], m.chunk)  # [1, C, N, L]
        steps = {k: fields[k][None] for k in ("camera", "camera_valid", "cut") if k in fields}
        discrete = "action" in fields and np.ndim(fields["action"]) == 1
        steps["action"] = fields["action"][None] if discrete else np.zeros((1, c), np.int32)
        steps["action_valid"] = fields.get("action_valid", np.ones(c, bool))[None] & discrete
        controls = jax.tree.map(np.asarray, make_controls(steps))  # C - 1 positions
        self._state = _reset_row(self._state, jnp.int32(row))
        if self._memory[0] is not None:
            self._set_memory(row, fields)
        if self._keys is not None:
            self._keys = self._keys.at[row].set(jax.random.key_data(jax.random.key(seed)))
        active, (positions, index) = np.arange(s) == row, self._next_places()
        for p in range(c - 1):
            positions[row] = p
            values = {f.name: getattr(controls, f.name)[0, p] for f in dataclasses.fields(Controls)}
            self._inputs = self._inputs.at[row].set(codes[0, p])
            self._inputs, self._state = _advance(
                m.dynamics,
                None,  # only the frame's write into the cache is wanted
                m.params,
                self._inputs,
                self._state,
                _batched_controls(s, {row: values}),
                positions.copy(),  # (changed below while the step may still be running)
                self._memory,
                self._keys,
                active,
            )
        self._inputs = self._inputs.at[row].set(codes[0, c - 1])
        for t in range((c - 1) // m.chunk * m.chunk, c):  # the last context frame's time chunk, decoded
            index[row] = t % m.chunk
            self._decoder, _ = _show(
                m.tokenizer, m.tok_params, self._decoder, self._inputs.at[row].set(codes[0, t]), index.copy()
            )
        return decode_codes(m.tokenizer, m.tok_params, codes, m.chunk)[0]

    def _set_memory(self, row: int, fields: dict[str, np.ndarray]) -> None:
        """The identity bank of row `row`: the episode's reference frame, or empty (masked)."""
        m = self.model
        n, levels = num_tokens(m.cfg.model), len(m.cfg.model.tokenizer.fsq_levels)
        reference = None
        if "reference" in fields:
            reference = encode_frames(m.tokenizer, m.tok_params, fields["reference"][:1][None], m.chunk)[0][:, 0]
        memory, mask = identity_memory(m.dynamics, m.params, reference, None, 1, n, levels)
        self._memory = (self._memory[0].at[row].set(memory), self._memory[1].at[row].set(mask))

    def delete(self, session: str) -> None:
        with self._lock:
            self._free.append(self._get(session).row)
            del self._sessions[session]

    def expire(self) -> list[str]:
        """Deletes the sessions idle for longer than `idle_timeout_s`; returns their ids."""
        with self._lock:
            return self._expire()

    def _expire(self) -> list[str]:
        now = self.clock()
        gone = [s for s in self._sessions.values() if now - s.last_used > self.idle_timeout_s]
        for s in gone:
            self._free.append(s.row)
            del self._sessions[s.id]
        return [s.id for s in gone]

    def _get(self, session: str) -> Session:
        if session not in self._sessions:
            raise SessionNotFound(
                f"no session {session!r} (never created, deleted, or expired after {self.idle_timeout_s:g} s idle)"
            )
        return self._sessions[session]

    # ------------------------------------------------------------------ stepping

    def check(self, request: StepRequest) -> None:
        """RequestError naming what is wrong with a request's controls."""
        _integer(request.action, "action", 0, self.num_actions - 1)
        move = request.move
        if not (
            isinstance(move, tuple)
            and len(move) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in move)
        ):
            raise RequestError(f"the camera move must be 3 finite numbers (x, y, z), got {move!r}")
        if not isinstance(request.cut, bool):
            raise RequestError(f"'cut' must be true or false, got {request.cut!r}")

    def step(self, requests: Sequence[StepRequest]) -> list[Frame | EngineError]:
        """One frame for each request's session, all in one batched engine step. Returns,
        per request, its Frame or the EngineError that refused it (an unknown session, bad
        controls, a second request for one session); the others go ahead."""
        with self._lock:
            out: list[Frame | EngineError | None] = [None] * len(requests)
            chosen: dict[int, tuple[int, Session, StepRequest]] = {}
            for i, request in enumerate(requests):
                try:
                    session = self._get(request.session)
                    self.check(request)
                    if session.row in chosen:
                        raise RequestError(f"session {request.session} has two steps in one batch")
                    chosen[session.row] = (i, session, request)
                except EngineError as e:
                    out[i] = e
            if chosen:
                self._tick(chosen, out)
            return out  # type: ignore[return-value]

    def _tick(self, chosen: dict[int, tuple[int, Session, StepRequest]], out: list) -> None:
        m, s, before = self.model, self.max_sessions, self._inputs
        active, (positions, index) = np.zeros(s, bool), self._next_places()
        rows, poses = {}, {}
        for row, (_, session, r) in chosen.items():
            pose = session.pose.copy()
            pose[:3] += r.move
            rows[row] = {
                "action": r.action,
                "action_mask": True,
                "camera": np.concatenate([r.move, pose[3:]]),
                "camera_mask": session.pose_valid,
                "next_cut": r.cut,
                "segment": session.segment,
            }
            active[row], poses[row] = True, pose
        self._inputs, self._state = _advance(
            m.dynamics,
            self.sampling,
            m.params,
            self._inputs,
            self._state,
            _batched_controls(s, rows),
            positions,
            self._memory,
            self._keys,
            active,
        )
        self._decoder, images = _show(m.tokenizer, m.tok_params, self._decoder, self._inputs, index)
        images, now = np.asarray(images), self.clock()
        if self.render == "carry":
            images = self._carry(chosen, images, before)
        self._counts["engine_steps"] += 1
        self._counts["frames_generated"] += len(chosen)
        for row, (i, session, r) in chosen.items():
            session.frame += 1
            session.segment += int(r.cut)
            session.pose, session.pose_valid, session.last_used = poses[row], True, now
            session.history.append(images[row])
            session.shown = images[row]
            session.steps.append({"frame": session.frame, "action": r.action, "move": list(r.move), "cut": r.cut})
            out[i] = Frame(session.id, session.frame, images[row])

    def _next_places(self) -> tuple[np.ndarray, np.ndarray]:
        """Each held row's next step: the position of its input frame (`session.frame`) and
        the decoder's time-chunk index of the frame it makes, int32 [S] each (free rows 0).
        A step writes its idle rows there too (`_advance`, `_show`)."""
        positions, index = np.zeros(self.max_sessions, np.int32), np.zeros(self.max_sessions, np.int32)
        for session in self._sessions.values():
            positions[session.row] = session.frame
            index[session.row] = (session.frame + 1) % self.model.chunk
        return positions, index

    def _carry(
        self, chosen: dict[int, tuple[int, Session, StepRequest]], images: np.ndarray, before: Any
    ) -> np.ndarray:
        """The "carry" render of the stepped rows: images uint8 [S, H, W, 3] decoded, before
        float [S, N, L] the rows' input codes before the step (`self._inputs` after it) ->
        images with each stepped row's unchanged patches holding its session's shown pixels."""
        rows = np.asarray(sorted(chosen))
        shown = np.stack([chosen[r][1].shown for r in rows])
        codes = lambda c: np.asarray(c)[rows]
        images = images.copy()
        images[rows] = carry_patches(
            shown, images[rows], codes(before), codes(self._inputs), self.model.cfg.model.tokenizer.patch_size
        )
        return images

    # ------------------------------------------------------------------ recording

    def record(self, session: str, directory: str | Path, key: int | None = None) -> Path:
        """Writes the session so far (its newest `record_frames` frames, context included
        while kept) as a watermarked mp4 under DIRECTORY/recordings/ with a name chosen
        here, plus the provenance sidecar `wm verify` checks; returns the video's path."""
        from wm_jax.inference import watermark

        with self._lock:
            s = self._get(session)
            frames, steps = np.stack(list(s.history)), list(s.steps)
            meta = {
                "session": s.id,
                "seed": s.seed,
                "start": s.context,
                "first_frame": s.frame + 1 - len(frames),
                "last_frame": s.frame,
            }
        fps = float(self._manifest.get("fps") or DEFAULT_FPS)
        scale = default_scale(self.image_size)
        info = {
            "generator": "wm play",
            **self._model_provenance(),
            "config": to_dict(self.model.cfg),
            **meta,
            "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "frames": len(frames),
            "fps": fps,
            "context_frames": self.context_frames,
            "frame_size": [self.image_size * scale] * 2,
            "scale": scale,
            "temperature": self.sampling.temperature,
            "render": self.render,
            "window": self.window,
            "steps": steps,
        }
        out = Path(directory) / "recordings"
        out.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        path = out / f"play-{stamp}-{session[:8]}-{meta['last_frame']}.mp4"
        for k in range(1, 1000):
            if not path.exists() and not watermark.sidecar_path(path).exists():
                break
            path = out / f"play-{stamp}-{session[:8]}-{meta['last_frame']}-{k}.mp4"
        video = frames.repeat(scale, axis=1).repeat(scale, axis=2)
        watermark.write_marked_video(video, path, info, key=watermark.DEFAULT_KEY if key is None else key, fps=fps)
        return path

    def _model_provenance(self) -> dict[str, Any]:
        """The checkpoint hashes of the model and its tokenizer (hashed once, then kept)."""
        if self._provenance is None:
            m = self.model
            model = checkpoint_info(m.workdir, m.step)
            model["tokenizer"] = checkpoint_info(m.tok_dir, m.tok_step)
            self._provenance = {"model": model, "checkpoint_sha256": model["sha256"]}
        return self._provenance
