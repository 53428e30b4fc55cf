"""Run directories and inference bundles, as every reader sees them.

A run directory (`wm train --workdir RUN`) holds config.yaml, manifest.json and
checkpoints/; an inference bundle (`wm export`, written by `wm_jax.export`) holds
bundle.json, config.yaml, manifest.json and params/. Evaluation, export, generation,
the latent cache, the LAM probe and training (for its frozen stages) read both through
this module: their config, their parameters, the frozen runs they name, and the
datasets they were trained on.

A run directory survives a copy: its config.yaml holds absolute paths (`absolute_paths`)
and its manifest.json the directory it was trained in, so a run moved together with the
runs and datasets it names (one folder copied elsewhere) finds them where they now are
(`load_run_config`). What cannot be found is named with its config key and the fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from data_pipelines import latent_cache
from data_pipelines import mixture as mixture_lib
from data_pipelines.writer import DatasetError, read_manifest, verify_dataset
from wm_jax import checkpoint as ckpt
from wm_jax import config as config_lib
from wm_jax import telemetry
from wm_jax.config import Config, ConfigError, ModelConfig
from wm_jax.stages import frozen_workdirs, get_stage
from wm_jax.stages.tokenizer import TOKENIZER
from wm_jax.train.state import state_shardings

BUNDLE_FORMAT = "wm_jax.bundle/1"


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / "bundle.json").is_file()


def read_bundle(path: str | Path) -> dict:
    info = json.loads((Path(path) / "bundle.json").read_text())
    if info.get("format") != BUNDLE_FORMAT:
        raise ckpt.CheckpointError(
            f"{path}: unsupported bundle format {info.get('format')!r} (expected {BUNDLE_FORMAT})"
        )
    return info


def load_bundle_params(path: str | Path, abstract_params: Any) -> Any:
    """The bundle's parameters onto the shardings of `abstract_params`."""
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            return checkpointer.restore(Path(path).resolve() / "params", abstract_params)
        except (ValueError, KeyError, TypeError) as e:
            raise ckpt.CheckpointError(f"bundle {path}: parameters do not fit the model: {str(e)[:600]}") from e


def frozen_source(path: str | Path, cfg: Config, stage: str) -> Path:
    """Where the frozen `stage` model of a run or bundle lives: inside a bundle (`wm export`
    bundles a stage's `Stage.bundled`), or the run its config key names (`Stage.workdir_key`)."""
    return Path(path) / stage if is_bundle(path) else named_run(cfg, get_stage(stage).workdir_key)


def tokenizer_source(path: str | Path, cfg: Config) -> Path:
    """Where a dynamics model's tokenizer lives: inside a bundle, or the run's tokenizer_workdir."""
    return frozen_source(path, cfg, TOKENIZER.name)


def with_tokenizer_run(cfg: Config, path: str | Path) -> Config:
    """cfg reading its frozen tokenizer from the run (or bundle) at `path` instead of the one
    `train.tokenizer_workdir` names: for a run moved without it. CheckpointError when `path`
    is not a run directory, ConfigError when it is not a tokenizer's or cfg reads none."""
    if TOKENIZER.name not in frozen_workdirs(cfg):
        raise ConfigError(f"a {cfg.train.stage} run reads no tokenizer run ({TOKENIZER.workdir_key})")
    stage = load_run_config(path).train.stage
    if stage != TOKENIZER.name:
        raise ConfigError(f"{path} is a {stage} run, not a tokenizer run (for {TOKENIZER.workdir_key})")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, tokenizer_workdir=os.path.abspath(path)))


def named_run(cfg: Config, key: str) -> Path:
    """The run directory config key `key` (train.*_workdir) names; CheckpointError naming the
    key, the path and the fixes when nothing is there."""
    path = Path(getattr(cfg.train, key.split(".")[1]))
    if not (path / "config.yaml").is_file():
        raise ckpt.CheckpointError(
            f"config key '{key}' names {path}, which is not a run directory (moved or deleted?): put the run "
            f"back there or beside this run as when it was trained, or set {key} to where it is now "
            f"(`wm train --set {key}=DIR`, or in this run's config.yaml); `wm export` bundles carry their tokenizer"
        )
    return path


# Config keys holding a directory (besides data.mixture's), stored absolute in a run.
PATH_KEYS = ("data.dir", "data.latent_cache", "train.tokenizer_workdir", "train.latent_actions_workdir")


def map_paths(cfg: Config, fn: Callable[[str], str]) -> Config:
    """cfg with each set directory (PATH_KEYS and data.mixture's) replaced by fn(directory)."""
    changes: dict[str, dict[str, Any]] = {"data": {}, "train": {}}
    for key in PATH_KEYS:
        section, name = key.split(".")
        if value := getattr(getattr(cfg, section), name):
            changes[section][name] = fn(value)
    if cfg.data.mixture:
        changes["data"]["mixture"] = tuple((fn(d), w) for d, w in cfg.data.mixture)
    return dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s), **c) for s, c in changes.items()})


