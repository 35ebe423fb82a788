"""HTTP API and web page over one index folder (DESIGN.md "serve/"; USERS.md pain point 6:
a self-hostable index + API + page started with one command).

Endpoints (OpenAPI docs at /docs):

* ``GET /search?q=…&k=10`` and ``POST /search`` with ``{"q": …, "k": 10}`` → ranked videos, each
  with its best window (start/end), scores, and the URLs of its file and poster.
* ``GET /videos/{id}`` → the video file, with HTTP Range support (206 + Content-Range) so a
  browser's ``<video>`` can seek straight to the matched window.
* ``GET /thumbnails/{id}`` → a poster JPEG, decoded once and cached under ``<index>/thumbnails``.
* ``GET /health``, ``GET /stats`` (counts, index type, models, query latency percentiles).
* ``GET /`` → the single-page UI (``static/index.html``, no build step).

Security: a video is only ever served from the path the index catalog records for its id; the
id from the URL is looked up, never joined to a path, so ``..``, encoded traversal or absolute
paths simply name no indexed video (404).
"""
from __future__ import annotations

import hashlib
import mimetypes
import os
import re
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from vidseek.errors import ConfigError, VidseekError
from vidseek.search.batching import BatchSettings, QueryBatcher
from vidseek.search.indexer import THUMBNAIL_DIR
from vidseek.search.searcher import MAX_QUERY_CHARS, Hit, Searcher, check_query

STATIC_DIR = Path(__file__).parent / "static"
MAX_K = 100
MAX_RECALL_K = 1000
STREAM_CHUNK_BYTES = 256 * 1024
THUMBNAIL_MAX_SIDE = 320
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


class SearchRequest(BaseModel):
    """Body of ``POST /search``."""

    q: str = Field(..., description=f"Query text: what happens in the video (1–{MAX_QUERY_CHARS} characters).")
    k: int = Field(10, ge=1, le=MAX_K, description="Number of videos to return.")
    recall_k: int = Field(100, ge=1, le=MAX_RECALL_K, description="Candidates the recall stage passes to the reranker.")
    rerank: bool = Field(True, description="Rescore candidates with the reranker (if the index has one).")


def hit_json(hit: Hit) -> dict[str, Any]:
    """A hit as the API returns it: the file path stays on the server; URLs point at this app."""
    url_id = quote(hit.video_id, safe="/")
    data = hit.to_dict()
    del data["path"]
    data.update(video_url=f"/videos/{url_id}", thumbnail_url=f"/thumbnails/{url_id}")
    return data


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """'bytes=a-b' / 'bytes=a-' / 'bytes=-n' → inclusive (first, last) within a file of `size` bytes.

    None means the range cannot be satisfied (→ 416). A multi-range request is answered with its
    first range only, which RFC 9110 allows a server to do by ignoring the rest.
    """
    match = _RANGE_RE.match(header.split(",")[0].strip())
    if match is None or size == 0:
        return None
    first_text, last_text = match.groups()
    if not first_text:  # suffix range: the last n bytes
        if not last_text or int(last_text) == 0:
            return None
        return max(0, size - int(last_text)), size - 1
    first = int(first_text)
    last = size - 1 if not last_text else min(int(last_text), size - 1)
    if first >= size or last < first:
        return None
    return first, last


def _file_chunks(path: str, first: int, last: int) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        fh.seek(first)
        remaining = last - first + 1
        while remaining > 0:
            block = fh.read(min(STREAM_CHUNK_BYTES, remaining))
            if not block:
                return
            remaining -= len(block)
            yield block


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


