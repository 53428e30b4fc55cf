"""The diffusion dynamics: per-frame noise levels, causality, the shortcut target, and a
toy that trains (its loss falls, one jump lands where two half jumps do)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from wm_jax.config import DynamicsConfig, ModelConfig, TokenizerConfig
from wm_jax.models.diffusion import DiffusionDynamics, frame_controls, jump, noised, sample_levels, shortcut_target
from wm_jax.models.dynamics import make_controls
from wm_jax.stages.diffusion import diffusion_loss

CFG = ModelConfig(
    image_size=8,
    tokenizer=TokenizerConfig(patch_size=4, bottleneck="continuous", latent_dim=3),
    dynamics=DynamicsConfig(
        embed_dim=32,
        num_layers=2,
        num_heads=2,
        mlp_dim=64,
        objective="diffusion",
        action_conditioning="adaln",
        shortcut_max_steps=8,
        sampling_steps=4,
    ),
)
B, T, N, W = 2, 5, 4, 3


@pytest.fixture(scope="module")
def case():
    """A model with every parameter moved off its init (adaLN starts at zero), noisy
    latents, the frames' controls and per-frame levels."""
    model = DiffusionDynamics(CFG)
    rng = np.random.default_rng(0)
    latents = jnp.asarray(rng.normal(size=(B, T, N, W)), jnp.float32)
    controls = frame_controls(make_controls({"action": rng.integers(0, 5, (B, T)).astype(np.int32)}))
    signal = jnp.asarray(rng.uniform(0, 1, (B, T)), jnp.float32)
    step = jnp.full((B, T), 0.25)
    params = jax.jit(model.init)(jax.random.key(0), latents, controls, signal, step)["params"]
    leaves, tree = jax.tree.flatten(params)
    params = jax.tree.unflatten(
        tree, [x + 0.1 * jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate(leaves)]
    )
    apply = jax.jit(lambda z, s, d, query=None: model.apply({"params": params}, z, controls, s, d, query=query))
    return apply, latents, signal, step


def test_frame_controls_give_each_frame_the_transition_into_it():
    cut = np.zeros((1, 4), bool)
    cut[0, 2] = True
    controls = make_controls({"action": np.array([[1, 2, 3, 4]], np.int32), "cut": cut})
    frames = frame_controls(controls)
    np.testing.assert_array_equal(frames.action, [[0, 1, 2, 3]])
    np.testing.assert_array_equal(frames.action_mask, [[False, True, True, True]])
    np.testing.assert_array_equal(frames.next_cut, [[False, False, True, False]])  # frame 2 opens a shot
    np.testing.assert_array_equal(frames.segment, [[0, 0, 1, 1]])
    assert frames.camera.shape == (1, 4, 7) and not frames.camera_mask[0, 0]


def test_training_levels_are_drawn_per_frame_on_each_steps_grid():
    signal, step, scored = map(np.asarray, sample_levels(jax.random.key(0), (256, 8), 8, 0.1))
    assert scored[:, -1].all() and not scored.all()  # the last frame is always a target; some clips have context
    s, d = signal[scored], step[scored]
    assert set(np.round(np.log2(d)).astype(int)) == {0, -1, -2, -3}
    np.testing.assert_allclose(s / d, np.round(s / d), atol=1e-5)  # on d's grid
    assert (s >= 0).all() and (s + d <= 1 + 1e-6).all()  # a jump of d stays in [0, 1]
    assert ((signal[~scored] >= 0.9) & (step[~scored] == 1 / 8)).all()  # context: slightly noised
    distinct = [len(set(row[keep])) for row, keep in zip(signal, scored) if keep.sum() >= 4]
    assert np.mean([k > 1 for k in distinct]) > 0.9  # independent levels within a clip


def test_each_frame_reads_its_own_noise_level_and_the_past_only(case):
    """Changing frame 2's noise level, or frame 3's content, changes no earlier output;
    frame 2's level changes frame 2's output (it is read per frame)."""
    apply, latents, signal, step = case
    base = np.asarray(apply(latents, signal, step))
    louder = np.asarray(apply(latents, signal.at[:, 2].set(0.0), step))
    np.testing.assert_allclose(louder[:, :2], base[:, :2], atol=1e-6)
    assert np.abs(louder[:, 2] - base[:, 2]).max() > 1e-3
    moved = np.asarray(apply(latents.at[:, 3].add(5.0), signal, step.at[:, 4].set(1.0)))
    np.testing.assert_allclose(moved[:, :3], base[:, :3], atol=1e-6)
    assert np.abs(moved[:, 3] - base[:, 3]).max() > 1e-3


def test_the_query_stream_sees_the_past_as_the_main_stream_and_itself_only(case):
    """A query stream equal to the main stream gives the main stream's outputs; moving query
    frame 3 changes query output 3 alone."""
    apply, latents, signal, step = case
    base = np.asarray(apply(latents, signal, step))
    same = np.asarray(apply(latents, signal, step, (latents, signal, step)))
    np.testing.assert_allclose(same, base, atol=1e-5)
    moved = np.asarray(apply(latents, signal, step, (latents.at[:, 3].add(5.0), signal, step)))
    np.testing.assert_allclose(np.delete(moved, 3, axis=1), np.delete(base, 3, axis=1), atol=1e-5)
    assert np.abs(moved[:, 3] - base[:, 3]).max() > 1e-3


