"""The ASGI app of `diffret serve` (Starlette): the page, the search API, the media and thumbnails.

    GET /                         the page (static/index.html, app.js, style.css: package data)
    GET /api/info                 the collection: videos, generator or not, the request bounds
    GET /api/search?q=&k=&order=  the Searcher's hits (as `diffret search --json`), each with a media_id;
                                  order=stage1 sorts the re-ranked pool by the stage-1 rank
    GET /api/videos/{media_id}    one video's metadata
    GET /media/{media_id}         the source video, with byte ranges (206 + Content-Range) to seek
    GET /thumb/{media_id}?t=S     a JPEG of moment S (decoded on demand, LRU-cached; a placeholder
                                  for a video that is gone)

One Searcher (model and caches loaded once, before the app starts) serves every request; searches
that arrive together run as one batch in a worker thread, one batch at a time (batcher.py). Every
error is a JSON body {"error": "..."} with its status; nothing a client sends becomes a path
(media.py), and no response carries a stack trace (the trace goes to the server's log).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from importlib import resources

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .batcher import SearchBatcher
from .config import ALL, ServeOptions
from .media import CHUNK, MediaTable, content_type, open_file, parse_range
from .thumbs import Thumbnails

log = logging.getLogger("diffret.serve")

STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; media-src 'self'; "
                                 b"object-src 'none'; base-uri 'none'; frame-ancestors 'none'"),
]
DEFAULT_QUERY_CHARS = 1000  # where a Searcher does not say its limit


class ApiError(HTTPException):
    """An error answered as {"error": detail} with its status."""


def to_json(obj) -> bytes:
    return json.dumps(obj, allow_nan=False, default=_plain, ensure_ascii=False).encode()


def json_response(obj, status: int = 200, headers: dict | None = None) -> Response:
    body = obj if isinstance(obj, bytes) else to_json(obj)
    return Response(body, status, headers=headers, media_type="application/json")


def _plain(x):
    """numpy / torch scalars and arrays as plain JSON values."""
    if hasattr(x, "tolist"):
        return x.tolist()
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON: {type(x).__name__}")


def search_error() -> type[Exception]:
    """The Searcher's error for a bad request (pipeline/search.py SearchError, a ValueError)."""
    try:
        from diffret.pipeline.search import SearchError
    except ImportError:  # a stand-in searcher without the search module
        return ValueError
    return SearchError


def rerank_depth() -> int:
    """How many of a query's best the generator re-ranks (pipeline/search.py RERANK)."""
    try:
        from diffret.pipeline.search import RERANK
    except ImportError:
        return 32
    return int(RERANK)


