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

from towerline.tower_spec import TowerSpec

POOLING_MODES = {"mean": "mean", "cls": "cls", "last_token": "lasttoken"}


def write_sentence_transformers_files(directory: Path, spec: TowerSpec) -> None:
    """`directory` already holds the HF model and tokenizer; add what SentenceTransformer needs."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    logging.getLogger("sentence_transformers").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformer = Transformer(str(directory), max_seq_length=spec.max_length)
        modules = [transformer, Pooling(transformer.get_embedding_dimension(), POOLING_MODES[spec.pooling])]
        if spec.normalize:
            modules.append(Normalize())
        prompts = {"query": spec.prefix} if spec.prefix else None
        model = SentenceTransformer(modules=modules, prompts=prompts, default_prompt_name="query" if prompts else None,
                                    device="cpu")
        model.save(str(directory))
