"""HTTP API: search GET/POST, validation (422), ids resolved only through the catalog (404s for
traversal), byte-exact Range streaming, JPEG posters, stats; and the CLI commands."""
from __future__ import annotations

import io
import json

import pytest
from fastapi.testclient import TestClient

from test_search import QUERY, tiny_index
from vidseek.search.searcher import Searcher
from vidseek.serve.app import create_app
from vidseek.serve.files import UnsatisfiableRange, parse_range

K = 4


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    index, collection = tiny_index(root, num_clips=8)
    searcher = Searcher(index)
    expected = searcher.search(QUERY, k=K)
    with TestClient(create_app(index, searcher=searcher)) as client:
        yield {"client": client, "index": index, "searcher": searcher, "expected": expected, "root": root,
               **collection}
    searcher.close()


def test_search_get_and_post_return_the_searchers_ranking(served):
    client, expected = served["client"], served["expected"]
    got = client.get("/search", params={"q": QUERY, "k": K})
    assert got.status_code == 200
    body = got.json()
    assert body["query"] == QUERY and body["reranked"] is True
    assert [r["video_id"] for r in body["results"]] == [h.video_id for h in expected]
    assert [r["score"] for r in body["results"]] == pytest.approx([h.score for h in expected], abs=1e-6)
    first = body["results"][0]
    assert first["video_url"] == f"/videos/{expected[0].video_id}"
    assert first["thumbnail_url"] == f"/thumbnails/{expected[0].video_id}"
    assert "path" not in first  # server paths stay on the server
    posted = client.post("/search", json={"q": QUERY, "k": K})
    assert posted.status_code == 200 and posted.json()["results"] == body["results"]
    plain = client.get("/search", params={"q": QUERY, "k": K, "rerank": "false"}).json()
    assert all(r["rerank_score"] is None for r in plain["results"])


@pytest.mark.parametrize("params, message", [
    ({"q": "   "}, "empty search query"),
    ({"q": ""}, "at least 1 character"),
    ({"q": "x" * 1001}, "at most 1000"),
    ({"q": QUERY, "k": 0}, None),
    ({"q": QUERY, "k": 101}, None),
    ({}, None),
])
def test_invalid_searches_are_422(served, params, message):
    response = served["client"].get("/search", params=params)
    assert response.status_code == 422
    errors = response.json()["detail"]
    assert errors and all(set(e) == {"loc", "msg", "type"} for e in errors)
    if message:
        assert message in errors[0]["msg"] and errors[0]["loc"] == ["query", "q"]


def test_invalid_post_body_is_422(served):
    client = served["client"]
    assert client.post("/search", json={"q": " "}).status_code == 422
    assert client.post("/search", json={"q": ""}).json()["detail"][0]["loc"] == ["body", "q"]
    assert client.post("/search", json={"k": 3}).status_code == 422


def test_video_full_and_range_requests_return_exact_bytes(served):
    client = served["client"]
    hit = served["expected"][0]
    data = open(hit.path, "rb").read()
    size = len(data)
    full = client.get(f"/videos/{hit.video_id}")
    assert full.status_code == 200 and full.content == data
    assert full.headers["accept-ranges"] == "bytes" and full.headers["content-type"] == "video/mp4"
    cases = {"bytes=10-99": (10, 99), "bytes=100-": (100, size - 1), "bytes=-50": (size - 50, size - 1),
             f"bytes=5-{size + 1000}": (5, size - 1)}
    for header, (first, last) in cases.items():
        part = client.get(f"/videos/{hit.video_id}", headers={"Range": header})
        assert part.status_code == 206, header
        assert part.content == data[first:last + 1], header
        assert part.headers["content-range"] == f"bytes {first}-{last}/{size}"
        assert int(part.headers["content-length"]) == last - first + 1
    unsatisfiable = client.get(f"/videos/{hit.video_id}", headers={"Range": f"bytes={size}-"})
    assert unsatisfiable.status_code == 416 and unsatisfiable.headers["content-range"] == f"bytes */{size}"


def test_parse_range_by_hand():
    assert parse_range("bytes=0-0", 10) == (0, 0)
    assert parse_range("bytes=-3", 10) == (7, 9)
    assert parse_range("bytes=-30", 10) == (0, 9)
    assert parse_range("bytes=2-3, 5-6", 10) == (2, 3)
    assert parse_range("bytes=20-30, 5-6", 10) == (5, 6)  # the first satisfiable one
    assert parse_range("bytes=0-" + "9" * 5000, 10) == (0, 9)
    for ignored in ("bytes=4-2", "items=0-1", "bytes=", "bytes=-", "bytes=a-b", "bytes 0-1", "bytes=1-2,x"):
        assert parse_range(ignored, 10) is None, ignored
    for unsatisfiable in ("bytes=10-", "bytes=-0", "bytes=" + "9" * 5000 + "-"):
        with pytest.raises(UnsatisfiableRange):
            parse_range(unsatisfiable, 10)


