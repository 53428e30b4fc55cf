"""Autoregressive generation with the dynamics model, and chunked tokenizer encode/decode.

The dynamics model is causal in time, so predictions at position p depend only on frames
<= p: a fixed-size buffer of `window` frames is run whole at every step and the logits at
the last filled position are read. One compiled shape serves the whole rollout; when the
buffer is full it slides by one frame.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wm_jax.models.dynamics import DynamicsModel, predict_codes
from wm_jax.models.tokenizer import VideoTokenizer, codes_to_indices
from wm_jax.train.step import float_to_frames, frames_to_float


def _chunks(length: int, chunk: int) -> list[slice]:
    return [slice(i, min(i + chunk, length)) for i in range(0, length, chunk)]


@functools.partial(jax.jit, static_argnums=0)
def _encode(tokenizer: VideoTokenizer, params: Any, frames: jax.Array) -> tuple[jax.Array, jax.Array]:
    return tokenizer.apply({"params": params}, frames_to_float(frames), method=tokenizer.encode)


@functools.partial(jax.jit, static_argnums=0)
def _decode(tokenizer: VideoTokenizer, params: Any, codes: jax.Array) -> jax.Array:
    return float_to_frames(tokenizer.apply({"params": params}, codes, method=tokenizer.decode))


def encode_frames(tokenizer: VideoTokenizer, params: Any, frames: np.ndarray, chunk: int) -> tuple[jax.Array, jax.Array]:
    """uint8 frames [B,T,H,W,3] -> (codes [B,T,N,L], indices [B,T,N]), encoded in time chunks of
    at most `chunk` frames (the clip length the tokenizer was trained on)."""
    parts = [_encode(tokenizer, params, frames[:, s]) for s in _chunks(frames.shape[1], chunk)]
    return jnp.concatenate([c for c, _ in parts], axis=1), jnp.concatenate([i for _, i in parts], axis=1)


def decode_codes(tokenizer: VideoTokenizer, params: Any, codes: jax.Array, chunk: int) -> np.ndarray:
    """codes [B,T,N,L] -> uint8 frames [B,T,H,W,3], decoded in time chunks of at most `chunk`."""
    return np.concatenate([np.asarray(_decode(tokenizer, params, codes[:, s])) for s in _chunks(codes.shape[1], chunk)], axis=1)


@functools.partial(jax.jit, static_argnums=0)
def _predict_at(dynamics: DynamicsModel, params: Any, codes: jax.Array, actions: jax.Array, pos: jax.Array) -> jax.Array:
    """Greedy codes [B,N,L] of the frame after position `pos` of the buffer codes [B,W,N,L]."""
    logits = dynamics.apply({"params": params}, codes, actions)
    return predict_codes(jax.lax.dynamic_index_in_dim(logits, pos, axis=1, keepdims=False), dynamics.cfg)


def rollout(
    dynamics: DynamicsModel,
    params: Any,
    context_codes: jax.Array,
    actions: jax.Array,
    horizon: int,
    window: int,
) -> tuple[jax.Array, jax.Array]:
    """Generates `horizon` frames of tokens after the context, greedily (argmax).

    Args:
      context_codes: float [B, C, N, L] FSQ codes of the C context frames.
      actions: int32 [B, C + horizon - 1]; action t takes frame t to t+1.
      window: frames the model sees at once (its training input length).
    Returns:
      (codes [B, horizon, N, L], indices int32 [B, horizon, N]) of the generated frames.
    """
    levels = dynamics.cfg.tokenizer.fsq_levels
    c = context_codes.shape[1]
    if actions.shape[1] < c + horizon - 1:
        raise ValueError(f"need {c + horizon - 1} actions for {c} context frames and horizon {horizon}")

    codes = [context_codes[:, i] for i in range(c)]
    new_codes, new_indices = [], []
    for h in range(horizon):
        total = c + h  # frames known so far; predict frame `total`
        first = max(0, total - window)
        buf = jnp.stack(codes[first:total], axis=1)
        act = actions[:, first:total]
        filled = total - first
        if filled < window:  # pad the future; causality makes the padding invisible
            buf = jnp.pad(buf, ((0, 0), (0, window - filled), (0, 0), (0, 0)))
            act = jnp.pad(act, ((0, 0), (0, window - filled)))
        code = _predict_at(dynamics, params, buf, act, jnp.int32(filled - 1))
        codes.append(code)
        new_codes.append(code)
        new_indices.append(codes_to_indices(code, levels))
    return jnp.stack(new_codes, axis=1), jnp.stack(new_indices, axis=1)
