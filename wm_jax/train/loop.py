"""The training driver: data, sharded steps, logging, checkpoints, resume, preemption.

`train(cfg, workdir)` is what `wm train` calls. Running it again on the same workdir
resumes from the newest finished checkpoint: train state and data iterator position.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import signal
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import linen as nn

from data_pipelines import latent_cache
from data_pipelines import mixture as mixture_lib
from data_pipelines.loader import CODES, SKIPPED, make_loader
from data_pipelines.writer import DatasetError, read_manifest, verify_dataset
from wm_jax import checkpoint as ckpt
from wm_jax import config as config_lib
from wm_jax import distributed, export, provenance, sharding, telemetry
from wm_jax.config import Config, ConfigError, ModelConfig
from wm_jax.models import flops
from wm_jax.train.guards import StopFlag
from wm_jax.train.lock import RunLock
from wm_jax.train.state import TrainState, create_train_state, param_count, param_counts_by_module, state_shardings
from wm_jax.train.step import batch_fields, frozen_stages, jit_train_step, make_sensitivity_fn

EXIT_PREEMPTED = 42


class Preempted(Exception):
    """Raised after a successful save when SIGTERM/SIGUSR1/SIGINT arrived; the CLI exits 42."""


def check_dataset(cfg: Config, data_dir: str, split: str, warn: Callable[[str], None] | None = None) -> dict:
    """Verifies the dataset (hashes included) and that its frames fit the model.

    Given `warn` (a callable taking a message) and `data.skip_bad_records`, a hash
    mismatch is passed to it instead of raised: the loader skips what it cannot read.
    Missing or unreadable shards raise either way."""
    if not data_dir:
        raise ConfigError("config key 'data.dir' is empty: point it at a dataset made by `wm data make`")
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
            f"config key 'model.image_size' is {cfg.model.image_size} but dataset {data_dir} has "
            f"{size}x{size} frames"
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
    return {"frame_size": manifests[0]["frame_size"], "fields": {k: manifests[0]["fields"][k] for k in kept},
            "content_hash": mixture_lib.mixture_hash(hashes, weights),
            "mixture": {"datasets": datasets, "fields": kept, "dropped_fields": dropped}}


def loaded_fields(cfg: Config, available: Iterable[str]) -> list[str]:
    """The record fields the loader decodes and ships: those the step of cfg's stage
    reads (`batch_fields`) and `action` (`batch_fingerprint` hashes it). Leaving the
    others in the records saves their decoding and, with worker processes, a
    shared-memory transfer each per batch (with a latent cache: the frames)."""
    available = list(available)
    wanted = set(batch_fields(cfg, available + ([CODES] if cfg.data.latent_cache else []))) | {"action"}
    return [k for k in available if k in wanted]


def open_latent_cache(cfg: Config, manifest: dict) -> Any:
    """The latent cache of `data.latent_cache` (None if unset), checked to be of this
    dataset and tokenizer run, and to hold exactly the codes the tokenizer gives each
    training window: the encoder is causal in time, so the cache's windows of C frames
    from each episode's start must contain every training window from its first frame."""
    if not cfg.data.latent_cache:
        return None
    cache = latent_cache.open_cache(cfg.data.latent_cache, expect_content_hash=manifest["content_hash"],
                                    expect_tokenizer=tokenizer_identity(cfg.train.tokenizer_workdir)[1])
    c = cache.manifest["tokenizer"]["window_frames"]
    if cfg.data.window_stride % c or cfg.data.frames_per_clip > c:
        raise ConfigError(
            f"config keys 'data.window_stride' ({cfg.data.window_stride}) and 'data.frames_per_clip' "
            f"({cfg.data.frames_per_clip}): latent cache {cfg.data.latent_cache} holds codes of windows of {c} frames "
            f"from each episode's start; set data.window_stride to a multiple of {c} and data.frames_per_clip <= {c}"
        )
    telemetry.info(f"latent cache: {cfg.data.latent_cache} (codes of windows of {c} frames)")
    return cache


def load_run_config(workdir: str | Path) -> Config:
    path = Path(workdir) / "config.yaml"
    if not path.is_file():
        raise ckpt.CheckpointError(f"{workdir} is not a run directory (missing {path})")
    return config_lib.load(path)


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
    if run_cfg.train.stage != "tokenizer":
        raise ConfigError(f"{workdir} is a {run_cfg.train.stage} run, not a tokenizer run (train.stage: tokenizer)")
    if export.is_bundle(workdir):
        step, files = export.read_bundle(workdir)["step"], Path(workdir) / "params"
    else:  # the step restore_params reads: the newest that passes the checkpoint integrity check
        step, _ = ckpt.read_good(workdir, None, lambda manager, s: None, warn=telemetry.warn)
        files = ckpt.checkpoint_dir(workdir) / str(step)
    fingerprint = ckpt.files_fingerprint(files)
    return run_cfg, latent_cache.TokenizerIdentity(str(workdir), step, tokenizer_hash(run_cfg.model), fingerprint)


