"""`vidseek eval --index / --http`: tie-safe ranks from truncated result lists, and on a flat
index the numbers equal plain `vidseek eval` (in process and through a running service)."""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from vidseek.eval.through_index import (evaluate_through_search, recall_report, run_eval_through_index,
                                        truncated_rank)


def hits(*scores: float) -> list[tuple[str, str, float]]:
    return [(f"v{i}", f"/x/v{i}.mp4", s) for i, s in enumerate(scores)]


def is_video(name: str):
    return lambda hit: hit[0] == name


def test_truncated_rank_is_pessimistic_inside_the_list_and_unknown_at_the_cut():
    row = hits(0.9, 0.8, 0.8, 0.5)
    # v2 ties with v1 above it: a tie never helps → rank 3
    assert truncated_rank(row, is_video("v2"), k=4, gallery=10) == 3
    assert truncated_rank(row, is_video("v0"), k=4, gallery=10) == 1
    # the last returned score: a video beyond the cut may tie with it → unknown → a miss
    assert truncated_rank(row, is_video("v3"), k=4, gallery=10) == float("inf")
    # ... unless nothing was cut (the whole gallery returned)
    assert truncated_rank(row, is_video("v3"), k=4, gallery=4) == 4
    # a list shorter than k was not cut either
    assert truncated_rank(row, is_video("v3"), k=10, gallery=50) == 4
    assert truncated_rank(row, is_video("nope"), k=4, gallery=10) == float("inf")


def test_recall_report_only_measurable_ks():
    ranks = np.array([1, 3, 7, np.inf])
    report = recall_report(ranks, k=5, gallery=100)
    assert report["t2v.R@1"] == 25.0 and report["t2v.R@5"] == 50.0
    assert "t2v.R@10" not in report  # top-5 lists cannot tell R@10
    assert report["returned_ground_truth"] == 75.0


def test_matching_by_video_id_or_path():
    def search(texts, k):
        return [[("other", "/data/a.mp4", 2.0), ("b", "/elsewhere/b.mp4", 1.0)] for _ in texts]

    queries = [("q1", "a", "/data/a.mp4"), ("q2", "b", "/data/b.mp4"), ("q3", "c", "/data/c.mp4")]
    report, ranks = evaluate_through_search(queries, search, k=2, gallery=2)
    assert ranks.tolist() == [1.0, 2.0, float("inf")]
    assert report["t2v.R@1"] == pytest.approx(100 / 3)


@pytest.fixture(scope="module")
def flat_index(tiny_synth, tmp_path_factory):
    from test_search import save_random_checkpoint

    from vidseek.search.indexer import build_index

    root = tmp_path_factory.mktemp("through")
    checkpoint = save_random_checkpoint(root / "recall.pt", "synth-meanp-tiny", seed=3)
    build_index(tiny_synth, root / "index", recall=str(checkpoint), split="test", workers=0, progress=False)
    return checkpoint, root / "index"


def plain_eval(checkpoint: Path, data: Path) -> dict[str, float]:
    """What `vidseek eval RUN --data DIR` computes (the full score matrix)."""
    from vidseek.eval.runner import evaluate_model
    from vidseek.models.registry import Preset
    from vidseek.train.checkpoint import load_model
    from vidseek.train.loop import load_split, video_source

    model, payload = load_model(checkpoint, device="cpu")
    preset = Preset.from_dict(payload["preset"])
    dataset = load_split(preset, data, "test")
    source = video_source(preset, dataset, Path(payload["path"]).parent, None, model, True)
    return evaluate_model(model, dataset, source, preset.words)


def test_flat_index_equals_plain_eval_in_process_and_over_http(flat_index, tiny_synth):
    import uvicorn

    from vidseek.models.registry import Preset
    from vidseek.search.searcher import Searcher
    from vidseek.serve.app import create_app
    from vidseek.train.checkpoint import read_checkpoint

    checkpoint, index = flat_index
    expected = plain_eval(checkpoint, tiny_synth)
    videos = int(expected["num_videos"])
    preset = Preset.from_dict(read_checkpoint(checkpoint)["preset"])
    got = run_eval_through_index(tiny_synth, preset, "test", index=index, k=videos, recall_k=videos)
    assert got["num_videos"] == videos and got["num_queries"] == expected["num_queries"]
    for key in ("t2v.R@1", "t2v.R@5", "t2v.R@10"):  # same hit counts (one query = 100/Q %)
        assert got[key] == pytest.approx(expected[key], abs=1e-9), key
    # top-5 lists: R@1 and R@5 unchanged, R@10 not measurable
    top5 = run_eval_through_index(tiny_synth, preset, "test", index=index, k=5, recall_k=videos)
    assert top5["t2v.R@1"] == pytest.approx(expected["t2v.R@1"], abs=1e-9)
    assert top5["t2v.R@5"] == pytest.approx(expected["t2v.R@5"], abs=1e-9)
    assert "t2v.R@10" not in top5

    searcher = Searcher(index)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(index, searcher=searcher), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start within 30 s"
            time.sleep(0.05)
        over_http = run_eval_through_index(tiny_synth, preset, "test", http=f"http://127.0.0.1:{port}",
                                           k=videos, recall_k=videos)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        searcher.close()
    assert over_http == got


def test_user_errors(flat_index, tiny_synth):
    from vidseek.errors import ConfigError, SearchIndexError
    from vidseek.models.registry import Preset
    from vidseek.train.checkpoint import read_checkpoint

    checkpoint, index = flat_index
    preset = Preset.from_dict(read_checkpoint(checkpoint)["preset"])
    with pytest.raises(ConfigError, match="exactly one"):
        run_eval_through_index(tiny_synth, preset, "test")
    with pytest.raises(SearchIndexError, match="cannot reach"):
        run_eval_through_index(tiny_synth, preset, "test", http="http://127.0.0.1:9", k=5)
