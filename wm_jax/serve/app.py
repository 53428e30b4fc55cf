"""The HTTP API of `wm serve`, and the page of `wm play`: a starlette app over an Engine.

    GET    /                          the play page (static/play.html; no token needed: it holds no data)
    GET    /v1/health                 {"ok": true, "queue": pending steps, **Engine.info()}
    POST   /v1/sessions               {"clip": 0, "seed": 0} -> {"session", "index", "context_frames", "frame"}
                                      or {"image": base64 PNG/JPEG, "seed": 0}: that picture held still as the context;
                                      either with "reference": base64 PNG/JPEG, the identity bank's frame
                                      (a model with an identity bank; else 400)
    POST   /v1/sessions/{id}/step     {"action": 0, "camera": {"pan": [dx, dy], "tilt": dy, "dolly": dz},
                                       "cut": false, "format": "png" | "rgb"} -> {"session", "index", "frame"}
    DELETE /v1/sessions/{id}          -> {"deleted": id}
    POST   /v1/sessions/{id}/record   -> {"name", "frames"}: a watermarked mp4 + sidecar under RECORD_DIR/recordings/
    POST   /v1/generate               {"script": shot-list YAML text, "seed": 0}
                                      -> {"name", "video_mp4_base64", "sidecar"} (`wm generate`'s video)

A frame is {"format": "png", "data": base64 PNG} or {"format": "rgb", "shape": [H, W, 3],
"data": base64 of the raw uint8 bytes, row-major}. Every field of a body is optional.
An error is {"error": reason} with its status: 400 bad input (malformed JSON, an unknown
key, action or type, an image upload that is not base64 of a PNG or JPEG of 1..4096 px a
side, a script error naming its line), 401 a missing or wrong bearer token, 404 an
unknown session, 413 a body past the limit, 429 sessions or queue full, 500 a bug (the
server keeps serving either way). No request names a file on the server: a
script that gives `data`, `images` or `image` is refused; recordings get names chosen here.

Concurrent steps are gathered (`Batcher`): a step waits up to `gather_s` for the other
sessions' steps (not at all once every session has one pending), and all that are pending
then go into one engine step, at most one per session, on one worker thread.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import functools
import hmac
import io
import json
import math
import tempfile
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from wm_jax.config import ConfigError
from wm_jax.serve.engine import CapacityError, Engine, EngineError, Frame, StepRequest

STEP_KEYS = ("action", "camera", "cut", "format")
CAMERA_KEYS = ("pan", "tilt", "dolly")
SESSION_KEYS = ("clip", "image", "reference", "seed")
GENERATE_KEYS = ("script", "seed")
FORMATS = ("png", "rgb")


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def encode_frame(image: np.ndarray, fmt: str = "png") -> dict[str, Any]:
    """uint8 [H, W, 3] -> {"format", "data": base64} (PNG, or raw RGB bytes with "shape")."""
    if fmt == "rgb":
        return {"format": "rgb", "shape": list(image.shape), "data": base64.b64encode(image.tobytes()).decode()}
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return {"format": "png", "data": base64.b64encode(buf.getvalue()).decode()}


def decode_frame(frame: dict[str, Any]) -> np.ndarray:
    """`encode_frame`'s output -> uint8 [H, W, 3] (for clients and tests)."""
    data = base64.b64decode(frame["data"])
    if frame["format"] == "rgb":
        return np.frombuffer(data, np.uint8).reshape(frame["shape"])
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object ({} when empty); 413 past `limit` bytes, 400 otherwise bad."""
    too_big = f"the body may hold at most {limit} bytes (an uploaded image counts base64: 4/3 of its file)"
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise HTTPError(413 if declared.isdigit() else 400, too_big)
    body = b""
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise HTTPError(413, too_big)
    if not body.strip():
        return {}
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise HTTPError(400, f"malformed JSON: {e}") from None
    if not isinstance(value, dict):
        raise HTTPError(400, f"the body must be a JSON object, got {type(value).__name__}")
    return value


def _keys(body: dict[str, Any], allowed: tuple[str, ...], what: str) -> dict[str, Any]:
    unknown = [k for k in body if k not in allowed]
    if unknown:
        raise HTTPError(400, f"unknown key '{unknown[0]}' in {what}; valid keys: {list(allowed)}")
    return body


def parse_session(body: dict[str, Any]) -> dict[str, Any]:
    """A session body -> `Engine.create`'s keyword arguments, the uploads' base64 decoded to
    the files' bytes (strings, never paths: nothing is read from the server's disk)."""
    _keys(body, SESSION_KEYS, "a session")
    if "clip" in body and "image" in body:
        raise HTTPError(400, "give 'clip' (a test episode) or 'image' (an uploaded picture), not both")
    args = {"seed": body.get("seed", 0)}
    if "reference" in body:
        args["reference"] = _upload(body["reference"], "reference")
    if "image" not in body:
        return {**args, "clip": body.get("clip", 0)}
    return {**args, "image": _upload(body["image"], "image")}


def _upload(text: Any, name: str) -> bytes:
    """The bytes of an uploaded file sent as base64 text in field `name`; 400 naming it."""
    if not isinstance(text, str):
        raise HTTPError(400, f"'{name}' must be a base64 string of a PNG or JPEG file, got {type(text).__name__}")
    try:  # whitespace allowed: `base64 FILE` wraps its lines
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise HTTPError(400, f"'{name}' is not valid base64 ({e})") from None
    if not data:
        raise HTTPError(400, f"'{name}' is empty")
    return data


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise HTTPError(400, f"'{name}' must be a finite number, got {value!r}")
    return float(value)


def parse_step(session: str, body: dict[str, Any]) -> tuple[StepRequest, str]:
    """A step body -> (StepRequest, frame format); 400 naming the first bad field."""
    _keys(body, STEP_KEYS, "a step")
    camera = body.get("camera") or {}
    if not isinstance(camera, dict):
        raise HTTPError(400, f"'camera' must be an object with keys {list(CAMERA_KEYS)}, got {camera!r}")
    _keys(camera, CAMERA_KEYS, "'camera'")
    pan = camera.get("pan", [0, 0])
    if not isinstance(pan, list) or len(pan) != 2:
        raise HTTPError(400, f"'camera.pan' must be a list of 2 numbers [dx, dy], got {pan!r}")
    dx, dy = (_number(v, "camera.pan") for v in pan)
    dy += _number(camera.get("tilt", 0), "camera.tilt")
    move = (dx, dy, _number(camera.get("dolly", 0), "camera.dolly"))
    fmt = body.get("format", "png")
    if fmt not in FORMATS:
        raise HTTPError(400, f"'format' must be one of {list(FORMATS)}, got {fmt!r}")
    return StepRequest(session, body.get("action", 0), move, body.get("cut", False)), fmt


def refuse_paths(text: str) -> Any:
    """A shot script (YAML text) parsed, refused (400 naming the line) where it names a file
    or directory on the server: its frames come from the run's own dataset."""
    from wm_jax.inference.shot_script import ScriptError, parse_script

    try:
        script = parse_script(text, "script.yaml")
    except ScriptError as e:
        raise HTTPError(400, str(e)) from None
    for source, keys in ((script.start, ("data", "images")), (script.reference, ("data", "image"))):
        if source is None:
            continue
        for key in keys:
            if getattr(source, key if key != "image" else "images"):
                error = script.checker.error(
                    source.path + (key,),
                    "a script sent over HTTP may not name a file or directory on the server: "
                    "it uses the run's dataset (`split`, `episode`, `t`)",
                )
                raise HTTPError(400, str(error))
    return script


