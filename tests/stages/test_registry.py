"""The stage registry: every stage's fields, lookups, the checks it adds to a config, and
the rule that a stage name is switched on in `wm_jax/stages/` only (read with `ast`)."""

from __future__ import annotations

import ast
from pathlib import Path

import jax.numpy as jnp
import pytest
from flax import linen as nn

from wm_jax import config as config_lib
from wm_jax import stage_checks
from wm_jax.config import ConfigError
from wm_jax.models import flops
from wm_jax.models.dynamics import DynamicsModel
from wm_jax.models.latent_actions import LatentActionModel, num_patches
from wm_jax.models.tokenizer import VideoTokenizer, num_tokens
from wm_jax.stages import STAGES, Role, Stage, frozen_workdirs, get_stage, names_with
from wm_jax.stages.dynamics import DYNAMICS, OBJECTIVES, dynamics_model
from wm_jax.stages.latent_actions import LATENT_ACTIONS
from wm_jax.stages.tokenizer import TOKENIZER

REPO = Path(__file__).resolve().parents[2]
SMALL = ["model.image_size=16", "data.frames_per_clip=4", "data.batch_size=2"]


def load(*overrides: str) -> config_lib.Config:
    return config_lib.load(None, [*SMALL, *overrides])


def test_the_registry_lists_each_stage_under_its_name_in_config_order():
    assert list(STAGES) == ["tokenizer", "dynamics", "latent_actions"]
    assert [get_stage(n) for n in STAGES] == [TOKENIZER, DYNAMICS, LATENT_ACTIONS]
    assert all(isinstance(s, Stage) and s.name == n for n, s in STAGES.items())
    # the config checks (JAX-free, below the config) know the same stages, in the same order
    assert tuple(STAGES) == stage_checks.STAGE_NAMES
    assert all(s.rules is stage_checks.RULES[n] for n, s in STAGES.items())


def test_an_unknown_stage_is_refused_naming_the_known_ones():
    with pytest.raises(
        ConfigError, match=r"unknown stage 'diffusion': the stages are tokenizer, dynamics, latent_actions"
    ):
        get_stage("diffusion")
    with pytest.raises(
        ConfigError,
        match=r"'train.stage' must be one of \('tokenizer', 'dynamics', 'latent_actions'\); "
        r"got 'tokeniser' \(did you mean 'tokenizer'\?\)",
    ):
        load("train.stage=tokeniser")


# name: (role, model, model_section, workdir_key, bundled, min_frames, reads_latent_cache, tokens_per_frame)
FIELDS = {
    "tokenizer": (Role.TOKENIZER, VideoTokenizer, "tokenizer", "train.tokenizer_workdir", (), 1, False, num_tokens),
    "dynamics": (Role.WORLD_MODEL, dynamics_model, "dynamics", "", ("tokenizer",), 2, True, num_tokens),
    "latent_actions": (
        Role.ACTION_LABELER,
        LatentActionModel,
        "latent_actions",
        "train.latent_actions_workdir",
        (),
        2,
        False,
        num_patches,
    ),
}


@pytest.mark.parametrize("name", list(STAGES))
def test_each_stage_declares_its_model_dependencies_and_rules(name):
    s = STAGES[name]
    assert (
        s.role,
        s.model,
        s.model_section,
        s.workdir_key,
        s.bundled,
        s.min_frames,
        s.reads_latent_cache,
        s.tokens_per_frame,
    ) == FIELDS[name]
    cfg = load(f"train.stage={name}")
    assert isinstance(s.model(cfg.model), nn.Module) and hasattr(cfg.model, s.model_section)
    assert s.frozen_stages(cfg) == (["tokenizer"] if name == "dynamics" else [])
    controls = ["action", "action_valid", "camera", "camera_valid", "cut"]  # the dynamics defaults use these
    assert s.batch_fields(cfg, None) == ["frame"] + (controls if name == "dynamics" else [])
    assert s.tokens_per_step(cfg) == 2 * 4 * s.tokens_per_frame(cfg.model)
    assert (s.make_log_metrics(cfg) is None) == (name != "dynamics")  # dynamics with actions: action_sensitivity
    assert all(b in s.frozen_stages(cfg) for b in s.bundled)


def test_example_inputs_are_one_clip_of_what_each_model_reads():
    cfg = load()
    frames = (1, 4, 16, 16, 3)
    assert [x.shape for x in TOKENIZER.example_inputs(cfg)] == [frames]
    assert [x.shape for x in LATENT_ACTIONS.example_inputs(cfg)] == [frames]
    codes, controls = DYNAMICS.example_inputs(cfg)
    assert codes.shape == (1, 3, num_tokens(cfg.model), len(cfg.model.tokenizer.fsq_levels))
    assert codes.dtype == jnp.float32 and controls.action.shape == (1, 3)


