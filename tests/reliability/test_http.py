"""Issue 12, HTTP half, in process (TestClient over the ASGI app): each defect the probe found is
reproduced here — client input that used to give 500, strict JSON types, invisible queries,
Range headers, HEAD/OPTIONS, the OpenAPI error shapes, body limits, files changed on disk after
indexing, server paths in responses, and a server that must follow its index."""
from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from reliability.http_index import CLIPS, copy_index, shared_http_index
from vidseek.search.indexer import ENTRIES_FILE, Indexer, build_index
from vidseek.search.searcher import Searcher
from vidseek.serve.app import MAX_BODY_BYTES, create_app

QUERY = "a small red circle moves to the left"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    index, collection = shared_http_index(tmp_path_factory)
    with TestClient(create_app(index), raise_server_exceptions=False) as client:
        with Searcher(index) as searcher:
            entries = {e.video_id: e for video in ("synth00000", "synth00001", "synth00002")
                       for e in searcher.video_entries(video)}
        yield {"client": client, "index": index, "entries": entries, "root": index.parent, **collection}


def assert_error_shape(response) -> None:
    """422: the schema's list of {loc, msg, type}; any other error: {"detail": one line}."""
    body = response.json()
    if response.status_code == 422:
        assert isinstance(body["detail"], list) and body["detail"]
        for error in body["detail"]:
            assert set(error) == {"loc", "msg", "type"} and isinstance(error["msg"], str)
    else:
        assert set(body) == {"detail"} and isinstance(body["detail"], str) and "\n" not in body["detail"]


def post_raw(client: TestClient, body: bytes):
    return client.post("/search", content=body, headers={"content-type": "application/json"})


# --- item 4: no 500 on client input; strict types; invisible queries ------------------------------

@pytest.mark.parametrize("body, field", [
    (b'{"q": "\\ud800 red"}', "q"),  # a lone surrogate: not valid Unicode text
    (b'{"q": "\\udfff"}', "q"),
    (b'{"q": "red", "k": 1e400}', "k"),  # JSON parses it as infinity
    (b'{"q": "red", "k": -1e400}', "k"),
    (b'{"q": "red", "k": NaN}', "k"),
    (b'{"q": "red", "k": Infinity}', "k"),
    (b'{"q": "red", "recall_k": NaN}', "recall_k"),
    (b'{"q": "red", "k": "5"}', "k"),  # strict: no coercion of strings ...
    (b'{"q": "red", "k": true}', "k"),  # ... or booleans to numbers
    (b'{"q": "red", "k": 5.5}', "k"),  # (5.0 is accepted: JSON Schema counts it as an integer)
    (b'{"q": "red", "rerank": "yes"}', "rerank"),
    (b'{"q": "red", "rerank": 1}', "rerank"),
    (b'{"q": 5}', "q"),
    (b'{"q": "\\u0000\\u0000"}', "q"),  # NUL only
    (b'{"q": "\\u200b\\u200c\\u200d\\u2060\\ufeff"}', "q"),  # zero-width only
    (b'{"q": " \\t\\u0000\\u200b "}', "q"),
    (b'{"q": "red", "top": 3}', "top"),  # unknown field (a typo is not silently ignored)
])
def test_bad_json_fields_are_422_naming_the_field(served, body, field):
    response = post_raw(served["client"], body)
    assert response.status_code == 422, response.text
    assert_error_shape(response)
    assert response.json()["detail"][0]["loc"] == ["body", field]


@pytest.mark.parametrize("body", [
    b'{"q": "red"', b"[]", b'"red"', b"null", b"", b"\xff\xfe{}", b'{"q": "\xed\xa0\x80 red"}', b"{" * 10000,
])
def test_malformed_bodies_are_4xx_in_the_documented_shape(served, body):
    response = post_raw(served["client"], body)
    assert 400 <= response.status_code < 500, response.text
    assert_error_shape(response)


