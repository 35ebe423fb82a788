"""HTTP API and web page over one index folder (DESIGN.md "serve/"; USERS.md pain point 6:
a self-hostable index + API + page started with one command).

Endpoints (OpenAPI docs at /docs):

* ``GET /search?q=…&k=10`` and ``POST /search`` with ``{"q": …, "k": 10}`` → ranked videos, each
  with its best window (start/end), scores, and the URLs of its file and poster.
* ``GET|HEAD /videos/{id}`` → the video file, with HTTP Range support (206 + Content-Range) so a
  browser's ``<video>`` can seek straight to the matched window.
* ``GET|HEAD /thumbnails/{id}`` → a poster JPEG, decoded once and cached under ``<index>/thumbnails``.
* ``GET /health``, ``GET /stats`` (counts, index type, models, query latency percentiles).
* ``GET /`` → the single-page UI (``static/index.html``, no build step).

What a client can and cannot do (issue 12):
* every input that fails validation is a 4xx in the documented shape — 422
  ``{"detail": [{"loc", "msg", "type"}]}`` for parameters and bodies (JSON bodies are strict: no
  ``"k": "5"`` or ``"k": true``), ``{"detail": "..."}`` for the rest; no echo of the input;
* bodies are bounded (`MAX_BODY_BYTES`, 413) and must arrive in time (`BODY_TIMEOUT_S`, 408),
  see `vidseek.serve.limits`;
* a video is only ever served from the path the index catalog records for its id (the id is
  looked up, never joined to a path, so ``..`` or absolute paths name no video → 404), and only
  while that path is still the regular file that was indexed (`vidseek.serve.files`);
* no response holds an absolute server path;
* the index is reopened when it changes on disk (`vidseek.serve.live_index`).
"""
from __future__ import annotations

import hashlib
import logging
import mimetypes
import os
import re
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from vidseek.errors import ConfigError, SearchIndexError, VidseekError
from vidseek.search.batching import BatchSettings, QueryBatcher
from vidseek.search.indexer import THUMBNAIL_DIR, Entry
from vidseek.search.searcher import MAX_QUERY_CHARS, Hit, Searcher, check_query, visible_character_pattern
from vidseek.serve.files import ChangedOnDisk, RecordedFile, file_response, open_indexed_file
from vidseek.serve.limits import RequestLimits
from vidseek.serve.live_index import LiveIndex

STATIC_DIR = Path(__file__).parent / "static"
MAX_K = 100
MAX_RECALL_K = 1000
THUMBNAIL_MAX_SIDE = 320
#: Largest accepted request body: a search body is a few hundred bytes.
MAX_BODY_BYTES = 64 * 1024
#: Largest accepted request head (path, query string, headers); browsers send well under 8 KiB.
MAX_HEADER_BYTES = 16 * 1024
#: Time a client has to deliver its request body.
BODY_TIMEOUT_S = 10.0

log = logging.getLogger("vidseek.serve")


# --- request and response shapes -----------------------------------------------------------------

def _checked_query(text: str) -> str:
    try:
        return check_query(text)
    except ConfigError as err:  # → 422 with the one-line reason as `msg`
        raise PydanticCustomError("invalid_query", str(err).replace("{", "(").replace("}", ")")) from None


QUERY_HELP = (f"Query text: what happens in the video, 1–{MAX_QUERY_CHARS} characters with at least one visible "
              f"character (blank, NUL-only, zero-width-only and invalid Unicode → 422).")
#: The schema states the rule (so clients and fuzzers know it); `check_query` enforces it, with a
#: readable message instead of the pattern.
QUERY_SCHEMA = {"pattern": visible_character_pattern()}
QueryText = Annotated[str, Field(min_length=1, max_length=MAX_QUERY_CHARS, description=QUERY_HELP,
                                 json_schema_extra=QUERY_SCHEMA), AfterValidator(_checked_query)]


