"""Transformer building blocks shared by the tokenizer and the dynamics model.

Parameters are float32 and carry logical axis names (`nn.with_logical_partitioning`);
activations run in the module's `dtype`. Block boundaries constrain activations to
("batch", "time", "tokens", "act_embed") so the trainer's `nn.logical_axis_rules` shard them.
Parameters and activations use disjoint logical names (`MeshConfig.param_rules` and
`MeshConfig.activation_rules`), so each can be sharded without moving the other.
"""

from __future__ import annotations

import math
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


def rotary(x: jax.Array, positions: jax.Array, base: float = 10_000.0) -> jax.Array:
    """Rotary position embedding (Su et al. 2021) of x [B, S, H, K] at int positions [B, S].

    Pairs (i, i + K/2) of each head are rotated by angle position * base^(-2i/K), so a
    query-key product depends on the positions' difference only: a model trained on short
    clips sees the same attention pattern at frame 1000 of a rollout as at frame 10.
    """
    half = x.shape[-1] // 2
    freqs = jnp.exp(-np.log(base) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[:, :, None, None] * freqs  # [B, S, 1, half]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half : 2 * half].astype(jnp.float32)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos, x[..., 2 * half :]], axis=-1)
    return rotated.astype(x.dtype)


# Spatial grids are a few to a few tens of tokens on a side: the slowest of the default
# base's frequencies would hardly turn across them, so 2-D rotary uses a smaller base.
GRID_ROTARY_BASE = 100.0


def rotary_2d(x: jax.Array, positions: jax.Array) -> jax.Array:
    """Axial 2-D rotary embedding of x [B, S, H, K] at int grid positions [B, S, 2] (row,
    column): the first half of each head turns with the row, the second with the column, so
    a query-key product depends on the two tokens' offset on the grid only. Attention can
    then fetch "the neighbour one to the left" with the same weights at every position,
    which is what a camera pan asks of a frame's tokens."""
    half = x.shape[-1] // 2
    rows = rotary(x[..., :half], positions[..., 0], GRID_ROTARY_BASE)
    cols = rotary(x[..., half:], positions[..., 1], GRID_ROTARY_BASE)
    return jnp.concatenate([rows, cols], axis=-1)


def grid_positions(tokens: int) -> jax.Array:
    """int32 [tokens, 2]: (row, column) of each token of a square, row-major patch grid."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"2-D positions need a square token grid; got {tokens} tokens")
    return jnp.stack(jnp.divmod(jnp.arange(tokens, dtype=jnp.int32), side), axis=-1)


class Attention(nn.Module):
    """Multi-head self-attention over axis -2 via `jax.nn.dot_product_attention`.

    Optional extras: `memory` tokens every query may attend to besides the sequence
    (keys/values from the same projections), rotary `positions`, and a key/value `cache`
    for incremental decoding (the new keys/values are written at `slot`).
    """

    num_heads: int
    dtype: Dtype = jnp.float32
    implementation: str = "xla"  # or "cudnn" (NVIDIA GPUs, bf16)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None = None,
        is_causal: bool = False,
        memory: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: dict[str, jax.Array] | None = None,
        slot: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        """x [B, S, D] -> [B, S, D] in `dtype` (and the updated cache when `cache` is given).

        mask: optional bool, broadcastable to [B, heads, S, keys]; True = may attend. Keys
          are the sequence (or the cache's W slots), then the memory tokens.
        is_causal: position i attends to sequence positions <= i only.
        memory: [B', M, D] with B' dividing B; row b of x sees memory row b // (B / B').
        positions: int [B, S] rotary positions of the sequence, or int [B, S, 2] grid
          positions for 2-D rotary (`rotary_2d`) (None: no rotary embedding).
        cache: {"key", "value": [B, heads, W, K]} (`kv_caches`); x holds S=1 new step,
          written at slot; attended with `decode_attention`.
        """
        d = x.shape[-1]
        head_dim = d // self.num_heads

        # Kernels are created at their true rank (not DenseGeneral's flattened init), so the
        # logical axes match the shape when a mesh shards them at init.
        init = nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
        kernels = {
            name: self.param(name, partitioned(init, ("embed", "heads", "kv")), (d, self.num_heads, head_dim))
            for name in ("query", "key", "value")
        }

        def proj(name: str, inputs: jax.Array) -> jax.Array:
            return jnp.einsum("bsd,dhk->bshk", inputs.astype(self.dtype), kernels[name].astype(self.dtype))

        q, k, v = proj("query", x), proj("key", x), proj("value", x)
        if positions is not None:
            rotate = rotary if positions.ndim == 2 else rotary_2d
            q, k = rotate(q, positions), rotate(k, positions)
        # Project the memory once per memory row, then share it among its B/B' rows.
        shared = lambda name: jnp.repeat(proj(name, memory), x.shape[0] // memory.shape[0], axis=0)
        if cache is not None:
            # Heads first: the step's new key/value [B, 1, heads, K] goes in as [B, heads, 1, K].
            write = lambda c, new: jax.lax.dynamic_update_slice_in_dim(
                c, heads_first(new).astype(c.dtype), slot, axis=2
            )
            k, v = write(cache["key"], k), write(cache["value"], v)
            new_cache = {"key": k, "value": v}
            if memory is not None:
                k = jnp.concatenate([k, heads_first(shared("key"))], axis=2)
                v = jnp.concatenate([v, heads_first(shared("value"))], axis=2)
            out = decode_attention(q, k, v, mask)
        else:
            if memory is not None:
                k = jnp.concatenate([k, shared("key")], axis=1)
                v = jnp.concatenate([v, shared("value")], axis=1)
            out = jax.nn.dot_product_attention(
                q, k, v, mask=mask, is_causal=is_causal, implementation=self.implementation
            )
        out_init = nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
        kernel = self.param("out", partitioned(out_init, ("heads", "kv", "embed")), (self.num_heads, head_dim, d))
        out = jnp.einsum("bshk,hkd->bsd", out, kernel.astype(self.dtype))
        return out if cache is None else (out, new_cache)


def heads_first(x: jax.Array) -> jax.Array:
    """Keys or values [B, S, heads, K] -> [B, heads, S, K]: the layout of `kv_caches`."""
    return x.transpose(0, 2, 1, 3)


def decode_attention(q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Attention of a decoding step against a heads-first cache: q [B, S, heads, K], keys
    and values [B, heads, W, K], mask bool broadcastable to [B, heads, S, W] (True = may
    attend) -> [B, S, heads, K] in q's dtype.

    The arithmetic of `jax.nn.dot_product_attention`'s XLA path (logits and softmax in
    fp32, masked logits at its large negative), but both products read the cache as
    stored: with slots first, XLA transposed every layer's whole cache at every step."""
    logits = jnp.einsum("bshk,bhwk->bhsw", q, keys, preferred_element_type=jnp.promote_types(q.dtype, jnp.float32))
    logits *= jnp.asarray(q.shape[-1] ** -0.5, logits.dtype)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.asarray(-0.7 * jnp.finfo(jnp.float32).max, logits.dtype))
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(keys.dtype)
    return jnp.einsum("bhsw,bhwk->bshk", probs, values).astype(q.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN: x [B, T, N, D] shifted and scaled per frame by shift, scale [B, T, D]."""
    return x * (1 + scale[:, :, None]) + shift[:, :, None]


class AdaLNModulation(nn.Module):
    """Per-frame conditioning cond [B, T, D] -> (shift, scale, gate) [B, T, D] for each of
    `num_sublayers` sub-layers. Zero-initialised: the block starts as the unconditioned
    one (gates are applied as 1 + gate), and learns how each control moves each layer."""

    num_sublayers: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, cond: jax.Array) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
        d = cond.shape[-1]
        out = Dense(
            3 * self.num_sublayers * d,
            ("embed", None),
            self.dtype,
            kernel_init=nn.initializers.zeros_init(),
            name="proj",
        )(nn.silu(cond))
        parts = jnp.split(out, 3 * self.num_sublayers, axis=-1)
        return [tuple(parts[3 * i : 3 * i + 3]) for i in range(self.num_sublayers)]


class SpatioTemporalBlock(nn.Module):
    """Pre-norm residual block: spatial attention, temporal attention, MLP.

    Spatial attention mixes the N tokens of each frame (no mask) and, when given, memory
    tokens every frame sees; temporal attention mixes the T frames at each token position,
    causally when `causal`. (B, T) or (B, N) are folded into the batch axis so there is no
    Python loop over time or tokens. With `cond` (per-frame conditioning), each sub-layer's
    normed input is modulated and its output gated (adaLN, `AdaLNModulation`).
    """

    num_heads: int
    mlp_dim: int
    causal: bool = True
    dtype: Dtype = jnp.float32
    attention: str = "xla"
    spatial_rope: bool = False  # 2-D rotary positions in spatial attention (`rotary_2d`)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        memory: jax.Array | None = None,
        memory_mask: jax.Array | None = None,
        temporal_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: dict[str, jax.Array] | None = None,
        slot: jax.Array | None = None,
        cond: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        """x [B, T, N, D] -> [B, T, N, D] in `dtype` (and the layer's new cache with `cache`).

        memory: [B, M, D] tokens attended to by every frame, where memory_mask bool [B] is
          True (None: all). temporal_mask: bool [B, T, K] over the K temporal keys (the
          frames, or the cache's slots), replacing the plain causal mask. positions: int
          [B, T] rotary frame positions. cache: {"key", "value": [B*N, heads, W, K]} for
          decoding one frame (T = 1) at `slot`. cond: [B, T, D] per-frame conditioning (adaLN).
        """
        b, t, n, d = x.shape
        x = constrain_video(x.astype(self.dtype))
        if cond is None:
            mods = [None] * 3
        else:
            mods = AdaLNModulation(3, self.dtype, name="adaln")(cond.astype(self.dtype))
        pre = lambda h, m: h if m is None else modulate(h, m[0], m[1])
        gated = lambda h, m: h if m is None else h * (1 + m[2][:, :, None])

        spatial_norm = RMSNorm(self.dtype, name="spatial_norm")
        h = pre(spatial_norm(x), mods[0]).reshape(b * t, n, d)
        mask = None
        if memory is not None:
            memory = spatial_norm(memory)
            if memory_mask is not None:
                keys = jnp.concatenate(
                    [jnp.ones((b, n), bool), jnp.broadcast_to(memory_mask[:, None], (b, memory.shape[1]))], 1
                )
                mask = jnp.repeat(keys, t, axis=0)[:, None, None, :]
        grid = jnp.broadcast_to(grid_positions(n), (b * t, n, 2)) if self.spatial_rope else None
        spatial_attn = Attention(self.num_heads, self.dtype, self.attention, name="spatial_attn")
        h = spatial_attn(h, mask=mask, memory=memory, positions=grid)
        x = constrain_video(x + gated(h.reshape(b, t, n, d), mods[0]))

        h = pre(RMSNorm(self.dtype, name="temporal_norm")(x), mods[1])
        h = nn.with_logical_constraint(h.transpose(0, 2, 1, 3), TEMPORAL_AXES).reshape(b * n, t, d)
        mask = None if temporal_mask is None else jnp.repeat(temporal_mask, n, axis=0)[:, None]
        pos = None if positions is None else jnp.repeat(positions, n, axis=0)
        attn = Attention(self.num_heads, self.dtype, self.attention, name="temporal_attn")
        is_causal = self.causal and temporal_mask is None
        if cache is None:
            h = attn(h, mask=mask, is_causal=is_causal, positions=pos)
        else:
            h, cache = attn(h, mask=mask, positions=pos, cache=cache, slot=slot)
        h = nn.with_logical_constraint(h.reshape(b, n, t, d), TEMPORAL_AXES)
        x = constrain_video(x + gated(h.transpose(0, 2, 1, 3), mods[1]))

        h = Mlp(self.mlp_dim, self.dtype, name="mlp")(pre(RMSNorm(self.dtype, name="mlp_norm")(x), mods[2]))
        x = constrain_video(x + gated(h, mods[2]))
        return x if cache is None else (x, cache)


def kv_caches(
    rows: int, slots: int, num_heads: int, head_dim: int, num_layers: int, dtype: Dtype
) -> list[dict[str, jax.Array]]:
    """Empty per-layer key/value caches {"key", "value": [rows, heads, slots, K]} (zeros;
    heads first, the layout `decode_attention` reads without a transpose)."""
    shape = (rows, num_heads, slots, head_dim)
    # Separate buffers per layer: a decode step donates (updates in place) each of them.
    return [{"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)} for _ in range(num_layers)]


class PositionEmbedding(nn.Module):
    """Adds a learned spatial embedding per token and, when `temporal`, a sinusoidal one per
    frame (models with rotary temporal attention leave time to the attention)."""

    dtype: Dtype = jnp.float32
    temporal: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, N, D] -> [B, T, N, D] in `dtype`."""
        _, t, n, d = x.shape
        spatial = self.param("spatial", partitioned(nn.initializers.normal(0.02), ("pos", "embed")), (n, d))
        pos = spatial[None, :, :]
        if self.temporal:
            pos = pos + sinusoidal_embedding(jnp.arange(t), d)[:, None, :]
        return constrain_video((x + pos[None]).astype(self.dtype))


# `ModelConfig.remat_policy` -> jax.checkpoint policy (None: save nothing, recompute all).
REMAT_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
}


class _ScannedBlock(SpatioTemporalBlock):
    """A `SpatioTemporalBlock` in `nn.scan`'s (carry, *xs) -> (carry, ys) form: x is the
    carry, the per-layer cache (or None) the scanned input and output."""

    @nn.compact
    def __call__(self, x, memory, memory_mask, temporal_mask, positions, cache, slot, cond):  # type: ignore[override]
        out = super().__call__(x, memory, memory_mask, temporal_mask, positions, cache, slot, cond)
        return (out, None) if cache is None else out


class Transformer(nn.Module):
    """A stack of `num_layers` spatio-temporal blocks.

    remat: each block's activations are recomputed in the backward pass instead of kept
    (about a third more compute for a fraction of the activation memory); remat_policy
    (a `REMAT_POLICIES` key) chooses what is kept anyway. scan_layers: the blocks run as
    one `nn.scan` over parameters stacked on a leading "layers" axis (`blocks/...`
    instead of `block_0/...`, ...): one compiled block, so deep stacks compile faster.
    Decoding caches are stacked along that axis and scanned with the layers.
    spatial_rope: spatial attention reads 2-D rotary grid positions (`rotary_2d`).
    """

    num_layers: int
    num_heads: int
    mlp_dim: int
    causal: bool = True
    dtype: Dtype = jnp.float32
    attention: str = "xla"
    remat: bool = False
    remat_policy: str = "full"
    scan_layers: bool = False
    spatial_rope: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        memory: jax.Array | None = None,
        memory_mask: jax.Array | None = None,
        temporal_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        caches: list[dict[str, jax.Array]] | None = None,
        slot: jax.Array | None = None,
        cond: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, list[dict[str, jax.Array]]]:
        """x [B, T, N, D] -> [B, T, N, D] in `dtype`; the extras are `SpatioTemporalBlock`'s,
        with one cache per layer (and the new caches returned) when decoding."""
        if self.scan_layers:
            return self._scanned(x, memory, memory_mask, temporal_mask, positions, caches, slot, cond)
        block = SpatioTemporalBlock
        if self.remat:
            block = nn.remat(block, policy=REMAT_POLICIES[self.remat_policy])
        new_caches = []
        for i in range(self.num_layers):
            layer = block(
                self.num_heads,
                self.mlp_dim,
                self.causal,
                self.dtype,
                self.attention,
                self.spatial_rope,
                name=f"block_{i}",
            )
            if caches is None:
                x = layer(x, memory, memory_mask, temporal_mask, positions, None, None, cond)
            else:
                x, cache = layer(x, memory, memory_mask, temporal_mask, positions, caches[i], slot, cond)
                new_caches.append(cache)
        return x if caches is None else (x, new_caches)

    def _scanned(self, x, memory, memory_mask, temporal_mask, positions, caches, slot, cond):
        block = _ScannedBlock
        if self.remat:
            # prevent_cse=False: scan already keeps the recomputation from being merged away.
            block = nn.remat(block, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=False)
        stack = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast),
            length=self.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(self.num_heads, self.mlp_dim, self.causal, self.dtype, self.attention, self.spatial_rope, name="blocks")
        stacked = None if caches is None else jax.tree.map(lambda *c: jnp.stack(c), *caches)
        x, stacked = stack(x, memory, memory_mask, temporal_mask, positions, stacked, slot, cond)
        if caches is None:
            return x
        return x, [jax.tree.map(lambda c, i=i: c[i], stacked) for i in range(self.num_layers)]
