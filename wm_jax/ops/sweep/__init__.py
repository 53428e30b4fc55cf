"""`wm sweep`: run a grid/random set of config variations, then tabulate and plot them.

- `spec`: the spec file, its expansion into runs with validated configs (`plan`), the
  `sweep.json` record, and a run's state read from its directory;
- `execute`: running the runs on this machine (imports training and evaluation, so JAX);
- `clusters`: an sbatch array job or Kubernetes Jobs for the runs;
- `report`: results.csv, results.md and the plots.

The CLI (`wm_jax.cli.sweep`) parses the command line. The names below come from `spec` and
`clusters`, which import no JAX module themselves.
"""

from __future__ import annotations

from wm_jax.ops.sweep.clusters import render_k8s_jobs, render_slurm_array
from wm_jax.ops.sweep.spec import (
    NAME_MAX,
    SAFE_NAME,
    Plan,
    Run,
    SweepError,
    check_spec,
    combinations,
    finished,
    plan,
    read_spec,
    run_names,
    sweep_record,
    write_record,
)

__all__ = [
    "NAME_MAX",
    "SAFE_NAME",
    "Plan",
    "Run",
    "SweepError",
    "check_spec",
    "combinations",
    "finished",
    "plan",
    "read_spec",
    "render_k8s_jobs",
    "render_slurm_array",
    "run_names",
    "sweep_record",
    "write_record",
]
