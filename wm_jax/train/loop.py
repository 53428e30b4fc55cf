"""The training driver: data, sharded steps, logging, checkpoints, resume, preemption.

`train(cfg, workdir)` is what `wm train` calls. Running it again on the same workdir
resumes from the newest finished checkpoint: train state and data iterator position.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
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
from data_pipelines.loader import SKIPPED, make_loader
from data_pipelines.schema import CACHE_FIELDS, CODES, LATENTS
from wm_jax import checkpoint as ckpt
from wm_jax import stage_checks
from wm_jax import distributed, provenance, sharding, telemetry
from wm_jax.config import Config, ConfigError
from wm_jax.run import check_dataset, check_mixture, load_frozen, tokenizer_identity, write_run_config
from wm_jax.stages import get_stage
from wm_jax.train.guards import StopFlag
from wm_jax.train.lock import RunLock
from wm_jax.train.state import TrainState, create_train_state, param_count, param_counts_by_module, state_shardings
from wm_jax.train.step import batch_fields, jit_train_step

EXIT_PREEMPTED = 42
# What a latent cache of each kind holds, for messages.
LATENT_KINDS = {"ids": "FSQ token ids", "latents": "continuous latents"}


class Preempted(Exception):
    """Raised after a successful save when SIGTERM/SIGUSR1/SIGINT arrived; the CLI exits 42."""


def loaded_fields(cfg: Config, available: Iterable[str]) -> list[str]:
    """The record fields the loader decodes and ships: those the step of cfg's stage
    reads (`batch_fields`) and `action` (`batch_fingerprint` hashes it). Leaving the
    others in the records saves their decoding and, with worker processes, a
    shared-memory transfer each per batch (with a latent cache: the frames)."""
    available = list(available)
    wanted = set(batch_fields(cfg, available + cache_fields(cfg))) | {"action"}
    return [k for k in available if k in wanted]


def cache_fields(cfg: Config) -> list[str]:
    """The batch field the loader adds from `data.latent_cache` (`CACHE_FIELDS` of the kind
    cfg's objective reads: CODES or LATENTS), or none."""
    return [CACHE_FIELDS[stage_checks.latent_cache_kind(cfg)]] if cfg.data.latent_cache else []


def open_latent_cache(cfg: Config, manifest: dict) -> Any:
    """The latent cache of `data.latent_cache` (None if unset), checked to be of the kind
    cfg's objective reads (ids or latents), of this dataset and tokenizer run, and to hold
    exactly the codes the tokenizer gives each training window: the encoder is causal in
    time, so the cache's windows of C frames from each episode's start must contain every
    training window from its first frame."""
    if not cfg.data.latent_cache:
        return None
    cache = latent_cache.open_cache(cfg.data.latent_cache, expect_content_hash=manifest["content_hash"])
    kind = stage_checks.latent_cache_kind(cfg)
    if cache.kind != kind:  # before the tokenizer: another kind is another tokenizer too
        raise ConfigError(
            f"config key 'data.latent_cache': {cfg.data.latent_cache} holds {LATENT_KINDS[cache.kind]}; the "
            f"'{cfg.model.dynamics.objective}' objective trains on {LATENT_KINDS[kind]}"
        )
    latent_cache.check_tokenizer(cache, tokenizer_identity(cfg.train.tokenizer_workdir)[1])
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
    for name in ("frame", CODES, LATENTS, "action"):
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
    started = time.perf_counter()
    workdir = open_workdir(workdir)
    with RunLock(workdir) as lock:
        return _train(cfg, workdir, stop_at, lock.events, started)


def enable_compile_cache(cfg: Config, workdir: Path) -> str | None:
    """Points JAX's persistent compilation cache at `train.compile_cache_dir` ("auto": the
    run's compile_cache/) unless it is "none" or this process already has one (the setting
    is process-wide; the first run sets it). Returns the cache directory in use, or None."""
    current = jax.config.jax_compilation_cache_dir
    if cfg.train.compile_cache_dir == "none" or current:
        return current or None
    path = workdir / "compile_cache" if cfg.train.compile_cache_dir == "auto" else Path(cfg.train.compile_cache_dir)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Cache every program: the small ones of small models add up on a CPU too.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return str(path)


@dataclasses.dataclass(frozen=True)
class _Loop:
    """What the training loop uses unchanged from step to step."""

    cfg: Config
    manifest: dict  # the dataset's or mixture's, as checked
    mesh: jax.sharding.Mesh
    rules: tuple[tuple[str, Any], ...]
    manager: Any  # the checkpoint manager
    logger: telemetry.RunLogger
    batches: Any  # this process's batch iterator, whose position each checkpoint saves
    step_fn: Callable
    frozen: Any  # the frozen modules' parameters
    fields: list[str]  # the batch fields the step reads
    log_metrics_fn: Callable | None  # the stage's extra figures at log steps (`Stage.make_log_metrics`)
    throughput: Callable[[float], dict[str, float]]  # seconds per step -> rate metrics


@dataclasses.dataclass
class _Counters:
    """What the training loop carries from step to step besides the train state."""

    step: int
    last: int  # the step this invocation ends after
    recent_losses: collections.deque[float]  # the losses of recent log steps, for spikes
    started: float = 0.0  # perf_counter when `train` was called
    first_step_s: float | None = None  # from `train`'s call to this invocation's first step done
    last_save: float = dataclasses.field(default_factory=time.monotonic)
    skipped_in_a_row: int = 0  # consecutive steps whose update was non-finite
    skipped_windows: int = 0  # windows with a bad record the loader replaced
    skipped_logged: int = 0
    # The log window: its start time and step, and the time spent waiting for data in it.
    window_start: float = 0.0
    window_step: int = 0
    wait_s: float = 0.0

    def new_window(self) -> None:
        """Starts the next log window at the current step."""
        self.window_start, self.window_step, self.wait_s = time.perf_counter(), self.step, 0.0


def _train(
    cfg: Config, workdir: Path, stop_at: int | None, lock_events: list[tuple[str, str]], started: float
) -> TrainState:
    """`train` once the run lock is held (`started`: perf_counter at its call): returns the
    final train state."""
    enable_compile_cache(cfg, workdir)
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
    if jax.process_index() == 0:  # `open_workdir` has created the directory
        write_run_config(cfg, workdir, _run_manifest(cfg, manifest, mesh))

    frozen = load_frozen(cfg, mesh, rules)
    abstract, shardings = state_shardings(cfg, mesh, rules)
    batches = _make_batches(cfg, manifest)
    damaged: list[str] = []
    state, start_step = _restore_or_create(
        cfg, workdir, manager, batches, abstract, shardings, mesh, rules, warn=damaged.append
    )
    _describe_model(cfg, state, mesh)

    # The restored frozen parameters already sit on their shardings.
    fields = batch_fields(cfg, list(manifest["fields"]) + cache_fields(cfg))
    step_fn = jit_train_step(cfg, mesh, rules, shardings, jax.tree.map(lambda x: x.sharding, frozen), fields)
    log_metrics_fn = get_stage(cfg.train.stage).make_log_metrics(cfg)
    # Every process restored the same step (or none) and is about to run collectives.
    distributed.barrier("state_ready", cfg.train.barrier_timeout_s)
    throughput = _throughput_fn(cfg)
    logger = telemetry.RunLogger(workdir, cfg.train.steps, start_step, cfg.train.stage)
    for kind, message in [
        *(("bad_data", m) for m in bad_data),
        *(("damaged_checkpoint", m) for m in damaged),
        *lock_events,
    ]:
        logger.event(start_step, kind, message)
    loop = _Loop(
        cfg, manifest, mesh, rules, manager, logger, batches, step_fn, frozen, fields, log_metrics_fn, throughput
    )
    counters = _Counters(
        step=start_step,
        last=min(cfg.train.steps, stop_at or cfg.train.steps),
        recent_losses=collections.deque(maxlen=cfg.train.spike_window),
        started=started,
    )
    state = _run_and_close(loop, counters, state)
    if jax.process_index() == 0:
        summary = {
            "stage": cfg.train.stage,
            "step": counters.step,
            "parameters": param_count(state.params),
            "time_to_first_step_s": counters.first_step_s,
            "compile_cache_dir": jax.config.jax_compilation_cache_dir,
        }
        (workdir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return state


def _run_manifest(cfg: Config, manifest: dict, mesh: jax.sharding.Mesh, step: int | None = None) -> dict:
    """The run's provenance (at `step`, if given) with its mixture, if any: for its config and checkpoints."""
    mixture_info = {"mixture": manifest["mixture"]} if cfg.data.mixture else {}
    return {
        **provenance.run_manifest(dataset_hash=manifest["content_hash"], mesh_shape=dict(mesh.shape), step=step),
        **mixture_info,
    }


def _make_batches(cfg: Config, manifest: dict) -> Any:
    """This process's batch iterator (grain's: `get_state`/`set_state` give and set its position)."""
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
    return iter(loader)


def _restore_or_create(
    cfg: Config,
    workdir: Path,
    manager: Any,
    batches: Any,
    abstract: Any,
    shardings: Any,
    mesh: jax.sharding.Mesh,
    rules: tuple[tuple[str, Any], ...],
    warn: Callable[[str], None],
) -> tuple[TrainState, int]:
    """The train state and step of the newest good checkpoint, with `batches` set to its data
    position; else a new train state and step 0. `warn` gets each damaged checkpoint passed over."""
    found = ckpt.restore_newest_good(manager, abstract, cfg, workdir, warn=warn)
    if found is None:
        return create_train_state(cfg, mesh, rules, shardings), 0
    start_step, state, data_state = found
    try:
        batches.set_state(_decode_iterator_state(data_state))
    except ValueError as e:  # grain names the saved and the current source/sampler
        raise ckpt.CheckpointError(
            f"{workdir}: the data position saved at step {start_step} does not fit this loader (another "
            f"dataset, batch size, data.worker_count, latent cache or loader version); resume with the "
            f"settings it was saved with, or train in a new workdir: {e}"
        ) from e
    telemetry.info(f"resumed from {ckpt.checkpoint_dir(workdir)}/{start_step}")
    return state, start_step


def _describe_model(cfg: Config, state: TrainState, mesh: jax.sharding.Mesh) -> None:
    """Logs the model's size, cost per step and the devices it trains on; returns nothing."""
    telemetry.info(
        f"stage {cfg.train.stage}: {param_count(state.params):,} parameters, "
        f"{get_stage(cfg.train.stage).train_step_flops(cfg):.3g} FLOPs per step, mesh {dict(mesh.shape)}, "
        f"{jax.device_count()} devices, {jax.process_count()} processes"
    )
    by_module = ", ".join(f"{k} {v:,}" for k, v in param_counts_by_module(state.params).items())
    telemetry.info(f"parameters per module: {by_module}")


def _throughput_fn(cfg: Config) -> Callable[[float], dict[str, float]]:
    """A function of the seconds per step that returns the rate metrics (tokens/s, frames/s,
    TFLOP/s per device, MFU when the device's peak is known)."""
    frames_per_step = cfg.data.batch_size * cfg.data.frames_per_clip
    stage = get_stage(cfg.train.stage)
    step_flops, step_tokens = stage.train_step_flops(cfg), stage.tokens_per_step(cfg)
    device = jax.devices()[0]
    peak = telemetry.peak_tflops(device.device_kind, cfg.model.dtype, cfg.train.peak_tflops_per_device)
    return lambda step_s: telemetry.throughput(
        step_s, step_flops, step_tokens, frames_per_step, jax.device_count(), peak
    )


def _run_and_close(loop: _Loop, counters: _Counters, state: TrainState) -> TrainState:
    """Runs the steps under the stop flag, mesh and logical axis rules, then seals the last
    checkpoint and waits for every process; closes the logger and checkpoint manager even on
    an error. Returns the final train state."""
    # Checksums are computed off the training thread: hashing a large checkpoint takes seconds.
    sealer = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        with StopFlag() as stop, jax.set_mesh(loop.mesh), nn.logical_axis_rules(loop.rules):
            state = _run_steps(loop, counters, state, stop, sealer)
        loop.manager.wait_until_finished()
        sealer.shutdown(wait=True)
        ckpt.seal_finished(loop.manager)
        distributed.barrier("run_finished", loop.cfg.train.barrier_timeout_s)
    finally:
        sealer.shutdown(wait=True)
        loop.logger.close()
        loop.manager.close()
    return state


def _run_steps(
    loop: _Loop, c: _Counters, state: TrainState, stop: StopFlag, sealer: concurrent.futures.Executor
) -> TrainState:
    """Trains from step `c.step` to `c.last`, logging and saving on the way; returns the train
    state. Raises FloatingPointError (too many non-finite steps) or Preempted (after its save)."""
    c.new_window()
    previous = None  # (step, skipped flag) of the step before, read once this one is dispatched
    while c.step < c.last:
        local = _next_batch(loop.batches, c)
        batch = sharding.shard_batch({k: local[k] for k in loop.fields}, loop.mesh, loop.rules)
        state, metrics = loop.step_fn(state, batch, loop.frozen)
        c.step += 1
        if c.first_step_s is None:
            jax.block_until_ready(metrics)
            c.first_step_s = time.perf_counter() - c.started
            telemetry.info(f"first step done {c.first_step_s:.1f} s after start")
        # Reading a step's flag only after the next is dispatched keeps the device busy:
        # no host stall per step. A skipped update is never applied, so a late read loses nothing.
        if previous is not None:
            _count_nonfinite(loop, c, *previous)
        previous = (c.step, metrics["skipped"])
        if c.step % loop.cfg.train.log_every_steps == 0 or c.step == c.last:
            _log_step(loop, c, state, metrics, batch, local)
        _save_or_stop(loop, c, state, stop, sealer)
    if previous is not None:
        _count_nonfinite(loop, c, *previous)
    return state


def _next_batch(batches: Any, c: _Counters) -> dict[str, np.ndarray]:
    """This process's next batch; adds the wait for it and its replaced bad windows to `c`."""
    t0 = time.perf_counter()
    local = next(batches)
    c.wait_s += time.perf_counter() - t0
    c.skipped_windows += int(local[SKIPPED].sum()) if SKIPPED in local else 0
    return local


def _count_nonfinite(loop: _Loop, c: _Counters, step: int, skipped: jax.Array) -> None:
    """Counts (and logs) consecutive skipped non-finite updates, given step `step`'s flag;
    returns nothing, raises FloatingPointError at `train.max_nonfinite_steps` in a row."""
    if not bool(skipped):  # the guard counts consecutive skips exactly
        c.skipped_in_a_row = 0
        return
    c.skipped_in_a_row += 1
    loop.logger.event(
        step, "nonfinite", f"non-finite loss, gradient or updated state: update skipped ({c.skipped_in_a_row} in a row)"
    )
    if c.skipped_in_a_row >= loop.cfg.train.max_nonfinite_steps:
        loop.manager.wait_until_finished()  # the newest step named below is on disk
        raise FloatingPointError(
            f"{c.skipped_in_a_row} consecutive non-finite steps at step {step}; last good checkpoint: "
            f"{loop.manager.latest_step()} (every saved state is finite: skipped updates are never applied)"
        )


def _log_step(
    loop: _Loop,
    c: _Counters,
    state: TrainState,
    metrics: dict[str, jax.Array],
    batch: dict[str, jax.Array],
    local: dict[str, np.ndarray],
) -> None:
    """Logs this step's metrics, the log window's averages and any bad-data or loss-spike
    event, then starts the next window; returns nothing."""
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if loop.log_metrics_fn is not None:  # e.g. does the model read its actions yet?
        extra = loop.log_metrics_fn(state.params, batch, loop.frozen, state.step)
        values.update({k: float(v) for k, v in extra.items()})
    # Window averages; the first window of a process includes compilation.
    elapsed, n = time.perf_counter() - c.window_start, c.step - c.window_step
    values.update(
        step_s=elapsed / n,
        **loop.throughput(elapsed / n),
        data_wait_fraction=c.wait_s / elapsed,
        batch_crc32=batch_fingerprint(local),
    )
    if loop.cfg.data.skip_bad_records:  # this process's count since this invocation started
        values["bad_windows_skipped"] = c.skipped_windows
        if c.skipped_windows > c.skipped_logged:
            loop.logger.event(
                c.step,
                "bad_data",
                f"{c.skipped_windows - c.skipped_logged} window(s) with a bad "
                f"record skipped since the last log (the loader's warnings name them)",
                total=c.skipped_windows,
            )
            c.skipped_logged = c.skipped_windows
    spike = loss_zscore(values["loss"], c.recent_losses)
    if spike > loop.cfg.train.spike_zscore:
        loop.logger.event(
            c.step, "loss_spike", f"loss {values['loss']:.4g} is {spike:.1f} std above the recent mean", zscore=spike
        )
    if np.isfinite(values["loss"]):
        c.recent_losses.append(values["loss"])
    loop.logger.log(c.step, values)
    c.new_window()


def _save_or_stop(
    loop: _Loop, c: _Counters, state: TrainState, stop: StopFlag, sealer: concurrent.futures.Executor
) -> None:
    """Saves step `c.step` when a checkpoint is due, it is the last step or any process got a
    stop signal; returns nothing, or, after a stop signal, waits for the save and raises Preempted."""
    cfg, manager = loop.cfg, loop.manager
    due = c.step % cfg.checkpoint.every_steps == 0 or c.step == c.last
    preempted = False
    # Processes agree on the stop signal and on a time-based save with a collective, so
    # they ask on the same steps: every step alone (free), else every few or when saving.
    if jax.process_count() == 1 or due or c.step % cfg.train.stop_check_every_steps == 0:
        preempted = distributed.any_process(stop.signal is not None)
        minutes = cfg.checkpoint.every_minutes
        due = due or (minutes > 0 and distributed.any_process(time.monotonic() - c.last_save >= 60 * minutes))
    if due or preempted:
        ckpt.save_finite(
            manager,
            c.step,
            state,
            _encode_iterator_state(loop.batches.get_state()),
            cfg,
            _run_manifest(cfg, loop.manifest, loop.mesh, step=c.step),
        )
        c.last_save = time.monotonic()
        sealer.submit(ckpt.seal_finished, manager)  # earlier steps that have committed since
    if preempted:
        manager.wait_until_finished()
        ckpt.seal_finished(manager)
        loop.logger.event(
            c.step,
            "preempted",
            f"{signal.Signals(stop.signal).name if stop.signal else 'stop signal'} "
            f"(here or on another process): saved step {c.step}, exiting {EXIT_PREEMPTED}",
        )
        raise Preempted(c.step)
