"""Analytic FLOP counts against XLA's own count of the compiled programs."""

import jax
import jax.numpy as jnp
import pytest

from wm_jax import config as config_lib
from wm_jax.models import flops
from wm_jax.models.dynamics import DynamicsModel, make_controls
from wm_jax.models.tokenizer import VideoTokenizer, num_tokens

# Wide enough that matrix products dominate, as in real models; small enough to compile fast.
CFG = config_lib.load(
    None,
    [
        "model.image_size=16",
        "model.tokenizer.embed_dim=128",
        "model.tokenizer.mlp_dim=512",
        "model.tokenizer.num_heads=4",
        "model.dynamics.embed_dim=128",
        "model.dynamics.mlp_dim=512",
        "model.dynamics.num_heads=4",
        "data.frames_per_clip=6",
        "data.batch_size=2",
    ],
)
T = CFG.data.frames_per_clip


def _xla_flops(fn, *args) -> float:
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.dynamics.head=factorized"],
        ["model.dynamics.head=joint"],
        ["model.dynamics.use_identity_bank=true"],
        ["model.dynamics.objective=maskgit"],
    ],
    ids=["factorized", "joint", "identity_bank", "maskgit"],
)
def test_dynamics_forward_matches_xla(overrides):
    cfg = config_lib.replace(CFG, overrides)
    model = DynamicsModel(cfg.model)
    n = num_tokens(cfg.model)
    codes, reference = jnp.zeros((1, T, n, 4)), jnp.zeros((1, n, 4))
    controls = make_controls({"action": jnp.zeros((1, T + 1), jnp.int32)})
    params = jax.eval_shape(model.init, jax.random.key(0), codes, controls, reference)
    xla = _xla_flops(lambda p: model.apply(p, codes, controls, reference), params)
    assert flops.dynamics_forward_flops(cfg.model, T) == pytest.approx(xla, rel=0.05)


@pytest.mark.parametrize(
    "overrides, streams",
    [([], 1), (["model.dynamics.action_conditioning=adaln"], 1), (["model.dynamics.use_identity_bank=true"], 2)],
    ids=["add", "adaln", "identity_bank_two_streams"],
)
def test_diffusion_forward_matches_xla(overrides, streams):
    """The student's pass (one stream) and a shortcut target's jump (two streams)."""
    from wm_jax.models.diffusion import DiffusionDynamics, frame_controls
    from wm_jax.models.tokenizer import latent_width

    cfg = config_lib.replace(
        CFG,
        [
            "model.tokenizer.bottleneck=continuous",
            "model.tokenizer.latent_dim=8",
            "model.dynamics.objective=diffusion",
            *overrides,
        ],
    )
    model = DiffusionDynamics(cfg.model)
    latents = jnp.zeros((1, T, num_tokens(cfg.model), latent_width(cfg.model)))
    controls = frame_controls(make_controls({"action": jnp.zeros((1, T), jnp.int32)}))
    levels, reference = jnp.ones((1, T)), jnp.zeros((1, num_tokens(cfg.model), 8))
    query = (latents, levels, levels) if streams == 2 else None
    params = jax.eval_shape(model.init, jax.random.key(0), latents, controls, levels, levels, reference)
    xla = _xla_flops(lambda p: model.apply(p, latents, controls, levels, levels, reference, query=query), params)
    assert flops.diffusion_forward_flops(cfg.model, T, streams) == pytest.approx(xla, rel=0.05)


def test_tokenizer_forward_and_encode_match_xla():
    model = VideoTokenizer(CFG.model)
    frames = jnp.zeros((1, T, 16, 16, 3))
    params = jax.eval_shape(model.init, jax.random.key(0), frames)
    full = _xla_flops(lambda p: model.apply(p, frames), params)
    encode = _xla_flops(lambda p: model.apply(p, frames, method=model.encode), params)
    assert flops.tokenizer_forward_flops(CFG.model, T) == pytest.approx(full, rel=0.05)
    assert flops.tokenizer_encode_flops(CFG.model, T) == pytest.approx(encode, rel=0.05)


def test_train_step_flops_match_xla_on_the_compiled_step():
    """The whole step (forward, backward, optimizer) as XLA counts it: optimizer and
    elementwise work put XLA a little above the model FLOPs, never below."""
    from wm_jax.train.dry_run import compile_report

    report = compile_report(config_lib.replace(CFG, ["train.stage=tokenizer"]))
    assert report["xla_flops_per_device"] == pytest.approx(report["flops_per_step"], rel=0.1)
    assert report["xla_flops_per_device"] >= report["flops_per_step"]


HAND = config_lib.load(
    None,
    [
        "model.image_size=8",
        "model.tokenizer.patch_size=4",
        "model.tokenizer.fsq_levels=[4,3,3]",
        "model.dynamics.embed_dim=8",
        "model.dynamics.num_layers=1",
        "model.dynamics.num_heads=2",
        "model.dynamics.mlp_dim=16",
        "model.dynamics.head=joint",
    ],
)


def test_dynamics_flops_by_hand():
    """N = 4 tokens, L = 3, D = 8, MLP 16, V = 36, one layer, T = 3 frames.

    Embedding + head per token: 2·D·(L + V) = 624, × 12 tokens = 7,488. Block per token:
    2·(8·D² + 2·D·MLP) = 1,536 plus attention 4·D·(N + T) = 224, × 12 tokens = 21,120.
    """
    assert flops.dynamics_forward_flops(HAND.model, 3) == 7_488 + 21_120
