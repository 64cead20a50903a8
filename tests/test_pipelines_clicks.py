"""The click-log pairs job on real Spark (local): validation and quarantine of every bad-row kind,
positives from satisfied clicks, the three negative sources, the dev split, determinism across
partitionings and input formats, and the refusal of a log with too many bad rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import SPARK_TEST_OVERRIDES
from pyspark.sql import SparkSession
from typer.testing import CliRunner

from pipelines.click_pairs import CLICK_PAIR_COLUMNS, DEV_PAIRS_FILE, PAIRS_FILE, run_click_pairs
from towerline.artifacts import read_manifest
from towerline.beir import load_dataset
from towerline.cli import app
from towerline.config import DataConfig, TowerlineConfig, load_config
from towerline.errors import DataError
from towerline.synthetic_clicks import ClickLogSpec, write_click_logs

TS = 1_767_225_600_000
REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def clicks_config(dataset: Path, *overrides: str) -> TowerlineConfig:
    return load_config(None, [f"data.dir={dataset}", *SPARK_TEST_OVERRIDES, "clicks.max_bad_fraction=1",
                              "clicks.dev_fraction=0", *overrides])


def impression(request: str, query: str, doc: str, position: int, clicked: bool = False, dwell: int = 0) -> dict:
    return {"request_id": request, "ts": TS + position, "query": query, "doc_id": doc, "position": position,
            "clicked": clicked, "dwell_ms": dwell}


@pytest.fixture(scope="module")
def doc_ids(tiny_dataset: Path) -> list[str]:
    return sorted(load_dataset(DataConfig(dir=tiny_dataset)).corpus)


@pytest.fixture(scope="module")
def queries(tiny_dataset: Path, doc_ids: list[str]) -> tuple[str, str]:
    """Two queries written from documents 2 and 7 (their first three words: topic words, so BM25 has
    candidates), the first in title case with a double space (it normalises to its lower case)."""
    corpus = load_dataset(DataConfig(dir=tiny_dataset)).corpus
    first, second = (corpus[doc_ids[index]].text.split()[:3] for index in (2, 7))
    return "  ".join(word.title() for word in first), " ".join(second)


@pytest.fixture(scope="module")
def good_rows(doc_ids: list[str], queries: tuple[str, str]) -> list[dict]:
    d, (alpha, gamma) = doc_ids, queries
    retyped = " " + alpha.lower().replace("  ", " ")
    return [
        # r1: a satisfied click at 3; 1 and 2 were skipped above it; 4, below it, was not.
        impression("r1", alpha, d[0], 1), impression("r1", alpha, d[1], 2),
        impression("r1", alpha, d[2], 3, True, 40_000), impression("r1", alpha, d[3], 4),
        # r2: the same query typed differently; d[1] skipped again, d[2] satisfied again (weight 2),
        # d[5] a short click (neither a positive nor skipped).
        impression("r2", retyped, d[1], 1), impression("r2", retyped, d[2], 2, True, 50_000),
        impression("r2", retyped, d[5], 3, True, 1_000),
        # r3: another query, one satisfied click under one skipped document.
        impression("r3", gamma, d[8], 1), impression("r3", gamma, d[7], 2, True, 31_000),
        # r4: a query with clicks, none satisfied: no pair.
        impression("r4", "delta", d[9], 1, True, 2_000),
    ]


def bad_lines(doc_ids: list[str]) -> list[tuple[str, str]]:
    """(line, the reason it must be quarantined with), one or two per kind of bad row."""
    ok = impression("r9", "fine query", doc_ids[0], 1)

    def variant(**changes: object) -> str:
        row = {**ok, **changes}
        return json.dumps({key: value for key, value in row.items() if value is not ...})

    return [
        ('{"request_id": "r9", "query": ', "malformed JSON"),
        ("[1, 2, 3]", "malformed JSON"),
        (variant(request_id=...), "missing request_id"),
        (variant(request_id=" "), "missing request_id"),
        (variant(query=...), "missing query"),
        (variant(query="   "), "empty query"),
        (variant(query="word " * 200), "query too long"),
        (variant(ts="yesterday"), "bad ts"),
        (variant(ts=100), "bad ts"),
        (variant(ts="2026-02-03T04:05:06Z", position=2, doc_id=doc_ids[4]), None),  # ISO-8601 is good
        (variant(position="two"), "bad position"),
        (variant(position=0), "bad position"),
        (variant(clicked="maybe"), "bad clicked"),
        (variant(dwell_ms=-5, position=3), "bad dwell_ms"),
        (variant(doc_id="no-such-doc"), "unknown doc id"),
        (variant(doc_id=doc_ids[1]), "duplicate impression"),  # position 1 of r9 is taken
        (json.dumps(ok), "duplicate impression"),  # the same impression replayed
    ]


@pytest.fixture(scope="module")
def json_log(tmp_path_factory: pytest.TempPathFactory, good_rows: list[dict], doc_ids: list[str]) -> Path:
    lines = [json.dumps(row) for row in good_rows]
    lines.insert(3, "")  # a blank line is skipped, and still counted as a line
    lines.append(json.dumps(impression("r9", "fine query", doc_ids[0], 1)))
    lines.extend(line for line, _ in bad_lines(doc_ids))
    path = tmp_path_factory.mktemp("logs") / "clicks.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def json_run(spark: SparkSession, tiny_dataset: Path, json_log: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("click-pairs") / "pairs"
    run_click_pairs(clicks_config(tiny_dataset), json_log, output)
    return output


def test_every_bad_row_lands_in_quarantine_with_its_reason_and_line(json_run: Path, good_rows: list[dict],
                                                                     doc_ids: list[str]) -> None:
    quarantine = pd.read_parquet(json_run / "quarantine.parquet")
    bad = bad_lines(doc_ids)
    first_bad_line = len(good_rows) + 1 + 2  # the good rows, the blank line, the r9 original
    expected = [(first_bad_line + offset, reason) for offset, (_, reason) in enumerate(bad) if reason]
    assert sorted(zip(quarantine["line"], quarantine["reason"], strict=True)) == expected
    assert set(quarantine["source"]) == {"clicks.jsonl"}
    assert quarantine.loc[quarantine["reason"] == "bad clicked", "raw"].item() == bad[12][0]
    stats = json.loads((json_run / "stats.json").read_text())
    logs = stats["inputs"]["logs"]
    assert logs["quarantined"] == len(expected)
    assert logs["valid"] == len(good_rows) + 2  # the r9 original and the ISO-timestamped one
    assert logs["rows"] == logs["valid"] + logs["quarantined"]
    assert sum(logs["reasons"].values()) == len(expected)


def test_satisfied_clicks_become_weighted_pairs_with_negatives_from_each_source(
    json_run: Path, doc_ids: list[str], queries: tuple[str, str]
) -> None:
    pairs = pd.read_parquet(json_run / PAIRS_FILE)
    assert tuple(pairs.columns) == CLICK_PAIR_COLUMNS
    assert len(pd.read_parquet(json_run / DEV_PAIRS_FILE)) == 0  # clicks.dev_fraction=0
    by_query = {row.query_text: row for row in pairs.itertuples()}
    alpha_text, gamma_text = (" ".join(query.lower().split()) for query in queries)
    assert set(by_query) == {alpha_text, gamma_text}  # normalised; "delta" had no satisfied click
    alpha, gamma = by_query[alpha_text], by_query[gamma_text]
    assert (alpha.positive_id, alpha.weight) == (doc_ids[2], 2)
    assert (gamma.positive_id, gamma.weight) == (doc_ids[7], 1)
    # Skipped above a satisfied click first, most often skipped first: d1 (twice), then d0.
    assert list(alpha.negative_ids[:2]) == [doc_ids[1], doc_ids[0]]
    assert list(alpha.negative_sources) == ["skipped", "skipped", "bm25", "bm25", "random"]
    assert list(gamma.negative_ids[:1]) == [doc_ids[8]]
    assert list(gamma.negative_sources) == ["skipped", "bm25", "bm25", "random"]
    for row in pairs.itertuples():
        assert row.positive_id not in row.negative_ids and len(set(row.negative_ids)) == len(row.negative_ids)
        assert len(row.negative_texts) == len(row.negative_ids) == len(row.negative_sources)
    stats = json.loads((json_run / "stats.json").read_text())
    assert stats["negatives_by_source"] == {"skipped": 3, "bm25": 4, "model": 0, "random": 2}
    manifest = read_manifest(json_run, "training-pairs")
    assert manifest.metadata["pairs"] == 2 and manifest.metadata["dev_pairs"] == 0


def test_parquet_logs_and_other_partitionings_give_the_same_pairs(
    spark: SparkSession, tiny_dataset: Path, json_run: Path, good_rows: list[dict], tmp_path: Path
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    # Two files, split mid-request: impressions of one page can arrive in different files.
    table = pa.Table.from_pylist(good_rows)
    pq.write_table(table.slice(0, 5), logs / "part-0.parquet")
    pq.write_table(table.slice(5), logs / "part-1.parquet")
    output = tmp_path / "pairs"
    run_click_pairs(clicks_config(tiny_dataset, "spark.shuffle_partitions=5"), logs, output)
    expected = pd.read_parquet(json_run / PAIRS_FILE)
    pd.testing.assert_frame_equal(pd.read_parquet(output / PAIRS_FILE), expected)
    assert len(pd.read_parquet(output / "quarantine.parquet")) == 0


def test_too_many_bad_rows_fail_and_write_nothing(spark: SparkSession, tiny_dataset: Path, json_log: Path,
                                                   tmp_path: Path) -> None:
    output = tmp_path / "pairs"
    with pytest.raises(DataError, match=r"clicks.max_bad_fraction=0.05.*nothing written"):
        run_click_pairs(clicks_config(tiny_dataset, "clicks.max_bad_fraction=0.05"), json_log, output)
    assert not output.exists() and not any(tmp_path.iterdir())


def test_unreadable_log_inputs_are_named(spark: SparkSession, tiny_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such click-log"):
        run_click_pairs(clicks_config(tiny_dataset), tmp_path / "nope", tmp_path / "out")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.jsonl").write_text("{}\n")
    (mixed / "b.csv").write_text("x\n")
    with pytest.raises(DataError, match=r"all JSON lines .* or all \.parquet"):
        run_click_pairs(clicks_config(tiny_dataset), mixed, tmp_path / "out")
    short = tmp_path / "short.parquet"
    pq.write_table(pa.table({"request_id": ["r"], "query": ["q"]}), short)
    with pytest.raises(DataError, match="columns missing: ts, doc_id, position, clicked"):
        run_click_pairs(clicks_config(tiny_dataset), short, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_synthetic_logs_through_the_cli_train_unchanged(spark: SparkSession, tiny_dataset: Path,
                                                         tiny_overrides: list[str], tmp_path: Path) -> None:
    logs, pairs = tmp_path / "logs", tmp_path / "pairs"
    outcome = runner.invoke(app, ["data", "synth-clicks", str(tiny_dataset), "--rows", "3000", "--format", "json",
                                  "--out", str(logs), *tiny_overrides])
    assert outcome.exit_code == 0, outcome.output
    outcome = runner.invoke(app, ["pairs", "--logs", str(logs), "--out", str(pairs), *tiny_overrides,
                                  "clicks.dev_fraction=0.2"])
    assert outcome.exit_code == 0, outcome.output
    train, dev = pd.read_parquet(pairs / PAIRS_FILE), pd.read_parquet(pairs / DEV_PAIRS_FILE)
    assert len(train) > len(dev) > 0 and not set(train["query_id"]) & set(dev["query_id"])
    # The same query lands on the same side in another run with other settings: the split is the hash's.
    assert len(pd.read_parquet(pairs / "quarantine.parquet")) == 0
    outcome = runner.invoke(app, ["train", "--pairs", str(pairs), "--out", str(tmp_path / "encoder"),
                                  *tiny_overrides, "train.max_steps=2"])
    assert outcome.exit_code == 0, outcome.output
    assert read_manifest(tmp_path / "encoder", "dual-encoder").metadata["steps"] == 2


def test_synthetic_click_logs_have_position_bias_and_dwell_separating_satisfied_clicks(tiny_dataset: Path,
                                                                                       tmp_path: Path) -> None:
    documents = list(load_dataset(DataConfig(dir=tiny_dataset)).corpus.values())
    written = write_click_logs(documents, tmp_path / "a", ClickLogSpec(rows=20_000, seed=3))
    assert written["rows"] == 20_000
    log = pd.read_parquet(tmp_path / "a")
    assert not log.duplicated(["request_id", "doc_id"]).any() and not log.duplicated(["request_id", "position"]).any()
    by_position = log.groupby("position")["clicked"].mean()
    assert by_position[1] > by_position[5] > by_position[10]
    assert log.loc[~log["clicked"], "dwell_ms"].eq(0).all() and log.loc[log["clicked"], "dwell_ms"].gt(0).all()
    write_click_logs(documents, tmp_path / "b", ClickLogSpec(rows=20_000, seed=3))
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "b"), log)


@pytest.mark.slow  # two executor JVMs and a driver in a child process: ~1 min on 2 cores
def test_spark_submit_on_local_cluster_gives_the_same_pairs(json_run: Path, json_log: Path, tiny_dataset: Path,
                                                            tmp_path: Path) -> None:
    """infra/spark/submit.sh through spark-submit, executors in their own JVMs with their own Python
    workers (Spark's local-cluster mode, in a child process: this one holds the tests' local session),
    writes the same artifact as local mode."""
    output = tmp_path / "pairs"
    command = [str(REPO / "infra" / "spark" / "submit.sh"), "local", "pairs", "--logs", str(json_log), "--out",
               str(output), f"data.dir={tiny_dataset}", "spark.shuffle_partitions=3", "clicks.max_bad_fraction=1",
               "clicks.dev_fraction=0", "tracking.enabled=false"]
    environment = {**os.environ, "PYSPARK_PYTHON": sys.executable,
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    assert finished.returncode == 0, finished.stderr[-3000:]
    for name in (PAIRS_FILE, "quarantine.parquet"):
        columns = ["source", "line"] if name == "quarantine.parquet" else ["query_id", "positive_id"]
        pd.testing.assert_frame_equal(pd.read_parquet(output / name).sort_values(columns, ignore_index=True),
                                      pd.read_parquet(json_run / name).sort_values(columns, ignore_index=True))
    assert json.loads((output / "stats.json").read_text())["inputs"] == json.loads(
        (json_run / "stats.json").read_text())["inputs"]


def test_model_negatives_come_from_the_rank_window_of_the_index(
    spark: SparkSession, tiny_dataset: Path, tiny_backbone: Path, json_log: Path, tmp_path: Path
) -> None:
    from indexing.build import build_index
    from indexing.load import load_index
    from serving.app import load_query_encoder
    from towerline.config import ServeConfig
    from towerline.errors import ArtifactError, ConfigError
    from towerline.towers import save_dual_encoder, towers_from_backbone

    config = clicks_config(tiny_dataset, f"encoder.backbone={tiny_backbone}", "encoder.max_doc_length=48",
                           "clicks.model_negatives=2", "clicks.model_rank_window=[5,40]", "clicks.random_negatives=0",
                           "encoder.doc_template=T: {title} | {text}")
    encoder = tmp_path / "encoder"
    save_dual_encoder(*towers_from_backbone(config.encoder), encoder, producer="test", config=config)
    build_index(config, encoder, tmp_path / "index")
    with pytest.raises(ConfigError, match="needs an index"):
        run_click_pairs(config, json_log, tmp_path / "no-index")
    run_click_pairs(config, json_log, tmp_path / "pairs", (tmp_path / "index", encoder))
    pairs = pd.read_parquet(tmp_path / "pairs" / PAIRS_FILE)
    index, query_encoder = load_index(tmp_path / "index"), load_query_encoder(encoder, ServeConfig())
    for row in pairs.itertuples():
        sources = list(row.negative_sources)
        mined = [doc_id for doc_id, source in zip(row.negative_ids, sources, strict=True) if source == "model"]
        assert len(mined) == 2 and sources[-2:] == ["model", "model"]
        window = [doc_id for doc_id, _ in index.search(query_encoder.encode([row.query_text]), 40)[0]][5:40]
        assert set(mined) <= set(window) and row.positive_id not in mined
    # Texts as the doc tower reads them: through its template (recorded for `train` to check).
    assert all(text.startswith("T: ") for text in [*pairs["positive_text"], *pairs["negative_texts"].explode()])
    assert read_manifest(tmp_path / "pairs", "training-pairs").metadata["doc_template"] == "T: {title} | {text}"
    stats = json.loads((tmp_path / "pairs" / "stats.json").read_text())
    assert stats["negatives_by_source"]["model"] == 2 * len(pairs) and stats["negatives_by_source"]["random"] == 0

    other_query, other_doc = towers_from_backbone(config.encoder)
    with torch.no_grad():
        next(other_doc.parameters()).add_(0.01)
    save_dual_encoder(other_query, other_doc, tmp_path / "other", producer="test", config=config)
    with pytest.raises(ArtifactError, match="embedding space mismatch"):
        run_click_pairs(config, json_log, tmp_path / "mismatch", (tmp_path / "index", tmp_path / "other"))
    assert not (tmp_path / "mismatch").exists() and not (tmp_path / "no-index").exists()


def test_logs_from_a_uri_glob_over_dated_directories_to_a_uri_target(
    spark: SparkSession, tiny_dataset: Path, json_run: Path, good_rows: list[dict], tmp_path: Path
) -> None:
    # Files of the same name in dated directories, read through a glob URI: each file keeps its own
    # line numbers; the artifact is written through Hadoop's file system to a URI target.
    for day, rows in (("2026-12-01", good_rows[:5]), ("2026-12-02", good_rows[5:])):
        (tmp_path / "logs" / day).mkdir(parents=True)
        lines = [json.dumps(row) for row in rows]
        if day.endswith("02"):
            lines.insert(1, "{not json")
        (tmp_path / "logs" / day / "clicks.jsonl").write_text("\n".join(lines) + "\n")
    output = tmp_path / "out" / "pairs"
    run_click_pairs(clicks_config(tiny_dataset), f"file://{tmp_path}/logs/2026-12-*", f"file://{output}")
    pd.testing.assert_frame_equal(pd.read_parquet(output / PAIRS_FILE), pd.read_parquet(json_run / PAIRS_FILE))
    quarantine = pd.read_parquet(output / "quarantine.parquet")
    assert quarantine[["source", "line", "reason"]].values.tolist() == [["clicks.jsonl", 2, "malformed JSON"]]
    assert read_manifest(output, "training-pairs", verify=True).metadata["quarantined"] == 1
    assert (output / "_SUCCESS").is_file() and sorted(os.listdir(tmp_path / "out")) == ["pairs"]
