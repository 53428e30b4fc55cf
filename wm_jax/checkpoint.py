"""Orbax checkpoints of a run: train state + data iterator state + config.

Layout: `RUN/checkpoints/<step>/{state,data,config}`. Orbax writes each step into a
temporary directory and renames it when complete, and `all_steps()` lists only finished
steps, so a checkpoint that did not finish is never restored. Restore takes an abstract
state (shapes, dtypes and shardings for the *current* mesh), so the saved layout does not
have to match the devices at hand.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from wm_jax import config as config_lib
from wm_jax.config import CheckpointConfig, Config, ConfigError
from wm_jax.train.guards import all_finite

ITEMS = ("state", "data", "config", "manifest")
CHECKSUMS = "wm_checksums.json"  # sha256 of every file of a finished step, written after orbax commits


class CheckpointError(RuntimeError):
    """A missing or unusable checkpoint; the message names the directory."""


def checkpoint_dir(workdir: str | Path) -> Path:
    return Path(workdir).resolve() / "checkpoints"


def make_manager(workdir: str | Path, cfg: CheckpointConfig, *, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.max_to_keep,
        keep_period=cfg.keep_period or None,
        enable_async_checkpointing=cfg.async_save,
        create=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict, cfg: Config, manifest: dict) -> bool:
    """Starts an (async) save; returns whether the manager saved at this step."""
    return manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config_lib.to_dict(cfg)),
            manifest=ocp.args.JsonSave(manifest),
        ),
        force=True,
    )


def save_finite(
    manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict, cfg: Config, manifest: dict
) -> bool:
    """`save` after `require_finite` on `state`: a non-finite state is never written
    (CheckpointError). The check is the program a restore runs, so the run that saves first
    also compiles it into the persistent compilation cache, and a restart loads it."""
    require_finite(state, Path(str(manager.directory)) / str(step), what="refused to save: the train state for")
    return save(manager, step, state, data_state, cfg, manifest)


def saved_config(manager: ocp.CheckpointManager, step: int) -> dict:
    return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


# `model.*` keys that choose how the model runs, not what its parameters are: a checkpoint
# restores under any value of them (parameters are float32 whatever the activation dtype).
# (`scan_layers` is not one: it stores the blocks' parameters stacked.)
EXECUTION_KEYS = ("dtype", "attention", "remat", "remat_policy")


def with_defaults(values: dict, defaults: dict) -> dict:
    """`values` with each key it lacks (section by section) at its value in `defaults`."""
    filled = {
        k: with_defaults(values[k], d) if isinstance(d, dict) and isinstance(values.get(k), dict) else values.get(k, d)
        for k, d in defaults.items()
    }
    return {**values, **filled}


def model_mismatch(saved: dict, current: Config) -> list[str]:
    """Dotted `model.*` keys whose saved value differs from the current config. A key the
    saved config lacks counts at its default: the checkpoint was written before it existed."""
    current_model = {k: v for k, v in config_lib.to_dict(current)["model"].items() if k not in EXECUTION_KEYS}
    saved_model = with_defaults(saved.get("model", {}), config_lib.to_dict(Config())["model"])
    saved_model = {k: v for k, v in saved_model.items() if k not in EXECUTION_KEYS}

    def walk(a: Any, b: Any, prefix: str) -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            keys = sorted(set(a) | set(b))
            return [k for key in keys for k in walk(a.get(key), b.get(key), f"{prefix}.{key}")]
        return [] if a == b else [f"{prefix} (checkpoint: {a!r}, config: {b!r})"]

    return walk(saved_model, current_model, "model")


def check_compatible(
    manager: ocp.CheckpointManager,
    step: int,
    cfg: Config,
    workdir: str | Path,
    fix: str = "Use a new --workdir or the same model config.",
) -> None:
    """Refuses a checkpoint whose model config differs from `cfg` (exit 2 in the CLI): a
    ConfigError naming each differing key, then `fix`."""
    diffs = model_mismatch(saved_config(manager, step), cfg)
    if diffs:
        raise ConfigError(
            f"checkpoint {checkpoint_dir(workdir)}/{step} was written by a different model; "
            "differing keys: " + "; ".join(diffs) + f". {fix}"
        )


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores (state, data iterator state) at `step` onto the shardings of `abstract_state`."""
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
            ),
        )
    except (ValueError, KeyError, TypeError) as e:
        # Same config but other parameter shapes or names: written by another model version.
        raise CheckpointError(
            f"checkpoint {manager.directory}/{step} does not fit the current model's parameters "
            f"(written by a different model version?): {error_line(e, 600)}"
        ) from e
    return restored["state"], restored["data"]


