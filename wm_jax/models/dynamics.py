"""Dynamics model: Genie-style ST-transformer predicting frame t+1's tokens.

Inputs are the FSQ code vectors of frames 0..T-1 (projected linearly: continuous inputs
share structure between neighbouring codes, unlike an index embedding) plus the controls
that take frame t to t+1 (`Controls`: action, camera move, a cut into a new shot and its
framing), each embedded and masked where unknown. Temporal attention is causal with
rotary frame positions, stays inside a shot, and optionally sees only the last
`temporal_window` frames; every frame also attends to an identity bank (memory tokens
made from the episode's reference frame), which cuts do not clear. `decode_step` runs one
new frame against a key/value cache of the past (the rollout engine in `wm_jax/rollout.py`).

Objective (`model.dynamics.objective`): "causal" predicts all of frame t+1's tokens at
position t in one pass; "maskgit" also feeds position t frame t+1 partially masked and
predicts the masked tokens (trained on random cosine-schedule masks, decoded in
`maskgit_steps` passes; see `DynamicsModel.__call__` for its two streams).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import struct

from wm_jax.config import ModelConfig
from wm_jax.models import layers
from wm_jax.models.tokenizer import (
    codes_to_digits,
    codes_to_indices,
    digits_to_codes,
    indices_to_codes,
    num_tokens,
    vocab_size,
)


# Control embeddings start at unit scale, the scale of the code embeddings they join: at
# the 0.02 of a position table, the action stayed a negligible bias that training did not
# grow (rows ~0.2 after training, next to codes ~4) and the model ignored it.
CONTROL_INIT = nn.initializers.normal(1.0)


class ActionEmbedding(nn.Module):
    """Discrete action ids -> per-frame embeddings, with a learned "no action" vector."""

    num_actions: int
    embed_dim: int
    use_actions: bool = True
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, actions: jax.Array, action_mask: jax.Array | None = None) -> jax.Array:
        """actions int [B, T], action_mask bool [B, T] | None -> float [B, T, D] in `dtype`.

        Where `action_mask` is False, or everywhere when `use_actions` is False, the
        "no action" embedding replaces the action's.
        """
        none = self.param("no_action", layers.partitioned(CONTROL_INIT, ("embed",)), (self.embed_dim,))
        if not self.use_actions:
            return jnp.broadcast_to(none, actions.shape + (self.embed_dim,)).astype(self.dtype)
        # The action table is tiny: replicated along its action axis.
        table = self.param(
            "table",
            layers.partitioned(CONTROL_INIT, (None, "embed")),
            (self.num_actions, self.embed_dim),
        )
        emb = jnp.take(table, actions, axis=0, mode="clip")
        if action_mask is not None:
            emb = jnp.where(action_mask[..., None], emb, none)
        return emb.astype(self.dtype)


def sequence_tokens(cfg: ModelConfig) -> int:
    """Tokens per frame inside the dynamics transformer (and its key/value cache): the
    tokenizer's N, plus the control token of `action_conditioning: token`."""
    return num_tokens(cfg) + (cfg.dynamics.action_conditioning == "token")


def _digit_mask(levels: tuple[int, ...]) -> np.ndarray:
    """bool [L, max(levels)]: which digit slots exist for each FSQ dimension."""
    return np.arange(max(levels))[None, :] < np.asarray(levels)[:, None]


def logits_shape(cfg: ModelConfig) -> tuple[int, ...]:
    """Trailing logits shape per token: (V,) for the joint head, (L, max level) factorized."""
    levels = cfg.tokenizer.fsq_levels
    return (vocab_size(cfg),) if cfg.dynamics.head == "joint" else (len(levels), max(levels))


def code_targets(codes: jax.Array, cfg: ModelConfig) -> jax.Array:
    """codes float [..., L] -> int32 targets: [...] codebook indices (joint) or [..., L] digits."""
    levels = cfg.tokenizer.fsq_levels
    return codes_to_indices(codes, levels) if cfg.dynamics.head == "joint" else codes_to_digits(codes, levels)


