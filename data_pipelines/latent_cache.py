"""Latent cache: a dataset's frames encoded once by a trained tokenizer, as FSQ token ids
(kind "ids") or, for a continuous bottleneck, as its float latents (kind "latents").

Layout::

    OUT/manifest.json      written last: a directory without it is an incomplete cache
    OUT/progress.json      only while a build is unfinished: what is written so far
    OUT/<split>.zarr/      tensorstore zarr3 array, one row per record of the split
                           (record order of the dataset's shards): token ids [R, N] (N
                           tokens per frame) in the smallest unsigned integer holding the
                           vocabulary prod(fsq_levels), or latents [R, N, D] (D =
                           latent_dim) in float16; chunks of `chunk_records` whole
                           records, zstd-compressed with a checksum

Latents are stored as float16: the continuous bottleneck bounds them with tanh to
[-1, 1], where float16 rounds by at most 2^-12 (~2.4e-4), in half the bytes of float32;
the diffusion losses move by ~1e-5 relative (measured: docs/data.md).

Which frames are encoded together. The tokenizer's encoder attends causally across
time and adds a per-frame temporal position (`VideoTokenizer.encode`), so a frame's codes
depend on its place in the clip it is encoded in. The cache encodes every episode in
consecutive windows of C = the tokenizer run's `data.frames_per_clip` frames from its
first frame (the last window of an episode may be shorter): the codes of frame t of an
episode are those of `wm_jax.inference.rollout.encode_frames(tokenizer, params, episode[None], C)`.
A clip cut elsewhere (a training window that starts mid-window, say) encodes to other
codes: its frames have other positions and predecessors. Windows are encoded `batch_size`
at a time, padded to one compiled shape [batch_size, C, S, S, 3]; causality keeps the
padding out of the real frames' codes. Only `frame` is cached (not `reference`).

Guarantees. `progress.json` (replaced atomically) names how many batches of each split
are written; a build that stops (killed, or an exception) resumes at the next batch when
run again with the same arguments and writes the same bytes as one that never stopped
(the batches, hence every encode, are the same). `manifest.json` (atomic, last) records
the dataset's content hash, the tokenizer run's step, a hash of its `model.tokenizer`
and `model.image_size` config and a fingerprint of that step's checkpoint files (so a
tokenizer retrained to the same step in the same workdir is another tokenizer), and per
split a sha256 over the stored values, and the kind (a manifest without one is of ids).
`open_cache` refuses an incomplete cache, another dataset or another tokenizer;
`verify_cache` re-hashes every split.

This module owns the format, writing and reading; it takes the encoder as a function
(`CacheEncoder`). Restoring a tokenizer run into one is `wm_jax.latent_cache`'s job: the
data layer imports nothing from `wm_jax`.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts
from array_record.python.array_record_module import ArrayRecordReader

from data_pipelines import loader, schema, writer
from data_pipelines.schema import DatasetError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
ZSTD_LEVEL = 3
KINDS = ("ids", "latents")
# The dtype `LatentCache.read` returns per kind: int32 ids, float32 latents.
READ_DTYPES = {"ids": np.dtype(np.int32), "latents": np.dtype(np.float32)}
# The stored dtype of latents (tanh-bounded to [-1, 1]: float16 rounds them by <= 2^-12).
LATENT_DTYPE = np.dtype(np.float16)


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer dtype holding ids 0..vocab_size-1."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise DatasetError(f"a vocabulary of {vocab_size} tokens does not fit 32 bits")


@dataclass(frozen=True)
class TokenizerIdentity:
    """What a cache's codes depend on besides the frames: the tokenizer run (as named by
    the caller), its checkpoint step, a hash of its tokenizer config and a fingerprint of
    that step's parameter files."""

    workdir: str
    step: int
    config_hash: str
    fingerprint: str


