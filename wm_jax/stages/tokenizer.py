"""The tokenizer stage: a video autoencoder trained on frame reconstruction."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from wm_jax import stage_checks
from wm_jax.config import Config
from wm_jax.imaging import psnr_from_mse
from wm_jax.models import flops
from wm_jax.models.tokenizer import VideoTokenizer, num_tokens, vocab_size
from wm_jax.stages.base import Batch, Metrics, Role, Stage, frame_inputs, frames_to_float


def tokenizer_loss(params: Any, model: nn.Module, batch: Batch) -> tuple[jax.Array, Metrics]:
    """MSE reconstruction loss on frames [B,T,H,W,3] uint8; PSNR on the [0, 1] scale; the
    share of the codebook used (an FSQ bottleneck only: a continuous one has no codebook)."""
    x = frames_to_float(batch["frame"])
    recon, indices = model.apply({"params": params}, x)
    mse = jnp.mean(jnp.square(recon.astype(jnp.float32) - x))
    metrics = {"loss": mse, "psnr": psnr_from_mse(mse / 4.0, xp=jnp)}
    if indices is not None:
        metrics["code_usage"] = jnp.mean(jnp.bincount(indices.reshape(-1), length=vocab_size(model.cfg)) > 0)
    return mse, metrics


def step_loss(
    cfg: Config, model: nn.Module, params: Any, batch: Batch, frozen: Any, rng: jax.Array
) -> tuple[jax.Array, Metrics]:
    """`tokenizer_loss` as a train step calls it (no frozen models, no randomness)."""
    del cfg, frozen, rng
    return tokenizer_loss(params, model, batch)


def flops_per_example(cfg: Config) -> int:
    """Forward + backward of encode/decode on one clip of T frames."""
    return flops.TRAIN_FACTOR * flops.tokenizer_forward_flops(cfg.model, cfg.data.frames_per_clip)


TOKENIZER = Stage(
    rules=stage_checks.TOKENIZER,
    role=Role.TOKENIZER,
    model=VideoTokenizer,
    example_inputs=frame_inputs,
    loss=step_loss,
    flops_per_example=flops_per_example,
    tokens_per_frame=num_tokens,
    model_section="tokenizer",
    workdir_key="train.tokenizer_workdir",
)
