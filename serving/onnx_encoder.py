"""ONNX Runtime query encoder used by the gRPC service (CUDA EP when present, else CPU)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from serving.onnx_format import ONNX_FILE, ONNX_KIND
from towerline.artifacts import Manifest, read_manifest
from towerline.tower_spec import load_tower_spec, tokenize_texts


class OnnxQueryEncoder:
    def __init__(self, path: Path, intra_op_threads: int = 1) -> None:
        import onnxruntime as ort

        self.manifest: Manifest = read_manifest(path, ONNX_KIND, verify=True)
        self.embedding_space: str = self.manifest.metadata["embedding_space"]
        self.name = f"onnx:{Path(path).name}:{self.manifest.fingerprint[:12]}"
        self.spec = load_tower_spec(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        options = ort.SessionOptions()
        # Thread count is explicit: on small machines oversubscription costs more than it gains.
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort.InferenceSession(str(Path(path) / ONNX_FILE), options, providers=providers)
        self.provider = self.session.get_providers()[0]
        # Fast tokenizers are not safe to call from several threads at once ("Already borrowed");
        # ORT's session.run is, so only tokenisation is serialised.
        self._tokenizer_lock = threading.Lock()

    @property
    def dim(self) -> int:
        return int(self.manifest.metadata["dim"])

    def encode(self, texts: list[str]) -> np.ndarray:
        with self._tokenizer_lock:
            feeds = tokenize_texts(self.tokenizer, texts, self.spec)
        (embeddings,) = self.session.run(["embeddings"], feeds)
        return embeddings.astype(np.float32, copy=False)
