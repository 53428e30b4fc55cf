"""Multi-process concerns: joining a run, barriers with timeouts, agreeing on a flag.

`initialize` decides how this process joins a multi-process run, in this order:

1. explicit arguments (`wm train --coordinator/--num-processes/--process-id`), each
   falling back to its environment variable `WM_COORDINATOR` / `WM_NUM_PROCESSES` /
   `WM_PROCESS_ID` (set by `wm launch local` and the Kubernetes manifest);
2. `WM_DISTRIBUTED=auto` (JAX's own cluster detection, set by `wm launch tpu-vm`) or
   `WM_DISTRIBUTED=off` (one process, whatever the environment says);
3. a detected cluster, which JAX then configures itself (`jax.distributed.initialize()`
   without arguments):
   - SLURM: `SLURM_JOB_ID` set and `SLURM_STEP_NUM_TASKS` (inside `srun`), else
     `SLURM_NTASKS`, greater than 1;
   - Open MPI: `OMPI_COMM_WORLD_SIZE` greater than 1;
   - a TPU VM pod: `TPU_WORKER_HOSTNAMES` lists more than one host;
4. otherwise a single process: nothing to do.

Barriers use the distributed runtime's key-value store rather than a collective, so a
process that never arrives is named in the error instead of hanging the run.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from wm_jax.config import ConfigError

ENV_COORDINATOR = "WM_COORDINATOR"
ENV_NUM_PROCESSES = "WM_NUM_PROCESSES"
ENV_PROCESS_ID = "WM_PROCESS_ID"
ENV_MODE = "WM_DISTRIBUTED"
MODES = ("auto", "off")

_BARRIER_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
# Per-name call counts: the n-th call of barrier(name) on every process meets at key n.
_barrier_calls: dict[str, int] = {}


class BarrierTimeout(RuntimeError):
    """Some processes did not reach a barrier in time; the message names them."""


def detect_cluster(environ: Mapping[str, str]) -> str | None:
    """The multi-process cluster this process runs in ("slurm", "openmpi", "tpu-pod"),
    or None. A one-task allocation counts as no cluster."""

    def count(name: str) -> int:
        value = environ.get(name, "")
        return int(value) if value.strip().isdigit() else 0

    if "SLURM_JOB_ID" in environ and (count("SLURM_STEP_NUM_TASKS") or count("SLURM_NTASKS")) > 1:
        return "slurm"
    if count("OMPI_COMM_WORLD_SIZE") > 1:
        return "openmpi"
    hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return "tpu-pod"
    return None


def _int_setting(value: int | str | None, source: str) -> int | None:
    """An integer from a flag or environment variable (None when unset or empty)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source} must be an integer; got {value!r}") from None