def test_invisible_queries_are_rejected_with_a_clear_message(served):
    client = served["client"]
    for text in ("\x00", "\u200b", "\ufeff\u200d", "\x00 \u200b"):
        for response in (client.get("/search", params={"q": text}), client.post("/search", json={"q": text})):
            assert response.status_code == 422
            assert "empty search query (no visible characters)" in response.json()["detail"][0]["msg"]
    accepted = client.post("/search", json={"q": "\u200bred\x00", "k": 2})
    assert accepted.status_code == 200 and len(accepted.json()["results"]) == 2


def test_surrogate_message_and_no_echo_of_the_input(served):
    response = post_raw(served["client"], b'{"q": "\\ud800 red circle"}')
    assert response.status_code == 422
    assert "red circle" not in response.text and "input" not in response.json()["detail"][0]


def test_get_parameters_out_of_range_or_not_numbers_are_422(served):
    client = served["client"]
    for params in ({"q": "red", "k": "1e400"}, {"q": "red", "k": "NaN"}, {"q": "red", "k": "5.5"},
                   {"q": "red", "k": "9" * 5000}, {"q": "red", "recall_k": "-1"}, {"q": "red", "rerank": "maybe"}):
        response = client.get("/search", params=params)
        assert response.status_code == 422, params
        assert_error_shape(response)


# --- item 8: Range, HEAD, OPTIONS, OpenAPI -----------------------------------------------------

def test_range_headers_on_videos(served):
    client = served["client"]
    entry = served["entries"]["synth00000"]
    data = Path(entry.path).read_bytes()
    size = len(data)
    huge = "9" * 5000
    answers = {
        f"bytes=0-{huge}": (206, data),  # a last position past the end means "to the end"
        f"bytes=10-{huge}": (206, data[10:]),
        f"bytes=-{huge}": (206, data),  # suffix longer than the file: the whole file
        "bytes=0-0": (206, data[:1]),
        "items=0-5": (200, data),  # unknown unit: ignored (RFC 9110 §14.2)
        "bytes=5-2": (200, data),  # malformed: ignored
        "bytes=abc": (200, data),
        "bytes=": (200, data),
        "bytes=-": (200, data),
        "bytes 0-5": (200, data),
        "": (200, data),
        f"bytes={huge}-": (416, b""),  # valid but past the end
        f"bytes={size}-": (416, b""),
    }
    for header, (status, content) in answers.items():
        response = client.get("/videos/synth00000", headers={"Range": header})
        assert response.status_code == status, header
        if status == 416:
            assert response.headers["content-range"] == f"bytes */{size}"
        else:
            assert response.content == content, header
            assert int(response.headers["content-length"]) == len(content)


def test_thumbnails_answer_range_headers_like_videos(served):
    client = served["client"]
    poster = client.get("/thumbnails/synth00001").content
    past_both = max(len(poster), os.path.getsize(served["entries"]["synth00001"].path))
    for header in ("items=0-5", "bytes=5-2", "bytes=abc", "bytes=0-3", f"bytes={past_both}-", "bytes=0-" + "9" * 5000):
        video = client.get("/videos/synth00001", headers={"Range": header})
        thumb = client.get("/thumbnails/synth00001", headers={"Range": header})
        assert video.status_code == thumb.status_code, header
    assert client.get("/thumbnails/synth00001", headers={"Range": "bytes=0-3"}).content == poster[:4]


def test_head_on_videos_and_thumbnails(served):
    client = served["client"]
    entry = served["entries"]["synth00000"]
    size = os.path.getsize(entry.path)
    head = client.head("/videos/synth00000")
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == size and head.headers["content-type"] == "video/mp4"
    partial = client.head("/videos/synth00000", headers={"Range": "bytes=2-9"})
    assert partial.status_code == 206 and partial.headers["content-range"] == f"bytes 2-9/{size}"
    assert client.head("/videos/no-such-video").status_code == 404
    assert client.head("/thumbnails/synth00000").status_code == 200


def test_options_and_wrong_methods_list_every_allowed_method(served):
    client = served["client"]
    options = client.options("/search")
    assert options.status_code == 204
    assert set(options.headers["allow"].split(", ")) == {"GET", "POST", "OPTIONS"}
    put = client.put("/search", json={"q": "red"})
    assert put.status_code == 405 and {"GET", "POST"} <= set(put.headers["allow"].split(", "))
    assert_error_shape(put)
    delete = client.delete("/videos/synth00000")
    assert delete.status_code == 405 and {"GET", "HEAD"} <= set(delete.headers["allow"].split(", "))


