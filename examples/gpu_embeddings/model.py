"""A stand-in for a sentence-embedding model that needs no weights to download.

Words are hashed into a fixed random table (seeded, so every container has the same
model), mean-pooled and L2-normalised. With torch installed it runs on the container's
GPU (``cuda:0``: the one device ``CUDA_VISIBLE_DEVICES`` shows it); without torch, or
on a simulated GPU node, the same numbers come from plain Python on the CPU.
"""

from __future__ import annotations

import functools
import math
import random
import threading
import zlib
from typing import Any

VOCABULARY = 4096
DIMENSIONS = 64


class HashingEmbedder:
    """``encode(texts)`` -> one unit vector of :data:`DIMENSIONS` floats per text."""

    def __init__(self) -> None:
        # torch is imported here, never when the app module is imported: containers are
        # forked from a process that imported the app, and CUDA must not start before.
        self.torch: Any = None
        try:
            import torch
        except ImportError:
            self.device = "cpu (torch is not installed)"
            return
        if not torch.cuda.is_available():
            self.device = "cpu (torch sees no CUDA device)"
            return
        self.torch = torch
        self.device = f"cuda:0 ({torch.cuda.get_device_name(0)})"
        rows = [_table_row(word) for word in range(VOCABULARY)]
        self.table = torch.tensor(rows, device="cuda:0")

    def encode(self, texts: list[str]) -> list[list[float]]:
        ids = [[_bucket(word) for word in text.lower().split()] or [0] for text in texts]
        if self.torch is None:
            return [_normalise(_mean([_table_row(i) for i in bag])) for bag in ids]
        torch = self.torch
        flat = torch.tensor([i for bag in ids for i in bag], device="cuda:0")
        offsets = torch.tensor([0, *_running_sum(len(bag) for bag in ids)][:-1], device="cuda:0")
        pooled = torch.nn.functional.embedding_bag(flat, self.table, offsets, mode="mean")
        return list(torch.nn.functional.normalize(pooled, dim=1).cpu().tolist())


_model: HashingEmbedder | None = None
_model_lock = threading.Lock()


def model() -> HashingEmbedder:
    """The container's model, loaded by its first input (its inputs run on threads)."""
    global _model
    with _model_lock:
        if _model is None:
            _model = HashingEmbedder()
        return _model


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _bucket(word: str) -> int:
    return zlib.crc32(word.encode()) % VOCABULARY


@functools.lru_cache(maxsize=VOCABULARY)
def _table_row(bucket: int) -> list[float]:
    rng = random.Random(bucket)
    return [rng.gauss(0.0, 1.0) for _ in range(DIMENSIONS)]


def _mean(rows: list[list[float]]) -> list[float]:
    return [sum(column) / len(rows) for column in zip(*rows, strict=True)]


def _normalise(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def _running_sum(values: Any) -> list[int]:
    total, out = 0, []
    for value in values:
        total += value
        out.append(total)
    return out
