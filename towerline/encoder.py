"""The one tower class: transformers backbone → pooling → L2 normalisation.

A tower directory holds a plain Hugging Face model + tokenizer and `tower.json` (pooling,
prefix, max length). Query and doc towers are two such directories inside a dual-encoder
artifact; ONNX export and distillation read the same format. The spec and the tokenisation live
in `towerline/tower_spec.py`, which the torch-free serving path shares.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from towerline.backbones import resolve_backbone
from towerline.tower_spec import PROJECTION_FILE, TOWER_FILE, Pooling, TowerSpec, tokenize_texts

# Our own rich bars report progress; transformers' per-load tqdm bars are noise in logs.
hf_logging.disable_progress_bar()

__all__ = ["Tower", "TowerSpec", "pool", "resolve_backbone"]


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last_token":
        # The highest position holding a real token: right for left and right padding alike.
        positions = torch.arange(attention_mask.size(1), device=hidden.device)
        last = (attention_mask.long() * positions).argmax(dim=1)
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class Tower(torch.nn.Module):
    def __init__(
        self,
        backbone: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        spec: TowerSpec,
        projection: torch.nn.Linear | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.spec = spec
        self.projection = projection

    @classmethod
    def from_backbone(cls, name_or_path: str, spec: TowerSpec, **model_overrides: object) -> Tower:
        """`model_overrides` change the config at load (e.g. num_hidden_layers=3 keeps the lower layers)."""
        directory = resolve_backbone(name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        backbone = AutoModel.from_pretrained(directory, **model_overrides)
        if spec.pooling == "last_token" and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        projection = None
        if spec.projection_dim is not None:
            projection = torch.nn.Linear(int(backbone.config.hidden_size), spec.projection_dim)
        return cls(backbone, tokenizer, spec, projection)

    @classmethod
    def load(cls, directory: Path) -> Tower:
        spec = TowerSpec.model_validate_json((Path(directory) / TOWER_FILE).read_text())
        tower = cls(AutoModel.from_pretrained(directory), AutoTokenizer.from_pretrained(directory), spec)
        if spec.projection_dim is not None:
            weights = load_file(Path(directory) / PROJECTION_FILE)
            tower.projection = torch.nn.Linear(weights["weight"].shape[1], spec.projection_dim)
            tower.projection.load_state_dict(weights)
        return tower

    def save(self, directory: Path) -> None:
        """HF model + tokenizer + tower.json (+ projection); also loadable with `SentenceTransformer(directory)`."""
        from towerline.st_format import write_sentence_transformers_files

        directory.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        projection = None
        if self.projection is not None:
            state = self.projection.state_dict()
            projection = {name: tensor.detach().contiguous().cpu() for name, tensor in state.items()}
            save_file(projection, directory / PROJECTION_FILE)
        write_sentence_transformers_files(directory, self.spec, projection)
        (directory / TOWER_FILE).write_text(self.spec.model_dump_json(indent=2))

    @property
    def dim(self) -> int:
        if self.projection is not None:
            return int(self.projection.out_features)
        return int(self.backbone.config.hidden_size)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        arrays = tokenize_texts(self.tokenizer, texts, self.spec)
        return {name: torch.from_numpy(array) for name, array in arrays.items()}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.spec.pooling == "last_token":
            # Decoder LLMs number positions from the first real token, so left padding must not shift them.
            inputs["position_ids"] = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        hidden = self.backbone(**inputs).last_hidden_state
        pooled = pool(hidden, attention_mask, self.spec.pooling)
        if self.projection is not None:
            pooled = self.projection(pooled)
        return F.normalize(pooled, dim=-1) if self.spec.normalize else pooled

    @torch.inference_mode()
    def encode(
        self,
        texts: list[str],
        batch_size: int = 64,
        on_batch: Callable[[int], None] | None = None,
        bf16: bool = False,
    ) -> np.ndarray:
        """Embed texts in length-sorted batches (less padding); rows come back in input order.
        `bf16` runs the backbone under bf16 autocast (about 2x faster on CPUs with AVX512-BF16 or AMX)."""
        was_training = self.training
        self.eval()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        embeddings = np.zeros((len(texts), self.dim), dtype=np.float32)
        device = next(self.backbone.parameters()).device
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = {name: tensor.to(device) for name, tensor in self.tokenize([texts[i] for i in chunk]).items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                embeddings[chunk] = self(**batch).float().cpu().numpy()
            if on_batch:
                on_batch(len(chunk))
        self.train(was_training)
        return embeddings
