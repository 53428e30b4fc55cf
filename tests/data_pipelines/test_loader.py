import json

import grain
import numpy as np
import pytest

from data_pipelines import datasets, loader
from multiproc import finish, free_port, start
from data_pipelines.schema import DatasetError

S, T = 16, 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "ds"
    # 5 train episodes of 20 steps in shards of 32 records, so windows straddle shards.
    datasets.make_dataset(
        "procedural",
        out,
        episodes=6,
        frames=20,
        size=S,
        num_entities=2,
        val_fraction=0.0,
        test_fraction=0.2,
        records_per_shard=32,
    )
    return out


def _loader(data_dir, **kw):
    args = dict(split="train", frames_per_clip=T, batch_size=4, seed=0, shard_options=grain.sharding.NoSharding())
    args.update(kw)
    return loader.make_loader(data_dir, **args)


def _window_keys(batches):
    return [(int(e), int(t)) for b in batches for e, t in zip(b["episode_id"][:, 0], b["t"][:, 0])]


def test_batches_have_schema_fields_stacked(data_dir):
    batch = next(iter(_loader(data_dir)))
    assert batch["frame"].shape == (4, T, S, S, 3) and batch["frame"].dtype == np.uint8
    assert batch["action"].shape == (4, T) and batch["action"].dtype == np.int32
    assert batch["camera"].shape == (4, T, 7) and batch["camera"].dtype == np.float32
    assert batch["cut"].dtype == bool and batch["entity_boxes"].shape == (4, T, 3, 4)


def test_windows_never_cross_episodes(data_dir):
    n = loader.num_windows(data_dir, "train", T)
    assert n == 5 * (20 - T + 1)
    for batch in _loader(data_dir, num_epochs=1, batch_size=8):
        assert (batch["episode_id"] == batch["episode_id"][:, :1]).all()
        np.testing.assert_array_equal(np.diff(batch["t"], axis=1), 1)


def test_stride_subsamples_windows(data_dir):
    assert loader.num_windows(data_dir, "train", T, window_stride=5) == 5 * 3  # starts 0, 5, 10


def test_shards_are_disjoint_and_cover(data_dir):
    n = loader.num_windows(data_dir, "train", T)
    seen = []
    for i in range(2):
        opts = grain.sharding.ShardOptions(shard_index=i, shard_count=2, drop_remainder=True)
        seen.append(_window_keys(_loader(data_dir, num_epochs=1, batch_size=1, shard_options=opts)))
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) >= n - 1
    assert all(len(s) == len(set(s)) for s in seen)


def test_seeded_shuffle_is_deterministic(data_dir):
    take = lambda seed: _window_keys([b for _, b in zip(range(3), _loader(data_dir, seed=seed))])
    assert take(0) == take(0)
    assert take(0) != take(1)
    unshuffled = _window_keys([next(iter(_loader(data_dir, shuffle=False)))])
    assert unshuffled == [(0, 0), (0, 1), (0, 2), (0, 3)]


def test_iterator_state_resumes_exactly(data_dir):
    it = iter(_loader(data_dir))
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    resumed = iter(_loader(data_dir))
    resumed.set_state(state)
    for want, got in zip(expected, (next(resumed) for _ in range(4))):
        for k in want:
            np.testing.assert_array_equal(want[k], got[k])


def test_clear_errors(data_dir, tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        _loader(tmp_path / "missing")
    with pytest.raises(DatasetError, match="split 'val' not in dataset"):
        _loader(data_dir, split="val")
    with pytest.raises(DatasetError, match="no episode with 21 frames \\(longest: 20\\)"):
        _loader(data_dir, frames_per_clip=21)


def test_a_worker_process_loads_the_same_batches(data_dir):
    # One worker keeps the sampler order (several interleave batches per worker).
    want = [b for _, b in zip(range(2), _loader(data_dir))]
    it = iter(_loader(data_dir, worker_count=1))
    got = [next(it) for _ in range(2)]
    del it
    for w, g in zip(want, got):
        np.testing.assert_array_equal(w["frame"], g["frame"])
        np.testing.assert_array_equal(w["episode_id"], g["episode_id"])


_PROCESS_SCRIPT = """
import json, sys
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from data_pipelines import loader
batches = loader.make_loader(sys.argv[3], split="train", frames_per_clip=6, batch_size=4, seed=0, num_epochs=1)
keys = [(int(e), int(t)) for b in batches for e, t in zip(b["episode_id"][:, 0], b["t"][:, 0])]
print(json.dumps({"process": jax.process_index(), "windows": keys}))
"""


@pytest.mark.multiprocess
def test_shard_by_jax_process_splits_windows_across_real_processes(data_dir):
    """Two JAX processes (jax.distributed on localhost): the default ShardByJaxProcess
    gives each its own, disjoint half of the windows."""
    port = free_port()
    procs = start(lambda i: ["-c", _PROCESS_SCRIPT, f"127.0.0.1:{port}", str(i), str(data_dir)], 2)
    outs = []
    for p, (out, err) in zip(procs, finish(procs)):
        assert p.returncode == 0, err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(o["process"] for o in outs) == [0, 1]
    halves = [set(map(tuple, o["windows"])) for o in outs]
    total = loader.num_windows(data_dir, "train", T)
    assert halves[0] and halves[1] and not halves[0] & halves[1]
    assert len(halves[0]) + len(halves[1]) >= total - 2 * 4  # each drops at most a partial batch
