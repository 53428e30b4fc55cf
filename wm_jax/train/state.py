"""TrainState creation under the mesh: abstract init → logical specs → shardings.

Parameters are created with logical axis names; `jax.eval_shape` gives the state's
structure without allocating it, the logical rules turn the names into `NamedSharding`s
for the current mesh, and the real init runs under `jax.jit` with those out-shardings,
so each device only ever materialises its own shard.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct
from jax.sharding import Mesh

from wm_jax.config import Config, TrainConfig
from wm_jax.sharding import check_divisible, tree_shardings
from wm_jax.stages import get_stage


@struct.dataclass
class TrainState:
    """Everything a training step updates; the model and optimizer are code, not state."""

    step: jax.Array  # int32 []
    params: Any
    opt_state: Any

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    def apply_gradients(self, grads: Any, tx: optax.GradientTransformation) -> "TrainState":
        updates, opt_state = tx.update(grads, self.opt_state, self.params)
        return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates), opt_state=opt_state)


def build_model(cfg: Config, stage: str | None = None) -> nn.Module:
    """The model of `stage` (default: cfg's training stage) for cfg's model config."""
    return get_stage(stage or cfg.train.stage).model(cfg.model)


def example_inputs(cfg: Config, stage: str | None = None) -> tuple[jax.Array, ...]:
    """Zero inputs of one clip of `stage` (default: cfg's training stage), for `init`
    (`Stage.example_inputs`)."""
    return get_stage(stage or cfg.train.stage).example_inputs(cfg)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warmup + cosine decay and global-norm clipping."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=min(cfg.warmup_steps, max(cfg.steps - 1, 0)),
        decay_steps=max(cfg.steps, 1),
        end_value=cfg.learning_rate * cfg.end_learning_rate_fraction,
    )
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip_norm),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=cfg.weight_decay),
    )


def _boxed_init(model: nn.Module, tx: optax.GradientTransformation, inputs: tuple, rng: jax.Array) -> TrainState:
    variables = model.init(rng, *inputs)
    return TrainState.create(variables["params"], tx)


def state_shardings(cfg: Config, mesh: Mesh, rules: Any, stage: str | None = None) -> tuple[Any, Any]:
    """(abstract state with shardings attached, sharding tree) for the current mesh."""
    model = build_model(cfg, stage)
    tx = make_optimizer(cfg.train)
    inputs = example_inputs(cfg, stage)
    with nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda r: _boxed_init(model, tx, inputs, r), jax.random.key(0))
    specs = nn.get_partition_spec(boxed)
    shardings = tree_shardings(mesh, rules, specs)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.meta.unbox(boxed), shardings
    )
    check_divisible(abstract.params)
    return abstract, shardings


def create_train_state(cfg: Config, mesh: Mesh, rules: Any, shardings: Any, stage: str | None = None) -> TrainState:
    """A freshly initialised TrainState placed on `shardings` (from `state_shardings`);
    parameters from `cfg.seed`."""
    model = build_model(cfg, stage)
    tx = make_optimizer(cfg.train)
    inputs = example_inputs(cfg, stage)

    def init(rng: jax.Array) -> TrainState:
        return nn.meta.unbox(_boxed_init(model, tx, inputs, rng))

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return jax.jit(init, out_shardings=shardings)(jax.random.key(cfg.seed))


def param_count(params: Any) -> int:
    """Total parameters of a tree (arrays or ShapeDtypeStructs)."""
    return sum(x.size for x in jax.tree.leaves(params))


def param_counts_by_module(params: dict[str, Any]) -> dict[str, int]:
    """Parameters per top-level module (e.g. `transformer`, `action_embed`), largest first."""
    counts = {name: param_count(sub) for name, sub in params.items()}
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