def restore_params(workdir: str | Path, mesh: Any, rules: Any, step: int | None = None) -> tuple[Any, Config, int]:
    """Parameters of a run's checkpoint (no optimizer bytes read), or of an inference bundle,
    onto `mesh`: (params, run config, step). The checkpoint is the newest that passes the
    integrity check resume uses (`ckpt.read_good`; damaged ones are named on the console),
    or `step`: every reader (eval, export, generate, the latent cache) comes through here."""
    run_cfg = load_run_config(workdir)
    abstract, _ = state_shardings(run_cfg, mesh, rules)
    if export.is_bundle(workdir):
        info = export.read_bundle(workdir)
        if step is not None and step != info["step"]:
            raise ckpt.CheckpointError(f"bundle {workdir} holds step {info['step']}, not {step}")
        return export.load_bundle_params(workdir, abstract.params), run_cfg, info["step"]
    step, params = ckpt.read_good(workdir, step, lambda manager, s: ckpt.restore_params(manager, s, abstract.params),
                                  warn=telemetry.warn)
    return params, run_cfg, step


# The frozen models a dynamics run reads: config key naming the run, and the model
# config section that must match it.
FROZEN_RUNS = {"tokenizer": ("train.tokenizer_workdir", "tokenizer"),
               "latent_actions": ("train.latent_actions_workdir", "latent_actions")}


def load_frozen(cfg: Config, mesh: Any, rules: Any) -> dict[str, Any] | None:
    """Parameters of the trained models cfg's stage reads but does not train
    (`frozen_stages`: the tokenizer, and a latent action model), by stage, each checked
    against its `model.*` section; None for stages that read none."""
    frozen = {}
    for stage in frozen_stages(cfg):
        key, section = FROZEN_RUNS[stage]
        workdir = getattr(cfg.train, key.split(".")[1])
        if not workdir:
            raise ConfigError(f"config key '{key}' must name a trained {stage} run for stage {cfg.train.stage}")
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


def batch_fingerprint(batch: dict[str, np.ndarray]) -> int:
    """CRC32 of this process's frames (or cached codes) and actions, those the batch has:
    identical batches, identical numbers."""
    crc = 0
    for name in ("frame", CODES, "action"):
        if name in batch:
            crc = zlib.crc32(np.ascontiguousarray(batch[name]).tobytes(), crc)
    return crc


def loss_zscore(loss: float, recent: collections.deque) -> float:
    """How many standard deviations `loss` lies above the mean of `recent` (0 until 5 values)."""
    if len(recent) < 5 or not np.isfinite(loss):
        return 0.0
    mean, std = float(np.mean(recent)), float(np.std(recent))
    return (loss - mean) / max(std, 1e-8)


def _encode_iterator_state(state: Any) -> dict:
    raw = state.decode() if isinstance(state, bytes) else state
    return {"iterator": raw}


def _decode_iterator_state(saved: dict) -> bytes:
    raw = saved["iterator"]
    return raw.encode() if isinstance(raw, str) else raw


def open_workdir(workdir: str | Path) -> Path:
    """The run directory, created if missing (process 0); ConfigError naming it when it
    cannot be one (a file, or a parent that is a file or not writable)."""
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"run directory {workdir} is a file, not a directory; give --workdir a directory")
    if jax.process_index() == 0:
        try:
            workdir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"run directory {workdir} cannot be created: {e.strerror} ({e.filename})") from None
    return workdir


def train(cfg: Config, workdir: str | Path, *, stop_at: int | None = None) -> TrainState:
    """Trains `cfg.train.stage` for `cfg.train.steps` steps in `workdir`; resumes if possible.

    `stop_at` ends this invocation after that global step with a checkpoint, as a
    preemption would (the schedule still runs to `cfg.train.steps` on resume). The run
    lock is held throughout: a second writer of `workdir` is refused (RunLocked)."""
    workdir = open_workdir(workdir)
    with RunLock(workdir) as lock:
        return _train(cfg, workdir, stop_at, lock.events)