def absolute_paths(cfg: Config) -> Config:
    """cfg with its directories absolute (relative ones are read from the current directory)."""
    return map_paths(cfg, os.path.abspath)


def write_run_config(cfg: Config, workdir: Path, manifest: dict) -> None:
    """config.yaml (directories absolute) and manifest.json (`manifest` plus the run's own
    absolute directory, `run_dir`, which `load_run_config` relocates from)."""
    config_lib.dump(absolute_paths(cfg), workdir / "config.yaml")
    (workdir / "manifest.json").write_text(json.dumps({**manifest, "run_dir": os.path.abspath(workdir)}, indent=2))


def relocated(cfg: Config, workdir: Path) -> Config:
    """cfg with each directory that is gone from where it was found instead at the same
    place relative to `workdir` as it was to the directory the run was trained in (a run
    copied together with its tokenizer run and dataset); unchanged for a run that has not
    moved, or that predates manifest.json's `run_dir`."""
    try:
        origin = Path(json.loads((workdir / "manifest.json").read_text())["run_dir"])
    except (OSError, ValueError, KeyError):
        return cfg
    here = Path(os.path.abspath(workdir))  # as absolute_paths wrote the others: symlinks kept
    if origin == here:
        return cfg

    def move(value: str) -> str:
        candidate = Path(os.path.normpath(here / os.path.relpath(value, origin)))
        return (
            str(candidate) if Path(value).is_absolute() and not Path(value).exists() and candidate.exists() else value
        )

    return map_paths(cfg, move)


def check_dataset(cfg: Config, data_dir: str, split: str, warn: Callable[[str], None] | None = None) -> dict:
    """Verifies the dataset (hashes included) and that its frames fit the model.

    Given `warn` (a callable taking a message) and `data.skip_bad_records`, a hash
    mismatch is passed to it instead of raised: the loader skips what it cannot read.
    Missing or unreadable shards raise either way."""
    if not data_dir:
        raise ConfigError("config key 'data.dir' is empty: point it at a dataset made by `wm data make`")
    if not Path(data_dir).is_dir():
        raise DatasetError(
            f"dataset directory {data_dir} does not exist (config key 'data.dir'; `wm eval` and "
            f"`wm generate` take --data DIR for a run whose dataset has moved)"
        )
    try:
        manifest = verify_dataset(data_dir)
    except DatasetError as e:
        if not (cfg.data.skip_bad_records and warn):
            raise
        manifest = verify_dataset(data_dir, check_hashes=False)
        warn(f"{e} (data.skip_bad_records: training on, skipping windows that fail to load)")
    if split not in manifest["splits"]:
        raise DatasetError(f"dataset {data_dir} has no split '{split}'; it has {sorted(manifest['splits'])}")
    size = manifest["frame_size"]
    if size != cfg.model.image_size:
        raise ConfigError(
            f"config key 'model.image_size' is {cfg.model.image_size} but dataset {data_dir} has {size}x{size} frames"
        )
    return manifest


def check_mixture(cfg: Config, split: str, warn: Callable[[str], None] | None = None) -> dict:
    """`check_dataset` for every dataset of `data.mixture`, once they are known to exist
    (a missing one is named with its index) and to share one frame size.

    Returns what the run needs of a manifest: frame_size, fields (those every dataset has
    with one dtype and shape: the only ones batched), content_hash (of the mixture: the
    datasets' hashes and weights) and mixture (each dataset's dir, weight and content
    hash, plus the fields kept and dropped) for the run's manifest.json."""
    sizes = {}
    for i, (data_dir, _) in enumerate(cfg.data.mixture):
        try:
            sizes[data_dir] = read_manifest(data_dir)["frame_size"]
        except DatasetError as e:
            raise DatasetError(f"config key 'data.mixture[{i}]': {e}") from e
    if len(set(sizes.values())) > 1:
        raise DatasetError(f"config key 'data.mixture': the datasets' frame sizes differ: {sizes}")
    manifests = [check_dataset(cfg, data_dir, split, warn) for data_dir, _ in cfg.data.mixture]
    kept, dropped = mixture_lib.common_fields([m["fields"] for m in manifests])
    if dropped:
        telemetry.info(f"data.mixture: fields {dropped} are not in every dataset with one dtype and shape: not batched")
    hashes, weights = [m["content_hash"] for m in manifests], [w for _, w in cfg.data.mixture]
    datasets = [{"dir": d, "weight": w, "content_hash": h} for (d, w), h in zip(cfg.data.mixture, hashes)]
    return {
        "frame_size": manifests[0]["frame_size"],
        "fields": {k: manifests[0]["fields"][k] for k in kept},
        "content_hash": mixture_lib.mixture_hash(hashes, weights),
        "mixture": {"datasets": datasets, "fields": kept, "dropped_fields": dropped},
    }