def test_train_step_flops_of_each_stage():
    """B x (a train step's forward + backward, and the frozen models' forward passes)."""
    b, t = 2, 4
    for stage, per_clip in [
        (TOKENIZER, lambda m: 3 * flops.tokenizer_forward_flops(m, t)),
        (LATENT_ACTIONS, lambda m: 3 * flops.latent_action_forward_flops(m, t)),
    ]:
        cfg = load(f"train.stage={stage.name}")
        assert stage.train_step_flops(cfg) == b * per_clip(cfg.model)
    dyn = load("train.stage=dynamics")
    expected = b * (flops.tokenizer_encode_flops(dyn.model, t) + 3 * flops.dynamics_forward_flops(dyn.model, t - 1))
    assert DYNAMICS.train_step_flops(dyn) == expected
    inferred = load("train.stage=dynamics", "train.latent_actions_workdir=/lam", "model.dynamics.num_actions=8")
    lam = b * flops.latent_action_encode_flops(inferred.model, t)
    assert DYNAMICS.train_step_flops(inferred) == expected + lam
    sampled = load("train.stage=dynamics", "model.dynamics.scheduled_sampling=0.25")  # + a forward pass
    assert DYNAMICS.train_step_flops(sampled) == expected + b * flops.dynamics_forward_flops(dyn.model, t - 1)


def test_each_objective_has_its_model_inputs_flops_and_bottleneck():
    """The dynamics stage's objective registry covers every objective the config allows;
    diffusion reads continuous latents of all T frames (levels and step sizes per frame)
    and costs its student's forward + backward and two two-stream target passes."""
    from wm_jax.models.diffusion import DiffusionDynamics

    assert tuple(OBJECTIVES) == config_lib.DYNAMICS_OBJECTIVES == tuple(stage_checks.OBJECTIVES)
    assert all(o.rules is stage_checks.OBJECTIVES[n] for n, o in OBJECTIVES.items())
    tokens = load("train.stage=dynamics", "model.dynamics.objective=maskgit")
    assert type(DYNAMICS.model(tokens.model)) is DynamicsModel
    cfg = load(
        "train.stage=dynamics",
        "model.dynamics.objective=diffusion",
        "model.tokenizer.bottleneck=continuous",
        "model.tokenizer.latent_dim=6",
    )
    assert type(DYNAMICS.model(cfg.model)) is DiffusionDynamics
    latents, controls, signal, step = DYNAMICS.example_inputs(cfg)
    assert latents.shape == (
        1,
        4,
        num_tokens(cfg.model),
        6,
    ) and controls.action.shape == signal.shape == step.shape == (1, 4)
    student, target = flops.diffusion_forward_flops(cfg.model, 4), flops.diffusion_forward_flops(cfg.model, 4, 2)
    assert DYNAMICS.train_step_flops(cfg) == 2 * (flops.tokenizer_encode_flops(cfg.model, 4) + 3 * student + 2 * target)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.dynamics.objective=diffusion"],
            "'model.dynamics.objective' 'diffusion' needs 'model.tokenizer.bottleneck: continuous'",
        ),
        (
            ["model.tokenizer.bottleneck=continuous"],
            "'model.dynamics.objective' 'causal' needs 'model.tokenizer.bottleneck: fsq'",
        ),
        (
            [
                "model.dynamics.objective=diffusion",
                "model.tokenizer.bottleneck=continuous",
                "model.dynamics.cut_framing_shift=true",
            ],
            "config key 'model.dynamics.cut_framing_shift' is not supported by the 'diffusion' objective",
        ),
        (
            ["model.dynamics.objective=maskgit", "model.dynamics.scheduled_sampling=0.2"],
            "config key 'model.dynamics.scheduled_sampling' is not supported by the 'maskgit' objective",
        ),
        (
            [
                "model.dynamics.objective=diffusion",
                "model.tokenizer.bottleneck=continuous",
                "model.dynamics.motion_weight=2",
            ],
            "config key 'model.dynamics.motion_weight' is not supported by the 'diffusion' objective",
        ),
    ],
)
def test_the_objective_and_the_tokenizer_bottleneck_must_agree(overrides, message):
    with pytest.raises(ConfigError) as e:
        load("train.stage=dynamics", *overrides)
    assert message in str(e.value)
    load("train.stage=tokenizer", "model.tokenizer.bottleneck=continuous")  # a tokenizer of either kind trains


