"""Zero-shot indexing: `vidseek index VIDEOS --recall clip:ARCH --weights FILE` with no trained model.

The weights are a randomly initialised tiny CLIP saved in OpenAI's layout (plain state dict with
OpenAI's `input_resolution` marker, so the loader reads it as OpenAI weights: QuickGELU). The
reference is `vidseek.load_encoder` (CLIP4Clip meanP without training) applied directly.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import vidseek
from vidseek.cli import cli
from vidseek.errors import ConfigError, SearchIndexError
from vidseek.search.indexer import Indexer, file_sha256
from vidseek.search.searcher import Searcher

QUERY = "a small red circle moves to the left"
K = 5


def write_openai_weights(path, seed: int):
    """Random tiny CLIP in OpenAI's checkpoint layout, written the way OpenAI's fp16 release is."""
    from vidseek.encoders import build_clip

    torch.manual_seed(seed)
    state = {k: v.half() if v.ndim >= 2 else v for k, v in build_clip("tiny").model.state_dict().items()}
    state["input_resolution"] = torch.tensor(48)  # marks OpenAI's layout
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    from vidseek.data.synth import SynthConfig, generate
    from test_search import save_random_checkpoint

    root = tmp_path_factory.mktemp("zero_shot")
    generate(root / "synth", SynthConfig(num_videos=12, seed=7, frames=8, size=32), progress=False)
    videos = root / "videos"
    videos.mkdir()
    for clip in sorted((root / "synth" / "videos" / "all").glob("*.mp4")):
        shutil.copy(clip, videos / clip.name)
    return {"root": root, "videos": videos, "weights": write_openai_weights(root / "ViT-tiny.pt", seed=0),
            "rerank": save_random_checkpoint(root / "rerank.pt", "synth-seqtransf-tiny", seed=1)}


def reference_ranking(weights, videos, query: str):
    """(video ids, cosine scores) of every video, best first, from `vidseek.load_encoder` directly."""
    encoder = vidseek.load_encoder("tiny", weights=weights, device="cpu")
    paths = sorted(videos.glob("*.mp4"))
    scores = (encoder.encode_video(paths) @ encoder.encode_text([query]).T)[:, 0]
    order = np.argsort(-scores, kind="stable")
    return [paths[i].stem for i in order], scores[order]


def test_cli_zero_shot_index_then_search_equals_load_encoder(collection, tmp_path):
    index = tmp_path / "index"
    runner = CliRunner()
    result = runner.invoke(cli, ["index", str(collection["videos"]), "--recall", "clip:tiny", "--weights",
                                 str(collection["weights"]), "--out", str(index), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "indexed 12 new entries" in result.output

    meta = json.loads((index / "index.json").read_text())
    recall = meta["recall"]
    assert (recall["backend"], recall["arch"], recall["preset"]) == ("clip", "tiny", "clip:tiny")
    assert recall["checkpoint"] == str(collection["weights"].absolute())
    assert recall["sha256"] == file_sha256(collection["weights"])

    result = runner.invoke(cli, ["search", str(index), QUERY, "-k", str(K), "--json"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.output)["results"]
    ids, scores = reference_ranking(collection["weights"], collection["videos"], QUERY)
    # Stored frame features are fp16: scores agree to that precision, the ranking exactly.
    assert [h["video_id"] for h in hits] == ids[:K]
    np.testing.assert_allclose([h["score"] for h in hits], scores[:K], atol=2e-3)


def test_zero_shot_recall_with_a_trained_reranker(collection, tmp_path):
    index = tmp_path / "index"
    with Indexer(index, recall="clip:tiny", weights=collection["weights"], rerank=str(collection["rerank"]),
                 workers=0, progress=False) as indexer:
        summary = indexer.add(collection["videos"])
    assert summary.added == 12
    meta = json.loads((index / "index.json").read_text())
    assert meta["stores"] == {"recall": "features", "rerank": "features-rerank"}  # its own tower, own store
    reranker = vidseek.load(collection["rerank"], device="cpu")
    with Searcher(index) as searcher:
        hits = searcher.search(QUERY, k=K, recall_k=12)
    paths = [h.path for h in hits]
    direct = reranker.score([QUERY], paths)[0]
    np.testing.assert_allclose([h.rerank_score for h in hits], direct, atol=2e-3)
    assert [h.rerank_score for h in hits] == sorted((h.rerank_score for h in hits), reverse=True)


def test_moved_or_changed_weights_say_what_to_do(collection, tmp_path):
    weights = shutil.copy(collection["weights"], tmp_path / "clip.pt")
    index = tmp_path / "index"
    with Indexer(index, recall="clip:tiny", weights=weights, workers=0, progress=False) as indexer:
        indexer.add(collection["videos"])
    with Searcher(index) as searcher:
        before = [h.video_id for h in searcher.search(QUERY, k=K)]

    moved = tmp_path / "elsewhere" / "clip.pt"
    moved.parent.mkdir()
    shutil.move(weights, moved)
    with pytest.raises(SearchIndexError, match=r"no longer exist there; put the file back, or point the index at "
                                               r"its new place with `vidseek index VIDEOS --out IDX --recall "
                                               r"clip:tiny --weights NEW_PATH`"):
        Searcher(index)
    # Re-pointing: the same file (same sha256) at its new place; nothing is re-indexed.
    with Indexer(index, recall="clip:tiny", weights=moved, workers=0, progress=False) as indexer:
        assert indexer.add(collection["videos"]).added == 0
    assert json.loads((index / "index.json").read_text())["recall"]["checkpoint"] == str(moved.absolute())
    with Searcher(index) as searcher:
        assert [h.video_id for h in searcher.search(QUERY, k=K)] == before

    other = write_openai_weights(tmp_path / "other.pt", seed=1)
    with pytest.raises(SearchIndexError, match="was built with recall model"):
        Indexer(index, recall="clip:tiny", weights=other, workers=0, progress=False)
    with pytest.raises(SearchIndexError, match="was built with recall model"):
        Indexer(index, recall="clip:ViT-B-32", weights=moved, workers=0, progress=False)
    shutil.copy(other, moved)  # same path, other content
    with pytest.raises(SearchIndexError, match="changed since the index was built"):
        Searcher(index)


@pytest.mark.parametrize("recall, weights, error, match", [
    ("clip:tiny", None, ConfigError, r"--recall clip:tiny needs --weights FILE"),
    ("clip:NoSuchNet", "w.pt", ConfigError, r"unknown CLIP architecture 'NoSuchNet'"),
    ("clip:tiny", "missing.pt", Exception, r"CLIP weights .*missing.pt not found"),
    (None, "w.pt", ConfigError, r"--weights goes with --recall clip:ARCH"),
])
def test_zero_shot_request_errors_are_one_line(tmp_path, recall, weights, error, match):
    with pytest.raises(error, match=match) as caught:
        Indexer(tmp_path / "index", recall=recall, weights=None if weights is None else tmp_path / weights,
                workers=0, progress=False)
    assert "\n" not in str(caught.value)
