"""The Stage interface: everything a training stage (`train.stage`) decides, in one object.

A stage module (`tokenizer.py`, `latent_actions.py`, `dynamics.py`) builds one `Stage`; the
registry (`wm_jax.stages`) lists them. Training, FLOPs, evaluation, export and generation
ask the stage of a config instead of switching on its name; config validation asks its
JAX-free part, `Stage.rules` (`wm_jax.stage_checks`, below the config). Stage modules import
the models, the config and the stage checks only: everything above them (train, eval, run,
export) imports the stages.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Collection
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from wm_jax.config import Config, ModelConfig
from wm_jax.stage_checks import StageRules

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
# (cfg, model, params, batch, frozen params by stage or None, rng) -> (scalar loss, metrics)
LossFn = Callable[[Config, nn.Module, Any, Batch, Any, jax.Array], tuple[jax.Array, Metrics]]
# (params, batch, frozen, step) -> metrics: extra figures computed at log steps only
LogMetricsFn = Callable[[Any, Batch, Any, jax.Array], Metrics]


class Role(enum.Enum):
    """What a trained stage is for; decides what `wm eval`, `wm export` and `wm generate`
    do with a run of it (a new stage picks the role whose tools it fits)."""

    TOKENIZER = enum.auto()  # frames <-> codes: evaluated by its reconstructions
    WORLD_MODEL = enum.auto()  # rolls frames out from context and controls: rollouts, `wm generate`
    ACTION_LABELER = enum.auto()  # infers latent actions: evaluated by the latent action probe


def frames_to_float(frames: jax.Array) -> jax.Array:
    """uint8 [..., H, W, 3] in [0, 255] -> float32 in [-1, 1]: what every model reads."""
    return frames.astype(jnp.float32) / 127.5 - 1.0


def float_to_frames(x: jax.Array) -> jax.Array:
    """float in [-1, 1] -> uint8 [0, 255] (clipped)."""
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def frame_inputs(cfg: Config) -> tuple[jax.Array, ...]:
    """Zero inputs of one clip for `init` of a model that reads frames: float32 [1,T,S,S,3]."""
    t, s = cfg.data.frames_per_clip, cfg.model.image_size
    return (jnp.zeros((1, t, s, s, 3), jnp.float32),)


def frame_fields(cfg: Config, available: Collection[str] | None = None) -> list[str]:
    """The batch fields of a stage that reads the clips' frames alone."""
    del cfg, available  # every dataset has frames
    return ["frame"]


def no_frozen_stages(cfg: Config) -> list[str]:
    """For a stage that reads no other trained model."""
    del cfg
    return []


def no_log_metrics(cfg: Config) -> LogMetricsFn | None:
    """For a stage with no extra figures at log steps."""
    del cfg
    return None


def step_rng(cfg: Config, step: jax.Array) -> jax.Array:
    """A train step's randomness (MaskGIT masks, action dropout) from the seed and the step:
    a resumed run draws the same as an uninterrupted one."""
    return jax.random.fold_in(jax.random.key(cfg.seed), step)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training stage: its model, loss, inputs, dependencies, cost and checks.

    Function fields take the run's whole `Config` (the stage reads the sections it needs).
    Its name and what `config.validate` checks of a config that trains it are its `rules`
    (`wm_jax.stage_checks`, JAX-free, below the config).
    """

    rules: StageRules  # name, config checks, min_frames, reads_latent_cache
    role: Role
    model: Callable[[ModelConfig], nn.Module]  # the module the stage trains
    example_inputs: Callable[[Config], tuple[jax.Array, ...]]  # zero inputs of one clip, for `init`
    loss: LossFn
    # Per clip: model FLOPs of a train step (frozen models' forward passes included; `models.flops`).
    flops_per_example: Callable[[Config], int]
    tokens_per_frame: Callable[[ModelConfig], int]  # the tokens its transformer sees per frame
    model_section: str  # the `model.*` config section of its model
    # The config key naming a trained run of this stage when another stage reads it frozen.
    workdir_key: str = ""
    # (cfg, the dataset's fields or None for all) -> the batch fields the step reads;
    # ValueError when `available` lacks one it needs.
    batch_fields: Callable[[Config, Collection[str] | None], list[str]] = frame_fields
    # The trained models the step reads but does not train, by stage name (their params
    # are the step's `frozen` argument, in this order).
    frozen_stages: Callable[[Config], list[str]] = no_frozen_stages
    bundled: tuple[str, ...] = ()  # frozen stages `wm export` bundles inside this stage's bundle
    make_log_metrics: Callable[[Config], LogMetricsFn | None] = no_log_metrics  # jitted, or None

    @property
    def name(self) -> str:
        """The value of `train.stage`."""
        return self.rules.name

    @property
    def min_frames(self) -> int:
        """data.frames_per_clip at least."""
        return self.rules.min_frames

    @property
    def reads_latent_cache(self) -> bool:
        """Whether it may train on `data.latent_cache` codes instead of frames."""
        return self.rules.reads_latent_cache

    def train_step_flops(self, cfg: Config) -> int:
        """Model FLOPs of one training step on the global batch."""
        return cfg.data.batch_size * self.flops_per_example(cfg)

    def tokens_per_step(self, cfg: Config) -> int:
        """Tokens in one global batch: B x T x the tokens per frame."""
        return cfg.data.batch_size * cfg.data.frames_per_clip * self.tokens_per_frame(cfg.model)
