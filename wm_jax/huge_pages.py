"""Transparent huge pages for XLA:CPU's buffers, set before the process loads JAX.

XLA:CPU allocates each execution's temporaries afresh (one buffer of ~180 MB for a
tiny_cpu dynamics step); glibc serves an allocation that size with a new mmap, and the
kernel then faults it in 4 KiB at a time, zeroing each page: ~47,000 page faults and about
a third of the CPU time of every step on a 2-core VM. glibc's `glibc.malloc.hugetlb=1`
tunable (glibc >= 2.35) asks for transparent huge pages on those mappings (2 MiB pages,
~512x fewer faults): same arithmetic, bit-identical results, steps 1.3-1.7x faster
(benchmarks/RESULTS.md, "Huge pages"). glibc reads tunables once, at process start, so
`wm` sets the variable and re-executes itself before anything else runs (`reexec`).

A user's own `glibc.malloc.hugetlb` in GLIBC_TUNABLES wins (`=0` turns this off). No
JAX import here: it runs before the command line is parsed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# The glibc release that introduced the tunable (older ones ignore it: no point re-executing).
MIN_GLIBC = (2, 35)


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library this process runs on, None when it is not glibc."""
    try:
        name, _, version = os.confstr("CS_GNU_LIBC_VERSION").partition(" ")
    except (AttributeError, ValueError, OSError):  # not POSIX, or no such name (musl, macOS)
        return None
    if name != "glibc":
        return None
    major, _, minor = version.partition(".")
    return (int(major), int(minor.split(".")[0])) if major.isdigit() and minor[:1].isdigit() else None


def thp_mode(path: Path = THP_MODE_FILE) -> str | None:
    """The kernel's transparent-huge-page mode (`always`, `madvise` or `never`: the bracketed
    word of `path`), None when the file cannot be read."""
    try:
        text = path.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def tunable_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """GLIBC_TUNABLES (`name=value:name=value`) as {name: value}."""
    current = environ.get("GLIBC_TUNABLES", "")
    return dict(item.partition("=")[::2] for item in current.split(":")) if current else {}


def tunables_with_huge_pages(environ: Mapping[str, str], libc: tuple[int, int] | None, mode: str | None) -> str | None:
    """The GLIBC_TUNABLES value to re-execute with, or None to run as is: when glibc is
    older than 2.35 or absent, the kernel's THP mode is `never` or unknown, or the
    environment already says what `glibc.malloc.hugetlb` is."""
    if libc is None or libc < MIN_GLIBC or mode not in ("always", "madvise"):
        return None
    if TUNABLE in tunable_settings(environ):
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    return f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"


def tunables_for_this_process() -> str | None:
    """`tunables_with_huge_pages` for this process's environment, C library and kernel."""
    return tunables_with_huge_pages(os.environ, glibc_version(), thp_mode())


def requested(environ: Mapping[str, str]) -> bool:
    """Whether GLIBC_TUNABLES asks glibc for huge pages (`glibc.malloc.hugetlb` 1 or 2):
    what a benchmark row records beside its figures."""
    return tunable_settings(environ).get(TUNABLE) in ("1", "2")


def reexec() -> None:
    """Re-execute this process (same interpreter, options and arguments as
    `sys.orig_argv`, same pid) with huge pages on, where `tunables_with_huge_pages` says so; else return.
    Call it first thing in a program's entry point, never from a library function."""
    value = tunables_for_this_process()
    if value is None or not sys.executable or not getattr(sys, "orig_argv", None):
        return
    before = os.environ.get("GLIBC_TUNABLES")
    os.environ["GLIBC_TUNABLES"] = value
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        # argv[0] is the interpreter's full path: a bare "python" there could resolve to
        # another interpreter than this venv's.
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    except OSError:  # cannot re-execute (e.g. a sandbox forbids exec): run as we are
        if before is None:
            del os.environ["GLIBC_TUNABLES"]
        else:
            os.environ["GLIBC_TUNABLES"] = before
