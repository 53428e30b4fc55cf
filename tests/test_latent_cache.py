"""Latent cache on real components: a procedural dataset, a tokenizer trained for 2 steps,
tensorstore zarr3 arrays. Built by `wm_jax.latent_cache`, in the format and read by
`data_pipelines.latent_cache`."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import PRESET, TINY_OVERRIDES
from data_pipelines import latent_cache, writer
from data_pipelines.schema import DatasetError
from wm_jax import config as config_lib
from wm_jax import sharding
from wm_jax.latent_cache import build_cache, read_codes
from wm_jax.cli import main
from wm_jax.config import ConfigError, MeshConfig
from wm_jax.models import flops
from wm_jax.stages.dynamics import DYNAMICS
from wm_jax.models.tokenizer import VideoTokenizer
from wm_jax.inference.rollout import encode_frames
from wm_jax.telemetry import read_metrics
from wm_jax.run import load_run_config, restore_params, tokenizer_identity
from wm_jax.train.loop import train

# 5-frame windows: the dataset's 24-frame episodes end in a 4-frame window (padded in its
# batch); 4 windows per batch, 32-record chunks: batches straddle chunk boundaries.
BUILD = {"batch_size": 4, "chunk_records": 32}


class Stop(Exception):
    pass


def _trained_tokenizer(tiny_dataset, tmp_path_factory, name: str, extra: list[str] = ()) -> Path:
    """A tiny tokenizer run of 2 steps on 5-frame clips (the cache's windows)."""
    workdir = tmp_path_factory.mktemp("latent_cache") / name
    overrides = TINY_OVERRIDES + list(extra) + [f"data.dir={tiny_dataset}", "train.steps=2", "data.frames_per_clip=5"]
    train(config_lib.load(PRESET, overrides), workdir)
    return workdir


def _built_cache(tiny_dataset, tokenizer: Path, tmp_path_factory, name: str) -> Path:
    out = tmp_path_factory.mktemp("latent_cache") / name
    build_cache(tiny_dataset, tokenizer, out, log=lambda _: None, **BUILD)
    return out


@pytest.fixture(scope="module")
def tokenizer_run(tiny_dataset, tmp_path_factory) -> Path:
    return _trained_tokenizer(tiny_dataset, tmp_path_factory, "tok")


@pytest.fixture(scope="module")
def cache_dir(tiny_dataset, tokenizer_run, tmp_path_factory) -> Path:
    return _built_cache(tiny_dataset, tokenizer_run, tmp_path_factory, "cache")


def _assert_verify_names_a_flipped_byte(cache: Path, chunk: Path) -> None:
    """One bit of the chunk file `chunk` of split train flipped: `verify_cache` names the split and the file."""
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 1
    chunk.write_bytes(bytes(data))
    with pytest.raises(
        DatasetError, match=re.escape(f"split 'train' of latent cache {cache}: ") + ".*" + re.escape(str(chunk))
    ):
        latent_cache.verify_cache(cache)


def _chunk_bytes(cache: Path) -> dict[str, bytes]:
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.glob("*.zarr/**/*")) if p.is_file()}


def test_codes_equal_the_tokenizers_encoding(tiny_dataset, tokenizer_run, cache_dir):
    cfg = load_run_config(tokenizer_run)
    params, _, _ = restore_params(tokenizer_run, sharding.make_mesh(MeshConfig()), sharding.logical_rules(cfg.mesh))
    cache = latent_cache.open_cache(
        cache_dir, data_dir=tiny_dataset, expect_tokenizer=tokenizer_identity(tokenizer_run)[1]
    )
    # A grain worker gets the cache's state (paths and manifest only) and reopens the arrays.
    state = cache.__getstate__()
    assert set(state) == {"root", "manifest"}
    cache = latent_cache.LatentCache.__new__(latent_cache.LatentCache)
    cache.__setstate__(state)
    manifest = writer.read_manifest(tiny_dataset)
    assert cache.manifest["tokens_per_frame"] == 16 and cache.manifest["splits"]["train"]["dtype"] == "uint8"
    for split in ("train", "val"):
        assert cache.num_records(split) == manifest["splits"][split]["num_records"]
        for episode in manifest["splits"][split]["episodes"][:2]:
            frames = writer.read_episode(tiny_dataset, manifest, episode["episode_id"])["frame"]
            codes, indices = encode_frames(VideoTokenizer(cfg.model), params, frames[None], cfg.data.frames_per_clip)
            start, length = episode["start"], episode["length"]
            np.testing.assert_array_equal(read_codes(cache, split, start, length), np.asarray(codes[0]))
            ids = cache.read(split, start, length)
            assert ids.dtype == np.int32 and ids.shape == (length, 16)
            np.testing.assert_array_equal(ids, np.asarray(indices[0]))
    with pytest.raises(DatasetError, match="outside split 'val'"):
        cache.read("val", 20, 5)
    with pytest.raises(DatasetError, match="split 'nope' not in latent cache"):
        cache.read("nope", 0, 1)


