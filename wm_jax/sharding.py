"""Device mesh from the config, logical-axis rules, and batch placement.

Mesh axes are `data, fsdp, tensor, sequence`; each has an in-slice size and a DCN
(cross-slice) size, their product over all axes is the device count, and a `-1` means
"the devices of a slice left over". Model code names logical axes (`embed, heads, ...`
for parameters, `batch, time, act_embed, ...` for activations); `MeshConfig.param_rules`
and `MeshConfig.activation_rules` map them to mesh axes.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding

from wm_jax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor", "sequence")


def slice_shapes(cfg: MeshConfig, num_devices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(in-slice shape, DCN shape) over `MESH_AXES`, the `-1` resolved within a slice.

    The devices form prod(dcn) slices of equal size; the in-slice sizes must multiply to
    the devices of one slice."""
    dcn = tuple(getattr(cfg, f"dcn_{a}") for a in MESH_AXES)
    slices = math.prod(dcn)
    if num_devices % slices:
        raise ConfigError(
            f"config keys 'mesh.dcn_*': {dict(zip(MESH_AXES, dcn))} make {slices} slices, which do not "
            f"divide the {num_devices} devices"
        )
    per_slice = num_devices // slices
    sizes = [getattr(cfg, a) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ConfigError("config keys 'mesh.*': at most one axis may be -1")
    for axis, size in zip(MESH_AXES, sizes):
        if size == 0 or size < -1:
            raise ConfigError(f"config key 'mesh.{axis}' must be >= 1 or -1; got {size}")
    known = math.prod(s for s in sizes if s != -1)
    where = f"the {per_slice} devices of each of {slices} slices" if slices > 1 else f"the {num_devices} devices"
    if -1 in sizes:
        if per_slice % known:
            raise ConfigError(f"config keys 'mesh.*': fixed axes multiply to {known}, which does not divide {where}")
        sizes[sizes.index(-1)] = per_slice // known
    if math.prod(sizes) != per_slice:
        raise ConfigError(
            f"config keys 'mesh.*': {dict(zip(MESH_AXES, sizes))} multiply to {math.prod(sizes)} "
            f"but there are {where} (this run sees {jax.process_count()} process(es), "
            f"{jax.local_device_count()} device(s) each)"
        )
    return tuple(sizes), dcn


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
    """Devices along each mesh axis: DCN size x in-slice size."""
    ici, dcn = slice_shapes(cfg, num_devices)
    return tuple(d * i for d, i in zip(dcn, ici))


def device_granule(device: Any) -> int:
    """The slice a device belongs to: its TPU slice, else its process (one GPU host).
    (CPU devices of a multi-process run report `slice_index` 0 for every process.)"""
    if device.platform == "tpu" and getattr(device, "slice_index", None) is not None:
        return device.slice_index
    return device.process_index


def hybrid_device_array(
    ici: tuple[int, ...], dcn: tuple[int, ...], devices: list[Any], granule_of: Callable[[Any], int] = device_granule
) -> np.ndarray:
    """Devices arranged [dcn_0*ici_0, ...]: on each axis the slice index is the outer
    part, so in-slice neighbours (fast links) are adjacent and only the DCN part of an
    axis crosses slices."""
    granules: dict[int, list[Any]] = {}
    for d in devices:
        granules.setdefault(granule_of(d), []).append(d)
    if len(granules) != math.prod(dcn):
        raise ConfigError(
            f"config keys 'mesh.dcn_*' ask for {math.prod(dcn)} slices but the devices form "
            f"{len(granules)} (slices are TPU slices, else processes)"
        )
    blocks = [mesh_utils.create_device_mesh(ici, granules[g], allow_split_physical_axes=True) for g in sorted(granules)]
    arr = np.stack(blocks).reshape(dcn + ici)
    n = len(MESH_AXES)
    order = [k for axis in range(n) for k in (axis, n + axis)]  # dcn_0, ici_0, dcn_1, ici_1, ...
    return arr.transpose(order).reshape([d * i for d, i in zip(dcn, ici)])


def make_mesh(
    cfg: MeshConfig, devices: list[Any] | None = None, granule_of: Callable[[Any], int] = device_granule
) -> Mesh:
    """The `data, fsdp, tensor, sequence` mesh over `devices` (default: all), ordered by
    `jax.experimental.mesh_utils` for the hardware's topology within each slice."""
    devices = list(devices if devices is not None else jax.devices())
    ici, dcn = slice_shapes(cfg, len(devices))
    if math.prod(dcn) == 1:
        arr = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    else:
        arr = hybrid_device_array(ici, dcn, devices, granule_of)
    return Mesh(arr, MESH_AXES)


def logical_rules(cfg: MeshConfig) -> tuple[tuple[str, Any], ...]:
    """Parameter and activation rules in the form flax expects (None for replicated).

    The two sets name disjoint logical axes (the config checks it), so one list serves
    both parameter shardings and activation constraints."""
    rules = cfg.param_rules + cfg.activation_rules
    return tuple((name, tuple(axes) if axes else None) for name, axes in rules)


def check_divisible(tree: Any, what: str = "parameter") -> None:
    """Raises ConfigError naming the first leaf (path, shape, mesh axes) of a tree of
    sharded `ShapeDtypeStruct`s whose dimension does not split evenly over its axes."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        spec = getattr(leaf.sharding, "spec", None)
        if spec is None:
            continue
        for dim, (size, axes) in enumerate(zip(leaf.shape, spec)):
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            shards = math.prod(leaf.sharding.mesh.shape[a] for a in axes)
            if size % shards:
                name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
                raise ConfigError(
                    f"{what} {name} of shape {tuple(leaf.shape)}: dimension {dim} ({size}) does not split "
                    f"over mesh axes {axes} ({shards} shards); change 'mesh.*' sizes or 'mesh.param_rules'"
                )


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
