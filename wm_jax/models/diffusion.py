"""Continuous-latent dynamics: diffusion forcing with shortcut (few-step) sampling.

The model (`model.dynamics.objective: diffusion`) reads the continuous tokenizer's latents
x [B, T, N, W] of a clip, each frame t noised to its own signal level tau_t in [0, 1]
(z = (1 - tau) noise + tau x; 1 is clean: diffusion forcing, Chen et al. 2024), and at
position t predicts the clean frame t (x-prediction) from the noisy frames <= t: the
spatial and causal temporal blocks of `DynamicsModel`, with its controls (frame t gets the
transition t-1 -> t that produced it: `frame_controls`) and its action conditioning. The
signal level and a step size d (the shortcut input: Frans et al. 2024) join the control
vector (`NoiseEmbedding`), so they reach the model however the controls do (adaLN, an
added vector, a control token).

Shortcut: the model learns a jump of size d from tau: z + d (x_hat - z) / (1 - tau) (the
flow's velocity estimated from its x-prediction). At the finest step d = 1/K_max the
target is the clean frame (flow matching); for larger d it is two jumps of d/2 made by
the model itself, under stop-gradient (self-consistency: `shortcut_target`), as in
Dreamer 4's shortcut forcing. Sampling a frame takes K = `sampling_steps` jumps of 1/K.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from wm_jax.models import layers
from wm_jax.models.dynamics import Controls, DynamicsModel, temporal_mask, two_stream_mask
from wm_jax.models.tokenizer import latent_width

NOISE_SCALE = 1000.0  # signal levels in [0, 1] spread over the sinusoid's frequencies (DDPM's timesteps)


def frame_controls(controls: Controls) -> Controls:
    """Controls of the F - 1 transitions of F frames (`make_controls`) -> those of the F
    frames: frame t gets the transition t-1 -> t that produced it, frame 0 a masked one
    (no action, no camera, no cut); segment int32 [B, F] is each frame's own shot."""
    b = controls.action.shape[0]
    first = Controls(
        action=jnp.zeros((b, 1), jnp.int32),
        action_mask=jnp.zeros((b, 1), bool),
        camera=jnp.zeros((b, 1) + controls.camera.shape[2:], controls.camera.dtype),
        camera_mask=jnp.zeros((b, 1), bool),
        next_cut=jnp.zeros((b, 1), bool),
        segment=controls.segment[:, :1],
    )
    shifted = jax.tree.map(lambda f, a: jnp.concatenate([f, a], axis=1), first, controls)
    # A frame's shot: the shot of the frame before it, plus one across a cut.
    return shifted.replace(
        segment=jnp.concatenate(
            [controls.segment[:, :1], controls.segment + controls.next_cut.astype(jnp.int32)], axis=1
        )
    )


def noised(x: jax.Array, noise: jax.Array, signal: jax.Array) -> jax.Array:
    """x, noise float [B, T, N, W], signal float [B, T] -> (1 - signal) noise + signal x."""
    s = signal[..., None, None]
    return (1.0 - s) * noise + s * x


def jump(x_hat: jax.Array, z: jax.Array, signal: jax.Array, step: jax.Array) -> jax.Array:
    """One shortcut step: z float [B, T, N, W] at signal [B, T], the model's clean estimate
    x_hat [B, T, N, W] and step sizes [B, T] -> z at signal + step (x_hat where that is 1)."""
    velocity = (x_hat - z) / jnp.maximum(1.0 - signal, 1e-6)[..., None, None]
    return z + step[..., None, None] * velocity


