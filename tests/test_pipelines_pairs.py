"""The pairs Spark job on real Spark (local): pairs, hard negatives, fail-fast and quarantine.

One SparkSession serves the whole module (starting one costs tens of seconds), and each
dataset variant is run through the job once and shared by the tests that inspect it.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import SPARK_TEST_OVERRIDES
from pyspark.sql import SparkSession

from pipelines.pairs import PAIR_COLUMNS, run_pairs
from towerline.artifacts import Manifest, read_manifest
from towerline.beir import locate_dataset, read_dataset
from towerline.config import DataConfig, TowerlineConfig, load_config
from towerline.errors import ConfigError, DataError

MALFORMED_LINE = 5
UNKNOWN_DOC_QREL = "q0\tno-such-doc\t1"


def pairs_config(dataset: Path, *overrides: str) -> TowerlineConfig:
    return load_config(None, [f"data.dir={dataset}", *SPARK_TEST_OVERRIDES, *overrides])


@pytest.fixture(scope="module")
def tiny_pairs(spark: SparkSession, tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("pairs") / "tiny-pairs"
    run_pairs(pairs_config(tiny_dataset), output)
    return output


@pytest.fixture(scope="module")
def damaged_dataset(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy with a malformed corpus line, gzipped queries and CRLF qrels with bad rows appended."""
    root = tmp_path_factory.mktemp("damaged") / "tiny"
    shutil.copytree(tiny_dataset, root)
    corpus = (root / "corpus.jsonl").read_text().splitlines(keepends=True)
    corpus[MALFORMED_LINE - 1] = '{"_id": "broken", "text": \n'
    (root / "corpus.jsonl").write_text("".join(corpus))
    queries = root / "queries.jsonl"
    (root / "queries.jsonl.gz").write_bytes(gzip.compress(queries.read_bytes()))
    queries.unlink()
    qrels = (root / "qrels" / "train.tsv").read_text().splitlines()
    bad_rows = [UNKNOWN_DOC_QREL, "q1\td1\tnot-a-number", "q1\td1", qrels[1]]
    (root / "qrels" / "train.tsv").write_bytes("\r\n".join([*qrels, *bad_rows, ""]).encode())
    return root


@pytest.fixture(scope="module")
def quarantined_run(
    spark: SparkSession, damaged_dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Manifest, pd.DataFrame]:
    output = tmp_path_factory.mktemp("quarantine") / "pairs"
    manifest = run_pairs(pairs_config(damaged_dataset, "data.on_malformed=quarantine"), output)
    return manifest, pd.read_parquet(output / "quarantine.parquet")


def train_positives(dataset: Path) -> dict[str, set[str]]:
    positives: dict[str, set[str]] = {}
    for row in (dataset / "qrels" / "train.tsv").read_text().splitlines()[1:]:
        query_id, doc_id, _ = row.split("\t")
        positives.setdefault(query_id, set()).add(doc_id)
    return positives


def test_pairs_have_bm25_negatives_that_are_never_positives(tiny_pairs: Path, tiny_dataset: Path) -> None:
    manifest = read_manifest(tiny_pairs, "training-pairs", verify=True)
    pairs = pd.read_parquet(tiny_pairs / "pairs.parquet")
    positives = train_positives(tiny_dataset)

    assert tuple(pairs.columns) == PAIR_COLUMNS
    assert len(pairs) == sum(len(docs) for docs in positives.values()) == manifest.metadata["pairs"]
    assert manifest.metadata["quarantined"] == 0
    assert (tiny_pairs / "stats.json").is_file()
    assert sum(len(ids) for ids in pairs["negative_ids"]) > len(pairs)  # most queries got negatives
    for pair in pairs.itertuples():
        assert pair.positive_id in positives[pair.query_id]
        assert len(pair.negative_ids) <= 3
        assert not set(pair.negative_ids) & positives[pair.query_id]
        assert len(pair.negative_texts) == len(pair.negative_ids)
        assert pair.query_text and pair.positive_text


