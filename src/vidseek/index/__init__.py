"""Indexes for the recall stage: dense ANN (FAISS / Milvus) and the semantic-ID trie."""
from vidseek.index.dense import (
    DenseIndex,
    FaissDenseIndex,
    build_dense_index,
    choose_index_type,
    load_dense_index,
)
from vidseek.index.milvus import MilvusDenseIndex  # pymilvus itself is imported only on use

__all__ = [
    "DenseIndex",
    "FaissDenseIndex",
    "MilvusDenseIndex",
    "build_dense_index",
    "choose_index_type",
    "load_dense_index",
]
