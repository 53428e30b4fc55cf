"""`wm launch {local,slurm,k8s,tpu-vm}`: start `wm train` on this machine or on a cluster.

Every launcher first loads the config with its `--set` overrides (a bad key exits 2
before anything starts), then renders what it will run from a template in
`wm_jax/ops/launch_templates/` (`string.Template`, package data) and, with `--dry-run`, prints it and exits 0.

How the processes of one run find each other (see `wm_jax.distributed`):
- local, k8s: `WM_COORDINATOR`, `WM_NUM_PROCESSES`, `WM_PROCESS_ID`;
- slurm: SLURM's own variables, read by `jax.distributed.initialize()`;
- tpu-vm: `WM_DISTRIBUTED=auto`, so JAX reads the TPU pod's metadata.

Preemption: `wm train` saves and exits 42 on SIGTERM/SIGUSR1; the SLURM script requeues
the job on 42, the Kubernetes Job recreates pods that exit 42 without counting a failure,
and `local` returns 42 so a wrapper script can start it again.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import string
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import yaml

from wm_jax import config as config_lib
from wm_jax.config import Config, ConfigError
from wm_jax.presets import preset_name, preset_path

TEMPLATES = Path(__file__).resolve().parent / "launch_templates"  # package data
# The source checkout holding this package: where `wm launch tpu-vm` workers `cd` by default.
REPO_ROOT = Path(__file__).resolve().parents[2]

K8S_CONFIG_DIR = "/etc/wm"  # where the pods mount the ConfigMap holding the config
K8S_GRACE_S = 300  # SIGTERM → save at the next step → exit 42 must fit in this
K8S_BACKOFF_LIMIT = 3  # real failures tolerated; exit 42 and disruptions do not count
K8S_MAX_RESTARTS = 3  # JobSet: group restarts after real failures; exit 42 and disruptions do not count
K8S_APIS = {"jobset": "k8s_jobset.yaml", "job": "k8s.yaml"}  # --api -> template
K8S_PORT = 8476
K8S_PLACEHOLDER_IMAGE = "REPLACE-ME/wm_jax:latest"
# After one local process fails, how long the others get to exit on their own (they
# usually exit 42 at the same step), then again after SIGTERM, before SIGKILL.
LOCAL_GRACE_S = 10.0

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# What may go into an sbatch script unquoted (also checked by `wm sweep --launcher slurm`).
SBATCH_WORD = re.compile(r"^[A-Za-z0-9_.,+@=-]+$")
SBATCH_PATH = re.compile(r"^[A-Za-z0-9_./+,@=-]+$")
SLURM_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")


class LaunchError(ConfigError):
    """A bad launcher flag or a missing cluster tool; exits 2 like a bad config."""


# ---------------------------------------------------------------------------- helpers


def render(template: str, **values: object) -> str:
    """Fills `wm_jax/ops/launch_templates/<template>`; every placeholder must be given."""
    path = TEMPLATES / template
    if not path.is_file():
        raise LaunchError(f"launcher template not found: {path}")
    try:
        return string.Template(path.read_text()).substitute({k: str(v) for k, v in values.items()})
    except KeyError as e:
        raise LaunchError(f"template {path} uses ${e.args[0]}, which the launcher does not fill in") from None


def train_argv(config: str, workdir: str, overrides: list[str]) -> list[str]:
    """`train ...` arguments of the `wm` command every launcher starts."""
    argv = ["train", "--config", config, "--workdir", workdir]
    for override in overrides:
        argv += ["--set", override]
    return argv


def load_config(config: str, overrides: list[str]) -> tuple[Path, Config]:
    """The config file and its validated contents; raises ConfigError (exit 2) first."""
    path = preset_path(config)
    return path, config_lib.load(path, overrides)


def default_job_name(workdir: str) -> str:
    """`wm-<workdir name>`, lowered to what both SLURM and Kubernetes accept."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"wm-{Path(workdir).name}".lower()).strip("-")
    return name[:50].rstrip("-") or "wm"


def check_flag(pattern: re.Pattern, value: str, flag: str, allowed: str) -> str:
    """`value` when `pattern` matches it; else a LaunchError naming `flag` and what is `allowed`."""
    if not pattern.match(value):
        raise LaunchError(f"{flag} {value!r}: {allowed}")
    return value


