"""Rollout engines: the key/value-cached rollout gives the tokens of the uncached one."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wm_jax.config import DynamicsConfig, ModelConfig, TokenizerConfig
from wm_jax.models import tokenizer as tk
from wm_jax.models.dynamics import DynamicsModel, make_controls
from wm_jax.inference.rollout import carry_patches, carry_unchanged, rollout

CFG = ModelConfig(
    image_size=8,
    tokenizer=TokenizerConfig(patch_size=4, fsq_levels=(4, 3, 3)),
    dynamics=DynamicsConfig(
        embed_dim=32,
        num_layers=2,
        num_heads=2,
        mlp_dim=64,
        num_actions=5,
        use_camera=True,
        use_cuts=True,
        use_identity_bank=True,
    ),
)
B, C, H = 2, 3, 32


def _case(cfg, seed=0):
    rng = np.random.default_rng(seed)
    levels = cfg.tokenizer.fsq_levels
    context = tk.indices_to_codes(jnp.asarray(rng.integers(0, 36, (B, C, 4))), levels)
    reference = tk.indices_to_codes(jnp.asarray(rng.integers(0, 36, (B, 4))), levels)
    f = C + H
    camera = np.zeros((B, f, 7), np.float32)
    camera[..., :2] = np.cumsum(rng.integers(-2, 3, (B, f, 2)), axis=1)
    cut = np.zeros((B, f), bool)
    cut[0, 12] = cut[1, 20] = True  # different shots per clip of the batch
    controls = make_controls({"action": rng.integers(0, 5, (B, f)).astype(np.int32), "camera": camera, "cut": cut})
    model = DynamicsModel(cfg)
    params = jax.jit(model.init)(jax.random.key(seed), context, controls.at(slice(0, C)), reference)["params"]
    # adaLN starts at zero (the controls do nothing yet): move every parameter off its init.
    noise = lambda i, x: x + 0.1 * jax.random.normal(jax.random.key(100 + i), x.shape)
    leaves, tree = jax.tree.flatten(params)
    params = jax.tree.unflatten(tree, [noise(i, x) for i, x in enumerate(leaves)])
    return model, params, context, controls, reference


@pytest.mark.parametrize(
    "window, objective, conditioning, sampling",
    [
        (0, "causal", "add", {}),
        (6, "causal", "add", {}),
        (6, "maskgit", "add", {}),
        (0, "maskgit", "add", {"temperature": 2.0}),
        (6, "causal", "adaln", {"temperature": 1.0, "top_k": 3}),
        (6, "causal", "token", {"temperature": 0.5, "guidance": 2.0}),
    ],
    ids=[
        "whole_context",
        "sliding_window_6",
        "maskgit_window_6",
        "maskgit_gumbel",
        "adaln_sampled_top3",
        "token_sampled_guided",
    ],
)
def test_cached_and_uncached_rollouts_give_identical_tokens(window, objective, conditioning, sampling):
    """MaskGIT: 4 decoding passes per frame; the cached engine commits each frame once.
    Every conditioning mode, and sampled / guided decoding, give the same tokens cached."""
    cfg = dataclasses.replace(
        CFG,
        dynamics=dataclasses.replace(
            CFG.dynamics, temporal_window=window, objective=objective, maskgit_steps=4, action_conditioning=conditioning
        ),
    )
    model, params, context, controls, reference = _case(cfg)
    key = jax.random.key(5)
    cached, cached_idx = rollout(model, params, context, controls, H, reference, cached=True, key=key, **sampling)
    uncached, uncached_idx = rollout(model, params, context, controls, H, reference, cached=False, key=key, **sampling)
    assert cached.shape == (B, H, 4, 3) and cached_idx.shape == (B, H, 4)
    np.testing.assert_array_equal(cached_idx, uncached_idx)
    # Not a degenerate rollout: the tokens move.
    assert len(np.unique(np.asarray(cached_idx))) > 5


def test_cut_framing_rolls_out_the_same_cached_and_follows_the_framing():
    cfg = dataclasses.replace(
        CFG,
        dynamics=dataclasses.replace(
            CFG.dynamics, action_conditioning="adaln", cut_framing=True, cut_framing_shift=True
        ),
    )
    model, params, context, controls, reference = _case(cfg)
    # Each cut framed a patch and a half away: the shift moves the tokens, not only the embedding.
    framed = controls.replace(
        camera=controls.camera.at[..., :2].add(controls.next_cut[..., None] * jnp.array([6.0, -5.0]))
    )
    _, cached = rollout(model, params, context, framed, H, reference, cached=True)
    _, uncached = rollout(model, params, context, framed, H, reference, cached=False)
    np.testing.assert_array_equal(cached, uncached)
    _, unframed = rollout(model, params, context, controls, H, reference)
    # Clip 0 cuts into frame 12, the rollout's 10th frame: the same until then, not after.
    same = (np.asarray(cached) == np.asarray(unframed)).all(axis=-1)[0]
    assert same[:9].all() and not same[9:].all()


def test_spatial_rope_rolls_out_the_same_cached_and_changes_the_tokens():
    cfg = dataclasses.replace(CFG, dynamics=dataclasses.replace(CFG.dynamics, action_conditioning="adaln"))
    roped = dataclasses.replace(cfg, dynamics=dataclasses.replace(cfg.dynamics, spatial_rope=True))
    model, params, context, controls, reference = _case(roped)
    key = jax.random.key(5)
    _, cached = rollout(model, params, context, controls, H, reference, cached=True, key=key, temperature=1.0)
    _, uncached = rollout(model, params, context, controls, H, reference, cached=False, key=key, temperature=1.0)
    np.testing.assert_array_equal(cached, uncached)
    # The same parameters without the rotary positions give other tokens: the positions are read.
    _, plain = rollout(DynamicsModel(cfg), params, context, controls, H, reference, key=key, temperature=1.0)
    assert (np.asarray(plain) != np.asarray(cached)).any()


@pytest.mark.parametrize("conditioning", ["add", "adaln", "token"])
def test_rollout_follows_its_controls_and_reference(conditioning):
    model, params, context, controls, reference = _case(
        dataclasses.replace(CFG, dynamics=dataclasses.replace(CFG.dynamics, action_conditioning=conditioning))
    )
    _, base = rollout(model, params, context, controls, 8, reference)
    other_actions = dataclasses.replace(controls, action=(controls.action + 1) % 5)
    _, moved = rollout(model, params, context, other_actions, 8, reference)
    _, other_ref = rollout(model, params, context, controls, 8, jnp.roll(reference, 1, axis=1))
    assert (np.asarray(base) != np.asarray(moved)).any() and (np.asarray(base) != np.asarray(other_ref)).any()


def test_rollout_refuses_too_few_controls():
    model, params, context, controls, reference = _case(CFG)
    with pytest.raises(ValueError, match="need controls for 40 steps"):
        rollout(model, params, context, controls, H + 6, reference)


def test_sampling_temperature_zero_and_top1_are_greedy_and_guidance_one_is_plain():
    model, params, context, controls, reference = _case(CFG)
    _, greedy = rollout(model, params, context, controls, 3, reference)
    key = jax.random.key(1)
    _, top1 = rollout(model, params, context, controls, 3, reference, key=key, temperature=3.0, top_k=1)
    _, plain = rollout(model, params, context, controls, 3, reference, guidance=1.0)
    _, hot = rollout(model, params, context, controls, 3, reference, key=key, temperature=3.0)
    np.testing.assert_array_equal(greedy, top1)
    np.testing.assert_array_equal(greedy, plain)
    assert (np.asarray(hot) != np.asarray(greedy)).any()
    with pytest.raises(ValueError, match="needs a key"):
        rollout(model, params, context, controls, 3, reference, temperature=1.0)


def test_guidance_extrapolates_from_the_unconditional_logits():
    from wm_jax.models.dynamics import guide_logits

    cond, uncond = jnp.array([[1.0, -jnp.inf, 3.0]]), jnp.array([[2.0, -jnp.inf, 1.0]])
    guided = guide_logits(jnp.concatenate([cond, uncond]), 2.0)
    np.testing.assert_allclose(guided, [[0.0, -np.inf, 5.0]])  # uncond + 2 (cond - uncond)


# --- the diffusion engine -------------------------------------------------------------

DIFFUSION = dataclasses.replace(
    CFG,
    tokenizer=TokenizerConfig(patch_size=4, bottleneck="continuous", latent_dim=3),
    dynamics=dataclasses.replace(
        CFG.dynamics,
        objective="diffusion",
        shortcut_max_steps=8,
        sampling_steps=4,
        sample_context_noise=0.1,
        latent_scale=2.0,
    ),
)
DH = 8  # diffusion rollouts run K + 1 passes a frame: a shorter horizon keeps the test quick


def _diffusion_case(cfg, seed=0):
    """A diffusion model moved off its init, continuous context latents [B, C, 4, 3],
    controls with camera moves and a cut inside the rollout (frame 5, frame 8), and
    reference latents [B, 4, 3]."""
    from wm_jax.models.diffusion import DiffusionDynamics, frame_controls

    rng = np.random.default_rng(seed)
    context = jnp.asarray(rng.uniform(-1, 1, (B, C, 4, 3)), jnp.float32)
    reference = jnp.asarray(rng.uniform(-1, 1, (B, 4, 3)), jnp.float32)
    f = C + DH
    cut = np.zeros((B, f), bool)
    cut[0, 5] = cut[1, 8] = True
    controls = make_controls(
        {
            "action": rng.integers(0, 5, (B, f)).astype(np.int32),
            "cut": cut,
            "camera": np.cumsum(rng.normal(size=(B, f, 7)), axis=1).astype(np.float32),
        }
    )
    model = DiffusionDynamics(cfg)
    frames = frame_controls(controls).at(slice(0, C))
    params = jax.jit(model.init)(jax.random.key(seed), context, frames, jnp.ones((B, C)), jnp.ones((B, C)), reference)[
        "params"
    ]
    leaves, tree = jax.tree.flatten(params)
    params = jax.tree.unflatten(
        tree, [x + 0.1 * jax.random.normal(jax.random.key(100 + i), x.shape) for i, x in enumerate(leaves)]
    )
    return model, params, context, controls, reference


@pytest.mark.parametrize(
    "window, conditioning, guidance",
    [(0, "adaln", 1.0), (3, "add", 1.0), (0, "token", 2.0)],
    ids=["whole_context_adaln", "window_3_add", "token_guided"],
)
def test_cached_and_uncached_diffusion_sampling_agree(window, conditioning, guidance):
    """K = 4 jumps a frame against the cache (each frame written once, re-noised) give the
    latents of rerunning every frame at each jump; cuts, a window, an identity bank and
    classifier-free guidance included."""
    cfg = dataclasses.replace(
        DIFFUSION,
        dynamics=dataclasses.replace(DIFFUSION.dynamics, temporal_window=window, action_conditioning=conditioning),
    )
    model, params, context, controls, reference = _diffusion_case(cfg)
    key = jax.random.key(5)
    cached, indices = rollout(model, params, context, controls, DH, reference, cached=True, key=key, guidance=guidance)
    uncached, _ = rollout(model, params, context, controls, DH, reference, cached=False, key=key, guidance=guidance)
    assert cached.shape == (B, DH, 4, 3) and cached.dtype == jnp.float32 and indices is None
    np.testing.assert_allclose(cached, uncached, atol=2e-4)
    assert float(jnp.std(cached[:, -1] - cached[:, 0])) > 1e-2  # the frames move


def test_diffusion_sampling_follows_its_key_actions_and_context():
    model, params, context, controls, reference = _diffusion_case(DIFFUSION)
    run = lambda **kw: np.asarray(
        rollout(model, params, kw.pop("context", context), kw.pop("controls", controls), 4, reference, **kw)[0]
    )
    base = run(key=jax.random.key(1))
    np.testing.assert_array_equal(base, run(key=jax.random.key(1)))
    assert np.abs(base - run(key=jax.random.key(2))).max() > 1e-3
    assert (
        np.abs(base - run(key=jax.random.key(1), controls=controls.replace(action=(controls.action + 1) % 5))).max()
        > 1e-3
    )
    assert np.abs(base - run(key=jax.random.key(1), context=context.at[:, -1].multiply(-1))).max() > 1e-3


def test_carry_patches_is_one_frame_of_carry_unchanged():
    """The serving engine's per-step carry (`carry_patches`) and `wm eval`'s / `wm generate`'s
    whole-rollout one (`carry_unchanged`) render the same frames."""
    rng = np.random.default_rng(0)
    decoded = rng.integers(0, 256, (2, 3, 8, 4, 3), dtype=np.uint8)  # [B, H, S, S', 3]: 4x2 patches of side 2
    codes = rng.integers(0, 2, (2, 4, 8, 1)).astype(np.float32)  # [B, H + 1, N, L]: about half unchanged
    last = rng.integers(0, 256, (2, 8, 4, 3), dtype=np.uint8)
    shown = last
    for t in range(3):
        shown = carry_patches(shown, decoded[:, t], codes[:, t], codes[:, t + 1], 2)
        np.testing.assert_array_equal(shown, carry_unchanged(decoded, codes, last, 2)[:, t])
