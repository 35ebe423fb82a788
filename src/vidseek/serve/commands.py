"""The search-engine commands of the `vidseek` CLI: index, search, serve, demo.

`vidseek.cli` calls `register(cli)`; every user mistake raises a `VidseekError`, which the CLI
prints as one line.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer
from typer.core import TyperCommand

from vidseek.errors import ConfigError


RAY_HELP = ("Decode + encode on a Ray cluster (one actor per GPU, else per CPU); this process writes the "
            "store. ADDRESS: HOST:PORT of the head, ray://HOST:10001 or auto; none: RAY_ADDRESS, else a local "
            "Ray. --out must be on storage every node shares. Put --ray after the video source.")
SERVE_MILVUS_URI_HELP = ("Where this machine reaches the index's Milvus server, if not at the address recorded by "
                         "`vidseek index` (another host, a container); the index folder is not changed.")
RAY_OPTION = "--ray"


def with_bare_ray_address(args: list[str]) -> list[str]:
    """`args` with the default address after a bare `--ray` (last, or followed by another option
    or `--`): `--ray` alone means a local / RAY_ADDRESS Ray, `--ray ADDRESS` that cluster."""
    from vidseek.store.ray_ingest import LOCAL_ADDRESS

    filled: list[str] = []
    for position, arg in enumerate(args):
        if arg == "--":  # what follows is positional, untouched
            return filled + args[position:]
        filled.append(arg)
        following = args[position + 1] if position + 1 < len(args) else None
        if arg == RAY_OPTION and (following is None or following.startswith("-")):
            filled.append(LOCAL_ADDRESS)
    return filled


class RayCommand(TyperCommand):
    """A command with a `--ray [ADDRESS]` option. Typer options cannot take an optional value
    (its is_flag / flag_value are deprecated, and ignored since 0.29: a bare `--ray` was "requires
    an argument"), so the address of a bare `--ray` is filled in before parsing."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, with_bare_ray_address(args))


BEAMS_HELP = ("GRDR beam width (grdr: recall only): more beams recall more candidates, slower; "
              "default: the index's own, else the preset's full-corpus width.")


def index_cmd(
    items: Optional[List[str]] = typer.Argument(None, help="A folder of videos, a dataset folder or a .jsonl file "
                                                            "(with --remove: the video ids to delete)."),
    out: Path = typer.Option(..., "--out", help="Index folder (created, or updated incrementally)."),
    recall: Optional[str] = typer.Option(None, "--recall", help="Recall checkpoint: CKPT (dense two-tower/PIG) "
                                                                 "or grdr:CKPT, or clip:ARCH (zero-shot CLIP, "
                                                                 "with --weights). Needed for a new index."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="CLIP weights file for --recall clip:ARCH "
                                                                    "(OpenAI .pt, open_clip, Hugging Face)."),
    rerank: Optional[str] = typer.Option(None, "--rerank", help="Reranker checkpoint (e.g. TC-MGC)."),
    remove: bool = typer.Option(False, "--remove", help="Delete the given video ids from the index."),
    split: Optional[str] = typer.Option(None, "--split", help="Only this split of a dataset."),
    segment_seconds: Optional[float] = typer.Option(None, "--segment-seconds", help="Cut long videos into windows of S seconds."),
    overlap: float = typer.Option(0.0, "--overlap", help="Window overlap in seconds."),
    index_type: str = typer.Option("auto", "--index-type", help="auto, flat, ivf<nlist>,flat, ivf<nlist>,pq<m>, hnsw<M>."),
    backend: str = typer.Option("faiss", "--backend", help="Dense index backend: faiss or milvus."),
    milvus_uri: Optional[str] = typer.Option(None, "--milvus-uri", help="Milvus server URI or milvus-lite file "
                                                                         "(default <out>/recall/milvus.db); for an "
                                                                         "existing index: where this machine reaches "
                                                                         "its server, if not at the recorded address."),
    milvus_collection: Optional[str] = typer.Option(None, "--milvus-collection", help="This index's own Milvus "
                                                     "collection (default: vidseek_<out name>_<random>, recorded)."),
    memory_budget: str = typer.Option("4G", "--memory-budget", help="RAM the dense index may use (chooses PQ above it)."),
    beams: Optional[int] = typer.Option(None, "--beams", help=BEAMS_HELP + " Stored as the index's default."),
    batch_size: int = typer.Option(8, "--batch-size"),
    workers: int = typer.Option(2, "--workers", help="Background decoding workers."),
    device: str = typer.Option("cpu", "--device"),
    ray: Optional[str] = typer.Option(None, RAY_OPTION, metavar="[ADDRESS]", help=RAY_HELP),
) -> None:
    """Index a video collection for text search (re-run to add new videos; --remove to delete)."""
    from vidseek.search.indexer import Indexer, parse_memory

    items = items or []
    if backend not in ("faiss", "milvus"):
        raise ConfigError(f"unknown --backend {backend!r}: use faiss or milvus")
    if remove:
        if not items:
            raise ConfigError("--remove needs the video ids to delete, e.g. `vidseek index --out IDX --remove cat/clip1`")
        with Indexer(out, recall=recall, rerank=rerank, device=device, progress=False, beams=beams,
                     weights=weights, milvus_uri=milvus_uri) as indexer:
            removed = indexer.remove(items)
        typer.echo(f"removed {removed} entries of {len(items)} video id(s) from {out}")
        return
    if len(items) != 1:
        raise ConfigError(f"pass exactly one video source (folder, dataset folder or .jsonl), got {len(items)}")
    with Indexer(out, recall=recall, rerank=rerank, segment_seconds=segment_seconds, overlap_seconds=overlap,
                 index_type=index_type, backend=backend, milvus_uri=milvus_uri, milvus_collection=milvus_collection,
                 memory_budget_bytes=parse_memory(memory_budget), device=device, batch_size=batch_size,
                 workers=workers, beams=beams, weights=weights, ray=ray) as indexer:
        summary = indexer.add(items[0], split=split)
    typer.echo(f"indexed {summary.added} new entries ({summary.processed} extracted, {summary.skipped_existing} "
               f"already stored, {summary.failed} failed); index now holds {summary.total_videos} videos / "
               f"{summary.total_keys} entries → {out}")
    for key, error in summary.failures[:20]:
        typer.echo(f"  failed {key}: {error}")
    if len(summary.failures) > 20:
        typer.echo(f"  … and {len(summary.failures) - 20} more (see {out / 'index.json'})")


