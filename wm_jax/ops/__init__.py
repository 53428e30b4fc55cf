"""Running jobs: `launch` (one training job on a machine, SLURM, Kubernetes or TPU VMs) and
`sweep` (many runs from a spec: expand, execute, report)."""