def _integral_number(value: Any) -> Any:
    """5.0 → 5: JSON Schema counts a number with a zero fraction as an integer. Anything else
    (5.5, infinity, NaN, "5", true) goes on to the strict integer check unchanged."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


#: A JSON integer: no strings, booleans or fractions.
JsonInt = Annotated[int, BeforeValidator(_integral_number)]


class SearchRequest(BaseModel):
    """Body of ``POST /search``. Strict JSON types: ``"k": "5"`` or ``"k": true`` are 422."""

    model_config = ConfigDict(strict=True, extra="forbid")

    q: QueryText
    k: JsonInt = Field(10, ge=1, le=MAX_K, description="Number of videos to return.")
    recall_k: JsonInt = Field(100, ge=1, le=MAX_RECALL_K, description="Candidates the recall stage passes to the reranker.")
    rerank: bool = Field(True, description="Rescore candidates with the reranker (if the index has one).")


class SearchHit(BaseModel):
    """One result video at its best window; the file path stays on the server."""

    video_id: str
    start: float = Field(description="Seconds: where the matching window begins.")
    end: float | None = Field(description="Seconds: where it ends (null when the duration is unknown).")
    recall_score: float
    rerank_score: float | None = Field(description="null when not reranked.")
    score: float = Field(description="What the results are sorted by.")
    video_url: str
    thumbnail_url: str


class SearchResponse(BaseModel):
    query: str
    k: int
    reranked: bool
    results: list[SearchHit]


class Health(BaseModel):
    status: Literal["ok"]
    videos: int = Field(description="Videos in the index the server answers from.")


class ErrorMessage(BaseModel):
    """Every 4xx/5xx other than a 422: one line naming the problem and the fix."""

    detail: str


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorMessage, "description": description}


FILE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The whole file.", "content": {"application/octet-stream": {}}},
    206: {"description": "The requested byte range (Content-Range says which).",
          "content": {"application/octet-stream": {}}},
    404: _error("No indexed video with this id, or its file changed on disk since indexing."),
    416: {"description": "The Range overlaps no byte of the file (Content-Range: bytes */size)."},
}


def hit_json(hit: Hit) -> dict[str, Any]:
    """A hit as the API returns it: the file path stays on the server; URLs point at this app."""
    url_id = quote(hit.video_id, safe="/")
    data = hit.to_dict()
    del data["path"]
    data.update(video_url=f"/videos/{url_id}", thumbnail_url=f"/thumbnails/{url_id}")
    return data


def public(value: Any) -> Any:
    """`value` with every absolute path replaced by its file name (responses never show server paths)."""
    if isinstance(value, dict):
        return {key: public(item) for key, item in value.items()}
    if isinstance(value, list):
        return [public(item) for item in value]
    if isinstance(value, str) and os.path.isabs(value):
        return Path(value).name
    return hide_paths(value) if isinstance(value, str) else value


_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s'\"/]+/)+([^\s'\"/]+)")


def hide_paths(text: str) -> str:
    """`text` with every absolute path in it shortened to its file name."""
    return _ABSOLUTE_PATH.sub(r"\1", text)


def make_thumbnail(video_path: str, start: float | None, end: float | None, out: Path) -> None:
    """Decode one frame (the middle of the window) and write it as a JPEG poster, atomically."""
    from PIL import Image

    from vidseek.utils import atomic_path
    from vidseek.video.decode import read_frames

    clip = read_frames(video_path, num_frames=1, start=start, end=end)
    image = Image.fromarray(clip.frames[0])
    image.thumbnail((THUMBNAIL_MAX_SIDE, THUMBNAIL_MAX_SIDE))
    with atomic_path(out) as tmp:
        image.save(tmp, format="JPEG", quality=85)


def recorded_file(entry: Entry) -> RecordedFile:
    return RecordedFile(entry.path, entry.size, entry.mtime_ns)


# --- the app -------------------------------------------------------------------------------------

def create_app(index_dir: str | Path, *, device: str = "cpu", searcher: Searcher | None = None,
               batching: BatchSettings | None = None, milvus_uri: str | None = None) -> FastAPI:
    """The FastAPI app over `index_dir` (a `Searcher` is opened now, so a bad index fails at start;
    a given `searcher` is used until the index changes on disk and is never closed here).
    `batching`: run concurrent searches together (`vidseek.search.batching`); None: one at a time.
    A batch runs on the index generation current when it starts (`LiveIndex.search_batch`).
    `milvus_uri`: where this process reaches a Milvus-backed index's server (`Searcher`)."""
    index_dir = Path(index_dir)
    index = LiveIndex(index_dir, lambda: Searcher(index_dir, device=device, milvus_uri=milvus_uri), first=searcher)
    batcher = None if batching is None else QueryBatcher(index, batching)
    thumbnail_dir = index_dir / THUMBNAIL_DIR
    thumbnail_lock = threading.Lock()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        if batcher is not None:
            batcher.close()
        index.close()

    app = FastAPI(title="vidseek", version=str(index.searcher.meta.get("vidseek_version", "")), lifespan=lifespan,
                  description="Text-to-video search over an indexed collection: recall → rerank cascade.")
    app.add_middleware(RequestLimits, max_header_bytes=MAX_HEADER_BYTES, max_body_bytes=MAX_BODY_BYTES,
                       body_timeout_s=BODY_TIMEOUT_S)
    _install_error_handlers(app)

    def run_search(q: str, k: int, recall_k: int, rerank: bool) -> dict[str, Any]:
        if batcher is not None:
            hits = batcher.search(q, k=k, recall_k=recall_k, rerank=rerank)
            reranked = bool(rerank and index.searcher.meta.get("rerank"))
        else:
            with index.use() as engine:
                hits = engine.search(q, k=k, recall_k=recall_k, rerank=rerank)
                reranked = bool(rerank and engine.meta.get("rerank"))
        return {"query": q, "k": k, "reranked": reranked, "results": [hit_json(h) for h in hits]}

    @app.get("/search", summary="Search (query string)", response_model=SearchResponse)
    def search_get(q: Annotated[str, Query(min_length=1, max_length=MAX_QUERY_CHARS, description=QUERY_HELP,
                                      json_schema_extra=QUERY_SCHEMA), AfterValidator(_checked_query)],
                   k: int = Query(10, ge=1, le=MAX_K), recall_k: int = Query(100, ge=1, le=MAX_RECALL_K),
                   rerank: bool = Query(True)) -> dict[str, Any]:
        return run_search(q, k, recall_k, rerank)

    @app.post("/search", summary="Search (JSON body)", response_model=SearchResponse,
              responses={400: _error("The body is not JSON."), 408: _error("The body did not arrive in time."),
                         413: _error(f"The body is larger than {MAX_BODY_BYTES} bytes.")})
    def search_post(body: SearchRequest) -> dict[str, Any]:
        return run_search(body.q, body.k, body.recall_k, body.rerank)

    def indexed_file(video_id: str) -> tuple[Any, os.stat_result, Entry]:
        """The open file of an indexed video, checked against what the index recorded."""
        with index.use() as engine:
            entries = engine.video_entries(video_id)
        if not entries:
            raise HTTPException(404, f"no indexed video with id {video_id!r}")
        try:
            handle, info = open_indexed_file(recorded_file(entries[0]))
        except ChangedOnDisk:
            raise HTTPException(404, f"the file of video {video_id!r} changed on disk since it was indexed (or is "
                                     f"gone); re-index the collection with `vidseek index`") from None
        return handle, info, entries[0]

    def get_and_head(path: str, name: str, summary: str, responses: dict[int | str, dict[str, Any]]) -> Any:
        """Register one handler for GET and HEAD (two routes: each needs its own OpenAPI operation id)."""
        def register(handler: Any) -> Any:
            for method in ("GET", "HEAD"):
                app.add_api_route(path, handler, methods=[method], summary=summary, response_class=Response,
                                  responses=responses, operation_id=f"{method.lower()}_{name}")
            return handler
        return register

    @get_and_head("/videos/{video_id:path}", "video", "Stream a video (HTTP Range supported)", FILE_RESPONSES)
    def video(video_id: str, request: Request) -> Response:
        handle, info, entry = indexed_file(video_id)
        media_type = mimetypes.guess_type(entry.path)[0] or "application/octet-stream"
        return file_response(request, handle, info.st_size, media_type)

    @get_and_head("/thumbnails/{video_id:path}", "thumbnail", "Poster JPEG of a video",
                  {**FILE_RESPONSES, 200: {"description": "The poster.", "content": {"image/jpeg": {}}},
                   206: {"description": "A byte range of the poster.", "content": {"image/jpeg": {}}}})
    def thumbnail(video_id: str, request: Request) -> Response:
        handle, _, entry = indexed_file(video_id)
        handle.close()  # the poster is decoded by path; the check above said it is the indexed file
        cached = thumbnail_dir / f"{hashlib.sha256(video_id.encode('utf-8', 'surrogatepass')).hexdigest()}.jpg"
        with thumbnail_lock:  # decode once even when the page asks for many posters at a time
            if not cached.is_file():
                try:
                    make_thumbnail(entry.path, entry.start, entry.end, cached)
                except VidseekError as err:
                    log.warning("no poster for %r: %s", video_id, err)
                    raise HTTPException(404, f"no poster for video {video_id!r}: its file does not decode; "
                                             f"re-index the collection with `vidseek index`") from None
        poster = open(cached, "rb")
        return file_response(request, poster, os.fstat(poster.fileno()).st_size, "image/jpeg",
                             headers={"Cache-Control": "max-age=86400"})

    @app.get("/health", summary="Liveness and the number of indexed videos", response_model=Health)
    def health() -> dict[str, Any]:
        with index.use() as engine:
            return {"status": "ok", "videos": engine.stats()["counts"]["videos"]}

    @app.get("/stats", summary="Counts, index type, models (file names only), query latency percentiles")
    def stats() -> dict[str, Any]:
        with index.use() as engine:
            return public(engine.stats())

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"))

    return app


