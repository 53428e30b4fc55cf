"""The training driver: data, sharded steps, logging, checkpoints, resume, preemption.

`train(cfg, workdir)` is what `wm train` calls. Running it again on the same workdir
resumes from the newest finished checkpoint: train state and data iterator position.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import signal
import time
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import linen as nn

from data_pipelines import latent_cache
from data_pipelines import mixture as mixture_lib
from data_pipelines.loader import CODES, SKIPPED, make_loader
from wm_jax import checkpoint as ckpt
from wm_jax import distributed, provenance, sharding, telemetry
from wm_jax.config import Config, ConfigError
from wm_jax.models import flops
from wm_jax.run import check_dataset, check_mixture, load_frozen, tokenizer_identity, write_run_config
from wm_jax.train.guards import StopFlag
from wm_jax.train.lock import RunLock
from wm_jax.train.state import TrainState, create_train_state, param_count, param_counts_by_module, state_shardings
from wm_jax.train.step import batch_fields, jit_train_step, make_sensitivity_fn

EXIT_PREEMPTED = 42


class Preempted(Exception):
    """Raised after a successful save when SIGTERM/SIGUSR1/SIGINT arrived; the CLI exits 42."""


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
        write_run_config(cfg, workdir, {**provenance.run_manifest(dataset_hash=dataset_hash, mesh_shape=dict(mesh.shape)),
                                        **mixture_info})

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
