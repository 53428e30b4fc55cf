"""The HTTP API on a real server (uvicorn on 127.0.0.1, the trained tiny run): every
endpoint, every kind of bad input (each answered 4xx, the next request still served),
the bearer token, session expiry, bounded sessions and queue, and 16 concurrent sessions."""

import asyncio
import base64
import json
import time

import httpx
import numpy as np
import pytest
from conftest import assert_error

from wm_jax.inference import watermark
from wm_jax.serve.app import BackgroundServer, create_app, decode_frame
from wm_jax.serve.engine import Engine

SCRIPT = """start: {split: test, episode: 0, t: 0}
shots:
  - duration: 3
    camera: {pan: [1, 0]}
    actions: [1, 2, 3]
"""


def new_session(client, **body):
    reply = client.post("/v1/sessions", json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_health_page_and_a_session_lifecycle(client, server):
    health = client.get("/v1/health").json()
    assert health["ok"] and health["num_actions"] == server.engine.num_actions and health["clips"] >= 1
    page = client.get("/")
    assert page.status_code == 200 and "wm play" in page.text
    created = new_session(client, clip=0, seed=0)
    sid, c = created["session"], created["context_frames"]
    assert created["index"] == c - 1 and decode_frame(created["frame"]).shape == (16, 16, 3)
    step = client.post(f"/v1/sessions/{sid}/step", json={"action": 1, "camera": {"pan": [1, 0]}, "cut": False})
    assert step.status_code == 200 and step.json()["index"] == c
    png = decode_frame(step.json()["frame"])
    rgb = client.post(f"/v1/sessions/{sid}/step", json={"action": 0, "format": "rgb"}).json()
    assert rgb["index"] == c + 1 and rgb["frame"]["shape"] == [16, 16, 3]
    assert decode_frame(rgb["frame"]).dtype == np.uint8
    assert png.shape == (16, 16, 3)
    assert client.post(f"/v1/sessions/{sid}/step", json={"cut": True}).json()["index"] == c + 2
    assert client.post(f"/v1/sessions/{sid}/step").json()["index"] == c + 3  # an empty body: all defaults
    recorded = client.post(f"/v1/sessions/{sid}/record")
    assert recorded.status_code == 200 and recorded.json()["frames"] == c + 4
    name = recorded.json()["name"]
    assert "/" not in name and name.endswith(".mp4")
    assert client.delete(f"/v1/sessions/{sid}").json() == {"deleted": sid}
    assert_error(client.post(f"/v1/sessions/{sid}/step", json={}), 404, "no session")


@pytest.mark.parametrize(
    "body, words",
    [
        (b"{not json", ("malformed JSON",)),
        (b"[1, 2]", ("JSON object",)),
        (b'{"action": 99}', ("'action'", "0..")),
        (b'{"action": -1}', ("'action'",)),
        (b'{"action": "left"}', ("'action'", "integer")),
        (b'{"action": 1.5}', ("'action'", "integer")),
        (b'{"action": true}', ("'action'", "integer")),
        (b'{"actoin": 1}', ("unknown key 'actoin'",)),
        (b'{"camera": {"pan": [1]}}', ("camera.pan",)),
        (b'{"camera": {"pan": [1, "x"]}}', ("camera.pan",)),
        (b'{"camera": [1, 2]}', ("'camera'",)),
        (b'{"camera": {"zoom": 2}}', ("unknown key 'zoom'",)),
        (b'{"cut": "yes"}', ("'cut'",)),
        (b'{"format": "jpeg"}', ("'format'",)),
        (b"\xff\xfe", ("malformed JSON",)),
    ],
)
def test_bad_step_bodies_are_400_with_the_reason(client, body, words):
    sid = new_session(client)["session"]
    assert_error(client.post(f"/v1/sessions/{sid}/step", content=body), 400, *words)
    assert client.post(f"/v1/sessions/{sid}/step", json={"action": 1}).status_code == 200
    client.delete(f"/v1/sessions/{sid}")


def test_other_bad_requests(client, server):
    assert_error(client.post("/v1/sessions/feedbeef/step", json={}), 404, "no session")
    assert_error(client.delete("/v1/sessions/feedbeef"), 404, "no session")
    assert_error(client.post("/v1/sessions/feedbeef/record"), 404, "no session")
    assert_error(client.post("/v1/sessions", json={"clip": 10_000}), 400, "'clip'")
    assert_error(client.post("/v1/sessions", json={"clip": "a"}), 400, "'clip'")
    assert_error(client.post("/v1/sessions", json={"path": "/etc"}), 400, "unknown key 'path'")
    big = b'{"action": 1, "pad": "' + b"x" * (2 << 20) + b'"}'
    assert_error(client.post("/v1/sessions", content=big), 413, "at most")
    assert client.get("/v1/nothing").status_code == 404
    assert client.get("/v1/sessions").status_code == 405


@pytest.mark.parametrize(
    "script, status, words",
    [
        ("shots: [", 400, ("script.yaml line", "not valid YAML")),
        ("shots:\n  - duration: 2\n    camra: {}\n", 400, ("script.yaml line 3", "unknown key 'camra'")),
        ("start: {data: /etc}\nshots:\n  - duration: 2\n", 400, ("line 1", "may not name a file")),
        ("start: {images: [/etc/passwd]}\nshots:\n  - duration: 2\n", 400, ("line 1", "may not name a file")),
        ("reference: {image: a.png}\nshots:\n  - duration: 2\n", 400, ("line 1", "may not name a file")),
        ("shots:\n  - duration: 2\n    actions: [7, 7]\n", 400, ("line 3", "not valid")),
        ("shots:\n  - duration: 1000000000\n", 400, ("line 2", "past the limit of 2 GiB")),  # refused unallocated
    ],
)
def test_script_errors_name_their_line(client, script, status, words):
    assert_error(client.post("/v1/generate", json={"script": script}), status, *words)


def test_generate_returns_a_verifiable_video(client, tmp_path):
    reply = client.post("/v1/generate", json={"script": SCRIPT, "seed": 1})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    video = tmp_path / body["name"]
    video.write_bytes(base64.b64decode(body["video_mp4_base64"]))
    watermark.sidecar_path(video).write_text(json.dumps(body["sidecar"]))
    result = watermark.verify(video)
    assert result["manifest_ok"], result["problems"]
    assert body["sidecar"]["provenance"]["script"]["text"] == SCRIPT
    assert_error(client.post("/v1/generate", json={"script": 3}), 400, "'script'")


def test_token_auth(serve_model):
    engine = Engine(serve_model, max_sessions=2)
    with BackgroundServer(create_app(engine, token="s3cret")) as server, httpx.Client(base_url=server.url) as c:
        assert_error(c.get("/v1/health"), 401, "Bearer")
        assert_error(c.get("/v1/health", headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(c.post("/v1/sessions", headers={"Authorization": "s3cret"}), 401)
        assert c.get("/v1/health", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/").status_code == 200  # the page holds no data; its calls carry the token


def test_sessions_and_queue_are_bounded_429(serve_model):
    engine = Engine(serve_model, max_sessions=2)
    with (
        BackgroundServer(create_app(engine, max_queue=1, gather_s=0.3)) as server,
        httpx.Client(base_url=server.url, timeout=60) as c,
    ):
        first, _ = new_session(c)["session"], new_session(c)["session"]
        assert_error(c.post("/v1/sessions"), 429, "sessions are in use")

        # Two sessions live, one step pending: it waits `gather_s` for the other's; the
        # steps sent meanwhile find the queue (of 1) full.
        async def burst():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as a:
                return await asyncio.gather(*[a.post(f"/v1/sessions/{first}/step", json={}) for _ in range(4)])

        replies = asyncio.run(burst())
        codes = sorted(r.status_code for r in replies)
        assert codes[0] == 200 and codes[-1] == 429
        assert_error(next(r for r in replies if r.status_code == 429), 429, "queue is full")


def test_idle_sessions_expire(serve_model):
    engine = Engine(serve_model, max_sessions=2, idle_timeout_s=1.0)
    with (
        BackgroundServer(create_app(engine, expire_every_s=0.1)) as server,
        httpx.Client(base_url=server.url, timeout=60) as c,
    ):
        sid = new_session(c)["session"]
        assert c.post(f"/v1/sessions/{sid}/step", json={}).status_code == 200
        for _ in range(100):
            if c.get("/v1/health").json()["sessions"] == 0:
                break
            time.sleep(0.1)
        assert_error(c.post(f"/v1/sessions/{sid}/step", json={}), 404, "expired")
        assert new_session(c)["session"]


@pytest.fixture
def full_server(serve_model):
    """A server of its own for 16 sessions (the shared one's batch size: compiled already).
    Its gather window is 50 ms, not the default 4: on a loaded 2-core machine the 16
    clients' requests (same process, one GIL) arrive spread over more than 4 ms, and the
    batching test would measure the scheduler instead of the batcher."""
    engine = Engine(serve_model, max_sessions=16)
    with (
        BackgroundServer(create_app(engine, max_queue=64, gather_s=0.05)) as running,
        httpx.Client(base_url=running.url, timeout=60) as client,
    ):
        running.engine = engine
        yield running, client


def test_16_concurrent_sessions_lose_no_frame(full_server):
    server, client = full_server
    sessions = [new_session(client, clip=k % 2, seed=k)["session"] for k in range(16)]
    steps = 6

    async def play(a, k, sid):
        indices = []
        for t in range(steps):
            reply = await a.post(f"/v1/sessions/{sid}/step", json={"action": (k + t) % 5, "format": "rgb"})
            assert reply.status_code == 200, reply.text
            indices.append(reply.json()["index"])
        return indices

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as a:
            return await asyncio.gather(*[play(a, k, sid) for k, sid in enumerate(sessions)])

    c = server.engine.context_frames
    assert asyncio.run(main()) == [list(range(c, c + steps))] * 16
    counts = client.get("/v1/health").json()
    assert counts["frames_generated"] == 16 * steps
    assert counts["engine_steps"] < 16 * steps / 2, f"concurrent steps were not batched: {counts}"
    for sid in sessions:
        assert client.delete(f"/v1/sessions/{sid}").status_code == 200
