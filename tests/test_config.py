from pathlib import Path

import pytest

from towerline.config import load_config
from towerline.errors import ConfigError


def test_defaults_yaml_and_overrides_layer(tmp_path: Path) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text("train:\n  batch_size: 32\n  epochs: 2\n")
    config = load_config(config_file, ["train.epochs=3", "index.type=hnsw"])
    assert config.train.batch_size == 32
    assert config.train.epochs == 3
    assert config.index.type == "hnsw"
    assert config.train.learning_rate == 2e-5


def test_unknown_key_is_named(tmp_path: Path) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text("train:\n  lerning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lerning_rate'"):
        load_config(config_file)


def test_bad_value_is_named() -> None:
    with pytest.raises(ConfigError, match=r"config key 'train.batch_size'"):
        load_config(None, ["train.batch_size=-1"])
    with pytest.raises(ConfigError, match=r"config key 'index.type'"):
        load_config(None, ["index.type=btree"])


def test_malformed_override_and_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_doc_template_is_checked_at_the_edge() -> None:
    from towerline.templates import render_document

    config = load_config(None, ["encoder.doc_template=Title: {title} | Passage: {text}"])
    assert load_config(None, ["encoder.doc_template={title}: {text}"]).encoder.doc_template == "{title}: {text}"
    assert render_document(config.encoder.doc_template, "", "body") == "Title:  | Passage: body"
    with pytest.raises(ConfigError, match=r"encoder.doc_template.*only \{title\} and \{text\}"):
        load_config(None, ["encoder.doc_template={title} {abstract}"])
    with pytest.raises(ConfigError, match=r"encoder.doc_template.*must contain \{text\}"):
        load_config(None, ["encoder.doc_template=about {title}"])
    with pytest.raises(ConfigError, match=r"encoder.doc_template"):
        load_config(None, ["encoder.doc_template=body {text"])


def test_with_overrides_copies_validates_and_leaves_the_original() -> None:
    from towerline.config import with_overrides

    base = load_config(None, ["train.epochs=2"])
    changed = with_overrides(base, ["encoder.pooling=last_token", "train.batch_size=8"])
    assert (changed.encoder.pooling, changed.train.batch_size, changed.train.epochs) == ("last_token", 8, 2)
    assert base.encoder.pooling == "mean"
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        with_overrides(base, ["train.batch_size=0"])
