"""The loader at scale: fast decode equals the full decoder, determinism and exact resume
with worker processes and with two JAX processes."""

import json

import grain
import numpy as np
import pytest

from array_record.python.array_record_module import ArrayRecordReader

from data_pipelines import datasets, layout, loader, schema, writer
from multiproc import finish, free_port, start

S, T, B = 16, 4, 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "ds"
    # 8 train episodes of 12 steps in shards of 20 records: windows straddle shards.
    datasets.make_dataset(
        "procedural",
        out,
        episodes=8,
        frames=12,
        size=S,
        num_entities=2,
        val_fraction=0.0,
        test_fraction=0.0,
        records_per_shard=20,
    )
    return out


def _loader(data_dir, **kw):
    args = dict(split="train", frames_per_clip=T, batch_size=B, seed=0, shard_options=grain.sharding.NoSharding())
    return loader.make_loader(data_dir, **{**args, **kw})


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same_batches(want, got):
    assert len(want) == len(got)
    for w, g in zip(want, got):
        assert w.keys() == g.keys()
        for k in w:
            np.testing.assert_array_equal(w[k], g[k], err_msg=k)


def _full_decode(data_dir, first):
    """Window from record `first` of the train split, by the full decoder: {name: [T, ...]}."""
    source = loader.open_shards(writer.shard_paths(data_dir, writer.read_manifest(data_dir), "train"))
    decoded = [schema.decode_record(source[i]) for i in range(first, first + T)]
    return {k: np.stack([r[k] for r in decoded]) for k in decoded[0]}


def test_record_ranges_split_a_window_at_shard_ends():
    ends = np.cumsum([20, 20, 5])
    assert loader.record_ranges(ends, 0, 4) == [(0, 0, 4)]
    assert loader.record_ranges(ends, 18, 4) == [(0, 18, 20), (1, 0, 2)]
    assert loader.record_ranges(ends, 19, 22) == [(0, 19, 20), (1, 0, 20), (2, 0, 1)]


def test_windows_decode_exactly_as_the_full_decoder(data_dir):
    source = loader.WindowSource(data_dir, "train", T)
    starts = loader.window_starts(writer.read_manifest(data_dir)["splits"]["train"]["episodes"], T)
    for k in (0, 7, 20, len(source) - 1):  # the first learns the layout; 7 and 20 cross shards
        got, want = source[k], _full_decode(data_dir, int(starts[k]))
        assert source._layout is not None and got.keys() == want.keys()
        for name in want:
            assert got[name].dtype == want[name].dtype and got[name].flags.writeable
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_layout_refuses_a_record_with_other_header_bytes():
    record = {"a": np.arange(3, dtype=np.int32), "b": np.zeros((2, 2), np.uint8), "none": np.zeros(0, np.float32)}
    data = schema.encode_record(record)
    shape = layout.learn(data, schema.decode_record(data))
    window = layout.decode_window([data, data], shape)
    assert window["a"].shape == (2, 3) and window["none"].shape == (2, 0)
    other = schema.encode_record({**record, "a": np.arange(3, dtype=np.float32)})  # same length, other dtype
    assert len(other) == len(data) and layout.decode_window([data, other], shape) is None
    assert layout.decode_window([data, data[:-1]], shape) is None


def test_fields_selects_what_is_decoded(data_dir):
    batch = next(iter(_loader(data_dir, fields=["frame", "action"])))
    assert sorted(batch) == ["action", "frame"] and batch["frame"].shape == (B, T, S, S, 3)


