"""Inference bundles: a run's parameters + config + manifest, without optimizer state.

`wm export --workdir RUN --out BUNDLE` writes

    BUNDLE/bundle.json      format, source run, step, stage
    BUNDLE/config.yaml      the run's resolved config
    BUNDLE/manifest.json    provenance of the export and of the checkpoint
    BUNDLE/params/          orbax checkpoint of the parameters alone
    BUNDLE/tokenizer/       (dynamics runs) the tokenizer's own bundle, so BUNDLE is self-contained

atomically (a temporary directory renamed at the end). `wm eval` accepts a bundle
wherever it accepts a run directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from wm_jax import checkpoint as ckpt
from wm_jax import config as config_lib
from wm_jax import provenance
from wm_jax.config import Config, MeshConfig

BUNDLE_FORMAT = "wm_jax.bundle/1"


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / "bundle.json").is_file()


def read_bundle(path: str | Path) -> dict:
    info = json.loads((Path(path) / "bundle.json").read_text())
    if info.get("format") != BUNDLE_FORMAT:
        raise ckpt.CheckpointError(f"{path}: unsupported bundle format {info.get('format')!r} (expected {BUNDLE_FORMAT})")
    return info


def tokenizer_source(path: str | Path, cfg: Config) -> Path:
    """Where a dynamics model's tokenizer lives: inside a bundle, or the run's tokenizer_workdir."""
    return Path(path) / "tokenizer" if is_bundle(path) else Path(cfg.train.tokenizer_workdir)


def load_bundle_params(path: str | Path, abstract_params: Any) -> Any:
    """The bundle's parameters onto the shardings of `abstract_params`."""
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            return checkpointer.restore(Path(path).resolve() / "params", abstract_params)
        except (ValueError, KeyError, TypeError) as e:
            raise ckpt.CheckpointError(f"bundle {path}: parameters do not fit the model: {str(e)[:600]}") from e


def _write(workdir: Path, out: Path, step: int | None) -> dict:
    # Imported here: the loop reads bundles through this module.
    from wm_jax import sharding
    from wm_jax.train.loop import load_run_config, restore_params

    mesh = sharding.make_mesh(MeshConfig())
    rules = sharding.logical_rules(load_run_config(workdir).mesh)
    params, cfg, step = restore_params(workdir, mesh, rules, step)
    out.mkdir(parents=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out.resolve() / "params", params)
    config_lib.dump(cfg, out / "config.yaml")
    source_manifest = json.loads((workdir / "manifest.json").read_text()) if (workdir / "manifest.json").exists() else None
    (out / "manifest.json").write_text(
        json.dumps({"export": provenance.run_manifest(dataset_hash=(source_manifest or {}).get("dataset_hash", ""),
                                                      mesh_shape=dict(mesh.shape), step=step),
                    "run": source_manifest}, indent=2)
    )
    info = {"format": BUNDLE_FORMAT, "source": str(workdir.resolve()), "step": step, "stage": cfg.train.stage}
    if cfg.train.stage == "dynamics":
        info["tokenizer"] = _write(tokenizer_source(workdir, cfg), out / "tokenizer", None)
    (out / "bundle.json").write_text(json.dumps(info, indent=2))
    return info


def export_bundle(workdir: str | Path, out: str | Path, step: int | None = None) -> dict:
    """Writes the inference bundle of `workdir` (newest or given step) to `out`; returns bundle.json."""
    workdir, out = Path(workdir), Path(out)
    if out.exists():
        raise ckpt.CheckpointError(f"{out} already exists; choose a new --out")
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        info = _write(workdir, tmp, step)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info
