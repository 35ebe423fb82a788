"""Search engine: indexing (counts, corrupt files, incremental add, remove, crash recovery,
segments), the recall → rerank cascade against direct model computations, backends."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vidseek.errors import ConfigError, SearchIndexError
from vidseek.search.indexer import (RECALL_STORE_DIR, RERANK_STORE_DIR, Entry, EntryCatalog, Indexer, build_index,
                                    parse_memory)
from vidseek.search.searcher import (MAX_QUERY_CHARS, RECALL_BACKENDS, Searcher, collapse_by_video, parse_recall_spec,
                                     register_recall_backend)

QUERY = "a small red circle moves to the left, then a blue square grows"
FIRST_BATCH = 10  # clips in the first index build; the rest arrive incrementally


def save_random_checkpoint(path: Path, preset_name: str, seed: int) -> Path:
    """A loadable vidseek checkpoint of a random-init tiny model (no training needed for plumbing)."""
    from vidseek.models.registry import create_model, get_preset
    from vidseek.train.checkpoint import save_checkpoint
    from vidseek.utils import seed_everything

    seed_everything(seed)
    preset = get_preset(preset_name)
    save_checkpoint(path, model=create_model(preset), preset=preset.to_dict(), step=0, epoch=0, batch_in_epoch=0)
    return path


def make_collection(root: Path, num_videos: int = 24) -> dict[str, Path]:
    """Synthetic clips copied into a plain folder, plus a recall (meanP) and a rerank (seqTransf) checkpoint."""
    from vidseek.data.synth import SynthConfig, generate

    generate(root / "synth", SynthConfig(num_videos=num_videos, seed=5, frames=8, size=32), progress=False)
    clips = sorted((root / "synth" / "videos" / "all").glob("*.mp4"))
    return {
        "clips": clips,
        "recall": save_random_checkpoint(root / "recall.pt", "synth-meanp-tiny", seed=0),
        "rerank": save_random_checkpoint(root / "rerank.pt", "synth-seqtransf-tiny", seed=1),
    }


def tiny_index(root: Path, num_clips: int = 12, rerank: bool = True) -> tuple[Path, dict]:
    """An index over `num_clips` synthetic clips (used by the HTTP and browser tests too)."""
    collection = make_collection(root, num_videos=max(num_clips, 12))
    folder = root / "videos"
    folder.mkdir()
    for clip in collection["clips"][:num_clips]:
        shutil.copy(clip, folder / clip.name)
    build_index(folder, root / "index", recall=str(collection["recall"]),
                rerank=str(collection["rerank"]) if rerank else None, workers=0, progress=False)
    return root / "index", collection


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One folder index built in two steps (10 clips + a corrupt file, then 4 more clips)."""
    root = tmp_path_factory.mktemp("search")
    collection = make_collection(root)
    folder = root / "videos"
    folder.mkdir()
    for clip in collection["clips"][:FIRST_BATCH]:
        shutil.copy(clip, folder / clip.name)
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    torch.set_num_threads(1)
    first = build_index(folder, root / "index", recall=str(collection["recall"]), rerank=str(collection["rerank"]),
                        workers=0, progress=False)
    first_meta = json.loads((root / "index" / "index.json").read_text())
    for clip in collection["clips"][FIRST_BATCH:FIRST_BATCH + 4]:
        shutil.copy(clip, folder / clip.name)
    second = build_index(folder, root / "index", recall=str(collection["recall"]), workers=0, progress=False)
    return {"root": root, "folder": folder, "index": root / "index", "first": first, "second": second,
            "first_meta": first_meta, **collection}


def test_index_counts_and_corrupt_video_reported(built):
    first = built["first"]
    assert (first.processed, first.added, first.failed) == (FIRST_BATCH, FIRST_BATCH, 1)
    assert first.failures[0][0] == "broken" and "broken.mp4" in first.failures[0][1]
    meta = built["first_meta"]
    assert meta["counts"] == {"keys": FIRST_BATCH, "videos": FIRST_BATCH, "failed": 1}
    assert meta["failures"][0]["key"] == "broken"
    assert meta["recall"]["preset"] == "synth-meanp-tiny" and meta["rerank"]["preset"] == "synth-seqtransf-tiny"
    assert meta["recall"]["index_type"] == "flat" and meta["recall"]["dense_backend"] == "faiss"
    # Different random towers → the reranker gets its own feature store.
    assert meta["stores"] == {"recall": RECALL_STORE_DIR, "rerank": RERANK_STORE_DIR}
    from vidseek import __version__
    from vidseek.search.indexer import file_sha256

    assert meta["vidseek_version"] == __version__
    assert meta["recall"]["sha256"] == file_sha256(built["recall"])


