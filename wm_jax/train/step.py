"""Pure train steps: loss, gradients, optax update; and their jitted, sharded form. No I/O."""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax.sharding import Mesh
import jax.numpy as jnp
import optax
from flax import linen as nn

from wm_jax.config import Config
from wm_jax.eval.metrics import psnr_from_mse
from wm_jax.models.dynamics import token_loss
from wm_jax.models.tokenizer import VideoTokenizer, vocab_size
from wm_jax.sharding import batch_sharding
from wm_jax.train.state import TrainState, build_model, make_optimizer

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def frames_to_float(frames: jax.Array) -> jax.Array:
    """uint8 [..., H, W, 3] in [0, 255] -> float32 in [-1, 1]."""
    return frames.astype(jnp.float32) / 127.5 - 1.0


def float_to_frames(x: jax.Array) -> jax.Array:
    """float in [-1, 1] -> uint8 [0, 255] (clipped)."""
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def tokenizer_loss(params: Any, model: nn.Module, batch: Batch) -> tuple[jax.Array, Metrics]:
    """MSE reconstruction loss on frames [B,T,H,W,3] uint8; PSNR on the [0, 1] scale."""
    x = frames_to_float(batch["frame"])
    recon, indices = model.apply({"params": params}, x)
    mse = jnp.mean(jnp.square(recon.astype(jnp.float32) - x))
    usage = jnp.mean(jnp.bincount(indices.reshape(-1), length=vocab_size(model.cfg)) > 0)
    return mse, {"loss": mse, "psnr": psnr_from_mse(mse / 4.0), "code_usage": usage}


def encode_codes(tokenizer: VideoTokenizer, tokenizer_params: Any, frames: jax.Array) -> jax.Array:
    """uint8 frames [B,T,H,W,3] -> FSQ codes float32 [B,T,N,L] of the frozen tokenizer."""
    codes, _ = tokenizer.apply({"params": tokenizer_params}, frames_to_float(frames), method=tokenizer.encode)
    return jax.lax.stop_gradient(codes)


def dynamics_loss(params: Any, model: nn.Module, batch: Batch, codes: jax.Array) -> tuple[jax.Array, Metrics]:
    """Next-frame token cross-entropy: position t (frames <= t, action t) predicts frame t+1."""
    logits = model.apply({"params": params}, codes[:, :-1], batch["action"][:, :-1])
    loss, accuracy = token_loss(logits, codes[:, 1:], model.cfg)
    return loss, {"loss": loss, "token_accuracy": accuracy}


def make_train_step(cfg: Config) -> Callable[..., tuple[TrainState, Metrics]]:
    """(state, batch, tokenizer_params) -> (state, metrics); tokenizer_params is None for that stage."""
    model = build_model(cfg)
    tokenizer = VideoTokenizer(cfg.model)
    tx = make_optimizer(cfg.train)

    def loss_fn(params: Any, batch: Batch, tokenizer_params: Any) -> tuple[jax.Array, Metrics]:
        if cfg.train.stage == "tokenizer":
            return tokenizer_loss(params, model, batch)
        codes = encode_codes(tokenizer, tokenizer_params, batch["frame"])
        return dynamics_loss(params, model, batch, codes)

    def train_step(state: TrainState, batch: Batch, tokenizer_params: Any) -> tuple[TrainState, Metrics]:
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, tokenizer_params)
        grad_norm = optax.tree.norm(grads)
        # Numerics guard: a non-finite loss or gradient leaves params and optimizer untouched.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updated = state.apply_gradients(grads, tx)
        keep = lambda new, old: jnp.where(finite, new, old)
        state = updated.replace(
            params=jax.tree.map(keep, updated.params, state.params),
            opt_state=jax.tree.map(keep, updated.opt_state, state.opt_state),
        )
        metrics.update(grad_norm=grad_norm, skipped=~finite)
        return state, metrics

    return train_step


# Batch fields a train step reads, with their rank: frame uint8 [B,T,S,S,3], action int32 [B,T].
BATCH_FIELDS = {"frame": 5, "action": 2}


def batch_specs(cfg: Config, mesh: Mesh, rules: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract global batch with its shardings, for ahead-of-time compilation."""
    b, t, s = cfg.data.batch_size, cfg.data.frames_per_clip, cfg.model.image_size
    shapes = {"frame": ((b, t, s, s, 3), jnp.uint8), "action": ((b, t), jnp.int32)}
    return {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, rules, BATCH_FIELDS[k]))
        for k, (shape, dtype) in shapes.items()
    }


def jit_train_step(cfg: Config, mesh: Mesh, rules: Any, shardings: Any, tokenizer_shardings: Any = None) -> Callable[..., Any]:
    """The train step under `jax.jit` with explicit shardings and the state donated.

    shardings: the state's sharding tree (from `state_shardings`); tokenizer_shardings:
    the frozen tokenizer's parameter shardings (dynamics stage), None for the tokenizer
    stage. Build it outside, and call it inside, `jax.set_mesh(mesh)` and
    `nn.logical_axis_rules(rules)`.
    """
    batch = {k: batch_sharding(mesh, rules, nd) for k, nd in BATCH_FIELDS.items()}
    return jax.jit(
        make_train_step(cfg),
        in_shardings=(shardings, batch, tokenizer_shardings),
        out_shardings=(shardings, None),
        donate_argnums=(0,),
    )
