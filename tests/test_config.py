"""Config schema: presets load, overrides apply, bad keys and types name the key."""

import pytest

from wm_jax import config as config_lib
from wm_jax.cli import main
from wm_jax.presets import PRESETS_DIR, preset_path

PRESET = preset_path("tiny_cpu")


def test_preset_loads_and_round_trips(tmp_path):
    cfg = config_lib.load(PRESET)
    assert cfg.model.image_size == 32
    config_lib.dump(cfg, tmp_path / "c.yaml")
    assert config_lib.load(tmp_path / "c.yaml") == cfg


def test_overrides_are_typed():
    cfg = config_lib.load(PRESET, ["train.steps=7", "model.tokenizer.fsq_levels=[4, 4]", "train.learning_rate=1"])
    assert cfg.train.steps == 7
    assert cfg.model.tokenizer.fsq_levels == (4, 4)
    assert cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)
    # YAML 1.1 reads exponent floats without a dot as strings; float keys accept them
    assert config_lib.load(PRESET, ["train.learning_rate=3e-4"]).train.learning_rate == 3e-4


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.step=5", ["train.step", "train.steps"]),
        ("model.tokenizer.embed_dm=3", ["model.tokenizer.embed_dm", "model.tokenizer.embed_dim"]),
        ("train.steps=many", ["train.steps", "int"]),
        ("data.batch_size=true", ["data.batch_size", "int"]),
        ("train.stage=dynamic", ["train.stage", "dynamics"]),
        ("model.image_size=30", ["model.image_size", "patch_size"]),
        ("trainsteps", ["key=value"]),
        ("data.latent_cache=cache", ["data.latent_cache", "dynamics"]),  # the preset trains the tokenizer
        ("train.latent_actions_workdir=lam", ["train.latent_actions_workdir", "dynamics"]),
    ],
)
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load(PRESET, [override])
    for w in words:
        assert w in str(e.value)


def test_unknown_key_in_yaml_names_file_and_close_match(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  stpes: 3\n")
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load(path)
    assert "train.stpes" in str(e.value) and "train.steps" in str(e.value) and "bad.yaml" in str(e.value)


def test_errors_name_the_set_option_or_the_file_they_come_from(tmp_path):
    """Issue #16: an error caused by `--set` is attributed to it, not to the preset file."""
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load(PRESET, ["train.steps=5", "train.learning_rate=.nan"])
    assert str(e.value).endswith("[from --set train.learning_rate=.nan]")
    path = tmp_path / "bad.yaml"
    path.write_text(f"base: {PRESET}\ntrain:\n  learning_rate: .nan\n")
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load(path, ["train.steps=5"])
    assert str(e.value).endswith(f"[in {path}]")


def test_base_inheritance(tmp_path):
    (tmp_path / "child.yaml").write_text(f"base: {PRESET}\ntrain:\n  steps: 3\n")
    cfg = config_lib.load(tmp_path / "child.yaml")
    assert cfg.train.steps == 3 and cfg.model.image_size == 32


def test_cli_exits_2_on_config_typo(tmp_path, capsys):
    code = main(["train", "--config", str(PRESET), "--set", "train.stpes=3", "--workdir", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert "train.stpes" in err and "train.steps" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("preset", sorted(PRESETS_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_preset_loads(preset):
    """Presets are validated like user configs (base chains, types, divisibility of heads)."""
    config_lib.load(preset)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.learning_rate=.nan", "train.learning_rate"),
        ("train.learning_rate=.inf", "train.learning_rate"),
        ("eval.guidance=-.inf", "eval.guidance"),
        ("data.mixture=[[a, 1], [b, .nan]]", "data.mixture[1][1]"),
    ],
)
def test_nonfinite_numbers_exit_2_naming_the_key(tmp_path, capsys, override, key):
    """Issue #16, case 8: a NaN or infinite number anywhere is refused before anything runs."""
    code = main(["train", "--config", str(PRESET), "--set", override, "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and f"config key '{key}' must be a finite number" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "key",
    [
        "model.dynamics.action_dropout",
        "model.dynamics.context_corruption",
        "model.dynamics.scheduled_sampling",
        "model.dynamics.context_noise",
        "model.dynamics.sample_context_noise",
    ],
)
@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_training_shares_outside_0_1_are_refused(key, value):
    with pytest.raises(config_lib.ConfigError, match=rf"'{key}' must be in \[0, 1\)"):
        config_lib.load(PRESET, [f"{key}={value}"])


def test_spatial_rope_refuses_the_control_token():
    with pytest.raises(config_lib.ConfigError, match="spatial_rope.*'token'"):
        config_lib.load(PRESET, ["model.dynamics.spatial_rope=true", "model.dynamics.action_conditioning=token"])
    config_lib.load(PRESET, ["model.dynamics.spatial_rope=true", "model.dynamics.action_conditioning=adaln"])


def test_a_cut_framing_residual_needs_the_shift():
    with pytest.raises(config_lib.ConfigError, match="needs 'model.dynamics.cut_framing_shift: true'"):
        config_lib.load(PRESET, ["model.dynamics.cut_framing_residual=true"])
    config_lib.load(PRESET, ["model.dynamics.cut_framing_residual=true", "model.dynamics.cut_framing_shift=true"])


def test_a_negative_motion_weight_is_refused():
    with pytest.raises(config_lib.ConfigError, match="'model.dynamics.motion_weight' must be >= 0; got -1"):
        config_lib.load(PRESET, ["model.dynamics.motion_weight=-1"])
    assert config_lib.load(PRESET, ["model.dynamics.motion_weight=5"]).model.dynamics.motion_weight == 5


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["model.dynamics.sampling_steps=3"], ["'model.dynamics.sampling_steps' must be a power of two"]),
        (["model.dynamics.shortcut_max_steps=0"], ["'model.dynamics.shortcut_max_steps' must be a power of two"]),
        (["model.dynamics.sampling_steps=32"], ["'model.dynamics.sampling_steps' must be <="]),
        (["model.tokenizer.bottleneck=vq"], ["model.tokenizer.bottleneck", "continuous"]),
        (["model.tokenizer.latent_dim=0"], ["model.tokenizer.latent_dim", "> 0"]),
    ],
)
def test_diffusion_and_bottleneck_settings_are_checked(overrides, words):
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load(PRESET, overrides)
    assert all(w in str(e.value) for w in words), str(e.value)
