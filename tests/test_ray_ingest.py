"""Ray Data ingestion (`vidseek extract/index … --ray ADDRESS`) on a real Ray cluster, loopback only.

Ray replaces 127.0.0.1 with the host's own address (`ray.init(_node_ip_address="127.0.0.1")`
is resolved back to it) and its servers listen on every interface, so the cluster and its
drivers run inside a private network namespace whose only interface is `lo` (`ip netns`, as
root): nothing of Ray's can listen on or connect to anything else, and a test checks that.
One Ray head per module (`ray start --head`, 2 CPUs: two CPU actors); each `vidseek` command
is a driver process joining it, as on a real cluster.

Checked against the single-process path on the same clips (a corrupt file among them): the
same keys in the same order with fp16-equal features, the same failures, the same entry ids
and search results — also after `kill -9` of the driver in the middle of a run and a re-run.
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import imported_benchmark
from vidseek.store import FeatureStore
from vidseek.store.extract import EncodedBatch, VideoSource, _Decoded, _VideoJob, extract
from vidseek.store.ray_ingest import PARTS_DIR, actor_resources, job_from_json, job_to_json, read_part, write_part
from vidseek.store.shards import StoredItem

pytestmark = pytest.mark.slow

FRAMES = 4
BATCH = 2
CLIPS = 8
DRIVER_TIMEOUT_S = 420
QUERIES = ["a red circle moves left", "a blue square grows then shrinks", "a green triangle rotates"]


# --- plain helpers (no Ray) ---------------------------------------------------------------------------

def test_job_and_part_files_round_trip(tmp_path):
    job = _VideoJob(VideoSource("cat/a", Path("/v/cat/a.mp4"), 1.5, None), frozenset({"cat/a#1", "cat/a#0"}))
    position, back = job_from_json(job_to_json(job, 7))
    assert (position, back) == (7, job)
    ok = _Decoded(StoredItem("a#0", "a", "/v/a.mp4", 0.0, 2.0, 9.5), last_of_video=False)
    failed = _Decoded(StoredItem("b", "b", "/v/b.mp4"), error="cannot decode /v/b.mp4")
    skipped = _Decoded(StoredItem("a#1", "a", "/v/a.mp4", 2.0, 4.0, 9.5), skipped=True)
    frames = np.random.default_rng(0).standard_normal((1, 3, 8)).astype(np.float32)
    batch = EncodedBatch([ok, failed, skipped], frames, np.array([[True, True, False]]), None)
    write_part(tmp_path / "p.npz", batch)
    assert [p.name for p in tmp_path.iterdir()] == ["p.npz"]  # no temporary file left behind
    read = read_part(tmp_path / "p.npz")
    assert [(d.item, d.error, d.skipped, d.last_of_video) for d in read.decoded] == \
        [(d.item, d.error, d.skipped, d.last_of_video) for d in batch.decoded]
    assert read.frames.dtype == np.float16  # only fp16 features leave an actor
    np.testing.assert_array_equal(read.frames, frames.astype(np.float16))
    np.testing.assert_array_equal(read.masks, batch.masks)
    assert read.patches is None and [d.item.key for d in read.to_store] == ["a#0"]


def test_one_actor_per_gpu_else_per_cpu():
    assert actor_resources({"CPU": 16.0, "GPU": 4.0}, None) == (4, {"num_gpus": 1})
    assert actor_resources({"CPU": 2.0}, None) == (2, {"num_cpus": 1})
    assert actor_resources({"CPU": 8.0}, 3) == (3, {"num_cpus": 1})


@pytest.mark.parametrize("command", ["extract", "index"])
@pytest.mark.parametrize("given, address", [
    (["--ray"], "local"),                                      # last: a local / RAY_ADDRESS Ray
    (["--ray", "--batch-size", "2"], "local"),                 # followed by another option
    (["--ray", "10.0.0.7:6379", "--batch-size", "2"], "10.0.0.7:6379"),
    (["--ray=ray://head:10001"], "ray://head:10001"),
    (["--batch-size", "2"], None),                             # no --ray: this process
])
def test_ray_option_with_and_without_an_address(command, given, address, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import vidseek.store.ray_ingest as ray_ingest
    from vidseek.cli import cli
    from vidseek.errors import ConfigError

    seen = []

    def record(ray_address):
        seen.append(ray_address)
        raise ConfigError("stop here")  # the address is all this test needs

    monkeypatch.setattr(ray_ingest, "runner_for", record)
    options = ["--model", "tiny"] if command == "extract" else ["--recall", "any.pt"]
    result = CliRunner().invoke(cli, [command, str(tmp_path), "--out", str(tmp_path / "out"), *options, *given])
    assert seen == [address], result.output
    assert isinstance(result.exception, ConfigError) and str(result.exception) == "stop here"


def test_ray_option_uses_no_deprecated_typer_parameter():
    done = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-m", "vidseek.cli", "index", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--ray" in done.stdout and "[ADDRESS]" in done.stdout


# --- the loopback-only Ray cluster ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    """The loopback-only cluster of benchmarks/ingest.py (one Ray head, 2 CPUs, for the module)."""
    with imported_benchmark("ingest") as bench:
        running = bench.loopback_ray_cluster(cpus=2)
        try:
            started = running.__enter__()
        except RuntimeError as err:
            pytest.fail(str(err))
        try:
            yield started
        finally:
            running.__exit__(None, None, None)


def run_vidseek(cluster, *args: str) -> subprocess.CompletedProcess:
    """`vidseek ARGS` as a Ray driver inside the cluster's namespace."""
    done = subprocess.run(cluster.command(sys.executable, "-m", "vidseek.cli", *args), env=cluster.env,
                          capture_output=True, text=True, timeout=DRIVER_TIMEOUT_S)
    assert done.returncode == 0, f"vidseek {' '.join(args)} failed:\n{done.stdout}\n{done.stderr[-3000:]}"
    return done


