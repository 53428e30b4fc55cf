"""Grain pipeline: windows of T consecutive steps of one episode → shuffled, sharded batches.

Window k is a start record chosen from the manifest's episode index (every
`window_stride` steps, never crossing an episode), so the sampler shuffles windows, not
records. Batches are dicts of numpy arrays, every schema field stacked to [B, T, ...].
The loader's iterator state (`get_state`/`set_state`) is what checkpoints save.

Every record read is checked against the manifest's field spec (dtype and shape); a
record that cannot be read, decoded or checked raises DatasetError naming its shard,
its index in the shard and (for a check) the field. With `skip_bad_records`, a window
holding such a record is logged and replaced by the next good window instead.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np
from absl import flags, logging
from array_record.python.array_record_module import ArrayRecordReader

from data_pipelines import layout, schema, writer
from data_pipelines.schema import CACHE_FIELDS, DatasetError

# Batch field of a loader with skip_bad_records: int32 [B], 1 where the element stands in
# for a sampled window that held a bad record.
SKIPPED = "bad_windows_skipped"
# What the C++ ArrayRecord reader raises for an unreadable file or chunk.
READ_ERRORS = (RuntimeError, ValueError)
# An element of an endless loader (what grain hands from a worker process to the
# caller) holds as many whole batches as add up to about this many bytes, so grain's
# per-element costs (a shared-memory block per array, queues: ~1 ms) are paid once per
# several small batches rather than once per batch.
ELEMENT_BYTES = 4 << 20
MAX_BATCHES_PER_ELEMENT = 64
# A window's records are consecutive: read them with a seek and sequential reads, no
# readahead (`read_range`).
READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"


def window_starts(episodes: list[dict], frames_per_clip: int, window_stride: int = 1) -> np.ndarray:
    """int64 [num_windows] first record index of each window, from a split's episode
    index ({episode_id, start, length} dicts), in episode order."""
    if frames_per_clip < 1 or window_stride < 1:
        raise DatasetError(f"frames_per_clip ({frames_per_clip}) and window_stride ({window_stride}) must be >= 1")
    starts = [e["start"] + np.arange(0, e["length"] - frames_per_clip + 1, window_stride) for e in episodes]
    return np.concatenate(starts).astype(np.int64) if starts else np.zeros(0, np.int64)


def _split_windows(
    data_dir: str | os.PathLike, split: str, frames_per_clip: int, window_stride: int
) -> tuple[dict, np.ndarray]:
    manifest = writer.read_manifest(data_dir)
    writer.shard_paths(data_dir, manifest, split)  # raises on an unknown split
    episodes = manifest["splits"][split]["episodes"]
    starts = window_starts(episodes, frames_per_clip, window_stride)
    if not len(starts):
        longest = max((e["length"] for e in episodes), default=0)
        raise DatasetError(
            f"split {split!r} of {data_dir} has no episode with {frames_per_clip} frames (longest: {longest})"
        )
    return manifest, starts


def num_windows(data_dir: str | os.PathLike, split: str, frames_per_clip: int, window_stride: int = 1) -> int:
    """How many windows of frames_per_clip steps a split holds."""
    return len(_split_windows(data_dir, split, frames_per_clip, window_stride)[1])


def record_ranges(shard_ends: np.ndarray, first: int, count: int) -> list[tuple[int, int, int]]:
    """(shard, begin, end) for each shard holding some of records first..first+count-1 of
    a split, begin/end indexing the shard; shard_ends: int64 [num_shards], the cumulative
    record counts of the split's shards."""
    ranges, index, stop = [], first, first + count
    while index < stop:
        shard = int(np.searchsorted(shard_ends, index, side="right"))
        offset = int(shard_ends[shard - 1]) if shard else 0
        end = min(stop, int(shard_ends[shard]))
        ranges.append((shard, index - offset, end - offset))
        index = end
    return ranges


