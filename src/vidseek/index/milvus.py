"""Milvus backend of the dense index (DESIGN.md user 3: "the index in Milvus, the same CLI and API").

One `pymilvus.MilvusClient(uri)` talks to either
  * milvus-lite: ``uri`` is a local path such as ``<index folder>/dense.db``; pymilvus starts an
    embedded server process on it (the data lives in that path), or
  * a Milvus server / cluster: ``uri = "http://host:19530"``.

**One collection per index.** Its name comes from the caller (``--milvus-collection``) or is
derived from the index folder's name plus a random suffix, and is recorded in ``dense.json``. The
collection carries the index's owner token as a collection property (`OWNER_PROPERTY`, with the
folder in `FOLDER_PROPERTY` for messages); an index opens only a collection holding its own token,
and a new index never attaches to an existing collection, so two indexes on one server cannot
overwrite or delete each other's vectors. When the index folder is known, ``dense.json`` is written
*before* the collection is created, so an interrupted first build finds and resumes its collection.

The collection has an INT64 primary key ``id`` (the caller's id) and a FLOAT_VECTOR ``vector``;
the metric is IP (vectors are L2-normalised, so IP = cosine and scores match the FAISS backend).
Index types: ``"flat"`` (exact, FLAT) or ``"autoindex"`` (the server picks its ANN index);
``"auto"`` maps `choose_index_type`'s "flat" to FLAT and anything larger to AUTOINDEX.

**One server, several addresses.** ``dense.json`` records the URI the index was built with, but
the same server may be reached at another address from elsewhere (another host, a container, a
tunnel, a moved milvus-lite file): `load` takes that address (``--milvus-uri`` of search / serve /
index) and connects there, while ``dense.json`` — which the index's manifest covers — keeps the
recorded URI; editing it would make every later open refuse the index as damaged. The
collection's owner token still guards against reaching a different server's collection.

**Consistency.** Searches run at Bounded consistency (a few seconds of staleness allowed, no
wait for the newest timestamp: measured ≈ 2 ms against ≈ 200 ms at Strong). Read-your-writes is
kept without paying Strong on every query: the first search after this client's own add / remove
runs at Strong, which makes the query node catch up past those writes; later Bounded searches
see them. (Session consistency would be the textbook choice, but pymilvus's MilvusClient does not
record its writes' timestamps, so Session degrades to Eventually — measured: a deleted id still
returned.) Id look-ups on the write path run at Strong. The entry count is counted once (Strong)
on open and then kept locally, updated by add and remove, so `len()` costs no request. With
several query nodes a Bounded read on another replica may lag by the bounded window.
"""
from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vidseek.errors import ConfigError, SearchIndexError
from vidseek.index.dense import (
    DENSE_FORMAT,
    DENSE_FORMAT_VERSION,
    DENSE_META_FILE,
    as_id_array,
    as_vector_array,
    check_k,
    choose_index_type,
    empty_results,
    last_occurrences,
)
from vidseek.utils import atomic_write_json

MILVUS_INDEX_TYPES = {"flat": "FLAT", "autoindex": "AUTOINDEX"}
ID_FIELD = "id"
VECTOR_FIELD = "vector"
ROWS_PER_REQUEST = 2_000  # keeps one gRPC message (≈ 2k × 512 floats as JSON-ish lists) well under 64 MB
IDS_PER_FILTER = 1_000    # "id in [...]" filter expressions stay short
OWNER_PROPERTY = "vidseek.index_owner"
FOLDER_PROPERTY = "vidseek.index_folder"
READ_CONSISTENCY = "Bounded"
CATCH_UP_CONSISTENCY = "Strong"  # first search after our own writes; id look-ups on the write path
_COLLECTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
_NAME_STEM_CHARS = 40


def is_server_uri(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "tcp://", "grpc://"))


def check_collection_name(name: str) -> str:
    """Milvus's rule: a letter or underscore, then letters, digits, underscores; ≤ 255 characters."""
    if not _COLLECTION_NAME.match(name):
        raise ConfigError(f"invalid Milvus collection name {name!r}: use letters, digits and underscores, "
                          f"starting with a letter or underscore (at most 255 characters)")
    return name


