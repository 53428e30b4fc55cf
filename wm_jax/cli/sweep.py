"""`wm sweep SPEC | report SPEC | run-one SPEC --index I`: the parser and handlers live in
`wm_jax.sweep` (for now; moving them here is part of splitting sweep into spec / execute /
report)."""

from __future__ import annotations

from wm_jax.sweep import add_parser

__all__ = ["add_parser"]