def test_interrupted_build_resumes_to_the_same_bytes(tiny_dataset, tokenizer_run, cache_dir, tmp_path):
    out = tmp_path / "cache"
    calls = []

    def stop_after_first_batch(split, done, total):
        calls.append((split, done, total))
        raise Stop

    with pytest.raises(Stop):
        build_cache(tiny_dataset, tokenizer_run, out, log=lambda _: None, progress=stop_after_first_batch, **BUILD)
    # Batch 0 (4 windows of 5 frames) is written and recorded; no manifest yet.
    assert calls == [("train", 20, 168)]
    assert json.loads((out / "progress.json").read_text())["done"] == {"train": 1}
    assert not (out / "manifest.json").exists()
    with pytest.raises(DatasetError, match="incomplete latent cache"):
        latent_cache.open_cache(out)
    with pytest.raises(DatasetError, match=r"other settings \(differing: \['batch_size'\]\)"):
        build_cache(tiny_dataset, tokenizer_run, out, log=lambda _: None, batch_size=8, chunk_records=32)

    logged = []
    resumed = build_cache(tiny_dataset, tokenizer_run, out, log=logged.append, **BUILD)
    assert "resuming at batch 1" in logged[0]
    assert not (out / "progress.json").exists()
    whole = json.loads((cache_dir / "manifest.json").read_text())
    for split, entry in whole["splits"].items():
        assert resumed["splits"][split]["content_hash"] == entry["content_hash"]
    assert _chunk_bytes(out) == _chunk_bytes(cache_dir)
    with pytest.raises(DatasetError, match="already a finished latent cache"):
        build_cache(tiny_dataset, tokenizer_run, out, log=lambda _: None, **BUILD)


