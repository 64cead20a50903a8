"""The one BEIR reader and its policy: what is a document, what is malformed, what qrels mean."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evaluation.metrics import score_run
from towerline.beir import (
    EMPTY_DOCUMENT,
    UNKNOWN_DOC,
    UNKNOWN_QUERY,
    RowRejected,
    load_dataset,
    locate_dataset,
    parse_document,
    positives,
    read_dataset,
)
from towerline.config import DataConfig
from towerline.errors import DataError


def write_dataset(root: Path, corpus: list[object], queries: list[object], qrels: dict[str, list[str]]) -> Path:
    (root / "qrels").mkdir(parents=True)
    for name, records in (("corpus.jsonl", corpus), ("queries.jsonl", queries)):
        lines = [record if isinstance(record, str) else json.dumps(record) for record in records]
        (root / name).write_text("\n".join(lines) + "\n")
    for split, rows in qrels.items():
        (root / "qrels" / f"{split}.tsv").write_text("\n".join(["query-id\tcorpus-id\tscore", *rows]) + "\n")
    return root


@pytest.fixture()
def quirky(tmp_path: Path) -> Path:
    corpus = [
        {"_id": "a", "title": "Title only", "text": ""},
        {"_id": "b", "text": "text only"},
        {"_id": 7, "title": "numeric id", "text": "seven"},
        {"_id": "e", "title": " ", "text": ""},  # line 4: neither title nor text
        {"_id": "a", "title": "again", "text": "a duplicate"},  # line 5
    ]
    queries = [{"_id": 1, "text": "first"}, {"_id": "q2", "text": "second"}]
    qrels = {"test": ["1\t7\t2", "1\ta\t0", "q2\tb\t1", "q2\tghost\t1", "nobody\tb\t1", "q2\tb\t1"]}
    return write_dataset(tmp_path / "quirky", corpus, queries, qrels)


def test_title_only_and_text_only_are_documents_and_numeric_ids_are_strings(quirky: Path) -> None:
    dataset = load_dataset(DataConfig(dir=quirky, on_malformed="quarantine"), ["test"])
    assert sorted(dataset.corpus) == ["7", "a", "b"]
    assert dataset.corpus["a"].full_text == "Title only"
    assert dataset.corpus["b"].full_text == "text only"
    assert dataset.corpus["a"].title == "Title only"  # the first of the duplicate ids wins
    assert dataset.split("test")["1"] == {"7": 2, "a": 0}


def test_fail_policy_names_the_first_malformed_line(quirky: Path) -> None:
    with pytest.raises(DataError, match=rf"corpus\.jsonl:4: {EMPTY_DOCUMENT}$"):
        load_dataset(DataConfig(dir=quirky), ["test"])


def test_every_rejection_is_counted_and_unknown_ids_are_only_reported(quirky: Path) -> None:
    dataset = read_dataset(locate_dataset(DataConfig(dir=quirky)), ["test"])
    seen = {(r.source, r.line, r.reason, r.fatal) for r in dataset.rejections}
    assert seen == {
        ("corpus.jsonl", 4, EMPTY_DOCUMENT, True),
        ("corpus.jsonl", 5, "duplicate doc id", True),
        ("qrels/test.tsv", 5, UNKNOWN_DOC, False),
        ("qrels/test.tsv", 6, UNKNOWN_QUERY, False),
        ("qrels/test.tsv", 7, "duplicate judgment", False),
    }


def test_unknown_ids_alone_never_fail(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d", [{"_id": "a", "text": "x"}], [{"_id": "q", "text": "y"}],
                         {"test": ["q\ta\t1", "q\tgone\t1"]})
    assert load_dataset(DataConfig(dir=root), ["test"]).split("test") == {"q": {"a": 1}}


def test_zero_is_judged_non_relevant_and_positive_min_moves_the_line() -> None:
    judged = {"a": 0, "b": 1, "c": 2, "d": -1}
    assert positives(judged, 1) == {"b", "c"}
    assert positives(judged, 2) == {"c"}
    run = {"q": {"a": 3.0, "b": 2.0, "c": 1.0}}
    # A judged-non-relevant document at rank 1 is a miss; MRR counts from the first grade >= positive_min.
    assert score_run({"q": judged}, run, 1)["mrr@10"] == pytest.approx(0.5)
    assert score_run({"q": judged}, run, 2)["mrr@10"] == pytest.approx(1 / 3)
    assert score_run({"q": {"a": 0}}, run)["queries"] == 0.0  # no positive: not scored


def test_gzip_crlf_and_bom_read_the_same_and_keep_the_fingerprint_of_the_content(quirky: Path, tmp_path: Path) -> None:
    plain = read_dataset(locate_dataset(DataConfig(dir=quirky)), ["test"])
    packed = tmp_path / "packed"
    (packed / "qrels").mkdir(parents=True)
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        (packed / f"{name}.gz").write_bytes(gzip.compress((quirky / name).read_bytes()))
    windows = tmp_path / "windows"
    (windows / "qrels").mkdir(parents=True)
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        (windows / name).write_bytes(b"\xef\xbb\xbf" + (quirky / name).read_bytes().replace(b"\n", b"\r\n"))
    for other in (packed, windows):
        dataset = read_dataset(locate_dataset(DataConfig(dir=other)), ["test"])
        assert dataset.corpus == plain.corpus and dataset.queries == plain.queries
        assert dataset.qrels == plain.qrels
        assert [(r.line, r.reason) for r in dataset.rejections] == [(r.line, r.reason) for r in plain.rejections]
    fingerprint = locate_dataset(DataConfig(dir=quirky)).identity()["fingerprint"]
    assert locate_dataset(DataConfig(dir=packed)).identity()["fingerprint"] == fingerprint
    assert locate_dataset(DataConfig(dir=windows)).identity()["fingerprint"] != fingerprint


def test_a_missing_split_names_the_splits_present(quirky: Path) -> None:
    with pytest.raises(DataError, match=r"no qrels/train\.tsv \(splits present: test\)"):
        load_dataset(DataConfig(dir=quirky, on_malformed="quarantine"), ["train"])


identifiers = st.one_of(
    st.integers(min_value=-(10**12), max_value=10**12),
    st.text(min_size=1).filter(str.strip),
)
texts = st.one_of(st.none(), st.text())


@given(doc_id=identifiers, title=texts, text=texts)
def test_any_document_with_an_id_and_some_text_parses_to_the_same_strings(
    doc_id: int | str, title: str | None, text: str | None
) -> None:
    fields = {"title": title, "text": text}
    raw = json.dumps({"_id": doc_id, **{name: value for name, value in fields.items() if value is not None}})
    if not (title or "").strip() and not (text or "").strip():
        with pytest.raises(RowRejected):
            parse_document(raw)
        return
    document = parse_document(raw)
    assert document.doc_id == str(doc_id).strip()
    assert document.full_text == " ".join(part.strip() for part in (title, text) if part and part.strip())
