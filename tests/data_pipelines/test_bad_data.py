"""Bad data is reported with its file and record, or (data.skip_bad_records) skipped and counted."""

import hashlib
import json
import re
import shutil

import grain
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from conftest import PRESET, TINY_OVERRIDES
from data_pipelines import datasets, loader, schema, writer
from data_pipelines.schema import DatasetError
from wm_jax import config as config_lib
from wm_jax.cli import main
from wm_jax.run import check_dataset
from wm_jax.telemetry import read_metrics
from wm_jax.train.loop import train

S, T = 16, 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "ds"
    # 3 episodes of 12 steps in shards of 16, 16 and 4 records.
    datasets.make_dataset(
        "procedural", out, episodes=3, frames=12, size=S, val_fraction=0, test_fraction=0, records_per_shard=16
    )
    return out


@pytest.fixture
def copy(dataset, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(dataset, out)
    return out


def _shard(data_dir, index, split="train"):
    return data_dir / writer.read_manifest(data_dir)["splits"][split]["shards"][index]["path"]


def _rewrite_shard(data_dir, index, edit, update_hash=True, split="train"):
    """Re-encodes shard `index` with edit(record index in the shard, record) applied to
    every record; with update_hash the manifest is made to match (as a buggy writer would)."""
    path = _shard(data_dir, index, split)
    reader = ArrayRecordReader(str(path))
    records = [schema.decode_record(d) for d in reader.read(0, reader.num_records())]
    reader.close()
    out = ArrayRecordWriter(str(path), writer.WRITER_OPTIONS)
    for i, rec in enumerate(records):
        out.write(schema.encode_record(edit(i, dict(rec))))
    out.close()
    if update_hash:
        manifest = writer.read_manifest(data_dir)
        manifest["splits"][split]["shards"][index]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        manifest["content_hash"] = writer.content_hash(manifest["splits"], manifest["files"])
        (data_dir / writer.MANIFEST).write_text(json.dumps(manifest))


def _narrow_frame(bad):
    """An edit giving the records whose index is in `bad` a frame one column short."""
    return lambda i, rec: {**rec, "frame": rec["frame"][:, :-1]} if i in bad else rec


def _windows(data_dir, **kw):
    """(window results, errors) of every window of the train split, in order."""
    source = loader.WindowSource(data_dir, "train", T, **kw)
    results, errors = [], []
    for k in range(len(source)):
        try:
            results.append(source[k])
        except DatasetError as e:
            errors.append((k, str(e)))
    return results, errors


def test_truncated_shard_is_named(copy, capsys):
    shard = _shard(copy, 1)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(DatasetError, match=f"shard .*{shard.name} is corrupt: sha256"):
        writer.verify_dataset(copy)
    with pytest.raises(DatasetError, match=f"shard .*{shard.name} is unreadable"):
        writer.verify_dataset(copy, check_hashes=False)
    with pytest.raises(DatasetError, match=f"shard .*{shard.name} is unreadable"):
        loader.make_loader(copy, split="train", frames_per_clip=T, batch_size=2, seed=0)
    assert main(["data", "inspect", str(copy)]) == 2
    assert shard.name in capsys.readouterr().err


def test_flipped_byte_is_named_with_shard_and_record(copy, capsys):
    shard = _shard(copy, 0)
    data = bytearray(shard.read_bytes())
    data[1024] ^= 0xFF  # inside the first records' chunks (each record is its own chunk)
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=f"shard .*{shard.name} is corrupt: sha256 .* manifest expects"):
        writer.verify_dataset(copy)
    assert main(["data", "inspect", str(copy)]) == 2
    assert shard.name in capsys.readouterr().err
    # The loader (which trusts the start-of-training check) names the record it cannot read.
    _, errors = _windows(copy)
    assert errors
    found = {int(re.match(rf"bad record (\d+) of shard \S*{shard.name}: Corrupted", e).group(1)) for _, e in errors}
    assert len(found) == 1
    bad = found.pop()  # shard 0 starts the split: its record index is the split's
    starts = loader.window_starts(writer.read_manifest(copy)["splits"]["train"]["episodes"], T)
    assert [k for k, _ in errors] == [k for k, s in enumerate(starts) if s <= bad < s + T]


