"""Pure train steps: loss, gradients, optax update; and their jitted, sharded form. No I/O."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import jax
from jax.sharding import Mesh
import jax.numpy as jnp
import optax
from flax import linen as nn

from wm_jax.config import Config
from wm_jax.eval.metrics import psnr_from_mse
from wm_jax.models.dynamics import corrupt_codes, framed_cuts, make_controls, sample_maskgit_mask, token_loss
from wm_jax.models.latent_actions import LatentActionModel
from wm_jax.models.tokenizer import VideoTokenizer, indices_to_codes, num_tokens, vocab_size
from wm_jax.sharding import batch_sharding
from wm_jax.train.guards import all_finite
from wm_jax.train.state import TrainState, build_model, make_optimizer

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def frames_to_float(frames: jax.Array) -> jax.Array:
    """uint8 [..., H, W, 3] in [0, 255] -> float32 in [-1, 1]."""
    return frames.astype(jnp.float32) / 127.5 - 1.0


def float_to_frames(x: jax.Array) -> jax.Array:
    """float in [-1, 1] -> uint8 [0, 255] (clipped)."""
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def tokenizer_loss(params: Any, model: nn.Module, batch: Batch) -> tuple[jax.Array, Metrics]:
    """MSE reconstruction loss on frames [B,T,H,W,3] uint8; PSNR on the [0, 1] scale."""
    x = frames_to_float(batch["frame"])
    recon, indices = model.apply({"params": params}, x)
    mse = jnp.mean(jnp.square(recon.astype(jnp.float32) - x))
    usage = jnp.mean(jnp.bincount(indices.reshape(-1), length=vocab_size(model.cfg)) > 0)
    return mse, {"loss": mse, "psnr": psnr_from_mse(mse / 4.0), "code_usage": usage}


def latent_action_loss(params: Any, model: LatentActionModel, batch: Batch) -> tuple[jax.Array, Metrics]:
    """Next-frame MSE + VQ codebook and commitment losses, on frames [B,T,H,W,3] uint8.

    Metrics: PSNR of the predicted frames 1..T-1 and of copying the previous frame (the
    decoder's starting point), the mean squared latent-to-code distance and the share of
    the latent actions used in the batch.
    """
    x = frames_to_float(batch["frame"])
    pred, quantized = model.apply({"params": params}, x)
    mse = jnp.mean(jnp.square(pred - x[:, 1:]))
    copy_mse = jnp.mean(jnp.square(x[:, :-1] - x[:, 1:]))
    lc = model.cfg.latent_actions
    loss = mse + quantized.codebook_loss + lc.commitment_weight * quantized.commitment_loss
    usage = jnp.mean(jnp.bincount(quantized.indices.reshape(-1), length=lc.num_latent_actions) > 0)
    return loss, {
        "loss": loss,
        "psnr": psnr_from_mse(mse / 4.0),
        "psnr_copy_last": psnr_from_mse(copy_mse / 4.0),
        "vq_distance": quantized.codebook_loss,
        "code_usage": usage,
    }


def infer_latent_actions(model: LatentActionModel, params: Any, frames: jax.Array) -> jax.Array:
    """uint8 frames [B,T,H,W,3] (T >= 2) -> int32 [B,T] latent actions of a trained LAM.

    Entry t takes frame t to frame t+1, like a record's `action`; the last entry has no
    next frame and is 0.
    """
    _, quantized = model.apply({"params": params}, frames_to_float(frames), method=model.encode)
    return jnp.pad(quantized.indices, ((0, 0), (0, 1)))


def encode_codes(tokenizer: VideoTokenizer, tokenizer_params: Any, frames: jax.Array) -> jax.Array:
    """uint8 frames [B,T,H,W,3] -> FSQ codes float32 [B,T,N,L] of the frozen tokenizer."""
    codes, _ = tokenizer.apply({"params": tokenizer_params}, frames_to_float(frames), method=tokenizer.encode)
    return jax.lax.stop_gradient(codes)


def reference_codes(tokenizer: VideoTokenizer, tokenizer_params: Any, batch: Batch) -> tuple[jax.Array, jax.Array] | tuple[None, None]:
    """The identity bank's input: codes float32 [B,N,L] of each clip's reference frame
    (records' `reference`, uint8 [B,T,S,S,3], the same at every step) and a bool [B] mask;
    (None, None) when the batch has no reference."""
    if "reference" not in batch:
        return None, None
    codes = encode_codes(tokenizer, tokenizer_params, batch["reference"][:, :1])[:, 0]
    return codes, jnp.ones(codes.shape[:1], bool)


def dynamics_loss(
    params: Any, model: nn.Module, batch: Batch, codes: jax.Array,
    reference: tuple[jax.Array | None, jax.Array | None] = (None, None), rng: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """Next-frame token cross-entropy: position t (frames <= t, controls t) predicts frame t+1.

    codes float32 [B,T,N,L] of the clip's frames; the controls come from the batch's
    per-step fields (`make_controls`); reference: (codes [B,N,L], mask [B]) or Nones.
    Objective "maskgit": position t also sees frame t+1 with a random share of its tokens
    masked (`sample_maskgit_mask` from `rng`, required) and the loss covers those only.
    With `model.dynamics.mask_cut_loss`, targets that open a new shot are left out unless
    the model is given their framing (`cut_framing[_shift]`, where the camera is known); with
    `action_dropout` > 0 (needs `rng`), that share of the steps loses its action; with
    `context_corruption` > 0 (needs `rng`), the input frames are corrupted (`corrupt_codes`).
    """
    dc = model.cfg.dynamics
    controls = make_controls(batch)
    b, t, n, _ = codes.shape
    if dc.action_dropout > 0:
        if rng is None:
            raise ValueError("action_dropout needs an rng")
        dropped = jax.random.bernoulli(jax.random.fold_in(rng, 1), dc.action_dropout, controls.action_mask.shape)
        controls = controls.replace(action_mask=controls.action_mask & ~dropped)
    context = codes[:, :-1]
    if dc.context_corruption > 0:
        if rng is None:
            raise ValueError("context_corruption needs an rng")
        context = corrupt_codes(context, jax.random.fold_in(rng, 2), dc.context_corruption, model.cfg.tokenizer.fsq_levels)
    scored = jnp.ones((b, t - 1, n), bool)
    if dc.mask_cut_loss:
        # A cut whose framing the model is told (`framed_cuts`) is predictable: it is scored.
        framed = controls.camera_mask if framed_cuts(model.cfg) else False
        scored = jnp.broadcast_to((~controls.next_cut | framed)[..., None], scored.shape)
    if dc.objective != "maskgit":
        logits = model.apply({"params": params}, context, controls, *reference)
        loss, accuracy = token_loss(logits, codes[:, 1:], model.cfg, scored)
        return loss, {"loss": loss, "token_accuracy": accuracy}
    if rng is None:
        raise ValueError("the maskgit objective needs an rng for its masks")
    mask = sample_maskgit_mask(rng, (b, t - 1, n))
    logits = model.apply({"params": params}, context, controls, *reference, None, codes[:, 1:], mask)
    loss, accuracy = token_loss(logits, codes[:, 1:], model.cfg, mask & scored)
    return loss, {"loss": loss, "token_accuracy": accuracy, "mask_fraction": jnp.mean(mask)}


def action_sensitivity(
    params: Any, model: nn.Module, batch: Batch, codes: jax.Array,
    reference: tuple[jax.Array | None, jax.Array | None] = (None, None), rng: jax.Array | None = None,
) -> jax.Array:
    """Loss with shuffled actions − loss with the true ones (float32 scalar) on one batch:
    > 0 when the model uses its actions. Shuffled: each clip gets the next clip's actions
    (a roll over the batch, so their distribution is unchanged); action dropout and context
    corruption are off, so the figure compares across training settings."""
    model = model.clone(cfg=dataclasses.replace(
        model.cfg, dynamics=dataclasses.replace(model.cfg.dynamics, action_dropout=0.0, context_corruption=0.0)))
    shuffled = {**batch, "action": jnp.roll(batch["action"], 1, axis=0)}
    if "action_valid" in batch:
        shuffled["action_valid"] = jnp.roll(batch["action_valid"], 1, axis=0)
    true_loss, _ = dynamics_loss(params, model, batch, codes, reference, rng)
    shuffled_loss, _ = dynamics_loss(params, model, shuffled, codes, reference, rng)
    return shuffled_loss - true_loss


def with_latent_actions(batch: Batch, lam: LatentActionModel, lam_params: Any) -> Batch:
    """The batch with `action` int32 [B,T] inferred by a trained LAM from its frames and
    `action_valid` true (the last step, with no next frame, is never a dynamics input)."""
    actions = jax.lax.stop_gradient(infer_latent_actions(lam, lam_params, batch["frame"]))
    return {**batch, "action": actions, "action_valid": jnp.ones(actions.shape, bool)}


def frozen_stages(cfg: Config) -> list[str]:
    """The trained models the step of cfg's stage reads but does not train, by stage name:
    the keys of `make_train_step`'s frozen parameters."""
    if cfg.train.stage != "dynamics":
        return []
    return ["tokenizer"] + (["latent_actions"] if cfg.train.latent_actions_workdir else [])


def dynamics_inputs(cfg: Config, batch: Batch, frozen: Any) -> tuple[Batch, jax.Array, tuple[Any, Any]]:
    """What the dynamics loss reads from a batch: (the batch, with LAM-inferred actions
    under `train.latent_actions_workdir`; codes float32 [B,T,N,L], from the latent cache or
    encoded by the frozen tokenizer; the identity bank's (reference codes, mask))."""
    tokenizer = VideoTokenizer(cfg.model)
    if cfg.train.latent_actions_workdir:
        batch = with_latent_actions(batch, LatentActionModel(cfg.model), frozen["latent_actions"])
    if cfg.data.latent_cache:  # token ids read from the cache: no encode
        codes = indices_to_codes(batch["codes"], cfg.model.tokenizer.fsq_levels)
    else:
        codes = encode_codes(tokenizer, frozen["tokenizer"], batch["frame"])
    return batch, codes, reference_codes(tokenizer, frozen["tokenizer"], batch)


def step_rng(cfg: Config, step: jax.Array) -> jax.Array:
    """The step's randomness (MaskGIT masks, action dropout) from the seed and the step: a
    resumed run draws the same as an uninterrupted one."""
    return jax.random.fold_in(jax.random.key(cfg.seed), step)


def make_sensitivity_fn(cfg: Config) -> Callable[[Any, Batch, Any, jax.Array], jax.Array]:
    """Dynamics stage: (params, batch, frozen, step) -> `action_sensitivity` float32 [],
    jitted; the loop calls it at log steps only (one extra pair of forward passes)."""
    model = build_model(cfg)

    def sensitivity(params: Any, batch: Batch, frozen: Any, step: jax.Array) -> jax.Array:
        batch, codes, reference = dynamics_inputs(cfg, batch, frozen)
        return action_sensitivity(params, model, batch, codes, reference, step_rng(cfg, step))

    return jax.jit(sensitivity)


def make_train_step(cfg: Config) -> Callable[..., tuple[TrainState, Metrics]]:
    """(state, batch, frozen) -> (state, metrics). frozen: None for the tokenizer and
    latent-action stages; for dynamics {"tokenizer": params} and, with
    `train.latent_actions_workdir`, "latent_actions": the LAM's params."""
    model = build_model(cfg)
    tx = make_optimizer(cfg.train)

    def loss_fn(params: Any, batch: Batch, frozen: Any, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        if cfg.train.stage == "tokenizer":
            return tokenizer_loss(params, model, batch)
        if cfg.train.stage == "latent_actions":
            return latent_action_loss(params, model, batch)
        batch, codes, reference = dynamics_inputs(cfg, batch, frozen)
        return dynamics_loss(params, model, batch, codes, reference, rng)

    def train_step(state: TrainState, batch: Batch, frozen: Any) -> tuple[TrainState, Metrics]:
        rng = step_rng(cfg, state.step)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, frozen, rng)
        grad_norm = optax.tree.norm(grads)
        updated = state.apply_gradients(grads, tx)
        # Numerics guard: a non-finite loss, gradient or updated value (a finite gradient
        # times an overflowing learning rate) leaves params and optimizer untouched, so
        # the state carried on, and every checkpoint of it, stays finite.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite((updated.params, updated.opt_state))
        # One branch for the whole state: a per-leaf `where` keyed on a reduction of the
        # updated leaves tripled the step's compile time on CPU (24 s vs 8 s, tiny model).
        params, opt_state = jax.lax.cond(finite, lambda: (updated.params, updated.opt_state),
                                         lambda: (state.params, state.opt_state))
        state = updated.replace(params=params, opt_state=opt_state)
        metrics.update(grad_norm=grad_norm, skipped=~finite)
        return state, metrics

    return train_step


# Batch fields a train step may read, with their rank: frame uint8 [B,T,S,S,3], action
# int32 [B,T], camera float32 [B,T,7], cut bool [B,T], reference uint8 [B,T,S,S,3], ...;
# codes int32 [B,T,N] are token ids from a latent cache (data.latent_cache), not a record field.
FIELD_RANKS = {"frame": 5, "action": 2, "action_valid": 2, "camera": 3, "camera_valid": 2, "cut": 2, "reference": 5,
               "codes": 3}


def batch_fields(cfg: Config, available: Iterable[str] | None = None) -> dict[str, int]:
    """Field name -> rank of what the step of cfg's stage reads, among the `available`
    fields of the batches (None: all). The dynamics stage needs `action`, unless a latent
    action model infers them, and reads `codes` instead of `frame` from a latent cache
    (frames still, when a latent action model reads them); the conditioning fields it
    uses are optional (absent means unknown: masked)."""
    names = ["frame"]
    if cfg.train.stage == "dynamics":
        dc = cfg.model.dynamics
        inferred = bool(cfg.train.latent_actions_workdir)
        if cfg.data.latent_cache:
            names = ["codes"] + (["frame"] if inferred else [])
        names += [] if inferred else ["action", "action_valid"]
        names += ["camera", "camera_valid"] if dc.use_camera else []
        names += ["cut"] if dc.use_cuts else []
        names += ["reference"] if dc.use_identity_bank else []
        if available is not None and "action" not in available and not inferred:
            raise ValueError("the dynamics stage needs the dataset field 'action' (per-step actions), "
                             "or 'train.latent_actions_workdir' to infer them")
    return {k: FIELD_RANKS[k] for k in names if available is None or k in available}


def batch_specs(cfg: Config, mesh: Mesh, rules: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract global batch (every field the stage may read) with its shardings, for
    ahead-of-time compilation."""
    b, t, s = cfg.data.batch_size, cfg.data.frames_per_clip, cfg.model.image_size
    shapes = {
        "frame": ((b, t, s, s, 3), jnp.uint8), "reference": ((b, t, s, s, 3), jnp.uint8),
        "action": ((b, t), jnp.int32), "camera": ((b, t, 7), jnp.float32),
        "action_valid": ((b, t), jnp.bool_), "camera_valid": ((b, t), jnp.bool_), "cut": ((b, t), jnp.bool_),
        "codes": ((b, t, num_tokens(cfg.model)), jnp.int32),
    }
    return {
        k: jax.ShapeDtypeStruct(shapes[k][0], shapes[k][1], sharding=batch_sharding(mesh, rules, rank))
        for k, rank in batch_fields(cfg).items()
    }


def jit_train_step(
    cfg: Config, mesh: Mesh, rules: Any, shardings: Any, frozen_shardings: Any = None, fields: dict[str, int] | None = None
) -> Callable[..., Any]:
    """The train step under `jax.jit` with explicit shardings and the state donated.

    shardings: the state's sharding tree (from `state_shardings`); frozen_shardings: the
    shardings of the frozen parameters (`make_train_step`'s frozen: dynamics stage), None
    for the other stages; fields: the batch's fields (`batch_fields`; default: all the
    stage may read).
    Build it outside, and call it inside, `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`.
    """
    fields = batch_fields(cfg) if fields is None else fields
    batch = {k: batch_sharding(mesh, rules, nd) for k, nd in fields.items()}
    return jax.jit(
        make_train_step(cfg),
        in_shardings=(shardings, batch, frozen_shardings),
        out_shardings=(shardings, None),
        donate_argnums=(0,),
    )