def create_app(index_dir: str | Path, *, device: str = "cpu", searcher: Searcher | None = None,
               batching: BatchSettings | None = None) -> FastAPI:
    """The FastAPI app over `index_dir` (a `Searcher` is opened now, so a bad index fails at start).
    `batching`: run concurrent searches together (`vidseek.search.batching`); None: one at a time."""
    index_dir = Path(index_dir)
    engine = searcher or Searcher(index_dir, device=device)
    batcher = None if batching is None else QueryBatcher(engine, batching)
    search = engine.search if batcher is None else batcher.search
    thumbnail_dir = index_dir / THUMBNAIL_DIR
    thumbnail_lock = threading.Lock()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        if batcher is not None:
            batcher.close()
        if searcher is None:  # close only what this app opened
            engine.close()

    app = FastAPI(title="vidseek", version=str(engine.meta.get("vidseek_version", "")), lifespan=lifespan,
                  description="Text-to-video search over an indexed collection: recall → rerank cascade.")

    @app.exception_handler(VidseekError)
    async def user_error(_: Request, err: VidseekError) -> JSONResponse:
        status = 422 if isinstance(err, ConfigError) else 500
        return JSONResponse({"detail": str(err)}, status_code=status)

    def run_search(q: str, k: int, recall_k: int, rerank: bool) -> dict[str, Any]:
        text = check_query(q)  # ConfigError → 422 with its one-line message
        hits = search(text, k=k, recall_k=recall_k, rerank=rerank)
        return {"query": text, "k": k, "reranked": bool(rerank and engine.meta.get("rerank")),
                "results": [hit_json(h) for h in hits]}

    @app.get("/search", summary="Search (query string)")
    def search_get(q: str = Query(..., description=f"Query text, 1–{MAX_QUERY_CHARS} characters; blank → 422."),
                   k: int = Query(10, ge=1, le=MAX_K), recall_k: int = Query(100, ge=1, le=MAX_RECALL_K),
                   rerank: bool = Query(True)) -> dict[str, Any]:
        return run_search(q, k, recall_k, rerank)

    @app.post("/search", summary="Search (JSON body)")
    def search_post(body: SearchRequest) -> dict[str, Any]:
        return run_search(body.q, body.k, body.recall_k, body.rerank)

    def indexed_file(video_id: str) -> tuple[str, list]:
        entries = engine.video_entries(video_id)
        if not entries:
            raise HTTPException(404, f"no indexed video with id {video_id!r}")
        path = entries[0].path
        if not os.path.isfile(path):
            raise HTTPException(404, f"the file of video {video_id!r} is gone from disk; re-index the collection")
        return path, entries

    @app.get("/videos/{video_id:path}", summary="Stream a video (HTTP Range supported)")
    def video(video_id: str, request: Request) -> Response:
        path, _ = indexed_file(video_id)
        size = os.path.getsize(path)
        media_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
        header = request.headers.get("range")
        if header is None:
            return FileResponse(path, media_type=media_type, headers={"Accept-Ranges": "bytes"})
        byte_range = parse_range(header, size)
        if byte_range is None:
            return Response(status_code=416, headers={"Content-Range": f"bytes */{size}", "Accept-Ranges": "bytes"})
        first, last = byte_range
        headers = {"Content-Range": f"bytes {first}-{last}/{size}", "Accept-Ranges": "bytes",
                   "Content-Length": str(last - first + 1)}
        return StreamingResponse(_file_chunks(path, first, last), status_code=206, media_type=media_type,
                                 headers=headers)

    @app.get("/thumbnails/{video_id:path}", summary="Poster JPEG of a video")
    def thumbnail(video_id: str) -> Response:
        path, entries = indexed_file(video_id)
        cached = thumbnail_dir / f"{hashlib.sha256(video_id.encode()).hexdigest()}.jpg"
        with thumbnail_lock:  # decode once even when the page asks for many posters at a time
            if not cached.is_file():
                try:
                    make_thumbnail(path, entries[0].start, entries[0].end, cached)
                except VidseekError as err:
                    raise HTTPException(500, f"cannot make a thumbnail for {video_id!r}: {err}") from None
        return FileResponse(cached, media_type="image/jpeg", headers={"Cache-Control": "max-age=86400"})

    @app.get("/health", summary="Liveness")
    def health() -> dict[str, Any]:
        return {"status": "ok", "videos": engine.stats()["counts"]["videos"]}

    @app.get("/stats", summary="Counts, index type, models, query latency percentiles")
    def stats() -> dict[str, Any]:
        return engine.stats()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"))

    return app
