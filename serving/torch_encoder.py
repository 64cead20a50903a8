"""Query encoder backed by the PyTorch query tower (serving without an ONNX export)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from towerline.artifacts import read_manifest
from towerline.encoder import Tower
from towerline.tower_spec import QUERY_DIR, QUERY_TOWER_KINDS


class TorchQueryEncoder:
    def __init__(self, tower: Tower, embedding_space: str, name: str, batch_size: int = 32) -> None:
        self.tower = tower.eval()
        self.embedding_space = embedding_space
        self.name = name
        self.batch_size = batch_size
        # RPC worker threads share one tower: the fast tokenizer refuses concurrent reconfiguration
        # ("Already borrowed") and torch already spreads one forward pass over its intra-op threads.
        self._lock = threading.Lock()

    @classmethod
    def from_dual_encoder(cls, path: Path, threads: int | None = None) -> TorchQueryEncoder:
        """Load the query tower of a dual encoder or distilled student; `threads` sets torch's intra-op pool."""
        manifest = read_manifest(path, QUERY_TOWER_KINDS)
        if threads is not None:
            torch.set_num_threads(threads)
        tower = Tower.load(Path(path) / QUERY_DIR)
        name = f"torch:{Path(path).name}:{manifest.fingerprint[:12]}"
        return cls(tower, manifest.metadata["embedding_space"], name)

    @property
    def dim(self) -> int:
        return self.tower.dim

    def encode(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            return self.tower.encode(texts, batch_size=self.batch_size)
