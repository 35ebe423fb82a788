"""Feature store: catalog, fp16 memmap shards, crash safety of the commit order, config checks."""
from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from vidseek.errors import ConfigError, DatasetError
from vidseek.store import Catalog, FeatureShards, FeatureStore, StoredItem
from vidseek.store.shards import next_location

FRAMES, DIM, GRID = 3, 4, 2


def make_store(root, patches=False, **overrides):
    settings = dict(encoder="tiny", embed_dim=DIM, frames=FRAMES, image_size=32, patches=patches,
                    grid=GRID if patches else None, segment_seconds=None, overlap_seconds=0.0)
    settings.update(overrides)
    return FeatureStore.create(root, **settings)


def items(*keys):
    return [StoredItem(k, k.split("#")[0], f"/videos/{k}.mp4", duration=2.0) for k in keys]


def test_round_trip_equals_fp16_rounded_values(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.normal(size=(3, FRAMES, DIM)) * 10
    patches = rng.normal(size=(3, FRAMES, GRID * GRID, DIM))
    masks = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=bool)
    with make_store(tmp_path, patches=True) as store:
        store.add(items("a", "b", "c"), frames, masks, patches)
    reader = FeatureStore(tmp_path)
    got, got_masks = reader.frame_features(["c", "a"])
    assert got.dtype == np.float32 and got.shape == (2, FRAMES, DIM)
    np.testing.assert_array_equal(got, frames[[2, 0]].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(got_masks, masks[[2, 0]])
    np.testing.assert_array_equal(reader.patch_features(["b"]), patches[[1]].astype(np.float16).astype(np.float32))
    assert [r.key for r in reader.rows()] == ["a", "b", "c"]
    assert [r.num_frames for r in reader.rows()] == [3, 1, 2]
    assert len(reader) == 3 and "b" in reader and "zzz" not in reader
    with pytest.raises(DatasetError, match="'zzz'"):
        reader.frame_features(["a", "zzz"])


def test_shards_roll_over_and_read_by_location(tmp_path):
    shards = FeatureShards(tmp_path, "x", (2,), rows_per_shard=3)
    data = np.arange(14, dtype=np.float32).reshape(7, 2)
    locations = shards.append_rows(data)
    assert locations == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
    assert (tmp_path / "x-00000.bin").stat().st_size == 3 * 2 * 2  # 3 rows of 2 fp16 values
    np.testing.assert_array_equal(shards.read([(2, 0), (0, 1), (1, 2)]), data[[6, 1, 5]])
    assert shards.read([]).shape == (0, 2)
    assert next_location({0: 3, 1: 3}, 3) == (2, 0)
    assert next_location({0: 3, 1: 2}, 3) == (1, 2)
    assert next_location({}, 3) == (0, 0)


def test_uncommitted_rows_are_overwritten_after_a_crash(tmp_path):
    """Rows written but never committed (process died before the catalog commit) are not visible
    and the next writer reuses their space."""
    with make_store(tmp_path) as store:
        store.add(items("a"), np.ones((1, FRAMES, DIM)), np.ones((1, FRAMES), bool))
        # Simulate the crash window: features appended and flushed, catalog commit never happens.
        store._frames.append_rows(np.full((2, FRAMES, DIM), 7.0))
    with make_store(tmp_path) as store:
        assert store.catalog.committed_rows() == {0: 1}
        store.add(items("b"), np.full((1, FRAMES, DIM), 2.0), np.ones((1, FRAMES), bool))
        assert store.catalog.get("b").location == (0, 1)  # reused the uncommitted row
        got, _ = store.frame_features(["a", "b"])
    np.testing.assert_array_equal(got[:, 0, 0], [1.0, 2.0])


def test_reopen_with_different_settings_names_the_setting(tmp_path):
    make_store(tmp_path).close()
    with pytest.raises(ConfigError, match=r"frames=3, not 8; use another --out"):
        make_store(tmp_path, frames=8)
    with pytest.raises(ConfigError, match=r"encoder='tiny', not 'ViT-B-32'"):
        make_store(tmp_path, encoder="ViT-B-32")
    make_store(tmp_path).close()  # same settings reopen fine


def test_second_writer_is_refused_while_first_holds_the_store(tmp_path):
    first = make_store(tmp_path)
    with pytest.raises(ConfigError, match="another process is writing"):
        make_store(tmp_path)
    first.close()
    make_store(tmp_path).close()


def test_read_only_store_and_missing_store_errors(tmp_path):
    with pytest.raises(DatasetError, match="no feature store"):
        FeatureStore(tmp_path / "nowhere")
    make_store(tmp_path).close()
    with pytest.raises(ConfigError, match="read-only"):
        FeatureStore(tmp_path).add(items("a"), np.ones((1, FRAMES, DIM)), np.ones((1, FRAMES), bool))
    with pytest.raises(ConfigError, match="no patch features"):
        FeatureStore(tmp_path).patch_features(["a"])


def test_catalog_failed_then_ok_replaces_and_counts(tmp_path):
    catalog = Catalog(tmp_path / "c.sqlite")
    catalog.mark_failed("v1", "v1", "/v/v1.mp4", "cannot decode video /v/v1.mp4: bad")
    assert catalog.counts() == {"ok": 0, "failed": 1}
    assert catalog.get("v1").error == "cannot decode video /v/v1.mp4: bad"
    assert catalog.keys(status="failed") == ["v1"]
    catalog.close()
    with make_store(tmp_path / "s") as store:
        store.mark_failed(items("v1")[0], "boom")
        store.add(items("v1"), np.zeros((1, FRAMES, DIM)), np.ones((1, FRAMES), bool))
        assert store.catalog.counts() == {"ok": 1, "failed": 0}
        assert store.catalog.get("v1").error is None
        assert store.catalog.delete(["v1"]) == 1
        assert "v1" not in store and len(store) == 0
    # WAL mode is on, so readers can poll while extract writes.
    mode = sqlite3.connect(tmp_path / "s" / "catalog.sqlite").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