def restore_params(manager: ocp.CheckpointManager, step: int, abstract_params: Any) -> Any:
    """Parameters alone at `step`: the optimizer state's arrays are never read."""
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item={"params": abstract_params},
                    restore_args=jax.tree.map(
                        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype),
                        {"params": abstract_params},
                    ),
                    partial_restore=True,
                )
            ),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"checkpoint {manager.directory}/{step}: parameters do not fit the current model: {error_line(e, 600)}"
        ) from e
    return restored["state"]["params"]


def file_digests(step_dir: Path) -> dict[str, str]:
    """sha256 of every file under a checkpoint step directory (relative path -> hex)."""
    digests = {}
    for path in sorted(p for p in step_dir.rglob("*") if p.is_file() and not p.name.startswith(CHECKSUMS)):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digests[str(path.relative_to(step_dir))] = h.hexdigest()
    return digests


def files_fingerprint(directory: Path) -> str:
    """sha256 of the (relative path, sha256) of every file under `directory`: names a
    checkpoint step's (or a bundle's parameters') exact bytes. A sealed step's recorded
    checksums are used, so its files are not read again."""
    digests = read_checksums(directory) if (directory / CHECKSUMS).is_file() else file_digests(directory)
    return hashlib.sha256(json.dumps(sorted(digests.items())).encode()).hexdigest()


def read_checksums(step_dir: Path) -> dict[str, str]:
    """A sealed step's recorded {relative path: sha256}; CheckpointError naming the file
    when it is not one."""
    path = step_dir / CHECKSUMS
    try:
        recorded = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checksum file {path} is unreadable or not JSON ({e})") from None
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        raise CheckpointError(f"checksum file {path} is not a {{file: sha256}} mapping")
    return recorded


def seal(step_dir: Path) -> None:
    """Records the checksums of a finished step (atomically: a killed writer leaves none)."""
    if (step_dir / CHECKSUMS).exists():
        return
    tmp = step_dir / f"{CHECKSUMS}.tmp"
    tmp.write_text(json.dumps(file_digests(step_dir), indent=1))
    os.replace(tmp, step_dir / CHECKSUMS)


def seal_finished(manager: ocp.CheckpointManager) -> None:
    """Seals every finished step that has no checksums yet (process 0; shared file system)."""
    if jax.process_index() != 0:
        return
    for step in manager.all_steps():
        seal(Path(str(manager.directory)) / str(step))


def verify_step(step_dir: Path) -> None:
    """The integrity check every reader of a checkpoint runs (resume, eval, export,
    generate, the latent cache): CheckpointError naming a sealed step's missing or altered
    files, or its unreadable checksum file. An unsealed step (its writer was killed before
    sealing) passes: whether it restores is then its test."""
    if not (step_dir / CHECKSUMS).exists():
        return
    recorded = read_checksums(step_dir)
    actual = file_digests(step_dir)
    altered = sorted(name for name, digest in recorded.items() if actual.get(name) != digest)
    if altered:
        raise CheckpointError(
            f"checkpoint {step_dir}: sha256 mismatch in {', '.join(altered[:5])}"
            + (f" and {len(altered) - 5} more" if len(altered) > 5 else "")
        )


def require_finite(tree: Any, step_dir: Path, what: str = "checkpoint") -> Any:
    """`tree` when every value is finite; CheckpointError naming `what` at `step_dir`
    otherwise (a checkpoint written before the state guard, or by other code: never "good")."""
    # One compiled program: eager per-leaf reductions over sharded arrays dispatch one
    # small collective program each, and a queue of those deadlocked XLA's CPU runtime
    # (a device's launch waited on its in-flight slot while the others sat in an all-reduce).
    if not bool(jax.jit(all_finite)(tree)):
        raise CheckpointError(f"{what} {step_dir} holds non-finite (NaN/inf) values")
    return tree


def error_line(e: BaseException, limit: int = 400) -> str:
    """An exception in one line of at most `limit` characters, for a warning, an event or an
    error message: TensorStore's multi-line spec dump cut, the reason it wraps (the cause)
    appended. (A CheckpointError's message already names its cause.)"""
    text = str(e).split(" See full TensorStore details")[0]
    if e.__cause__ is not None and not isinstance(e, CheckpointError):
        text = f"{text.rstrip('. ')}: {error_line(e.__cause__, limit)}"
    return " ".join(text.split())[:limit] or type(e).__name__