@dataclass(frozen=True)
class CacheEncoder:
    """A tokenizer as the cache builder sees it. `load()` is called once the build's plan
    is checked (restoring parameters is the slow part) and returns `encode`: uint8 frames
    [B, C, S, S, 3] -> token ids [B, C, N] of an FSQ tokenizer, or float latents
    [B, C, N, latent_dim] of a continuous one (latent_dim > 0) (a JAX array is fine: it is
    read back while the next batch encodes)."""

    identity: TokenizerIdentity
    load: Callable[[], Callable[[np.ndarray], Any]]
    image_size: int
    window_frames: int  # C: the tokenizer run's data.frames_per_clip
    tokens_per_frame: int
    fsq_levels: tuple[int, ...]  # () for a continuous tokenizer
    dtype: str  # the model's activation dtype, recorded in the manifest
    latent_dim: int = 0  # > 0: a continuous tokenizer, whose latents are cached

    @property
    def kind(self) -> str:
        """What the cache stores: "ids" (FSQ token ids) or "latents"."""
        return "latents" if self.latent_dim else "ids"

    @property
    def record_shape(self) -> tuple[int, ...]:
        """A record's stored row: (N,) ids or (N, latent_dim) latents."""
        return (self.tokens_per_frame,) + ((self.latent_dim,) if self.latent_dim else ())

    @property
    def stored_dtype(self) -> np.dtype:
        """`token_dtype` of the vocabulary for ids, `LATENT_DTYPE` for latents."""
        return LATENT_DTYPE if self.latent_dim else token_dtype(math.prod(self.fsq_levels))


def encode_windows(episodes: list[dict], window_frames: int) -> np.ndarray:
    """int64 [W, 2] (first record, length) of each window: every episode ({episode_id,
    start, length} index entries) cut into consecutive windows of `window_frames` frames
    from its start, the last one shorter if need be; in record order. DatasetError unless
    the episodes tile the split's records from 0 without gaps (as the writer writes them)."""
    windows, expected = [], 0
    for episode in episodes:
        if episode["start"] != expected:
            raise DatasetError(
                f"episode {episode['episode_id']} starts at record {episode['start']}, "
                f"expected {expected}: the episode index does not tile the records"
            )
        for offset in range(0, episode["length"], window_frames):
            windows.append((episode["start"] + offset, min(window_frames, episode["length"] - offset)))
        expected += episode["length"]
    return np.asarray(windows, np.int64).reshape(-1, 2)


