"""Sharded ArrayRecord writer + manifest, written atomically (temp dir → rename).

Layout::

    OUT/manifest.json
    OUT/<split>/shard-00000-of-00002.array_record   (group_size:1: cheap random access)
    OUT/<path>                                      (optional source files, e.g. replay/…)

The manifest indexes episodes per split by (start, length), where start is the record
index within the split's shards concatenated in order; a reader never scans shards to
find episode boundaries. Other files a source stores (Atari: each episode's emulator
start state) are listed under "files" with their sha256, verified like the shards.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from data_pipelines import schema
from data_pipelines.schema import DatasetError

MANIFEST = "manifest.json"
WRITER_OPTIONS = "group_size:1"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.array_record"


def _check_episode(episode: list[dict], spec: schema.Spec) -> int:
    """Validates an episode's records; returns its episode id."""
    if not episode:
        raise DatasetError("empty episode")
    episode_id = int(episode[0]["episode_id"])
    for i, rec in enumerate(episode):
        schema.validate_record(rec, spec)
        if int(rec["episode_id"]) != episode_id or int(rec["t"]) != i:
            raise DatasetError(
                f"episode {episode_id}: record {i} has episode_id={int(rec['episode_id'])}, t={int(rec['t'])}"
            )
    return episode_id


def _write_split(split_dir: Path, episodes: Iterable[list[dict]], spec: schema.Spec, records_per_shard: int) -> dict:
    """Writes one split's shards into split_dir; returns its manifest entry."""
    split_dir.mkdir(parents=True)
    counts, index, writer = [], [], None
    num_records = 0
    for episode in episodes:
        index.append({"episode_id": _check_episode(episode, spec), "start": num_records, "length": len(episode)})
        for rec in episode:
            if writer is None:
                # The final shard count is unknown until the end: write numbered temp
                # names, renamed once the count is known.
                part = split_dir / f"part-{len(counts):05d}"
                writer = ArrayRecordWriter(str(part), WRITER_OPTIONS)
                counts.append(0)
            writer.write(schema.encode_record(rec))
            counts[-1] += 1
            num_records += 1
            if counts[-1] == records_per_shard:
                writer.close()
                writer = None
    if writer is not None:
        writer.close()
    shards = []
    for i, n in enumerate(counts):
        path = split_dir / _shard_name(i, len(counts))
        os.rename(split_dir / f"part-{i:05d}", path)
        shards.append({"path": f"{split_dir.name}/{path.name}", "records": n, "sha256": sha256_file(path)})
    return {"shards": shards, "episodes": index, "num_records": num_records}


