"""Tower directories that also load with `SentenceTransformer(path)`, so users can evaluate our
towers with their own tools (MTEB, sentence-transformers evaluators).

The sentence-transformers files (modules.json, pooling and normalise configs, the prefix as the
default prompt) are written by the library itself around the saved Hugging Face model, so they
follow whatever format the installed version reads.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from towerline.tower_spec import TowerSpec

if TYPE_CHECKING:
    import torch

POOLING_MODES = {"mean": "mean", "cls": "cls", "last_token": "lasttoken"}


def write_sentence_transformers_files(
    directory: Path, spec: TowerSpec, projection: dict[str, torch.Tensor] | None = None
) -> None:
    """`directory` already holds the HF model and tokenizer; add what SentenceTransformer needs
    (a linear `Dense` module for a projection)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer

    logging.getLogger("sentence_transformers").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformer = Transformer(str(directory), max_seq_length=spec.max_length)
        width = transformer.get_embedding_dimension()
        modules = [transformer, Pooling(width, POOLING_MODES[spec.pooling])]
        if projection is not None:
            modules.append(Dense(width, projection["weight"].shape[0], activation_function=torch.nn.Identity(),
                                 init_weight=projection["weight"], init_bias=projection["bias"]))
        if spec.normalize:
            modules.append(Normalize())
        prompts = {"query": spec.prefix} if spec.prefix else None
        model = SentenceTransformer(modules=modules, prompts=prompts, default_prompt_name="query" if prompts else None,
                                    device="cpu")
        model.save(str(directory))
