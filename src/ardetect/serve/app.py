"""The HTTP service: FastAPI over an ``Attributor``, with limits that hold under load and bad input.

Routes: ``POST /attribute`` (multipart: image, box, prompt, phrase, top_k, optional
shortlist and candidates), ``GET /health``, ``GET /model``, ``GET /images/{id}`` (a
training image of the index, optionally with a box drawn), ``GET /examples`` and
``GET /examples/{n}/image`` (the pipeline's queries, when the index was built from it),
the web page at ``/`` and the OpenAPI docs at ``/docs``.

Limits: the request body is cut at ``max_upload_bytes`` (413) as it arrives; an image's
pixel count is read from its header before it is decoded (413); ``top_k`` and the
candidate list are bounded. Every field, the image's header and the box against its
size are checked before the request queues; decoding and scoring run on one of
``workers`` threads, at most ``queue_size`` more wait, and any beyond get 503 with
``Retry-After`` at once; one not answered within ``request_timeout_s`` gets 504, and its scoring stops (the
scorer calls in flight are terminated) so the worker is free for the next. Every refused field gets a 4xx whose
``detail`` names the field and the problem.

Security defaults: the CLI binds 127.0.0.1; when the environment variable named by
``token_env`` is set, every route but ``/health`` needs ``Authorization: Bearer <token>``
(the page gets a cookie from ``/?token=<token>``); no CORS headers unless origins are
configured.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import resources
from typing import Annotated

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ardetect.export.runtime import Stop, Stopped
from ardetect.images import ImageRejected, draw_boxes, load_image, open_image, oriented_size, png_bytes, probe_image
from ardetect.serve.attribution import Attributor
from ardetect.serve.requests import (Limits, RequestError, check_box_in_image, check_prompt, check_shortlist, check_top_k, parse_box,
                                     parse_candidates)

TOKEN_COOKIE = "ard_token"
PUBLIC_PATHS = ("/health",)


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int, size: int | None = None):
        got = f"{size:,} bytes" if size is not None else "more"
        super().__init__(413, f"body: {got} is over the upload limit of {limit:,} bytes (serve.max_upload_bytes)")


class BodyLimit:
    """ASGI middleware: refuse a body over ``limit`` bytes from its Content-Length, or while it streams in."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, int(limit)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return await _json(send, 400, {"detail": f"content-length: {declared[:40]!r} is not a number", "field": "content-length"})
            if size > self.limit:
                return await _json(send, 413, {"detail": str(BodyTooLarge(self.limit, size).detail), "field": "body"})
        received, over, started = 0, False, False
        limit = self.limit
        too_large = {"detail": str(BodyTooLarge(limit).detail), "field": "body"}

        async def counted():
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    raise BodyTooLarge(limit)
            return message

        async def answered(message):
            # a body cut as it streams in (no Content-Length) gets the 413, whatever the layers inside made of the
            # exception (FastAPI's form parsing answers 400 "error parsing the body")
            nonlocal started
            if over:
                if not started:
                    started = True
                    await _json(send, 413, too_large)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, answered)
        except BodyTooLarge:
            if not started:
                started = True
                await _json(send, 413, too_large)


async def _json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


class Gate:
    """A bounded queue in front of ``workers`` threads: ``submit`` returns None when it is full."""

    def __init__(self, workers: int, queue_size: int):
        self.workers, self.capacity = int(workers), int(workers) + int(queue_size)
        self.executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="ard-attribute")
        self.inside = 0
        self.refused = 0
        self.served = 0
        self.mean_s = 1.0  # running mean of a job's time, for Retry-After
        self._lock = threading.Lock()

    def submit(self, fn) -> Future | None:
        with self._lock:
            if self.inside >= self.capacity:
                self.refused += 1
                return None
            self.inside += 1
        start = time.perf_counter()

        def timed():
            nonlocal start
            start = time.perf_counter()
            return fn()

        fut = self.executor.submit(timed)
        fut.add_done_callback(lambda f: self._leave(time.perf_counter() - start, f.cancelled()))
        return fut

    def _leave(self, seconds: float, cancelled: bool) -> None:
        with self._lock:
            self.inside -= 1
            if not cancelled:
                self.served += 1
                self.mean_s = 0.8 * self.mean_s + 0.2 * seconds

    def retry_after(self) -> int:
        with self._lock:
            return int(min(60, max(1, math.ceil(self.mean_s * self.inside / self.workers))))

    def state(self) -> dict:
        with self._lock:
            return {"in_flight": self.inside, "capacity": self.capacity, "workers": self.workers, "served": self.served, "refused": self.refused}


