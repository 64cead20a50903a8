"""The contract a query encoder fulfils for serving (Torch tower, ONNX Runtime session, ...)."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class QueryEncoder(Protocol):
    # Fingerprint of the doc tower this encoder's queries are comparable with.
    embedding_space: str
    name: str

    def encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32, L2-normalised, rows in input order."""
        ...