def test_incremental_add_processes_only_new_videos(built):
    second = built["second"]
    assert (second.processed, second.skipped_existing, second.added) == (4, FIRST_BATCH, 4)
    assert (second.total_keys, second.total_videos) == (FIRST_BATCH + 4, FIRST_BATCH + 4)
    assert second.failed == 1  # the corrupt file is retried and reported again, never indexed
    with Searcher(built["index"]) as searcher:
        assert len(searcher.recall) == FIRST_BATCH + 4
        assert searcher.video_entries("broken") == []


def test_rerank_and_recall_scores_equal_direct_model_computation(built):
    import vidseek

    with Searcher(built["index"]) as searcher:
        hits = searcher.search(QUERY, k=14, recall_k=14)
    assert len(hits) == 14 and len({h.video_id for h in hits}) == 14
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert all(h.score == h.rerank_score for h in hits)
    # Reference: decode each file again and run the checkpoints end to end (vidseek.load), bypassing
    # the feature store and the dense index. Stored features are fp16, hence the tolerance.
    paths = [h.path for h in hits]
    rerank_model, recall_model = vidseek.load(built["rerank"], device="cpu"), vidseek.load(built["recall"], device="cpu")
    direct_rerank = rerank_model.score([QUERY], paths)[0]
    direct_recall = (recall_model.encode_text([QUERY]) @ recall_model.encode_video(paths).T)[0]
    np.testing.assert_allclose([h.rerank_score for h in hits], direct_rerank, atol=2e-3)
    np.testing.assert_allclose([h.recall_score for h in hits], direct_recall, atol=2e-3)
    assert hits[0].start == 0.0 and hits[0].end == pytest.approx(1.0)  # 8 frames at 8 fps, whole clip


def test_without_rerank_scores_are_exact_inner_products(built):
    from vidseek.models.base import FrameFeatures
    from vidseek.store import FeatureStore

    with Searcher(built["index"]) as searcher:
        hits = searcher.search(QUERY, k=5, recall_k=14, rerank=False)
        entries = searcher.entries
        recall = searcher.recall
        query = recall.query_vectors([QUERY])[0]
        keys = [e.key for e in entries.get_many(list(range(1, 100))).values()]
        store = FeatureStore(built["index"] / RECALL_STORE_DIR)
        frames, masks = store.frame_features(keys)
        store.close()
        vectors = recall.video_vectors(FrameFeatures(torch.from_numpy(frames), torch.from_numpy(masks)))
    brute = vectors @ query
    order = np.argsort(-brute)[:5]
    assert [h.video_id for h in hits] == [keys[i] for i in order]
    np.testing.assert_allclose([h.recall_score for h in hits], brute[order], rtol=0, atol=1e-5)
    assert all(h.rerank_score is None and h.score == h.recall_score for h in hits)


def test_search_batch_equals_single_searches(built):
    with Searcher(built["index"]) as searcher:
        queries = [QUERY, "a green star blinks"]
        batch = searcher.search_batch(queries, k=4, recall_k=14)
        singles = [searcher.search(q, k=4, recall_k=14) for q in queries]
    for a, b in zip(batch, singles):
        assert [h.video_id for h in a] == [h.video_id for h in b]
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-5)


@pytest.mark.parametrize("bad", ["", "   ", "\n\t", "x" * (MAX_QUERY_CHARS + 1)])
def test_bad_queries_are_config_errors(built, bad):
    with Searcher(built["index"]) as searcher:
        with pytest.raises(ConfigError, match="empty search query|at most 1000"):
            searcher.search(bad)
        with pytest.raises(ConfigError):
            searcher.search(QUERY, k=0)