def load_run_config(workdir: str | Path) -> Config:
    """The config of a run directory (`relocated` if it has moved) or of a bundle."""
    path = Path(workdir) / "config.yaml"
    if not path.is_file():
        raise ckpt.CheckpointError(f"{workdir} is not a run directory (missing {path})")
    cfg = config_lib.load(path)
    return cfg if is_bundle(workdir) else relocated(cfg, Path(workdir))


def tokenizer_hash(model_cfg: ModelConfig) -> str:
    """sha256 of a ModelConfig's `tokenizer` section and `image_size` (what a tokenizer's
    codes depend on besides its parameters), as canonical JSON; a dynamics run's config
    gives the same hash as the tokenizer run it reads."""
    section = {"image_size": model_cfg.image_size, "tokenizer": config_lib.to_dict(model_cfg.tokenizer)}
    return hashlib.sha256(json.dumps(section, sort_keys=True).encode()).hexdigest()


def tokenizer_identity(workdir: str | Path) -> tuple[Config, latent_cache.TokenizerIdentity]:
    """(run config, identity) of a tokenizer run or bundle, as a latent cache records it:
    the step of its newest good checkpoint (or of the bundle), its config hash and the
    fingerprint of that step's parameter files (`checkpoint.files_fingerprint`).
    CheckpointError if it is not a run, ConfigError if it is not a tokenizer's."""
    run_cfg = load_run_config(workdir)
    if run_cfg.train.stage != TOKENIZER.name:
        raise ConfigError(f"{workdir} is a {run_cfg.train.stage} run, not a tokenizer run (train.stage: tokenizer)")
    if is_bundle(workdir):
        step, files = read_bundle(workdir)["step"], Path(workdir) / "params"
    else:  # the step restore_params reads: the newest that passes the checkpoint integrity check
        step, _ = ckpt.read_good(workdir, None, lambda manager, s: None, warn=telemetry.warn)
        files = ckpt.checkpoint_dir(workdir) / str(step)
    fingerprint = ckpt.files_fingerprint(files)
    return run_cfg, latent_cache.TokenizerIdentity(str(workdir), step, tokenizer_hash(run_cfg.model), fingerprint)


def restore_params(workdir: str | Path, mesh: Any, rules: Any, step: int | None = None) -> tuple[Any, Config, int]:
    """Parameters of a run's checkpoint (no optimizer bytes read), or of an inference bundle,
    onto `mesh`: (params, run config, step). The checkpoint is the newest that passes the
    integrity check resume uses (`ckpt.read_good`; damaged ones are named on the console),
    or `step`: every reader (eval, export, generate, play/serve, the latent cache) comes
    through here. ConfigError naming the `model.*` keys where the run's config.yaml differs
    from the checkpoint's config (config.yaml edited after training)."""
    run_cfg = load_run_config(workdir)
    abstract, _ = state_shardings(run_cfg, mesh, rules)
    if is_bundle(workdir):
        info = read_bundle(workdir)
        if step is not None and step != info["step"]:
            raise ckpt.CheckpointError(f"bundle {workdir} holds step {info['step']}, not {step}")
        return load_bundle_params(workdir, abstract.params), run_cfg, info["step"]

    def read(manager: Any, s: int) -> Any:
        ckpt.check_compatible(
            manager,
            s,
            run_cfg,
            workdir,
            fix=f"Was {Path(workdir) / 'config.yaml'} edited after "
            "training? Restore its model section (the checkpoint's config is in its config/ item).",
        )
        return ckpt.restore_params(manager, s, abstract.params)

    step, params = ckpt.read_good(workdir, step, read, warn=telemetry.warn)
    return params, run_cfg, step


def load_frozen(cfg: Config, mesh: Any, rules: Any) -> dict[str, Any] | None:
    """Parameters of the trained models cfg's stage reads but does not train
    (`Stage.frozen_stages`: for dynamics the tokenizer, and a latent action model), by stage,
    each checked against its `model.*` section; None for stages that read none."""
    frozen = {}
    for stage, path in frozen_workdirs(cfg).items():
        key, section = get_stage(stage).workdir_key, get_stage(stage).model_section  # how cfg names and shapes it
        if not path:
            raise ConfigError(f"config key '{key}' must name a trained {stage} run for stage {cfg.train.stage}")
        workdir = named_run(cfg, key)
        params, run_cfg, step = restore_params(workdir, mesh, rules)
        ours, theirs = getattr(cfg.model, section), getattr(run_cfg.model, section)
        if ours != theirs or run_cfg.model.image_size != cfg.model.image_size:
            raise ConfigError(
                f"config keys 'model.{section}'/'model.image_size' differ from the {stage} run {workdir}: "
                f"{config_lib.to_dict(run_cfg.model)[section]} (image_size {run_cfg.model.image_size}) vs "
                f"{config_lib.to_dict(cfg.model)[section]} (image_size {cfg.model.image_size})"
            )
        telemetry.info(f"{stage}: {workdir} step {step}")
        frozen[stage] = params
    return frozen or None
