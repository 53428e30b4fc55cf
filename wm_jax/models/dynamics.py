"""Dynamics model: Genie-style ST-transformer predicting frame t+1's tokens.

Inputs are the FSQ code vectors of frames 0..T-1 (projected linearly: continuous inputs
share structure between neighbouring codes, unlike an index embedding) plus the action
taken after each frame. Temporal attention is causal, so logits at t see frames and
actions at <= t only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from wm_jax.config import ModelConfig
from wm_jax.models import layers
from wm_jax.models.tokenizer import vocab_size


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


class DynamicsModel(nn.Module):
    """codes [B, T, N, L] + actions [B, T] -> logits [B, T, N, V] for frame t+1's indices."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        codes: jax.Array,
        actions: jax.Array,
        action_mask: jax.Array | None = None,
    ) -> jax.Array:
        """codes float [B, T, N, L], actions int32 [B, T], action_mask bool [B, T] | None
        -> logits float32 [B, T, N, V], V = prod(fsq_levels); position t predicts frame t+1.
        """
        dc = self.cfg.dynamics
        dtype = layers.dtype_of(self.cfg.dtype)
        x = layers.Dense(dc.embed_dim, ("codebook", "embed"), dtype, name="code_embed")(codes)
        act = ActionEmbedding(dc.num_actions, dc.embed_dim, dc.use_actions, dtype, name="action_embed")(
            actions, action_mask
        )
        x = layers.PositionEmbedding(dtype, name="pos_embed")(x + act[:, :, None, :])
        x = layers.Transformer(dc.num_layers, dc.num_heads, dc.mlp_dim, causal=True, dtype=dtype, name="transformer")(x)
        x = layers.RMSNorm(dtype, name="final_norm")(x)
        logits = layers.Dense(vocab_size(self.cfg), ("embed", "vocab"), dtype, name="logits")(x)
        return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "time", "tokens", "vocab"))
