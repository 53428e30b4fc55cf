"""The dynamics stage's "diffusion" objective: shortcut forcing over the frozen continuous
tokenizer's latents (`wm_jax.models.diffusion`). The dynamics stage (`stages/dynamics.py`)
picks it through its objective registry."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from wm_jax.config import Config
from wm_jax.models.diffusion import frame_controls, loss_weight, noised, sample_levels, shortcut_target
from wm_jax.models.dynamics import Controls, drop_actions, framed_cuts, make_controls
from wm_jax.models.tokenizer import latent_width, num_tokens
from wm_jax.stages.base import Batch, Metrics


def scored_frames(model: nn.Module, controls: Controls, scored: jax.Array) -> jax.Array:
    """bool [B, T]: the frames the loss counts, of `sample_levels`' scored [B, T] and the
    frames' controls; with `mask_cut_loss`, a frame that opens a new shot counts only when
    the model is told its framing (as for the token objectives)."""
    if not model.cfg.dynamics.mask_cut_loss:
        return scored
    framed = controls.camera_mask if framed_cuts(model.cfg) else False
    return scored & (~controls.next_cut | framed)


def diffusion_loss(
    params: Any,
    model: nn.Module,
    batch: Batch,
    latents: jax.Array,
    reference: tuple[jax.Array | None, jax.Array | None] = (None, None),
    rng: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """Shortcut forcing on a clip: each frame noised to its own level (`sample_levels`),
    the model's clean estimates against `shortcut_target` (flow at the finest step,
    self-consistency above), squared error weighted by `loss_weight`, averaged over the
    scored frames (`scored_frames`).

    latents float32 [B, T, N, W] of the clip's frames (the continuous tokenizer's; the
    model sees them times `latent_scale`, and the metrics are on that scale); the
    controls from the batch's per-step fields (`make_controls`, then `frame_controls`);
    reference: (codes [B, N, W], mask [B]) or Nones; rng: the step's randomness (levels,
    noise, action dropout). Metrics: the loss, and the unweighted error of the estimates
    against the clean frames (`x_mse`, all scored frames) and on the flow-target frames.
    """
    if rng is None:
        raise ValueError("the diffusion objective needs an rng for its noise")
    dc = model.cfg.dynamics
    controls = make_controls(batch)
    if dc.action_dropout > 0:
        controls = drop_actions(controls, dc.action_dropout, jax.random.fold_in(rng, 1))
    controls = frame_controls(controls)
    latents = latents * dc.latent_scale
    signal, step, scored = sample_levels(
        jax.random.fold_in(rng, 3), latents.shape[:2], dc.shortcut_max_steps, dc.context_noise
    )
    z = noised(latents, jax.random.normal(jax.random.fold_in(rng, 4), latents.shape), signal)
    apply = lambda query=None: model.apply({"params": params}, z, controls, signal, step, *reference, None, query)
    min_step = 1.0 / dc.shortcut_max_steps
    target = shortcut_target(lambda zq, sq: apply((zq, sq, step / 2)), z, latents, signal, step, min_step)
    pred = apply()
    scored = scored_frames(model, controls, scored)
    count = jnp.maximum(jnp.sum(scored), 1)
    err = jnp.mean(jnp.square(pred - target), axis=(2, 3))
    loss = jnp.sum(jnp.where(scored, loss_weight(signal) * err, 0.0)) / count
    clean_err = jnp.mean(jnp.square(pred - latents), axis=(2, 3))
    flow = scored & (step <= min_step)
    return loss, {
        "loss": loss,
        "x_mse": jnp.sum(jnp.where(scored, clean_err, 0.0)) / count,
        "flow_x_mse": jnp.sum(jnp.where(flow, clean_err, 0.0)) / jnp.maximum(jnp.sum(flow), 1),
    }


def example_inputs(cfg: Config) -> tuple[Any, ...]:
    """Zero inputs of one clip for `init`: latents float32 [1,T,N,W], the controls of the T
    frames, signal levels and step sizes float32 [1,T]."""
    t = cfg.data.frames_per_clip
    controls = frame_controls(make_controls({"action": jnp.zeros((1, t), jnp.int32)}))
    return (
        jnp.zeros((1, t, num_tokens(cfg.model), latent_width(cfg.model)), jnp.float32),
        controls,
        jnp.ones((1, t), jnp.float32),
        jnp.ones((1, t), jnp.float32),
    )
