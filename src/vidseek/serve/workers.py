"""`vidseek serve --workers N`: N server processes over one index folder, read-only.

uvicorn starts N worker processes that share one listening socket (the kernel hands each new
connection to one of them). A worker cannot inherit an app object, so each imports this module
and calls `app_from_env()`, which opens its OWN `Searcher` on the index folder named in
`SERVE_SETTINGS_ENV`: its own recall model, dense index and SQLite connections (N workers hold
N copies in memory). Workers only read the index; the one file they write is the thumbnail
cache, atomically, so two workers making the same poster is harmless. Every response says which
process answered (`X-Vidseek-Worker: <pid>`).

Several hosts behind a load balancer are the same picture one level up: each host runs
`vidseek serve` on a copy of the index folder, or on one folder whose recall index lives in a
shared Milvus server (`vidseek index --backend milvus --milvus-uri http://…`; a host that reaches
that server at another address serves with `--milvus-uri` set to its own address).
"""
from __future__ import annotations

import inspect
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from vidseek.errors import ConfigError
from vidseek.search.batching import BatchSettings

SERVE_SETTINGS_ENV = "VIDSEEK_SERVE_SETTINGS"
WORKER_HEADER = "X-Vidseek-Worker"


def run_server(index: str | Path, host: str, port: int, *, workers: int = 1, device: str = "cpu",
               batching: BatchSettings | None = None, milvus_uri: str | None = None,
               announce: Callable[[str], None] = print) -> None:
    """Serve `index` on host:port with `workers` processes (1: this process), with the bounds of
    `vidseek.serve.server` (port bound first: a busy port is one line, before anything is announced)."""
    from uvicorn import Server
    from uvicorn.supervisors import Multiprocess

    from vidseek.search.indexer import read_index_json
    from vidseek.serve.server import bind, serve, server_config, shown_url

    if workers < 1:
        raise ConfigError(f"--workers must be at least 1 (got {workers})")
    if workers == 1:
        from vidseek.serve.app import create_app

        serve(lambda: create_app(index, device=device, batching=batching, milvus_uri=milvus_uri), host, port, announce)
        return
    read_index_json(index)  # a missing or broken index is one clear error here, not N worker crashes
    sock = bind(host, port)
    settings = {"index": str(Path(index).absolute()), "device": device, "milvus_uri": milvus_uri,
                "batching": None if batching is None else asdict(batching),
                "threads": threads_per_worker(workers, os.cpu_count(), os.environ)}
    os.environ[SERVE_SETTINGS_ENV] = json.dumps(settings)  # the workers inherit the environment
    config = server_config(f"{__name__}:app_from_env", factory=True, workers=workers)
    announce(shown_url(host, sock))
    # uvicorn < 0.30 takes the worker's entry point; later versions build a Server per worker themselves.
    takes_target = "target" in inspect.signature(Multiprocess.__init__).parameters
    supervisor = Multiprocess(config, target=Server(config).run, sockets=[sock]) if takes_target \
        else Multiprocess(config, sockets=[sock])
    supervisor.run()


def threads_per_worker(workers: int, cpu_count: int | None, environ: Any) -> int | None:
    """Torch threads for each of `workers` processes: the cores split between them, so N workers
    do not each spin up a thread per core (on a busy machine an OpenMP thread waiting for a core
    that another worker holds made a query ~10x slower). None when the user chose
    (OMP_NUM_THREADS set): their choice stands."""
    if environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, (cpu_count or 1) // workers)


def app_from_env() -> Any:
    """uvicorn's app factory in each worker process: the app over the index in `SERVE_SETTINGS_ENV`."""
    from vidseek.serve.app import create_app

    text = os.environ.get(SERVE_SETTINGS_ENV)
    if not text:
        raise ConfigError(f"{SERVE_SETTINGS_ENV} is not set: start workers with `vidseek serve INDEX --workers N`")
    settings = json.loads(text)
    if settings.get("threads"):
        import torch

        torch.set_num_threads(int(settings["threads"]))
    batching = None if settings["batching"] is None else BatchSettings(**settings["batching"])
    app = create_app(settings["index"], device=settings["device"], batching=batching, milvus_uri=settings["milvus_uri"])
    worker = str(os.getpid())

    @app.middleware("http")
    async def name_the_worker(request: Any, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers[WORKER_HEADER] = worker
        return response

    return app
