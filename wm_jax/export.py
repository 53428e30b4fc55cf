"""Inference bundles: a run's parameters + config + manifest, without optimizer state.

`wm export --workdir RUN --out BUNDLE` writes

    BUNDLE/bundle.json      format, source run, step, stage
    BUNDLE/config.yaml      the run's resolved config
    BUNDLE/manifest.json    provenance of the export and of the checkpoint
    BUNDLE/params/          orbax checkpoint of the parameters alone
    BUNDLE/tokenizer/       (dynamics runs: the stage's `bundled`) the tokenizer's own bundle, so
                            BUNDLE is self-contained

atomically (a temporary directory renamed at the end). `wm eval` accepts a bundle
wherever it accepts a run directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import orbax.checkpoint as ocp

from wm_jax import checkpoint as ckpt
from wm_jax import config as config_lib
from wm_jax import provenance, sharding
from wm_jax.config import MeshConfig
from wm_jax.run import BUNDLE_FORMAT, frozen_source, load_run_config, restore_params
from wm_jax.stages import get_stage


def _write(workdir: Path, out: Path, step: int | None) -> dict:
    mesh = sharding.make_mesh(MeshConfig())
    rules = sharding.logical_rules(load_run_config(workdir).mesh)
    params, cfg, step = restore_params(workdir, mesh, rules, step)
    out.mkdir(parents=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out.resolve() / "params", params)
    config_lib.dump(cfg, out / "config.yaml")
    source_manifest = (
        json.loads((workdir / "manifest.json").read_text()) if (workdir / "manifest.json").exists() else None
    )
    (out / "manifest.json").write_text(
        json.dumps(
            {
                "export": provenance.run_manifest(
                    dataset_hash=(source_manifest or {}).get("dataset_hash", ""), mesh_shape=dict(mesh.shape), step=step
                ),
                "run": source_manifest,
            },
            indent=2,
        )
    )
    info = {"format": BUNDLE_FORMAT, "source": str(workdir.resolve()), "step": step, "stage": cfg.train.stage}
    for stage in get_stage(cfg.train.stage).bundled:  # what inference needs besides these params
        info[stage] = _write(frozen_source(workdir, cfg, stage), out / stage, None)
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