@pytest.mark.parametrize(
    "edit, words",
    [
        (_narrow_frame({5}), r"field 'frame': shape \(16, 15, 3\), expected \(16, 16, 3\)"),
        (
            lambda i, rec: {**rec, "action": rec["action"].astype(np.float32)} if i == 5 else rec,
            "field 'action': dtype float32, expected int32",
        ),
        (
            lambda i, rec: {k: v for k, v in rec.items() if k != "cut"} if i == 5 else rec,
            r"missing field\(s\) \['cut'\]",
        ),
    ],
    ids=["shape", "dtype", "missing"],
)
def test_record_mismatching_the_manifest_names_shard_record_and_field(copy, capsys, edit, words):
    _rewrite_shard(copy, 1, edit)
    writer.verify_dataset(copy)  # the shards are intact: only the records are wrong
    shard = _shard(copy, 1)
    message = rf"bad record 5 of shard \S*{shard.name}: .*{words}"
    batches = loader.make_loader(
        copy,
        split="train",
        frames_per_clip=T,
        batch_size=4,
        seed=0,
        shuffle=False,
        num_epochs=1,
        shard_options=grain.sharding.NoSharding(),
    )
    with pytest.raises(DatasetError, match=message):
        list(batches)
    assert main(["data", "inspect", str(copy)]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_skip_bad_records_replaces_each_bad_window_and_counts_it(copy):
    _rewrite_shard(copy, 1, _narrow_frame({5}))  # record 16 + 5 of the split
    starts = loader.window_starts(writer.read_manifest(copy)["splits"]["train"]["episodes"], T)
    bad = [k for k, s in enumerate(starts) if s <= 21 < s + T]
    results, errors = _windows(copy, skip_bad_records=True)
    assert not errors and len(results) == len(starts)
    assert [k for k, r in enumerate(results) if r[loader.SKIPPED]] == bad
    # A bad window's stand-in is the next good one.
    np.testing.assert_array_equal(results[bad[0]]["t"], results[bad[-1] + 1]["t"])
    batches = loader.make_loader(
        copy,
        split="train",
        frames_per_clip=T,
        batch_size=3,
        seed=0,
        num_epochs=1,
        shard_options=grain.sharding.NoSharding(),
        skip_bad_records=True,
    )
    batches = list(batches)
    assert sum(int(b[loader.SKIPPED].sum()) for b in batches) == len(bad)
    assert all(b["frame"].shape == (3, T, S, S, 3) and b[loader.SKIPPED].shape == (3,) for b in batches)


def test_start_of_training_tolerates_hash_mismatches_only_when_skipping(copy):
    _rewrite_shard(copy, 1, _narrow_frame({5}), update_hash=False)
    cfg = config_lib.load(PRESET, TINY_OVERRIDES + [f"data.dir={copy}"])
    warnings = []
    with pytest.raises(DatasetError, match="shard-00001.*sha256"):
        check_dataset(cfg, str(copy), "train", warn=warnings.append)
    skipping = config_lib.replace(cfg, ["data.skip_bad_records=true"])
    assert check_dataset(skipping, str(copy), "train", warn=warnings.append)["frame_size"] == S
    assert len(warnings) == 1 and re.search("shard-00001.*sha256.*skip_bad_records", warnings[0])
    shard = _shard(copy, 1)  # an unreadable shard is refused either way
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(DatasetError, match=f"{shard.name} is unreadable"):
        check_dataset(skipping, str(copy), "train", warn=warnings.append)


@pytest.mark.slow
def test_training_skips_and_logs_bad_records(tmp_path, tiny_dataset):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    # Most records of the train split are bad, and the shard no longer matches its hash.
    _rewrite_shard(data, 0, _narrow_frame(set(range(120))), update_hash=False)
    overrides = TINY_OVERRIDES + [f"data.dir={data}", "train.steps=2", "checkpoint.every_steps=100"]
    run = tmp_path / "run"
    train(config_lib.load(PRESET, overrides + ["data.skip_bad_records=true"]), run)
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["bad_windows_skipped"] > 0
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    bad = [e for e in events if e["event"] == "bad_data"]
    assert "sha256" in bad[0]["message"] and bad[-1]["total"] == rows[-1]["bad_windows_skipped"]