def create_app(attributor: Attributor, cfg, token: str | None = None) -> FastAPI:
    """The app over ``attributor`` with ``cfg`` (``ServeConfig``) limits; ``token``: the bearer token, None = open."""
    limits = Limits.of(cfg)
    gate = Gate(cfg.workers, cfg.queue_size)
    index = attributor.index
    app = FastAPI(
        title="ardetect attribution service",
        version="1",
        description="Region-level data attribution: which training images, and where in them, an object of a generated image came from.",
    )
    app.state.gate, app.state.attributor = gate, attributor
    static = resources.files("ardetect.serve") / "static"

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, err: RequestError):
        return JSONResponse({"detail": str(err), "field": err.field}, status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        errors = err.errors()
        parts = []
        for e in errors:
            field = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path"))
            parts.append(f"{field}: {e.get('msg')}")
        first = errors[0].get("loc", ("?",))[-1] if errors else "?"
        return JSONResponse({"detail": "; ".join(parts), "field": str(first)}, status_code=422)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if token is None or request.url.path in PUBLIC_PATHS or request.method == "OPTIONS":
            return await call_next(request)
        given = request.query_params.get("token")
        if request.url.path == "/" and given is not None and hmac.compare_digest(given.encode(), token.encode()):
            resp = RedirectResponse("/", status_code=303)
            resp.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
            return resp
        header = request.headers.get("authorization", "")
        bearer = header[7:].strip() if header.lower().startswith("bearer ") else ""
        cookie = request.cookies.get(TOKEN_COOKIE, "")
        if not (hmac.compare_digest(bearer.encode(), token.encode()) or hmac.compare_digest(cookie.encode(), token.encode())):
            what = "a wrong bearer token" if bearer else "no bearer token"
            return JSONResponse({"detail": f"authorization: {what}; send 'Authorization: Bearer <token>'", "field": "authorization"},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    if cfg.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyLimit, limit=cfg.max_upload_bytes)

    @app.get("/health", summary="liveness: 200 while the service can take requests")
    def health():
        return {"status": "ok", "queue": gate.state(), "index_size": len(index)}

    @app.get("/model", summary="the served model: registered name, version, alias, providers, index size")
    def model():
        return attributor.describe()

    @app.post("/attribute", summary="rank the index's training images for an object of a generated image")
    async def attribute(
        image: Annotated[UploadFile | None, File(description="the generated image (PNG, JPEG, ...)")] = None,
        box: Annotated[str | None, Form(description="the object's box in the image, pixels: x0,y0,x1,y1")] = None,
        prompt: Annotated[str | None, Form(description="the prompt the image was generated from")] = None,
        phrase: Annotated[str | None, Form(description="the concept phrase; must occur in the prompt, e.g. 'V* cat'")] = None,
        top_k: Annotated[int, Form(description="results to return")] = cfg.top_k,
        shortlist: Annotated[int | None, Form(description="images the embedding search passes to the scorer (default: serve.shortlist)")] = None,
        candidates: Annotated[list[str] | None, Form(description="score only these image ids (repeat the field or separate by commas)")] = None,
    ):
        t0 = time.perf_counter()
        if image is None:
            raise RequestError("image", "is missing: send the generated image as a file field named 'image'")
        q_box = parse_box(box) if box is not None else _missing("box")
        q_prompt, q_phrase = check_prompt(prompt, phrase, limits.max_prompt_chars)
        k = check_top_k(top_k, limits)
        n = check_shortlist(shortlist, limits)
        ids = parse_candidates(candidates, limits)
        if ids is not None:
            index.positions_of(ids)  # unknown ids are refused here, before the queue
        data = await image.read()
        try:  # the header only: what is not an image, or too many pixels, is refused before the queue
            probed = probe_image(data, limits.max_pixels)
        except ImageRejected as err:
            raise RequestError("image", str(err), err.status) from None
        check_box_in_image(q_box, *oriented_size(probed))

        stop = Stop()

        def job():  # decoding and scoring: behind the queue
            if stop.is_set():  # timed out while it waited
                raise Stopped("timed out in the queue")
            try:
                img = load_image(probed)
            except ImageRejected as err:
                raise RequestError("image", str(err), err.status) from None
            return attributor.attribute(img, q_box, q_prompt, q_phrase, top_k=k, shortlist=n, candidates=ids, stop=stop)

        fut = gate.submit(job)
        if fut is None:
            retry = gate.retry_after()
            return JSONResponse({"detail": f"queue: full ({gate.capacity} requests in progress or waiting); retry in {retry} s",
                                 "field": "queue"}, status_code=503, headers={"Retry-After": str(retry)})
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(fut), timeout=cfg.request_timeout_s)
        except TimeoutError:
            stop.set()  # the worker stops scoring (and a request still queued never starts): its thread is free again
            return JSONResponse({"detail": f"timeout: no answer within {cfg.request_timeout_s:g} s (serve.request_timeout_s)",
                                 "field": "timeout"}, status_code=504)
        body = result.as_dict()
        body["timing_ms"]["request"] = round((time.perf_counter() - t0) * 1e3, 2)
        body["model"] = {"name": attributor.model.name, "version": attributor.model.version}
        return body

    @app.get("/images/{image_id:path}", summary="a training image of the index, optionally with boxes drawn",
             responses={200: {"content": {"image/png": {}}}})
    def get_image(image_id: str, box: str | None = None, concept: bool = False):
        try:
            path = index.path_of(image_id)
        except KeyError:
            raise RequestError("image_id", f"{image_id[:80]!r} is not an image of this index", 404) from None
        if not path.is_file():
            raise RequestError("image_id", f"{image_id[:80]!r}: its file is missing from {index.root}", 404)
        boxes = []
        if box is not None:
            boxes.append((parse_box(box), "#e4003a"))
        if concept:
            known = index.info(index.position[image_id])["concept_box"]
            if known is not None:
                boxes.append((known, "#00b050"))
        if not boxes:
            return FileResponse(path)
        try:
            drawn = draw_boxes(open_image(path), boxes)
        except (ImageRejected, OSError) as err:  # the index's own file: the server's fault, named
            raise RequestError("image_id", f"{image_id[:80]!r}: its file {path.name} cannot be read: {err}", 500) from None
        return Response(png_bytes(drawn), media_type="image/png")

    @app.get("/examples", summary="queries of the pipeline's data the index was built from (empty for a folder index)")
    def examples(limit: int = 50):
        ex = index.examples
        if ex is None:
            return []
        rows = ex.head(max(0, min(int(limit), 500)))
        return [{"n": i, "tuple_id": r.tuple_id, "split": r.split, "file": r.query_image.rsplit("/", 1)[-1], "prompt": r.prompt,
                 "concept_phrase": r.concept_phrase, "query_box": [float(v) for v in r.query_box], "train_id": r.train_id}
                for i, r in enumerate(rows.itertuples())]

    @app.get("/examples/{n}/image", summary="an example's generated image", responses={200: {"content": {"image/png": {}}}})
    def example_image(n: int):
        ex = index.examples
        if ex is None or not 0 <= n < len(ex):
            raise RequestError("n", f"{n} is not an example of this index", 404)
        try:
            path = index.file_under_root(ex["query_image"].iloc[n], str(n))
        except KeyError:
            raise RequestError("n", f"example {n}'s image is not under the index root", 404) from None
        if not path.is_file():
            raise RequestError("n", f"example {n}'s image is missing from {index.root}", 404)
        return FileResponse(path)

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(str(static / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    return app


class RedactToken(logging.Filter):
    """Access-log filter: a ``token=`` query parameter (the page's one-time login) is logged as ``token=***``."""

    pattern = re.compile(r"(token=)[^&\s]*")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self.pattern.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args)
        return True


def uvicorn_log_config() -> dict:
    """uvicorn's logging configuration with ``RedactToken`` on the access log."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact_token"] = {"()": RedactToken}
    config["handlers"]["access"]["filters"] = ["redact_token"]
    return config


def _missing(field: str):
    raise RequestError(field, "is missing")


def token_from_env(cfg) -> str | None:
    value = os.environ.get(cfg.token_env, "")
    return value or None
