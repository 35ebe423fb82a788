"""Search hits as a terminal table (used by `vidseek search` and the demo)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from vidseek.search.searcher import Hit


def print_hits(hits: Sequence[Hit], title: str, show_path: bool = True) -> None:
    """A rich table of hits: rank, video, window, final/recall/rerank scores (and the file)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    columns = ["#", "video", "window (s)", "score", "recall", "rerank"] + (["file"] if show_path else [])
    for column in columns:
        table.add_column(column, overflow="fold")
    for rank, hit in enumerate(hits, 1):
        end = "?" if hit.end is None else f"{hit.end:.1f}"
        rerank = "–" if hit.rerank_score is None else f"{hit.rerank_score:.4f}"
        cells = [str(rank), hit.video_id, f"{hit.start:.1f}–{end}", f"{hit.score:.4f}", f"{hit.recall_score:.4f}", rerank]
        table.add_row(*cells, *([hit.path] if show_path else []))
    Console().print(table)
