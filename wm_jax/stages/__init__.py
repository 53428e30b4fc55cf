"""The registry of training stages: the only place a stage name (`train.stage`) is looked up
(with `wm_jax.stage_checks`, the JAX-free part that validating a config reads).

Each stage is a `Stage` (`wm_jax.stages.base`) built in its own module; a new stage is a
new module, one entry in `STAGES` and its `StageRules` in `wm_jax.stage_checks`. Everything
stage-specific (model, loss, batch fields, frozen dependencies, FLOPs, what
eval/export/generate do with a run) is asked of `get_stage(cfg.train.stage)`; its config
checks, which `config.validate` runs without JAX, are its `rules` (`wm_jax.stage_checks`).
"""

from __future__ import annotations

from wm_jax.config import Config, ConfigError, closest
from wm_jax.stages.base import Role, Stage
from wm_jax.stages.dynamics import DYNAMICS
from wm_jax.stages.latent_actions import LATENT_ACTIONS
from wm_jax.stages.tokenizer import TOKENIZER

# In the order config errors list them (`wm_jax.stage_checks.STAGE_NAMES`).
STAGES: dict[str, Stage] = {s.name: s for s in (TOKENIZER, DYNAMICS, LATENT_ACTIONS)}


def get_stage(name: str) -> Stage:
    """The stage called `name`; ConfigError naming the known stages for any other name."""
    if name not in STAGES:
        raise ConfigError(f"unknown stage '{name}': the stages are {', '.join(STAGES)}" + closest(name, list(STAGES)))
    return STAGES[name]


def names_with(role: Role) -> str:
    """The stages of `role`, as an error message names them ("a or b")."""
    return " or ".join(s.name for s in STAGES.values() if s.role is role)


def frozen_workdirs(cfg: Config) -> dict[str, str]:
    """Stage name -> the run directory its config key names ("" when unset), for each
    frozen stage cfg's stage reads (`Stage.frozen_stages`)."""
    frozen = get_stage(cfg.train.stage).frozen_stages(cfg)
    return {name: getattr(cfg.train, STAGES[name].workdir_key.split(".")[1]) for name in frozen}