class SearchService:
    """The shared Searcher behind a lock, with the request bounds and the media ids of the hits."""

    def __init__(self, searcher, table: MediaTable, opts: ServeOptions):
        self.searcher, self.table, self.opts = searcher, table, opts
        self.n_videos = len(searcher.videos)
        self.has_generator = bool(getattr(searcher, "has_generator", False))
        self.max_query_chars = int(getattr(searcher, "max_query_chars", DEFAULT_QUERY_CHARS))
        self.rerank_depth = rerank_depth()  # the pool the generator re-ranks
        candidates = None if opts.candidates is None else self.n_videos if opts.candidates == ALL else opts.candidates
        self.batcher = SearchBatcher(searcher, search_error(), opts.batch, candidates)

    def warm_up(self) -> None:
        """One search before serving: builds what the Searcher builds on first use (its in-memory gallery)."""
        try:
            with self.batcher.lock:
                self.searcher.search("a video", k=1)
        except Exception:  # noqa: BLE001  a collection that cannot answer this says so on the first request
            pass

    def info(self) -> dict:
        return {"videos": self.n_videos, "has_generator": self.has_generator, "k": min(self.opts.k, self.n_videos),
                "max_k": min(self.opts.max_k, self.n_videos), "max_query_chars": self.max_query_chars}

    def check(self, q: str | None, k: str | None, order: str | None) -> tuple[str, int, str]:
        """The query, k and order of a request, or an ApiError(400) saying what is wrong."""
        q = q or ""
        if not q.strip():
            raise ApiError(400, "empty query: type a few words describing the video")
        if len(q) > self.max_query_chars:
            raise ApiError(400, f"query too long: {len(q)} characters, at most {self.max_query_chars}")
        bound = min(self.opts.max_k, self.n_videos)
        if k is None or k == "":
            n = min(self.opts.k, bound)
        else:
            try:
                n = int(k, 10) if len(k) <= 12 else 0
            except ValueError:
                raise ApiError(400, f"k must be a whole number from 1 to {bound}") from None
            if n < 1:
                raise ApiError(400, f"k must be a whole number from 1 to {bound}")
            n = min(n, bound)  # bounded: a larger k is clamped
        order = order or "final"
        if order not in ("final", "stage1"):
            raise ApiError(400, "order must be 'final' or 'stage1'")
        return q, n, order

    async def search(self, q: str, k: int, order: str) -> bytes:
        """The JSON body answering one checked request (searched in a batch with those that arrive
        with it; the body is made in the batch's worker thread, off the event loop)."""
        reorder = order == "stage1" and self.has_generator
        want = min(max(k, self.rerank_depth), self.n_videos) if reorder else k
        started = time.perf_counter()

        def finish(hits: list[dict]) -> bytes:
            if reorder:  # the stage-1 top k is inside the re-ranked pool (+ the stage-1 order after it)
                hits = sorted(hits, key=lambda h: h["stage1_rank"])[:k]
            out = []
            for h in hits:
                entry = self.table.of_index(h.get("video_index"))
                out.append({**h, "media_id": entry.media_id if entry else None})
            return to_json({"query": q, "k": k, "order": order if self.has_generator else "final",
                            "has_generator": self.has_generator, "seconds": round(time.perf_counter() - started, 4),
                            "hits": out})

        try:
            return await self.batcher.search(q, want, finish)
        except search_error() as e:
            raise ApiError(400, str(e).splitlines()[0] if str(e) else "bad query") from None


class RangeFileResponse(Response):
    """Bytes [start, end] of an open file descriptor, streamed; closes it whatever happens. Stops
    reading as soon as the client disconnects (mid-download is normal: a browser seeking)."""

    def __init__(self, fd: int, start: int, end: int, status: int, headers: dict, head_only: bool):
        super().__init__(None, status, headers=headers)
        self.fd, self.start, self.end, self.head_only = fd, start, end, head_only

    async def __call__(self, scope, receive, send):
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            if self.head_only or self.end < self.start:
                await send({"type": "http.response.body", "body": b""})
                return
            async with anyio.create_task_group() as tg:
                async def watch():
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                await self._body(send)
                tg.cancel_scope.cancel()
        except OSError:  # the connection went away under a send
            pass
        finally:
            os.close(self.fd)

    async def _body(self, send):
        pos, chunk = self.start, CHUNK
        while pos <= self.end:
            # read in the event loop: a page-cached local read takes microseconds, while a hop to a
            # worker thread and back waits for the GIL twice behind a running search
            data = os.pread(self.fd, min(chunk, self.end + 1 - pos), pos)
            pos += len(data)
            last = not data or pos > self.end
            await send({"type": "http.response.body", "body": data, "more_body": not last})
            if not data:
                return


