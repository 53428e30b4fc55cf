"""Sessions that start from an uploaded image (`POST /v1/sessions {"image": base64}`), on
the shared server: the picture, centre-cropped and resized to the model's size (`read_image`),
is the context; every bad upload is a 400 (413 past the body limit) with the reason, and the next
request is served; a recording of such a session names the image's sha256 and verifies."""

import base64
import hashlib
import io
import json
import struct
import textwrap
import zlib

import imageio.v3 as iio
import numpy as np
import pytest
from conftest import assert_error

from wm_jax.inference import watermark
from wm_jax.serve.app import decode_frame
from wm_jax.serve.engine import read_image


def encoded(image: np.ndarray, extension: str = ".png") -> str:
    """uint8 [H, W(, C)] -> the base64 text of its file (PNG or JPEG by `extension`)."""
    return base64.b64encode(iio.imwrite("<bytes>", image, extension=extension)).decode()


def png_header(width: int, height: int) -> bytes:
    """A PNG of just a signature, an IHDR of width x height and an IEND (no pixels)."""
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def start(client, image: str, **body) -> dict:
    reply = client.post("/v1/sessions", json={"image": image, **body})
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_an_image_session_starts_from_the_picture_and_steps(client, server):
    size, c = server.engine.image_size, server.engine.context_frames
    black, white = (start(client, encoded(np.full((40, 56, 3), v, np.uint8))) for v in (0, 255))
    assert black["context_frames"] == c and black["index"] == c - 1
    frames = [decode_frame(created["frame"]) for created in (black, white)]
    assert frames[0].shape == (size, size, 3)
    # The tiny run's tokenizer decodes almost everything to one grey; its context frames
    # still differ with the picture (its own, not a clip's).
    assert frames[0].mean() < frames[1].mean(), [f.mean() for f in frames]
    for created in (black, white):
        step = client.post(f"/v1/sessions/{created['session']}/step", json={"action": 1})
        assert step.status_code == 200 and step.json()["index"] == c
        assert decode_frame(step.json()["frame"]).shape == (size, size, 3)
        assert client.delete(f"/v1/sessions/{created['session']}").status_code == 200


def test_read_image_crops_the_centre_and_makes_rgb():
    wide = np.zeros((40, 56, 3), np.uint8)
    wide[:, :8], wide[:, 8:48], wide[:, 48:] = (255, 0, 0), (0, 200, 0), (0, 0, 255)  # the sides are cropped off
    as_png = lambda image: iio.imwrite("<bytes>", image, extension=".png")
    assert (read_image(as_png(wide), 16) == (0, 200, 0)).all()
    assert (read_image(as_png(np.full((5, 3), 77, np.uint8)), 4) == 77).all()  # grey
    assert (read_image(as_png(np.full((6, 6, 4), (9, 8, 7, 0), np.uint8)), 4) == (9, 8, 7)).all()  # alpha dropped
    assert (read_image(as_png(np.full((6, 6), 30000, np.uint16)), 4) == 30000 >> 8).all()  # 16-bit grey, scaled
    jpeg = read_image(iio.imwrite("<bytes>", np.full((64, 64, 3), (200, 30, 30), np.uint8), extension=".jpg"), 8)
    assert np.abs(jpeg.astype(int) - (200, 30, 30)).max() < 8


@pytest.mark.parametrize(
    "orientation, turned",
    [(1, lambda a: a), (3, lambda a: a[::-1, ::-1]), (6, lambda a: np.rot90(a, -1)), (8, np.rot90)],
)
def test_a_photo_is_turned_upright_by_its_exif_orientation(orientation, turned):
    """A phone stores its sensor's pixels and an EXIF orientation tag (0x0112) saying how to
    turn them for display (6: 90 degrees clockwise); the context is the picture as shown."""
    from PIL import Image

    stored = np.zeros((24, 48, 3), np.uint8)  # wide: red left half, blue right half, green top-left corner
    stored[:, :24], stored[:, 24:], stored[:6, :6] = (255, 0, 0), (0, 0, 255), (0, 255, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, "JPEG", quality=95, exif=exif)
    shown = turned(stored)  # what a viewer shows: the upright picture
    side = min(shown.shape[:2])
    top, left = (shown.shape[0] - side) // 2, (shown.shape[1] - side) // 2
    expected = np.asarray(
        Image.fromarray(np.ascontiguousarray(shown[top : top + side, left : left + side])).resize((8, 8), Image.LANCZOS)
    )
    got = read_image(buffer.getvalue(), 8)
    assert np.abs(got.astype(int) - expected).max() < 40, (got[..., 0], expected[..., 0])
    # Not the same picture turned otherwise: the colours' places tell the orientation apart.
    assert (np.abs(got.astype(int) - expected).mean() < 8) and np.abs(
        got.astype(int) - np.rot90(expected, 2)
    ).mean() > 30