def test_malformed_json_fails_naming_the_line_and_writes_nothing(
    spark: SparkSession, damaged_dataset: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out" / "pairs"
    output.parent.mkdir()
    with pytest.raises(DataError, match=rf"corpus\.jsonl:{MALFORMED_LINE}: malformed JSON"):
        run_pairs(pairs_config(damaged_dataset), output)
    assert list(output.parent.iterdir()) == []  # neither the artifact nor its staging dir


def test_quarantine_mode_keeps_the_malformed_line_and_goes_on(
    quarantined_run: tuple[Manifest, pd.DataFrame], tiny_dataset: Path
) -> None:
    manifest, quarantine = quarantined_run
    corpus_rows = quarantine[quarantine["source"] == "corpus.jsonl"]
    assert corpus_rows[["line", "reason"]].values.tolist() == [[MALFORMED_LINE, "malformed JSON"]]
    assert manifest.kind == "training-pairs"
    # Gzipped queries and CRLF qrels read as usual: every judgment of an intact doc became a pair.
    broken_doc = f"d{MALFORMED_LINE - 1}"
    positives = train_positives(tiny_dataset)
    assert manifest.metadata["pairs"] == sum(len(docs - {broken_doc}) for docs in positives.values())


def test_bad_qrels_rows_are_quarantined_with_reasons(
    quarantined_run: tuple[Manifest, pd.DataFrame], tiny_dataset: Path
) -> None:
    _, quarantine = quarantined_run
    qrels_rows = quarantine[quarantine["source"] == "qrels/train.tsv"]
    reasons = dict(zip(qrels_rows["raw"], qrels_rows["reason"], strict=True))
    header_and_rows = len((tiny_dataset / "qrels" / "train.tsv").read_text().splitlines())
    assert reasons[UNKNOWN_DOC_QREL] == "unknown doc id"
    assert qrels_rows.loc[qrels_rows["raw"] == UNKNOWN_DOC_QREL, "line"].item() == header_and_rows + 1
    assert reasons["q1\td1\tnot-a-number"] == "score 'not-a-number' is not an integer"
    assert reasons["q1\td1"] == "expected 3 tab-separated columns, got 2"
    assert "duplicate judgment" in reasons.values()


def test_spark_quarantines_exactly_what_the_shared_reader_rejects(
    quarantined_run: tuple[Manifest, pd.DataFrame], damaged_dataset: Path
) -> None:
    """One policy: the Spark job and every local stage reject the same rows for the same reasons."""
    _, quarantine = quarantined_run
    local = read_dataset(locate_dataset(DataConfig(dir=damaged_dataset)), ["train"])
    expected = sorted((r.source, r.line, r.reason) for r in local.rejections)
    assert sorted(zip(quarantine["source"], quarantine["line"], quarantine["reason"], strict=True)) == expected
    assert len(expected) >= 5


def test_positive_aware_mining_drops_candidates_that_score_like_the_positive() -> None:
    from pipelines.negatives import mine_negatives
    from towerline.bm25 import build_index

    docs = {
        "pos": "vitamin d deficiency bone fracture risk",
        "twin": "vitamin d deficiency and bone fracture risk in adults",  # an unjudged positive in all but name
        "weak": "bone density in athletes",
        "other": "fracture healing after surgery",
    }
    index = build_index(list(docs), list(docs.values()), "english")
    query = ["vitamin d deficiency bone fracture"]
    plain = load_config(None, ["pairs.negatives_per_query=3"]).pairs
    margin = load_config(None, ["pairs.negatives_per_query=3", "pairs.negative_margin=0.9"]).pairs
    assert "twin" in mine_negatives(index, query, [{"pos"}], [[]], plain)[0]
    filtered = mine_negatives(index, query, [{"pos"}], [[]], margin)[0]
    assert "twin" not in filtered and filtered  # the weaker candidates stay


def test_a_doc_template_renders_pair_texts_and_training_refuses_another(
    spark: SparkSession, tiny_dataset: Path, tmp_path: Path
) -> None:
    from towerline.tracking import Tracker
    from training.run import run_train

    template = "Title: {title}\nPassage: {text}"
    config = pairs_config(tiny_dataset, f"encoder.doc_template={template}")
    manifest = run_pairs(config, tmp_path / "pairs")
    assert manifest.metadata["doc_template"] == template
    corpus = read_dataset(locate_dataset(DataConfig(dir=tiny_dataset))).corpus
    pairs = pd.read_parquet(tmp_path / "pairs" / "pairs.parquet")
    for row in pairs.itertuples():
        assert row.positive_text == f"Title: {corpus[row.positive_id].title}\nPassage: {corpus[row.positive_id].text}"
        assert all(text.startswith("Title: ") for text in row.negative_texts)
    with pytest.raises(ConfigError, match=r"doc_template='Title: .*rebuild the pairs"):
        run_train(pairs_config(tiny_dataset), tmp_path / "pairs", tmp_path / "encoder", Tracker(None))
    assert not (tmp_path / "encoder").exists()