def create_app(searcher, opts: ServeOptions | None = None) -> Starlette:
    """The app over a loaded `Searcher` (pipeline/search.py, or anything with its attributes)."""
    opts = opts or ServeOptions()
    table = MediaTable(searcher.videos)
    service = SearchService(searcher, table, opts)
    thumbs = Thumbnails(opts.thumb_width, int(opts.thumb_cache_mb * 2**20))
    pkg = resources.files("diffret.pipeline.serve") / "static"
    static = {name: (pkg / name).read_bytes() for name in STATIC}  # read once; a request picks a key

    def entry_of(request: Request):
        entry = table.get(request.path_params["media_id"])
        if entry is None:
            raise ApiError(404, "unknown media id")
        return entry

    async def page(request: Request):
        return Response(static["index.html"], media_type=STATIC["index.html"], headers={"cache-control": "no-cache"})

    async def static_file(request: Request):
        name = request.path_params["name"]
        if name not in static or name == "index.html":
            raise ApiError(404, "not found")
        return Response(static[name], media_type=STATIC[name], headers={"cache-control": "no-cache"})

    async def info(request: Request):
        return json_response(service.info())

    async def search(request: Request):
        p = request.query_params
        q, k, order = service.check(p.get("q"), p.get("k"), p.get("order"))
        return json_response(await service.search(q, k, order))

    async def video(request: Request):
        return json_response(entry_of(request).metadata())

    async def media(request: Request):
        entry = entry_of(request)
        opened = open_file(entry.path) if entry.path is not None else None
        if opened is None:
            raise ApiError(404, "video file not available (missing or moved)")
        fd, size = opened
        rng = parse_range(request.headers.get("range"), size)
        headers = {"accept-ranges": "bytes", "content-type": content_type(entry.path), "cache-control": "no-cache"}
        if rng is False:
            os.close(fd)
            return json_response({"error": "range not satisfiable"}, 416, {"content-range": f"bytes */{size}"})
        start, end = rng if rng else (0, size - 1)
        headers["content-length"] = str(max(0, end + 1 - start))
        if rng:
            headers["content-range"] = f"bytes {start}-{end}/{size}"
        return RangeFileResponse(fd, start, end, 206 if rng else 200, headers, request.method == "HEAD")

    async def thumb(request: Request):
        entry = entry_of(request)
        raw = request.query_params.get("t", "0")
        try:
            t = float(raw) if len(raw) <= 32 else math.nan
        except ValueError:
            t = math.nan
        if not math.isfinite(t) or t < 0:
            raise ApiError(400, "t must be a time in seconds, >= 0")
        duration = entry.video.get("duration")
        if duration is not None and math.isfinite(duration):
            t = min(t, max(0.0, float(duration)))
        data, real = thumbs.cached(entry.media_id, t), True  # a hit needs no worker thread
        if data is None:
            data, real = await anyio.to_thread.run_sync(thumbs.get, entry.media_id, entry.path, t)
        headers = {"cache-control": "max-age=3600" if real else "no-store"}
        if not real:
            headers["x-diffret-placeholder"] = "1"
        return Response(data, media_type="image/jpeg", headers=headers)

    async def http_error(request: Request, exc: HTTPException):
        detail = exc.detail if isinstance(exc, ApiError) else {404: "not found", 405: "method not allowed"}.get(
            exc.status_code, "bad request")
        return json_response({"error": detail}, exc.status_code, getattr(exc, "headers", None))

    async def server_error(request: Request, exc: Exception):
        log.error("internal error on %s", request.url.path, exc_info=exc)  # the trace stays in the log
        return json_response({"error": "internal server error (the server's log has the details)"}, 500)

    routes = [
        Route("/", page), Route("/static/{name}", static_file), Route("/api/info", info),
        Route("/api/search", search), Route("/api/videos/{media_id}", video),
        Route("/media/{media_id}", media, methods=["GET", "HEAD"]), Route("/thumb/{media_id}", thumb),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.service, app.state.table, app.state.thumbs = service, table, thumbs
    return SecurityHeaders(app)


class SecurityHeaders:
    """ASGI middleware: the same safety headers on every response (no sniffing, no framing, a CSP
    that allows only this origin: the page loads nothing from elsewhere)."""

    def __init__(self, app):
        self.app = app
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def add_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, add_headers)
