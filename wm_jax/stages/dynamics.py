"""The dynamics stage: the world model, trained on a frozen tokenizer's codes to predict
frame t+1 from frames <= t and the controls at t (optionally on actions a frozen latent
action model infers).

What depends on `model.dynamics.objective` (the model, its loss, its inputs, its FLOPs and
the tokenizer bottleneck it reads) is looked up in `OBJECTIVES`: the token objectives
("causal", "maskgit") here, "diffusion" in `stages/diffusion.py`; the config checks of an
objective and of this stage are in `wm_jax.stage_checks` (JAX-free, run by `config.validate`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from data_pipelines.schema import CACHE_FIELDS
from wm_jax import stage_checks
from wm_jax.config import Config, ModelConfig
from wm_jax.models import flops
from wm_jax.models.dynamics import (
    DynamicsModel,
    corrupt_codes,
    drop_actions,
    framed_cuts,
    make_controls,
    motion_weights,
    predict_codes,
    sample_maskgit_mask,
    token_loss,
)
from wm_jax.models.latent_actions import LatentActionModel
from wm_jax.models.diffusion import DiffusionDynamics
from wm_jax.models.tokenizer import VideoTokenizer, indices_to_codes, num_tokens
from wm_jax.stages import diffusion
from wm_jax.stages.base import Batch, LogMetricsFn, Metrics, Role, Stage, frames_to_float, step_rng
from wm_jax.stages.latent_actions import LATENT_ACTIONS, infer_latent_actions
from wm_jax.stages.tokenizer import TOKENIZER

Reference = tuple[jax.Array | None, jax.Array | None]


def encode_codes(tokenizer: VideoTokenizer, tokenizer_params: Any, frames: jax.Array) -> jax.Array:
    """uint8 frames [B,T,H,W,3] -> codes float32 [B,T,N,L] of the frozen tokenizer (FSQ
    codes, or continuous latents)."""
    codes, _ = tokenizer.apply({"params": tokenizer_params}, frames_to_float(frames), method=tokenizer.encode)
    return jax.lax.stop_gradient(codes)


def reference_codes(tokenizer: VideoTokenizer, tokenizer_params: Any, batch: Batch) -> Reference:
    """The identity bank's input: codes float32 [B,N,L] of each clip's reference frame
    (records' `reference`, uint8 [B,T,S,S,3], the same at every step) and a bool [B] mask;
    (None, None) when the batch has no reference."""
    if "reference" not in batch:
        return None, None
    codes = encode_codes(tokenizer, tokenizer_params, batch["reference"][:, :1])[:, 0]
    return codes, jnp.ones(codes.shape[:1], bool)


def dynamics_loss(
    params: Any,
    model: nn.Module,
    batch: Batch,
    codes: jax.Array,
    reference: Reference = (None, None),
    rng: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """Next-frame token cross-entropy: position t (frames <= t, controls t) predicts frame t+1.

    codes float32 [B,T,N,L] of the clip's frames; the controls come from the batch's
    per-step fields (`make_controls`); reference: (codes [B,N,L], mask [B]) or Nones.
    Objective "maskgit": position t also sees frame t+1 with a random share of its tokens
    masked (`sample_maskgit_mask` from `rng`, required) and the loss covers those only.
    With `model.dynamics.mask_cut_loss`, targets that open a new shot are left out unless
    the model is given their framing (`cut_framing[_shift]`, where the camera is known); with
    `action_dropout` > 0 (needs `rng`), that share of the steps loses its action; with
    `context_corruption` > 0 (needs `rng`), the input frames are corrupted (`corrupt_codes`);
    with `scheduled_sampling` > 0 (needs `rng`), some are the model's own predictions
    (`with_own_predictions`); with `motion_weight` > 0 (needs the batch's `frame`), each
    target token's loss is weighted by its patch's pixel change (`motion_weights`).
    """
    dc = model.cfg.dynamics
    controls = make_controls(batch)
    b, t, n, _ = codes.shape
    if dc.action_dropout > 0:
        if rng is None:
            raise ValueError("action_dropout needs an rng")
        controls = drop_actions(controls, dc.action_dropout, jax.random.fold_in(rng, 1))
    context = codes[:, :-1]
    if dc.scheduled_sampling > 0:
        if rng is None:
            raise ValueError("scheduled_sampling needs an rng")
        context = with_own_predictions(
            params, model, context, controls, reference, jax.random.fold_in(rng, 3), dc.scheduled_sampling
        )
    if dc.context_corruption > 0:
        if rng is None:
            raise ValueError("context_corruption needs an rng")
        context = corrupt_codes(
            context, jax.random.fold_in(rng, 2), dc.context_corruption, model.cfg.tokenizer.fsq_levels
        )
    scored = jnp.ones((b, t - 1, n), bool)
    if dc.mask_cut_loss:
        # A cut whose framing the model is told (`framed_cuts`) is predictable: it is scored.
        framed = controls.camera_mask if framed_cuts(model.cfg) else False
        scored = jnp.broadcast_to((~controls.next_cut | framed)[..., None], scored.shape)
    weights = (
        motion_weights(batch["frame"], model.cfg.tokenizer.patch_size, dc.motion_weight)
        if dc.motion_weight > 0
        else None
    )
    if dc.objective != "maskgit":
        logits = model.apply({"params": params}, context, controls, *reference)
        loss, accuracy = token_loss(logits, codes[:, 1:], model.cfg, scored, weights)
        return loss, {"loss": loss, "token_accuracy": accuracy}
    if rng is None:
        raise ValueError("the maskgit objective needs an rng for its masks")
    mask = sample_maskgit_mask(rng, (b, t - 1, n))
    logits = model.apply({"params": params}, context, controls, *reference, None, codes[:, 1:], mask)
    loss, accuracy = token_loss(logits, codes[:, 1:], model.cfg, mask & scored, weights)
    return loss, {"loss": loss, "token_accuracy": accuracy, "mask_fraction": jnp.mean(mask)}


def with_own_predictions(
    params: Any,
    model: nn.Module,
    context: jax.Array,
    controls: Any,
    reference: Reference,
    key: jax.Array,
    rate: float,
) -> jax.Array:
    """Parallel scheduled sampling: context codes float32 [B,T,N,L] -> the same with each
    frame after the first replaced, at `rate` per (clip, frame) (drawn from `key`), by the
    model's greedy prediction of it from the clean frames before it (one pass, no
    gradient). A replaced frame t depends on the true frames < t only, so no input ever
    holds the frame its position is scored on."""
    logits = jax.lax.stop_gradient(model.apply({"params": params}, context, controls, *reference))
    predicted = predict_codes(logits[:, :-1], model.cfg)  # position t predicts frame t+1
    b, t = context.shape[:2]
    replaced = jax.random.uniform(key, (b, t - 1)) < rate
    return context.at[:, 1:].set(jnp.where(replaced[..., None, None], predicted, context[:, 1:]))


def action_sensitivity(
    params: Any,
    model: nn.Module,
    batch: Batch,
    codes: jax.Array,
    reference: Reference = (None, None),
    rng: jax.Array | None = None,
) -> jax.Array:
    """Loss with shuffled actions − loss with the true ones (float32 scalar) on one batch:
    > 0 when the model uses its actions. Shuffled: each clip gets the next clip's actions
    (a roll over the batch, so their distribution is unchanged); action dropout, context
    corruption, scheduled sampling and motion weights are off, so the figure compares across
    training settings."""
    model = model.clone(
        cfg=dataclasses.replace(
            model.cfg,
            dynamics=dataclasses.replace(
                model.cfg.dynamics,
                action_dropout=0.0,
                context_corruption=0.0,
                scheduled_sampling=0.0,
                motion_weight=0.0,
            ),
        )
    )
    shuffled = {**batch, "action": jnp.roll(batch["action"], 1, axis=0)}
    if "action_valid" in batch:
        shuffled["action_valid"] = jnp.roll(batch["action_valid"], 1, axis=0)
    loss = objective(model.cfg).loss
    true_loss, _ = loss(params, model, batch, codes, reference, rng)
    shuffled_loss, _ = loss(params, model, shuffled, codes, reference, rng)
    return shuffled_loss - true_loss


def with_latent_actions(batch: Batch, lam: LatentActionModel, lam_params: Any) -> Batch:
    """The batch with `action` int32 [B,T] inferred by a trained LAM from its frames and
    `action_valid` true (the last step, with no next frame, is never a dynamics input)."""
    actions = jax.lax.stop_gradient(infer_latent_actions(lam, lam_params, batch["frame"]))
    return {**batch, "action": actions, "action_valid": jnp.ones(actions.shape, bool)}


def cached_codes(cfg: Config, batch: Batch) -> jax.Array:
    """codes float32 [B,T,N,L] of the batch's latent cache field (`cache_field`): the FSQ
    codes of token ids, or continuous latents as read."""
    field = cache_field(cfg)
    if field == "latents":
        return batch[field]
    return indices_to_codes(batch[field], cfg.model.tokenizer.fsq_levels)


def cache_field(cfg: Config) -> str:
    """The batch field of `data.latent_cache`'s values for the kind cfg's objective reads
    (`data_pipelines.schema.CACHE_FIELDS`)."""
    return CACHE_FIELDS[stage_checks.latent_cache_kind(cfg)]


def dynamics_inputs(cfg: Config, batch: Batch, frozen: Any) -> tuple[Batch, jax.Array, Reference]:
    """What the dynamics loss reads from a batch: (the batch, with LAM-inferred actions
    under `train.latent_actions_workdir`; codes float32 [B,T,N,L], from the latent cache (FSQ
    codes of its token ids, or its continuous latents) or encoded by the frozen tokenizer;
    the identity bank's (reference codes, mask))."""
    tokenizer = VideoTokenizer(cfg.model)
    if cfg.train.latent_actions_workdir:
        batch = with_latent_actions(batch, LatentActionModel(cfg.model), frozen[LATENT_ACTIONS.name])
    if cfg.data.latent_cache:  # read from the cache: no encode
        codes = cached_codes(cfg, batch)
    else:
        codes = encode_codes(tokenizer, frozen[TOKENIZER.name], batch["frame"])
    return batch, codes, reference_codes(tokenizer, frozen[TOKENIZER.name], batch)


def step_loss(
    cfg: Config, model: nn.Module, params: Any, batch: Batch, frozen: Any, rng: jax.Array
) -> tuple[jax.Array, Metrics]:
    """`dynamics_loss` on the inputs the frozen models make of the batch (`dynamics_inputs`)."""
    batch, codes, reference = dynamics_inputs(cfg, batch, frozen)
    return objective(cfg.model).loss(params, model, batch, codes, reference, rng)


def make_log_metrics(cfg: Config) -> LogMetricsFn | None:
    """With actions: (params, batch, frozen, step) -> {"action_sensitivity": float32 []},
    jitted; the loop calls it at log steps only (one extra pair of forward passes)."""
    if not cfg.model.dynamics.use_actions:
        return None
    model = dynamics_model(cfg.model)

    def log_metrics(params: Any, batch: Batch, frozen: Any, step: jax.Array) -> Metrics:
        batch, codes, reference = dynamics_inputs(cfg, batch, frozen)
        return {"action_sensitivity": action_sensitivity(params, model, batch, codes, reference, step_rng(cfg, step))}

    return jax.jit(log_metrics)


def token_example_inputs(cfg: Config) -> tuple[jax.Array, ...]:
    """Zero inputs of one clip for `init`: codes float32 [1,T-1,N,L] and the controls of T-1
    positions (an identity bank initialises from an absent reference)."""
    t, levels = cfg.data.frames_per_clip, len(cfg.model.tokenizer.fsq_levels)
    return (
        jnp.zeros((1, t - 1, num_tokens(cfg.model), levels), jnp.float32),
        make_controls({"action": jnp.zeros((1, t), jnp.int32)}),
    )


def batch_fields(cfg: Config, available: Collection[str] | None = None) -> list[str]:
    """`action`, unless a latent action model infers them; the latent cache's field
    (`cache_field`: `codes`, or `latents` for diffusion) instead of `frame` from a latent
    cache (frames still, when a latent action model or motion weights read them); the
    conditioning fields it uses, which are optional (absent means unknown: masked)."""
    dc, names = cfg.model.dynamics, ["frame"]
    inferred = bool(cfg.train.latent_actions_workdir)
    if cfg.data.latent_cache:
        names = [cache_field(cfg)] + (["frame"] if inferred or dc.motion_weight > 0 else [])
    names += [] if inferred else ["action", "action_valid"]
    names += ["camera", "camera_valid"] if dc.use_camera else []
    names += ["cut"] if dc.use_cuts else []
    names += ["reference"] if dc.use_identity_bank else []
    if available is not None and "action" not in available and not inferred:
        raise ValueError(
            "the dynamics stage needs the dataset field 'action' (per-step actions), "
            "or 'train.latent_actions_workdir' to infer them"
        )
    return names


def frozen_stages(cfg: Config) -> list[str]:
    """The tokenizer, and a latent action model under `train.latent_actions_workdir`."""
    return [TOKENIZER.name] + ([LATENT_ACTIONS.name] if cfg.train.latent_actions_workdir else [])


def flops_per_example(cfg: Config) -> int:
    """The frozen tokenizer encodes the T frames (and the identity bank's reference frame;
    forward only; with a latent cache only the reference), a frozen latent action model (if
    any) infers the actions, the dynamics model trains on T-1 input frames."""
    t = cfg.data.frames_per_clip
    encoded = (0 if cfg.data.latent_cache else t) + (1 if cfg.model.dynamics.use_identity_bank else 0)
    inferred = flops.latent_action_encode_flops(cfg.model, t) if cfg.train.latent_actions_workdir else 0
    return flops.tokenizer_encode_flops(cfg.model, encoded) + inferred + objective(cfg.model).train_flops(cfg.model, t)


@dataclasses.dataclass(frozen=True)
class Objective:
    """What the dynamics stage does for one `model.dynamics.objective`."""

    model: Callable[[ModelConfig], nn.Module]
    # (params, model, batch, codes [B,T,N,L], reference, rng) -> (loss, metrics)
    loss: Callable[..., tuple[jax.Array, Metrics]]
    example_inputs: Callable[[Config], tuple[Any, ...]]  # zero inputs of one clip, for `init`
    train_flops: Callable[[ModelConfig, int], int]  # a train step's model FLOPs on a clip of T frames
    # What it needs of a config (its tokenizer bottleneck, latent cache, refused switches):
    # checked by `config.validate` (`wm_jax.stage_checks.OBJECTIVES`, JAX-free).
    rules: stage_checks.ObjectiveRules


TOKENS = Objective(
    DynamicsModel,
    dynamics_loss,
    token_example_inputs,
    # scheduled sampling adds a forward pass without gradient
    lambda m, t: (flops.TRAIN_FACTOR + (m.dynamics.scheduled_sampling > 0)) * flops.dynamics_forward_flops(m, t - 1),
    stage_checks.TOKEN_OBJECTIVE,
)
MASKGIT = dataclasses.replace(TOKENS, rules=stage_checks.MASKGIT_OBJECTIVE)
DIFFUSION = Objective(
    DiffusionDynamics,
    diffusion.diffusion_loss,
    diffusion.example_inputs,
    flops.diffusion_train_flops,
    stage_checks.DIFFUSION_OBJECTIVE,
)
OBJECTIVES = {"causal": TOKENS, "maskgit": MASKGIT, "diffusion": DIFFUSION}


def objective(cfg: ModelConfig) -> Objective:
    """The `Objective` of cfg's `model.dynamics.objective`."""
    return OBJECTIVES[cfg.dynamics.objective]


def dynamics_model(cfg: ModelConfig) -> nn.Module:
    """The dynamics module of cfg's objective (`DynamicsModel`, or `DiffusionDynamics`)."""
    return objective(cfg).model(cfg)


def example_inputs(cfg: Config) -> tuple[Any, ...]:
    """Zero inputs of one clip for `init` of cfg's objective (`Objective.example_inputs`)."""
    return objective(cfg.model).example_inputs(cfg)


DYNAMICS = Stage(
    rules=stage_checks.DYNAMICS,  # min_frames 2: a context frame and a target
    role=Role.WORLD_MODEL,
    model=dynamics_model,
    example_inputs=example_inputs,
    loss=step_loss,
    flops_per_example=flops_per_example,
    tokens_per_frame=num_tokens,
    model_section="dynamics",
    batch_fields=batch_fields,
    frozen_stages=frozen_stages,
    bundled=(TOKENIZER.name,),  # a bundle decodes its rollouts without the tokenizer run
    make_log_metrics=make_log_metrics,
)