def test_dynamics_reads_a_latent_action_model_and_the_fields_its_options_use():
    plain = load("train.stage=dynamics", "train.tokenizer_workdir=/tok")
    assert frozen_workdirs(plain) == {"tokenizer": "/tok"}
    assert frozen_workdirs(load("train.stage=tokenizer", "train.tokenizer_workdir=/tok")) == {}
    inferred = load("train.stage=dynamics", "train.latent_actions_workdir=/lam", "model.dynamics.num_actions=8")
    assert frozen_workdirs(inferred) == {"tokenizer": "", "latent_actions": "/lam"}
    assert DYNAMICS.batch_fields(inferred, ["frame"]) == [
        "frame",
        "camera",
        "camera_valid",
        "cut",
    ]  # no action: inferred
    steered = load(
        "train.stage=dynamics",
        "model.dynamics.use_camera=false",
        "model.dynamics.use_cuts=true",
        "model.dynamics.use_identity_bank=true",
        "data.latent_cache=/cache",
    )
    assert DYNAMICS.batch_fields(steered, None) == ["codes", "action", "action_valid", "cut", "reference"]
    # Motion weights read the frames, from a latent cache too.
    weighted = load("train.stage=dynamics", "data.latent_cache=/cache", "model.dynamics.motion_weight=2")
    assert DYNAMICS.batch_fields(weighted, None)[:2] == ["codes", "frame"]
    with pytest.raises(ValueError, match="the dynamics stage needs the dataset field 'action'"):
        DYNAMICS.batch_fields(plain, ["frame"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["train.stage=tokenizer", "train.latent_actions_workdir=/lam"],
            "config key 'train.latent_actions_workdir' is for the dynamics stage, not 'tokenizer'",
        ),
        (
            ["train.stage=dynamics", "train.latent_actions_workdir=/lam", "model.dynamics.use_actions=false"],
            "config key 'train.latent_actions_workdir' needs 'model.dynamics.use_actions: true'",
        ),
        (
            ["train.stage=dynamics", "train.latent_actions_workdir=/lam", "model.dynamics.num_actions=2"],
            "config key 'model.dynamics.num_actions' (2) must cover the latent action vocabulary",
        ),
        (
            ["train.stage=latent_actions", "data.latent_cache=/cache"],
            "config key 'data.latent_cache' is for the dynamics stage on one dataset ('data.dir'), not a mixture",
        ),
        (
            ["train.stage=latent_actions", "data.frames_per_clip=1"],
            "config key 'data.frames_per_clip' must be >= 2 for the latent_actions stage",
        ),
    ],
)
def test_a_config_is_checked_against_its_stage(overrides, message):
    with pytest.raises(ConfigError) as e:
        load(*overrides)
    assert message in str(e.value)


def test_generate_names_the_stages_of_a_role():
    assert names_with(Role.WORLD_MODEL) == "dynamics" and names_with(Role.TOKENIZER) == "tokenizer"


# --- no stage switch outside wm_jax/stages/ -----------------------------------------


def is_stage(node: ast.expr) -> bool:
    """`stage`, `cfg.train.stage`, `run.config.train.stage`, ..."""
    return (isinstance(node, ast.Name) and node.id == "stage") or (
        isinstance(node, ast.Attribute) and node.attr == "stage"
    )


def is_text(node: ast.expr) -> bool:
    """A string literal, or a tuple/list/set of them."""
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return bool(node.elts) and all(is_text(e) for e in node.elts)
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def stage_switches(tree: ast.AST) -> list[int]:
    """Lines comparing a stage to a string literal (`==`, `!=`, `in`, `match`), or holding a
    table keyed by stage names."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(map(is_stage, sides)) and any(map(is_text, sides)):
                found.append(node.lineno)
        elif isinstance(node, ast.Match) and is_stage(node.subject):
            if any(isinstance(c.pattern, ast.MatchValue) and is_text(c.pattern.value) for c in node.cases):
                found.append(node.lineno)
        elif isinstance(node, ast.Dict):
            keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
            if len(keys & set(STAGES)) >= 2:
                found.append(node.lineno)
    return sorted(found)


def test_the_switch_finder_sees_each_form():
    code = (
        'if cfg.train.stage == "dynamics": pass\nif stage in ("tokenizer", "x"): pass\n'
        'if "a" != run.config.train.stage: pass\nmodels = {"tokenizer": 1, "dynamics": 2}\n'
        'match cfg.train.stage:\n    case "tokenizer": pass\n'
        "if stage == 0: pass\nif cfg.train.stage == name: pass\n"
    )
    assert stage_switches(ast.parse(code)) == [1, 2, 3, 4, 5]


def test_no_module_outside_the_registry_switches_on_a_stage_name():
    stages_dir = REPO / "wm_jax" / "stages"
    found = [
        f"{path.relative_to(REPO)}:{line}"
        for package in ("wm_jax", "data_pipelines", "benchmarks")
        for path in sorted((REPO / package).rglob("*.py"))
        if stages_dir not in path.parents
        for line in stage_switches(ast.parse(path.read_text(), str(path)))
    ]
    assert not found, "ask wm_jax.stages.get_stage(name) instead:\n" + "\n".join(found)
