"""Autoregressive generation with the dynamics model, and chunked tokenizer encode/decode.

Two engines produce the same tokens. The cached one (the default) runs each new frame
once, against a key/value cache of the temporal attention: a ring of `temporal_window`
slots (or the whole rollout when the model has no window), so a frame costs the same at
t = 10 and t = 1000. The uncached one reruns the visible frames at every step (one
compiled shape, padded at the end: causality hides the padding) — the reference the
cached engine is tested against, and the baseline of `wm bench rollout`; with a window it
reruns the stack's receptive field, layers x (window - 1) + 1 frames. The identity
bank (memory tokens from the reference frame) is embedded once per rollout; the batch
holds independent shots.

A MaskGIT model (`model.dynamics.objective: maskgit`) decodes each frame in K passes.
The cached engine writes a frame into the cache once, in its first, all-masked pass (the
model's context stream), and runs the K - 1 refinement passes against the cache without
committing them; the uncached engine reruns the buffer K times.

A diffusion model (`objective: diffusion`, continuous latents) samples each frame from
noise in K = `sampling_steps` shortcut jumps (`models/diffusion.py`). The cached engine
runs the K passes against the cache without committing them, then writes the finished
frame once, re-noised to `sample_context_noise` (context frames likewise); the uncached
engine reruns every frame so far in each pass. `rollout_frames` picks the engine of the
model's objective (`FRAME_ENGINES`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wm_jax.models import layers
from wm_jax.models.diffusion import DiffusionDynamics, frame_controls, guide_estimates, jump, noised
from wm_jax.models.dynamics import (
    Controls,
    DynamicsModel,
    guide_logits,
    maskgit_schedule,
    maskgit_update,
    sample_codes,
    sequence_tokens,
)
from wm_jax.models.tokenizer import VideoTokenizer, codes_to_indices, has_codebook
from wm_jax.stages.base import float_to_frames, frames_to_float


def _chunks(length: int, chunk: int) -> list[slice]:
    return [slice(i, min(i + chunk, length)) for i in range(0, length, chunk)]


@functools.partial(jax.jit, static_argnums=0)
def _encode(tokenizer: VideoTokenizer, params: Any, frames: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    return tokenizer.apply({"params": params}, frames_to_float(frames), method=tokenizer.encode)


@functools.partial(jax.jit, static_argnums=0)
def _decode(tokenizer: VideoTokenizer, params: Any, codes: jax.Array) -> jax.Array:
    return float_to_frames(tokenizer.apply({"params": params}, codes, method=tokenizer.decode))


def encode_frames(
    tokenizer: VideoTokenizer, params: Any, frames: np.ndarray, chunk: int
) -> tuple[jax.Array, jax.Array | None]:
    """uint8 frames [B,T,H,W,3] -> (codes [B,T,N,L], indices int32 [B,T,N] or None for a
    continuous bottleneck), encoded in time chunks of at most `chunk` frames (the clip length
    the tokenizer was trained on)."""
    parts = [_encode(tokenizer, params, frames[:, s]) for s in _chunks(frames.shape[1], chunk)]
    indices = None if parts[0][1] is None else jnp.concatenate([i for _, i in parts], axis=1)
    return jnp.concatenate([c for c, _ in parts], axis=1), indices


def decode_codes(tokenizer: VideoTokenizer, params: Any, codes: jax.Array, chunk: int) -> np.ndarray:
    """codes [B,T,N,L] -> uint8 frames [B,T,H,W,3], decoded in time chunks of at most `chunk`."""
    return np.concatenate(
        [np.asarray(_decode(tokenizer, params, codes[:, s])) for s in _chunks(codes.shape[1], chunk)], axis=1
    )


def carry_patches(
    previous: np.ndarray, decoded: np.ndarray, before: np.ndarray, after: np.ndarray, patch: int
) -> np.ndarray:
    """One frame of the "carry" render: previous uint8 [B, S, S', 3] (the frame shown
    before), decoded uint8 [B, S, S', 3] (the new frame decoded from its codes), the codes
    before and after float [B, N, L] (N = (S/patch)(S'/patch) row-major patches) -> uint8
    [B, S, S', 3]: the previous pixels in each patch whose code did not change, the decoded
    ones elsewhere."""
    b, height, width = decoded.shape[:3]
    same = np.all(np.asarray(after) == np.asarray(before), axis=-1).reshape(b, height // patch, width // patch)
    same = same.repeat(patch, axis=1).repeat(patch, axis=2)[..., None]  # [B, S, S', 1]
    return np.where(same, previous, decoded)


def carry_unchanged(decoded: np.ndarray, codes: np.ndarray, last: np.ndarray, patch: int) -> np.ndarray:
    """The "carry" render of generated frames (`carry_patches` frame after frame): decoded
    uint8 [B, H, S, S', 3] (frames decoded from codes), codes [B, H + 1, N, L] (the last
    context frame's, then each generated frame's), last uint8 [B, S, S', 3] (the last real
    frame) -> uint8 [B, H, S, S', 3]: each patch whose code equals the previous frame's
    keeps the previous rendered frame's pixels (a patch that never changes stays the real
    frame's), every other patch is the decoded one."""
    codes = np.asarray(codes)
    out, previous = np.empty_like(decoded), np.asarray(last)
    for t in range(decoded.shape[1]):
        out[:, t] = previous = carry_patches(previous, decoded[:, t], codes[:, t], codes[:, t + 1], patch)
    return out


def decode_stream(
    tokenizer: VideoTokenizer, params: Any, codes: Iterable[jax.Array], chunk: int
) -> Iterator[np.ndarray]:
    """Streaming `decode_codes`: codes [B, N, L] of one frame at a time (e.g. `rollout_frames`)
    -> yields uint8 frames [B, t, H, W, 3] per time chunk of `chunk` frames (the last may be
    shorter). A chunk's decode is dispatched as soon as its frames are, and read back only
    once the next chunk's is dispatched, so the host's reads overlap the device's work."""
    pending, buf = None, []
    for code in codes:
        buf.append(code)
        if len(buf) == chunk:
            out, buf = _decode(tokenizer, params, jnp.stack(buf, axis=1)), []
            if pending is not None:
                yield np.asarray(pending)
            pending = out
    if buf:
        out = _decode(tokenizer, params, jnp.stack(buf, axis=1))
        if pending is not None:
            yield np.asarray(pending)
        pending = out
    if pending is not None:
        yield np.asarray(pending)


def identity_memory(
    dynamics: DynamicsModel,
    params: Any,
    reference_codes: jax.Array | None,
    reference_mask: jax.Array | None,
    batch: int,
    tokens: int,
    levels: int,
) -> tuple[jax.Array | None, jax.Array | None]:
    """The identity bank's memory tokens [B, M, D] and mask [B] (Nones without a bank)."""
    if not dynamics.cfg.dynamics.use_identity_bank:
        return None, None
    if reference_codes is None:
        reference_codes, reference_mask = jnp.zeros((batch, tokens, levels)), jnp.zeros((batch,), bool)
    elif reference_mask is None:
        reference_mask = jnp.ones((batch,), bool)
    memory = dynamics.apply({"params": params}, reference_codes, method=dynamics.embed_memory)
    return memory, reference_mask


def cache_slots(cfg: Any, frames: int) -> int:
    """Key/value slots per layer for a rollout of `frames` frames: the temporal window, or
    every input frame (the last frame is only predicted) without one."""
    window = cfg.dynamics.temporal_window
    return min(window, frames - 1) if window else frames - 1


def init_caches(cfg: Any, batch: int, slots: int) -> list[dict[str, jax.Array]]:
    """Empty per-layer temporal key/value caches: {"key", "value": [B*N, heads, slots, K]}."""
    dc = cfg.dynamics
    return layers.kv_caches(
        batch * sequence_tokens(cfg),
        slots,
        dc.num_heads,
        dc.embed_dim // dc.num_heads,
        dc.num_layers,
        layers.dtype_of(cfg.dtype),
    )


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the causal objective picks a frame's tokens from its logits (static under jit).

    temperature 0: greedy argmax; > 0: sampled (`sample_codes`, top_k values kept, 0:
    all); "maskgit" reads only the temperature (`cached_token_step`). guidance != 1:
    classifier-free guidance on actions (`guide_logits`); the engine then runs every row
    twice, with and without its actions."""

    temperature: float = 0.0
    top_k: int = 0
    guidance: float = 1.0

    @property
    def guided(self) -> bool:
        return self.guidance != 1.0


def _next_codes(cfg: Any, logits: jax.Array, sampling: Sampling, key: Any, position: jax.Array) -> jax.Array:
    """logits [B', N, *] of one frame -> its codes [B', N, L]. Guided, B' = 2B: both halves
    get the same (guided) codes, so the unconditional rows follow the conditional ones."""
    if sampling.guided:
        logits = guide_logits(logits, sampling.guidance)
    key = None if key is None else jax.random.fold_in(key, position)
    codes = sample_codes(logits, cfg, key, sampling.temperature, sampling.top_k)
    return jnp.concatenate([codes, codes]) if sampling.guided else codes


CacheState = tuple[list[dict[str, jax.Array]], jax.Array, jax.Array]  # caches, slot positions [W], slot segments [B, W]


def claim_slot(state: CacheState, position: jax.Array, controls: Controls) -> CacheState:
    """The cache state with slot position % W marked as holding frame `position` (int32
    scalar) of the shot in controls.segment[:, 0] (controls of T = 1); the frame's pass
    writes its keys and values there."""
    caches, slot_pos, slot_seg = state
    slot = position % slot_pos.shape[0]
    return caches, slot_pos.at[slot].set(position), slot_seg.at[:, slot].set(controls.segment[:, 0])


@functools.partial(jax.jit, static_argnums=(0, 9), donate_argnums=(5,))
def cached_step(
    dynamics: DynamicsModel,
    params: Any,
    code: jax.Array,
    controls: Controls,
    position: jax.Array,
    state: CacheState,
    memory: Any,
    memory_mask: Any,
    key: Any,
    sampling: Sampling,
) -> tuple[jax.Array, CacheState]:
    """Frame `position` (codes [B,1,N,L]) through the model against the cache state
    (caches, slot positions int32 [W], slot segments int32 [B,W]) -> codes [B,N,L] of the
    next frame (`sampling`), and the state with this frame written into slot position % W."""
    caches, slot_pos, slot_seg = claim_slot(state, position, controls)
    logits, caches = dynamics.apply(
        {"params": params},
        code,
        controls,
        position,
        caches,
        slot_pos,
        slot_seg,
        memory,
        memory_mask,
        method=dynamics.decode_step,
    )
    return _next_codes(dynamics.cfg, logits[:, 0], sampling, key, position), (caches, slot_pos, slot_seg)


@functools.partial(jax.jit, static_argnums=(0, 9))
def _uncached_step(
    dynamics: DynamicsModel,
    params: Any,
    codes: jax.Array,
    controls: Controls,
    positions: jax.Array,
    last: jax.Array,
    reference_codes: Any,
    reference_mask: Any,
    key: Any,
    sampling: Sampling,
) -> jax.Array:
    """The whole visible buffer codes [B,S,N,L] at `positions` [B,S] through the model ->
    codes [B,N,L] of the frame after buffer index `last` (`sampling`)."""
    logits = dynamics.apply({"params": params}, codes, controls, reference_codes, reference_mask, positions)
    position = jax.lax.dynamic_index_in_dim(positions[0], last, keepdims=False)
    return _next_codes(
        dynamics.cfg, jax.lax.dynamic_index_in_dim(logits, last, axis=1, keepdims=False), sampling, key, position
    )


def _maskgit_frame(
    cfg: Any,
    first_logits: jax.Array,
    refine: Any,
    shape: tuple[int, ...],
    key: Any,
    position: jax.Array,
    temperature: float,
) -> jax.Array:
    """MaskGIT decoding of one frame: first_logits [B,N,*] of the all-masked pass, then
    K - 1 passes of `refine(guess [B,N,L], masked [B,N]) -> logits [B,N,*]`, keeping the
    cosine schedule's most confident tokens after each -> codes [B,N,L]. temperature > 0
    adds Gumbel noise to the confidences, annealed to 0 over the passes (MaskGIT), from
    `key` folded with the input position and the pass."""
    steps = cfg.dynamics.maskgit_steps
    b, n = shape[:2]
    schedule = jnp.asarray(maskgit_schedule(n, steps))

    def noise(k: Any) -> jax.Array | None:
        if not temperature:
            return None
        scale = temperature * (1.0 - (k + 1) / steps)
        return scale * jax.random.gumbel(jax.random.fold_in(jax.random.fold_in(key, position), k), (b, n))

    state = maskgit_update(first_logits, jnp.zeros(shape), jnp.ones((b, n), bool), schedule[0], cfg, noise(0))

    def body(k: jax.Array, state: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        return maskgit_update(refine(*state), *state, schedule[k], cfg, noise(k))

    guess, _ = jax.lax.fori_loop(1, steps, body, state)
    return guess


@functools.partial(jax.jit, static_argnums=(0, 9), donate_argnums=(5,))
def cached_maskgit_step(
    dynamics: DynamicsModel,
    params: Any,
    code: jax.Array,
    controls: Controls,
    position: jax.Array,
    state: CacheState,
    memory: Any,
    memory_mask: Any,
    key: Any,
    temperature: float,
) -> tuple[jax.Array, CacheState]:
    """`cached_step` for the MaskGIT objective (same arguments and result; `temperature`
    noises the unmasking order, `_maskgit_frame`): the all-masked pass writes frame
    `position` into the cache (once); the K - 1 refinement passes run against it without
    committing."""
    caches, slot_pos, slot_seg = claim_slot(state, position, controls)

    def apply(caches: Any, next_codes: Any = None, next_mask: Any = None) -> tuple[jax.Array, Any]:
        return dynamics.apply(
            {"params": params},
            code,
            controls,
            position,
            caches,
            slot_pos,
            slot_seg,
            memory,
            memory_mask,
            next_codes,
            next_mask,
            method=dynamics.decode_step,
        )

    logits, caches = apply(caches)  # the context stream: committed
    refine = lambda guess, masked: apply(caches, guess[:, None], masked[:, None])[0][:, 0]
    nxt = _maskgit_frame(
        dynamics.cfg, logits[:, 0], refine, code.shape[:1] + code.shape[2:], key, position, temperature
    )
    return nxt, (caches, slot_pos, slot_seg)


def cached_token_step(
    dynamics: DynamicsModel,
    params: Any,
    code: jax.Array,
    controls: Controls,
    position: jax.Array,
    state: CacheState,
    memory: Any,
    memory_mask: Any,
    key: Any,
    sampling: Sampling,
) -> tuple[jax.Array, CacheState]:
    """One generated frame of a token objective, cached: `cached_step` ("causal") or
    `cached_maskgit_step` ("maskgit", K passes at `sampling.temperature`; guidance and
    top_k do not apply). Codes [B,1,N,L] of frame `position` -> (codes [B,N,L] of the next
    frame, the state with this frame written). Both are jitted: traceable under jit and vmap
    (the serving engine vmaps it over its sessions)."""
    args = (dynamics, params, code, controls, position, state, memory, memory_mask, key)
    if dynamics.cfg.dynamics.objective == "maskgit":
        return cached_maskgit_step(*args, sampling.temperature)
    return cached_step(*args, sampling)


@functools.partial(jax.jit, static_argnums=(0, 9, 10), donate_argnums=(5,))
def rollout_token_step(
    dynamics: DynamicsModel,
    params: Any,
    code: jax.Array,
    controls: Controls,
    position: jax.Array,
    state: CacheState,
    memory: Any,
    memory_mask: Any,
    key: Any,
    sampling: Sampling,
    generate: bool,
) -> tuple[jax.Array, CacheState]:
    """An input frame of `token_frames`' cached engine in one compiled call: codes [B,N,L]
    of frame `position` and the controls of every transition [B, F-1], sliced here (on the
    host, each slice was a dispatch of its own, per frame) -> `cached_token_step` when the
    next frame is generated, else `cached_step` with `sampling` (a context frame)."""
    step = cached_token_step if generate else cached_step
    return step(
        dynamics, params, code[:, None], controls.at(position), position, state, memory, memory_mask, key, sampling
    )


@functools.partial(jax.jit, static_argnums=(0, 9))
def _uncached_maskgit_step(
    dynamics: DynamicsModel,
    params: Any,
    codes: jax.Array,
    controls: Controls,
    positions: jax.Array,
    last: jax.Array,
    reference_codes: Any,
    reference_mask: Any,
    key: Any,
    temperature: float,
) -> jax.Array:
    """`_uncached_step` for the MaskGIT objective: each of the K passes reruns the buffer,
    with the partial next frame at buffer index `last` (all masked elsewhere)."""
    at_last = (jnp.arange(codes.shape[1]) == last)[None, :, None]  # [1, S, 1]

    def logits_at_last(guess: jax.Array, masked: jax.Array) -> jax.Array:
        next_codes = jnp.where(at_last[..., None], guess[:, None], 0.0)
        next_mask = jnp.where(at_last, masked[:, None], True)
        logits = dynamics.apply(
            {"params": params}, codes, controls, reference_codes, reference_mask, positions, next_codes, next_mask
        )
        return jax.lax.dynamic_index_in_dim(logits, last, axis=1, keepdims=False)

    b, _, n, levels = codes.shape
    first = logits_at_last(jnp.zeros((b, n, levels)), jnp.ones((b, n), bool))
    position = jax.lax.dynamic_index_in_dim(positions[0], last, keepdims=False)
    return _maskgit_frame(dynamics.cfg, first, logits_at_last, (b, n, levels), key, position, temperature)


def _check_lengths(context_codes: jax.Array, controls: Controls, horizon: int) -> int:
    c = context_codes.shape[1]
    if horizon < 1 or c < 1:
        raise ValueError(f"a rollout needs >= 1 context frame and horizon >= 1; got {c} and {horizon}")
    if controls.action.shape[1] < c + horizon - 1:
        raise ValueError(
            f"need controls for {c + horizon - 1} steps ({c} context frames, horizon {horizon}); "
            f"got {controls.action.shape[1]}"
        )
    return c


def rollout(
    dynamics: DynamicsModel,
    params: Any,
    context_codes: jax.Array,
    controls: Controls,
    horizon: int,
    reference_codes: jax.Array | None = None,
    reference_mask: jax.Array | None = None,
    cached: bool = True,
    key: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    guidance: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Generates `horizon` frames of tokens after the context (greedy by default).

    The causal objective predicts a frame in one pass; "maskgit" in
    `model.dynamics.maskgit_steps` passes (cosine schedule, most confident tokens first);
    "diffusion" samples a frame's continuous latents in `model.dynamics.sampling_steps`
    shortcut jumps from noise drawn from `key` (default key(0); temperature and top_k do
    not apply).

    Args:
      context_codes: float [B, C, N, L] FSQ codes of the C context frames.
      controls: `Controls` of at least C + horizon - 1 positions (position t takes frame
        t to t+1; see `make_controls`).
      reference_codes: float [B, M, L] codes of each shot's reference frame for the
        identity bank (reference_mask bool [B]); ignored by a model without one.
      cached: the key/value-cached engine (else recompute the visible frames each step).
      key, temperature: "causal": temperature > 0 samples each token (top_k: of its k most
        likely values; 0: all) from `key`; "maskgit": temperature > 0 adds Gumbel noise to
        the confidences that order the unmasking. 0 is deterministic.
      guidance: "causal" and "diffusion": classifier-free guidance on actions (1: none;
        `Sampling`, `guide_estimates`).
    Returns:
      (codes [B, horizon, N, L], indices int32 [B, horizon, N] or None without a codebook)
      of the generated frames.
    """
    new = jnp.stack(
        list(
            rollout_frames(
                dynamics,
                params,
                context_codes,
                controls,
                horizon,
                reference_codes,
                reference_mask,
                cached,
                key,
                temperature,
                top_k,
                guidance,
            )
        ),
        axis=1,
    )
    return new, codes_to_indices(new, dynamics.cfg.tokenizer.fsq_levels) if has_codebook(dynamics.cfg) else None


def rollout_frames(
    dynamics: DynamicsModel,
    params: Any,
    context_codes: jax.Array,
    controls: Controls,
    horizon: int,
    reference_codes: jax.Array | None = None,
    reference_mask: jax.Array | None = None,
    cached: bool = True,
    key: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    guidance: float = 1.0,
) -> Iterator[jax.Array]:
    """`rollout` one frame at a time: yields the codes [B, N, L] of each generated frame as
    soon as its step is dispatched (JAX dispatches asynchronously: the array may still be
    computing), so a consumer (`decode_stream`) can decode early frames while later steps
    run. Same arguments as `rollout`; errors are raised at the first `next`. The engine is
    the model's objective's (`FRAME_ENGINES`; the token engine for the others)."""
    engine = FRAME_ENGINES.get(dynamics.cfg.dynamics.objective, token_frames)
    return engine(
        dynamics,
        params,
        context_codes,
        controls,
        horizon,
        reference_codes,
        reference_mask,
        cached,
        key,
        temperature,
        top_k,
        guidance,
    )


def token_frames(
    dynamics: DynamicsModel,
    params: Any,
    context_codes: jax.Array,
    controls: Controls,
    horizon: int,
    reference_codes: jax.Array | None,
    reference_mask: jax.Array | None,
    cached: bool,
    key: jax.Array | None,
    temperature: float,
    top_k: int,
    guidance: float,
) -> Iterator[jax.Array]:
    """`rollout_frames` of the token objectives ("causal", "maskgit"): codes [B, N, L] of each frame."""
    c = _check_lengths(context_codes, controls, horizon)
    maskgit = dynamics.cfg.dynamics.objective == "maskgit"
    if temperature and key is None:
        raise ValueError("a rollout with temperature > 0 needs a key")
    sampling = Sampling(float(temperature), int(top_k), float(guidance))
    if maskgit and sampling.guided:
        raise ValueError("classifier-free guidance is for the causal objective")
    # A MaskGIT context frame needs only its all-masked pass, committed: a greedy `cached_step`.
    context_sampling = Sampling() if maskgit else sampling
    frames = c + horizon
    controls = controls.at(slice(0, frames - 1))
    rows = context_codes.shape[0]
    if sampling.guided:  # every row twice: as given, and with its actions masked
        context_codes, controls, reference_codes, reference_mask = _with_unconditional(
            context_codes, controls, reference_codes, reference_mask
        )
    b, _, n, levels = context_codes.shape
    if cached:
        memory = identity_memory(dynamics, params, reference_codes, reference_mask, b, n, levels)
        slots = cache_slots(dynamics.cfg, frames)
        state = (
            init_caches(dynamics.cfg, b, slots),
            jnp.full((slots,), -1, jnp.int32),
            jnp.zeros((b, slots), jnp.int32),
        )
    else:
        # A frame depends on `window` frames per layer: the receptive field of the stack
        # is what an exact recompute must rerun.
        dc = dynamics.cfg.dynamics
        span = min(dc.num_layers * (dc.temporal_window - 1) + 1, frames - 1) if dc.temporal_window else frames - 1
        all_pos = jnp.broadcast_to(jnp.arange(frames - 1, dtype=jnp.int32), (b, frames - 1))

    codes = [context_codes[:, i] for i in range(c)]
    for p in range(frames - 1):  # input frame p predicts frame p + 1
        if cached:
            how = sampling if p >= c - 1 else context_sampling
            nxt, state = rollout_token_step(
                dynamics, params, codes[p], controls, jnp.int32(p), state, *memory, key, how, p >= c - 1
            )
        elif p >= c - 1:
            first = max(0, p + 1 - span)
            buf = jnp.stack(codes[first : p + 1], axis=1)
            idx = slice(first, first + span)
            pad = span - buf.shape[1]  # future padding: causality hides it
            buf = jnp.pad(buf, ((0, 0), (0, pad), (0, 0), (0, 0)))
            ctrl = jax.tree.map(
                lambda a: jnp.pad(a[:, idx], [(0, 0), (0, span - a[:, idx].shape[1])] + [(0, 0)] * (a.ndim - 2)),
                controls,
            )
            pos = jnp.pad(all_pos[:, idx], ((0, 0), (0, span - all_pos[:, idx].shape[1])), constant_values=frames)
            args = (dynamics, params, buf, ctrl, pos, jnp.int32(p - first), reference_codes, reference_mask)
            nxt = (
                _uncached_maskgit_step(*args, key, sampling.temperature)
                if maskgit
                else _uncached_step(*args, key, sampling)
            )
        if p >= c - 1:
            codes.append(nxt)
            yield nxt[:rows]


def _with_unconditional(
    context_codes: jax.Array, controls: Controls, reference_codes: Any, reference_mask: Any
) -> tuple[jax.Array, Controls, Any, Any]:
    """A batch of B rows -> 2B: the rows as given, then the same rows with every action
    masked (the unconditional half of classifier-free guidance)."""
    twice = lambda a: None if a is None else jnp.concatenate([a, a])
    uncond = controls.replace(action_mask=jnp.zeros_like(controls.action_mask))
    controls = jax.tree.map(lambda a, u: jnp.concatenate([a, u]), controls, uncond)
    return twice(context_codes), controls, twice(reference_codes), twice(reference_mask)


# --- the diffusion engine -------------------------------------------------------------


def frame_noise(key: jax.Array, position: int, stream: int, shape: tuple[int, ...], copies: int) -> jax.Array:
    """Gaussian noise float32 `shape` [B, N, W] of frame `position`: stream 0 starts its
    sampling, stream 1 re-noises it for the cache. The B / copies rows drawn are repeated
    `copies` times (a guided batch's two halves see the same noise)."""
    noise = jax.random.normal(
        jax.random.fold_in(jax.random.fold_in(key, position), stream), (shape[0] // copies,) + shape[1:]
    )
    return jnp.concatenate([noise] * copies)


def context_latents(latents: jax.Array, noise: jax.Array, level: float) -> jax.Array:
    """A finished frame's latents [B, N, W] -> as the cache holds them: re-noised to noise
    `level` with `noise` [B, N, W] (`frame_noise` stream 1)."""
    signal = jnp.full(latents.shape[:1] + (1,), 1.0 - level)
    return noised(latents[:, None], noise[:, None], signal)[:, 0]


def denoise_frame(estimate: Any, noise: jax.Array, steps: int, guidance: float) -> jax.Array:
    """A frame's latents [B, N, W] from pure noise [B, N, W] in `steps` jumps of 1/steps:
    `estimate(z [B,N,W], signal, step)` -> the model's clean estimate [B, N, W] at each;
    guided (guidance != 1) estimates combined by `guide_estimates`. The last jump lands on
    the last estimate."""
    size = 1.0 / steps

    def body(k: jax.Array, z: jax.Array) -> jax.Array:
        signal = k.astype(jnp.float32) * size
        x_hat = estimate(z, signal, size)
        if guidance != 1.0:
            x_hat = guide_estimates(x_hat, guidance)
        levels = jnp.full(z.shape[:1] + (1,), signal)
        return jump(x_hat[:, None], z[:, None], levels, jnp.full_like(levels, size))[:, 0]

    return jax.lax.fori_loop(0, steps, body, noise)


def _write_frame(
    model: DiffusionDynamics,
    params: Any,
    latents: jax.Array,
    controls: Controls,
    position: jax.Array,
    state: CacheState,
    memory: Any,
    memory_mask: Any,
    noise: jax.Array,
) -> CacheState:
    """Writes frame `position` (latents [B, N, W], clean; its controls, T = 1) into the cache
    once, re-noised to `sample_context_noise` with noise [B, N, W], at the finest step."""
    dc = model.cfg.dynamics
    caches, slot_pos, slot_seg = claim_slot(state, position, controls)
    b = latents.shape[0]
    z = context_latents(latents, noise, dc.sample_context_noise)
    _, caches = model.apply(
        {"params": params},
        z[:, None],
        controls,
        jnp.full((b, 1), 1.0 - dc.sample_context_noise),
        jnp.full((b, 1), 1.0 / dc.shortcut_max_steps),
        position,
        caches,
        slot_pos,
        slot_seg,
        memory,
        memory_mask,
        method=model.decode_step,
    )
    return caches, slot_pos, slot_seg


def _sample_frame(
    model: DiffusionDynamics,
    params: Any,
    controls: Controls,
    position: jax.Array,
    state: CacheState,
    memory: Any,
    memory_mask: Any,
    noise: jax.Array,
    guidance: float,
) -> jax.Array:
    """Frame `position`'s latents [B, N, W] from noise [B, N, W] (`denoise_frame`), each pass
    against the cache of the frames before it; the caches it writes are dropped."""
    caches, slot_pos, slot_seg = claim_slot(state, position, controls)

    def estimate(z: jax.Array, signal: jax.Array, step: float) -> jax.Array:
        b = z.shape[0]
        x_hat, _ = model.apply(
            {"params": params},
            z[:, None],
            controls,
            jnp.full((b, 1), signal),
            jnp.full((b, 1), step),
            position,
            caches,
            slot_pos,
            slot_seg,
            memory,
            memory_mask,
            method=model.decode_step,
        )
        return x_hat[:, 0]

    return denoise_frame(estimate, noise, model.cfg.dynamics.sampling_steps, guidance)


@functools.partial(jax.jit, static_argnums=(0, 9), donate_argnums=(5,))
def diffusion_write(
    model: DiffusionDynamics,
    params: Any,
    latents: jax.Array,
    controls: Controls,
    position: jax.Array,
    state: CacheState,
    memory: Any,
    memory_mask: Any,
    key: jax.Array,
    copies: int,
) -> CacheState:
    """`_write_frame` of frame `position` (latents [B, N, W]: a context frame, or the one
    just sampled, inside `diffusion_advance`) with the
    controls of every frame ([B, F]) and its cache noise drawn from `key` (`frame_noise`
    stream 1) inside the one compiled call."""
    noise = frame_noise(key, position, 1, latents.shape, copies)
    return _write_frame(model, params, latents, controls.at(position), position, state, memory, memory_mask, noise)


@functools.partial(jax.jit, static_argnums=(0, 9), donate_argnums=(5,))
def diffusion_advance(
    model: DiffusionDynamics,
    params: Any,
    latents: jax.Array,
    controls: Controls,
    position: jax.Array,
    state: CacheState,
    memory: Any,
    memory_mask: Any,
    key: jax.Array,
    guidance: float,
) -> tuple[jax.Array, CacheState]:
    """One generated frame in one compiled call: writes frame `position` - 1 (latents
    [B, N, W], finished) into the cache, then samples frame `position` against it. controls
    of every frame [B, F]; both noises drawn from `key` (`frame_noise`). Returns frame
    `position`'s latents [B, N, W] and the cache state. (A frame per call: per-frame host
    dispatches, not the K passes, were what a small model's sampler spent its time on.)"""
    copies = 2 if guidance != 1.0 else 1
    state = diffusion_write(model, params, latents, controls, position - 1, state, memory, memory_mask, key, copies)
    noise = frame_noise(key, position, 0, latents.shape, copies)
    return _sample_frame(
        model, params, controls.at(position), position, state, memory, memory_mask, noise, guidance
    ), state


@functools.partial(jax.jit, static_argnums=(0, 8))
def uncached_diffusion_sample(
    model: DiffusionDynamics,
    params: Any,
    buffer: jax.Array,
    controls: Controls,
    position: jax.Array,
    reference_codes: Any,
    reference_mask: Any,
    noise: jax.Array,
    guidance: float,
) -> jax.Array:
    """`diffusion_sample` by recompute: buffer [B, F, N, W] holds the frames before
    `position` as the cache would (`context_latents`; what follows is hidden by causality),
    and every pass reruns all F frames with the noisy frame at `position`."""
    dc = model.cfg.dynamics
    b, f = buffer.shape[:2]
    here = jnp.arange(f) == position

    def estimate(z: jax.Array, signal: jax.Array, step: float) -> jax.Array:
        latents = jax.lax.dynamic_update_index_in_dim(buffer, z, position, axis=1)
        signals = jnp.broadcast_to(jnp.where(here, signal, 1.0 - dc.sample_context_noise), (b, f))
        steps = jnp.broadcast_to(jnp.where(here, step, 1.0 / dc.shortcut_max_steps), (b, f))
        x_hat = model.apply({"params": params}, latents, controls, signals, steps, reference_codes, reference_mask)
        return jax.lax.dynamic_index_in_dim(x_hat, position, axis=1, keepdims=False)

    return denoise_frame(estimate, noise, dc.sampling_steps, guidance)


def diffusion_frames(
    dynamics: DynamicsModel,
    params: Any,
    context_codes: jax.Array,
    controls: Controls,
    horizon: int,
    reference_codes: jax.Array | None,
    reference_mask: jax.Array | None,
    cached: bool,
    key: jax.Array | None,
    temperature: float,
    top_k: int,
    guidance: float,
) -> Iterator[jax.Array]:
    """`rollout_frames` of the diffusion objective: latents [B, N, W] of each frame, sampled
    from noise drawn from `key` (None: key(0)); temperature and top_k do not apply. A frame's
    controls are those of the transition into it (`frame_controls`); the context frames and
    each finished frame but the last are written into the cache once (`diffusion_write`)."""
    del temperature, top_k
    c = _check_lengths(context_codes, controls, horizon)
    model, frames = DiffusionDynamics(dynamics.cfg), c + horizon
    scale = dynamics.cfg.dynamics.latent_scale  # the model's latents are the tokenizer's times this
    context_codes = context_codes * scale
    key = jax.random.key(0) if key is None else key
    controls = frame_controls(controls.at(slice(0, frames - 1)))
    rows, copies = context_codes.shape[0], 2 if guidance != 1.0 else 1
    if copies == 2:  # every row twice: as given, and with its actions masked
        context_codes, controls, reference_codes, reference_mask = _with_unconditional(
            context_codes, controls, reference_codes, reference_mask
        )
    b, _, n, width = context_codes.shape
    if not cached:
        level = dynamics.cfg.dynamics.sample_context_noise
        buffer = jnp.zeros((b, frames, n, width), jnp.float32)
        shape = (b, n, width)
        for p in range(frames):
            if p < c:
                latents = context_codes[:, p]
            else:
                latents = uncached_diffusion_sample(
                    model,
                    params,
                    buffer,
                    controls,
                    jnp.int32(p),
                    reference_codes,
                    reference_mask,
                    frame_noise(key, p, 0, shape, copies),
                    guidance,
                )
                yield latents[:rows] / scale
            buffer = buffer.at[:, p].set(context_latents(latents, frame_noise(key, p, 1, shape, copies), level))
        return
    memory = identity_memory(model, params, reference_codes, reference_mask, b, n, width)
    window = dynamics.cfg.dynamics.temporal_window
    slots = min(window, frames) if window else frames  # a frame being sampled holds its own slot
    state = (init_caches(dynamics.cfg, b, slots), jnp.full((slots,), -1, jnp.int32), jnp.zeros((b, slots), jnp.int32))
    for p in range(c - 1):
        state = diffusion_write(model, params, context_codes[:, p], controls, jnp.int32(p), state, *memory, key, copies)
    latents = context_codes[:, c - 1]
    for p in range(c, frames):
        latents, state = diffusion_advance(
            model, params, latents, controls, jnp.int32(p), state, *memory, key, guidance
        )
        yield latents[:rows] / scale


FRAME_ENGINES = {"diffusion": diffusion_frames}  # objective -> its `rollout_frames` engine (default: token_frames)
