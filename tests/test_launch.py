"""`wm launch`: what each launcher renders (dry run), the local runner, and a real
2-process × 4-device run matching 1 process × 8 devices."""

import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from conftest import PRESET, REPO
from multiproc import cpu_env
from wm_jax import config as config_lib
from wm_jax.ops import launch
from wm_jax.cli import main
from wm_jax.telemetry import read_metrics


def _wm(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _env_and_argv(line: str) -> tuple[dict, list[str]]:
    words = shlex.split(line)
    env = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-") and w.split("=")[0].isupper())
    return env, words[len(env) :]


def test_local_dry_run_lists_one_command_per_process(tmp_path, capsys):
    code, out, _ = _wm(
        capsys,
        "launch",
        "local",
        "--config",
        "tiny_cpu",
        "--workdir",
        tmp_path / "run",
        "--processes",
        3,
        "--devices-per-process",
        2,
        "--port",
        4567,
        "--set",
        "train.steps=5",
        "--dry-run",
    )
    assert code == 0
    commands = [_env_and_argv(line) for line in out.strip().splitlines()]
    assert len(commands) == 3
    assert sorted(env["WM_PROCESS_ID"] for env, _ in commands) == ["0", "1", "2"]
    for env, argv in commands:
        assert env["WM_COORDINATOR"] == "localhost:4567" and env["WM_NUM_PROCESSES"] == "3"
        assert env["JAX_PLATFORMS"] == "cpu"
        assert "--xla_force_host_platform_device_count=2" in env["XLA_FLAGS"].split()
        assert argv[1:4] == ["-m", "wm_jax.cli", "train"]
        assert argv[argv.index("--workdir") + 1] == str(tmp_path / "run")
        assert argv[argv.index("--set") + 1] == "train.steps=5"
    assert not (tmp_path / "run").exists()


def _sbatch_directives(script: str) -> dict[str, str]:
    directives = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH ") :].partition("=")
            directives[key] = value
    return directives


def _slurm_script(capsys, tmp_path, *extra):
    code, out, err = _wm(
        capsys,
        "launch",
        "slurm",
        "--config",
        "tiny_cpu",
        "--workdir",
        tmp_path / "run",
        "--nodes",
        2,
        "--gpus-per-node",
        4,
        "--partition",
        "gpu",
        "--set",
        "train.steps=9",
        "--dry-run",
        *extra,
    )
    assert code == 0, err
    return out, err


def test_slurm_dry_run_script(tmp_path, capsys):
    script, err = _slurm_script(capsys, tmp_path)
    run = tmp_path / "run"
    directives = _sbatch_directives(script)
    assert directives == {
        "--job-name": "wm-run",
        "--nodes": "2",
        "--ntasks-per-node": "1",
        "--gpus-per-node": "4",
        "--time": "24:00:00",
        "--chdir": os.getcwd(),
        "--output": f"{run}/slurm-%j.out",
        "--open-mode": "append",
        "--requeue": "",
        "--signal": "B:USR1@120",
        "--partition": "gpu",
    }
    lines = script.splitlines()
    # Directives count only before the first command.
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    assert max(i for i, line in enumerate(lines) if line.startswith("#SBATCH")) < first_command
    assert any(line.startswith("trap ") and line.endswith(" USR1") and "kill -USR1" in line for line in lines)
    srun = next(line for line in lines if line.startswith("srun "))
    assert f"-m wm_jax.cli train --config {PRESET} --workdir {run} --set train.steps=9" in srun
    assert 'if [ "$code" -eq 42 ]; then' in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert f"would write {run}/launch/slurm.sbatch" in err and not run.exists()


def test_slurm_script_forwards_usr1_and_requeues_on_42(tmp_path, capsys):
    """Runs the rendered batch script under bash with stand-ins for srun and scontrol:
    USR1 to the batch shell reaches the step, which exits 42, and the job is requeued."""
    script, _ = _slurm_script(capsys, tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        f"#!/bin/bash\ntrap 'exit 42' USR1\ntouch {tmp_path}/started\nwhile :; do sleep 0.05; done\n"
    )
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" > {tmp_path}/scontrol_args\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    (tmp_path / "job.sh").write_text(script)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="1234")
    batch = subprocess.Popen(["bash", str(tmp_path / "job.sh")], env=env, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 20
        while not (tmp_path / "started").exists() and time.time() < deadline:
            time.sleep(0.05)
        batch.send_signal(signal.SIGUSR1)
        out, _ = batch.communicate(timeout=20)
    finally:
        batch.kill()
    assert batch.returncode == 42, out
    assert (tmp_path / "scontrol_args").read_text().split() == ["requeue", "1234"]
    assert "forwarding" in out and "requeueing job 1234" in out


def test_slurm_rejects_bad_time_and_missing_sbatch(tmp_path, capsys, monkeypatch):
    code, _, err = _wm(
        capsys,
        "launch",
        "slurm",
        "--config",
        "tiny_cpu",
        "--workdir",
        tmp_path / "run",
        "--time",
        "one day",
        "--dry-run",
    )
    assert code == 2 and "--time 'one day'" in err
    monkeypatch.setenv("PATH", str(tmp_path))
    code, _, err = _wm(capsys, "launch", "slurm", "--config", "tiny_cpu", "--workdir", tmp_path / "run")
    assert code == 2 and "`sbatch` is not on PATH" in err
    assert not (tmp_path / "run").exists()  # nothing written when nothing can be submitted


def test_k8s_dry_run_manifest(tmp_path, capsys):
    code, out, err = _wm(
        capsys,
        "launch",
        "k8s",
        "--config",
        "tiny_cpu",
        "--workdir",
        "/runs/exp1",
        "--nodes",
        3,
        "--gpus-per-node",
        8,
        "--namespace",
        "research",
        "--pvc",
        "runs-pvc:/runs",
        "--set",
        "train.steps=7",
        "--api",
        "job",
        "--dry-run",
    )
    assert code == 0, err
    assert "placeholder" in err  # no --image: said so
    config_map, service, job = yaml.safe_load_all(out)
    assert [d["kind"] for d in (config_map, service, job)] == ["ConfigMap", "Service", "Job"]
    assert {d["metadata"]["namespace"] for d in (config_map, service, job)} == {"research"}
    name = job["metadata"]["name"]
    assert name == "wm-exp1" and service["metadata"]["name"] == name
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"] == {"job-name": name}

    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 3
    rules = spec["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onExitCodes": {"containerName": "train", "operator": "In", "values": [42]}} in rules
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]} in rules
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["subdomain"] == name
    assert pod["terminationGracePeriodSeconds"] >= 120
    (container,) = pod["containers"]
    assert container["name"] == "train" and container["image"] == launch.K8S_PLACEHOLDER_IMAGE
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["WM_COORDINATOR"] == f"{name}-0.{name}:{launch.K8S_PORT}"
    assert env["WM_NUM_PROCESSES"] == "3"
    assert env["WM_PROCESS_ID"] == {
        "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
    }
    command = container["command"]
    assert command[:2] == ["wm", "train"] and command[command.index("--workdir") + 1] == "/runs/exp1"
    config_path = command[command.index("--config") + 1]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/runs"]]["persistentVolumeClaim"] == {"claimName": "runs-pvc"}
    assert volumes[mounts[os.path.dirname(config_path)]]["configMap"]["name"] == config_map["metadata"]["name"]
    # The ConfigMap holds the resolved config, overrides included, loadable as is.
    config_file = tmp_path / "config.yaml"
    config_file.write_text(config_map["data"][os.path.basename(config_path)])
    assert config_lib.load(config_file) == config_lib.load(PRESET, ["train.steps=7"])


