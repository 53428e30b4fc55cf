"""`wm train --dry-run`: compile the train step ahead of time for the configured mesh.

Nothing is allocated: the state, the batch and (for the dynamics stage) the tokenizer
parameters are abstract `ShapeDtypeStruct`s with their shardings, so a configuration
that does not fit is found from XLA's memory analysis before a job is queued. No
dataset or tokenizer run is read.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import linen as nn
from jax.sharding import Mesh

from wm_jax import sharding
from wm_jax.config import Config
from wm_jax.stages import get_stage
from wm_jax.train.state import param_count, state_shardings
from wm_jax.train.step import batch_specs, jit_train_step

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a compiled step's inputs live: the mesh, its rules, the state's shardings and
    the frozen models' state shardings by stage (`Stage.frozen_stages`; empty for most stages)."""

    mesh: Mesh
    rules: Any
    state: Any
    frozen_states: dict[str, Any]


def compile_report(cfg: Config) -> dict[str, Any]:
    """Compiles one train step of `cfg` on the current devices; returns its plan
    (see `compile_step`)."""
    return compile_step(cfg)[1]


def compile_step(cfg: Config) -> tuple[Any, dict[str, Any], Placement]:
    """Compiles one train step of `cfg` on the current devices: (executable, plan, placement).

    The executable takes (state, batch, frozen params or None: `make_train_step`) placed on the shardings
    of `placement` and `batch_specs`.

    Keys: parameters, mesh, devices, flops_per_step (analytic, global), xla_flops_per_device
    (XLA's cost analysis of the compiled per-device program, None if unavailable), and
    per-device memory in bytes: arguments, outputs, temporaries, code, and `peak_bytes`
    (arguments + outputs - donated aliases + temporaries), plus the device's capacity
    where the runtime reports one.
    """
    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.logical_rules(cfg.mesh)
    sharding.check_batch_divisible(cfg.data.batch_size, mesh, rules)
    stage = get_stage(cfg.train.stage)
    abstract, shardings = state_shardings(cfg, mesh, rules)
    frozen = {name: state_shardings(cfg, mesh, rules, stage=name) for name in stage.frozen_stages(cfg)}
    frozen_abstract = {k: a.params for k, (a, _) in frozen.items()} or None
    step_fn = jit_train_step(cfg, mesh, rules, shardings, {k: s.params for k, (_, s) in frozen.items()} or None)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        compiled = step_fn.lower(abstract, batch_specs(cfg, mesh, rules), frozen_abstract).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # older jax returns one dict per program
    device = jax.devices()[0]
    report: dict[str, Any] = {
        "stage": cfg.train.stage,
        "parameters": param_count(abstract.params),
        "mesh": dict(mesh.shape),
        "devices": jax.device_count(),
        "device": device.device_kind,
        "flops_per_step": stage.train_step_flops(cfg),
        "tokens_per_step": stage.tokens_per_step(cfg),
        "xla_flops_per_device": float(cost["flops"]) if cost and "flops" in cost else None,
    }
    if memory is not None:
        report.update(
            argument_bytes=memory.argument_size_in_bytes,
            output_bytes=memory.output_size_in_bytes,
            alias_bytes=memory.alias_size_in_bytes,
            temp_bytes=memory.temp_size_in_bytes,
            code_bytes=memory.generated_code_size_in_bytes,
            peak_bytes=memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes,
        )
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        report["device_bytes_limit"] = stats["bytes_limit"]
    return compiled, report, Placement(mesh, rules, shardings, {k: s for k, (_, s) in frozen.items()})


def format_report(report: dict[str, Any]) -> str:
    """Human summary of `compile_report`, one figure per line."""
    per_device = report["flops_per_step"] / report["devices"]
    lines = [
        f"stage {report['stage']}: {report['parameters']:,} parameters, mesh {report['mesh']} "
        f"on {report['devices']} x {report['device']}",
        f"FLOPs per step: {report['flops_per_step']:.3e} analytic ({per_device:.3e} per device)"
        + (f", XLA per device {report['xla_flops_per_device']:.3e}" if report["xla_flops_per_device"] else ""),
        f"tokens per step: {report['tokens_per_step']:,}",
    ]
    if "peak_bytes" in report:
        lines.append(
            "per-device memory: "
            + ", ".join(
                f"{k.removesuffix('_bytes')} {report[k] / GIB:.3f} GiB"
                for k in ("argument_bytes", "output_bytes", "temp_bytes", "peak_bytes")
            )
        )
    if "device_bytes_limit" in report:
        fits = report["peak_bytes"] <= report["device_bytes_limit"]
        lines.append(
            f"device memory {report['device_bytes_limit'] / GIB:.1f} GiB: " + ("fits" if fits else "DOES NOT FIT")
        )
    return "\n".join(lines)


def fits(report: dict[str, Any]) -> bool:
    """False only when the runtime reports a capacity and the peak exceeds it."""
    return "device_bytes_limit" not in report or report.get("peak_bytes", 0) <= report["device_bytes_limit"]