def sample_levels(
    key: jax.Array, shape: tuple[int, int], max_steps: int, context_noise: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training levels of a batch of clips, shape (B, T) -> (signal float32 [B, T], step
    float32 [B, T], scored bool [B, T]).

    Each clip splits at a random frame s in [0, T-1]: frames before s are context, at a
    signal level 1 - U(0, context_noise) each and the finest step, not scored (anti-drift:
    the sampler's slightly wrong, slightly re-noised past). Frames from s on are
    independent (diffusion forcing): a step size d = 2^-j, j uniform in 0..log2(max_steps),
    and a signal level uniform on d's grid {0, d, .., 1 - d} (a jump of d stays in [0, 1]).
    """
    b, t = shape
    k_split, k_step, k_signal, k_context = jax.random.split(key, 4)
    j = jax.random.randint(k_step, shape, 0, int(math.log2(max_steps)) + 1)
    step = jnp.exp2(-j.astype(jnp.float32))
    signal = jnp.floor(jax.random.uniform(k_signal, shape) * jnp.exp2(j)) * step
    context = jnp.arange(t) < jax.random.randint(k_split, (b, 1), 0, t)
    context_signal = 1.0 - jax.random.uniform(k_context, shape) * context_noise
    return (jnp.where(context, context_signal, signal), jnp.where(context, 1.0 / max_steps, step), ~context)


def shortcut_target(
    half_step: Callable[[jax.Array, jax.Array], jax.Array],
    z: jax.Array,
    clean: jax.Array,
    signal: jax.Array,
    step: jax.Array,
    min_step: float,
) -> jax.Array:
    """The x-prediction target float32 [B, T, N, W] of noisy frames z at (signal, step)
    [B, T]: the clean frames `clean` where step is the finest (the flow target), else the
    endpoint, seen from z, of two jumps of step/2 by the model (`half_step(z', signal')` ->
    its clean estimate at step/2 for each frame, the other frames' inputs unchanged), so
    that one jump of d learns to land where two of d/2 do. Under stop-gradient."""
    half = step / 2
    flow = (step <= min_step * (1 + 1e-6))[..., None, None]
    x_a = half_step(z, signal)
    # Flow frames stay put: near-clean context frames (1 - signal ~ 0) would jump far.
    z_mid = jnp.where(flow, z, jump(x_a, z, signal, half))
    x_b = half_step(z_mid, signal + half)
    # The two half-jumps' mean velocity, as a clean estimate seen from z.
    velocity = (
        (x_a - z) / jnp.maximum(1.0 - signal, 1e-6)[..., None, None]
        + (x_b - z_mid) / jnp.maximum(1.0 - signal - half, 1e-6)[..., None, None]
    ) / 2
    target = z + (1.0 - signal)[..., None, None] * velocity
    return jax.lax.stop_gradient(jnp.where(flow, clean, target))


def loss_weight(signal: jax.Array) -> jax.Array:
    """float [B, T] -> per-frame loss weights 0.1 + 0.9 signal (Dreamer 4's ramp). With
    x-prediction, a nearly pure-noise input can only be answered with the mean frame: its
    error is large and mostly irreducible, and unweighted it would dominate the gradient;
    the ramp spends it on the low-noise levels where a frame's detail is decided (and
    where every sampled frame ends)."""
    return 0.1 + 0.9 * signal


class NoiseEmbedding(nn.Module):
    """A frame's signal level and step size -> a conditioning vector (added to its controls).

    The level goes through sinusoidal features and an MLP (DiT's timestep embedding); the
    step, one of log2(max_steps) + 1 powers of two, picks a learned vector."""

    embed_dim: int
    max_steps: int
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, signal: jax.Array, step: jax.Array) -> jax.Array:
        """signal, step float [B, T] -> float [B, T, D] in `dtype`."""
        shape = signal.shape
        features = layers.sinusoidal_embedding(signal.reshape(-1) * NOISE_SCALE, self.embed_dim)
        h = layers.Dense(self.embed_dim, (None, "embed"), self.dtype, name="signal")(features.reshape(shape + (-1,)))
        table = self.param(
            "step",
            layers.partitioned(nn.initializers.normal(1.0), (None, "embed")),
            (int(math.log2(self.max_steps)) + 1, self.embed_dim),
        )
        index = jnp.clip(jnp.round(-jnp.log2(step)).astype(jnp.int32), 0, table.shape[0] - 1)
        h = h + jnp.take(table, index, axis=0).astype(self.dtype)
        return layers.Dense(self.embed_dim, ("embed", "mlp"), self.dtype, name="out")(nn.silu(h))


class DiffusionDynamics(DynamicsModel):
    """Noisy latents [B, T, N, W] at signal levels and step sizes [B, T] + the frames'
    controls -> clean estimates float32 [B, T, N, W], causal in time (`DynamicsModel`'s
    blocks, control embeddings and identity bank; its token head is unused)."""

    def setup(self) -> None:
        super().setup()
        dc, dtype = self.cfg.dynamics, layers.dtype_of(self.cfg.dtype)
        self.noise_embed = NoiseEmbedding(dc.embed_dim, dc.shortcut_max_steps, dtype)
        self.out = layers.Dense(latent_width(self.cfg), ("embed", "codebook"), dtype)

    def _predict(self, x: jax.Array, cond: jax.Array | None) -> jax.Array:
        """Final tokens [B, T, N', D] (+ adaLN conditioning [B, T, D]) -> clean latents
        float32 [B, T, N, W] (a control token has none)."""
        return self.out(self.final_hidden(x, cond)).astype(jnp.float32)

    def __call__(  # type: ignore[override]
        self,
        latents: jax.Array,
        controls: Controls,
        signal: jax.Array,
        step: jax.Array,
        reference_codes: jax.Array | None = None,
        reference_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        query: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    ) -> jax.Array:
        """latents float [B, T, N, W] (noisy, frame t at signal[:, t] float [B, T] with step
        size step[:, t]), the controls of the T frames (`frame_controls`), reference_codes
        float [B, M, W] / reference_mask bool [B] (identity bank; None: empty), positions
        int [B, T] (default 0..T-1) -> clean estimates float32 [B, T, N, W].

        query: (latents [B, T, N, W], signal, step [B, T]) of a second stream: its frame t
        sees the first stream's frames before t and itself, and its estimates are returned
        (`shortcut_target`'s jumps: frame t moved, its context as the student saw it)."""
        dc = self.cfg.dynamics
        b, t, n, width = latents.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        seg = self._segments(controls)
        mask = temporal_mask(positions, seg, positions, seg, dc.temporal_window)
        memory, memory_mask = self.bank(reference_codes, reference_mask, b, n, width)
        x, cond = self._inputs(latents, controls, None, self.noise_embed(signal, step))
        if query is None:
            return self._predict(self.transformer(x, memory, memory_mask, mask, positions, cond=cond), cond)
        q_latents, q_signal, q_step = query
        xq, cond_q = self._inputs(q_latents, controls, None, self.noise_embed(q_signal, q_step))
        both = None if cond is None else jnp.concatenate([cond, cond_q], axis=1)
        x = self.transformer(
            jnp.concatenate([x, xq], axis=1),
            memory,
            memory_mask,
            two_stream_mask(mask, positions),
            jnp.concatenate([positions, positions], axis=1),
            cond=both,
        )
        return self._predict(x[:, t:], cond_q)

    def decode_step(  # type: ignore[override]
        self,
        latents: jax.Array,
        controls: Controls,
        signal: jax.Array,
        step: jax.Array,
        position: jax.Array,
        caches: list[dict[str, jax.Array]],
        key_positions: jax.Array,
        key_segments: jax.Array,
        memory: jax.Array | None = None,
        memory_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, list[dict[str, jax.Array]]]:
        """One frame against the cached past (`wm_jax/rollout.py`'s diffusion engine):
        latents float [B, 1, N, W] of frame `position` (int32 scalar) at signal / step
        float [B, 1], its controls (T = 1); caches and key_positions int32 [W'] /
        key_segments int32 [B, W'] as in `DynamicsModel.decode_step` (the frame written at
        slot position % W'); memory [B, M, D] / memory_mask bool [B] from `embed_memory`.
        Returns (clean estimate float32 [B, 1, N, W], caches): commit the caches of a
        frame's final (context) pass only."""
        pos, mask = self.cache_mask(controls, position, key_positions, key_segments)
        if not self.cfg.dynamics.use_identity_bank:
            memory = memory_mask = None
        x, cond = self._inputs(latents, controls, None, self.noise_embed(signal, step))
        x, caches = self.transformer(x, memory, memory_mask, mask, pos, caches, position % key_positions.shape[0], cond)
        return self._predict(x, cond), caches


def guide_estimates(x_hat: jax.Array, guidance: float) -> jax.Array:
    """Classifier-free guidance in x-space: estimates [2B, ...] of a batch whose second half
    has its actions masked -> [2B, ...]: uncond + guidance (cond - uncond), for both halves
    (so the unconditional rows follow the guided ones)."""
    cond, uncond = jnp.split(x_hat, 2, axis=0)
    guided = uncond + guidance * (cond - uncond)
    return jnp.concatenate([guided, guided])