def test_incomplete_or_missing_cache_is_refused(cache_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(cache_dir, partial)
    (partial / "manifest.json").unlink()
    with pytest.raises(
        DatasetError,
        match=re.escape(f"{partial / 'manifest.json'}") + r" is missing: .* incomplete latent cache.*"
        r"run `wm data cache` again to finish it",
    ):
        latent_cache.open_cache(partial)
    with pytest.raises(DatasetError, match=re.escape(f"latent cache directory {tmp_path / 'none'} does not exist")):
        latent_cache.open_cache(tmp_path / "none")


def test_mismatches_and_corruption_are_named(tiny_dataset, tokenizer_run, cache_dir, tmp_path):
    with pytest.raises(
        DatasetError, match=re.escape(f"latent cache {cache_dir} is of dataset content hash") + ".*; expected 00"
    ):
        latent_cache.open_cache(cache_dir, expect_content_hash="0" * 64)
    # A copy of the tokenizer run (moved runs still match), then another tokenizer config
    # (same checkpoint files).
    other = tmp_path / "other_tok"
    shutil.copytree(tokenizer_run, other)
    latent_cache.open_cache(cache_dir, expect_tokenizer=tokenizer_identity(other)[1])
    cfg = (other / "config.yaml").read_text()
    (other / "config.yaml").write_text(cfg.replace("mlp_dim: 64", "mlp_dim: 128", 1))
    with pytest.raises(
        DatasetError,
        match=re.escape(f"latent cache {cache_dir} was encoded by tokenizer")
        + ".* step 2 .*; "
        + re.escape(f"{other} is at step 2"),
    ):
        latent_cache.open_cache(cache_dir, expect_tokenizer=tokenizer_identity(other)[1])

    # The same config retrained to the same step from another seed: other parameters.
    retrained = tmp_path / "retrained_tok"
    run_cfg = load_run_config(tokenizer_run)
    train(config_lib.replace(run_cfg, [f"seed={run_cfg.seed + 1}"]), retrained)
    with pytest.raises(
        DatasetError,
        match=r"at step 2 \(config hash (\w+), parameter files \w+\); .* at step 2 "
        r"\(config hash \1, parameter files",
    ):
        latent_cache.open_cache(cache_dir, expect_tokenizer=tokenizer_identity(retrained)[1])

    bad = tmp_path / "bad"
    shutil.copytree(cache_dir, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["splits"]["val"]["shape"] = [23, 16]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=re.escape(f"latent cache array {bad / 'val.zarr'} has shape [24, 16]")):
        latent_cache.open_cache(bad)

    flipped = tmp_path / "flipped"
    shutil.copytree(cache_dir, flipped)
    assert latent_cache.verify_cache(flipped)["splits"].keys() == {"train", "val", "test"}
    _assert_verify_names_a_flipped_byte(flipped, flipped / "train.zarr" / "c" / "2" / "0")


def test_cli_builds_the_same_cache_and_exits_2_without_a_tokenizer(
    tiny_dataset, tokenizer_run, cache_dir, tmp_path, capsys
):
    out = tmp_path / "cli"
    assert (
        main(
            [
                "data",
                "cache",
                "--data",
                str(tiny_dataset),
                "--tokenizer",
                str(tokenizer_run),
                "--out",
                str(out),
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert lines[0].startswith(f"wrote {out}: 240 frames as 16 tokens each")
    assert summary["records"] == {"train": 168, "val": 24, "test": 48}
    assert summary["frame_bytes"] == 240 * 16 * 16 * 3 and 0 < summary["cache_bytes"] < summary["frame_bytes"]
    # chunk_records defaults to 256 here: other chunk files, the same token ids.
    ours = latent_cache.verify_cache(out)["splits"]
    theirs = json.loads((cache_dir / "manifest.json").read_text())["splits"]
    assert {s: e["content_hash"] for s, e in ours.items()} == {s: e["content_hash"] for s, e in theirs.items()}

    missing = tmp_path / "no_run"
    assert (
        main(["data", "cache", "--data", str(tiny_dataset), "--tokenizer", str(missing), "--out", str(tmp_path / "x")])
        == 2
    )
    assert f"{missing} is not a run directory" in capsys.readouterr().err


def _train_on_frames_and_cache(common: list[str], cache: Path, tmp_path: Path) -> tuple[dict, dict]:
    """The run of `common` overrides trained twice, encoding frames and reading `cache`
    -> ({"frames", "cache"}: its configs, the same keys: its logged losses)."""
    cfgs = {
        "frames": config_lib.load(PRESET, common),
        "cache": config_lib.load(PRESET, common + [f"data.latent_cache={cache}"]),
    }
    for run, cfg in cfgs.items():
        train(cfg, tmp_path / run)
    return cfgs, {run: [r["loss"] for r in read_metrics(tmp_path / run / "metrics.jsonl")] for run in cfgs}


def test_dynamics_trains_on_cached_codes_as_on_frames(tiny_dataset, tokenizer_run, cache_dir, tmp_path):
    """The same batches give the same losses whether the step encodes frames or reads the
    cache; windows the cache does not hold whole are refused."""
    common = TINY_OVERRIDES + [
        f"data.dir={tiny_dataset}",
        "train.stage=dynamics",
        "train.steps=3",
        f"train.tokenizer_workdir={tokenizer_run}",
        "data.frames_per_clip=5",
        "data.window_stride=5",
    ]
    cfgs, losses = _train_on_frames_and_cache(common, cache_dir, tmp_path)
    np.testing.assert_allclose(losses["cache"], losses["frames"], rtol=1e-5)
    encode = 8 * flops.tokenizer_encode_flops(cfgs["frames"].model, 5)  # the frames' encode, not run from the cache
    assert DYNAMICS.train_step_flops(cfgs["frames"]) - DYNAMICS.train_step_flops(cfgs["cache"]) == encode
    for bad in ("data.window_stride=1", "data.frames_per_clip=6"):
        with pytest.raises(ConfigError, match="data.window_stride"):
            train(config_lib.load(PRESET, common + [f"data.latent_cache={cache_dir}", bad]), tmp_path / "bad")


# --- Latents: the cache of a continuous tokenizer (float16 [R, N, D] arrays) ---------------

# The continuous tokenizer (and the diffusion dynamics on it): TINY_OVERRIDES' model with a
# 4-wide tanh bottleneck instead of FSQ.
CONTINUOUS = ["model.tokenizer.bottleneck=continuous", "model.tokenizer.latent_dim=4"]
DIFFUSION = CONTINUOUS + ["model.dynamics.objective=diffusion", "model.dynamics.action_conditioning=adaln"]
# float16 rounds a latent in [-1, 1] by at most half its ulp at [0.5, 1): 2^-12; the rest
# (1e-6) is float32 noise of encoding a window in a batch of 4 rather than alone.
FLOAT16_ATOL = 2**-12 + 1e-6
# The diffusion losses on cached latents vs encoded frames: float16 moves each latent by
# <= 2^-12 (x latent_scale 3 in the model), with random signs, which moved the tiny run's
# first 3 losses by <= 2.4e-5 relative; 1e-3 leaves room for other platforms and is far
# below what another batch or step changes (15% from step 1 to 2 here).
LOSS_RTOL = 1e-3


@pytest.fixture(scope="module")
def continuous_run(tiny_dataset, tmp_path_factory) -> Path:
    return _trained_tokenizer(tiny_dataset, tmp_path_factory, "continuous_tok", CONTINUOUS)


@pytest.fixture(scope="module")
def latents_dir(tiny_dataset, continuous_run, tmp_path_factory) -> Path:
    return _built_cache(tiny_dataset, continuous_run, tmp_path_factory, "latents")


def test_latents_equal_the_continuous_tokenizers_encoding_to_float16(tiny_dataset, continuous_run, latents_dir):
    cfg = load_run_config(continuous_run)
    params, _, _ = restore_params(continuous_run, sharding.make_mesh(MeshConfig()), sharding.logical_rules(cfg.mesh))
    cache = latent_cache.open_cache(
        latents_dir, data_dir=tiny_dataset, expect_tokenizer=tokenizer_identity(continuous_run)[1]
    )
    assert cache.kind == cache.manifest["kind"] == "latents" and cache.manifest["latent_dim"] == 4
    assert "fsq_levels" not in cache.manifest
    entry = cache.manifest["splits"]["train"]
    assert (entry["shape"], entry["dtype"], entry["chunk_shape"]) == ([168, 16, 4], "float16", [32, 16, 4])
    manifest = writer.read_manifest(tiny_dataset)
    for split in ("train", "test"):
        for episode in manifest["splits"][split]["episodes"][:2]:
            frames = writer.read_episode(tiny_dataset, manifest, episode["episode_id"])["frame"]
            codes, indices = encode_frames(VideoTokenizer(cfg.model), params, frames[None], cfg.data.frames_per_clip)
            assert indices is None
            latents = cache.read(split, episode["start"], episode["length"])
            assert latents.dtype == np.float32 and latents.shape == (episode["length"], 16, 4)
            np.testing.assert_allclose(latents, np.asarray(codes[0]), rtol=0, atol=FLOAT16_ATOL)
            np.testing.assert_array_equal(read_codes(cache, split, episode["start"], episode["length"]), latents)
            assert np.all(latents == latents.astype(np.float16))  # float16 values, as stored


def test_latents_build_resumes_to_the_same_bytes_and_verify_names_a_flipped_byte(
    tiny_dataset, tokenizer_run, continuous_run, latents_dir, tmp_path
):
    out = tmp_path / "latents"

    def stop(split, done, total):
        raise Stop

    with pytest.raises(Stop):
        build_cache(tiny_dataset, continuous_run, out, log=lambda _: None, progress=stop, **BUILD)
    assert json.loads((out / "progress.json").read_text())["done"] == {"train": 1}
    with pytest.raises(DatasetError, match="incomplete latent cache"):
        latent_cache.open_cache(out)
    resumed = build_cache(tiny_dataset, continuous_run, out, log=lambda _: None, **BUILD)
    assert resumed["splits"] == json.loads((latents_dir / "manifest.json").read_text())["splits"]
    assert _chunk_bytes(out) == _chunk_bytes(latents_dir)

    assert latent_cache.verify_cache(out)["kind"] == "latents"
    _assert_verify_names_a_flipped_byte(out, out / "train.zarr" / "c" / "2" / "0" / "0")

    manifest = json.loads((out / "manifest.json").read_text())
    manifest["splits"]["val"]["dtype"] = "float32"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        DatasetError, match=re.escape(f"latent cache array {out / 'val.zarr'} has shape [24, 16, 4] and dtype float16")
    ):
        latent_cache.open_cache(out)
    with pytest.raises(DatasetError, match=re.escape(f"latent cache {latents_dir} was encoded by tokenizer")):
        latent_cache.open_cache(latents_dir, expect_tokenizer=tokenizer_identity(tokenizer_run)[1])
    with pytest.raises(DatasetError, match=re.escape(f"latent cache {latents_dir} is of dataset content hash")):
        latent_cache.open_cache(latents_dir, expect_content_hash="0" * 64)


def test_a_manifest_without_a_kind_is_of_ids(cache_dir, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(cache_dir, old)
    manifest = json.loads((old / "manifest.json").read_text())
    assert manifest.pop("kind") == "ids"
    (old / "manifest.json").write_text(json.dumps(manifest))
    cache = latent_cache.open_cache(old)
    assert cache.kind == "ids" and cache.read("val", 0, 2).dtype == np.int32


def test_diffusion_trains_on_cached_latents_as_on_frames(tiny_dataset, continuous_run, latents_dir, tmp_path):
    """The same batches give the same losses, up to the latents' float16 rounding, whether
    the step encodes frames or reads the cache; the encode leaves the step's FLOPs."""
    common = (
        TINY_OVERRIDES
        + DIFFUSION
        + [
            f"data.dir={tiny_dataset}",
            "train.stage=dynamics",
            "train.steps=3",
            f"train.tokenizer_workdir={continuous_run}",
            "data.frames_per_clip=5",
            "data.window_stride=5",
            "model.dynamics.use_actions=false",  # no action-sensitivity program to compile: ~7 s
        ]
    )
    cfgs, losses = _train_on_frames_and_cache(common, latents_dir, tmp_path)
    assert len(losses["cache"]) == 3
    np.testing.assert_allclose(losses["cache"], losses["frames"], rtol=LOSS_RTOL)
    encode = 8 * flops.tokenizer_encode_flops(cfgs["frames"].model, 5)
    assert DYNAMICS.train_step_flops(cfgs["frames"]) - DYNAMICS.train_step_flops(cfgs["cache"]) == encode


def test_a_cache_of_the_other_kind_exits_2_naming_the_key(
    tiny_dataset, tokenizer_run, cache_dir, continuous_run, latents_dir, tmp_path, capsys
):
    common = TINY_OVERRIDES + [
        f"data.dir={tiny_dataset}",
        "train.stage=dynamics",
        "train.steps=1",
        "data.frames_per_clip=5",
        "data.window_stride=5",
    ]
    runs = {
        "tokens": [f"train.tokenizer_workdir={tokenizer_run}", f"data.latent_cache={latents_dir}"],
        "diffusion": DIFFUSION + [f"train.tokenizer_workdir={continuous_run}", f"data.latent_cache={cache_dir}"],
    }
    messages = {
        "tokens": f"{latents_dir} holds continuous latents; the 'causal' objective trains on FSQ token ids",
        "diffusion": f"{cache_dir} holds FSQ token ids; the 'diffusion' objective trains on continuous latents",
    }
    for run, overrides in runs.items():
        args = [a for o in common + overrides for a in ("--set", o)]
        assert main(["train", "--config", str(PRESET), *args, "--workdir", str(tmp_path / run)]) == 2
        err = capsys.readouterr().err
        assert f"config key 'data.latent_cache': {messages[run]}" in err, err


def test_cli_caches_latents(tiny_dataset, continuous_run, latents_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--data", str(tiny_dataset), "--tokenizer", str(continuous_run), "--out", str(out), "--batch-size", "4"]
    assert main(["data", "cache", *args]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"wrote {out}: 240 frames as 16 tokens of 4 floats each")
    # Other chunks (256 records), the same latents.
    ours = latent_cache.verify_cache(out)["splits"]
    theirs = json.loads((latents_dir / "manifest.json").read_text())["splits"]
    assert {s: e["content_hash"] for s, e in ours.items()} == {s: e["content_hash"] for s, e in theirs.items()}
