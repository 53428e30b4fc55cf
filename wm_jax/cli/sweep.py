"""`wm sweep SPEC | report SPEC | run-one SPEC --index I`: parse and check the spec, then
run it here, submit it to SLURM or Kubernetes, or tabulate its results (`wm_jax.ops.sweep`).

Running and reporting import JAX; their handlers import those modules when they run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from wm_jax.ops import launch
from wm_jax.ops.sweep.clusters import render_k8s_jobs, render_slurm_array
from wm_jax.ops.sweep.spec import Plan, SweepError, finished, plan, write_record


def cmd_sweep(args: argparse.Namespace) -> int:
    """`wm sweep SPEC`, `wm sweep report SPEC`, `wm sweep run-one SPEC --index I`."""
    words = args.words
    if words[0] in ("report", "run-one"):
        if len(words) != 2:
            raise SweepError(f"usage: wm sweep {words[0]} SPEC.yaml" + (" --index I" if words[0] == "run-one" else ""))
        return cmd_report(words[1], args) if words[0] == "report" else cmd_run_one(words[1], args)
    if len(words) != 1:
        raise SweepError(f"wm sweep: unexpected arguments {words[1:]}; usage: wm sweep SPEC.yaml [--launcher ...]")
    p = plan(words[0], args.set)
    if args.launcher == "local":
        return cmd_local(p, args)
    if args.launcher == "slurm":
        return cmd_slurm(p, args)
    return cmd_k8s(p, args)


def cmd_local(p: Plan, args: argparse.Namespace) -> int:
    """Runs the unfinished runs here (`--parallel` at a time), or lists them (`--dry-run`)."""
    with_eval = bool(p.spec.get("eval", False))
    if args.dry_run:
        for run in p.runs:
            state = "finished, skip" if finished(run, with_eval) else "to run"
            print(f"{run.index}\t{run.name}\t{state}\t{' '.join(run.overrides)}")
        print(f"# dry run: {len(p.runs)} runs under {p.out / 'runs'}", file=sys.stderr)
        return 0
    from wm_jax.ops.sweep.execute import run_local  # training (JAX): not for a dry run
    from wm_jax.train.loop import EXIT_PREEMPTED

    status = run_local(p, args.parallel, args.set)
    for name, state in status.items():
        print(f"{name}\t{state}")
    failed = [n for n, s in status.items() if s.startswith("failed")]
    if failed:
        print(
            f"sweep: {len(failed)} of {len(status)} runs failed (see <run>/error.txt): {', '.join(failed)}",
            file=sys.stderr,
        )
    if any(s == f"failed (exit {EXIT_PREEMPTED})" for s in status.values()):
        return EXIT_PREEMPTED  # saved; run the same command again to resume
    return 1 if failed else 0


def cmd_slurm(p: Plan, args: argparse.Namespace) -> int:
    """Submits the sweep as an sbatch array job (or prints the script: `--dry-run`)."""
    script = render_slurm_array(
        p,
        args.set,
        gpus_per_node=args.gpus_per_node,
        time_limit=args.time,
        partition=args.partition,
        account=args.account,
    )
    target = p.out / "slurm.sbatch"
    if args.dry_run:
        print(script, end="")
        print(f"# dry run: would write {p.out / 'sweep.json'}, {target} and run `sbatch {target}`", file=sys.stderr)
        return 0
    sbatch = launch.require_tool("sbatch", "run this on a SLURM login node")
    write_record(p)
    target.write_text(script)
    return subprocess.run([sbatch, str(target)]).returncode


def cmd_k8s(p: Plan, args: argparse.Namespace) -> int:
    """Applies one Kubernetes Job per run (or prints the manifests: `--dry-run`)."""
    if not args.image and not args.dry_run:
        raise SweepError("--image is required: the container image with wm_jax installed")
    manifest = render_k8s_jobs(
        p,
        namespace=args.namespace,
        gpus_per_node=args.gpus_per_node,
        image=args.image or launch.K8S_PLACEHOLDER_IMAGE,
        pvc=args.pvc,
    )
    if args.dry_run:
        print(manifest, end="")
        print(
            f"# dry run: {len(p.runs)} Jobs; would write {p.out / 'sweep.json'} and `kubectl apply` them",
            file=sys.stderr,
        )
        return 0
    kubectl = launch.require_tool("kubectl", "install it and point it at the cluster")
    write_record(p)
    return subprocess.run([kubectl, "apply", "-f", "-"], input=manifest, text=True).returncode


def cmd_run_one(spec: str, args: argparse.Namespace) -> int:
    """One run of the sweep (a SLURM array task): checks that sweep.json, when present,
    lists the same run at this index (the spec may have changed since submission)."""
    from wm_jax.ops.sweep.execute import execute

    p = plan(spec, args.set)
    if args.index is None or not 0 <= args.index < len(p.runs):
        raise SweepError(f"--index must be in [0, {len(p.runs) - 1}]; got {args.index}")
    run = p.runs[args.index]
    record = p.out / "sweep.json"
    if record.is_file():
        listed = json.loads(record.read_text())["runs"]
        if args.index >= len(listed) or listed[args.index]["name"] != run.name:
            raise SweepError(f"{record} lists another run at index {args.index} than {spec} does now: rerun `wm sweep`")
    with_eval = bool(p.spec.get("eval", False))
    if finished(run, with_eval):
        print(f"sweep: {run.name} already finished")
        return 0
    return execute(run, with_eval)


def cmd_report(spec: str, args: argparse.Namespace) -> int:
    """Writes and prints the sweep's results table and plots, finished runs or not."""
    from wm_jax.ops.sweep.report import write_report

    p = plan(spec, args.set, runnable=False)
    result = write_report(p)
    print(Path(p.out / "results.md").read_text(), end="")
    missing = sum(1 for row in result["rows"] if row["status"] != "finished")
    if missing:
        print(f"sweep report: {missing} of {len(p.runs)} runs not finished (shown as such)", file=sys.stderr)
    print(f"wrote {', '.join(str(p.out / f) for f in result['files'])}", file=sys.stderr)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers `wm sweep` on the `wm` parser's subcommands."""
    sw = subparsers.add_parser(
        "sweep",
        help="run a grid/random sweep of config overrides; `wm sweep report SPEC` tabulates and plots it",
        description="wm sweep SPEC.yaml [--launcher local|slurm|k8s] | wm sweep report SPEC.yaml | "
        "wm sweep run-one SPEC.yaml --index I",
    )
    sw.add_argument(
        "words",
        nargs="+",
        metavar="[report|run-one] SPEC",
        help="the sweep spec (YAML), after report or run-one if given",
    )
    sw.add_argument("--launcher", choices=["local", "slurm", "k8s"], default="local")
    sw.add_argument(
        "--parallel", type=launch.positive_int, default=1, help="local: runs at a time (subprocesses when > 1)"
    )
    sw.add_argument("--dry-run", action="store_true", help="print the runs, sbatch script or manifests, and exit 0")
    sw.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a fixed override for every run")
    sw.add_argument("--index", type=int, help="run-one: the run's index in sweep.json")
    sw.add_argument("--gpus-per-node", type=launch.non_negative_int, default=8, help="slurm/k8s: GPUs per run")
    sw.add_argument("--time", default="24:00:00", help="slurm: time limit per run")
    sw.add_argument("--partition", help="slurm")
    sw.add_argument("--account", help="slurm")
    sw.add_argument("--image", help="k8s: container image with wm_jax installed (required unless --dry-run)")
    sw.add_argument("--namespace", default="default", help="k8s")
    sw.add_argument("--pvc", metavar="CLAIM:/PATH", help="k8s: mount this PersistentVolumeClaim (for runs and data)")
    sw.set_defaults(fn=cmd_sweep)