def _write_json(path: Path, obj: dict) -> None:
    """Writes JSON to a temp name, then renames it over `path`: readers see the old or the new file."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path} is not valid JSON: {e}") from e


def _array_spec(path: Path, records: int, record_shape: tuple[int, ...], dtype: np.dtype, chunk_records: int) -> dict:
    """The tensorstore spec creating (or opening, if it matches) a split's zarr3 array
    [records, *record_shape], chunks of whole records."""
    return {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(path)},
        "metadata": {
            "shape": [records, *record_shape],
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [chunk_records, *record_shape]}},
            "data_type": dtype.name,
            "fill_value": 0,
            "codecs": [
                {"name": "bytes", "configuration": {"endian": "little"}},
                # The checksum turns a corrupt chunk into a read error naming its file.
                {"name": "zstd", "configuration": {"level": ZSTD_LEVEL, "checksum": True}},
            ],
        },
        "create": True,
        "open": True,
    }


def _read_array(store: ts.TensorStore, first: int, count: int, what: str) -> np.ndarray:
    """Rows first..first+count-1 of a split's array in its stored dtype, [count, ...]; a
    tensorstore error (a corrupt chunk) becomes a DatasetError naming `what`. (A deleted
    chunk reads as zeros, the fill value: `verify_cache`'s hashes catch it.)"""
    try:
        return store[first : first + count].read().result()
    except ValueError as e:  # tensorstore's errors are ValueErrors naming the chunk file
        raise DatasetError(f"{what}: {e}") from e


def _content_hash(store: ts.TensorStore, rows_per_read: int, what: str) -> str:
    """sha256 over a split's stored values in record order: the little-endian bytes of
    the stored dtype, row-major ([R, N] ids or [R, N, D] latents)."""
    digest = hashlib.sha256()
    records = store.shape[0]
    for first in range(0, records, rows_per_read):
        rows = _read_array(store, first, min(rows_per_read, records - first), what)
        digest.update(np.ascontiguousarray(rows, rows.dtype.newbyteorder("<")).tobytes())
    return digest.hexdigest()


class _FrameReader:
    """Frames of a split's records, read with one `loader.read_range` per shard."""

    def __init__(self, data_dir: str | os.PathLike, manifest: dict, split: str):
        self._paths = writer.shard_paths(data_dir, manifest, split)
        self._shard_ends = np.cumsum([s["records"] for s in manifest["splits"][split]["shards"]])
        self._readers = [ArrayRecordReader(p, loader.READER_OPTIONS) for p in self._paths]

    def read(self, first: int, count: int) -> np.ndarray:
        """uint8 [count, S, S, 3]: the frames of records first..first+count-1."""
        data = [
            d
            for shard, begin, end in loader.record_ranges(self._shard_ends, first, count)
            for d in loader.read_range(self._readers[shard], begin, end)
        ]
        return np.stack([schema.decode_record(d)["frame"] for d in data])

    def close(self) -> None:
        for reader in self._readers:
            reader.close()


def _batch_frames(frames: np.ndarray, windows: np.ndarray, batch_size: int, window_frames: int) -> np.ndarray:
    """frames uint8 [R', S, S, 3] of the records a batch of windows covers (from its first
    window's first record) -> uint8 [batch_size, C, S, S, 3], each window from its slot's
    start, zero-padded after its end and after the last window (one compiled shape)."""
    out = np.zeros((batch_size, window_frames, *frames.shape[1:]), frames.dtype)
    first = windows[0, 0]
    for i, (start, length) in enumerate(windows):
        out[i, :length] = frames[start - first : start - first + length]
    return out


def _span(windows: np.ndarray) -> tuple[int, int]:
    """(first record, end record) a run of consecutive windows [W, 2] covers."""
    return int(windows[0, 0]), int(windows[-1].sum())


def _unbatch(values: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """values [B, C, ...] of a batch -> [R', ...] of the records its windows cover, in order."""
    return np.concatenate([values[i, :length] for i, (_, length) in enumerate(windows)])


def _encode_batches(
    encode: Callable[[np.ndarray], Any],
    read_frames: Callable[[int, int], np.ndarray],
    batches: list[np.ndarray],
    first_index: int,
    batch_size: int,
    window_frames: int,
    write: Callable[[int, np.ndarray], None],
) -> None:
    """Encodes each batch of windows (int64 [<=batch_size, 2]) in order and calls
    write(first_index + k, values [R', ...] of the records batch k covers).

    encode: uint8 frames [batch_size, C, S, S, 3] -> ids [batch_size, C, N] or latents
    [batch_size, C, N, D], a JAX array computed asynchronously: batch k encodes while
    batch k-1 is written.
    read_frames(first, count): uint8 [count, S, S, 3] of consecutive records."""
    pending = None
    for k, windows in enumerate(batches, first_index):
        first, end = _span(windows)
        values = encode(_batch_frames(read_frames(first, end - first), windows, batch_size, window_frames))
        if pending is not None:
            write(pending[0], _unbatch(np.asarray(pending[1]), pending[2]))
        pending = (k, values, windows)
    if pending is not None:
        write(pending[0], _unbatch(np.asarray(pending[1]), pending[2]))


def _start_progress(root: Path, plan: dict) -> dict[str, int]:
    """Batches already written per split: {} for a new build (root is created, or must be
    empty), or those of the unfinished build in root, which must have the same plan."""
    if (root / MANIFEST).exists():
        raise DatasetError(f"{root} is already a finished latent cache; remove it to build it again")
    path = root / PROGRESS
    if path.is_file():
        progress = _read_json(path)
        if progress["plan"] != plan:
            diff = sorted(k for k in plan if progress["plan"].get(k) != plan[k])
            raise DatasetError(
                f"{root} holds an unfinished latent cache built with other settings "
                f"(differing: {diff}); build it with the same ones, or remove it"
            )
        return progress["done"]
    if root.exists() and any(root.iterdir()):
        raise DatasetError(f"{root} is not empty and is not a latent cache; refusing to write into it")
    root.mkdir(parents=True, exist_ok=True)
    # Written before any array: a directory with arrays always has its plan beside them.
    _write_json(path, {"plan": plan, "done": {}})
    return {}


def _checked_inputs(
    data_dir: str | os.PathLike,
    encoder: CacheEncoder,
    splits: Iterable[str] | None,
    batch_size: int,
    chunk_records: int,
) -> tuple[dict, list[str]]:
    """The verified dataset's manifest and the splits to encode (default: all); DatasetError
    for bad sizes, a bad dataset, an unknown split or frames the encoder does not take."""
    if batch_size < 1 or chunk_records < 1:
        raise DatasetError(f"batch_size ({batch_size}) and chunk_records ({chunk_records}) must be >= 1")
    data = writer.verify_dataset(data_dir)
    splits = list(data["splits"]) if splits is None else list(splits)
    for split in splits:
        writer.shard_paths(data_dir, data, split)  # DatasetError naming an unknown split
    if data["frame_size"] != encoder.image_size:
        raise DatasetError(
            f"tokenizer {encoder.identity.workdir} encodes {encoder.image_size}x{encoder.image_size} "
            f"frames, dataset {data_dir} has {data['frame_size']}x{data['frame_size']}"
        )
    return data, splits


def _kind_fields(encoder: CacheEncoder) -> dict:
    """The manifest's description of what is stored: the kind, and the FSQ levels and
    vocabulary of ids or the width of latents."""
    if encoder.kind == "latents":
        return {"kind": "latents", "latent_dim": encoder.latent_dim}
    return {"kind": "ids", "fsq_levels": list(encoder.fsq_levels), "vocab_size": math.prod(encoder.fsq_levels)}


def _finished_manifest(plan: dict, data: dict, encoder: CacheEncoder, entries: dict) -> dict:
    """The manifest of a cache whose splits (`entries`) are all written."""
    who = encoder.identity
    return {
        "format_version": FORMAT_VERSION,
        **_kind_fields(encoder),
        "dataset": {"dir": plan["data_dir"], "content_hash": data["content_hash"], "frame_size": data["frame_size"]},
        "tokenizer": {
            "workdir": plan["tokenizer_workdir"],
            "step": who.step,
            "config_hash": who.config_hash,
            "fingerprint": who.fingerprint,
            "window_frames": plan["window_frames"],
            "batch_size": plan["batch_size"],
            "dtype": encoder.dtype,
        },
        "tokens_per_frame": encoder.tokens_per_frame,
        "splits": entries,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }


def _build_plan(
    data_dir: str | os.PathLike,
    content_hash: str,
    encoder: CacheEncoder,
    batch_size: int,
    chunk_records: int,
    splits: list[str],
) -> dict:
    """What a build is of (dataset, tokenizer) and how (windows, batches, chunks): a resumed
    build must match it."""
    who = encoder.identity
    return {
        "format_version": FORMAT_VERSION,
        "data_dir": str(Path(data_dir).resolve()),
        "content_hash": content_hash,
        "tokenizer_workdir": str(Path(who.workdir).resolve()),
        "tokenizer_step": who.step,
        "tokenizer_hash": who.config_hash,
        "tokenizer_fingerprint": who.fingerprint,
        "window_frames": encoder.window_frames,
        "kind": encoder.kind,
        "dtype": encoder.stored_dtype.name,
        "batch_size": batch_size,
        "chunk_records": chunk_records,
        "splits": splits,
    }


def write_cache(
    data_dir: str | os.PathLike,
    encoder: CacheEncoder,
    out_dir: str | os.PathLike,
    *,
    splits: Iterable[str] | None = None,
    batch_size: int = 32,
    chunk_records: int = 256,
    log: Callable[[str], None] = print,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Encodes `splits` (default: all) of the dataset at data_dir with `encoder` into a
    latent cache at out_dir; returns its manifest.

    Per split, `<out>/<split>.zarr` holds token ids [R, N] (dtype `token_dtype`) or, for
    a continuous tokenizer, latents [R, N, D] (`LATENT_DTYPE`), chunks of `chunk_records`
    records (`CacheEncoder.record_shape`, `stored_dtype`). `batch_size` windows of C
    frames are encoded per call (memory: batch_size*C frames). After each batch is written, `progress(split, records written,
    R)` is called (an exception from it stops the build like a kill would). Running again
    with the same arguments resumes an unfinished build. The dataset's shard hashes are
    verified first; DatasetError for a bad dataset, frames of another size than the
    encoder's, or an out_dir that is a finished cache or something else.
    """
    root = Path(out_dir)
    data, splits = _checked_inputs(data_dir, encoder, splits, batch_size, chunk_records)
    window_frames, record_shape, dtype = encoder.window_frames, encoder.record_shape, encoder.stored_dtype
    plan = _build_plan(data_dir, data["content_hash"], encoder, batch_size, chunk_records, splits)
    done = _start_progress(root, plan)

    encode = encoder.load()
    entries = {}
    for split in splits:
        records = data["splits"][split]["num_records"]
        windows = encode_windows(data["splits"][split]["episodes"], window_frames)
        batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
        store = ts.open(_array_spec(root / f"{split}.zarr", records, record_shape, dtype, chunk_records)).result()
        start = done.get(split, 0)
        log(
            f"{split}: {records} records in {len(windows)} windows of <= {window_frames} frames, "
            f"{len(batches)} batches" + (f", resuming at batch {start}" if start else "")
        )
        frames, t0 = _FrameReader(data_dir, data, split), time.perf_counter()

        def write(k: int, values: np.ndarray) -> None:
            """Stores batch k's ids [R', N] or latents [R', N, D], then records it as done."""
            first, end = _span(batches[k])
            store[first:end].write(values.astype(dtype)).result()
            done[split] = k + 1
            _write_json(root / PROGRESS, {"plan": plan, "done": done})
            if progress is not None:
                progress(split, end, records)

        try:
            _encode_batches(encode, frames.read, batches[start:], start, batch_size, window_frames, write)
        finally:
            frames.close()
        encoded = records - (_span(batches[start])[0] if start < len(batches) else records)
        seconds = time.perf_counter() - t0
        log(f"{split}: encoded {encoded} frames in {seconds:.1f} s ({encoded / max(seconds, 1e-9):.0f} frames/s)")
        entries[split] = {
            "path": f"{split}.zarr",
            "records": records,
            "shape": [records, *record_shape],
            "dtype": dtype.name,
            "chunk_shape": [chunk_records, *record_shape],
            "content_hash": _content_hash(store, chunk_records * 16, f"split {split!r} of {root}"),
        }
    manifest = _finished_manifest(plan, data, encoder, entries)
    _write_json(root / MANIFEST, manifest)
    (root / PROGRESS).unlink()
    return manifest


class LatentCache:
    """Read access to a finished latent cache (see `open_cache`). Pickles as its
    directory and manifest; each process (grain workers) reopens the arrays on first use."""

    def __init__(self, root: Path, manifest: dict):
        self.root, self.manifest = root, manifest
        self._stores: dict[str, ts.TensorStore] = {}

    def __getstate__(self) -> dict:
        return {"root": self.root, "manifest": self.manifest}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root"], state["manifest"])

    def num_records(self, split: str) -> int:
        return self._entry(split)["records"]

    @property
    def kind(self) -> str:
        """ "ids" (FSQ token ids) or "latents" (a continuous tokenizer's); a manifest
        written before latents were cached has no kind and holds ids."""
        return self.manifest.get("kind", "ids")

    def _entry(self, split: str) -> dict:
        if split not in self.manifest["splits"]:
            raise DatasetError(
                f"split {split!r} not in latent cache {self.root} (has {sorted(self.manifest['splits'])})"
            )
        return self.manifest["splits"][split]

    def _store(self, split: str) -> ts.TensorStore:
        """The split's array, opened once per process and checked against the manifest."""
        if split not in self._stores:
            entry = self._entry(split)
            path = self.root / entry["path"]
            try:
                store = ts.open(
                    {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}, "open": True}, read=True
                ).result()
            except ValueError as e:
                raise DatasetError(f"latent cache array {path} is missing or unreadable: {e}") from e
            if list(store.shape) != entry["shape"] or store.dtype.numpy_dtype.name != entry["dtype"]:
                raise DatasetError(
                    f"latent cache array {path} has shape {list(store.shape)} and dtype "
                    f"{store.dtype.numpy_dtype.name}; its manifest says {entry['shape']}, {entry['dtype']}"
                )
            self._stores[split] = store
        return self._stores[split]

    def read(self, split: str, first: int, count: int) -> np.ndarray:
        """The cached values of records first..first+count-1 of `split` (one tensorstore
        read): int32 token ids [count, N], or float32 latents [count, N, D]."""
        records = self.num_records(split)
        if not (0 <= first and 0 <= count and first + count <= records):
            raise DatasetError(
                f"records {first}..{first + count - 1} are outside split {split!r} "
                f"of latent cache {self.root} ({records} records)"
            )
        values = _read_array(self._store(split), first, count, f"split {split!r} of latent cache {self.root}")
        return values.astype(READ_DTYPES[self.kind])


def open_cache(
    cache_dir: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    expect_content_hash: str | None = None,
    expect_tokenizer: TokenizerIdentity | None = None,
) -> LatentCache:
    """The finished latent cache at cache_dir, its arrays opened and checked against its
    manifest. Given data_dir (or expect_content_hash), the cache must be of that dataset
    (content hash); given expect_tokenizer, of that tokenizer (step, config hash and
    parameter files; `wm_jax.latent_cache.tokenizer_identity` of a run). DatasetError
    naming the path otherwise."""
    root = Path(cache_dir)
    if not root.is_dir():
        raise DatasetError(f"latent cache directory {root} does not exist")
    if not (root / MANIFEST).is_file():
        raise DatasetError(
            f"{root / MANIFEST} is missing: {root} is an incomplete latent cache "
            "(its build stopped before it finished); run `wm data cache` again to finish it"
        )
    manifest = _read_json(root / MANIFEST)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DatasetError(
            f"{root / MANIFEST}: format version {manifest.get('format_version')!r} is unsupported "
            f"(this code reads version {FORMAT_VERSION})"
        )
    cached = manifest["dataset"]["content_hash"]
    expected = [(expect_content_hash, "expected")] if expect_content_hash else []
    if data_dir is not None:
        expected.append((writer.read_manifest(data_dir)["content_hash"], f"dataset {data_dir} has"))
    for content_hash, whose in expected:
        if content_hash != cached:
            raise DatasetError(
                f"latent cache {root} is of dataset content hash {cached} "
                f"({manifest['dataset']['dir']}); {whose} {content_hash}"
            )
    if manifest.get("kind", "ids") not in KINDS:
        raise DatasetError(f"{root / MANIFEST}: unknown kind {manifest['kind']!r} (this code reads {KINDS})")
    cache = LatentCache(root, manifest)
    if expect_tokenizer is not None:
        check_tokenizer(cache, expect_tokenizer)
    for split in manifest["splits"]:
        cache._store(split)
    return cache


def check_tokenizer(cache: LatentCache, expected: TokenizerIdentity) -> None:
    """DatasetError naming both unless the cache was encoded by the `expected` tokenizer
    (step, config hash and parameter files)."""
    ours = cache.manifest["tokenizer"]
    if (expected.step, expected.config_hash, expected.fingerprint) != (
        ours["step"],
        ours["config_hash"],
        ours.get("fingerprint"),
    ):
        recorded = (ours.get("fingerprint") or "none recorded")[:16]
        raise DatasetError(
            f"latent cache {cache.root} was encoded by tokenizer {ours['workdir']} at step {ours['step']} "
            f"(config hash {ours['config_hash'][:16]}, parameter files {recorded}); "
            f"{expected.workdir} is at step {expected.step} (config hash {expected.config_hash[:16]}, "
            f"parameter files {expected.fingerprint[:16]}): build the cache again"
        )


def verify_cache(cache_dir: str | os.PathLike) -> dict:
    """Re-hashes every split's stored values and compares them with the manifest;
    returns the manifest, or raises DatasetError naming the split (and a corrupt chunk's
    file)."""
    cache = open_cache(cache_dir)
    for split, entry in cache.manifest["splits"].items():
        what = f"split {split!r} of latent cache {cache.root}"
        actual = _content_hash(cache._store(split), entry["chunk_shape"][0] * 16, what)
        if actual != entry["content_hash"]:
            raise DatasetError(f"{what} is corrupt: sha256 {actual}, manifest expects {entry['content_hash']}")
    return cache.manifest


def stored_bytes(cache_dir: str | os.PathLike) -> int:
    """Bytes of the files under a cache's split arrays (chunks and metadata)."""
    return sum(p.stat().st_size for p in Path(cache_dir).glob("*.zarr/**/*") if p.is_file())
