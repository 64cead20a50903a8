"""What a tower is, without torch: its spec, its artifact layout, and how it turns texts into tokens.

The PyTorch tower (`towerline/encoder.py`) and the ONNX Runtime query encoder in the serving path
share this module, so both prepare texts identically and the service never imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel
from transformers import PreTrainedTokenizerBase

from towerline.templates import DEFAULT_DOC_TEMPLATE

TOWER_FILE = "tower.json"
PROJECTION_FILE = "projection.safetensors"
DUAL_ENCODER_KIND = "dual-encoder"
# A query tower alone (a distilled student) that searches the index of the dual encoder it came from.
QUERY_ENCODER_KIND = "query-encoder"
# Artifacts with a `query/` tower and an `embedding_space`: what export and serving accept.
QUERY_TOWER_KINDS = (DUAL_ENCODER_KIND, QUERY_ENCODER_KIND)
QUERY_DIR = "query"
DOC_DIR = "doc"
Pooling = Literal["mean", "cls", "last_token"]


class TowerSpec(BaseModel):
    pooling: Pooling = "mean"
    prefix: str = ""
    max_length: int = 256
    normalize: bool = True
    # A linear map after pooling to this width (a distilled student narrower than its teacher).
    projection_dim: int | None = None
    # Doc towers: how a document's title and text are joined (towerline.templates).
    document_template: str = DEFAULT_DOC_TEMPLATE


def load_tower_spec(directory: Path) -> TowerSpec:
    path = Path(directory) / TOWER_FILE
    return TowerSpec.model_validate(json.loads(path.read_text()))


def tokenize_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str], spec: TowerSpec) -> dict[str, np.ndarray]:
    """int64 `input_ids` and `attention_mask`: prefix, truncation, padding on the tokenizer's side.

    For last-token pooling the EOS token is appended *after* truncation: decoder LLMs summarise
    the sequence in that position, so a text longer than `max_length` must keep it too.
    """
    prefixed = [spec.prefix + text for text in texts]
    eos = tokenizer.eos_token_id
    if spec.pooling != "last_token" or eos is None:
        batch = tokenizer(prefixed, padding=True, truncation=True, max_length=spec.max_length, return_tensors="np")
        return {name: batch[name].astype(np.int64) for name in ("input_ids", "attention_mask")}
    rows = tokenizer(prefixed, truncation=True, max_length=spec.max_length - 1)["input_ids"]
    return _pad([row if row and row[-1] == eos else [*row, eos] for row in rows],
                pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
                left=tokenizer.padding_side == "left")


def _pad(rows: list[list[int]], pad_id: int, left: bool) -> dict[str, np.ndarray]:
    width = max((len(row) for row in rows), default=0)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        input_ids[i, span] = row
        attention_mask[i, span] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