def predict_codes(
    logits: jax.Array, cfg: ModelConfig, log_prob: bool = False
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Greedy prediction: logits [..., *logits_shape] -> codes float32 [..., L]; with
    `log_prob`, also the log-probability float32 [...] of each predicted token (the sum
    over dimensions for the factorized head): MaskGIT's confidence."""
    levels = cfg.tokenizer.fsq_levels
    best = jnp.argmax(logits, axis=-1)
    codes = indices_to_codes(best, levels) if cfg.dynamics.head == "joint" else digits_to_codes(best, levels)
    if not log_prob:
        return codes
    logp = jnp.max(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1)
    return codes, (logp.sum(axis=-1) if cfg.dynamics.head == "factorized" else logp)


def sample_codes(
    logits: jax.Array, cfg: ModelConfig, key: jax.Array | None, temperature: float = 0.0, top_k: int = 0
) -> jax.Array:
    """logits [..., *logits_shape] -> codes float32 [..., L]: each token (each digit, for
    the factorized head) drawn from softmax(logits / temperature) over its top_k most
    likely values (0: all). temperature 0 is greedy (`predict_codes`). Sampling keeps the
    small, uncertain things (a 2-px agent) that an argmax over a blurred belief erases."""
    if temperature <= 0:
        return predict_codes(logits, cfg)
    x = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(x, min(top_k, x.shape[-1]))[0][..., -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    choice = jax.random.categorical(key, x, axis=-1)
    levels = cfg.tokenizer.fsq_levels
    return indices_to_codes(choice, levels) if cfg.dynamics.head == "joint" else digits_to_codes(choice, levels)


def guide_logits(logits: jax.Array, guidance: float) -> jax.Array:
    """Classifier-free guidance: logits [2B, ...] of a batch whose second half has its
    actions masked -> [B, ...] uncond + guidance * (cond - uncond). Slots that are -inf
    (a factorized head's missing digits) stay -inf."""
    cond, uncond = jnp.split(logits, 2, axis=0)
    return jnp.where(jnp.isfinite(cond), uncond + guidance * (cond - uncond), cond)


def token_loss(
    logits: jax.Array,
    target_codes: jax.Array,
    cfg: ModelConfig,
    mask: jax.Array | None = None,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy and exact-token accuracy of logits [B,T,N,*] against codes [B,T,N,L],
    over the tokens where `mask` bool [B,T,N] is True (None: all; MaskGIT: the masked ones).
    weights float32 [B,T,N] (None: 1): the loss is the weighted mean over those tokens
    (`motion_weights`); the accuracy stays unweighted.

    Factorized: the loss sums the per-dimension cross-entropies of a token; a token is
    correct when every dimension is."""
    targets = code_targets(target_codes, cfg)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    hit = jnp.argmax(logits, axis=-1) == targets
    if cfg.dynamics.head == "factorized":
        ce, hit = ce.sum(axis=-1), hit.all(axis=-1)
    if mask is None and weights is None:
        return jnp.mean(ce), jnp.mean(hit)
    mask = jnp.ones(ce.shape, bool) if mask is None else mask
    w = mask.astype(jnp.float32) if weights is None else jnp.where(mask, weights, 0.0)
    count = jnp.maximum(jnp.sum(mask), 1)
    return jnp.sum(w * ce) / jnp.maximum(jnp.sum(w), 1e-6), jnp.sum(mask & hit) / count


def motion_weights(frames: jax.Array, patch: int, strength: float) -> jax.Array:
    """Loss weights of the next-frame targets from pixel motion: uint8 frames [B,T,H,W,3]
    -> float32 [B,T-1,N], N = (H/patch)(W/patch) row-major patches (the tokenizer's).

    Target t+1's token n weighs 1 + strength * m / mean(m), m its patch's mean absolute
    change from frame t (over pixels and channels, in [0, 1]) and mean(m) the batch's.
    Small things that move (an agent: a few of 64 tokens) weigh more than a panned
    background, whose change is spread thin; static patches keep weight 1."""
    f = frames.astype(jnp.float32) / 255.0
    change = jnp.abs(f[:, 1:] - f[:, :-1]).mean(axis=-1)  # [B, T-1, H, W]
    b, t, h, w = change.shape
    m = change.reshape(b, t, h // patch, patch, w // patch, patch).mean(axis=(3, 5)).reshape(b, t, -1)
    return 1.0 + strength * m / (jnp.mean(m) + 1e-6)


# --- MaskGIT: masks for training, the cosine decoding schedule, one decoding step -------


def maskgit_schedule(num_tokens: int, steps: int) -> np.ndarray:
    """int32 [steps]: a frame's tokens still masked after each of the K = `steps` decoding
    passes, ceil(N cos(pi/2 (k+1)/K)) for k = 0..K-1 (the cosine schedule; 0 after the last)."""
    k = np.arange(1, steps + 1)
    # The epsilon keeps float error (cos(pi/3) = 0.5000000000000001) from rounding up.
    remaining = np.ceil(num_tokens * np.cos(np.pi / 2 * k / steps) - 1e-6).astype(np.int32)
    remaining[-1] = 0
    return np.clip(remaining, 0, num_tokens)


def sample_maskgit_mask(key: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
    """Training mask bool [B, T, N] (True: hidden) of frame t+1's tokens at each (clip,
    position): r ~ U(0, 1], ceil(N cos(pi/2 r)) tokens (at least 1) chosen at random."""
    b, t, n = shape
    k_ratio, k_order = jax.random.split(key)
    r = 1.0 - jax.random.uniform(k_ratio, (b, t))  # (0, 1]
    count = jnp.clip(jnp.ceil(n * jnp.cos(jnp.pi / 2 * r)), 1, n)
    rank = jnp.argsort(jnp.argsort(jax.random.uniform(k_order, (b, t, n)), axis=-1), axis=-1)
    return rank < count[..., None]


def corrupt_codes(codes: jax.Array, key: jax.Array, max_rate: float, levels: tuple[int, ...]) -> jax.Array:
    """codes float32 [B, T, N, L] -> the same with each frame's tokens replaced by uniformly
    random codes at a rate r ~ U(0, max_rate) drawn per (clip, frame): a model trained on
    them learns to read through the errors of its own rollouts."""
    b, t, n, _ = codes.shape
    k_rate, k_hit, k_code = jax.random.split(key, 3)
    rate = jax.random.uniform(k_rate, (b, t, 1), maxval=max_rate)
    hit = jax.random.uniform(k_hit, (b, t, n)) < rate
    noise = indices_to_codes(jax.random.randint(k_code, (b, t, n), 0, math.prod(levels)), levels)
    return jnp.where(hit[..., None], noise, codes)


def maskgit_update(
    logits: jax.Array,
    guess: jax.Array,
    masked: jax.Array,
    remaining: jax.Array,
    cfg: ModelConfig,
    noise: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One MaskGIT decoding step of a frame.

    logits [B, N, *logits_shape] of this pass; guess float [B, N, L] (meaningful where
    not `masked` bool [B, N]); remaining int: tokens to leave masked (<= masked count);
    noise float [B, N] added to the confidences (None: greedy order). Every masked token
    takes its argmax; the `remaining` least confident of them are masked again, decided
    tokens stay. Returns (guess, masked).
    """
    pred, confidence = predict_codes(logits, cfg, log_prob=True)
    if noise is not None:
        confidence = confidence + noise
    confidence = jnp.where(masked, confidence, jnp.inf)
    guess = jnp.where(masked[..., None], pred, guess)
    rank = jnp.argsort(jnp.argsort(confidence, axis=-1), axis=-1)  # 0: least confident
    return guess, rank < remaining


CAMERA_DIM = 7  # pose: position x, y, z + rotation quaternion w, x, y, z


@struct.dataclass
class Controls:
    """What takes frame t to t+1, for input positions t = 0..T-1 of a clip.

    action int32 [B, T] and action_mask bool [B, T]; camera float32 [B, T, 7]: the pose
    change (position delta, then the rotation of frame t+1; across a cut the delta is the
    new shot's framing relative to the previous shot's last frame) and camera_mask bool
    [B, T]; next_cut bool [B, T]: frame t+1 starts a new shot; segment int32 [B, T]: the
    shot of input frame t (temporal attention stays inside one).
    """

    action: jax.Array
    action_mask: jax.Array
    camera: jax.Array
    camera_mask: jax.Array
    next_cut: jax.Array
    segment: jax.Array

    def at(self, index: slice | int | jax.Array) -> "Controls":
        """The controls of positions `index`: a slice, or one position (an int, or an int32
        scalar that may be traced: inside a jitted step) kept as length 1."""
        if isinstance(index, slice):
            return jax.tree.map(lambda a: a[:, index], self)
        if isinstance(index, int):
            return jax.tree.map(lambda a: a[:, index : index + 1], self)
        return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, index, 1, axis=1), self)


def make_controls(steps: dict[str, jax.Array]) -> Controls:
    """Per-frame record fields of F frames -> the controls of the F-1 transitions.

    steps: "action" int [B, F] (action t takes frame t to t+1) and, each optional,
    "camera" float [B, F, 7], "cut" bool [B, F], "action_valid"/"camera_valid" bool [B, F].
    A field a dataset lacks is unknown everywhere: masked (camera) or no cut.
    """
    action = jnp.asarray(steps["action"])
    b, f = action.shape
    valid = lambda name: jnp.asarray(steps[name], bool) if name in steps else jnp.ones((b, f), bool)
    cut = jnp.asarray(steps["cut"], bool) if "cut" in steps else jnp.zeros((b, f), bool)
    if "camera" in steps:
        camera = jnp.asarray(steps["camera"], jnp.float32)
        delta = camera[:, 1:, :3] - camera[:, :-1, :3]
        camera_feat = jnp.concatenate([delta, camera[:, 1:, 3:]], axis=-1)
        camera_valid = valid("camera_valid")
        camera_mask = camera_valid[:, 1:] & camera_valid[:, :-1]
    else:
        camera_feat = jnp.zeros((b, f - 1, CAMERA_DIM), jnp.float32)
        camera_mask = jnp.zeros((b, f - 1), bool)
    return Controls(
        action=action[:, :-1].astype(jnp.int32),
        action_mask=valid("action_valid")[:, :-1],
        camera=camera_feat,
        camera_mask=camera_mask,
        next_cut=cut[:, 1:],
        # The first frame of a clip starts its segment whether or not it is a cut.
        segment=jnp.cumsum(cut[:, :-1].at[:, 0].set(False), axis=1, dtype=jnp.int32),
    )


def drop_actions(controls: Controls, rate: float, key: jax.Array) -> Controls:
    """Action dropout: controls of [B, T] positions with each action masked ("no action")
    with probability `rate` (the unconditional case of classifier-free guidance)."""
    dropped = jax.random.bernoulli(key, rate, controls.action_mask.shape)
    return controls.replace(action_mask=controls.action_mask & ~dropped)


def two_stream_mask(mask: jax.Array, positions: jax.Array) -> jax.Array:
    """The temporal mask bool [B, 2T, 2T] of a context stream and a query stream side by
    side (keys: context 0..T-1, then query 0..T-1), from the context's own mask bool
    [B, T, T] and positions int [B, T]: context sees context (`mask`); query t sees the
    context before t (same shot, window) and query t itself."""
    t = positions.shape[1]
    before = mask & (positions[:, None, :] < positions[:, :, None])
    itself = jnp.broadcast_to(jnp.eye(t, dtype=bool), mask.shape)
    return jnp.concatenate(
        [
            jnp.concatenate([mask, jnp.zeros_like(mask)], axis=2),
            jnp.concatenate([before, itself], axis=2),
        ],
        axis=1,
    )


def temporal_mask(
    query_pos: jax.Array, query_seg: jax.Array, key_pos: jax.Array, key_seg: jax.Array, window: int
) -> jax.Array:
    """Which keys a temporal query may attend to: bool [B, Q, K].

    Positions int [B, Q] / [B, K] (a key position < 0 is an empty cache slot), segments
    int of the same shapes. A query sees keys at or before it, in its shot, and (window
    > 0) fewer than `window` frames back.
    """
    qp, kp = query_pos[:, :, None], key_pos[:, None, :]
    ok = (kp >= 0) & (kp <= qp) & (query_seg[:, :, None] == key_seg[:, None, :])
    return ok & (qp - kp < window) if window > 0 else ok


class CameraEmbedding(nn.Module):
    """Camera pose changes [B, T, 7] -> embeddings, with a learned "no camera" vector."""

    embed_dim: int
    use_camera: bool = True
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, camera: jax.Array, camera_mask: jax.Array) -> jax.Array:
        """camera float [B, T, 7], camera_mask bool [B, T] -> float [B, T, D] in `dtype`."""
        none = self.param("no_camera", layers.partitioned(CONTROL_INIT, ("embed",)), (self.embed_dim,))
        if not self.use_camera:
            return jnp.broadcast_to(none, camera.shape[:-1] + (self.embed_dim,)).astype(self.dtype)
        emb = layers.Dense(self.embed_dim, (None, "embed"), self.dtype, name="proj")(camera)
        return jnp.where(camera_mask[..., None], emb, none.astype(self.dtype))


