"""Shared fixtures: a tiny real procedural dataset, a tiny model config, and one trained
tokenizer run and one dynamics run on them for the tests that only read a trained run
(a test that changes a run copies it first: `shutil.copytree` into its tmp_path)."""

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from data_pipelines.datasets import make_dataset
from wm_jax import config as config_lib
from wm_jax import huge_pages
from wm_jax.presets import preset_path
from wm_jax.train.loop import train

REPO = Path(__file__).resolve().parents[1]

# One persistent compilation cache for the whole test run: the xdist workers and every
# process a test starts (`wm train`, multi-process runs) share it, so a program that several
# tests compile (the tiny train step, the evaluator's rollout) is compiled once. Set before
# JAX reads its config; fresh per run (xdist's run id), removed when the run ends. A run's
# own `train.compile_cache_dir` is then not used: `enable_compile_cache` keeps a cache the
# process already has (tests of the run's cache call `without_session_compile_cache`).
COMPILE_CACHE_ENV = {
    "JAX_COMPILATION_CACHE_DIR": "",
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}
SESSION_COMPILE_CACHE = (
    Path(tempfile.gettempdir())
    / "wm_jax_test_compile_cache"
    / os.environ.get("PYTEST_XDIST_TESTRUNUID", uuid.uuid4().hex)
)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ.update(COMPILE_CACHE_ENV, JAX_COMPILATION_CACHE_DIR=str(SESSION_COMPILE_CACHE))


# XLA's CPU backend at LLVM optimisation level 0 for the test run (unless XLA_FLAGS already
# sets one): the tests are compile-bound, and -O0 halves their compile time (tests/models/
# test_dynamics.py: 5.1 -> 2.9 min on 2 cores) while computing the same programs; speed is
# measured by the benchmarks, never here. Child processes inherit it (`multiproc.cpu_env`
# appends to XLA_FLAGS).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()


# Huge pages for XLA's buffers in the xdist workers and every child process, as `wm` gives
# itself (wm_jax/huge_pages.py); the workers inherit the variable at their start.
HUGE_PAGE_TUNABLES = huge_pages.tunables_for_this_process()
if HUGE_PAGE_TUNABLES:
    os.environ["GLIBC_TUNABLES"] = HUGE_PAGE_TUNABLES


def optimized_xla_env() -> dict[str, str]:
    """This environment with XLA's default optimisation (for a child process that trains
    long enough for run time, not compile time, to dominate)."""
    flags = os.environ.get("XLA_FLAGS", "").replace(TEST_XLA_FLAGS, "").strip()
    return {**os.environ, "XLA_FLAGS": flags}


def without_session_compile_cache() -> dict[str, str]:
    """This environment without the session's compilation cache (for a child process)."""
    return {k: v for k, v in os.environ.items() if k not in COMPILE_CACHE_ENV}


def pytest_sessionfinish(session):
    if not hasattr(session.config, "workerinput"):  # the controller, after its workers
        shutil.rmtree(SESSION_COMPILE_CACHE, ignore_errors=True)


PRESET = preset_path("tiny_cpu")

# A model small enough that a train step compiles and runs in about a second on a CPU.
TINY_OVERRIDES = [
    "model.image_size=16",
    "model.tokenizer.embed_dim=32",
    "model.tokenizer.num_layers=1",
    "model.tokenizer.num_heads=2",
    "model.tokenizer.mlp_dim=64",
    "model.tokenizer.fsq_levels=[5, 5, 5]",
    "model.dynamics.embed_dim=32",
    "model.dynamics.num_layers=1",
    "model.dynamics.num_heads=2",
    "model.dynamics.mlp_dim=64",
    "data.frames_per_clip=4",
    "data.batch_size=8",
    "train.warmup_steps=1",
    "train.log_every_steps=1",
    "checkpoint.every_steps=2",
    "checkpoint.async_save=true",
    "eval.context_frames=2",
    "eval.horizon=3",
    "eval.num_clips=4",
    "eval.batch_size=4",
    "eval.video_clips=2",
]


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "procedural16"
    make_dataset("procedural", str(out), episodes=10, frames=24, size=16, seed=0, val_fraction=0.1, test_fraction=0.2)
    return out


