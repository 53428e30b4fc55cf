"""A sweep on a cluster: an sbatch array job (task i runs `wm sweep run-one SPEC --index i`)
or one Kubernetes Job per run, from the `wm launch` templates."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from wm_jax.ops import launch
from wm_jax.ops.sweep.spec import Plan, run_one_argv


def render_slurm_array(
    p: Plan,
    extra_set: list[str],
    *,
    gpus_per_node: int,
    time_limit: str,
    partition: str | None = None,
    account: str | None = None,
    chdir: str | None = None,
    python: str | None = None,
) -> str:
    """An sbatch array job from the `wm launch slurm` template: task i runs `wm sweep
    run-one SPEC --index i` (requeued on exit 42 like a single run)."""
    chdir = chdir or os.getcwd()
    allowed = "only letters, digits and _.,+@=- can go in an #SBATCH line"
    paths = "must be a path of letters, digits and _./+,@=- (it goes in an #SBATCH line)"
    job_name = launch.default_job_name(p.spec["name"])
    launch.check_flag(
        launch.SLURM_TIME, time_limit, "--time", "expected [days-]hours[:minutes[:seconds]], e.g. 24:00:00"
    )
    launch.check_flag(launch.SBATCH_PATH, str(p.out), "sweep out", paths)
    launch.check_flag(launch.SBATCH_PATH, chdir, "the current directory", paths)
    extra = [f"#SBATCH --array=0-{len(p.runs) - 1}"]
    for flag, value in (("partition", partition), ("account", account)):
        if value:
            extra.append(f"#SBATCH --{flag}={launch.check_flag(launch.SBATCH_WORD, value, f'--{flag}', allowed)}")
    argv = run_one_argv(str(Path(p.spec_path).resolve()), "INDEX", extra_set)
    if python:
        argv[0] = python
    # The index is bash's to expand in each array task, so it stays outside the quoting.
    command = shlex.join(argv).replace(" INDEX", ' "$SLURM_ARRAY_TASK_ID"')
    return launch.render(
        "slurm.sbatch",
        job_name=job_name,
        nodes=1,
        gpus_per_node=gpus_per_node,
        time=time_limit,
        chdir=chdir,
        workdir=str(p.out),
        extra_directives="\n".join(extra),
        train_command=command,
    )


def render_k8s_jobs(p: Plan, *, namespace: str, gpus_per_node: int, image: str, pvc: str | None = None) -> str:
    """One ConfigMap + Service + Job (the `wm launch k8s` manifest) per run, as one YAML stream.
    The Jobs train only: run `wm sweep SPEC` afterwards for the evaluations (training is skipped)."""
    prefix = launch.default_job_name(p.spec["name"])[:40].rstrip("-")
    docs = [
        launch.render_k8s(
            run.config,
            run.workdir,
            name=f"{prefix}-{run.index}",
            namespace=namespace,
            nodes=1,
            gpus_per_node=gpus_per_node,
            image=image,
            pvc=pvc,
        )
        for run in p.runs
    ]
    return "---\n".join(docs)