def test_k8s_default_is_a_jobset_that_restarts_the_group(tmp_path, capsys):
    """Issue 20: one failed or preempted process must restart every process together."""
    code, out, err = _wm(
        capsys,
        "launch",
        "k8s",
        "--config",
        "tiny_cpu",
        "--workdir",
        "/runs/exp1",
        "--nodes",
        4,
        "--gpus-per-node",
        8,
        "--pvc",
        "runs-pvc:/runs",
        "--set",
        "train.steps=7",
        "--dry-run",
    )
    assert code == 0, err
    config_map, jobset = yaml.safe_load_all(out)
    assert (config_map["kind"], jobset["kind"], jobset["apiVersion"]) == (
        "ConfigMap",
        "JobSet",
        "jobset.x-k8s.io/v1alpha2",
    )
    name, spec = jobset["metadata"]["name"], jobset["spec"]
    assert spec["network"]["enableDNSHostnames"] is True
    policy = spec["failurePolicy"]
    assert policy["maxRestarts"] == launch.K8S_MAX_RESTARTS
    # Preemption (exit 42) and disruptions fail the Job through its pod failure policy; the
    # JobSet restarts the group for them without spending a restart.
    assert policy["rules"] == [
        {"action": "RestartJobSetAndIgnoreMaxRestarts", "onJobFailureReasons": ["PodFailurePolicy"]}
    ]
    (workers,) = spec["replicatedJobs"]
    job = workers["template"]["spec"]
    assert job["backoffLimit"] == 0  # any failed pod fails the Job, so the group restarts
    assert job["completionMode"] == "Indexed" and job["completions"] == job["parallelism"] == 4
    rules = job["podFailurePolicy"]["rules"]
    assert {"action": "FailJob", "onExitCodes": {"containerName": "train", "operator": "In", "values": [42]}} in rules
    assert {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget"}]} in rules
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["terminationGracePeriodSeconds"] >= 120
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["WM_COORDINATOR"] == f"{name}-workers-0-0.{name}:{launch.K8S_PORT}" and env["WM_NUM_PROCESSES"] == "4"
    config_path = container["command"][container["command"].index("--config") + 1]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/runs"]]["persistentVolumeClaim"] == {"claimName": "runs-pvc"}
    assert volumes[mounts[os.path.dirname(config_path)]]["configMap"]["name"] == config_map["metadata"]["name"]
    # A name whose pod hostnames would pass 63 characters is refused by name.
    code, _, err = _wm(
        capsys, "launch", "k8s", "--config", "tiny_cpu", "--workdir", "/runs/x", "--job-name", "a" * 41, "--dry-run"
    )
    assert code == 2 and "--job-name" in err


def test_k8s_requires_image_and_valid_names(tmp_path, capsys):
    code, _, err = _wm(capsys, "launch", "k8s", "--config", "tiny_cpu", "--workdir", "/runs/x")
    assert code == 2 and "--image is required" in err
    code, _, err = _wm(
        capsys, "launch", "k8s", "--config", "tiny_cpu", "--workdir", "/runs/x", "--job-name", "My_Job", "--dry-run"
    )
    assert code == 2 and "--job-name 'My_Job'" in err


def test_tpu_vm_dry_run_command(tmp_path, capsys):
    code, out, err = _wm(
        capsys,
        "launch",
        "tpu-vm",
        "--config",
        "tiny_cpu",
        "--workdir",
        "/mnt/runs/x",
        "--tpu-name",
        "pod1",
        "--zone",
        "us-central2-b",
        "--project",
        "proj",
        "--set",
        "train.steps=5",
        "--dry-run",
    )
    assert code == 0, err
    argv = shlex.split(out.strip())
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1"]
    assert "--worker=all" in argv
    assert argv[argv.index("--zone") + 1] == "us-central2-b" and argv[argv.index("--project") + 1] == "proj"
    remote = argv[argv.index("--command") + 1]
    assert remote == (
        f"cd {REPO} && WM_DISTRIBUTED=auto wm train --config tiny_cpu --workdir /mnt/runs/x --set train.steps=5"
    )


@pytest.mark.parametrize(
    "launcher, flags",
    [("local", []), ("slurm", []), ("k8s", ["--image", "img"]), ("tpu-vm", ["--tpu-name", "t", "--zone", "z"])],
)
def test_bad_config_key_exits_2_before_anything_starts(tmp_path, capsys, launcher, flags):
    code, out, err = _wm(
        capsys,
        "launch",
        launcher,
        "--config",
        "tiny_cpu",
        "--workdir",
        tmp_path / "run",
        "--set",
        "train.stpes=5",
        *flags,
    )
    assert code == 2 and out == ""
    assert "unknown config key 'train.stpes' (did you mean 'train.steps'?)" in err
    code, _, err = _wm(
        capsys, "launch", launcher, "--config", tmp_path / "missing.yaml", "--workdir", tmp_path / "run", *flags
    )
    assert code == 2 and "missing.yaml" in err


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_run_local_prefixes_output_and_returns_42():
    """All processes exit 42 (a preemption): the launcher returns 42 for a requeueing wrapper."""
    code = "import os, sys; print('hello from', os.environ['WM_PROCESS_ID']); sys.exit(42)"
    out = io.StringIO()
    commands = [({"WM_PROCESS_ID": str(i)}, _python(code)) for i in range(2)]
    assert launch.run_local(commands, out=out) == 42
    assert sorted(out.getvalue().splitlines()) == ["[p0] hello from 0", "[p1] hello from 1"]


def test_one_failing_process_stops_the_others():
    commands = [({}, _python("import time; time.sleep(60)")), ({}, _python("import sys; sys.exit(3)"))]
    procs = [subprocess.Popen(argv) for _, argv in commands]
    t = time.monotonic()
    try:
        assert launch.wait_all(procs, grace_s=0.5) == 3
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode == -signal.SIGTERM and time.monotonic() - t < 20


_CTRL_C_SCRIPT = """
import sys
from wm_jax.ops import launch
child = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(42)); "
         "print('ready', flush=True); time.sleep(60)")
sys.exit(launch.run_local([({}, [sys.executable, "-c", child])] * 2))
"""


def test_ctrl_c_asks_the_processes_for_a_clean_stop():
    """SIGINT to the launcher reaches the processes as SIGTERM (save, exit 42), not as a
    KeyboardInterrupt, and the launcher returns their 42."""
    launcher = subprocess.Popen(_python(_CTRL_C_SCRIPT), cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        ready = [launcher.stdout.readline() for _ in range(2)]
        assert sorted(ready) == ["[p0] ready\n", "[p1] ready\n"]
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(timeout=30) == 42
    finally:
        launcher.kill()


# A run whose checkpoint and steps are cheap: saves only at the end.
_RUN = ["train.steps=5", "train.log_every_steps=1", "mesh.data=-1", "checkpoint.every_steps=100"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_launch_local_2x4_matches_1x8(tmp_path, tiny_overrides):
    """`wm launch local` with 2 processes × 4 CPU devices trains the same losses as one
    process with 8 devices. Each process loads a different half of the global batch
    (grain interleaves the sampler's order across processes), so the batch holds the same
    clips in another order and the mean loss agrees up to float reassociation."""
    sets = sum((["--set", o] for o in tiny_overrides + _RUN), [])
    env = {k: v for k, v in os.environ.items() if not k.startswith("WM_")}

    def launch(name: str, extra: list[str]) -> None:
        launched = subprocess.run(
            [
                sys.executable,
                "-m",
                "wm_jax.cli",
                "launch",
                "local",
                "--processes",
                "2",
                "--devices-per-process",
                "4",
                "--config",
                str(PRESET),
                "--workdir",
                str(tmp_path / name),
                *sets,
                *extra,
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
        lines = launched.stdout.splitlines()
        assert any(line.startswith("[p0] ") for line in lines) and any(line.startswith("[p1] ") for line in lines)

    launch("launched", [])
    # Multi-slice: each process is a slice (DCN data axis 2), fsdp 2 inside each slice.
    launch("multislice", ["--set", "mesh.dcn_data=2", "--set", "mesh.fsdp=2"])

    single = subprocess.run(
        [
            sys.executable,
            "-m",
            "wm_jax.cli",
            "train",
            "--config",
            str(PRESET),
            "--workdir",
            str(tmp_path / "single"),
            *sets,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=cpu_env(8, base=env),
    )
    assert single.returncode == 0, single.stderr[-3000:]

    rows = {name: read_metrics(tmp_path / name / "metrics.jsonl") for name in ("launched", "multislice", "single")}
    # Only process 0 writes metrics: one row per step, not two.
    assert [r["step"] for r in rows["launched"]] == [r["step"] for r in rows["single"]] == [1, 2, 3, 4, 5]
    losses = {name: [r["loss"] for r in rs] for name, rs in rows.items()}
    # Measured: relative differences ~1e-7 (the order of an 8-term float sum).
    np.testing.assert_allclose(losses["launched"], losses["single"], rtol=1e-5)
    # Another layout (4 x 2 over two slices) reassociates more sums: ~1e-5 as in test_sharding.
    np.testing.assert_allclose(losses["multislice"], losses["single"], rtol=1e-4)
    manifest = json.loads((tmp_path / "multislice" / "manifest.json").read_text())
    assert manifest["mesh"] == {"data": 2 * 2, "fsdp": 2, "tensor": 1, "sequence": 1}
    summary = json.loads((tmp_path / "launched" / "train_summary.json").read_text())
    assert summary["step"] == 5
