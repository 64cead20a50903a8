"""Shared fixtures: a tiny synthetic BEIR dataset and a tiny random BERT built in code."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from towerline.config import TowerlineConfig, load_config
from towerline.synthetic import vocabulary, write_synthetic_beir

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_tiny_backbone(directory: Path, extra_words: list[str]) -> Path:
    """A 2-layer, 32-wide BERT with a word-level vocab: random weights, real code paths."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [f"##{chr(c)}" for c in range(97, 123)]
    vocab = specials + sorted(set(extra_words)) + letters + [str(d) for d in range(10)]
    # transformers 5 takes the vocab itself (a `vocab_file=` keyword is silently ignored).
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_tiny_decoder(directory: Path, extra_words: list[str], causal_lm: bool = False) -> Path:
    """A 2-layer, 32-wide Llama with a word-level tokenizer that has EOS and PAD: a decoder LLM in miniature
    (with its language-model head when `causal_lm`)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel, PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["<pad>", "<unk>", "<s>", "</s>", *sorted(set(extra_words))]
    word_level = Tokenizer(models.WordLevel({token: i for i, token in enumerate(vocab)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    torch.manual_seed(0)
    (LlamaForCausalLM if causal_lm else LlamaModel)(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_beir(tmp_path_factory.mktemp("beir") / "tiny", docs=80, queries=40)


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    words = [word for topic in vocabulary(0) for word in topic]
    return build_tiny_backbone(tmp_path_factory.mktemp("models") / "tiny-bert", words)


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    words = [word for topic in vocabulary(0) for word in topic]
    return build_tiny_decoder(tmp_path_factory.mktemp("models") / "tiny-llama", words)


@pytest.fixture()
def tiny_overrides(tmp_path: Path, tiny_dataset: Path, tiny_backbone: Path) -> list[str]:
    """Command-line overrides for fast runs on the tiny dataset, with MLflow in a sqlite file under tmp_path."""
    return [
        f"run_dir={tmp_path / 'runs'}",
        f"data.dir={tiny_dataset}",
        f"encoder.backbone={tiny_backbone}",
        "encoder.max_query_length=16",
        "encoder.max_doc_length=48",
        "spark.master=local[1]",
        "spark.shuffle_partitions=2",
        "spark.keep_session=true",  # one driver JVM for the whole test session (see the spark fixture)
        "train.batch_size=8",
        "train.epochs=1",
        "train.learning_rate=1e-3",
        "train.dev_queries=0",
        "eval.top_k=20",
        "distill.student=layers:1",
        "distill.batch_size=8",
        "distill.dev_queries=5",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]


@pytest.fixture()
def tiny_config(tiny_overrides: list[str]) -> TowerlineConfig:
    return load_config(None, tiny_overrides)


@pytest.fixture(autouse=True, scope="session")
def _isolated_mlflow(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Runs that do not set tracking.uri still never touch the working directory's mlflow.db."""
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


SPARK_TEST_OVERRIDES = ["spark.master=local[1]", "spark.shuffle_partitions=2", "spark.keep_session=true"]


@pytest.fixture(scope="session")
def spark() -> Iterator[SparkSession]:
    """One local Spark session for every test: a driver JVM start costs ~20 s on the 2-core machine.
    Commands run with spark.keep_session=true leave it running; it stops when the tests end."""
    from pipelines.spark import spark_session

    session = spark_session(load_config(None, SPARK_TEST_OVERRIDES).spark, "towerline-tests")
    yield session
    session.stop()
