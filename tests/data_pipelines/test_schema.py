import msgpack
import numpy as np
import pytest

from data_pipelines import schema
from data_pipelines.sources import procedural


def _record():
    return procedural.generate_episode(seed=0, episode_id=0, num_frames=1, size=16)[0]


def test_round_trip_preserves_dtype_shape_values():
    rec = _record()
    out = schema.decode_record(schema.encode_record(rec))
    assert out.keys() == rec.keys()
    for k in rec:
        assert out[k].dtype == rec[k].dtype and out[k].shape == rec[k].shape, k
        np.testing.assert_array_equal(out[k], rec[k])


def test_field_spec_scales_with_size_and_entities():
    spec = schema.field_spec(32, 5)
    assert spec["frame"] == spec["reference"] == ("uint8", (32, 32, 3))
    assert spec["entity_boxes"] == ("float32", (5, 4))
    assert spec["camera"] == ("float32", (7,))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.pop("camera"), "missing"),
        (lambda r: r.update(extra=np.zeros(1)), "unknown"),
        (lambda r: r.update(action=np.asarray(1, np.int64)), "'action': dtype int64"),
        (lambda r: r.update(frame=np.zeros((8, 8, 3), np.uint8)), "'frame': shape"),
    ],
)
def test_validate_names_the_problem(mutate, message):
    rec = _record()
    spec = procedural.record_spec(16, 3)
    schema.validate_record(rec, spec)
    mutate(rec)
    with pytest.raises(schema.RecordError, match=message):
        schema.validate_record(rec, spec)


def test_decode_rejects_garbage_and_object_dtypes():
    with pytest.raises(schema.RecordError):
        schema.decode_record(b"\x00not msgpack")
    field = {"dtype": "|O", "shape": [1], "data": b"12345678"}
    bad = msgpack.packb({"v": 1, "fields": {"x": field}})
    with pytest.raises(schema.RecordError, match="object dtype"):
        schema.decode_record(bad)