def _host(address: str) -> str:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host.split("%")[0].removeprefix("::ffff:")


def test_ray_stays_on_loopback(cluster, data):
    """Only `lo` exists in the cluster's namespace, every socket of Ray (listening or connected)
    is on a loopback address or the wildcard (which, with `lo` the only interface, is loopback),
    and the Ray processes really are inside it."""
    links = subprocess.run(cluster.command("ip", "-o", "link", "show"), capture_output=True, text=True, check=True)
    assert [line.split(":")[1].strip() for line in links.stdout.splitlines()] == ["lo"]
    names = {Path(os.readlink(f"/proc/{pid}/exe")).name for pid in cluster.pids()
             if os.path.exists(f"/proc/{pid}/exe")}
    assert {"gcs_server", "raylet"} <= names
    # A driver running keeps connections open; look while one does.
    driver = subprocess.Popen(cluster.command(sys.executable, "-c", textwrap.dedent(f"""
        import time, ray
        ray.init(address={cluster.address!r}, log_to_driver=False)
        print("connected", flush=True)
        time.sleep(30)
    """)), env=cluster.env, stdout=subprocess.PIPE, text=True)
    try:
        assert driver.stdout.readline().strip() == "connected"
        sockets = subprocess.run(cluster.command("ss", "-tunaH"), capture_output=True, text=True, check=True)
        rows = [line.split() for line in sockets.stdout.splitlines()]
        assert any(row[1] == "ESTAB" for row in rows)
        for row in rows:
            for address in row[4:6]:
                host = _host(address)
                assert host in ("*", "0.0.0.0", "::") or ipaddress.ip_address(host).is_loopback, row
    finally:
        driver.kill()
        driver.wait()


