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


def test_rotary_2d_scores_depend_on_the_grid_offset_only():
    q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 8))
    score = lambda a, b: float(jnp.sum(layers.rotary_2d(q, jnp.array([[a]])) * layers.rotary_2d(k, jnp.array([[b]]))))
    base = score((1, 2), (3, 0))
    assert score((5, 7), (7, 5)) == pytest.approx(base, rel=1e-5)  # both moved by (4, 5)
    assert score((1, 2), (3, 1)) != pytest.approx(base, rel=1e-3)  # another column offset
    assert score((1, 2), (2, 0)) != pytest.approx(base, rel=1e-3)  # another row offset


def test_grid_positions_are_row_major_and_need_a_square_grid():
    np.testing.assert_array_equal(layers.grid_positions(4), [[0, 0], [0, 1], [1, 0], [1, 1]])
    with pytest.raises(ValueError, match="square token grid"):
        layers.grid_positions(6)


def test_spatial_rope_block_is_still_causal_in_time():
    block = layers.SpatioTemporalBlock(num_heads=2, mlp_dim=32, spatial_rope=True)
    x = jax.random.normal(jax.random.key(1), (2, 5, 4, 16))  # a 2x2 token grid
    variables = block.init(jax.random.key(2), x)
    base = block.apply(variables, x)
    later = block.apply(variables, x.at[:, 3:].set(0.0))
    np.testing.assert_array_equal(later[:, :3], base[:, :3])
    plain = layers.SpatioTemporalBlock(num_heads=2, mlp_dim=32).apply(variables, x)
    assert np.abs(np.asarray(plain - base)).max() > 1e-4  # the positions change the output


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


# --- Transformer: scan_layers and remat policies --------------------------------------

_L = 3


def _stack(**kwargs):
    return layers.Transformer(num_layers=_L, num_heads=2, mlp_dim=32, **kwargs)


@pytest.fixture(scope="module")
def stack_params():
    """Unrolled params (block_0..block_{L-1}) and the same params stacked for scan_layers."""
    x = jax.random.normal(jax.random.key(3), (2, 4, 3, 16))
    params = nn.unbox(jax.jit(_stack().init)(jax.random.key(4), x))["params"]
    stacked = {"blocks": jax.tree.map(lambda *p: jnp.stack(p), *[params[f"block_{i}"] for i in range(_L)])}
    return params, stacked, x


@pytest.mark.parametrize("remat", [False, True])
def test_scan_layers_matches_unrolled_stack(stack_params, remat):
    params, stacked, x = stack_params
    y = jax.jit(_stack().apply)({"params": params}, x)
    y_scan = jax.jit(_stack(scan_layers=True, remat=remat).apply)({"params": stacked}, x)
    np.testing.assert_allclose(y_scan, y, atol=1e-5, rtol=1e-5)


def test_scan_layers_decodes_with_per_layer_caches(stack_params):
    params, stacked, x = stack_params
    b, _, n, d = x.shape
    caches = [
        {
            "key": jax.random.normal(jax.random.key(10 + i), (b * n, 2, 4, d // 2)),  # [rows, heads, slots, K]
            "value": jax.random.normal(jax.random.key(20 + i), (b * n, 2, 4, d // 2)),
        }
        for i in range(_L)
    ]
    step, slot = x[:, :1], jnp.int32(2)
    y, new = jax.jit(_stack().apply)({"params": params}, step, caches=caches, slot=slot)
    y_scan, new_scan = jax.jit(_stack(scan_layers=True).apply)({"params": stacked}, step, caches=caches, slot=slot)
    np.testing.assert_allclose(y_scan, y, atol=1e-5, rtol=1e-5)
    assert isinstance(new_scan, list) and len(new_scan) == _L
    jax.tree.map(lambda a, b_: np.testing.assert_allclose(a, b_, atol=1e-5, rtol=1e-5), new_scan, new)


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("policy", ["full", "dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable"])
def test_remat_policy_matches_no_remat(stack_params, policy, scan):
    params, stacked, x = stack_params
    p = stacked if scan else params

    def loss_fn(model):
        return jax.jit(jax.value_and_grad(lambda p: jnp.mean(model.apply({"params": p}, x) ** 2)))

    loss, grads = loss_fn(_stack(scan_layers=scan))(p)
    loss_r, grads_r = loss_fn(_stack(scan_layers=scan, remat=True, remat_policy=policy))(p)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads_r, grads)


def test_scanned_params_have_layers_axis_first(stack_params):
    _, _, x = stack_params
    variables = jax.eval_shape(_stack(scan_layers=True).init, jax.random.key(0), x)
    specs = nn.get_partition_spec(variables)["params"]
    assert set(specs) == {"blocks"}
    leaves = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, PartitionSpec))
    assert leaves and all(s[0] == "layers" for s in leaves)
    assert specs["blocks"]["mlp"]["wi"]["kernel"] == PartitionSpec("layers", "embed", "mlp")
    shapes = nn.unbox(variables)["params"]["blocks"]
    assert shapes["mlp"]["wi"]["kernel"].shape == (_L, 16, 32)


def test_bad_remat_policy_is_rejected():
    from wm_jax import config as config_lib

    with pytest.raises(config_lib.ConfigError, match="model.remat_policy"):
        config_lib.replace(config_lib.Config(), ["model.remat_policy=dots"])


def test_decode_attention_on_a_heads_first_cache_equals_dot_product_attention():
    q, k, v = (jax.random.normal(jax.random.key(i), (3, 1, 2, 8)) for i in range(3))
    cache_k, cache_v = (jax.random.normal(jax.random.key(5 + i), (3, 5, 2, 8)) for i in range(2))
    keys, values = jnp.concatenate([cache_k, k], 1), jnp.concatenate([cache_v, v], 1)  # [B, W, heads, K]
    mask = jnp.asarray([[1, 1, 0, 1, 0, 1], [0, 0, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1]], bool)[:, None, None]
    want = jax.nn.dot_product_attention(q, keys, values, mask=mask)
    got = layers.decode_attention(q, layers.heads_first(keys), layers.heads_first(values), mask)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # A masked slot's contents do not matter.
    changed = layers.decode_attention(q, layers.heads_first(keys.at[1, :5].set(9.0)), layers.heads_first(values), mask)
    np.testing.assert_array_equal(changed[1], got[1])
