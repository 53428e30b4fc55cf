"""The registry of training stages: the only place a stage name (`train.stage`) is looked up.

Each stage is a `Stage` (`wm_jax.stages.base`) built in its own module; a new stage is a
new module and one entry in `STAGES`. Everything stage-specific (model, loss, batch fields,
frozen dependencies, FLOPs, config checks, what eval/export/generate do with a run) is
asked of `get_stage(cfg.train.stage)`.
"""

from __future__ import annotations

from wm_jax.config import Config, ConfigError, closest
from wm_jax.stages.base import Role, Stage
from wm_jax.stages.dynamics import DYNAMICS
from wm_jax.stages.latent_actions import LATENT_ACTIONS
from wm_jax.stages.tokenizer import TOKENIZER

# In the order config errors list them.
STAGES: dict[str, Stage] = {s.name: s for s in (TOKENIZER, DYNAMICS, LATENT_ACTIONS)}


def get_stage(name: str) -> Stage:
    """The stage called `name`; ConfigError naming the known stages for any other name."""
    if name not in STAGES:
        raise ConfigError(f"unknown stage '{name}': the stages are {', '.join(STAGES)}" + closest(name, list(STAGES)))
    return STAGES[name]


def names_with(role: Role) -> str:
    """The stages of `role`, as an error message names them ("a or b")."""
    return " or ".join(s.name for s in STAGES.values() if s.role is role)


def check_config(cfg: Config) -> None:
    """The checks of cfg's stage (`Stage.check_config`), then the options tied to a stage:
    the latent cache and the clip length."""
    stage = get_stage(cfg.train.stage)
    stage.check_config(cfg)
    if cfg.data.latent_cache and (not stage.reads_latent_cache or cfg.data.mixture):
        readers = " or ".join(s.name for s in STAGES.values() if s.reads_latent_cache)
        raise ConfigError(f"config key 'data.latent_cache' is for the {readers} stage on one dataset ('data.dir'), "
                          "not a mixture or another stage")
    if cfg.data.frames_per_clip < stage.min_frames:
        raise ConfigError(f"config key 'data.frames_per_clip' must be >= {stage.min_frames} for the {stage.name} stage")


def frozen_workdirs(cfg: Config) -> dict[str, str]:
    """Stage name -> the run directory its config key names ("" when unset), for each
    frozen stage cfg's stage reads (`Stage.frozen_stages`)."""
    frozen = get_stage(cfg.train.stage).frozen_stages(cfg)
    return {name: getattr(cfg.train, STAGES[name].workdir_key.split(".")[1]) for name in frozen}
