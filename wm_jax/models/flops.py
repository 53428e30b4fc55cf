"""Analytic FLOP counts of the models, from the config alone (no tracing).

Counts multiply-adds as 2 FLOPs and only the matrix products (projections, attention
scores and mixing, MLPs, embeddings, heads): elementwise work is a few percent of a
transformer's and no accelerator's peak counts it. Attention is counted in full (causal
masks included), which is what the kernels compute without block skipping. A training
step costs 3x the forward pass (forward + gradients w.r.t. activations and weights).
These are the "model FLOPs" of MFU (Chowdhery et al. 2022): rematerialisation, if used,
does not add to them. Each training stage (`wm_jax.stages`) sums them into its step's FLOPs.
"""

from __future__ import annotations

import math

from wm_jax.config import ModelConfig
from wm_jax.models.dynamics import logits_shape, sequence_tokens
from wm_jax.models.latent_actions import num_patches
from wm_jax.models.tokenizer import latent_width, num_tokens

TRAIN_FACTOR = 3  # forward + backward (2x forward)


def transformer_forward_flops(frames: int, tokens: int, embed: int, mlp: int, layers: int, memory: int = 0) -> int:
    """Forward FLOPs of `layers` spatio-temporal blocks on one clip of `frames` x `tokens`.

    Per block and token: 4 DxD projections for each of the spatial and temporal attention,
    the two MLP matrices; scores + mixing cost 4*S*D per token for a sequence of length S
    (S = tokens (+ `memory` tokens) spatially, S = frames temporally). Memory tokens are
    projected to keys and values once per clip and block.
    """
    per_token = 2 * (8 * embed * embed + 2 * embed * mlp) + 4 * embed * (tokens + memory + frames)
    return layers * (frames * tokens * per_token + memory * 4 * embed * embed)


def tokenizer_encode_flops(cfg: ModelConfig, frames: int) -> int:
    """Forward FLOPs of `VideoTokenizer.encode` on one clip of `frames` frames."""
    tc, n = cfg.tokenizer, num_tokens(cfg)
    patch_dim = tc.patch_size**2 * 3
    per_token = 2 * (patch_dim * tc.embed_dim + tc.embed_dim * latent_width(cfg))
    return frames * n * per_token + transformer_forward_flops(frames, n, tc.embed_dim, tc.mlp_dim, tc.num_layers)


def tokenizer_forward_flops(cfg: ModelConfig, frames: int) -> int:
    """Forward FLOPs of the whole tokenizer (encode + decode) on one clip; the decoder
    mirrors the encoder."""
    return 2 * tokenizer_encode_flops(cfg, frames)


def dynamics_forward_flops(cfg: ModelConfig, frames: int) -> int:
    """Forward FLOPs of `DynamicsModel` on one clip of `frames` input frames.

    Objective "maskgit": the next frame's codes are embedded too, and the transformer runs
    the context and query streams side by side (2 x frames; the head sees the query's).
    Conditioning "token": the transformer sees N + 1 tokens per frame; "adaln": each block
    (and the head) maps the frame's control vector to its shifts, scales and gates."""
    dc, n = cfg.dynamics, num_tokens(cfg)
    levels = len(cfg.tokenizer.fsq_levels)
    maskgit = dc.objective == "maskgit"
    per_token = 2 * dc.embed_dim * ((2 if maskgit else 1) * levels + math.prod(logits_shape(cfg)))
    return frames * n * per_token + _stack_flops(cfg, frames, 2 if maskgit else 1, levels)


def _stack_flops(cfg: ModelConfig, frames: int, streams: int, width: int) -> int:
    """What every dynamics objective shares, on `streams` streams of `frames` frames: the
    identity bank's embedding (reference tokens of `width` values), adaLN's shifts, scales
    and gates (each block's per stream, the head's once) and the transformer."""
    dc, n = cfg.dynamics, num_tokens(cfg)
    memory = n if dc.use_identity_bank else 0  # the reference frame's tokens
    flops = memory * 2 * dc.embed_dim * width
    if dc.action_conditioning == "adaln":
        flops += (streams * dc.num_layers * 9 + 3) * frames * 2 * dc.embed_dim * dc.embed_dim
    seq = sequence_tokens(cfg)
    return flops + transformer_forward_flops(streams * frames, seq, dc.embed_dim, dc.mlp_dim, dc.num_layers, memory)


def diffusion_forward_flops(cfg: ModelConfig, frames: int, streams: int = 1) -> int:
    """Forward FLOPs of `DiffusionDynamics` on one clip of `frames` frames; streams 2: with
    the query stream of a shortcut target's jump (its estimates alone reach the head).
    Per frame and stream, the noise embedding's two D x D layers; per token, the latent's
    projection in (per stream) and the head out, W = the tokenizer's latent width."""
    dc, n, width = cfg.dynamics, num_tokens(cfg), latent_width(cfg)
    embed = streams * frames * (2 * 2 * dc.embed_dim * dc.embed_dim + n * 2 * dc.embed_dim * width)
    head = frames * n * 2 * dc.embed_dim * width
    return embed + head + _stack_flops(cfg, frames, streams, width)


def diffusion_train_flops(cfg: ModelConfig, frames: int) -> int:
    """Model FLOPs of a diffusion train step on one clip of `frames` frames: forward and
    backward of the student, and the forward passes of the two half-jumps of its shortcut
    targets (two streams each, no backward: `models.diffusion.shortcut_target`)."""
    return TRAIN_FACTOR * diffusion_forward_flops(cfg, frames) + 2 * diffusion_forward_flops(cfg, frames, 2)


def latent_action_encode_flops(cfg: ModelConfig, frames: int) -> int:
    """Forward FLOPs of `LatentActionModel.encode` on one clip of `frames` frames: the
    encoder runs on each of the frames-1 pairs (one step of 6-channel patches)."""
    lc, n = cfg.latent_actions, num_patches(cfg)
    patch_dim = lc.patch_size**2 * 3
    # Per pair: patch embedding of n double patches, the pooled latent, its similarity to K codes.
    encoder = (
        n * 2 * 2 * patch_dim * lc.embed_dim
        + 2 * lc.embed_dim * lc.latent_dim
        + 2 * lc.latent_dim * lc.num_latent_actions
    )
    encoder += transformer_forward_flops(1, n, lc.embed_dim, lc.mlp_dim, lc.num_layers)
    return (frames - 1) * encoder


def latent_action_forward_flops(cfg: ModelConfig, frames: int) -> int:
    """Forward FLOPs of `LatentActionModel` on one clip of `frames` frames: the encoder on
    the pairs, the causal decoder on frames 0..T-2."""
    lc, n, t = cfg.latent_actions, num_patches(cfg), frames - 1
    patch_dim = lc.patch_size**2 * 3
    # Per frame: patch embedding in and out, the action embedding.
    decoder = t * (n * 2 * 2 * patch_dim * lc.embed_dim + 2 * lc.latent_dim * lc.embed_dim)
    decoder += transformer_forward_flops(t, n, lc.embed_dim, lc.mlp_dim, lc.num_layers)
    return latent_action_encode_flops(cfg, frames) + decoder
