"""Multi-process start-up and barriers: the decision table, then real JAX processes."""

import json
import subprocess

import pytest

from multiproc import cpu_env, finish, free_port, start
from wm_jax import distributed
from wm_jax.config import ConfigError

WM_ENV = {"WM_COORDINATOR": "node0:1234", "WM_NUM_PROCESSES": "4", "WM_PROCESS_ID": "3"}


def test_plan_reads_wm_env_vars():
    assert distributed.plan(environ=WM_ENV) == {
        "mode": "env",
        "coordinator": "node0:1234",
        "process_count": 4,
        "process_index": 3,
    }


def test_plan_flags_win_over_env_vars():
    decided = distributed.plan("host:99", 2, 1, environ=WM_ENV)
    assert decided == {"mode": "flags", "coordinator": "host:99", "process_count": 2, "process_index": 1}
    # A flag left out falls back to its variable.
    assert distributed.plan(None, None, 0, environ=WM_ENV)["process_index"] == 0


def test_plan_single_process_without_settings():
    assert distributed.plan(environ={}) == {"mode": "single", "process_count": 1, "process_index": 0}


@pytest.mark.parametrize(
    "environ, mode",
    [
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, "slurm"),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "1"}, "single"),  # one-task step
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, "single"),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, "openmpi"),
        ({"OMPI_COMM_WORLD_SIZE": "1"}, "single"),
        ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, "tpu-pod"),
        ({"TPU_WORKER_HOSTNAMES": "w0"}, "single"),
        ({"WM_DISTRIBUTED": "auto"}, "auto"),
        ({"WM_DISTRIBUTED": "off", "SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, "single"),
    ],
)
def test_plan_detects_clusters(environ, mode):
    assert distributed.plan(environ=environ)["mode"] == mode


@pytest.mark.parametrize(
    "args, environ, named",
    [
        ((), {**WM_ENV, "WM_NUM_PROCESSES": "four"}, "WM_NUM_PROCESSES must be an integer"),
        ((), {**WM_ENV, "WM_PROCESS_ID": "4"}, "WM_PROCESS_ID must be in [0, 4)"),
        ((), {**WM_ENV, "WM_NUM_PROCESSES": "0"}, "WM_NUM_PROCESSES must be >= 1"),
        ((), {**WM_ENV, "WM_COORDINATOR": "node0"}, "WM_COORDINATOR must look like host:port"),
        ((), {"WM_NUM_PROCESSES": "2", "WM_PROCESS_ID": "0"}, "no coordinator"),
        ((), {"WM_COORDINATOR": "node0:1234", "WM_PROCESS_ID": "0"}, "set --num-processes or WM_NUM_PROCESSES"),
        (("host:1", 2, 2), {}, "--process-id must be in [0, 2)"),
        (("host:1", None, 0), {}, "--coordinator is set but the process count is not"),
        ((), {"WM_DISTRIBUTED": "yes"}, "WM_DISTRIBUTED must be one of"),
    ],
)
def test_plan_bad_values_name_their_source(args, environ, named):
    with pytest.raises(ConfigError) as e:
        distributed.plan(*args, environ=environ)
    assert named in str(e.value)


def test_single_process_barrier_returns_at_once():
    distributed.barrier("single", timeout_s=0.001)
    with pytest.raises(ValueError, match="barrier name"):
        distributed.barrier("a/b")


def _start(script: str, processes: int) -> list[subprocess.Popen]:
    """`processes` children running `script`, joining one run through WM_* alone."""
    port = free_port()
    return start(
        lambda i: ["-c", script],
        processes,
        env_of=lambda i: cpu_env(
            WM_COORDINATOR=f"localhost:{port}", WM_NUM_PROCESSES=str(processes), WM_PROCESS_ID=str(i)
        ),
    )


def _results(procs: list[subprocess.Popen], timeout: float = 120) -> list[dict]:
    outs = finish(procs, timeout)
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


_INIT_SCRIPT = """
import json, jax
from wm_jax import distributed
info = distributed.initialize()
distributed.barrier("alone", timeout_s=5)
print(json.dumps(dict(info, jax_process_count=jax.process_count(), again=distributed.initialize()["mode"])))
"""


@pytest.mark.multiprocess
def test_initialize_from_env_vars():
    """A fresh process joins through WM_* alone (here a run of one process)."""
    (result,) = _results(_start(_INIT_SCRIPT, 1))
    assert result["mode"] == "env" and result["coordinator"].startswith("localhost:")
    assert (result["process_index"], result["process_count"], result["jax_process_count"]) == (0, 1, 1)
    assert result["again"] == "initialized"  # a second call does not try to join twice


_BARRIER_SCRIPT = """
import json, time
from wm_jax import distributed
info = distributed.initialize()
me = info["process_index"]
distributed.barrier("start", timeout_s=60)
if me == 1:
    time.sleep(1.5)  # process 0 must wait for this one at the second "start"
t = time.monotonic()
distributed.barrier("start", timeout_s=60)
result = {"info": info, "second_start_s": time.monotonic() - t}
if me == 0:  # process 1 never calls this barrier
    t = time.monotonic()
    try:
        distributed.barrier("checkpoint_restored", timeout_s=2)
        result["error"] = None
    except distributed.BarrierTimeout as e:
        result["error"] = str(e)
    result["timeout_s"] = time.monotonic() - t
distributed.barrier("done", timeout_s=60)
print(json.dumps(result))
"""


@pytest.mark.multiprocess
def test_barrier_timeout_names_the_missing_process():
    p0, p1 = _results(_start(_BARRIER_SCRIPT, 2))
    assert [p0["info"]["process_index"], p1["info"]["process_index"]] == [0, 1]
    assert p0["info"]["mode"] == "env" and p0["info"]["process_count"] == 2
    assert p0["second_start_s"] > 1.0  # the repeated name is a new barrier, and it waited
    assert p0["error"] == "barrier 'checkpoint_restored' timed out after 2 s: processes [1] did not arrive"
    assert 1.9 < p0["timeout_s"] < 10