def _check_dns_label(value: str, flag: str, max_len: int = 63) -> str:
    check_flag(
        _DNS_LABEL,
        value,
        flag,
        "must be lower-case letters, digits and '-', starting and ending with a letter or digit",
    )
    if len(value) > max_len:
        raise LaunchError(f"{flag} {value!r}: at most {max_len} characters")
    return value


def require_tool(name: str, hint: str) -> str:
    """The path of the cluster tool `name`; a LaunchError with `hint` when it is not on PATH."""
    path = shutil.which(name)
    if path is None:
        raise LaunchError(f"`{name}` is not on PATH: {hint} (or use --dry-run to print what would be run)")
    return path


def _int_at_least(minimum: int):
    """An argparse type: an integer >= `minimum`, with a message saying so otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}; got {value}")
        return value

    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def _port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535; got {value}")
    return value


# ------------------------------------------------------------------------------ local


def free_port() -> int:
    """A TCP port nobody listens on right now (the coordinator binds it moments later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_env(process_id: int, processes: int, devices: int, port: int, xla_flags: str = "") -> dict[str, str]:
    """Environment of local process `process_id`: fake CPU devices and the WM_* variables.
    Other flags in `xla_flags` are kept; its device count is replaced."""
    flags = [f for f in xla_flags.split() if not f.startswith("--xla_force_host_platform_device_count")]
    return {
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]),
        "WM_COORDINATOR": f"localhost:{port}",
        "WM_NUM_PROCESSES": str(processes),
        "WM_PROCESS_ID": str(process_id),
        "PYTHONUNBUFFERED": "1",  # lines reach the [p<i>] prefixer as they are printed
    }


def local_commands(
    config: str, workdir: str, overrides: list[str], processes: int, devices: int, port: int, xla_flags: str = ""
) -> list[tuple[dict[str, str], list[str]]]:
    """(environment additions, argv) of each local process."""
    argv = [sys.executable, "-m", "wm_jax.cli", *train_argv(config, workdir, overrides)]
    return [(local_env(i, processes, devices, port, xla_flags), argv) for i in range(processes)]


def format_command(env: dict[str, str], argv: list[str]) -> str:
    """One shell line: `VAR=value ... program args`, quoted so it can be pasted."""
    return " ".join([f"{k}={shlex.quote(v)}" for k, v in env.items()] + [shlex.join(argv)])


def _prefix_lines(stream: IO[str], prefix: str, out: IO[str], lock: threading.Lock) -> None:
    for line in stream:
        with lock:
            out.write(f"{prefix} {line}" if line.endswith("\n") else f"{prefix} {line}\n")
            out.flush()