def _check_coordinator(address: str, source: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{source} must look like host:port (e.g. localhost:1234); got {address!r}")
    return address


def plan(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict:
    """What `initialize` would do, without doing it: a dict with `mode` ("flags", "env",
    "auto", "slurm", "openmpi", "tpu-pod" or "single") and, for "flags"/"env",
    `coordinator`, `process_count` and `process_index`. Raises ConfigError naming the
    flag or environment variable of a bad value."""
    environ = os.environ if environ is None else environ
    # Each setting: the flag if given, else its environment variable.
    settings = {}
    for key, arg, flag, env in (
        ("coordinator", coordinator, "--coordinator", ENV_COORDINATOR),
        ("count", num_processes, "--num-processes", ENV_NUM_PROCESSES),
        ("index", process_id, "--process-id", ENV_PROCESS_ID),
    ):
        if arg is not None:
            settings[key] = (arg, flag)
        elif environ.get(env, "").strip():
            settings[key] = (environ[env].strip(), env)
    if settings:
        if "coordinator" not in settings:
            given = ", ".join(source for _, source in settings.values())
            raise ConfigError(f"{given} given but no coordinator: set --coordinator or {ENV_COORDINATOR}")
        address, address_source = settings["coordinator"]
        address = _check_coordinator(str(address), address_source)
        for key, what, flag, env in (
            ("count", "process count", "--num-processes", ENV_NUM_PROCESSES),
            ("index", "process id", "--process-id", ENV_PROCESS_ID),
        ):
            if key not in settings:
                raise ConfigError(f"{address_source} is set but the {what} is not: set {flag} or {env}")
        count, index = _int_setting(*settings["count"]), _int_setting(*settings["index"])
        if count < 1:
            raise ConfigError(f"{settings['count'][1]} must be >= 1; got {count}")
        if not 0 <= index < count:
            raise ConfigError(f"{settings['index'][1]} must be in [0, {count}) for {count} processes; got {index}")
        mode = "flags" if address_source == "--coordinator" else "env"
        return {"mode": mode, "coordinator": address, "process_count": count, "process_index": index}

    forced = environ.get(ENV_MODE, "").strip().lower()
    if forced and forced not in MODES:
        raise ConfigError(f"{ENV_MODE} must be one of {MODES}; got {environ[ENV_MODE]!r}")
    if forced == "off":
        return {"mode": "single", "process_count": 1, "process_index": 0}
    if forced == "auto":
        return {"mode": "auto"}
    cluster = detect_cluster(environ)
    if cluster is not None:
        return {"mode": cluster}
    return {"mode": "single", "process_count": 1, "process_index": 0}


def _runtime():
    """JAX's distributed state: `.client` is None until `jax.distributed.initialize` ran."""
    from jax._src import distributed as jax_distributed  # the key-value store has no public API

    return jax_distributed.global_state


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> dict:
    """Joins the multi-process run this process belongs to (see the module docstring for
    the order of sources); a single process does nothing. Call before any JAX
    computation. Returns `plan(...)` with `process_index`/`process_count` filled in."""
    state = _runtime()
    if state.client is not None:  # already joined (e.g. a library caller did it first)
        return {"mode": "initialized", "process_index": state.process_id, "process_count": state.num_processes}
    decided = plan(coordinator, num_processes, process_id)
    if decided["mode"] == "single":
        return decided
    if decided["mode"] in ("flags", "env"):
        jax.distributed.initialize(
            coordinator_address=decided["coordinator"],
            num_processes=decided["process_count"],
            process_id=decided["process_index"],
        )
    else:
        jax.distributed.initialize()  # JAX reads the cluster's own environment
    return dict(decided, process_index=state.process_id, process_count=state.num_processes)


def _arrived(client, prefix: str) -> set[int]:
    return {int(key.rsplit("/", 1)[1]) for key, _ in client.key_value_dir_get(prefix)}


def barrier(name: str, timeout_s: float = 300.0) -> None:
    """Returns once every process has called `barrier(name)` as often as this one.

    Raises BarrierTimeout naming the missing process ids when they have not arrived
    within `timeout_s`. A single process returns at once."""
    if not _BARRIER_NAME.match(name or ""):
        raise ValueError(f"barrier name must match {_BARRIER_NAME.pattern}; got {name!r}")
    if timeout_s <= 0:
        raise ValueError(f"barrier {name!r}: timeout_s must be > 0; got {timeout_s}")
    state = _runtime()
    if state.client is None:
        if jax.process_count() > 1:  # e.g. a TPU pod that never joined the runtime
            raise RuntimeError(
                f"barrier {name!r} needs the distributed runtime: call wm_jax.distributed.initialize() first"
            )
        return
    count, me, client = state.num_processes, state.process_id, state.client
    if count == 1:
        return
    _barrier_calls[name] = _barrier_calls.get(name, 0) + 1
    # Keys are never deleted: a few bytes per process per call, and a slow process may
    # still be reading them after the others have left.
    prefix = f"wm_barrier/{name}/{_barrier_calls[name]}/"
    client.key_value_set(prefix + str(me), "1")
    deadline = time.monotonic() + timeout_s
    for other in range(count):
        if other == me:
            continue
        remaining_ms = max(1, int((deadline - time.monotonic()) * 1000))
        try:
            client.blocking_key_value_get(prefix + str(other), remaining_ms)
        except jax.errors.JaxRuntimeError as e:
            if "DEADLINE_EXCEEDED" not in str(e):
                raise
            missing = sorted(set(range(count)) - _arrived(client, prefix))
            if not missing:  # the last one arrived just as the wait ended
                return
            raise BarrierTimeout(
                f"barrier {name!r} timed out after {timeout_s:g} s: processes {missing} did not arrive"
            ) from None


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on any one (e.g. a preemption signal that
    reached only some hosts), so all processes act on the same step."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))
