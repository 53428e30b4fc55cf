"""Analytic FLOP counts of the models, from the config alone (no tracing).

Counts multiply-adds as 2 FLOPs and only the matrix products (projections, attention
scores and mixing, MLPs, embeddings, heads): elementwise work is a few percent of a
transformer's and no accelerator's peak counts it. Attention is counted in full (causal
masks included), which is what the kernels compute without block skipping. A training
step costs 3x the forward pass (forward + gradients w.r.t. activations and weights).
These are the "model FLOPs" of MFU (Chowdhery et al. 2022): rematerialisation, if used,
does not add to them.
"""

from __future__ import annotations

import math

from wm_jax.config import Config, ModelConfig
from wm_jax.models.dynamics import logits_shape
from wm_jax.models.tokenizer import num_tokens

TRAIN_FACTOR = 3  # forward + backward (2x forward)


def transformer_forward_flops(frames: int, tokens: int, embed: int, mlp: int, layers: int) -> int:
    """Forward FLOPs of `layers` spatio-temporal blocks on one clip of `frames` x `tokens`.

    Per block and token: 4 DxD projections for each of the spatial and temporal attention,
    the two MLP matrices; scores + mixing cost 4*S*D per token for a sequence of length S
    (S = tokens spatially, S = frames temporally).
    """
    per_token = 2 * (8 * embed * embed + 2 * embed * mlp) + 4 * embed * (tokens + frames)
    return layers * frames * tokens * per_token


def tokenizer_encode_flops(cfg: ModelConfig, frames: int) -> int:
    """Forward FLOPs of `VideoTokenizer.encode` on one clip of `frames` frames."""
    tc, n = cfg.tokenizer, num_tokens(cfg)
    patch_dim = tc.patch_size**2 * 3
    per_token = 2 * (patch_dim * tc.embed_dim + tc.embed_dim * len(tc.fsq_levels))
    return frames * n * per_token + transformer_forward_flops(frames, n, tc.embed_dim, tc.mlp_dim, tc.num_layers)


def tokenizer_forward_flops(cfg: ModelConfig, frames: int) -> int:
    """Forward FLOPs of the whole tokenizer (encode + decode) on one clip; the decoder
    mirrors the encoder."""
    return 2 * tokenizer_encode_flops(cfg, frames)


def dynamics_forward_flops(cfg: ModelConfig, frames: int) -> int:
    """Forward FLOPs of `DynamicsModel` on one clip of `frames` input frames."""
    dc, n = cfg.dynamics, num_tokens(cfg)
    levels = len(cfg.tokenizer.fsq_levels)
    per_token = 2 * dc.embed_dim * (levels + math.prod(logits_shape(cfg)))
    return frames * n * per_token + transformer_forward_flops(frames, n, dc.embed_dim, dc.mlp_dim, dc.num_layers)


def train_step_flops(cfg: Config) -> int:
    """Model FLOPs of one training step on the global batch.

    Tokenizer stage: forward + backward of encode/decode on B clips of T frames.
    Dynamics stage: the frozen tokenizer encodes the T frames (forward only), the
    dynamics model trains on T-1 input frames.
    """
    b, t = cfg.data.batch_size, cfg.data.frames_per_clip
    if cfg.train.stage == "tokenizer":
        return b * TRAIN_FACTOR * tokenizer_forward_flops(cfg.model, t)
    return b * (tokenizer_encode_flops(cfg.model, t) + TRAIN_FACTOR * dynamics_forward_flops(cfg.model, t - 1))


def tokens_per_step(cfg: Config) -> int:
    """Latent tokens in one global batch: B x T x N."""
    return cfg.data.batch_size * cfg.data.frames_per_clip * num_tokens(cfg.model)
