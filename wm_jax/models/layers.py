"""Transformer building blocks shared by the tokenizer and the dynamics model.

Parameters are float32 and carry logical axis names (`nn.with_logical_partitioning`);
activations run in the module's `dtype`. Block boundaries constrain activations to
("batch", "time", "tokens", "act_embed") so the trainer's `nn.logical_axis_rules` shard them.
Parameters and activations use disjoint logical names (`MeshConfig.param_rules` and
`MeshConfig.activation_rules`), so each can be sharded without moving the other.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Dtype = Any
VIDEO_AXES = ("batch", "time", "tokens", "act_embed")
# Temporal attention runs on [B, N, T, D]: sharding N (not T) keeps each sequence whole.
TEMPORAL_AXES = ("batch", "temporal_tokens", None, "act_embed")


def dtype_of(name: str) -> Dtype:
    """`ModelConfig.dtype` string -> jnp dtype."""
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def partitioned(init_fn: Any, axes: tuple[str | None, ...]) -> Any:
    """An initializer whose parameter is boxed with logical axis names."""
    return nn.with_logical_partitioning(init_fn, axes)


def constrain_video(x: jax.Array) -> jax.Array:
    """Shards x [B, T, N, D] by the logical video axes (no-op without rules)."""
    return nn.with_logical_constraint(x, VIDEO_AXES)


def patchify(frames: jax.Array, p: int) -> jax.Array:
    """frames [B, T, H, W, C] -> patches [B, T, (H/p)*(W/p), p*p*C], row-major patches."""
    b, t, h, w, c = frames.shape
    x = frames.reshape(b, t, h // p, p, w // p, p, c)
    x = x.transpose(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, t, (h // p) * (w // p), p * p * c)


def unpatchify(patches: jax.Array, p: int, height: int, width: int) -> jax.Array:
    """patches [B, T, (H/p)*(W/p), p*p*C] -> frames [B, T, H, W, C]; inverse of `patchify`."""
    b, t, _, d = patches.shape
    c = d // (p * p)
    x = patches.reshape(b, t, height // p, width // p, p, p, c)
    x = x.transpose(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, t, height, width, c)


def sinusoidal_embedding(positions: jax.Array, dim: int) -> jax.Array:
    """positions int/float [S] -> float32 [S, dim] (sin | cos halves, Transformer-style).

    Used for time, so rollouts may run longer than training clips.
    """
    half = dim // 2
    freqs = jnp.exp(-np.log(10_000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim - 2 * half)))


class Dense(nn.Module):
    """Linear map of the last axis with a named kernel [in, out] and bias [out]."""

    features: int
    axes: tuple[str | None, str | None]
    dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., in] -> [..., features] in `dtype`."""
        kernel = self.param("kernel", partitioned(self.kernel_init, self.axes), (x.shape[-1], self.features))
        bias = self.param("bias", partitioned(nn.initializers.zeros_init(), (self.axes[1],)), (self.features,))
        return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis; statistics in float32."""

    dtype: Dtype = jnp.float32
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., D] -> [..., D] in `dtype`."""
        scale = self.param("scale", partitioned(nn.initializers.ones_init(), ("embed",)), (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (x32 * scale).astype(self.dtype)


class Mlp(nn.Module):
    """Two-layer GELU feed-forward on video tokens; the hidden layer is split over `act_mlp`."""

    mlp_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, N, D] -> [B, T, N, D] in `dtype`."""
        h = Dense(self.mlp_dim, ("embed", "mlp"), self.dtype, name="wi")(x)
        h = nn.gelu(nn.with_logical_constraint(h, VIDEO_AXES[:3] + ("act_mlp",)))
        return Dense(x.shape[-1], ("mlp", "embed"), self.dtype, name="wo")(h)


class Attention(nn.Module):
    """Multi-head self-attention over axis -2 via `jax.nn.dot_product_attention`."""

    num_heads: int
    dtype: Dtype = jnp.float32
    implementation: str = "xla"  # or "cudnn" (NVIDIA GPUs, bf16)

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, is_causal: bool = False) -> jax.Array:
        """x [B, S, D] -> [B, S, D] in `dtype`.

        mask: optional bool, broadcastable to [B, heads, S, S]; True = may attend.
        is_causal: position i attends to positions <= i only.
        """
        d = x.shape[-1]
        head_dim = d // self.num_heads

        # Kernels are created at their true rank (not DenseGeneral's flattened init), so the
        # logical axes match the shape when a mesh shards them at init.
        init = nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))

        def proj(name: str) -> jax.Array:
            kernel = self.param(name, partitioned(init, ("embed", "heads", "kv")), (d, self.num_heads, head_dim))
            return jnp.einsum("bsd,dhk->bshk", x.astype(self.dtype), kernel.astype(self.dtype))

        q, k, v = proj("query"), proj("key"), proj("value")
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=self.implementation)
        out_init = nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
        kernel = self.param("out", partitioned(out_init, ("heads", "kv", "embed")), (self.num_heads, head_dim, d))
        return jnp.einsum("bshk,hkd->bsd", out, kernel.astype(self.dtype))


class SpatioTemporalBlock(nn.Module):
    """Pre-norm residual block: spatial attention, temporal attention, MLP.

    Spatial attention mixes the N tokens of each frame (no mask); temporal attention mixes
    the T frames at each token position, causally when `causal`. (B, T) or (B, N) are folded
    into the batch axis so there is no Python loop over time or tokens.
    """

    num_heads: int
    mlp_dim: int
    causal: bool = True
    dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, N, D] -> [B, T, N, D] in `dtype`."""
        b, t, n, d = x.shape
        x = constrain_video(x.astype(self.dtype))

        h = RMSNorm(self.dtype, name="spatial_norm")(x).reshape(b * t, n, d)
        h = Attention(self.num_heads, self.dtype, self.attention, name="spatial_attn")(h)
        x = constrain_video(x + h.reshape(b, t, n, d))

        h = RMSNorm(self.dtype, name="temporal_norm")(x)
        h = nn.with_logical_constraint(h.transpose(0, 2, 1, 3), TEMPORAL_AXES).reshape(b * n, t, d)
        h = Attention(self.num_heads, self.dtype, self.attention, name="temporal_attn")(h, is_causal=self.causal)
        h = nn.with_logical_constraint(h.reshape(b, n, t, d), TEMPORAL_AXES)
        x = constrain_video(x + h.transpose(0, 2, 1, 3))

        h = Mlp(self.mlp_dim, self.dtype, name="mlp")(RMSNorm(self.dtype, name="mlp_norm")(x))
        return constrain_video(x + h)


class PositionEmbedding(nn.Module):
    """Adds a learned spatial embedding per token and a sinusoidal one per frame."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, N, D] -> [B, T, N, D] in `dtype`."""
        _, t, n, d = x.shape
        spatial = self.param(
            "spatial", partitioned(nn.initializers.normal(0.02), ("pos", "embed")), (n, d)
        )
        temporal = sinusoidal_embedding(jnp.arange(t), d)
        pos = spatial[None, :, :] + temporal[:, None, :]
        return constrain_video((x + pos[None]).astype(self.dtype))


class Transformer(nn.Module):
    """A stack of `num_layers` spatio-temporal blocks.

    remat: each block's activations are recomputed in the backward pass instead of kept
    (about a third more compute for a fraction of the activation memory).
    """

    num_layers: int
    num_heads: int
    mlp_dim: int
    causal: bool = True
    dtype: Dtype = jnp.float32
    attention: str = "xla"
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, N, D] -> [B, T, N, D] in `dtype`."""
        block = nn.remat(SpatioTemporalBlock) if self.remat else SpatioTemporalBlock
        for i in range(self.num_layers):
            x = block(self.num_heads, self.mlp_dim, self.causal, self.dtype, self.attention, name=f"block_{i}")(x)
        return x