def _write_files(root: Path, files: Iterable[tuple[str, bytes]]) -> list[dict]:
    """Writes (relative POSIX path, bytes) pairs under root; returns their manifest entries."""
    entries = []
    for rel, data in files:
        parts = PurePosixPath(rel).parts
        # Paths come from the source, but the manifest must never point outside the dataset.
        if not parts or PurePosixPath(rel).is_absolute() or ".." in parts:
            raise DatasetError(f"file path {rel!r} must be relative and inside the dataset")
        path = root.joinpath(*parts)
        if path.exists() or rel == MANIFEST:
            raise DatasetError(f"file path {rel!r} is used twice or clashes with the dataset's own files")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        entries.append({"path": rel, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    return entries


def content_hash(splits: dict, files: list[dict] = ()) -> str:
    """sha256 over every shard's sha256 (splits and shards in manifest order), then every
    listed file's sha256 (a dataset without files hashes as before files existed)."""
    digest = hashlib.sha256()
    for entry in splits.values():
        for shard in entry["shards"]:
            digest.update(shard["sha256"].encode())
    for entry in files:
        digest.update(entry["sha256"].encode())
    return digest.hexdigest()


def write_dataset(
    out_dir: str | os.PathLike,
    splits: dict[str, Iterable[list[dict]]],
    *,
    source: str,
    source_params: dict,
    generator_version: str,
    frame_size: int,
    fps: float,
    num_entities: int | None = None,
    spec: schema.Spec | None = None,
    files: Iterable[tuple[str, bytes]] = (),
    records_per_shard: int = 4096,
) -> dict:
    """Writes `splits` (split name → iterable of episodes, each a list of schema-v1
    records) as a dataset at out_dir and returns the manifest.

    `spec` is the records' field spec; a field it lacks (e.g. `camera` for Atari) is
    unknown for every frame of the dataset. Without it, the full schema-v1 spec with
    `num_entities` = E entity slots per record (agent included). `files` are
    (relative path, bytes) pairs stored beside the shards (read after the splits, so
    they may be generated lazily). Nothing exists at out_dir unless the whole dataset
    was written; an existing out_dir is refused.
    """
    out = Path(out_dir)
    if out.exists():
        raise DatasetError(f"{out} already exists; refusing to overwrite a dataset")
    if records_per_shard < 1:
        raise DatasetError(f"records_per_shard must be >= 1, got {records_per_shard}")
    if (spec is None) == (num_entities is None):
        raise DatasetError("write_dataset takes exactly one of `spec` and `num_entities`")
    if spec is None:
        spec = schema.field_spec(frame_size, num_entities)
    if spec["frame"][1][:2] != (frame_size, frame_size):
        raise DatasetError(f"spec frames are {spec['frame'][1]}, frame_size is {frame_size}")
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        split_entries = {
            name: _write_split(tmp / name, episodes, spec, records_per_shard) for name, episodes in splits.items()
        }
        file_entries = _write_files(tmp, files)
        manifest = {
            "schema_version": schema.SCHEMA_VERSION,
            "fields": schema.spec_to_json(spec),
            "codec": schema.CODEC,
            "frame_size": frame_size,
            # 0: the records carry no entity fields.
            "num_entities": int(spec["entity_ids"][1][0]) if "entity_ids" in spec else 0,
            "fps": fps,
            "source": source,
            "source_params": source_params,
            "generator_version": generator_version,
            "splits": split_entries,
            "files": file_entries,
            "content_hash": content_hash(split_entries, file_entries),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_manifest(data_dir: str | os.PathLike) -> dict:
    """The parsed manifest; DatasetError if the directory or manifest is missing or bad."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetError(f"dataset directory {root} " + ("is not a directory" if root.exists() else "does not exist"))
    path = root / MANIFEST
    if not path.is_file():
        raise DatasetError(f"{path} is missing: {root} is not a dataset (or was not finished)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or "splits" not in manifest:
        raise DatasetError(f"{path} has no 'splits' entry")
    version = manifest.get("schema_version")
    if version != schema.SCHEMA_VERSION:
        raise DatasetError(
            f"{path}: schema version {version!r} is unsupported (this code reads version {schema.SCHEMA_VERSION})"
        )
    return manifest


def shard_paths(data_dir: str | os.PathLike, manifest: dict, split: str) -> list[str]:
    """Absolute paths of a split's shards, in order; DatasetError for an unknown split."""
    if split not in manifest["splits"]:
        raise DatasetError(f"split {split!r} not in dataset {data_dir} (has {sorted(manifest['splits'])})")
    return [str(Path(data_dir) / s["path"]) for s in manifest["splits"][split]["shards"]]


def _check_sha256(path: Path, actual: str, entry: dict) -> None:
    if actual != entry["sha256"]:
        raise DatasetError(f"file {path} is corrupt: sha256 {actual}, manifest expects {entry['sha256']}")


def _check_file(path: Path, entry: dict, check_hashes: bool) -> None:
    """Raises DatasetError naming `path` if it is missing or (optionally) its sha256
    differs from its manifest entry."""
    if not path.is_file():
        raise DatasetError(f"file {path} is missing")
    if check_hashes:
        _check_sha256(path, sha256_file(path), entry)


def read_file(data_dir: str | os.PathLike, manifest: dict, rel: str) -> bytes:
    """The bytes of a file listed in the manifest's "files", checked against its sha256;
    DatasetError naming the file if it is unlisted, missing or corrupt."""
    entry = next((f for f in manifest.get("files", []) if f["path"] == rel), None)
    if entry is None:
        raise DatasetError(f"{rel} is not listed in the manifest of {data_dir}")
    path = Path(data_dir) / rel
    if not path.is_file():
        raise DatasetError(f"file {path} is missing")
    data = path.read_bytes()
    _check_sha256(path, hashlib.sha256(data).hexdigest(), entry)
    return data


def verify_dataset(data_dir: str | os.PathLike, check_hashes: bool = True) -> dict:
    """Checks shards exist, hold the recorded number of records and (optionally) match
    their sha256, and likewise the listed files; returns the manifest, or raises
    DatasetError naming the shard or file (or the manifest, when it lacks an entry)."""
    manifest = read_manifest(data_dir)
    with malformed_as_dataset_error(data_dir):
        _verify_contents(Path(data_dir), manifest, check_hashes)
    return manifest


@contextlib.contextmanager
def malformed_as_dataset_error(data_dir: str | os.PathLike) -> Iterator[None]:
    """Code reading a manifest's entries runs in this: an entry missing or of another shape
    (KeyError, TypeError, ...) becomes a DatasetError naming the manifest."""
    try:
        yield
    except DatasetError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as e:
        raise DatasetError(f"{Path(data_dir) / MANIFEST} is malformed: {type(e).__name__} {e}") from None


def _verify_contents(root: Path, manifest: dict, check_hashes: bool) -> None:
    for entry in manifest.get("files", []):  # datasets written before "files" have none
        _check_file(root / entry["path"], entry, check_hashes)
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            path = root / shard["path"]
            if not path.is_file():
                raise DatasetError(f"split {split!r}: shard {path} is missing")
            if check_hashes:
                actual = sha256_file(path)
                if actual != shard["sha256"]:
                    raise DatasetError(f"shard {path} is corrupt: sha256 {actual}, manifest expects {shard['sha256']}")
            try:
                reader = ArrayRecordReader(str(path))
                count = reader.num_records()
                reader.close()
            except Exception as e:  # the C++ reader raises plain RuntimeError/ValueError
                raise DatasetError(f"shard {path} is unreadable: {e}") from e
            if count != shard["records"]:
                raise DatasetError(f"shard {path} holds {count} records, manifest says {shard['records']}")
        total = sum(s["records"] for s in entry["shards"])
        indexed = sum(e["length"] for e in entry["episodes"])
        if not total == indexed == entry["num_records"]:
            raise DatasetError(
                f"split {split!r}: shards hold {total} records, episode index "
                f"covers {indexed}, manifest says {entry['num_records']}"
            )


def find_episode(manifest: dict, episode_id: int) -> tuple[str, dict]:
    """(split, {episode_id, start, length} index entry) of an episode; DatasetError if absent."""
    for split, entry in manifest["splits"].items():
        for episode in entry["episodes"]:
            if episode["episode_id"] == episode_id:
                return split, episode
    raise DatasetError(f"episode {episode_id} is not in the dataset")


def read_episode(data_dir: str | os.PathLike, manifest: dict, episode_id: int) -> dict:
    """Every field of one episode's records stacked to [T, ...] (frame uint8 [T, S, S, 3],
    action int32 [T], ...), read from the shards that hold it."""
    split, episode = find_episode(manifest, episode_id)
    start, stop = episode["start"], episode["start"] + episode["length"]
    data, offset = [], 0
    for shard, path in zip(manifest["splits"][split]["shards"], shard_paths(data_dir, manifest, split)):
        lo, hi = max(start - offset, 0), min(stop - offset, shard["records"])
        if lo < hi:
            reader = ArrayRecordReader(path)
            data += reader.read(lo, hi)
            reader.close()
        offset += shard["records"]
    records = [schema.decode_record(d) for d in data]
    return {k: np.stack([r[k] for r in records]) for k in records[0]}