def _train(cfg: Config, workdir: Path, stop_at: int | None, lock_events: list[tuple[str, str]]) -> TrainState:
    bad_data: list[str] = []  # logged as events once the logger exists
    if cfg.data.mixture:
        manifest = check_mixture(cfg, cfg.data.split, warn=bad_data.append)
    else:
        manifest = check_dataset(cfg, cfg.data.dir, cfg.data.split, warn=bad_data.append)
    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.logical_rules(cfg.mesh)
    sharding.check_batch_divisible(cfg.data.batch_size, mesh, rules)

    manager = ckpt.make_manager(workdir, cfg.checkpoint)
    if manager.latest_step() is not None:  # refuse another model before touching the run
        ckpt.check_compatible(manager, manager.latest_step(), cfg, workdir)
    dataset_hash = manifest["content_hash"]
    mixture_info = {"mixture": manifest["mixture"]} if cfg.data.mixture else {}
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        config_lib.dump(cfg, workdir / "config.yaml")
        (workdir / "manifest.json").write_text(
            json.dumps({**provenance.run_manifest(dataset_hash=dataset_hash, mesh_shape=dict(mesh.shape)), **mixture_info},
                       indent=2)
        )

    frozen = load_frozen(cfg, mesh, rules)
    abstract, shardings = state_shardings(cfg, mesh, rules)
    # Each process loads its own slice of the global batch (ShardByJaxProcess); with
    # data.worker_count > 0 grain's worker processes read and decode it, off this thread.
    loader_args = dict(
        split=cfg.data.split,
        frames_per_clip=cfg.data.frames_per_clip,
        batch_size=cfg.data.batch_size // jax.process_count(),
        seed=cfg.seed,
        window_stride=cfg.data.window_stride,
        worker_count=cfg.data.worker_count,
        skip_bad_records=cfg.data.skip_bad_records,
        fields=loaded_fields(cfg, manifest["fields"]),
    )
    if cfg.data.mixture:
        loader = mixture_lib.make_mixture_loader(cfg.data.mixture, **loader_args)
    else:
        loader = make_loader(cfg.data.dir, **loader_args, latent_cache=open_latent_cache(cfg, manifest))
    batches = iter(loader)
    damaged: list[str] = []
    found = ckpt.restore_newest_good(manager, abstract, cfg, workdir, warn=damaged.append)
    if found is None:
        state, start_step = create_train_state(cfg, mesh, rules, shardings), 0
    else:
        start_step, state, data_state = found
        try:
            batches.set_state(_decode_iterator_state(data_state))
        except ValueError as e:  # grain names the saved and the current source/sampler
            raise ckpt.CheckpointError(
                f"{workdir}: the data position saved at step {start_step} does not fit this loader (another "
                f"dataset, batch size, data.worker_count, latent cache or loader version); resume with the "
                f"settings it was saved with, or train in a new workdir: {e}") from e
        telemetry.info(f"resumed from {ckpt.checkpoint_dir(workdir)}/{start_step}")
    telemetry.info(
        f"stage {cfg.train.stage}: {param_count(state.params):,} parameters, "
        f"{flops.train_step_flops(cfg):.3g} FLOPs per step, mesh {dict(mesh.shape)}, "
        f"{jax.device_count()} devices, {jax.process_count()} processes"
    )
    by_module = ", ".join(f"{k} {v:,}" for k, v in param_counts_by_module(state.params).items())
    telemetry.info(f"parameters per module: {by_module}")

    # The restored frozen parameters already sit on their shardings.
    fields = batch_fields(cfg, list(manifest["fields"]) + ([CODES] if cfg.data.latent_cache else []))
    step_fn = jit_train_step(cfg, mesh, rules, shardings, jax.tree.map(lambda x: x.sharding, frozen), fields)
    uses_actions = cfg.train.stage == "dynamics" and cfg.model.dynamics.use_actions
    sensitivity_fn = make_sensitivity_fn(cfg) if uses_actions else None
    # Every process restored the same step (or none) and is about to run collectives.
    distributed.barrier("state_ready", cfg.train.barrier_timeout_s)
    frames_per_step = cfg.data.batch_size * cfg.data.frames_per_clip
    step_flops, step_tokens = flops.train_step_flops(cfg), flops.tokens_per_step(cfg)
    device = jax.devices()[0]
    peak = telemetry.peak_tflops(device.device_kind, cfg.model.dtype, cfg.train.peak_tflops_per_device)
    logger = telemetry.RunLogger(workdir, cfg.train.steps, start_step, cfg.train.stage)
    for message in bad_data:
        logger.event(start_step, "bad_data", message)
    for message in damaged:
        logger.event(start_step, "damaged_checkpoint", message)
    for kind, message in lock_events:
        logger.event(start_step, kind, message)
    step, skipped_in_a_row, last_save = start_step, 0, time.monotonic()
    skipped_windows = skipped_logged = 0  # windows with a bad record the loader replaced
    # Checksums are computed off the training thread: hashing a large checkpoint takes seconds.
    sealer = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    recent_losses: collections.deque[float] = collections.deque(maxlen=cfg.train.spike_window)
    try:
        with StopFlag() as stop, jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            window_start, window_step, wait_s = time.perf_counter(), step, 0.0
            last = min(cfg.train.steps, stop_at or cfg.train.steps)
            while step < last:
                t0 = time.perf_counter()
                local = next(batches)
                wait_s += time.perf_counter() - t0
                skipped_windows += int(local[SKIPPED].sum()) if SKIPPED in local else 0
                batch = sharding.shard_batch({k: local[k] for k in fields}, mesh, rules)
                state, metrics = step_fn(state, batch, frozen)
                step += 1
                # One scalar read per step: the guard must count consecutive skips exactly.
                if bool(metrics["skipped"]):
                    skipped_in_a_row += 1
                    logger.event(step, "nonfinite", f"non-finite loss, gradient or updated state: update skipped "
                                 f"({skipped_in_a_row} in a row)")
                    if skipped_in_a_row >= cfg.train.max_nonfinite_steps:
                        manager.wait_until_finished()  # the newest step named below is on disk
                        raise FloatingPointError(
                            f"{skipped_in_a_row} consecutive non-finite steps at step {step}; last good checkpoint: "
                            f"{manager.latest_step()} (every saved state is finite: skipped updates are never applied)"
                        )
                else:
                    skipped_in_a_row = 0
                if step % cfg.train.log_every_steps == 0 or step == last:
                    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    if sensitivity_fn is not None:  # does the model read its actions yet?
                        values["action_sensitivity"] = float(sensitivity_fn(state.params, batch, frozen, state.step))
                    # Window averages; the first window of a process includes compilation.
                    elapsed, n = time.perf_counter() - window_start, step - window_step
                    values.update(
                        step_s=elapsed / n,
                        **telemetry.throughput(elapsed / n, step_flops, step_tokens, frames_per_step, jax.device_count(), peak),
                        data_wait_fraction=wait_s / elapsed,
                        batch_crc32=batch_fingerprint(local),
                    )
                    if cfg.data.skip_bad_records:  # this process's count since this invocation started
                        values["bad_windows_skipped"] = skipped_windows
                        if skipped_windows > skipped_logged:
                            logger.event(step, "bad_data", f"{skipped_windows - skipped_logged} window(s) with a bad record "
                                         f"skipped since the last log (the loader's warnings name them)", total=skipped_windows)
                            skipped_logged = skipped_windows
                    spike = loss_zscore(values["loss"], recent_losses)
                    if spike > cfg.train.spike_zscore:
                        logger.event(step, "loss_spike", f"loss {values['loss']:.4g} is {spike:.1f} std above the recent mean", zscore=spike)
                    if np.isfinite(values["loss"]):
                        recent_losses.append(values["loss"])
                    logger.log(step, values)
                    window_start, window_step, wait_s = time.perf_counter(), step, 0.0
                preempted = distributed.any_process(stop.signal is not None)
                minutes = cfg.checkpoint.every_minutes
                due = step % cfg.checkpoint.every_steps == 0 or (minutes > 0 and time.monotonic() - last_save >= 60 * minutes)
                if due or step == last or preempted:
                    run_manifest = {**provenance.run_manifest(dataset_hash=dataset_hash, mesh_shape=dict(mesh.shape), step=step),
                                    **mixture_info}
                    ckpt.save(manager, step, state, _encode_iterator_state(batches.get_state()), cfg, run_manifest)
                    last_save = time.monotonic()
                    sealer.submit(ckpt.seal_finished, manager)  # earlier steps that have committed since
                if preempted:
                    manager.wait_until_finished()
                    ckpt.seal_finished(manager)
                    logger.event(step, "preempted", f"{signal.Signals(stop.signal).name if stop.signal else 'stop signal'} "
                                 f"(here or on another process): saved step {step}, exiting {EXIT_PREEMPTED}")
                    raise Preempted(step)
        manager.wait_until_finished()
        sealer.shutdown(wait=True)
        ckpt.seal_finished(manager)
        distributed.barrier("run_finished", cfg.train.barrier_timeout_s)
    finally:
        sealer.shutdown(wait=True)
        logger.close()
        manager.close()
    if jax.process_index() == 0:
        (workdir / "train_summary.json").write_text(
            json.dumps({"stage": cfg.train.stage, "step": step, "parameters": param_count(state.params)}, indent=2)
        )
    return state