def test_remove_deletes_from_index_and_store(tmp_path, built):
    index = tmp_path / "index"
    shutil.copytree(built["index"], index)
    victim = built["clips"][0].stem
    with Indexer(index, progress=False) as indexer:
        assert indexer.remove([victim, "no-such-video"]) == 1
        assert indexer.remove([victim]) == 0
    meta = json.loads((index / "index.json").read_text())
    assert meta["counts"]["keys"] == FIRST_BATCH + 3
    with Searcher(index) as searcher:
        hits = searcher.search(QUERY, k=20, recall_k=50)
        assert victim not in {h.video_id for h in hits} and len(hits) == FIRST_BATCH + 3
        assert searcher.video_entries(victim) == []
        assert len(searcher.recall) == FIRST_BATCH + 3
    from vidseek.store import FeatureStore

    with FeatureStore(index / RECALL_STORE_DIR) as store:
        assert victim not in store
    # Indexing the folder again brings it back (it is still there): only it is extracted.
    again = build_index(built["folder"], index, recall=str(built["recall"]), workers=0, progress=False)
    assert (again.processed, again.added, again.total_keys) == (1, 1, FIRST_BATCH + 4)


def test_interrupted_commit_is_recovered_without_duplicates(tmp_path, built, monkeypatch):
    index = tmp_path / "index"
    shutil.copytree(built["index"], index)
    folder = tmp_path / "more"
    shutil.copytree(built["folder"], folder)
    for clip in built["clips"][FIRST_BATCH + 4:FIRST_BATCH + 6]:
        shutil.copy(clip, folder / clip.name)

    def crash(self, ids):
        raise KeyboardInterrupt("killed between saving the dense index and marking entries ready")

    monkeypatch.setattr(EntryCatalog, "mark_ready", crash)
    with pytest.raises(KeyboardInterrupt):
        build_index(folder, index, recall=str(built["recall"]), workers=0, progress=False)
    monkeypatch.undo()
    summary = build_index(folder, index, recall=str(built["recall"]), workers=0, progress=False)
    assert summary.added == 2 and summary.total_keys == FIRST_BATCH + 6
    with Searcher(index) as searcher:
        assert len(searcher.recall) == FIRST_BATCH + 6  # the half-committed pair was not added twice
        hits = searcher.search(QUERY, k=30, recall_k=30, rerank=False)
        assert len(hits) == FIRST_BATCH + 6


def test_existing_index_keeps_its_models(built, tmp_path):
    other = save_random_checkpoint(tmp_path / "other.pt", "synth-meanp-tiny", seed=7)
    with pytest.raises(SearchIndexError, match="was built with recall model"):
        Indexer(built["index"], recall=str(other), progress=False)
    with pytest.raises(SearchIndexError, match="segments"):
        Indexer(built["index"], segment_seconds=3.0, progress=False)


def test_changed_checkpoint_is_refused(tmp_path, built):
    ckpt = shutil.copy(built["recall"], tmp_path / "recall.pt")
    index = tmp_path / "index"
    build_index(built["folder"], index, recall=str(ckpt), workers=0, progress=False)
    save_random_checkpoint(tmp_path / "recall.pt", "synth-meanp-tiny", seed=9)
    with pytest.raises(SearchIndexError, match="changed since the index was built"):
        Searcher(index)
    Path(ckpt).unlink()
    with pytest.raises(SearchIndexError, match="no longer exists"):
        Searcher(index)
    with pytest.raises(SearchIndexError, match="no search index"):
        Searcher(tmp_path / "nowhere")


def test_reranker_with_the_same_tower_shares_the_recall_store(tmp_path, built):
    index = tmp_path / "index"
    build_index(built["folder"], index, recall=str(built["recall"]), rerank=str(built["recall"]), workers=0,
                progress=False)
    meta = json.loads((index / "index.json").read_text())
    assert meta["stores"] == {"recall": RECALL_STORE_DIR, "rerank": RECALL_STORE_DIR}
    assert not (index / RERANK_STORE_DIR).exists()
    with Searcher(index) as searcher:
        hits = searcher.search(QUERY, k=3)
    # A two-tower reranking itself: rerank score = cosine = the exact recall score.
    np.testing.assert_allclose([h.rerank_score for h in hits], [h.recall_score for h in hits], atol=1e-5)


