"""Typed experiment configuration: dataclass schema, YAML presets, `--set` overrides.

A config is a tree of frozen dataclasses. YAML files and `--set a.b=value` overrides are
checked against the schema: an unknown key or a value of the wrong type raises
`ConfigError`, whose message names the key and the closest valid key. The CLI turns a
`ConfigError` into exit code 2.

`validate` runs each training stage's own checks too (`wm_jax.stage_checks`); like this
module they import no JAX, so loading and validating a config is fast (`wm launch --dry-run`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from wm_jax import stage_checks


class ConfigError(ValueError):
    """A bad config key or value; the message names the key."""


@dataclass(frozen=True)
class DataConfig:
    dir: str = ""  # dataset directory written by `wm data make`
    frames_per_clip: int = 8  # T: consecutive steps per training window
    batch_size: int = 8  # global batch (all processes together)
    window_stride: int = 1  # step between window starts inside an episode
    worker_count: int = 0  # grain worker processes (0: decode in the main process)
    split: str = "train"
    # A record that cannot be read or decoded, or mismatches the manifest's fields, stops
    # training with its shard and index named; True skips its window instead (the next
    # good one stands in), and tolerates shard hash mismatches at start: both are logged
    # as events and skips counted in metrics.jsonl (`bad_windows_skipped`).
    skip_bad_records: bool = False
    # Train on a mixture instead of `dir`: [[DIR, weight], ...]; each dataset gives
    # weight / sum(weights) of the windows (data_pipelines.mixture). Frame sizes must be
    # equal; only the fields every dataset has (same dtype and shape) are batched.
    mixture: tuple[tuple[str, float], ...] = ()
    # Dynamics stage: a latent cache of `dir` (`wm data cache`, encoded by
    # train.tokenizer_workdir); the step reads its token ids instead of encoding frames.
    latent_cache: str = ""


@dataclass(frozen=True)
class TokenizerConfig:
    patch_size: int = 4
    embed_dim: int = 64
    num_layers: int = 2  # encoder layers; the decoder has as many
    num_heads: int = 4
    mlp_dim: int = 256
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)
    # What a token is. "fsq": FSQ codes on the `fsq_levels` grid (discrete: the token
    # dynamics' targets). "continuous": `latent_dim` unquantized values bounded by tanh to
    # (-1, 1) (no code index: what the diffusion dynamics denoises; no latent cache).
    bottleneck: str = "fsq"
    latent_dim: int = 8  # "continuous": values per token (small: the dynamics models them)
    # Encoder and decoder spatial attention with 2-D rotary grid positions besides the
    # learned absolute ones (as model.dynamics.spatial_rope): content is read the same way
    # wherever it sits, so a pan changes a patch's code less arbitrarily.
    spatial_rope: bool = False


@dataclass(frozen=True)
class DynamicsConfig:
    embed_dim: int = 64
    num_layers: int = 2  # each layer: spatial block + causal temporal block
    num_heads: int = 4
    mlp_dim: int = 256
    num_actions: int = 5
    use_actions: bool = True  # ablation switch: False masks the action input
    # Camera conditioning: each step's pose change (position delta, next rotation) from the
    # records' `camera` field; masked where a dataset has no camera.
    use_camera: bool = True
    # Shot conditioning: temporal attention stays inside a shot (a cut resets the scene
    # context) and a learned "cut" vector marks a step into a new shot.
    use_cuts: bool = True
    # Identity bank: the tokenizer's codes of the episode's `reference` frame become memory
    # tokens every frame attends to; cuts do not clear it.
    use_identity_bank: bool = False
    # Frames a temporal query sees (itself included); 0: the whole clip. A window makes a
    # cached rollout's cost per frame constant however long it runs.
    temporal_window: int = 0
    # "factorized": one small softmax per FSQ dimension (sum(levels) logits per token);
    # "joint": one softmax over the whole codebook (prod(levels) logits, Genie-style).
    head: str = "factorized"
    # Prediction objective. "causal": position t predicts all of frame t+1's tokens in one
    # pass from frames <= t. "maskgit" (Chang et al. 2022, as in Genie): position t also
    # gets frame t+1's tokens partially masked and predicts the masked ones; generation
    # decodes a frame in `maskgit_steps` parallel refinement passes (cosine schedule).
    objective: str = "causal"
    maskgit_steps: int = 8  # "maskgit": decoding passes per generated frame (K)
    # "diffusion" (needs model.tokenizer.bottleneck: continuous): diffusion forcing over the
    # tokenizer's latents (each frame at its own signal level, causal in time, x-prediction)
    # with a shortcut input (the step size) so that a few steps sample a frame
    # (models/diffusion.py). Step sizes 1/shortcut_max_steps .. 1 (powers of two) are
    # trained: the finest by the flow target, the others by self-consistency (one step of d
    # = two of d/2). A power of two.
    shortcut_max_steps: int = 16
    # "diffusion": denoising steps per generated frame (K = 1, 2, 4, ...; a power of two
    # <= shortcut_max_steps). Each is one pass against the key/value cache, plus one pass
    # that writes the finished frame into the cache.
    sampling_steps: int = 4
    # "diffusion", training, anti-drift: each clip is split at a random frame; the frames
    # before it are context, each noised to a level drawn from U(0, context_noise) and left
    # out of the loss, so the model learns to read slightly wrong pasts (GameNGen's
    # context-noise augmentation); the frames after it get independent levels.
    context_noise: float = 0.1
    # "diffusion", sampling: the noise level at which a context (or finished) frame is
    # written into the cache, so small errors of a generated frame look like the noise the
    # model was trained to read through (Dreamer 4 re-noises its context likewise).
    sample_context_noise: float = 0.05
    # "diffusion": the tokenizer's latents are multiplied by this before they are noised
    # (and the samples divided by it), so that their spread is comparable with the unit
    # noise's; tanh latents of std ~0.3 at scale 1 leave most noise levels near pure noise.
    latent_scale: float = 1.0
    # How the controls (action + camera move + cut) reach the model. "add": one vector added
    # to every token of the frame at the input; "adaln": adaLN-zero, a per-block shift,
    # scale and gate of each sub-layer computed from the controls (DiT), so they act in
    # every layer; "token": a per-frame control token prepended to the frame's tokens,
    # attended to in every layer. Control embeddings start at unit scale in every mode.
    action_conditioning: str = "add"
    # Training: the share of steps whose action is replaced by "no action", so that one
    # model also predicts unconditionally (classifier-free guidance at sampling).
    action_dropout: float = 0.0
    # Training, anti-drift: each input frame has a share of its tokens replaced by random
    # codes, the share drawn per frame from U(0, context_corruption); the targets stay clean.
    # A rollout feeds the model its own imperfect frames; this teaches it to read through
    # them (GameNGen's context-noise augmentation, for tokens). 0: off.
    context_corruption: float = 0.0
    # Training, anti-drift (causal objective): parallel scheduled sampling (Bengio et al.
    # 2015; Duckworth et al. 2019). A no-gradient pass predicts every frame from the clean
    # frames before it; each input frame after the first is, at this rate per (clip,
    # frame), replaced by that greedy prediction; the targets stay clean. The model learns
    # from the errors its own rollouts feed it, not random ones. Costs one more forward
    # pass per step (counted in the FLOPs). 0: off.
    scheduled_sampling: float = 0.0
    # Training: each target token's cross-entropy weighs 1 + motion_weight * m / mean(m), m
    # the mean absolute pixel change of its patch from the frame before (the batch's mean
    # in the denominator; `models.dynamics.motion_weights`). Under a panning camera the
    # background's change is spread thin while a small moving agent's is concentrated, so
    # the few tokens the actions decide get more of the gradient. Reads the frames (also
    # from a latent cache). 0: off (every token weighs 1).
    motion_weight: float = 0.0
    # Leave the first frame of a new shot out of the loss: after a cut the new framing is
    # not predictable from the past, and its tokens would dominate the loss. A cut whose
    # framing the model is told (cut_framing / cut_framing_shift) stays in the loss.
    mask_cut_loss: bool = True
    # Cut framing, a camera command: at a cut, the camera's jump (the new shot's framing
    # relative to the previous shot's last frame) reaches the model through its own
    # embedding (an MLP into the control vector). False: a cut carries no position. Needs
    # use_cuts and use_camera. At the demo budget it made identity after cuts worse
    # (experiments/results/identity_cuts); cut_framing_shift is the one that helps.
    cut_framing: bool = False
    # Cut framing as a shift: at a cut, the last frame's tokens are moved by the framing jump
    # (whole patches; a 2-D pan camera in pixels), tokens that were out of view replaced by a
    # learned vector, so the model re-draws what stays in view. Needs use_cuts and use_camera.
    cut_framing_shift: bool = False
    # With cut_framing_shift: the part of the jump that whole patches leave (up to half a
    # patch per axis) reaches the model as the cut step's pan, the move a pan step's
    # embedding already reads; False: the pan is zero at a cut.
    cut_framing_residual: bool = False
    # Spatial attention with 2-D rotary positions (row and column of each patch) besides the
    # learned absolute ones: attention weights that depend on two tokens' offset on the grid,
    # the same at every position, as a camera pan's shift of the whole frame is. Not with
    # the "token" conditioning (its control token has no place on the grid).
    spatial_rope: bool = False


@dataclass(frozen=True)
class LatentActionConfig:
    """Latent action model (Genie-style): a VQ code per frame transition, learned from video."""

    patch_size: int = 4
    embed_dim: int = 64
    num_layers: int = 2  # encoder layers; the decoder has as many
    num_heads: int = 4
    mlp_dim: int = 256
    num_latent_actions: int = 8  # VQ codebook size: the latent action vocabulary
    latent_dim: int = 16  # code vector size (codes and encoder outputs are unit vectors)
    # Beta of the VQ-VAE commitment loss. 0: unit latents cannot grow, and a weight from
    # 0.05 up collapsed every latent onto one code early in training (models/latent_actions.py).
    commitment_weight: float = 0.0


@dataclass(frozen=True)
class ModelConfig:
    image_size: int = 32  # must match the dataset's frame size
    dtype: str = "float32"  # activation dtype; parameters stay float32
    # jax.nn.dot_product_attention implementation: "xla" anywhere, "cudnn" (fused flash
    # attention) on NVIDIA GPUs with bfloat16 activations.
    attention: str = "xla"
    remat: bool = False  # recompute each block's activations in the backward pass (less memory)
    # With remat, what each block keeps for the backward pass: "full" (nothing: recompute
    # everything), "dots_saveable" (matmul outputs; recompute elementwise ops),
    # "dots_with_no_batch_dims_saveable", or "nothing_saveable".
    remat_policy: str = "full"
    # Run each Transformer's blocks as one nn.scan over stacked parameters (one compiled
    # block instead of num_layers copies: faster compiles). Changes the parameter layout.
    scan_layers: bool = False
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    dynamics: DynamicsConfig = field(default_factory=DynamicsConfig)
    latent_actions: LatentActionConfig = field(default_factory=LatentActionConfig)


@dataclass(frozen=True)
class TrainConfig:
    stage: str = "tokenizer"  # tokenizer | dynamics | latent_actions (wm_jax.stage_checks.STAGE_NAMES)
    steps: int = 100
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    end_learning_rate_fraction: float = 0.1  # cosine decays to lr * this
    weight_decay: float = 1e-4
    grad_clip_norm: float = 1.0
    log_every_steps: int = 10
    tokenizer_workdir: str = ""  # dynamics stage: run directory of a trained tokenizer
    # Dynamics stage on video without action labels: run directory of a trained latent
    # action model; its inferred actions replace the records' `action` (model.latent_actions
    # must match that run, and model.dynamics.num_actions cover its vocabulary).
    latent_actions_workdir: str = ""
    # Numerics guard: a step with a non-finite loss, gradient or updated state is skipped (no update);
    # this many skips in a row stop the run with exit code 3.
    max_nonfinite_steps: int = 3
    spike_window: int = 20  # logged losses the loss-spike z-score is computed over
    spike_zscore: float = 6.0  # a logged loss this many std above the window mean is an event
    # Peak dense TFLOP/s of one device for MFU; 0 looks the device up in
    # telemetry.PEAK_TFLOPS (no MFU is reported for a device not in the table).
    peak_tflops_per_device: float = 0.0
    # Multi-process runs meet at barriers (state ready, run finished); a process missing
    # for this long stops the run with an error naming it, instead of a silent hang.
    barrier_timeout_s: float = 600.0
    # Multi-process runs agree on a stop signal (and a time-based checkpoint) with one
    # collective every this many steps instead of every step (one process: every step, free).
    stop_check_every_steps: int = 10
    # JAX's persistent compilation cache, so a restart skips compiling: "auto" = the run
    # directory's compile_cache/ (the first run in a process sets it for the process),
    # "none" (off), or a directory shared by runs (e.g. one per sweep).
    compile_cache_dir: str = "auto"


@dataclass(frozen=True)
class MeshConfig:
    # Devices along each axis inside one slice (a TPU slice, or one GPU host): -1 means
    # the devices of a slice left over by the other axes.
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    sequence: int = 1
    # Slices along each axis, joined by the data-centre network (DCN): the mesh axis has
    # dcn_<axis> x <axis> devices. Keep tensor and sequence inside slices: they talk every layer.
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    dcn_sequence: int = 1
    # Logical axis -> mesh axes (an empty list: replicated), for parameters (and so for
    # their gradients and optimizer state) ...
    param_rules: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("embed", ("fsdp",)),
        ("mlp", ("tensor",)),
        ("heads", ("tensor",)),
        ("kv", ()),
        ("vocab", ("tensor",)),
        ("codebook", ()),
        ("patch", ()),
        ("pos", ()),
        ("layers", ()),  # the stacked layer axis of model.scan_layers: replicated
    )
    # ... and for activations. `temporal_tokens` is the token axis during temporal
    # attention: mapping it to `sequence` makes a time-sharded clip switch to token
    # sharding (an all-to-all) so each device attends over whole frame sequences.
    activation_rules: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("batch", ("data", "fsdp")),
        ("time", ("sequence",)),
        ("tokens", ()),
        ("temporal_tokens", ("sequence",)),
        ("act_embed", ()),
        ("act_mlp", ("tensor",)),
        ("act_vocab", ("tensor",)),
    )


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 50
    every_minutes: float = 0.0  # also save when this much wall time passed since the last save (0: off)
    max_to_keep: int = 3  # the newest checkpoints kept ...
    keep_period: int = 0  # ... plus every step divisible by this, forever (0: none)
    async_save: bool = True


@dataclass(frozen=True)
class EvalConfig:
    split: str = "test"
    context_frames: int = 4  # C ground-truth frames before the rollout
    horizon: int = 8  # H generated frames
    num_clips: int = 32
    batch_size: int = 16
    video_clips: int = 4  # clips shown in the truth | generated grid
    # Rollout sampling: 0 = greedy argmax; > 0 samples each token's softmax at this
    # temperature (top_k > 0 keeps the k most likely values of each FSQ digit / code).
    temperature: float = 0.0
    top_k: int = 0
    # Classifier-free guidance on actions (a model trained with action_dropout > 0): logits
    # = uncond + guidance * (cond - uncond); 1 is plain conditional sampling.
    guidance: float = 1.0
    # How generated frames become pixels: "decode" renders every frame from its codes;
    # "carry" keeps the previous frame's pixels (the last real frame, then the previous
    # generated one) in every patch whose FSQ code did not change and decodes the rest.
    # On near-static screens (Atari) the tokenizer's reconstruction error then stays
    # where something moved. FSQ tokenizers only.
    render: str = "decode"


@dataclass(frozen=True)
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


DYNAMICS_HEADS = ("factorized", "joint")
DYNAMICS_OBJECTIVES = ("causal", "maskgit", "diffusion")
BOTTLENECKS = ("fsq", "continuous")
ACTION_CONDITIONINGS = ("add", "adaln", "token")
DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = ("xla", "cudnn")
RENDERS = ("decode", "carry")
REMAT_POLICIES = ("full", "dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable")


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of the schema rooted at `cls`, sections included."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(_all_keys(hints[f.name], key + "."))
    return keys


def closest(key: str, candidates: list[str]) -> str:
    """The error-message suffix ` (did you mean 'X'?)` naming the candidate nearest `key`."""
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.0)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks `value` against the annotation `tp`, converting lists to tuples."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' is a section; got {type(value).__name__} {value!r}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be a bool; got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an int; got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"config key '{key}' must be a float; got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a float; got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string; got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list; got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"config key '{key}' must have {len(args)} items; got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}' has a bad value {value!r}")
    raise ConfigError(f"config key '{key}' has an unsupported type {tp}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in values.items():
        if name not in names:
            raise ConfigError(f"unknown config key '{prefix}{name}'" + closest(f"{prefix}{name}", _all_keys(Config)))
        kwargs[name] = _coerce(value, hints[name], prefix + name)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML/JSON-friendly data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def from_dict(values: dict[str, Any]) -> Config:
    """Builds and validates a `Config` from nested plain data."""
    cfg = _build(Config, values or {})
    validate(cfg)
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (['a', 'b'], value); the value is parsed as YAML (safe)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value, e.g. train.steps=100")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML ({e})") from e
    return key.split("."), value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies `a.b=value` overrides to nested plain data (validated later by `from_dict`)."""
    all_keys = _all_keys(Config)
    for text in overrides:
        path, value = parse_override(text)
        dotted = ".".join(path)
        if dotted not in all_keys:
            raise ConfigError(f"unknown config key '{dotted}'" + closest(dotted, all_keys))
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key '{dotted}': '{part}' is not a section")
        node[path[-1]] = value
    return values


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: sections merge key by key, other values in `top` win."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Reads a YAML preset; a top-level `base: other.yaml` (relative to this file) is
    loaded first and this file's keys override it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in _seen:
        raise ConfigError(f"config file {path}: 'base' chain loops back to itself")
    try:
        values = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level")
    base = values.pop("base", None)
    if base is None:
        return values
    if not isinstance(base, str):
        raise ConfigError(f"config file {path}: 'base' must be a file name; got {base!r}")
    return _merge(load_yaml(path.parent / base, _seen + (path.resolve(),)), values)


