"""Random bytes into what users hand the CLI (issue #16): a config, a shot script, a
dataset manifest, a video sidecar. Each must be accepted or refused with the module's own
error (exit 2 in the CLI: one line naming the file), never another exception. Seeded, so
a failure replays; each document gets byte flips, insertions, deletions and pure noise."""

import json
import random
import shutil

import numpy as np

from conftest import PRESET
from data_pipelines.schema import DatasetError
from data_pipelines.writer import verify_dataset
from test_generate import THREE_SHOTS
from wm_jax import config as config_lib
from wm_jax import watermark as wmk
from wm_jax.generate import ScriptError, parse_script

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


def test_fuzzed_configs_load_or_raise_config_error(tmp_path):
    path = tmp_path / "fuzz.yaml"
    for data in mutants(PRESET.read_bytes(), seed=1):
        path.write_bytes(data)
        try:
            config_lib.load(path)
        except config_lib.ConfigError:
            pass


def test_fuzzed_scripts_parse_or_raise_script_error():
    for data in mutants(THREE_SHOTS.encode(), seed=2):
        try:
            parse_script(data.decode("utf-8", errors="replace"), "fuzz.yaml")
        except ScriptError:
            pass


def test_fuzzed_dataset_manifests_verify_or_raise_dataset_error(tiny_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    original = (data / "manifest.json").read_bytes()
    for mutant in mutants(original, seed=3):
        (data / "manifest.json").write_bytes(mutant)
        try:
            verify_dataset(data, check_hashes=False)
        except DatasetError:
            pass


def test_fuzzed_sidecars_never_verify_unless_unchanged(tmp_path):
    video = tmp_path / "v.mp4"
    frames = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), np.uint8)
    wmk.write_marked_video(frames, video, {"seed": 1, "config": {"lr": 0.1}, "script": {"text": "x", "sha256": "y"}})
    original = wmk.sidecar_path(video).read_bytes()
    for mutant in mutants(original, seed=4, rounds=60):
        wmk.sidecar_path(video).write_bytes(mutant)
        result = wmk.verify(video)  # never raises
        if result["manifest_ok"]:
            assert json.loads(mutant) == json.loads(original)
