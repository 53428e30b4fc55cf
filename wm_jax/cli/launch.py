"""`wm launch {local,slurm,k8s,tpu-vm}`: the parser and handlers live in `wm_jax.ops.launch` (for
now; moving them here is part of splitting launch into spec / execute)."""

from __future__ import annotations

from wm_jax.ops.launch import add_parser

__all__ = ["add_parser"]