@pytest.mark.parametrize("path", [
    "/videos/..%2F..%2F..%2Fetc%2Fpasswd",
    "/videos/%2e%2e/%2e%2e/etc/passwd",
    "/videos/%2Fetc%2Fpasswd",
    "/videos//etc/passwd",
    "/videos/../index.json",
    "/thumbnails/..%2Findex.json",
    "/thumbnails/%2Fetc%2Fhostname",
    "/videos/no-such-video",
    "/thumbnails/no-such-video",
])
def test_paths_outside_the_catalog_are_never_served(served, path):
    response = served["client"].get(path)
    assert response.status_code == 404
    assert b"root:" not in response.content and b"recall" not in response.content


def test_a_real_files_path_is_not_an_id(served):
    hit = served["expected"][0]
    client = served["client"]
    assert client.get(f"/videos/{hit.path}").status_code == 404  # absolute path of an indexed file
    assert client.get(f"/videos/{hit.video_id}%2F..%2F{hit.video_id}").status_code == 404


def test_thumbnails_are_cached_jpegs(served):
    from PIL import Image

    client, index = served["client"], served["index"]
    hit = served["expected"][1]
    first = client.get(f"/thumbnails/{hit.video_id}")
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    assert first.content[:3] == b"\xff\xd8\xff"
    image = Image.open(io.BytesIO(first.content))
    assert image.format == "JPEG" and image.size == (32, 32)  # synthetic clips are 32×32
    cached = list((index / "thumbnails").glob("*.jpg"))
    assert len(cached) == 1 and cached[0].read_bytes() == first.content
    stamp = cached[0].stat().st_mtime_ns
    assert client.get(f"/thumbnails/{hit.video_id}").content == first.content
    assert cached[0].stat().st_mtime_ns == stamp  # decoded once


def test_stats_health_docs_and_page(served, tmp_path):
    index = served["index"]
    with TestClient(create_app(index)) as client:  # a fresh app: its own latency record
        for _ in range(3):
            assert client.get("/search", params={"q": QUERY, "k": 2}).status_code == 200
        stats = client.get("/stats").json()
        assert stats["counts"] == {"keys": 8, "videos": 8, "failed": 0}
        assert stats["index_type"] == "flat" and stats["dense_backend"] == "faiss"
        assert stats["recall"]["preset"] == "synth-meanp-tiny" and stats["rerank"]["preset"] == "synth-seqtransf-tiny"
        latency = stats["latency_ms"]
        assert latency["queries"] == 3 and 0 < latency["p50"] <= latency["p90"] <= latency["p99"]
        assert client.get("/health").json() == {"status": "ok", "videos": 8}
        assert client.get("/docs").status_code == 200
        assert "/search" in client.get("/openapi.json").json()["paths"]
        page = client.get("/")
        assert page.status_code == 200 and 'id="q"' in page.text and "/search?k=" in page.text


def test_cli_index_and_search(tmp_path, served):
    from typer.testing import CliRunner

    from vidseek.cli import cli

    runner = CliRunner()
    videos = served["root"] / "videos"
    out = tmp_path / "index"
    result = runner.invoke(cli, ["index", str(videos), "--recall", str(served["recall"]), "--out", str(out),
                                 "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "indexed 8 new entries" in result.output
    result = runner.invoke(cli, ["search", str(out), QUERY, "-k", "3", "--json", "--no-rerank"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.output)["results"]
    with Searcher(out) as searcher:
        expected = searcher.search(QUERY, k=3, rerank=False)
    assert [h["video_id"] for h in hits] == [h.video_id for h in expected]
    table = runner.invoke(cli, ["search", str(out), QUERY, "-k", "2"])
    assert table.exit_code == 0 and expected[0].video_id in table.output
    removed = runner.invoke(cli, ["index", "--out", str(out), "--remove", expected[0].video_id])
    assert removed.exit_code == 0 and "removed 1 entries" in removed.output
    empty = runner.invoke(cli, ["search", str(out), "  "])
    assert empty.exit_code != 0 and "empty search query" in str(empty.exception)
