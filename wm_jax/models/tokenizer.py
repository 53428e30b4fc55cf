"""Video tokenizer: ST-transformer autoencoder with an FSQ or a continuous bottleneck.

FSQ (finite scalar quantization, Mentzer et al. 2023) bounds each latent dimension to
`levels[i]` values and rounds it; the code is the vector of rounded values scaled to
[-1, 1], and its index is the mixed-radix number of the per-dimension levels. The
continuous bottleneck (`model.tokenizer.bottleneck: continuous`) keeps `latent_dim`
tanh-bounded values per token and has no index: the diffusion dynamics' latents.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from wm_jax.config import ModelConfig, TokenizerConfig
from wm_jax.models import layers

_FSQ_EPS = 1e-3  # keeps tanh's bound strictly inside the outer rounding cells


def num_tokens(cfg: ModelConfig) -> int:
    """Tokens per frame: (image_size / patch_size)^2."""
    return (cfg.image_size // cfg.tokenizer.patch_size) ** 2


def vocab_size(cfg: ModelConfig) -> int:
    """Number of distinct FSQ codes: prod(fsq_levels)."""
    return math.prod(cfg.tokenizer.fsq_levels)


def _half_width(levels: tuple[int, ...]) -> np.ndarray:
    """levels -> float32 [L]: the scale that maps rounded values to [-1, 1]."""
    return (np.asarray(levels) // 2).astype(np.float32)


def _basis(levels: tuple[int, ...]) -> np.ndarray:
    """levels -> int32 [L]: mixed-radix place values (first dimension least significant)."""
    return np.concatenate([[1], np.cumprod(levels[:-1])]).astype(np.int32)


def fsq_bound(z: jax.Array, levels: tuple[int, ...]) -> jax.Array:
    """z float [..., L] -> float32 [..., L] with dim i in the open cell range of levels[i].

    Odd L rounds to {-(L-1)/2..(L-1)/2}; even L needs a half-step offset to round to
    {-L/2..L/2-1}; the shift keeps z=0 mapped to 0 (L=2 has no zero level: no shift).
    """
    lv = np.asarray(levels, dtype=np.float32)
    half_l = (lv - 1) * (1 - _FSQ_EPS) / 2
    offset = np.where(lv % 2 == 0, 0.5, 0.0).astype(np.float32)
    shift = np.arctanh(np.where(lv > 2, offset / half_l, 0.0)).astype(np.float32)
    return jnp.tanh(z.astype(jnp.float32) + shift) * half_l - offset


def fsq_quantize(z: jax.Array, levels: tuple[int, ...]) -> jax.Array:
    """z float [..., L] -> codes float32 [..., L] on the FSQ grid, in [-1, 1].

    Rounding uses a straight-through estimator: the gradient is that of `fsq_bound`.
    """
    bounded = fsq_bound(z, levels)
    rounded = bounded + jax.lax.stop_gradient(jnp.round(bounded) - bounded)
    return rounded / _half_width(levels)


def codes_to_digits(codes: jax.Array, levels: tuple[int, ...]) -> jax.Array:
    """codes float [..., L] on the grid -> digits int32 [..., L], digit i in [0, levels[i])."""
    hw = _half_width(levels)
    return jnp.round(codes.astype(jnp.float32) * hw + hw).astype(jnp.int32)


def digits_to_codes(digits: jax.Array, levels: tuple[int, ...]) -> jax.Array:
    """digits int [..., L] -> codes float32 [..., L] in [-1, 1]; inverse of `codes_to_digits`."""
    hw = _half_width(levels)
    return (digits.astype(jnp.float32) - hw) / hw


def codes_to_indices(codes: jax.Array, levels: tuple[int, ...]) -> jax.Array:
    """codes float [..., L] on the grid -> indices int32 [...] in [0, prod(levels))."""
    return jnp.sum(codes_to_digits(codes, levels) * _basis(levels), axis=-1).astype(jnp.int32)


def indices_to_codes(indices: jax.Array, levels: tuple[int, ...]) -> jax.Array:
    """indices int [...] -> codes float32 [..., L] in [-1, 1]; inverse of `codes_to_indices`."""
    digits = (indices[..., None] // _basis(levels)) % np.asarray(levels, dtype=np.int32)
    return digits_to_codes(digits, levels)


@dataclasses.dataclass(frozen=True)
class Bottleneck:
    """What `model.tokenizer.bottleneck` makes of the encoder's latent."""

    width: Callable[[TokenizerConfig], int]  # values per token (L)
    # latent z float [..., L] -> codes float32 [..., L] in [-1, 1]
    bound: Callable[[jax.Array, TokenizerConfig], jax.Array]
    # codes [..., L] -> int32 indices [...] into its codebook; None: it has none
    indices: Callable[[jax.Array, TokenizerConfig], jax.Array] | None


BOTTLENECKS = {
    "fsq": Bottleneck(
        lambda tc: len(tc.fsq_levels),
        lambda z, tc: fsq_quantize(z, tc.fsq_levels),
        lambda codes, tc: codes_to_indices(codes, tc.fsq_levels),
    ),
    "continuous": Bottleneck(lambda tc: tc.latent_dim, lambda z, tc: jnp.tanh(z.astype(jnp.float32)), None),
}


def latent_width(cfg: ModelConfig) -> int:
    """Values per token of the tokenizer's codes: len(fsq_levels), or latent_dim (continuous)."""
    return BOTTLENECKS[cfg.tokenizer.bottleneck].width(cfg.tokenizer)