def read_range(reader: ArrayRecordReader, begin: int, end: int) -> list[bytes]:
    """Records begin..end-1 of one shard, read on this thread: a seek, then sequential
    reads. (The reader's range read `read(begin, end)` hands every record to a thread pool
    and back: 2.3x slower on one process here, and it does not scale with processes.)
    The reader keeps a position: one thread at a time."""
    reader.seek(begin)
    return [reader.read() for _ in range(end - begin)]


def bad_record(shard: str, index: int, error: Exception) -> DatasetError:
    """The error for record `index` of `shard` that failed to read, decode or check."""
    return DatasetError(f"bad record {index} of shard {shard}: {str(error) or type(error).__name__}")


def open_shards(paths: list[str]) -> grain.sources.ArrayRecordDataSource:
    """One random-access source over the shards; DatasetError naming an unreadable one."""
    try:
        return grain.sources.ArrayRecordDataSource(paths)
    except READ_ERRORS as e:
        for path in paths:  # the reader's message does not say which shard it was
            try:
                grain.sources.ArrayRecordDataSource([path])
            except READ_ERRORS as e_path:
                raise DatasetError(f"shard {path} is unreadable: {str(e_path) or type(e_path).__name__}") from e
        raise DatasetError(f"shards {paths} are unreadable: {e}") from e