def test_the_shortcut_target_is_the_clean_frame_at_the_finest_step_and_two_half_jumps_above():
    """A model that always answers x* has straight paths: two half jumps land on x*."""
    rng = np.random.default_rng(1)
    z, clean, x_star = (jnp.asarray(rng.normal(size=(1, 3, N, W)), jnp.float32) for _ in range(3))
    signal, step = jnp.array([[0.0, 0.5, 0.25]]), jnp.array([[0.125, 0.5, 0.25]])
    target = np.asarray(shortcut_target(lambda zq, sq: x_star, z, clean, signal, step, 0.125))
    np.testing.assert_allclose(target[:, 0], clean[:, 0], atol=1e-6)
    np.testing.assert_allclose(target[:, 1:], x_star[:, 1:], atol=1e-5)
    np.testing.assert_allclose(jump(x_star, z, jnp.zeros((1, 3)), jnp.ones((1, 3))), x_star, atol=1e-6)
    np.testing.assert_allclose(noised(clean, z, jnp.ones((1, 3))), clean)


def _toy_batch(key):
    """Toy clips: frame 0 is one of two fixed patterns, and action 1 flips the sign of the
    frame (action 0 keeps it): latents float32 [16, 4, N, W], actions int32 [16, 4]."""
    k_start, k_action = jax.random.split(key)
    pattern = jnp.linspace(-0.8, 0.8, N * W).reshape(N, W)
    sign = jnp.where(jax.random.bernoulli(k_start, 0.5, (16, 1)), 1.0, -1.0)
    actions = jax.random.bernoulli(k_action, 0.5, (16, 4)).astype(jnp.int32)
    flips = jnp.cumprod(jnp.concatenate([jnp.ones((16, 1)), 1.0 - 2.0 * actions[:, :-1]], axis=1), axis=1)
    return (sign * flips)[..., None, None] * pattern, actions


@functools.partial(jax.jit, static_argnums=0)
def _one_vs_two_jumps(model, params, latents, actions):
    """Mean squared gap between frame 3 sampled from the same noise in one jump of 1 and in
    two jumps of 1/2 (the context clean), and the two-jump sample's error (jitted: one
    compile instead of one per op of three eager forward passes)."""
    controls = frame_controls(make_controls({"action": actions}))
    b = latents.shape[0]
    z = latents.at[:, 3].set(jax.random.normal(jax.random.key(9), latents[:, 3].shape))
    level = lambda s: jnp.ones((b, 4)).at[:, 3].set(s)

    def estimate(z, s, d):
        return model.apply({"params": params}, z, controls, level(s), jnp.full((b, 4), 1 / 8).at[:, 3].set(d))

    one = estimate(z, 0.0, 1.0)[:, 3]
    half = z.at[:, 3].set(jump(estimate(z, 0.0, 0.5), z, level(0.0), jnp.full((b, 4), 0.5))[:, 3])
    two = estimate(half, 0.5, 0.5)[:, 3]
    return jnp.mean(jnp.square(one - two)), jnp.mean(jnp.square(two - latents[:, 3]))


def test_a_toy_trains_its_loss_falls_and_one_jump_lands_where_two_half_jumps_do():
    cfg = ModelConfig(
        image_size=8,
        tokenizer=CFG.tokenizer,
        dynamics=DynamicsConfig(
            embed_dim=32,
            num_layers=1,
            num_heads=2,
            mlp_dim=64,
            num_actions=2,
            objective="diffusion",
            action_conditioning="adaln",
            shortcut_max_steps=8,
            use_camera=False,
            use_cuts=False,
        ),
    )
    model = DiffusionDynamics(cfg)
    latents, actions = _toy_batch(jax.random.key(0))
    controls = frame_controls(make_controls({"action": actions}))
    params = jax.jit(model.init)(jax.random.key(1), latents, controls, jnp.ones((16, 4)), jnp.ones((16, 4)))["params"]
    opt = optax.adam(3e-3)

    @jax.jit
    def train(params, opt_state, key):
        def body(carry, k):
            params, opt_state = carry
            x, a = _toy_batch(jax.random.fold_in(k, 0))
            (loss, _), grads = jax.value_and_grad(diffusion_loss, has_aux=True)(
                params, model, {"action": a}, x, (None, None), jax.random.fold_in(k, 1)
            )
            updates, opt_state = opt.update(grads, opt_state)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), jax.random.split(key, 600))
        return params, opt_state, losses

    before = tuple(map(float, _one_vs_two_jumps(model, params, latents, actions)))
    params, _, losses = train(params, opt.init(params), jax.random.key(2))
    after = tuple(map(float, _one_vs_two_jumps(model, params, latents, actions)))
    first, last = float(losses[:60].mean()), float(losses[-60:].mean())
    assert last < 0.5 * first, (first, last)
    # The toy's frame 3 is determined by its context: two half jumps find it, and one jump
    # lands where they do (600 steps: errors ~0.03 and ~0.007 of a power of 0.25).
    power = float(jnp.mean(jnp.square(latents)))
    assert after[1] < 0.2 * power, after
    assert after[0] < 0.05 * power and after[0] < before[0] / 4, (before, after)
