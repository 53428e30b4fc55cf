"""Mixtures of datasets: proportions, determinism, exact resume, sharding, checks."""

import json

import grain
import numpy as np
import pytest

from conftest import PRESET, TINY_OVERRIDES
from data_pipelines import loader, mixture, writer
from data_pipelines.schema import DatasetError
from data_pipelines.sources import procedural
from wm_jax import config as config_lib
from wm_jax.config import ConfigError
from wm_jax.run import check_mixture
from wm_jax.train.loop import train

S, T, B = 16, 4, 4
FIRST_B = 100  # episode ids of dataset b start here; dataset a's are below


def _write(out, first_id, episodes, size=S, num_entities=2, frames=12):
    """A procedural dataset of `episodes` episodes numbered from `first_id` (train split only)."""
    eps = (
        procedural.generate_episode(0, first_id + i, frames, size=size, num_entities=num_entities)
        for i in range(episodes)
    )
    writer.write_dataset(
        out,
        {"train": eps},
        source="procedural",
        source_params={"first_id": first_id},
        generator_version=procedural.GENERATOR_VERSION,
        frame_size=size,
        fps=procedural.FPS,
        spec=procedural.record_spec(size, num_entities),
    )
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    return _write(root / "a", 0, 6), _write(root / "b", FIRST_B, 3)


def _loader(mix, **kw):
    args = dict(split="train", frames_per_clip=T, batch_size=B, seed=0, shard_options=grain.sharding.NoSharding())
    return mixture.make_mixture_loader(mix, **{**args, **kw})


def _take(it, n):
    return [next(it) for _ in range(n)]


def _windows(batches):
    return [(int(e), int(t)) for b in batches for e, t in zip(b["episode_id"][:, 0], b["t"][:, 0])]


def test_common_fields_keeps_only_equal_specs():
    a = {
        "frame": {"dtype": "uint8", "shape": [8, 8, 3]},
        "camera": {"dtype": "float32", "shape": [7]},
        "entity_ids": {"dtype": "int32", "shape": [3]},
    }
    b = {"frame": {"dtype": "uint8", "shape": [8, 8, 3]}, "entity_ids": {"dtype": "int32", "shape": [4]}}
    assert mixture.common_fields([a, b]) == (["frame"], ["camera", "entity_ids"])


