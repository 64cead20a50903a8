"""Serving: the plain service in-process, then the gRPC server over a real loopback channel."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from waiting import wait_until

from indexing.build import build_index
from indexing.load import LoadedIndex, load_index
from serving.app import build_service
from serving.client import RetrievalClient
from serving.errors import DeadlineExceeded, InvalidArgument, RetrievalRpcError
from serving.proto.towerline.v1 import retrieval_pb2 as pb
from serving.proto.towerline.v1 import retrieval_pb2_grpc as pb_grpc
from serving.results import SearchKnobs
from serving.server import serve_forever, start_server
from serving.service import RetrievalService
from serving.servicer import SERVICE_NAME
from serving.torch_encoder import TorchQueryEncoder
from towerline.beir import load_dataset
from towerline.config import ServeConfig, TowerlineConfig, load_config
from towerline.errors import ArtifactError
from towerline.towers import save_dual_encoder, towers_from_backbone

LIMITS = ServeConfig(port=0, max_top_k=50, max_batch=8, max_query_chars=200)
BATCHING = LIMITS.model_copy(update={"batching": True, "batch_max_size": 8, "batch_max_wait_ms": 30.0})
QUERIES = ["alpha beta", "gamma", "delta epsilon zeta", "eta theta", "iota"]


class BlockingEncoder:
    """Wraps the real encoder and holds each call until released, to keep an RPC in flight."""

    def __init__(self, inner: TorchQueryEncoder) -> None:
        self.inner = inner
        self.embedding_space = inner.embedding_space
        self.name = inner.name
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        self.entered.set()
        self.release.wait(timeout=10)
        return self.inner.encode(texts)


class CountingIndex(LoadedIndex):
    """The real loaded index, counting searches (to see whether a call reached FAISS)."""

    searches = 0

    def search(self, query_embeddings: np.ndarray, k: int, **knobs: int | None) -> list[list[tuple[str, float]]]:
        self.searches += 1
        return super().search(query_embeddings, k, **knobs)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path, tiny_backbone: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("serving")
    config = load_config(
        None,
        [
            f"data.dir={tiny_dataset}",
            f"encoder.backbone={tiny_backbone}",
            "encoder.max_query_length=16",
            "encoder.max_doc_length=48",
        ],
    )
    query_tower, doc_tower = towers_from_backbone(config.encoder)
    save_dual_encoder(query_tower, doc_tower, root / "encoder", producer="test", config=config)
    build_index(config, root / "encoder", root / "index")
    return root / "encoder", root / "index"


@pytest.fixture(scope="module")
def encoder(artifacts: tuple[Path, Path]) -> TorchQueryEncoder:
    return TorchQueryEncoder.from_dual_encoder(artifacts[0])


@pytest.fixture(scope="module")
def index(artifacts: tuple[Path, Path]) -> LoadedIndex:
    return load_index(artifacts[1])


@pytest.fixture(scope="module")
def service(encoder: TorchQueryEncoder, index: LoadedIndex) -> RetrievalService:
    return RetrievalService(encoder, index, LIMITS)


def serve(service: RetrievalService | None, limits: ServeConfig = LIMITS) -> Iterator[str]:
    server, port = start_server(service, limits)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


@pytest.fixture(scope="module")
def address(service: RetrievalService) -> Iterator[str]:
    yield from serve(service)


@pytest.fixture()
def client(address: str) -> Iterator[RetrievalClient]:
    with RetrievalClient(address, timeout_s=10) as client:
        yield client


def raw_stub(address: str) -> tuple[grpc.Channel, pb_grpc.RetrievalServiceStub]:
    channel = grpc.insecure_channel(address)
    return channel, pb_grpc.RetrievalServiceStub(channel)


# --- the plain service, no network -------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda s: s.search("", 5), "query"),
        (lambda s: s.search("   ", 5), "query"),
        (lambda s: s.search("x" * 201, 5), "query"),
        (lambda s: s.search("ok", 0), "top_k"),
        (lambda s: s.search("ok", 51), "top_k"),
        (lambda s: s.batch_search([], 5), "queries"),
        (lambda s: s.batch_search(["q"] * 9, 5), "queries"),
        (lambda s: s.batch_search(["ok", ""], 5), "queries[1]"),
    ],
)
def test_invalid_requests_name_the_field(service: RetrievalService, call, field: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        call(service)
    assert raised.value.field == field
    assert str(raised.value).startswith(f"{field}: ")


def test_search_returns_top_k_hits_best_first(service: RetrievalService, index: LoadedIndex) -> None:
    result = service.search("alpha beta", 7)
    scores = [hit.score for hit in result.hits]
    assert len(result.hits) == 7
    assert scores == sorted(scores, reverse=True)
    assert result.index_version == index.manifest.fingerprint[:12]
    assert result.latency_ms > 0


def test_checkpoint_stops_before_encoding(encoder: TorchQueryEncoder, index: LoadedIndex) -> None:
    blocking = BlockingEncoder(encoder)
    service = RetrievalService(blocking, index, LIMITS)

    def expired() -> None:
        raise DeadlineExceeded("deadline passed")

    with pytest.raises(DeadlineExceeded):
        service.search("alpha", 3, checkpoint=expired)
    assert blocking.calls == 0


def test_encoder_from_another_embedding_space_is_refused(encoder: TorchQueryEncoder, index: LoadedIndex) -> None:
    stranger = TorchQueryEncoder(encoder.tower, "0" * 64, "torch:other")
    with pytest.raises(ArtifactError, match="embedding space mismatch"):
        RetrievalService(stranger, index, LIMITS)


def test_build_service_serves_a_dual_encoder_through_its_torch_query_tower(
    artifacts: tuple[Path, Path], service: RetrievalService
) -> None:
    encoder_path, index_path = artifacts
    config = TowerlineConfig(serve=LIMITS)
    built = build_service(config, index_path, encoder_path)
    assert built.info().encoder_name.startswith("torch:encoder:")
    assert built.search("alpha beta", 5).hits == service.search("alpha beta", 5).hits
    with pytest.raises(ArtifactError, match="expected 'onnx-query-encoder' or 'dual-encoder'"):
        build_service(config, index_path, index_path)


# --- over a real loopback channel --------------------------------------------------------------


def test_search_over_grpc_equals_in_process(client: RetrievalClient, service: RetrievalService) -> None:
    remote = client.search_result("alpha beta", top_k=10)
    local = service.search("alpha beta", 10)
    assert remote.hits == local.hits
    assert remote.index_version == local.index_version
    assert client.search("alpha beta", top_k=10) == local.hits
    assert all(isinstance(hit.doc_id, str) and isinstance(hit.score, float) for hit in remote.hits)


def test_batch_search_over_grpc_equals_in_process(address: str, service: RetrievalService) -> None:
    # batch_size 2: five queries go out as three BatchSearch calls and come back in order.
    with RetrievalClient(address, batch_size=2) as client:
        remote = client.batch_search(QUERIES, top_k=4)
    # Same chunks in-process: padding depends on the batch, so only then are scores bit-identical.
    local = [result for start in (0, 2, 4) for result in service.batch_search(QUERIES[start : start + 2], 4)]
    assert remote == [result.hits for result in local]


@pytest.mark.parametrize(
    ("request_message", "field"),
    [
        (pb.SearchRequest(query="", top_k=5), "query"),
        (pb.SearchRequest(query="ok", top_k=0), "top_k"),
        (pb.SearchRequest(query="ok", top_k=1000), "top_k"),
        (pb.BatchSearchRequest(queries=["q"] * 9, top_k=5), "queries"),
        # The fixture's index is flat: no inverted lists, no graph.
        (pb.SearchRequest(query="ok", top_k=5, knobs=pb.SearchKnobs(nprobe=4)), "knobs.nprobe"),
        (pb.BatchSearchRequest(queries=["q"], top_k=5, knobs=pb.SearchKnobs(ef_search=-1)), "knobs.ef_search"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(address: str, request_message, field: str) -> None:
    channel, stub = raw_stub(address)
    method = stub.Search if isinstance(request_message, pb.SearchRequest) else stub.BatchSearch
    with channel, pytest.raises(grpc.RpcError) as raised:
        method(request_message, timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith(f"{field}: ")


@pytest.mark.parametrize("limits", [LIMITS, BATCHING], ids=["unbatched", "batched"])
def test_per_request_nprobe_reaches_faiss_over_grpc(artifacts: tuple[Path, Path], encoder: TorchQueryEncoder,
                                                    index: LoadedIndex, limits: ServeConfig, tmp_path: Path) -> None:
    """An IVF index probing 1 of its lists by default; a request probing all of them gets exact search."""
    config = load_config(artifacts[1] / "config.yaml", ["index.type=ivf", "index.ivf_nprobe=1"])
    build_index(config, artifacts[0], tmp_path / "ivf")
    ivf = load_index(tmp_path / "ivf")
    lists = int(ivf.search_knobs["ivf_nlist"])
    assert lists > 1 and ivf.search_knobs["ivf_nprobe"] == 1
    ivf_service, exact = RetrievalService(encoder, ivf, limits), RetrievalService(encoder, index, LIMITS)
    for address in serve(ivf_service, limits):
        with RetrievalClient(address, timeout_s=10) as client:
            probed = [client.search(query, 10) for query in QUERIES]
            every_list = [client.search(query, 10, knobs=SearchKnobs(nprobe=lists)) for query in QUERIES]
            batched = client.batch_search(QUERIES, 10, knobs=SearchKnobs(nprobe=lists))
            with pytest.raises(RetrievalRpcError, match=r"knobs\.ef_search"):
                client.search("alpha", 10, knobs=SearchKnobs(ef_search=32))

    def ids(results: list) -> list[list[str]]:
        return [[hit.doc_id for hit in hits] for hits in results]

    assert ids(every_list) == ids(batched) == ids([exact.search(query, 10).hits for query in QUERIES])
    assert ids(probed) == ids([ivf_service.search(query, 10).hits for query in QUERIES]) != ids(every_list)


@pytest.mark.parametrize("limits", [LIMITS, BATCHING], ids=["unbatched", "batched"])
def test_include_documents_returns_titles_and_snippets_from_the_doc_store(
        artifacts: tuple[Path, Path], encoder: TorchQueryEncoder, index: LoadedIndex, limits: ServeConfig,
        tmp_path: Path) -> None:
    corpus = load_dataset(load_config(artifacts[1] / "config.yaml").data).corpus
    limits = limits.model_copy(update={"snippet_chars": 12})
    for address in serve(RetrievalService(encoder, index, limits), limits):
        with RetrievalClient(address, timeout_s=10) as client:
            plain = client.search("alpha beta", 5)
            with_documents = client.search("alpha beta", 5, include_documents=True)
            batched = client.batch_search(QUERIES[:2], 5, include_documents=True)
    assert [hit[:4] for hit in with_documents] == [hit[:4] for hit in plain]
    assert all(hit.title is None and hit.snippet is None for hit in plain)
    for hit in [*with_documents, *batched[0], *batched[1]]:
        assert (hit.title, hit.snippet) == (corpus[hit.doc_id].title, corpus[hit.doc_id].text[:12])
    # A version built without a document store refuses the request, naming the field.
    config = load_config(artifacts[1] / "config.yaml", ["index.doc_store=false"])
    build_index(config, artifacts[0], tmp_path / "bare")
    bare = load_index(tmp_path / "bare")
    assert bare.doc_store is None and index.doc_store is not None and index.doc_store.count == index.size
    for address in serve(RetrievalService(encoder, bare, limits), limits):
        with RetrievalClient(address, timeout_s=10) as client, pytest.raises(RetrievalRpcError) as raised:
            client.search("alpha", 5, include_documents=True)
    assert raised.value.code == "INVALID_ARGUMENT" and raised.value.details.startswith("include_documents: ")


def test_client_raises_typed_errors(client: RetrievalClient) -> None:
    with pytest.raises(RetrievalRpcError) as raised:
        client.search("", top_k=5)
    assert raised.value.code == "INVALID_ARGUMENT"
    assert "query" in raised.value.details


def test_recommend_on_a_server_without_a_recommender_says_how_to_start_one(address: str) -> None:
    channel, stub = raw_stub(address)
    with channel, pytest.raises(grpc.RpcError) as raised:
        stub.Recommend(pb.RecommendRequest(user_id="u1", top_k=5), timeout=10)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "--recommender" in raised.value.details()


def test_index_info_describes_the_loaded_pair(client: RetrievalClient, index: LoadedIndex) -> None:
    info = client.info()
    assert (info.index_kind, info.index_type, info.metric) == ("faiss-index", "flat", "ip")
    assert (info.count, info.dim) == (80, 32)
    assert info.embedding_space == index.embedding_space
    assert info.index_fingerprint == index.manifest.fingerprint
    assert info.encoder_name.startswith("torch:encoder:")


def test_health_reports_serving(address: str, client: RetrievalClient) -> None:
    client.wait_ready(timeout=5)
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE_NAME):
            response = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert SERVICE_NAME == "towerline.v1.RetrievalService"
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= set(services)


def test_without_an_index_calls_are_unavailable_and_health_not_serving() -> None:
    for address in serve(None):
        with RetrievalClient(address) as client:
            with pytest.raises(RetrievalRpcError) as raised:
                client.search("alpha", top_k=3)
            assert raised.value.code == "UNAVAILABLE"
            assert client.health() == "NOT_SERVING"
            with pytest.raises(RetrievalRpcError, match="not serving after"):
                client.wait_ready(timeout=0.3)


def test_calls_beyond_max_concurrent_rpcs_are_resource_exhausted(
    encoder: TorchQueryEncoder, index: LoadedIndex
) -> None:
    blocking = BlockingEncoder(encoder)
    limits = LIMITS.model_copy(update={"max_concurrent_rpcs": 1})
    try:
        for address in serve(RetrievalService(blocking, index, limits), limits):
            channel, stub = raw_stub(address)
            with channel, RetrievalClient(address) as client:
                in_flight = stub.Search.future(pb.SearchRequest(query="alpha", top_k=3), timeout=10)
                assert blocking.entered.wait(timeout=10)
                with pytest.raises(RetrievalRpcError) as raised:
                    client.search("beta", top_k=3)
                assert raised.value.code == "RESOURCE_EXHAUSTED"
                assert "max_concurrent_rpcs" in raised.value.details
                blocking.release.set()
                assert len(in_flight.result(timeout=10).hits) == 3
                assert len(client.search("beta", top_k=3)) == 3
    finally:
        blocking.release.set()


def test_a_burst_past_the_default_bound_is_shed_while_health_stays_serving(
    encoder: TorchQueryEncoder, index: LoadedIndex
) -> None:
    """With the default admission settings: 100 calls at once against encoders held busy → exactly
    max_concurrent_rpcs admitted (they all complete once released), the rest RESOURCE_EXHAUSTED at
    once, and a health check answers SERVING throughout. (The queue-wait bound is off here: the
    encoders are held for as long as the test takes; the next test covers it.)"""
    defaults = ServeConfig(port=0, max_queue_wait_ms=None)
    blocking = BlockingEncoder(encoder)
    burst = defaults.max_concurrent_rpcs + 36
    try:
        for address in serve(RetrievalService(blocking, index, defaults), defaults):
            channel, stub = raw_stub(address)
            with channel:
                calls = [stub.Search.future(pb.SearchRequest(query="alpha", top_k=3), timeout=30)
                         for _ in range(burst)]
                assert blocking.entered.wait(timeout=10)
                shed = _wait_for_shed(calls, burst - defaults.max_concurrent_rpcs)
                assert len(shed) == burst - defaults.max_concurrent_rpcs
                assert all("max_concurrent_rpcs" in call.exception().details() for call in shed)
                health = health_pb2_grpc.HealthStub(channel)
                for _ in range(5):
                    answer = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=2)
                    assert answer.status == health_pb2.HealthCheckResponse.SERVING
                assert blocking.calls <= defaults.max_workers  # the others wait for an execution slot
                blocking.release.set()
                served = [call for call in calls if call not in shed]
                assert all(len(call.result(timeout=30).hits) == 3 for call in served)
    finally:
        blocking.release.set()


@pytest.mark.parametrize("batching", [False, True])
def test_a_call_waiting_past_max_queue_wait_is_shed_and_never_encoded(
    encoder: TorchQueryEncoder, index: LoadedIndex, batching: bool
) -> None:
    """One execution slot held: the next call, sent without a deadline, is RESOURCE_EXHAUSTED once it
    has waited serve.max_queue_wait_ms — unbatched for a slot, batched in the queue — and the held call
    still completes."""
    recording = RecordingEncoder(encoder, hold_first=True)
    limits = LIMITS.model_copy(update={"max_workers": 1, "max_queue_wait_ms": 200.0, "batching": batching,
                                       "batch_max_size": 1})
    try:
        for address in serve(RetrievalService(recording, index, limits), limits):
            channel, stub = raw_stub(address)
            with channel:
                held = stub.Search.future(pb.SearchRequest(query="alpha held", top_k=3))
                assert recording.entered.wait(timeout=10)
                waiting = stub.Search.future(pb.SearchRequest(query="beta waiting", top_k=3))
                if batching:  # the queue is only looked at when the worker frees up
                    threading.Event().wait(0.5)
                    recording.release.set()
                with pytest.raises(grpc.RpcError) as shed:
                    waiting.result(timeout=10)
                assert shed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "serve.max_queue_wait_ms" in shed.value.details()
                recording.release.set()
                assert len(held.result(timeout=10).hits) == 3
        assert recording.batches == [["alpha held"]]
    finally:
        recording.release.set()


def _wait_for_shed(calls: list, expected: int) -> list:
    for _ in range(200):
        shed = [call for call in calls if call.done() and call.exception() is not None]
        if len(shed) >= expected:
            return shed
        threading.Event().wait(0.05)
    return [call for call in calls if call.done() and call.exception() is not None]


@pytest.mark.parametrize("payload", [b"\x0a\x02\xff\xfe\x10\x03", b"\xff\xff\xff\xff", b"\x12"])
def test_a_request_that_cannot_be_decoded_is_invalid_argument(address: str, payload: bytes) -> None:
    """Invalid UTF-8 in the query field, garbage, a truncated field: INVALID_ARGUMENT, never INTERNAL."""
    with grpc.insecure_channel(address) as channel:
        search = channel.unary_unary(f"/{SERVICE_NAME}/Search", request_serializer=None,
                                     response_deserializer=None)
        with pytest.raises(grpc.RpcError) as raised:
            search(payload, timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith("request: cannot be decoded")


def test_deadline_is_honoured_and_the_search_skipped(encoder: TorchQueryEncoder, index: LoadedIndex) -> None:
    blocking = BlockingEncoder(encoder)
    counting = CountingIndex(**{field.name: getattr(index, field.name) for field in fields(index)})
    limits = LIMITS.model_copy(update={"max_concurrent_rpcs": 1})
    try:
        for address in serve(RetrievalService(blocking, counting, limits), limits):
            with pytest.raises(RetrievalRpcError) as raised:
                RetrievalClient(address, timeout_s=0.2).search("alpha", top_k=3)
            assert raised.value.code == "DEADLINE_EXCEEDED"
            blocking.release.set()
            # The slot frees only when the expired call ends; the next call then succeeds.
            with RetrievalClient(address) as client:
                result = _retry_while_busy(lambda: client.search("alpha", top_k=3))
            assert len(result) == 3
            assert counting.searches == 1, "the expired call must stop before the FAISS search"
    finally:
        blocking.release.set()


def _retry_while_busy(call):
    for _ in range(100):
        try:
            return call()
        except RetrievalRpcError as error:
            if error.code != "RESOURCE_EXHAUSTED":
                raise
            threading.Event().wait(0.05)
    raise AssertionError("the server stayed busy")


def test_serve_forever_drains_the_call_in_flight_when_stopped(encoder: TorchQueryEncoder, index: LoadedIndex) -> None:
    """Stop while a search is held inside the encoder: the server refuses new calls but the held one
    still completes with its hits (a stop without grace would cancel it)."""
    blocking = BlockingEncoder(encoder)
    stop = threading.Event()
    started: list[int] = []
    ready = threading.Event()

    def on_started(port: int) -> None:
        started.append(port)
        ready.set()

    thread = threading.Thread(
        target=serve_forever,
        args=(RetrievalService(blocking, index, LIMITS), LIMITS),
        kwargs={"stop": stop, "on_started": on_started, "grace_s": 10.0},
    )
    thread.start()
    try:
        assert ready.wait(timeout=10)
        address = f"127.0.0.1:{started[0]}"
        with RetrievalClient(address) as client, ThreadPoolExecutor(1) as pool:
            client.wait_ready(timeout=5)
            in_flight = pool.submit(client.search, "alpha", 2)
            assert blocking.entered.wait(timeout=10)
            stop.set()
            assert wait_until(lambda: _refuses_new_calls(address)), "the server never began to shut down"
            blocking.release.set()
            assert len(in_flight.result(timeout=10)) == 2
        thread.join(timeout=15)
        assert not thread.is_alive()
    finally:
        blocking.release.set()
        stop.set()


def _refuses_new_calls(address: str) -> bool:
    with RetrievalClient(address, timeout_s=1) as probe:
        try:
            return probe.health() != "SERVING"
        except RetrievalRpcError:
            return True


def test_committed_stubs_match_the_protos() -> None:
    root = Path(__file__).resolve().parents[1]
    check = subprocess.run(
        [sys.executable, str(root / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr


# --- micro-batching -----------------------------------------------------------------------------


class RecordingEncoder:
    """The real encoder, recording every batch it encodes (and optionally holding the first)."""

    def __init__(self, inner: TorchQueryEncoder, hold_first: bool = False, delay_s: float = 0.0) -> None:
        self.inner = inner
        self.embedding_space = inner.embedding_space
        self.name = inner.name
        self.batches: list[list[str]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.hold_first = hold_first
        self.delay_s = delay_s

    def encode(self, texts: list[str]) -> np.ndarray:
        self.batches.append(list(texts))
        self.entered.set()
        if self.hold_first and len(self.batches) == 1:
            self.release.wait(timeout=10)
        threading.Event().wait(self.delay_s)
        return self.inner.encode(texts)




def test_concurrent_searches_share_encoder_calls_and_get_their_own_hits(
    encoder: TorchQueryEncoder, index: LoadedIndex
) -> None:
    recording = RecordingEncoder(encoder, delay_s=0.05)
    service = RetrievalService(recording, index, BATCHING)
    queries = [f"{word} query" for word in ("alpha", "beta", "gamma", "delta")] * 4
    for address in serve(service, BATCHING):
        channel, stub = raw_stub(address)
        with channel:
            calls = [stub.Search.future(pb.SearchRequest(query=query, top_k=3), timeout=30) for query in queries]
            responses = [call.result(timeout=30) for call in calls]
    assert len(recording.batches) < len(queries) and max(map(len, recording.batches)) > 1
    assert sorted(text for batch in recording.batches for text in batch) == sorted(queries)
    direct = RetrievalService(encoder, index, LIMITS)
    for query, response in zip(queries, responses, strict=True):
        expected = direct.search(query, 3).hits
        assert [hit.doc_id for hit in response.hits] == [hit.doc_id for hit in expected]
        assert [hit.score for hit in response.hits] == pytest.approx([hit.score for hit in expected], abs=1e-5)


def test_length_buckets_split_a_batch_and_batch_workers_run_side_by_side(
    encoder: TorchQueryEncoder, index: LoadedIndex
) -> None:
    """Short and long queries gathered together are encoded apart (serve.batch_length_buckets); with
    two workers, a second batch runs while the first is held."""
    recording = RecordingEncoder(encoder, hold_first=True)
    limits = BATCHING.model_copy(update={"batch_length_buckets": [12], "max_workers": 2, "batch_max_wait_ms": 300.0})
    short, long = ["alpha", "beta q"], ["a much longer alpha query", "another long beta query"]
    try:
        for address in serve(RetrievalService(recording, index, limits), limits):
            channel, stub = raw_stub(address)
            with channel:
                calls = [stub.Search.future(pb.SearchRequest(query=query, top_k=3), timeout=30)
                         for query in [short[0], long[0], short[1], long[1]]]
                assert recording.entered.wait(timeout=10)
                # The first batch is held on one worker; the other worker takes the next batch.
                later = stub.Search(pb.SearchRequest(query="gamma", top_k=3), timeout=10)
                assert len(later.hits) == 3
                recording.release.set()
                assert all(len(call.result(timeout=10).hits) == 3 for call in calls)
        assert sorted(map(sorted, recording.batches)) == [sorted(long), sorted(short), ["gamma"]]
    finally:
        recording.release.set()


def test_a_batched_search_past_its_deadline_is_dropped_before_encoding(
    encoder: TorchQueryEncoder, index: LoadedIndex
) -> None:
    recording = RecordingEncoder(encoder, hold_first=True)
    # One batch worker: while it holds the first batch, later requests wait in the queue.
    limits = BATCHING.model_copy(update={"batch_max_size": 1, "batch_queue": 1, "max_workers": 1})
    try:
        for address in serve(RetrievalService(recording, index, limits), limits):
            channel, stub = raw_stub(address)
            with channel:
                first = stub.Search.future(pb.SearchRequest(query="alpha first", top_k=3), timeout=30)
                assert recording.entered.wait(timeout=10)  # the batcher is busy with it
                late = stub.Search.future(pb.SearchRequest(query="beta late", top_k=3), timeout=0.3)
                threading.Event().wait(0.1)  # `late` is queued: the queue (1) is full now
                with pytest.raises(grpc.RpcError) as full:
                    stub.Search(pb.SearchRequest(query="gamma full", top_k=3), timeout=5)
                assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "serve.batch_queue" in full.value.details()
                with pytest.raises(grpc.RpcError) as expired:
                    late.result(timeout=10)
                assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                recording.release.set()
                assert len(first.result(timeout=10).hits) == 3
                # The next call runs; the expired one never reached the encoder.
                assert len(stub.Search(pb.SearchRequest(query="delta next", top_k=3), timeout=10).hits) == 3
        assert [batch for batch in recording.batches] == [["alpha first"], ["delta next"]]
    finally:
        recording.release.set()


def test_metrics_endpoint_counts_calls_by_code_and_times_each_stage(
    encoder: TorchQueryEncoder, index: LoadedIndex
) -> None:
    import urllib.request

    from serving.metrics import ServingMetrics

    metrics = ServingMetrics()
    service = RetrievalService(encoder, index, LIMITS)
    server, port = start_server(service, LIMITS, metrics=metrics)
    metrics_port = metrics.serve_http("127.0.0.1", 0)
    try:
        with RetrievalClient(f"127.0.0.1:{port}") as client:
            for query in QUERIES[:3]:
                client.search(query, top_k=3)
            client.batch_search(QUERIES, top_k=3)
            with pytest.raises(RetrievalRpcError):
                client.search("", top_k=3)
            client.health()  # never counted: not a retrieval call
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    finally:
        server.stop(None)
        metrics.close()
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples['towerline_requests_total{code="OK",method="Search"}'] == 3
    assert samples['towerline_requests_total{code="OK",method="BatchSearch"}'] == 1
    assert samples['towerline_requests_total{code="INVALID_ARGUMENT",method="Search"}'] == 1
    assert not any("Check" in name for name in samples)
    assert samples['towerline_request_seconds_count{method="Search"}'] == 4
    assert samples['towerline_stage_seconds_count{stage="encode"}'] == 4  # 3 searches + 1 batch
    assert samples['towerline_stage_seconds_count{stage="dense_search"}'] == 4
    assert samples["towerline_batch_size_sum"] == 3 + len(QUERIES)
    assert samples["towerline_admitted_calls"] == 0
    version_line = next(name for name in samples if name.startswith("towerline_index_info"))
    assert f'version="{index.version}"' in version_line


def test_every_call_gets_a_request_id_back_and_one_structured_access_record(
    service: RetrievalService, caplog: pytest.LogCaptureFixture
) -> None:
    """The caller's x-request-id (or a fresh one) comes back in the trailing metadata, errors too; with
    serve.access_log each call leaves one record with id, method, code and latency, and the JSON
    formatter writes it as one object."""
    import json
    import logging

    from serving.access_log import ACCESS_LOGGER, JsonFormatter

    limits = LIMITS.model_copy(update={"access_log": True})
    server, port = start_server(service, limits)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, caplog.at_level(logging.INFO, ACCESS_LOGGER):
            stub = pb_grpc.RetrievalServiceStub(channel)
            _, call = stub.Search.with_call(pb.SearchRequest(query="alpha", top_k=3), timeout=10,
                                            metadata=(("x-request-id", "req-42"),))
            assert ("x-request-id", "req-42") in call.trailing_metadata()
            with pytest.raises(grpc.RpcError) as refused:
                stub.Search(pb.SearchRequest(query="alpha", top_k=0), timeout=10,
                            metadata=(("x-request-id", "bad id with spaces"),))
            fresh = dict(refused.value.trailing_metadata())["x-request-id"]
            assert fresh != "bad id with spaces" and len(fresh) == 32
    finally:
        server.stop(None)
    records = [record for record in caplog.records if record.name == ACCESS_LOGGER]
    assert [(r.request_id, r.method, r.code) for r in records] == [  # type: ignore[attr-defined]
        ("req-42", "Search", "OK"), (fresh, "Search", "INVALID_ARGUMENT")]
    line = json.loads(JsonFormatter().format(records[0]))
    assert line["request_id"] == "req-42" and line["code"] == "OK" and line["level"] == "info"
    assert line["latency_ms"] > 0 and line["peer"].startswith("ipv4:127.0.0.1")


def test_service_logging_writes_json_lines_with_the_running_calls_request_id() -> None:
    import io
    import json
    import logging

    from serving.access_log import SERVICE_LOGGERS, configure_service_logging, current_request_id

    stream = io.StringIO()
    handler = configure_service_logging("json", access_log=True, stream=stream)
    logger = logging.getLogger("serving.test")
    token = current_request_id.set("req-7")
    try:
        try:
            raise ValueError("broken index")
        except ValueError:
            logger.exception("retrieval call failed")
    finally:
        current_request_id.reset(token)
        for name in SERVICE_LOGGERS:
            logging.getLogger(name).removeHandler(handler)
            logging.getLogger(name).propagate = True
            logging.getLogger(name).setLevel(logging.NOTSET)
    line = json.loads(stream.getvalue())
    assert line["request_id"] == "req-7" and line["level"] == "error" and "broken index" in line["exc_info"]


def test_the_client_spreads_calls_over_replicas_and_retries_an_unavailable_one(
    encoder: TorchQueryEncoder, index: LoadedIndex
) -> None:
    """Two replicas, one of them without an index (UNAVAILABLE): every call still succeeds, the
    client's retry landing on the serving replica; with two serving replicas both get calls; then one
    is stopped under the client and no call is lost."""
    from serving.client import channel_target
    from towerline.errors import ConfigError

    first, second = (RecordingEncoder(encoder) for _ in range(2))
    serving_a, port_a = start_server(RetrievalService(first, index, LIMITS), LIMITS)
    empty, port_empty = start_server(None, LIMITS)
    try:
        with RetrievalClient([f"127.0.0.1:{port_a}", f"127.0.0.1:{port_empty}"]) as client:
            assert all(len(client.search(query, 3)) == 3 for query in QUERIES * 4)
        assert len(first.batches) == len(QUERIES) * 4
        serving_b, port_b = start_server(RetrievalService(second, index, LIMITS), LIMITS)
        try:
            with RetrievalClient(f"127.0.0.1:{port_a},127.0.0.1:{port_b}") as client:
                assert all(len(client.search(query, 3)) == 3 for query in QUERIES * 4)
                assert len(second.batches) > 0 and len(first.batches) > len(QUERIES) * 4
                serving_b.stop(None).wait()
                assert all(len(client.search(query, 3)) == 3 for query in QUERIES * 4)
        finally:
            serving_b.stop(None)
    finally:
        serving_a.stop(None)
        empty.stop(None)
    assert channel_target("localhost:50051") == "localhost:50051"
    assert channel_target("10.0.0.1:1, 10.0.0.2:2") == "ipv4:10.0.0.1:1,10.0.0.2:2"
    with pytest.raises(ConfigError, match="IP literals"):
        channel_target("a.example:1,b.example:2")


def test_a_stop_turns_health_not_serving_and_still_answers_during_the_drain_delay(
    encoder: TorchQueryEncoder, index: LoadedIndex
) -> None:
    limits = LIMITS.model_copy(update={"drain_delay_s": 1.5, "shutdown_grace_s": 2.0})
    stop, ready, started = threading.Event(), threading.Event(), []
    thread = threading.Thread(target=serve_forever, args=(RetrievalService(encoder, index, limits), limits),
                              kwargs={"stop": stop, "on_started": lambda port: (started.append(port), ready.set())})
    thread.start()
    try:
        assert ready.wait(timeout=10)
        with RetrievalClient(f"127.0.0.1:{started[0]}", timeout_s=2) as client:
            client.wait_ready(timeout=5)
            stop.set()
            assert wait_until(lambda: client.health() == "NOT_SERVING", timeout_s=1.0)
            assert len(client.search("alpha", top_k=3)) == 3  # still answered while draining
            assert thread.is_alive()
        thread.join(timeout=10)
        assert not thread.is_alive()
    finally:
        stop.set()
