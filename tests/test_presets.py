"""Presets and launch templates: found by name, and shipped as package data."""

import configparser
import fnmatch
from pathlib import Path

from wm_jax import config as config_lib
from wm_jax.ops.launch import TEMPLATES
from wm_jax.presets import PRESETS_DIR, preset_name, preset_path

REPO = Path(__file__).resolve().parents[1]


def test_a_name_is_a_shipped_preset():
    path = preset_path("tiny_cpu")
    assert path == PRESETS_DIR / "tiny_cpu.yaml" and path.is_file()
    assert preset_name(path) == "tiny_cpu"
    assert config_lib.load(path).model.image_size == 32


def test_a_path_is_taken_as_given(tmp_path, monkeypatch):
    own = tmp_path / "mine.yaml"
    own.write_text("base: " + str(PRESETS_DIR / "tiny_cpu.yaml") + "\ntrain: {steps: 7}\n")
    assert preset_path(str(own)) == own and preset_name(own) is None
    assert config_lib.load(preset_path(str(own))).train.steps == 7
    # A file in the working directory wins over a preset of the same name.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny_cpu").write_text("")
    assert preset_path("tiny_cpu") == Path("tiny_cpu")
    # A missing .yaml path is not turned into a preset: loading it names the file.
    assert preset_path("nowhere.yaml") == Path("nowhere.yaml")


def test_presets_and_templates_are_declared_package_data():
    """Every shipped file matches setup.cfg's package_data, so `pip install .` carries it."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    patterns = cfg["options.package_data"]["wm_jax"].split()
    package = REPO / "wm_jax"
    shipped = [*PRESETS_DIR.glob("*.yaml"), *TEMPLATES.iterdir()]
    assert len(shipped) > 3
    for path in shipped:
        relative = path.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(relative, p) for p in patterns), relative


def test_the_peer_presets_have_the_peers_shapes():
    """peer_cpu / peer_cpu_dynamics: Jasmine's config as measured for issue 20 (64x64 frames,
    16-frame clips, batch 8, width 128, MLP 512, 2 blocks, 4 heads, 4x4 patches)."""
    for name, stage in (("peer_cpu", "tokenizer"), ("peer_cpu_dynamics", "dynamics")):
        cfg = config_lib.load(preset_path(name))  # validates
        assert cfg.train.stage == stage
        assert (cfg.model.image_size, cfg.data.frames_per_clip, cfg.data.batch_size) == (64, 16, 8)
        assert cfg.model.tokenizer.patch_size == 4
        for sub in (cfg.model.tokenizer, cfg.model.dynamics):
            assert (sub.embed_dim, sub.mlp_dim, sub.num_layers, sub.num_heads) == (128, 512, 2, 4)
    dynamics = config_lib.load(preset_path("peer_cpu_dynamics")).model.dynamics
    assert dynamics.use_actions and not dynamics.use_camera and not dynamics.use_cuts