def test_faiss_exact_and_milvus_return_the_same_top_k(tmp_path, built):
    queries = [QUERY, "a green star blinks", "a yellow triangle rotates"]
    results = {}
    for backend in ("faiss", "milvus"):
        index = tmp_path / backend
        build_index(built["folder"], index, recall=str(built["recall"]), backend=backend, index_type="flat",
                    workers=0, progress=False)
        with Searcher(index) as searcher:
            results[backend] = searcher.search_batch(queries, k=5, recall_k=5, rerank=False)
    meta = json.loads((tmp_path / "milvus" / "index.json").read_text())
    assert meta["recall"]["dense_backend"] == "milvus"
    for a, b in zip(results["faiss"], results["milvus"]):
        assert [h.video_id for h in a] == [h.video_id for h in b]
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-5)


def test_a_milvus_index_reached_at_another_address_opens_with_milvus_uri_and_stays_intact(tmp_path, built):
    """The same Milvus data at another address (a server seen from another host; here a
    milvus-lite file moved elsewhere): `--milvus-uri` opens it without touching the index folder,
    also for an update. Editing dense.json's URI instead is what every later open refuses (the
    manifest records dense.json's size), so a user who had to do that lost the index."""
    import subprocess
    import sys

    from typer.testing import CliRunner

    from vidseek.cli import cli
    from vidseek.search.entries import RECALL_STATE_DIR
    from vidseek.search.integrity import verify_index

    index, shared, moved = tmp_path / "index", tmp_path / "shared", tmp_path / "moved"
    # Built by another process: milvus-lite keeps a path locked by the process that opened it.
    subprocess.run([sys.executable, "-m", "vidseek.cli", "index", str(built["folder"]), "--out", str(index),
                    "--recall", str(built["recall"]), "--backend", "milvus", "--index-type", "flat",
                    "--milvus-uri", str(shared / "vectors.db"), "--workers", "0"], check=True, capture_output=True)
    dense_json = index / RECALL_STATE_DIR / "dense.json"
    recorded = dense_json.read_bytes()
    shared.rename(moved)  # the same data, now at another address
    new_uri = str(moved / "vectors.db")

    with pytest.raises(SearchIndexError, match="vectors.db named by .* is missing; pass --milvus-uri"):
        Searcher(index)
    queries = [QUERY, "a green star blinks"]
    with Searcher(built["index"]) as searcher:  # FAISS over the same folder and recall checkpoint
        expected = searcher.search_batch(queries, k=5, recall_k=5, rerank=False)
    with Searcher(index, milvus_uri=new_uri) as searcher:
        found = searcher.search_batch(queries, k=5, recall_k=5, rerank=False)
    for hits, reference in zip(found, expected):
        assert [h.video_id for h in hits] == [h.video_id for h in reference]
        np.testing.assert_allclose([h.score for h in hits], [h.score for h in reference], atol=1e-5)
    assert dense_json.read_bytes() == recorded
    assert verify_index(index)[0] == []

    # an update through the other address keeps the recorded URI, and the index verifies
    gone = expected[0][0].video_id
    with Indexer(index, milvus_uri=new_uri, progress=False) as indexer:
        assert indexer.remove([gone]) == 1
    assert json.loads(dense_json.read_text())["uri"] == json.loads(recorded)["uri"]
    assert verify_index(index)[0] == []
    result = CliRunner().invoke(cli, ["search", str(index), QUERY, "--json", "--no-rerank", "-k", "4",
                                      "--milvus-uri", new_uri])
    assert result.exit_code == 0, result.output
    assert [h["video_id"] for h in json.loads(result.output)["results"]] == [h.video_id for h in expected[0][1:5]]

    # a FAISS index has no Milvus server to reach: one clear line
    with pytest.raises(ConfigError, match="keeps its vectors in FAISS, not Milvus; drop --milvus-uri"):
        Searcher(built["index"], milvus_uri="http://127.0.0.1:19530")