def default_collection_name(folder: str | Path | None) -> str:
    """``vidseek_<index folder name>_<random>``: readable, and unique even for equal folder names.

    An index keeps its state in a subfolder (``IDX/recall``): the name then uses ``IDX``.
    """
    stem = ""
    if folder is not None:
        path = Path(folder).resolve()
        parts = [p for p in (path.parent.name, path.name) if p]
        stem = re.sub(r"[^A-Za-z0-9_]+", "_", "_".join(parts)).strip("_")[-_NAME_STEM_CHARS:]
    return f"vidseek_{stem + '_' if stem else ''}{secrets.token_hex(4)}"


def connection_error(uri: str, err: Exception, doing: str) -> SearchIndexError:
    """One line with the hint that fits the URI: a server address, or a milvus-lite file."""
    reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
    if is_server_uri(uri):
        return SearchIndexError(f"Milvus server at {uri} failed while {doing} ({reason}); check that the server "
                                f"is up and reachable at that address (e.g. `milvus-server --proxy-port PORT`)")
    return SearchIndexError(f"milvus-lite on {uri} failed while {doing} ({reason}); check that the path is "
                            f"writable and that milvus-lite is installed (pip install 'vidseek[milvus]')")


class MilvusDenseIndex:
    """`DenseIndex` over one Milvus collection that this index owns (see the module docstring)."""

    backend = "milvus"

    def __init__(self, dim: int, *, uri: str, collection: str | None = None, index_type: str = "auto",
                 expected_count: int | None = None, memory_budget_bytes: int = 4 << 30,
                 folder: str | Path | None = None) -> None:
        """A new index in a new collection (an existing collection is refused: see `load`)."""
        self._init_common(dim, uri, collection or default_collection_name(folder), secrets.token_hex(8))
        self.index_type = self._resolve_index_type(index_type, expected_count, memory_budget_bytes)
        self.folder = None if folder is None else Path(folder).resolve()
        if self._call("checking the collection", self._client.has_collection, self.collection):
            raise SearchIndexError(f"Milvus collection {self.collection!r} at {self.uri} already exists"
                                   f"{self._owned_by()}; an index needs a collection of its own: pass another "
                                   f"--milvus-collection (or drop that collection if nothing uses it)")
        if self.folder is not None:
            self.save(self.folder, flush=False)  # the claim: a resumed build reopens this collection
        self._create_collection()

    def _init_common(self, dim: int, uri: str, collection: str, owner: str) -> None:
        if dim < 1:
            raise ConfigError(f"dense index dimension must be ≥ 1, got {dim}")
        self.dim = int(dim)
        self.uri = uri if is_server_uri(uri) else str(Path(uri).expanduser().resolve())
        self.collection = check_collection_name(collection)
        self.owner = owner
        self.recorded_uri = self.uri  # what save() writes; `load` may connect elsewhere
        self.folder: Path | None = None
        self._count = 0
        self._wrote = False  # the next search must see this client's writes
        self._client = self._connect()

    # -- setup -------------------------------------------------------------------------------
    def _resolve_index_type(self, index_type: str, expected_count: int | None, memory_budget_bytes: int) -> str:
        text = str(index_type).strip().lower()
        if text == "auto":
            chosen = choose_index_type(expected_count or 0, self.dim, memory_budget_bytes)
            return "flat" if chosen == "flat" else "autoindex"
        if text not in MILVUS_INDEX_TYPES:
            raise ConfigError(f"unknown Milvus index type {index_type!r}: use 'auto', 'flat' or 'autoindex'")
        return text

    def _connect(self) -> Any:
        from pymilvus import MilvusClient

        if not is_server_uri(self.uri):
            Path(self.uri).parent.mkdir(parents=True, exist_ok=True)
        try:
            return MilvusClient(self.uri)
        except Exception as err:  # pymilvus raises several unrelated types for "cannot reach"
            raise connection_error(self.uri, err, "connecting") from err

    def _call(self, doing: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one client request; a failure becomes one SearchIndexError line with the right hint."""
        try:
            return method(*args, **kwargs)
        except Exception as err:  # MilvusException, grpc errors, connection resets …
            raise connection_error(self.uri, err, f"{doing} (collection {self.collection!r})") from err

    def _owner_properties(self) -> dict[str, str]:
        return {OWNER_PROPERTY: self.owner, FOLDER_PROPERTY: "" if self.folder is None else str(self.folder)}

    def _properties(self) -> dict[str, Any]:
        return dict(self._call("describing the collection", self._client.describe_collection,
                               self.collection).get("properties") or {})

    def _owned_by(self) -> str:
        """' (owned by the vidseek index at …)' for messages, from the collection's properties."""
        properties = self._properties()
        if OWNER_PROPERTY not in properties:
            return " (not made by a vidseek index)"
        return f" (owned by the vidseek index at {properties.get(FOLDER_PROPERTY) or 'an unknown folder'})"

    def _create_collection(self) -> None:
        from pymilvus import DataType

        schema = self._client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(ID_FIELD, DataType.INT64, is_primary=True)
        schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=self.dim)
        index_params = self._client.prepare_index_params()
        index_params.add_index(field_name=VECTOR_FIELD, index_type=MILVUS_INDEX_TYPES[self.index_type], metric_type="IP")
        self._call("creating the collection", self._client.create_collection, self.collection, schema=schema,
                   index_params=index_params, consistency_level=READ_CONSISTENCY)
        # Milvus 2.3 ignores properties passed to create_collection: set them explicitly.
        self._call("marking the collection's owner", self._client.alter_collection_properties, self.collection,
                   properties=self._owner_properties())

    def _check_owner(self) -> None:
        owner = self._properties().get(OWNER_PROPERTY)
        if owner is None:  # created by us, interrupted before it was marked: claim it now
            self._call("marking the collection's owner", self._client.alter_collection_properties,
                       self.collection, properties=self._owner_properties())
        elif owner != self.owner:
            raise SearchIndexError(f"Milvus collection {self.collection!r} at {self.uri} belongs to another index"
                                   f"{self._owned_by()}, not to this one; it was dropped and reused since this "
                                   f"index was built: rebuild this index (vidseek index … --milvus-collection NEW)")

    def _check_existing_dimension(self) -> None:
        fields = self._call("describing the collection", self._client.describe_collection, self.collection)["fields"]
        vector_dims = [int(field["params"]["dim"]) for field in fields if field["name"] == VECTOR_FIELD]
        if vector_dims != [self.dim]:
            raise SearchIndexError(
                f"dimension mismatch: Milvus collection {self.collection!r} at {self.uri} holds "
                f"{vector_dims[0] if vector_dims else 'no'}-d vectors, not {self.dim}-d; rebuild the index"
            )

    def _count_rows(self) -> int:
        result = self._call("counting entries", self._client.query, self.collection, filter="",
                            output_fields=["count(*)"], consistency_level=CATCH_UP_CONSISTENCY)
        return int(result[0]["count(*)"])

    # -- DenseIndex --------------------------------------------------------------------------
    def _present(self, ids: np.ndarray) -> set[int]:
        """Which of `ids` the collection holds (Strong: sees our own writes just made)."""
        found: set[int] = set()
        for start in range(0, ids.size, IDS_PER_FILTER):
            chunk = ids[start:start + IDS_PER_FILTER]
            rows = self._call("looking up ids", self._client.query, self.collection,
                              filter=f"{ID_FIELD} in {chunk.tolist()}", output_fields=[ID_FIELD],
                              consistency_level=CATCH_UP_CONSISTENCY)
            found.update(int(row[ID_FIELD]) for row in rows)
        return found

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Upsert: an id already present is replaced (within one call the last row wins)."""
        ids = as_id_array(ids)
        vectors = as_vector_array(vectors, self.dim)
        if ids.size != vectors.shape[0]:
            raise SearchIndexError(f"add() got {ids.size} ids for {vectors.shape[0]} vectors; pass one id per vector")
        ids, vectors = last_occurrences(ids, vectors)
        already = self._present(ids)
        for start in range(0, ids.size, ROWS_PER_REQUEST):
            rows = [{ID_FIELD: int(key), VECTOR_FIELD: vector.tolist()}
                    for key, vector in zip(ids[start:start + ROWS_PER_REQUEST], vectors[start:start + ROWS_PER_REQUEST])]
            self._call("adding vectors", self._client.upsert, self.collection, rows)
            self._wrote = True
        self._count += ids.size - len(already)

    def remove(self, ids: np.ndarray) -> int:
        """Delete the ids that exist; returns how many (Milvus's own delete count echoes the request)."""
        ids = np.unique(as_id_array(ids))
        present = sorted(self._present(ids))
        for start in range(0, len(present), IDS_PER_FILTER):
            self._call("removing vectors", self._client.delete, self.collection, ids=present[start:start + IDS_PER_FILTER])
            self._wrote = True
        self._count -= len(present)
        return len(present)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: scores float32 [Q, k] best first, ids int64 [Q, k] (-1 / -inf pad)."""
        queries = as_vector_array(queries, self.dim, what="queries")
        k = check_k(k)
        scores, ids = empty_results(queries.shape[0], k)
        if queries.shape[0] == 0:
            return scores, ids
        hits_per_query = self._call("searching", self._client.search, self.collection, data=queries.tolist(),
                                    limit=k, search_params={"metric_type": "IP"}, output_fields=[ID_FIELD],
                                    consistency_level=CATCH_UP_CONSISTENCY if self._wrote else READ_CONSISTENCY)
        self._wrote = False
        for row, hits in enumerate(hits_per_query):
            for column, hit in enumerate(hits[:k]):
                ids[row, column] = int(hit["id"])
                scores[row, column] = float(hit["distance"])
        return scores, ids

    def __len__(self) -> int:
        return self._count

    def save(self, folder: str | Path, flush: bool = True) -> None:
        """Flush the collection and write ``folder/dense.json`` (atomically) naming uri + collection + owner.

        A milvus-lite path inside `folder` is stored relative to it, so the folder can be moved.
        """
        folder = Path(folder).resolve()
        if flush:
            self._call("flushing", self._client.flush, self.collection)
        uri = self.recorded_uri
        if not is_server_uri(uri) and Path(uri).is_relative_to(folder):
            uri = str(Path(uri).relative_to(folder))
        atomic_write_json(folder / DENSE_META_FILE, {
            "format": DENSE_FORMAT, "version": DENSE_FORMAT_VERSION, "backend": self.backend,
            "dim": self.dim, "index_type": self.index_type, "uri": uri, "collection": self.collection,
            "owner": self.owner, "metric": "IP", "count": self._count,
        })

    def close(self) -> None:
        """Release the client's connection. (milvus-lite 3 keeps its in-process server, and its lock
        on the data path, until the process exits.)"""
        self._client.close()

    @classmethod
    def load(cls, folder: str | Path, meta: dict[str, Any], uri: str | None = None) -> "MilvusDenseIndex":
        """Reopen the collection named in dense.json (called by `load_dense_index`); refuse one that
        another index owns. A collection missing while dense.json counts no entries is an interrupted
        first build: it is created now. `uri`: reach the server there instead of at the recorded URI
        (dense.json is left as it is: see the module docstring)."""
        recorded = str(meta["uri"])
        if not is_server_uri(recorded) and not Path(recorded).is_absolute():
            recorded = str(Path(folder).resolve() / recorded)
        where = "" if uri is None else f" (reached through --milvus-uri {uri}; the index was built against {recorded})"
        uri = recorded if uri is None else uri
        if not is_server_uri(uri) and not Path(uri).exists() and int(meta.get("count", 0)) > 0:
            raise SearchIndexError(f"milvus-lite data {uri} named by {Path(folder) / DENSE_META_FILE} is missing{where}; "
                                   f"pass --milvus-uri with its new location, or rebuild the index")
        if "owner" not in meta:
            raise SearchIndexError(f"{Path(folder) / DENSE_META_FILE} predates collection ownership (no owner "
                                   f"recorded); rebuild the index so that it gets a collection of its own")
        index = cls.__new__(cls)
        index._init_common(int(meta["dim"]), uri, str(meta["collection"]), str(meta["owner"]))
        index.recorded_uri = recorded if is_server_uri(recorded) else str(Path(recorded).resolve())
        index.index_type = str(meta["index_type"])
        index.folder = Path(folder).resolve()
        if not index._call("checking the collection", index._client.has_collection, index.collection):
            if int(meta.get("count", 0)) > 0:
                raise SearchIndexError(f"Milvus collection {index.collection!r} is missing at {index.uri}{where}; "
                                       f"check that this is the server the index was built on, or rebuild the index")
            index._create_collection()
        index._check_owner()
        index._check_existing_dimension()
        # After a server restart the collection may still be (re)loading: wait for it here, once.
        index._call("loading the collection", index._client.load_collection, index.collection)
        index._count = index._count_rows()
        return index