class Batcher:
    """Gathers concurrent step requests into engine steps, run one at a time on `run_sync`
    (the engine's worker thread). At most `max_queue` steps wait; past that, 429."""

    def __init__(self, engine: Engine, run_sync: Callable[..., Awaitable[Any]], max_queue: int, gather_s: float):
        self.engine, self.run_sync, self.max_queue, self.gather_s = engine, run_sync, max_queue, gather_s
        self.pending: collections.deque[tuple[StepRequest, asyncio.Future]] = collections.deque()
        self.wake = asyncio.Event()

    def submit(self, request: StepRequest) -> asyncio.Future:
        if len(self.pending) >= self.max_queue:
            raise CapacityError(f"the step queue is full ({self.max_queue} steps waiting); retry shortly")
        future = asyncio.get_running_loop().create_future()
        self.pending.append((request, future))
        self.wake.set()
        return future

    def _take(self) -> list[tuple[StepRequest, asyncio.Future]]:
        """The next batch: the oldest pending step of each session (the rest wait their turn)."""
        batch, rest, seen = [], collections.deque(), set()
        for request, future in self.pending:
            if future.done():
                continue
            (rest if request.session in seen else batch).append((request, future))
            seen.add(request.session)
        self.pending = rest
        if not rest:
            self.wake.clear()
        return batch

    async def run(self) -> None:
        while True:
            await self.wake.wait()
            sessions = {r.session for r, _ in self.pending}
            if len(sessions) < self.engine.active_sessions:  # others may be about to send theirs
                await asyncio.sleep(self.gather_s)
            batch = self._take()
            if not batch:
                continue
            try:
                results = await self.run_sync(self.engine.step, [r for r, _ in batch])
            except Exception as e:  # noqa: BLE001 — a failed step fails its requests, not the server
                results = [e] * len(batch)
            for (_, future), result in zip(batch, results):
                if not future.done():
                    (future.set_exception if isinstance(result, Exception) else future.set_result)(result)


