"""Starting JAX child processes from tests: on N virtual CPU devices, and N processes of one
multi-process run on a free local port."""

import os
import socket
import subprocess
import sys
from collections.abc import Callable

from conftest import REPO


def free_port() -> int:
    """A TCP port free on localhost now (for a coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(devices: int | None = None, base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """`base` (default: this environment) for a JAX child on the CPU with `devices` virtual
    devices (None: XLA's one; its other XLA_FLAGS kept), plus `extra`."""
    env = dict(os.environ if base is None else base, JAX_PLATFORMS="cpu", **extra)
    if devices is not None:
        inherited = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join([*inherited, f"--xla_force_host_platform_device_count={devices}"])
    return env


def run_python(
    args: list[str], devices: int | None = None, timeout: float = 900, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python ARGS` in the repository on `devices` CPU devices (in `env`, default this
    environment), waited for, output captured."""
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=cpu_env(devices, env), capture_output=True, text=True, timeout=timeout
    )


def start(
    args_of: Callable[[int], list[str]],
    processes: int,
    env_of: Callable[[int], dict[str, str]] = lambda i: cpu_env(),
    stdout: int = subprocess.PIPE,
) -> list[subprocess.Popen]:
    """`processes` children `python args_of(i)` with environment `env_of(i)`, started
    together (to join one JAX run)."""
    return [
        subprocess.Popen(
            [sys.executable, *args_of(i)], cwd=REPO, env=env_of(i), stdout=stdout, stderr=subprocess.PIPE, text=True
        )
        for i in range(processes)
    ]


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[str, str]]:
    """Every child's (stdout, stderr) once it exits; all are killed on the way out."""
    try:
        return [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
