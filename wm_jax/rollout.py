"""Autoregressive generation with the dynamics model, and chunked tokenizer encode/decode.

The dynamics model is causal in time, so predictions at position p depend only on frames
<= p: a fixed-size buffer of `window` frames is run whole at every step and the logits at
the last filled position are read. One compiled shape serves the whole rollout; when the
buffer is full it slides by one frame.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wm_jax.models.dynamics import DynamicsModel, predict_codes
from wm_jax.models.tokenizer import VideoTokenizer, codes_to_indices
from wm_jax.train.step import float_to_frames, frames_to_float


def _chunks(length: int, chunk: int) -> list[slice]:
    return [slice(i, min(i + chunk, length)) for i in range(0, length, chunk)]


def encode_frames(tokenizer: VideoTokenizer, params: Any, frames: np.ndarray, chunk: int) -> tuple[jax.Array, jax.Array]:
    """uint8 frames [B,T,H,W,3] -> (codes [B,T,N,L], indices [B,T,N]), encoded in time chunks of
    at most `chunk` frames (the clip length the tokenizer was trained on)."""
    encode = jax.jit(lambda p, x: tokenizer.apply({"params": p}, frames_to_float(x), method=tokenizer.encode))
    parts = [encode(params, frames[:, s]) for s in _chunks(frames.shape[1], chunk)]
    return jnp.concatenate([c for c, _ in parts], axis=1), jnp.concatenate([i for _, i in parts], axis=1)


def decode_codes(tokenizer: VideoTokenizer, params: Any, codes: jax.Array, chunk: int) -> np.ndarray:
    """codes [B,T,N,L] -> uint8 frames [B,T,H,W,3], decoded in time chunks of at most `chunk`."""
    decode = jax.jit(lambda p, c: float_to_frames(tokenizer.apply({"params": p}, c, method=tokenizer.decode)))
    return np.concatenate([np.asarray(decode(params, codes[:, s])) for s in _chunks(codes.shape[1], chunk)], axis=1)


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
    b, c, n, l = context_codes.shape
    if actions.shape[1] < c + horizon - 1:
        raise ValueError(f"need {c + horizon - 1} actions for {c} context frames and horizon {horizon}")

    @jax.jit
    def predict(codes_buf: jax.Array, actions_buf: jax.Array, pos: jax.Array) -> jax.Array:
        logits = dynamics.apply({"params": params}, codes_buf, actions_buf)
        return predict_codes(jax.lax.dynamic_index_in_dim(logits, pos, axis=1, keepdims=False), dynamics.cfg)

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
        code = predict(buf, act, jnp.int32(filled - 1))
        codes.append(code)
        new_codes.append(code)
        new_indices.append(codes_to_indices(code, levels))
    return jnp.stack(new_codes, axis=1), jnp.stack(new_indices, axis=1)