# --- errors --------------------------------------------------------------------------------------

def _field_errors(errors: Any) -> list[dict[str, Any]]:
    """Validation errors in the schema's shape, without the offending input (which may be huge,
    or not representable in JSON: NaN, infinity, lone surrogates)."""
    return [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in errors]


def _allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """Every method some route of `app` accepts at this request's path."""
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods | {"OPTIONS"}) if methods else []


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _field_errors(err.errors())}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> Response:
        headers = dict(err.headers or {})
        if err.status_code == 405:
            allowed = _allowed_methods(app, request)
            headers["Allow"] = ", ".join(allowed)
            if request.method == "OPTIONS" and allowed:
                return Response(status_code=204, headers=headers)
        if err.status_code in (204, 304):
            return Response(status_code=err.status_code, headers=headers)
        return JSONResponse({"detail": str(err.detail)}, status_code=err.status_code, headers=headers)

    @app.exception_handler(VidseekError)
    async def vidseek_error(_: Request, err: VidseekError) -> JSONResponse:
        log.error("%s", err)  # the full message (it may name server files) goes to the log only
        if isinstance(err, ConfigError):
            return JSONResponse({"detail": [{"loc": [], "msg": hide_paths(str(err)), "type": "value_error"}]},
                                status_code=422)
        if isinstance(err, SearchIndexError):
            return JSONResponse({"detail": "the index cannot be read right now; the server log says why"},
                                status_code=503)
        return JSONResponse({"detail": "the server failed to answer; the server log says why"}, status_code=500)
