"""Ingestion speed: `vidseek extract` (one process) vs `vidseek extract --ray` on the same videos,
and the per-video decode and encode costs a cluster plan is built from.

One run prints one table, measured side by side:

* decode: `load_video_tensor` (PyAV, one decoder thread, as in the loader workers and the Ray
  actors) of `--frames` frames at 224 px, seconds per video (median over the videos);
* encode: the random-init ViT-B/32 image tower on batches of `--batch-size` videos × `--frames`
  frames, fp32 on the CPU with one torch thread, seconds per video;
* `vidseek extract` as a child process (its default: 2 decoding workers, the image tower in the
  main process) and `vidseek extract --ray ADDRESS` as a driver of a local Ray cluster with
  `--cpus` one-CPU actors; videos/s as the command reports it (start-up included) and the
  command's wall time. Each run writes a fresh store.

Ray runs in a private network namespace whose only interface is loopback (the network rule of
issue 13: Ray replaces 127.0.0.1 by the host's address), which needs root and iproute2.

Videos: `vidseek synth` clips (`--videos`, `--size` px, `--clip-frames` frames; real H.264).

    .venv/bin/python benchmarks/ingest.py [--videos 48] [--size 160] [--frames 12] [--cpus 2]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

REPO_SRC = Path(__file__).resolve().parents[1] / "src"
HEAD_PORT = 6379  # free by construction: the namespace is private
HEAD_START_ATTEMPTS = 3
HEAD_START_TIMEOUT_S = 240


# ------------------------------------------------------------------------------------------------
# A Ray cluster on loopback only (also the fixture of tests/test_ray_ingest.py)
# ------------------------------------------------------------------------------------------------
@dataclass
class LoopbackCluster:
    netns: str
    address: str
    env: dict[str, str]

    def command(self, *args: str) -> list[str]:
        """`args` run inside the cluster's namespace (ip netns exec execs them: same pid)."""
        return ["ip", "netns", "exec", self.netns, *args]

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def stop_everything(self) -> None:
        """Every process in the namespace was started by `loopback_ray_cluster` (the head and
        what it spawned, drivers included)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 15
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.2)


@contextmanager
def loopback_ray_cluster(cpus: int) -> Iterator[LoopbackCluster]:
    """`ray start --head` with `cpus` CPUs in a new network namespace that has only `lo`."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        raise RuntimeError("a loopback-only Ray cluster runs in a private network namespace: it needs root and "
                           "iproute2's `ip` (apt-get install iproute2)")
    name = f"vidseek-ray-{os.getpid()}"
    setup = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if setup.returncode != 0:
        raise RuntimeError(f"cannot create network namespace {name}: {setup.stderr.strip()}")
    temp = Path(tempfile.mkdtemp(prefix="vr", dir="/tmp"))  # short: Ray's unix socket paths must fit 107 chars
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_SRC), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
           # Token auth would write ~/.ray/auth_token; nothing outside this namespace can reach the cluster.
           "RAY_AUTH_MODE": "disabled"}
    cluster = LoopbackCluster(name, f"127.0.0.1:{HEAD_PORT}", env)
    try:
        subprocess.run(cluster.command("ip", "link", "set", "lo", "up"), check=True)
        ray_cli = str(Path(sys.executable).with_name("ray"))
        for _ in range(HEAD_START_ATTEMPTS):
            try:
                head = subprocess.run(cluster.command(ray_cli, "start", "--head", f"--port={HEAD_PORT}",
                                                      f"--num-cpus={cpus}", "--num-gpus=0", "--include-dashboard=false",
                                                      f"--temp-dir={temp}", "--disable-usage-stats"),
                                      env=env, capture_output=True, text=True, timeout=HEAD_START_TIMEOUT_S)
                failure = None if head.returncode == 0 else head.stderr[-2000:]
            except subprocess.TimeoutExpired:
                failure = f"no answer within {HEAD_START_TIMEOUT_S} s"
            if failure is None:
                break
            # On a saturated machine the raylet can give up waiting for its agent (a fixed
            # timeout inside Ray): clear the namespace and start again.
            cluster.stop_everything()
        else:
            raise RuntimeError(f"`ray start --head` failed {HEAD_START_ATTEMPTS} times in namespace {name}: {failure}")
        yield cluster
    finally:
        cluster.stop_everything()
        subprocess.run(["ip", "netns", "del", name], check=False)
        shutil.rmtree(temp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------------
def per_video_costs(videos: Sequence[Path], frames: int, batch_size: int) -> tuple[float, float]:
    """(decode s/video median, encode s/video) with one thread each, ViT-B/32 at random init."""
    import torch

    from vidseek.encoders import build_clip
    from vidseek.video import load_video_tensor

    torch.set_num_threads(1)
    decode_s, pixels = [], []
    for path in videos:
        began = time.perf_counter()
        clip_pixels, _, _ = load_video_tensor(path, frames, 224, threads=1)
        decode_s.append(time.perf_counter() - began)
        pixels.append(clip_pixels)
    encoder = build_clip("ViT-B-32").eval()
    batches = [torch.cat(pixels[b:b + batch_size]) for b in range(0, len(pixels), batch_size)]
    with torch.no_grad():
        encoder.encode_image(batches[0])  # warm-up
        began = time.perf_counter()
        for batch in batches[1:]:
            encoder.encode_image(batch)
    encoded = len(pixels) - len(pixels[:batch_size])
    return float(np.median(decode_s)), (time.perf_counter() - began) / max(1, encoded)


def timed_extract(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(videos/s the command reports, wall seconds) of one `vidseek extract` run."""
    began = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - began
    found = re.search(r"\(([\d.]+) videos/s\)", done.stdout)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stdout[-1000:]} {done.stderr[-2000:]}")
    return float(found.group(1)), wall


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=48)
    parser.add_argument("--size", type=int, default=160, help="synthetic clip side in pixels")
    parser.add_argument("--clip-frames", type=int, default=48, help="frames per synthetic clip")
    parser.add_argument("--frames", type=int, default=12, help="frames sampled per video")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs (= one-CPU actors) of the local Ray cluster")
    args = parser.parse_args(argv)

    from vidseek.data.synth import SynthConfig, generate

    root = Path(tempfile.mkdtemp(prefix="vidseek-bench-ingest-"))
    try:
        generate(root / "synth", SynthConfig(num_videos=args.videos, seed=0, frames=args.clip_frames, size=args.size),
                 progress=False)
        videos = sorted((root / "synth" / "videos" / "all").glob("*.mp4"))
        decode_s, encode_s = per_video_costs(videos, args.frames, args.batch_size)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_SRC), os.environ.get("PYTHONPATH")])),
               "HF_HUB_OFFLINE": "1"}
        extract = [sys.executable, "-m", "vidseek.cli", "extract", str(root / "synth" / "videos" / "all"),
                   "--model", "ViT-B-32", "--frames", str(args.frames), "--batch-size", str(args.batch_size)]
        local_rate, local_wall = timed_extract([*extract, "--out", str(root / "local")], env)
        with loopback_ray_cluster(args.cpus) as cluster:
            ray_rate, ray_wall = timed_extract(cluster.command(*extract, "--out", str(root / "ray"),
                                                               "--ray", cluster.address), cluster.env)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{len(videos)} synthetic H.264 clips, {args.size}x{args.size}, {args.clip_frames} frames; "
          f"{args.frames} frames sampled per video at 224 px; ViT-B/32 image tower at random init, fp32 CPU")
    print()
    print("| measure | value |")
    print("|---|---:|")
    print(f"| decode, s/video (PyAV, 1 thread, median) | {decode_s:.3f} |")
    print(f"| encode, s/video (batch {args.batch_size}, 1 torch thread) | {encode_s:.3f} |")
    print(f"| one core, decode + encode in series: videos/s | {1 / (decode_s + encode_s):.2f} |")
    print(f"| `vidseek extract`: videos/s (wall s) | {local_rate:.2f} ({local_wall:.0f}) |")
    print(f"| `vidseek extract --ray`, {args.cpus} CPU actors: videos/s (wall s) | {ray_rate:.2f} ({ray_wall:.0f}) |")
    print(f"| Ray / single process (videos/s) | {ray_rate / local_rate:.2f}x |")


if __name__ == "__main__":
    main()
