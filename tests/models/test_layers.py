"""Layers: patchify round trip, ST-block shapes and causality, dtype, partition metadata."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec

from wm_jax.models import layers


def test_patchify_round_trip():
    frames = jax.random.normal(jax.random.key(0), (2, 3, 16, 12, 3))
    patches = layers.patchify(frames, 4)
    assert patches.shape == (2, 3, 12, 48)
    np.testing.assert_array_equal(layers.unpatchify(patches, 4, 16, 12), frames)


def test_patchify_groups_pixels_of_one_patch():
    frames = jnp.arange(8 * 8 * 3, dtype=jnp.float32).reshape(1, 1, 8, 8, 3)
    patches = layers.patchify(frames, 4)
    # Patch 1 is the top-right 4x4 block.
    np.testing.assert_array_equal(patches[0, 0, 1], frames[0, 0, :4, 4:].reshape(-1))


def test_sinusoidal_embedding_shape_and_distinct_rows():
    emb = layers.sinusoidal_embedding(jnp.arange(10), 9)
    assert emb.shape == (10, 9)
    assert len(np.unique(np.asarray(emb).round(5), axis=0)) == 10


@pytest.fixture(scope="module")
def block_vars():
    """Variables of one small causal block; the block variants below share them."""
    x = jax.random.normal(jax.random.key(1), (2, 5, 6, 16))
    return jax.jit(_block().init)(jax.random.key(2), x), x


def _block(causal=True, dtype=jnp.float32):
    return layers.SpatioTemporalBlock(num_heads=2, mlp_dim=32, causal=causal, dtype=dtype)


_apply_causal = jax.jit(_block().apply)


def test_st_block_shape_and_temporal_causality(block_vars):
    variables, x = block_vars
    y, y2 = _apply_causal(variables, x), _apply_causal(variables, x.at[:, 3:].add(1.0))
    assert y.shape == x.shape and y.dtype == jnp.float32
    np.testing.assert_allclose(y2[:, :3], y[:, :3], atol=1e-6)
    assert not np.allclose(y2[:, 3:], y[:, 3:])


def test_st_block_non_causal_sees_the_future(block_vars):
    variables, x = block_vars
    apply = jax.jit(_block(causal=False).apply)
    y, y2 = apply(variables, x), apply(variables, x.at[:, 3:].add(1.0))
    assert not np.allclose(y2[:, :3], y[:, :3])


def test_st_block_bfloat16_compute_float32_params(block_vars):
    variables, x = block_vars
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(variables)))
    y = jax.jit(_block(dtype=jnp.bfloat16).apply)(variables, x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(y.astype(jnp.float32), _apply_causal(variables, x), atol=0.1)


def test_attention_mask_blocks_keys(block_vars):
    variables, x = block_vars
    attn_vars = {"params": variables["params"]["spatial_attn"]}
    x = x[0, :1, :4]  # [1, 4, 16]
    mask = jnp.array([True, True, False, False])[None, None, None, :]
    apply = jax.jit(layers.Attention(num_heads=2).apply)
    y, y2 = apply(attn_vars, x, mask), apply(attn_vars, x.at[:, 2:].add(5.0), mask)
    np.testing.assert_allclose(y2[:, :2], y[:, :2], atol=1e-6)
    assert not np.allclose(y2[:, 2:], y[:, 2:])


def test_block_params_carry_logical_axes(block_vars):
    variables, _ = block_vars
    specs = nn.get_partition_spec(variables)
    leaves = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, PartitionSpec))
    assert len(leaves) == len(jax.tree.leaves(nn.unbox(variables)))
    assert all(isinstance(s, PartitionSpec) and any(s) for s in leaves)
    params = specs["params"]
    assert params["spatial_attn"]["query"] == PartitionSpec("embed", "heads", "kv")
    assert params["spatial_attn"]["out"] == PartitionSpec("heads", "kv", "embed")
    assert params["mlp"]["wi"]["kernel"] == PartitionSpec("embed", "mlp")


@pytest.mark.parametrize("name,dtype", [("float32", jnp.float32), ("bfloat16", jnp.bfloat16)])
def test_dtype_of(name, dtype):
    assert layers.dtype_of(name) == dtype
