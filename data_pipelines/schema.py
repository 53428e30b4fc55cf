"""Record schema v1: one record is one time step of one episode.

Records are msgpack maps ``{"v": SCHEMA_VERSION, "fields": {name: array}}`` where
every array is stored as ``{"dtype", "shape", "data"}`` (raw little-endian bytes), so
decoding never executes code (no pickle) and a record describes itself.
"""

from __future__ import annotations

import msgpack
import numpy as np

SCHEMA_VERSION = 1
CODEC = "raw"  # frames are stored as raw uint8 pixels

Spec = dict[str, tuple[str, tuple[int, ...]]]
# Batch field a loader with a latent cache adds, by the cache's kind
# (`data_pipelines.latent_cache.LatentCache.kind`): token ids int32 [B, T, N], or a
# continuous tokenizer's latents float32 [B, T, N, D].
CODES = "codes"
LATENTS = "latents"
CACHE_FIELDS = {"ids": CODES, "latents": LATENTS}


class RecordError(ValueError):
    """A record does not match the schema or cannot be decoded."""


class DatasetError(ValueError):
    """A dataset directory is missing, corrupt, or cannot serve a request."""


def field_spec(size: int, num_entities: int) -> Spec:
    """Field name -> (numpy dtype string, shape) for frames of size×size pixels.

    ``num_entities`` is E, the number of entity slots per record (the agent included),
    i.e. the length of ``entity_ids``/``entity_boxes``/``entity_visible``. ``reference``
    is the episode's reference frame (the same in each of its records): every entity slot
    drawn alone, for identity memory (procedural: `render_reference`, `reference_cells`).
    """
    return {
        "episode_id": ("int64", ()),
        "t": ("int32", ()),
        "frame": ("uint8", (size, size, 3)),
        "reference": ("uint8", (size, size, 3)),
        "action": ("int32", ()),
        "camera": ("float32", (7,)),
        "shot_id": ("int32", ()),
        "cut": ("bool", ()),
        "timecode": ("float32", ()),
        "entity_ids": ("int32", (num_entities,)),
        "entity_boxes": ("float32", (num_entities, 4)),
        "entity_visible": ("bool", (num_entities,)),
        "reward": ("float32", ()),
        "done": ("bool", ()),
    }


def spec_to_json(spec: Spec) -> dict:
    """The spec as JSON-friendly ``{name: {"dtype", "shape"}}`` (for the manifest)."""
    return {k: {"dtype": d, "shape": list(s)} for k, (d, s) in spec.items()}


def spec_from_json(obj: dict) -> Spec:
    """Inverse of `spec_to_json`."""
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in obj.items()}


def _encode_array(x: np.ndarray) -> dict:
    x = np.asarray(x)
    # Force little-endian so records are portable across hosts.
    dtype = x.dtype.newbyteorder("<") if x.dtype.byteorder == ">" else x.dtype
    return {"dtype": dtype.str, "shape": list(x.shape), "data": np.ascontiguousarray(x, dtype=dtype).tobytes()}


def _decode_array(obj: dict) -> np.ndarray:
    dtype = np.dtype(obj["dtype"])
    if dtype.hasobject:
        raise RecordError(f"object dtype {dtype} is not allowed in records")
    return np.frombuffer(obj["data"], dtype=dtype).reshape(obj["shape"])


def encode_record(record: dict[str, np.ndarray]) -> bytes:
    """Serialises ``{name: array}`` to msgpack bytes (arrays of any dtype/shape)."""
    fields = {k: _encode_array(v) for k, v in record.items()}
    return msgpack.packb({"v": SCHEMA_VERSION, "fields": fields}, use_bin_type=True)


def decode_record(data: bytes) -> dict[str, np.ndarray]:
    """Inverse of `encode_record`; arrays are read-only views of ``data``.

    Raises RecordError on bytes that are not a v1 record.
    """
    try:
        obj = msgpack.unpackb(data, raw=False)
        if obj["v"] != SCHEMA_VERSION:
            raise RecordError(f"record schema version {obj['v']} != {SCHEMA_VERSION}")
        return {k: _decode_array(v) for k, v in obj["fields"].items()}
    except RecordError:
        raise
    except (ValueError, TypeError, KeyError, msgpack.UnpackException) as e:
        raise RecordError(f"undecodable record: {type(e).__name__}: {e}") from e


def validate_record(record: dict[str, np.ndarray], spec: Spec) -> None:
    """Raises RecordError naming the first field that is missing, unknown, or has the
    wrong dtype or shape."""
    missing = [k for k in spec if k not in record]
    if missing:
        raise RecordError(f"record is missing field(s) {missing}")
    unknown = [k for k in record if k not in spec]
    if unknown:
        raise RecordError(f"record has unknown field(s) {unknown}")
    for name, (dtype, shape) in spec.items():
        x = np.asarray(record[name])
        if x.dtype != np.dtype(dtype):
            raise RecordError(f"field {name!r}: dtype {x.dtype}, expected {dtype}")
        if x.shape != tuple(shape):
            raise RecordError(f"field {name!r}: shape {x.shape}, expected {tuple(shape)}")
