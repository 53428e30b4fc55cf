"""`wm play`'s page in a real headless Chromium (Debian's `chromium`, driven by Playwright's
Python API; no browser download): keys steer the session, different keys give different
frames, and the frames shown are the server's own engine's for the same controls."""

import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import imageio.v3 as iio
import numpy as np
import pytest

from wm_jax.serve.app import BackgroundServer, create_app, decode_frame
from wm_jax.inference import watermark
from wm_jax.serve.engine import Engine, load_model

CHROMIUM = Path("/usr/bin/chromium")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="needs Playwright's Python package: pip install playwright"
)
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"no browser at {CHROMIUM}: apt-get install -y chromium (Debian)"
)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()


# `wm play` run as a user runs it, in a process pinned to one core (Eigen's matmuls on one
# thread too): XLA:CPU gives a compiled step bit-identical results call after call only with
# one intra-op thread (jax-ml/jax#39741; with two, CI saw whole frames one grey level apart,
# as large as what the 2-step test model's keys do), so the page's frames compare exactly.
PINNED_CLI = "import os, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); from wm_jax.cli import main; sys.exit(main())"


@pytest.fixture(scope="module")
def play_server(dynamics_run, tmp_path_factory):
    """`wm play --no-browser` on a free 127.0.0.1 port, recordings to a temporary directory;
    yields (its url, that directory) once /v1/health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    record_dir = tmp_path_factory.mktemp("play_recordings")
    command = ["play", "--no-browser", "--workdir", str(dynamics_run), "--port", str(port), "--max-sessions", "4"]
    log = tmp_path_factory.mktemp("play_log") / "wm_play.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", PINNED_CLI, *command, "--record-dir", str(record_dir)],
            env={**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_multi_thread_eigen=false"},
            stdout=out,
            stderr=out,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"wm play exited {proc.returncode}: {log.read_text()}"
            assert time.monotonic() < deadline, f"wm play did not answer in 180 s: {log.read_text()}"
            try:
                if httpx.get(f"{url}/v1/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        yield url, record_dir
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def page(browser, play_server):
    tab = browser.new_page(viewport={"width": 900, "height": 520})
    tab.goto(play_server[0])
    tab.wait_for_function("window.wm && window.wm.ready", timeout=60_000)
    yield tab
    tab.close()


def play(page, inputs):
    """Starts a new session on the page (clip 0, seed 0), then sends each input (a key to
    press or a button to click) and waits for its frame; returns the page's history: the
    controls and PNG of every frame shown, the context frame first."""
    page.evaluate("window.wm.ready = false")
    page.click("#new")
    page.wait_for_function("window.wm.history.length === 1 && !window.wm.busy", timeout=60_000)
    for n, (kind, what) in enumerate(inputs, start=2):
        page.keyboard.press(what) if kind == "key" else page.click(what)
        page.wait_for_function(f"window.wm.history.length === {n} && !window.wm.busy", timeout=60_000)
    return page.evaluate("window.wm.history")


def replay(url, history, start=None):
    """The frames the server's engine gives a fresh session (`start`: the session body,
    default clip 0, seed 0) for the same controls."""
    with httpx.Client(base_url=url, timeout=60) as c:
        created = c.post("/v1/sessions", json=start or {"clip": 0, "seed": 0}).json()
        frames = [decode_frame(created["frame"])]
        for h in history[1:]:
            body = {"action": h["action"], "camera": h["camera"], "cut": h["cut"]}
            frames.append(decode_frame(c.post(f"/v1/sessions/{created['session']}/step", json=body).json()["frame"]))
        c.delete(f"/v1/sessions/{created['session']}")
    return frames


def shown(history):
    return [decode_frame({"format": "png", "data": h["png"]}) for h in history]


def test_keys_steer_and_match_the_engine(page, play_server, tmp_path):
    right = play(
        page,
        [
            ("key", "ArrowRight"),
            ("key", "d"),
            ("key", "ArrowRight"),
            ("key", "d"),
            ("button", "text=pan →"),
            ("button", "#cut"),
            ("key", "ArrowUp"),
        ],
    )
    assert [h["action"] for h in right[1:]] == [4, 4, 4, 4, 0, 0, 1]
    assert right[5]["camera"] == {"pan": [2, 0]} and right[6]["cut"] is True
    left = play(page, [("key", "ArrowLeft"), ("key", "a"), ("key", "ArrowLeft"), ("key", "a")])
    assert [h["action"] for h in left[1:]] == [3, 3, 3, 3]
    a, b = np.asarray(shown(right), int), np.asarray(shown(left), int)
    assert np.abs(a[1:5] - b[1:5]).mean() > 0, "different keys gave the same frames"
    np.testing.assert_array_equal(a[0], b[0], "the same clip gave different context frames")
    for history, frames in ((right, a), (left, b)):
        for k, (mine, theirs) in enumerate(zip(frames, replay(play_server[0], history))):
            np.testing.assert_array_equal(mine, np.asarray(theirs, int), f"frame {k} differs from the engine's")
    assert page.inner_text("#fps") != "–" and float(page.inner_text("#latency")) >= 0
    page.screenshot(path=str(os.environ.get("WM_PLAY_SCREENSHOT") or tmp_path / "play.png"))


def test_a_picture_chosen_in_the_file_input_starts_a_session_the_keys_steer(page, play_server, tmp_path):
    picture = np.zeros((40, 56, 3), np.uint8)
    picture[:, :28] = (250, 250, 250)  # a white left half: unlike any clip's context
    path = tmp_path / "photo.png"
    iio.imwrite(path, picture)
    page.evaluate("window.wm.history = []")
    page.set_input_files("#image", str(path))
    page.wait_for_function("window.wm.history.length === 1 && !window.wm.busy", timeout=60_000)
    page.keyboard.press("ArrowRight")  # the keys steer again once the picture is chosen
    page.wait_for_function("window.wm.history.length === 2 && !window.wm.busy", timeout=60_000)
    history = page.evaluate("window.wm.history")
    assert history[1]["action"] == 4 and not page.inner_text("#error")
    frames = np.asarray(shown(history), int)
    uploaded = {"image": base64.b64encode(path.read_bytes()).decode(), "seed": 0}
    for k, (mine, theirs) in enumerate(zip(frames, replay(play_server[0], history, uploaded))):
        np.testing.assert_array_equal(mine, np.asarray(theirs, int), f"frame {k} differs from the engine's")
    clip = np.asarray(replay(play_server[0], history[:1])[0], int)
    assert np.abs(frames[0] - clip).mean() > 0, "the page started from a clip, not the picture"


def test_the_reference_input_is_off_for_a_model_without_an_identity_bank(page):
    assert page.is_disabled("#reference") and "no identity bank" in page.inner_text("#referenceName")


def test_a_reference_chosen_on_the_page_fills_the_identity_bank(browser, bank_dynamics_run, tmp_path):
    """A model with an identity bank: the reference picture chosen on the page starts a
    session with it in the bank, and the session's recording names it (its sha256)."""
    picture = np.zeros((16, 16, 3), np.uint8)
    picture[::2, ::2] = (255, 40, 40)
    path = tmp_path / "sprites.png"
    iio.imwrite(path, picture)
    engine = Engine(load_model(bank_dynamics_run), max_sessions=2)
    with BackgroundServer(create_app(engine, record_dir=tmp_path)) as server:
        tab = browser.new_page()
        tab.goto(server.url)
        tab.wait_for_function("window.wm && window.wm.ready", timeout=60_000)
        assert not tab.is_disabled("#reference")
        tab.evaluate("window.wm.history = []")
        tab.set_input_files("#reference", str(path))
        tab.wait_for_function("window.wm.history.length === 1 && !window.wm.busy", timeout=60_000)
        assert tab.inner_text("#referenceName") == "sprites.png" and not tab.inner_text("#error")
        tab.keyboard.press("ArrowUp")
        tab.wait_for_function("window.wm.history.length === 2 && !window.wm.busy", timeout=60_000)
        tab.click("#record")
        tab.wait_for_function("window.wm.recorded", timeout=60_000)
        video = tmp_path / "recordings" / tab.evaluate("window.wm.recorded")
        tab.close()
    start = json.loads(watermark.sidecar_path(video).read_text())["provenance"]["start"]
    assert start["reference_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and start["episode"] == 0


def test_record_button_writes_a_recording(page, play_server):
    play(page, [("key", "ArrowDown"), ("key", "s")])
    page.click("#record")
    page.wait_for_function("window.wm.recorded", timeout=60_000)
    name = page.evaluate("window.wm.recorded")
    assert (play_server[1] / "recordings" / name).is_file()
    assert name in page.inner_text("#recorded")


def test_play_button_streams_frames_with_the_held_key(page):
    play(page, [])
    page.click("#play")
    page.keyboard.down("ArrowLeft")
    page.wait_for_function("window.wm.history.length >= 6", timeout=60_000)
    page.keyboard.up("ArrowLeft")
    page.click("#play")
    page.wait_for_function("!window.wm.playing", timeout=60_000)
    history = page.evaluate("window.wm.history")
    assert [h["index"] for h in history] == list(range(history[0]["index"], history[0]["index"] + len(history)))
    assert 3 in {h["action"] for h in history[1:]}
    assert int(page.inner_text("#fps")) >= 1


def test_page_sends_the_token_from_its_address(browser, serve_model):
    engine = Engine(serve_model, max_sessions=16)  # the shared server's batch: compiled already
    with BackgroundServer(create_app(engine, token="t0ken")) as server:
        tab = browser.new_page()
        tab.goto(f"{server.url}/#token=t0ken")
        tab.wait_for_function("window.wm && window.wm.ready", timeout=60_000)
        tab.keyboard.press("ArrowUp")
        tab.wait_for_function("window.wm.history.length === 2 && !window.wm.busy", timeout=60_000)
        tab.close()
        tab = browser.new_page()  # (a new fragment alone would not reload the page)
        tab.goto(f"{server.url}/#token=wrong")
        tab.wait_for_function("document.getElementById('error').textContent.includes('Bearer')", timeout=60_000)
        tab.close()
