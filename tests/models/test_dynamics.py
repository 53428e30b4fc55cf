"""Dynamics: shapes, exact temporal causality, action conditioning, partition metadata."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from wm_jax.config import DynamicsConfig, ModelConfig, TokenizerConfig
from wm_jax.models import tokenizer as tk
from wm_jax.models.dynamics import DynamicsModel, code_targets, logits_shape, predict_codes, token_loss

CFG = ModelConfig(
    image_size=8,
    tokenizer=TokenizerConfig(patch_size=4, fsq_levels=(4, 3, 3)),
    dynamics=DynamicsConfig(embed_dim=32, num_layers=1, num_heads=2, mlp_dim=64, num_actions=5, head="joint"),
)
B, T, N, L, V = 2, 6, 4, 3, 36


def _inputs(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    indices = jax.random.randint(k1, (B, T, N), 0, V)
    actions = jax.random.randint(k2, (B, T), 0, CFG.dynamics.num_actions)
    return tk.indices_to_codes(indices, CFG.tokenizer.fsq_levels), actions, jnp.ones((B, T), bool)


def _model(use_actions=True):
    cfg = dataclasses.replace(CFG, dynamics=dataclasses.replace(CFG.dynamics, use_actions=use_actions))
    return DynamicsModel(cfg)


@pytest.fixture(scope="module")
def with_actions():
    model = _model()
    return jax.jit(model.apply), jax.jit(model.init)(jax.random.key(1), *_inputs())


def test_output_shape_and_dtype(with_actions):
    apply, variables = with_actions
    codes, actions, mask = _inputs()
    logits = apply(variables, codes, actions, mask)
    assert logits.shape == (B, T, N, V) and logits.dtype == jnp.float32
    assert tk.vocab_size(CFG) == V and tk.num_tokens(CFG) == N


@pytest.mark.parametrize("t", [0, 3])
def test_causality_frames_and_actions(with_actions, t):
    apply, variables = with_actions
    codes, actions, mask = _inputs()
    base = apply(variables, codes, actions, mask)
    codes2, actions2, _ = _inputs(seed=7)
    # Replace everything after time t with other frames and actions.
    codes_p = codes.at[:, t + 1 :].set(codes2[:, t + 1 :])
    actions_p = actions.at[:, t + 1 :].set((actions[:, t + 1 :] + 1) % CFG.dynamics.num_actions)
    out = apply(variables, codes_p, actions_p, mask)
    np.testing.assert_array_equal(out[:, : t + 1], base[:, : t + 1])
    assert np.all(np.abs(np.asarray(out[:, t + 1 :] - base[:, t + 1 :])).max(axis=(2, 3)) > 1e-4)


def test_actions_change_the_prediction(with_actions):
    apply, variables = with_actions
    codes, actions, mask = _inputs()
    base = apply(variables, codes, actions, mask)
    other = apply(variables, codes, actions.at[:, 2].set((actions[:, 2] + 1) % 5), mask)
    np.testing.assert_array_equal(other[:, :2], base[:, :2])
    assert np.abs(np.asarray(other[:, 2:] - base[:, 2:])).max() > 1e-4


def test_action_mask_hides_the_action(with_actions):
    apply, variables = with_actions
    codes, actions, mask = _inputs()
    mask = mask.at[:, 2].set(False)
    base = apply(variables, codes, actions, mask)
    other = apply(variables, codes, actions.at[:, 2].set((actions[:, 2] + 1) % 5), mask)
    np.testing.assert_array_equal(other, base)
    unmasked = apply(variables, codes, actions, jnp.ones_like(mask))
    assert np.abs(np.asarray(unmasked[:, 2:] - base[:, 2:])).max() > 1e-4


def test_use_actions_false_ignores_actions(with_actions):
    model = _model(use_actions=False)
    codes, actions, mask = _inputs()
    shapes = jax.eval_shape(model.init, jax.random.key(1), codes, actions, mask)
    assert "table" not in shapes["params"]["action_embed"]
    # The same weights minus the action table (saves a second init compile).
    _, variables = with_actions
    params = dict(variables["params"], action_embed={"no_action": variables["params"]["action_embed"]["no_action"]})
    apply = jax.jit(model.apply)
    base = apply({"params": params}, codes, actions, mask)
    other = apply({"params": params}, codes, (actions + 1) % 5, jnp.zeros_like(mask))
    np.testing.assert_array_equal(other, base)


def test_params_carry_logical_axes(with_actions):
    _, variables = with_actions
    specs = nn.get_partition_spec(variables)
    leaves = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    assert len(leaves) == len(jax.tree.leaves(nn.unbox(variables)))
    assert all(isinstance(s, jax.sharding.PartitionSpec) and any(s) for s in leaves)
    assert specs["params"]["logits"]["kernel"] == jax.sharding.PartitionSpec("embed", "vocab")


FACTORIZED = dataclasses.replace(CFG, dynamics=dataclasses.replace(CFG.dynamics, head="factorized"))


def test_factorized_head_shape_masks_missing_digits_and_stays_causal():
    model = DynamicsModel(FACTORIZED)
    codes, actions, mask = _inputs()
    variables = jax.jit(model.init)(jax.random.key(1), codes, actions)
    logits = jax.jit(model.apply)(variables, codes, actions)
    assert logits_shape(FACTORIZED) == (L, 4) and logits.shape == (B, T, N, L, 4)
    # levels (4, 3, 3): the 4th slot exists only for the first dimension
    assert np.isfinite(logits[..., 0, :]).all() and np.isneginf(logits[..., 1:, 3]).all()
    codes2, _, _ = _inputs(seed=7)
    out = jax.jit(model.apply)(variables, codes.at[:, 3:].set(codes2[:, 3:]), actions)
    np.testing.assert_array_equal(out[:, :3], logits[:, :3])


@pytest.mark.parametrize("cfg", [CFG, FACTORIZED], ids=["joint", "factorized"])
def test_targets_predictions_and_loss_agree(cfg):
    codes, _, _ = _inputs()
    targets = code_targets(codes, cfg)
    width = logits_shape(cfg)[-1]
    perfect = jnp.where(jax.nn.one_hot(targets, width) > 0, 30.0, -30.0)  # confident and right
    np.testing.assert_array_equal(predict_codes(perfect, cfg), codes)
    loss, accuracy = token_loss(perfect, codes, cfg)
    assert float(accuracy) == 1.0 and float(loss) < 1e-6
    wrong = jnp.roll(perfect, 1, axis=-1)
    _, accuracy = token_loss(wrong, codes, cfg)
    assert float(accuracy) == 0.0