def _exit_code(returncode: int) -> int:
    """A child's exit status as a shell reports it (killed by signal N → 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def _send(procs: list[subprocess.Popen], sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)


def wait_all(procs: list[subprocess.Popen], grace_s: float = LOCAL_GRACE_S) -> int:
    """Waits for every process. Once one exits non-zero, the others get `grace_s` to
    exit by themselves, then SIGTERM, then SIGKILL. Returns the first non-zero exit
    code seen, else 0."""
    first_failure, failed_at, stage = 0, 0.0, 0
    while [p for p in procs if p.poll() is None]:  # polls every one (any() would stop early)
        if not first_failure:  # failed_at ends up at the moment the failure was first seen
            first_failure = next((_exit_code(p.returncode) for p in procs if p.returncode), 0)
            failed_at = time.monotonic()
        elif time.monotonic() - failed_at > grace_s * (stage + 1) and stage < 2:
            _send(procs, signal.SIGTERM if stage == 0 else signal.SIGKILL)
            stage += 1
        time.sleep(0.1)
    return first_failure or next((_exit_code(p.returncode) for p in procs if p.returncode), 0)


def run_local(commands: list[tuple[dict[str, str], list[str]]], out: IO[str] | None = None) -> int:
    """Starts the processes, prefixes their output lines with `[p<i>]`, waits for all.

    SIGINT/SIGTERM/SIGUSR1 to the launcher are forwarded (as SIGTERM/SIGUSR1: save, then
    exit 42); a second one kills the processes. Returns the first non-zero exit code."""
    out = out or sys.stdout
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    received: list[int] = []

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        if len(received) > 1:
            _send(procs, signal.SIGKILL)
        else:
            _send(procs, signal.SIGUSR1 if signum == signal.SIGUSR1 else signal.SIGTERM)

    previous = {}
    if threading.current_thread() is threading.main_thread():  # signal.signal works only there
        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        for i, (env, argv) in enumerate(commands):
            # Own sessions: a Ctrl-C reaches the launcher only, which asks for a clean save.
            proc = subprocess.Popen(
                argv,
                env={**os.environ, **env},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
                start_new_session=True,
            )
            procs.append(proc)
            pumps.append(threading.Thread(target=_prefix_lines, args=(proc.stdout, f"[p{i}]", out, lock), daemon=True))
            pumps[-1].start()
        code = wait_all(procs)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _send(procs, signal.SIGKILL)  # none left unless starting or waiting failed
        for pump in pumps:
            pump.join(timeout=5)
    return code


def cmd_local(args: argparse.Namespace) -> int:
    path, _ = load_config(args.config, args.set)
    port = args.port or free_port()
    commands = local_commands(
        str(path),
        args.workdir,
        args.set,
        args.processes,
        args.devices_per_process,
        port,
        os.environ.get("XLA_FLAGS", ""),
    )
    if args.dry_run:
        for env, argv in commands:
            print(format_command(env, argv))
        return 0
    print(
        f"wm launch local: {args.processes} processes × {args.devices_per_process} CPU devices, "
        f"coordinator localhost:{port}",
        file=sys.stderr,
    )
    return run_local(commands)


# ------------------------------------------------------------------------------ slurm


def render_slurm(
    config: str,
    workdir: str,
    overrides: list[str],
    *,
    nodes: int,
    gpus_per_node: int,
    time_limit: str,
    job_name: str,
    partition: str | None = None,
    account: str | None = None,
    chdir: str | None = None,
    python: str | None = None,
) -> str:
    """The sbatch script: one task per node, USR1 forwarded to the step, requeue on 42."""
    chdir = chdir or os.getcwd()
    allowed = "only letters, digits and _.,+@=- can go in an #SBATCH line"
    check_flag(SBATCH_WORD, job_name, "--job-name", allowed)
    check_flag(
        SLURM_TIME, time_limit, "--time", "expected [days-]hours[:minutes[:seconds]], e.g. 24:00:00 or 2-00:00:00"
    )
    paths = "must be a path of letters, digits and _./+,@=- (it goes in an #SBATCH line)"
    check_flag(SBATCH_PATH, workdir, "--workdir", paths)
    check_flag(SBATCH_PATH, chdir, "the current directory", paths)
    extra = []
    for flag, value in (("partition", partition), ("account", account)):
        if value:
            extra.append(f"#SBATCH --{flag}={check_flag(SBATCH_WORD, value, f'--{flag}', allowed)}")
    command = [python or sys.executable, "-m", "wm_jax.cli", *train_argv(config, workdir, overrides)]
    return render(
        "slurm.sbatch",
        job_name=job_name,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        time=time_limit,
        chdir=chdir,
        workdir=workdir,
        extra_directives="\n".join(extra),
        train_command=shlex.join(command),
    )


def cmd_slurm(args: argparse.Namespace) -> int:
    path, _ = load_config(args.config, args.set)
    script = render_slurm(
        str(path),
        args.workdir,
        args.set,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        time_limit=args.time,
        job_name=args.job_name or default_job_name(args.workdir),
        partition=args.partition,
        account=args.account,
    )
    target = Path(args.workdir) / "launch" / "slurm.sbatch"
    if args.dry_run:
        print(script, end="")
        print(f"# dry run: would write {target} and run `sbatch {target}`", file=sys.stderr)
        return 0
    sbatch = require_tool("sbatch", "run this on a SLURM login node")
    target.parent.mkdir(parents=True, exist_ok=True)  # also creates RUN for --output
    target.write_text(script)
    return subprocess.run([sbatch, str(target)]).returncode


# -------------------------------------------------------------------------------- k8s


def _parse_pvc(text: str) -> tuple[str, str]:
    claim, sep, mount = text.partition(":")
    if not sep or not mount.startswith("/"):
        raise LaunchError(f"--pvc {text!r}: expected CLAIM:/mount/path, e.g. runs-pvc:/runs")
    return _check_dns_label(claim, "--pvc claim"), mount


def render_k8s(
    cfg: Config,
    workdir: str,
    *,
    name: str,
    namespace: str,
    nodes: int,
    gpus_per_node: int,
    image: str,
    port: int = K8S_PORT,
    pvc: str | None = None,
    api: str = "job",
) -> str:
    """The manifest as one YAML stream: api "jobset", a ConfigMap (the resolved config) + a
    JobSet whose failure policy restarts the whole group of processes; "job", a ConfigMap +
    headless Service + Indexed Job, which recreates a failed pod alone (enough for one pod)."""
    if api not in K8S_APIS:
        raise LaunchError(f"--api {api!r}: expected one of {sorted(K8S_APIS)}")
    # Pod hostnames (<name>-<index>; JobSet: <name>-workers-0-<index>) are DNS labels of at most 63.
    _check_dns_label(name, "--job-name", max_len=40 if api == "jobset" else 50)
    _check_dns_label(namespace, "--namespace")
    config_text = yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False)
    mounts = [
        {"name": "config", "mountPath": K8S_CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]  # NCCL needs more than the default 64 MB
    volumes = [
        {"name": "config", "configMap": {"name": f"{name}-config"}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    if pvc:
        claim, mount = _parse_pvc(pvc)
        mounts.append({"name": "runs", "mountPath": mount})
        volumes.append({"name": "runs", "persistentVolumeClaim": {"claimName": claim}})
    # Overrides are already part of the resolved config in the ConfigMap.
    command = ["wm", *train_argv(f"{K8S_CONFIG_DIR}/config.yaml", workdir, [])]
    # JSON scalars and lists are valid YAML flow values: quoting is JSON's.
    return render(
        K8S_APIS[api],
        name=name,
        namespace=namespace,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        image=json.dumps(image),
        port=port,
        grace_s=K8S_GRACE_S,
        backoff_limit=K8S_BACKOFF_LIMIT,
        max_restarts=K8S_MAX_RESTARTS,
        command=json.dumps(command),
        volume_mounts=json.dumps(mounts),
        volumes=json.dumps(volumes),
        config_yaml="\n".join("    " + line for line in config_text.splitlines()),
    )


def cmd_k8s(args: argparse.Namespace) -> int:
    _, cfg = load_config(args.config, args.set)
    if not args.image and not args.dry_run:
        raise LaunchError("--image is required: the container image with wm_jax installed")
    manifest = render_k8s(
        cfg,
        args.workdir,
        name=args.job_name or default_job_name(args.workdir),
        namespace=args.namespace,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        image=args.image or K8S_PLACEHOLDER_IMAGE,
        port=args.port,
        pvc=args.pvc,
        api=args.api,
    )
    if args.dry_run:
        if not args.image:
            print(
                f"# dry run without --image: the manifest names the placeholder {K8S_PLACEHOLDER_IMAGE}",
                file=sys.stderr,
            )
        print(manifest, end="")
        return 0
    kubectl = require_tool("kubectl", "install it and point it at the cluster")
    return subprocess.run([kubectl, "apply", "-f", "-"], input=manifest, text=True).returncode


# ----------------------------------------------------------------------------- tpu-vm


def remote_config(path: Path) -> str:
    """How the workers name the config: a shipped preset by name (their installed package
    has it), another file relative to the repository when inside it (they cd there), else
    as given."""
    name = preset_name(path)
    if name is not None:
        return name
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def tpu_vm_argv(
    config: str, workdir: str, overrides: list[str], *, tpu_name: str, zone: str, project: str | None, repo: str
) -> list[str]:
    """`gcloud ... ssh --worker=all --command "cd REPO && WM_DISTRIBUTED=auto wm train ..."`."""
    for flag, value in (("--tpu-name", tpu_name), ("--zone", zone)):
        if not value:
            raise LaunchError(f"{flag} is required")
    remote = render(
        "tpu_vm.sh", repo=shlex.quote(repo), train_command=shlex.join(["wm", *train_argv(config, workdir, overrides)])
    )
    argv = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu_name, "--zone", zone]
    if project:
        argv += ["--project", project]
    return argv + ["--worker=all", "--command", remote.strip()]


def cmd_tpu_vm(args: argparse.Namespace) -> int:
    path, _ = load_config(args.config, args.set)
    argv = tpu_vm_argv(
        remote_config(path),
        args.workdir,
        args.set,
        tpu_name=args.tpu_name,
        zone=args.zone,
        project=args.project,
        repo=args.repo_dir,
    )
    if args.dry_run:
        print(shlex.join(argv))
        return 0
    argv[0] = require_tool("gcloud", "install the Google Cloud SDK")
    return subprocess.run(argv).returncode


# ------------------------------------------------------------------------------- argparse


def _common(parser: argparse.ArgumentParser, workdir_help: str) -> None:
    parser.add_argument("--config", required=True, help="YAML file or preset name (wm_jax/presets)")
    parser.add_argument("--workdir", required=True, help=workdir_help)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--dry-run", action="store_true", help="print what would be run or submitted, and exit 0")


SHARED_WORKDIR = (
    "run directory, passed to every process as is: it must be on a filesystem all "
    "nodes share (checkpoints written there are what a restarted job resumes from)"
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers `wm launch {local,slurm,k8s,tpu-vm}` on the `wm` parser's subcommands."""
    launch = subparsers.add_parser("launch", help="start `wm train` on this machine or a cluster")
    kinds = launch.add_subparsers(dest="launcher", required=True)

    local = kinds.add_parser("local", help="N processes on this machine, each with fake CPU devices")
    _common(local, "run directory")
    local.add_argument("--processes", type=positive_int, default=2)
    local.add_argument("--devices-per-process", type=positive_int, default=4, help="fake CPU devices per process")
    local.add_argument("--port", type=_port, help="coordinator port (default: a free one)")
    local.set_defaults(fn=cmd_local)

    slurm = kinds.add_parser("slurm", help="render an sbatch script (requeues on preemption) and submit it")
    _common(slurm, SHARED_WORKDIR)
    slurm.add_argument("--nodes", type=positive_int, default=1)
    slurm.add_argument("--gpus-per-node", type=non_negative_int, default=8)
    slurm.add_argument("--partition")
    slurm.add_argument("--time", default="24:00:00", help="time limit, [days-]hours:minutes:seconds")
    slurm.add_argument("--job-name", help="default: wm-<workdir name>")
    slurm.add_argument("--account")
    slurm.set_defaults(fn=cmd_slurm)

    k8s = kinds.add_parser("k8s", help="render a JobSet (or an Indexed Job) and `kubectl apply` it")
    _common(k8s, SHARED_WORKDIR + "; mount one with --pvc")
    k8s.add_argument("--nodes", type=positive_int, default=1, help="pods, one process each")
    k8s.add_argument("--gpus-per-node", type=non_negative_int, default=8)
    k8s.add_argument("--image", help="container image with wm_jax installed (required unless --dry-run)")
    k8s.add_argument("--namespace", default="default")
    k8s.add_argument("--job-name", help="default: wm-<workdir name>")
    k8s.add_argument("--port", type=_port, default=K8S_PORT, help="coordinator port")
    k8s.add_argument("--pvc", metavar="CLAIM:/PATH", help="mount this PersistentVolumeClaim (for workdir and data)")
    k8s.add_argument(
        "--api",
        choices=sorted(K8S_APIS),
        default="jobset",
        help="jobset (default; needs the JobSet controller): a failed or preempted process restarts "
        "the whole group; job: a headless Service + Indexed Job, which recreates one pod alone",
    )
    k8s.set_defaults(fn=cmd_k8s)

    tpu = kinds.add_parser("tpu-vm", help="run `wm train` on every worker of a TPU VM pod over gcloud ssh")
    _common(tpu, SHARED_WORKDIR)
    tpu.add_argument("--tpu-name", required=True)
    tpu.add_argument("--zone", required=True)
    tpu.add_argument("--project")
    tpu.add_argument("--repo-dir", default=str(REPO_ROOT), help="checkout of this repository on the workers")
    tpu.set_defaults(fn=cmd_tpu_vm)
