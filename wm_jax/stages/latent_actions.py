"""The latent action stage: a model inferring a discrete action from each pair of frames,
trained by predicting the next frame from the previous one and that action."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from wm_jax import stage_checks
from wm_jax.config import Config
from wm_jax.imaging import psnr_from_mse
from wm_jax.models import flops
from wm_jax.models.latent_actions import LatentActionModel, num_patches
from wm_jax.stages.base import Batch, Metrics, Role, Stage, frame_inputs, frames_to_float


def latent_action_loss(params: Any, model: LatentActionModel, batch: Batch) -> tuple[jax.Array, Metrics]:
    """Next-frame MSE + VQ codebook and commitment losses, on frames [B,T,H,W,3] uint8.

    Metrics: PSNR of the predicted frames 1..T-1 and of copying the previous frame (the
    decoder's starting point), the mean squared latent-to-code distance and the share of
    the latent actions used in the batch.
    """
    x = frames_to_float(batch["frame"])
    pred, quantized = model.apply({"params": params}, x)
    mse = jnp.mean(jnp.square(pred - x[:, 1:]))
    copy_mse = jnp.mean(jnp.square(x[:, :-1] - x[:, 1:]))
    lc = model.cfg.latent_actions
    loss = mse + quantized.codebook_loss + lc.commitment_weight * quantized.commitment_loss
    usage = jnp.mean(jnp.bincount(quantized.indices.reshape(-1), length=lc.num_latent_actions) > 0)
    return loss, {
        "loss": loss,
        "psnr": psnr_from_mse(mse / 4.0, xp=jnp),
        "psnr_copy_last": psnr_from_mse(copy_mse / 4.0, xp=jnp),
        "vq_distance": quantized.codebook_loss,
        "code_usage": usage,
    }


def step_loss(
    cfg: Config, model: LatentActionModel, params: Any, batch: Batch, frozen: Any, rng: jax.Array
) -> tuple[jax.Array, Metrics]:
    """`latent_action_loss` as a train step calls it (no frozen models, no randomness)."""
    del cfg, frozen, rng
    return latent_action_loss(params, model, batch)


def infer_latent_actions(model: LatentActionModel, params: Any, frames: jax.Array) -> jax.Array:
    """uint8 frames [B,T,H,W,3] (T >= 2) -> int32 [B,T] latent actions of a trained LAM.

    Entry t takes frame t to frame t+1, like a record's `action`; the last entry has no
    next frame and is 0.
    """
    _, quantized = model.apply({"params": params}, frames_to_float(frames), method=model.encode)
    return jnp.pad(quantized.indices, ((0, 0), (0, 1)))


def flops_per_example(cfg: Config) -> int:
    """Forward + backward of the LAM on one clip of T frames."""
    return flops.TRAIN_FACTOR * flops.latent_action_forward_flops(cfg.model, cfg.data.frames_per_clip)


LATENT_ACTIONS = Stage(
    rules=stage_checks.LATENT_ACTIONS,  # min_frames 2: a pair of frames per action
    role=Role.ACTION_LABELER,
    model=LatentActionModel,
    example_inputs=frame_inputs,
    loss=step_loss,
    flops_per_example=flops_per_example,
    tokens_per_frame=num_patches,  # the LAM's patches
    model_section="latent_actions",
    workdir_key="train.latent_actions_workdir",
)
