"""Pure train steps: the stage's loss (`wm_jax.stages`), gradients, optax update; and their
jitted, sharded form. No I/O."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
from jax.sharding import Mesh
import jax.numpy as jnp
import optax

from wm_jax.config import Config
from wm_jax.models.tokenizer import latent_width, num_tokens
from wm_jax.sharding import batch_sharding
from wm_jax.stages import get_stage
from wm_jax.stages.base import Batch, Metrics, step_rng
from wm_jax.train.guards import all_finite
from wm_jax.train.state import TrainState, build_model, make_optimizer


def make_train_step(cfg: Config) -> Callable[..., tuple[TrainState, Metrics]]:
    """(state, batch, frozen) -> (state, metrics), on the loss of cfg's stage (`Stage.loss`).
    frozen: the params of the stage's `frozen_stages` by stage name (for dynamics the
    tokenizer's and, with `train.latent_actions_workdir`, the LAM's), None when it has none."""
    model = build_model(cfg)
    stage_loss = get_stage(cfg.train.stage).loss
    tx = make_optimizer(cfg.train)

    def loss_fn(params: Any, batch: Batch, frozen: Any, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        return stage_loss(cfg, model, params, batch, frozen, rng)

    def train_step(state: TrainState, batch: Batch, frozen: Any) -> tuple[TrainState, Metrics]:
        rng = step_rng(cfg, state.step)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, frozen, rng)
        grad_norm = optax.tree.norm(grads)
        updated = state.apply_gradients(grads, tx)
        # Numerics guard: a non-finite loss, gradient or updated value (a finite gradient
        # times an overflowing learning rate) leaves params and optimizer untouched, so
        # the state carried on, and every checkpoint of it, stays finite.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite((updated.params, updated.opt_state))
        # One branch for the whole state: a per-leaf `where` keyed on a reduction of the
        # updated leaves tripled the step's compile time on CPU (24 s vs 8 s, tiny model).
        params, opt_state = jax.lax.cond(
            finite, lambda: (updated.params, updated.opt_state), lambda: (state.params, state.opt_state)
        )
        state = updated.replace(params=params, opt_state=opt_state)
        metrics.update(grad_norm=grad_norm, skipped=~finite)
        return state, metrics

    return train_step


# Batch fields a train step may read, with their rank: frame uint8 [B,T,S,S,3], action
# int32 [B,T], camera float32 [B,T,7], cut bool [B,T], reference uint8 [B,T,S,S,3], ...;
# codes int32 [B,T,N] (token ids) or latents float32 [B,T,N,W] (continuous latents) come
# from a latent cache (data.latent_cache), not a record field.
FIELD_RANKS = {
    "frame": 5,
    "action": 2,
    "action_valid": 2,
    "camera": 3,
    "camera_valid": 2,
    "cut": 2,
    "reference": 5,
    "codes": 3,
    "latents": 4,
}


def batch_fields(cfg: Config, available: Iterable[str] | None = None) -> dict[str, int]:
    """Field name -> rank of what the step of cfg's stage reads (`Stage.batch_fields`), among
    the `available` fields of the batches (None: all); ValueError when one it needs is missing."""
    available = None if available is None else list(available)
    names = get_stage(cfg.train.stage).batch_fields(cfg, available)
    return {k: FIELD_RANKS[k] for k in names if available is None or k in available}


def batch_specs(cfg: Config, mesh: Mesh, rules: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract global batch (every field the stage may read) with its shardings, for
    ahead-of-time compilation."""
    b, t, s = cfg.data.batch_size, cfg.data.frames_per_clip, cfg.model.image_size
    shapes = {
        "frame": ((b, t, s, s, 3), jnp.uint8),
        "reference": ((b, t, s, s, 3), jnp.uint8),
        "action": ((b, t), jnp.int32),
        "camera": ((b, t, 7), jnp.float32),
        "action_valid": ((b, t), jnp.bool_),
        "camera_valid": ((b, t), jnp.bool_),
        "cut": ((b, t), jnp.bool_),
        "codes": ((b, t, num_tokens(cfg.model)), jnp.int32),
        "latents": ((b, t, num_tokens(cfg.model), latent_width(cfg.model)), jnp.float32),
    }
    return {
        k: jax.ShapeDtypeStruct(shapes[k][0], shapes[k][1], sharding=batch_sharding(mesh, rules, rank))
        for k, rank in batch_fields(cfg).items()
    }


def jit_train_step(
    cfg: Config,
    mesh: Mesh,
    rules: Any,
    shardings: Any,
    frozen_shardings: Any = None,
    fields: dict[str, int] | None = None,
) -> Callable[..., Any]:
    """The train step under `jax.jit` with explicit shardings and the state donated.

    shardings: the state's sharding tree (from `state_shardings`); frozen_shardings: the
    shardings of the frozen parameters (`make_train_step`'s frozen), None for stages that
    read no frozen model; fields: the batch's fields (`batch_fields`; default: all the
    stage may read).
    Build it outside, and call it inside, `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`.
    """
    fields = batch_fields(cfg) if fields is None else fields
    batch = {k: batch_sharding(mesh, rules, nd) for k, nd in fields.items()}
    return jax.jit(
        make_train_step(cfg),
        in_shardings=(shardings, batch, frozen_shardings),
        out_shardings=(shardings, None),
        donate_argnums=(0,),
    )
