"""Running a sweep's runs on this machine: one at a time in this process, or as
`wm sweep run-one` subprocesses; a failed run leaves `error.txt` and the others go on.

Imports training and evaluation (JAX): the CLI imports this module only to run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

from data_pipelines.writer import DatasetError
from wm_jax.checkpoint import CheckpointError
from wm_jax.config import ConfigError
from wm_jax.eval.evaluate import evaluate
from wm_jax.ops.sweep.spec import Plan, Run, eval_done, finished, run_one_argv, train_done, write_record
from wm_jax.train.loop import EXIT_PREEMPTED, Preempted, train

ERROR_TAIL_LINES = 30  # of a failed run's output, in its error.txt


def _write_error(run: Run, code: int, lines: list[str]) -> None:
    """`<run>/error.txt`: the exit code and the last lines of the run's output."""
    workdir = Path(run.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tail = "".join(line if line.endswith("\n") else line + "\n" for line in lines[-ERROR_TAIL_LINES:])
    (workdir / "error.txt").write_text(f"run {run.name} failed with exit code {code}\n\n{tail}")


def _exit_code_of(exc: Exception) -> int:
    """The exit code `wm train` would give for this exception (DESIGN.md §6)."""
    if isinstance(exc, Preempted):
        return EXIT_PREEMPTED
    if isinstance(exc, FloatingPointError):
        return 3
    if isinstance(exc, (ConfigError, DatasetError, CheckpointError)):
        return 2
    return 1


def execute(run: Run, with_eval: bool) -> int:
    """Trains (resuming) and evaluates one run in this process; 0, or the failure's exit code
    with `error.txt` written. A finished part is not redone."""
    error = Path(run.workdir) / "error.txt"
    try:
        if not train_done(run):
            train(run.config, run.workdir)
        if with_eval and not eval_done(run):
            evaluate(run.workdir)
    except Exception as e:  # noqa: BLE001 - one failed run must not stop the others
        code = _exit_code_of(e)
        lines = traceback.format_exception(e)
        print("".join(lines), file=sys.stderr)
        _write_error(run, code, "".join(lines).splitlines())
        return code
    error.unlink(missing_ok=True)
    return 0


def _tail(path: Path, n: int = ERROR_TAIL_LINES) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def run_parallel(p: Plan, todo: list[Run], parallel: int, extra_set: list[str]) -> dict[str, int]:
    """Runs `todo` as `wm sweep run-one` subprocesses, `parallel` at a time; output goes
    to each run's `sweep.log`. Returns run name -> exit code."""
    codes: dict[str, int] = {}
    pending, running = list(todo), []
    try:
        while pending or running:
            while pending and len(running) < parallel:
                run = pending.pop(0)
                Path(run.workdir).mkdir(parents=True, exist_ok=True)
                log = open(Path(run.workdir) / "sweep.log", "w")
                argv = run_one_argv(str(Path(p.spec_path).resolve()), run.index, extra_set)
                proc = subprocess.Popen(
                    argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
                )
                running.append((run, proc, log))
                print(f"sweep: started {run.name} (pid {proc.pid})", file=sys.stderr)
            for item in [x for x in running if x[1].poll() is not None]:
                run, proc, log = item
                log.close()
                running.remove(item)
                codes[run.name] = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
                if codes[run.name]:
                    _write_error(run, codes[run.name], _tail(Path(run.workdir) / "sweep.log"))
                print(f"sweep: {run.name} exited {codes[run.name]}", file=sys.stderr)
            time.sleep(0.2)
    finally:
        for _, proc, log in running:  # only on an interrupt or an error here
            proc.terminate()
            proc.wait()
            log.close()
    return codes


def run_local(p: Plan, parallel: int = 1, extra_set: list[str] = ()) -> dict[str, str]:
    """Runs every unfinished run (one at a time in this process, or `parallel` subprocesses);
    returns run name -> 'skipped' | 'ran' | 'failed (exit N)'."""
    with_eval = bool(p.spec.get("eval", False))
    write_record(p)
    status = {r.name: "skipped" for r in p.runs if finished(r, with_eval)}
    todo = [r for r in p.runs if r.name not in status]
    if parallel > 1:
        codes = run_parallel(p, todo, parallel, list(extra_set))
    else:
        codes = {}
        for run in todo:
            print(f"sweep: run {run.index + 1}/{len(p.runs)} {run.name}", file=sys.stderr)
            codes[run.name] = execute(run, with_eval)
            if codes[run.name] == EXIT_PREEMPTED:  # this machine is going away: start no other run
                break
    for name, code in codes.items():
        status[name] = "ran" if code == 0 else f"failed (exit {code})"
    return {r.name: status.get(r.name, "not started") for r in p.runs}
