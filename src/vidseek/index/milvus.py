"""Milvus backend of the dense index (DESIGN.md user 3: "the index in Milvus, the same CLI and API").

One `pymilvus.MilvusClient(uri)` talks to either
  * milvus-lite: ``uri`` is a local path such as ``<index folder>/dense.db``; pymilvus starts an
    embedded server process on it (the data lives in that path), or
  * a Milvus server / cluster: ``uri = "http://host:19530"``.

The collection has an INT64 primary key ``id`` (the caller's id) and a FLOAT_VECTOR ``vector``;
the metric is IP (vectors are L2-normalised, so IP = cosine and scores match the FAISS backend).
Index types: ``"flat"`` (exact, FLAT) or ``"autoindex"`` (the server picks its ANN index);
``"auto"`` maps `choose_index_type`'s "flat" to FLAT and anything larger to AUTOINDEX.
Consistency is Strong, so a search sees every completed add / remove.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

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


def is_server_uri(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "tcp://", "grpc://"))


class MilvusDenseIndex:
    """`DenseIndex` over a Milvus collection (see the module docstring)."""

    backend = "milvus"

    def __init__(self, dim: int, *, uri: str, collection: str = "vidseek", index_type: str = "auto",
                 expected_count: int | None = None, memory_budget_bytes: int = 4 << 30,
                 create: bool = True) -> None:
        if dim < 1:
            raise ConfigError(f"dense index dimension must be ≥ 1, got {dim}")
        self.dim = int(dim)
        self.uri = uri if is_server_uri(uri) else str(Path(uri).expanduser().resolve())
        self.collection = collection
        self.index_type = self._resolve_index_type(index_type, expected_count, memory_budget_bytes)
        self._client = self._connect()
        if self._client.has_collection(collection):
            self._check_existing_dimension()
        elif create:
            self._create_collection()
        else:
            raise SearchIndexError(f"Milvus collection {collection!r} is missing at {self.uri}; rebuild the index")

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
            where = "start milvus-lite on" if not is_server_uri(self.uri) else "connect to Milvus at"
            raise SearchIndexError(f"cannot {where} {self.uri} ({type(err).__name__}: {err}); "
                                   f"check the path / server address and that milvus-lite is installed") from err

    def _create_collection(self) -> None:
        from pymilvus import DataType

        schema = self._client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(ID_FIELD, DataType.INT64, is_primary=True)
        schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=self.dim)
        index_params = self._client.prepare_index_params()
        index_params.add_index(field_name=VECTOR_FIELD, index_type=MILVUS_INDEX_TYPES[self.index_type], metric_type="IP")
        self._client.create_collection(self.collection, schema=schema, index_params=index_params,
                                       consistency_level="Strong")

    def _check_existing_dimension(self) -> None:
        fields = self._client.describe_collection(self.collection)["fields"]
        vector_dims = [int(field["params"]["dim"]) for field in fields if field["name"] == VECTOR_FIELD]
        if vector_dims != [self.dim]:
            raise SearchIndexError(
                f"dimension mismatch: Milvus collection {self.collection!r} at {self.uri} holds "
                f"{vector_dims[0] if vector_dims else 'no'}-d vectors, not {self.dim}-d; "
                f"use another collection name or drop it"
            )

    # -- DenseIndex --------------------------------------------------------------------------
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Upsert: an id already present is replaced (within one call the last row wins)."""
        ids = as_id_array(ids)
        vectors = as_vector_array(vectors, self.dim)
        if ids.size != vectors.shape[0]:
            raise SearchIndexError(f"add() got {ids.size} ids for {vectors.shape[0]} vectors; pass one id per vector")
        ids, vectors = last_occurrences(ids, vectors)
        for start in range(0, ids.size, ROWS_PER_REQUEST):
            rows = [{ID_FIELD: int(key), VECTOR_FIELD: vector.tolist()}
                    for key, vector in zip(ids[start:start + ROWS_PER_REQUEST], vectors[start:start + ROWS_PER_REQUEST])]
            self._client.upsert(self.collection, rows)

    def remove(self, ids: np.ndarray) -> int:
        """Delete the ids that exist; returns how many (Milvus's own delete count echoes the request)."""
        ids = np.unique(as_id_array(ids))
        removed = 0
        for start in range(0, ids.size, IDS_PER_FILTER):
            chunk = ids[start:start + IDS_PER_FILTER]
            present = self._client.query(self.collection, filter=f"{ID_FIELD} in {chunk.tolist()}",
                                         output_fields=[ID_FIELD])
            present_ids = [int(row[ID_FIELD]) for row in present]
            if present_ids:
                self._client.delete(self.collection, ids=present_ids)
                removed += len(present_ids)
        return removed

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: scores float32 [Q, k] best first, ids int64 [Q, k] (-1 / -inf pad)."""
        queries = as_vector_array(queries, self.dim, what="queries")
        k = check_k(k)
        scores, ids = empty_results(queries.shape[0], k)
        if queries.shape[0] == 0:
            return scores, ids
        hits_per_query = self._client.search(self.collection, data=queries.tolist(), limit=k,
                                             search_params={"metric_type": "IP"}, output_fields=[ID_FIELD])
        for row, hits in enumerate(hits_per_query):
            for column, hit in enumerate(hits[:k]):
                ids[row, column] = int(hit["id"])
                scores[row, column] = float(hit["distance"])
        return scores, ids

    def __len__(self) -> int:
        result = self._client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(result[0]["count(*)"])

    def save(self, folder: str | Path) -> None:
        """Flush the collection and write ``folder/dense.json`` (atomically) naming uri + collection.

        A milvus-lite path inside `folder` is stored relative to it, so the folder can be moved.
        """
        folder = Path(folder).resolve()
        self._client.flush(self.collection)
        uri = self.uri
        if not is_server_uri(uri) and Path(uri).is_relative_to(folder):
            uri = str(Path(uri).relative_to(folder))
        atomic_write_json(folder / DENSE_META_FILE, {
            "format": DENSE_FORMAT, "version": DENSE_FORMAT_VERSION, "backend": self.backend,
            "dim": self.dim, "index_type": self.index_type, "uri": uri, "collection": self.collection,
            "metric": "IP", "count": len(self),
        })

    def close(self) -> None:
        """Release the client (for milvus-lite this stops the embedded server once no client uses it)."""
        self._client.close()

    @classmethod
    def load(cls, folder: str | Path, meta: dict[str, Any]) -> "MilvusDenseIndex":
        """Reopen the collection named in dense.json (called by `load_dense_index`)."""
        uri = str(meta["uri"])
        if not is_server_uri(uri) and not Path(uri).is_absolute():
            uri = str(Path(folder).resolve() / uri)
        if not is_server_uri(uri) and not Path(uri).exists():
            raise SearchIndexError(f"milvus-lite data {uri} named by {Path(folder) / DENSE_META_FILE} is missing; rebuild the index")
        return cls(int(meta["dim"]), uri=uri, collection=str(meta["collection"]),
                   index_type=str(meta["index_type"]), create=False)
