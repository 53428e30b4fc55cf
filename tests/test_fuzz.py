"""Random bytes into what users hand the CLI (issue #16): a config, a shot script, a
dataset manifest, a video sidecar, each run through `wm` (in this process). Each must be
accepted or refused with exit 2 (`wm verify`: 1) and one line naming the file, never a
traceback, and no file may be written outside the run the command was given. Seeded, so
a failure replays; each document gets byte flips, insertions, deletions and pure noise."""

import json
import random
import shutil
from pathlib import Path

import numpy as np

from conftest import PRESET
from test_generate import THREE_SHOTS
from wm_jax import config as config_lib
from wm_jax.inference import watermark as wmk
from wm_jax.cli import main

ROUNDS = 300


def mutants(original: bytes, seed: int, rounds: int = ROUNDS):
    """`rounds` seeded corruptions of `original`: 1-8 random byte edits, or random bytes."""
    rng = random.Random(seed)
    for _ in range(rounds):
        if rng.random() < 0.1:
            yield bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
            continue
        data = bytearray(original)
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(len(data) + 1)
            kind = rng.choice(("flip", "insert", "delete", "printable"))
            if kind == "insert" or at == len(data):
                data[at:at] = bytes([rng.randrange(256)])
            elif kind == "delete":
                del data[at]
            elif kind == "flip":
                data[at] ^= 1 << rng.randrange(8)
            else:
                data[at] = rng.choice(b" :-[]{},\n0123456789abcdefghijklmnopqrstuvwxyz.\"'")
        yield bytes(data)


def _tree(root: Path) -> dict[str, tuple[int, int] | None]:
    """Every path under `root`: (mtime_ns, size) for a file, None for a directory."""
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) if p.is_file() else None for p in root.rglob("*")}


def _fuzz(
    watched: Path,
    target: Path,
    original: bytes,
    seed: int,
    argv: list[str],
    codes: tuple[int, ...],
    capfd,
    run: Path | None = None,
    rounds: int = ROUNDS,
):
    """Writes each mutant of `original` to `target` and runs `wm argv`: asserts an exit
    code in `codes`, no traceback, and nothing under `watched` (the working directory
    included) written, changed or removed but `target` and what is under `run`. Yields
    (mutant, exit code)."""
    for data in mutants(original, seed, rounds):
        target.write_bytes(data)
        before = _tree(watched)
        code = main(argv)
        err = capfd.readouterr().err
        assert code in codes and "Traceback" not in err, (data, code, err[-2000:])
        after = _tree(watched)
        touched = {p for p in before.keys() | after.keys() if before.get(p, 0) != after.get(p, 0)} - {str(target)}
        assert all(run is not None and Path(p).is_relative_to(run) for p in touched), (data, sorted(touched))
        yield data, code


def _setup(tmp_path, monkeypatch) -> Path:
    """The watched tree, also the working directory (relative paths land in it)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_fuzzed_configs_through_wm_train(tmp_path, monkeypatch, capfd):
    """The preset has no data.dir: a config that loads is refused at the data check, after
    the run directory and its lock were made (inside the run)."""
    watched = _setup(tmp_path, monkeypatch)
    config, run = tmp_path / "fuzz.yaml", tmp_path / "run"
    argv = ["train", "--config", str(config), "--workdir", str(run)]
    codes = [code for _, code in _fuzz(watched, config, PRESET.read_bytes(), 1, argv, (0, 2), capfd, run=run)]
    assert codes.count(2) == ROUNDS


def test_fuzzed_scripts_through_wm_generate(tmp_path, monkeypatch, capfd, tiny_overrides):
    """A script that parses and whose data exists is refused by the memory bound (a tiny
    --max-memory-gib), before any checkpoint is read: nothing is ever written."""
    watched = _setup(tmp_path, monkeypatch)
    run = tmp_path / "run"
    run.mkdir()
    config_lib.dump(config_lib.load(PRESET, tiny_overrides + ["train.stage=dynamics"]), run / "config.yaml")
    script = tmp_path / "fuzz.yaml"
    argv = [
        "generate",
        "--workdir",
        str(run),
        "--script",
        str(script),
        "--out",
        str(tmp_path / "out" / "o.mp4"),
        "--max-memory-gib",
        "1e-9",
    ]
    for _ in _fuzz(watched, script, THREE_SHOTS.encode(), 2, argv, (2,), capfd):
        pass


def test_fuzzed_dataset_manifests_through_wm_data_inspect(tiny_dataset, tmp_path, monkeypatch, capfd):
    watched = _setup(tmp_path, monkeypatch)
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    manifest = data / "manifest.json"
    for _ in _fuzz(watched, manifest, manifest.read_bytes(), 3, ["data", "inspect", str(data)], (0, 2), capfd):
        pass


def test_fuzzed_sidecars_never_verify_unless_unchanged(tmp_path, monkeypatch, capfd):
    watched = _setup(tmp_path, monkeypatch)
    video = tmp_path / "v.mp4"
    frames = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), np.uint8)
    wmk.write_marked_video(frames, video, {"seed": 1, "config": {"lr": 0.1}, "script": {"text": "x", "sha256": "y"}})
    sidecar = wmk.sidecar_path(video)
    original = sidecar.read_bytes()
    for mutant, code in _fuzz(watched, sidecar, original, 4, ["verify", str(video)], (0, 1), capfd, rounds=60):
        if code == 0:
            assert json.loads(mutant) == json.loads(original)