def test_long_videos_are_cut_into_windows_and_hits_keep_the_best_window(tmp_path, built):
    from vidseek.data.synth import SynthConfig, generate

    generate(tmp_path / "long", SynthConfig(num_videos=3, seed=2, frames=40, size=32, fps=8), progress=False)
    index = tmp_path / "index"
    summary = build_index(tmp_path / "long" / "videos", index, recall=str(built["recall"]), segment_seconds=2.0,
                          overlap_seconds=0.5, workers=0, progress=False)
    assert (summary.total_videos, summary.total_keys) == (3, 9)  # 5 s → (0,2) (1.5,3.5) (3,5)
    with Searcher(index) as searcher:
        video_id = "all/" + sorted(p.stem for p in (tmp_path / "long" / "videos" / "all").glob("*.mp4"))[0]
        windows = searcher.video_entries(video_id)
        assert [(e.key, e.start, e.end) for e in windows] == [
            (f"{video_id}#0", 0.0, 2.0), (f"{video_id}#1", 1.5, 3.5), (f"{video_id}#2", 3.0, 5.0)]
        hits = searcher.search(QUERY, k=3, recall_k=9)
        recalled = searcher.recall.recall([QUERY], 9)[0]
        entries = searcher.entries.get_many([i for i, _ in recalled])
    best: dict[str, tuple[float, float, float]] = {}
    for i, score in recalled:
        e = entries[i]
        if e.video_id not in best or score > best[e.video_id][0]:
            best[e.video_id] = (score, e.start, e.end)
    assert len(hits) == 3 and {h.video_id for h in hits} == set(best)
    for hit in hits:
        assert (hit.score, hit.start, hit.end) == pytest.approx(best[hit.video_id])


def test_collapse_by_video_keeps_each_videos_best_window():
    def entry(i: int, video: str, start: float) -> Entry:
        return Entry(i, f"{video}#{i}", video, f"/v/{video}.mp4", start, start + 2)

    candidates = [(entry(1, "a", 0.0), 0.9, 0.1), (entry(2, "a", 2.0), 0.5, 0.7), (entry(3, "b", 0.0), 0.8, 0.6),
                  (entry(4, "c", 4.0), 0.7, None)]
    hits = collapse_by_video(candidates, k=10)
    assert [(h.video_id, h.start, h.score) for h in hits] == [("a", 2.0, 0.7), ("c", 4.0, 0.7), ("b", 0.0, 0.6)]
    assert collapse_by_video(candidates, k=1)[0].video_id == "a"


def test_recall_spec_prefixes_and_registration():
    assert parse_recall_spec("runs/x/best.pt") == ("dense", "runs/x/best.pt")
    with pytest.raises(ConfigError, match="unknown recall backend 'nope'"):
        parse_recall_spec("nope:runs/x")
    register_recall_backend("fakegen", lambda *args: None)
    try:
        assert parse_recall_spec("fakegen:runs/x") == ("fakegen", "runs/x")
    finally:
        del RECALL_BACKENDS["fakegen"]