@pytest.mark.parametrize("shuffle,epochs,seed,drop", [(True, None, 3, True), (False, 2, 0, True), (True, 3, 7, False)])
def test_each_pass_holds_every_window_once(data_dir, shuffle, epochs, seed, drop):
    source = loader.WindowSource(data_dir, "train", T, fields=["episode_id", "t"])
    n = len(source)
    it = iter(
        _loader(
            data_dir, shuffle=shuffle, num_epochs=epochs, seed=seed, drop_remainder=drop, fields=["episode_id", "t"]
        )
    )
    batches = _take(it, 2 * n // B) if epochs is None else list(it)
    if epochs is not None:  # every window of every pass, the last batch short unless dropped
        assert len(batches) == (n * epochs // B if drop else -(-n * epochs // B))
    got = [(int(e), int(t)) for b in batches for e, t in zip(b["episode_id"][:, 0], b["t"][:, 0])]
    every = sorted((int(w["episode_id"][0]), int(w["t"][0])) for w in (source[k] for k in range(n)))
    passes = [got[i : i + n] for i in range(0, len(got) - n + 1, n)]
    assert len(passes) >= 2 and all(sorted(p) == every for p in passes)
    assert (passes[0] == passes[1]) == (not shuffle)  # reshuffled every pass
    if not shuffle:
        assert passes[0] == [(int(w["episode_id"][0]), int(w["t"][0])) for w in (source[k] for k in range(n))]
    again = iter(
        _loader(
            data_dir, shuffle=shuffle, num_epochs=epochs, seed=seed, drop_remainder=drop, fields=["episode_id", "t"]
        )
    )
    _assert_same_batches(batches[:4], _take(again, 4))


def test_batched_decode_equals_window_by_window(data_dir):
    source = loader.WindowSource(data_dir, "train", T)
    source[0]  # learns the layout: later batches take the batched path
    ks = [5, 0, 7, 20, len(source) - 1]  # 7 and 20 cross shards
    _assert_same_batches([loader.stack_windows([source[k] for k in ks])], [source.batch(ks)])


def test_read_range_reads_what_a_range_read_does(data_dir):
    path = writer.shard_paths(data_dir, writer.read_manifest(data_dir), "train")[0]
    reader = ArrayRecordReader(path, loader.READER_OPTIONS)
    for begin, end in [(0, 4), (13, 20), (5, 6)]:
        assert loader.read_range(reader, begin, end) == reader.read(begin, end)
    assert loader.read_range(reader, 3, 3) == []
    reader.close()


def test_batches_per_element_follows_the_batch_bytes():
    assert loader.auto_batches_per_element(loader.ELEMENT_BYTES) == 1
    assert loader.auto_batches_per_element(10 * loader.ELEMENT_BYTES) == 1  # one big batch per element
    assert loader.auto_batches_per_element(loader.ELEMENT_BYTES // 4) == 4
    assert loader.auto_batches_per_element(loader.ELEMENT_BYTES // 4 - 1) == 5  # enough to reach ELEMENT_BYTES
    assert loader.auto_batches_per_element(1) == loader.MAX_BATCHES_PER_ELEMENT


def _keys(batches):
    return [[(int(e), int(t)) for e, t in zip(b["episode_id"][:, 0], b["t"][:, 0])] for b in batches]


@pytest.mark.parametrize(
    "epochs,drop,shard",
    [(None, True, (0, 1)), (2, False, (0, 1)), (2, True, (1, 3)), (3, False, (2, 3)), (None, True, (1, 2))],
)
def test_batches_do_not_depend_on_how_many_an_element_holds(data_dir, epochs, drop, shard):
    def batches(k):
        it = iter(
            _loader(
                data_dir,
                num_epochs=epochs,
                drop_remainder=drop,
                batches_per_element=k,
                shard_options=grain.sharding.ShardOptions(*shard, drop_remainder=True),
                fields=["episode_id", "t"],
            )
        )
        return _take(it, 23) if epochs is None else list(it)

    want = batches(1)
    for k in (3, 64):
        _assert_same_batches(want, batches(k))
    n = loader.num_windows(data_dir, "train", T)
    if epochs is not None:  # shard p of P: global batches p, p+P, ...; as many per shard
        everything = _keys(
            list(
                iter(
                    _loader(
                        data_dir,
                        num_epochs=epochs,
                        drop_remainder=drop,
                        batches_per_element=1,
                        fields=["episode_id", "t"],
                    )
                )
            )
        )
        assert len(everything) == (n * epochs // B if drop else -(-n * epochs // B))
        p, count = shard
        assert _keys(want) == everything[p : len(everything) // count * count : count]


@pytest.mark.parametrize("taken", [0, 2, 3, 5])
def test_resume_inside_an_element(data_dir, taken):
    """3 batches per element: a state taken before, inside and at the end of an element."""

    def make():
        return iter(_loader(data_dir, batches_per_element=3, fields=["episode_id", "t"]))

    it = make()
    _take(it, taken)
    state = it.get_state()
    want = _take(it, 7)
    resumed = make()
    resumed.set_state(state)
    assert resumed.get_state() == state  # nothing read yet: the same position
    _assert_same_batches(want, _take(resumed, 7))
    with pytest.raises(ValueError, match="not a data position"):
        make().set_state(b'{"last_seen_indices": {"0": 3}}')  # grain's own state, not this loader's


def test_two_workers_are_deterministic_and_resume_exactly(data_dir):
    it = iter(_loader(data_dir, worker_count=2))
    _take(it, 3)
    state = it.get_state()
    want = _take(it, 5)
    del it
    again = iter(_loader(data_dir, worker_count=2))
    first = _take(again, 8)
    del again
    _assert_same_batches(want, first[3:])  # the same seed and worker count: the same batches
    _assert_same_batches(first, _take(iter(_loader(data_dir)), 8))  # and the same without workers
    resumed = iter(_loader(data_dir, worker_count=2))
    resumed.set_state(state)
    got = _take(resumed, 5)
    del resumed
    _assert_same_batches(want, got)


_PROCESS_SCRIPT = """
import json, sys
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from data_pipelines import loader

def make():
    return loader.make_loader(sys.argv[3], split="train", frames_per_clip=4, batch_size=2, seed=0,
                              worker_count=int(sys.argv[4]))

def keys(batches):
    return [[int(e), int(t)] for b in batches for e, t in zip(b["episode_id"][:, 0], b["t"][:, 0])]

it = iter(make())
before = [next(it) for _ in range(3)]
state = it.get_state()
want = [next(it) for _ in range(4)]
del it
resumed = iter(make())
resumed.set_state(state)
got = [next(resumed) for _ in range(4)]
del resumed
same = all((w[k] == g[k]).all() for w, g in zip(want, got) for k in w)
print(json.dumps({"process": jax.process_index(), "same": same, "windows": keys(before + want)}))
"""


@pytest.mark.multiprocess
def test_two_jax_processes_resume_their_own_disjoint_shards(data_dir):
    """Two JAX processes (jax.distributed on localhost, ShardByJaxProcess), each with two
    grain workers: after restoring its iterator state, each yields exactly the batches it
    would have without the interruption, and the processes read disjoint windows."""
    port = free_port()
    procs = start(lambda i: ["-c", _PROCESS_SCRIPT, f"127.0.0.1:{port}", str(i), str(data_dir), "2"], 2)
    outs = finish(procs)
    results = []
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["process"] for r in results) == [0, 1]
    assert all(r["same"] for r in results)
    windows = [{tuple(w) for w in r["windows"]} for r in results]
    assert len(windows[0]) == len(windows[1]) == 7 * 2  # 7 batches of 2 distinct windows each
    assert not windows[0] & windows[1]
