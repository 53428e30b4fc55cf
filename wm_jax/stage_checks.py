"""The config checks of each training stage (`train.stage`), without JAX: the stage names
and, per stage, what a config that trains it must satisfy.

`wm_jax.config.validate` runs `stage_problem` after its own checks (by then
`cfg.train.stage` is one of `STAGE_NAMES`) and raises the message it returns as a
`ConfigError`. This module sits below the config and imports nothing of wm_jax, so loading
and validating a config loads no JAX; `cfg` is a `wm_jax.config.Config`, read by
attribute. The rest of a stage (model, loss, batch fields, FLOPs: JAX) is its
`wm_jax.stages.Stage`, which carries its rules here as `Stage.rules`; the dynamics
objectives' models and losses are `wm_jax.stages.dynamics.OBJECTIVES`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

# cfg -> the message of the first problem found, or None
Check = Callable[[Any], str | None]


@dataclasses.dataclass(frozen=True)
class ObjectiveRules:
    """What a dynamics objective (`model.dynamics.objective`) needs of a config."""

    bottleneck: str  # the `model.tokenizer.bottleneck` whose codes it models
    # The kind of `data.latent_cache` it may train on (`data_pipelines.latent_cache`):
    # "ids" (FSQ token ids) or "latents" (a continuous tokenizer's); checked when the
    # cache is opened, since the config does not say which a directory holds.
    latent_cache: str
    refused: tuple[str, ...] = ()  # `model.dynamics` switches it does not support


TOKEN_OBJECTIVE = ObjectiveRules("fsq", latent_cache="ids")
# Scheduled sampling replaces input frames by one-pass predictions: the causal objective's.
MASKGIT_OBJECTIVE = ObjectiveRules("fsq", latent_cache="ids", refused=("scheduled_sampling",))
# cut_framing_shift moves the tokens of the frame before a cut; a diffusion frame's tokens are
# the noisy frame being generated.
# motion_weight weighs token cross-entropies; the diffusion loss is a latent regression.
DIFFUSION_OBJECTIVE = ObjectiveRules(
    "continuous", latent_cache="latents", refused=("cut_framing_shift", "scheduled_sampling", "motion_weight")
)
OBJECTIVES = {"causal": TOKEN_OBJECTIVE, "maskgit": MASKGIT_OBJECTIVE, "diffusion": DIFFUSION_OBJECTIVE}


def refuse_latent_actions(cfg: Any) -> str | None:
    """The check of a stage that reads no latent action model."""
    if cfg.train.latent_actions_workdir:
        return f"config key 'train.latent_actions_workdir' is for the dynamics stage, not '{cfg.train.stage}'"
    return None


def objective_problem(cfg: Any) -> str | None:
    """The tokenizer's bottleneck must be the objective's (token objectives read FSQ codes,
    diffusion continuous latents, either encoded or from a latent cache), and no switch it
    refuses on."""
    name = cfg.model.dynamics.objective
    rules = OBJECTIVES[name]
    if cfg.model.tokenizer.bottleneck != rules.bottleneck:
        return (
            f"config key 'model.dynamics.objective' '{name}' needs 'model.tokenizer.bottleneck: "
            f"{rules.bottleneck}' (the tokenizer run's); got '{cfg.model.tokenizer.bottleneck}'"
        )
    for key in rules.refused:
        if getattr(cfg.model.dynamics, key):
            return f"config key 'model.dynamics.{key}' is not supported by the '{name}' objective"
    return None


def latent_cache_kind(cfg: Any) -> str:
    """The kind of latent cache cfg's dynamics objective reads (`ObjectiveRules.latent_cache`)."""
    return OBJECTIVES[cfg.model.dynamics.objective].latent_cache


def inferred_actions_problem(cfg: Any) -> str | None:
    """Actions inferred by a latent action model need action conditioning and an action
    vocabulary that covers them."""
    if not cfg.train.latent_actions_workdir:
        return None
    lam, dc = cfg.model.latent_actions, cfg.model.dynamics
    if not dc.use_actions:
        return "config key 'train.latent_actions_workdir' needs 'model.dynamics.use_actions: true'"
    if dc.num_actions < lam.num_latent_actions:
        return (
            f"config key 'model.dynamics.num_actions' ({dc.num_actions}) must cover the latent "
            f"action vocabulary 'model.latent_actions.num_latent_actions' ({lam.num_latent_actions})"
        )
    return None


def dynamics_problem(cfg: Any) -> str | None:
    """The dynamics stage: its objective's rules, then those of inferred actions."""
    return objective_problem(cfg) or inferred_actions_problem(cfg)


@dataclasses.dataclass(frozen=True)
class StageRules:
    """What a config that trains one stage must satisfy."""

    name: str  # the value of `train.stage`
    check: Check = refuse_latent_actions  # the stage's own checks
    min_frames: int = 1  # data.frames_per_clip at least
    reads_latent_cache: bool = False  # may train on `data.latent_cache` codes instead of frames


TOKENIZER = StageRules("tokenizer")
# min_frames: a context frame and a target; a pair of frames per action.
DYNAMICS = StageRules("dynamics", dynamics_problem, min_frames=2, reads_latent_cache=True)
LATENT_ACTIONS = StageRules("latent_actions", min_frames=2)
# In the order config errors list them (and `wm_jax.stages.STAGES` holds them).
RULES: dict[str, StageRules] = {r.name: r for r in (TOKENIZER, DYNAMICS, LATENT_ACTIONS)}
STAGE_NAMES = tuple(RULES)


def stage_problem(cfg: Any) -> str | None:
    """The checks of cfg's stage (`StageRules.check`), then the options tied to a stage: the
    latent cache and the clip length. The message of the first problem, or None."""
    rules = RULES[cfg.train.stage]
    problem = rules.check(cfg)
    if problem:
        return problem
    if cfg.data.latent_cache and (not rules.reads_latent_cache or cfg.data.mixture):
        readers = " or ".join(r.name for r in RULES.values() if r.reads_latent_cache)
        return (
            f"config key 'data.latent_cache' is for the {readers} stage on one dataset ('data.dir'), "
            "not a mixture or another stage"
        )
    if cfg.data.frames_per_clip < rules.min_frames:
        return f"config key 'data.frames_per_clip' must be >= {rules.min_frames} for the {rules.name} stage"
    return None