def load(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Loads a YAML preset (or the defaults), applies overrides, validates."""
    values = load_yaml(path) if path else {}
    try:
        return from_dict(apply_overrides(values, list(overrides)))
    except ConfigError as e:
        raise ConfigError(f"{e}{_origin(str(e), path, overrides)}") from None


def _origin(message: str, path: str | Path | None, overrides: list[str]) -> str:
    """Where a config error comes from, as a suffix: the `--set` overrides whose key the
    message names (or a key under it: 'data.mixture[1][1]'), else the file."""
    named = [o for o in overrides if f"'{o.split('=', 1)[0].strip()}" in message]
    if named:
        return f" [from --set {', '.join(named)}]"
    return f" [in {path}]" if path else ""


def dump(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def replace(cfg: Config, overrides: list[str]) -> Config:
    """A copy of `cfg` with dotted overrides applied and validated."""
    return from_dict(apply_overrides(to_dict(cfg), list(overrides)))


def nonfinite_values(values: Any, prefix: str = "") -> list[tuple[str, float]]:
    """(dotted key, value) of the NaN or infinite numbers in plain config data (list items as key[i])."""
    if isinstance(values, dict):
        return [kv for name, v in values.items() for kv in nonfinite_values(v, f"{prefix}.{name}" if prefix else name)]
    if isinstance(values, list):
        return [kv for i, v in enumerate(values) for kv in nonfinite_values(v, f"{prefix}[{i}]")]
    return [(prefix, values)] if isinstance(values, float) and not math.isfinite(values) else []


def validate(cfg: Config) -> None:
    """Cross-field checks the type system cannot express; the first failing check raises."""
    _check_finite(cfg)
    _check_choices(cfg)
    _check_positive(cfg)
    _check_data_sources(cfg)
    _check_model(cfg)
    _check_ranges(cfg)
    _check_stage(cfg)  # options tied to the training stage
    _check_mesh_rules(cfg)


def _check_finite(cfg: Config) -> None:
    """Every number in the config is finite."""
    # First: a NaN passes every comparison below, and would only surface after compiling.
    bad = nonfinite_values(to_dict(cfg))
    if bad:
        raise ConfigError(f"config key '{bad[0][0]}' must be a finite number; got {bad[0][1]}")


def _check_choices(cfg: Config) -> None:
    """Each string-valued option is one of its allowed values."""
    choices = {
        "train.stage": (cfg.train.stage, stage_checks.STAGE_NAMES),
        "model.dynamics.head": (cfg.model.dynamics.head, DYNAMICS_HEADS),
        "model.dynamics.objective": (cfg.model.dynamics.objective, DYNAMICS_OBJECTIVES),
        "model.tokenizer.bottleneck": (cfg.model.tokenizer.bottleneck, BOTTLENECKS),
        "model.dynamics.action_conditioning": (cfg.model.dynamics.action_conditioning, ACTION_CONDITIONINGS),
        "model.dtype": (cfg.model.dtype, DTYPES),
        "model.attention": (cfg.model.attention, ATTENTION_IMPLS),
        "model.remat_policy": (cfg.model.remat_policy, REMAT_POLICIES),
        "eval.render": (cfg.eval.render, RENDERS),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(
                f"config key '{key}' must be one of {allowed}; got '{value}'" + closest(value, list(allowed))
            )


def _check_positive(cfg: Config) -> None:
    """Sizes, counts and periods are > 0."""
    positive = {
        "data.frames_per_clip": cfg.data.frames_per_clip,
        "data.batch_size": cfg.data.batch_size,
        "data.window_stride": cfg.data.window_stride,
        "train.steps": cfg.train.steps,
        "train.log_every_steps": cfg.train.log_every_steps,
        "train.max_nonfinite_steps": cfg.train.max_nonfinite_steps,
        "train.stop_check_every_steps": cfg.train.stop_check_every_steps,
        "train.spike_window": cfg.train.spike_window,
        "checkpoint.every_steps": cfg.checkpoint.every_steps,
        "checkpoint.max_to_keep": cfg.checkpoint.max_to_keep,
        "model.image_size": cfg.model.image_size,
        "model.tokenizer.patch_size": cfg.model.tokenizer.patch_size,
        "model.latent_actions.patch_size": cfg.model.latent_actions.patch_size,
        "model.latent_actions.latent_dim": cfg.model.latent_actions.latent_dim,
        "eval.horizon": cfg.eval.horizon,
        "model.dynamics.maskgit_steps": cfg.model.dynamics.maskgit_steps,
        "model.tokenizer.latent_dim": cfg.model.tokenizer.latent_dim,
        "model.dynamics.latent_scale": cfg.model.dynamics.latent_scale,
        **{f"mesh.dcn_{axis}": getattr(cfg.mesh, f"dcn_{axis}") for axis in ("data", "fsdp", "tensor", "sequence")},
        "eval.context_frames": cfg.eval.context_frames,
    }
    for key, v in positive.items():
        if v <= 0:
            raise ConfigError(f"config key '{key}' must be > 0; got {v}")


def _check_data_sources(cfg: Config) -> None:
    """One dataset or a mixture, and each mixture entry a directory with a positive weight."""
    if cfg.data.mixture and cfg.data.dir:
        raise ConfigError(
            "config keys 'data.dir' and 'data.mixture' are both set: train on one dataset or on a mixture"
        )
    for i, (data_dir, weight) in enumerate(cfg.data.mixture):
        if not data_dir or weight <= 0:
            raise ConfigError(
                f"config key 'data.mixture[{i}]' must be [DIR, weight] with a directory and a "
                f"weight > 0; got {[data_dir, weight]}"
            )


def _check_model(cfg: Config) -> None:
    """Model shapes fit together: patches tile the image, heads split the width, codebooks are usable."""
    lam = cfg.model.latent_actions
    for key, patch_size in (
        ("model.tokenizer", cfg.model.tokenizer.patch_size),
        ("model.latent_actions", lam.patch_size),
    ):
        if cfg.model.image_size % patch_size:
            raise ConfigError(
                f"config key 'model.image_size' ({cfg.model.image_size}) must be divisible by "
                f"'{key}.patch_size' ({patch_size})"
            )
    if lam.num_latent_actions < 2:
        raise ConfigError(
            f"config key 'model.latent_actions.num_latent_actions' must be >= 2; got {lam.num_latent_actions}"
        )
    if lam.commitment_weight < 0:
        raise ConfigError(
            f"config key 'model.latent_actions.commitment_weight' must be >= 0; got {lam.commitment_weight}"
        )
    for key, sub in (
        ("model.tokenizer", cfg.model.tokenizer),
        ("model.dynamics", cfg.model.dynamics),
        ("model.latent_actions", lam),
    ):
        if sub.embed_dim % sub.num_heads:
            raise ConfigError(
                f"config key '{key}.embed_dim' ({sub.embed_dim}) must be divisible by "
                f"'{key}.num_heads' ({sub.num_heads})"
            )
    if any(level < 2 for level in cfg.model.tokenizer.fsq_levels) or not cfg.model.tokenizer.fsq_levels:
        raise ConfigError("config key 'model.tokenizer.fsq_levels' needs levels >= 2")
    if cfg.model.dynamics.spatial_rope and cfg.model.dynamics.action_conditioning == "token":
        raise ConfigError(
            "config key 'model.dynamics.spatial_rope' puts every token on the patch grid; the 'token' "
            "conditioning's control token has no place there: use 'adaln' or 'add'"
        )
    if cfg.model.dynamics.cut_framing_residual and not cfg.model.dynamics.cut_framing_shift:
        raise ConfigError(
            "config key 'model.dynamics.cut_framing_residual' is what the token shift leaves of a cut's "
            "jump: it needs 'model.dynamics.cut_framing_shift: true'"
        )


def _check_ranges(cfg: Config) -> None:
    """Bounded values: action dropout, context corruption, scheduled sampling and the diffusion noise levels in [0, 1), sampling
    settings and the temporal window >= 0, the shortcut step counts powers of two."""
    unit = {
        "model.dynamics.action_dropout": cfg.model.dynamics.action_dropout,
        "model.dynamics.context_corruption": cfg.model.dynamics.context_corruption,
        "model.dynamics.scheduled_sampling": cfg.model.dynamics.scheduled_sampling,
        "model.dynamics.context_noise": cfg.model.dynamics.context_noise,
        "model.dynamics.sample_context_noise": cfg.model.dynamics.sample_context_noise,
    }
    for key, v in unit.items():
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"config key '{key}' must be in [0, 1); got {v}")
    if not cfg.model.dynamics.motion_weight >= 0:
        raise ConfigError(
            f"config key 'model.dynamics.motion_weight' must be >= 0; got {cfg.model.dynamics.motion_weight}"
        )
    if cfg.eval.temperature < 0 or cfg.eval.top_k < 0 or not cfg.eval.guidance >= 0:
        raise ConfigError(
            f"config keys 'eval.temperature', 'eval.top_k' and 'eval.guidance' must be >= 0; got "
            f"{cfg.eval.temperature}, {cfg.eval.top_k}, {cfg.eval.guidance}"
        )
    steps = {
        "model.dynamics.shortcut_max_steps": cfg.model.dynamics.shortcut_max_steps,
        "model.dynamics.sampling_steps": cfg.model.dynamics.sampling_steps,
    }
    for key, v in steps.items():
        if v < 1 or v & (v - 1):
            raise ConfigError(f"config key '{key}' must be a power of two; got {v}")
    if cfg.eval.render == "carry" and cfg.model.tokenizer.bottleneck != "fsq":
        raise ConfigError(
            "config key 'eval.render' = 'carry' needs FSQ codes (model.tokenizer.bottleneck: fsq): "
            "continuous latents never repeat exactly"
        )
    if cfg.model.dynamics.sampling_steps > cfg.model.dynamics.shortcut_max_steps:
        raise ConfigError("config key 'model.dynamics.sampling_steps' must be <= 'model.dynamics.shortcut_max_steps'")
    if cfg.model.dynamics.temporal_window < 0:
        raise ConfigError(
            f"config key 'model.dynamics.temporal_window' must be >= 0 (0: whole clip); "
            f"got {cfg.model.dynamics.temporal_window}"
        )


def _check_stage(cfg: Config) -> None:
    """The checks of cfg's training stage (`wm_jax.stage_checks`: JAX-free, like this module)."""
    problem = stage_checks.stage_problem(cfg)
    if problem:
        raise ConfigError(problem)


def _check_mesh_rules(cfg: Config) -> None:
    """Sharding rules name real mesh axes, and no logical axis is both a parameter and an activation axis."""
    mesh_axes = {"data", "fsdp", "tensor", "sequence"}
    for key in ("param_rules", "activation_rules"):
        for logical, axes in getattr(cfg.mesh, key):
            for a in axes:
                if a not in mesh_axes:
                    raise ConfigError(
                        f"config key 'mesh.{key}' maps '{logical}' to unknown mesh axis '{a}'"
                        + closest(a, sorted(mesh_axes))
                    )
    shared = {name for name, _ in cfg.mesh.param_rules} & {name for name, _ in cfg.mesh.activation_rules}
    if shared:
        raise ConfigError(
            f"config keys 'mesh.param_rules' and 'mesh.activation_rules' both name {sorted(shared)}: "
            "a logical axis belongs to parameters or to activations, not both"
        )
