"""Dynamics model: Genie-style ST-transformer predicting frame t+1's tokens.

Inputs are the FSQ code vectors of frames 0..T-1 (projected linearly: continuous inputs
share structure between neighbouring codes, unlike an index embedding) plus the action
taken after each frame. Temporal attention is causal, so logits at t see frames and
actions at <= t only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from wm_jax.config import ModelConfig
from wm_jax.models import layers
from wm_jax.models.tokenizer import codes_to_digits, codes_to_indices, digits_to_codes, indices_to_codes, vocab_size


class ActionEmbedding(nn.Module):
    """Discrete action ids -> per-frame embeddings, with a learned "no action" vector."""

    num_actions: int
    embed_dim: int
    use_actions: bool = True
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, actions: jax.Array, action_mask: jax.Array | None = None) -> jax.Array:
        """actions int [B, T], action_mask bool [B, T] | None -> float [B, T, D] in `dtype`.

        Where `action_mask` is False, or everywhere when `use_actions` is False, the
        "no action" embedding replaces the action's.
        """
        none = self.param("no_action", layers.partitioned(nn.initializers.normal(0.02), ("embed",)), (self.embed_dim,))
        if not self.use_actions:
            return jnp.broadcast_to(none, actions.shape + (self.embed_dim,)).astype(self.dtype)
        # The action table is tiny: replicated along its action axis.
        table = self.param(
            "table",
            layers.partitioned(nn.initializers.normal(0.02), (None, "embed")),
            (self.num_actions, self.embed_dim),
        )
        emb = jnp.take(table, actions, axis=0, mode="clip")
        if action_mask is not None:
            emb = jnp.where(action_mask[..., None], emb, none)
        return emb.astype(self.dtype)


def _digit_mask(levels: tuple[int, ...]) -> np.ndarray:
    """bool [L, max(levels)]: which digit slots exist for each FSQ dimension."""
    return np.arange(max(levels))[None, :] < np.asarray(levels)[:, None]


def logits_shape(cfg: ModelConfig) -> tuple[int, ...]:
    """Trailing logits shape per token: (V,) for the joint head, (L, max level) factorized."""
    levels = cfg.tokenizer.fsq_levels
    return (vocab_size(cfg),) if cfg.dynamics.head == "joint" else (len(levels), max(levels))


def code_targets(codes: jax.Array, cfg: ModelConfig) -> jax.Array:
    """codes float [..., L] -> int32 targets: [...] codebook indices (joint) or [..., L] digits."""
    levels = cfg.tokenizer.fsq_levels
    return codes_to_indices(codes, levels) if cfg.dynamics.head == "joint" else codes_to_digits(codes, levels)


def predict_codes(logits: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Greedy prediction: logits [..., *logits_shape] -> codes float32 [..., L]."""
    levels = cfg.tokenizer.fsq_levels
    best = jnp.argmax(logits, axis=-1)
    return indices_to_codes(best, levels) if cfg.dynamics.head == "joint" else digits_to_codes(best, levels)


def token_loss(logits: jax.Array, target_codes: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy and exact-token accuracy of logits [B,T,N,*] against codes [B,T,N,L].

    Factorized: the loss sums the per-dimension cross-entropies of a token; a token is
    correct when every dimension is."""
    targets = code_targets(target_codes, cfg)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    hit = jnp.argmax(logits, axis=-1) == targets
    if cfg.dynamics.head == "factorized":
        ce, hit = ce.sum(axis=-1), hit.all(axis=-1)
    return jnp.mean(ce), jnp.mean(hit)


class DynamicsModel(nn.Module):
    """codes [B, T, N, L] + actions [B, T] -> logits [B, T, N, *logits_shape] for frame t+1."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        codes: jax.Array,
        actions: jax.Array,
        action_mask: jax.Array | None = None,
    ) -> jax.Array:
        """codes float [B, T, N, L], actions int32 [B, T], action_mask bool [B, T] | None
        -> logits float32 [B, T, N, V] (joint, V = prod(fsq_levels)) or [B, T, N, L, max level]
        (factorized; slots past a dimension's level count are -inf); position t predicts frame t+1.
        """
        dc = self.cfg.dynamics
        dtype = layers.dtype_of(self.cfg.dtype)
        x = layers.Dense(dc.embed_dim, ("codebook", "embed"), dtype, name="code_embed")(codes)
        act = ActionEmbedding(dc.num_actions, dc.embed_dim, dc.use_actions, dtype, name="action_embed")(
            actions, action_mask
        )
        x = layers.PositionEmbedding(dtype, name="pos_embed")(x + act[:, :, None, :])
        x = layers.Transformer(
            dc.num_layers, dc.num_heads, dc.mlp_dim, causal=True, dtype=dtype,
            attention=self.cfg.attention, remat=self.cfg.remat, name="transformer",
        )(x)
        x = layers.RMSNorm(dtype, name="final_norm")(x)
        shape = logits_shape(self.cfg)
        logits = layers.Dense(math.prod(shape), ("embed", "vocab"), dtype, name="logits")(x).astype(jnp.float32)
        logits = logits.reshape(logits.shape[:-1] + shape)
        if dc.head == "factorized":
            logits = jnp.where(_digit_mask(self.cfg.tokenizer.fsq_levels), logits, -jnp.inf)
            return nn.with_logical_constraint(logits, ("batch", "time", "tokens", None, "act_vocab"))
        return nn.with_logical_constraint(logits, ("batch", "time", "tokens", "act_vocab"))
