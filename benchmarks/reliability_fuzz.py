"""Fuzzing scenarios of `towerline bench reliability` (hypothesis, seeded and without a database, so
a run is repeatable):

- rpc_fuzz: every field of every RPC (and undecodable bytes) over a real channel to a `towerline
  serve` process: only documented status codes come back and the server never dies.
- auth: with serve.auth_token_file set, every RPC without the right token is refused
  (UNAUTHENTICATED without one, PERMISSION_DENIED with a wrong one), and the right one is let through.
- reader_fuzz: BEIR files, config overrides and the interactions job's line parsers (every MovieLens
  release and the generic schema) on fuzzed text: a clear Towerline error, a quarantined line or a
  clean read, never a traceback. (Click logs: spark_malformed in reliability_jobs.py.)
"""

from __future__ import annotations

import contextlib
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.fault_tally import CallTally, Scenario
from benchmarks.serve_process import ServeProcess
from towerline.config import TowerlineConfig
from towerline.errors import TowerlineError

INT32 = st.integers(-(2**31), 2**31 - 1)
# Protobuf strings are UTF-8: every code point but the surrogates.
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=300)
LONG_TEXT = st.one_of(TEXT, st.text(st.characters(exclude_categories=("Cs",)), min_size=5_000, max_size=20_000))
SERVICE = "/towerline.v1.RetrievalService/"


def _settings(examples: int) -> settings:
    return settings(max_examples=examples, database=None, derandomize=True, deadline=None,
                    suppress_health_check=list(HealthCheck))


def _requests() -> dict[str, st.SearchStrategy[Any]]:
    from serving.proto.towerline.v1 import retrieval_pb2 as pb

    # Each field half in its valid range and half anywhere in its type, so that both the answering
    # path and every refusal are fuzzed.
    top_k = st.one_of(st.integers(1, 100), INT32)
    mode = st.one_of(st.integers(0, 3), st.integers(4, 2**31 - 1))  # the enum, then unknown values
    knob = st.one_of(st.just(0), INT32)  # 0: the index's own setting
    knobs = st.builds(pb.SearchKnobs, nprobe=knob, ef_search=knob)
    return {
        "Search": st.builds(pb.SearchRequest, query=LONG_TEXT, top_k=top_k, mode=mode, knobs=knobs,
                            include_documents=st.booleans()),
        "BatchSearch": st.builds(pb.BatchSearchRequest, queries=st.lists(TEXT, max_size=300), top_k=top_k,
                                 mode=mode, knobs=knobs, include_documents=st.booleans()),
        "GetIndexInfo": st.builds(pb.GetIndexInfoRequest),
        "Recommend": st.builds(pb.RecommendRequest, user_id=TEXT, top_k=top_k,
                               history_item_ids=st.lists(TEXT, max_size=50)),
    }


def rpc_fuzz(config: TowerlineConfig, index: Path, onnx: Path, examples: int) -> Scenario:
    import grpc

    scenario = Scenario("rpc_fuzz")
    calls = CallTally()
    by_method: dict[str, CallTally] = {}
    serve = config.serve.model_copy(update={"reload_interval_s": 0})
    with ServeProcess(config, index, onnx, serve) as server, grpc.insecure_channel(server.address) as channel:
        for method, strategy in {**_requests(), "raw bytes": st.binary(max_size=2_000)}.items():
            targets = list(_requests()) if method == "raw bytes" else [method]

            @given(request=strategy, target=st.sampled_from(targets))
            @_settings(examples)
            def call(request: Any, target: str) -> None:
                # Raw bytes go out unserialised: the server's decoding is what is fuzzed.
                stub = channel.unary_unary(SERVICE + target, request_serializer=None if isinstance(
                    request, bytes) else type(request).SerializeToString)
                try:
                    stub(request, timeout=30)
                    code = "OK"
                except grpc.RpcError as error:
                    code = error.code().name
                calls.record(code)
                key = f"{target} (raw bytes)" if isinstance(request, bytes) else target
                by_method.setdefault(key, CallTally()).record(code)

            call()
            scenario.trials += 1
            if not server.alive():
                scenario.lost(f"the server died while fuzzing {method}")
                break
        scenario.faults_injected = calls.sent - calls.codes["OK"]
        scenario.add_calls(calls, failures_expected=True)
        scenario.details["codes_by_method"] = {method: dict(tally.codes) for method, tally in by_method.items()}
        scenario.details["server_alive_after"] = server.alive()
        scenario.details["health_after"] = _health(server.address) if server.alive() else "dead"
        if scenario.details["health_after"] != "SERVING":
            scenario.lost(f"health after fuzzing: {scenario.details['health_after']}")
    return scenario


def auth(config: TowerlineConfig, index: Path, onnx: Path, work_dir: Path) -> Scenario:
    """Each RPC × {no token, a wrong token, a malformed header, the right token}."""
    import grpc

    scenario = Scenario("auth")
    token = secrets.token_urlsafe(24)
    token_file = work_dir / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    serve = config.serve.model_copy(update={"reload_interval_s": 0, "auth_token_file": token_file})
    credentials = {"none": None, "wrong": f"Bearer {secrets.token_urlsafe(24)}", "malformed": f"Basic {token}",
                   "right": f"Bearer {token}"}
    expected = {"none": "UNAUTHENTICATED", "wrong": "PERMISSION_DENIED", "malformed": "PERMISSION_DENIED"}
    refused_wrongly, let_through = 0, 0
    calls = CallTally()
    with ServeProcess(config, index, onnx, serve) as server, grpc.insecure_channel(server.address) as channel:
        for method in _requests():
            request = _plain_request(method)
            stub = channel.unary_unary(SERVICE + method, request_serializer=type(request).SerializeToString)
            for name, header in credentials.items():
                scenario.trials += 1
                metadata = None if header is None else (("authorization", header),)
                try:
                    stub(request, timeout=30, metadata=metadata)
                    code = "OK"
                except grpc.RpcError as error:
                    code = error.code().name
                calls.record(code)
                if name == "right":
                    refused_wrongly += code in ("UNAUTHENTICATED", "PERMISSION_DENIED")
                else:
                    scenario.faults_injected += 1
                    if code != expected[name]:
                        let_through += 1
                        scenario.lost(f"{method} with {name} credentials answered {code}")
    scenario.add_calls(calls, failures_expected=True)
    scenario.requests_failed = refused_wrongly
    scenario.details.update(unauthorised_calls_let_through=let_through, authorised_calls_refused=refused_wrongly)
    return scenario


