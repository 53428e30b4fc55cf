"""The `wm` parser: every command group registers its commands, parsing imports no JAX,
and `python -m wm_jax.cli` is the same program as the `wm` script."""

from __future__ import annotations

import subprocess
import sys

import pytest

from wm_jax import cli

COMMANDS = [
    "data",
    "train",
    "eval",
    "export",
    "bench",
    "generate",
    "verify",
    "serve",
    "play",
    "demo",
    "launch",
    "sweep",
]


def test_every_command_has_a_handler():
    assert "{" + ",".join(COMMANDS) + "}" in cli.build_parser().format_usage()
    assert callable(cli.build_parser().parse_args(["eval", "--workdir", "x"]).fn)


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "nope"])
    assert e.value.code == cli.EXIT_USAGE
    assert cli.main(["eval"]) == cli.EXIT_USAGE
    assert "wm eval needs --workdir" in capsys.readouterr().err


def test_module_entry_point_parses_without_jax():
    code = "import sys; from wm_jax import cli; cli.build_parser(); print('jax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
    shown = subprocess.run([sys.executable, "-m", "wm_jax.cli", "--help"], capture_output=True, text=True, check=True)
    assert all(c in shown.stdout for c in COMMANDS)


def test_launch_dry_run_loads_no_checkpointing(tmp_path):
    # `main` catches the checkpoint errors without importing orbax up front. (It still imports
    # JAX: config validation asks the stage registry, which imports the models.)
    argv = ["launch", "slurm", "--config", "tiny_cpu", "--workdir", str(tmp_path / "run"), "--dry-run"]
    code = f"import sys; from wm_jax.cli import main; assert main({argv!r}) == 0; print('orbax' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == "False"
