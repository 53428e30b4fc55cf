"""`wm` re-executes itself with glibc's huge-page tunable (wm_jax/huge_pages.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from wm_jax import huge_pages

GLIBC = (2, 36)


@pytest.mark.parametrize(
    ("environ", "libc", "mode", "want"),
    [
        ({}, GLIBC, "madvise", "glibc.malloc.hugetlb=1"),
        ({}, GLIBC, "always", "glibc.malloc.hugetlb=1"),
        (
            {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
            GLIBC,
            "madvise",
            "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
        ),
        # The user's own choice, on or off, is kept; so is a process already re-executed.
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, "madvise", None),
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}, GLIBC, "madvise", None),
        # Nothing to gain: a kernel without THP, an unknown mode, glibc < 2.35, no glibc.
        ({}, GLIBC, "never", None),
        ({}, GLIBC, None, None),
        ({}, (2, 31), "madvise", None),
        ({}, None, "madvise", None),
    ],
)
def test_tunables_are_added_only_where_they_help_and_the_user_has_not_chosen(environ, libc, mode, want):
    assert huge_pages.tunables_with_huge_pages(environ, libc, mode) == want


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert huge_pages.thp_mode(f) == "madvise"
    f.write_text("garbage\n")
    assert huge_pages.thp_mode(f) is None
    assert huge_pages.thp_mode(tmp_path / "missing") is None


def anon_huge_kib_script() -> str:
    """A program that re-executes (as `wm` does), then allocates and touches 64 MiB with
    glibc's malloc and prints its GLIBC_TUNABLES, pid and AnonHugePages (KiB)."""
    return (
        "import ctypes, os, sys\n"
        "from wm_jax import huge_pages\n"
        "pid = os.getpid()\n"
        "huge_pages.reexec()\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.malloc.restype = ctypes.c_void_p\n"
        "n = 64 << 20\n"
        "p = libc.malloc(n)\n"
        "ctypes.memset(p, 1, n)\n"
        "rollup = open('/proc/self/smaps_rollup').read().splitlines()\n"
        "huge = [int(line.split()[1]) for line in rollup if line.startswith('AnonHugePages:')][0]\n"
        "print(os.environ.get('GLIBC_TUNABLES'), pid == os.getpid(), huge)\n"
    )


@pytest.mark.skipif(
    huge_pages.tunables_with_huge_pages({}, huge_pages.glibc_version(), huge_pages.thp_mode()) is None
    or not os.path.exists("/proc/self/smaps_rollup"),
    reason="needs glibc >= 2.35 and transparent huge pages (always or madvise)",
)
def test_reexec_keeps_the_process_and_its_arguments_and_malloc_gets_huge_pages():
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}

    def run(extra_env: dict[str, str]) -> list[str]:
        out = subprocess.run(
            [sys.executable, "-c", anon_huge_kib_script()],
            env={**env, **extra_env},
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.split()

    tunables, same_pid, huge_kib = run({})
    assert tunables == "glibc.malloc.hugetlb=1" and same_pid == "True"
    assert int(huge_kib) >= 32 << 10  # most of the 64 MiB sits in 2 MiB pages
    # Opted out: no re-execution; where THP is opt-in (madvise), 4 KiB pages only.
    tunables, same_pid, huge_kib = run({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert tunables == "glibc.malloc.hugetlb=0" and same_pid == "True"
    if huge_pages.thp_mode() == "madvise":
        assert int(huge_kib) < 2 << 10


def test_wm_runs_through_the_reexecution():
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [sys.executable, "-m", "wm_jax.cli", "launch", "--help"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0 and "slurm" in out.stdout


def test_bench_rows_say_whether_huge_pages_were_asked_for(monkeypatch):
    from wm_jax.bench.results import machine

    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
    assert huge_pages.requested(os.environ) and machine("cpu").endswith("(%d cores, cpu, huge pages)" % os.cpu_count())
    for off in ("glibc.malloc.hugetlb=0", "glibc.malloc.arena_max=2", ""):
        monkeypatch.setenv("GLIBC_TUNABLES", off)
        assert not huge_pages.requested(os.environ) and machine("cpu").endswith("cores, cpu)")


def test_a_process_that_cannot_reexecute_runs_on_unchanged(monkeypatch):
    def refuse(path, argv):
        raise PermissionError("exec forbidden here")

    monkeypatch.setattr(huge_pages, "tunables_with_huge_pages", lambda *args: "glibc.malloc.hugetlb=1")
    monkeypatch.setattr(huge_pages.os, "execv", refuse)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    huge_pages.reexec()
    assert "GLIBC_TUNABLES" not in os.environ
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    huge_pages.reexec()
    assert os.environ["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"
