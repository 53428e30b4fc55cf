import hashlib
import json

import pytest

from data_pipelines import datasets, writer
from data_pipelines.schema import DatasetError
from data_pipelines.sources import procedural

S, E = 16, 2


def _episodes(ids, frames=10):
    for i in ids:
        yield procedural.generate_episode(0, i, frames, size=S, num_entities=E)


def _write(out, splits, records_per_shard=15):
    return writer.write_dataset(
        out,
        splits,
        source="procedural",
        source_params={"size": S},
        generator_version="1.0",
        frame_size=S,
        num_entities=E + 1,
        fps=procedural.FPS,
        records_per_shard=records_per_shard,
    )


def test_manifest_indexes_shards_and_episodes(tmp_path):
    out = tmp_path / "ds"
    manifest = _write(out, {"train": _episodes(range(4)), "val": _episodes([7], frames=12)})
    assert json.loads((out / "manifest.json").read_text()) == manifest
    train = manifest["splits"]["train"]
    assert [s["records"] for s in train["shards"]] == [15, 15, 10]
    assert [s["path"] for s in train["shards"]][0] == "train/shard-00000-of-00003.array_record"
    assert train["episodes"][2] == {"episode_id": 2, "start": 20, "length": 10}
    assert manifest["splits"]["val"]["num_records"] == 12
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            assert hashlib.sha256((out / shard["path"]).read_bytes()).hexdigest() == shard["sha256"]
    assert manifest["schema_version"] == 1 and manifest["codec"] == "raw"
    assert manifest["fields"]["frame"] == {"dtype": "uint8", "shape": [S, S, 3]}
    assert writer.verify_dataset(out) == manifest


def test_verify_names_a_corrupt_shard(tmp_path):
    out = tmp_path / "ds"
    manifest = _write(out, {"train": _episodes(range(3))})
    shard = out / manifest["splits"]["train"]["shards"][1]["path"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=f"{shard.name}.*sha256.*expects"):
        writer.verify_dataset(out)
    shard.unlink()
    with pytest.raises(DatasetError, match=f"{shard.name} is missing"):
        writer.verify_dataset(out)


def test_read_manifest_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        writer.read_manifest(tmp_path / "nope")
    with pytest.raises(DatasetError, match="manifest.json is missing"):
        writer.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        writer.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 99, "splits": {}}))
    with pytest.raises(DatasetError, match="schema version 99 is unsupported"):
        writer.read_manifest(tmp_path)


def test_failure_mid_write_leaves_nothing(tmp_path):
    def failing():
        yield from _episodes(range(3))
        raise RuntimeError("source crashed")

    out = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="source crashed"):
        _write(out, {"train": _episodes(range(2)), "val": failing()})
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    with pytest.raises(DatasetError, match="already exists"):
        _write(out, {"train": _episodes([0])})
    assert list(out.iterdir()) == []


def test_make_dataset_and_stats(tmp_path):
    out = tmp_path / "ds"
    manifest = datasets.make_dataset("procedural", out, episodes=5, frames=20, size=S, seed=3, num_entities=E)
    assert {k: len(v["episodes"]) for k, v in manifest["splits"].items()} == {"train": 3, "val": 1, "test": 1}
    stats = datasets.dataset_stats(out)
    train = stats["splits"]["train"]
    assert train["episodes"] == 3 and train["frames"] == 60
    assert sum(train["action_histogram"].values()) == 60
    assert 0 < train["cut_rate"] <= 3 * 2 / 60
    assert stats["frame_size"] == S
    with pytest.raises(DatasetError, match="known sources: \\['atari', 'mujoco', 'procedural', 'video'\\]"):
        datasets.make_dataset("nope", tmp_path / "x", episodes=2, frames=2, size=S)