def search_cmd(
    index: Path = typer.Argument(..., help="Index folder from `vidseek index`."),
    text: str = typer.Argument(..., help="What happens in the video."),
    k: int = typer.Option(10, "-k", "--k", help="Number of videos."),
    recall_k: int = typer.Option(100, "--recall-k", help="Candidates passed from recall to the reranker."),
    no_rerank: bool = typer.Option(False, "--no-rerank", help="Recall scores only."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    beams: Optional[int] = typer.Option(None, "--beams", help=BEAMS_HELP),
    device: str = typer.Option("cpu", "--device"),
    milvus_uri: Optional[str] = typer.Option(None, "--milvus-uri", help=SERVE_MILVUS_URI_HELP),
) -> None:
    """Search an index from the command line."""
    from vidseek.search.hits_table import print_hits
    from vidseek.search.searcher import Searcher

    with Searcher(index, device=device, beams=beams, milvus_uri=milvus_uri) as searcher:
        hits = searcher.search(text, k=k, recall_k=recall_k, rerank=not no_rerank)
    if json_out:
        typer.echo(json.dumps({"query": text, "results": [h.to_dict() for h in hits]}, indent=2))
    else:
        print_hits(hits, title=f"“{text}”")


def serve_cmd(
    index: Path = typer.Argument(..., help="Index folder from `vidseek index`."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port", help="TCP port (0: any free port)."),
    device: str = typer.Option("cpu", "--device"),
    workers: int = typer.Option(1, "--workers", help="Server processes, each with its own read-only copy of the index."),
    max_batch: int = typer.Option(16, "--max-batch", help="Concurrent queries encoded together (1: no batching)."),
    batch_wait_ms: float = typer.Option(2.0, "--batch-wait-ms", help="How long a query waits for others to batch with."),
    milvus_uri: Optional[str] = typer.Option(None, "--milvus-uri", help=SERVE_MILVUS_URI_HELP),
) -> None:
    """Serve the search API and web page (http://HOST:PORT/, API docs at /docs)."""
    from vidseek.search.batching import BatchSettings
    from vidseek.serve.workers import run_server

    settings = BatchSettings(max_batch, batch_wait_ms)  # validates both
    batching = settings if settings.max_batch > 1 else None
    run_server(index, host, port, workers=workers, device=device, batching=batching, milvus_uri=milvus_uri,
               announce=lambda url: typer.echo(f"vidseek: serving {index} at {url} (API docs at /docs)"))


def demo_cmd(
    no_serve: bool = typer.Option(False, "--no-serve", help="Stop after the example queries."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Work folder (default ~/.cache/vidseek/demo)."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port", help="TCP port (0: any free port)."),
) -> None:
    """Synthetic videos → train a tiny model → index → example queries → web UI, in minutes on a CPU."""
    from vidseek.search.demo import run_demo
    from vidseek.serve.server import check_port

    if not no_serve:
        check_port(port)  # before minutes of work
    result = run_demo(cache=cache)
    if no_serve:
        return
    from vidseek.serve.app import create_app
    from vidseek.serve.server import serve

    serve(lambda: create_app(result.index_dir), host, port,
          lambda url: typer.echo(f"[demo] open {url} (Ctrl-C to stop)"))


def register(cli: typer.Typer) -> None:
    cli.command("index", cls=RayCommand)(index_cmd)
    cli.command("search")(search_cmd)
    cli.command("serve")(serve_cmd)
    cli.command("demo")(demo_cmd)