def framed_cuts(cfg: ModelConfig) -> bool:
    """Whether the model is told a cut's framing (`cut_framing` or `cut_framing_shift`,
    with cuts and camera on)."""
    dc = cfg.dynamics
    return (dc.cut_framing or dc.cut_framing_shift) and dc.use_cuts and dc.use_camera


def shift_tokens(x: jax.Array, jump: jax.Array, grid: int, patch: int) -> tuple[jax.Array, jax.Array]:
    """Tokens x [B, T, N, D] of a grid x grid row-major frame, seen from a camera moved by
    jump float [B, T, 2] (x, y pixels) -> (shifted tokens [B, T, N, D], in_view bool
    [B, T, N]): new token (i, j) is old token (i + dy, j + dx), d = round(jump / patch);
    in_view is False where that lies outside the old frame (its shifted token is junk)."""
    d = jnp.round(jump / patch).astype(jnp.int32)
    i, j = jnp.divmod(jnp.arange(grid * grid), grid)
    si, sj = i + d[..., 1:2], j + d[..., 0:1]  # [B, T, N]
    in_view = (si >= 0) & (si < grid) & (sj >= 0) & (sj < grid)
    source = jnp.clip(si, 0, grid - 1) * grid + jnp.clip(sj, 0, grid - 1)
    return jnp.take_along_axis(x, source[..., None], axis=2), in_view