@pytest.mark.parametrize("text, expected", [("4G", 4 << 30), ("512M", 512 << 20), ("1.5GiB", 3 << 29), ("1000", 1000)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


def test_parse_memory_rejects_nonsense():
    with pytest.raises(ConfigError, match="4G"):
        parse_memory("lots")


def test_demo_runs_end_to_end_and_reuses_its_cache(tmp_path):
    from vidseek.data.synth import SynthConfig
    from vidseek.search.demo import TrainingStage, demo_queries, run_demo, sample_clip_folder

    stages = (TrainingStage("synth-clip-tiny", 2, 8, 2), TrainingStage("synth-seqtransf-tiny", 2, 8, 2))
    settings = dict(synth=SynthConfig(num_videos=30, seed=4, frames=8, size=32), stages=stages,
                    progress=False)
    first = run_demo(tmp_path, **settings)
    queries = demo_queries(tmp_path / "synth")
    assert [(q, v) for q, v, _ in first.queries] == queries and len(queries) == 3
    with Searcher(first.index_dir) as searcher:
        for query, _, hits in first.queries:
            again = searcher.search(query, k=5)
            assert [h.video_id for h in hits] == [h.video_id for h in again]
        if sample_clip_folder() is not None:  # bikes.mp4 is 10 s: windows (0,4) (3,7) (6,10)
            assert [(e.start, e.end) for e in searcher.video_entries("bikes")] == [(0.0, 4.0), (3.0, 7.0), (6.0, 10.0)]
    stamp = first.checkpoint.stat().st_mtime_ns
    second = run_demo(tmp_path, **settings)
    assert first.checkpoint.parent.name == "synth-seqtransf-tiny"
    assert second.checkpoint == first.checkpoint and first.checkpoint.stat().st_mtime_ns == stamp  # not retrained
    assert [[h.video_id for h in hits] for _, _, hits in second.queries] == \
        [[h.video_id for h in hits] for _, _, hits in first.queries]


def test_tcmgc_reranker_scores_equal_its_own_pairwise_score(tmp_path, built):
    """The cascade treats a rerank-only model generically: features → encode_video_features → score."""
    import vidseek

    tcmgc = save_random_checkpoint(tmp_path / "tcmgc.pt", "synth-tcmgc-tiny", seed=3)
    with pytest.raises(ConfigError, match="reranker without a dense index vector"):
        Indexer(tmp_path / "wrong", recall=str(tcmgc), progress=False)
    folder = tmp_path / "videos"
    folder.mkdir()
    for clip in built["clips"][:6]:
        shutil.copy(clip, folder / clip.name)
    build_index(folder, tmp_path / "index", recall=str(built["recall"]), rerank=str(tcmgc), workers=0, progress=False)
    with Searcher(tmp_path / "index") as searcher:
        hits = searcher.search(QUERY, k=6, recall_k=6)
    direct = vidseek.load(tcmgc, device="cpu").score([QUERY], [h.path for h in hits])[0]
    np.testing.assert_allclose([h.rerank_score for h in hits], direct, atol=2e-3)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


# --- models that embed decoded frames (PIG "vip") ----------------------------------------------------

VIP_QUERY = "a red circle moves left"


@pytest.fixture(scope="module")
def vip_checkpoint(tiny_synth, tmp_path_factory):
    """PIG with the CLIP-ViP-style video ViT ("vip"), trained 2 steps end to end from frames."""
    import dataclasses

    from vidseek.models.registry import get_preset
    from vidseek.train.loop import train

    torch.set_num_threads(1)
    base = get_preset("synth-pig-baseline-tiny")
    preset = dataclasses.replace(base, name="synth-pig-vip-test", model_config={**base.model_config, "backbone": "vip"},
                                 train=dataclasses.replace(base.train, mode="frames"))
    run = tmp_path_factory.mktemp("vip") / "run"
    train(preset.with_overrides(batch_size=8, max_steps=2, eval_every=100), tiny_synth, run, progress=False, device="cpu")
    return run


def direct_vip_vectors(model, windows: list[tuple[str, float | None, float | None]], frames: int) -> np.ndarray:
    """Reference: `load_video_tensor` per window, one batch, encode_frames → encode_video_features → index_video."""
    from vidseek.video import load_video_tensor

    decoded = [load_video_tensor(path, frames, model.clip.image_size, start=start, end=end) for path, start, end in windows]
    with torch.no_grad():
        feats = model.encode_frames(torch.stack([d[0] for d in decoded]), torch.stack([d[1] for d in decoded]))
        return model.index_video(model.encode_video_features(feats)).numpy()


def indexed_vectors(searcher: Searcher) -> dict[int, np.ndarray]:
    """Every stored dense vector, read back through the public search API: the flat index
    searched with the D unit vectors returns vector components as inner products."""
    index = searcher.recall.index
    dim = searcher.recall.query_vectors(["x"]).shape[1]
    scores, ids = index.search(np.eye(dim, dtype=np.float32), len(index))
    vectors: dict[int, np.ndarray] = {}
    for axis in range(dim):
        for i, s in zip(ids[axis], scores[axis]):
            vectors.setdefault(int(i), np.zeros(dim, np.float32))[axis] = s
    return vectors


def test_vip_recall_and_rerank_index_from_decoded_windows(vip_checkpoint, tmp_path):
    from vidseek.data.synth import SynthConfig, generate
    from vidseek.store import FeatureStore
    from vidseek.train.checkpoint import load_model

    generate(tmp_path / "long", SynthConfig(num_videos=2, seed=2, frames=40, size=32, fps=8), progress=False)
    index = tmp_path / "index"
    summary = build_index(tmp_path / "long" / "videos", index, recall=str(vip_checkpoint), rerank=str(vip_checkpoint),
                          segment_seconds=2.0, overlap_seconds=0.5, workers=0, progress=False, batch_size=4)
    assert (summary.total_videos, summary.total_keys, summary.failed) == (2, 6, 0)
    meta = json.loads((index / "index.json").read_text())
    assert meta["stores"] == {"recall": RECALL_STORE_DIR, "rerank": None}  # the vip reranker decodes candidates
    with FeatureStore(index / RECALL_STORE_DIR) as store:
        assert store.frames == 1  # a catalog of windows, not the model's input
    model, _ = load_model(vip_checkpoint, device="cpu")
    model.eval()
    with Searcher(index) as searcher:
        entries = searcher.entries.get_many(range(1, 7))
        assert sorted((e.start, e.end) for e in entries.values()) == [(0.0, 2.0), (0.0, 2.0), (1.5, 3.5), (1.5, 3.5),
                                                                      (3.0, 5.0), (3.0, 5.0)]
        ids = sorted(entries)
        direct = direct_vip_vectors(model, [(entries[i].path, entries[i].start, entries[i].end) for i in ids], 8)
        stored = indexed_vectors(searcher)
        np.testing.assert_allclose(np.stack([stored[i] for i in ids]), direct, rtol=0, atol=1e-5)
        hits = searcher.search(VIP_QUERY, k=2, recall_k=6)
        query = searcher.recall.query_vectors([VIP_QUERY])[0]
    # Same checkpoint for both stages: PIG's score is the index inner product, so the decoded-at-
    # query-time rerank score equals the recall score of the video's best window.
    best = {}
    for i, score in zip(ids, direct @ query):
        e = entries[i]
        best[e.video_id] = max(best.get(e.video_id, (-np.inf,)), (float(score), e.start, e.end))
    assert len(hits) == 2
    for hit in hits:
        assert (hit.rerank_score, hit.start, hit.end) == pytest.approx(best[hit.video_id], abs=1e-5)
        assert hit.recall_score == pytest.approx(hit.rerank_score, abs=1e-5)


def test_vip_index_of_whole_clips_records_decode_failures_and_retries(vip_checkpoint, tiny_synth, tmp_path,
                                                                        monkeypatch):
    import vidseek.video
    from vidseek.errors import VideoDecodeError
    from vidseek.train.checkpoint import load_model

    folder = tmp_path / "videos"
    folder.mkdir()
    clips = sorted((tiny_synth / "videos" / "all").glob("*.mp4"))[:3]
    for clip in clips:
        shutil.copy(clip, folder / clip.name)
    (folder / "broken.mp4").write_bytes(b"not a video")
    flaky = str(folder / clips[1].name)
    real_load = vidseek.video.load_video_tensor

    def load_failing_once_for_the_model(path, num_frames, size, **kwargs):
        if str(path) == flaky and num_frames == 8:  # extraction (1 frame) succeeds, the model's decode fails
            raise VideoDecodeError(path, "simulated read error")
        return real_load(path, num_frames, size, **kwargs)

    monkeypatch.setattr(vidseek.video, "load_video_tensor", load_failing_once_for_the_model)
    index = tmp_path / "index"
    first = build_index(folder, index, recall=str(vip_checkpoint), workers=0, progress=False)
    flaky_id = clips[1].stem  # a plain folder: the file stem is the video id
    assert (first.added, first.total_keys, first.failed) == (2, 2, 2)
    failed = dict(first.failures)
    assert set(failed) == {"broken", flaky_id} and "simulated read error" in failed[flaky_id]
    assert {f["key"] for f in json.loads((index / "index.json").read_text())["failures"]} == {"broken", flaky_id}
    monkeypatch.setattr(vidseek.video, "load_video_tensor", real_load)
    second = build_index(folder, index, recall=str(vip_checkpoint), workers=0, progress=False)
    assert (second.added, second.total_keys) == (1, 3)
    model, _ = load_model(vip_checkpoint, device="cpu")
    model.eval()
    with Searcher(index) as searcher:
        entries = searcher.entries.get_many(range(1, 10))
        assert sorted(e.video_id for e in entries.values()) == sorted(c.stem for c in clips)
        ids = sorted(entries)
        stored = indexed_vectors(searcher)
    direct = direct_vip_vectors(model, [(entries[i].path, None, None) for i in ids], 8)
    np.testing.assert_allclose(np.stack([stored[i] for i in ids]), direct, rtol=0, atol=1e-5)


def test_vip_reranker_drops_candidates_whose_file_is_gone(vip_checkpoint, built, tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    for clip in built["clips"][:3]:
        shutil.copy(clip, folder / clip.name)
    index = tmp_path / "index"
    build_index(folder, index, recall=str(built["recall"]), rerank=str(vip_checkpoint), workers=0, progress=False)
    assert json.loads((index / "index.json").read_text())["stores"]["rerank"] is None
    gone = built["clips"][0]
    (folder / gone.name).unlink()
    with Searcher(index) as searcher:
        hits = searcher.search(QUERY, k=3, recall_k=3)
        unranked = searcher.search(QUERY, k=3, recall_k=3, rerank=False)
    assert {h.video_id for h in unranked} == {c.stem for c in built["clips"][:3]}
    assert {h.video_id for h in hits} == {c.stem for c in built["clips"][1:3]}
    assert all(h.rerank_score is not None for h in hits)


# --- GRDR beams at search time ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def grdr_index(tiny_synth, tmp_path_factory):
    """A GRDR index (as in test_grdr_run.py: a 2-step dense run, GRDR trained on its vectors)."""
    from vidseek.models.registry import get_preset
    from vidseek.train.loop import train

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("grdr_search")
    train(get_preset("synth-meanp-tiny").with_overrides(batch_size=8, max_steps=2, eval_every=100), tiny_synth,
          root / "dense", progress=False, device="cpu")
    train(get_preset("synth-grdr-tiny").with_overrides(batch_size=8, max_steps=9), tiny_synth, root / "grdr",
          init_from=str(root / "dense"), progress=False, device="cpu")
    build_index(tiny_synth / "annotations.jsonl", root / "index", recall=f"grdr:{root / 'grdr'}", split="test",
                workers=0, progress=False)
    return root / "index"


def test_grdr_beams_at_search_time(grdr_index):
    from typer.testing import CliRunner

    from vidseek.cli import cli

    with Searcher(grdr_index) as searcher:
        assert searcher.recall.beams == 20  # the width stored at index time
    recalled = {}
    for beams in (1, 100):
        with Searcher(grdr_index, beams=beams) as searcher:
            assert searcher.recall.beams == beams
            recalled[beams] = searcher.recall.recall([VIP_QUERY], 1000)[0]
            hits = searcher.search(VIP_QUERY, k=1000, recall_k=1000)
            entries = searcher.entries.get_many([i for i, _ in recalled[beams]])
        assert {h.video_id for h in hits} == {e.video_id for e in entries.values()}
    assert 0 < len(recalled[1]) < len(recalled[100])
    result = CliRunner().invoke(cli, ["search", str(grdr_index), VIP_QUERY, "-k", "1000", "--json", "--beams", "1"])
    assert result.exit_code == 0, result.output
    with Searcher(grdr_index, beams=1) as searcher:
        expected = [h.to_dict() for h in searcher.search(VIP_QUERY, k=1000)]
    assert json.loads(result.output)["results"] == expected


def test_beams_are_rejected_for_dense_recall(built, tmp_path):
    from typer.testing import CliRunner

    from vidseek.cli import cli

    with pytest.raises(ConfigError, match="--beams applies to grdr: recall only"):
        Searcher(built["index"], beams=4)
    runner = CliRunner()
    result = runner.invoke(cli, ["search", str(built["index"]), QUERY, "--beams", "4"])
    assert isinstance(result.exception, ConfigError) and "--beams applies to grdr: recall only" in str(result.exception)
    result = runner.invoke(cli, ["index", str(built["folder"]), "--recall", str(built["recall"]),
                                 "--out", str(tmp_path / "index"), "--beams", "4", "--workers", "0"])
    assert isinstance(result.exception, ConfigError) and "--beams applies to grdr: recall only" in str(result.exception)
    assert "--beams" in runner.invoke(cli, ["search", "--help"]).output