def quarantine(directory: Path, step: int) -> Path:
    """Moves checkpoint `step` out of `directory` into a sibling `damaged_checkpoints/`."""
    target = directory.parent / "damaged_checkpoints" / f"{step}-{int(time.time())}"
    if jax.process_index() == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(directory / str(step)), target)
    return target


def restore_newest_good(
    manager: ocp.CheckpointManager, abstract_state: Any, cfg: Config, workdir: str | Path, warn: Callable[[str], None]
) -> tuple[int, Any, dict] | None:
    """(step, state, data state) of the newest finished checkpoint that restores, or None.

    A damaged checkpoint (truncated or unreadable file) is reported through `warn` and the
    previous one is tried. A checkpoint of a different model config is refused outright
    (ConfigError). If every checkpoint fails, the newest error is raised: then the cause is
    the model code, not the files."""
    errors = []
    for step in sorted(manager.all_steps(), reverse=True):
        step_dir = Path(str(manager.directory)) / str(step)
        try:
            verify_step(step_dir)
            check_compatible(manager, step, cfg, workdir)
            state, data_state = restore(manager, step, abstract_state)
            require_finite(state, step_dir)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 — tensorstore/orbax raise many types for bad bytes
            errors.append((step, e))
            continue
        for bad_step, e in errors:
            # Moved aside, not deleted: the step will be saved again, and the bytes are evidence.
            aside = quarantine(Path(str(manager.directory)), bad_step)
            warn(f"checkpoint {bad_step} is damaged, moved to {aside}; resuming from {step}: {error_line(e)}")
        if errors:
            manager.reload()
        return step, state, data_state
    if errors:
        raise errors[0][1]
    return None


def read_good(
    workdir: str | Path,
    step: int | None,
    read: Callable[[ocp.CheckpointManager, int], Any],
    warn: Callable[[str], None],
) -> tuple[int, Any]:
    """(step, read(manager, step)) for the newest checkpoint of a run that passes
    `verify_step`, reads and is finite, or for `step` when given. Readers never move
    anything: a damaged step is named through `warn` and the one before it tried.
    CheckpointError naming every damaged step when none is left, or the given step when
    it is damaged; a ConfigError from `read` (another model) is raised as it is."""
    directory = checkpoint_dir(workdir)
    candidates = [require_step(workdir, step)] if step is not None else finished_steps(workdir)[::-1]
    damaged = []
    manager = make_manager(workdir, CheckpointConfig(async_save=False), read_only=True)
    try:
        for s in candidates:
            try:
                verify_step(directory / str(s))
                return s, require_finite(read(manager, s), directory / str(s))
            except ConfigError:  # not damage: `read` refused the run's model (the key is named)
                raise
            except Exception as e:  # noqa: BLE001 — tensorstore/orbax raise many types for bad bytes
                if step is not None:
                    raise CheckpointError(f"checkpoint {directory / str(s)} is damaged: {error_line(e, 600)}") from None
                damaged.append(f"step {s}: {error_line(e)}")
                warn(f"checkpoint {directory / str(s)} is damaged, trying the one before: {error_line(e)}")
    finally:
        manager.close()
    raise CheckpointError(f"no usable checkpoint in {directory}: " + "; ".join(damaged))


def finished_steps(workdir: str | Path) -> list[int]:
    """A run's finished checkpoint steps, oldest first; CheckpointError when there are none."""
    ckpt = checkpoint_dir(workdir)
    if not ckpt.is_dir():
        raise CheckpointError(f"no checkpoints in {workdir} (missing {ckpt})")
    manager = make_manager(workdir, CheckpointConfig(async_save=False), read_only=True)
    try:
        steps = sorted(manager.all_steps())
    finally:
        manager.close()
    if not steps:
        raise CheckpointError(f"no finished checkpoint in {ckpt}")
    return steps


def latest_step(workdir: str | Path) -> int | None:
    """The newest finished checkpoint step of a run, or None."""
    if not checkpoint_dir(workdir).is_dir():
        return None
    manager = make_manager(workdir, CheckpointConfig(async_save=False), read_only=True)
    try:
        return manager.latest_step()
    finally:
        manager.close()


def require_step(workdir: str | Path, step: int | None) -> int:
    """`step` if given and present, else the latest; a clear error when there is none."""
    steps = finished_steps(workdir)
    if step is None:
        return steps[-1]
    if step not in steps:
        raise CheckpointError(f"checkpoint step {step} not in {checkpoint_dir(workdir)}; available: {steps}")
    return step