def _guarded(
    token: str | None, handler: Callable[[Request], Awaitable[Any]]
) -> Callable[[Request], Awaitable[Response]]:
    """handler (returning a JSON-able value) behind the bearer token, with errors as JSON."""

    async def endpoint(request: Request) -> Response:
        try:
            if token is not None:
                given = request.headers.get("authorization", "")
                if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), token.encode())):
                    raise HTTPError(
                        401, "this server needs `Authorization: Bearer TOKEN` (the --token it was started with)"
                    )
            return JSONResponse(await handler(request))
        except (HTTPError, EngineError) as e:
            headers = {"WWW-Authenticate": "Bearer"} if getattr(e, "status", 0) == 401 else None
            return JSONResponse({"error": str(e)}, status_code=e.status, headers=headers)
        except ConfigError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        except Exception as e:  # noqa: BLE001 — a bug answers 500; the server keeps serving
            return JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, status_code=500)

    return endpoint


def create_app(
    engine: Engine,
    *,
    token: str | None = None,
    max_queue: int = 64,
    gather_s: float = 0.004,
    max_body_bytes: int = 1 << 20,
    record_dir: str | Path | None = None,
    generate_max_gib: float = 2.0,
    expire_every_s: float = 1.0,
) -> Starlette:
    """The app (see the module doc). Recordings go under RECORD_DIR/recordings/ (default:
    the run's directory); `/v1/generate` refuses videos past `generate_max_gib` GiB."""
    from wm_jax.inference import generate as generate_lib

    workers = {name: ThreadPoolExecutor(1, thread_name_prefix=f"wm-serve-{name}") for name in ("engine", "io")}
    record_dir = Path(record_dir or engine.model.workdir)
    generating = threading.Lock()
    state: dict[str, Any] = {}

    def on(worker: str) -> Callable[..., Awaitable[Any]]:
        return lambda fn, *args: asyncio.get_running_loop().run_in_executor(workers[worker], fn, *args)

    async def health(request: Request) -> dict:
        return {"ok": True, "queue": len(state["batcher"].pending), **engine.info()}

    async def create(request: Request) -> dict:
        args = parse_session(await read_json(request, max_body_bytes))
        session, frames = await on("engine")(functools.partial(engine.create, **args))
        return {
            "session": session,
            "index": len(frames) - 1,
            "context_frames": len(frames),
            "frame": encode_frame(frames[-1]),
        }

    async def step(request: Request) -> dict:
        sid = request.path_params["sid"]
        step_request, fmt = parse_step(sid, await read_json(request, max_body_bytes))
        engine.check(step_request)
        frame: Frame = await state["batcher"].submit(step_request)
        return {"session": sid, "index": frame.index, "frame": encode_frame(frame.image, fmt)}

    async def delete(request: Request) -> dict:
        await on("engine")(engine.delete, request.path_params["sid"])
        return {"deleted": request.path_params["sid"]}

    async def record(request: Request) -> dict:
        path = await on("io")(engine.record, request.path_params["sid"], record_dir)
        return {"name": path.name, "frames": json.loads(Path(f"{path}.json").read_text())["provenance"]["frames"]}

    async def generate(request: Request) -> dict:
        text, seed = parse_generate(await read_json(request, max_body_bytes))
        if not generating.acquire(blocking=False):
            raise CapacityError("a generation is running; retry when it is done")
        try:
            return await on("io")(
                _generate, generate_lib, engine.model.workdir, text, seed, generate_max_gib, engine.render
            )
        finally:
            generating.release()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        state["batcher"] = batcher = Batcher(engine, on("engine"), max_queue, gather_s)
        tasks = [
            asyncio.create_task(batcher.run()),
            asyncio.create_task(_expire_loop(engine, on("engine"), expire_every_s)),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for worker in workers.values():
                worker.shutdown(wait=False, cancel_futures=True)

    handlers = dict(health=health, create=create, step=step, delete=delete, record=record, generate=generate)
    return Starlette(routes=_routes(token, handlers), lifespan=lifespan)


def parse_generate(body: Any) -> tuple[str, int]:
    """A `/v1/generate` request's JSON body -> (script text, seed); HTTPError 400 for a bad
    one (unknown key, no script, a bad seed, a script that names a file)."""
    body = _keys(body, GENERATE_KEYS, "a generate request")
    text, seed = body.get("script"), body.get("seed", 0)
    if not isinstance(text, str) or not text.strip():
        raise HTTPError(400, "'script' must be the text of a shot list (YAML), as `wm generate --script` reads")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise HTTPError(400, f"'seed' must be an integer >= 0, got {seed!r}")
    refuse_paths(text)
    return text, seed


def _routes(token: str | None, handlers: dict[str, Callable[[Request], Awaitable[dict]]]) -> list[Route]:
    """The page and the API's routes to `create_app`'s handlers, each behind the token check."""
    page = (resources.files("wm_jax.serve") / "static" / "play.html").read_text()
    guarded = {name: _guarded(token, fn) for name, fn in handlers.items()}
    return [
        Route("/", lambda request: HTMLResponse(page)),
        Route("/v1/health", guarded["health"]),
        Route("/v1/sessions", guarded["create"], methods=["POST"]),
        Route("/v1/sessions/{sid}/step", guarded["step"], methods=["POST"]),
        Route("/v1/sessions/{sid}", guarded["delete"], methods=["DELETE"]),
        Route("/v1/sessions/{sid}/record", guarded["record"], methods=["POST"]),
        Route("/v1/generate", guarded["generate"], methods=["POST"]),
    ]


async def _expire_loop(engine: Engine, run_sync: Callable[..., Awaitable[Any]], every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        await run_sync(engine.expire)


def _generate(generate_lib: Any, workdir: Path, text: str, seed: int, max_gib: float, render: str) -> dict[str, Any]:
    """`wm generate` of a script's text in a private temporary directory, rendered as the
    engine renders (`render`) -> the JSON reply."""
    with tempfile.TemporaryDirectory(prefix="wm-serve-") as tmp:
        script, out = Path(tmp) / "script.yaml", Path(tmp) / "generated.mp4"
        script.write_text(text)
        generate_lib.generate(workdir, script, out, seed=seed, max_memory_gib=max_gib, render=render)
        return {
            "name": out.name,
            "video_mp4_base64": base64.b64encode(out.read_bytes()).decode(),
            "sidecar": json.loads(Path(f"{out}.json").read_text()),
        }


class BackgroundServer:
    """uvicorn serving `app` on host:port (0: a free port) in a daemon thread; `url` once
    entered. For tests, benches and `wm play`'s own checks."""

    def __init__(self, app: Starlette, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        # log_config None: uvicorn leaves logging alone (its handlers would hold whatever
        # sys.stderr was then, e.g. a test's capture, closed by the time they flush).
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on", log_config=None)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="wm-serve-uvicorn")
        self.host, self.url = host, ""

    def __enter__(self) -> "BackgroundServer":
        import time

        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