def test_openapi_documents_what_the_server_sends(served):
    import jsonschema

    client = served["client"]
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    resolver = {"components": schema["components"]}

    def response_schema(path: str, method: str, status: str) -> dict:
        content = schema["paths"][path][method]["responses"][status]["content"]["application/json"]
        return {**content["schema"], **resolver}

    invalid = post_raw(client, b'{"q": "red", "k": "5"}')
    jsonschema.validate(invalid.json(), response_schema("/search", "post", "422"))
    assert components["ValidationError"]["properties"]["loc"]["type"] == "array"
    missing = client.get("/videos/no-such-video")
    jsonschema.validate(missing.json(), response_schema("/videos/{video_id}", "get", "404"))
    too_big = client.post("/search", content=b" " * (MAX_BODY_BYTES + 1), headers={"content-type": "application/json"})
    jsonschema.validate(too_big.json(), response_schema("/search", "post", "413"))
    ok = client.get("/search", params={"q": QUERY, "k": 2})
    jsonschema.validate(ok.json(), response_schema("/search", "get", "200"))
    assert set(schema["paths"]["/videos/{video_id}"]) == {"get", "head"}
    assert {"200", "206", "404", "416"} <= set(schema["paths"]["/videos/{video_id}"]["get"]["responses"])


# --- item 5: request bodies are bounded -------------------------------------------------------------

def test_body_over_the_limit_is_413_declared_or_streamed(served):
    client = served["client"]
    padded = json.dumps({"q": "red " + " " * MAX_BODY_BYTES}).encode()
    declared = post_raw(client, padded)
    assert declared.status_code == 413 and str(MAX_BODY_BYTES) in declared.json()["detail"]
    assert declared.headers["connection"] == "close"
    assert _post_chunked(client.app, chunks=200, chunk_bytes=16384) == (413, 5)  # 5 × 16 KiB > 64 KiB: stop
    assert _post_chunked(client.app, chunks=3, chunk_bytes=4)[0] == 422  # small: read whole (not JSON)
    at_limit = post_raw(client, json.dumps({"q": QUERY, "k": 1}).encode().ljust(MAX_BODY_BYTES))
    assert at_limit.status_code == 200


def _post_chunked(app, chunks: int, chunk_bytes: int) -> tuple[int, int]:
    """POST /search straight into the ASGI app with a chunked body (no Content-Length);
    returns (status, chunks the app pulled)."""
    import asyncio

    pulled = 0
    status = []

    async def receive():
        nonlocal pulled
        if pulled == chunks:
            return {"type": "http.disconnect"}
        pulled += 1
        return {"type": "http.request", "body": b" " * chunk_bytes, "more_body": pulled < chunks}

    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/search", "raw_path": b"/search", "root_path": "", "query_string": b"",
             "headers": [(b"host", b"test"), (b"content-type", b"application/json"),
                         (b"transfer-encoding", b"chunked")], "client": ("127.0.0.1", 1), "server": ("test", 80)}
    asyncio.run(app(scope, receive, send))
    return status[0], pulled


# --- item 7: serve only what was indexed; no server paths --------------------------------------------

def test_entries_record_size_and_mtime(served):
    entry = served["entries"]["synth00000"]
    info = os.stat(entry.path)
    assert (entry.size, entry.mtime_ns) == (info.st_size, info.st_mtime_ns)


def _assert_changed(response) -> None:
    assert response.status_code == 404
    assert "changed on disk" in response.json()["detail"] and "re-index" in response.json()["detail"]
    assert "/" not in response.json()["detail"].replace("/videos/", "")


def test_a_file_replaced_by_a_symlink_is_not_served(served):
    client = served["client"]
    path = Path(served["entries"]["synth00002"].path)
    aside = path.with_name("aside.bin")
    path.rename(aside)
    try:
        path.symlink_to("/etc/passwd")
        for url in ("/videos/synth00002", "/thumbnails/synth00002"):
            response = client.get(url)
            _assert_changed(response)
            assert b"root:" not in response.content
        path.unlink()
        path.symlink_to(aside)  # even a link to the very same bytes
        _assert_changed(client.get("/videos/synth00002"))
    finally:
        path.unlink(missing_ok=True)
        aside.rename(path)
    assert client.get("/videos/synth00002").status_code == 200