def residual_jump(jump: jax.Array, patch: int) -> jax.Array:
    """float [..., 3] camera position jumps (x, y, z px) -> what `shift_tokens`' whole-patch
    shift leaves of them: x and y minus patch * round(./patch) (in [-patch/2, patch/2]), z as is."""
    xy = jump[..., :2]
    return jnp.concatenate([xy - patch * jnp.round(xy / patch), jump[..., 2:]], axis=-1)


class FramingEmbedding(nn.Module):
    """A cut's framing, the camera position jump [B, T, 3], -> embeddings [B, T, D].

    A two-layer MLP: where the new shot's entities land is a nonlinear function of the jump
    (which entities stay in view, on which side), unlike a pan's steady 1-px drift."""

    embed_dim: int
    scale: float  # the jump is divided by it (the frame side: procedural cameras move in pixels)
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, jump: jax.Array) -> jax.Array:
        """jump float [B, T, 3] -> float [B, T, D] in `dtype`."""
        h = layers.Dense(self.embed_dim, (None, "mlp"), self.dtype, name="hidden")(jump / self.scale)
        return layers.Dense(self.embed_dim, ("mlp", "embed"), self.dtype, name="out")(nn.gelu(h))


class DynamicsModel(nn.Module):
    """codes [B, T, N, L] + controls -> logits [B, T, N, *logits_shape] for frame t+1."""

    cfg: ModelConfig

    def setup(self) -> None:
        dc = self.cfg.dynamics
        dtype = layers.dtype_of(self.cfg.dtype)
        self.code_embed = layers.Dense(dc.embed_dim, ("codebook", "embed"), dtype)
        self.action_embed = ActionEmbedding(dc.num_actions, dc.embed_dim, dc.use_actions, dtype)
        self.camera_embed = CameraEmbedding(dc.embed_dim, dc.use_camera, dtype)
        if dc.use_cuts:
            self.cut_embed = self.param("cut_embed", layers.partitioned(CONTROL_INIT, ("embed",)), (dc.embed_dim,))
        if dc.cut_framing and framed_cuts(self.cfg):
            self.framing_embed = FramingEmbedding(dc.embed_dim, float(self.cfg.image_size), dtype)
        if dc.cut_framing_shift and framed_cuts(self.cfg):
            self.unseen_embed = self.param(
                "unseen_embed", layers.partitioned(CONTROL_INIT, ("embed",)), (dc.embed_dim,)
            )
        if dc.use_identity_bank:
            self.memory_embed = layers.Dense(dc.embed_dim, ("codebook", "embed"), dtype)
            self.memory_pos = layers.PositionEmbedding(dtype, temporal=False)
            self.memory_norm = layers.RMSNorm(dtype)
        if dc.objective == "maskgit":
            # Frame t+1's partially known tokens at position t, and the "masked" vector.
            self.next_embed = layers.Dense(dc.embed_dim, ("codebook", "embed"), dtype)
            self.mask_embed = self.param(
                "mask_embed", layers.partitioned(nn.initializers.normal(0.02), ("embed",)), (dc.embed_dim,)
            )
        self.pos_embed = layers.PositionEmbedding(dtype, temporal=False)
        self.transformer = layers.Transformer(
            dc.num_layers,
            dc.num_heads,
            dc.mlp_dim,
            causal=True,
            dtype=dtype,
            attention=self.cfg.attention,
            remat=self.cfg.remat,
            remat_policy=self.cfg.remat_policy,
            scan_layers=self.cfg.scan_layers,
            spatial_rope=dc.spatial_rope,
        )
        self.final_norm = layers.RMSNorm(dtype)
        if dc.action_conditioning == "adaln":
            self.final_modulation = layers.AdaLNModulation(1, dtype)
        self.logits = layers.Dense(math.prod(logits_shape(self.cfg)), ("embed", "vocab"), dtype)

    def embed_memory(self, reference_codes: jax.Array) -> jax.Array:
        """Identity bank: reference codes float [B, M, L] (the tokenizer's codes of the
        reference frame) -> memory tokens [B, M, D]; computed once per rollout."""
        return self.memory_norm(self.memory_pos(self.memory_embed(reference_codes)[:, None])[:, 0])

    def bank(
        self, reference_codes: jax.Array | None, reference_mask: jax.Array | None, batch: int, tokens: int, width: int
    ) -> tuple[jax.Array | None, jax.Array | None]:
        """The identity bank's (memory tokens [B, M, D], mask bool [B] or None: all) from
        reference codes float [B, M, L] (None: an empty bank, masked); (None, None) without one."""
        if not self.cfg.dynamics.use_identity_bank:
            return None, None
        if reference_codes is None:
            reference_codes, reference_mask = jnp.zeros((batch, tokens, width)), jnp.zeros((batch,), bool)
        return self.embed_memory(reference_codes), reference_mask

    def _control_vector(self, controls: Controls) -> jax.Array:
        """controls of T positions -> one conditioning vector per position [B, T, D]."""
        cond = self.action_embed(controls.action, controls.action_mask)
        cut = controls.next_cut[..., None]
        # A cut's position jump is a framing, not a pan: the pan embedding sees no move there,
        # or only what the token shift leaves of it (`cut_framing_residual`).
        jump = controls.camera[..., :3]
        at_cut = residual_jump(jump, self.cfg.tokenizer.patch_size) if self._residual_at_cuts() else 0.0
        pan = jnp.concatenate([jnp.where(cut, at_cut, jump), controls.camera[..., 3:]], axis=-1)
        cond = cond + self.camera_embed(pan, controls.camera_mask)
        if self.cfg.dynamics.use_cuts:
            cond = cond + jnp.where(cut, self.cut_embed.astype(cond.dtype), 0)
        if self.cfg.dynamics.cut_framing and framed_cuts(self.cfg):
            framed = cut & controls.camera_mask[..., None]
            cond = cond + jnp.where(framed, self.framing_embed(jump), 0)
        return cond

    def _residual_at_cuts(self) -> bool:
        dc = self.cfg.dynamics
        return dc.cut_framing_shift and dc.cut_framing_residual and framed_cuts(self.cfg)

    def _shift_at_cuts(self, x: jax.Array, controls: Controls) -> jax.Array:
        """`cut_framing_shift`: code embeddings x [B, T, N, D] with those of each position
        that precedes a framed cut moved into the new shot's view (`shift_tokens`)."""
        patch = self.cfg.tokenizer.patch_size
        shifted, in_view = shift_tokens(x, controls.camera[..., :2], self.cfg.image_size // patch, patch)
        shifted = jnp.where(in_view[..., None], shifted, self.unseen_embed.astype(x.dtype))
        framed = controls.next_cut & controls.camera_mask
        return jnp.where(framed[..., None, None], shifted, x)

    def _inputs(
        self, codes: jax.Array, controls: Controls, next_frame: jax.Array | None = None, extra: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array | None]:
        """codes [B, T, N, L] + controls (+ MaskGIT's next-frame embedding [B, T, N, D]; +
        `extra` [B, T, D] added to the control vector: the diffusion noise level) -> (input
        tokens [B, T, N', D], the adaLN conditioning [B, T, D] or None).

        N' = N + 1 with a control token (`sequence_tokens`), prepended at index 0."""
        mode = self.cfg.dynamics.action_conditioning
        cond = self._control_vector(controls)
        if extra is not None:
            cond = cond + extra.astype(cond.dtype)
        x = self.code_embed(codes)
        if self.cfg.dynamics.cut_framing_shift and framed_cuts(self.cfg):
            x = self._shift_at_cuts(x, controls)
        if next_frame is not None:
            x = x + next_frame
        if mode == "add":
            x = x + cond[:, :, None, :]
        elif mode == "token":
            x = jnp.concatenate([cond[:, :, None, :].astype(x.dtype), x], axis=2)
        return self.pos_embed(x), (cond if mode == "adaln" else None)

    def _next_frame(self, codes: jax.Array, next_codes: jax.Array | None, next_mask: jax.Array | None) -> jax.Array:
        """MaskGIT: frame t+1's codes [B, T, N, L] where next_mask bool [B, T, N] is False
        (True: masked; None: all masked) -> their input embedding [B, T, N, D]."""
        mask_embed = self.mask_embed.astype(layers.dtype_of(self.cfg.dtype))
        # next_embed runs even when everything is masked, so that `init` creates it.
        known = self.next_embed(jnp.zeros_like(codes) if next_codes is None else next_codes)
        if next_codes is None or next_mask is None:
            return jnp.broadcast_to(mask_embed, known.shape)
        return jnp.where(next_mask[..., None], mask_embed, known)

    def _segments(self, controls: Controls) -> jax.Array:
        """Shots as the temporal mask sees them: all one shot when cuts are not used."""
        return controls.segment if self.cfg.dynamics.use_cuts else jnp.zeros_like(controls.segment)

    def final_hidden(self, x: jax.Array, cond: jax.Array | None) -> jax.Array:
        """Final tokens [B, T, N', D] (+ adaLN conditioning [B, T, D]) -> the frame tokens'
        normalised (and modulated) features [B, T, N, D] that an output head reads (a
        control token is dropped: it has no output)."""
        if self.cfg.dynamics.action_conditioning == "token":
            x = x[:, :, 1:]
        h = self.final_norm(x)
        if cond is not None:
            ((shift, scale, _),) = self.final_modulation(cond)
            h = layers.modulate(h, shift, scale)
        return h

    def _logits(self, x: jax.Array, cond: jax.Array | None) -> jax.Array:
        """Final tokens [B, T, N', D] (+ adaLN conditioning [B, T, D]) -> logits float32
        [B, T, N, *logits_shape] (a control token has none)."""
        shape = logits_shape(self.cfg)
        logits = self.logits(self.final_hidden(x, cond)).astype(jnp.float32)
        logits = logits.reshape(logits.shape[:-1] + shape)
        if self.cfg.dynamics.head == "factorized":
            logits = jnp.where(_digit_mask(self.cfg.tokenizer.fsq_levels), logits, -jnp.inf)
            return nn.with_logical_constraint(logits, ("batch", "time", "tokens", None, "act_vocab"))
        return nn.with_logical_constraint(logits, ("batch", "time", "tokens", "act_vocab"))

    def __call__(
        self,
        codes: jax.Array,
        controls: Controls,
        reference_codes: jax.Array | None = None,
        reference_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        next_codes: jax.Array | None = None,
        next_mask: jax.Array | None = None,
    ) -> jax.Array:
        """codes float [B, T, N, L], controls of T positions, reference_codes float [B, M, L]
        (the identity bank's reference frame; None or reference_mask bool [B] False: none
        for that clip), positions int [B, T] (default 0..T-1) -> logits float32
        [B, T, N, V] (joint, V = prod(fsq_levels)) or [B, T, N, L, max level] (factorized;
        slots past a dimension's level count are -inf); position t predicts frame t+1.

        objective "maskgit": next_codes float [B, T, N, L] (frame t+1's codes at position
        t) are known where next_mask bool [B, T, N] is False (None: all masked). Two streams
        run side by side (XLNet's two-stream attention, cut to one step): a context stream,
        frames t with frame t+1 all masked, causal in time; and a query stream, frame t plus
        the partial frame t+1, whose position t attends to the context stream before t and
        to itself. A position's logits thus depend on frames <= t and its own partial frame
        t+1 only, never on another position's mask: the past looks the same in training as
        in generation, where a frame is written to the key/value cache once, all masked
        (the first decoding pass), and the refinement passes run against that cache.
        """
        dc = self.cfg.dynamics
        b, t, n, levels = codes.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        mask = None
        if dc.use_cuts or dc.temporal_window or dc.objective == "maskgit":
            seg = self._segments(controls)
            mask = temporal_mask(positions, seg, positions, seg, dc.temporal_window)
        memory, memory_mask = self.bank(reference_codes, reference_mask, b, n, levels)
        if dc.objective != "maskgit":
            if next_codes is not None:
                raise ValueError("next_codes are for model.dynamics.objective 'maskgit'")
            x, cond = self._inputs(codes, controls)
            return self._logits(self.transformer(x, memory, memory_mask, mask, positions, cond=cond), cond)
        context, cond = self._inputs(codes, controls, self._next_frame(codes, None, None))
        query, _ = self._inputs(codes, controls, self._next_frame(codes, next_codes, next_mask))
        mask = two_stream_mask(mask, positions)
        x = jnp.concatenate([context, query], axis=1)
        both = None if cond is None else jnp.concatenate([cond, cond], axis=1)
        x = self.transformer(x, memory, memory_mask, mask, jnp.concatenate([positions, positions], axis=1), cond=both)
        return self._logits(x[:, t:], cond)

    def decode_step(
        self,
        codes: jax.Array,
        controls: Controls,
        position: jax.Array,
        caches: list[dict[str, jax.Array]],
        key_positions: jax.Array,
        key_segments: jax.Array,
        memory: jax.Array | None = None,
        memory_mask: jax.Array | None = None,
        next_codes: jax.Array | None = None,
        next_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, list[dict[str, jax.Array]]]:
        """One new frame against the cached past (see `wm_jax/rollout.py`).

        codes float [B, 1, N, L] of frame `position` (int32 scalar), its controls (T = 1);
        caches: per layer {"key", "value": [B*N, heads, W, K]}; key_positions int32 [W] /
        key_segments int32 [B, W]: what each cache slot holds once this frame is written
        at slot position % W (-1: empty); memory [B, M, D] from `embed_memory` with
        memory_mask bool [B] (ignored without an identity bank). Returns (logits
        [B, 1, N, *logits_shape], caches).

        "maskgit": next_codes [B, 1, N, L] / next_mask [B, 1, N] as in `__call__`. With
        frame t+1 all masked (None) this is the context stream: commit the returned caches.
        A refinement pass (a partial frame t+1) is the query stream: it attends to the
        committed past and to itself (its keys/values written at the slot of a copy);
        discard the caches it returns.
        """
        pos, mask = self.cache_mask(controls, position, key_positions, key_segments)
        if not self.cfg.dynamics.use_identity_bank:
            memory = memory_mask = None
        slot = position % key_positions.shape[0]
        maskgit = self.cfg.dynamics.objective == "maskgit"
        x, cond = self._inputs(codes, controls, self._next_frame(codes, next_codes, next_mask) if maskgit else None)
        x, caches = self.transformer(x, memory, memory_mask, mask, pos, caches, slot, cond)
        return self._logits(x, cond), caches

    def cache_mask(
        self, controls: Controls, position: jax.Array, key_positions: jax.Array, key_segments: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """One new frame at `position` (int32 scalar; controls of T = 1, B rows) against cache
        slots holding key_positions int32 [W] / key_segments int32 [B, W] -> (its position
        int32 [B, 1], the temporal mask bool [B, 1, W])."""
        b = controls.action.shape[0]
        pos = jnp.full((b, 1), position, jnp.int32)
        seg = self._segments(controls)
        key_seg = key_segments if self.cfg.dynamics.use_cuts else jnp.zeros_like(key_segments)
        keys = jnp.broadcast_to(key_positions, (b,) + key_positions.shape)
        return pos, temporal_mask(pos, seg, keys, key_seg, self.cfg.dynamics.temporal_window)
