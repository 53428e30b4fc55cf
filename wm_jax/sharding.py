"""Device mesh from the config, logical-axis rules, and batch placement.

Mesh axes are `data, fsdp, tensor, sequence`; their product is the device count and a
`-1` on one axis means "the devices left over". Model code names logical axes
(`batch, time, embed, ...`); the rules in `MeshConfig.rules` map them to mesh axes.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from wm_jax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor", "sequence")


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
    """Resolves the `-1` axis and checks the product equals `num_devices`."""
    sizes = [getattr(cfg, a) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ConfigError("config keys 'mesh.*': at most one axis may be -1")
    for axis, size in zip(MESH_AXES, sizes):
        if size == 0 or size < -1:
            raise ConfigError(f"config key 'mesh.{axis}' must be >= 1 or -1; got {size}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(
                f"config keys 'mesh.*': fixed axes multiply to {known}, which does not divide "
                f"the {num_devices} devices"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"config keys 'mesh.*': {dict(zip(MESH_AXES, sizes))} multiply to "
            f"{math.prod(sizes)} but there are {num_devices} devices"
        )
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: list[Any] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(cfg, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_rules(cfg: MeshConfig) -> tuple[tuple[str, Any], ...]:
    """Config rules in the form flax expects (None for replicated)."""
    return tuple((name, tuple(axes) if axes else None) for name, axes in cfg.rules)


def logical_sharding(mesh: Mesh, rules: Any, logical_axes: tuple[str | None, ...]) -> NamedSharding:
    spec = nn.logical_to_mesh_axes(logical_axes, rules)
    return NamedSharding(mesh, spec)


def tree_shardings(mesh: Mesh, rules: Any, logical_specs: Any) -> Any:
    """Maps a tree of logical PartitionSpecs (from `nn.get_partition_spec`) to NamedShardings."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


# Logical axes of each batch field, leading dims (batch, time); trailing dims replicated.
_BATCH_LOGICAL = ("batch", "time")


def batch_sharding(mesh: Mesh, rules: Any, ndim: int) -> NamedSharding:
    axes = _BATCH_LOGICAL[:ndim] + (None,) * max(0, ndim - len(_BATCH_LOGICAL))
    return logical_sharding(mesh, rules, axes)


def data_parallel_size(mesh: Mesh, rules: Any) -> int:
    """Number of shards the batch dimension is split into."""
    axes = dict(rules).get("batch") or ()
    return math.prod(mesh.shape[a] for a in axes)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh, rules: Any) -> dict[str, jax.Array]:
    """Places this process's slice of the global batch on the mesh.

    Each array is [B_local, T, ...]; the result is a global jax.Array
    [B_local * process_count, T, ...] sharded by the `batch`/`time` rules.
    """
    out = {}
    for name, local in batch.items():
        local = np.asarray(local)
        sharding = batch_sharding(mesh, rules, local.ndim)
        global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
        out[name] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out


def check_batch_divisible(global_batch: int, mesh: Mesh, rules: Any) -> None:
    shards = data_parallel_size(mesh, rules)
    if global_batch % shards or global_batch % jax.process_count():
        raise ConfigError(
            f"config key 'data.batch_size' ({global_batch}) must be divisible by the batch "
            f"shards of the mesh ({shards}) and the process count ({jax.process_count()})"
        )


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on any one (e.g. a preemption signal that
    reached only some hosts), so all processes act on the same step."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))
