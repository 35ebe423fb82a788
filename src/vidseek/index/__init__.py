"""Indexes for the recall stage: dense ANN (FAISS / Milvus) and the semantic-ID trie."""
from vidseek.index.backends import build_dense_index, load_dense_index
from vidseek.index.dense import DenseIndex, FaissDenseIndex, choose_index_type
from vidseek.index.milvus import MilvusDenseIndex  # pymilvus itself is imported only on use

__all__ = [
    "DenseIndex",
    "FaissDenseIndex",
    "MilvusDenseIndex",
    "build_dense_index",
    "choose_index_type",
    "load_dense_index",
]