def has_codebook(cfg: ModelConfig) -> bool:
    """Whether the tokenizer's codes are discrete (indices, a latent cache, token dynamics)."""
    return BOTTLENECKS[cfg.tokenizer.bottleneck].indices is not None


class VideoTokenizer(nn.Module):
    """Frames [B, T, H, W, 3] in [-1, 1] <-> codes [B, T, N, L] (FSQ, or continuous latents).

    Encoder and decoder temporal attention are causal: the codes of frame t depend on
    frames <= t only, and frame t decodes from codes <= t (so rollouts decode streaming).
    """

    cfg: ModelConfig

    def setup(self) -> None:
        tc = self.cfg.tokenizer
        dtype = layers.dtype_of(self.cfg.dtype)
        stack = dict(
            num_layers=tc.num_layers,
            num_heads=tc.num_heads,
            mlp_dim=tc.mlp_dim,
            causal=True,
            dtype=dtype,
            attention=self.cfg.attention,
            remat=self.cfg.remat,
            remat_policy=self.cfg.remat_policy,
            scan_layers=self.cfg.scan_layers,
            spatial_rope=tc.spatial_rope,
        )
        self.patch_embed = layers.Dense(tc.embed_dim, ("patch", "embed"), dtype)
        self.enc_pos = layers.PositionEmbedding(dtype)
        self.encoder = layers.Transformer(**stack)
        self.enc_norm = layers.RMSNorm(dtype)
        self.to_latent = layers.Dense(latent_width(self.cfg), ("embed", "codebook"), dtype)
        self.from_latent = layers.Dense(tc.embed_dim, ("codebook", "embed"), dtype)
        self.dec_pos = layers.PositionEmbedding(dtype)
        self.decoder = layers.Transformer(**stack)
        self.dec_norm = layers.RMSNorm(dtype)
        # Zero init: the first reconstructions are flat grey, so early gradients are small;
        # a random output layer drives the FSQ inputs into tanh saturation and every token
        # collapses onto one code.
        self.to_patch = layers.Dense(
            tc.patch_size**2 * 3, ("embed", "patch"), dtype, kernel_init=nn.initializers.zeros_init()
        )

    def encode(self, frames: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """frames float [B, T, H, W, 3] -> (codes float32 [B, T, N, L], indices int32 [B, T, N];
        None for the continuous bottleneck)."""
        x = layers.patchify(frames, self.cfg.tokenizer.patch_size)
        x = self.enc_pos(self.patch_embed(x))
        x = self.enc_norm(self.encoder(x))
        bottleneck = BOTTLENECKS[self.cfg.tokenizer.bottleneck]
        codes = bottleneck.bound(self.to_latent(x), self.cfg.tokenizer)
        return codes, None if bottleneck.indices is None else bottleneck.indices(codes, self.cfg.tokenizer)

    def decode(self, codes: jax.Array) -> jax.Array:
        """codes float [B, T, N, L] -> frames float32 [B, T, H, W, 3]."""
        x = self.dec_pos(self.from_latent(codes))
        x = self.dec_norm(self.decoder(x))
        patches = self.to_patch(x).astype(jnp.float32)
        size = self.cfg.image_size
        return layers.unpatchify(patches, self.cfg.tokenizer.patch_size, size, size)

    def decode_step(
        self, codes: jax.Array, index: jax.Array, caches: list[dict[str, jax.Array]]
    ) -> tuple[jax.Array, list[dict[str, jax.Array]]]:
        """The decoder on one new frame against a key/value cache of the earlier frames of its
        time chunk: codes float [B, N, L] of the frame at chunk index `index` (int32 scalar),
        caches per decoder layer {"key", "value": [B*N, heads, T, K]} (`init_decoder_caches`;
        slots past `index` ignored) -> (frames float32 [B, H, W, 3] in [-1, 1], caches with this
        frame written at slot `index`). Equals `decode` of the chunk at that index: the decoder
        is causal in time."""
        x = self.from_latent(codes[:, None])  # [B, 1, N, D]
        spatial = self.dec_pos.variables["params"]["spatial"]  # dec_pos's table, read at `index`
        pos = spatial[None, :, :] + layers.sinusoidal_embedding(index[None], x.shape[-1])[:, None, :]
        x = (x + pos[None]).astype(layers.dtype_of(self.cfg.dtype))
        slots = caches[0]["key"].shape[2]
        mask = jnp.broadcast_to(jnp.arange(slots) <= index, (codes.shape[0], 1, slots))
        x, caches = self.decoder(x, None, None, mask, None, caches, index, None)
        patches = self.to_patch(self.dec_norm(x)).astype(jnp.float32)
        size = self.cfg.image_size
        return layers.unpatchify(patches, self.cfg.tokenizer.patch_size, size, size)[:, 0], caches

    def __call__(self, frames: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """frames float [B, T, H, W, 3] -> (recon float32 [B, T, H, W, 3], indices int32 [B, T, N]
        or None: `encode`'s)."""
        codes, indices = self.encode(frames)
        return self.decode(codes), indices


def init_decoder_caches(cfg: ModelConfig, batch: int, slots: int) -> list[dict[str, jax.Array]]:
    """Empty per-layer caches of the decoder for `VideoTokenizer.decode_step`:
    {"key", "value": [B*N, heads, slots, K]}."""
    tc = cfg.tokenizer
    return layers.kv_caches(
        batch * num_tokens(cfg),
        slots,
        tc.num_heads,
        tc.embed_dim // tc.num_heads,
        tc.num_layers,
        layers.dtype_of(cfg.dtype),
    )