# --- data, and the single-process references ---------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """CLIPS synthetic clips + a corrupt file, a tiny CLIP weights file and a recall checkpoint."""
    from vidseek.data.synth import SynthConfig, generate
    from vidseek.encoders import build_clip
    from vidseek.models.registry import create_model, get_preset
    from vidseek.train.checkpoint import save_checkpoint
    from vidseek.utils import seed_everything

    root = tmp_path_factory.mktemp("ray-data")
    generate(root / "synth", SynthConfig(num_videos=CLIPS, seed=7, frames=8, size=32), progress=False)
    videos = root / "videos"
    videos.mkdir()
    for clip in sorted((root / "synth" / "videos" / "all").glob("*.mp4"))[:CLIPS]:
        shutil.copy(clip, videos / clip.name)
    (videos / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    torch.manual_seed(0)
    weights = root / "tiny-clip.pt"
    torch.save(build_clip("tiny").model.state_dict(), weights)
    seed_everything(0)
    preset = get_preset("synth-meanp-tiny")
    recall = root / "recall.pt"
    save_checkpoint(recall, model=create_model(preset), preset=preset.to_dict(), step=0, epoch=0, batch_in_epoch=0)
    return {"root": root, "videos": videos, "weights": weights, "recall": recall}


def store_contents(root: Path) -> tuple[list[str], np.ndarray, np.ndarray, list[tuple[str, str]]]:
    with FeatureStore(root) as store:
        keys = store.keys()
        frames, masks = store.frame_features(keys)
        failed = [(r.key, r.error) for r in store.catalog.rows("failed")]
    return keys, frames, masks, failed


def entry_rows(index: Path) -> list[tuple]:
    with sqlite3.connect(index / "entries.sqlite") as db:
        return list(db.execute('SELECT id, key, video_id, path, start, "end", ready FROM entries ORDER BY id'))


def search_all(index: Path) -> list[list[tuple[str, float]]]:
    from vidseek.search.searcher import Searcher

    with Searcher(index) as searcher:
        return [[(h.video_id, h.score) for h in hits] for hits in searcher.search_batch(QUERIES, k=5)]


# --- Ray vs the single-process path ----------------------------------------------------------------

def test_extract_on_ray_equals_single_process_extract(cluster, data, tmp_path):
    from vidseek.encoders import build_clip

    reference = extract(data["videos"], build_clip("tiny", weights=data["weights"]), tmp_path / "local",
                        frames=FRAMES, batch_size=BATCH, workers=0, progress=False)
    done = run_vidseek(cluster, "extract", str(data["videos"]), "--out", str(tmp_path / "ray"), "--model", "tiny",
                               "--weights", str(data["weights"]), "--frames", str(FRAMES),
                               "--batch-size", str(BATCH), "--ray", cluster.address)
    assert f"processed {CLIPS}, already done 0, failed 1" in done.stdout
    keys, frames, masks, failed = store_contents(tmp_path / "ray")
    ref_keys, ref_frames, ref_masks, ref_failed = store_contents(tmp_path / "local")
    assert reference.processed == CLIPS and keys == ref_keys  # same rows, same order
    np.testing.assert_array_equal(masks, ref_masks)
    # Both are fp16 in the store; the encoder ran with other batch shapes, so allow an fp16 ulp.
    np.testing.assert_allclose(frames, ref_frames, rtol=2e-3, atol=2e-3)
    assert failed == ref_failed and [k for k, _ in failed] == ["broken"]
    assert not (tmp_path / "ray" / PARTS_DIR).exists()  # every part committed, then removed

    again = run_vidseek(cluster, "extract", str(data["videos"]), "--out", str(tmp_path / "ray"), "--model", "tiny",
                                "--weights", str(data["weights"]), "--frames", str(FRAMES), "--ray", cluster.address)
    assert f"processed 0, already done {CLIPS}, failed 1" in again.stdout  # resumable: only the failure retried


HANG_AFTER_COMMITS = 2

DRIVER_THAT_HANGS = """
import pathlib, sys, time
import vidseek.store.extract as extract_module
from vidseek.cli import app

real_commit, commits = extract_module._commit, []

def commit_then_hang(*args, **kwargs):
    finished = real_commit(*args, **kwargs)
    commits.append(finished)
    if len(commits) == {hang_after}:
        pathlib.Path({marker!r}).write_text("committed")
        time.sleep(600)  # the test kills this driver with SIGKILL now
    return finished

extract_module._commit = commit_then_hang
sys.argv = ["vidseek", *{argv!r}]
app()
"""


def test_index_on_ray_killed_mid_run_then_rerun_equals_single_process(cluster, data, tmp_path):
    from vidseek.search.indexer import build_index

    build_index(data["videos"], tmp_path / "local", recall=str(data["recall"]), workers=0, batch_size=BATCH,
                progress=False)
    index = tmp_path / "ray"
    argv = ["index", str(data["videos"]), "--recall", str(data["recall"]), "--out", str(index),
            "--batch-size", str(BATCH), "--ray", cluster.address]
    marker = tmp_path / "committed"
    script = DRIVER_THAT_HANGS.format(hang_after=HANG_AFTER_COMMITS, marker=str(marker), argv=argv)
    driver = subprocess.Popen(cluster.command(sys.executable, "-c", script), env=cluster.env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + DRIVER_TIMEOUT_S
        while not marker.exists():
            assert driver.poll() is None, f"the driver ended early: {driver.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "the driver did not commit in time"
            time.sleep(0.2)
        time.sleep(2)  # actors keep writing part files meanwhile: they must not be committed twice
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    with FeatureStore(index / "features") as store:
        assert 0 < len(store) < CLIPS  # killed in the middle: some, not all, committed
    assert not (index / "index.json").exists() or entry_rows(index) == []

    done = run_vidseek(cluster, *argv)
    assert f"indexed {CLIPS} new entries" in done.stdout and "1 failed)" in done.stdout
    assert entry_rows(index) == entry_rows(tmp_path / "local")  # the same ids for the same keys, nothing twice
    keys, frames, masks, failed = store_contents(index / "features")
    ref_keys, ref_frames, ref_masks, ref_failed = store_contents(tmp_path / "local" / "features")
    assert keys == ref_keys and failed == ref_failed
    np.testing.assert_array_equal(masks, ref_masks)
    np.testing.assert_allclose(frames, ref_frames, rtol=2e-3, atol=2e-3)
    assert not (index / "features" / PARTS_DIR).exists()  # the dead run's parts were dropped
    ray_hits, local_hits = search_all(index), search_all(tmp_path / "local")
    assert [[v for v, _ in hits] for hits in ray_hits] == [[v for v, _ in hits] for hits in local_hits]
    np.testing.assert_allclose([[s for _, s in hits] for hits in ray_hits],
                               [[s for _, s in hits] for hits in local_hits], atol=1e-3)