@pytest.fixture
def tiny_overrides(tiny_dataset) -> list[str]:
    return TINY_OVERRIDES + [f"data.dir={tiny_dataset}"]


@pytest.fixture(scope="session")
def tokenizer_run(tmp_path_factory, tiny_dataset) -> Path:
    """The tiny tokenizer trained 4 steps, with finished, sealed checkpoints 2 and 4."""
    run = tmp_path_factory.mktemp("shared_runs") / "tokenizer"
    train(config_lib.load(PRESET, TINY_OVERRIDES + [f"data.dir={tiny_dataset}", "train.steps=4"]), run)
    return run


def train_tiny_dynamics(name: str, tiny_dataset: Path, tokenizer_run: Path, extra: list[str] = ()) -> Path:
    """A tiny dynamics run `name` (beside `tokenizer_run`) trained 2 steps on it, with the
    `extra` overrides (checkpoint 2)."""
    run = tokenizer_run.parent / name
    overrides = [
        f"data.dir={tiny_dataset}",
        "train.steps=2",
        "train.stage=dynamics",
        f"train.tokenizer_workdir={tokenizer_run}",
        *extra,
    ]
    train(config_lib.load(PRESET, TINY_OVERRIDES + overrides), run)
    return run


@pytest.fixture(scope="session")
def dynamics_run(tiny_dataset, tokenizer_run) -> Path:
    """The tiny dynamics model trained 2 steps on `tokenizer_run` (checkpoint 2)."""
    return train_tiny_dynamics("dynamics", tiny_dataset, tokenizer_run)


# Serving (tests/serve): one conftest per test tree, since the tests import this one by name.
SERVE_SESSIONS = 16  # the shared server's batch: the load test's 16 concurrent sessions


def _serving_stack():
    for name in ("starlette", "uvicorn", "httpx"):
        pytest.importorskip(name, reason="the serving tests need starlette, uvicorn and httpx")


@pytest.fixture(scope="session")
def serve_model(dynamics_run):
    """The trained tiny dynamics run loaded for serving, once."""
    _serving_stack()
    from wm_jax.serve.engine import load_model

    return load_model(dynamics_run)


@pytest.fixture(scope="session")
def server(serve_model, tmp_path_factory):
    """A real server on 127.0.0.1 (uvicorn in a thread) with room for SERVE_SESSIONS
    sessions; recordings go to a temporary directory (the shared run stays as trained)."""
    from wm_jax.serve.app import BackgroundServer, create_app
    from wm_jax.serve.engine import Engine

    engine = Engine(serve_model, max_sessions=SERVE_SESSIONS)
    record_dir = tmp_path_factory.mktemp("recordings")
    with BackgroundServer(create_app(engine, record_dir=record_dir, max_queue=4 * SERVE_SESSIONS)) as running:
        running.engine, running.record_dir = engine, record_dir
        yield running


def assert_error(reply, status, *words):
    """An HTTP reply (httpx) of `status` whose JSON error message holds every one of `words`."""
    assert reply.status_code == status, reply.text
    message = reply.json()["error"]
    assert all(w in message for w in words), message


@pytest.fixture
def client(server):
    """An HTTP client of the shared server; after the test, the server still answers."""
    import httpx

    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
        assert c.get("/v1/health").status_code == 200  # whatever the test sent


@pytest.fixture(scope="session")
def maskgit_dynamics_run(tiny_dataset, tokenizer_run) -> Path:
    """The tiny dynamics model with the MaskGIT objective (4 decoding passes per frame),
    trained 2 steps on `tokenizer_run` (checkpoint 2)."""
    maskgit = ["model.dynamics.objective=maskgit", "model.dynamics.maskgit_steps=4"]
    return train_tiny_dynamics("maskgit_dynamics", tiny_dataset, tokenizer_run, maskgit)


@pytest.fixture(scope="session")
def bank_dynamics_run(tiny_dataset, tokenizer_run) -> Path:
    """The tiny dynamics model with an identity bank, trained 2 steps on `tokenizer_run`."""
    return train_tiny_dynamics("bank_dynamics", tiny_dataset, tokenizer_run, ["model.dynamics.use_identity_bank=true"])