class WindowSource(grain.sources.RandomAccessDataSource):
    """Random-access source: window k ↦ T records of one episode, every field (or those
    in `fields`) stacked to [T, ...] (with skip_bad_records, plus SKIPPED: int32 []; with
    a `latent_cache`, plus its values of the same records: CODES, token ids int32 [T, N],
    or LATENTS, latents float32 [T, N, D], as `CACHE_FIELDS` names them by its kind).

    A window is read with one `read_range` per shard it spans and, once a record has been
    decoded and checked in full, decoded with that record's byte layout
    (`data_pipelines.layout`); a record that differs from it is decoded and checked in full.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str,
        frames_per_clip: int,
        window_stride: int = 1,
        skip_bad_records: bool = False,
        fields: Iterable[str] | None = None,
        latent_cache: Any = None,
    ):
        manifest, self._starts = _split_windows(data_dir, split, frames_per_clip, window_stride)
        self._split, self._cache = split, latent_cache
        self._cache_field = None if latent_cache is None else CACHE_FIELDS[latent_cache.kind]
        self._paths = writer.shard_paths(data_dir, manifest, split)
        self._records = open_shards(self._paths)  # single-record reads, to name a bad record
        self._shard_ends = np.cumsum([s["records"] for s in manifest["splits"][split]["shards"]])
        self._spec = schema.spec_from_json(manifest["fields"])
        self._fields = None if fields is None else frozenset(fields)
        self._T = frames_per_clip
        self._skip_bad_records = skip_bad_records
        self._layout: layout.Layout | None = None  # learned from the first window read in full
        # A reader per shard, opened on first use; a read seeks, so one thread at a time.
        self._readers: list[ArrayRecordReader | None] = [None] * len(self._paths)
        self._locks = [threading.Lock() for _ in self._paths]
        # The repr is checked when an iterator state is restored: name the data by its
        # content, not its path, so a moved dataset still resumes.
        self._repr = (
            f"WindowSource(content_hash={manifest['content_hash']}, split={split}, "
            f"frames_per_clip={frames_per_clip}, window_stride={window_stride})"
        )
        if latent_cache is not None:
            self._repr = self._repr[:-1] + f", latent_cache={latent_cache.manifest['splits'][split]['content_hash']})"

    def __len__(self) -> int:
        return len(self._starts)

    def __repr__(self) -> str:
        return self._repr

    def window_bytes(self) -> int:
        """Bytes of one window as batches carry it: its loaded fields (and cached values)."""
        record = sum(
            np.dtype(dtype).itemsize * math.prod(shape)
            for name, (dtype, shape) in self._spec.items()
            if self._fields is None or name in self._fields
        )
        if self._cache is not None:
            # int32 ids or float32 latents: 4 bytes a value
            record += 4 * math.prod(self._cache.manifest["splits"][self._split]["shape"][1:])
        return record * self._T

    def _record(self, index: int, data: bytes | None) -> dict[str, np.ndarray]:
        """Record `index` of the split (read now if `data` is None), decoded and checked
        against the manifest's spec; DatasetError naming shard, record and field."""
        try:
            record = schema.decode_record(self._records[index] if data is None else data)
            schema.validate_record(record, self._spec)
            return record
        except (schema.RecordError, *READ_ERRORS) as e:
            shard = int(np.searchsorted(self._shard_ends, index, side="right"))
            local = index - (int(self._shard_ends[shard - 1]) if shard else 0)
            raise bad_record(self._paths[shard], local, e) from e

    def __getstate__(self) -> dict:
        # Grain's worker processes unpickle the source: readers and locks are per process.
        return {**self.__dict__, "_readers": None, "_locks": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(
            state, _readers=[None] * len(state["_paths"]), _locks=[threading.Lock() for _ in state["_paths"]]
        )

    def _read(self, first: int) -> list[bytes]:
        """The T records of the split from record `first` on, one `read_range` per shard,
        holding the shard's lock (grain's read threads share the source; one open file
        per shard and process, not per thread).
        (ArrayRecordDataSource.__getitems__ starts a thread pool per call: 10x slower.)"""
        data = []
        for shard, begin, end in record_ranges(self._shard_ends, first, self._T):
            with self._locks[shard]:
                if self._readers[shard] is None:
                    self._readers[shard] = ArrayRecordReader(self._paths[shard], READER_OPTIONS)
                data += read_range(self._readers[shard], begin, end)
        return data

    def _window(self, k: int) -> dict[str, np.ndarray]:
        window = self._records_window(k)
        if self._cache is not None:
            window[self._cache_field] = self._cache.read(self._split, int(self._starts[k]), self._T)
        return window

    def _records_window(self, k: int) -> dict[str, np.ndarray]:
        first = int(self._starts[k])
        try:
            data = self._read(first)
        except READ_ERRORS:
            data = [None] * self._T  # a corrupt chunk: read one at a time to name the record
        if self._layout is not None and None not in data:
            window = layout.decode_window(data, self._layout, self._fields)
            if window is not None:
                return window
        records = [self._record(first + i, d) for i, d in enumerate(data)]
        if self._layout is None and data[0] is not None:
            self._layout = layout.learn(data[0], records[0])
        return {
            name: np.stack([rec[name] for rec in records])
            for name in records[0]
            if self._fields is None or name in self._fields
        }

    def batch(self, ks: Sequence[int]) -> dict[str, np.ndarray]:
        """Windows ks stacked to [B, T, ...]. Their B*T records are read and decoded at
        once with the learned layout (numpy's per-call costs paid per batch, not per
        window); any window that cannot be (a read error, a record with another layout,
        nothing learned yet) sends the batch through the window-by-window path, which
        checks in full, names a bad record or, with skip_bad_records, replaces its window."""
        if self._layout is not None:
            try:
                data = [d for k in ks for d in self._read(int(self._starts[k]))]
            except READ_ERRORS:
                data = None
            stacked = None if data is None else layout.decode_window(data, self._layout, self._fields)
            if stacked is not None:
                batch = {name: a.reshape((len(ks), self._T, *a.shape[1:])) for name, a in stacked.items()}
                if self._cache is not None:
                    batch[self._cache_field] = np.stack(
                        [self._cache.read(self._split, int(self._starts[k]), self._T) for k in ks]
                    )
                if self._skip_bad_records:
                    batch[SKIPPED] = np.zeros(len(ks), np.int32)
                return batch
        return stack_windows([self[k] for k in ks])

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        if not self._skip_bad_records:
            return self._window(k)
        try:
            return {**self._window(k), SKIPPED: np.int32(0)}
        except DatasetError as e:
            logging.warning("skip_bad_records: window %d skipped: %s", k, e)
        # The next good window stands in, so batches keep their size and the sampler its order.
        for offset in range(1, len(self)):
            try:
                return {**self._window((k + offset) % len(self)), SKIPPED: np.int32(1)}
            except DatasetError:
                continue
        raise DatasetError(f"every window of {self._repr} holds a bad record")


def stack_windows(windows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """B windows {name: [T, ...]} -> one batch {name: [B, T, ...]}."""
    return {name: np.stack([w[name] for w in windows]) for name in windows[0]}


class WindowOrder:
    """Global element index -> window key: passes over `num_windows` windows, one after
    the other, each in order or (shuffle) in its own permutation drawn from (seed, pass).
    A pass's permutation is computed once per process (int32/int64 [num_windows]) and
    kept while elements of that pass are asked for."""

    def __init__(self, num_windows: int, *, shuffle: bool, seed: int | None):
        self._n, self._shuffle, self._seed = num_windows, shuffle, seed
        self._cached: tuple[int, np.ndarray] | None = None  # (pass, permutation): one attribute, for read threads

    def __repr__(self) -> str:
        return f"WindowOrder(shuffle={self._shuffle}, seed={self._seed})"

    def _permutation(self, p: int) -> np.ndarray:
        cached = self._cached
        if cached is None or cached[0] != p:
            cached = (p, np.random.default_rng([self._seed or 0, p]).permutation(self._n))
            self._cached = cached
        return cached[1]

    def keys(self, first: int, stop: int) -> np.ndarray:
        """int64 [stop - first]: the window keys of elements first..stop-1."""
        index = np.arange(first, stop, dtype=np.int64)
        if not self._shuffle:
            return index % self._n
        passes, within = np.divmod(index, self._n)
        return np.concatenate([self._permutation(int(p))[within[passes == p]] for p in np.unique(passes)])


def auto_batches_per_element(batch_bytes: int) -> int:
    """How many batches of `batch_bytes` bytes an element of an endless loader holds:
    enough for ELEMENT_BYTES, at most MAX_BATCHES_PER_ELEMENT, at least 1."""
    return max(1, min(MAX_BATCHES_PER_ELEMENT, -(-ELEMENT_BYTES // max(1, batch_bytes))))


class BatchSource(grain.sources.RandomAccessDataSource):
    """Random-access groups of this shard's batches. Global batch g is the windows of
    elements g*B .. g*B + B - 1 of `order` (`WindowOrder.keys`); shard p of P (a JAX
    process) takes batches p, p+P, p+2P, ... (as many per shard with
    `shard.drop_remainder`), and its element j holds its batches j*K .. j*K + K - 1
    (K = `batches_per_element`): `source.batch(keys)` of their windows, [K*B, ...] per
    field, which `BatchIterator` cuts into batches of B. A shard's batches are the same
    whatever K is. The last element of a finite order may hold fewer batches and, without
    drop_remainder, the last batch fewer windows. What grain does per element (sampling,
    prefetch bookkeeping, the hand-over from a worker process) is paid once per K
    batches, not once per window.

    num_elements: how many positions `order` has (windows over all passes), None for no end.
    shard: None for one shard per JAX process. batches_per_element: None for
    `auto_batches_per_element` of a batch's bytes (`source.window_bytes()` * B).
    """

    def __init__(
        self,
        source: grain.sources.RandomAccessDataSource,
        order: WindowOrder,
        *,
        batch_size: int,
        num_elements: int | None,
        drop_remainder: bool,
        shard: grain.sharding.ShardOptions | None = None,
        batches_per_element: int | None = None,
    ):
        if shard is None:  # one shard per JAX process
            shard = grain.sharding.ShardByJaxProcess(drop_remainder=True)
        if batches_per_element is None:
            batches_per_element = auto_batches_per_element(source.window_bytes() * batch_size)
        if batch_size < 1 or batches_per_element < 1:
            raise DatasetError(
                f"batch_size ({batch_size}) and batches_per_element ({batches_per_element}) must be >= 1"
            )
        self._source, self._order, self._B, self._K = source, order, batch_size, batches_per_element
        self._p, self._P = shard.shard_index, shard.shard_count
        self._end = self._batches = None  # the positions the batches cover, and this shard's batches
        if num_elements is None:
            self._len = sys.maxsize
        else:
            self._end = num_elements - num_elements % batch_size if drop_remainder else num_elements
            batches = -(-self._end // batch_size)
            self._batches = batches // self._P if shard.drop_remainder else len(range(self._p, batches, self._P))
            self._len = -(-self._batches // batches_per_element)
        # Checked when an iterator state is restored: the data, the order, the shard and the grouping.
        self._repr = (
            f"BatchSource({source!r}, {order!r}, batch_size={batch_size}, num_elements={num_elements}, "
            f"drop_remainder={drop_remainder}, shard={self._p}/{self._P}, "
            f"batches_per_element={batches_per_element})"
        )

    @property
    def batch_size(self) -> int:
        return self._B

    @property
    def batches_per_element(self) -> int:
        return self._K

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return self._repr

    def __getitem__(self, j: int) -> dict[str, np.ndarray]:
        stop = (j + 1) * self._K if self._end is None else min((j + 1) * self._K, self._batches)
        keys = []
        for i in range(j * self._K, stop):
            first = (i * self._P + self._p) * self._B
            last = first + self._B if self._end is None else min(first + self._B, self._end)
            keys.append(self._order.keys(first, last))
        return self._source.batch(np.concatenate(keys).tolist())


class BatchSampler:
    """Elements 0, 1, 2, ... of a `BatchSource` in order (the order of windows and the
    process's share of them live in the source)."""

    def __init__(self, num_batches: int):
        self._len = num_batches

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return "BatchSampler()"

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if not 0 <= index < self._len:
            raise IndexError(f"element index {index} is outside [0, {self._len})")
        return grain.RecordMetadata(index=index, record_key=index)


class BatchIterator(Iterator[dict[str, np.ndarray]]):
    """Batches of B windows cut from the elements (groups of batches) of a grain
    iterator; `get_state`/`set_state` give and take the position of the next batch.

    Once an element is taken, the next one is fetched on a thread while its batches are
    handed out, so the first element from each worker process (whose start-up takes
    seconds) is asked for early, not when training reaches it."""

    def __init__(self, elements: Any, batch_size: int):
        self._elements, self._B = elements, batch_size
        self._fetcher = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="next-element")
        self._ahead: concurrent.futures.Future | None = None  # the element after the current one
        self._element: dict[str, np.ndarray] | None = None
        self._count = self._taken = 0  # batches in the current element, and handed out
        self._skip = 0  # batches of the next element a restored state had taken
        # Grain's states before and after the current element (before: of the next
        # element when there is no current one). Grain is only asked between fetches.
        self._before, self._after = elements.get_state(), None

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._element is None or self._taken == self._count:
            if self._element is not None:
                self._before, self._element = self._after, None
            ahead, self._ahead = self._ahead, None
            element = next(self._elements) if ahead is None else ahead.result()
            self._after = self._elements.get_state()
            self._ahead = self._fetcher.submit(next, self._elements)
            self._element, self._taken, self._skip = element, self._skip, 0
            self._count = -(-len(next(iter(element.values()))) // self._B)
        b, self._taken = self._taken * self._B, self._taken + 1
        return {name: a[b : b + self._B] for name, a in self._element.items()}

    def get_state(self) -> bytes:
        """JSON bytes: grain's state before the element the next batch comes from, and
        how many of its batches were handed out."""
        if self._element is None:
            element, taken = self._before, self._skip
        elif self._taken == self._count:  # the next batch starts the next element
            element, taken = self._after, 0
        else:
            element, taken = self._before, self._taken
        return json.dumps({"element": json.loads(element), "batches_taken": taken}).encode()

    def set_state(self, state: bytes) -> None:
        """Resumes at a `get_state()`; ValueError if it is not a state of such a loader
        (grain's ValueError if it is of another source, sampler or worker count)."""
        try:
            saved = json.loads(state)
            element, taken = json.dumps(saved["element"]).encode(), int(saved["batches_taken"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"not a data position of this loader (no element state and batches taken): {e}") from e
        if self._ahead is not None:  # let the fetch in flight finish before grain moves; drop its element
            concurrent.futures.wait([self._ahead])
            self._ahead = None
        self._elements.set_state(element)
        self._before, self._element, self._skip = element, None, taken


class Loader(Iterable[dict[str, np.ndarray]]):
    """Iterable of batches (`BatchIterator`) over a grain DataLoader of `BatchSource`
    elements."""

    def __init__(self, elements: grain.DataLoader, batch_size: int, batches_per_element: int):
        self._elements, self._B, self.batches_per_element = elements, batch_size, batches_per_element

    def __iter__(self) -> BatchIterator:
        return BatchIterator(iter(self._elements), self._B)


def make_loader(
    data_dir: str | os.PathLike,
    *,
    split: str,
    frames_per_clip: int,
    batch_size: int,
    seed: int,
    window_stride: int = 1,
    shuffle: bool = True,
    num_epochs: int | None = None,
    worker_count: int = 0,
    shard_options: grain.sharding.ShardOptions | None = None,
    drop_remainder: bool = True,
    read_options: grain.ReadOptions | None = None,
    skip_bad_records: bool = False,
    fields: Iterable[str] | None = None,
    latent_cache: Any = None,
    batches_per_element: int | None = None,
) -> Loader:
    """A loader over windows of `frames_per_clip` steps of `split`.

    `batch_size` is per process. Each element of `iter(loader)` is a dict with every
    schema field (or those in `fields`) stacked to [B, T, ...]: frame uint8
    [B, T, S, S, 3], action int32 [B, T], camera float32 [B, T, 7], cut bool [B, T],
    entity_boxes float32 [B, T, E, 4], ... `num_epochs=None` repeats forever.
    `shard_options` defaults to one shard per JAX process (whole batches: process p of P
    reads batches p, p+P, ...). `read_options` defaults to a read-ahead of a few
    elements. A bad record raises DatasetError (naming shard, record and field) unless
    `skip_bad_records`: then its window is logged and replaced by the next good one, and
    batches carry SKIPPED int32 [B] (1 per replaced window) for the caller to count. The
    order of batches is a function of `seed` and the shard, not of `worker_count` or
    `batches_per_element`; `iter(loader).get_state()` resumes it exactly. With a `latent_cache`
    (`data_pipelines.latent_cache.open_cache` of this dataset) batches also carry the
    cached values of their records: CODES, token ids int32 [B, T, N], or LATENTS, latents
    float32 [B, T, N, D] (`CACHE_FIELDS`).

    `batches_per_element`: batches per grain element (`BatchSource`; the batches do not
    depend on it); None chooses `auto_batches_per_element` of the batch's bytes.
    """
    if not Path(data_dir).is_dir():
        raise DatasetError(f"dataset directory {data_dir} does not exist")
    source = WindowSource(data_dir, split, frames_per_clip, window_stride, skip_bad_records, fields, latent_cache)
    n = len(source)
    batches = BatchSource(
        source,
        WindowOrder(n, shuffle=shuffle, seed=seed),
        batch_size=batch_size,
        num_elements=None if num_epochs is None else n * num_epochs,
        drop_remainder=drop_remainder,
        shard=shard_options,
        batches_per_element=batches_per_element,
    )
    return data_loader(batches, worker_count=worker_count, read_options=read_options)


def data_loader(
    batches: BatchSource, *, worker_count: int = 0, read_options: grain.ReadOptions | None = None
) -> Loader:
    """The loader delivering the batches of `batches` (already this process's) in order
    (see make_loader)."""
    if worker_count > 0 and not flags.FLAGS.is_parsed():
        # Grain's worker start-up reads absl flags, which fail unless parsed (they are
        # not outside absl.app.run); keep their defaults.
        flags.FLAGS.mark_as_parsed()
    if read_options is None:  # a few elements ahead, read on a few threads per process
        read_options = grain.ReadOptions(num_threads=min(4, os.cpu_count() or 1), prefetch_buffer_size=4)
    elements = grain.DataLoader(
        data_source=batches,
        sampler=BatchSampler(len(batches)),
        shard_options=grain.sharding.NoSharding(),
        worker_count=worker_count,
        read_options=read_options,
    )
    return Loader(elements, batches.batch_size, batches.batches_per_element)