def test_weights_3_to_1_draw_three_quarters_from_the_first(dirs):
    a, b = dirs
    windows = _windows(_take(iter(_loader([(a, 3), (b, 1)])), 60))
    share = np.mean([e < FIRST_B for e, _ in windows])
    assert 0.68 < share < 0.82, share
    # Exactly so in each window of MIX_WINDOW positions, where each dataset goes through
    # whole passes: each of b's 27 windows appears 1024 // 27 or one more times.
    sources = [loader.WindowSource(d, "train", T, fields=["episode_id", "t"]) for d in (a, b)]
    stream = mixture.MixtureSource(sources, [3, 1], seed=0)
    windows = [(int(w["episode_id"][0]), int(w["t"][0])) for w in (stream[k] for k in range(mixture.MIX_WINDOW))]
    from_b = [w for w in windows if w[0] >= FIRST_B]
    assert len(from_b) == mixture.MIX_WINDOW // 4
    counts = np.unique(from_b, axis=0, return_counts=True)[1]
    assert len(counts) == 27 and set(counts) <= {1024 // 27, 1024 // 27 + 1}


@pytest.mark.parametrize("workers", [0, 2])
def test_mixture_is_deterministic_and_resumes_exactly(dirs, workers):
    mix = [(dirs[0], 3), (dirs[1], 1)]
    it = iter(_loader(mix, worker_count=workers))
    _take(it, 4)
    state = it.get_state()
    want = _take(it, 6)
    del it  # stops its workers
    again = iter(_loader(mix, worker_count=workers))
    assert _windows(want) == _windows(_take(again, 10)[4:])
    del again
    resumed = iter(_loader(mix, worker_count=workers))
    resumed.set_state(state)
    got = _take(resumed, 6)
    del resumed
    for w, g in zip(want, got):
        assert w.keys() == g.keys()
        for k in w:
            np.testing.assert_array_equal(w[k], g[k])
    if not workers:
        assert _windows(_take(iter(_loader(mix, seed=1)), 10)[4:]) != _windows(want)


def test_processes_read_alternate_positions_of_one_stream(dirs):
    mix = [(dirs[0], 3), (dirs[1], 1)]
    whole = _windows(_take(iter(_loader(mix, batch_size=1)), 24))
    halves = [
        _windows(
            _take(
                iter(
                    _loader(mix, batch_size=1, shard_options=grain.sharding.ShardOptions(shard_index=i, shard_count=2))
                ),
                12,
            )
        )
        for i in range(2)
    ]
    assert halves[0] == whole[0::2] and halves[1] == whole[1::2]


def test_only_common_fields_are_batched(dirs, tmp_path):
    c = _write(tmp_path / "c", 200, 2, num_entities=3)  # entity fields of another shape
    batch = next(iter(_loader([(dirs[0], 1), (c, 1)])))
    assert "frame" in batch and "entity_ids" not in batch and "entity_boxes" not in batch
    assert next(iter(_loader([(dirs[0], 1), (c, 1)], fields=["frame"]))).keys() == {"frame"}


def test_mixture_errors_name_the_dataset(dirs, tmp_path):
    small = _write(tmp_path / "small", 300, 2, size=8)
    with pytest.raises(DatasetError, match="one frame size"):
        _loader([(dirs[0], 1), (small, 1)])
    cfg = config_lib.load(PRESET, TINY_OVERRIDES + [f"data.mixture=[[{dirs[0]}, 3], [{tmp_path / 'nope'}, 1]]"])
    with pytest.raises(DatasetError, match=r"'data.mixture\[1\]': dataset directory .*nope does not exist"):
        check_mixture(cfg, "train")
    cfg = config_lib.replace(cfg, [f"data.mixture=[[{dirs[0]}, 3], [{small}, 1]]"])
    with pytest.raises(DatasetError, match="frame sizes differ"):
        check_mixture(cfg, "train")
    with pytest.raises(ConfigError, match=r"data.mixture\[0\]"):
        config_lib.replace(cfg, [f"data.mixture=[[{dirs[0]}, 0]]"])
    with pytest.raises(ConfigError, match="both set"):
        config_lib.replace(cfg, [f"data.dir={dirs[0]}"])


def test_check_mixture_describes_the_mixture(dirs):
    cfg = config_lib.load(PRESET, TINY_OVERRIDES + [f"data.mixture=[[{dirs[0]}, 3], [{dirs[1]}, 1]]"])
    info = check_mixture(cfg, "train")
    hashes = [writer.read_manifest(d)["content_hash"] for d in dirs]
    assert [d["content_hash"] for d in info["mixture"]["datasets"]] == hashes
    assert info["content_hash"] == mixture.mixture_hash(hashes, [3.0, 1.0]) != mixture.mixture_hash(hashes, [1.0, 3.0])
    assert info["frame_size"] == S and "frame" in info["fields"] and not info["mixture"]["dropped_fields"]


@pytest.mark.slow
def test_training_on_a_mixture_records_it_in_the_run_manifest(dirs, tmp_path):
    overrides = TINY_OVERRIDES + [f"data.mixture=[[{dirs[0]}, 3], [{dirs[1]}, 1]]", "train.steps=2"]
    train(config_lib.load(PRESET, overrides), tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert [d["weight"] for d in manifest["mixture"]["datasets"]] == [3.0, 1.0]
    assert manifest["dataset_hash"] == check_mixture(config_lib.load(PRESET, overrides), "train")["content_hash"]