def _plain_request(method: str) -> Any:
    from serving.proto.towerline.v1 import retrieval_pb2 as pb

    return {"Search": pb.SearchRequest(query="protein folding", top_k=3),
            "BatchSearch": pb.BatchSearchRequest(queries=["protein folding", "cell death"], top_k=3),
            "Recommend": pb.RecommendRequest(user_id="u1", top_k=3), "GetIndexInfo": pb.GetIndexInfoRequest()}[method]


def _health(address: str) -> str:
    from serving.client import RetrievalClient

    with RetrievalClient(address, timeout_s=10) as client:
        return client.health()


def reader_fuzz(examples: int) -> Scenario:
    """BEIR corpus / queries / qrels files, config overrides and interaction lines from fuzzed text."""
    scenario = Scenario("reader_fuzz")
    outcomes = CallTally()
    tracebacks: list[str] = []

    def attempt(read: Callable[[], Any]) -> None:
        try:
            read()
            outcomes.record("OK")
        except TowerlineError:
            outcomes.record("TOWERLINE_ERROR")  # a clear error naming the file, line or key
        except Exception as error:  # what the scenario is there to find
            outcomes.record("TRACEBACK")
            tracebacks.append(f"{type(error).__name__}: {str(error)[:200]}")

    line = st.one_of(TEXT, st.builds(_json_line, st.dictionaries(st.sampled_from(
        ["_id", "title", "text", "query-id", "corpus-id", "score", "metadata"]), st.one_of(
            TEXT, INT32, st.none(), st.booleans(), st.lists(INT32, max_size=3)), max_size=5)))
    lines = st.lists(line, max_size=8)

    @given(corpus=lines, queries=lines, qrels=st.lists(st.one_of(TEXT, st.builds(
        lambda q, d, s: f"{q}\t{d}\t{s}", TEXT, TEXT, st.one_of(INT32.map(str), TEXT))), max_size=8),
        on_malformed=st.sampled_from(["fail", "quarantine"]))
    @_settings(examples)
    def beir(corpus: list[str], queries: list[str], qrels: list[str], on_malformed: str) -> None:
        from towerline.beir import load_dataset
        from towerline.config import DataConfig

        with tempfile.TemporaryDirectory(prefix="towerline-fuzz-") as scratch:
            root = Path(scratch)
            (root / "qrels").mkdir()
            (root / "corpus.jsonl").write_text("\n".join(corpus) + "\n")
            (root / "queries.jsonl").write_text("\n".join(queries) + "\n")
            (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(qrels) + "\n")
            attempt(lambda: load_dataset(DataConfig(dir=root, on_malformed=on_malformed), ["test"]))

    @given(overrides=st.lists(st.one_of(TEXT, st.builds(lambda key, value: f"{key}={value}", st.sampled_from(
        ["train.batch_size", "serve.port", "index.type", "data.dir", "clicks.dev_fraction", "spark.master",
         "serve.max_top_k", "nope.key", "train", "encoder.pooling"]), st.one_of(TEXT, INT32.map(str)))), max_size=4))
    @_settings(examples)
    def config(overrides: list[str]) -> None:
        from towerline.config import load_config

        attempt(lambda: load_config(None, overrides))

    @given(parser=st.sampled_from(_line_parsers()), fields=st.lists(st.one_of(TEXT, INT32.map(str), st.floats(
        allow_nan=True).map(str)), max_size=25), separator=st.sampled_from(["\t", "|", "::", ",", " "]))
    @_settings(examples)
    def interaction_lines(parser: Callable[[str], Any], fields: list[str], separator: str) -> None:
        from towerline.beir import RowRejected

        def parse() -> None:
            with contextlib.suppress(RowRejected):  # quarantined with its reason by the Spark job
                parser(separator.join(fields))

        attempt(parse)

    beir()
    config()
    interaction_lines()
    scenario.trials = 3
    scenario.faults_injected = outcomes.codes["TOWERLINE_ERROR"]
    scenario.requests_sent = outcomes.sent
    scenario.requests_failed_undocumented = outcomes.codes["TRACEBACK"]
    scenario.details.update(inputs=outcomes.sent, read_cleanly=outcomes.codes["OK"],
                            clear_errors=outcomes.codes["TOWERLINE_ERROR"], tracebacks=outcomes.codes["TRACEBACK"])
    scenario.problems.extend(tracebacks[:20])
    return scenario


def _line_parsers() -> list[Callable[[str], Any]]:
    """Every per-line parser of the interactions job (MovieLens releases and the generic schema)."""
    from pipelines.interaction_formats import FORMATS

    parsers = []
    for chosen in FORMATS.values():
        parsers.extend(parse for parse in (chosen.parse_interaction, chosen.parse_item, chosen.parse_user) if parse)
    return parsers


def _json_line(record: dict[str, Any]) -> str:
    import json

    return json.dumps(record)