def test_a_file_changed_after_indexing_is_not_served(served):
    client = served["client"]
    path = Path(served["entries"]["synth00001"].path)
    original = path.read_bytes()
    stamp = path.stat()
    try:
        path.write_bytes(original[:-1] + b"x")  # same size, new mtime
        _assert_changed(client.get("/videos/synth00001"))
        path.write_bytes(original)
        os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        assert client.get("/videos/synth00001").content == original
        path.write_bytes(original + b"more")  # new size
        os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        _assert_changed(client.get("/videos/synth00001"))
        path.unlink()
        path.mkdir()  # not a regular file
        _assert_changed(client.get("/videos/synth00001"))
        path.rmdir()
    finally:
        if path.is_dir():
            path.rmdir()
        path.write_bytes(original)
        os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))


def test_legacy_entries_without_size_get_the_regular_file_check(tmp_path, served):
    index = copy_index(served["index"], tmp_path / "index")
    with sqlite3.connect(index / ENTRIES_FILE) as db:  # an index from before size/mtime were recorded
        db.execute("UPDATE entries SET size = NULL, mtime_ns = NULL")
    path = Path(served["entries"]["synth00000"].path)
    stamp = path.stat()
    with TestClient(create_app(index), raise_server_exceptions=False) as client:
        try:
            os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
            assert client.get("/videos/synth00000").status_code == 200
            aside = path.with_name("aside.bin")
            path.rename(aside)
            path.symlink_to(aside)
            _assert_changed(client.get("/videos/synth00000"))
        finally:
            if path.is_symlink():
                path.unlink()
                aside.rename(path)
            os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))


def test_no_response_holds_a_server_path(served):
    client = served["client"]
    root = str(served["root"])
    responses = [client.get("/stats"), client.get("/health"), client.get("/search", params={"q": QUERY}),
                 client.get("/videos/nope"), client.get("/thumbnails/nope"), client.get("/openapi.json"),
                 post_raw(client, b'{"q": "red", "k": "x"}')]
    for response in responses:
        assert root not in response.text and "/tmp/" not in response.text, response.url
    stats = client.get("/stats").json()
    assert stats["recall"]["checkpoint"] == "recall.pt" and stats["rerank"]["checkpoint"] == "rerank.pt"


# --- a server that follows its index -----------------------------------------------------------------

def _all_videos(client: TestClient) -> list[str]:
    body = client.get("/search", params={"q": QUERY, "k": 100, "recall_k": 1000}).json()
    return sorted(r["video_id"] for r in body["results"])


def test_the_server_follows_index_adds_and_removes(tmp_path, served):
    index = copy_index(served["index"], tmp_path / "index")
    with TestClient(create_app(index)) as client:
        assert client.get("/health").json()["videos"] == CLIPS
        everything = _all_videos(client)
        assert len(everything) == CLIPS
        with Indexer(index, progress=False) as indexer:
            assert indexer.remove(["synth00003"]) == 1
        assert client.get("/health").json()["videos"] == CLIPS - 1
        assert _all_videos(client) == [v for v in everything if v != "synth00003"]
        extra = tmp_path / "more"
        extra.mkdir()
        for clip in served["clips"][CLIPS:CLIPS + 2]:
            (extra / clip.name).write_bytes(clip.read_bytes())
        build_index(extra, index, recall=str(served["recall"]), rerank=str(served["rerank"]), workers=0, progress=False)
        health = client.get("/health").json()["videos"]
        found = _all_videos(client)
        assert health == len(found) == CLIPS + 1
        assert set(found) == (set(everything) - {"synth00003"}) | {c.stem for c in served["clips"][CLIPS:CLIPS + 2]}
        assert client.get(f"/videos/{served['clips'][CLIPS].stem}").status_code == 200
        assert client.get("/videos/synth00003").status_code == 404