def test_grey_alpha_and_jpeg_uploads_are_made_rgb(client):
    for image in (
        encoded(np.full((10, 30), 200, np.uint8)),  # grey, wide
        encoded(np.full((30, 10, 4), (10, 200, 10, 0), np.uint8)),  # alpha (transparent), tall
        encoded(np.full((24, 40, 3), (200, 200, 20), np.uint8), ".jpg"),
        "\n".join(textwrap.wrap(encoded(np.zeros((8, 8, 3), np.uint8)), 76)),  # as `base64 FILE` wraps its lines
    ):
        created = start(client, image, seed=1)
        assert decode_frame(created["frame"]).shape[-1] == 3
        client.delete(f"/v1/sessions/{created['session']}")


GIF = base64.b64encode(iio.imwrite("<bytes>", np.zeros((4, 4, 3), np.uint8), extension=".gif")).decode()
PNG = iio.imwrite("<bytes>", np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8), extension=".png")


@pytest.mark.parametrize(
    "body, words",
    [
        ({"image": 3}, ("'image'", "base64 string", "int")),
        ({"image": ["a"]}, ("'image'", "base64 string", "list")),
        ({"image": "not base64!"}, ("'image'", "not valid base64")),
        ({"image": "/etc/passwd"}, ("'image'",)),  # a path is text like any other: never opened
        ({"image": ""}, ("'image'", "empty")),
        ({"image": base64.b64encode(b"hello, world").decode()}, ("not a PNG or JPEG",)),
        ({"image": GIF}, ("not a PNG or JPEG",)),
        ({"image": base64.b64encode(png_header(0, 0)).decode()}, ("not a PNG or JPEG",)),
        ({"image": base64.b64encode(png_header(5000, 10)).decode()}, ("5000x10", "4096")),
        ({"image": encoded(np.zeros((1, 4097), np.uint8))}, ("4097x1", "4096")),
        ({"image": base64.b64encode(PNG[:400]).decode()}, ("cannot be decoded", "truncated")),
        ({"image": encoded(np.zeros((8, 8, 3), np.uint8)), "clip": 0}, ("'clip'", "'image'", "not both")),
        ({"image": encoded(np.zeros((8, 8, 3), np.uint8)), "seed": -1}, ("'seed'",)),
        ({"image": encoded(np.zeros((8, 8, 3), np.uint8)), "path": "/etc"}, ("unknown key 'path'",)),
        ({"reference": 3}, ("'reference'", "base64 string", "int")),
        ({"reference": "not base64!"}, ("'reference'", "not valid base64")),
        ({"clip": 0, "reference": ""}, ("'reference'", "empty")),
        ({"reference": base64.b64encode(b"hello, world").decode()}, ("identity bank",)),  # this model has none
        ({"clip": 0, "reference": encoded(np.zeros((8, 8, 3), np.uint8))}, ("identity bank", "use_identity_bank")),
    ],
)
def test_bad_uploads_are_400_with_the_reason(client, body, words):
    assert_error(client.post("/v1/sessions", json=body), 400, *words)


def test_an_upload_past_the_body_limit_is_413_and_the_next_one_is_served(client):
    big = np.random.default_rng(1).integers(0, 255, (700, 700, 3), dtype=np.uint8)  # ~1.5 MB of PNG
    assert_error(client.post("/v1/sessions", json={"image": encoded(big)}), 413, "at most", "base64")
    created = start(client, encoded(big[:64, :64]))
    assert client.delete(f"/v1/sessions/{created['session']}").status_code == 200


def test_an_image_session_records_a_verifiable_video(client, server):
    image = iio.imwrite("<bytes>", np.full((16, 16, 3), (20, 200, 20), np.uint8), extension=".png")
    sid = start(client, base64.b64encode(image).decode(), seed=2)["session"]
    assert client.post(f"/v1/sessions/{sid}/step", json={"action": 2}).status_code == 200
    recorded = client.post(f"/v1/sessions/{sid}/record")
    assert recorded.status_code == 200 and recorded.json()["frames"] == server.engine.context_frames + 1
    video = server.record_dir / "recordings" / recorded.json()["name"]
    result = watermark.verify(video)
    assert result["manifest_ok"] and result["watermark_detected"], result["problems"]
    source = json.loads(watermark.sidecar_path(video).read_text())["provenance"]["start"]  # signed: verified above
    assert source == {
        "image_sha256": hashlib.sha256(image).hexdigest(),
        "image_bytes": len(image),
        "frames": server.engine.context_frames,
    }
    client.delete(f"/v1/sessions/{sid}")
