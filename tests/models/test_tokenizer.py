"""Tokenizer: FSQ grid, index round trip, straight-through gradient, shapes, causality, overfit."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from wm_jax import config as config_lib
from wm_jax.config import ModelConfig, TokenizerConfig
from wm_jax.models import layers
from wm_jax.models import tokenizer as tk

LEVELS = (8, 5, 5, 5)
SMALL = ModelConfig(
    image_size=16,
    tokenizer=TokenizerConfig(patch_size=4, embed_dim=32, num_layers=1, num_heads=2, mlp_dim=64, fsq_levels=(4, 3, 3)),
)


@pytest.mark.parametrize("levels", [LEVELS, (2, 3, 4), (7,)])
def test_indices_codes_round_trip_over_whole_vocab(levels):
    vocab = math.prod(levels)
    indices = jnp.arange(vocab, dtype=jnp.int32)
    codes = tk.indices_to_codes(indices, levels)
    assert codes.shape == (vocab, len(levels))
    assert float(codes.min()) >= -1.0 and float(codes.max()) <= 1.0
    assert len(np.unique(np.asarray(codes), axis=0)) == vocab
    np.testing.assert_array_equal(tk.codes_to_indices(codes, levels), indices)


@pytest.mark.parametrize("levels", [LEVELS, (2, 3, 4, 7)])
def test_quantized_values_lie_on_the_grid(levels):
    z = 4.0 * jax.random.normal(jax.random.key(0), (4096, len(levels)))
    codes = tk.fsq_quantize(z, levels)
    assert np.isfinite(np.asarray(codes)).all()
    half_width = np.array(levels) // 2
    digits = np.asarray(codes) * half_width
    np.testing.assert_allclose(digits, np.round(digits), atol=1e-5)
    for i, level in enumerate(levels):
        # Every level of each dimension is reachable, and nothing outside.
        assert sorted(np.unique(np.round(digits[:, i])).tolist()) == list(range(-(level // 2), level - level // 2))
    np.testing.assert_array_equal(tk.indices_to_codes(tk.codes_to_indices(codes, levels), levels), codes)


def test_zero_maps_to_zero_code():
    np.testing.assert_allclose(tk.fsq_bound(jnp.zeros(len(LEVELS)), LEVELS), 0.0, atol=1e-6)


def test_straight_through_gradient():
    z = jax.random.normal(jax.random.key(1), (16, len(LEVELS)))
    grad = jax.grad(lambda z: jnp.sum(tk.fsq_quantize(z, LEVELS)))(z)
    bound_grad = jax.grad(lambda z: jnp.sum(tk.fsq_bound(z, LEVELS) / (np.array(LEVELS) // 2)))(z)
    assert np.all(np.asarray(grad) > 0)
    np.testing.assert_allclose(grad, bound_grad, rtol=1e-6)


def test_num_tokens_and_vocab_size():
    cfg = ModelConfig()
    assert tk.num_tokens(cfg) == 64
    assert tk.vocab_size(cfg) == 1000


@pytest.fixture(scope="module")
def small_model():
    model = tk.VideoTokenizer(SMALL)
    frames = jax.random.uniform(jax.random.key(2), (2, 4, 16, 16, 3), minval=-1, maxval=1)
    variables = jax.jit(model.init)(jax.random.key(3), frames)
    return model, variables, frames


def test_tokenizer_shapes(small_model):
    model, variables, frames = small_model

    @jax.jit
    def run(variables, frames):
        recon, indices = model.apply(variables, frames)
        codes, indices2 = model.apply(variables, frames, method=tk.VideoTokenizer.encode)
        decoded = model.apply(variables, codes, method=tk.VideoTokenizer.decode)
        return recon, indices, codes, indices2, decoded

    recon, indices, codes, indices2, decoded = run(variables, frames)
    assert recon.shape == frames.shape and recon.dtype == jnp.float32
    assert indices.shape == (2, 4, 16) and indices.dtype == jnp.int32
    assert codes.shape == (2, 4, 16, 3) and codes.dtype == jnp.float32
    np.testing.assert_array_equal(indices2, indices)
    np.testing.assert_array_equal(tk.codes_to_indices(codes, SMALL.tokenizer.fsq_levels), indices)
    np.testing.assert_allclose(decoded, recon, atol=1e-5)


def test_encoder_is_temporally_causal(small_model):
    model, variables, frames = small_model
    # Pre-quantization latents: rounding could hide a small leak.
    latents = jax.jit(lambda v, f: model.apply(v, f, method=_latents))
    perturbed = frames.at[:, 2:].set(-frames[:, 2:])
    a, b = latents(variables, frames), latents(variables, perturbed)
    np.testing.assert_allclose(a[:, :2], b[:, :2], atol=1e-6)
    assert not np.allclose(a[:, 2:], b[:, 2:])


def _latents(model, frames):
    """Encoder output before FSQ: float [B, T, N, L]."""
    x = layers.patchify(frames, model.cfg.tokenizer.patch_size)
    x = model.enc_pos(model.patch_embed(x))
    return model.to_latent(model.enc_norm(model.encoder(x)))


def test_tokenizer_params_carry_logical_axes(small_model):
    _, variables, _ = small_model
    specs = jax.tree.leaves(
        nn.get_partition_spec(variables), is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)
    )
    assert len(specs) == len(jax.tree.leaves(nn.unbox(variables)))
    assert all(isinstance(s, jax.sharding.PartitionSpec) and any(s) for s in specs)


def test_tokenizer_overfits_a_fixed_batch(small_model):
    model, variables, _ = small_model
    # Smooth frames (a few blobs) that a small autoencoder can learn quickly.
    yy, xx = jnp.meshgrid(jnp.linspace(-1, 1, 16), jnp.linspace(-1, 1, 16), indexing="ij")
    centres = jax.random.uniform(jax.random.key(4), (2, 4, 1, 1, 3), minval=-0.6, maxval=0.6)
    frames = jnp.tanh(2.0 * jnp.cos(3.0 * (xx[..., None] - centres) + 2.0 * (yy[..., None] + centres)))
    params = nn.unbox(variables)["params"]
    opt = optax.adam(3e-3)

    def loss_fn(p):
        recon, _ = model.apply({"params": p}, frames)
        return jnp.mean(jnp.square(recon - frames))

    @jax.jit
    def train(params):
        def step(carry, _):
            p, s = carry
            loss, g = jax.value_and_grad(loss_fn)(p)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), loss

        _, losses = jax.lax.scan(step, (params, opt.init(params)), None, length=50)
        return losses

    losses = np.asarray(train(params))
    assert np.isfinite(losses).all()
    assert losses[-5:].mean() < 0.3 * losses[:3].mean(), losses


def test_continuous_bottleneck_encodes_bounded_latents_without_indices_and_decodes_them():
    """`bottleneck: continuous`: latent_dim tanh-bounded values per token, no codebook; the
    FSQ default keeps its grid (the tests above) and its width."""
    cfg = ModelConfig(
        image_size=16,
        tokenizer=TokenizerConfig(
            patch_size=4, embed_dim=32, num_layers=1, num_heads=2, mlp_dim=64, bottleneck="continuous", latent_dim=5
        ),
    )
    assert tuple(tk.BOTTLENECKS) == config_lib.BOTTLENECKS  # the config's choices are the model's
    assert tk.latent_width(cfg) == 5 and not tk.has_codebook(cfg)
    assert tk.latent_width(SMALL) == 3 and tk.has_codebook(SMALL)
    model = tk.VideoTokenizer(cfg)
    frames = jax.random.uniform(jax.random.key(2), (2, 3, 16, 16, 3), minval=-1, maxval=1)
    variables = jax.jit(model.init)(jax.random.key(3), frames)
    codes, indices = model.apply(variables, frames, method=tk.VideoTokenizer.encode)
    recon, no_indices = model.apply(variables, frames)
    assert codes.shape == (2, 3, 16, 5) and codes.dtype == jnp.float32 and indices is None and no_indices is None
    assert float(jnp.abs(codes).max()) < 1.0 and len(np.unique(np.asarray(codes))) > 100  # not on a grid
    np.testing.assert_allclose(model.apply(variables, codes, method=tk.VideoTokenizer.decode), recon, atol=1e-5)
    # Gradients reach the encoder through the bound (no straight-through estimator needed).
    grads = jax.grad(lambda v: jnp.sum(model.apply(v, frames, method=tk.VideoTokenizer.encode)[0] ** 2))(variables)
    assert float(jnp.abs(grads["params"]["to_latent"]["kernel"].value).max()) > 0
