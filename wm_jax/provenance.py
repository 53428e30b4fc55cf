"""Run manifests: what code, packages, data and devices produced a run or checkpoint."""

from __future__ import annotations

import importlib.metadata
import subprocess
import time
from pathlib import Path
from typing import Any

import jax

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "wm_jax")
REPO = Path(__file__).resolve().parents[1]


def git_sha(repo: Path = REPO) -> str | None:
    """The commit of the code (with `+dirty` when the tree has changes), or None outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "")


def package_versions() -> dict[str, str | None]:
    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {name: version(name) for name in PACKAGES}


def run_manifest(*, dataset_hash: str, mesh_shape: dict[str, int], step: int | None = None) -> dict[str, Any]:
    """Provenance of a run at a point in time (JSON-serialisable)."""
    device = jax.devices()[0]
    return {
        "git_sha": git_sha(),
        "packages": package_versions(),
        "dataset_hash": dataset_hash,
        "mesh": mesh_shape,
        "devices": {"count": jax.device_count(), "kind": device.device_kind, "platform": device.platform},
        "processes": jax.process_count(),
        "wall_time": time.time(),
        "step": step,
    }
